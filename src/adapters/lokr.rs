//! The LoKr kind (LyCORIS `LokrModule`, "LoRA with Kronecker product") on the CPU:
//!   ΔY[:, rows] = scale · X·ΔWᵀ,  ΔW = w1 ⊗ w2  (w1 [a, c], w2 [b, d], a·b rows, c·d inputs),
//! ΔW[i1·b + i2, j1·d + j2] = w1[i1, j1]·w2[i2, j2], as `torch.kron(w1, w2)`. Each of w1 and w2 is
//! stored whole (`lokr_w1`, `lokr_w2`) or as two factors (`lokr_w1_a` [a, r]·`lokr_w1_b` [r, c],
//! `lokr_w2_a` [b, r]·`lokr_w2_b` [r, d]).
//!
//! The scale, as ComfyUI computes it (`comfy/weight_adapter/lokr.py`, `calculate_weight`): alpha /
//! dim, dim the rank of w2's factors when w2 is factored, else of w1's when w1 is; 1 when both are
//! whole or the file has no alpha. LyCORIS (`lycoris/modules/lokr.py`) computes the same for the
//! files it writes (one `lora_dim` for both factors; both whole forces alpha = lora_dim, scale 1).
//!
//! ΔW is built whole for each call (`ops::lora::delta_forward`): the cost of the frozen product of
//! the same rows. LyCORIS's LoKr has no input dropout, and neither has this.

use super::{Kind, Term};
use crate::model::adapt::{LinearCall, TermGrads};
use crate::ops::lora::{delta_backward, delta_forward, low_rank_product, low_rank_product_backward};
use crate::util::Rng;
use anyhow::{bail, Result};

/// The two Kronecker factors of a LoKr kind: (shape, rank when factored) of w1 and of w2.
type Halves = [([usize; 2], Option<usize>); 2];

fn halves(t: &Term) -> Halves {
    match t.kind {
        Kind::Lokr { w1, w2, r1, r2 } => [(w1, r1), (w2, r2)],
        k => panic!("lokr: a {} term on `{}`", k.name(), t.module),
    }
}

/// The index in `params` of each half's first tensor.
fn first_param(h: &Halves) -> [usize; 2] {
    [0, if h[0].1.is_some() { 2 } else { 1 }]
}

/// w1 and w2 whole (the factored ones multiplied out).
fn whole(t: &Term) -> [Vec<f32>; 2] {
    let h = halves(t);
    let at = first_param(&h);
    [0, 1].map(|i| {
        let ([p, q], r) = h[i];
        match r {
            Some(r) => low_rank_product(&t.params[at[i]], &t.params[at[i] + 1], p, r, q),
            None => t.params[at[i]].to_vec(),
        }
    })
}

/// kron(w1 [a, c], w2 [b, d]) → [a·b, c·d].
pub fn kron(w1: &[f32], [a, c]: [usize; 2], w2: &[f32], [b, d]: [usize; 2]) -> Vec<f32> {
    let k = c * d;
    let mut out = vec![0f32; a * b * k];
    for i1 in 0..a {
        for i2 in 0..b {
            let row = &mut out[(i1 * b + i2) * k..(i1 * b + i2 + 1) * k];
            for j1 in 0..c {
                let s = w1[i1 * c + j1];
                row[j1 * d..(j1 + 1) * d].iter_mut().zip(&w2[i2 * d..(i2 + 1) * d]).for_each(|(o, &v)| *o = s * v);
            }
        }
    }
    out
}

/// The term's ΔW [rows, d_in] without its scale.
pub fn delta(t: &Term) -> Vec<f32> {
    let h = halves(t);
    let [w1, w2] = whole(t);
    kron(&w1, h[0].0, &w2, h[1].0)
}

/// out[m, n] += the term's output for the call's input.
pub fn forward(t: &Term, c: LinearCall, out: &mut [f32]) {
    delta_forward(out, c.inp, &delta(t), t.scale, t.rows.clone(), c.m, c.k, c.n);
}

