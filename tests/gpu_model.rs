//! The engine on the GPU (`--device cuda`: the device-resident model) against the engine on the
//! CPU (the f32 reference), with two adapter files and LoRA dropout, from the same fixture
//! checkpoint as the golden tests: the forward
//! output within relative L2 1e-2, all LoRA gradients together within 2e-2 and each gradient
//! tensor within 1e-1 (a wrong term gives O(1) there), never NaN. Wider than the per-kernel bound (1e-2, tests/gpu_lora.rs)
//! because every linear's operands are rounded to bf16 on the GPU and the rounding compounds
//! through the blocks; it is largest on the text stream, whose gradient reaches it only through
//! attention and cancels most. Measured through the CPU emulation of the kernels
//! (tools/gpu-check.sh --emulate), with LoRA dropout 0.2: forward 6.8e-3, all gradients 1.1e-2,
//! worst tensor 4.8e-2 (double_blocks.0.txt_attn.proj dA); without dropout 6.9e-3, 1.25e-2, 3.5e-2;
//! with the flash-attention kernels added (emulated) 7.2e-3, 1.1e-2, 5.2e-2, and on an H200
//! (linears only, 2026-11-28) 7.1e-3, 1.1e-2, 4.2e-2. Skipped, with a line that says why, where
//! there is no GPU.

mod common;
use common::*;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::AdapterSet;
use flux_kernels::engine::{Device, Engine, EngineOptions};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::FluxInputs;
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::util::{rel_l2, Rng};

#[test]
fn gpu_linears_match_cpu_forward_and_gradients() {
    let Some(device) = cuda_or_skip("gpu_linears_match_cpu_forward_and_gradients") else { return };
    compare(&fixture("tiny-diffusers"), device, "bf16 base", Some((0.2, 77)), LORAS);
}

/// Without dropout: on compute capability 9.0 (and under the emulation, which reports it) the
/// input gradients of every linear go through the sm_90a kernels (kernels/lora_gemm_sm90.cu;
/// with dropout, a linear that carries terms of both files has two masked terms and stays on
/// the sm_80 kernel; the fixture's rank-4 factors keep the forward there too).
#[test]
fn gpu_linears_without_dropout_match_cpu() {
    let Some(device) = cuda_or_skip("gpu_linears_without_dropout_match_cpu") else { return };
    compare(&fixture("tiny-diffusers"), device, "bf16 base, no dropout", None, LORAS);
}

/// The same with an int8 base (`quantize --format int8`): the CPU multiplies with its
/// dequantising reference, the GPU dequantises the codes inside the fused kernel.
#[test]
fn gpu_int8_base_matches_cpu() {
    let Some(device) = cuda_or_skip("gpu_int8_base_matches_cpu") else { return };
    let out = tmpdir("gpu-int8-base").join("int8.safetensors");
    flux_kernels::cli::quantize::run(fixture("tiny-bfl.safetensors").to_str().unwrap(), &out, "int8", Some("4,6,6"))
        .unwrap();
    compare(&out, device.clone(), "int8 base", Some((0.2, 77)), LORAS);
    compare(&out, device, "int8 base, DoRA", None, &[("lora-peft-dora.safetensors", 1.0)]);
}

/// DoRA (issue 16 §2) on the CUDA engine: the PEFT DoRA fixture alone with dropout (the rescale
/// in the GEMM's epilogue, the row norms from ‖W‖², A·Wᵀ and A·Aᵀ; the magnitudes' gradients),
/// and at half strength stacked with a LoRA file on the same linears (the LoRA terms added after
/// the rescale, as the CPU reference has it). The bounds are the LoRA tests'. Measured under
/// the CPU emulation: DoRA alone forward 3.7e-3, all gradients 8.2e-3, worst tensor 1.9e-2 (a
/// magnitude's); int8 base 4.3e-3, 1.0e-2, 3.0e-2.
#[test]
fn gpu_dora_matches_cpu() {
    let Some(device) = cuda_or_skip("gpu_dora_matches_cpu") else { return };
    let model = fixture("tiny-diffusers");
    compare(&model, device.clone(), "DoRA", Some((0.2, 77)), &[("lora-peft-dora.safetensors", 1.0)]);
    // (Both PEFT files: 8 terms on single blocks' linear1, the GPU's most per linear.)
    let stacked = [("lora-peft-dora.safetensors", 0.5), ("lora-peft.safetensors", 1.0)];
    compare(&model, device, "DoRA stacked with LoRA", None, &stacked);
}

