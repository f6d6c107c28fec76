//! Where the model runs: the CPU reference, or CUDA. A `Device::Cuda` holds one context with
//! every kernel module loaded. `model::gpu::GpuFlux` runs the whole transformer on it with the
//! weights and activations resident on the device (train and sample use that); the CPU model's
//! `Linear` and attention core also accept it, uploading operands per call (the earlier path,
//! kept for the per-op tests).

use crate::kernels::attention::GpuAttention;
use crate::kernels::gpu::Gpu;
use crate::kernels::lora::GpuLora;
use crate::kernels::model_ops::GpuModelOps;
use crate::kernels::step::GpuStepOps;
use anyhow::{bail, Result};
use cudarc::driver::{CudaContext, CudaStream};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

/// The kernels one CUDA context holds. Dereferences to the LoRA linear, its most used part.
pub struct CudaBackend {
    pub lora: GpuLora,
    pub attn: GpuAttention,
    /// The elementwise, normalisation, loss and optimizer kernels of the device-resident step.
    pub step: GpuStepOps,
    /// Layout moves, QK prologue, GELU, timestep embedding and random fill of that step.
    pub ops: GpuModelOps,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

impl Deref for CudaBackend {
    type Target = GpuLora;
    fn deref(&self) -> &GpuLora {
        &self.lora
    }
}

impl DerefMut for CudaBackend {
    fn deref_mut(&mut self) -> &mut GpuLora {
        &mut self.lora
    }
}

impl CudaBackend {
    /// The backend behind a `Device::Cuda`, locked; a call that panicked while holding it leaves
    /// the context unusable, which is an error here rather than a second panic.
    pub fn lock(b: &Mutex<CudaBackend>) -> Result<MutexGuard<'_, CudaBackend>> {
        b.lock().map_err(|_| anyhow::anyhow!("the CUDA context was poisoned by a failed call"))
    }
}

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

    fn cuda() -> Result<Device> {
        let gpu = Gpu::new()?;
        let backend = CudaBackend {
            lora: GpuLora::new(&gpu)?,
            attn: GpuAttention::new(&gpu)?,
            step: GpuStepOps::new(&gpu)?,
            ops: GpuModelOps::new(&gpu)?,
            ctx: gpu.ctx.clone(),
            stream: gpu.stream.clone(),
        };
        Ok(Device::Cuda(Arc::new(Mutex::new(backend))))
    }

    /// `--device cpu|cuda|auto`: auto takes CUDA when a device and the kernels are there and says
    /// why not otherwise.
    pub fn parse(s: &str) -> Result<(Device, Option<String>)> {
        match s {
            "cpu" => Ok((Device::Cpu, None)),
            "cuda" => Ok((Device::cuda().map_err(|e| anyhow::anyhow!("--device cuda: {e:#}"))?, None)),
            "auto" => match Device::cuda() {
                Ok(d) => Ok((d, None)),
                Err(e) => Ok((Device::Cpu, Some(format!("using the CPU ({e:#})")))),
            },
            _ => bail!("--device takes cpu, cuda or auto, got `{s}`"),
        }
    }
}
