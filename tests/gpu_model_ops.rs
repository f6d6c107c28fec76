//! The whole-model step's layout and pointwise kernels (kernels/copy.cu, attention.cu,
//! activation.cu, embedding.cu and random.cu through their src/kernels wrappers; host-slice twins
//! in tests/common/gpu.rs) against their CPU twins: casts and strided copies, the attention
//! prologue (QK-RMSNorm per head + RoPE) and its backward, merge_heads and its backward,
//! GELU-tanh on strided windows, the timestep embedding and the random initialisation. Fresh
//! random inputs every run (seed printed on failure; FK_TEST_SEED replays), outputs poisoned with
//! NaN first, and everything outside the written window must still be NaN afterwards. Without a
//! GPU (or without nvcc at build time) each test writes why it is skipped.

mod common;
use common::gpu::{QkHostInputs, Twins};
use common::{check, fresh_seed, gpu_or_skip, normal_bf16};
use flux_kernels::kernels::attention::HeadsDims;
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::kernels::launch::{DevMat, View};
use flux_kernels::model::attention::QK_NORM_EPS;
use flux_kernels::model::embed::{MAX_PERIOD, TIME_FACTOR};
use flux_kernels::model::random::{Init, RandomParam};
use flux_kernels::ops::activation::{gelu_tanh_backward, gelu_tanh_forward};
use flux_kernels::ops::attention::{merge_heads, split_heads};
use flux_kernels::ops::embedding::timestep_embedding;
use flux_kernels::ops::norm::{rmsnorm_backward, rmsnorm_forward};
use flux_kernels::ops::rope::{rope_backward, rope_forward, rope_tables};
use flux_kernels::util::Rng;
use half::bf16;

/// f32 kernels against f32 (or f64-accumulated) CPU code.
const TOL: f64 = 1e-5;
/// Outputs stored as bf16, against the CPU's f32 rounded to bf16.
const TOL_BF16: f64 = 1e-2;

fn ops_or_skip(test: &str) -> Option<Twins> {
    gpu_or_skip(test, Gpu::new().and_then(|g| Twins::new(&g)))
}

/// The device and the kernels, for tests that allocate device buffers themselves.
fn gpu_and_ops_or_skip(test: &str) -> Option<(Gpu, Twins)> {
    gpu_or_skip(
        test,
        Gpu::new().and_then(|g| {
            let ops = Twins::new(&g)?;
            Ok((g, ops))
        }),
    )
}

/// bf16 outputs against the CPU's f32 values rounded to bf16: rel L2 within TOL_BF16, and the
/// count of elements whose bits differ printed (a flipped rounding of a value one f32 ulp off).
fn check_bf16(what: &str, got: &[bf16], want_f32: &[f32], seed: u64) {
    let want: Vec<bf16> = want_f32.iter().map(|&v| bf16::from_f32(v)).collect();
    let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    println!("{what}: {differ} of {} bf16 values differ in any bit", got.len());
    check(what, &f32s(got), &f32s(&want), TOL_BF16, seed);
}

/// Bit-for-bit equality (layout moves, casts, the random fill).
fn check_bits<T: Copy + PartialEq + std::fmt::Debug>(
    what: &str,
    got: &[T],
    want: &[T],
    bits: impl Fn(T) -> u32,
    seed: u64,
) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| bits(got[i]) != bits(want[i])) {
        panic!("{what}: element {i} is {:?}, want {:?}; seed {seed}", got[i], want[i]);
    }
    println!("{what}: all {} elements equal bit for bit", got.len());
}

fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// A buffer viewed as [outer, mid, inner]: the elements with mid index in lo..hi (in order), after
/// asserting every other element is still NaN (the poison: never written).
fn window<T: Copy>(
    what: &str,
    buf: &[T],
    (outer, mid, inner): (usize, usize, usize),
    (lo, hi): (usize, usize),
    is_nan: impl Fn(T) -> bool,
    seed: u64,
) -> Vec<T> {
    assert_eq!(buf.len(), outer * mid * inner, "{what}: length");
    let mut inside = Vec::with_capacity(outer * (hi - lo) * inner);
    for o in 0..outer {
        for m in 0..mid {
            let row = &buf[(o * mid + m) * inner..(o * mid + m + 1) * inner];
            if (lo..hi).contains(&m) {
                inside.extend_from_slice(row);
            } else {
                assert!(
                    row.iter().all(|&x| is_nan(x)),
                    "{what}: written outside its window (outer {o}, index {m}); seed {seed}"
                );
            }
        }
    }
    inside
}

