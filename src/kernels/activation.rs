//! Activations on the device (kernels/activation.cu). CPU twins in `ops::activation`:
//!
//! | GPU                                   | CPU (the specification)                            |
//! |---------------------------------------|----------------------------------------------------|
//! | `gelu_tanh` / `gelu_tanh_backward`    | `gelu_tanh_forward` / `gelu_tanh_backward`, on strided [rows, cols] windows |
//! | `silu` / `silu_backward`              | `silu_forward` / `silu_backward`, contiguous f32    |

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{grid_blocks, launch, need, DevMat, Family};
use super::trace::{elem, record, OpFamily::Elementwise};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaFunction, CudaSlice};

const GELU_THREADS: usize = FK_MODEL_THREADS as usize;
const SILU_THREADS: usize = FK_STEP_THREADS as usize;

pub struct GpuActivation {
    fam: Family,
    gelu_fwd: CudaFunction,
    gelu_bwd: CudaFunction,
    silu_fwd: CudaFunction,
    silu_bwd: CudaFunction,
}

impl GpuActivation {
    pub fn new(gpu: &Gpu) -> Result<GpuActivation> {
        let fam = Family::load(gpu, "activation")?;
        Ok(GpuActivation {
            gelu_fwd: fam.function(FK_MODEL_GELU_FWD)?,
            gelu_bwd: fam.function(FK_MODEL_GELU_BWD)?,
            silu_fwd: fam.function(FK_SILU_FWD)?,
            silu_bwd: fam.function(FK_SILU_BWD)?,
            fam,
        })
    }

    /// out = gelu_tanh(x) on a [rows, cols] window; x and out f32 or bf16.
    pub fn gelu_tanh(&self, rows: usize, cols: usize, x: DevMat, out: DevMat) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let st = &self.fam.stream;
        let p = FkModelGeluParams {
            x: x.window(rows, cols, "gelu_tanh: x", st)?,
            out: out.window(rows, cols, "gelu_tanh: out", st)?,
            rows: rows as i64,
            cols: cols as i64,
            ld_x: x.ld() as i64,
            ld_out: out.ld() as i64,
            out_bf16: out.is_bf16() as i32,
            x_bf16: x.is_bf16() as i32,
            ..Default::default()
        };
        let grid = (grid_blocks(rows * cols, GELU_THREADS), 1, 1);
        let bytes = (rows * cols) as f64 * (elem(!x.is_bf16()) + elem(!out.is_bf16()));
        record(Elementwise, "fk_model_gelu_fwd", 0.0, bytes, || format!("{rows}x{cols}"));
        // SAFETY: both windows were checked to hold [rows, cols] at their strides.
        unsafe { launch(st, &self.gelu_fwd, &p, grid, GELU_THREADS, 0, "fk_model_gelu_fwd") }
    }

    /// dx = dy⊙gelu_tanh'(x) on a [rows, cols] window; dy f32, x and dx f32 or bf16.
    pub fn gelu_tanh_backward(&self, rows: usize, cols: usize, x: DevMat, dy: DevMat, dx: DevMat) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        ensure!(!dy.is_bf16(), "gelu_tanh_backward: dy must be f32");
        let st = &self.fam.stream;
        let p = FkModelGeluParams {
            x: x.window(rows, cols, "gelu_tanh_backward: x", st)?,
            dy: dy.window(rows, cols, "gelu_tanh_backward: dy", st)?,
            out: dx.window(rows, cols, "gelu_tanh_backward: dx", st)?,
            rows: rows as i64,
            cols: cols as i64,
            ld_x: x.ld() as i64,
            ld_dy: dy.ld() as i64,
            ld_out: dx.ld() as i64,
            out_bf16: dx.is_bf16() as i32,
            x_bf16: x.is_bf16() as i32,
        };
        let grid = (grid_blocks(rows * cols, GELU_THREADS), 1, 1);
        let bytes = (rows * cols) as f64 * (elem(!x.is_bf16()) + 4.0 + elem(!dx.is_bf16()));
        record(Elementwise, "fk_model_gelu_bwd", 0.0, bytes, || format!("{rows}x{cols}"));
        // SAFETY: the three windows were checked to hold [rows, cols] at their strides.
        unsafe { launch(st, &self.gelu_bwd, &p, grid, GELU_THREADS, 0, "fk_model_gelu_bwd") }
    }

    /// out = silu(x) over the first `n` elements.
    pub fn silu(&self, n: usize, x: &CudaSlice<f32>, out: &CudaSlice<f32>) -> Result<()> {
        self.pointwise(&self.silu_fwd, "fk_silu_fwd", n, x, None, out)
    }

    /// dinp = dout⊙silu'(x) over the first `n` elements.
    pub fn silu_backward(
        &self,
        n: usize,
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dinp: &CudaSlice<f32>,
    ) -> Result<()> {
        self.pointwise(&self.silu_bwd, "fk_silu_bwd", n, x, Some(dout), dinp)
    }

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
        need(x, n, name)?;
        need(out, n, name)?;
        if let Some(d) = dout {
            need(d, n, name)?;
        }
        let st = &self.fam.stream;
        let p = FkPointwiseParams {
            x: super::launch::addr(x, st),
            dout: dout.map_or(0, |d| super::launch::addr(d, st)),
            out: super::launch::addr(out, st),
            n: n as i64,
        };
        record(Elementwise, name, 0.0, 4.0 * (n * (2 + dout.is_some() as usize)) as f64, || format!("n={n}"));
        // SAFETY: x, dout and out hold at least n elements each.
        unsafe { launch(st, f, &p, (grid_blocks(n, SILU_THREADS), 1, 1), SILU_THREADS, FK_SMEM_STEP as usize, name) }
    }
}
