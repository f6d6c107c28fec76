//! DoRA decomposed per input column, on the CPU: the form LyCORIS writes with `wd_on_out = false`
//! (kohya-style files whose `dora_scale` is [1, in]; ComfyUI and Forge read it by its shape). Each
//! input column j of the term's rows of W plus the LoRA update is rescaled to a magnitude m_j:
//!   W' = (W[rows] + s·B·A) · diag(g),   g_j = m_j / ‖(W[rows] + s·B·A)[:, j]‖,
//! so Y[:, rows] = (X ⊙ g)·W[rows]ᵀ + s·((X̃ ⊙ g)·Aᵀ)·Bᵀ + b, added to the frozen product as the term
//! (X ⊙ g − X)·W[rows]ᵀ + s·((X̃ ⊙ g)·Aᵀ)·Bᵀ. As for the per-row form (`dora.rs`), the norm is a
//! constant in the backward and a strength multiplies s; the column norms run over the term's
//! rows only (a kohya module's rows are the whole BFL linear). X̃ is the LoRA branch's dropped-out
//! input (the kind is not trained, but `grad` and the tests run its backward).

use super::{lora, Term};
use crate::model::adapt::{Frozen, LinearCall, TermGrads};
use crate::ops::lora::{lora_terms_backward, Dropout, TermGrad};
use crate::ops::matmul::{linear_backward_input, linear_forward};

/// ‖(W[rows] + s·B·A)[:, j]‖ for each input column j (W [n, k] row-major, the whole module's).
pub fn column_norms(t: &Term, weight: &[f32], k: usize) -> Vec<f32> {
    let (a, b, r) = (t.a(), t.b(), t.rank());
    let mut sum = vec![0f64; k];
    for (i, row) in t.rows.clone().enumerate() {
        let w = &weight[row * k..(row + 1) * k];
        for (j, s) in sum.iter_mut().enumerate() {
            let ba: f32 = (0..r).map(|q| b[i * r + q] * a[q * k + j]).sum();
            let v = (w[j] + t.scale * ba) as f64;
            *s += v * v;
        }
    }
    sum.iter().map(|s| s.sqrt() as f32).collect()
}

fn frozen<'a>(t: &Term, c: &LinearCall<'a>) -> Frozen<'a> {
    // The set asks for the frozen weight (`needs_frozen`) on every module with a DoRA term.
    c.frozen.unwrap_or_else(|| panic!("DoRA term on `{}` called without the frozen weight", t.module))
}

/// The gains g = m / norm per input column, with the norms.
fn gains(t: &Term, weight: &[f32], k: usize) -> (Vec<f32>, Vec<f32>) {
    let norms = column_norms(t, weight, k);
    let g = norms.iter().zip(t.magnitude()).map(|(n, m)| m / n).collect();
    (g, norms)
}

/// X ⊙ g, g broadcast over the rows of X [m, k].
fn scaled(x: &[f32], g: &[f32]) -> Vec<f32> {
    x.chunks(g.len()).flat_map(|row| row.iter().zip(g).map(|(x, g)| x * g)).collect()
}

/// The term's rows of W [n, k]: W[rows] as [rows, k].
fn rows_of<'a>(t: &Term, weight: &'a [f32], k: usize) -> &'a [f32] {
    &weight[t.rows.start * k..t.rows.end * k]
}

