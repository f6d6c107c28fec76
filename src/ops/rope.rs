//! Three-axis rotary position embedding with interleaved pairs (BFL `EmbedND`, `apply_rope`).

/// cos/sin tables [rows, d/2] for position ids [rows, 3]: pair j of axis a (with width d_a)
/// turns by p_a · theta^(−2j/d_a). Pairs are laid out axis by axis (8 + 28 + 28 for FLUX.1).
pub fn rope_tables(cos: &mut [f32], sin: &mut [f32], ids: &[f32], axes: &[usize], theta: f64) {
    let half: usize = axes.iter().sum::<usize>() / 2;
    let rows = ids.len() / axes.len();
    assert_eq!(cos.len(), rows * half);
    assert_eq!(sin.len(), rows * half);
    for r in 0..rows {
        let mut j0 = 0;
        for (a, &d) in axes.iter().enumerate() {
            let p = ids[r * axes.len() + a] as f64;
            for j in 0..d / 2 {
                // f64 frequencies, as diffusers computes them.
                let omega = theta.powf(-((2 * j) as f64) / d as f64);
                let ang = p * omega;
                cos[r * half + j0 + j] = ang.cos() as f32;
                sin[r * half + j0 + j] = ang.sin() as f32;
            }
            j0 += d / 2;
        }
    }
}

/// Turns every pair (x₂ᵢ, x₂ᵢ₊₁) of x [b, h, l, d] by `sign`·θ in place, tables [b, l, d/2].
fn rotate_pairs(x: &mut [f32], cos: &[f32], sin: &[f32], sign: f32, b: usize, h: usize, l: usize, d: usize) {
    assert_eq!(x.len(), b * h * l * d);
    assert_eq!(cos.len(), b * l * d / 2);
    for bi in 0..b {
        for hi in 0..h {
            for t in 0..l {
                let row = &mut x[((bi * h + hi) * l + t) * d..][..d];
                let tab = (bi * l + t) * (d / 2);
                for i in 0..d / 2 {
                    let (c, s) = (cos[tab + i], sign * sin[tab + i]);
                    let (x0, x1) = (row[2 * i], row[2 * i + 1]);
                    row[2 * i] = c * x0 - s * x1;
                    row[2 * i + 1] = s * x0 + c * x1;
                }
            }
        }
    }
}

/// (x₂ᵢ, x₂ᵢ₊₁) ← (c·x₂ᵢ − s·x₂ᵢ₊₁, s·x₂ᵢ + c·x₂ᵢ₊₁), in place.
pub fn rope_forward(x: &mut [f32], cos: &[f32], sin: &[f32], b: usize, h: usize, l: usize, d: usize) {
    rotate_pairs(x, cos, sin, 1.0, b, h, l, d);
}

/// Backward of `rope_forward`: the transpose of a rotation is the rotation by −θ. In place on
/// the gradient.
pub fn rope_backward(dx: &mut [f32], cos: &[f32], sin: &[f32], b: usize, h: usize, l: usize, d: usize) {
    rotate_pairs(dx, cos, sin, -1.0, b, h, l, d);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, Rng};

    #[test]
    fn backward_matches_finite_differences() {
        let (b, h, l, d) = (1, 2, 3, 6);
        let mut rng = Rng::new(51);
        let ids: Vec<f32> = (0..l * 3).map(|i| (i % 5) as f32).collect();
        let (mut c, mut s) = (vec![0.0; l * d / 2], vec![0.0; l * d / 2]);
        rope_tables(&mut c, &mut s, &ids, &[2, 2, 2], 10_000.0);
        let x = rng.normal_vec(b * h * l * d, 1.0);
        let dy = rng.normal_vec(b * h * l * d, 1.0);
        let mut dx = dy.clone();
        rope_backward(&mut dx, &c, &s, b, h, l, d);
        fd_check(
            &x,
            &dx,
            &dy,
            |v| {
                let mut y = v.to_vec();
                rope_forward(&mut y, &c, &s, b, h, l, d);
                y
            },
            1e-3,
        );
    }

    #[test]
    fn zero_position_is_identity_and_rotation_preserves_norm() {
        let axes = [2, 2, 2];
        let ids = [0.0, 0.0, 0.0, 1.0, 2.0, 3.0];
        let (mut c, mut s) = (vec![0.0; 6], vec![0.0; 6]);
        rope_tables(&mut c, &mut s, &ids, &axes, 10_000.0);
        assert_eq!(&c[..3], &[1.0, 1.0, 1.0]);
        assert_eq!(&s[..3], &[0.0, 0.0, 0.0]);
        // Axis 1 at position 2, j = 0: angle 2.
        assert!((c[4] - 2f32.cos()).abs() < 1e-7);
        let mut x: Vec<f32> = (0..24).map(|i| i as f32 - 5.0).collect();
        let before = x.clone();
        rope_forward(&mut x, &c, &s, 1, 2, 2, 6);
        assert_eq!(&x[..6], &before[..6]);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x[6..12]) - n(&before[6..12])).abs() < 1e-4);
        // Token 1, axis 0 (p = 1, j = 0): angle 1.
        let (c1, s1) = (1f32.cos(), 1f32.sin());
        assert!((x[6] - (c1 * before[6] - s1 * before[7])).abs() < 1e-5);
        assert!((x[7] - (s1 * before[6] + c1 * before[7])).abs() < 1e-5);
        assert_eq!(&x[12..18], &before[12..18], "head 1, token 0 is identity too");
    }
}
