// Random initialisation on the device: every element a hash of (tensor stream, index), the same
// bits as model::random::RandomParam::generate on the CPU, so a `random:` model never crosses the
// bus. Tested in tests/gpu_model_ops.rs.
#include "common.cuh"

static_assert(sizeof(FkModelRandomParams) == FK_SIZEOF_FkModelRandomParams, "abi.h: FkModelRandomParams size");

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_random_fill(FK_GRID_PARAMS FkModelRandomParams p) {
    const bool uniform = p.uniform != 0, bf16 = p.dst_bf16 != 0;
    fk::grid_stride<FK_MODEL_THREADS>(p.n, [&](int64_t k) {
        float v = p.value;
        if (uniform) {
            const uint64_t idx = (uint64_t)(p.offset + k);
            // 24 random bits: an exact f32 in [0, 1); 2u − 1 is exact too.
            const float u = fk::unit24(fk::mix(p.stream + idx * 0x9E3779B97F4A7C15ull));
            v = fk::rn_fmul(p.bound, fk::rn_fsub(fk::rn_fmul(2.0f, u), 1.0f));
        }
        if (bf16) static_cast<uint16_t*>(p.dst)[k] = f32_to_bf16(v);
        else static_cast<float*>(p.dst)[k] = v;
    });
}