// ---- casts and copies -------------------------------------------------------------------------

#[test]
fn casts_and_copy2d_match_cpu() {
    let Some((gpu, ops)) = gpu_and_ops_or_skip("casts_and_copy2d_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let f = |x: f32| x.to_bits();
    let h = |x: bf16| x.to_bits() as u32;
    for n in [1usize, 1000, 70_001] {
        println!("[n {n}]");
        let mut x = rng.normal_vec(n, 3.0);
        // Rounding edge cases: ties to even both ways, the largest finite values, infinities,
        // signed zero, subnormals.
        let special = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -(1.0 + 2f32.powi(-8)),
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
            -3e-39,
            65504.0,
        ];
        for (i, s) in special.iter().enumerate().take(n) {
            x[i] = *s;
        }
        check_bits("f32 → bf16", &ops.cast_host::<f32, bf16>(&x).unwrap(), &bf16s(&x), h, seed);
        let xb = bf16s(&x);
        check_bits("bf16 → f32", &ops.cast_host::<bf16, f32>(&xb).unwrap(), &f32s(&xb), f, seed);
    }
    // A window of a wider matrix on both sides (ld > cols), every dtype pair; the destination
    // starts as NaN and must stay NaN outside the window.
    let (rows, cols, ld_src, ld_dst, c_dst) = (37usize, 19usize, 23usize, 29usize, 6usize);
    let src = rng.normal_vec(rows * ld_src, 1.0);
    let src_b = bf16s(&src);
    let want: Vec<f32> = (0..rows * cols).map(|i| src[(i / cols) * ld_src + i % cols]).collect();
    let want_b: Vec<f32> = f32s(&bf16s(&want));
    let nan_f = vec![f32::NAN; rows * ld_dst];
    let nan_b = vec![bf16::NAN; rows * ld_dst];
    let shape = (rows, ld_dst, 1);
    // Plain copies land in columns 0..cols of the destination.
    let got = ops.copy2d_host(rows, cols, &src, ld_src, &nan_f, ld_dst, false).unwrap();
    let got = window("copy f32 → f32", &got, shape, (0, cols), |x: f32| x.is_nan(), seed);
    check_bits("copy f32 → f32", &got, &want, f, seed);
    let got = ops.copy2d_host(rows, cols, &src, ld_src, &nan_b, ld_dst, false).unwrap();
    let got = window("copy f32 → bf16", &got, shape, (0, cols), |x: bf16| x.is_nan(), seed);
    check_bits("copy f32 → bf16", &got, &bf16s(&want), h, seed);
    let got = ops.copy2d_host(rows, cols, &src_b, ld_src, &nan_f, ld_dst, false).unwrap();
    let got = window("copy bf16 → f32", &got, shape, (0, cols), |x: f32| x.is_nan(), seed);
    check_bits("copy bf16 → f32", &got, &want_b, f, seed);
    let got = ops.copy2d_host(rows, cols, &src_b, ld_src, &nan_b, ld_dst, false).unwrap();
    let got = window("copy bf16 → bf16", &got, shape, (0, cols), |x: bf16| x.is_nan(), seed);
    check_bits("copy bf16 → bf16", &got, &bf16s(&want_b), h, seed);
    // A column block in the middle of the destination (c_dst..c_dst + cols) through the device
    // API with an offset pointer, accumulating onto values: dst += src there, untouched elsewhere.
    let init = rng.normal_vec(rows * ld_dst, 1.0);
    let (s_f, s_b) = (gpu.stream.clone_htod(&src).unwrap(), gpu.stream.clone_htod(&src_b).unwrap());
    for bf16_src in [false, true] {
        let d = gpu.stream.clone_htod(&init).unwrap();
        let src_m = if bf16_src { DevMat::bf16(&s_b, ld_src) } else { DevMat::f32(&s_f, ld_src) };
        let dst_m = DevMat::f32(View::from(&d).tail(c_dst).unwrap(), ld_dst);
        ops.copy.copy2d(rows, cols, src_m, dst_m, true).unwrap();
        let got = gpu.stream.clone_dtoh(&d).unwrap();
        let s = if bf16_src { &want_b } else { &want };
        let mut expect = init.clone();
        for r in 0..rows {
            for c in 0..cols {
                expect[r * ld_dst + c_dst + c] += s[r * cols + c];
            }
        }
        check_bits(
            &format!("accumulate {} → f32 at column {c_dst}", if bf16_src { "bf16" } else { "f32" }),
            &got,
            &expect,
            f,
            seed,
        );
    }
    assert!(
        ops.copy2d_host(rows, cols, &src, ld_src, &nan_b, ld_dst, true).is_err(),
        "accumulating onto bf16 must be refused"
    );
}

