// The training step's elementwise, normalisation, loss and optimizer kernels, f32 in and out.
// CPU twins (the specification):
//   fk_ln_mod_*        model::double_block::ln_modulate / ln_modulate_backward
//                      (ops::norm::layernorm_* + ops::modulation::modulate_*)
//   fk_gated_*         ops::modulation::gated_residual_forward / _backward
//   fk_silu_*, fk_gelu_tanh_bwd   ops::activation (GELU-tanh forward: elementwise.cu)
//   fk_mse_partial     ops::loss::mse_forward + mse_backward in one pass
//   fk_adamw           train::optim::AdamW::step (f64 arithmetic, as the CPU does it)
//   fk_sumsq_partial   train::optim::clip_grad_norm's norm
//
// Determinism: no float atomics anywhere. Row reductions (LayerNorm) belong to one block; the
// per-sample column sums over tokens (dshift, dscale, dgate) are written as partials per chunk of
// FK_STEP_CHUNK_TOKENS tokens and added in ascending chunk order by fk_col_sum; whole-tensor
// sums (loss, gradient norm) go through f64 partials per block and fk_sum_f64. The same inputs
// give the same bits on every run.
//
// Rounding: where the CPU computes in f32, the kernels use the _rn intrinsics so nvcc cannot fuse
// a multiply and an add into an FMA (which would round once instead of twice and drift from the
// CPU by an ulp); AdamW runs in f64 with the same intrinsics, so it matches the CPU bit for bit
// wherever the hardware's f64 is IEEE (it is).
#ifdef FK_HOST_EMULATION
#include "host_emulation.h"
#else
#include "ptx_sm80.h"
#endif
#include "abi.h"

static_assert(sizeof(FkLnModParams) == FK_SIZEOF_FkLnModParams, "abi.h: FkLnModParams size");
static_assert(sizeof(FkGatedParams) == FK_SIZEOF_FkGatedParams, "abi.h: FkGatedParams size");
static_assert(sizeof(FkColSumParams) == FK_SIZEOF_FkColSumParams, "abi.h: FkColSumParams size");
static_assert(sizeof(FkPointwiseParams) == FK_SIZEOF_FkPointwiseParams, "abi.h: FkPointwiseParams size");
static_assert(sizeof(FkMseParams) == FK_SIZEOF_FkMseParams, "abi.h: FkMseParams size");
static_assert(sizeof(FkSumF64Params) == FK_SIZEOF_FkSumF64Params, "abi.h: FkSumF64Params size");
static_assert(sizeof(FkAdamTensor) == FK_SIZEOF_FkAdamTensor, "abi.h: FkAdamTensor size");
static_assert(sizeof(FkAdamParams) == FK_SIZEOF_FkAdamParams, "abi.h: FkAdamParams size");
static_assert(sizeof(FkSumSqTensor) == FK_SIZEOF_FkSumSqTensor, "abi.h: FkSumSqTensor size");
static_assert(sizeof(FkSumSqParams) == FK_SIZEOF_FkSumSqParams, "abi.h: FkSumSqParams size");

