//! Scaled dot-product attention with a materialised softmax, and the head split/merge that
//! moves between token-major projections and head-major attention inputs.

use super::matmul::gemm;
use rayon::prelude::*;

/// Query rows per task of the forward: the scores exist for one tile of queries at a time
/// (256 × l, not l × l per head: 4.7 MB instead of 85 MB at FLUX's 4608 tokens), and (head,
/// tile) pairs spread over the cores at any head count. Measured at l = 1152, d = 128, 4 heads,
/// 2 cores: 256-row tiles 14.9 ms, whole heads 14.6 ms, 64-row tiles 20 ms (K and V are packed
/// once per tile, so small tiles pay for it).
const Q_TILE: usize = 256;

/// Softmax of one score row in place (max-subtracted, the sum in f64); returns the row's
/// log-sum-exp, which the backward pass recomputes P from.
pub fn softmax_in_place(row: &mut [f32]) -> f32 {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for x in row.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
    mx + (sum as f32).ln()
}

/// out[b, h, l, d] = softmax(q kᵀ / √d) v per (b, h), no mask. Saves the log-sum-exp of each
/// score row [b, h, l] for the backward pass.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    h: usize,
    l: usize,
    d: usize,
) {
    attention_forward_masked(out, lse, q, k, v, None, b, h, l, d)
}

/// Batch element `bi`'s row of a key mask [b, l].
fn mask_row(kv_mask: Option<&[u8]>, bi: usize, l: usize) -> Option<&[u8]> {
    kv_mask.map(|m| &m[bi * l..(bi + 1) * l])
}

/// `attention_forward` with an optional key-padding mask [b, l] (nonzero = the key takes part),
/// T5 padding's shape. A query row with no key left gets a zero output and a log-sum-exp of +∞,
/// so its backward weights are exactly zero (the GPU kernel's convention).
pub fn attention_forward_masked(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_mask: Option<&[u8]>,
    b: usize,
    h: usize,
    l: usize,
    d: usize,
) {
    let n = l * d;
    if let Some(m) = kv_mask {
        assert_eq!(m.len(), b * l, "key mask is [b, l]");
    }
    assert_eq!(q.len(), b * h * n);
    assert_eq!(out.len(), b * h * n);
    assert_eq!(lse.len(), b * h * l);
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(n).zip(lse.par_chunks_mut(l)).enumerate().for_each(|(bh, (o, lse))| {
        let (qh, kh, vh) = (&q[bh * n..(bh + 1) * n], &k[bh * n..(bh + 1) * n], &v[bh * n..(bh + 1) * n]);
        let mask = mask_row(kv_mask, bh / h, l);
        o.par_chunks_mut(Q_TILE * d).zip(lse.par_chunks_mut(Q_TILE)).enumerate().for_each(|(qt, (o, lse))| {
            let rows = lse.len();
            let qt = &qh[qt * Q_TILE * d..(qt * Q_TILE + rows) * d];
            let mut s = vec![0f32; rows * l];
            gemm(rows, d, l, scale, qt, (d, 1), kh, (1, d), 0.0, &mut s, (l, 1));
            for (row, lse) in s.chunks_mut(l).zip(lse.iter_mut()) {
                *lse = match mask {
                    None => softmax_in_place(row),
                    Some(m) if !m.iter().any(|&x| x != 0) => {
                        row.fill(0.0);
                        f32::INFINITY
                    }
                    Some(m) => {
                        row.iter_mut().zip(m).filter(|(_, &keep)| keep == 0).for_each(|(x, _)| *x = f32::NEG_INFINITY);
                        softmax_in_place(row)
                    }
                };
            }
            gemm(rows, l, d, 1.0, &s, (l, 1), vh, (d, 1), 0.0, o, (d, 1));
        });
    });
}

/// Backward of `attention_forward` as FlashAttention-2 does it per (b, h), with P recomputed
/// from the saved log-sum-exp: D = rowsum(dO⊙O), dP = dO·Vᵀ, dS = P⊙(dP − D),
/// dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO. Overwrites dq, dk, dv.
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    h: usize,
    l: usize,
    d: usize,
) {
    attention_backward_masked(dq, dk, dv, dout, q, k, v, out, lse, None, b, h, l, d)
}

