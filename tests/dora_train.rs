//! DoRA training (`train --adapter dora`, issue 16 §2) on the CPU path, against PEFT
//! (tests/fixtures/dora-train-golden.safetensors from tools/make_dora_train_fixture.py, no Python
//! here): the trainer's initial magnitudes are PEFT's, its forward and every DoRA parameter's
//! gradient match PyTorch autograd through PEFT, the export is PEFT's DoRA file; end to end, a
//! run trains the magnitudes, resumes bit for bit, writes both formats, and a GPU engine is
//! accepted (its comparison with this path is in tests/gpu_flux_step.rs).

mod common;
use common::*;
use flux_kernels::adapters::config::LoraConfig;
use flux_kernels::adapters::export::{write_lora, LoraFormatOut};
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::{AdapterSet, Kind};
use flux_kernels::engine::{Device, Engine, EngineOptions};
use flux_kernels::io::safetensors::{Dtype, SafeTensors};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::{flux_forward, FluxInputs};
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::train::builtin::{synthetic_samples, write_samples};
use flux_kernels::train::config::TrainConfig;
use flux_kernels::train::trainer::{init_adapters, train, AdapterInit};
use flux_kernels::util::{rel_l2, Rng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// As in tools/make_dora_train_fixture.py.
const TARGETS: &str =
    "to_q,to_k,to_v,add_v_proj,to_out.0,ff.net.0.proj,proj_mlp,proj_out,norm_out.linear,x_embedder,context_embedder";
const PARTS: [&str; 3] = ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"];

fn golden() -> SafeTensors {
    SafeTensors::open(&fixture("dora-train-golden.safetensors")).unwrap()
}

fn tiny() -> (Checkpoint, FluxWeights) {
    let ckpt = Checkpoint::open(&fixture("tiny-diffusers"), None).unwrap();
    let w = FluxWeights::new(&ckpt.cfg, &|n| ckpt.param(n).cloned()).unwrap();
    (ckpt, w)
}

/// A tensor of the set's order (A, B, m of each term) to or from PEFT's layout under its key:
/// the rows of diffusers' norm_out.linear are BFL's with the halves swapped (an involution).
fn peft_order(v: &mut [f32], part: usize, rows: usize, rank: usize, swap: bool) {
    if swap && part > 0 {
        v.rotate_left(rows / 2 * if part == 1 { rank } else { 1 });
    }
}

#[test]
fn dora_training_step_matches_peft_autograd() {
    let g = golden();
    let (ckpt, weights) = tiny();
    let cfg = ckpt.cfg.clone();
    let lc = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: TARGETS.split(',').map(String::from).collect(),
        use_dora: true,
        ..LoraConfig::default()
    };
    let AdapterInit { specs, mut set } = init_adapters(&cfg, &lc, &mut Rng::new(3), Some(&weights)).unwrap();
    assert_eq!(specs.len(), 26);
    // The count the trainer prints is PEFT's: every trainable tensor, magnitudes included.
    let peft_count: usize = g.tensors().iter().filter(|(k, _)| k.starts_with("param.")).map(|(_, i)| i.numel()).sum();
    assert_eq!(specs.iter().map(|s| s.param_count()).sum::<usize>(), peft_count);
    assert!(set.terms().iter().all(|t| matches!(t.kind, Kind::Dora { rank: 4 }) && t.sizes_ok()));

    // The initial magnitudes: PEFT's ‖W‖ per output row, in diffusers' row order under its key.
    let key = |name: &str, part: &str| format!("transformer.{name}.{part}");
    let mut worst_init = 0f64;
    for (s, t) in specs.iter().zip(set.terms()) {
        let mut m = t.magnitude().to_vec();
        peft_order(&mut m, 2, t.rows.len(), 4, s.target.swap_halves);
        let want = g.read_f32(&format!("init.{}", key(&s.name, PARTS[2]))).unwrap().1;
        worst_init = worst_init.max(rel_l2(&m, &want));
    }
    println!("initial magnitudes vs PEFT's: worst rel L2 {worst_init:.2e}");
    assert!(worst_init < 1e-6, "{worst_init:e}");

    // PEFT's parameters into the set (its order), then one training forward and backward.
    let mut params = Vec::new();
    for (s, t) in specs.iter().zip(set.terms()) {
        for (part, name) in PARTS.iter().enumerate() {
            let mut v = g.read_f32(&format!("param.{}", key(&s.name, name))).unwrap().1;
            peft_order(&mut v, part, t.rows.len(), 4, s.target.swap_halves);
            params.push(v);
        }
    }
    set.set_params(params).unwrap();
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), &cfg).unwrap();
    let target = SafeTensors::open(&fixture("tiny-grad-target.safetensors")).unwrap().read_f32("target").unwrap().1;
    let mut engine = Engine::new(&Device::Cpu, &cfg, tiny().1, EngineOptions::default()).unwrap();
    engine.train_adapters(&set, None).unwrap();
    let fwd = engine.forward_train(&inp, None).unwrap();
    let pred = engine.prediction(&fwd).unwrap();
    let e_out = rel_l2(&pred, &g.read_f32("out").unwrap().1);
    let loss = engine.backward_mse(fwd, &target, None, 1.0).unwrap();
    let want_loss = g.read_f32("loss").unwrap().1[0] as f64;
    println!("training forward vs PEFT: rel L2 {e_out:.2e}; loss {loss:.6} vs {want_loss:.6}");
    assert!(e_out < 1e-4, "forward: {e_out:e}");
    assert!((loss - want_loss).abs() < 1e-4 * want_loss, "loss {loss} vs PEFT {want_loss}");
    let grads = engine.grads().unwrap();
    let mut worst = (0f64, String::new());
    for (i, (s, t)) in specs.iter().zip(set.terms()).enumerate() {
        for (part, name) in PARTS.iter().enumerate() {
            let mut gv = grads[3 * i + part].clone();
            peft_order(&mut gv, part, t.rows.len(), 4, s.target.swap_halves);
            let k = key(&s.name, name);
            let e = rel_l2(&gv, &g.read_f32(&format!("grad.{k}")).unwrap().1);
            assert!(e < 1e-4, "{k}: rel L2 {e:e}");
            if e > worst.0 {
                worst = (e, k);
            }
        }
    }
    println!("{} DoRA parameter gradients vs PEFT autograd: worst rel L2 {:.2e} ({})", grads.len(), worst.0, worst.1);
    assert_eq!(grads.len(), 78);

    // The export is PEFT's file: the same keys (magnitudes as PEFT saves them), A and m as they
    // are, B with the scale 2 in it; loaded back it computes the training forward.
    let dir = tmpdir("dora-train-export");
    let out = dir.join("dora.safetensors");
    write_lora(&out, &cfg, set.terms(), LoraFormatOut::Peft, Dtype::F32, BTreeMap::new(), None).unwrap();
    let (t, meta) = read_all(&out);
    let golden_keys: Vec<String> =
        g.tensors().keys().filter_map(|k| k.strip_prefix("param.")).map(String::from).collect();
    let mut keys: Vec<String> = t.iter().map(|x| x.0.clone()).collect();
    keys.sort();
    assert_eq!(keys, golden_keys);
    for (k, _, _, v) in &t {
        let mut want = g.read_f32(&format!("param.{k}")).unwrap().1;
        if k.ends_with("lora_B.weight") {
            want.iter_mut().for_each(|x| *x *= 2.0);
        }
        assert!(rel_l2(v, &want) < 1e-7, "{k}");
    }
    let config: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    assert_eq!(config["transformer.use_dora"], true);
    let mut loaded = AdapterSet::new();
    loaded.add(&load_lora(&out, &cfg, UnknownKeys::Error).unwrap().terms, 1.0);
    let back = flux_forward(&cfg, &tiny().1, &inp, &loaded).unwrap();
    let e = rel_l2(&back, &pred);
    println!("exported DoRA file loaded back vs the training forward: rel L2 {e:.2e}");
    assert!(e < 1e-5, "{e:e}");
}

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// A short DoRA run on the tiny fixture model (split and fused targets, top-level linears, LoRA
/// dropout, accumulation) over synthetic cached samples.
fn dora_config(dir: &Path) -> TrainConfig {
    let (ckpt, _) = tiny();
    write_samples(&dir.join("data"), &synthetic_samples(&ckpt.cfg, 6, 8, 4, 1), ckpt.cfg.context_in_dim).unwrap();
    TrainConfig {
        model: fixture("tiny-diffusers").display().to_string(),
        data: dir.join("data").display().to_string(),
        adapter: "dora".into(),
        rank: 4,
        targets: "img_attn.qkv,to_out.0,proj_mlp,ff.net.2,x_embedder,proj_out,context_embedder".into(),
        dropout: 0.1,
        batch_size: 2,
        grad_accum: 2,
        steps: 5,
        lr: 1e-2,
        save_dtype: "f32".into(),
        device: "cpu".into(),
        ..TrainConfig::default()
    }
}

