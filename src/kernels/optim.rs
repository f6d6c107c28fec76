//! The loss and the optimizer on the device (kernels/optim.cu). CPU twins:
//!
//! | GPU                                          | CPU (the specification)                         |
//! |----------------------------------------------|-------------------------------------------------|
//! | `mse`                                        | `ops::loss::mse_forward` + `mse_backward`        |
//! | `adamw_step`                                 | `ops::optim::AdamW::step`                        |
//! | `grad_norm` (+ `grad_scale` of `adamw_step`) | `ops::optim::clip_grad_norm`                     |
//!
//! Whole-tensor sums go through f64 per-block partials and one fixed-order pass (no atomics), so
//! the same inputs give the same bits on every run. Tested in tests/gpu_step_ops.rs.

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{addr, launch, need, Family};
use super::trace::{record, OpFamily::Optimizer};
use crate::ops::optim::AdamW;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr};

const THREADS: usize = FK_STEP_THREADS as usize;
const BLOCK_ELEMS: usize = FK_STEP_BLOCK_ELEMS as usize;
const MAX_TENSORS: usize = FK_ADAM_MAX_TENSORS as usize;

pub struct GpuOptim {
    fam: Family,
    mse_partial: CudaFunction,
    sum_f64: CudaFunction,
    adamw: CudaFunction,
    sumsq: CudaFunction,
}

impl GpuOptim {
    pub fn new(gpu: &Gpu) -> Result<GpuOptim> {
        let fam = Family::load(gpu, "optim")?;
        Ok(GpuOptim {
            mse_partial: fam.function(FK_MSE_PARTIAL)?,
            sum_f64: fam.function(FK_SUM_F64)?,
            adamw: fam.function(FK_ADAMW)?,
            sumsq: fam.function(FK_SUMSQ_PARTIAL)?,
            fam,
        })
    }

