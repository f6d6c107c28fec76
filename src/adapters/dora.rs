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
    use crate::adapters::check::{dora_at_its_norms_is_plain_lora, dora_backward_matches_fd};

    #[test]
    fn backward_matches_finite_differences() {
        let make = |a: &[f32], b: &[f32], m: &[f32]| {
            Term::lora("m", 2..6, 5, 2, 0.8, a.to_vec(), b.to_vec()).with_magnitude(m.to_vec())
        };
        dora_backward_matches_fd(make, row_norms, 4);
    }

    #[test]
    fn magnitude_equal_to_the_norm_is_plain_lora() {
        dora_at_its_norms_is_plain_lora(Term::with_magnitude, row_norms);
    }
}
