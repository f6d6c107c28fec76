//! The DoRA kind (PEFT `use_dora=True`, weight-decomposed LoRA) on the CPU: each output row of
//! the frozen weight W plus the LoRA update is rescaled to a trained magnitude m,
//!   Y[:, rows] = g ⊙ (X·Wᵀ + s·(X̃·Aᵀ)·Bᵀ) + b,   g = m / ‖W + s·B·A‖ (per output row),
//! added to the frozen product as the term (g − 1) ⊙ X·Wᵀ + g ⊙ s·(X̃·Aᵀ)·Bᵀ. As PEFT does
//! (`DoraLinearLayer.forward`, after the DoRA paper §4.3), the norm is a constant in the
//! backward: A and B get gradients only through the LoRA branch scaled by g, m through g.
//! The rescale uses the frozen product alone, so a DoRA term stacks additively with other terms on
//! the same linear (PEFT with several adapters rescales whatever earlier adapters added too).
//! X̃ is the dropped-out input of the LoRA branch; the frozen branch sees X.

use super::{lora, Term};
use crate::model::adapt::{Frozen, LinearCall, TermGrads};
use crate::ops::lora::{lora_terms_backward, Dropout, TermGrad};

/// ‖W[row] + s·(B·A)[i]‖ for each row `rows.start + i` of the term (W [n, k] row-major).
pub fn row_norms(t: &Term, weight: &[f32], k: usize) -> Vec<f32> {
    let (a, b, r) = (t.a(), t.b(), t.rank());
    t.rows
        .clone()
        .enumerate()
        .map(|(i, row)| {
            let w = &weight[row * k..(row + 1) * k];
            let sum: f64 = (0..k)
                .map(|j| {
                    let ba: f32 = (0..r).map(|q| b[i * r + q] * a[q * k + j]).sum();
                    let v = (w[j] + t.scale * ba) as f64;
                    v * v
                })
                .sum();
            sum.sqrt() as f32
        })
        .collect()
}

/// ‖W[row]‖ for every row of W [n, k]: the magnitude that leaves a row without an update as it is
/// (g = 1), the same value `row_norms` gives such a row.
pub fn frozen_row_norms(weight: &[f32], k: usize) -> Vec<f32> {
    weight.chunks(k).map(|w| w.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32).collect()
}

/// The frozen weight and product the model passes to modules with a DoRA term.
fn frozen<'a>(t: &Term, c: &LinearCall<'a>) -> Frozen<'a> {
    // The set asks for them (`needs_frozen`) on every module with a DoRA term: a missing one is a
    // bug in the caller, not bad input.
    c.frozen.unwrap_or_else(|| panic!("DoRA term on `{}` called without the frozen weight", t.module))
}

/// The LoRA branch alone, s·(X̃·Aᵀ)·Bᵀ, on the term's rows of a zeroed [m, n].
fn lora_branch(t: &Term, dropout: Option<Dropout>, c: LinearCall) -> Vec<f32> {
    let mut lo = vec![0f32; c.m * c.n];
    lora::forward(t, dropout, c, &mut lo);
    lo
}

/// out[m, n] += the term's output: (g − 1) ⊙ X·Wᵀ + g ⊙ s·(X̃·Aᵀ)·Bᵀ on its rows.
pub fn forward(t: &Term, dropout: Option<Dropout>, c: LinearCall, out: &mut [f32]) {
    let fz = frozen(t, &c);
    let g: Vec<f32> = row_norms(t, fz.weight, c.k).iter().zip(t.magnitude()).map(|(nrm, m)| m / nrm).collect();
    let lo = lora_branch(t, dropout, c);
    for mi in 0..c.m {
        for (i, row) in t.rows.clone().enumerate() {
            let at = mi * c.n + row;
            out[at] += (g[i] - 1.0) * fz.out[at] + g[i] * lo[at];
        }
    }
}

