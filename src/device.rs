//! Where the model runs: the CPU reference, or CUDA. With `--device cuda` every LoRA linear (the
//! bulk of the FLOPs) runs through the fused LoRA kernels and the attention core through the
//! flash kernels; norms, RoPE and the elementwise ops stay on the CPU until the step kernels land,
//! and each GPU call uploads its operands and downloads its results.

use crate::kernels::attention::GpuAttention;
use crate::kernels::gpu::Gpu;
use crate::kernels::lora::GpuLora;
use anyhow::{bail, Result};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

/// The kernels one CUDA context holds. Dereferences to the LoRA linear, its most used part.
pub struct CudaBackend {
    pub lora: GpuLora,
    pub attn: GpuAttention,
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
        let backend = CudaBackend { lora: GpuLora::new(&gpu)?, attn: GpuAttention::new(&gpu)? };
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
