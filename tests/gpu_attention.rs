//! Flash attention on the GPU (kernels/attention.cu through src/kernels/attention.rs) against
//! the CPU reference (`ops::attention::attention_forward_masked` / `attention_backward_masked`)
//! on the same bf16-rounded inputs: O, LSE, dQ, dK, dV, with and without a key-padding mask,
//! ragged sequence lengths, head dims 16…128. Fresh random inputs every run (seed printed on
//! failure; FK_TEST_SEED replays), outputs poisoned with NaN first. Without a GPU (or without
//! nvcc at build time) each test writes why it is skipped.

mod common;
use common::gpu::{
    attention_forward_backward, attention_forward_backward_steps, attention_forward_naive, AttnHostResult,
};
use common::{fresh_seed, gpu_or_skip, normal_bf16, skip};
use flux_kernels::kernels::attention::{AttnDims, BackwardStep, FwdVariant, GpuAttention, HOPPER_HEAD_DIMS};
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::ops::attention::{attention_backward_masked, attention_forward_masked};
use flux_kernels::util::{rel_l2, Rng};

/// bf16 operands (and bf16 P and dS inside the kernels): errors land between 1e-3 and 1e-2.
const TOL: f64 = 1e-2;

fn attn_or_skip(test: &str) -> Option<GpuAttention> {
    gpu_or_skip(test, Gpu::new().and_then(|g| GpuAttention::new(&g)))
}

struct Case {
    name: &'static str,
    dims: AttnDims,
    /// Keys masked out per batch element, as ranges of token indices.
    masked: Vec<Vec<std::ops::Range<usize>>>,
    /// Scale of q and k: FLUX's QK-RMSNorm gives unit-RMS rows, so scores of a few units.
    qk_std: f32,
}

fn cases() -> Vec<Case> {
    let d = |b, h, l, d| AttnDims { b, h, l, d };
    vec![
        Case { name: "tiny model head dim 16, ragged l", dims: d(2, 3, 77, 16), masked: vec![], qk_std: 1.0 },
        Case { name: "d 32, one token", dims: d(1, 2, 1, 32), masked: vec![], qk_std: 1.0 },
        Case {
            name: "d 64, T5 padding mask",
            dims: d(2, 2, 150, 64),
            masked: vec![vec![20..40], vec![5..64, 140..150]],
            qk_std: 1.0,
        },
        Case { name: "d 128, several tiles, peaked softmax", dims: d(1, 2, 200, 128), masked: vec![], qk_std: 2.0 },
        Case {
            name: "d 128, a whole key tile masked",
            dims: d(2, 1, 129, 128),
            masked: vec![vec![0..64], vec![100..129]],
            qk_std: 1.0,
        },
    ]
}

