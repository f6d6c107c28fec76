//! The fused LoRA kernels (kernels/lora_gemm.cu through src/kernels/lora.rs) and the unfused
//! cuBLAS baselines against the CPU reference (src/ops/lora.rs), evaluated on the same
//! bf16-rounded inputs. Fresh random inputs every run (the seed is printed on failure), outputs
//! poisoned with NaN first, ragged M/N/K, ranks 4…128, several adapters, row slices, dropout.
//! Where no GPU (or no nvcc at build time) is present each test writes why it is skipped.

mod common;
use common::gpu::{lora_backward, lora_backward_unfused, lora_forward, lora_forward_unfused, BaseWeight};
use common::{fresh_seed, gpu_or_skip, normal_bf16, skip};
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::kernels::lora::{BaseGemm, GpuLora, Unfused};
use flux_kernels::ops::lora::{lora_linear_backward, lora_linear_forward, Dropout, LoraTerm, TermGrad};
use flux_kernels::util::{rel_l2, Rng};
use std::ops::Range;

/// The base-product modes to test: the fused kernel always, cuBLAS + fused adapters where
/// libcublas is found, the sm_90a kernels on compute capability 9.0 (the emulation reports 9.0).
/// The Hopper kernels run at both tile widths (the automatic choice depends on the SM count).
fn base_modes(gpu: &GpuLora) -> Vec<(BaseGemm, Option<usize>)> {
    let mut modes = vec![(BaseGemm::Fused, None)];
    if gpu.has_cublas() {
        modes.push((BaseGemm::Cublas, None));
    }
    if gpu.has_hopper() {
        modes.push((BaseGemm::Hopper, Some(128)));
        modes.push((BaseGemm::Hopper, Some(256)));
    }
    modes
}

/// An 8-bit base runs in the sm_80 kernel in both the fused and cuBLAS modes; the Hopper mode
/// dequantises it and runs the sm_90a kernels.
fn eight_bit_modes(gpu: &GpuLora) -> Vec<(BaseGemm, Option<usize>)> {
    let mut modes = vec![(BaseGemm::Fused, None)];
    if gpu.has_hopper() {
        modes.push((BaseGemm::Hopper, None));
    }
    modes
}

fn set_mode(gpu: &mut GpuLora, (mode, tile_n): (BaseGemm, Option<usize>)) -> String {
    gpu.set_base_gemm(mode).unwrap();
    if gpu.has_hopper() {
        gpu.set_hopper_tile_n(tile_n).unwrap();
    }
    match tile_n {
        Some(t) => format!("{mode:?} base, {t}-wide tiles"),
        None => format!("{mode:?} base"),
    }
}

/// Whether the Hopper kernels must take this case's forward (Y) or dX launch rather than fall
/// back (src/kernels/lora.rs `hopper_takes`: TMA row strides a multiple of 8 elements; dX
/// without dropout). Checked through `hopper_launches`, so a fallback cannot pass for a test of
/// the new kernels.
fn hopper_takes_forward(c: &Case) -> bool {
    c.k.is_multiple_of(8) && c.terms.iter().all(|t| t.0.is_multiple_of(8))
}
fn hopper_takes_dx(c: &Case) -> bool {
    c.k.is_multiple_of(8) && c.n.is_multiple_of(8) && c.terms.iter().filter(|t| t.3.is_some()).count() <= 1
}
fn check_hopper_ran(gpu: &GpuLora, mode: BaseGemm, before: usize, expected: bool, what: &str) {
    if mode == BaseGemm::Hopper {
        let ran = gpu.hopper_launches() > before;
        assert_eq!(ran, expected, "{what}: the Hopper kernels ran: {ran}, expected {expected}");
    }
}

/// bf16 operands: the errors land between 1e-3 and 1e-2 (relative L2).
const TOL: f64 = 1e-2;

fn lora_or_skip(test: &str) -> Option<GpuLora> {
    let mut l = gpu_or_skip(test, Gpu::new().and_then(|g| GpuLora::new(&g)))?;
    l.set_poison(true);
    Some(l)
}

struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    /// W's scale relative to the usual 1/√k: small values make Y mostly the LoRA part.
    w_scale: f32,
    terms: Vec<(usize, Range<usize>, f32, Option<Dropout>)>,
}

fn dropout(p: f32, seed: u64) -> Option<Dropout> {
    Some(Dropout { p, seed })
}

fn cases() -> Vec<Case> {
    let c = |name, m, k, n, bias, terms| Case { name, m, k, n, bias, w_scale: 1.0, terms };
    vec![
        c("r4, ragged M/N", 67, 72, 96, false, vec![(4, 0..96, 0.5, None)]),
        c("r16, bias", 130, 136, 200, true, vec![(16, 0..200, 2.0, None)]),
        c("r32, K not a multiple of 8", 33, 100, 150, false, vec![(32, 0..150, 1.0, None)]),
        c(
            "q/k/v slices, r 64/8/16",
            129,
            64,
            192,
            false,
            vec![(64, 0..64, 0.7, None), (8, 64..128, -1.3, None), (16, 128..192, 1.1, None)],
        ),
        c("r128", 70, 160, 130, false, vec![(128, 0..130, 0.25, None)]),
        c(
            "stacked adapters",
            50,
            96,
            80,
            true,
            vec![(16, 0..80, 1.0, None), (32, 0..80, 0.5, None), (4, 10..50, 2.0, None)],
        ),
        c(
            "dropout on two slices",
            45,
            88,
            120,
            true,
            vec![(16, 0..40, 1.0, dropout(0.3, 7)), (32, 40..120, 0.5, dropout(0.1, 99))],
        ),
        c("one token", 1, 64, 64, false, vec![(16, 0..64, 1.0, None)]),
        c("unaligned slice across tiles", 300, 320, 272, false, vec![(32, 13..200, 0.8, None)]),
        c(
            "dropout and no dropout, several tiles",
            200,
            136,
            260,
            false,
            vec![(16, 0..260, 1.0, dropout(0.25, 3)), (64, 100..230, 0.3, dropout(0.15, 11)), (8, 0..50, 0.9, None)],
        ),
        // Hopper: more tiles than the emulation's 8 SMs (persistent blocks take several), both
        // tile widths (n ≤ 128 runs 128-wide tiles), a slice that starts inside a tile.
        c(
            "several tiles per block, slices",
            300,
            192,
            600,
            true,
            vec![(16, 0..600, 0.6, None), (32, 200..456, -0.9, None), (8, 590..600, 1.2, None)],
        ),
        c("narrow N, K of one box", 260, 64, 120, false, vec![(8, 0..120, 1.0, None)]),
        // One dropout term among others: on Hopper the masked segment of dX goes first.
        c(
            "one dropout term, several tiles",
            200,
            320,
            136,
            true,
            vec![(16, 0..136, 0.8, None), (32, 8..120, 1.1, dropout(0.3, 21))],
        ),
        Case {
            w_scale: 1e-3,
            ..c(
                "LoRA dominates Y",
                96,
                128,
                144,
                false,
                vec![(16, 0..144, 1.0, None), (4, 30..90, 1.5, dropout(0.2, 5))],
            )
        },
    ]
}

/// Bf16-rounded inputs for one case.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    ab: Vec<(Vec<f32>, Vec<f32>)>,
    dy: Vec<f32>,
}

fn inputs(c: &Case, rng: &mut Rng) -> Inputs {
    let x = normal_bf16(rng, c.m * c.k, 1.0);
    let w = normal_bf16(rng, c.n * c.k, c.w_scale / (c.k as f32).sqrt());
    let bias = c.bias.then(|| rng.normal_vec(c.n, 0.5));
    let ab = c
        .terms
        .iter()
        .map(|(r, rows, _, _)| {
            (
                normal_bf16(rng, r * c.k, 1.0 / (c.k as f32).sqrt()),
                normal_bf16(rng, rows.len() * r, 1.0 / (*r as f32).sqrt()),
            )
        })
        .collect();
    let dy = normal_bf16(rng, c.m * c.n, 1.0);
    Inputs { x, w, bias, ab, dy }
}

