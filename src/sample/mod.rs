//! Sampling: the FLUX.1-dev schedule, the Euler flow-matching loop, previews, latents as files.

pub mod latents;
pub mod preview;
pub mod sampler;