/// out[m, n] += the term's output: (X ⊙ g − X)·W[rows]ᵀ + s·((X̃ ⊙ g)·Aᵀ)·Bᵀ on its rows.
pub fn forward(t: &Term, dropout: Option<Dropout>, c: LinearCall, out: &mut [f32]) {
    let fz = frozen(t, &c);
    let (g, _) = gains(t, fz.weight, c.k);
    let xg = scaled(c.inp, &g);
    let diff: Vec<f32> = xg.iter().zip(c.inp).map(|(a, b)| a - b).collect();
    let nr = t.rows.len();
    let mut part = vec![0f32; c.m * nr];
    linear_forward(&mut part, &diff, rows_of(t, fz.weight, c.k), None, c.m, c.k, nr);
    for (o, p) in out.chunks_mut(c.n).zip(part.chunks(nr)) {
        o[t.rows.clone()].iter_mut().zip(p).for_each(|(o, p)| *o += p);
    }
    lora::forward(t, dropout, LinearCall { inp: &xg, ..c }, out);
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
    let (g, norms) = gains(t, fz.weight, c.k);
    let xg = scaled(c.inp, &g);
    grads.resize(3, Vec::new());
    grads[2].resize(c.k, 0.0);
    // The gradient reaching X ⊙ g: through the LoRA branch (dA, dB on the way) …
    let mut dxg = vec![0f32; c.m * c.k];
    let mut tg = TermGrad { da: std::mem::take(&mut grads[0]), db: std::mem::take(&mut grads[1]) };
    lora_terms_backward(
        Some(&mut dxg),
        std::slice::from_mut(&mut tg),
        dout,
        &xg,
        &[lora::view(t, dropout)],
        c.m,
        c.k,
        c.n,
    );
    (grads[0], grads[1]) = (tg.da, tg.db);
    // … and through the frozen rows: dY[:, rows]·W[rows].
    let nr = t.rows.len();
    let dr: Vec<f32> = dout.chunks(c.n).flat_map(|d| d[t.rows.clone()].iter().copied()).collect();
    let mut dyw = vec![0f32; c.m * c.k];
    linear_backward_input(&mut dyw, &dr, rows_of(t, fz.weight, c.k), c.m, c.k, nr, 0.0);
    dxg.iter_mut().zip(&dyw).for_each(|(a, b)| *a += b);
    // dm_j = Σ_i dXg[i, j]·X[i, j] / ‖·‖_j; dX = dXg ⊙ g, less the frozen product's dY·W the base
    // backward already added for these rows.
    for (i, row) in dxg.chunks(c.k).enumerate() {
        let x = &c.inp[i * c.k..(i + 1) * c.k];
        for j in 0..c.k {
            grads[2][j] += row[j] * x[j] / norms[j];
        }
    }
    if let Some(dx) = dinp {
        for (i, d) in dx.chunks_mut(c.k).enumerate() {
            for j in 0..c.k {
                let at = i * c.k + j;
                d[j] += dxg[at] * g[j] - dyw[at];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::check::{dora_at_its_norms_is_plain_lora, dora_backward_matches_fd, frozen_layer};
    use crate::util::{rel_l2, Rng};

    #[test]
    fn forward_is_the_merged_weight_rescaled_per_column() {
        // LyCORIS's merge for wd_on_out = false (ComfyUI's [1, in] branch without its eps):
        // W' = (W + s·B·A)·diag(m / column norms) on the term's rows, the other rows unchanged.
        let (m, k, n, r) = (3, 6, 7, 2);
        let rows = 1..5;
        let mut rng = Rng::new(11);
        let (w, x) = (rng.normal_vec(n * k, 0.5), rng.normal_vec(m * k, 1.0));
        let (a, b) = (rng.normal_vec(r * k, 0.5), rng.normal_vec(rows.len() * r, 0.5));
        let mag: Vec<f32> = (0..k).map(|_| 0.5 + rng.uniform() as f32).collect();
        let t = Term::lora("m", rows.clone(), k, r, 0.8, a.clone(), b.clone()).with_column_magnitude(mag.clone());
        let mut merged = w.clone();
        let mut norm2 = vec![0f64; k];
        for (i, row) in rows.clone().enumerate() {
            for (j, n2) in norm2.iter_mut().enumerate() {
                let ba: f32 = (0..r).map(|q| b[i * r + q] * a[q * k + j]).sum();
                merged[row * k + j] += 0.8 * ba;
                *n2 += (merged[row * k + j] as f64).powi(2);
            }
        }
        for row in rows {
            for (j, n2) in norm2.iter().enumerate() {
                merged[row * k + j] *= (mag[j] as f64 / n2.sqrt()) as f32;
            }
        }
        let mut want = vec![0f32; m * n];
        linear_forward(&mut want, &x, &merged, None, m, k, n);
        let e = rel_l2(&frozen_layer(&t, &w, &x, m, n, None), &want);
        assert!(e < 1e-6, "unmerged vs merged: rel L2 {e:e}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let make = |a: &[f32], b: &[f32], m: &[f32]| {
            Term::lora("m", 2..6, 5, 2, 0.8, a.to_vec(), b.to_vec()).with_column_magnitude(m.to_vec())
        };
        dora_backward_matches_fd(make, column_norms, 5);
    }

    #[test]
    fn magnitude_equal_to_the_column_norms_is_plain_lora() {
        dora_at_its_norms_is_plain_lora(Term::with_column_magnitude, column_norms);
    }
}
