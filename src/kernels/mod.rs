//! The CUDA kernels, compiled by build.rs from kernels/*.cu and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// True when this build embedded the kernels (nvcc was found at build time).
pub const COMPILED: bool = cfg!(flux_cuda_kernels);

/// The fatbin of one kernels/*.cu by file stem.
pub fn module(name: &str) -> Option<&'static [u8]> {
    MODULES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

pub mod abi;
pub mod attention;
pub mod gpu;
pub mod lora;
pub mod model_ops;
pub mod step;
