//! The CPU reference ops, one file per family, each a plain function over explicit buffers
//! with its shapes in the signature. The backward of each op goes beside its forward.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod embedding;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod modulation;
pub mod norm;
pub mod optim;
pub mod rope;
