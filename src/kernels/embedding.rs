//! The sinusoidal timestep (and guidance) embedding on the device (kernels/embedding.cu). CPU
//! twin: `ops::embedding::timestep_embedding`, as `model::embed` calls it (tests/gpu_model_ops.rs).

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{OneKernel, View};
use super::trace::{record, OpFamily};
use anyhow::Result;

pub struct GpuEmbedding {
    k: OneKernel,
}

impl GpuEmbedding {
    pub fn new(gpu: &Gpu) -> Result<GpuEmbedding> {
        Ok(GpuEmbedding { k: OneKernel::load(gpu, "embedding", FK_MODEL_TIMESTEP_EMB)? })
    }

    /// out [b, dim] = the sinusoidal embedding of t [b], as
    /// `ops::embedding::timestep_embedding(out, t, dim, time_factor, max_period)`.
    pub fn timestep_embedding(
        &self,
        b: usize,
        dim: usize,
        time_factor: f32,
        max_period: f32,
        t: View<f32>,
        out: View<f32>,
    ) -> Result<()> {
        if b == 0 || dim == 0 {
            return Ok(());
        }
        t.need(b, "timestep_embedding: t")?;
        out.need(b * dim, "timestep_embedding: out")?;
        let st = &self.k.fam.stream;
        let p = FkModelTimestepParams {
            t: t.addr(st),
            out: out.addr(st),
            b: b as i64,
            dim: dim as i64,
            time_factor,
            // The CPU's −(ln(max_period) in f64, rounded to f32).
            neg_log_max_period: -((max_period as f64).ln() as f32),
        };
        record(OpFamily::Elementwise, "fk_model_timestep_emb", 0.0, 4.0 * (b + b * dim) as f64, || {
            format!("{b}x{dim}")
        });
        // SAFETY: t holds b values and out b·dim.
        unsafe { self.k.run(&p, b * dim, "fk_model_timestep_emb") }
    }
}
