//! The engine on the GPU, device-resident: the transformer (`GpuFlux`), the adapters' f32
//! factors, gradients and AdamW moments all stay on the device; per micro-batch only the inputs
//! go up and one f64 loss comes down. The loss and its gradient (`fk_mse_partial`), the global
//! gradient norm with clipping and AdamW (`fk_sumsq_partial`, `fk_adamw`) are the kernels of
//! kernels/optim.cu.

use super::adapters::DevLora;
use super::{CudaBackend, FwdState, GpuFlux, F32};
use crate::adapters::AdapterSet;
use crate::engine::EngineOptions;
use crate::kernels::optim::GpuOptim;
use crate::model::config::FluxConfig;
use crate::model::flux::FluxInputs;
use crate::model::weights::FluxWeights;
use crate::ops::optim::AdamW;
use anyhow::{ensure, Context, Result};
use cudarc::driver::CudaSlice;
use std::sync::{Arc, Mutex};

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

pub struct CudaEngine {
    pub m: GpuFlux,
    pub lora: DevLora,
    /// Data parallelism: the gradients' bucketed all-reduce (reduce.rs), made on first use.
    pub(super) reduce: Option<super::reduce::GradReduce>,
}

/// A device forward kept for the backward.
pub struct CudaForward {
    pred: F32,
    state: FwdState,
}

impl CudaEngine {
    /// Uploads the base weights (as `opts.base` says).
    pub fn new(
        cfg: &FluxConfig,
        w: &FluxWeights,
        be: &Arc<Mutex<CudaBackend>>,
        opts: EngineOptions,
    ) -> Result<CudaEngine> {
        let mut m = GpuFlux::with_swap(cfg, w, be, opts.base, opts.blocks_to_swap).map_err(oom_hint)?;
        m.checkpointing = opts.checkpointing;
        if opts.offload_checkpoints {
            ensure!(
                opts.checkpointing,
                "--offload-checkpoints moves the inputs that --gradient-checkpointing keeps: turn that on too"
            );
            m.offload = Some(super::offload::CkptOffload::new(&*CudaBackend::lock(be)?)?);
        }
        Ok(CudaEngine { m, lora: DevLora::default(), reduce: None })
    }

    /// Uploads `set`'s adapters (only they move; the base stays), with training state when
    /// `train`.
    pub fn set_adapters(&mut self, set: &AdapterSet, train: bool) -> Result<()> {
        self.lora = self.m.adapters(set, train).map_err(oom_hint)?;
        self.lora.dropout = None;
        Ok(())
    }

    /// One set per sample for the following forwards (inference; replaces any adapters before).
    pub fn set_batch_adapters(&mut self, sets: &[AdapterSet]) -> Result<()> {
        self.lora = self.m.adapters_per_sample(sets).map_err(oom_hint)?;
        Ok(())
    }

    /// The optimizer's moments to the device when resuming.
    pub fn upload_moments(&mut self, opt: &AdamW) -> Result<()> {
        if opt.t == 0 {
            return Ok(());
        }
        let g = CudaBackend::lock(&self.m.be)?;
        self.lora.upload_moments(&g, &opt.m, &opt.v)
    }

    pub fn forward(&mut self, inp: &FluxInputs) -> Result<Vec<f32>> {
        if let Some(b) = self.lora.batch() {
            ensure!(inp.b == b, "a batch of {} samples given to per-sample adapters for {b}", inp.b);
        }
        self.lora.dropout = None;
        let y = self.m.forward(inp, &self.lora).map_err(oom_hint)?;
        self.m.download(&y, inp.b * inp.n_img * self.m.cfg.out_channels)
    }

    pub fn forward_train(&mut self, inp: &FluxInputs, dropout: Option<(f32, u64)>) -> Result<CudaForward> {
        ensure!(self.lora.batch().is_none(), "per-sample adapter sets are for inference only");
        self.lora.dropout = dropout.filter(|d| d.0 > 0.0);
        let (pred, state) = self.m.forward_train(inp, &self.lora).map_err(oom_hint)?;
        Ok(CudaForward { pred, state })
    }

    pub fn prediction(&self, f: &CudaForward) -> Result<Vec<f32>> {
        let n = f.state.pred_len(self.m.cfg.out_channels);
        self.m.download(&f.pred, n)
    }

