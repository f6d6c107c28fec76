//! The FLUX transformer as the CPU reference computes it, module names as BFL's.

pub mod attention;
pub mod config;
pub mod double_block;
pub mod embed;
pub mod flux;
pub mod gpu;
pub mod param;
pub mod random;
pub mod single_block;
pub mod weights;