/// The gradients of every parameter accumulate into `g` (created zeroed on first use); the input
/// gradient through the term is added to `dinp`.
pub fn backward(t: &Term, c: LinearCall, dout: &[f32], dinp: Option<&mut [f32]>, g: &mut TermGrads) {
    let h = halves(t);
    let ([a, cc], [b, d]) = (h[0].0, h[1].0);
    let [w1, w2] = whole(t);
    let dw = kron(&w1, h[0].0, &w2, h[1].0);
    let mut ddw = vec![0f32; dw.len()];
    delta_backward(dinp, &mut ddw, dout, c.inp, &dw, t.scale, t.rows.clone(), c.m, c.k, c.n);
    // dw1[i1, j1] = Σ dΔW[i1·b + i2, j1·d + j2]·w2[i2, j2]; dw2[i2, j2] = Σ dΔW[…]·w1[i1, j1].
    let (mut dw1, mut dw2) = (vec![0f32; a * cc], vec![0f32; b * d]);
    let k = cc * d;
    for i1 in 0..a {
        for i2 in 0..b {
            let row = &ddw[(i1 * b + i2) * k..(i1 * b + i2 + 1) * k];
            for j1 in 0..cc {
                let blk = &row[j1 * d..(j1 + 1) * d];
                let w2r = &w2[i2 * d..(i2 + 1) * d];
                dw1[i1 * cc + j1] += blk.iter().zip(w2r).map(|(x, y)| x * y).sum::<f32>();
                let s = w1[i1 * cc + j1];
                dw2[i2 * d..(i2 + 1) * d].iter_mut().zip(blk).for_each(|(o, &x)| *o += s * x);
            }
        }
    }
    if g.is_empty() {
        *g = t.params.iter().map(|p| vec![0f32; p.len()]).collect();
    }
    let at = first_param(&h);
    for (i, dwi) in [dw1, dw2].into_iter().enumerate() {
        let ([p, q], r) = h[i];
        match r {
            Some(r) => {
                let (ga, gb) = g.split_at_mut(at[i] + 1);
                let (pa, pb) = (&t.params[at[i]], &t.params[at[i] + 1]);
                low_rank_product_backward(&mut ga[at[i]], &mut gb[0], &dwi, pa, pb, p, r, q);
            }
            None => g[at[i]].iter_mut().zip(&dwi).for_each(|(o, &v)| *o += v),
        }
    }
}

/// The parameters of a LoKr read in diffusers' row order for a module whose rows BFL stores with
/// their halves swapped (norm_out.linear): ΔW's rows rotated by half, which is w1's rows rotated
/// by half when w1 has an even number of rows, or w2's when w1 has one row. Other splits are not a
/// rotation of either factor and are refused.
pub fn swap_halves(kind: Kind, params: &mut [Vec<f32>], what: &str) -> Result<()> {
    let Kind::Lokr { w1, w2, r1, r2 } = kind else { bail!("{what}: not a LoKr") };
    let h: Halves = [(w1, r1), (w2, r2)];
    let at = first_param(&h);
    let i = if w1[0].is_multiple_of(2) {
        0
    } else if w1[0] == 1 && w2[0].is_multiple_of(2) {
        1
    } else {
        bail!(
            "{what}: a LoKr on norm_out.linear with w1 of {} rows: diffusers' [scale; shift] rows are BFL's \
             [shift; scale], and that swap is not a reordering of either Kronecker factor (w1 needs an even \
             number of rows)",
            h[0].0[0]
        );
    };
    let ([rows, cols], r) = h[i];
    // The rows of w (or of its left factor [rows, r]).
    let width = r.unwrap_or(cols);
    params[at[i]].rotate_left(rows / 2 * width);
    Ok(())
}

