//! Dense matmuls of the CPU reference: a packed sgemm (matrixmultiply) per block of rows,
//! blocks spread over cores with rayon.

use rayon::prelude::*;
use std::ops::Range;

/// Rows per parallel task for `m` rows: one task per worker. Each task packs the whole weight
/// once, so fewer, larger tasks pack it fewer times: at 2 threads, 1152×512×1536 ran at 427
/// GFLOP/s in two halves against 303 in 64-row blocks (matrixmultiply's AVX-512 kernel, one run
/// side by side; packing was 18 % of a LoRA gradient's time in 64-row blocks, perf).
/// Below `PAR_MIN_WORK` multiply-adds (about 20 µs on one core) the product runs as one task:
/// waking the other workers costs more than it saves (the built-in demo's width-64 model spent
/// 23 % of its time in thread switches and lock contention, perf).
fn row_block(m: usize, work: usize) -> usize {
    if work < PAR_MIN_WORK {
        return m.max(1);
    }
    m.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// The smallest product (m·n·k multiply-adds) split over the cores.
const PAR_MIN_WORK: usize = 1 << 22;

/// C[m,n] = alpha · A[m,k] · B[k,n] + beta · C, with explicit (row, column) strides.
/// # Safety-relevant contract
/// Slices must cover every index the strides reach; checked by the callers' shape asserts.
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() > last_index(m, rsc, n, csc), "gemm: C too short");
    // SAFETY: the assert above bounds every element of C that sgemm reads or writes.
    unsafe { sgemm_into(m, k, n, alpha, a, (rsa, csa), b, (rsb, csb), beta, c.as_mut_ptr(), (rsc, csc)) }
}

/// The flat index of element (r − 1, cc − 1) of a strided matrix: the last one it reaches.
fn last_index(r: usize, rs: usize, cc: usize, cs: usize) -> usize {
    (r - 1) * rs + (cc - 1) * cs
}

/// sgemm with A and B checked against their slices; C is a raw pointer for the callers that
/// write disjoint parts of one buffer from several threads.
/// # Safety
/// Every element C[i·rsc + j·csc] for i < m, j < n must be valid to read and write, and no other
/// thread may touch it during the call. m and n are non-zero.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_into(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: *mut f32,
    (rsc, csc): (usize, usize),
) {
    assert!(k == 0 || a.len() > last_index(m, rsa, k, csa), "gemm: A too short");
    assert!(k == 0 || b.len() > last_index(k, rsb, n, csb), "gemm: B too short");
    // SAFETY: A and B are bounded by the asserts above, C by the caller's contract.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c,
            rsc as isize,
            csc as isize,
        );
    }
}

/// `gemm` into a contiguous C [m, n] (row stride n), its rows split over the cores.
#[allow(clippy::too_many_arguments)]
pub fn gemm_par_rows(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    sb: (usize, usize),
    beta: f32,
    c: &mut [f32],
) {
    assert_eq!(c.len(), m * n, "gemm: C");
    if m == 0 || n == 0 {
        return;
    }
    let rb = row_block(m, m * n * k);
    c.par_chunks_mut(rb * n).enumerate().for_each(|(blk, c)| {
        let rows = c.len() / n;
        gemm(rows, k, n, alpha, a.get(blk * rb * rsa..).unwrap_or(&[]), (rsa, csa), b, sb, beta, c, (n, 1));
    });
}

/// `gemm` into a contiguous C [m, n] with few rows and many columns (a LoRA factor's
/// gradient, [rank, d_in]), its columns split over the cores.
#[allow(clippy::too_many_arguments)]
pub fn gemm_par_cols(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
) {
    assert_eq!(c.len(), m * n, "gemm: C");
    if m == 0 || n == 0 {
        return;
    }
    if m * n * k < PAR_MIN_WORK {
        return gemm(m, k, n, alpha, a, sa, b, (rsb, csb), beta, c, (n, 1));
    }
    par_column_blocks(c, m, n, |blk| {
        let b = b.get(blk.cols.start * csb..).unwrap_or(&[]);
        blk.gemm(blk.cols.clone(), k, alpha, a, sa, b, (rsb, csb), beta);
    });
}

/// out[m, n] = inp[m, k] · weight[n, k]ᵀ + bias[n]   (PyTorch's nn.Linear layout)
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "linear: out");
    assert_eq!(inp.len(), m * k, "linear: inp");
    assert_eq!(weight.len(), n * k, "linear: weight");
    linear_forward_pieces(out, inp, &[(0..n, weight)], bias, m, k, n)
}

