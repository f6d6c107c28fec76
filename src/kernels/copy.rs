//! Copies and casts on the device (kernels/copy.cu): a strided [rows, cols] copy between f32
//! and bf16 matrices, optionally accumulating. CPU twin: a slice copy, `half::bf16::from_f32`
//! rounding, or `+=` (tests/gpu_model_ops.rs).

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{DevMat, OneKernel, View};
use super::trace::{elem, record, OpFamily};
use anyhow::{ensure, Result};
use half::bf16;

pub struct GpuCopy {
    k: OneKernel,
}

impl GpuCopy {
    pub fn new(gpu: &Gpu) -> Result<GpuCopy> {
        Ok(GpuCopy { k: OneKernel::load(gpu, "copy", FK_MODEL_COPY2D)? })
    }

    /// dst[r, c] = src[r, c] over a [rows, cols] window, either side f32 or bf16 (bf16 stores
    /// round to nearest even); with `accumulate`, dst[r, c] += src[r, c] (f32 dst only). Splits
    /// and joins [txt ; img] along the sequence (rows of one sample) and moves column blocks.
    pub fn copy2d(&self, rows: usize, cols: usize, src: DevMat, dst: DevMat, accumulate: bool) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        ensure!(!(accumulate && dst.is_bf16()), "copy2d: accumulation needs an f32 destination");
        let st = &self.k.fam.stream;
        let p = FkModelCopyParams {
            src: src.window(rows, cols, "copy2d source", st)?,
            dst: dst.window(rows, cols, "copy2d destination", st)?,
            rows: rows as i64,
            cols: cols as i64,
            ld_src: src.ld() as i64,
            ld_dst: dst.ld() as i64,
            src_bf16: src.is_bf16() as i32,
            dst_bf16: dst.is_bf16() as i32,
            accumulate: accumulate as i32,
            ..Default::default()
        };
        // Source read, destination written (and read when accumulating).
        let per = elem(!src.is_bf16()) + elem(!dst.is_bf16()) * if accumulate { 2.0 } else { 1.0 };
        record(OpFamily::Elementwise, "fk_model_copy2d", 0.0, per * (rows * cols) as f64, || format!("{rows}x{cols}"));
        // SAFETY: both windows were checked to hold [rows, cols] at their strides.
        unsafe { self.k.run(&p, rows * cols, "fk_model_copy2d") }
    }

    /// dst[i] = bf16(src[i]) for i < n (round to nearest even).
    pub fn cast_f32_to_bf16(&self, src: View<f32>, dst: View<bf16>, n: usize) -> Result<()> {
        self.copy2d(1, n, DevMat::F32(src, n), DevMat::Bf16(dst, n), false)
    }

    /// dst[i] = f32(src[i]) for i < n (exact).
    pub fn cast_bf16_to_f32(&self, src: View<bf16>, dst: View<f32>, n: usize) -> Result<()> {
        self.copy2d(1, n, DevMat::Bf16(src, n), DevMat::F32(dst, n), false)
    }
}
