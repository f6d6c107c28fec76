//! Rectified-flow objective: x_t = (1 − σ)·x0 + σ·ε, target ε − x0, with σ drawn as the
//! trainers draw it and optional loss weighting (docs/flux-model.md §6).

use crate::sample::sampler::{flux_mu, time_shift};
use crate::train::config::TrainConfig;
use crate::util::Rng;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// One σ in (0, 1) for a sample with `n_img_tokens` image tokens.
pub fn sample_sigma(tc: &TrainConfig, n_img_tokens: usize, rng: &mut Rng) -> f32 {
    let s = match tc.timestep_sampling.as_str() {
        "uniform" => rng.uniform(),
        "logit_normal" => sigmoid(tc.logit_mean + tc.logit_std * rng.normal() as f64),
        "sigmoid" => sigmoid(tc.sigmoid_scale * rng.normal() as f64),
        "flux_shift" => time_shift(flux_mu(n_img_tokens), sigmoid(tc.sigmoid_scale * rng.normal() as f64)),
        "shift" => {
            let u = sigmoid(tc.sigmoid_scale * rng.normal() as f64);
            u * tc.shift / (1.0 + (tc.shift - 1.0) * u)
        }
        other => unreachable!("validated: {other}"),
    };
    // σ = 0 gives a target the model never needs; keep it strictly inside (0, 1].
    s.clamp(1e-4, 1.0) as f32
}

/// Loss weight w(σ): none → 1, sigma_sqrt → σ⁻², cosmap → 2 / (π(1 − 2σ + 2σ²)).
pub fn loss_weight(scheme: &str, sigma: f32) -> f32 {
    let s = sigma as f64;
    (match scheme {
        "sigma_sqrt" => 1.0 / (s * s),
        "cosmap" => 2.0 / (std::f64::consts::PI * (1.0 - 2.0 * s + 2.0 * s * s)),
        _ => 1.0,
    }) as f32
}

/// Noisy input and velocity target for one packed sample: (x_t, ε − x0).
pub fn noisy_pair(x0: &[f32], noise: &[f32], sigma: f32) -> (Vec<f32>, Vec<f32>) {
    let xt = x0.iter().zip(noise).map(|(&x, &e)| (1.0 - sigma) * x + sigma * e).collect();
    let tgt = x0.iter().zip(noise).map(|(&x, &e)| e - x).collect();
    (xt, tgt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_modes_stay_in_range_and_shift_moves_mass_up() {
        let mut tc = TrainConfig::default();
        let mut mean = |mode: &str| {
            tc.timestep_sampling = mode.into();
            let mut rng = Rng::new(3);
            let v: Vec<f32> = (0..4000).map(|_| sample_sigma(&tc, 4096, &mut rng)).collect();
            assert!(v.iter().all(|&s| s > 0.0 && s <= 1.0), "{mode}");
            v.iter().sum::<f32>() / v.len() as f32
        };
        assert!((mean("uniform") - 0.5).abs() < 0.02);
        assert!((mean("sigmoid") - 0.5).abs() < 0.02);
        assert!(mean("shift") > 0.6 && mean("flux_shift") > 0.6);
        assert!((loss_weight("cosmap", 0.5) - 2.0 / std::f32::consts::PI * 2.0).abs() < 1e-5);
        assert_eq!(loss_weight("sigma_sqrt", 0.5), 4.0);
        let (xt, t) = noisy_pair(&[1.0], &[3.0], 0.25);
        assert_eq!((xt[0], t[0]), (1.5, 2.0));
    }
}
