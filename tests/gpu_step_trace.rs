//! The launch trace of a whole training step (kernels::trace) and the step-time model on it
//! (plan::steptime), on the tiny model: a dry run (kernels skipped) records exactly the launches
//! of the real step, every launch belongs to a recorded op, and the attention FLOPs add up to
//! the count from the model's shapes. Skipped, with a line that says why, where there is no GPU.

mod common;
use common::*;
use flux_kernels::engine::{Device, Engine, EngineOptions};
use flux_kernels::kernels::trace::{self, OpFamily, Trace};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::config::FluxConfig;
use flux_kernels::model::flux::FluxInputs;
use flux_kernels::model::packing::img_ids;
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::ops::optim::AdamW;
use flux_kernels::plan::steptime::{predict, H200};
use flux_kernels::train::config::TrainConfig;
use flux_kernels::train::trainer::{init_adapters, lora_config, AdapterInit};
use flux_kernels::util::Rng;
use std::path::Path;

const SIDE: usize = 64;
const TXT: usize = 8;

/// One training step of random:tiny (rank 8, attn-mlp), traced; dry: no kernel runs.
fn traced_step(device: &Device, checkpointing: bool, dry: bool) -> (FluxConfig, Trace) {
    let ckpt = Checkpoint::open(Path::new("random:tiny"), None).unwrap();
    let cfg = ckpt.cfg.clone();
    let weights = FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let tc = TrainConfig { rank: 8, targets: "attn-mlp".into(), ..TrainConfig::default() };
    let lc = lora_config(&tc).unwrap();
    let mut rng = Rng::new(3);
    let AdapterInit { set, .. } = init_adapters(&cfg, &lc, &mut rng, None).unwrap();
    let sizes: Vec<usize> = set.params().map(|p| p.len()).collect();
    let mut opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.01);
    let opts = EngineOptions { base: flux_kernels::engine::BaseDtype::Bf16, checkpointing, ..Default::default() };
    let mut engine = Engine::new(device, &cfg, weights, opts).unwrap();
    engine.train_adapters(&set, None).unwrap();
    let lat = SIDE / 8;
    let n_img = (lat / 2) * (lat / 2);
    let inp = FluxInputs {
        b: 1,
        n_img,
        n_txt: TXT,
        img: rng.normal_vec(n_img * cfg.in_channels, 1.0),
        img_ids: img_ids(lat, lat),
        txt: rng.normal_vec(TXT * cfg.context_in_dim, 0.2),
        txt_ids: vec![0.0; TXT * 3],
        y: rng.normal_vec(cfg.vec_in_dim, 0.5),
        timesteps: vec![0.5],
        guidance: cfg.guidance_embed.then(|| vec![1.0]),
    };
    let target = rng.normal_vec(n_img * cfg.out_channels, 1.0);
    trace::start(dry);
    engine.zero_grads().unwrap();
    let loss = engine.micro_step(&inp, &target, Some(&[1.0]), 1.0, None).unwrap();
    engine.optimizer_step(&mut opt, 1e-4, 1.0).unwrap();
    let t = trace::finish().unwrap();
    if !dry {
        assert!(loss.is_finite() && loss > 0.0, "a real step computes a loss: {loss}");
    }
    (cfg, t)
}

#[test]
fn dry_run_records_the_launches_of_the_real_step() {
    let Some(device) =
        gpu_or_skip("dry_run_records_the_launches_of_the_real_step", Device::parse("cuda").map(|(d, _)| d))
    else {
        return;
    };
    for checkpointing in [false, true] {
        let (cfg, real) = traced_step(&device, checkpointing, false);
        let (_, dry) = traced_step(&device, checkpointing, true);
        assert!(!real.dry && dry.dry);
        assert_eq!(real.unattributed, 0, "every launch belongs to a recorded op");
        assert_eq!(real.ops, dry.ops, "the dry run walks the same launches (checkpointing {checkpointing})");
        assert!(real.ops.iter().all(|o| o.launches >= 1), "an op recorded without a launch");
        // Each launch belongs to the op recorded before it: a wrapper that forgot to record
        // would add its launches to another op's kernel.
        for o in &real.ops {
            for name in &o.launched {
                assert!(belongs(&o.kernel, name), "a {name} launch counted on a {} op", o.kernel);
            }
        }
        for f in OpFamily::ALL {
            assert!(real.ops.iter().any(|o| o.family == f), "no {} op in the step", f.name());
        }
        // Attention FLOPs: every block's forward (twice with checkpointing: the recompute) and
        // backward, over the joint sequence.
        let l = TXT + (SIDE / 16) * (SIDE / 16);
        let fwd = 4.0 * (cfg.num_heads * l * l * cfg.head_dim) as f64;
        let blocks = (cfg.depth + cfg.depth_single) as f64;
        let want = blocks * fwd * (if checkpointing { 2.0 } else { 1.0 } + 2.5);
        let got: f64 = real.ops.iter().filter(|o| o.family == OpFamily::Attention).map(|o| o.flops).sum();
        assert!((got - want).abs() <= 1e-9 * want, "attention FLOPs {got} vs {want}");
        let p = predict(&real, &H200);
        assert_eq!(p.launches, real.launches());
        assert!(p.total > p.launch_gaps && p.families.iter().all(|(_, r)| r.seconds > 0.0), "{}", p.table());
    }
}

/// Whether a launch named `name` (the launch helper's label) is part of an op recorded as
/// `kernel`: its own name, the parts of a multi-launch op, or the generic labels of the fused
/// LoRA GEMM and the sm_80 attention launches.
fn belongs(kernel: &str, name: &str) -> bool {
    let parts: &[&str] = match kernel {
        "fk_ln_mod_bwd" => &["fk_ln_mod_bwd_dx", "fk_ln_mod_bwd_partial", "fk_col_sum"],
        "fk_gated_bwd" => &["fk_gated_bwd", "fk_col_sum"],
        "fk_mse" => &["fk_mse_partial", "fk_sum_f64"],
        "fk_grad_norm" => &["fk_sumsq_partial", "fk_sum_f64"],
        "fk_gemm_large" | "fk_gemm_small" => &["fused LoRA GEMM"],
        k if k.starts_with("fk_attn_") && !k.contains("sm90") => &["attention"],
        _ => &[],
    };
    name == kernel || parts.contains(&name)
}
