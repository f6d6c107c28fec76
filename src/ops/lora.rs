//! The LoRA linear: the frozen base projection plus any number of unmerged low-rank terms,
//! each on a slice of the output (q, k or v of a fused qkv; the MLP part of linear1).

use super::matmul::{gemm, gemm_par_cols, gemm_par_rows, linear_backward_input, linear_forward};
use crate::util::{splitmix64, unit24};
use std::ops::Range;

/// LoRA dropout on the adapter's input (PEFT's `lora_dropout`): element i of the input is kept
/// with probability 1 − p and scaled by 1/(1 − p). The mask is a hash of (seed, i), so the
/// backward pass recomputes exactly the forward's mask without storing it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub fn factor(&self, i: usize) -> f32 {
        let u = unit24(splitmix64(self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        if u < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        x.iter().enumerate().map(|(i, &v)| v * self.factor(i)).collect()
    }
}

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
    pub dropout: Option<Dropout>,
}

/// The adapter's view of the input: dropped out when training with dropout.
fn lora_input<'a>(t: &LoraTerm, inp: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
    match t.dropout {
        Some(d) if d.p > 0.0 => std::borrow::Cow::Owned(d.apply(inp)),
        _ => std::borrow::Cow::Borrowed(inp),
    }
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
    lora_terms_forward(out, inp, terms, m, k, n);
}