const LORAS: &[(&str, f32)] = &[("lora-peft.safetensors", 1.0), ("lora-kohya.safetensors", 1.0)];

fn cuda_or_skip(test: &str) -> Option<Device> {
    gpu_or_skip(test, Device::parse("cuda").map(|(d, _)| d))
}

/// Forward and gradients of every adapter parameter of `files` (fixture name, strength) on
/// `device` against the CPU engine.
fn compare(model: &std::path::Path, device: Device, what: &str, dropout: Option<(f32, u64)>, files: &[(&str, f32)]) {
    let ckpt = Checkpoint::open(model, Some(vec![4, 6, 6])).unwrap();
    let cfg = &ckpt.cfg;
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), cfg).unwrap();
    let mut set = AdapterSet::new();
    for (file, strength) in files {
        set.add(&load_lora(&fixture(file), cfg, UnknownKeys::Error).unwrap().terms, *strength);
    }
    let dy = Rng::new(9).normal_vec(inp.b * inp.n_img * cfg.out_channels, 1.0);
    let run = |dev: &Device| {
        let w = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned()).unwrap();
        let mut e = Engine::new(dev, cfg, w, EngineOptions::default()).unwrap();
        e.train_adapters(&set, None).unwrap();
        let f = e.forward_train(&inp, dropout).unwrap();
        let y = e.prediction(&f).unwrap();
        e.backward(f, &dy).unwrap();
        (y, e.grads().unwrap())
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu);
    let (y_gpu, g_gpu) = run(&device);
    assert!(y_gpu.iter().all(|v| v.is_finite()), "{what}: non-finite prediction");
    let e = rel_l2(&y_gpu, &y_cpu);
    println!("{what}: forward rel L2 {e:.2e}");
    assert!(e <= 1e-2, "{what}: forward rel L2 {e:e}");
    assert_eq!(g_gpu.len(), g_cpu.len(), "{what}: gradient tensor count");
    let (mut all_gpu, mut all_cpu) = (Vec::new(), Vec::new());
    let mut worst = (0f64, String::new());
    // Each gradient tensor's term and name, in the parameter order (A, B, a DoRA magnitude).
    let names: Vec<(&str, &str)> = set
        .terms()
        .iter()
        .flat_map(|t| ["dA", "dB", "dm"][..t.params.len()].iter().map(move |n| (t.module.as_str(), *n)))
        .collect();
    assert_eq!(names.len(), g_cpu.len());
    for ((a, b), (module, name)) in g_gpu.iter().zip(&g_cpu).zip(names) {
        assert!(a.iter().all(|v| v.is_finite()), "{what}: {module} {name} not finite");
        let e = rel_l2(a, b);
        assert!(e <= 1e-1, "{what}: {module} {name}: rel L2 {e:e}");
        if e > worst.0 {
            worst = (e, format!("{module} {name}"));
        }
        all_gpu.extend_from_slice(a);
        all_cpu.extend_from_slice(b);
    }
    let e = rel_l2(&all_gpu, &all_cpu);
    println!("{what}: all LoRA gradients rel L2 {e:.2e}; worst tensor {:.2e} ({})", worst.0, worst.1);
    assert!(e <= 2e-2, "{what}: all gradients: rel L2 {e:e}");
}

/// Sample `j` of `inp` as a batch of one, its latents moved by `shift` (so that samples differ).
fn one_sample(inp: &FluxInputs, j: usize, shift: f32) -> FluxInputs {
    let take = |v: &[f32]| -> Vec<f32> {
        let n = v.len() / inp.b;
        v[j * n..(j + 1) * n].to_vec()
    };
    FluxInputs {
        b: 1,
        img: take(&inp.img).iter().map(|x| x + shift).collect(),
        img_ids: take(&inp.img_ids),
        txt: take(&inp.txt),
        txt_ids: take(&inp.txt_ids),
        y: take(&inp.y),
        timesteps: take(&inp.timesteps),
        guidance: inp.guidance.as_deref().map(take),
        ..inp.clone()
    }
}

