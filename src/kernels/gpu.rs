//! The GPU side: one context and stream. `Gpu::new` returns an error that says why (no driver,
//! no device, kernels not built) instead of panicking, so every command and test can fall back
//! to the CPU path.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::Arc;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

impl Gpu {
    pub fn new() -> Result<Gpu> {
        if !super::COMPILED {
            bail!(
                "no CUDA kernels in this build (nvcc was not found when it was compiled): install nvcc with \
                 tools/install-nvcc.sh, then rebuild with NVCC=$(tools/install-nvcc.sh) cargo build --release"
            );
        }
        // SAFETY: only probes whether libcuda can be dlopen'ed.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("no CUDA device: the CUDA driver library (libcuda) is not installed");
        }
        let n = CudaContext::device_count().context("no CUDA device: cannot query the driver")?;
        if n < 1 {
            bail!("no CUDA device: the driver reports none");
        }
        let ctx = CudaContext::new(0).context("cannot create a CUDA context on device 0")?;
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream })
    }
}

/// Whether the sm_90a kernels may be loaded on this device: compute capability 9.0, unless
/// `FLUX_KERNELS_NO_SM90=1` asks for the sm_80 kernels everywhere (the safety valve while the
/// Hopper kernels have not yet run on a card: docs/gpu-runs.md).
pub fn sm90_enabled(gpu: &Gpu) -> Result<bool> {
    if std::env::var("FLUX_KERNELS_NO_SM90").is_ok_and(|v| v == "1") {
        return Ok(false);
    }
    Ok(gpu.ctx.compute_capability().context("compute capability")? == (9, 0))
}