    /// # Safety
    /// As `launch::launch`: every address in `p` covers what the kernel touches at `p`'s sizes.
    unsafe fn run<P: DeviceRepr>(&self, f: &CudaFunction, p: &P, blocks: usize, name: &str) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { launch(&self.fam.stream, f, p, (blocks, 1, 1), THREADS, FK_SMEM_STEP as usize, name) }
    }

    fn a<T>(&self, s: &CudaSlice<T>) -> u64 {
        addr(s, &self.fam.stream)
    }

    /// f64 partials `mse` needs (elements).
    pub fn mse_scratch(n: usize) -> usize {
        n.div_ceil(THREADS).clamp(1, FK_STEP_MAX_PARTIALS as usize)
    }

    /// grad = 2·w·(pred − target)/n and, in `loss_sum[0]`, Σ w·(pred − target)² (f64; divide by
    /// n for the loss). `weight` has one value per sample (n / weight.len() elements each).
    #[allow(clippy::too_many_arguments)]
    pub fn mse(
        &self,
        n: usize,
        pred: &CudaSlice<f32>,
        target: &CudaSlice<f32>,
        weight: Option<(&CudaSlice<f32>, usize)>,
        grad: &CudaSlice<f32>,
        loss_sum: &CudaSlice<f64>,
        scratch: &CudaSlice<f64>,
    ) -> Result<()> {
        ensure!(n > 0, "mse: no elements");
        let blocks = Self::mse_scratch(n);
        for (s, what) in [(pred, "pred"), (target, "target"), (grad, "grad")] {
            need(s, n, &format!("mse: {what}"))?;
        }
        need(scratch, blocks, "mse: scratch")?;
        need(loss_sum, 1, "mse: loss")?;
        let per = match weight {
            Some((w, nw)) => {
                ensure!(nw > 0 && n.is_multiple_of(nw), "mse: {n} elements do not split into {nw} samples");
                need(w, nw, "mse: weight")?;
                n / nw
            }
            None => n,
        };
        let p = FkMseParams {
            pred: self.a(pred),
            target: self.a(target),
            weight: weight.map_or(0, |(w, _)| self.a(w)),
            grad: self.a(grad),
            partial: self.a(scratch),
            n: n as i64,
            per: per as i64,
            n_f32: n as f32,
            ..Default::default()
        };
        // pred and target read, grad written (the final sum's launch counts here too).
        record(Optimizer, "fk_mse", 0.0, 12.0 * n as f64, || format!("n={n}"));
        // SAFETY: pred, target and grad hold n elements, the weights n / per, scratch `blocks`.
        unsafe { self.run(&self.mse_partial, &p, blocks, "fk_mse_partial")? };
        self.sum_f64(scratch, blocks, loss_sum)
    }

    fn sum_f64(&self, partial: &CudaSlice<f64>, n: usize, out: &CudaSlice<f64>) -> Result<()> {
        need(partial, n, "sum_f64: partials")?;
        need(out, 1, "sum_f64: out")?;
        let p = FkSumF64Params { partial: self.a(partial), out: self.a(out), n: n as i64, ..Default::default() };
        // SAFETY: partial holds n values and out one.
        unsafe { self.run(&self.sum_f64, &p, 1, "fk_sum_f64") }
    }

    /// One AdamW step over device tensors (params, grads, m, v, all f32; grads and moments at
    /// least as long as their parameter), `AdamW::step`'s twin for optimizer step number `t`
    /// (1-based, after increment). Gradients are multiplied by `grad_scale` in f32 first (the
    /// clipping factor; 1 = none). Launches FK_ADAM_MAX_TENSORS tensors at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        opt: &AdamW,
        t: u64,
        lr: f64,
        grad_scale: f32,
        params: &[&CudaSlice<f32>],
        grads: &[&CudaSlice<f32>],
        m: &[&CudaSlice<f32>],
        v: &[&CudaSlice<f32>],
    ) -> Result<()> {
        let k = params.len();
        ensure!(grads.len() == k && m.len() == k && v.len() == k, "adamw_step: tensor lists differ in length");
        let mut base = FkAdamParams {
            grad_scale,
            beta1: opt.beta1,
            beta2: opt.beta2,
            eps: opt.eps,
            lr,
            decay: 1.0 - lr * opt.weight_decay,
            bc1: 1.0 - opt.beta1.powi(t as i32),
            bc2: 1.0 - opt.beta2.powi(t as i32),
            ..Default::default()
        };
        for i in 0..k {
            let n = params[i].len();
            ensure!(
                grads[i].len() >= n && m[i].len() >= n && v[i].len() >= n,
                "adamw_step: tensor {i} has a shorter gradient or moments than its {n} parameters"
            );
        }
        let live: Vec<usize> = (0..k).filter(|&i| !params[i].is_empty()).collect();
        for group in live.chunks(MAX_TENSORS) {
            let mut blocks = 0usize;
            for (slot, &i) in group.iter().enumerate() {
                let n = params[i].len();
                base.tensor[slot] = FkAdamTensor {
                    param: self.a(params[i]),
                    grad: self.a(grads[i]),
                    m: self.a(m[i]),
                    v: self.a(v[i]),
                    numel: n as i64,
                    block_begin: blocks as i64,
                };
                blocks += n.div_ceil(BLOCK_ELEMS);
            }
            base.num_tensors = group.len() as i32;
            // param, grad, m, v read; param, m, v written
            let numel: usize = group.iter().map(|&i| params[i].len()).sum();
            record(Optimizer, "fk_adamw", 0.0, 28.0 * numel as f64, || format!("{} tensors, n={numel}", group.len()));
            // SAFETY: each tensor's gradient and moments hold at least its numel (checked above).
            unsafe { self.run(&self.adamw, &base, blocks, "fk_adamw")? };
        }
        Ok(())
    }

    /// Global L2 norm of the gradients, Σ over every element of x² in f64 (deterministic:
    /// per-block partials, then one block adds them in order), `clip_grad_norm`'s norm.
    pub fn grad_norm(&self, grads: &[&CudaSlice<f32>]) -> Result<f64> {
        let st = &self.fam.stream;
        let live: Vec<&CudaSlice<f32>> = grads.iter().copied().filter(|g| !g.is_empty()).collect();
        let total_blocks: usize = live.iter().map(|g| g.len().div_ceil(BLOCK_ELEMS)).sum();
        if total_blocks == 0 {
            return Ok(0.0);
        }
        let numel: usize = live.iter().map(|g| g.len()).sum();
        record(Optimizer, "fk_grad_norm", 0.0, 4.0 * numel as f64, || format!("{} tensors, n={numel}", live.len()));
        let partial = st.clone_htod(&vec![f64::NAN; total_blocks])?;
        let mut offset = 0usize;
        for group in live.chunks(MAX_TENSORS) {
            let mut p = FkSumSqParams {
                num_tensors: group.len() as i32,
                partial: self.a(&partial),
                partial_offset: offset as i64,
                ..Default::default()
            };
            let mut blocks = 0usize;
            for (i, g) in group.iter().enumerate() {
                p.tensor[i] =
                    FkSumSqTensor { data: self.a(g), numel: g.len() as i64, block_begin: blocks as i64, pad0: 0 };
                blocks += g.len().div_ceil(BLOCK_ELEMS);
            }
            // SAFETY: each tensor is read over its own length; the partials buffer holds one
            // value per block of every group.
            unsafe { self.run(&self.sumsq, &p, blocks, "fk_sumsq_partial")? };
            offset += blocks;
        }
        let out = st.clone_htod(&[f64::NAN])?;
        self.sum_f64(&partial, total_blocks, &out)?;
        Ok(st.clone_dtoh(&out)?[0].sqrt())
    }
}
