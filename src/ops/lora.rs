//! The LoRA linear: the frozen base projection plus any number of unmerged low-rank terms,
//! each on a slice of the output (q, k or v of a fused qkv; the MLP part of linear1).

use super::matmul::{gemm, linear_forward};
use std::ops::Range;

/// One adapter on one linear: ΔY[:, rows] = scale · (X·Aᵀ)·Bᵀ.
#[derive(Clone, Debug)]
pub struct LoraTerm<'a> {
    /// A (lora_down) [rank, d_in]
    pub a: &'a [f32],
    /// B (lora_up) [rows.len(), rank]
    pub b: &'a [f32],
    pub rank: usize,
    /// alpha/rank (or alpha/√rank for rsLoRA) times the user's strength.
    pub scale: f32,
    pub rows: Range<usize>,
}

/// out[m, n] = inp[m, k]·W[n, k]ᵀ + bias + Σ scale·(inp·Aᵀ)·Bᵀ on each term's rows.
pub fn lora_linear_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) {
    linear_forward(out, inp, weight, bias, m, k, n);
    for t in terms {
        assert!(
            t.rows.end <= n,
            "lora: rows {:?} past the output width {n}",
            t.rows
        );
        assert_eq!(t.a.len(), t.rank * k, "lora: A");
        assert_eq!(t.b.len(), t.rows.len() * t.rank, "lora: B");
        let mut s = vec![0f32; m * t.rank];
        linear_forward(&mut s, inp, t.a, None, m, k, t.rank);
        gemm(
            m,
            t.rank,
            t.rows.len(),
            t.scale,
            &s,
            (t.rank, 1),
            t.b,
            (1, t.rank),
            1.0,
            &mut out[t.rows.start..],
            (n, 1),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{rel_l2, Rng};

    /// The unmerged terms equal the merged weight W + Σ s·B·A on each slice.
    #[test]
    fn unmerged_equals_merged() {
        let (m, k, n) = (37, 16, 24);
        let mut rng = Rng::new(3);
        let x = rng.normal_vec(m * k, 1.0);
        let w = rng.normal_vec(n * k, 0.3);
        let bias = rng.normal_vec(n, 0.1);
        let specs = [
            (4usize, 0..8usize, 0.5f32),
            (2, 8..24, -1.25),
            (3, 0..24, 2.0),
        ];
        let ab: Vec<(Vec<f32>, Vec<f32>)> = specs
            .iter()
            .map(|(r, rows, _)| {
                (
                    rng.normal_vec(r * k, 0.5),
                    rng.normal_vec(rows.len() * r, 0.5),
                )
            })
            .collect();
        let terms: Vec<LoraTerm> = specs
            .iter()
            .zip(&ab)
            .map(|((r, rows, s), (a, b))| LoraTerm {
                a,
                b,
                rank: *r,
                scale: *s,
                rows: rows.clone(),
            })
            .collect();
        let mut out = vec![f32::NAN; m * n];
        lora_linear_forward(&mut out, &x, &w, Some(&bias), &terms, m, k, n);
        let mut merged = w.clone();
        for t in &terms {
            for (i, row) in t.rows.clone().enumerate() {
                for c in 0..k {
                    merged[row * k + c] += t.scale
                        * (0..t.rank)
                            .map(|j| t.b[i * t.rank + j] * t.a[j * k + c])
                            .sum::<f32>();
                }
            }
        }
        let mut want = vec![0f32; m * n];
        linear_forward(&mut want, &x, &merged, Some(&bias), m, k, n);
        assert!(rel_l2(&out, &want) < 1e-5, "{}", rel_l2(&out, &want));
    }
}