fn terms<'a>(c: &Case, inp: &'a Inputs) -> Vec<LoraTerm<'a>> {
    c.terms
        .iter()
        .zip(&inp.ab)
        .map(|((r, rows, s, d), (a, b))| LoraTerm { a, b, rank: *r, scale: *s, rows: rows.clone(), dropout: *d })
        .collect()
}

fn check(what: &str, got: &[f32], want: &[f32], seed: u64) {
    let nan = got.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(nan, 0, "{what}: {nan} non-finite outputs (unwritten or broken), seed {seed}");
    let err = rel_l2(got, want);
    println!("{what}: rel L2 {err:.2e}");
    assert!(err <= TOL, "{what}: rel L2 {err:.3e} > {TOL:e}, seed {seed}");
}

/// dA/dB accumulate: compare the increments, so an unwritten gradient cannot hide behind the
/// initial value.
fn check_increment(what: &str, got: &[f32], want: &[f32], init: &[f32], seed: u64) {
    let g: Vec<f32> = got.iter().zip(init).map(|(a, b)| a - b).collect();
    let w: Vec<f32> = want.iter().zip(init).map(|(a, b)| a - b).collect();
    check(what, &g, &w, seed);
}

fn initial_grads(c: &Case, rng: &mut Rng) -> Vec<TermGrad> {
    c.terms
        .iter()
        .map(|(r, rows, _, _)| TermGrad { da: rng.normal_vec(r * c.k, 0.1), db: rng.normal_vec(rows.len() * r, 0.1) })
        .collect()
}

#[test]
fn fused_forward_matches_cpu() {
    let Some(mut gpu) = lora_or_skip("fused_forward_matches_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for c in cases() {
        let inp = inputs(&c, &mut rng);
        let t = terms(&c, &inp);
        let mut want = vec![0f32; c.m * c.n];
        lora_linear_forward(&mut want, &inp.x, &inp.w, inp.bias.as_deref(), &t, c.m, c.k, c.n);
        for (mode, tile_n) in base_modes(&gpu) {
            let label = set_mode(&mut gpu, (mode, tile_n));
            let before = gpu.hopper_launches();
            let mut got = vec![f32::NAN; c.m * c.n];
            lora_forward(&mut gpu, &mut got, &inp.x, BaseWeight::F32(&inp.w), inp.bias.as_deref(), &t, c.m, c.k, c.n)
                .unwrap();
            check(&format!("forward [{}] Y ({label})", c.name), &got, &want, seed);
            check_hopper_ran(&gpu, mode, before, hopper_takes_forward(&c), &format!("forward [{}]", c.name));
        }
    }
}

#[test]
fn fused_backward_matches_cpu() {
    let Some(mut gpu) = lora_or_skip("fused_backward_matches_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for c in cases() {
        let inp = inputs(&c, &mut rng);
        let t = terms(&c, &inp);
        let init = initial_grads(&c, &mut rng);
        let mut want = init.clone();
        let mut want_dx = vec![0f32; c.m * c.k];
        lora_linear_backward(Some(&mut want_dx), &mut want, &inp.dy, &inp.x, &inp.w, &t, c.m, c.k, c.n);
        for (mode, tile_n) in base_modes(&gpu) {
            let label = set_mode(&mut gpu, (mode, tile_n));
            let mut got = init.clone();
            let mut got_dx = vec![f32::NAN; c.m * c.k];
            let before = gpu.hopper_launches();
            lora_backward(
                &mut gpu,
                Some(&mut got_dx),
                &mut got,
                &inp.dy,
                &inp.x,
                BaseWeight::F32(&inp.w),
                &t,
                c.m,
                c.k,
                c.n,
            )
            .unwrap();
            check(&format!("backward [{}] dX ({label})", c.name), &got_dx, &want_dx, seed);
            check_hopper_ran(&gpu, mode, before, hopper_takes_dx(&c), &format!("backward [{}]", c.name));
            for (i, ((g, w), s)) in got.iter().zip(&want).zip(&init).enumerate() {
                check_increment(&format!("backward [{}] dA{i} ({label})", c.name), &g.da, &w.da, &s.da, seed);
                check_increment(&format!("backward [{}] dB{i} ({label})", c.name), &g.db, &w.db, &s.db, seed);
            }
        }
    }
}