/// out[m, n] += Σ scale·(inp·Aᵀ)·Bᵀ on each term's rows: the adapters alone, for a base
/// projection computed elsewhere (an 8-bit weight's dequantising matmul).
pub fn lora_terms_forward(out: &mut [f32], inp: &[f32], terms: &[LoraTerm], m: usize, k: usize, n: usize) {
    for t in terms {
        assert!(t.rows.end <= n, "lora: rows {:?} past the output width {n}", t.rows);
        assert_eq!(t.a.len(), t.rank * k, "lora: A");
        assert_eq!(t.b.len(), t.rows.len() * t.rank, "lora: B");
        let mut s = vec![0f32; m * t.rank];
        linear_forward(&mut s, &lora_input(t, inp), t.a, None, m, k, t.rank);
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

/// Gradient accumulators of one term: dA [rank, d_in], dB [rows, rank].
#[derive(Clone, Debug, Default)]
pub struct TermGrad {
    pub da: Vec<f32>,
    pub db: Vec<f32>,
}

/// Backward of `lora_linear_forward` through the frozen base: with x̃ the (dropped-out) input,
/// S = x̃·Aᵀ and G = dY[:, rows]·B,
///   dB += s·dY[:, rows]ᵀ·S,  dA += s·Gᵀ·x̃,  dX = dY·W + Σ s·(G·A)⊙mask.
/// dA and dB accumulate (gradient accumulation across micro-batches); dX is overwritten and
/// skipped when None (the input needs no gradient). No base-weight gradient exists.
pub fn lora_linear_backward(
    dinp: Option<&mut [f32]>,
    grads: &mut [TermGrad],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) {
    let mut dinp = dinp;
    if let Some(dx) = dinp.as_deref_mut() {
        linear_backward_input(dx, dout, weight, m, k, n, 0.0);
    }
    lora_terms_backward(dinp, grads, dout, inp, terms, m, k, n);
}

/// The adapters' part of `lora_linear_backward`: dA and dB accumulate, and the input gradient
/// through the adapters is added to `dinp`, which already holds dY·W.
pub fn lora_terms_backward(
    dinp: Option<&mut [f32]>,
    grads: &mut [TermGrad],
    dout: &[f32],
    inp: &[f32],
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(grads.len(), terms.len());
    let mut dinp = dinp;
    for (t, g) in terms.iter().zip(grads.iter_mut()) {
        let (r, nr) = (t.rank, t.rows.len());
        g.da.resize(r * k, 0.0);
        g.db.resize(nr * r, 0.0);
        let x = lora_input(t, inp);
        let mut s = vec![0f32; m * r];
        linear_forward(&mut s, &x, t.a, None, m, k, r);
        let dy = &dout[t.rows.start..];
        // Every product split over the cores: serial, these thin products were a fifth of a
        // small model's LoRA gradient on 2 cores (issue 23).
        let mut gm = vec![0f32; m * r];
        gemm_par_rows(m, nr, r, 1.0, dy, (n, 1), t.b, (r, 1), 0.0, &mut gm);
        gemm_par_rows(nr, m, r, t.scale, dy, (1, n), &s, (r, 1), 1.0, &mut g.db);
        gemm_par_cols(r, m, k, t.scale, &gm, (1, r), &x, (k, 1), 1.0, &mut g.da);
        if let Some(dx) = dinp.as_deref_mut() {
            match t.dropout {
                Some(d) if d.p > 0.0 => {
                    let mut dxl = vec![0f32; m * k];
                    gemm_par_rows(m, r, k, t.scale, &gm, (r, 1), t.a, (k, 1), 0.0, &mut dxl);
                    dx.iter_mut().zip(&dxl).enumerate().for_each(|(i, (o, &v))| *o += v * d.factor(i))
                }
                _ => gemm_par_rows(m, r, k, t.scale, &gm, (r, 1), t.a, (k, 1), 1.0, dx),
            }
        }
    }
}

/// out[m, n] += scale · inp[m, k]·ΔWᵀ on `rows`, for an update ΔW [rows.len(), k] built whole
/// (LyCORIS's LoKr and LoHa: a Kronecker or Hadamard product has no thin factorisation to
/// multiply through). Costs what the frozen product of those rows costs.
pub fn delta_forward(
    out: &mut [f32],
    inp: &[f32],
    delta: &[f32],
    scale: f32,
    rows: Range<usize>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(rows.end <= n, "delta: rows {rows:?} past the output width {n}");
    assert_eq!(delta.len(), rows.len() * k, "delta: ΔW");
    assert_eq!((inp.len(), out.len()), (m * k, m * n), "delta: inp, out");
    if m == 0 || rows.is_empty() {
        return;
    }
    gemm(m, k, rows.len(), scale, inp, (k, 1), delta, (1, k), 1.0, &mut out[rows.start..], (n, 1));
}

/// Backward of `delta_forward`: ddelta [rows.len(), k] += scale · dY[:, rows]ᵀ·inp, and the input
/// gradient scale · dY[:, rows]·ΔW is added to `dinp` when given.
pub fn delta_backward(
    dinp: Option<&mut [f32]>,
    ddelta: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    delta: &[f32],
    scale: f32,
    rows: Range<usize>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(rows.end <= n, "delta: rows {rows:?} past the output width {n}");
    assert_eq!((delta.len(), ddelta.len()), (rows.len() * k, rows.len() * k), "delta: ΔW, dΔW");
    assert_eq!((inp.len(), dout.len()), (m * k, m * n), "delta: inp, dout");
    if m == 0 || rows.is_empty() {
        return;
    }
    let dy = &dout[rows.start..];
    gemm(rows.len(), m, k, scale, dy, (1, n), inp, (k, 1), 1.0, ddelta, (k, 1));
    if let Some(dx) = dinp {
        assert_eq!(dx.len(), m * k, "delta: dinp");
        gemm(m, rows.len(), k, scale, dy, (n, 1), delta, (k, 1), 1.0, dx, (k, 1));
    }
}

/// A·B for A [p, r] and B [r, q] (a LyCORIS factor stored as two low-rank halves).
pub fn low_rank_product(a: &[f32], b: &[f32], p: usize, r: usize, q: usize) -> Vec<f32> {
    assert_eq!((a.len(), b.len()), (p * r, r * q), "low-rank product: A, B");
    let mut w = vec![0f32; p * q];
    gemm(p, r, q, 1.0, a, (r, 1), b, (q, 1), 0.0, &mut w, (q, 1));
    w
}

/// Backward of `low_rank_product` from dW [p, q]: dA += dW·Bᵀ, dB += Aᵀ·dW.
pub fn low_rank_product_backward(
    da: &mut [f32],
    db: &mut [f32],
    dw: &[f32],
    a: &[f32],
    b: &[f32],
    p: usize,
    r: usize,
    q: usize,
) {
    assert_eq!((da.len(), db.len(), dw.len()), (p * r, r * q, p * q), "low-rank product backward");
    gemm(p, q, r, 1.0, dw, (q, 1), b, (1, q), 1.0, da, (r, 1));
    gemm(r, p, q, 1.0, a, (1, r), dw, (q, 1), 1.0, db, (q, 1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, rel_l2, Rng};

    #[test]
    fn delta_and_low_rank_backward_match_finite_differences() {
        let (m, k, n, r) = (4, 5, 7, 2);
        let rows = 2..6;
        let mut rng = Rng::new(17);
        let x = rng.normal_vec(m * k, 1.0);
        let (a, b) = (rng.normal_vec(rows.len() * r, 0.5), rng.normal_vec(r * k, 0.5));
        let run = |x: &[f32], a: &[f32], b: &[f32]| {
            let mut out = vec![0.0; m * n];
            delta_forward(&mut out, x, &low_rank_product(a, b, rows.len(), r, k), -0.8, rows.clone(), m, k, n);
            out
        };
        let dy = rng.normal_vec(m * n, 1.0);
        let delta = low_rank_product(&a, &b, rows.len(), r, k);
        let (mut ddelta, mut dx) = (vec![0f32; rows.len() * k], vec![0f32; m * k]);
        delta_backward(Some(&mut dx), &mut ddelta, &dy, &x, &delta, -0.8, rows.clone(), m, k, n);
        let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; b.len()]);
        low_rank_product_backward(&mut da, &mut db, &ddelta, &a, &b, rows.len(), r, k);
        fd_check(&x, &dx, &dy, |v| run(v, &a, &b), 1e-3);
        fd_check(&a, &da, &dy, |v| run(&x, v, &b), 1e-3);
        fd_check(&b, &db, &dy, |v| run(&x, &a, v), 1e-3);
        // Rows outside the slice are untouched.
        let out = run(&x, &a, &b);
        assert!((0..m).all(|i| out[i * n..i * n + 2].iter().chain(&out[i * n + 6..(i + 1) * n]).all(|&v| v == 0.0)));
    }

    #[test]
    fn backward_matches_finite_differences_with_dropout_and_slices() {
        let (m, k, n) = (5, 6, 9);
        let mut rng = Rng::new(71);
        let x = rng.normal_vec(m * k, 1.0);
        let w = rng.normal_vec(n * k, 0.5);
        let a = [rng.normal_vec(2 * k, 0.5), rng.normal_vec(3 * k, 0.5)];
        let bm = [rng.normal_vec(4 * 2, 0.5), rng.normal_vec(5 * 3, 0.5)];
        let drop = Some(Dropout { p: 0.3, seed: 99 });
        let mk = |a0: &[f32], b0: &[f32]| -> Vec<f32> {
            let terms = [
                LoraTerm { a: a0, b: b0, rank: 2, scale: 0.7, rows: 0..4, dropout: drop },
                LoraTerm { a: &a[1], b: &bm[1], rank: 3, scale: -1.3, rows: 4..9, dropout: None },
            ];
            let mut out = vec![0.0; m * n];
            lora_linear_forward(&mut out, &x, &w, None, &terms, m, k, n);
            out
        };
        let terms = [
            LoraTerm { a: &a[0], b: &bm[0], rank: 2, scale: 0.7, rows: 0..4, dropout: drop },
            LoraTerm { a: &a[1], b: &bm[1], rank: 3, scale: -1.3, rows: 4..9, dropout: None },
        ];
        let dy = rng.normal_vec(m * n, 1.0);
        let mut grads = vec![TermGrad::default(), TermGrad::default()];
        let mut dx = vec![f32::NAN; m * k];
        lora_linear_backward(Some(&mut dx), &mut grads, &dy, &x, &w, &terms, m, k, n);
        fd_check(&a[0], &grads[0].da, &dy, |v| mk(v, &bm[0]), 1e-3);
        fd_check(&bm[0], &grads[0].db, &dy, |v| mk(&a[0], v), 1e-3);
        let fx = |xv: &[f32]| {
            let mut out = vec![0.0; m * n];
            lora_linear_forward(&mut out, xv, &w, None, &terms, m, k, n);
            out
        };
        fd_check(&x, &dx, &dy, fx, 1e-3);
        assert!(grads[1].da.iter().any(|&v| v != 0.0));
    }

    /// The unmerged terms equal the merged weight W + Σ s·B·A on each slice.
    #[test]
    fn unmerged_equals_merged() {
        let (m, k, n) = (37, 16, 24);
        let mut rng = Rng::new(3);
        let x = rng.normal_vec(m * k, 1.0);
        let w = rng.normal_vec(n * k, 0.3);
        let bias = rng.normal_vec(n, 0.1);
        let specs = [(4usize, 0..8usize, 0.5f32), (2, 8..24, -1.25), (3, 0..24, 2.0)];
        let ab: Vec<(Vec<f32>, Vec<f32>)> = specs
            .iter()
            .map(|(r, rows, _)| (rng.normal_vec(r * k, 0.5), rng.normal_vec(rows.len() * r, 0.5)))
            .collect();
        let terms: Vec<LoraTerm> = specs
            .iter()
            .zip(&ab)
            .map(|((r, rows, s), (a, b))| LoraTerm { a, b, rank: *r, scale: *s, rows: rows.clone(), dropout: None })
            .collect();
        let mut out = vec![f32::NAN; m * n];
        lora_linear_forward(&mut out, &x, &w, Some(&bias), &terms, m, k, n);
        let mut merged = w.clone();
        for t in &terms {
            for (i, row) in t.rows.clone().enumerate() {
                for c in 0..k {
                    merged[row * k + c] +=
                        t.scale * (0..t.rank).map(|j| t.b[i * t.rank + j] * t.a[j * k + c]).sum::<f32>();
                }
            }
        }
        let mut want = vec![0f32; m * n];
        linear_forward(&mut want, &x, &merged, Some(&bias), m, k, n);
        assert!(rel_l2(&out, &want) < 1e-5, "{}", rel_l2(&out, &want));
    }
}
