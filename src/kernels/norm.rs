//! Normalisation and modulation on the device (kernels/norm.cu), f32 in and out except the
//! tensors typed by their element (`T: Elem`): the saved normalised rows, the modulated output (a
//! linear's bf16 input) and the gated branch (a linear's bf16 output). CPU twins:
//!
//! | GPU                                          | CPU (the specification)                          |
//! |----------------------------------------------|--------------------------------------------------|
//! | `ln_modulate` / `ln_modulate_backward`       | `model::double_block::ln_modulate` / `_backward`  |
//! | `gated_residual` / `gated_residual_backward` | `ops::modulation::gated_residual_forward` / `_backward` |
//!
//! Every reduction is deterministic (per-chunk partials in a scratch buffer, then a fixed-order
//! column sum; no atomics). Tested in tests/gpu_step_ops.rs.

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{addr, grid_blocks, launch, need, Elem, Family};
use super::trace::{record, OpFamily::Elementwise};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr};

const THREADS: usize = FK_STEP_THREADS as usize;
const CHUNK: usize = FK_STEP_CHUNK_TOKENS as usize;

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
    fn bc(&self) -> usize {
        self.b * self.c
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

/// Bytes of one element of `T` (the launch records' byte counts).
fn size<T: Elem>() -> f64 {
    if T::BF16 {
        2.0
    } else {
        4.0
    }
}

pub struct GpuNorm {
    fam: Family,
    ln_fwd: CudaFunction,
    ln_bwd_dx: CudaFunction,
    ln_bwd_partial: CudaFunction,
    col_sum: CudaFunction,
    gated_fwd: CudaFunction,
    gated_bwd: CudaFunction,
}

impl GpuNorm {
    pub fn new(gpu: &Gpu) -> Result<GpuNorm> {
        let fam = Family::load(gpu, "norm")?;
        Ok(GpuNorm {
            ln_fwd: fam.function(FK_LN_MOD_FWD)?,
            ln_bwd_dx: fam.function(FK_LN_MOD_BWD_DX)?,
            ln_bwd_partial: fam.function(FK_LN_MOD_BWD_PARTIAL)?,
            col_sum: fam.function(FK_COL_SUM)?,
            gated_fwd: fam.function(FK_GATED_FWD)?,
            gated_bwd: fam.function(FK_GATED_BWD)?,
            fam,
        })
    }

    /// # Safety
    /// As `launch::launch`: every address in `p` covers what the kernel touches at `p`'s dims.
    unsafe fn run<P: DeviceRepr>(
        &self,
        f: &CudaFunction,
        p: &P,
        grid: (usize, usize, usize),
        name: &str,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { launch(&self.fam.stream, f, p, grid, THREADS, FK_SMEM_STEP as usize, name) }
    }

    fn a<T>(&self, s: &CudaSlice<T>) -> u64 {
        addr(s, &self.fam.stream)
    }

    /// out = (1 + scale)⊙LN(x) + shift; saves n (normalised x), mean (optional) and rstd. With n
    /// in bf16, out is computed from the rounded n, as `modulate` recomputes it.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_modulate<O: Elem, N: Elem>(
        &self,
        dims: StepDims,
        eps: f32,
        x: &CudaSlice<f32>,
        shift: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        out: &CudaSlice<O>,
        n: &CudaSlice<N>,
        mean: Option<&CudaSlice<f32>>,
        rstd: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("ln_modulate")?;
        need(x, dims.numel(), "ln_modulate: x")?;
        need(out, dims.numel(), "ln_modulate: out")?;
        need(n, dims.numel(), "ln_modulate: n")?;
        for (s, what) in [(shift, "shift"), (scale, "scale")] {
            need(s, dims.bc(), &format!("ln_modulate: {what}"))?;
        }
        need(rstd, dims.rows(), "ln_modulate: rstd")?;
        if let Some(m) = mean {
            need(m, dims.rows(), "ln_modulate: mean")?;
        }
        let p = FkLnModParams {
            x: self.a(x),
            shift: self.a(shift),
            scale: self.a(scale),
            out: self.a(out),
            normed: self.a(n),
            mean: mean.map_or(0, |m| self.a(m)),
            rstd: self.a(rstd),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            eps,
            normed_bf16: N::BF16 as i32,
            out_bf16: O::BF16 as i32,
            ..Default::default()
        };
        // x read twice (f32), n and out written; rstd
        let bytes = (8.0 + size::<N>() + size::<O>()) * dims.numel() as f64 + 4.0 * dims.rows() as f64;
        record(Elementwise, "fk_ln_mod_fwd", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every buffer was checked against dims above.
        unsafe { self.run(&self.ln_fwd, &p, (dims.rows(), 1, 1), "fk_ln_mod_fwd") }
    }

    /// out = (1 + scale)⊙n + shift from the n that `ln_modulate` saved: the same bits as its out
    /// (the backward recomputes a linear's input instead of keeping it).
    pub fn modulate<O: Elem, N: Elem>(
        &self,
        dims: StepDims,
        n: &CudaSlice<N>,
        shift: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        out: &CudaSlice<O>,
    ) -> Result<()> {
        dims.check("modulate")?;
        need(n, dims.numel(), "modulate: n")?;
        need(out, dims.numel(), "modulate: out")?;
        for (s, what) in [(shift, "shift"), (scale, "scale")] {
            need(s, dims.bc(), &format!("modulate: {what}"))?;
        }
        let p = FkLnModParams {
            shift: self.a(shift),
            scale: self.a(scale),
            out: self.a(out),
            normed: self.a(n),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            normed_bf16: N::BF16 as i32,
            out_bf16: O::BF16 as i32,
            modulate_only: 1,
            ..Default::default()
        };
        let bytes = (size::<N>() + size::<O>()) * dims.numel() as f64;
        record(Elementwise, "fk_ln_mod_fwd (modulate)", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every buffer was checked against dims above.
        unsafe { self.run(&self.ln_fwd, &p, (dims.rows(), 1, 1), "fk_ln_mod_fwd (modulate)") }
    }

    /// Elements of f32 scratch `ln_modulate_backward` needs: [2, b, chunks, c].
    pub fn ln_modulate_scratch(dims: StepDims) -> usize {
        2 * dims.b * dims.chunks() * dims.c
    }

    /// dx, dshift, dscale from dout, the forward's n and rstd, and scale. `scratch` holds at
    /// least `ln_modulate_scratch(dims)` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_modulate_backward<N: Elem>(
        &self,
        dims: StepDims,
        dout: &CudaSlice<f32>,
        n: &CudaSlice<N>,
        rstd: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        dx: &CudaSlice<f32>,
        dshift: &CudaSlice<f32>,
        dscale: &CudaSlice<f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("ln_modulate_backward")?;
        need(n, dims.numel(), "ln_modulate_backward: n")?;
        for (s, len, what) in [
            (dout, dims.numel(), "dout"),
            (dx, dims.numel(), "dx"),
            (rstd, dims.rows(), "rstd"),
            (scale, dims.bc(), "scale"),
            (dshift, dims.bc(), "dshift"),
            (dscale, dims.bc(), "dscale"),
            (scratch, Self::ln_modulate_scratch(dims), "scratch"),
        ] {
            need(s, len, &format!("ln_modulate_backward: {what}"))?;
        }
        let p = FkLnModParams {
            scale: self.a(scale),
            normed: self.a(n),
            rstd: self.a(rstd),
            dout: self.a(dout),
            dx: self.a(dx),
            partial: self.a(scratch),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            normed_bf16: N::BF16 as i32,
            ..Default::default()
        };
        let cs = FkColSumParams {
            partial: self.a(scratch),
            out0: self.a(dshift),
            out1: self.a(dscale),
            b: dims.b as i64,
            chunks: dims.chunks() as i64,
            c: dims.c as i64,
        };
        // dout and n read twice (dx pass, partial pass), dx written
        let bytes = (12.0 + 2.0 * size::<N>()) * dims.numel() as f64;
        record(Elementwise, "fk_ln_mod_bwd", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every buffer was checked against dims above.
        unsafe {
            self.run(&self.ln_bwd_dx, &p, (dims.rows(), 1, 1), "fk_ln_mod_bwd_dx")?;
            self.run(&self.ln_bwd_partial, &p, (dims.c_tiles(), dims.chunks(), dims.b), "fk_ln_mod_bwd_partial")?;
            self.run(&self.col_sum, &cs, (dims.c_tiles(), dims.b, 2), "fk_col_sum")
        }
    }

    /// out = x + gate⊙y (`out` may be `x`'s buffer for the in-place form of the CPU).
    pub fn gated_residual<Y: Elem>(
        &self,
        dims: StepDims,
        x: &CudaSlice<f32>,
        y: &CudaSlice<Y>,
        gate: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("gated_residual")?;
        for (s, len, what) in [(x, dims.numel(), "x"), (out, dims.numel(), "out")] {
            need(s, len, &format!("gated_residual: {what}"))?;
        }
        need(y, dims.numel(), "gated_residual: y")?;
        need(gate, dims.bc(), "gated_residual: gate")?;
        let p = FkGatedParams {
            x: self.a(x),
            y: self.a(y),
            gate: self.a(gate),
            out: self.a(out),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            y_bf16: Y::BF16 as i32,
            ..Default::default()
        };
        let bytes = (8.0 + size::<Y>()) * dims.numel() as f64;
        record(Elementwise, "fk_gated_fwd", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every buffer was checked against dims above.
        unsafe { self.run(&self.gated_fwd, &p, (grid_blocks(dims.numel(), THREADS), 1, 1), "fk_gated_fwd") }
    }

    /// Elements of f32 scratch `gated_residual_backward` needs: [b, chunks, c].
    pub fn gated_residual_scratch(dims: StepDims) -> usize {
        dims.b * dims.chunks() * dims.c
    }

    /// dx = dout (when `dx` is given), dy = gate⊙dout, dgate = Σ_l y⊙dout.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_residual_backward<Y: Elem, D: Elem>(
        &self,
        dims: StepDims,
        dout: &CudaSlice<f32>,
        y: &CudaSlice<Y>,
        gate: &CudaSlice<f32>,
        dx: Option<&CudaSlice<f32>>,
        dy: &CudaSlice<D>,
        dgate: &CudaSlice<f32>,
        scratch: &CudaSlice<f32>,
    ) -> Result<()> {
        dims.check("gated_residual_backward")?;
        need(y, dims.numel(), "gated_residual_backward: y")?;
        need(dy, dims.numel(), "gated_residual_backward: dy")?;
        for (s, len, what) in [
            (dout, dims.numel(), "dout"),
            (gate, dims.bc(), "gate"),
            (dgate, dims.bc(), "dgate"),
            (scratch, Self::gated_residual_scratch(dims), "scratch"),
        ] {
            need(s, len, &format!("gated_residual_backward: {what}"))?;
        }
        if let Some(d) = dx {
            need(d, dims.numel(), "gated_residual_backward: dx")?;
        }
        let p = FkGatedParams {
            y: self.a(y),
            gate: self.a(gate),
            dout: self.a(dout),
            dx: dx.map_or(0, |d| self.a(d)),
            dy: self.a(dy),
            partial: self.a(scratch),
            b: dims.b as i64,
            l: dims.l as i64,
            c: dims.c as i64,
            chunk: CHUNK as i64,
            y_bf16: Y::BF16 as i32,
            dy_bf16: D::BF16 as i32,
            ..Default::default()
        };
        let cs = FkColSumParams {
            partial: self.a(scratch),
            out0: self.a(dgate),
            b: dims.b as i64,
            chunks: dims.chunks() as i64,
            c: dims.c as i64,
            ..Default::default()
        };
        let bytes = (4.0 + size::<Y>() + size::<D>() + 4.0 * dx.is_some() as usize as f64) * dims.numel() as f64;
        record(Elementwise, "fk_gated_bwd", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every buffer was checked against dims above.
        unsafe {
            self.run(&self.gated_bwd, &p, (dims.c_tiles(), dims.chunks(), dims.b), "fk_gated_bwd")?;
            self.run(&self.col_sum, &cs, (dims.c_tiles(), dims.b, 1), "fk_col_sum")
        }
    }
}
