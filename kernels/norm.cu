// Normalisation and modulation of the training step, f32 in and out except where a flag says
// bf16 (the saved normalised rows, a linear's input and output). CPU twins:
//   fk_ln_mod_*   model::double_block::ln_modulate / ln_modulate_backward
//                 (ops::norm::layernorm_* + ops::modulation::modulate_*)
//   fk_gated_*    ops::modulation::gated_residual_forward / _backward
// Tested in tests/gpu_step_ops.rs.
//
// Determinism: no float atomics. A row's reduction (LayerNorm) belongs to one block; the
// per-sample column sums over tokens (dshift, dscale, dgate) are written as partials per chunk of
// FK_STEP_CHUNK_TOKENS tokens and added in ascending chunk order by fk_col_sum.
//
// Rounding: where the CPU computes in f32 the kernels use fk::rn_* (no FMA contraction).
#include "common.cuh"

static_assert(sizeof(FkLnModParams) == FK_SIZEOF_FkLnModParams, "abi.h: FkLnModParams size");
static_assert(sizeof(FkGatedParams) == FK_SIZEOF_FkGatedParams, "abi.h: FkGatedParams size");
static_assert(sizeof(FkColSumParams) == FK_SIZEOF_FkColSumParams, "abi.h: FkColSumParams size");

namespace fk_norm {

constexpr int THREADS = FK_STEP_THREADS;
constexpr int WARPS = THREADS / 32;
static_assert(THREADS % 32 == 0 && (THREADS & (THREADS - 1)) == 0, "power-of-two block of whole warps");

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

}  // namespace fk_norm

// ---- LayerNorm + modulation -------------------------------------------------------------------

// One block per row: two passes over the row (mean, then the centred variance, as the CPU's
// two-pass formula), then n and out. With normed_bf16, n is stored rounded and out is computed
// from the rounded n, so that `modulate_only` (out from the saved n alone: the backward's
// recompute of a linear's input instead of keeping it) gives the same bits.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_ln_mod_fwd(FK_GRID_PARAMS FkLnModParams p) {
    FK_DYNAMIC_SMEM(smem_raw);
    float* red = reinterpret_cast<float*>(smem_raw);
    const int64_t row = blockIdx.x, c = p.c, bi = row / p.l;
    const bool n16 = p.normed_bf16 != 0, o16 = p.out_bf16 != 0;
    const float* sh = static_cast<const float*>(p.shift) + bi * c;
    const float* sc = static_cast<const float*>(p.scale) + bi * c;
    if (p.modulate_only) {
        for (int64_t j = threadIdx.x; j < c; j += FK_STEP_THREADS) {
            const float n = fk::load(p.normed, row * c + j, n16);
            fk::store(p.out, row * c + j, fk::rn_fadd(fk::rn_fmul(fk::rn_fadd(1.0f, sc[j]), n), sh[j]), o16);
        }
        return;
    }
    const float* x = static_cast<const float*>(p.x) + row * c;
    float s = 0.0f, unused = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += FK_STEP_THREADS) s += x[j];
    fk_norm::block_sum2(s, unused, red);
    const float mu = s / (float)c;
    float var = 0.0f;
    unused = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += FK_STEP_THREADS) {
        const float d = x[j] - mu;
        var += d * d;
    }
    fk_norm::block_sum2(var, unused, red);
    const float rs = 1.0f / sqrtf(var / (float)c + p.eps);
    for (int64_t j = threadIdx.x; j < c; j += FK_STEP_THREADS) {
        float n = (x[j] - mu) * rs;
        if (p.normed) {
            fk::store(p.normed, row * c + j, n, n16);
            if (n16) n = bf16_to_f32(f32_to_bf16(n));
        }
        fk::store(p.out, row * c + j, fk::rn_fadd(fk::rn_fmul(fk::rn_fadd(1.0f, sc[j]), n), sh[j]), o16);
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
    const bool n16 = p.normed_bf16 != 0;
    const int64_t at = row * c;
    const float* sc = static_cast<const float*>(p.scale) + bi * c;
    float s_dn = 0.0f, s_dnn = 0.0f;
    for (int64_t j = threadIdx.x; j < c; j += FK_STEP_THREADS) {
        const float dn = fk::rn_fmul(fk::rn_fadd(1.0f, sc[j]), dout[j]);
        s_dn += dn;
        s_dnn += dn * fk::load(p.normed, at + j, n16);
    }
    fk_norm::block_sum2(s_dn, s_dnn, red);
    const float m_dn = s_dn / (float)c, m_dnn = s_dnn / (float)c;
    const float rs = static_cast<const float*>(p.rstd)[row];
    float* dx = static_cast<float*>(p.dx) + row * c;
    for (int64_t j = threadIdx.x; j < c; j += FK_STEP_THREADS) {
        const float dn = fk::rn_fmul(fk::rn_fadd(1.0f, sc[j]), dout[j]);
        dx[j] = rs * (dn - m_dn - fk::load(p.normed, at + j, n16) * m_dnn);
    }
}