// A named namespace: the CPU emulation compiles every .cu into one translation unit.
namespace fk_step {

constexpr int THREADS = FK_STEP_THREADS;
constexpr int WARPS = THREADS / 32;
static_assert(THREADS % 32 == 0 && (THREADS & (THREADS - 1)) == 0, "power-of-two block of whole warps");
static_assert(FK_SMEM_STEP >= THREADS * 8, "one double per thread for the f64 reductions");
static_assert(FK_STEP_BLOCK_ELEMS % THREADS == 0, "whole elements per thread");

// Round-to-nearest arithmetic that the compiler may not contract into FMAs (the CPU twins round
// every product and every sum). The emulation is plain C++ without FMA contraction.
#ifdef FK_HOST_EMULATION
__device__ __forceinline__ float rn_fmul(float a, float b) { return a * b; }
__device__ __forceinline__ float rn_fadd(float a, float b) { return a + b; }
__device__ __forceinline__ double rn_dmul(double a, double b) { return a * b; }
__device__ __forceinline__ double rn_dadd(double a, double b) { return a + b; }
__device__ __forceinline__ double rn_ddiv(double a, double b) { return a / b; }
__device__ __forceinline__ double rn_dsqrt(double a) { return std::sqrt(a); }
#else
__device__ __forceinline__ float rn_fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double rn_dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double rn_dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rn_ddiv(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double rn_dsqrt(double a) { return __dsqrt_rn(a); }
#endif

// Sums of two values over the block, returned to every thread. Warp butterflies, then each
// thread adds the WARPS warp totals in warp order (fixed order: deterministic). Every thread of
// the block must call it; it leaves shared memory free for the next call.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* smem) {
    for (int m = 16; m > 0; m >>= 1) {
        a += shfl_xor_f32(a, m);
        b += shfl_xor_f32(b, m);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        smem[warp] = a;
        smem[WARPS + warp] = b;
    }
    __syncthreads();
    a = 0.0f;
    b = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
        a += smem[w];
        b += smem[WARPS + w];
    }
    __syncthreads();
}

// Tree sum of one double per thread; the total is returned to thread 0 (others get garbage).
__device__ __forceinline__ double block_sum_f64(double v, double* smem) {
    smem[threadIdx.x] = v;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
        __syncthreads();
    }
    const double total = smem[0];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

// ½(1+T) + ½x(1−T²)·√(2/π)(1 + 3·0.044715x²), T = tanh(√(2/π)(x + 0.044715x³)).
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float k = 0.7978845608028654f;
    const float t = tanhf(k * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
}

// The tensor of a multi-tensor launch that owns block `bid`: the last whose block_begin ≤ bid.
template <class T>
__device__ __forceinline__ int owner(const T* tensors, int count, int64_t bid) {
    int i = 0;
    while (i + 1 < count && tensors[i + 1].block_begin <= bid) ++i;
    return i;
}

// Calls f(i) for every i < n, the grid striding over the range (any grid size covers any n).
template <class F>
__device__ __forceinline__ void grid_stride(int64_t n, F f) {
    const int64_t step = (int64_t)gridDim.x * THREADS;
    for (int64_t i = (int64_t)blockIdx.x * THREADS + threadIdx.x; i < n; i += step) f(i);
}

}  // namespace fk_step

// Entry points qualify fk_step:: (a using-directive would clash with the other .cu files'
// names in the emulator's single translation unit).

// ---- LayerNorm + modulation -------------------------------------------------------------------

// One block per row: two passes over the row (mean, then the centred variance, as the CPU's
// two-pass formula), then n and out.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_ln_mod_fwd(FK_GRID_PARAMS FkLnModParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    float* red = reinterpret_cast<float*>(smem_raw);
    const int64_t row = blockIdx.x, c = p.c, bi = row / p.l;
    const float* x = static_cast<const float*>(p.x) + row * c;
    float s = 0.0f, unused = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += fk_step::THREADS) s += x[j];
    fk_step::block_sum2(s, unused, red);
    const float mu = s / (float)c;
    float var = 0.0f;
    unused = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += fk_step::THREADS) {
        const float d = x[j] - mu;
        var += d * d;
    }
    fk_step::block_sum2(var, unused, red);
    const float rs = 1.0f / sqrtf(var / (float)c + p.eps);
    const float* sh = static_cast<const float*>(p.shift) + bi * c;
    const float* sc = static_cast<const float*>(p.scale) + bi * c;
    float* out = static_cast<float*>(p.out) + row * c;
    float* nrm = p.normed ? static_cast<float*>(p.normed) + row * c : nullptr;
    for (int64_t j = threadIdx.x; j < c; j += fk_step::THREADS) {
        const float n = (x[j] - mu) * rs;
        if (nrm) nrm[j] = n;
        out[j] = fk_step::rn_fadd(fk_step::rn_fmul(fk_step::rn_fadd(1.0f, sc[j]), n), sh[j]);
    }
    if (threadIdx.x == 0) {
        if (p.mean) static_cast<float*>(p.mean)[row] = mu;
        static_cast<float*>(p.rstd)[row] = rs;
    }
}

