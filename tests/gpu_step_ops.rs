//! The training step's f32 kernels (kernels/norm.cu, activation.cu and optim.cu through
//! src/kernels/{norm,activation,optim}.rs; host-slice twins in tests/common/gpu.rs) against
//! their CPU twins: LayerNorm + modulation and its backward, the gated residual and its backward,
//! SiLU and GELU-tanh backwards, the MSE loss and gradient, multi-tensor AdamW and the global
//! gradient norm. Fresh random inputs every run (seed printed on failure; FK_TEST_SEED replays),
//! outputs poisoned with NaN first. Without a GPU (or without nvcc at build time) each test
//! writes why it is skipped.

mod common;
use common::gpu::Twins;
use common::{check, fresh_seed, gpu_or_skip};
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::kernels::norm::StepDims;
use flux_kernels::model::double_block::{ln_modulate, ln_modulate_backward, LnMod, LN_EPS};
use flux_kernels::ops::activation::{gelu_tanh_backward, gelu_tanh_forward, silu_backward, silu_forward};
use flux_kernels::ops::loss::{mse_backward, mse_forward};
use flux_kernels::ops::modulation::{gated_residual_backward, gated_residual_forward};
use flux_kernels::ops::optim::{clip_grad_norm, AdamW};
use flux_kernels::util::Rng;
use half::bf16;

/// f32 kernels against f32 (or f64-accumulated) CPU code.
const TOL: f64 = 1e-5;
/// AdamW runs in f64 like the CPU.
const TOL_ADAM: f64 = 1e-6;

fn ops_or_skip(test: &str) -> Option<Twins> {
    gpu_or_skip(test, Gpu::new().and_then(|g| Twins::new(&g)))
}

/// Shapes: c not a multiple of the 256-thread tile, l over one 64-token chunk and ragged.
fn shapes() -> Vec<StepDims> {
    vec![StepDims { b: 2, l: 70, c: 300 }, StepDims { b: 1, l: 5, c: 64 }, StepDims { b: 3, l: 129, c: 33 }]
}

#[test]
fn ln_modulate_forward_backward_match_cpu() {
    let Some(ops) = ops_or_skip("ln_modulate_forward_backward_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for d in shapes() {
        let StepDims { b, l, c } = d;
        println!("[b {b}, l {l}, c {c}]");
        // An offset mean, as residual streams have, so the two-pass variance matters.
        let x: Vec<f32> = rng.normal_vec(b * l * c, 2.0).into_iter().map(|v| v + 3.0).collect();
        let shift = rng.normal_vec(b * c, 0.5);
        let scale = rng.normal_vec(b * c, 0.5);
        let dout = rng.normal_vec(b * l * c, 1.0);
        let cpu = ln_modulate(&x, &shift, &scale, b, l, c);
        let gpu = ops.ln_modulate_host(d, LN_EPS, &x, &shift, &scale).unwrap();
        check("out", &gpu.out, &cpu.out, TOL, seed);
        check("n", &gpu.n, &cpu.n, TOL, seed);
        check("rstd", &gpu.rstd, &cpu.rstd, TOL, seed);
        assert!(gpu.mean.iter().all(|m| m.is_finite()), "mean unwritten; seed {seed}");
        // The backward from the CPU's saved n and rstd, so only the backward's error shows.
        let (dx, dsh, dsc) = ln_modulate_backward(&cpu, &dout, &scale, b, l, c);
        let (gdx, gdsh, gdsc) = ops.ln_modulate_backward_host(d, &cpu.n, &cpu.rstd, &dout, &scale).unwrap();
        check("dx", &gdx, &dx, TOL, seed);
        check("dshift", &gdsh, &dsh, TOL, seed);
        check("dscale", &gdsc, &dsc, TOL, seed);
        // Deterministic: a second run gives the same bits.
        let again = ops.ln_modulate_backward_host(d, &cpu.n, &cpu.rstd, &dout, &scale).unwrap();
        assert!(again.1 == gdsh && again.2 == gdsc && again.0 == gdx, "backward not reproducible; seed {seed}");
    }
}