/// LyCORIS's split of `dim` around `factor` (`lycoris/functional/general.py::factorization`): (m, n)
/// with m·n = dim and m ≤ n; `factor` > 0 dividing `dim` gives (factor, dim / factor) ordered,
/// otherwise the most balanced pair with m ≤ factor (any m when `factor` is negative).
pub fn factorization(dim: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dim.is_multiple_of(factor as usize) {
        let (m, n) = (factor as usize, dim / factor as usize);
        return if m > n { (n, m) } else { (m, n) };
    }
    let factor = if factor < 0 { dim } else { factor as usize };
    let (mut m, mut n) = (1usize, dim);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dim.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dim / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// The kind LyCORIS's `LokrModule` builds for a linear [rows, d_in] with `lora_dim` and `factor`
/// (its defaults: `decompose_both` off, so w1 whole): w1 [out_l, in_m] from the smaller factors,
/// w2 [out_k, in_n] low rank when lora_dim < max(out_k, in_n) / 2, else whole.
pub fn lycoris_kind(rows: usize, d_in: usize, lora_dim: usize, factor: i64) -> Kind {
    let (out_l, out_k) = factorization(rows, factor);
    let (in_m, in_n) = factorization(d_in, factor);
    let low_rank = (2 * lora_dim) < out_k.max(in_n);
    Kind::Lokr { w1: [out_l, in_m], w2: [out_k, in_n], r1: None, r2: low_rank.then_some(lora_dim) }
}

/// LyCORIS's initialisation for `kind` (a whole w1): w1 and w2_a kaiming-uniform (a = √5, bound
/// 1/√fan_in), w2_b zero, or a whole w2 zero; so ΔW starts at zero. Parameters in `params` order.
pub fn init(kind: Kind, rng: &mut Rng) -> Vec<Vec<f32>> {
    let Kind::Lokr { w1, w2, r1: None, r2 } = kind else { panic!("lokr::init: a whole w1 is LyCORIS's default") };
    let mut uniform = |rows: usize, cols: usize| -> Vec<f32> {
        let bound = 1.0 / (cols as f64).sqrt();
        (0..rows * cols).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
    };
    let mut v = vec![uniform(w1[0], w1[1])];
    match r2 {
        Some(r) => {
            v.push(uniform(w2[0], r));
            v.push(vec![0.0; r * w2[1]]);
        }
        None => v.push(vec![0.0; w2[0] * w2[1]]),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::check::{random_params, term_backward_matches_fd};
    use crate::util::rel_l2;

    fn term(kind: Kind, rows: std::ops::Range<usize>, d_in: usize, rng: &mut Rng) -> Term {
        random_params(Term::lycoris("m", rows, d_in, kind, 0.7, vec![]), 0.6, rng)
    }

    #[test]
    fn factorization_matches_lycoris_table() {
        // lycoris-lora 4.1.3's `factorization` on these (its docstring's table is off for 360).
        for (dim, factor, want) in [
            (128, -1, (8, 16)),
            (128, 2, (2, 64)),
            (128, 4, (4, 32)),
            (128, 8, (8, 16)),
            (127, 4, (1, 127)),
            (250, -1, (10, 25)),
            (250, 4, (2, 125)),
            (360, -1, (18, 20)),
            (360, 16, (15, 24)),
            (1024, 16, (16, 64)),
            (3072, -1, (48, 64)),
            (3072, 4, (4, 768)),
            (12288, -1, (96, 128)),
            (21504, -1, (128, 168)),
            (9216, 16, (16, 576)),
            (6144, 3, (3, 2048)),
            (160, -1, (10, 16)),
        ] {
            assert_eq!(factorization(dim, factor), want, "{dim} {factor}");
        }
    }

    #[test]
    fn backward_matches_finite_differences_for_every_form() {
        let mut rng = Rng::new(21);
        for kind in [
            Kind::Lokr { w1: [2, 2], w2: [3, 3], r1: None, r2: Some(2) },
            Kind::Lokr { w1: [2, 2], w2: [3, 3], r1: Some(1), r2: Some(2) },
            Kind::Lokr { w1: [2, 2], w2: [3, 3], r1: None, r2: None },
            Kind::Lokr { w1: [2, 2], w2: [3, 3], r1: Some(2), r2: None },
        ] {
            term_backward_matches_fd(&term(kind, 3..9, 6, &mut rng), 3, 10, 1e-2, &mut rng);
        }
    }

    #[test]
    fn swapping_halves_rotates_delta_rows() {
        let mut rng = Rng::new(5);
        for kind in [
            Kind::Lokr { w1: [4, 2], w2: [3, 3], r1: None, r2: Some(2) },
            Kind::Lokr { w1: [4, 2], w2: [3, 3], r1: Some(1), r2: None },
            Kind::Lokr { w1: [1, 2], w2: [12, 3], r1: None, r2: Some(2) },
            Kind::Lokr { w1: [1, 2], w2: [12, 3], r1: None, r2: None },
        ] {
            let t = term(kind, 0..12, 6, &mut rng);
            let mut want = delta(&t);
            want.rotate_left(6 * 6);
            let mut params: Vec<Vec<f32>> = t.params.iter().map(|p| p.to_vec()).collect();
            swap_halves(kind, &mut params, "x").unwrap();
            let t2 = Term { params: params.into_iter().map(std::sync::Arc::new).collect(), ..t };
            assert!(rel_l2(&delta(&t2), &want) < 1e-7);
        }
        let odd = Kind::Lokr { w1: [3, 2], w2: [2, 3], r1: None, r2: None };
        assert!(swap_halves(odd, &mut [vec![0.0; 6], vec![0.0; 6]], "x").is_err());
    }

    #[test]
    fn init_starts_at_zero_with_lycoris_shapes() {
        // LyCORIS: 32 → 32 at factor 4 and lora_dim 2 is w1 [4, 4] whole, w2 [8, 8] of rank 2.
        let kind = lycoris_kind(32, 32, 2, 4);
        assert_eq!(kind, Kind::Lokr { w1: [4, 4], w2: [8, 8], r1: None, r2: Some(2) });
        // lora_dim at least half of w2's larger side: w2 whole.
        assert_eq!(lycoris_kind(32, 32, 4, 4), Kind::Lokr { w1: [4, 4], w2: [8, 8], r1: None, r2: None });
        let p = init(kind, &mut Rng::new(1));
        let t = Term::lycoris("m", 0..32, 32, kind, 1.0, p);
        assert!(t.sizes_ok() && t.params[0].iter().any(|&v| v != 0.0));
        assert!(delta(&t).iter().all(|&v| v == 0.0));
    }
}
