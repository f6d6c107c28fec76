//! AdamW over all LoRA tensors (f32), global grad-norm clipping, and the LR schedule.

use rayon::prelude::*;

/// Decoupled-weight-decay Adam (Loshchilov & Hutter), as torch.optim.AdamW computes it.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// First and second moments, one pair per parameter tensor.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Updates taken so far.
    pub t: u64,
}

impl AdamW {
    pub fn new(sizes: &[usize], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> AdamW {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            t: 0,
        }
    }

    /// One step over every tensor: p ← p − lr·wd·p, then p ← p − lr·m̂/(√v̂ + eps).
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[&[f32]], lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let (b1, b2, wd, eps) = (self.beta1, self.beta2, self.weight_decay, self.eps);
        // Element by element, so splitting over the cores changes no bit (resume stays exact).
        const CHUNK: usize = 1 << 14;
        let state = self.m.par_iter_mut().zip(self.v.par_iter_mut());
        params.par_iter_mut().zip(grads.par_iter()).zip(state).for_each(|((p, g), (m, v))| {
            let state = m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK));
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(state).for_each(|((p, g), (m, v))| {
                for j in 0..p.len() {
                    let gj = g[j] as f64;
                    let mj = b1 * m[j] as f64 + (1.0 - b1) * gj;
                    let vj = b2 * v[j] as f64 + (1.0 - b2) * gj * gj;
                    m[j] = mj as f32;
                    v[j] = vj as f32;
                    let mut pj = p[j] as f64 * (1.0 - lr * wd);
                    pj -= lr * (mj / bc1) / ((vj / bc2).sqrt() + eps);
                    p[j] = pj as f32;
                }
            });
        });
    }
}

/// Global L2 norm of all gradients; scales them down to `max_norm` when above it (0: off).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().for_each(|g| g.iter_mut().for_each(|x| *x *= s));
    }
    norm
}

/// Learning rate at step `step` (0-based): linear warm-up, then constant or cosine to 0.
pub fn lr_at(schedule: &str, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        "cosine" => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let p = ((step - warmup) as f64 / span).min(1.0);
            base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr_and_decays() {
        let mut opt = AdamW::new(&[2], 0.9, 0.999, 1e-8, 0.1);
        let mut p = vec![1.0f32, -2.0];
        opt.step(&mut [&mut p], &[&[0.5, -3.0]], 0.01);
        // First Adam step is lr·sign(g) (bias-corrected), after decay p·(1 − lr·wd).
        assert!((p[0] - (1.0 * 0.999 - 0.01)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.0 * 0.999 + 0.01)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn clipping_and_schedule() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut [&mut g], 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-5);
        assert_eq!(lr_at("constant", 1.0, 0, 4, 10), 0.25);
        assert_eq!(lr_at("cosine", 1.0, 4, 4, 10), 1.0);
        assert!(lr_at("cosine", 1.0, 9, 4, 10) < 0.1);
    }
}