#[test]
fn gated_residual_forward_backward_match_cpu() {
    let Some(ops) = ops_or_skip("gated_residual_forward_backward_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for d in shapes() {
        let StepDims { b, l, c } = d;
        println!("[b {b}, l {l}, c {c}]");
        let x = rng.normal_vec(b * l * c, 1.0);
        let y = rng.normal_vec(b * l * c, 1.0);
        let gate = rng.normal_vec(b * c, 0.7);
        let dout = rng.normal_vec(b * l * c, 1.0);
        let mut want = x.clone();
        gated_residual_forward(&mut want, &y, &gate, b, l, c);
        check("out", &ops.gated_residual_host(d, &x, &y, &gate).unwrap(), &want, TOL, seed);
        let (mut dy, mut dg) = (vec![0f32; b * l * c], vec![0f32; b * c]);
        gated_residual_backward(&mut dy, &mut dg, &dout, &y, &gate, b, l, c);
        let (gdx, gdy, gdg) = ops.gated_residual_backward_host(d, &dout, &y, &gate).unwrap();
        check("dx", &gdx, &dout, 0.0, seed);
        check("dy", &gdy, &dy, TOL, seed);
        check("dgate", &gdg, &dg, TOL, seed);
        let again = ops.gated_residual_backward_host::<f32, f32>(d, &dout, &y, &gate).unwrap();
        assert!(again.2 == gdg, "dgate not reproducible; seed {seed}");
    }
}