// One block per row: dn = (1 + scale)⊙dout, dx = rstd·(dn − mean(dn) − n·mean(dn⊙n)).
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_ln_mod_bwd_dx(FK_GRID_PARAMS FkLnModParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    float* red = reinterpret_cast<float*>(smem_raw);
    const int64_t row = blockIdx.x, c = p.c, bi = row / p.l;
    const float* dout = static_cast<const float*>(p.dout) + row * c;
    const float* n = static_cast<const float*>(p.normed) + row * c;
    const float* sc = static_cast<const float*>(p.scale) + bi * c;
    float s_dn = 0.0f, s_dnn = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += fk_step::THREADS) {
        const float dn = fk_step::rn_fmul(fk_step::rn_fadd(1.0f, sc[j]), dout[j]);
        s_dn += dn;
        s_dnn += dn * n[j];
    }
    fk_step::block_sum2(s_dn, s_dnn, red);
    const float m_dn = s_dn / (float)c, m_dnn = s_dnn / (float)c;
    const float rs = static_cast<const float*>(p.rstd)[row];
    float* dx = static_cast<float*>(p.dx) + row * c;
    for (int64_t j = threadIdx.x; j < c; j += fk_step::THREADS) {
        const float dn = fk_step::rn_fmul(fk_step::rn_fadd(1.0f, sc[j]), dout[j]);
        dx[j] = rs * (dn - m_dn - n[j] * m_dnn);
    }
}

// Grid (c tiles, chunks, b): thread j of tile x sums its column over the chunk's tokens.
// partial[0] gets Σ dout (dshift), partial[1] Σ n⊙dout (dscale).
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_ln_mod_bwd_partial(FK_GRID_PARAMS FkLnModParams p) {
    const int64_t j = (int64_t)blockIdx.x * fk_step::THREADS + threadIdx.x, k = blockIdx.y, bi = blockIdx.z;
    if (j >= p.c) return;
    const int64_t chunks = (p.l + p.chunk - 1) / p.chunk;
    const int64_t t0 = k * p.chunk, t1 = t0 + p.chunk < p.l ? t0 + p.chunk : p.l;
    const float* dout = static_cast<const float*>(p.dout);
    const float* n = static_cast<const float*>(p.normed);
    float s_sh = 0.0f, s_sc = 0.0f;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t at = (bi * p.l + t) * p.c + j;
        s_sh += dout[at];
        s_sc = fk_step::rn_fadd(s_sc, fk_step::rn_fmul(n[at], dout[at]));
    }
    float* part = static_cast<float*>(p.partial);
    part[((0 * p.b + bi) * chunks + k) * p.c + j] = s_sh;
    part[((1 * p.b + bi) * chunks + k) * p.c + j] = s_sc;
}

// Grid (c tiles, b, sets): out_s[bi, j] = Σ_k partial[s, bi, k, j], k ascending.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_col_sum(FK_GRID_PARAMS FkColSumParams p) {
    const int64_t j = (int64_t)blockIdx.x * fk_step::THREADS + threadIdx.x, bi = blockIdx.y, s = blockIdx.z;
    if (j >= p.c) return;
    const float* part = static_cast<const float*>(p.partial) + ((s * p.b + bi) * p.chunks) * p.c + j;
    float acc = 0.0f;
    for (int64_t k = 0; k < p.chunks; ++k) acc += part[k * p.c];
    static_cast<float*>(s == 0 ? p.out0 : p.out1)[bi * p.c + j] = acc;
}

