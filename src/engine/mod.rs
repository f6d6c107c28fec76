//! One engine over the CPU reference and the CUDA device-resident model. An `Engine` is built
//! once for the chosen device from the frozen weights; the trainer, the sampler and the `forward`,
//! `grad` and `bench-step` commands talk only to it:
//!
//! - `set_adapters` (inference: several files at their strengths) or `train_adapters` (the terms
//!   being trained, with gradient accumulators and the optimizer's moments);
//! - `forward` (inference), `forward_train` (keeping what the backward needs) and `backward_mse`
//!   (the weighted flow-matching MSE and its backward into the adapters' gradients);
//! - `reduce_grads` (data parallelism: the gradients summed over the ranks through NCCL);
//! - `optimizer_step` (global-norm clipping and AdamW over every adapter tensor) and
//!   `trainable_to_host` (the factors and moments for checkpoints and the exported file).
//!
//! The CPU side (`cpu.rs`) is the f32 reference of `model::flux`, bit for bit; the CUDA side
//! (`cuda/`) holds weights, adapters, activations and optimizer state on the device and is
//! tested against it (tests/gpu_flux_step.rs).

pub mod cpu;
pub mod cuda;

use crate::adapters::AdapterSet;
use crate::dist::nccl::Comm;
use crate::model::config::FluxConfig;
use crate::model::flux::FluxInputs;
use crate::model::weights::FluxWeights;
use crate::ops::optim::AdamW;
use anyhow::{bail, Result};
pub use cuda::weights::BaseDtype;
pub use cuda::CudaBackend;
use std::sync::{Arc, Mutex};

/// Where the model runs: the CPU reference, or one CUDA context with every kernel module loaded.
#[derive(Clone, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(Arc<Mutex<CudaBackend>>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Device {
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// `--device cpu|cuda|auto`: auto takes CUDA when a device and the kernels are there and says
    /// why not otherwise.
    pub fn parse(s: &str) -> Result<(Device, Option<String>)> {
        match s {
            "cpu" => Ok((Device::Cpu, None)),
            "cuda" => Ok((CudaBackend::device().map_err(|e| anyhow::anyhow!("--device cuda: {e:#}"))?, None)),
            "auto" => match CudaBackend::device() {
                Ok(d) => Ok((d, None)),
                Err(e) => Ok((Device::Cpu, Some(format!("using the CPU ({e:#})")))),
            },
            _ => bail!("--device takes cpu, cuda or auto, got `{s}`"),
        }
    }
}

/// How the engine holds the model (the CUDA side only; the CPU reference is f32 as loaded).
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// The frozen linears' storage on the device.
    pub base: BaseDtype,
    /// Per-block activation checkpointing in `forward_train`.
    pub checkpointing: bool,
    /// Blocks whose frozen weights stay in pinned host memory and are streamed in per use
    /// (the chain's last ones: cuda/swap.rs). 0: every block resident.
    pub blocks_to_swap: usize,
    /// With `checkpointing`: the block inputs it keeps go to pinned host memory and come back
    /// one block ahead of the backward (cuda/offload.rs).
    pub offload_checkpoints: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { base: BaseDtype::Bf16, checkpointing: false, blocks_to_swap: 0, offload_checkpoints: false }
    }
}

/// The model on one device, with its adapters.
pub struct Engine {
    inner: Inner,
}

enum Inner {
    Cpu(Box<cpu::CpuEngine>),
    Cuda(Box<cuda::train::CudaEngine>),
}

/// One forward pass kept for its backward.
pub struct Forward {
    inner: ForwardInner,
}

enum ForwardInner {
    Cpu(Box<cpu::CpuForward>),
    Cuda(Box<cuda::train::CudaForward>),
}

impl Engine {
    /// The model on `device` (the weights are uploaded once on CUDA); no adapters yet.
    pub fn new(device: &Device, cfg: &FluxConfig, weights: FluxWeights, opts: EngineOptions) -> Result<Engine> {
        let inner = match device {
            Device::Cpu => Inner::Cpu(Box::new(cpu::CpuEngine::new(cfg, weights))),
            Device::Cuda(be) => Inner::Cuda(Box::new(cuda::train::CudaEngine::new(cfg, &weights, be, opts)?)),
        };
        Ok(Engine { inner })
    }

