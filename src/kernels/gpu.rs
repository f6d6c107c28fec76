//! The GPU side: one context and stream, the embedded modules loaded once, and a wrapper per
//! kernel. `Gpu::new` returns an error that says why (no driver, no device, kernels not built)
//! instead of panicking, so every command and test can fall back to the CPU path.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    gelu_f32: CudaFunction,
}

impl Gpu {
    pub fn new() -> Result<Gpu> {
        if !super::COMPILED {
            bail!("no CUDA kernels in this build (nvcc was not found when it was compiled)");
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
        let fatbin = super::module("elementwise").context("elementwise kernels missing from the build")?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
            .context("cannot load elementwise.fatbin")?;
        let gelu_f32 = module.load_function("gelu_tanh_forward_f32").context("gelu_tanh_forward_f32")?;
        Ok(Gpu { ctx, stream, gelu_f32 })
    }

    /// GELU-tanh of `inp` on the device (twin of `ops::activation::gelu_tanh_forward`).
    pub fn gelu_tanh_f32(&self, inp: &[f32]) -> Result<Vec<f32>> {
        let n = inp.len();
        let x = self.stream.clone_htod(inp)?;
        // Poisoned output: a kernel that skips an element leaves NaN, which the test catches.
        let mut y = self.stream.clone_htod(&vec![f32::NAN; n])?;
        let n64 = n as i64;
        let threads = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(threads as usize) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.gelu_f32);
        b.arg(&mut y).arg(&x).arg(&n64);
        // SAFETY: argument types and order match gelu_tanh_forward_f32 in kernels/elementwise.cu.
        unsafe { b.launch(cfg) }?;
        Ok(self.stream.clone_dtoh(&y)?)
    }
}