// ---- the attention prologue -------------------------------------------------------------------

/// Shapes: a tiny model's d = 16, h = 2 with txt-like tokens at t0 > 0 and a wider row (ld >
/// 3hd, the single block's linear1 output), FLUX's d = 128 with ragged token counts, and a whole
/// sequence at t0 = 0 with ld = 3hd.
fn head_shapes() -> Vec<(HeadsDims, &'static [usize])> {
    vec![
        (HeadsDims { b: 2, h: 2, d: 16, l: 45, ls: 31, t0: 14, ld: 3 * 32 + 37 }, &[4, 6, 6]),
        (HeadsDims { b: 2, h: 3, d: 128, l: 41, ls: 23, t0: 17, ld: 3 * 384 + 128 }, &[16, 56, 56]),
        (HeadsDims { b: 1, h: 5, d: 64, l: 29, ls: 29, t0: 0, ld: 3 * 320 }, &[8, 28, 28]),
    ]
}

/// The CPU prologue of attention_block for one stream: heads split from qkv at tokens t0..,
/// head_rmsnorm (rmsnorm_forward per (sample, head) over the stream's rows), RoPE.
struct CpuQk {
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    rstd_q: Vec<f32>,
    rstd_k: Vec<f32>,
}

fn cpu_qk(s: HeadsDims, inp: &QkHostInputs) -> CpuQk {
    let HeadsDims { b, h, d, l, ls, t0, ld } = s;
    let hd = h * d;
    let split = |col: usize| {
        let mut x = vec![0f32; b * h * l * d];
        split_heads(&mut x, inp.qkv, b, ls, ld, col, h, d, l, t0);
        x
    };
    let (q_raw, k_raw, v) = (split(0), split(hd), split(2 * hd));
    let norm = |raw: &[f32], w: &[f32]| {
        let (mut x, mut rstd) = (raw.to_vec(), vec![0f32; b * h * l]);
        for bh in 0..b * h {
            let xs = &mut x[(bh * l + t0) * d..(bh * l + t0 + ls) * d];
            rmsnorm_forward(xs, &mut rstd[bh * l + t0..bh * l + t0 + ls], w, ls, d, QK_NORM_EPS);
        }
        rope_forward(&mut x, inp.cos, inp.sin, b, h, l, d);
        (x, rstd)
    };
    let (q, rstd_q) = norm(&q_raw, inp.q_scale);
    let (k, rstd_k) = norm(&k_raw, inp.k_scale);
    CpuQk { q_raw, k_raw, q, k, v, rstd_q, rstd_k }
}

/// attention_block_backward's tail for one stream: rope_backward, head RMSNorm backward over the
/// stream's rows (x̂ = raw·rstd), merged into dqkv [b·ls, ld] columns [0, 3hd) (others 0).
fn cpu_qk_backward(s: HeadsDims, inp: &QkHostInputs, c: &CpuQk, dq: &[f32], dk: &[f32], dv: &[f32]) -> Vec<f32> {
    let HeadsDims { b, h, d, l, ls, t0, ld } = s;
    let hd = h * d;
    let tail = |dy: &[f32], raw: &[f32], rstd: &[f32], w: &[f32]| {
        let mut g = dy.to_vec();
        rope_backward(&mut g, inp.cos, inp.sin, b, h, l, d);
        let mut dx = vec![0f32; g.len()];
        for bh in 0..b * h {
            let r = (bh * l + t0) * d..(bh * l + t0 + ls) * d;
            let rs = &rstd[bh * l + t0..bh * l + t0 + ls];
            let xhat: Vec<f32> = raw[r.clone()].iter().enumerate().map(|(i, &v)| v * rs[i / d]).collect();
            rmsnorm_backward(&mut dx[r.clone()], &g[r], &xhat, rs, w, ls, d);
        }
        dx
    };
    let dxq = tail(dq, &c.q_raw, &c.rstd_q, inp.q_scale);
    let dxk = tail(dk, &c.k_raw, &c.rstd_k, inp.k_scale);
    let mut out = vec![0f32; b * ls * ld];
    merge_heads(&mut out, &dxq, b, ls, ld, 0, h, d, l, t0);
    merge_heads(&mut out, &dxk, b, ls, ld, hd, h, d, l, t0);
    merge_heads(&mut out, dv, b, ls, ld, 2 * hd, h, d, l, t0);
    out
}

