//! The image ops of the autoencoder, NCHW: 2-D convolution (im2col + the crate's sgemm), GroupNorm
//! with affine, and nearest 2× upsampling. Forward only: the autoencoder is frozen in training.

use super::matmul::gemm;
use rayon::prelude::*;

/// Zero padding of a convolution's input, per side. PyTorch's `F.pad(x, (left, right, top, bottom))`
/// order is spelled out so BFL's asymmetric pad before the stride-2 downsample reads as what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pad2d {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Pad2d {
    /// The same padding on every side (`nn.Conv2d(padding=p)`).
    pub const fn uniform(p: usize) -> Pad2d {
        Pad2d { top: p, bottom: p, left: p, right: p }
    }

    /// BFL `Downsample`: `F.pad(x, (0, 1, 0, 1))` then a stride-2 conv with padding 0 (diffusers
    /// `Downsample2D(padding=0)` does the same), so the output is exactly h/2 × w/2 for even sizes.
    pub const DOWNSAMPLE: Pad2d = Pad2d { top: 0, bottom: 1, left: 0, right: 1 };
}

/// Output size of a convolution along one axis.
pub fn conv_out_size(n: usize, k: usize, stride: usize, pad_lo: usize, pad_hi: usize) -> usize {
    let padded = n + pad_lo + pad_hi;
    assert!(padded >= k && stride > 0, "conv: kernel {k} larger than padded input {padded}");
    (padded - k) / stride + 1
}

/// Output pixels per parallel task: enough columns for the packed sgemm to run at speed, few
/// enough that the im2col buffer of a 512-channel 3×3 conv (512·9 × this) stays around 10 MB.
const PIX_BLOCK: usize = 512;

/// out[b, cout, ho, wo] = Σ_{ci,ky,kx} weight[cout, ci, ky, kx] · inp_padded[b, ci, ho·s + ky, wo·s + kx]
/// + bias[cout] (PyTorch's `nn.Conv2d` with dilation 1 and groups 1, after `F.pad` by `pad`).
///
/// Tasks are blocks of whole output rows of one image: each builds the im2col matrix of its rows
/// [cin·k·k, pixels], multiplies it by the weight [cout, cin·k·k] into a local block, and the blocks are
/// copied into place afterwards (in NCHW a row block of all channels is not one contiguous slice).
pub fn conv2d_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad2d,
) {
    let ho = conv_out_size(h, k, stride, pad.top, pad.bottom);
    let wo = conv_out_size(w, k, stride, pad.left, pad.right);
    let (hw, hwo, kk) = (h * w, ho * wo, cin * k * k);
    assert_eq!(inp.len(), b * cin * hw, "conv2d: inp");
    assert_eq!(out.len(), b * cout * hwo, "conv2d: out");
    assert_eq!(weight.len(), cout * kk, "conv2d: weight");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), cout, "conv2d: bias");
    }
    if out.is_empty() {
        return;
    }
    // A 1×1 stride-1 unpadded conv is a plain matmul over the input as it lies: no im2col.
    let pointwise = k == 1 && stride == 1 && pad == Pad2d::uniform(0);
    // Enough tasks to keep every core busy on the small mid-level images too.
    let spread = (b * ho).div_ceil(4 * rayon::current_num_threads());
    let rows_per_task = (PIX_BLOCK / wo).min(spread).clamp(1, ho);
    let tasks: Vec<(usize, usize)> =
        (0..b).flat_map(|bi| (0..ho).step_by(rows_per_task).map(move |y0| (bi, y0))).collect();
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(bi, y0)| {
            let y1 = (y0 + rows_per_task).min(ho);
            let npix = (y1 - y0) * wo;
            let x = &inp[bi * cin * hw..(bi + 1) * cin * hw];
            let mut blk = vec![0f32; cout * npix];
            if let Some(bias) = bias {
                blk.chunks_mut(npix).zip(bias).for_each(|(r, &v)| r.fill(v));
            }
            if pointwise {
                gemm(cout, cin, npix, 1.0, weight, (cin, 1), &x[y0 * w..], (hw, 1), 1.0, &mut blk, (npix, 1));
            } else {
                let cols = im2col(x, cin, h, w, k, stride, pad, y0, y1, wo);
                gemm(cout, kk, npix, 1.0, weight, (kk, 1), &cols, (npix, 1), 1.0, &mut blk, (npix, 1));
            }
            blk
        })
        .collect();
    // Scatter: the destination of each (image, channel) plane gathers its row blocks.
    out.par_chunks_mut(hwo).enumerate().for_each(|(plane, dst)| {
        let (bi, co) = (plane / cout, plane % cout);
        let first = bi * ho.div_ceil(rows_per_task);
        for (t, blk) in blocks[first..first + ho.div_ceil(rows_per_task)].iter().enumerate() {
            let y0 = t * rows_per_task;
            let npix = blk.len() / cout;
            dst[y0 * wo..y0 * wo + npix].copy_from_slice(&blk[co * npix..(co + 1) * npix]);
        }
    });
}

