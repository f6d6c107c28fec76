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