// Grid (c tiles, chunks, b): thread j of tile x sums its column over the chunk's tokens.
// partial[0] gets Σ dout (dshift), partial[1] Σ n⊙dout (dscale).
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_ln_mod_bwd_partial(FK_GRID_PARAMS FkLnModParams p) {
    const int64_t j = (int64_t)blockIdx.x * FK_STEP_THREADS + threadIdx.x, k = blockIdx.y, bi = blockIdx.z;
    if (j >= p.c) return;
    const int64_t chunks = (p.l + p.chunk - 1) / p.chunk;
    const int64_t t0 = k * p.chunk, t1 = t0 + p.chunk < p.l ? t0 + p.chunk : p.l;
    const float* dout = static_cast<const float*>(p.dout);
    const bool n16 = p.normed_bf16 != 0;
    float s_sh = 0.0f, s_sc = 0.0f;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t at = (bi * p.l + t) * p.c + j;
        s_sh += dout[at];
        s_sc = fk::rn_fadd(s_sc, fk::rn_fmul(fk::load(p.normed, at, n16), dout[at]));
    }
    float* part = static_cast<float*>(p.partial);
    part[((0 * p.b + bi) * chunks + k) * p.c + j] = s_sh;
    part[((1 * p.b + bi) * chunks + k) * p.c + j] = s_sc;
}

// Grid (c tiles, b, sets): out_s[bi, j] = Σ_k partial[s, bi, k, j], k ascending.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_col_sum(FK_GRID_PARAMS FkColSumParams p) {
    const int64_t j = (int64_t)blockIdx.x * FK_STEP_THREADS + threadIdx.x, bi = blockIdx.y, s = blockIdx.z;
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
    const bool y16 = p.y_bf16 != 0;
    const float* g = static_cast<const float*>(p.gate);
    float* out = static_cast<float*>(p.out);
    fk::grid_stride<FK_STEP_THREADS>(total, [&](int64_t i) {
        const float gv = g[(i / lc) * p.c + i % p.c];
        out[i] = fk::rn_fadd(x[i], fk::rn_fmul(gv, fk::load(p.y, i, y16)));
    });
}

// Grid (c tiles, chunks, b): dx = dout, dy = gate⊙dout elementwise, partial Σ y⊙dout per chunk.
FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_gated_bwd(FK_GRID_PARAMS FkGatedParams p) {
    const int64_t j = (int64_t)blockIdx.x * FK_STEP_THREADS + threadIdx.x, k = blockIdx.y, bi = blockIdx.z;
    if (j >= p.c) return;
    const int64_t chunks = (p.l + p.chunk - 1) / p.chunk;
    const int64_t t0 = k * p.chunk, t1 = t0 + p.chunk < p.l ? t0 + p.chunk : p.l;
    const float* dout = static_cast<const float*>(p.dout);
    const bool y16 = p.y_bf16 != 0, dy16 = p.dy_bf16 != 0;
    const float gv = static_cast<const float*>(p.gate)[bi * p.c + j];
    float* dx = static_cast<float*>(p.dx);
    float s = 0.0f;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t at = (bi * p.l + t) * p.c + j;
        const float d = dout[at];
        if (dx) dx[at] = d;
        fk::store(p.dy, at, fk::rn_fmul(gv, d), dy16);
        s = fk::rn_fadd(s, fk::rn_fmul(fk::load(p.y, at, y16), d));
    }
    static_cast<float*>(p.partial)[(bi * chunks + k) * p.c + j] = s;
}

