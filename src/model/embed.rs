//! The conditioning vector: timestep, guidance and pooled-text embeddings summed (BFL
//! `Flux.forward`, first lines), and its backward into any LoRA on the embedders.

use super::adapt::{AdapterGrads, LinearAdapters};
use super::weights::{FluxWeights, MlpEmbedder};
use crate::ops::activation::{silu_backward, silu_forward};
use crate::ops::embedding::timestep_embedding;
use anyhow::Result;

/// BFL `time_factor`: t ∈ [0, 1] and guidance scales enter the sinusoid multiplied by 1000.
pub const TIME_FACTOR: f32 = 1000.0;
pub const MAX_PERIOD: f32 = 10_000.0;

pub fn mlp_embedder_forward(e: &MlpEmbedder, inp: &[f32], b: usize, ad: &dyn LinearAdapters) -> Result<Vec<f32>> {
    let hdn = e.in_layer.apply(inp, b, ad)?;
    let mut act = vec![0f32; hdn.len()];
    silu_forward(&mut act, &hdn);
    e.out_layer.apply(&act, b, ad)
}

/// LoRA gradients of an embedder (its input is data, so no input gradient). Recomputes the
/// hidden layer: it is b rows.
pub fn mlp_embedder_backward(
    e: &MlpEmbedder,
    inp: &[f32],
    dout: &[f32],
    b: usize,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<()> {
    let hdn = e.in_layer.apply(inp, b, ad)?;
    let mut act = vec![0f32; hdn.len()];
    silu_forward(&mut act, &hdn);
    let dact = e.out_layer.backward_new(dout, &act, b, ad, g)?;
    let mut dh = vec![0f32; hdn.len()];
    silu_backward(&mut dh, &hdn, &dact);
    e.in_layer.backward(None, &dh, inp, b, ad, g)
}

/// The sinusoidal embeddings of the timesteps and (when the model has one) the guidance.
pub struct CondInputs {
    pub temb: Vec<f32>,
    pub gemb: Option<Vec<f32>>,
}

pub fn cond_inputs(timesteps: &[f32], guidance: Option<&[f32]>, time_dim: usize) -> CondInputs {
    let emb = |t: &[f32]| {
        let mut e = vec![0f32; t.len() * time_dim];
        timestep_embedding(&mut e, t, time_dim, TIME_FACTOR, MAX_PERIOD);
        e
    };
    CondInputs { temb: emb(timesteps), gemb: guidance.map(emb) }
}

/// vec[b, hidden] = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(y)
pub fn conditioning_forward(
    w: &FluxWeights,
    ci: &CondInputs,
    y: &[f32],
    b: usize,
    ad: &dyn LinearAdapters,
) -> Result<Vec<f32>> {
    let mut vec = mlp_embedder_forward(&w.time_in, &ci.temb, b, ad)?;
    if let (Some(gi), Some(ge)) = (&w.guidance_in, &ci.gemb) {
        let g = mlp_embedder_forward(gi, ge, b, ad)?;
        vec.iter_mut().zip(&g).for_each(|(v, g)| *v += g);
    }
    let ye = mlp_embedder_forward(&w.vector_in, y, b, ad)?;
    vec.iter_mut().zip(&ye).for_each(|(v, y)| *v += y);
    Ok(vec)
}

pub fn conditioning_backward(
    w: &FluxWeights,
    ci: &CondInputs,
    y: &[f32],
    dvec: &[f32],
    b: usize,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<()> {
    mlp_embedder_backward(&w.time_in, &ci.temb, dvec, b, ad, g)?;
    if let (Some(gi), Some(ge)) = (&w.guidance_in, &ci.gemb) {
        mlp_embedder_backward(gi, ge, dvec, b, ad, g)?;
    }
    mlp_embedder_backward(&w.vector_in, y, dvec, b, ad, g)
}
