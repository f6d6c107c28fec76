//! adaLN modulation: (1 + scale) ⊙ x + shift, and the gated residual x + gate ⊙ f, with the
//! per-sample vectors broadcast over tokens.

/// out[b, l, :] = (1 + scale[b, :]) ⊙ inp[b, l, :] + shift[b, :]
pub fn modulate_forward(out: &mut [f32], inp: &[f32], shift: &[f32], scale: &[f32], b: usize, l: usize, c: usize) {
    assert_eq!(inp.len(), b * l * c);
    assert_eq!(shift.len(), b * c);
    assert_eq!(scale.len(), b * c);
    for bi in 0..b {
        let (sh, sc) = (&shift[bi * c..(bi + 1) * c], &scale[bi * c..(bi + 1) * c]);
        for t in 0..l {
            let at = (bi * l + t) * c;
            for j in 0..c {
                out[at + j] = (1.0 + sc[j]) * inp[at + j] + sh[j];
            }
        }
    }
}

/// Backward of `modulate_forward`: dinp = (1 + scale)⊙dout, dshift = Σ_l dout,
/// dscale = Σ_l inp⊙dout. Overwrites all three.
pub fn modulate_backward(
    dinp: &mut [f32],
    dshift: &mut [f32],
    dscale: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    scale: &[f32],
    b: usize,
    l: usize,
    c: usize,
) {
    assert_eq!(dout.len(), b * l * c);
    dshift.fill(0.0);
    dscale.fill(0.0);
    for bi in 0..b {
        let sc = &scale[bi * c..(bi + 1) * c];
        for t in 0..l {
            let at = (bi * l + t) * c;
            for j in 0..c {
                let g = dout[at + j];
                dinp[at + j] = (1.0 + sc[j]) * g;
                dshift[bi * c + j] += g;
                dscale[bi * c + j] += inp[at + j] * g;
            }
        }
    }
}

/// Backward of `gated_residual_forward` (x's own gradient passes through unchanged):
/// dbranch = gate⊙dx, dgate = Σ_l branch⊙dx. Overwrites both.
pub fn gated_residual_backward(
    dbranch: &mut [f32],
    dgate: &mut [f32],
    dx: &[f32],
    branch: &[f32],
    gate: &[f32],
    b: usize,
    l: usize,
    c: usize,
) {
    assert_eq!(dx.len(), b * l * c);
    dgate.fill(0.0);
    for bi in 0..b {
        let g = &gate[bi * c..(bi + 1) * c];
        for t in 0..l {
            let at = (bi * l + t) * c;
            for j in 0..c {
                dbranch[at + j] = g[j] * dx[at + j];
                dgate[bi * c + j] += branch[at + j] * dx[at + j];
            }
        }
    }
}

/// x[b, l, :] += gate[b, :] ⊙ branch[b, l, :]
pub fn gated_residual_forward(x: &mut [f32], branch: &[f32], gate: &[f32], b: usize, l: usize, c: usize) {
    assert_eq!(x.len(), b * l * c);
    assert_eq!(branch.len(), b * l * c);
    assert_eq!(gate.len(), b * c);
    for bi in 0..b {
        let g = &gate[bi * c..(bi + 1) * c];
        for t in 0..l {
            let at = (bi * l + t) * c;
            for j in 0..c {
                x[at + j] += g[j] * branch[at + j];
            }
        }
    }
}

/// Splits a modulation output [b, n·c] into its n chunks, each [b, c] (shift, scale, gate …).
pub fn split_chunks(mods: &[f32], b: usize, n: usize, c: usize) -> Vec<Vec<f32>> {
    assert_eq!(mods.len(), b * n * c);
    (0..n)
        .map(|j| (0..b).flat_map(|bi| mods[bi * n * c + j * c..bi * n * c + (j + 1) * c].iter().copied()).collect())
        .collect()
}

/// Backward of `split_chunks`: the chunk gradients [n][b, c] joined back into [b, n·c].
pub fn join_chunks(chunks: &[Vec<f32>], b: usize, c: usize) -> Vec<f32> {
    let n = chunks.len();
    let mut out = vec![0f32; b * n * c];
    for (j, ch) in chunks.iter().enumerate() {
        assert_eq!(ch.len(), b * c);
        for bi in 0..b {
            out[bi * n * c + j * c..bi * n * c + (j + 1) * c].copy_from_slice(&ch[bi * c..(bi + 1) * c]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, Rng};

    #[test]
    fn modulate_and_gate_backwards_match_finite_differences() {
        let (b, l, c) = (2, 3, 4);
        let mut rng = Rng::new(41);
        let x = rng.normal_vec(b * l * c, 1.0);
        let sh = rng.normal_vec(b * c, 1.0);
        let sc = rng.normal_vec(b * c, 0.5);
        let dy = rng.normal_vec(b * l * c, 1.0);
        let modf = |x: &[f32], sh: &[f32], sc: &[f32]| {
            let mut o = vec![0.0; b * l * c];
            modulate_forward(&mut o, x, sh, sc, b, l, c);
            o
        };
        let (mut dx, mut dsh, mut dsc) = (vec![0.0; b * l * c], vec![0.0; b * c], vec![0.0; b * c]);
        modulate_backward(&mut dx, &mut dsh, &mut dsc, &dy, &x, &sc, b, l, c);
        fd_check(&x, &dx, &dy, |v| modf(v, &sh, &sc), 1e-3);
        fd_check(&sh, &dsh, &dy, |v| modf(&x, v, &sc), 1e-3);
        fd_check(&sc, &dsc, &dy, |v| modf(&x, &sh, v), 1e-3);

        let f = rng.normal_vec(b * l * c, 1.0);
        let g = rng.normal_vec(b * c, 1.0);
        let gate = |f: &[f32], g: &[f32]| {
            let mut o = x.clone();
            gated_residual_forward(&mut o, f, g, b, l, c);
            o
        };
        let (mut df, mut dg) = (vec![0.0; b * l * c], vec![0.0; b * c]);
        gated_residual_backward(&mut df, &mut dg, &dy, &f, &g, b, l, c);
        fd_check(&f, &df, &dy, |v| gate(v, &g), 1e-3);
        fd_check(&g, &dg, &dy, |v| gate(&f, v), 1e-3);
        let chunks = split_chunks(&join_chunks(&[sh.clone(), sc.clone()], b, c), b, 2, c);
        assert_eq!(chunks, vec![sh, sc]);
    }
}
