//! The training step's elementwise, normalisation, loss and optimizer kernels on the GPU
//! (kernels/step_ops.cu), f32 in and out. Each is the twin of a CPU function:
//!
//! | GPU                                         | CPU (the specification)                           |
//! |---------------------------------------------|---------------------------------------------------|
//! | `ln_modulate` / `ln_modulate_backward`      | `model::double_block::ln_modulate` / `_backward`   |
//! | `gated_residual` / `gated_residual_backward`| `ops::modulation::gated_residual_forward` / `_backward` |
//! | `silu`, `silu_backward`, `gelu_tanh_backward` | `ops::activation`                               |
//! | `mse`                                       | `ops::loss::mse_forward` + `mse_backward`          |
//! | `adamw_step`                                | `ops::optim::AdamW::step`                        |
//! | `grad_norm` (+ `grad_scale` of `adamw_step`) | `ops::optim::clip_grad_norm`                    |
//!
//! Device-level functions take `CudaSlice`s; the `*_host` functions upload host slices, poison
//! the outputs with NaN, launch, and download (tests/gpu_step_ops.rs compares them with the CPU).
//! Every reduction is deterministic (partials, then a fixed-order second pass; no atomics).

use super::abi::*;
use super::gpu::Gpu;
use crate::ops::optim::AdamW;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

const THREADS: usize = FK_STEP_THREADS as usize;
const CHUNK: usize = FK_STEP_CHUNK_TOKENS as usize;
const BLOCK_ELEMS: usize = FK_STEP_BLOCK_ELEMS as usize;
const MAX_TENSORS: usize = FK_ADAM_MAX_TENSORS as usize;

/// Shape of a [b, l, c] activation with per-sample [b, c] vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepDims {
    pub b: usize,
    pub l: usize,
    pub c: usize,
}

impl StepDims {
    pub fn numel(&self) -> usize {
        self.b * self.l * self.c
    }
    fn rows(&self) -> usize {
        self.b * self.l
    }
    fn chunks(&self) -> usize {
        self.l.div_ceil(CHUNK)
    }
    fn c_tiles(&self) -> usize {
        self.c.div_ceil(THREADS)
    }
    fn check(&self, what: &str) -> Result<()> {
        let StepDims { b, l, c } = *self;
        ensure!(b > 0 && l > 0 && c > 0, "{what}: empty shape {self:?}");
        ensure!(b <= 65535 && self.chunks() <= 65535, "{what}: {self:?} exceeds the grid's 65535 in y or z");
        ensure!(self.rows() <= i32::MAX as usize, "{what}: {} rows exceed the grid", self.rows());
        Ok(())
    }
}

/// What `ln_modulate_host` returns: the normalised rows n (saved for the backward), mean and
/// rstd per row, and the modulated output.
pub struct LnModHost {
    pub n: Vec<f32>,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
    pub out: Vec<f32>,
}

pub struct GpuStepOps {
    stream: Arc<CudaStream>,
    ln_fwd: CudaFunction,
    ln_bwd_dx: CudaFunction,
    ln_bwd_partial: CudaFunction,
    col_sum: CudaFunction,
    gated_fwd: CudaFunction,
    gated_bwd: CudaFunction,
    silu_fwd: CudaFunction,
    silu_bwd: CudaFunction,
    gelu_bwd: CudaFunction,
    mse_partial: CudaFunction,
    sum_f64: CudaFunction,
    adamw: CudaFunction,
    sumsq: CudaFunction,
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

fn cfg(grid: (usize, usize, usize)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: FK_SMEM_STEP as u32,
    }
}

/// Blocks of a grid-stride pointwise launch over `n` elements.
fn pointwise_blocks(n: usize) -> usize {
    n.div_ceil(THREADS).clamp(1, 65535 * 8)
}

