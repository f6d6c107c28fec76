//! FLUX.1-dev sampling: Euler steps of the flow ODE from noise (t = 1) to data (t = 0) on the
//! resolution-dependent shifted schedule (BFL `get_schedule`, `denoise`).

use crate::engine::Engine;
use crate::model::config::FluxConfig;
use crate::model::flux::FluxInputs;
use crate::model::packing::{img_ids, pack_latent, unpack_latent};
use crate::util::Rng;
use anyhow::{bail, Result};

/// mu(L) = m·L + b through (256 tokens, 0.5) and (4096 tokens, 1.15), not clamped.
pub fn flux_mu(n_img_tokens: usize) -> f64 {
    let m = (1.15 - 0.5) / (4096.0 - 256.0);
    let b = 0.5 - 256.0 * m;
    m * n_img_tokens as f64 + b
}

/// time_shift(mu, 1, t) = e^mu / (e^mu + (1/t − 1)).
pub fn time_shift(mu: f64, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    if t >= 1.0 {
        return 1.0;
    }
    mu.exp() / (mu.exp() + (1.0 / t - 1.0))
}

/// steps + 1 times from 1 to 0; shifted for dev (schnell samples the plain linspace).
pub fn flux_schedule(steps: usize, n_img_tokens: usize, shift: bool) -> Vec<f32> {
    let mu = flux_mu(n_img_tokens);
    (0..=steps)
        .map(|i| {
            let t = 1.0 - i as f64 / steps as f64;
            (if shift { time_shift(mu, t) } else { t }) as f32
        })
        .collect()
}

/// What to sample: text conditioning per image, size, steps, guidance, seed.
pub struct SampleSpec {
    /// T5 states [n_txt, context_in_dim] and CLIP pooled [vec_in_dim], one pair per image.
    pub txt: Vec<Vec<f32>>,
    pub y: Vec<Vec<f32>>,
    pub n_txt: usize,
    /// Latent height and width (pixels / 8; even).
    pub h: usize,
    pub w: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
}

/// Gaussian noise latents [c, h, w] per image, from `seed` (image i draws after image i − 1).
pub fn noise(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal_vec(c * h * w, 1.0)).collect()
}

/// Runs the Euler loop on `engine` with its current adapters; returns one latent [c, h, w] per
/// image (c = in_channels / 4).
pub fn sample(engine: &mut Engine, spec: &SampleSpec) -> Result<Vec<Vec<f32>>> {
    sample_progress(engine, spec, &mut |_| {})
}

/// `sample`, calling `on_step(k)` after Euler step k (1-based) of `spec.steps`.
pub fn sample_progress(
    engine: &mut Engine,
    spec: &SampleSpec,
    on_step: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    sample_progress_from(engine, spec, None, on_step)
}

/// `sample_progress` from given initial noise (one latent [c, h, w] per image, the layout
/// diffusers' FluxPipeline draws before packing) instead of the seed's; None: the seed's.
pub fn sample_progress_from(
    engine: &mut Engine,
    spec: &SampleSpec,
    noise: Option<&[Vec<f32>]>,
    on_step: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let cfg = engine.cfg().clone();
    let mut k = 0;
    sample_from(&cfg, spec, noise, &mut |inp| {
        let v = engine.forward(inp)?;
        k += 1;
        on_step(k);
        Ok(v)
    })
}

/// The Euler loop around any forward (velocity of `FluxInputs`).
pub fn sample_with(
    cfg: &FluxConfig,
    spec: &SampleSpec,
    forward: &mut dyn FnMut(&FluxInputs) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    sample_from(cfg, spec, None, forward)
}

/// `sample_with` from given initial noise (None: drawn from `spec.seed`). Each latent [c, h, w]
/// is packed into tokens as diffusers' `_pack_latents` packs its [B, c, h, w] draw
/// (`model::packing`), so the same noise gives the same trajectory in both.
pub fn sample_from(
    cfg: &FluxConfig,
    spec: &SampleSpec,
    noise: Option<&[Vec<f32>]>,
    forward: &mut dyn FnMut(&FluxInputs) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    sample_images(cfg, spec, noise, None, forward)
}

/// `sample_from` with a guidance per image (None: `spec.guidance` for all), for batches that
/// gather independent requests (`serve`).
pub fn sample_images(
    cfg: &FluxConfig,
    spec: &SampleSpec,
    noise: Option<&[Vec<f32>]>,
    guidance: Option<&[f32]>,
    forward: &mut dyn FnMut(&FluxInputs) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    if !spec.h.is_multiple_of(2) || !spec.w.is_multiple_of(2) || spec.h == 0 || spec.w == 0 {
        bail!("latent size {}×{} must be even and non-zero (image size a multiple of 16)", spec.h, spec.w);
    }
    if spec.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let b = spec.txt.len();
    if let Some(g) = guidance.filter(|g| g.len() != b) {
        bail!("{} guidance values given for {b} images", g.len());
    }
    let c = cfg.in_channels / 4;
    let n_img = (spec.h / 2) * (spec.w / 2);
    let drawn;
    let start: &[Vec<f32>] = match noise {
        Some(z) => {
            if z.len() != b || z.iter().any(|z| z.len() != c * spec.h * spec.w) {
                bail!(
                    "initial noise for {} images of [{c}, {}, {}] expected, {} latents of {:?} values given",
                    b,
                    spec.h,
                    spec.w,
                    z.len(),
                    z.iter().map(|z| z.len()).collect::<Vec<_>>()
                );
            }
            z
        }
        None => {
            drawn = self::noise(b, c, spec.h, spec.w, spec.seed);
            &drawn
        }
    };
    let mut x: Vec<f32> = start.iter().flat_map(|z| pack_latent(z, c, spec.h, spec.w)).collect();
    let ids = img_ids(spec.h, spec.w);
    let ts = flux_schedule(spec.steps, n_img, cfg.guidance_embed);
    let mut inp = FluxInputs {
        b,
        n_img,
        n_txt: spec.n_txt,
        img: Vec::new(),
        img_ids: (0..b).flat_map(|_| ids.iter().copied()).collect(),
        txt: spec.txt.concat(),
        txt_ids: vec![0.0; b * spec.n_txt * 3],
        y: spec.y.concat(),
        timesteps: vec![0.0; b],
        guidance: cfg.guidance_embed.then(|| guidance.map_or_else(|| vec![spec.guidance; b], <[f32]>::to_vec)),
    };
    for win in ts.windows(2) {
        inp.img = x.clone();
        inp.timesteps = vec![win[0]; b];
        let v = forward(&inp)?;
        let dt = win[1] - win[0];
        x.iter_mut().zip(&v).for_each(|(xi, vi)| *xi += dt * vi);
    }
    if x.iter().any(|v| !v.is_finite()) {
        bail!("sampling diverged (non-finite latents)");
    }
    let per = n_img * cfg.in_channels;
    Ok((0..b).map(|i| unpack_latent(&x[i * per..(i + 1) * per], c, spec.h, spec.w)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_reference_grid() {
        // docs/flux-model.md §5.2: 1024² (4096 tokens), 4 steps.
        let ts = flux_schedule(4, 4096, true);
        let want = [1.0, 0.9045, 0.7595, 0.5128, 0.0];
        for (a, b) in ts.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{ts:?}");
        }
        assert!((flux_mu(1024) - 0.63).abs() < 1e-3);
        assert_eq!(flux_schedule(2, 4096, false), vec![1.0, 0.5, 0.0]);
    }
}