/// The im2col matrix of output rows y0..y1 of one image x [cin, h, w]: row (ci·k + ky)·k + kx, column
/// (y − y0)·wo + xo holds x[ci, y·s + ky − top, xo·s + kx − left], zero where that falls in the padding.
fn im2col(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: Pad2d,
    y0: usize,
    y1: usize,
    wo: usize,
) -> Vec<f32> {
    let npix = (y1 - y0) * wo;
    let mut cols = vec![0f32; cin * k * k * npix];
    for (r, col) in cols.chunks_mut(npix).enumerate() {
        let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for y in y0..y1 {
            // Input row iy = y·s + ky − top; skip rows in the padding (left as zeros).
            let Some(iy) = (y * stride + ky).checked_sub(pad.top).filter(|&iy| iy < h) else { continue };
            let src = &plane[iy * w..(iy + 1) * w];
            let dst = &mut col[(y - y0) * wo..(y - y0 + 1) * wo];
            if stride == 1 && kx >= pad.left && kx - pad.left + wo <= w {
                // Common case (3×3, pad 1, interior taps): one contiguous copy.
                dst.copy_from_slice(&src[kx - pad.left..kx - pad.left + wo]);
                continue;
            }
            for (xo, d) in dst.iter_mut().enumerate() {
                if let Some(ix) = (xo * stride + kx).checked_sub(pad.left).filter(|&ix| ix < w) {
                    *d = src[ix];
                }
            }
        }
    }
    cols
}

/// GroupNorm (PyTorch `nn.GroupNorm(groups, c, eps, affine=True)`): per image and group of c/groups
/// channels, out = (x − mean) / √(var + eps) · weight[c] + bias[c], with the biased variance over
/// (c/groups)·hw values. Mean and variance are accumulated in f64: a group of the FLUX decoder's last
/// level holds 4·1024² values, more than f32 sums keep to 1e-6.
pub fn group_norm_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    groups: usize,
    eps: f32,
) {
    assert!(groups > 0 && c.is_multiple_of(groups), "group_norm: {c} channels do not split into {groups} groups");
    assert_eq!(inp.len(), b * c * hw, "group_norm: inp");
    assert_eq!(out.len(), b * c * hw, "group_norm: out");
    assert_eq!(weight.len(), c, "group_norm: weight");
    assert_eq!(bias.len(), c, "group_norm: bias");
    let cg = c / groups;
    let n = cg * hw;
    if n == 0 {
        return;
    }
    out.par_chunks_mut(n).zip(inp.par_chunks(n)).enumerate().for_each(|(bg, (o, x))| {
        let g = bg % groups;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (ci, (oc, xc)) in o.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
            // Fold the affine into one multiply-add per element.
            let a = rstd * weight[g * cg + ci] as f64;
            let s = bias[g * cg + ci] as f64 - mean * a;
            let (a, s) = (a as f32, s as f32);
            oc.iter_mut().zip(xc).for_each(|(o, &v)| *o = v * a + s);
        }
    });
}

/// Nearest-neighbour 2× upsampling (`F.interpolate(x, scale_factor=2.0, mode="nearest")`):
/// out[b, c, y, x] = inp[b, c, y/2, x/2], out [b, c, 2h, 2w].
pub fn upsample_nearest2x_forward(out: &mut [f32], inp: &[f32], b: usize, c: usize, h: usize, w: usize) {
    assert_eq!(inp.len(), b * c * h * w, "upsample: inp");
    assert_eq!(out.len(), b * c * 4 * h * w, "upsample: out");
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(4 * h * w).zip(inp.par_chunks(h * w)).for_each(|(o, x)| {
        for (y, orows) in o.chunks_mut(4 * w).enumerate() {
            let src = &x[y * w..(y + 1) * w];
            let (r0, r1) = orows.split_at_mut(2 * w);
            for (pair, &v) in r0.chunks_mut(2).zip(src) {
                pair.fill(v);
            }
            r1.copy_from_slice(r0);
        }
    });
}

