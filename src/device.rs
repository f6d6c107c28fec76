//! Where the model's linears run: the CPU reference, or the fused CUDA LoRA kernels. The rest of
//! the model (attention, norms, elementwise) stays on the CPU until the attention and step
//! kernels land, so `--device cuda` today moves every LoRA linear — the bulk of the FLOPs — to the
//! GPU, one upload of its operands per call.

use crate::kernels::gpu::Gpu;
use crate::kernels::lora::GpuLora;
use anyhow::{bail, Result};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(Arc<Mutex<GpuLora>>),
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
        Ok(Device::Cuda(Arc::new(Mutex::new(GpuLora::new(&gpu)?))))
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
