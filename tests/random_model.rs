//! `--model random:NAME[:SEED]`: a full-size model without a file, deterministic per seed.

mod common;
use common::*;
use flux_kernels::adapters::AdapterSet;
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::flux_forward;
use flux_kernels::model::quant_quality::random_inputs;
use flux_kernels::model::weights::FluxWeights;
use std::path::Path;
use std::process::Command;

fn forward(spec: &str) -> Vec<f32> {
    let ckpt = Checkpoint::open(Path::new(spec), None).unwrap();
    let w = FluxWeights::new(&ckpt.cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let inp = random_inputs(&ckpt.cfg, 1, 4, 4, 8, 5);
    flux_forward(&ckpt.cfg, &w, &inp, &AdapterSet::new()).unwrap()
}

#[test]
fn forward_is_deterministic_per_seed_and_differs_across_seeds() {
    let a = forward("random:tiny:1");
    assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0));
    assert_eq!(a, forward("random:tiny:1"));
    assert_ne!(a, forward("random:tiny:2"));
    assert_eq!(forward("random:tiny"), forward("random:tiny:0"), "the seed defaults to 0");
}

#[test]
fn full_size_model_costs_nothing_until_read() {
    let ckpt = Checkpoint::open(Path::new("random:flux1-dev:3"), None).unwrap();
    assert_eq!(ckpt.cfg.param_count(), 11_901_408_320);
    assert_eq!(ckpt.params.len(), 780);
    let w = ckpt.param("double_blocks.18.img_mlp.2.weight").unwrap().load().unwrap();
    assert_eq!(w.len(), 3072 * 12288);
    let bound = 1.0 / (12288f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > 0.9 * bound));
    let schnell = Checkpoint::open(Path::new("random:flux1-schnell"), None).unwrap();
    assert!(!schnell.cfg.guidance_embed);
    let out = Command::new(env!("CARGO_BIN_EXE_flux-kernels")).args(["info", "--model", "random:flux1-dev"]).output();
    let s = String::from_utf8(out.unwrap().stdout).unwrap();
    assert!(s.contains("parameters: 11,901,408,320") && s.contains("random (generated on read)"), "{s}");
}

#[test]
fn bad_specs_name_the_setting() {
    let e = err_string(Checkpoint::open(Path::new("random:flux3"), None));
    assert!(e.contains("random:flux3") && e.contains("not a built-in configuration"), "{e}");
    let e = err_string(Checkpoint::open(Path::new("random:tiny:abc"), None));
    assert!(e.contains("seed `abc`"), "{e}");
}

#[test]
fn train_runs_on_a_random_model() {
    let dir = tmpdir("random-train");
    let cfg = flux_kernels::train::builtin::tiny_config();
    let samples = flux_kernels::train::builtin::synthetic_samples(&cfg, 2, 4, 4, 1);
    flux_kernels::train::builtin::write_samples(&dir.join("data"), &samples, cfg.context_in_dim).unwrap();
    let tc = flux_kernels::train::config::TrainConfig {
        model: "random:tiny:9".into(),
        data: dir.join("data").display().to_string(),
        out: dir.join("lora.safetensors").display().to_string(),
        steps: 2,
        rank: 2,
        device: "cpu".into(),
        ..Default::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let o = flux_kernels::train::trainer::train(tc, None, stop, true).unwrap();
    assert!(o.steps_done == 2 && o.final_loss.is_finite());
}