/// Batches of one stacked into one batch.
fn stack(xs: &[FluxInputs]) -> FluxInputs {
    let cat = |f: &dyn Fn(&FluxInputs) -> &[f32]| xs.iter().flat_map(|x| f(x).to_vec()).collect::<Vec<f32>>();
    FluxInputs {
        b: xs.len(),
        img: cat(&|x| &x.img),
        img_ids: cat(&|x| &x.img_ids),
        txt: cat(&|x| &x.txt),
        txt_ids: cat(&|x| &x.txt_ids),
        y: cat(&|x| &x.y),
        timesteps: cat(&|x| &x.timesteps),
        guidance: xs[0].guidance.as_ref().map(|_| cat(&|x| x.guidance.as_deref().unwrap())),
        ..xs[0].clone()
    }
}

/// Different LoRA sets in one batch on the GPU (issue 20, `Engine::set_batch_adapters`): each
/// sample's prediction must be what a batch of one with its own set gives — bit for bit under the
/// emulation, where every call sees the same per-row arithmetic (on a card cuBLAS may pick
/// another algorithm for another row count: within bf16 rounding there) — and the batch must
/// match the CPU engine's per-sample batch within the forward bound above. Seven samples: LoRA
/// file 1, the same set again (uploaded once, one call over both samples' rows), no adapters, a
/// stack of both files at other strengths, file 1 again after them (a separate call), and two DoRA
/// sets on the same linear.
#[test]
fn gpu_mixed_lora_batch_matches_each_sample_alone() {
    let Some(device) = cuda_or_skip("gpu_mixed_lora_batch_matches_each_sample_alone") else { return };
    let ckpt = Checkpoint::open(&fixture("tiny-diffusers"), Some(vec![4, 6, 6])).unwrap();
    let cfg = &ckpt.cfg;
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), cfg).unwrap();
    let peft = load_lora(&fixture("lora-peft.safetensors"), cfg, UnknownKeys::Error).unwrap().terms;
    let kohya = load_lora(&fixture("lora-kohya.safetensors"), cfg, UnknownKeys::Error).unwrap().terms;
    let mut one = AdapterSet::new();
    one.add(&peft, 1.0);
    let mut both = AdapterSet::new();
    both.add(&peft, 0.5);
    both.add(&kohya, 1.5);
    // Two DoRA sets on the same linear, on different rows (q and k of img_attn.qkv) with other
    // factors and magnitudes: each call must read its own set's rescale, 1 on the rows its set
    // leaves alone (the per-set DoRA state of `DevLora::per_sample`).
    let dora = |seed: u64, mag: f32, rows: std::ops::Range<usize>| {
        let (c, n, module) = (cfg.hidden_size, rows.len(), "double_blocks.0.img_attn.qkv");
        let mut rng = Rng::new(seed);
        let (a, b) = (rng.normal_vec(4 * c, 0.1), rng.normal_vec(n * 4, 0.1));
        let mut s = AdapterSet::new();
        s.push(flux_kernels::adapters::Term::lora(module, rows, c, 4, 1.0, a, b).with_magnitude(vec![mag; n]));
        s
    };
    let c = cfg.hidden_size;
    let sets = vec![one.clone(), one.clone(), AdapterSet::new(), both, one, dora(5, 1.0, 0..c), dora(6, 2.0, c..2 * c)];
    let samples: Vec<FluxInputs> = (0..sets.len()).map(|i| one_sample(&inp, i % inp.b, 0.1 * i as f32)).collect();
    let batch = stack(&samples);
    let engine = |dev: &Device| {
        let w = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned()).unwrap();
        Engine::new(dev, cfg, w, EngineOptions::default()).unwrap()
    };
    let mut gpu = engine(&device);
    gpu.set_batch_adapters(&sets).unwrap();
    let mixed = gpu.forward(&batch).unwrap();
    let per = mixed.len() / sets.len();
    for (i, (set, x)) in sets.iter().zip(&samples).enumerate() {
        gpu.set_adapters(set).unwrap();
        let alone = gpu.forward(x).unwrap();
        assert!(alone.iter().all(|v| v.is_finite()), "sample {i}: NaN");
        let e = rel_l2(&mixed[i * per..(i + 1) * per], &alone);
        println!("mixed batch sample {i}: rel L2 against alone {e:.2e}");
        assert!(e == 0.0, "sample {i}: the mixed batch differs from the sample alone (rel L2 {e:e})");
    }
    // The adapters act: sample 0 without its set moves well beyond rounding.
    gpu.set_adapters(&AdapterSet::new()).unwrap();
    let bare = gpu.forward(&samples[0]).unwrap();
    let effect = rel_l2(&mixed[..per], &bare);
    assert!(effect > 1e-3, "the LoRA hardly moves sample 0 ({effect:e}); the check would prove nothing");
    let mut cpu = engine(&Device::Cpu);
    cpu.set_batch_adapters(&sets).unwrap();
    let want = cpu.forward(&batch).unwrap();
    let e = rel_l2(&mixed, &want);
    println!("mixed batch: GPU against CPU rel L2 {e:.2e}");
    assert!(e <= 1e-2, "mixed batch, GPU against CPU: rel L2 {e:e}");
    // A wrong batch size is refused, not run.
    let err = gpu.set_batch_adapters(&sets).and_then(|_| gpu.forward(&samples[0])).unwrap_err();
    assert!(format!("{err:#}").contains("per-sample adapters for 7"), "{err:#}");
}

