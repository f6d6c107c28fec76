//! The LoHa kind (LyCORIS `LohaModule`, "LoRA with Hadamard product") on the CPU:
//!   ΔY[:, rows] = scale · X·ΔWᵀ,  ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b),
//! w1_a [rows, r1], w1_b [r1, d_in], w2_a [rows, r2], w2_b [r2, d_in] (`hada_w1_a` …). The scale, as
//! ComfyUI computes it (`comfy/weight_adapter/loha.py`, `calculate_weight`): alpha / r1 (w1_b's
//! rows), 1 when the file has no alpha; LyCORIS's `LohaModule` writes r1 = r2 = lora_dim and the
//! same alpha / lora_dim. ΔW is built whole for each call (`ops::lora::delta_forward`); no dropout.

use super::{Kind, Term};
use crate::model::adapt::{LinearCall, TermGrads};
use crate::ops::lora::{delta_backward, delta_forward, low_rank_product, low_rank_product_backward};

fn ranks(t: &Term) -> [usize; 2] {
    match t.kind {
        Kind::Loha { r1, r2 } => [r1, r2],
        k => panic!("loha: a {} term on `{}`", k.name(), t.module),
    }
}

/// The two products w1_a·w1_b and w2_a·w2_b [rows, d_in].
fn products(t: &Term) -> [Vec<f32>; 2] {
    let r = ranks(t);
    [0, 1].map(|i| low_rank_product(&t.params[2 * i], &t.params[2 * i + 1], t.rows.len(), r[i], t.d_in))
}

/// The term's ΔW [rows, d_in] without its scale.
pub fn delta(t: &Term) -> Vec<f32> {
    let [p1, p2] = products(t);
    p1.iter().zip(&p2).map(|(a, b)| a * b).collect()
}

/// out[m, n] += the term's output for the call's input.
pub fn forward(t: &Term, c: LinearCall, out: &mut [f32]) {
    delta_forward(out, c.inp, &delta(t), t.scale, t.rows.clone(), c.m, c.k, c.n);
}

/// The gradients of the four factors accumulate into `g` (created zeroed on first use); the input
/// gradient through the term is added to `dinp`.
pub fn backward(t: &Term, c: LinearCall, dout: &[f32], dinp: Option<&mut [f32]>, g: &mut TermGrads) {
    let r = ranks(t);
    let [p1, p2] = products(t);
    let dw: Vec<f32> = p1.iter().zip(&p2).map(|(a, b)| a * b).collect();
    let mut ddw = vec![0f32; dw.len()];
    delta_backward(dinp, &mut ddw, dout, c.inp, &dw, t.scale, t.rows.clone(), c.m, c.k, c.n);
    if g.is_empty() {
        *g = t.params.iter().map(|p| vec![0f32; p.len()]).collect();
    }
    // d(p1) = dΔW ⊙ p2, d(p2) = dΔW ⊙ p1, then through each product.
    for (i, other) in [&p2, &p1].into_iter().enumerate() {
        let dp: Vec<f32> = ddw.iter().zip(other).map(|(a, b)| a * b).collect();
        let (ga, gb) = g.split_at_mut(2 * i + 1);
        let (a, b) = (&t.params[2 * i], &t.params[2 * i + 1]);
        low_rank_product_backward(&mut ga[2 * i], &mut gb[0], &dp, a, b, t.rows.len(), r[i], t.d_in);
    }
}

/// A LoHa's parameters read in diffusers' row order for a module whose rows BFL stores with their
/// halves swapped (norm_out.linear): both left factors' rows rotated by half.
pub fn swap_halves(kind: Kind, params: &mut [Vec<f32>], rows: usize) {
    if let Kind::Loha { r1, r2 } = kind {
        params[0].rotate_left(rows / 2 * r1);
        params[2].rotate_left(rows / 2 * r2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::check::{random_params, term_backward_matches_fd};
    use crate::util::{rel_l2, Rng};
    use std::sync::Arc;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(8);
        let (k, n) = (5, 8);
        let kind = Kind::Loha { r1: 2, r2: 3 };
        let t = random_params(Term::lycoris("m", 2..6, k, kind, 1.3, vec![]), 0.6, &mut rng);
        term_backward_matches_fd(&t, 3, n, 1e-2, &mut rng);
        // Swapping the halves of the left factors swaps the halves of ΔW's rows.
        let mut want = delta(&t);
        want.rotate_left(2 * k);
        let mut params: Vec<Vec<f32>> = t.params.iter().map(|p| p.to_vec()).collect();
        swap_halves(kind, &mut params, 4);
        let t2 = Term { params: params.into_iter().map(Arc::new).collect(), ..t };
        assert!(rel_l2(&delta(&t2), &want) < 1e-7);
    }
}
