//! LoKr training (`train --adapter lokr --lokr-factor F`, issue 16 §3) on the CPU path: the
//! trainer builds LyCORIS's `LokrModule` (shapes, which factors start at zero, scale: the
//! `train_shapes` of tests/fixtures/lycoris-lokr-golden.safetensors from
//! tools/make_lycoris_fixture.py); its forward and factor gradients are the ones tests/lycoris.rs
//! checks against LyCORIS's autograd. End to end: a run trains w1 and w2, writes a LyCORIS file
//! (kohya dialect) that loads back to what it trained, resumes bit for bit, and a GPU engine, the
//! peft format and dropout are refused clearly.

mod common;
use common::*;
use flux_kernels::adapters::config::LoraConfig;
use flux_kernels::adapters::Kind;
use flux_kernels::io::safetensors::SafeTensors;
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::train::builtin::{synthetic_samples, write_samples};
use flux_kernels::train::config::TrainConfig;
use flux_kernels::train::trainer::{init_adapters, train, AdapterInit};
use flux_kernels::util::{rel_l2, Rng};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// As TRAIN_TARGETS in tools/make_lycoris_fixture.py.
const TARGETS: [&str; 8] = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.proj_out",
    "norm_out.linear",
    "x_embedder",
    "context_embedder",
];