/// The tiny fixture's forward on its inputs with `file` loaded at strength 1.
fn forward_with(file: &str) -> Vec<f32> {
    run_forward(&fixture("tiny-diffusers"), None, &[(PathBuf::from(file), 1.0)]).unwrap()
}

#[test]
fn train_adapter_dora_trains_magnitudes_resumes_bit_for_bit_and_writes_both_formats() {
    let dir = tmpdir("dora-train-run");
    let mut full = dora_config(&dir);
    full.out = dir.join("full/dora.safetensors").display().to_string();
    let o = train(full.clone(), None, no_stop(), true).unwrap();
    assert!(o.final_loss.is_finite() && o.steps_done == 5);
    let got = file_tensors(&full.out);
    let (_, meta) = read_all(Path::new(&full.out));
    let config: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    assert_eq!(config["transformer.use_dora"], true);
    assert_eq!(meta["flux_kernels.adapter"], "dora");
    let mags = got.keys().filter(|k| k.ends_with(".lora_magnitude_vector")).count();
    assert_eq!(3 * mags, got.len(), "a magnitude per module");
    for m in ["x_embedder", "proj_out", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp"] {
        assert!(got.contains_key(&format!("transformer.{m}.lora_magnitude_vector")), "{m}");
    }
    // The magnitudes trained: they moved off PEFT's start, ‖W‖ per row.
    let (_, weights) = tiny();
    let lin = weights.linear("img_in").unwrap();
    let w = lin.weight.load().unwrap();
    let row_norm = |r: usize| w[r * lin.d_in..(r + 1) * lin.d_in].iter().map(|x| x * x).sum::<f32>().sqrt();
    let start: Vec<f32> = (0..lin.d_out).map(row_norm).collect();
    let moved = rel_l2(&got["transformer.x_embedder.lora_magnitude_vector"], &start);
    println!("x_embedder magnitude after 5 steps vs its start ‖W‖: rel L2 {moved:.2e}");
    assert!(moved > 1e-4, "the magnitude did not train: {moved:e}");
    let base = run_forward(&fixture("tiny-diffusers"), None, &[]).unwrap();
    let effect = rel_l2(&forward_with(&full.out), &base);
    println!("trained DoRA file's effect on the fixture's output: rel L2 {effect:.2e} from the base");
    assert!(effect > 1e-3, "{effect:e}");

    // Stopped after its first step, then resumed: the same file bit for bit.
    let mut part = full.clone();
    part.out = dir.join("part/dora.safetensors").display().to_string();
    let ckpt = resumes_bit_for_bit(&part, &got);
    // A DoRA checkpoint does not resume as LoRA: the layouts differ.
    let mut lora = part.clone();
    lora.adapter = "lora".into();
    lora.steps = 6;
    let e = err_string(train(lora, Some(&ckpt), no_stop(), true));
    assert!(e.contains("adapters differ"), "{e}");

    // kohya: dora_scale [out, 1] per BFL module; the same run computes the same output either way.
    let mut kohya = full.clone();
    kohya.out = dir.join("kohya/dora.safetensors").display().to_string();
    kohya.format = "kohya".into();
    train(kohya.clone(), None, no_stop(), true).unwrap();
    let (t, _) = read_all(Path::new(&kohya.out));
    let ds = t.iter().find(|x| x.0 == "lora_unet_img_in.dora_scale").expect("img_in dora_scale");
    assert_eq!(ds.1, vec![32, 1]);
    assert!(t.iter().any(|x| x.0 == "lora_unet_double_blocks_0_img_attn_qkv.dora_scale"));
    // proj_mlp is the MLP part of linear1: its q/k/v rows take their frozen norms (g = 1).
    let (_, weights) = tiny();
    let lin1 = weights.linear("single_blocks.1.linear1").unwrap();
    let frozen = flux_kernels::adapters::dora::frozen_row_norms(&lin1.weight.load().unwrap(), lin1.d_in);
    let ds = &t.iter().find(|x| x.0 == "lora_unet_single_blocks_1_linear1.dora_scale").expect("linear1").3;
    assert_eq!(ds.len(), 96 + 128);
    assert!(ds[..96] == frozen[..96] && ds[96..] != frozen[96..]);
    let e = rel_l2(&forward_with(&kohya.out), &forward_with(&full.out));
    println!("the same DoRA run written as kohya vs as PEFT: rel L2 {e:.2e}");
    assert!(e < 1e-5, "{e:e}");
}

/// `--adapter dora --device cuda` is accepted (the CUDA engine trains DoRA: tests/gpu_flux_step.rs
/// compares it with this CPU path); where no GPU is present the run stops at the device with a
/// clear error and writes nothing, and a misspelt kind is refused by name.
#[test]
fn dora_training_on_a_gpu_engine_is_accepted() {
    let dir = tmpdir("dora-train-cuda");
    let mut tc = dora_config(&dir);
    tc.out = dir.join("dora.safetensors").display().to_string();
    tc.device = "cuda".into();
    tc.validate().expect("DoRA on the CUDA engine passes validation");
    if flux_kernels::engine::Device::parse("cuda").is_err() {
        let e = err_string(train(tc.clone(), None, no_stop(), true));
        assert!(!e.contains("DoRA training runs on the CPU path"), "{e}");
        assert!(e.to_lowercase().contains("cuda") || e.contains("GPU"), "{e}");
        assert!(!dir.join("dora.safetensors").exists());
    }
    let (ok, s) = run(&["train", "--data", &tc.data, "--adapter", "dorra", "--out", &tc.out]);
    assert!(!ok && s.contains("adapter") && s.contains("dorra"), "{s}");
}
