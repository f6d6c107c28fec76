// The few sm_80 instructions the GEMM kernels use, each behind a small function whose semantics
// are the PTX ISA's (9.7.9.25 cp.async, 9.7.14.5.15 ldmatrix, 9.7.14.5.8 mma.m16n8k16 fragments).
// kernels/host_emulation.h implements the same functions on the CPU, from the same ISA text, so
// the kernels can be checked without a GPU; keep the two in step.
#pragma once
#include <stdint.h>
#include <cuda_bf16.h>

// bf16 values travel as raw 16-bit patterns (uint16_t) in global and shared memory.
__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
__device__ __forceinline__ uint16_t f32_to_bf16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global → shared without passing through registers; both addresses 16-byte aligned.
// .cg caches in L2 only: each tile is read once per block, so L1 would only evict.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 b16 matrices; lane l gives the address of row l%8 of matrix l/8 (16 bytes each).
// Lane l receives, in r[j], elements (l/4, 2·(l%4)) and (l/4, 2·(l%4)+1) of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem_row)));
}
// Same, transposed: lane l receives elements (2·(l%4), l/4) and (2·(l%4)+1, l/4) of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem_row)));
}

// d[16×8] += a[16×16]·b[16×8], bf16 operands, f32 accumulate. With g = lane/4, t = lane%4:
// a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..), a[3] = A(g+8, 2t+8..);
// b0 = B(2t..2t+1, g), b1 = B(2t+8..2t+9, g); d[0..1] = D(g, 2t..2t+1), d[2..3] = D(g+8, 2t..).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Butterfly exchange within a warp (all 32 lanes take part): the value of lane (lane ^ mask).
__device__ __forceinline__ float shfl_xor_f32(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// 2^x with the special-function unit (ex2.approx: about 2 ulp; 2^-inf = +0). Softmax weights are
// rounded to bf16 before they are used, so the approximation is far below what matters.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
    uint32_t n;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(n));
    return n;
}

#define FK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
