// Copies and casts: a strided 2-D copy between f32 and bf16 buffers, optionally accumulating.
// CPU twin: none needed (a slice copy, `half::bf16::from_f32` rounding, or `+=`); tested in
// tests/gpu_model_ops.rs. Every output element is written by exactly one thread.
#include "common.cuh"

static_assert(sizeof(FkModelCopyParams) == FK_SIZEOF_FkModelCopyParams, "abi.h: FkModelCopyParams size");

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_copy2d(FK_GRID_PARAMS FkModelCopyParams p) {
    const bool src_bf16 = p.src_bf16 != 0, dst_bf16 = p.dst_bf16 != 0, acc = p.accumulate != 0;
    fk::grid_stride<FK_MODEL_THREADS>(p.rows * p.cols, [&](int64_t i) {
        const int64_t r = i / p.cols, c = i % p.cols;
        const float v = fk::load(p.src, r * p.ld_src + c, src_bf16);
        const int64_t at = r * p.ld_dst + c;
        if (dst_bf16) {
            static_cast<uint16_t*>(p.dst)[at] = f32_to_bf16(v);
        } else {
            float* dst = static_cast<float*>(p.dst);
            dst[at] = acc ? fk::rn_fadd(dst[at], v) : v;
        }
    });
}

