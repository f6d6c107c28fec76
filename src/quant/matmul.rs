//! The dequantising matmul of the CPU reference, W[o, :] = s[o]·decode(q[o, :]):
//!   forward   Y = X·Wᵀ (+ b): the product with the unscaled codes, s[o] folded in per output
//!             column afterwards (the GEMM epilogue);
//!   backward  dX = dY·W: dY's column o scaled by s[o] first (the A-operand load), then times
//!             the unscaled codes.
//! Only a block of decoded rows exists at a time, never the whole f32 weight (docs/kernel-notes.md
//! §3.3 describes the GPU kernels this is the reference of).

use super::scheme::Code;
use crate::ops::matmul::gemm;
use rayon::prelude::*;
use std::borrow::Cow;

/// Consecutive output rows stored in one code, with each row's scale.
pub struct QRows<'a> {
    pub code: Code,
    /// [scale.len(), k] bytes.
    pub q: &'a [u8],
    pub scale: Cow<'a, [f32]>,
}

/// A quantised weight [n, k]: its rows in order, possibly from several stored tensors (q, k and
/// v of a fused projection, each with its own scales).
pub struct QWeight<'a> {
    pub segments: Vec<QRows<'a>>,
    pub k: usize,
}

/// Decoded rows held at once: 4 MiB of f32, so the block stays in cache-friendly reach while
/// every token row is multiplied against it.
const BLOCK_ELEMS: usize = 1 << 20;
/// Token rows per parallel task (as `ops::matmul`).
const ROW_BLOCK: usize = 64;

impl QWeight<'_> {
    pub fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.scale.len()).sum()
    }

    /// Calls `f(first_row, decoded [rows, k] unscaled, scales)` on blocks of at most
    /// `block_rows` rows, in order.
    fn for_each_block(&self, block_rows: usize, mut f: impl FnMut(usize, &[f32], &[f32])) {
        let k = self.k;
        let mut buf = vec![0f32; block_rows.min(self.rows()) * k];
        let mut at = 0;
        for seg in &self.segments {
            let n = seg.scale.len();
            assert_eq!(seg.q.len(), n * k, "quantised rows: {} bytes for {n} rows of {k}", seg.q.len());
            for r0 in (0..n).step_by(block_rows.max(1)) {
                let r1 = (r0 + block_rows).min(n);
                let dec = &mut buf[..(r1 - r0) * k];
                dec.par_chunks_mut(k.max(1))
                    .zip(seg.q[r0 * k..r1 * k].par_chunks(k.max(1)))
                    .for_each(|(o, q)| seg.code.decode(q, o));
                f(at + r0, dec, &seg.scale[r0..r1]);
            }
            at += n;
        }
    }

    /// The whole weight in f32 (s·decode(q)), for ops that need it as one matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.k;
        let mut out = vec![0f32; self.rows() * k];
        for seg in &self.segments {
            assert_eq!(seg.q.len(), seg.scale.len() * k, "quantised rows: byte count");
        }
        let mut at = 0;
        for seg in &self.segments {
            let n = seg.scale.len();
            out[at * k..(at + n) * k]
                .par_chunks_mut(k.max(1))
                .zip(seg.q.par_chunks(k.max(1)))
                .zip(seg.scale.par_iter())
                .for_each(|((o, q), &s)| {
                    seg.code.decode(q, o);
                    o.iter_mut().for_each(|v| *v *= s);
                });
            at += n;
        }
        out
    }
}

fn default_block_rows(k: usize) -> usize {
    (BLOCK_ELEMS / k.max(1)).max(1)
}

/// out[m, n] = inp[m, k]·Wᵀ + bias[n] with W the dequantised weight.
pub fn qlinear_forward(out: &mut [f32], inp: &[f32], w: &QWeight, bias: Option<&[f32]>, m: usize, k: usize, n: usize) {
    qlinear_forward_blocked(out, inp, w, bias, m, k, n, default_block_rows(k));
}

pub fn qlinear_forward_blocked(
    out: &mut [f32],
    inp: &[f32],
    w: &QWeight,
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    block_rows: usize,
) {
    assert_eq!(out.len(), m * n, "qlinear: out");
    assert_eq!(inp.len(), m * k, "qlinear: inp");
    assert_eq!((w.rows(), w.k), (n, k), "qlinear: weight");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "qlinear: bias");
    }
    w.for_each_block(block_rows, |c0, dec, scale| {
        let nb = scale.len();
        out.par_chunks_mut(ROW_BLOCK * n).enumerate().for_each(|(blk, o)| {
            let rows = o.len() / n;
            let x = &inp[blk * ROW_BLOCK * k..(blk * ROW_BLOCK + rows) * k];
            gemm(rows, k, nb, 1.0, x, (k, 1), dec, (1, k), 0.0, &mut o[c0..], (n, 1));
            for r in o.chunks_mut(n) {
                let cols = &mut r[c0..c0 + nb];
                match bias {
                    Some(b) => {
                        cols.iter_mut().zip(scale).zip(&b[c0..c0 + nb]).for_each(|((v, &s), &b)| *v = *v * s + b)
                    }
                    None => cols.iter_mut().zip(scale).for_each(|(v, &s)| *v *= s),
                }
            }
        });
    });
}

