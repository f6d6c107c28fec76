//! The FLUX transformer: its configuration, the two checkpoint layouts translated to BFL's names,
//! the frozen weight tree, and the CPU reference forward and backward, module names as BFL's.
//! Adapters reach the linears through `adapt::LinearAdapters` only: the model knows no LoRA.

pub mod adapt;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod double_block;
pub mod embed;
pub mod flux;
pub mod layout;
pub mod packing;
pub mod param;
pub mod quant_quality;
pub mod random;
pub mod single_block;
pub mod weights;