fn mask_of(c: &Case) -> Option<Vec<u8>> {
    if c.masked.is_empty() {
        return None;
    }
    let AttnDims { b, l, .. } = c.dims;
    let mut m = vec![1u8; b * l];
    for (bi, ranges) in c.masked.iter().enumerate() {
        for r in ranges {
            m[bi * l + r.start..bi * l + r.end].fill(0);
        }
    }
    Some(m)
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn inputs(rng: &mut Rng, c: &Case) -> Inputs {
    let n = c.dims.numel();
    Inputs {
        q: normal_bf16(rng, n, c.qk_std),
        k: normal_bf16(rng, n, c.qk_std),
        v: normal_bf16(rng, n, 1.0),
        dout: normal_bf16(rng, n, 1.0),
    }
}

fn check(what: &str, got: &[f32], want: &[f32], seed: u64) -> f64 {
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite values (unwritten or NaN); seed {seed}");
    if want.iter().all(|&x| x == 0.0) {
        // An exactly-zero reference (dQ with a single key: softmax over one key has no gradient)
        // leaves the GPU only f32 rounding noise of dP − delta; relative error is undefined.
        let worst = got.iter().fold(0f32, |m, x| m.max(x.abs()));
        println!("{what}: reference is zero, largest |value| {worst:.2e}");
        assert!(worst <= 1e-4, "{what}: reference is zero but the GPU gives {worst:e}; seed {seed}");
        return 0.0;
    }
    let e = rel_l2(got, want);
    println!("{what}: rel L2 {e:.2e}");
    assert!(e <= TOL, "{what}: rel L2 {e:.3e} > {TOL}; seed {seed}");
    e
}

#[test]
fn flash_attention_matches_cpu_forward_and_backward() {
    let Some(attn) = attn_or_skip("flash_attention_matches_cpu_forward_and_backward") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for c in cases() {
        let AttnDims { b, h, l, d } = c.dims;
        let x = inputs(&mut rng, &c);
        let mask = mask_of(&c);
        let n = c.dims.numel();
        let (mut o, mut lse) = (vec![0f32; n], vec![0f32; b * h * l]);
        attention_forward_masked(&mut o, &mut lse, &x.q, &x.k, &x.v, mask.as_deref(), b, h, l, d);
        let (dq, dk, dv) = cpu_backward(&c, &x, &o, &lse, mask.as_deref());
        // The sm_80 backward by name: on compute capability 9.0 `backward` takes the sm_90a one
        // for d 64/128 (tested below and in hopper_forward_and_backward_match_cpu).
        let run = |v, steps| {
            attention_forward_backward_steps(&attn, v, Some(steps), c.dims, &x.q, &x.k, &x.v, &x.dout, mask.as_deref())
                .unwrap()
        };
        let got = run(FwdVariant::Rows128, SM80_BACKWARD);
        check(&format!("[{}] O", c.name), &got.o, &o, seed);
        check(&format!("[{}] LSE", c.name), &got.lse, &lse, seed);
        // The 64-row forward variant the benchmark compares against computes the same function.
        let r64 =
            attention_forward_backward(&attn, FwdVariant::Rows64, c.dims, &x.q, &x.k, &x.v, &x.dout, mask.as_deref())
                .unwrap();
        check(&format!("[{}] O (64-row variant)", c.name), &r64.o, &o, seed);
        check(&format!("[{}] LSE (64-row variant)", c.name), &r64.lse, &lse, seed);
        check_grads(&c, "", &got, (&dq, &dk, &dv), mask.as_deref(), seed);
        if attn.has_hopper() && HOPPER_HEAD_DIMS.contains(&d) {
            hopper_backward_schedules(&attn, &c, &x, mask.as_deref(), (&dq, &dk, &dv), seed);
        }
    }
}

/// The CPU reference's dQ, dK, dV for a case, from its forward's O and LSE.
fn cpu_backward(c: &Case, x: &Inputs, o: &[f32], lse: &[f32], mask: Option<&[u8]>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnDims { b, h, l, d } = c.dims;
    let n = c.dims.numel();
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    attention_backward_masked(&mut dq, &mut dk, &mut dv, &x.dout, &x.q, &x.k, &x.v, o, lse, mask, b, h, l, d);
    (dq, dk, dv)
}

const SM80_BACKWARD: [BackwardStep; 3] = [BackwardStep::Prep, BackwardStep::DkDv, BackwardStep::Dq];
const HOPPER_BACKWARD: [BackwardStep; 3] = [BackwardStep::Prep, BackwardStep::DkDvHopper, BackwardStep::DqHopper];
const HOPPER_BACKWARD_SERIAL: [BackwardStep; 3] =
    [BackwardStep::Prep, BackwardStep::DkDvHopperSerial, BackwardStep::DqHopperSerial];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The sm_90a backward in both schedules (after the sm_90a forward, outputs NaN-poisoned first):
/// each against the CPU's gradients, and the same bits from both (they do the same arithmetic in
/// the same order; only the overlap of products and element-wise work differs). Returns the
/// overlapped schedule's result.
fn hopper_backward_schedules(
    attn: &GpuAttention,
    c: &Case,
    x: &Inputs,
    mask: Option<&[u8]>,
    want: (&[f32], &[f32], &[f32]),
    seed: u64,
) -> AttnHostResult {
    let run = |steps| {
        attention_forward_backward_steps(attn, FwdVariant::Hopper, Some(steps), c.dims, &x.q, &x.k, &x.v, &x.dout, mask)
            .unwrap()
    };
    let over = run(HOPPER_BACKWARD);
    check_grads(c, " (sm_90a)", &over, want, mask, seed);
    let serial = run(HOPPER_BACKWARD_SERIAL);
    check_grads(c, " (sm_90a, serial schedule)", &serial, want, mask, seed);
    for (name, a, b) in [("dQ", &over.dq, &serial.dq), ("dK", &over.dk, &serial.dk), ("dV", &over.dv, &serial.dv)] {
        assert_eq!(bits(a), bits(b), "[{}] {name}: the overlapped and serial backward differ; seed {seed}", c.name);
    }
    over
}

/// dQ, dK, dV against the CPU's, and masked keys' gradients exactly zero.
fn check_grads(
    c: &Case,
    tag: &str,
    got: &AttnHostResult,
    want: (&[f32], &[f32], &[f32]),
    mask: Option<&[u8]>,
    seed: u64,
) {
    check(&format!("[{}] dQ{tag}", c.name), &got.dq, want.0, seed);
    check(&format!("[{}] dK{tag}", c.name), &got.dk, want.1, seed);
    check(&format!("[{}] dV{tag}", c.name), &got.dv, want.2, seed);
    masked_keys_have_zero_gradients(c, mask, &got.dk, &got.dv);
}

/// A masked key takes no part: its gradients are exactly zero, not merely small.
fn masked_keys_have_zero_gradients(c: &Case, mask: Option<&[u8]>, dk: &[f32], dv: &[f32]) {
    let Some(m) = mask else { return };
    let AttnDims { b, h, l, d } = c.dims;
    for (i, _) in (0..b * h * l).map(|r| (r, m[(r / (h * l)) * l + r % l])).filter(|(_, keep)| *keep == 0) {
        assert!(
            dk[i * d..(i + 1) * d].iter().chain(&dv[i * d..(i + 1) * d]).all(|&x| x == 0.0),
            "[{}] a masked key has nonzero dK/dV",
            c.name
        );
    }
}

/// The sm_90a forward and backward (kernels/attention_sm90.cu) on the shapes that exercise their
/// pipelines: one and several K/V (Q/dO) tiles (the two-slot rings wrap at three), ragged ends
/// inside the query and key tiles, a key mask that empties whole tiles and whole batch elements
/// (O = 0, LSE = +∞, zero gradients, as the CPU reference gives), both head dims; the backward
/// bitwise reproducible. Runs wherever the device has compute capability 9.0 (under the
/// emulation always); elsewhere it says so and passes (the kernels cannot load there).
#[test]
fn hopper_forward_and_backward_match_cpu() {
    let Some(attn) = attn_or_skip("hopper_forward_and_backward_match_cpu") else { return };
    if !attn.has_hopper() {
        eprintln!(
            "hopper_forward_and_backward_match_cpu: not a compute capability 9.0 device, the sm_90a kernels cannot run"
        );
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let d = |b, h, l, d| AttnDims { b, h, l, d };
    let cases = vec![
        Case { name: "hopper d 128, one token", dims: d(1, 1, 1, 128), masked: vec![], qk_std: 1.0 },
        Case { name: "hopper d 64, ragged, two heads", dims: d(1, 2, 77, 64), masked: vec![], qk_std: 1.0 },
        Case { name: "hopper d 128, three key tiles", dims: d(1, 1, 300, 128), masked: vec![], qk_std: 2.0 },
        Case {
            name: "hopper d 64, masked tiles and an all-masked batch element",
            dims: d(2, 1, 260, 64),
            masked: vec![vec![0..128, 200..230], vec![0..260]],
            qk_std: 1.0,
        },
    ];
    for c in cases {
        let AttnDims { b, h, l, d } = c.dims;
        assert!(HOPPER_HEAD_DIMS.contains(&d));
        let x = inputs(&mut rng, &c);
        let mask = mask_of(&c);
        let (mut o, mut lse) = (vec![0f32; c.dims.numel()], vec![0f32; b * h * l]);
        attention_forward_masked(&mut o, &mut lse, &x.q, &x.k, &x.v, mask.as_deref(), b, h, l, d);
        let run = |v| attention_forward_backward(&attn, v, c.dims, &x.q, &x.k, &x.v, &x.dout, mask.as_deref()).unwrap();
        let mut first: Option<Vec<u32>> = None;
        for (v, tag) in [(FwdVariant::Hopper, "pipelined"), (FwdVariant::HopperSerial, "serial")] {
            let got = run(v);
            check(&format!("[{}, {tag}] O", c.name), &got.o, &o, seed);
            let finite: Vec<(f32, f32)> =
                got.lse.iter().zip(&lse).filter(|(_, w)| w.is_finite()).map(|(g, w)| (*g, *w)).collect();
            for (g, w) in got.lse.iter().zip(&lse).filter(|(_, w)| !w.is_finite()) {
                assert_eq!(g, w, "[{}, {tag}] LSE of a row without keys; seed {seed}", c.name);
            }
            if !finite.is_empty() {
                let (g, w): (Vec<f32>, Vec<f32>) = finite.into_iter().unzip();
                check(&format!("[{}, {tag}] LSE", c.name), &g, &w, seed);
            }
            // Both schedules do the same arithmetic in the same order: the same bits, run to run too.
            match &first {
                None => first = Some(bits(&got.o)),
                Some(f) => assert_eq!(f, &bits(&got.o), "[{}] the two schedules differ; seed {seed}", c.name),
            }
        }
        assert_eq!(
            bits(&run(FwdVariant::Hopper).o),
            first.unwrap(),
            "[{}] O differs between runs; seed {seed}",
            c.name
        );
        // On this device the model's attention (forward, forward_dev) takes the pipelined kernel.
        assert_eq!(attn.default_variant(d), FwdVariant::Hopper);

        // The backward: the default launches here are the sm_90a ones (overlapped schedule);
        // both schedules against the CPU, masked keys exactly zero, the same bits from both and
        // run to run (`again` takes the defaults).
        let (dq, dk, dv) = cpu_backward(&c, &x, &o, &lse, mask.as_deref());
        assert_eq!(attn.backward_steps(d, &[0, 16, 32, 48]), HOPPER_BACKWARD);
        let got = hopper_backward_schedules(&attn, &c, &x, mask.as_deref(), (&dq, &dk, &dv), seed);
        let again = run(FwdVariant::Hopper);
        for (name, a, b) in [("dQ", &got.dq, &again.dq), ("dK", &got.dk, &again.dk), ("dV", &got.dv, &again.dv)] {
            assert_eq!(bits(a), bits(b), "[{}] {name} differs between runs; seed {seed}", c.name);
        }
    }
}

#[test]
fn flash_attention_backward_is_deterministic() {
    let Some(attn) = attn_or_skip("flash_attention_backward_is_deterministic") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let c = &cases()[3];
    let x = inputs(&mut rng, c);
    let first =
        attention_forward_backward(&attn, FwdVariant::Rows128, c.dims, &x.q, &x.k, &x.v, &x.dout, None).unwrap();
    let again =
        attention_forward_backward(&attn, FwdVariant::Rows128, c.dims, &x.q, &x.k, &x.v, &x.dout, None).unwrap();
    for (name, a, b) in [
        ("O", &first.o, &again.o),
        ("dQ", &first.dq, &again.dq),
        ("dK", &first.dk, &again.dk),
        ("dV", &first.dv, &again.dv),
    ] {
        assert_eq!(bits(a), bits(b), "{name} differs between two identical runs; seed {seed}");
    }
}

#[test]
fn materialised_baseline_matches_cpu() {
    let Some(attn) = attn_or_skip("materialised_baseline_matches_cpu") else { return };
    if !attn.has_cublas() {
        skip("materialised_baseline_matches_cpu", "libcublas not found");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for c in [&cases()[0], &cases()[2]] {
        let AttnDims { b, h, l, d } = c.dims;
        let x = inputs(&mut rng, c);
        let mask = mask_of(c);
        let (mut o, mut lse) = (vec![0f32; c.dims.numel()], vec![0f32; b * h * l]);
        attention_forward_masked(&mut o, &mut lse, &x.q, &x.k, &x.v, mask.as_deref(), b, h, l, d);
        let got = attention_forward_naive(&attn, c.dims, &x.q, &x.k, &x.v, mask.as_deref()).unwrap();
        check(&format!("baseline [{}] O", c.name), &got, &o, seed);
    }
}

#[test]
fn unsupported_shapes_are_refused_with_a_reason() {
    let Some(attn) = attn_or_skip("unsupported_shapes_are_refused_with_a_reason") else { return };
    let e = attn.alloc(AttnDims { b: 1, h: 1, l: 8, d: 48 }, None).err().expect("head dim 48 has no kernel");
    assert!(format!("{e:#}").contains("head dim 48"), "{e:#}");
    let e = attn.alloc(AttnDims { b: 1, h: 2, l: 8, d: 16 }, Some(&[1u8; 3])).err().expect("mask of the wrong length");
    assert!(format!("{e:#}").contains("key mask"), "{e:#}");
}