/// Backward of `attention_forward_masked`: masked keys have P = 0.
pub fn attention_backward_masked(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    kv_mask: Option<&[u8]>,
    b: usize,
    h: usize,
    l: usize,
    d: usize,
) {
    let n = l * d;
    assert_eq!(dout.len(), b * h * n);
    let scale = 1.0 / (d as f32).sqrt();
    dq.par_chunks_mut(n).zip(dk.par_chunks_mut(n)).zip(dv.par_chunks_mut(n)).enumerate().for_each(
        |(bh, ((dq, dk), dv))| {
            let r = bh * n..(bh + 1) * n;
            let (qh, kh, vh, oh, doh) = (&q[r.clone()], &k[r.clone()], &v[r.clone()], &out[r.clone()], &dout[r]);
            let lse = &lse[bh * l..(bh + 1) * l];
            let mut p = vec![0f32; l * l];
            gemm(l, d, l, scale, qh, (d, 1), kh, (1, d), 0.0, &mut p, (l, 1));
            let mask = mask_row(kv_mask, bh / h, l);
            for (row, &m) in p.chunks_mut(l).zip(lse) {
                row.iter_mut().for_each(|x| *x = (*x - m).exp());
                if let Some(mask) = mask {
                    row.iter_mut().zip(mask).filter(|(_, &keep)| keep == 0).for_each(|(x, _)| *x = 0.0);
                }
            }
            // dV = Pᵀ·dO
            gemm(l, l, d, 1.0, &p, (1, l), doh, (d, 1), 0.0, dv, (d, 1));
            // dP = dO·Vᵀ, then dS in place
            let mut ds = vec![0f32; l * l];
            gemm(l, d, l, 1.0, doh, (d, 1), vh, (1, d), 0.0, &mut ds, (l, 1));
            for i in 0..l {
                let di: f32 = (0..d).map(|x| doh[i * d + x] * oh[i * d + x]).sum();
                for j in 0..l {
                    ds[i * l + j] = p[i * l + j] * (ds[i * l + j] - di);
                }
            }
            gemm(l, l, d, scale, &ds, (l, 1), kh, (d, 1), 0.0, dq, (d, 1));
            gemm(l, l, d, scale, &ds, (1, l), qh, (d, 1), 0.0, dk, (d, 1));
        },
    );
}

/// Calls f(token-major offset, head-major offset) for the d values of every (sample, token,
/// head) of a stream of `ls` tokens: token-major [b, ls, stride] from column `col`, head-major
/// [b, h, l_total, d] from row `l_off`.
fn head_rows(
    b: usize,
    ls: usize,
    stride: usize,
    col: usize,
    h: usize,
    d: usize,
    l_total: usize,
    l_off: usize,
    mut f: impl FnMut(usize, usize),
) {
    for bi in 0..b {
        for t in 0..ls {
            let s = (bi * ls + t) * stride + col;
            for hi in 0..h {
                f(s + hi * d, ((bi * h + hi) * l_total + l_off + t) * d);
            }
        }
    }
}

/// Copies heads out of a token-major projection: src [b, ls, stride], head hi of width d at
/// column col + hi·d, into dst [b, h, l_total, d] rows l_off..l_off + ls.
pub fn split_heads(
    dst: &mut [f32],
    src: &[f32],
    b: usize,
    ls: usize,
    stride: usize,
    col: usize,
    h: usize,
    d: usize,
    l_total: usize,
    l_off: usize,
) {
    assert_eq!(dst.len(), b * h * l_total * d);
    assert_eq!(src.len(), b * ls * stride);
    head_rows(b, ls, stride, col, h, d, l_total, l_off, |tok, head| {
        dst[head..head + d].copy_from_slice(&src[tok..tok + d])
    });
}

