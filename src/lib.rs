//! flux-kernels: LoRA fine-tuning and sampling of FLUX.1-dev in Rust and CUDA.
//!
//! `model` and `ops` are the CPU reference (f32, op by op); `kernels` holds the compiled CUDA
//! code; `io` reads checkpoints and LoRA files in every layout users have.

// Ops take their buffers and shapes explicitly (llm.c style), so long argument lists are the
// point, not a smell.
#![allow(clippy::too_many_arguments)]

pub mod adapters;
pub mod cli;
pub mod dist;
pub mod engine;
pub mod io;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod plan;
pub mod quant;
pub mod safety;
pub mod sample;
pub mod serve;
pub mod text;
pub mod train;
pub mod util;
pub mod vae;
