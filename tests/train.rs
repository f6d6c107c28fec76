//! The trainer end to end on the built-in tiny model: resume is bit-exact (dropout, caption
//! dropout, accumulation and prior preservation included), Ctrl-C checkpoints, a non-finite loss
//! stops cleanly, the demo's loss falls, TOML keys and flags combine as documented, and the
//! top-level linears train and export under diffusers' and kohya's names.

mod common;
use common::*;
use flux_kernels::cli::args::AdapterArgs;
use flux_kernels::cli::train::Args as TrainArgs;
use flux_kernels::model::config::FluxConfig;
use flux_kernels::train::builtin::{synthetic_samples, tiny_config, write_samples};
use flux_kernels::train::config::TrainConfig;
use flux_kernels::train::trainer::train;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

fn dataset(dir: &Path, cfg: &FluxConfig, seed: u64) -> String {
    write_samples(dir, &synthetic_samples(cfg, 6, 8, 4, seed), cfg.context_in_dim).unwrap();
    dir.display().to_string()
}

fn base_config(dir: &Path) -> TrainConfig {
    let cfg = tiny_config();
    TrainConfig {
        data: dataset(&dir.join("data"), &cfg, 1),
        class_data: dataset(&dir.join("class"), &cfg, 2),
        prior_weight: 0.5,
        rank: 4,
        targets: "all".into(),
        dropout: 0.1,
        caption_dropout: 0.3,
        grad_accum: 2,
        batch_size: 2,
        steps: 6,
        lr: 3e-3,
        lr_schedule: "cosine".into(),
        warmup_steps: 2,
        timestep_sampling: "flux_shift".into(),
        loss_weighting: "cosmap".into(),
        save_dtype: "f32".into(),
        ..TrainConfig::default()
    }
}

#[test]
fn resume_continues_bit_for_bit() {
    let dir = tmpdir("train-resume");
    let mut full = base_config(&dir);
    full.out = dir.join("full/lora.safetensors").display().to_string();
    full.metrics = dir.join("full.jsonl").display().to_string();
    train(full.clone(), None, no_stop(), true).unwrap();

    // The same run, stopped by "Ctrl-C" after its first step, then resumed.
    let mut part = full.clone();
    part.out = dir.join("part/lora.safetensors").display().to_string();
    part.metrics = String::new();
    let stop = Arc::new(AtomicBool::new(true));
    let o = train(part.clone(), None, stop, true).unwrap();
    assert!(o.interrupted && o.steps_done == 1);
    let ckpt = std::path::PathBuf::from(part.checkpoint_path());
    assert!(ckpt.join("state.safetensors").exists());
    let o = train(part.clone(), Some(&ckpt), no_stop(), true).unwrap();
    assert_eq!(o.steps_done, 6);

    let (ta, _) = read_all(Path::new(&full.out));
    let (tb, _) = read_all(Path::new(&part.out));
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!(x.0, y.0);
        assert!(x.3 == y.3, "{}: resumed run differs", x.0);
    }
    assert!(ta.iter().any(|t| t.0.contains("lora_B") && t.3.iter().any(|&v| v != 0.0)), "B moved off zero");

    let lines = std::fs::read_to_string(&full.metrics).unwrap();
    let rows: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r["loss"].is_number() && r["prior_loss"].is_number() && r["lr"].is_number()));
    assert_eq!(rows[0]["step"], 1);
}

#[test]
fn non_finite_loss_stops_naming_the_step_and_writes_no_lora() {
    let dir = tmpdir("train-nan");
    let cfg = tiny_config();
    let mut s = synthetic_samples(&cfg, 2, 8, 4, 3);
    s[0].latent.iter_mut().for_each(|v| *v = 3.0e38);
    s[1].latent.iter_mut().for_each(|v| *v = 3.0e38);
    write_samples(&dir.join("data"), &s, cfg.context_in_dim).unwrap();
    let tc = TrainConfig {
        data: dir.join("data").display().to_string(),
        out: dir.join("lora.safetensors").display().to_string(),
        steps: 3,
        ..TrainConfig::default()
    };
    let e = err_string(train(tc, None, no_stop(), true));
    assert!(e.contains("step 1") && e.contains("not finite"), "{e}");
    assert!(!dir.join("lora.safetensors").exists());
}

