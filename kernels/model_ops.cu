// The whole-model training step's layout moves and remaining pointwise kernels. CPU twins (the
// specification):
//   fk_model_copy2d          a strided copy / cast / accumulate (no CPU function: a slice copy,
//                            `half::bf16::from_f32` rounding, or `+=`)
//   fk_model_qk_fwd          model::attention::attention_block's prologue: head_rmsnorm
//                            (ops::norm::rmsnorm_forward, QK_NORM_EPS) of q and k, then
//                            ops::rope::rope_forward, on heads taken from a token-major qkv
//                            (ops::attention::split_heads), stored bf16
//   fk_model_qk_bwd          attention_block_backward's epilogue: ops::rope::rope_backward, then
//                            head_rmsnorm_backward (ops::norm::rmsnorm_backward, frozen weight),
//                            written token-major (ops::attention::merge_heads)
//   fk_model_merge_heads     ops::attention::merge_heads (bf16 → bf16); _bwd: split_heads of an
//                            f32 gradient, rounded to bf16
//   fk_model_gelu_fwd / _bwd ops::activation::gelu_tanh_forward / gelu_tanh_backward
//   fk_model_timestep_emb    ops::embedding::timestep_embedding (as model::embed calls it)
//   fk_model_random_fill     model::random::RandomParam::generate
//
// Rounding: every f32 and f64 operation the CPU rounds separately is a _rn intrinsic here, so
// nvcc cannot contract a multiply and an add into an FMA; the norms' sums run in f64 like the
// CPU's. The RMSNorm sums are a warp butterfly instead of the CPU's left-to-right loop (the f64
// sums of exact f32 squares agree to ~1e-16, far below the f32 result's rounding).
//
// Determinism: every output element is written by exactly one thread; no atomics.
#ifdef FK_HOST_EMULATION
#include "host_emulation.h"
#else
#include "ptx_sm80.h"
#endif
#include "abi.h"

static_assert(sizeof(FkModelCopyParams) == FK_SIZEOF_FkModelCopyParams, "abi.h: FkModelCopyParams size");
static_assert(sizeof(FkModelQkParams) == FK_SIZEOF_FkModelQkParams, "abi.h: FkModelQkParams size");
static_assert(sizeof(FkModelHeadsParams) == FK_SIZEOF_FkModelHeadsParams, "abi.h: FkModelHeadsParams size");
static_assert(sizeof(FkModelGeluParams) == FK_SIZEOF_FkModelGeluParams, "abi.h: FkModelGeluParams size");
static_assert(sizeof(FkModelTimestepParams) == FK_SIZEOF_FkModelTimestepParams, "abi.h: FkModelTimestepParams size");
static_assert(sizeof(FkModelRandomParams) == FK_SIZEOF_FkModelRandomParams, "abi.h: FkModelRandomParams size");