#[test]
fn qk_prologue_forward_backward_match_cpu() {
    let Some(ops) = ops_or_skip("qk_prologue_forward_backward_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for (s, axes) in head_shapes() {
        let HeadsDims { b, h, d, l, ls, t0, ld } = s;
        let hd = h * d;
        println!("[b {b}, h {h}, d {d}, l {l}, ls {ls}, t0 {t0}, ld {ld}]");
        // An offset mean and scale per row, so the RMS matters.
        let qkv: Vec<f32> = rng.normal_vec(b * ls * ld, 1.5).into_iter().map(|v| v + 0.3).collect();
        let q_scale: Vec<f32> = rng.normal_vec(d, 0.3).into_iter().map(|v| v + 1.0).collect();
        let k_scale: Vec<f32> = rng.normal_vec(d, 0.3).into_iter().map(|v| v + 1.0).collect();
        // Random position ids per (sample, joint token), three axes as FLUX has.
        let ids: Vec<f32> = (0..b * l * 3).map(|_| (rng.next_u64() % 64) as f32).collect();
        let (mut cos, mut sin) = (vec![0f32; b * l * d / 2], vec![0f32; b * l * d / 2]);
        rope_tables(&mut cos, &mut sin, &ids, axes, 10_000.0);
        // qkv as a linear's f32 output, and as its bf16 output (the step's saved form): the CPU
        // reads the same rounded values.
        for qkv_bf16 in [false, true] {
            println!("  qkv {}", if qkv_bf16 { "bf16" } else { "f32" });
            let qkv_in: Vec<f32> =
                if qkv_bf16 { qkv.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() } else { qkv.clone() };
            let inp =
                QkHostInputs { qkv: &qkv_in, qkv_bf16, q_scale: &q_scale, k_scale: &k_scale, cos: &cos, sin: &sin };
            let cpu = cpu_qk(s, &inp);
            let gpu = ops.qk_prologue_host(s, &inp, QK_NORM_EPS).unwrap();
            let heads = (b * h, l, d);
            let rows = (b * h, l, 1);
            let win = (t0, t0 + ls);
            let nan_b = |x: bf16| x.is_nan();
            let nan_f = |x: f32| x.is_nan();
            let pick = |v: &[f32], shape: (usize, usize, usize)| window("cpu", v, shape, win, |_: f32| true, seed);
            check_bf16("q", &window("q", &gpu.q, heads, win, nan_b, seed), &pick(&cpu.q, heads), seed);
            check_bf16("k", &window("k", &gpu.k, heads, win, nan_b, seed), &pick(&cpu.k, heads), seed);
            let v = window("v", &gpu.v, heads, win, nan_b, seed);
            check_bits("v", &v, &bf16s(&pick(&cpu.v, heads)), |x| x.to_bits() as u32, seed);
            for (name, g, c) in [("rstd_q", &gpu.rstd_q, &cpu.rstd_q), ("rstd_k", &gpu.rstd_k, &cpu.rstd_k)] {
                check(name, &window(name, g, rows, win, nan_f, seed), &pick(c, rows), TOL, seed);
            }

            // The backward from the CPU's rstd, so only the backward's error shows; gradients are
            // bf16 as the attention kernels give them.
            let (dq, dk, dv) = (
                normal_bf16(&mut rng, s.heads_numel(), 1.0),
                normal_bf16(&mut rng, s.heads_numel(), 1.0),
                normal_bf16(&mut rng, s.heads_numel(), 1.0),
            );
            let want = cpu_qk_backward(s, &inp, &cpu, &dq, &dk, &dv);
            let (dqb, dkb, dvb) = (bf16s(&dq), bf16s(&dk), bf16s(&dv));
            let got: Vec<f32> = ops
                .qk_prologue_backward_host(s, &inp, QK_NORM_EPS, &cpu.rstd_q, &cpu.rstd_k, &dqb, &dkb, &dvb)
                .unwrap();
            // Written in bf16 (the qkv linear's dY): the f32 result rounded once, bit for bit.
            let got16: Vec<bf16> = ops
                .qk_prologue_backward_host(s, &inp, QK_NORM_EPS, &cpu.rstd_q, &cpu.rstd_k, &dqb, &dkb, &dvb)
                .unwrap();
            check_bits("dqkv bf16", &got16, &bf16s(&got), |x: bf16| x.to_bits() as u32, seed);
            let toks = (b * ls, ld, 1);
            let cols = (0, 3 * hd);
            let g = window("dqkv", &got, toks, cols, nan_f, seed);
            let w = window("cpu dqkv", &want, toks, cols, |_: f32| true, seed);
            let per = |v: &[f32], c0: usize| -> Vec<f32> {
                (0..b * ls).flat_map(|r| v[r * 3 * hd + c0..r * 3 * hd + c0 + hd].to_vec()).collect()
            };
            check("dq (qkv columns 0..hd)", &per(&g, 0), &per(&w, 0), TOL, seed);
            check("dk (qkv columns hd..2hd)", &per(&g, hd), &per(&w, hd), TOL, seed);
            check_bits("dv (qkv columns 2hd..3hd)", &per(&g, 2 * hd), &per(&w, 2 * hd), |x: f32| x.to_bits(), seed);
            let again: Vec<f32> = ops
                .qk_prologue_backward_host(s, &inp, QK_NORM_EPS, &cpu.rstd_q, &cpu.rstd_k, &dqb, &dkb, &dvb)
                .unwrap();
            assert!(
                again.iter().zip(&got).all(|(a, c)| a.to_bits() == c.to_bits()),
                "backward not reproducible; seed {seed}"
            );
        }
    }
}

