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

pub fn tiny_config() -> FluxConfig {
    FluxConfig {
        in_channels: 64,
        out_channels: 64,
        context_in_dim: 32,
        vec_in_dim: 16,
        hidden_size: 64,
        num_heads: 4,
        head_dim: 16,
        mlp_hidden: 256,
        depth: 2,
        depth_single: 2,
        time_dim: 256,
        guidance_embed: true,
        qkv_bias: true,
        rope_axes: vec![4, 6, 6],
        theta: 10_000.0,
    }
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

/// The synthetic training set: the style colour plus per-sample stripes, and random "captions".
pub fn synthetic_dataset(cfg: &FluxConfig) -> Result<Dataset> {
    let style = latent_for_rgb(STYLE_RGB);
    let mut rng = Rng::new(2024);
    let samples = (0..N_SAMPLES)
        .map(|i| {
            let (fx, fy) = ((rng.uniform() * 3.0) as f32, (rng.uniform() * 3.0) as f32);
            let amp: Vec<f32> = rng.normal_vec(16, 0.4);
            let phase = rng.uniform() as f32 * std::f32::consts::TAU;
            let mut latent = vec![0f32; 16 * LATENT * LATENT];
            for ch in 0..16 {
                for y in 0..LATENT {
                    for x in 0..LATENT {
                        let t = std::f32::consts::TAU * (fx * x as f32 + fy * y as f32) / LATENT as f32 + phase;
                        latent[(ch * LATENT + y) * LATENT + x] = style[ch] + amp[ch] * t.sin();
                    }
                }
            }
            Sample {
                name: format!("synthetic-{i:02}"),
                latent,
                h: LATENT,
                w: LATENT,
                txt: rng.normal_vec(N_TXT * cfg.context_in_dim, 1.0),
                n_txt: N_TXT,
                y: rng.normal_vec(cfg.vec_in_dim, 1.0),
            }
        })
        .collect();
    Dataset::new(samples)
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