/// Query rows per parallel task of `spatial_attention_forward`.
const QUERY_BLOCK: usize = 64;

/// Single-head attention over the pixels of each image: out[b, l, d] = softmax(q kᵀ / √d) v, with q, k,
/// v [b, l, d] (positions × channels). The same numerics as `attention::attention_forward` (max-shifted
/// exponentials, f64 row sums), but split into blocks of query rows: the autoencoder's mid attention has
/// one head and one image, so splitting over (batch, head) would leave every core but one idle, and a
/// 1024² image (l = 128² = 16384) would need a 1 GB score matrix; a block needs QUERY_BLOCK·l floats.
pub fn spatial_attention_forward(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], b: usize, l: usize, d: usize) {
    let n = l * d;
    assert_eq!(q.len(), b * n, "spatial attention: q");
    assert_eq!(k.len(), b * n, "spatial attention: k");
    assert_eq!(v.len(), b * n, "spatial attention: v");
    assert_eq!(out.len(), b * n, "spatial attention: out");
    if out.is_empty() {
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    // Blocks never straddle two images: each image's rows are chunked on their own.
    let tasks = out
        .par_chunks_mut(n)
        .enumerate()
        .flat_map(|(bi, o)| o.par_chunks_mut(QUERY_BLOCK * d).enumerate().map(move |(j, c)| (bi, j * QUERY_BLOCK, c)));
    tasks.for_each(|(bi, q0, o)| {
        let rows = o.len() / d;
        let (qb, kb, vb) = (&q[bi * n + q0 * d..], &k[bi * n..(bi + 1) * n], &v[bi * n..(bi + 1) * n]);
        let mut s = vec![0f32; rows * l];
        gemm(rows, d, l, scale, qb, (d, 1), kb, (1, d), 0.0, &mut s, (l, 1));
        for row in s.chunks_mut(l) {
            crate::ops::attention::softmax_in_place(row);
        }
        gemm(rows, l, d, 1.0, &s, (l, 1), vb, (d, 1), 0.0, o, (d, 1));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{rel_l2, Rng};

    #[test]
    fn spatial_attention_matches_attention_forward() {
        let mut rng = Rng::new(5);
        // l = 150 spans three query blocks, the last one ragged.
        let (b, l, d) = (2, 150, 8);
        let q = rng.normal_vec(b * l * d, 1.0);
        let k = rng.normal_vec(b * l * d, 1.0);
        let v = rng.normal_vec(b * l * d, 1.0);
        let mut want = vec![0f32; b * l * d];
        let mut lse = vec![0f32; b * l];
        super::super::attention::attention_forward(&mut want, &mut lse, &q, &k, &v, b, 1, l, d);
        let mut out = vec![f32::NAN; b * l * d];
        spatial_attention_forward(&mut out, &q, &k, &v, b, l, d);
        assert!(rel_l2(&out, &want) < 1e-6, "{}", rel_l2(&out, &want));
    }

    /// The definition, in f64, with the padding read as zeros.
    fn conv_naive(
        x: &[f32],
        wt: &[f32],
        bias: &[f32],
        b: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        s: usize,
        p: Pad2d,
    ) -> Vec<f32> {
        let ho = (h + p.top + p.bottom - k) / s + 1;
        let wo = (w + p.left + p.right - k) / s + 1;
        let mut out = vec![0f32; b * cout * ho * wo];
        for bi in 0..b {
            for co in 0..cout {
                for y in 0..ho {
                    for xo in 0..wo {
                        let mut acc = bias[co] as f64;
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (y * s + ky) as isize - p.top as isize;
                                    let ix = (xo * s + kx) as isize - p.left as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * cin + ci) * h + iy as usize) * w + ix as usize];
                                    acc += xv as f64 * wt[((co * cin + ci) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                        out[((bi * cout + co) * ho + y) * wo + xo] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv2d_matches_naive_loop() {
        let mut rng = Rng::new(7);
        let cases = [
            // (b, cin, h, w, cout, k, stride, pad)
            (2, 3, 9, 7, 5, 3, 1, Pad2d::uniform(1)),
            (1, 4, 8, 8, 6, 3, 2, Pad2d::DOWNSAMPLE),
            (2, 3, 7, 9, 4, 3, 2, Pad2d::DOWNSAMPLE), // odd sizes: the last row/column meets the pad
            (1, 5, 6, 11, 3, 1, 1, Pad2d::uniform(0)), // pointwise fast path
            (2, 2, 5, 5, 3, 1, 2, Pad2d::uniform(0)),
            (1, 2, 40, 30, 3, 3, 1, Pad2d::uniform(1)), // several row blocks (30·40 > PIX_BLOCK)
            (1, 3, 6, 5, 2, 3, 1, Pad2d { top: 2, bottom: 0, left: 1, right: 3 }),
        ];
        for &(b, cin, h, w, cout, k, s, p) in &cases {
            let x = rng.normal_vec(b * cin * h * w, 1.0);
            let wt = rng.normal_vec(cout * cin * k * k, 1.0);
            let bias = rng.normal_vec(cout, 1.0);
            let want = conv_naive(&x, &wt, &bias, b, cin, h, w, cout, k, s, p);
            let mut out = vec![f32::NAN; want.len()];
            conv2d_forward(&mut out, &x, &wt, Some(&bias), b, cin, h, w, cout, k, s, p);
            let err = rel_l2(&out, &want);
            assert!(err < 1e-6, "case {:?}: rel L2 {err:e}", (b, cin, h, w, cout, k, s, p));
            let mut nob = vec![f32::NAN; want.len()];
            conv2d_forward(&mut nob, &x, &wt, None, b, cin, h, w, cout, k, s, p);
            let ho_wo = want.len() / (b * cout);
            let shifted: Vec<f32> = nob.iter().enumerate().map(|(i, v)| v + bias[i / ho_wo % cout]).collect();
            assert!(rel_l2(&shifted, &want) < 1e-6);
        }
        assert_eq!(conv_out_size(8, 3, 2, 0, 1), 4);
        assert_eq!(conv_out_size(7, 3, 2, 0, 1), 3);
    }

    #[test]
    fn group_norm_matches_definition() {
        let mut rng = Rng::new(11);
        let (b, c, hw, groups) = (2, 6, 10, 3);
        // An offset mean checks the variance is taken around the mean, not around zero.
        let x: Vec<f32> = rng.normal_vec(b * c * hw, 2.0).iter().map(|v| v + 5.0).collect();
        let wt = rng.normal_vec(c, 1.0);
        let bias = rng.normal_vec(c, 1.0);
        let mut out = vec![f32::NAN; x.len()];
        group_norm_forward(&mut out, &x, &wt, &bias, b, c, hw, groups, 1e-6);
        let cg = c / groups;
        for bi in 0..b {
            for g in 0..groups {
                let idx = |ci: usize, p: usize| (bi * c + g * cg + ci) * hw + p;
                let vals: Vec<f64> =
                    (0..cg).flat_map(|ci| (0..hw).map(move |p| (ci, p))).map(|(ci, p)| x[idx(ci, p)] as f64).collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                for ci in 0..cg {
                    for p in 0..hw {
                        let want = (x[idx(ci, p)] as f64 - mean) / (var + 1e-6).sqrt() * wt[g * cg + ci] as f64
                            + bias[g * cg + ci] as f64;
                        assert!((out[idx(ci, p)] as f64 - want).abs() < 1e-5, "{} vs {want}", out[idx(ci, p)]);
                    }
                }
            }
        }
        // torch: nn.GroupNorm(1, 2, eps=1e-6) of [[1, 2], [3, 4]] (one pixel per row) = ±1.3416, ±0.4472.
        let mut o = [0f32; 4];
        group_norm_forward(&mut o, &[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0], &[0.0, 0.0], 1, 2, 2, 1, 1e-6);
        assert!((o[0] + 1.341_640_7).abs() < 1e-5 && (o[2] - 0.447_213_6).abs() < 1e-5, "{o:?}");
    }

    #[test]
    fn upsample_repeats_each_pixel_2x2() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0f32; 24];
        upsample_nearest2x_forward(&mut out, &x, 1, 1, 2, 3);
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
        ];
        assert_eq!(out, want);
    }
}