#[test]
fn builtin_demo_loss_falls_and_samples_move_toward_the_style() {
    let dir = tmpdir("train-demo");
    let tc =
        TrainConfig { out: dir.join("lora.safetensors").display().to_string(), steps: 150, ..TrainConfig::default() }
            .builtin_demo();
    let o = train(tc, None, no_stop(), true).unwrap();
    let (before, after) = o.demo.unwrap();
    assert!(after < 0.8 * before, "style distance {before} → {after}");
    assert!(dir.join("lora-before.png").exists() && dir.join("lora-after.png").exists());
    let losses: Vec<f64> = o
        .log
        .iter()
        .filter_map(|l| l.strip_prefix("step ")?.split(" loss ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    let k = losses.len() / 3;
    let early: f64 = losses[..k].iter().sum::<f64>() / k as f64;
    let late: f64 = losses[losses.len() - k..].iter().sum::<f64>() / k as f64;
    assert!(late < early, "loss did not fall: {losses:?}");
}

#[test]
fn toml_keys_and_flags_combine_flag_wins() {
    let dir = tmpdir("train-toml");
    let p = dir.join("c.toml");
    std::fs::write(&p, "rank = 8\nlr = 0.01\ntargets = \"attn\"\nsteps = 5\n").unwrap();
    let adapter = AdapterArgs { rank: Some(4), ..AdapterArgs::default() };
    let args = TrainArgs { config: Some(p.clone()), adapter, data: Some("d".into()), ..TrainArgs::default() };
    let c = args.resolve().unwrap();
    assert_eq!((c.rank, c.lr, c.targets.as_str(), c.steps, c.data.as_str()), (4, 0.01, "attn", 5, "d"));
    std::fs::write(&p, "rnak = 8\n").unwrap();
    let e = err_string(TrainArgs { config: Some(p), ..TrainArgs::default() }.resolve());
    assert!(e.contains("rnak") || e.contains("unknown field"), "{e}");
}

#[test]
fn top_level_linears_train_and_export_under_diffusers_and_kohya_names() {
    // x_embedder / context_embedder by diffusers name, the final linear by BFL name (`proj_out`
    // would also pick every single block's proj_out, as PEFT's suffix rule does).
    let dir = tmpdir("train-top-level");
    let model = fixture("tiny-diffusers");
    let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&model, None).unwrap().cfg;
    let data = dataset(&dir.join("data"), &cfg, 4);
    let mut outs = Vec::new();
    let names = [
        ("peft", ["transformer.x_embedder", "transformer.context_embedder", "transformer.proj_out"], "lora_B.weight"),
        ("kohya", ["lora_unet_img_in", "lora_unet_txt_in", "lora_unet_final_layer_linear"], "lora_up.weight"),
    ];
    for (format, modules, up) in names {
        let out = dir.join(format!("{format}.safetensors"));
        let tc = TrainConfig {
            model: model.display().to_string(),
            data: data.clone(),
            out: out.display().to_string(),
            format: format.into(),
            targets: "x_embedder,context_embedder,final_layer.linear".into(),
            rank: 4,
            steps: 4,
            lr: 1e-2,
            save_dtype: "f32".into(),
            device: "cpu".into(),
            ..TrainConfig::default()
        };
        train(tc, None, no_stop(), true).unwrap();
        let (t, _) = read_all(&out);
        let module = |k: &str| k.split_once(".lora_").map_or(k.trim_end_matches(".alpha"), |(m, _)| m).to_string();
        let stored: BTreeSet<String> = t.iter().map(|x| module(&x.0)).collect();
        assert_eq!(stored, modules.iter().map(|m| m.to_string()).collect::<BTreeSet<_>>(), "{format}");
        for m in modules {
            let b = &t.iter().find(|x| x.0 == format!("{m}.{up}")).unwrap_or_else(|| panic!("{m}.{up}")).3;
            assert!(b.iter().any(|&v| v != 0.0), "{m}: the up factor did not train");
        }
        outs.push(run_forward(&model, None, &[(out, 1.0)]).unwrap());
    }
    let base = run_forward(&model, None, &[]).unwrap();
    let effect = flux_kernels::util::rel_l2(&outs[0], &base);
    let e = flux_kernels::util::rel_l2(&outs[1], &outs[0]);
    println!("top-level adapters: effect {effect:.2e} from the base; kohya file vs PEFT file rel L2 {e:.2e}");
    assert!(effect > 1e-3 && e < 1e-5, "effect {effect:e}, kohya vs peft {e:e}");
}