// ---- gated residual ---------------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_gated_fwd(FK_GRID_PARAMS FkGatedParams p) {
    const int64_t total = p.b * p.l * p.c, lc = p.l * p.c;
    const float* x = static_cast<const float*>(p.x);
    const float* y = static_cast<const float*>(p.y);
    const float* g = static_cast<const float*>(p.gate);
    float* out = static_cast<float*>(p.out);
    fk_step::grid_stride(total, [&](int64_t i) {
        const float gv = g[(i / lc) * p.c + i % p.c];
        out[i] = fk_step::rn_fadd(x[i], fk_step::rn_fmul(gv, y[i]));
    });
}

// Grid (c tiles, chunks, b): dx = dout, dy = gate⊙dout elementwise, partial Σ y⊙dout per chunk.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_gated_bwd(FK_GRID_PARAMS FkGatedParams p) {
    const int64_t j = (int64_t)blockIdx.x * fk_step::THREADS + threadIdx.x, k = blockIdx.y, bi = blockIdx.z;
    if (j >= p.c) return;
    const int64_t chunks = (p.l + p.chunk - 1) / p.chunk;
    const int64_t t0 = k * p.chunk, t1 = t0 + p.chunk < p.l ? t0 + p.chunk : p.l;
    const float* dout = static_cast<const float*>(p.dout);
    const float* y = static_cast<const float*>(p.y);
    const float gv = static_cast<const float*>(p.gate)[bi * p.c + j];
    float* dx = static_cast<float*>(p.dx);
    float* dy = static_cast<float*>(p.dy);
    float s = 0.0f;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t at = (bi * p.l + t) * p.c + j;
        const float d = dout[at];
        if (dx) dx[at] = d;
        dy[at] = fk_step::rn_fmul(gv, d);
        s = fk_step::rn_fadd(s, fk_step::rn_fmul(y[at], d));
    }
    static_cast<float*>(p.partial)[(bi * chunks + k) * p.c + j] = s;
}

// ---- activations ------------------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_silu_fwd(FK_GRID_PARAMS FkPointwiseParams p) {
    const float* x = static_cast<const float*>(p.x);
    float* out = static_cast<float*>(p.out);
    fk_step::grid_stride(p.n, [&](int64_t i) { out[i] = x[i] / (1.0f + expf(-x[i])); });
}

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_silu_bwd(FK_GRID_PARAMS FkPointwiseParams p) {
    const float* x = static_cast<const float*>(p.x);
    const float* dout = static_cast<const float*>(p.dout);
    float* out = static_cast<float*>(p.out);
    fk_step::grid_stride(p.n, [&](int64_t i) { out[i] = dout[i] * fk_step::silu_grad(x[i]); });
}

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_gelu_tanh_bwd(FK_GRID_PARAMS FkPointwiseParams p) {
    const float* x = static_cast<const float*>(p.x);
    const float* dout = static_cast<const float*>(p.dout);
    float* out = static_cast<float*>(p.out);
    fk_step::grid_stride(p.n, [&](int64_t i) { out[i] = dout[i] * fk_step::gelu_tanh_grad(x[i]); });
}

// ---- MSE loss ---------------------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_mse_partial(FK_GRID_PARAMS FkMseParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    double* red = reinterpret_cast<double*>(smem_raw);
    const float* pred = static_cast<const float*>(p.pred);
    const float* target = static_cast<const float*>(p.target);
    const float* w = static_cast<const float*>(p.weight);
    float* grad = static_cast<float*>(p.grad);
    double acc = 0.0;
    fk_step::grid_stride(p.n, [&](int64_t i) {
        const float wv = w ? w[i / p.per] : 1.0f;
        const double d = (double)pred[i] - (double)target[i];
        acc += (double)wv * (d * d);
        // As mse_backward: ((2·w)·(p − t)) / n, each step rounded to f32.
        grad[i] = fk_step::rn_fmul(2.0f * wv, pred[i] - target[i]) / p.n_f32;
    });
    const double total = fk_step::block_sum_f64(acc, red);
    if (threadIdx.x == 0) static_cast<double*>(p.partial)[blockIdx.x] = total;
}