/// dinp[m, k] (+)= dout[m, n]·W (`beta` 0 overwrites, 1 accumulates): the input gradient
/// through the frozen quantised weight.
pub fn qlinear_backward_input(dinp: &mut [f32], dout: &[f32], w: &QWeight, m: usize, k: usize, n: usize, beta: f32) {
    qlinear_backward_input_blocked(dinp, dout, w, m, k, n, beta, default_block_rows(k));
}

pub fn qlinear_backward_input_blocked(
    dinp: &mut [f32],
    dout: &[f32],
    w: &QWeight,
    m: usize,
    k: usize,
    n: usize,
    beta: f32,
    block_rows: usize,
) {
    assert_eq!(dinp.len(), m * k, "qlinear backward: dinp");
    assert_eq!(dout.len(), m * n, "qlinear backward: dout");
    assert_eq!((w.rows(), w.k), (n, k), "qlinear backward: weight");
    if beta == 0.0 {
        // The blocks accumulate into dX, so it starts from zero (or from beta·dX).
        dinp.fill(0.0);
    } else if beta != 1.0 {
        dinp.iter_mut().for_each(|v| *v *= beta);
    }
    w.for_each_block(block_rows, |c0, dec, scale| {
        let nb = scale.len();
        dinp.par_chunks_mut(ROW_BLOCK * k).enumerate().for_each(|(blk, dx)| {
            let rows = dx.len() / k;
            let dy = &dout[blk * ROW_BLOCK * n..(blk * ROW_BLOCK + rows) * n];
            let scaled: Vec<f32> =
                dy.chunks(n).flat_map(|r| r[c0..c0 + nb].iter().zip(scale).map(|(&g, &s)| g * s)).collect();
            gemm(rows, nb, k, 1.0, &scaled, (nb, 1), dec, (k, 1), 1.0, dx, (k, 1));
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::{linear_backward_input, linear_forward};
    use crate::quant::scheme::{quantize, Scheme};
    use crate::util::{rel_l2, Rng};

    /// Every scheme, ragged shapes, weights made of several segments, blocks that split
    /// segments unevenly: the same as dequantising first and running the f32 matmul.
    #[test]
    fn matches_dequantise_then_matmul() {
        let mut rng = Rng::new(11);
        let schemes = [Scheme::INT8, Scheme::FP8, Scheme::FP8_TENSOR, Scheme::FP8_CHANNEL];
        for (t, &(m, k, parts, block)) in
            [(1, 3, &[5][..], 2), (67, 33, &[7, 10][..], 3), (130, 64, &[16, 1, 47][..], 64), (5, 129, &[9][..], 4)]
                .iter()
                .enumerate()
        {
            let scheme = schemes[t % schemes.len()];
            let n: usize = parts.iter().sum();
            let qs: Vec<_> =
                parts.iter().map(|&r| quantize(scheme, &rng.normal_vec(r * k, 0.7), r, k).unwrap()).collect();
            let w = QWeight {
                segments: qs
                    .iter()
                    .zip(parts.iter())
                    .map(|(qz, &r)| QRows { code: scheme.code, q: &qz.q, scale: Cow::Owned(qz.scale.rows(0..r)) })
                    .collect(),
                k,
            };
            let dense = w.dequantize();
            let x = rng.normal_vec(m * k, 1.0);
            let b = rng.normal_vec(n, 1.0);
            let mut want = vec![0f32; m * n];
            linear_forward(&mut want, &x, &dense, Some(&b), m, k, n);
            let mut got = vec![f32::NAN; m * n];
            qlinear_forward_blocked(&mut got, &x, &w, Some(&b), m, k, n, block);
            assert!(rel_l2(&got, &want) <= 1e-6, "forward {m}×{k}×{n}: {}", rel_l2(&got, &want));
            qlinear_forward(&mut got, &x, &w, None, m, k, n);
            linear_forward(&mut want, &x, &dense, None, m, k, n);
            assert!(rel_l2(&got, &want) <= 1e-6, "forward, no bias: {}", rel_l2(&got, &want));

            let dy = rng.normal_vec(m * n, 1.0);
            let mut want = vec![0f32; m * k];
            linear_backward_input(&mut want, &dy, &dense, m, k, n, 0.0);
            let mut got = vec![f32::NAN; m * k];
            qlinear_backward_input_blocked(&mut got, &dy, &w, m, k, n, 0.0, block);
            assert!(rel_l2(&got, &want) <= 1e-6, "backward {m}×{k}×{n}: {}", rel_l2(&got, &want));
            // Accumulating adds the same product again.
            qlinear_backward_input(&mut got, &dy, &w, m, k, n, 1.0);
            let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
            assert!(rel_l2(&got, &twice) <= 1e-6, "backward accumulate: {}", rel_l2(&got, &twice));
        }
    }
}
