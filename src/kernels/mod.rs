//! The CUDA kernels, compiled by build.rs from kernels/*.cu and embedded in the binary, and one
//! typed wrapper per op family (the .cu file of the same name):
//!
//! | wrapper          | kernels/         | what it computes                                    |
//! |------------------|------------------|-----------------------------------------------------|
//! | `lora`           | `lora_gemm.cu`   | the fused LoRA linear (frozen GEMM + adapters), forward and backward |
//! |                  | `lora_gemm_sm90.cu` | its large GEMMs (Y, dX) on Hopper: TMA, wgmma, persistent (sm_90a) |
//! | `attention`      | `attention.cu`   | flash attention, forward and backward; the QK prologue and head merge |
//! |                  | `attention_sm90.cu` | the flash forward on Hopper (sm_90a)              |
//! | `norm`           | `norm.cu`        | LayerNorm + modulation, gated residuals              |
//! | `activation`     | `activation.cu`  | GELU-tanh, SiLU and their backward                   |
//! | `copy`           | `copy.cu`        | strided copies and f32/bf16 casts                    |
//! | `embedding`      | `embedding.cu`   | the sinusoidal timestep embedding                    |
//! | `random`         | `random.cu`      | random initialisation, bit-identical to the CPU's    |
//! | `optim`          | `optim.cu`       | the MSE loss, global gradient norm, AdamW            |
//!
//! Device helpers shared by every .cu live in kernels/common.cuh; the wrappers share `launch`
//! (module loading, the launch helper, and `View`, the length-checked device views every public
//! function takes instead of raw addresses) and `trace` (the record of every launch with its
//! FLOPs and bytes, and the dry run that skips the kernels: `plan::steptime`). This module uses nothing of the model, the adapters
//! or the trainer (docs/architecture.md).

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// True when this build embedded the kernels (nvcc was found at build time).
pub const COMPILED: bool = cfg!(flux_cuda_kernels);

/// The fatbin of one kernels/*.cu by file stem.
pub fn module(name: &str) -> Option<&'static [u8]> {
    MODULES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

pub mod abi;
pub mod activation;
pub mod attention;
pub mod copy;
pub mod embedding;
pub mod gpu;
pub mod launch;
pub mod lora;
pub mod norm;
pub mod optim;
pub mod random;
pub mod trace;