// One block: strided per-thread sums, then the tree; the same order on every run.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_sum_f64(FK_GRID_PARAMS FkSumF64Params p) {
    FK_DYNAMIC_SMEM(smem_raw);
    double* red = reinterpret_cast<double*>(smem_raw);
    const double* part = static_cast<const double*>(p.partial);
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < p.n; i += fk_step::THREADS) acc += part[i];
    const double total = fk_step::block_sum_f64(acc, red);
    if (threadIdx.x == 0) static_cast<double*>(p.out)[0] = total;
}

// ---- AdamW and the gradient norm --------------------------------------------------------------

// AdamW::step per element, in f64 with every operation rounded as the CPU rounds it:
//   m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²  (stored as f32; the update uses the f64 values)
//   p ← p·(1 − lr·wd);  p ← p − lr·(m/bc1)/(√(v/bc2) + eps)
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_adamw(FK_GRID_PARAMS FkAdamParams p) {
    const int64_t bid = blockIdx.x;
    const FkAdamTensor& t = p.tensor[fk_step::owner(p.tensor, p.num_tensors, bid)];
    const int64_t base = (bid - t.block_begin) * FK_STEP_BLOCK_ELEMS;
    const int64_t end = base + FK_STEP_BLOCK_ELEMS < t.numel ? base + FK_STEP_BLOCK_ELEMS : t.numel;
    float* param = static_cast<float*>(t.param);
    const float* grad = static_cast<const float*>(t.grad);
    float* m = static_cast<float*>(t.m);
    float* v = static_cast<float*>(t.v);
    const double one_b1 = 1.0 - p.beta1, one_b2 = 1.0 - p.beta2;
    for (int64_t i = base + threadIdx.x; i < end; i += fk_step::THREADS) {
        const double g = (double)fk_step::rn_fmul(grad[i], p.grad_scale);
        const double mj = fk_step::rn_dadd(fk_step::rn_dmul(p.beta1, (double)m[i]), fk_step::rn_dmul(one_b1, g));
        const double vj = fk_step::rn_dadd(fk_step::rn_dmul(p.beta2, (double)v[i]), fk_step::rn_dmul(fk_step::rn_dmul(one_b2, g), g));
        m[i] = (float)mj;
        v[i] = (float)vj;
        double pj = fk_step::rn_dmul((double)param[i], p.decay);
        pj = pj - fk_step::rn_ddiv(fk_step::rn_dmul(p.lr, fk_step::rn_ddiv(mj, p.bc1)), fk_step::rn_dadd(fk_step::rn_dsqrt(fk_step::rn_ddiv(vj, p.bc2)), p.eps));
        param[i] = (float)pj;
    }
}

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_sumsq_partial(FK_GRID_PARAMS FkSumSqParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    double* red = reinterpret_cast<double*>(smem_raw);
    const int64_t bid = blockIdx.x;
    const FkSumSqTensor& t = p.tensor[fk_step::owner(p.tensor, p.num_tensors, bid)];
    const int64_t base = (bid - t.block_begin) * FK_STEP_BLOCK_ELEMS;
    const int64_t end = base + FK_STEP_BLOCK_ELEMS < t.numel ? base + FK_STEP_BLOCK_ELEMS : t.numel;
    const float* x = static_cast<const float*>(t.data);
    double acc = 0.0;
    for (int64_t i = base + threadIdx.x; i < end; i += fk_step::THREADS) {
        const double d = (double)x[i];
        acc += d * d;
    }
    const double total = fk_step::block_sum_f64(acc, red);
    if (threadIdx.x == 0) static_cast<double*>(p.partial)[p.partial_offset + bid] = total;
}
