//! The conditioning vector: timestep, guidance and pooled-text embeddings summed (BFL
//! `Flux.forward`, first lines).

use super::weights::{FluxWeights, MlpEmbedder};
use crate::lora::LoraSet;
use crate::ops::activation::silu_forward;
use crate::ops::embedding::timestep_embedding;
use anyhow::Result;

/// BFL `time_factor`: t ∈ [0, 1] and guidance scales enter the sinusoid multiplied by 1000.
pub const TIME_FACTOR: f32 = 1000.0;
pub const MAX_PERIOD: f32 = 10_000.0;

pub fn mlp_embedder_forward(e: &MlpEmbedder, inp: &[f32], b: usize, loras: &LoraSet) -> Result<Vec<f32>> {
    let hdn = e.in_layer.apply(inp, b, loras)?;
    let mut act = vec![0f32; hdn.len()];
    silu_forward(&mut act, &hdn);
    e.out_layer.apply(&act, b, loras)
}

/// vec[b, hidden] = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(y)
pub fn conditioning_forward(
    w: &FluxWeights,
    timesteps: &[f32],
    guidance: Option<&[f32]>,
    y: &[f32],
    time_dim: usize,
    loras: &LoraSet,
) -> Result<Vec<f32>> {
    let b = timesteps.len();
    let mut temb = vec![0f32; b * time_dim];
    timestep_embedding(&mut temb, timesteps, time_dim, TIME_FACTOR, MAX_PERIOD);
    let mut vec = mlp_embedder_forward(&w.time_in, &temb, b, loras)?;
    if let (Some(gi), Some(g)) = (&w.guidance_in, guidance) {
        timestep_embedding(&mut temb, g, time_dim, TIME_FACTOR, MAX_PERIOD);
        let ge = mlp_embedder_forward(gi, &temb, b, loras)?;
        vec.iter_mut().zip(&ge).for_each(|(v, g)| *v += g);
    }
    let ye = mlp_embedder_forward(&w.vector_in, y, b, loras)?;
    vec.iter_mut().zip(&ye).for_each(|(v, y)| *v += y);
    Ok(vec)
}