// A named namespace: the CPU emulation compiles every .cu into one translation unit.
namespace fk_model {

constexpr int THREADS = FK_MODEL_THREADS;
constexpr int WARPS = THREADS / 32;
static_assert(THREADS % 32 == 0, "whole warps");

// Round-to-nearest arithmetic the compiler may not contract into FMAs (the CPU twins round
// every product and every sum). The emulation is plain C++ without FMA contraction.
#ifdef FK_HOST_EMULATION
__device__ __forceinline__ float rn_fmul(float a, float b) { return a * b; }
__device__ __forceinline__ float rn_fadd(float a, float b) { return a + b; }
__device__ __forceinline__ float rn_fsub(float a, float b) { return a - b; }
__device__ __forceinline__ double rn_dmul(double a, double b) { return a * b; }
__device__ __forceinline__ double rn_dadd(double a, double b) { return a + b; }
__device__ __forceinline__ double rn_dsub(double a, double b) { return a - b; }
__device__ __forceinline__ double rn_ddiv(double a, double b) { return a / b; }
__device__ __forceinline__ double rn_dsqrt(double a) { return std::sqrt(a); }
// The emulator's shuffle carries f32 bit patterns (a shuffle moves bits, no arithmetic touches
// them): a double travels as its two halves.
__device__ __forceinline__ double shfl_xor_f64(double v, int mask) {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    const uint64_t lo = __float_as_uint(shfl_xor_f32(__uint_as_float((uint32_t)u), mask));
    const uint64_t hi = __float_as_uint(shfl_xor_f32(__uint_as_float((uint32_t)(u >> 32)), mask));
    u = lo | (hi << 32);
    std::memcpy(&v, &u, 8);
    return v;
}
#else
__device__ __forceinline__ float rn_fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double rn_dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double rn_dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rn_dsub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rn_ddiv(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double rn_dsqrt(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ double shfl_xor_f64(double v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
#endif

// Sum over the warp, the same value in every lane (each butterfly step adds the same two
// partials in every lane: deterministic). All 32 lanes must call it.
__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int m = 16; m > 0; m >>= 1) v = rn_dadd(v, shfl_xor_f64(v, m));
    return v;
}

// Calls f(i) for every i < n, the grid striding over the range (any grid size covers any n).
template <class F>
__device__ __forceinline__ void grid_stride(int64_t n, F f) {
    const int64_t step = (int64_t)gridDim.x * THREADS;
    for (int64_t i = (int64_t)blockIdx.x * THREADS + threadIdx.x; i < n; i += step) f(i);
}

// Calls f(item, lane) for every item < n, one warp per item, the warps of the grid striding over
// the range. The loop bound depends on the warp only, so all lanes run it together.
template <class F>
__device__ __forceinline__ void warp_stride(int64_t n, F f) {
    const int64_t step = (int64_t)gridDim.x * WARPS;
    const int lane = threadIdx.x % 32;
    for (int64_t w = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32; w < n; w += step) f(w, lane);
}

__device__ __forceinline__ float load(const void* p, int64_t i, bool bf16) {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// ops::activation::gelu_tanh: 0.5·x·(1 + tanh(K·(x + 0.044715·x·x·x))), Rust's left-to-right order.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // the f32 of SQRT_2_OVER_PI = 0.797_884_6 (0x3f4c422a)
    const float x3 = rn_fmul(rn_fmul(rn_fmul(0.044715f, x), x), x);
    const float t = tanhf(rn_fmul(k, rn_fadd(x, x3)));
    return rn_fmul(rn_fmul(0.5f, x), rn_fadd(1.0f, t));
}

// ops::activation::gelu_tanh_grad: ½(1+T) + ½x(1−T²)·K·(1 + 3·0.044715·x²).
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float k = 0.7978845608028654f;
    const float x3 = rn_fmul(rn_fmul(rn_fmul(0.044715f, x), x), x);
    const float t = tanhf(rn_fmul(k, rn_fadd(x, x3)));
    const float a = rn_fmul(0.5f, rn_fadd(1.0f, t));
    const float c = rn_fadd(1.0f, rn_fmul(rn_fmul(3.0f * 0.044715f, x), x));
    const float b = rn_fmul(rn_fmul(rn_fmul(rn_fmul(0.5f, x), rn_fsub(1.0f, rn_fmul(t, t))), k), c);
    return rn_fadd(a, b);
}

// model::random's splitmix64 finaliser.
__device__ __forceinline__ uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

}  // namespace fk_model

// Entry points qualify fk_model:: (a using-directive would clash with the other .cu files'
// names in the emulator's single translation unit).

// ---- copies and casts -------------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_copy2d(FK_GRID_PARAMS FkModelCopyParams p) {
    const bool src_bf16 = p.src_bf16 != 0, dst_bf16 = p.dst_bf16 != 0, acc = p.accumulate != 0;
    fk_model::grid_stride(p.rows * p.cols, [&](int64_t i) {
        const int64_t r = i / p.cols, c = i % p.cols;
        const float v = fk_model::load(p.src, r * p.ld_src + c, src_bf16);
        const int64_t at = r * p.ld_dst + c;
        if (dst_bf16) {
            static_cast<uint16_t*>(p.dst)[at] = f32_to_bf16(v);
        } else {
            float* dst = static_cast<float*>(p.dst);
            dst[at] = acc ? fk_model::rn_fadd(dst[at], v) : v;
        }
    });
}