/// Without dX the backward still produces dA and dB (the input needs no gradient).
#[test]
fn fused_backward_without_dx() {
    let Some(mut gpu) = lora_or_skip("fused_backward_without_dx") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let c = &cases()[3];
    let inp = inputs(c, &mut rng);
    let t = terms(c, &inp);
    let init = initial_grads(c, &mut rng);
    let mut want = init.clone();
    lora_linear_backward(None, &mut want, &inp.dy, &inp.x, &inp.w, &t, c.m, c.k, c.n);
    let mut got = init.clone();
    lora_backward(&mut gpu, None, &mut got, &inp.dy, &inp.x, BaseWeight::F32(&inp.w), &t, c.m, c.k, c.n).unwrap();
    for (i, ((g, w), s)) in got.iter().zip(&want).zip(&init).enumerate() {
        check_increment(&format!("no-dX dA{i}"), &g.da, &w.da, &s.da, seed);
        check_increment(&format!("no-dX dB{i}"), &g.db, &w.db, &s.db, seed);
    }
}

/// The reductions over tokens have one owner per output tile: two runs agree bit for bit, and
/// a second call at the same shape allocates nothing.
#[test]
fn fused_backward_is_deterministic_and_reuses_buffers() {
    let Some(mut gpu) = lora_or_skip("fused_backward_is_deterministic_and_reuses_buffers") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let c = &cases()[9];
    let inp = inputs(c, &mut rng);
    let t = terms(c, &inp);
    let run = |gpu: &mut GpuLora| {
        let mut g = initial_grads(c, &mut Rng::new(1));
        let mut dx = vec![f32::NAN; c.m * c.k];
        lora_backward(gpu, Some(&mut dx), &mut g, &inp.dy, &inp.x, BaseWeight::F32(&inp.w), &t, c.m, c.k, c.n).unwrap();
        (dx, g)
    };
    let (dx1, g1) = run(&mut gpu);
    let allocations = gpu.arena_allocations();
    let (dx2, g2) = run(&mut gpu);
    assert_eq!(gpu.arena_allocations(), allocations, "the arena grew on a repeated shape");
    assert!(dx1.iter().zip(&dx2).all(|(a, b)| a.to_bits() == b.to_bits()), "dX differs between runs, seed {seed}");
    for (a, b) in g1.iter().zip(&g2) {
        assert!(a.da.iter().zip(&b.da).all(|(x, y)| x.to_bits() == y.to_bits()), "dA differs, seed {seed}");
        assert!(a.db.iter().zip(&b.db).all(|(x, y)| x.to_bits() == y.to_bits()), "dB differs, seed {seed}");
    }
}

