// Activations and their backward passes. CPU twins: ops::activation (gelu_tanh_forward /
// gelu_tanh_backward on strided f32 or bf16 rows, silu_forward / silu_backward on contiguous
// f32); the functions themselves are fk::gelu_tanh, fk::silu and their derivatives in
// common.cuh, each rounded step by step as the CPU computes it. Tested in tests/gpu_model_ops.rs
// and tests/gpu_step_ops.rs.
#include "common.cuh"

static_assert(sizeof(FkModelGeluParams) == FK_SIZEOF_FkModelGeluParams, "abi.h: FkModelGeluParams size");
static_assert(sizeof(FkPointwiseParams) == FK_SIZEOF_FkPointwiseParams, "abi.h: FkPointwiseParams size");

// ---- GELU-tanh (strided rows; f32 in, f32 or bf16 out) -----------------------------------------

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_gelu_fwd(FK_GRID_PARAMS FkModelGeluParams p) {
    const bool x16 = p.x_bf16 != 0, o16 = p.out_bf16 != 0;
    fk::grid_stride<FK_MODEL_THREADS>(p.rows * p.cols, [&](int64_t i) {
        const int64_t r = i / p.cols, c = i % p.cols;
        fk::store(p.out, r * p.ld_out + c, fk::gelu_tanh(fk::load(p.x, r * p.ld_x + c, x16)), o16);
    });
}

FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_gelu_bwd(FK_GRID_PARAMS FkModelGeluParams p) {
    const bool x16 = p.x_bf16 != 0, o16 = p.out_bf16 != 0;
    const float* dy = static_cast<const float*>(p.dy);
    fk::grid_stride<FK_MODEL_THREADS>(p.rows * p.cols, [&](int64_t i) {
        const int64_t r = i / p.cols, c = i % p.cols;
        const float g = fk::gelu_tanh_grad(fk::load(p.x, r * p.ld_x + c, x16));
        fk::store(p.out, r * p.ld_out + c, fk::rn_fmul(dy[r * p.ld_dy + c], g), o16);
    });
}

// ---- SiLU (contiguous f32) ---------------------------------------------------------------------

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_silu_fwd(FK_GRID_PARAMS FkPointwiseParams p) {
    const float* x = static_cast<const float*>(p.x);
    float* out = static_cast<float*>(p.out);
    fk::grid_stride<FK_STEP_THREADS>(p.n, [&](int64_t i) { out[i] = fk::silu(x[i]); });
}

FK_KERNEL void __launch_bounds__(FK_STEP_THREADS) fk_silu_bwd(FK_GRID_PARAMS FkPointwiseParams p) {
    const float* x = static_cast<const float*>(p.x);
    const float* dout = static_cast<const float*>(p.dout);
    float* out = static_cast<float*>(p.out);
    fk::grid_stride<FK_STEP_THREADS>(p.n, [&](int64_t i) { out[i] = dout[i] * fk::silu_grad(x[i]); });
}

