//! Sampling: the FLUX.1-dev schedule, the Euler flow-matching loop, previews.

pub mod preview;
pub mod sampler;