/// The forms the device step saves between forward and backward: LayerNorm's n and the
/// modulated output in bf16 (out computed from the rounded n, and `modulate` from the saved n
/// giving out's bits again), the gated branch read as a linear's bf16 output, GELU from bf16 to
/// bf16 both ways. Each against the CPU on the same rounded values.
#[test]
fn bf16_saved_forms_match_cpu() {
    let Some(ops) = ops_or_skip("bf16_saved_forms_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let round = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
    let wide = |v: &[bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
    for d in shapes() {
        let StepDims { b, l, c } = d;
        println!("[b {b}, l {l}, c {c}]");
        let x: Vec<f32> = rng.normal_vec(b * l * c, 2.0).into_iter().map(|v| v + 3.0).collect();
        let (shift, scale) = (rng.normal_vec(b * c, 0.5), rng.normal_vec(b * c, 0.5));
        let dout = rng.normal_vec(b * l * c, 1.0);
        let cpu = ln_modulate(&x, &shift, &scale, b, l, c);
        let (n16, out16, rstd, again) = ops.ln_modulate16_host(d, LN_EPS, &x, &shift, &scale).unwrap();
        // n: the f32 kernel's n is within TOL of the CPU's, so its rounding may differ at a tie.
        check("n (bf16)", &wide(&n16), &cpu.n, 4e-3, seed);
        check("rstd", &rstd, &cpu.rstd, TOL, seed);
        // out from the rounded n, as the CPU computes modulate (f32, then rounded once).
        let n_r = wide(&n16);
        let want: Vec<f32> = (0..b * l * c)
            .map(|i| {
                let (bi, j) = (i / (l * c), i % c);
                (1.0 + scale[bi * c + j]) * n_r[i] + shift[bi * c + j]
            })
            .collect();
        assert_eq!(out16, round(&want), "out: not modulate of the rounded n; seed {seed}");
        assert_eq!(again, out16, "modulate from the saved n: other bits than the forward's out; seed {seed}");
        let cpu16 = LnMod { n: n_r, ..cpu };
        let (dx, dsh, dsc) = ln_modulate_backward(&cpu16, &dout, &scale, b, l, c);
        let (gdx, gdsh, gdsc) = ops.ln_modulate_backward_host(d, &n16, &cpu16.rstd, &dout, &scale).unwrap();
        check("dx (bf16 n)", &gdx, &dx, TOL, seed);
        check("dshift (bf16 n)", &gdsh, &dsh, TOL, seed);
        check("dscale (bf16 n)", &gdsc, &dsc, TOL, seed);

        let y16 = round(&rng.normal_vec(b * l * c, 1.0));
        let (y, gate) = (wide(&y16), rng.normal_vec(b * c, 0.7));
        let mut want = x.clone();
        gated_residual_forward(&mut want, &y, &gate, b, l, c);
        check("gated out (bf16 y)", &ops.gated_residual_host(d, &x, &y16, &gate).unwrap(), &want, TOL, seed);
        let (mut dy, mut dg) = (vec![0f32; b * l * c], vec![0f32; b * c]);
        gated_residual_backward(&mut dy, &mut dg, &dout, &y, &gate, b, l, c);
        let (_, gdy, gdg) = ops.gated_residual_backward_host::<bf16, f32>(d, &dout, &y16, &gate).unwrap();
        check("gated dy (bf16 y)", &gdy, &dy, TOL, seed);
        check("gated dgate (bf16 y)", &gdg, &dg, TOL, seed);
        // dy written in bf16 (the next GEMM's dY): the f32 dy rounded once, bit for bit.
        let (_, gdy16, gdg16) = ops.gated_residual_backward_host::<bf16, bf16>(d, &dout, &y16, &gate).unwrap();
        assert_eq!(gdy16, round(&gdy), "gated dy in bf16: not the f32 dy rounded; seed {seed}");
        assert_eq!(gdg16, gdg, "gated dgate: other bits with a bf16 dy; seed {seed}");
    }
    for n in [1usize, 1000, 70_001] {
        let x16 = round(&rng.normal_vec(n, 3.0));
        let (x, dy) = (wide(&x16), rng.normal_vec(n, 1.0));
        let (out, dx) = ops.gelu_tanh16_host(&x16, &dy).unwrap();
        let mut want = vec![0f32; n];
        gelu_tanh_forward(&mut want, &x);
        assert_eq!(out, round(&want), "gelu bf16 → bf16: not the CPU's bits rounded; seed {seed}");
        gelu_tanh_backward(&mut want, &x, &dy);
        assert_eq!(dx, round(&want), "gelu backward bf16 x → bf16 dx: not the CPU's bits rounded; seed {seed}");
    }
}

#[test]
fn silu_and_gelu_backwards_match_cpu() {
    let Some(ops) = ops_or_skip("silu_and_gelu_backwards_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for n in [1usize, 1000, 70_001] {
        println!("[n {n}]");
        let x = rng.normal_vec(n, 3.0);
        let dout = rng.normal_vec(n, 1.0);
        let mut want = vec![0f32; n];
        silu_forward(&mut want, &x);
        check("silu", &ops.silu_host(&x).unwrap(), &want, TOL, seed);
        silu_backward(&mut want, &x, &dout);
        check("silu backward", &ops.silu_backward_host(&x, &dout).unwrap(), &want, TOL, seed);
        gelu_tanh_backward(&mut want, &x, &dout);
        check("gelu_tanh backward", &ops.gelu_tanh_backward_flat(&x, &dout).unwrap(), &want, TOL, seed);
    }
}

#[test]
fn mse_loss_and_gradient_match_cpu() {
    let Some(ops) = ops_or_skip("mse_loss_and_gradient_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // 300_000 elements: more than FK_STEP_MAX_PARTIALS blocks, so the grid-stride path runs.
    for (n, samples) in [(7usize, None), (4 * 3000, Some(4usize)), (300_000, Some(3))] {
        println!("[n {n}, weights {samples:?}]");
        let pred = rng.normal_vec(n, 1.0);
        let target = rng.normal_vec(n, 1.0);
        let w: Option<Vec<f32>> = samples.map(|s| (0..s).map(|_| 0.5 + rng.uniform() as f32).collect());
        let loss = mse_forward(&pred, &target, w.as_deref());
        let mut grad = vec![0f32; n];
        mse_backward(&mut grad, &pred, &target, w.as_deref());
        let (gloss, ggrad) = ops.mse_host(&pred, &target, w.as_deref()).unwrap();
        let e = ((gloss - loss) / loss).abs();
        println!("loss: {gloss} vs {loss}, relative {e:.2e}");
        assert!(e <= 1e-12, "loss {gloss} vs CPU {loss}; seed {seed}");
        check("grad", &ggrad, &grad, TOL, seed);
        let again = ops.mse_host(&pred, &target, w.as_deref()).unwrap();
        assert!(again.0.to_bits() == gloss.to_bits(), "loss not reproducible; seed {seed}");
    }
}

#[test]
fn adamw_multi_tensor_and_grad_norm_match_cpu() {
    let Some(ops) = ops_or_skip("adamw_multi_tensor_and_grad_norm_match_cpu") else { return };
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // 40 tensors: more than FK_ADAM_MAX_TENSORS (32), so the host splits the list; sizes across
    // block boundaries (4096 elements per block), an empty one, single elements.
    let mut sizes = vec![5000usize, 17, 4096, 1, 0, 300, 8193];
    sizes.extend((0..33).map(|i| 1 + (i * 37) % 500));
    let mut cpu_params: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.normal_vec(n, 0.1)).collect();
    let mut gpu_params = cpu_params.clone();
    let mut cpu_opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.01);
    let mut gpu_opt = cpu_opt.clone();
    let (lr, max_norm) = (1e-3, 5.0);
    for step in 0..3 {
        let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.normal_vec(n, 0.05 + step as f32 * 0.1)).collect();
        let grad_refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let gnorm = ops.grad_norm_host(&grad_refs).unwrap();
        // CPU: clip in place (f32 factor), then step on the clipped gradients.
        let mut unclipped = grads.clone();
        let norm = {
            let mut gm: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
            clip_grad_norm(&mut gm, max_norm)
        };
        let e = ((gnorm - norm) / norm).abs();
        println!("step {step}: grad norm {gnorm} vs {norm}, relative {e:.2e}");
        assert!(e <= 1e-12, "grad norm {gnorm} vs CPU {norm}; seed {seed}");
        let scale = if norm > max_norm { (max_norm / (norm + 1e-6)) as f32 } else { 1.0 };
        {
            let mut pm: Vec<&mut Vec<f32>> = cpu_params.iter_mut().collect();
            let gr: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            cpu_opt.step(&mut pm, &gr, lr);
        }
        {
            // Poison nothing here: parameters and moments are inputs as well as outputs; the
            // comparison below covers every element of each.
            let mut pm: Vec<&mut Vec<f32>> = gpu_params.iter_mut().collect();
            let gr: Vec<&[f32]> = unclipped.iter_mut().map(|g| g.as_slice()).collect();
            ops.adamw_step_host(&mut gpu_opt, &mut pm, &gr, lr, scale).unwrap();
        }
        assert_eq!(gpu_opt.t, cpu_opt.t);
        let flat = |v: &[Vec<f32>]| -> Vec<f32> { v.iter().flatten().copied().collect() };
        let (gp, cp) = (flat(&gpu_params), flat(&cpu_params));
        let differ = gp.iter().zip(&cp).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        println!("step {step}: {differ} of {} parameters differ in any bit", cp.len());
        check("params", &gp, &cp, TOL_ADAM, seed);
        check("m", &flat(&gpu_opt.m), &flat(&cpu_opt.m), TOL_ADAM, seed);
        check("v", &flat(&gpu_opt.v), &flat(&cpu_opt.v), TOL_ADAM, seed);
        for (i, (g, c)) in gpu_params.iter().zip(&cpu_params).enumerate() {
            assert_eq!(g.len(), c.len(), "tensor {i} length");
        }
    }
}