/// `linear_forward` with the weight in pieces of whole rows, each with its output columns
/// (`Param::row_pieces`: a fused qkv stored as separate q, k, v, multiplied where they lie).
pub fn linear_forward_pieces<W: AsRef<[f32]> + Sync>(
    out: &mut [f32],
    inp: &[f32],
    pieces: &[(Range<usize>, W)],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n, "linear: out");
    assert_eq!(inp.len(), m * k, "linear: inp");
    check_pieces(pieces, k, n);
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias");
    }
    if n == 0 || m == 0 {
        return;
    }
    if split_columns(m, n, k) {
        out.par_chunks_mut(n).for_each(|r| fill_bias(r, bias));
        par_column_blocks(out, m, n, |c| {
            for (pr, w) in pieces {
                let (a, b) = (pr.start.max(c.cols.start), pr.end.min(c.cols.end));
                if a < b {
                    c.gemm(a..b, k, 1.0, inp, (k, 1), &w.as_ref()[(a - pr.start) * k..], (1, k), 1.0);
                }
            }
        });
        return;
    }
    let rb = row_block(m, m * n * k);
    out.par_chunks_mut(rb * n).enumerate().for_each(|(blk, o)| {
        let rows = o.len() / n;
        let x = &inp[blk * rb * k..(blk * rb + rows) * k];
        o.chunks_mut(n).for_each(|r| fill_bias(r, bias));
        for (cols, w) in pieces {
            gemm(rows, k, cols.len(), 1.0, x, (k, 1), w.as_ref(), (1, k), 1.0, &mut o[cols.start..], (n, 1));
        }
    });
}

/// One output row set to the bias, or to zero without one.
fn fill_bias(row: &mut [f32], bias: Option<&[f32]>) {
    match bias {
        Some(b) => row.copy_from_slice(b),
        None => row.fill(0.0),
    }
}

/// Whether an [m, n] product splits its output columns over the cores (each core packs its own
/// slice of the weight once) rather than its rows (each core packs the whole weight: twice the
/// weight's memory traffic at 2 threads). Columns when the output is at least as wide as it is
/// tall, so what is read twice is the activation, the smaller operand.
fn split_columns(m: usize, n: usize, k: usize) -> bool {
    let t = rayon::current_num_threads();
    t > 1 && n >= m && n >= 64 * t && m * n * k >= PAR_MIN_WORK
}

/// One core's columns `cols` of a row-major [m, n] output that other cores write other
/// columns of; `gemm` writes through it inside those columns only.
struct ColumnBlock<'a> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    cols: Range<usize>,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: blocks of one output cover disjoint column ranges (par_column_blocks), so no element
// is reachable from two threads.
unsafe impl Send for ColumnBlock<'_> {}
unsafe impl Sync for ColumnBlock<'_> {}

impl ColumnBlock<'_> {
    /// C[:, cols] = alpha·A[m, kk]·B[kk, cols.len()] + beta·C[:, cols], with explicit strides for
    /// A and B; `cols` must lie inside this block's columns.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        cols: Range<usize>,
        kk: usize,
        alpha: f32,
        a: &[f32],
        sa: (usize, usize),
        b: &[f32],
        sb: (usize, usize),
        beta: f32,
    ) {
        assert!(
            cols.start >= self.cols.start && cols.end <= self.cols.end && cols.start < cols.end,
            "gemm: columns {cols:?} outside {:?}",
            self.cols
        );
        // SAFETY: rows 0..m, columns `cols` of the [m, n] buffer behind ptr (its length m·n was
        // checked by par_column_blocks): inside this block's columns, which no other block has.
        unsafe {
            sgemm_into(self.m, kk, cols.len(), alpha, a, sa, b, sb, beta, self.ptr.add(cols.start), (self.n, 1));
        }
    }
}

/// Calls `f` once per core, in parallel, with one block of `out`'s columns each (multiples of
/// 16 wide, the AVX-512 kernel's width, the last block taking the rest).
fn par_column_blocks<'a>(out: &'a mut [f32], m: usize, n: usize, f: impl Fn(&ColumnBlock<'a>) + Sync + Send) {
    assert_eq!(out.len(), m * n, "column blocks: out");
    let t = rayon::current_num_threads().max(1);
    let w = n.div_ceil(t).next_multiple_of(16);
    let ptr = out.as_mut_ptr();
    let blocks: Vec<ColumnBlock<'a>> = (0..n.div_ceil(w))
        .map(|i| ColumnBlock { ptr, m, n, cols: i * w..((i + 1) * w).min(n), _out: std::marker::PhantomData })
        .collect();
    blocks.par_iter().for_each(f);
}

/// The pieces tile 0..n in order, each holding its rows × k values.
fn check_pieces<W: AsRef<[f32]>>(pieces: &[(Range<usize>, W)], k: usize, n: usize) {
    let mut at = 0;
    for (cols, w) in pieces {
        assert_eq!(cols.start, at, "linear: weight pieces out of order");
        assert_eq!(w.as_ref().len(), cols.len() * k, "linear: weight piece {cols:?}");
        at = cols.end;
    }
    assert_eq!(at, n, "linear: weight pieces cover {at} of {n} rows");
}

/// Input gradient of `linear_forward` through a frozen weight: dinp[m, k] (+)= dout[m, n]·W[n, k].
/// `beta` 0 overwrites, 1 accumulates. No weight or bias gradient: the base stays frozen.
pub fn linear_backward_input(dinp: &mut [f32], dout: &[f32], weight: &[f32], m: usize, k: usize, n: usize, beta: f32) {
    assert_eq!(dinp.len(), m * k, "linear backward: dinp");
    assert_eq!(dout.len(), m * n, "linear backward: dout");
    linear_backward_input_pieces(dinp, dout, &[(0..n, weight)], m, k, n, beta)
}

