// The device helpers every kernel family shares, written once: rounding that the compiler may
// not contract, warp and grid loops, bf16 loads, GELU-tanh and SiLU with their derivatives, and
// the splitmix64 finaliser behind dropout masks and random initialisation. Every kernels/*.cu
// includes this header first; it brings the ABI (abi.h) and the instruction wrappers (ptx_sm80.h
// on a GPU, host_emulation.h under the CPU emulation, which compiles every .cu into one
// translation unit: hence the include guard and the one namespace).
#pragma once
#ifdef FK_HOST_EMULATION
#include "host_emulation.h"
#else
#include "ptx_sm80.h"
#endif
#include "abi.h"

namespace fk {

// Round-to-nearest arithmetic the compiler may not contract into FMAs: the CPU twins round
// every product and every sum. The emulation is plain C++ without FMA contraction.
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

// Calls f(i) for every i < n, the grid of THREADS-thread blocks striding over the range (any grid
// size covers any n).
template <int THREADS, class F>
__device__ __forceinline__ void grid_stride(int64_t n, F f) {
    const int64_t step = (int64_t)gridDim.x * THREADS;
    for (int64_t i = (int64_t)blockIdx.x * THREADS + threadIdx.x; i < n; i += step) f(i);
}

// Calls f(item, lane) for every item < n, one warp per item, the warps of the grid striding over
// the range. The loop bound depends on the warp only, so all lanes run it together.
template <int THREADS, class F>
__device__ __forceinline__ void warp_stride(int64_t n, F f) {
    static_assert(THREADS % 32 == 0, "whole warps");
    const int64_t step = (int64_t)gridDim.x * (THREADS / 32);
    const int lane = threadIdx.x % 32;
    for (int64_t w = (int64_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32; w < n; w += step) f(w, lane);
}

// Element i of an f32 or bf16 buffer, as f32.
__device__ __forceinline__ float load(const void* p, int64_t i, bool bf16) {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Element i of an f32 or bf16 buffer written from f32 (bf16: rounded to nearest even).
__device__ __forceinline__ void store(void* p, int64_t i, float v, bool bf16) {
    if (bf16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    else static_cast<float*>(p)[i] = v;
}

// ops::activation::exp_f32 and tanh_f32, step for step (every product and sum rounded, no
// contraction), so the GELU kernels give the CPU twins' bits: libm's tanhf differs from tanh_f32
// by up to 3e-7 absolute, which near GELU's stationary point (x ≈ −0.75, derivative ≈ 0) made the
// GPU and CPU gradients differ by up to 12 % relative on single elements (tests/gpu_step_ops.rs).
__device__ __forceinline__ float exp_f32(float x) {
    const float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
    const float ROUND = 12582912.0f;
    const float xc = fminf(fmaxf(x, -87.33654f), 88.72283f);
    const float t = rn_fadd(rn_fmul(xc, LOG2E), ROUND);
    const float n = rn_fsub(t, ROUND);
    const float r = rn_fsub(rn_fsub(xc, rn_fmul(n, LN2_HI)), rn_fmul(n, LN2_LO));
    const float z = rn_fmul(r, r);
    float p = rn_fadd(rn_fmul(1.9875691e-4f, r), 1.3981999e-3f);
    p = rn_fadd(rn_fmul(p, r), 8.333452e-3f);
    p = rn_fadd(rn_fmul(p, r), 4.1665796e-2f);
    p = rn_fadd(rn_fmul(p, r), 1.6666665e-1f);
    p = rn_fadd(rn_fmul(p, r), 0.5f);
    const float y = rn_fadd(rn_fadd(rn_fmul(p, z), r), 1.0f);
    const int32_t ni = (int32_t)__float_as_uint(t) - 0x4B400000;
    const int32_t n1 = ni >> 1, n2 = ni - (ni >> 1);
    const float s1 = __uint_as_float((uint32_t)(n1 + 127) << 23), s2 = __uint_as_float((uint32_t)(n2 + 127) << 23);
    const float v = rn_fmul(rn_fmul(y, s1), s2);
    if (x != x) return x;
    if (x < -87.33654f) return 0.0f;
    if (x > 88.72283f) return __uint_as_float(0x7f800000u);
    return v;
}
__device__ __forceinline__ float tanh_f32(float u) { return rn_fsub(1.0f, 2.0f / rn_fadd(exp_f32(rn_fmul(2.0f, u)), 1.0f)); }

// ops::activation::gelu_tanh: 0.5·x·(1 + tanh(K·(x + 0.044715·x·x·x))), Rust's left-to-right
// order, every step rounded.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // the f32 of SQRT_2_OVER_PI = 0.797_884_6 (0x3f4c422a)
    const float x3 = rn_fmul(rn_fmul(rn_fmul(0.044715f, x), x), x);
    const float t = tanh_f32(rn_fmul(k, rn_fadd(x, x3)));
    return rn_fmul(rn_fmul(0.5f, x), rn_fadd(1.0f, t));
}

// ops::activation::gelu_tanh_grad: ½(1+T) + ½x(1−T²)·K·(1 + 3·0.044715·x²).
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float k = 0.7978845608028654f;
    const float x3 = rn_fmul(rn_fmul(rn_fmul(0.044715f, x), x), x);
    const float t = tanh_f32(rn_fmul(k, rn_fadd(x, x3)));
    const float a = rn_fmul(0.5f, rn_fadd(1.0f, t));
    const float c = rn_fadd(1.0f, rn_fmul(rn_fmul(3.0f * 0.044715f, x), x));
    const float b = rn_fmul(rn_fmul(rn_fmul(rn_fmul(0.5f, x), rn_fsub(1.0f, rn_fmul(t, t))), k), c);
    return rn_fadd(a, b);
}

// ops::activation::silu: x·σ(x).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// d silu / dx = σ(x)·(1 + x·(1 − σ(x))).
__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

// splitmix64's finaliser (model::random::mix, ops::lora::Dropout::factor): a bijection that
// scrambles every input bit into every output bit.
__device__ __forceinline__ uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The top 24 bits of a hash as an exact f32 in [0, 1).
__device__ __forceinline__ float unit24(uint64_t z) { return (float)(z >> 40) / 16777216.0f; }

// ops::lora::Dropout::factor, bit for bit: the hash of seed ^ i·φ as a uniform in [0, 1),
// dropped below p, else scaled by 1/(1 − p) (the host's f32 value, `keep_scale`).
__device__ __forceinline__ float dropout_factor(uint64_t seed, uint64_t i, float p, float keep_scale) {
    return unit24(mix(seed ^ (i * 0x9E3779B97F4A7C15ull))) < p ? 0.0f : keep_scale;
}

// The attention kernels' shared pieces (attention.cu, attention_sm90.cu): ±∞ without relying on
// the compiler's INFINITY, two floats as one packed bf16 pair (lo in the low half), and the
// reductions over the 4 lanes of a quad, which hold one row of an mma/wgmma accumulator.
__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float pos_inf() { return __uint_as_float(0x7f800000u); }
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    return (uint32_t)f32_to_bf16(lo) | ((uint32_t)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, shfl_xor_f32(v, 1));
    return fmaxf(v, shfl_xor_f32(v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += shfl_xor_f32(v, 1);
    return v + shfl_xor_f32(v, 2);
}

// One output element pair (row, col), (row, col + 1) of an FkGemmProblem from the accumulators
// (lora_gemm.cu, lora_gemm_sm90.cu): alpha, bias, beta with c_in or the old output, bf16 or f32.
// With col_scale (DoRA's g), the scale multiplies alpha·Σ + beta·c_in (the frozen product and
// the DoRA branch) and the bias is added after it, unscaled; without it the order is the one
// every other call has always had (bias before c_in), so their bits do not change.
__device__ __forceinline__ void store_gemm_pair(const FkGemmProblem& pr, int64_t row, int64_t col, float v0, float v1) {
    if (row >= pr.m || col >= pr.n) return;
    const bool two = col + 1 < pr.n;
    v0 *= pr.alpha;
    v1 *= pr.alpha;
    const int64_t at = row * pr.ldc + col;
    const bool add_c = pr.c_in != nullptr && pr.beta != 0.0f;
    if (pr.col_scale) {
        if (add_c) {
            const float* c = static_cast<const float*>(pr.c_in) + at;
            v0 += pr.beta * c[0];
            if (two) v1 += pr.beta * c[1];
        }
        v0 *= pr.col_scale[col];
        if (two) v1 *= pr.col_scale[col + 1];
    }
    if (pr.bias) {
        v0 += pr.bias[col];
        if (two) v1 += pr.bias[col + 1];
    }
    if (add_c && !pr.col_scale) {
        const float* c = static_cast<const float*>(pr.c_in) + at;
        v0 += pr.beta * c[0];
        if (two) v1 += pr.beta * c[1];
    }
    if (pr.out_f32) {
        float* o = static_cast<float*>(pr.out) + at;
        if (pr.beta != 0.0f && pr.c_in == nullptr) {
            v0 += pr.beta * o[0];
            if (two) v1 += pr.beta * o[1];
        }
        o[0] = v0;
        if (two) o[1] = v1;
    } else {
        uint16_t* o = static_cast<uint16_t*>(pr.out) + at;
        if (pr.beta != 0.0f && pr.c_in == nullptr) {
            v0 += pr.beta * bf16_to_f32(o[0]);
            if (two) v1 += pr.beta * bf16_to_f32(o[1]);
        }
        if (two && (reinterpret_cast<uintptr_t>(o) & 3) == 0) {
            *reinterpret_cast<uint32_t*>(o) = (uint32_t)f32_to_bf16(v0) | ((uint32_t)f32_to_bf16(v1) << 16);
        } else {
            o[0] = f32_to_bf16(v0);
            if (two) o[1] = f32_to_bf16(v1);
        }
    }
}

// wgmma descriptors (PTX ISA 9.7.15.5.1) for tiles TMA wrote with the 128-byte swizzle
// (attention_sm90.cu, lora_gemm_sm90.cu): K-major (Q, K, a GEMM's X and W: rows of 64 bf16
// along K, 8-row atoms 1024 bytes apart = SBO; LBO unused, 1); MN-major (V as the B of P·V, W
// as the B of dY·W: element (k, n) in row k of box n/64, boxes `box_bytes` apart = LBO, 8-row
// atoms along K 1024 bytes apart = SBO).
__device__ __forceinline__ uint64_t desc_k_major(const void* p) {
    return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}
__device__ __forceinline__ uint64_t desc_mn_major(const void* p, uint32_t box_bytes) {
    return (uint64_t)((smem_addr(p) & 0x3FFFF) >> 4) | ((uint64_t)(box_bytes >> 4) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// The Hopper kernels' dynamic shared memory, aligned up to 1024 bytes (the 128-byte swizzle's
// atom, which TMA and wgmma locate through address bits); traps when the launch gave less than
// `total` (which includes 1024 bytes of slack for this alignment).
__device__ __forceinline__ unsigned char* smem_1024(unsigned char* raw, uint32_t total) {
    if (dynamic_smem_bytes() < total) __trap();
    return raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u);
}

}  // namespace fk
