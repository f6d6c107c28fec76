//! Dense matmuls of the CPU reference: a packed sgemm (matrixmultiply) per block of rows,
//! blocks spread over cores with rayon.

use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise packing the weight, small enough to split
/// a few hundred tokens over the cores.
const ROW_BLOCK: usize = 64;

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
    let last = |r: usize, rs: usize, cc: usize, cs: usize| (r - 1) * rs + (cc - 1) * cs;
    assert!(k == 0 || a.len() > last(m, rsa, k, csa), "gemm: A too short");
    assert!(k == 0 || b.len() > last(k, rsb, n, csb), "gemm: B too short");
    assert!(c.len() > last(m, rsc, n, csc), "gemm: C too short");
    // SAFETY: the asserts above bound every element sgemm reads or writes.
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
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
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
    out.par_chunks_mut(ROW_BLOCK * n).enumerate().for_each(|(blk, o)| {
        let rows = o.len() / n;
        let x = &inp[blk * ROW_BLOCK * k..(blk * ROW_BLOCK + rows) * k];
        match bias {
            Some(b) => {
                assert_eq!(b.len(), n, "linear: bias");
                o.chunks_mut(n).for_each(|r| r.copy_from_slice(b));
            }
            None => o.fill(0.0),
        }
        gemm(rows, k, n, 1.0, x, (k, 1), weight, (1, k), 1.0, o, (n, 1));
    });
}

/// Input gradient of `linear_forward` through a frozen weight: dinp[m, k] (+)= dout[m, n]·W[n, k].
/// `beta` 0 overwrites, 1 accumulates. No weight or bias gradient: the base stays frozen.
pub fn linear_backward_input(dinp: &mut [f32], dout: &[f32], weight: &[f32], m: usize, k: usize, n: usize, beta: f32) {
    assert_eq!(dinp.len(), m * k, "linear backward: dinp");
    assert_eq!(dout.len(), m * n, "linear backward: dout");
    assert_eq!(weight.len(), n * k, "linear backward: weight");
    dinp.par_chunks_mut(ROW_BLOCK * k).enumerate().for_each(|(blk, dx)| {
        let rows = dx.len() / k;
        let dy = &dout[blk * ROW_BLOCK * n..(blk * ROW_BLOCK + rows) * n];
        gemm(rows, n, k, 1.0, dy, (n, 1), weight, (k, 1), beta, dx, (k, 1));
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
}