impl GpuStepOps {
    pub fn new(gpu: &Gpu) -> Result<GpuStepOps> {
        let fatbin = super::module("step_ops").context("step_ops kernels missing from the build")?;
        let m = gpu.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec())).context("loading step_ops")?;
        let f = |name: &str| m.load_function(name).with_context(|| format!("kernel {name}"));
        Ok(GpuStepOps {
            stream: gpu.stream.clone(),
            ln_fwd: f(FK_LN_MOD_FWD)?,
            ln_bwd_dx: f(FK_LN_MOD_BWD_DX)?,
            ln_bwd_partial: f(FK_LN_MOD_BWD_PARTIAL)?,
            col_sum: f(FK_COL_SUM)?,
            gated_fwd: f(FK_GATED_FWD)?,
            gated_bwd: f(FK_GATED_BWD)?,
            silu_fwd: f(FK_SILU_FWD)?,
            silu_bwd: f(FK_SILU_BWD)?,
            gelu_bwd: f(FK_GELU_TANH_BWD)?,
            mse_partial: f(FK_MSE_PARTIAL)?,
            sum_f64: f(FK_SUM_F64)?,
            adamw: f(FK_ADAMW)?,
            sumsq: f(FK_SUMSQ_PARTIAL)?,
        })
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    fn launch<P: cudarc::driver::DeviceRepr>(
        &self,
        f: &CudaFunction,
        p: &P,
        grid: (usize, usize, usize),
        name: &str,
    ) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        b.arg(p);
        // SAFETY: `p` is the FK_GRID_PARAMS struct of the kernel (layout asserted in abi.rs); every
        // pointer in it is a live device buffer sized by the caller for the dims it carries.
        unsafe { b.launch(cfg(grid)) }.with_context(|| name.to_string())?;
        Ok(())
    }

    fn p<T>(&self, s: &CudaSlice<T>) -> u64 {
        ptr(s, &self.stream)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// A device buffer of `n` NaNs: whatever a kernel leaves unwritten shows.
    fn poisoned(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(&vec![f32::NAN; n.max(1)])?)
    }

    fn download(&self, s: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut v = self.stream.clone_dtoh(s)?;
        v.truncate(n);
        Ok(v)
    }

    // ---- LayerNorm + modulation ---------------------------------------------------------------

    /// out = (1 + scale)⊙LN(x) + shift; saves n (normalised x), mean (optional) and rstd.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_modulate(
        &self,
        dims: StepDims,
        eps: f32,
        x: &CudaSlice<f32>,
        shift: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        n: &CudaSlice<f32>,
        mean: Option<&CudaSlice<f32>>,
        rstd: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("ln_modulate")?;
        let p = FkLnModParams {
            x: self.p(x),
            shift: self.p(shift),
            scale: self.p(scale),
            out: self.p(out),
            normed: self.p(n),
            mean: mean.map_or(0, |m| self.p(m)),
            rstd: self.p(rstd),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            eps,
            ..Default::default()
        };
        self.launch(&self.ln_fwd, &p, (dims.rows(), 1, 1), "fk_ln_mod_fwd")
    }

    /// Bytes of f32 scratch `ln_modulate_backward` needs (elements): [2, b, chunks, c].
    pub fn ln_modulate_scratch(dims: StepDims) -> usize {
        2 * dims.b * dims.chunks() * dims.c
    }

    /// dx, dshift, dscale from dout, the forward's n and rstd, and scale. `scratch` holds at
    /// least `ln_modulate_scratch(dims)` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_modulate_backward(
        &self,
        dims: StepDims,
        dout: &CudaSlice<f32>,
        n: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        dx: &CudaSlice<f32>,
        dshift: &CudaSlice<f32>,
        dscale: &CudaSlice<f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("ln_modulate_backward")?;
        ensure!(scratch.len() >= Self::ln_modulate_scratch(dims), "ln_modulate_backward: scratch too small");
        let p = FkLnModParams {
            scale: self.p(scale),
            normed: self.p(n),
            rstd: self.p(rstd),
            dout: self.p(dout),
            dx: self.p(dx),
            partial: self.p(scratch),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            ..Default::default()
        };
        self.launch(&self.ln_bwd_dx, &p, (dims.rows(), 1, 1), "fk_ln_mod_bwd_dx")?;
        self.launch(&self.ln_bwd_partial, &p, (dims.c_tiles(), dims.chunks(), dims.b), "fk_ln_mod_bwd_partial")?;
        let cs = FkColSumParams {
            partial: self.p(scratch),
            out0: self.p(dshift),
            out1: self.p(dscale),
            b: dims.b as i64,
            chunks: dims.chunks() as i64,
            c: dims.c as i64,
        };
        self.launch(&self.col_sum, &cs, (dims.c_tiles(), dims.b, 2), "fk_col_sum")
    }

    /// Host-slice `model::double_block::ln_modulate` twin (plus the mean).
    pub fn ln_modulate_host(
        &self,
        dims: StepDims,
        eps: f32,
        x: &[f32],
        shift: &[f32],
        scale: &[f32],
    ) -> Result<LnModHost> {
        let (numel, bc, rows) = (dims.numel(), dims.b * dims.c, dims.rows());
        ensure!(x.len() == numel && shift.len() == bc && scale.len() == bc, "ln_modulate_host: lengths for {dims:?}");
        let (xd, shd, scd) = (self.upload(x)?, self.upload(shift)?, self.upload(scale)?);
        let (out, n, mean, rstd) =
            (self.poisoned(numel)?, self.poisoned(numel)?, self.poisoned(rows)?, self.poisoned(rows)?);
        self.ln_modulate(dims, eps, &xd, &shd, &scd, &out, &n, Some(&mean), &rstd)?;
        Ok(LnModHost {
            n: self.download(&n, numel)?,
            mean: self.download(&mean, rows)?,
            rstd: self.download(&rstd, rows)?,
            out: self.download(&out, numel)?,
        })
    }

    /// Host-slice `model::double_block::ln_modulate_backward` twin: (dx, dshift, dscale).
    pub fn ln_modulate_backward_host(
        &self,
        dims: StepDims,
        n: &[f32],
        rstd: &[f32],
        dout: &[f32],
        scale: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (numel, bc) = (dims.numel(), dims.b * dims.c);
        ensure!(
            n.len() == numel && dout.len() == numel && rstd.len() == dims.rows() && scale.len() == bc,
            "ln_modulate_backward_host: lengths for {dims:?}"
        );
        let (nd, rd, dod, scd) = (self.upload(n)?, self.upload(rstd)?, self.upload(dout)?, self.upload(scale)?);
        let (dx, dsh, dsc) = (self.poisoned(numel)?, self.poisoned(bc)?, self.poisoned(bc)?);
        let scratch = self.poisoned(Self::ln_modulate_scratch(dims))?;
        self.ln_modulate_backward(dims, &dod, &nd, &rd, &scd, &dx, &dsh, &dsc, &scratch)?;
        Ok((self.download(&dx, numel)?, self.download(&dsh, bc)?, self.download(&dsc, bc)?))
    }

    // ---- gated residual -----------------------------------------------------------------------

    /// out = x + gate⊙y (`out` may be `x`'s buffer for the in-place form of the CPU).
    pub fn gated_residual(
        &self,
        dims: StepDims,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("gated_residual")?;
        let p = FkGatedParams {
            x: self.p(x),
            y: self.p(y),
            gate: self.p(gate),
            out: self.p(out),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            ..Default::default()
        };
        self.launch(&self.gated_fwd, &p, (pointwise_blocks(dims.numel()), 1, 1), "fk_gated_fwd")
    }

    /// Elements of f32 scratch `gated_residual_backward` needs: [b, chunks, c].
    pub fn gated_residual_scratch(dims: StepDims) -> usize {
        dims.b * dims.chunks() * dims.c
    }

    /// dx = dout (when `dx` is given), dy = gate⊙dout, dgate = Σ_l y⊙dout.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_residual_backward(
        &self,
        dims: StepDims,
        dout: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        dx: Option<&CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
        dgate: &CudaSlice<f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("gated_residual_backward")?;
        ensure!(scratch.len() >= Self::gated_residual_scratch(dims), "gated_residual_backward: scratch too small");
        let p = FkGatedParams {
            y: self.p(y),
            gate: self.p(gate),
            dout: self.p(dout),
            dx: dx.map_or(0, |d| self.p(d)),
            dy: self.p(dy),
            partial: self.p(scratch),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            ..Default::default()
        };
        self.launch(&self.gated_bwd, &p, (dims.c_tiles(), dims.chunks(), dims.b), "fk_gated_bwd")?;
        let cs = FkColSumParams {
            partial: self.p(scratch),
            out0: self.p(dgate),
            b: dims.b as i64,
            chunks: dims.chunks() as i64,
            c: dims.c as i64,
            ..Default::default()
        };
        self.launch(&self.col_sum, &cs, (dims.c_tiles(), dims.b, 1), "fk_col_sum")
    }

    /// Host-slice twin of `ops::modulation::gated_residual_forward` (returns the new x).
    pub fn gated_residual_host(&self, dims: StepDims, x: &[f32], y: &[f32], gate: &[f32]) -> Result<Vec<f32>> {
        let numel = dims.numel();
        ensure!(
            x.len() == numel && y.len() == numel && gate.len() == dims.b * dims.c,
            "gated_residual_host: lengths for {dims:?}"
        );
        let (xd, yd, gd, out) = (self.upload(x)?, self.upload(y)?, self.upload(gate)?, self.poisoned(numel)?);
        self.gated_residual(dims, &xd, &yd, &gd, &out)?;
        self.download(&out, numel)
    }

    /// Host-slice twin of `ops::modulation::gated_residual_backward` plus x's pass-through:
    /// (dx, dy, dgate).
    pub fn gated_residual_backward_host(
        &self,
        dims: StepDims,
        dout: &[f32],
        y: &[f32],
        gate: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (numel, bc) = (dims.numel(), dims.b * dims.c);
        ensure!(
            dout.len() == numel && y.len() == numel && gate.len() == bc,
            "gated_residual_backward_host: lengths for {dims:?}"
        );
        let (dod, yd, gd) = (self.upload(dout)?, self.upload(y)?, self.upload(gate)?);
        let (dx, dy, dg) = (self.poisoned(numel)?, self.poisoned(numel)?, self.poisoned(bc)?);
        let scratch = self.poisoned(Self::gated_residual_scratch(dims))?;
        self.gated_residual_backward(dims, &dod, &yd, &gd, Some(&dx), &dy, &dg, &scratch)?;
        Ok((self.download(&dx, numel)?, self.download(&dy, numel)?, self.download(&dg, bc)?))
    }

    // ---- activations --------------------------------------------------------------------------

    fn pointwise(
        &self,
        f: &CudaFunction,
        name: &str,
        n: usize,
        x: &CudaSlice<f32>,
        dout: Option<&CudaSlice<f32>>,
        out: &CudaSlice<f32>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let p = FkPointwiseParams { x: self.p(x), dout: dout.map_or(0, |d| self.p(d)), out: self.p(out), n: n as i64 };
        self.launch(f, &p, (pointwise_blocks(n), 1, 1), name)
    }

    /// out = silu(x) over `n` elements.
    pub fn silu(&self, n: usize, x: &CudaSlice<f32>, out: &CudaSlice<f32>) -> Result<()> {
        self.pointwise(&self.silu_fwd, "fk_silu_fwd", n, x, None, out)
    }

    /// dinp = dout⊙silu'(x).
    pub fn silu_backward(
        &self,
        n: usize,
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dinp: &CudaSlice<f32>,
    ) -> Result<()> {
        self.pointwise(&self.silu_bwd, "fk_silu_bwd", n, x, Some(dout), dinp)
    }

    /// dinp = dout⊙gelu_tanh'(x) (the forward is `Gpu::gelu_tanh_f32`, kernels/elementwise.cu).
    pub fn gelu_tanh_backward(
        &self,
        n: usize,
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dinp: &CudaSlice<f32>,
    ) -> Result<()> {
        self.pointwise(&self.gelu_bwd, "fk_gelu_tanh_bwd", n, x, Some(dout), dinp)
    }

    /// Host-slice twin of `ops::activation::silu_forward`.
    pub fn silu_host(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (xd, out) = (self.upload(x)?, self.poisoned(x.len())?);
        self.silu(x.len(), &xd, &out)?;
        self.download(&out, x.len())
    }

    /// Host-slice twin of `ops::activation::silu_backward`.
    pub fn silu_backward_host(&self, x: &[f32], dout: &[f32]) -> Result<Vec<f32>> {
        ensure!(x.len() == dout.len(), "silu_backward_host: {} inputs, {} gradients", x.len(), dout.len());
        let (xd, dd, out) = (self.upload(x)?, self.upload(dout)?, self.poisoned(x.len())?);
        self.silu_backward(x.len(), &xd, &dd, &out)?;
        self.download(&out, x.len())
    }

    /// Host-slice twin of `ops::activation::gelu_tanh_backward`.
    pub fn gelu_tanh_backward_host(&self, x: &[f32], dout: &[f32]) -> Result<Vec<f32>> {
        ensure!(x.len() == dout.len(), "gelu_tanh_backward_host: {} inputs, {} gradients", x.len(), dout.len());
        let (xd, dd, out) = (self.upload(x)?, self.upload(dout)?, self.poisoned(x.len())?);
        self.gelu_tanh_backward(x.len(), &xd, &dd, &out)?;
        self.download(&out, x.len())
    }

    // ---- MSE loss -----------------------------------------------------------------------------

    /// f64 partials `mse` needs (elements).
    pub fn mse_scratch(n: usize) -> usize {
        n.div_ceil(THREADS).clamp(1, FK_STEP_MAX_PARTIALS as usize)
    }

    /// grad = 2·w·(pred − target)/n and, in `loss[0]`, Σ w·(pred − target)² (f64; divide by n
    /// for the loss). `weight` has one value per sample (n / weight.len() elements each).
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
        ensure!(scratch.len() >= blocks, "mse: scratch too small");
        let per = match weight {
            Some((_, nw)) => {
                ensure!(nw > 0 && n.is_multiple_of(nw), "mse: {n} elements do not split into {nw} samples");
                n / nw
            }
            None => n,
        };
        let p = FkMseParams {
            pred: self.p(pred),
            target: self.p(target),
            weight: weight.map_or(0, |(w, _)| self.p(w)),
            grad: self.p(grad),
            partial: self.p(scratch),
            n: n as i64,
            per: per as i64,
            n_f32: n as f32,
            ..Default::default()
        };
        self.launch(&self.mse_partial, &p, (blocks, 1, 1), "fk_mse_partial")?;
        self.sum_f64(scratch, blocks, loss_sum)
    }

    fn sum_f64(&self, partial: &CudaSlice<f64>, n: usize, out: &CudaSlice<f64>) -> Result<()> {
        let p = FkSumF64Params { partial: self.p(partial), out: self.p(out), n: n as i64, ..Default::default() };
        self.launch(&self.sum_f64, &p, (1, 1, 1), "fk_sum_f64")
    }

    /// Host-slice twin of `ops::loss::mse_forward` and `mse_backward`: (loss, dpred).
    pub fn mse_host(&self, pred: &[f32], target: &[f32], weight: Option<&[f32]>) -> Result<(f64, Vec<f32>)> {
        let n = pred.len();
        ensure!(target.len() == n, "mse_host: {n} predictions, {} targets", target.len());
        let (pd, td, grad) = (self.upload(pred)?, self.upload(target)?, self.poisoned(n)?);
        let wd = weight.map(|w| self.upload(w)).transpose()?;
        let loss = self.stream.clone_htod(&[f64::NAN])?;
        let scratch = self.stream.clone_htod(&vec![f64::NAN; Self::mse_scratch(n)])?;
        self.mse(n, &pd, &td, wd.as_ref().zip(weight.map(|w| w.len())), &grad, &loss, &scratch)?;
        let sum = self.stream.clone_dtoh(&loss)?[0];
        Ok((sum / n as f64, self.download(&grad, n)?))
    }

    // ---- AdamW and the gradient norm ----------------------------------------------------------

    /// One AdamW step over device tensors (params, grads, m, v, all f32 and of equal length per
    /// tensor), `AdamW::step`'s twin for optimizer step number `t` (1-based, after increment).
    /// Gradients are multiplied by `grad_scale` in f32 first (the clipping factor; 1 = none).
    /// Launches FK_ADAM_MAX_TENSORS tensors at a time.
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
                    param: self.p(params[i]),
                    grad: self.p(grads[i]),
                    m: self.p(m[i]),
                    v: self.p(v[i]),
                    numel: n as i64,
                    block_begin: blocks as i64,
                };
                blocks += n.div_ceil(BLOCK_ELEMS);
            }
            base.num_tensors = group.len() as i32;
            self.launch(&self.adamw, &base, (blocks, 1, 1), "fk_adamw")?;
        }
        Ok(())
    }

    /// Global L2 norm of the gradients, Σ over every element of x² in f64 (deterministic:
    /// per-block partials, then one block adds them in order), `clip_grad_norm`'s norm.
    pub fn grad_norm(&self, grads: &[&CudaSlice<f32>]) -> Result<f64> {
        let live: Vec<&CudaSlice<f32>> = grads.iter().copied().filter(|g| !g.is_empty()).collect();
        let total_blocks: usize = live.iter().map(|g| g.len().div_ceil(BLOCK_ELEMS)).sum();
        if total_blocks == 0 {
            return Ok(0.0);
        }
        let partial = self.stream.clone_htod(&vec![f64::NAN; total_blocks])?;
        let mut offset = 0usize;
        for group in live.chunks(MAX_TENSORS) {
            let mut p = FkSumSqParams {
                num_tensors: group.len() as i32,
                partial: self.p(&partial),
                partial_offset: offset as i64,
                ..Default::default()
            };
            let mut blocks = 0usize;
            for (i, g) in group.iter().enumerate() {
                p.tensor[i] =
                    FkSumSqTensor { data: self.p(g), numel: g.len() as i64, block_begin: blocks as i64, pad0: 0 };
                blocks += g.len().div_ceil(BLOCK_ELEMS);
            }
            self.launch(&self.sumsq, &p, (blocks, 1, 1), "fk_sumsq_partial")?;
            offset += blocks;
        }
        let out = self.stream.clone_htod(&[f64::NAN])?;
        self.sum_f64(&partial, total_blocks, &out)?;
        Ok(self.stream.clone_dtoh(&out)?[0].sqrt())
    }

    /// Host-slice twin of `AdamW::step` (with `clip_grad_norm`'s factor as `grad_scale`):
    /// uploads parameters, gradients and moments, steps on the device, writes them back and
    /// advances `opt.t`.
    pub fn adamw_step_host(
        &self,
        opt: &mut AdamW,
        params: &mut [&mut Vec<f32>],
        grads: &[&[f32]],
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        ensure!(
            params.len() == grads.len() && params.len() == opt.m.len(),
            "adamw_step_host: {} parameters, {} gradients, {} moment tensors",
            params.len(),
            grads.len(),
            opt.m.len()
        );
        let up = |v: &[f32]| -> Result<CudaSlice<f32>> { self.upload(if v.is_empty() { &[0.0] } else { v }) };
        let mut pd = Vec::new();
        let (mut gd, mut md, mut vd) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..params.len() {
            ensure!(grads[i].len() == params[i].len(), "adamw_step_host: tensor {i} gradient length");
            pd.push(up(params[i])?);
            gd.push(up(grads[i])?);
            md.push(up(&opt.m[i])?);
            vd.push(up(&opt.v[i])?);
        }
        let t = opt.t + 1;
        // A one-element buffer stands in for an empty tensor (no zero-size allocations); it is
        // stepped on zeros and dropped.
        let ps: Vec<&CudaSlice<f32>> = pd.iter().collect();
        let gs: Vec<&CudaSlice<f32>> = gd.iter().collect();
        let ms: Vec<&CudaSlice<f32>> = md.iter().collect();
        let vs: Vec<&CudaSlice<f32>> = vd.iter().collect();
        self.adamw_step(opt, t, lr, grad_scale, &ps, &gs, &ms, &vs)?;
        for i in 0..params.len() {
            let n = params[i].len();
            *params[i] = self.download(&pd[i], n)?;
            opt.m[i] = self.download(&md[i], n)?;
            opt.v[i] = self.download(&vd[i], n)?;
        }
        opt.t = t;
        Ok(())
    }

    /// Host-slice global gradient norm (`clip_grad_norm`'s return value).
    pub fn grad_norm_host(&self, grads: &[&[f32]]) -> Result<f64> {
        let gd: Vec<CudaSlice<f32>> =
            grads.iter().filter(|g| !g.is_empty()).map(|g| self.upload(g)).collect::<Result<_>>()?;
        let gs: Vec<&CudaSlice<f32>> = gd.iter().collect();
        self.grad_norm(&gs)
    }
}