/// `linear_backward_input` with the weight in row pieces (`linear_forward_pieces`).
pub fn linear_backward_input_pieces<W: AsRef<[f32]> + Sync>(
    dinp: &mut [f32],
    dout: &[f32],
    pieces: &[(Range<usize>, W)],
    m: usize,
    k: usize,
    n: usize,
    beta: f32,
) {
    assert_eq!(dinp.len(), m * k, "linear backward: dinp");
    assert_eq!(dout.len(), m * n, "linear backward: dout");
    check_pieces(pieces, k, n);
    if k == 0 || m == 0 {
        return;
    }
    if split_columns(m, k, n) {
        if pieces.is_empty() && beta == 0.0 {
            dinp.fill(0.0);
        }
        par_column_blocks(dinp, m, k, |c| {
            for (i, (pr, w)) in pieces.iter().enumerate() {
                let beta = if i == 0 { beta } else { 1.0 };
                // An empty piece multiplies nothing (kk = 0: C = beta·C).
                let w = w.as_ref().get(c.cols.start..).unwrap_or(&[]);
                c.gemm(c.cols.clone(), pr.len(), 1.0, dout.get(pr.start..).unwrap_or(&[]), (n, 1), w, (k, 1), beta);
            }
        });
        return;
    }
    let rb = row_block(m, m * n * k);
    dinp.par_chunks_mut(rb * k).enumerate().for_each(|(blk, dx)| {
        let rows = dx.len() / k;
        let dy = &dout[blk * rb * n..(blk * rb + rows) * n];
        if pieces.is_empty() && beta == 0.0 {
            dx.fill(0.0);
        }
        for (i, (cols, w)) in pieces.iter().enumerate() {
            let beta = if i == 0 { beta } else { 1.0 };
            gemm(rows, cols.len(), k, 1.0, &dy[cols.start..], (n, 1), w.as_ref(), (k, 1), beta, dx, (k, 1));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{rel_l2, Rng};

    #[test]
    fn linear_matches_naive_on_ragged_shapes() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[(1, 3, 5), (67, 33, 17), (130, 8, 64)] {
            let x = rng.normal_vec(m * k, 1.0);
            let w = rng.normal_vec(n * k, 1.0);
            let b = rng.normal_vec(n, 1.0);
            let mut out = vec![f32::NAN; m * n];
            linear_forward(&mut out, &x, &w, Some(&b), m, k, n);
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut s = b[j] as f64;
                    for p in 0..k {
                        s += x[i * k + p] as f64 * w[j * k + p] as f64;
                    }
                    want[i * n + j] = s as f32;
                }
            }
            assert!(rel_l2(&out, &want) < 1e-6);
        }
    }

    #[test]
    fn pieces_match_the_whole_weight() {
        let mut rng = Rng::new(2);
        for &(m, k, n, cuts) in &[
            (70usize, 24usize, 30usize, &[0usize, 7, 7, 19, 30][..]),
            (5, 9, 12, &[0, 12]),
            (129, 16, 48, &[0, 16, 32, 48]),
        ] {
            let x = rng.normal_vec(m * k, 1.0);
            let w = rng.normal_vec(n * k, 1.0);
            let b = rng.normal_vec(n, 1.0);
            let pieces: Vec<(Range<usize>, &[f32])> =
                cuts.windows(2).map(|c| (c[0]..c[1], &w[c[0] * k..c[1] * k])).collect();
            let (mut whole, mut split) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            linear_forward(&mut whole, &x, &w, Some(&b), m, k, n);
            linear_forward_pieces(&mut split, &x, &pieces, Some(&b), m, k, n);
            assert!(rel_l2(&split, &whole) < 1e-6, "forward {m}x{k}x{n}");
            let dy = rng.normal_vec(m * n, 1.0);
            let (mut dw, mut ds) = (vec![f32::NAN; m * k], vec![f32::NAN; m * k]);
            linear_backward_input(&mut dw, &dy, &w, m, k, n, 0.0);
            linear_backward_input_pieces(&mut ds, &dy, &pieces, m, k, n, 0.0);
            assert!(rel_l2(&ds, &dw) < 1e-6, "backward {m}x{k}x{n}");
            // beta 1 accumulates into what is there.
            let mut acc = dw.clone();
            linear_backward_input_pieces(&mut acc, &dy, &pieces, m, k, n, 1.0);
            let twice: Vec<f32> = dw.iter().map(|v| 2.0 * v).collect();
            assert!(rel_l2(&acc, &twice) < 1e-6, "backward accumulate {m}x{k}x{n}");
        }
    }

    #[test]
    fn row_blocks_cover_every_row_in_whole_rounds() {
        for m in [1usize, 2, 63, 64, 65, 320, 1152, 4097] {
            let rb = row_block(m, PAR_MIN_WORK);
            assert!(rb >= 1);
            assert_eq!(row_block(m, PAR_MIN_WORK - 1), m, "small products run as one task");
            let tasks = m.div_ceil(rb);
            assert!(tasks * rb >= m && (tasks - 1) * rb < m);
        }
    }
}