// ---- the attention prologue: QK-RMSNorm per head, RoPE --------------------------------------

// One warp per (sample, token, head), head fastest so neighbouring warps read neighbouring
// columns of one qkv row. For q and k: pass 1 sums x² in f64 over the head (rmsnorm_forward's
// ms), pass 2 computes y = (x·rstd)·w per element and rotates the pairs (y₂ᵢ, y₂ᵢ₊₁) by the
// token's angle (rope_forward: c·y₀ − s·y₁, s·y₀ + c·y₁), stored bf16. v is a bf16 copy.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_qk_fwd(FK_GRID_PARAMS FkModelQkParams p) {
    const int64_t h = p.h, d = p.d, hd = h * d, half = d / 2;
    fk_model::warp_stride(p.b * p.ls * h, [&](int64_t item, int lane) {
        const int64_t hi = item % h, r = item / h, bi = r / p.ls, t = p.t0 + r % p.ls;
        const float* row = static_cast<const float*>(p.qkv) + r * p.ld;
        const int64_t head_row = (bi * h + hi) * p.l + t;  // row of [b, h, l] / [b, h, l, d]
        const float* cs = static_cast<const float*>(p.cos) + (bi * p.l + t) * half;
        const float* sn = static_cast<const float*>(p.sin) + (bi * p.l + t) * half;
        for (int which = 0; which < 2; ++which) {
            const float* x = row + which * hd + hi * d;
            const float* w = static_cast<const float*>(which == 0 ? p.q_scale : p.k_scale);
            double ss = 0.0;
            for (int64_t j = lane; j < d; j += 32) ss = fk_model::rn_dadd(ss, fk_model::rn_dmul((double)x[j], (double)x[j]));
            ss = fk_model::warp_sum_f64(ss);
            const double ms = fk_model::rn_ddiv(ss, (double)d);
            const float rs = (float)fk_model::rn_ddiv(1.0, fk_model::rn_dsqrt(fk_model::rn_dadd(ms, (double)p.eps)));
            uint16_t* out = static_cast<uint16_t*>(which == 0 ? p.q : p.k) + head_row * d;
            for (int64_t i = lane; i < half; i += 32) {
                const float y0 = fk_model::rn_fmul(fk_model::rn_fmul(x[2 * i], rs), w[2 * i]);
                const float y1 = fk_model::rn_fmul(fk_model::rn_fmul(x[2 * i + 1], rs), w[2 * i + 1]);
                const float c = cs[i], s = sn[i];
                out[2 * i] = f32_to_bf16(fk_model::rn_fsub(fk_model::rn_fmul(c, y0), fk_model::rn_fmul(s, y1)));
                out[2 * i + 1] = f32_to_bf16(fk_model::rn_fadd(fk_model::rn_fmul(s, y0), fk_model::rn_fmul(c, y1)));
            }
            if (lane == 0) static_cast<float*>(which == 0 ? p.rstd_q : p.rstd_k)[head_row] = rs;
        }
        const float* xv = row + 2 * hd + hi * d;
        uint16_t* v = static_cast<uint16_t*>(p.v) + head_row * d;
        for (int64_t j = lane; j < d; j += 32) v[j] = f32_to_bf16(xv[j]);
    });
}