#[test]
fn lokr_init_is_lycoris_lokr_module() {
    let g = SafeTensors::open(&fixture("lycoris-lokr-golden.safetensors")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&g.metadata()["train_shapes"]).unwrap();
    let cfg = Checkpoint::open(&fixture("tiny-diffusers"), None).unwrap().cfg;
    let mut checked = 0;
    for factor in [4i64, -1] {
        for name in TARGETS {
            let lc = LoraConfig {
                rank: 4,
                alpha: 8.0,
                targets: vec![name.to_string()],
                lokr_factor: Some(factor),
                ..LoraConfig::default()
            };
            let AdapterInit { specs, set } = init_adapters(&cfg, &lc, &mut Rng::new(1), None).unwrap();
            let w = &want[format!("{name}|{factor}")];
            // `proj_out` also names the final linear (PEFT's suffix rule): take the block's.
            let i = specs.iter().position(|s| s.name == name).unwrap();
            let t = &set.terms()[i];
            assert!(matches!(t.kind, Kind::Lokr { r1: None, .. }) && t.sizes_ok(), "{name}");
            let params = w["params"].as_object().unwrap();
            let names = t.kind.lycoris_names();
            assert_eq!(names.len(), params.len(), "{name} {factor}: {:?} vs {params:?}", t.kind);
            for ((n, shape), p) in names.iter().zip(t.param_shapes()).zip(&t.params) {
                let lw = &params[*n];
                let lshape: Vec<usize> = serde_json::from_value(lw["shape"].clone()).unwrap();
                assert_eq!(shape, lshape, "{name} {factor} {n}");
                assert_eq!(p.iter().all(|&v| v == 0.0), lw["zero"].as_bool().unwrap(), "{name} {factor} {n}");
            }
            assert_eq!(t.scale as f64, w["scale"].as_f64().unwrap(), "{name} {factor}");
            assert_eq!(specs[i].param_count(), t.param_count());
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

fn lokr_config(dir: &Path) -> TrainConfig {
    let cfg = Checkpoint::open(&fixture("tiny-diffusers"), None).unwrap().cfg;
    write_samples(&dir.join("data"), &synthetic_samples(&cfg, 6, 8, 4, 1), cfg.context_in_dim).unwrap();
    TrainConfig {
        model: fixture("tiny-diffusers").display().to_string(),
        data: dir.join("data").display().to_string(),
        adapter: "lokr".into(),
        lokr_factor: 4,
        format: "kohya".into(),
        rank: 4,
        alpha: 8.0,
        targets: "img_attn.qkv,to_out.0,proj_mlp,ff.net.2,x_embedder,norm_out.linear,context_embedder".into(),
        batch_size: 2,
        grad_accum: 2,
        steps: 5,
        lr: 1e-2,
        save_dtype: "f32".into(),
        device: "cpu".into(),
        ..TrainConfig::default()
    }
}

#[test]
fn train_adapter_lokr_trains_writes_lycoris_and_resumes_bit_for_bit() {
    let dir = tmpdir("lokr-train-run");
    let mut full = lokr_config(&dir);
    full.out = dir.join("full/lokr.safetensors").display().to_string();
    let o = train(full.clone(), None, no_stop(), true).unwrap();
    assert!(o.final_loss.is_finite() && o.steps_done == 5);
    let got = file_tensors(&full.out);
    let (_, meta) = read_all(Path::new(&full.out));
    assert_eq!(meta["flux_kernels.adapter"], "lokr");
    // LyCORIS keys: the fused qkv whole under its BFL name, diffusers parts under lycoris_ names.
    for k in [
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1",
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a",
        "lora_unet_img_in.lokr_w1",
        "lora_unet_img_in.lokr_w2",
        "lora_unet_final_layer_adaLN_modulation_1.lokr_w2_b",
        "lycoris_single_transformer_blocks_1_proj_mlp.lokr_w2_b",
    ] {
        assert!(got.contains_key(k), "{k}: {:?}", got.keys().collect::<Vec<_>>());
    }
    assert!(got.keys().all(|k| k.contains(".lokr_w") || k.ends_with(".alpha")), "{:?}", got.keys());
    // The zero-started factors trained (w2_b, and a whole w2).
    for k in ["lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b", "lora_unet_img_in.lokr_w2"] {
        assert!(got[k].iter().any(|&v| v != 0.0), "{k} did not train");
    }
    // Loaded back, the file (scales baked into w1, alpha = rank) moves the output.
    let base = run_forward(&fixture("tiny-diffusers"), None, &[]).unwrap();
    let with = run_forward(&fixture("tiny-diffusers"), None, &[(PathBuf::from(&full.out), 1.0)]).unwrap();
    let effect = rel_l2(&with, &base);
    println!("trained LoKr file's effect on the fixture's output: rel L2 {effect:.2e} from the base");
    assert!(effect > 1e-3, "{effect:e}");

    // Stopped after its first step, then resumed: the same file bit for bit.
    let mut part = full.clone();
    part.out = dir.join("part/lokr.safetensors").display().to_string();
    let ckpt = resumes_bit_for_bit(&part, &got);
    // A LoKr checkpoint does not resume as LoRA, nor with another factor.
    for (adapter, factor) in [("lora", 4), ("lokr", 2)] {
        let mut other = part.clone();
        (other.adapter, other.lokr_factor, other.steps) = (adapter.into(), factor, 6);
        other.format = "kohya".into();
        let e = err_string(train(other, Some(&ckpt), no_stop(), true));
        assert!(e.contains("adapters differ") || e.contains("sizes differ"), "{adapter} {factor}: {e}");
    }
}

#[test]
fn lokr_training_refuses_gpu_peft_and_dropout_clearly() {
    let dir = tmpdir("lokr-train-refused");
    let base = lokr_config(&dir);
    let out = dir.join("lokr.safetensors");
    for (what, change) in [
        (
            "LoKr training runs on the CPU path",
            Box::new(|t: &mut TrainConfig| t.device = "cuda".into()) as Box<dyn Fn(&mut TrainConfig)>,
        ),
        ("--format kohya", Box::new(|t: &mut TrainConfig| t.format = "peft".into())),
        ("no input dropout", Box::new(|t: &mut TrainConfig| t.dropout = 0.1)),
        ("lokr_factor = 0", Box::new(|t: &mut TrainConfig| t.lokr_factor = 0)),
    ] {
        let mut tc = base.clone();
        tc.out = out.display().to_string();
        change(&mut tc);
        let e = err_string(train(tc, None, no_stop(), true));
        assert!(e.contains(what), "wants `{what}`: {e}");
        assert!(!out.exists());
    }
    // The command line: --adapter lokr picks the kohya format, and refuses the GPU before anything is read.
    let o = out.display().to_string();
    let (ok, s) = run(&["train", "--data", &base.data, "--adapter", "lokr", "--device", "cuda", "--out", &o]);
    assert!(!ok && s.contains("LoKr training runs on the CPU path"), "{s}");
    let (ok, s) = run(&["train", "--data", &base.data, "--adapter", "lokr", "--format", "peft", "--out", &o]);
    assert!(!ok && s.contains("--format kohya"), "{s}");
    assert!(!out.exists());
}