/// Bad adapters on the CUDA engine are errors that name the module, never a panic: LoKr and LoHa
/// terms (the CPU engine's only), a DoRA magnitude of the wrong length, two DoRA terms on
/// overlapping rows of one linear (one column scale per row), rows outside the linear.
#[test]
fn gpu_refuses_what_it_cannot_run_clearly() {
    use flux_kernels::adapters::{Kind, Term};
    let Some(device) = cuda_or_skip("gpu_refuses_what_it_cannot_run_clearly") else { return };
    let ckpt = Checkpoint::open(&fixture("tiny-diffusers"), Some(vec![4, 6, 6])).unwrap();
    let cfg = &ckpt.cfg;
    let w = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let mut e = Engine::new(&device, cfg, w, EngineOptions::default()).unwrap();
    let (c, module) = (cfg.hidden_size, "double_blocks.0.img_attn.qkv");
    let mut rng = Rng::new(3);
    let mut lora = |rows: std::ops::Range<usize>| {
        let (r, n) = (4, rows.len());
        Term::lora(module, rows, c, r, 1.0, rng.normal_vec(r * c, 0.1), rng.normal_vec(n * r, 0.1))
    };
    let dora = |t: Term| {
        let n = t.rows.len();
        t.with_magnitude(vec![1.0; n])
    };
    let mut err = |terms: Vec<Term>| {
        let mut set = AdapterSet::new();
        terms.into_iter().for_each(|t| set.push(t));
        format!("{:#}", e.set_adapters(&set).expect_err("refused"))
    };
    let lokr = Term::lycoris(module, 0..c, c, Kind::Lokr { w1: [1, 1], w2: [c, c], r1: None, r2: None }, 1.0, vec![]);
    let loha = Term::lycoris(module, 0..c, c, Kind::Loha { r1: 2, r2: 2 }, 1.0, vec![]);
    for (what, t) in [("LoKr", lokr), ("LoHa", loha)] {
        let m = err(vec![t]);
        assert!(m.contains(what) && m.contains(module) && m.contains("--device cpu"), "{m}");
    }
    let mut short = dora(lora(0..c));
    short.params[2] = std::sync::Arc::new(vec![1.0; c - 1]);
    let m = err(vec![short]);
    assert!(m.contains(module) && m.contains("magnitude"), "{m}");
    let m = err(vec![dora(lora(0..c)), dora(lora(c / 2..2 * c))]);
    assert!(m.contains(module) && m.contains("overlapping"), "{m}");
    let m = err(vec![dora(lora(2 * c..4 * c))]);
    assert!(m.contains(module) && m.contains("outside"), "{m}");
    // Disjoint DoRA terms on one linear (q and k of a fused qkv) are fine.
    let mut set = AdapterSet::new();
    set.push(dora(lora(0..c)));
    set.push(dora(lora(c..2 * c)));
    e.set_adapters(&set).unwrap();
}