// One warp per (sample, token, head). For q and k: g = rope_backward(dq) (the rotation by −θ:
// c·g₀ − s'·g₁, s'·g₀ + c·g₁ with s' = −sin), x̂ = x·rstd, gw = g·w; pass 1 sums gw·x̂ in f64
// (m = Σ/d), pass 2 writes dx = rstd·(gw − x̂·m) (rmsnorm_backward, f64 like it). dv is copied.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_qk_bwd(FK_GRID_PARAMS FkModelQkParams p) {
    const int64_t h = p.h, d = p.d, hd = h * d, half = d / 2;
    fk_model::warp_stride(p.b * p.ls * h, [&](int64_t item, int lane) {
        const int64_t hi = item % h, r = item / h, bi = r / p.ls, t = p.t0 + r % p.ls;
        const float* row = static_cast<const float*>(p.qkv) + r * p.ld;
        float* drow = static_cast<float*>(p.dqkv) + r * p.ld;
        const int64_t head_row = (bi * h + hi) * p.l + t;
        const float* cs = static_cast<const float*>(p.cos) + (bi * p.l + t) * half;
        const float* sn = static_cast<const float*>(p.sin) + (bi * p.l + t) * half;
        for (int which = 0; which < 2; ++which) {
            const float* x = row + which * hd + hi * d;
            const float* w = static_cast<const float*>(which == 0 ? p.q_scale : p.k_scale);
            const uint16_t* dy = static_cast<const uint16_t*>(which == 0 ? p.dq : p.dk) + head_row * d;
            const float rs = static_cast<const float*>(which == 0 ? p.rstd_q : p.rstd_k)[head_row];
            // gw·x̂ of pair i, element e (0 or 1), from the rotated gradient.
            auto pair = [&](int64_t i, float& gw0, float& gw1, float& xh0, float& xh1) {
                const float c = cs[i], s = -sn[i];
                const float d0 = bf16_to_f32(dy[2 * i]), d1 = bf16_to_f32(dy[2 * i + 1]);
                const float g0 = fk_model::rn_fsub(fk_model::rn_fmul(c, d0), fk_model::rn_fmul(s, d1));
                const float g1 = fk_model::rn_fadd(fk_model::rn_fmul(s, d0), fk_model::rn_fmul(c, d1));
                gw0 = fk_model::rn_fmul(g0, w[2 * i]);
                gw1 = fk_model::rn_fmul(g1, w[2 * i + 1]);
                xh0 = fk_model::rn_fmul(x[2 * i], rs);
                xh1 = fk_model::rn_fmul(x[2 * i + 1], rs);
            };
            double acc = 0.0;
            for (int64_t i = lane; i < half; i += 32) {
                float gw0, gw1, xh0, xh1;
                pair(i, gw0, gw1, xh0, xh1);
                acc = fk_model::rn_dadd(acc, fk_model::rn_dmul((double)gw0, (double)xh0));
                acc = fk_model::rn_dadd(acc, fk_model::rn_dmul((double)gw1, (double)xh1));
            }
            const double m = fk_model::rn_ddiv(fk_model::warp_sum_f64(acc), (double)d);
            float* dx = drow + which * hd + hi * d;
            for (int64_t i = lane; i < half; i += 32) {
                float gw0, gw1, xh0, xh1;
                pair(i, gw0, gw1, xh0, xh1);
                dx[2 * i] = (float)fk_model::rn_dmul((double)rs, fk_model::rn_dsub((double)gw0, fk_model::rn_dmul((double)xh0, m)));
                dx[2 * i + 1] = (float)fk_model::rn_dmul((double)rs, fk_model::rn_dsub((double)gw1, fk_model::rn_dmul((double)xh1, m)));
            }
        }
        const uint16_t* dv = static_cast<const uint16_t*>(p.dv) + head_row * d;
        float* dxv = drow + 2 * hd + hi * d;
        for (int64_t j = lane; j < d; j += 32) dxv[j] = bf16_to_f32(dv[j]);
    });
}

// ---- merge heads ------------------------------------------------------------------------------

// tokens[r, c] ← heads[bi, c / d, t0 + t, c % d], r = bi·ls + t, c < h·d (bf16 bits copied).
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_merge_heads(FK_GRID_PARAMS FkModelHeadsParams p) {
    const int64_t hd = p.h * p.d;
    const uint16_t* heads = static_cast<const uint16_t*>(p.heads);
    uint16_t* tokens = static_cast<uint16_t*>(p.tokens);
    fk_model::grid_stride(p.b * p.ls * hd, [&](int64_t i) {
        const int64_t r = i / hd, c = i % hd, bi = r / p.ls, t = p.t0 + r % p.ls;
        tokens[r * p.ld + c] = heads[((bi * p.h + c / p.d) * p.l + t) * p.d + c % p.d];
    });
}

