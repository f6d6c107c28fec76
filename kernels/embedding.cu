// The sinusoidal timestep (and guidance) embedding. CPU twin: ops::embedding::timestep_embedding
// as model::embed calls it; tested in tests/gpu_model_ops.rs.
#include "common.cuh"

static_assert(sizeof(FkModelTimestepParams) == FK_SIZEOF_FkModelTimestepParams, "abi.h: FkModelTimestepParams size");

// As the CPU: f = exp(((−ln P)·j)/half) in f32 (exp evaluated in f64 and rounded once, the
// correctly rounded f32 result the CPU's expf gives), the argument t'·f rounded to f32, then cos
// and sin in f64 rounded to f32.
FK_KERNEL void __launch_bounds__(FK_MODEL_THREADS) fk_model_timestep_emb(FK_GRID_PARAMS FkModelTimestepParams p) {
    const float* t = static_cast<const float*>(p.t);
    float* out = static_cast<float*>(p.out);
    const int64_t half = p.dim / 2;
    fk::grid_stride<FK_MODEL_THREADS>(p.b * p.dim, [&](int64_t i) {
        const int64_t bi = i / p.dim, j = i % p.dim;
        if (j >= 2 * half) {
            out[i] = 0.0f;  // odd dim: the last column
            return;
        }
        const int64_t jj = j < half ? j : j - half;
        const float e = fk::rn_fmul(p.neg_log_max_period, (float)jj) / (float)half;
        const float f = (float)exp((double)e);
        const double arg = (double)fk::rn_fmul(fk::rn_fmul(p.time_factor, t[bi]), f);
        out[i] = j < half ? (float)cos(arg) : (float)sin(arg);
    });
}

