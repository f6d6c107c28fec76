//! The training step on the GPU, device-resident: the transformer (`model::gpu::GpuFlux`), the
//! adapters' f32 factors, gradients and AdamW moments all stay on the device; per micro-batch only
//! the inputs go up and one f64 loss comes down. The trainer's loop is the same as on the CPU:
//! same batches, noise, σ and dropout seeds; the loss and its gradient (`fk_mse_partial`), the
//! global gradient norm with clipping and AdamW (`fk_sumsq_partial`, `fk_adamw`) are the
//! kernels of kernels/step_ops.cu.

use super::optim::AdamW;
use crate::device::{CudaBackend, Device};
use crate::kernels::step::GpuStepOps;
use crate::lora::config::AdapterSpec;
use crate::model::flux::FluxInputs;
use crate::model::gpu::lora::{DevLora, TermSpec};
use crate::model::gpu::{BaseDtype, GpuFlux};
use crate::model::weights::FluxWeights;
use crate::sample::sampler::{sample_gpu, SampleSpec};
use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;

/// An out-of-memory error from the device, with what to change and how to predict the peak.
pub fn oom_hint(e: anyhow::Error) -> anyhow::Error {
    if format!("{e:#}").contains("OUT_OF_MEMORY") {
        e.context(
            "out of GPU memory: try --gradient-checkpointing true, --base int8, a lower resolution or \
             batch size, or a smaller rank; `flux-kernels plan` predicts the peak and suggests settings that fit",
        )
    } else {
        e
    }
}

pub struct GpuTrain {
    pub m: GpuFlux,
    pub lora: DevLora,
}

impl GpuTrain {
    /// Uploads the base weights and the adapters (`params`: A0, B0, A1, … as the trainer holds
    /// them) and, when resuming, the optimizer's moments.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &crate::model::config::FluxConfig,
        w: &FluxWeights,
        dev: &Device,
        base: BaseDtype,
        checkpointing: bool,
        specs: &[AdapterSpec],
        scales: &[f32],
        params: &[Vec<f32>],
        opt: &AdamW,
    ) -> Result<GpuTrain> {
        let Device::Cuda(be) = dev else { bail!("the GPU step needs --device cuda") };
        let mut m = GpuFlux::new(cfg, w, dev, base).map_err(oom_hint)?;
        m.checkpointing = checkpointing;
        let mut ts = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let d_in = m.d_in_of(&s.target.module).with_context(|| format!("adapter target {}", s.target.module))?;
            ts.push(TermSpec {
                module: s.target.module.clone(),
                rank: s.rank,
                rows: s.target.rows.clone(),
                scale: scales[i],
                d_in,
            });
        }
        let mut lora = {
            let g = CudaBackend::lock(be)?;
            DevLora::new(&g, ts, params, true)?
        };
        if opt.t > 0 {
            let g = CudaBackend::lock(be)?;
            lora.upload_moments(&g, &opt.m, &opt.v)?;
        }
        Ok(GpuTrain { m, lora })
    }

    /// One micro-batch: forward, loss, backward; gradients times `gscale` accumulate on the
    /// device. Returns the (unscaled) loss; a non-finite loss skips the backward.
    pub fn micro_step(
        &mut self,
        inp: &FluxInputs,
        target: &[f32],
        weights: &[f32],
        gscale: f32,
        dropout: Option<(f32, u64)>,
    ) -> Result<f64> {
        self.lora.dropout = dropout;
        self.micro_step_inner(inp, target, weights, gscale).map_err(oom_hint)
    }

    fn micro_step_inner(&mut self, inp: &FluxInputs, target: &[f32], weights: &[f32], gscale: f32) -> Result<f64> {
        let (pred, state) = self.m.forward_train(inp, &self.lora)?;
        let n = target.len();
        // The MSE kernel's per-sample weights carry the micro-batch scale too, so the gradient
        // comes out already scaled (a zero scale still gives the true loss).
        let s = if gscale != 0.0 { gscale } else { 1.0 };
        let scaled: Vec<f32> = weights.iter().map(|w| w * s).collect();
        let (loss, grad) = {
            let g = CudaBackend::lock(&self.m.be)?;
            let st = &g.stream;
            let (td, wd) = (st.clone_htod(target)?, st.clone_htod(&scaled)?);
            // SAFETY: the MSE kernel writes every gradient element.
            let grad: CudaSlice<f32> = unsafe { st.alloc::<f32>(n) }?;
            let (sum, scratch) = (st.alloc_zeros::<f64>(1)?, st.alloc_zeros::<f64>(GpuStepOps::mse_scratch(n))?);
            g.step.mse(n, &pred, &td, Some((&wd, weights.len())), &grad, &sum, &scratch)?;
            let v = st.clone_dtoh(&sum)?;
            (v[0] / n as f64 / s as f64, grad)
        };
        if !loss.is_finite() || gscale == 0.0 {
            return Ok(loss);
        }
        self.m.backward(state, &grad, &self.lora)?;
        Ok(loss)
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        let g = CudaBackend::lock(&self.m.be)?;
        self.lora.zero_grads(&g)
    }

    /// Global-norm clipping and one AdamW step on the device; refreshes the bf16 factors.
    /// Returns the norm before clipping (`clip_grad_norm`'s).
    pub fn optimizer_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let g = CudaBackend::lock(&self.m.be)?;
        let t = self.lora.train.as_ref().context("no training state on the device")?;
        let grads: Vec<&CudaSlice<f32>> = t.grads.iter().collect();
        let norm = g.step.grad_norm(&grads)?;
        let scale = if max_norm > 0.0 && norm > max_norm { (max_norm / (norm + 1e-6)) as f32 } else { 1.0 };
        opt.t += 1;
        let params: Vec<&CudaSlice<f32>> = t.params.iter().collect();
        let m: Vec<&CudaSlice<f32>> = t.m.iter().collect();
        let v: Vec<&CudaSlice<f32>> = t.v.iter().collect();
        g.step.adamw_step(opt, opt.t, lr, scale, &params, &grads, &m, &v)?;
        self.lora.sync_factors(&g)?;
        Ok(norm)
    }

    /// Factors and moments to the host (checkpoints, the exported LoRA).
    pub fn to_host(&self, params: &mut [Vec<f32>], opt: &mut AdamW) -> Result<()> {
        let g = CudaBackend::lock(&self.m.be)?;
        let p = self.lora.download_params(&g)?;
        for (dst, src) in params.iter_mut().zip(p) {
            *dst = src;
        }
        let (m, v) = self.lora.download_moments(&g)?;
        (opt.m, opt.v) = (m, v);
        Ok(())
    }

    /// Samples with the current adapters (no dropout).
    pub fn sample(&mut self, spec: &SampleSpec) -> Result<Vec<Vec<f32>>> {
        let keep = self.lora.dropout.take();
        let r = sample_gpu(&mut self.m, spec, &self.lora);
        self.lora.dropout = keep;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::oom_hint;

    #[test]
    fn out_of_memory_errors_say_what_to_change() {
        let e = oom_hint(
            anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("double_blocks.3"),
        );
        let msg = format!("{e:#}");
        assert!(msg.contains("out of GPU memory") && msg.contains("--gradient-checkpointing") && msg.contains("plan"));
        assert!(msg.contains("double_blocks.3"), "{msg}");
        let other = format!("{:#}", oom_hint(anyhow::anyhow!("CUDA_ERROR_ILLEGAL_ADDRESS")));
        assert!(!other.contains("out of GPU memory"), "{other}");
    }
}
