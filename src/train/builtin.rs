//! The built-in demo: a tiny FLUX-shaped model with fixed random weights and a synthetic set of
//! latents that share one colour (in the preview's RGB space) under varied stripe patterns. A
//! LoRA visibly learns the colour: samples drift from the base model's arbitrary colours toward it.

use super::data::{Dataset, Sample};
use crate::model::config::FluxConfig;
use crate::model::weights::FluxWeights;
use crate::sample::preview::latent_rgb;
use crate::util::Rng;
use anyhow::Result;

/// The colour the demo LoRA learns, in the preview's [-1, 1] RGB: a warm orange.
pub const STYLE_RGB: [f32; 3] = [0.55, 0.05, -0.45];
pub const LATENT: usize = 16;
pub const N_TXT: usize = 8;
pub const N_SAMPLES: usize = 24;

/// The built-in demo's model (hidden 64, 2 + 2 blocks).
pub fn tiny_config() -> FluxConfig {
    FluxConfig::tiny()
}

pub fn tiny_weights(cfg: &FluxConfig) -> Result<FluxWeights> {
    FluxWeights::from_tensors(cfg, FluxWeights::random_tensors(cfg, 7))
}

/// The per-channel latent whose preview colour is `rgb`: the minimum-norm solution of
/// Fᵀz + bias = rgb over the 16 channels.
pub fn latent_for_rgb(rgb: [f32; 3]) -> [f32; 16] {
    // Columns of F by probing the preview with unit latents.
    let base = latent_rgb(&[0.0; 16], 1, 1)[0];
    let f: Vec<[f64; 3]> = (0..16)
        .map(|ch| {
            let mut z = [0f32; 16];
            z[ch] = 1.0;
            let p = latent_rgb(&z, 1, 1)[0];
            [(p[0] - base[0]) as f64, (p[1] - base[1]) as f64, (p[2] - base[2]) as f64]
        })
        .collect();
    let mut g = [[0f64; 3]; 3];
    for row in &f {
        for i in 0..3 {
            for j in 0..3 {
                g[i][j] += row[i] * row[j];
            }
        }
    }
    let r = [(rgb[0] - base[0]) as f64, (rgb[1] - base[1]) as f64, (rgb[2] - base[2]) as f64];
    let c = solve3(g, r);
    let mut z = [0f32; 16];
    for (ch, row) in f.iter().enumerate() {
        z[ch] = (row[0] * c[0] + row[1] * c[1] + row[2] * c[2]) as f32;
    }
    z
}

fn solve3(a: [[f64; 3]; 3], b: [f64; 3]) -> [f64; 3] {
    let det = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(a);
    let mut x = [0f64; 3];
    for (k, xk) in x.iter_mut().enumerate() {
        let mut m = a;
        (0..3).for_each(|i| m[i][k] = b[i]);
        *xk = det(m) / d;
    }
    x
}

/// Mean preview colour of a latent [16, h, w].
pub fn mean_rgb(lat: &[f32], h: usize, w: usize) -> [f32; 3] {
    let px = latent_rgb(lat, h, w);
    let mut m = [0f32; 3];
    px.iter().for_each(|p| (0..3).for_each(|k| m[k] += p[k] / px.len() as f32));
    m
}

/// Distance of a latent's mean preview colour to the demo's style colour.
pub fn style_distance(lat: &[f32], h: usize, w: usize) -> f32 {
    let m = mean_rgb(lat, h, w);
    (0..3).map(|k| (m[k] - STYLE_RGB[k]).powi(2)).sum::<f32>().sqrt()
}

/// The synthetic training set of the demo (24 samples, 16×16 latents, 8 text tokens).
pub fn synthetic_dataset(cfg: &FluxConfig) -> Result<Dataset> {
    Dataset::new(synthetic_samples(cfg, N_SAMPLES, LATENT, N_TXT, 2024))
}

/// Synthetic samples for any model's widths: one shared per-channel "style" (for 16 latent
/// channels, the demo's colour) plus per-sample stripes, and random text states.
pub fn synthetic_samples(cfg: &FluxConfig, n: usize, size: usize, n_txt: usize, seed: u64) -> Vec<Sample> {
    let c = cfg.in_channels / 4;
    let style: Vec<f32> = if c == 16 {
        latent_for_rgb(STYLE_RGB).to_vec()
    } else {
        (0..c).map(|ch| if ch % 2 == 0 { 0.8 } else { -0.6 }).collect()
    };
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let (fx, fy) = ((rng.uniform() * 3.0) as f32, (rng.uniform() * 3.0) as f32);
            let amp: Vec<f32> = rng.normal_vec(c, 0.4);
            let phase = rng.uniform() as f32 * std::f32::consts::TAU;
            let mut latent = vec![0f32; c * size * size];
            for ch in 0..c {
                for y in 0..size {
                    for x in 0..size {
                        let t = std::f32::consts::TAU * (fx * x as f32 + fy * y as f32) / size as f32 + phase;
                        latent[(ch * size + y) * size + x] = style[ch] + amp[ch] * t.sin();
                    }
                }
            }
            Sample {
                name: format!("synthetic-{i:03}"),
                latent,
                h: size,
                w: size,
                txt: rng.normal_vec(n_txt * cfg.context_in_dim, 1.0),
                n_txt,
                y: rng.normal_vec(cfg.vec_in_dim, 1.0),
            }
        })
        .collect()
}

/// Writes samples as a dataset folder the trainer reads (one safetensors per sample).
pub fn write_samples(dir: &std::path::Path, samples: &[Sample], context_in_dim: usize) -> Result<()> {
    use crate::io::safetensors::{write_tensors, Dtype, OutTensor};
    std::fs::create_dir_all(dir)?;
    for s in samples {
        let c = s.latent.len() / (s.h * s.w);
        let t = [
            OutTensor { name: "latent", shape: vec![c, s.h, s.w], data: &s.latent, dtype: Dtype::F32 },
            OutTensor { name: "txt", shape: vec![s.n_txt, context_in_dim], data: &s.txt, dtype: Dtype::F32 },
            OutTensor { name: "y", shape: vec![s.y.len()], data: &s.y, dtype: Dtype::F32 },
        ];
        write_tensors(&dir.join(format!("{}.safetensors", s.name)), &t, &Default::default())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn style_latent_previews_as_the_style_colour() {
        let z = latent_for_rgb(STYLE_RGB);
        let lat: Vec<f32> = z.iter().flat_map(|&v| [v; 4]).collect();
        assert!(style_distance(&lat, 2, 2) < 1e-4);
    }
}
