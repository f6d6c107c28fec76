// Pointwise kernels. CPU twins: src/ops/activation.rs (gelu_tanh, silu).
#include "abi.h"
#include <cuda_bf16.h>

// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), computed in f32 whatever the storage type.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

FK_KERNEL void gelu_tanh_forward_f32(float* __restrict__ out, const float* __restrict__ inp, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = gelu_tanh(inp[i]);
}

FK_KERNEL void gelu_tanh_forward_bf16(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ inp, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(gelu_tanh(__bfloat162float(inp[i])));
}

// out = alpha·x + beta·y on a [rows, cols] window (out may alias y): the separate scale and add
// kernels of the PEFT-style unfused LoRA baseline (src/kernels/lora.rs). Grid-stride, one
// element per thread per step; it is a baseline, not a kernel to tune.
FK_KERNEL void fk_axpby_bf16(FK_GRID_PARAMS FkAxpbyParams p) {
    const int64_t total = p.rows * p.cols;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
    const __nv_bfloat16* y = static_cast<const __nv_bfloat16*>(p.y);
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int64_t r = i / p.cols, c = i % p.cols;
        const float xv = __bfloat162float(x[r * p.ld_x + c]);
        const float yv = y ? __bfloat162float(y[r * p.ld_y + c]) : 0.0f;
        out[r * p.ld_out + c] = __float2bfloat16(p.alpha * xv + p.beta * yv);
    }
}