// heads[bi, hi, t0 + t, di] ← bf16(tokens[bi·ls + t, hi·d + di]), tokens f32; head-major order
// so the bf16 writes are contiguous.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_merge_heads_bwd(FK_GRID_PARAMS FkModelHeadsParams p) {
    const float* tokens = static_cast<const float*>(p.tokens);
    uint16_t* heads = static_cast<uint16_t*>(p.heads);
    fk_model::grid_stride(p.b * p.h * p.ls * p.d, [&](int64_t i) {
        const int64_t di = i % p.d, t = (i / p.d) % p.ls, bh = i / (p.d * p.ls);
        const int64_t bi = bh / p.h, hi = bh % p.h;
        heads[(bh * p.l + p.t0 + t) * p.d + di] = f32_to_bf16(tokens[(bi * p.ls + t) * p.ld + hi * p.d + di]);
    });
}

// ---- GELU-tanh --------------------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_gelu_fwd(FK_GRID_PARAMS FkModelGeluParams p) {
    const float* x = static_cast<const float*>(p.x);
    const bool bf16 = p.out_bf16 != 0;
    fk_model::grid_stride(p.rows * p.cols, [&](int64_t i) {
        const int64_t r = i / p.cols, c = i % p.cols;
        const float y = fk_model::gelu_tanh(x[r * p.ld_x + c]);
        if (bf16) static_cast<uint16_t*>(p.out)[r * p.ld_out + c] = f32_to_bf16(y);
        else static_cast<float*>(p.out)[r * p.ld_out + c] = y;
    });
}

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_gelu_bwd(FK_GRID_PARAMS FkModelGeluParams p) {
    const float* x = static_cast<const float*>(p.x);
    const float* dy = static_cast<const float*>(p.dy);
    float* dx = static_cast<float*>(p.out);
    fk_model::grid_stride(p.rows * p.cols, [&](int64_t i) {
        const int64_t r = i / p.cols, c = i % p.cols;
        dx[r * p.ld_out + c] = fk_model::rn_fmul(dy[r * p.ld_dy + c], fk_model::gelu_tanh_grad(x[r * p.ld_x + c]));
    });
}

// ---- timestep embedding -----------------------------------------------------------------------

// As the CPU: f = exp(((−ln P)·j)/half) in f32 (exp evaluated in f64 and rounded once, the
// correctly rounded f32 result the CPU's expf gives), the argument t'·f rounded to f32, then cos
// and sin in f64 rounded to f32.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_timestep_emb(FK_GRID_PARAMS FkModelTimestepParams p) {
    const float* t = static_cast<const float*>(p.t);
    float* out = static_cast<float*>(p.out);
    const int64_t half = p.dim / 2;
    fk_model::grid_stride(p.b * p.dim, [&](int64_t i) {
        const int64_t bi = i / p.dim, j = i % p.dim;
        if (j >= 2 * half) {
            out[i] = 0.0f;  // odd dim: the last column
            return;
        }
        const int64_t jj = j < half ? j : j - half;
        const float e = fk_model::rn_fmul(p.neg_log_max_period, (float)jj) / (float)half;
        const float f = (float)exp((double)e);
        const double arg = (double)fk_model::rn_fmul(fk_model::rn_fmul(p.time_factor, t[bi]), f);
        out[i] = j < half ? (float)cos(arg) : (float)sin(arg);
    });
}

// ---- random initialisation --------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_random_fill(FK_GRID_PARAMS FkModelRandomParams p) {
    const bool uniform = p.uniform != 0, bf16 = p.dst_bf16 != 0;
    fk_model::grid_stride(p.n, [&](int64_t k) {
        float v = p.value;
        if (uniform) {
            const uint64_t idx = (uint64_t)(p.offset + k);
            const uint64_t z = fk_model::mix(p.stream + idx * 0x9E3779B97F4A7C15ull);
            // 24 random bits: an exact f32 in [0, 1); 2u − 1 is exact too.
            const float u = (float)(z >> 40) / 16777216.0f;
            v = fk_model::rn_fmul(p.bound, fk_model::rn_fsub(fk_model::rn_fmul(2.0f, u), 1.0f));
        }
        if (bf16) static_cast<uint16_t*>(p.dst)[k] = f32_to_bf16(v);
        else static_cast<float*>(p.dst)[k] = v;
    });
}