    pub fn device_name(&self) -> &'static str {
        match &self.inner {
            Inner::Cpu(_) => "cpu",
            Inner::Cuda(_) => "cuda",
        }
    }

    pub fn cfg(&self) -> &FluxConfig {
        match &self.inner {
            Inner::Cpu(e) => &e.cfg,
            Inner::Cuda(e) => &e.m.cfg,
        }
    }

    /// The adapters every following forward applies (inference; replaces any before). On CUDA
    /// only the adapters go to the device: the base stays.
    pub fn set_adapters(&mut self, set: &AdapterSet) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(e) => e.set_adapters(set, false),
            Inner::Cuda(e) => e.set_adapters(set, false),
        }
    }

    /// One adapter set per sample of the following forwards (inference): sample i of a batch of
    /// `sets.len()` sees only `sets[i]`, and its output is what it would be in a batch of one with
    /// `set_adapters(&sets[i])` (bit for bit on the CPU; on CUDA each linear runs one call per run
    /// of samples with the same terms, on their rows).
    pub fn set_batch_adapters(&mut self, sets: &[AdapterSet]) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(e) => e.set_batch_adapters(sets),
            Inner::Cuda(e) => e.set_batch_adapters(sets),
        }
    }

    /// True when `set_batch_adapters` works on this engine (both engines now).
    pub fn batches_mixed_adapters(&self) -> bool {
        true
    }

    /// The adapters to train: their tensors become the trainable parameters, with gradient
    /// accumulators; `resume` brings the optimizer's moments of a resumed run.
    pub fn train_adapters(&mut self, set: &AdapterSet, resume: Option<&AdamW>) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(e) => e.set_adapters(set, true),
            Inner::Cuda(e) => {
                e.set_adapters(set, true)?;
                resume.map_or(Ok(()), |opt| e.upload_moments(opt))
            }
        }
    }

    /// Velocity prediction [b, n_img, out_channels] with the current adapters, no dropout.
    pub fn forward(&mut self, inp: &FluxInputs) -> Result<Vec<f32>> {
        match &mut self.inner {
            Inner::Cpu(e) => e.forward(inp),
            Inner::Cuda(e) => e.forward(inp),
        }
    }

    /// The forward keeping what `backward_mse` needs; `dropout` (probability, step seed) masks
    /// the adapters' inputs.
    pub fn forward_train(&mut self, inp: &FluxInputs, dropout: Option<(f32, u64)>) -> Result<Forward> {
        let inner = match &mut self.inner {
            Inner::Cpu(e) => ForwardInner::Cpu(Box::new(e.forward_train(inp, dropout)?)),
            Inner::Cuda(e) => ForwardInner::Cuda(Box::new(e.forward_train(inp, dropout)?)),
        };
        Ok(Forward { inner })
    }

    /// The prediction of a kept forward, on the host.
    pub fn prediction(&self, fwd: &Forward) -> Result<Vec<f32>> {
        match (&self.inner, &fwd.inner) {
            (Inner::Cpu(_), ForwardInner::Cpu(f)) => Ok(f.pred.clone()),
            (Inner::Cuda(e), ForwardInner::Cuda(f)) => e.prediction(f),
            _ => bail!("a forward pass given to another engine's backward"),
        }
    }

    /// loss = Σ_b w_b·Σ_i (pred − target)² / numel (`weights` one per sample, None: all 1), and
    /// unless the loss is not finite or `gscale` is 0, the backward of gscale·loss: the adapters'
    /// gradients accumulate (micro-batches add up until `zero_grads`). Returns the loss.
    pub fn backward_mse(&mut self, fwd: Forward, target: &[f32], weights: Option<&[f32]>, gscale: f32) -> Result<f64> {
        match (&mut self.inner, fwd.inner) {
            (Inner::Cpu(e), ForwardInner::Cpu(f)) => e.backward_mse(*f, target, weights, gscale),
            (Inner::Cuda(e), ForwardInner::Cuda(f)) => e.backward_mse(*f, target, weights, gscale),
            _ => bail!("a forward pass given to another engine's backward"),
        }
    }

    /// The backward from any d(prediction) (host, [b, n_img, out_channels]): the adapters'
    /// gradients accumulate.
    pub fn backward(&mut self, fwd: Forward, dpred: &[f32]) -> Result<()> {
        match (&mut self.inner, fwd.inner) {
            (Inner::Cpu(e), ForwardInner::Cpu(f)) => e.backward(*f, dpred.to_vec()),
            (Inner::Cuda(e), ForwardInner::Cuda(f)) => e.backward(*f, dpred),
            _ => bail!("a forward pass given to another engine's backward"),
        }
    }

    /// `forward_train` then `backward_mse`: one micro-batch of training. Returns the loss.
    pub fn micro_step(
        &mut self,
        inp: &FluxInputs,
        target: &[f32],
        weights: Option<&[f32]>,
        gscale: f32,
        dropout: Option<(f32, u64)>,
    ) -> Result<f64> {
        let fwd = self.forward_train(inp, dropout)?;
        self.backward_mse(fwd, target, weights, gscale)
    }

    /// Zeroes the adapters' gradients (before a step's micro-batches).
    pub fn zero_grads(&mut self) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(e) => e.zero_grads(),
            Inner::Cuda(e) => e.zero_grads(),
        }
    }

    /// The accumulated gradients on the host, in the adapters' parameter order.
    pub fn grads(&self) -> Result<Vec<Vec<f32>>> {
        match &self.inner {
            Inner::Cpu(e) => e.grads(),
            Inner::Cuda(e) => e.grads(),
        }
    }

    /// Data parallelism, overlapped: call before the step's last backward, which then starts the
    /// gradients' all-reduce bucket by bucket as it finishes them (CUDA; the CPU engine reduces
    /// everything in `reduce_grads`). `reduce_grads` must follow, with the same arguments.
    pub fn arm_reduce(&mut self, comm: &Comm, deterministic: bool) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(_) => Ok(()),
            Inner::Cuda(e) => e.arm_reduce(comm, deterministic),
        }
    }

    /// Data parallelism: the accumulated gradients summed over the ranks of `comm` (each rank
    /// scaled its share before the backward, so the sum is the global batch's gradient). CPU:
    /// on the host through the emulated NCCL; CUDA: NCCL on the device in buckets (those the
    /// armed backward did not start), waiting at most `timeout`. `deterministic`: all-gathered
    /// and added in rank order.
    pub fn reduce_grads(&mut self, comm: &Comm, deterministic: bool, timeout: std::time::Duration) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(e) => e.reduce_grads(comm, deterministic),
            Inner::Cuda(e) => e.all_reduce_grads(comm, deterministic, timeout),
        }
    }

    /// What the last gradient all-reduce did (CUDA: its buckets and how many overlapped the
    /// backward); None on the CPU, which reduces everything after the backward.
    pub fn reduce_summary(&self) -> Option<String> {
        match &self.inner {
            Inner::Cpu(_) => None,
            Inner::Cuda(e) => e.reduce_summary(),
        }
    }

    /// Global-norm clipping to `max_norm` (0: off), then one AdamW step at `lr` over every
    /// trainable tensor. Returns the gradient norm before clipping.
    pub fn optimizer_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        match &mut self.inner {
            Inner::Cpu(e) => e.optimizer_step(opt, lr, max_norm),
            Inner::Cuda(e) => e.optimizer_step(opt, lr, max_norm),
        }
    }

    /// The trainable tensors on the host in parameter order; on CUDA the moments come down into
    /// `opt` too (on the CPU they live there already).
    pub fn trainable_to_host(&self, opt: &mut AdamW) -> Result<Vec<Vec<f32>>> {
        match &self.inner {
            Inner::Cpu(e) => Ok(e.params()),
            Inner::Cuda(e) => e.to_host(opt),
        }
    }

    /// The CUDA engine, for what only it reports (memory, the device model's weights).
    pub fn cuda(&self) -> Option<&cuda::train::CudaEngine> {
        match &self.inner {
            Inner::Cuda(e) => Some(e),
            Inner::Cpu(_) => None,
        }
    }

    pub fn cuda_mut(&mut self) -> Option<&mut cuda::train::CudaEngine> {
        match &mut self.inner {
            Inner::Cuda(e) => Some(e),
            Inner::Cpu(_) => None,
        }
    }
}