// ---- merge heads ------------------------------------------------------------------------------

#[test]
fn merge_heads_forward_backward_match_cpu() {
    let Some(ops) = ops_or_skip("merge_heads_forward_backward_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for (s, _) in head_shapes() {
        let HeadsDims { b, h, d, l, ls, t0, ld } = s;
        let hd = h * d;
        println!("[b {b}, h {h}, d {d}, l {l}, ls {ls}, t0 {t0}, ld {ld}]");
        let o = normal_bf16(&mut rng, s.heads_numel(), 1.0);
        let mut want = vec![0f32; s.tokens_numel()];
        merge_heads(&mut want, &o, b, ls, ld, 0, h, d, l, t0);
        let got = ops.merge_heads_host(s, &bf16s(&o)).unwrap();
        let toks = (b * ls, ld, 1);
        let g = window("merged", &got, toks, (0, hd), |x: bf16| x.is_nan(), seed);
        let w = window("cpu", &bf16s(&want), toks, (0, hd), |_: bf16| true, seed);
        check_bits("merge_heads", &g, &w, |x| x.to_bits() as u32, seed);

        let dout = rng.normal_vec(s.tokens_numel(), 1.0);
        let mut want = vec![0f32; s.heads_numel()];
        split_heads(&mut want, &dout, b, ls, ld, 0, h, d, l, t0);
        let got = ops.merge_heads_backward_host(s, &dout).unwrap();
        let heads = (b * h, l, d);
        let g = window("dO", &got, heads, (t0, t0 + ls), |x: bf16| x.is_nan(), seed);
        let w = window("cpu", &bf16s(&want), heads, (t0, t0 + ls), |_: bf16| true, seed);
        check_bits("merge_heads backward", &g, &w, |x| x.to_bits() as u32, seed);
    }
}

// ---- GELU-tanh --------------------------------------------------------------------------------