/// dA, dB and dm accumulate into `grads` (created zeroed on first use); the input gradient
/// through both branches is added to `dinp`.
pub fn backward(
    t: &Term,
    dropout: Option<Dropout>,
    c: LinearCall,
    dout: &[f32],
    dinp: Option<&mut [f32]>,
    grads: &mut TermGrads,
) {
    let fz = frozen(t, &c);
    let norms = row_norms(t, fz.weight, c.k);
    let g: Vec<f32> = norms.iter().zip(t.magnitude()).map(|(nrm, m)| m / nrm).collect();
    let lo = lora_branch(t, dropout, c);
    grads.resize(3, Vec::new());
    grads[2].resize(t.rows.len(), 0.0);
    // dm_i = Σ dY[:, row]·(X·Wᵀ + s·X̃·Aᵀ·Bᵀ)[:, row] / ‖·‖_i; the LoRA branch sees g ⊙ dY.
    let mut dscaled = vec![0f32; c.m * c.n];
    for mi in 0..c.m {
        for (i, row) in t.rows.clone().enumerate() {
            let at = mi * c.n + row;
            grads[2][i] += dout[at] * (fz.out[at] + lo[at]) / norms[i];
            dscaled[at] = g[i] * dout[at];
        }
    }
    let mut dinp = dinp;
    let mut tg = TermGrad { da: std::mem::take(&mut grads[0]), db: std::mem::take(&mut grads[1]) };
    let view = lora::view(t, dropout);
    lora_terms_backward(dinp.as_deref_mut(), std::slice::from_mut(&mut tg), &dscaled, c.inp, &[view], c.m, c.k, c.n);
    (grads[0], grads[1]) = (tg.da, tg.db);
    // The frozen branch: dX += (g − 1) ⊙ dY[:, rows] · W[rows].
    if let Some(dx) = dinp {
        for mi in 0..c.m {
            for (i, row) in t.rows.clone().enumerate() {
                let f = (g[i] - 1.0) * dout[mi * c.n + row];
                let w = &fz.weight[row * c.k..(row + 1) * c.k];
                dx[mi * c.k..(mi + 1) * c.k].iter_mut().zip(w).for_each(|(d, &wj)| *d += f * wj);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::adapt::Frozen;
    use crate::ops::matmul::linear_forward;
    use crate::util::{fd_check, Rng};

    /// The frozen product plus the term, for the finite differences.
    fn layer(t: &Term, w: &[f32], x: &[f32], m: usize, k: usize, n: usize, drop: Option<Dropout>) -> Vec<f32> {
        let mut base = vec![0f32; m * n];
        linear_forward(&mut base, x, w, None, m, k, n);
        let mut out = base.clone();
        let c = LinearCall { module: "m", inp: x, m, k, n, frozen: Some(Frozen { weight: w, out: &base }) };
        forward(t, drop, c, &mut out);
        out
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (m, k, n, r) = (3, 5, 7, 2);
        let rows = 2..6;
        let mut rng = Rng::new(5);
        let w = rng.normal_vec(n * k, 0.5);
        let x = rng.normal_vec(m * k, 1.0);
        let a = rng.normal_vec(r * k, 0.5);
        let b = rng.normal_vec(rows.len() * r, 0.5);
        let mag: Vec<f32> = (0..rows.len()).map(|_| 1.0 + rng.uniform() as f32).collect();
        let drop = Some(Dropout { p: 0.25, seed: 3 });
        let term = |a: &[f32], b: &[f32], mag: &[f32]| {
            let t = Term::lora("m", rows.clone(), k, r, 0.8, a.to_vec(), b.to_vec()).with_magnitude(mag.to_vec());
            assert!(t.sizes_ok());
            t
        };
        let t = term(&a, &b, &mag);
        let dy = rng.normal_vec(m * n, 1.0);
        let mut base = vec![0f32; m * n];
        linear_forward(&mut base, &x, &w, None, m, k, n);
        let c = LinearCall { module: "m", inp: &x, m, k, n, frozen: Some(Frozen { weight: &w, out: &base }) };
        let mut g = TermGrads::new();
        let mut dx = vec![0f32; m * k];
        crate::ops::matmul::linear_backward_input(&mut dx, &dy, &w, m, k, n, 0.0);
        backward(&t, drop, c, &dy, Some(&mut dx), &mut g);
        // The norm is a constant in the backward (PEFT detaches it): hold it at its value while
        // A and B move, by moving m with it so that g stays m / ‖·‖ at the point.
        let norms = row_norms(&t, &w, k);
        let detached = |a: &[f32], b: &[f32]| {
            let tt = term(a, b, &mag);
            let now = row_norms(&tt, &w, k);
            let m2: Vec<f32> = mag.iter().zip(now.iter().zip(&norms)).map(|(m, (n1, n0))| m * n1 / n0).collect();
            layer(&term(a, b, &m2), &w, &x, m, k, n, drop)
        };
        fd_check(&a, &g[0], &dy, |v| detached(v, &b), 2e-2);
        fd_check(&b, &g[1], &dy, |v| detached(&a, v), 2e-2);
        fd_check(&mag, &g[2], &dy, |v| layer(&term(&a, &b, v), &w, &x, m, k, n, drop), 2e-2);
        fd_check(
            &x,
            &dx,
            &dy,
            |v| {
                let mut base = vec![0f32; m * n];
                linear_forward(&mut base, v, &w, None, m, k, n);
                let mut out = base.clone();
                let c = LinearCall { module: "m", inp: v, m, k, n, frozen: Some(Frozen { weight: &w, out: &base }) };
                forward(&t, drop, c, &mut out);
                out
            },
            2e-2,
        );
    }

    #[test]
    fn magnitude_equal_to_the_norm_is_plain_lora() {
        // g = 1 on every row: DoRA reduces to its LoRA branch.
        let (m, k, n, r) = (2, 4, 3, 2);
        let mut rng = Rng::new(9);
        let (w, x) = (rng.normal_vec(n * k, 0.5), rng.normal_vec(m * k, 1.0));
        let (a, b) = (rng.normal_vec(r * k, 0.5), rng.normal_vec(n * r, 0.5));
        let lora_term = Term::lora("m", 0..n, k, r, 1.5, a.clone(), b.clone());
        let t = lora_term.clone().with_magnitude(row_norms(&lora_term, &w, k));
        let got = layer(&t, &w, &x, m, k, n, None);
        let mut want = vec![0f32; m * n];
        linear_forward(&mut want, &x, &w, None, m, k, n);
        let c = LinearCall { module: "m", inp: &x, m, k, n, frozen: None };
        lora::forward(&lora_term, None, c, &mut want);
        assert!(crate::util::rel_l2(&got, &want) < 1e-6);
    }
}
