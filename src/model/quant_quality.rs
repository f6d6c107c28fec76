//! The quality figure: how far the transformer's output moves when the block weights are
//! stored in 8 bits instead of bf16.

use crate::model::adapt::NoAdapters;
use crate::model::config::FluxConfig;
use crate::model::flux::{flux_forward, FluxInputs};
use crate::model::packing::img_ids;
use crate::model::param::Param;
use crate::model::weights::FluxWeights;
use crate::quant::QuantParam;
use crate::quant::Scheme;
use crate::util::{rel_l2, Rng};
use anyhow::{Context, Result};
use std::collections::HashMap;

/// Random `forward` inputs: `b` samples of an h×w grid of packed tokens, `n_txt` text tokens
/// (zero text ids, as FLUX gives them), σ = 0.5 and guidance 3.5.
pub fn random_inputs(cfg: &FluxConfig, b: usize, h: usize, w: usize, n_txt: usize, seed: u64) -> FluxInputs {
    let mut rng = Rng::new(seed);
    FluxInputs {
        b,
        n_img: h * w,
        n_txt,
        img: rng.normal_vec(b * h * w * cfg.in_channels, 1.0),
        // img_ids takes the latent size, two latent pixels per packed token each way.
        img_ids: img_ids(2 * h, 2 * w),
        txt: rng.normal_vec(b * n_txt * cfg.context_in_dim, 1.0),
        txt_ids: vec![0.0; n_txt * 3],
        y: rng.normal_vec(b * cfg.vec_in_dim, 1.0),
        timesteps: vec![0.5; b],
        guidance: cfg.guidance_embed.then(|| vec![3.5; b]),
    }
}

/// bf16 rounding of f32 values: what a bf16 checkpoint holds.
fn to_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// Relative L2 of the output for each scheme against the same model in bf16: `tensors` (BFL
/// names, f32) are rounded to bf16, and the weights `quantize` would quantise are quantised
/// from those bf16 values.
pub fn output_error(
    cfg: &FluxConfig,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    inp: &FluxInputs,
    schemes: &[Scheme],
) -> Result<Vec<(Scheme, f64)>> {
    let bf16: HashMap<String, (Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(n, s, d)| (n, (s, to_bf16(&d)))).collect();
    let owned: HashMap<String, Param> = bf16.iter().map(|(n, (_, d))| (n.clone(), Param::owned(d.clone()))).collect();
    let get = |map: &HashMap<String, Param>, n: &str| map.get(n).cloned().with_context(|| format!("no tensor `{n}`"));
    let reference = flux_forward(cfg, &FluxWeights::new(cfg, &|n| get(&owned, n))?, inp, &NoAdapters)?;
    drop(owned);
    let mut out = Vec::new();
    for &scheme in schemes {
        let params = bf16
            .iter()
            .map(|(n, (s, d))| {
                let p = if crate::quant::quantised_by_default(n, s) {
                    Param::Quant(QuantParam::from_f32(scheme, d, s[0], s[1]).with_context(|| format!("tensor `{n}`"))?)
                } else {
                    Param::owned(d.clone())
                };
                Ok((n.clone(), p))
            })
            .collect::<Result<HashMap<String, Param>>>()?;
        let y = flux_forward(cfg, &FluxWeights::new(cfg, &|n| get(&params, n))?, inp, &NoAdapters)?;
        out.push((scheme, rel_l2(&y, &reference)));
    }
    Ok(out)
}