#[test]
fn gelu_tanh_strided_forward_backward_match_cpu() {
    let Some(ops) = ops_or_skip("gelu_tanh_strided_forward_backward_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // (rows, cols, ld_x, ld_dy, ld_out): windows of wider matrices, and one contiguous.
    for (rows, cols, ld_x, ld_dy, ld_out) in
        [(37usize, 300usize, 311usize, 305usize, 320usize), (5, 64, 64, 64, 64), (129, 33, 70, 33, 41)]
    {
        println!("[rows {rows}, cols {cols}, ld_x {ld_x}, ld_dy {ld_dy}, ld_out {ld_out}]");
        let x = rng.normal_vec(rows * ld_x, 3.0);
        let dy = rng.normal_vec(rows * ld_dy, 1.0);
        let compact =
            |v: &[f32], ld: usize| -> Vec<f32> { (0..rows).flat_map(|r| v[r * ld..r * ld + cols].to_vec()).collect() };
        let (xc, dyc) = (compact(&x, ld_x), compact(&dy, ld_dy));
        let mut want = vec![0f32; rows * cols];
        gelu_tanh_forward(&mut want, &xc);
        let shape = (rows, ld_out, 1);
        let got = ops.gelu_tanh_host::<f32>(rows, cols, &x, ld_x, ld_out).unwrap();
        check("gelu f32", &window("gelu f32", &got, shape, (0, cols), |x: f32| x.is_nan(), seed), &want, TOL, seed);
        let got = ops.gelu_tanh_host::<bf16>(rows, cols, &x, ld_x, ld_out).unwrap();
        check_bf16("gelu bf16", &window("gelu bf16", &got, shape, (0, cols), |x: bf16| x.is_nan(), seed), &want, seed);
        gelu_tanh_backward(&mut want, &xc, &dyc);
        let got = ops.gelu_tanh_backward_host(rows, cols, &x, ld_x, &dy, ld_dy, ld_out).unwrap();
        check(
            "gelu backward",
            &window("gelu backward", &got, shape, (0, cols), |x: f32| x.is_nan(), seed),
            &want,
            TOL,
            seed,
        );
    }
}

// ---- timestep embedding -----------------------------------------------------------------------

#[test]
fn timestep_embedding_matches_cpu() {
    let Some(ops) = ops_or_skip("timestep_embedding_matches_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // FLUX's 256, a tiny model's 16, an odd width (last column 0); timesteps in [0, 1] and
    // guidance scales (3.5 → an argument of 3500).
    for (b, dim) in [(4usize, 256usize), (3, 16), (2, 33)] {
        println!("[b {b}, dim {dim}]");
        let mut t: Vec<f32> = (0..b).map(|_| rng.uniform() as f32).collect();
        t[0] = 3.5;
        let mut want = vec![0f32; b * dim];
        timestep_embedding(&mut want, &t, dim, TIME_FACTOR, MAX_PERIOD);
        let got = ops.timestep_embedding_host(&t, dim, TIME_FACTOR, MAX_PERIOD).unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        println!("timestep embedding: {differ} of {} values differ in any bit", want.len());
        check("timestep embedding", &got, &want, TOL, seed);
    }
}

// ---- random initialisation --------------------------------------------------------------------

#[test]
fn random_fill_matches_cpu_bit_for_bit() {
    let Some(ops) = ops_or_skip("random_fill_matches_cpu_bit_for_bit") else { return };
    let seed = fresh_seed();
    let f = |x: f32| x.to_bits();
    let h = |x: bf16| x.to_bits() as u32;
    let n = 10_007;
    for init in [Init::Uniform(1.0 / (3072f32).sqrt()), Init::Uniform(0.5), Init::Const(1.0), Init::Const(-0.3)] {
        println!("[{init:?}, n {n}]");
        let p = RandomParam::new(seed, "double_blocks.0.img_attn.qkv.weight", init, n);
        let want = p.generate();
        check_bits("fill f32", &ops.fill_random_host::<f32>(&(&p).into(), 0, n).unwrap(), &want, f, seed);
        check_bits("fill bf16", &ops.fill_random_host::<bf16>(&(&p).into(), 0, n).unwrap(), &bf16s(&want), h, seed);
        // In pieces at ragged offsets: the same values.
        let mut pieces = Vec::new();
        for (a, z) in [(0usize, 1usize), (1, 3001), (3001, n)] {
            pieces.extend(ops.fill_random_host::<f32>(&(&p).into(), a, z - a).unwrap());
        }
        check_bits("fill f32 in pieces", &pieces, &want, f, seed);
        assert!(ops.fill_random_host::<f32>(&(&p).into(), n - 5, 6).is_err(), "past the end must be refused");
    }
}
