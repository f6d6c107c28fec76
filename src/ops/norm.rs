//! LayerNorm without affine (every LN in FLUX), with affine (nn.LayerNorm of the CLIP and ViT
//! encoders), and the per-head RMSNorm of q and k.

/// out[r, :] = (inp[r, :] − mean) · rstd, over rows of width c. Saves mean and rstd per row
/// for the backward pass.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    rows: usize,
    c: usize,
    eps: f32,
) {
    assert_eq!(inp.len(), rows * c);
    assert_eq!(out.len(), rows * c);
    for r in 0..rows {
        let x = &inp[r * c..(r + 1) * c];
        // f64 accumulation: the mean of 3072 values in f32 loses digits the golden tests see.
        let mu = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for (o, &v) in out[r * c..(r + 1) * c].iter_mut().zip(x) {
            *o = ((v as f64 - mu) * rs) as f32;
        }
        mean[r] = mu as f32;
        rstd[r] = rs as f32;
    }
}

/// out[r, :] = LN(inp[r, :]) ⊙ weight + bias over rows of width c (nn.LayerNorm with affine), for
/// the encoders that only run forward (CLIP's text model, the ViT of the NSFW check).
pub fn layernorm_affine_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    rows: usize,
    c: usize,
    eps: f32,
) {
    assert_eq!(weight.len(), c, "layernorm: weight");
    assert_eq!(bias.len(), c, "layernorm: bias");
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    layernorm_forward(out, &mut mean, &mut rstd, inp, rows, c, eps);
    for row in out.chunks_mut(c) {
        for ((o, &w), &bb) in row.iter_mut().zip(weight).zip(bias) {
            *o = *o * w + bb;
        }
    }
}

/// In place over rows of width d: x ← x · rsqrt(mean(x²) + eps) ⊙ weight. Saves rstd per row.
pub fn rmsnorm_forward(x: &mut [f32], rstd: &mut [f32], weight: &[f32], rows: usize, d: usize, eps: f32) {
    assert_eq!(x.len(), rows * d);
    assert_eq!(weight.len(), d);
    for r in 0..rows {
        let row = &mut x[r * d..(r + 1) * d];
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let rs = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * rs * w;
        }
        rstd[r] = rs;
    }
}

/// Backward of `layernorm_forward` (no affine): dinp = rstd·(dout − mean(dout) − n·mean(dout⊙n))
/// with n the normalised output. Overwrites dinp.
pub fn layernorm_backward(dinp: &mut [f32], dout: &[f32], normed: &[f32], rstd: &[f32], rows: usize, c: usize) {
    assert_eq!(dinp.len(), rows * c);
    for r in 0..rows {
        let (dy, n) = (&dout[r * c..(r + 1) * c], &normed[r * c..(r + 1) * c]);
        let mean_dy = dy.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let mean_dyn = dy.iter().zip(n).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / c as f64;
        for ((o, &g), &nn) in dinp[r * c..(r + 1) * c].iter_mut().zip(dy).zip(n) {
            *o = (rstd[r] as f64 * (g as f64 - mean_dy - nn as f64 * mean_dyn)) as f32;
        }
    }
}

/// Backward of `rmsnorm_forward` with a frozen weight: with x̂ = x·rstd and g = dout⊙weight,
/// dinp = rstd·(g − x̂·mean(g⊙x̂)). `xhat` is x̂; the forward output x̂⊙weight would
/// not recoverable from it where a weight is 0, so the caller passes x̂ itself. Overwrites dinp.
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dout: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    weight: &[f32],
    rows: usize,
    d: usize,
) {
    assert_eq!(dinp.len(), rows * d);
    for r in 0..rows {
        let (dy, xh) = (&dout[r * d..(r + 1) * d], &xhat[r * d..(r + 1) * d]);
        let m = dy.iter().zip(weight).zip(xh).map(|((&g, &w), &x)| (g * w) as f64 * x as f64).sum::<f64>() / d as f64;
        for (((o, &g), &w), &x) in dinp[r * d..(r + 1) * d].iter_mut().zip(dy).zip(weight).zip(xh) {
            *o = (rstd[r] as f64 * ((g * w) as f64 - x as f64 * m)) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, Rng};

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (rows, c) = (3, 7);
        let mut rng = Rng::new(21);
        let x = rng.normal_vec(rows * c, 1.5);
        let dy = rng.normal_vec(rows * c, 1.0);
        let f = |x: &[f32]| {
            let (mut o, mut m, mut r) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward(&mut o, &mut m, &mut r, x, rows, c, 1e-6);
            o
        };
        let (mut n, mut m, mut r) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(&mut n, &mut m, &mut r, &x, rows, c, 1e-6);
        let mut dx = vec![f32::NAN; rows * c];
        layernorm_backward(&mut dx, &dy, &n, &r, rows, c);
        fd_check(&x, &dx, &dy, f, 1e-3);
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (rows, d) = (4, 6);
        let mut rng = Rng::new(22);
        let x = rng.normal_vec(rows * d, 1.0);
        let w = rng.normal_vec(d, 1.0);
        let dy = rng.normal_vec(rows * d, 1.0);
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            rmsnorm_forward(&mut y, &mut vec![0.0; rows], &w, rows, d, 1e-6);
            y
        };
        let mut rstd = vec![0.0; rows];
        let mut y = x.clone();
        rmsnorm_forward(&mut y, &mut rstd, &w, rows, d, 1e-6);
        let xhat: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v * rstd[i / d]).collect();
        let mut dx = vec![f32::NAN; rows * d];
        rmsnorm_backward(&mut dx, &dy, &xhat, &rstd, &w, rows, d);
        fd_check(&x, &dx, &dy, f, 1e-3);
    }

    #[test]
    fn layernorm_gives_zero_mean_unit_variance() {
        let x: Vec<f32> = (0..12).map(|i| (i * i) as f32 * 0.3 - 2.0).collect();
        let (mut o, mut m, mut r) = (vec![0.0; 12], vec![0.0; 2], vec![0.0; 2]);
        layernorm_forward(&mut o, &mut m, &mut r, &x, 2, 6, 1e-6);
        for row in o.chunks(6) {
            let mu: f32 = row.iter().sum::<f32>() / 6.0;
            let var: f32 = row.iter().map(|v| v * v).sum::<f32>() / 6.0;
            assert!(mu.abs() < 1e-6 && (var - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn rmsnorm_unit_rms_times_weight() {
        let mut x = vec![3.0f32, 4.0];
        let mut r = vec![0.0];
        rmsnorm_forward(&mut x, &mut r, &[1.0, 2.0], 1, 2, 0.0);
        let s = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / s).abs() < 1e-6 && (x[1] - 8.0 / s).abs() < 1e-6);
    }
}