    pub fn backward_mse(
        &mut self,
        f: CudaForward,
        target: &[f32],
        weights: Option<&[f32]>,
        gscale: f32,
    ) -> Result<f64> {
        self.backward_inner(f, target, weights, gscale).map_err(oom_hint)
    }

    fn backward_inner(&mut self, f: CudaForward, target: &[f32], weights: Option<&[f32]>, gscale: f32) -> Result<f64> {
        let n = target.len();
        ensure!(n == f.state.pred_len(self.m.cfg.out_channels), "target has {n} values, not the prediction's");
        // The MSE kernel's per-sample weights carry the micro-batch scale too, so the gradient
        // comes out already scaled (a zero scale still gives the true loss).
        let s = if gscale != 0.0 { gscale } else { 1.0 };
        let scaled: Vec<f32> = match weights {
            Some(w) => w.iter().map(|w| w * s).collect(),
            None => vec![s],
        };
        let (loss, grad) = {
            let g = CudaBackend::lock(&self.m.be)?;
            let st = &g.stream;
            let (td, wd) = (st.clone_htod(target)?, st.clone_htod(&scaled)?);
            // SAFETY: the MSE kernel writes every gradient element.
            let grad: CudaSlice<f32> = unsafe { st.alloc::<f32>(n) }?;
            let (sum, scratch) = (st.alloc_zeros::<f64>(1)?, st.alloc_zeros::<f64>(GpuOptim::mse_scratch(n))?);
            g.optim.mse(n, &f.pred, &td, Some((&wd, scaled.len())), &grad, &sum, &scratch)?;
            let v = st.clone_dtoh(&sum)?;
            (v[0] / n as f64 / s as f64, grad)
        };
        if !loss.is_finite() || gscale == 0.0 {
            return Ok(loss);
        }
        ensure!(self.lora.train.is_some(), "backward without trainable adapters");
        self.backward_reducing(f.state, &grad)?;
        Ok(loss)
    }

    pub fn backward(&mut self, f: CudaForward, dpred: &[f32]) -> Result<()> {
        ensure!(dpred.len() == f.state.pred_len(self.m.cfg.out_channels), "d(prediction): wrong length");
        ensure!(self.lora.train.is_some(), "backward without trainable adapters");
        let d = {
            let g = CudaBackend::lock(&self.m.be)?;
            g.stream.clone_htod(dpred)?
        };
        self.backward_reducing(f.state, &d).map_err(oom_hint)
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        let g = CudaBackend::lock(&self.m.be)?;
        self.lora.zero_grads(&g)
    }

    pub fn grads(&self) -> Result<Vec<Vec<f32>>> {
        let g = CudaBackend::lock(&self.m.be)?;
        self.lora.download_grads(&g)
    }

    /// Global-norm clipping and one AdamW step on the device; refreshes the bf16 factors.
    /// Returns the norm before clipping (`clip_grad_norm`'s).
    pub fn optimizer_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let g = CudaBackend::lock(&self.m.be)?;
        let t = self.lora.train.as_ref().context("no training state on the device")?;
        let grads: Vec<&CudaSlice<f32>> = t.grads.iter().collect();
        let norm = g.optim.grad_norm(&grads)?;
        let scale = if max_norm > 0.0 && norm > max_norm { (max_norm / (norm + 1e-6)) as f32 } else { 1.0 };
        opt.t += 1;
        let params: Vec<&CudaSlice<f32>> = t.params.iter().collect();
        let m: Vec<&CudaSlice<f32>> = t.m.iter().collect();
        let v: Vec<&CudaSlice<f32>> = t.v.iter().collect();
        g.optim.adamw_step(opt, opt.t, lr, scale, &params, &grads, &m, &v)?;
        self.lora.sync_factors(&g)?;
        Ok(norm)
    }

    /// Factors to the host, moments into `opt` (checkpoints, the exported LoRA).
    pub fn to_host(&self, opt: &mut AdamW) -> Result<Vec<Vec<f32>>> {
        let g = CudaBackend::lock(&self.m.be)?;
        let p = self.lora.download_params(&g)?;
        let (m, v) = self.lora.download_moments(&g)?;
        (opt.m, opt.v) = (m, v);
        Ok(p)
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
