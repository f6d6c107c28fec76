//! Random initialisation on the device (kernels/random.cu): every element a hash of (tensor
//! stream, index), the same bits as `model::random::RandomParam::generate` on the CPU, so a
//! `random:` model is generated where it is used (tests/gpu_model_ops.rs).

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{Elem, OneKernel, View};
use super::trace::{elem, record, OpFamily};
use anyhow::{ensure, Result};

/// A tensor whose every element is a hash of (stream, index), as the CPU's random parameters
/// generate it (`model::random`): what `fill` reproduces bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomFill {
    /// The tensor's stream (model seed mixed with its name).
    pub stream: u64,
    pub numel: usize,
    pub init: Fill,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fill {
    /// U(−bound, bound) from 24 random bits per element.
    Uniform(f32),
    Const(f32),
}

pub struct GpuRandom {
    k: OneKernel,
}

impl GpuRandom {
    pub fn new(gpu: &Gpu) -> Result<GpuRandom> {
        Ok(GpuRandom { k: OneKernel::load(gpu, "random", FK_MODEL_RANDOM_FILL)? })
    }

    /// dst[k] = element `offset + k` of the tensor `p`, for every k < dst.len(), as f32 or
    /// (rounded to nearest even) bf16: the same bits as the CPU, so a tensor can be filled in
    /// pieces at any offsets.
    pub fn fill<T: Elem>(&self, p: &RandomFill, dst: View<T>, offset: usize) -> Result<()> {
        let n = dst.len();
        ensure!(
            offset + n <= p.numel,
            "fill_random: elements {offset}..{} outside the tensor's {}",
            offset + n,
            p.numel
        );
        if n == 0 {
            return Ok(());
        }
        let (uniform, bound, value) = match p.init {
            Fill::Uniform(bound) => (1, bound, 0.0),
            Fill::Const(v) => (0, 0.0, v),
        };
        let st = &self.k.fam.stream;
        let params = FkModelRandomParams {
            dst: dst.addr(st),
            stream: p.stream,
            offset: offset as i64,
            n: n as i64,
            bound,
            value,
            uniform,
            dst_bf16: T::BF16 as i32,
        };
        record(OpFamily::Elementwise, "fk_model_random_fill", 0.0, elem(!T::BF16) * n as f64, || format!("n={n}"));
        // SAFETY: the kernel writes dst's n elements and reads nothing else.
        unsafe { self.k.run(&params, n, "fk_model_random_fill") }
    }
}