/// The inverse: dst [b, ls, stride] columns col..col + h·d ← src [b, h, l_total, d] rows
/// l_off..l_off + ls (feature index hi·d + di, as BFL's "B H L D -> B L (H D)").
pub fn merge_heads(
    dst: &mut [f32],
    src: &[f32],
    b: usize,
    ls: usize,
    stride: usize,
    col: usize,
    h: usize,
    d: usize,
    l_total: usize,
    l_off: usize,
) {
    assert_eq!(src.len(), b * h * l_total * d);
    assert_eq!(dst.len(), b * ls * stride);
    head_rows(b, ls, stride, col, h, d, l_total, l_off, |tok, head| {
        dst[tok..tok + d].copy_from_slice(&src[head..head + d])
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, rel_l2, Rng};

    /// Attention written out in f64 over the kept keys of each batch element (all keys
    /// without a mask): (out as f32, lse in f64).
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
        (b, h, l, d): (usize, usize, usize, usize),
    ) -> (Vec<f32>, Vec<f64>) {
        let mut out = vec![0f32; b * h * l * d];
        let mut lse = vec![0f64; b * h * l];
        for bh in 0..b * h {
            let kept: Vec<usize> = (0..l).filter(|&j| mask.is_none_or(|m| m[(bh / h) * l + j] != 0)).collect();
            for i in 0..l {
                let s: Vec<f64> = kept
                    .iter()
                    .map(|&j| {
                        (0..d).map(|x| q[(bh * l + i) * d + x] as f64 * k[(bh * l + j) * d + x] as f64).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[bh * l + i] = m + z.ln();
                for x in 0..d {
                    out[(bh * l + i) * d + x] = kept
                        .iter()
                        .zip(&s)
                        .map(|(&j, sj)| (sj - m).exp() / z * v[(bh * l + j) * d + x] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        (out, lse)
    }

    #[test]
    fn matches_naive_softmax_attention() {
        let (b, h, l, d) = (2, 3, 7, 8);
        let mut rng = Rng::new(7);
        let q = rng.normal_vec(b * h * l * d, 1.0);
        let k = rng.normal_vec(b * h * l * d, 1.0);
        let v = rng.normal_vec(b * h * l * d, 1.0);
        let mut out = vec![f32::NAN; b * h * l * d];
        let mut lse = vec![f32::NAN; b * h * l];
        attention_forward(&mut out, &mut lse, &q, &k, &v, b, h, l, d);
        let (want, want_lse) = naive(&q, &k, &v, None, (b, h, l, d));
        assert!(lse.iter().zip(&want_lse).all(|(&a, &w)| (a as f64 - w).abs() < 1e-4));
        assert!(rel_l2(&out, &want) < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, h, l, d) = (1, 2, 5, 4);
        let mut rng = Rng::new(61);
        let q = rng.normal_vec(b * h * l * d, 1.0);
        let k = rng.normal_vec(b * h * l * d, 1.0);
        let v = rng.normal_vec(b * h * l * d, 1.0);
        let dy = rng.normal_vec(b * h * l * d, 1.0);
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0.0; b * h * l * d];
            attention_forward(&mut o, &mut vec![0.0; b * h * l], q, k, v, b, h, l, d);
            o
        };
        let mut o = vec![0.0; b * h * l * d];
        let mut lse = vec![0.0; b * h * l];
        attention_forward(&mut o, &mut lse, &q, &k, &v, b, h, l, d);
        let n = b * h * l * d;
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        attention_backward(&mut dq, &mut dk, &mut dv, &dy, &q, &k, &v, &o, &lse, b, h, l, d);
        fd_check(&q, &dq, &dy, |x| run(x, &k, &v), 1e-3);
        fd_check(&k, &dk, &dy, |x| run(&q, x, &v), 1e-3);
        fd_check(&v, &dv, &dy, |x| run(&q, &k, x), 1e-3);
    }

    /// Masking keys must equal removing them: the naive f64 formula over the kept keys only, an
    /// independent route to the same numbers.
    #[test]
    fn key_mask_equals_removing_the_keys() {
        let (b, h, l, d) = (2, 2, 9, 4);
        let mut rng = Rng::new(17);
        let q = rng.normal_vec(b * h * l * d, 1.0);
        let k = rng.normal_vec(b * h * l * d, 1.0);
        let v = rng.normal_vec(b * h * l * d, 1.0);
        let mut mask = vec![1u8; b * l];
        mask[1] = 0;
        mask[5] = 0;
        mask[l..l + 6].fill(0);
        let mut out = vec![f32::NAN; b * h * l * d];
        let mut lse = vec![f32::NAN; b * h * l];
        attention_forward_masked(&mut out, &mut lse, &q, &k, &v, Some(&mask), b, h, l, d);
        let (want, want_lse) = naive(&q, &k, &v, Some(&mask), (b, h, l, d));
        assert!(lse.iter().zip(&want_lse).all(|(&a, &w)| (a as f64 - w).abs() < 1e-4));
        assert!(rel_l2(&out, &want) < 1e-6);
    }

    #[test]
    fn masked_backward_matches_finite_differences() {
        let (b, h, l, d) = (2, 1, 5, 4);
        let mut rng = Rng::new(62);
        let q = rng.normal_vec(b * h * l * d, 1.0);
        let k = rng.normal_vec(b * h * l * d, 1.0);
        let v = rng.normal_vec(b * h * l * d, 1.0);
        let dy = rng.normal_vec(b * h * l * d, 1.0);
        let mask = [1, 0, 1, 1, 0, 0, 1, 1, 1, 1u8];
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0.0; b * h * l * d];
            attention_forward_masked(&mut o, &mut vec![0.0; b * h * l], q, k, v, Some(&mask), b, h, l, d);
            o
        };
        let mut o = vec![0.0; b * h * l * d];
        let mut lse = vec![0.0; b * h * l];
        attention_forward_masked(&mut o, &mut lse, &q, &k, &v, Some(&mask), b, h, l, d);
        let n = b * h * l * d;
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        attention_backward_masked(&mut dq, &mut dk, &mut dv, &dy, &q, &k, &v, &o, &lse, Some(&mask), b, h, l, d);
        fd_check(&q, &dq, &dy, |x| run(x, &k, &v), 1e-3);
        fd_check(&k, &dk, &dy, |x| run(&q, x, &v), 1e-3);
        fd_check(&v, &dv, &dy, |x| run(&q, &k, x), 1e-3);
        // Masked keys get exactly zero gradient.
        for j in [1usize, 4, 5] {
            assert!(dk[j * d..(j + 1) * d].iter().chain(&dv[j * d..(j + 1) * d]).all(|&x| x == 0.0));
        }
    }

    #[test]
    fn a_row_with_every_key_masked_is_zero_with_infinite_lse() {
        let (b, h, l, d) = (1, 1, 3, 2);
        let q = vec![0.5; l * d];
        let mut o = vec![f32::NAN; l * d];
        let mut lse = vec![f32::NAN; l];
        attention_forward_masked(&mut o, &mut lse, &q, &q, &q, Some(&[0, 0, 0]), b, h, l, d);
        assert!(o.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::INFINITY));
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; l * d], vec![f32::NAN; l * d], vec![f32::NAN; l * d]);
        attention_backward_masked(&mut dq, &mut dk, &mut dv, &q, &q, &q, &q, &o, &lse, Some(&[0, 0, 0]), b, h, l, d);
        assert!(dq.iter().chain(&dk).chain(&dv).all(|&x| x == 0.0));
    }

    #[test]
    fn split_then_merge_round_trips() {
        let (b, ls, h, d) = (2, 3, 2, 4);
        let stride = 3 * h * d + 5;
        let src: Vec<f32> = (0..b * ls * stride).map(|i| i as f32).collect();
        let mut heads = vec![0f32; b * h * (ls + 1) * d];
        split_heads(&mut heads, &src, b, ls, stride, h * d, h, d, ls + 1, 1);
        let mut back = vec![0f32; b * ls * stride];
        merge_heads(&mut back, &heads, b, ls, stride, h * d, h, d, ls + 1, 1);
        for bt in 0..b * ls {
            let c = h * d..2 * h * d;
            assert_eq!(&back[bt * stride..][c.clone()], &src[bt * stride..][c]);
        }
    }
}
