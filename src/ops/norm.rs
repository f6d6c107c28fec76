//! LayerNorm without affine (every LN in FLUX) and the per-head RMSNorm of q and k.

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

/// In place over rows of width d: x ← x · rsqrt(mean(x²) + eps) ⊙ weight. Saves rstd per row.
pub fn rmsnorm_forward(
    x: &mut [f32],
    rstd: &mut [f32],
    weight: &[f32],
    rows: usize,
    d: usize,
    eps: f32,
) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
