//! adaLN modulation: (1 + scale) ⊙ x + shift, and the gated residual x + gate ⊙ f, with the
//! per-sample vectors broadcast over tokens.

/// out[b, l, :] = (1 + scale[b, :]) ⊙ inp[b, l, :] + shift[b, :]
pub fn modulate_forward(
    out: &mut [f32],
    inp: &[f32],
    shift: &[f32],
    scale: &[f32],
    b: usize,
    l: usize,
    c: usize,
) {
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

/// x[b, l, :] += gate[b, :] ⊙ branch[b, l, :]
pub fn gated_residual_forward(
    x: &mut [f32],
    branch: &[f32],
    gate: &[f32],
    b: usize,
    l: usize,
    c: usize,
) {
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
        .map(|j| {
            (0..b)
                .flat_map(|bi| {
                    mods[bi * n * c + j * c..bi * n * c + (j + 1) * c]
                        .iter()
                        .copied()
                })
                .collect()
        })
        .collect()
}
