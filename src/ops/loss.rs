//! The training loss: mean squared error, optionally weighted per sample (flow-matching loss
//! weighting schemes), averaged over every element.

/// loss = Σ_b w_b · Σ_i (pred − target)² / numel, with w_b = 1 when `weight` is None.
pub fn mse_forward(pred: &[f32], target: &[f32], weight: Option<&[f32]>) -> f64 {
    assert_eq!(pred.len(), target.len());
    let per = pred.len() / weight.map_or(1, |w| w.len());
    pred.iter()
        .zip(target)
        .enumerate()
        .map(|(i, (&p, &t))| weight.map_or(1.0, |w| w[i / per] as f64) * (p as f64 - t as f64).powi(2))
        .sum::<f64>()
        / pred.len() as f64
}

/// d loss / d pred = 2·w_b·(pred − target) / numel. Overwrites dpred.
pub fn mse_backward(dpred: &mut [f32], pred: &[f32], target: &[f32], weight: Option<&[f32]>) {
    assert_eq!(dpred.len(), pred.len());
    let n = pred.len() as f32;
    let per = pred.len() / weight.map_or(1, |w| w.len());
    for (i, ((d, &p), &t)) in dpred.iter_mut().zip(pred).zip(target).enumerate() {
        *d = 2.0 * weight.map_or(1.0, |w| w[i / per]) * (p - t) / n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, Rng};

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(81);
        let p = rng.normal_vec(12, 1.0);
        let t = rng.normal_vec(12, 1.0);
        let w = [0.5f32, 2.0];
        let mut d = vec![0.0; 12];
        mse_backward(&mut d, &p, &t, Some(&w));
        // fd_check sums f(x)·dy; a single-output f with dy = [1] gives the plain derivative.
        fd_check(&p, &d, &[1.0], |x| vec![mse_forward(x, &t, Some(&w)) as f32], 1e-3);
        assert!((mse_forward(&[1.0, 3.0], &[0.0, 0.0], None) - 5.0).abs() < 1e-12);
    }
}