#[test]
fn unfused_baselines_match_cpu() {
    let Some(mut gpu) = lora_or_skip("unfused_baselines_match_cpu") else { return };
    if !gpu.has_cublas() {
        skip("unfused_baselines_match_cpu", "cuBLAS (libcublas) not found");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // The baselines take no bias and no dropout.
    for c in cases().into_iter().filter(|c| !c.bias && c.terms.iter().all(|t| t.3.is_none())) {
        let inp = inputs(&c, &mut rng);
        let t = terms(&c, &inp);
        let mut want_y = vec![0f32; c.m * c.n];
        lora_linear_forward(&mut want_y, &inp.x, &inp.w, None, &t, c.m, c.k, c.n);
        let init = initial_grads(&c, &mut rng);
        let mut want = init.clone();
        let mut want_dx = vec![0f32; c.m * c.k];
        lora_linear_backward(Some(&mut want_dx), &mut want, &inp.dy, &inp.x, &inp.w, &t, c.m, c.k, c.n);
        for style in [Unfused::Peft, Unfused::Accumulate] {
            let mut y = vec![f32::NAN; c.m * c.n];
            lora_forward_unfused(&mut gpu, style, &mut y, &inp.x, &inp.w, &t, c.m, c.k, c.n).unwrap();
            check(&format!("{style:?} forward [{}] Y", c.name), &y, &want_y, seed);
            let mut got = init.clone();
            let mut dx = vec![f32::NAN; c.m * c.k];
            lora_backward_unfused(&mut gpu, style, &mut dx, &mut got, &inp.dy, &inp.x, &inp.w, &t, c.m, c.k, c.n)
                .unwrap();
            check(&format!("{style:?} backward [{}] dX", c.name), &dx, &want_dx, seed);
            for (i, ((g, w), s)) in got.iter().zip(&want).zip(&init).enumerate() {
                check_increment(&format!("{style:?} [{}] dA{i}", c.name), &g.da, &w.da, &s.da, seed);
                check_increment(&format!("{style:?} [{}] dB{i}", c.name), &g.db, &w.db, &s.db, seed);
            }
        }
    }
}

/// An 8-bit base weight (int8 per channel, fp8 e4m3 plain / per tensor / per channel) is
/// dequantised inside the fused kernel, in the forward (X·Wᵀ) and in dX = dY·W, with LoRA terms,
/// bias and dropout on top: against the CPU reference on the same dequantised weight.
#[test]
fn eight_bit_base_weights_match_cpu() {
    use flux_kernels::quant::{QuantParam, Scheme};
    let Some(mut gpu) = lora_or_skip("eight_bit_base_weights_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let all = cases();
    for fmt in ["int8", "fp8", "fp8-scaled", "fp8-channel"] {
        let scheme = Scheme::parse_format(fmt).unwrap();
        // Ragged shapes, bias, K not a multiple of 8 (unaligned code rows), q/k/v slices, dropout.
        for c in [&all[0], &all[1], &all[2], &all[3], &all[6]] {
            let inp = inputs(c, &mut rng);
            let t = terms(c, &inp);
            let q = QuantParam::from_f32(scheme, &inp.w, c.n, c.k).unwrap();
            let view = q.view().unwrap();
            let w_deq = view.dequantize();
            let mut want = vec![0f32; c.m * c.n];
            lora_linear_forward(&mut want, &inp.x, &w_deq, inp.bias.as_deref(), &t, c.m, c.k, c.n);
            let init = initial_grads(c, &mut rng);
            let mut want_g = init.clone();
            let mut want_dx = vec![0f32; c.m * c.k];
            lora_linear_backward(Some(&mut want_dx), &mut want_g, &inp.dy, &inp.x, &w_deq, &t, c.m, c.k, c.n);
            // The sm_80 kernel dequantises tile by tile; the Hopper path dequantises the whole
            // weight to bf16 first, then runs the sm_90a GEMM.
            for mode in eight_bit_modes(&gpu) {
                let label = set_mode(&mut gpu, mode);
                let before = gpu.hopper_launches();
                let mut got = vec![f32::NAN; c.m * c.n];
                lora_forward(&mut gpu, &mut got, &inp.x, BaseWeight::Q(&view), inp.bias.as_deref(), &t, c.m, c.k, c.n)
                    .unwrap();
                check(&format!("{fmt} forward [{}] Y ({label})", c.name), &got, &want, seed);
                check_hopper_ran(&gpu, mode.0, before, hopper_takes_forward(c), &format!("{fmt} forward [{}]", c.name));

                let mut got_g = init.clone();
                let mut got_dx = vec![f32::NAN; c.m * c.k];
                let before = gpu.hopper_launches();
                lora_backward(
                    &mut gpu,
                    Some(&mut got_dx),
                    &mut got_g,
                    &inp.dy,
                    &inp.x,
                    BaseWeight::Q(&view),
                    &t,
                    c.m,
                    c.k,
                    c.n,
                )
                .unwrap();
                check(&format!("{fmt} backward [{}] dX ({label})", c.name), &got_dx, &want_dx, seed);
                check_hopper_ran(&gpu, mode.0, before, hopper_takes_dx(c), &format!("{fmt} backward [{}]", c.name));
                for (i, ((g, w), s)) in got_g.iter().zip(&want_g).zip(&init).enumerate() {
                    check_increment(&format!("{fmt} backward [{}] dA{i}", c.name), &g.da, &w.da, &s.da, seed);
                    check_increment(&format!("{fmt} backward [{}] dB{i}", c.name), &g.db, &w.db, &s.db, seed);
                }
            }
        }
    }
    // A bf16 upload afterwards uses the bf16 weight again (the 8-bit state does not leak).
    let c = &all[0];
    let inp = inputs(c, &mut rng);
    let t = terms(c, &inp);
    let mut want = vec![0f32; c.m * c.n];
    lora_linear_forward(&mut want, &inp.x, &inp.w, inp.bias.as_deref(), &t, c.m, c.k, c.n);
    let mut got = vec![f32::NAN; c.m * c.n];
    lora_forward(&mut gpu, &mut got, &inp.x, BaseWeight::F32(&inp.w), inp.bias.as_deref(), &t, c.m, c.k, c.n).unwrap();
    check("bf16 after 8-bit", &got, &want, seed);
}

/// DoRA's device pieces (issue 16 §2) against the CPU reference (src/adapters/dora.rs) on one
/// linear in every base mode: ‖W‖² (`row_sumsq`), the row norms and g from ‖W‖², A·Wᵀ and A·Aᵀ
/// (`dora_norms`), the rescale in the GEMM's epilogue with a LoRA term on the same rows added
/// after it, unscaled (`forward_dev` with a column scale), and the backward's column work
/// (`dora_column_grads`: dm and g ⊙ dY). Two DoRA terms on q/k-like row slices, bias on.
#[test]
fn dora_linear_matches_cpu() {
    use flux_kernels::adapters::{dora, AdapterSet, Term};
    use flux_kernels::kernels::launch::View;
    use flux_kernels::kernels::lora::{LinearShape, LinearViews, OutView, TermShape, WeightView};
    use flux_kernels::model::adapt::{Frozen, LinearAdapters, LinearCall};
    use flux_kernels::ops::matmul::linear_forward;
    let test = "dora_linear_matches_cpu";
    let Some(g) = gpu_or_skip(test, Gpu::new()) else { return };
    let mut gpu = GpuLora::new(&g).unwrap();
    gpu.set_poison(true);
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (m, k, n) = (37, 72, 96);
    let x = normal_bf16(&mut rng, m * k, 1.0);
    let w = normal_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
    let bias = rng.normal_vec(n, 0.1);
    // (rows, rank, scale, DoRA?) — the LoRA term overlaps the first DoRA term's rows.
    let spec = [(0..40, 8, 0.7, true), (48..96, 4, 1.3, true), (16..64, 4, -0.9, false)];
    let mut set = AdapterSet::new();
    for (rows, r, s, is_dora) in spec.clone() {
        let a = normal_bf16(&mut rng, r * k, 0.3);
        let b = normal_bf16(&mut rng, rows.len() * r, 0.3);
        let t = Term::lora("m", rows.clone(), k, r, s, a, b);
        set.push(if is_dora {
            let mag = dora::row_norms(&t, &w, k).iter().map(|v| v * (0.8 + 0.4 * rng.uniform() as f32)).collect();
            t.with_magnitude(mag)
        } else {
            t
        });
    }
    let mut base = vec![0f32; m * n];
    linear_forward(&mut base, &x, &w, None, m, k, n);
    let call = LinearCall { module: "m", inp: &x, m, k, n, frozen: Some(Frozen { weight: &w, out: &base }) };
    let mut want: Vec<f32> = base.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
    set.forward(call, &mut want);

    let st = &g.stream;
    let up = |v: &[f32]| st.clone_htod(v).unwrap();
    let up16 = |v: &[f32]| st.clone_htod(&v.iter().map(|&f| half::bf16::from_f32(f)).collect::<Vec<_>>()).unwrap();
    let (x16, w16, bias_d) = (up16(&x), up16(&w), up(&bias));
    let a16: Vec<_> = set.terms().iter().map(|t| up16(t.a())).collect();
    let b16: Vec<_> = set.terms().iter().map(|t| up16(t.b())).collect();
    let mags: Vec<_> = set.terms().iter().map(|t| up(t.magnitude())).collect();
    let terms = spec
        .iter()
        .map(|(rows, r, s, d)| TermShape { rank: *r, rows: rows.clone(), scale: *s, dropout: None, col_scaled: *d })
        .collect();
    let shape = LinearShape::of_terms(m, k, n, true, terms).unwrap();
    let (sumsq, gs, norms) = (up(&vec![f32::NAN; n]), up(&vec![1f32; n]), up(&vec![f32::NAN; n]));
    let views = LinearViews {
        x: (&x16).into(),
        w: WeightView::Bf16((&w16).into()),
        bias: Some((&bias_d).into()),
        a: a16.iter().map(View::from).collect(),
        b: b16.iter().map(View::from).collect(),
        col_scale: Some((&gs).into()),
    };
    let wsq: Vec<f64> = w.chunks(k).map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum()).collect();
    let dy = normal_bf16(&mut rng, m * n, 1.0);
    for mode in base_modes(&gpu) {
        let label = set_mode(&mut gpu, mode);
        gpu.row_sumsq(WeightView::Bf16((&w16).into()), n, k, (&sumsq).into()).unwrap();
        let got_sq = st.clone_dtoh(&sumsq).unwrap();
        let wsq32: Vec<f32> = wsq.iter().map(|&v| v as f32).collect();
        common::check(&format!("DoRA ‖W‖² ({label})"), &got_sq, &wsq32, 1e-6, seed);
        for (i, t) in set.terms().iter().enumerate().filter(|(_, t)| !t.magnitude().is_empty()) {
            gpu.dora_norms(&shape, &views, i, (&sumsq).into(), (&mags[i]).into(), (&gs).into(), (&norms).into())
                .unwrap();
            let got = st.clone_dtoh(&norms).unwrap()[t.rows.clone()].to_vec();
            common::check(
                &format!("DoRA row norms of term {i} ({label})"),
                &got,
                &dora::row_norms(t, &w, k),
                1e-3,
                seed,
            );
        }
        let y = up(&vec![f32::NAN; m * n]);
        gpu.forward_dev(&shape, &views, OutView::F32((&y).into())).unwrap();
        common::check(&format!("DoRA forward ({label})"), &st.clone_dtoh(&y).unwrap(), &want, TOL, seed);

        // The column work of the first DoRA term against the CPU's formulas: Ypre = X·Wᵀ +
        // s·(X·Aᵀ)·Bᵀ on its rows, dm = Σ dY·Ypre / ‖·‖, g ⊙ dY.
        let t = &set.terms()[0];
        let rows = t.rows.clone();
        let mut lo = vec![0f32; m * n];
        flux_kernels::adapters::lora::forward(t, None, LinearCall { frozen: None, ..call }, &mut lo);
        let ypre: Vec<f32> = (0..m * n).map(|i| base[i] + lo[i]).collect();
        let nrm = dora::row_norms(t, &w, k);
        let gv: Vec<f32> = nrm.iter().zip(t.magnitude()).map(|(a, b)| b / a).collect();
        let mut want_dm = vec![0f32; rows.len()];
        let mut want_dys = dy.clone();
        for i in 0..m {
            for (j, c) in rows.clone().enumerate() {
                want_dm[j] += dy[i * n + c] * ypre[i * n + c] / nrm[j];
                want_dys[i * n + c] = gv[j] * dy[i * n + c];
            }
        }
        let ypre16 = up16(&ypre);
        let (dy16, dys16, dm) = (up16(&dy), up16(&dy), up(&vec![0f32; rows.len()]));
        gpu.dora_norms(&shape, &views, 0, (&sumsq).into(), (&mags[0]).into(), (&gs).into(), (&norms).into()).unwrap();
        let ypre_v = (View::from(&ypre16).tail(rows.start).unwrap(), n);
        let (gv_d, nv_d) = ((&gs).into(), (&norms).into());
        gpu.dora_column_grads(m, n, rows, (&dy16).into(), ypre_v, gv_d, nv_d, (&dm).into(), (&dys16).into()).unwrap();
        common::check(&format!("DoRA dm ({label})"), &st.clone_dtoh(&dm).unwrap(), &want_dm, 1e-2, seed);
        let got_dys: Vec<f32> = st.clone_dtoh(&dys16).unwrap().iter().map(|v| v.to_f32()).collect();
        common::check(&format!("DoRA g ⊙ dY ({label})"), &got_dys, &want_dys, 1e-2, seed);
    }
}
