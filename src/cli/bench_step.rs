//! `bench-step`: full LoRA training steps (forward, backward, clipping, AdamW) of the
//! device-resident GPU model on synthetic inputs, timed one by one after warm-up, with the peak
//! device memory (the memory pool's high-water mark) and the planner's prediction beside it: the engine's side of
//! docs/side-by-side.md and the points of docs/scaling.md (tools/scaling.sh drives it).
//! `--predict` adds the step-time model's prediction (plan::steptime, from the trace of one more
//! step's launches) beside the measured step; `--dry-run` records that trace without running a
//! kernel and prints only the prediction (docs/step-time.md).

use super::args::{deprecated, CheckpointingArgs};
use crate::dist::rendezvous::{Config, Control};
use crate::dist::RankEnv;
use crate::engine::{BaseDtype, CudaBackend, Device, Engine, EngineOptions};
use crate::kernels::attention::FwdVariant;
use crate::kernels::lora::BaseGemm;
use crate::kernels::trace;
use crate::model::checkpoint::Checkpoint;
use crate::model::flux::FluxInputs;
use crate::model::packing::img_ids;
use crate::model::weights::FluxWeights;
use crate::ops::optim::AdamW;
use crate::plan::steptime::{self, Prediction};
use crate::plan::{gib, plan, Base, Settings, CUBLAS_WORKSPACE, CUDA_CONTEXT};
use crate::train::config::TrainConfig;
use crate::train::trainer::{init_adapters, lora_config, AdapterInit};
use crate::util::Rng;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint or random:flux1-dev[:SEED] (random weights, no file).
    #[arg(long)]
    pub model: String,
    /// Image side in pixels (square; a multiple of 16).
    #[arg(long, default_value_t = 1024, conflicts_with = "size")]
    pub resolution: usize,
    /// Deprecated spelling of --resolution.
    #[arg(long, hide = true)]
    pub size: Option<usize>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA targets, as for `train --targets`.
    #[arg(long, default_value = "attn-mlp")]
    pub targets: String,
    /// Base weights on the GPU: bf16 or int8 (quantised at load).
    #[arg(long, value_name = "bf16|int8", default_value = "bf16")]
    pub base: String,
    #[command(flatten)]
    pub checkpointing: CheckpointingArgs,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// T5 tokens of the synthetic text states.
    #[arg(long, default_value_t = 512)]
    pub text_tokens: usize,
    /// Accepted for scripts; the output is always one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Which kernels the step runs where both exist: `auto` (the sm_90a kernels on an H100/H200,
    /// else sm_80) or `sm80` (the cuBLAS-base LoRA path and the sm_80 flash attention on any
    /// card): the side-by-side measurement of what the Hopper kernels bring to a whole step.
    #[arg(long, value_name = "auto|sm80", default_value = "auto")]
    pub kernels: String,
    /// Data-parallel ranks on this machine (one per GPU, NCCL between them; torchrun's variables
    /// for several machines, as for `train`): each rank times steps with and without the
    /// gradients' all-reduce; rank 0 prints the slowest rank's medians and their ratio, the
    /// scaling efficiency. Default 1.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gpus: usize,
    /// Where the step runs: cuda, or cpu (the CPU reference; with --gpus under the emulated NCCL
    /// of the tests: figures of CPU processes sharing cores, not of GPUs).
    #[arg(long, value_name = "cuda|cpu", default_value = "cuda")]
    pub device: String,
    /// Also trace one more step's launches (kernel, shape, FLOPs, bytes) and print the step-time
    /// model's prediction per op family beside the measured step (the table on stderr, the
    /// figures in the JSON).
    #[arg(long)]
    pub predict: bool,
    /// Record the step's launches without running any kernel, and print only the prediction (no
    /// timing; implies --predict). Under the CUDA emulation set FKEMU_DRY=1 too, so that the
    /// full-size buffers are never touched (docs/step-time.md).
    #[arg(long)]
    pub dry_run: bool,
    /// The card whose rates the prediction uses.
    #[arg(long, value_name = "CARD", default_value = "h200")]
    pub card: String,
    /// Keep the last N blocks' frozen weights in pinned host memory and stream them in per use
    /// (block swap, as `train --blocks-to-swap`): measures what the copies cost.
    #[arg(long, default_value_t = 0)]
    pub blocks_to_swap: usize,
    /// With checkpointing, keep the block inputs in pinned host memory (as `train
    /// --offload-checkpoints`): measures what the copies cost.
    #[arg(long)]
    pub offload_checkpoints: bool,
}

impl Args {
    /// The image side and the flag that gave it (a deprecated spelling is named in errors).
    fn side(&self) -> (usize, &'static str) {
        match deprecated(self.size, "--size", "--resolution") {
            Some(s) => (s, "--size"),
            None => (self.resolution, "--resolution"),
        }
    }
}

pub fn main(a: Args) -> Result<()> {
    let env = RankEnv::from_env()?;
    match (&env, a.gpus) {
        (_, 0) => bail!("--gpus 0: at least one"),
        (None, n) if n > 1 => {
            let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            return crate::dist::launch(n, &argv);
        }
        (Some(e), n) if n > 1 && e.world != n => bail!("--gpus {n}, but WORLD_SIZE={} is set", e.world),
        _ => {}
    }
    if let Some(e) = &env {
        e.pin_gpu();
    }
    let line = run_ranked(&a, env.as_ref().filter(|e| e.world > 1))?;
    if env.as_ref().is_none_or(|e| e.rank == 0) {
        println!("{line}");
    }
    Ok(())
}

/// Runs the benchmark; returns one line of JSON.
pub fn run(a: &Args) -> Result<String> {
    run_ranked(a, None)
}

/// The slowest rank's median of `times` (every rank's median through the control channel).
fn slowest_median(times: &[f64], control: Option<&mut Control>) -> Result<f64> {
    let mut sorted = times.to_vec();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median = sorted[sorted.len() / 2];
    let all = match control {
        Some(c) => c.gather(&[median])?,
        None => vec![median],
    };
    Ok(all.into_iter().fold(0.0, f64::max))
}

/// The benchmark as one of several data-parallel ranks (`env`; None: alone).
fn run_ranked(a: &Args, env: Option<&RankEnv>) -> Result<String> {
    let (size, flag) = a.side();
    if size == 0 || !size.is_multiple_of(16) {
        bail!("{flag} {size}: a positive multiple of 16 pixels");
    }
    let checkpointing = a.checkpointing.get(true);
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let base = BaseDtype::parse(&a.base)?;
    let card = steptime::card(&a.card)?;
    if a.dry_run {
        if a.device != "cuda" || env.is_some() {
            bail!("--dry-run walks the step on the CUDA device (a GPU or the CUDA emulation), one rank");
        }
        // From here on nothing runs on the device: not the weights' random fill either.
        trace::start(true);
    }
    let dev = match a.device.as_str() {
        "cuda" => CudaBackend::device().with_context(|| {
            if a.dry_run {
                "bench-step --dry-run walks the step on a CUDA GPU or the CUDA emulation (docs/step-time.md)"
            } else {
                "bench-step times the step on a CUDA GPU (--device cpu: the CPU reference)"
            }
        })?,
        "cpu" => Device::Cpu,
        d => bail!("--device `{d}`: use cuda or cpu"),
    };
    let hopper_used = if let Device::Cuda(be) = &dev {
        let mut g = CudaBackend::lock(be)?;
        match a.kernels.as_str() {
            "auto" => {}
            "sm80" => {
                let fallback = if g.has_cublas() { BaseGemm::Cublas } else { BaseGemm::Fused };
                g.set_base_gemm(fallback)?;
                g.attn.set_use_hopper(false);
            }
            k => bail!("--kernels `{k}`: use auto or sm80"),
        }
        (g.base_gemm() == BaseGemm::Hopper, g.attn.default_variant(128) == FwdVariant::Hopper)
    } else {
        (false, false)
    };
    let t_load = Instant::now();
    let ckpt = Checkpoint::open(Path::new(&a.model), None)?;
    let cfg = ckpt.cfg.clone();
    let weights = FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned())?;
    let tc = TrainConfig { rank: a.rank, targets: a.targets.clone(), ..TrainConfig::default() };
    let lc = lora_config(&tc)?;
    let mut rng = Rng::new(42);
    let AdapterInit { specs, set } = init_adapters(&cfg, &lc, &mut rng, None)?;
    let sizes: Vec<usize> = set.params().map(|p| p.len()).collect();
    let mut opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.01);
    let opts = EngineOptions {
        base,
        checkpointing,
        blocks_to_swap: a.blocks_to_swap,
        offload_checkpoints: a.offload_checkpoints,
    };
    let mut engine = Engine::new(&dev, &cfg, weights, opts).context("loading the model onto the GPU")?;
    engine.train_adapters(&set, None).context("loading the adapters onto the GPU")?;
    if let Some(g) = engine.cuda() {
        g.m.synchronize()?;
    }
    let load_s = t_load.elapsed().as_secs_f64();
    let weights_bytes: usize = engine.cuda().map_or(0, |g| g.m.w.device_bytes());
    let swap_of = |e: &Engine| e.cuda().and_then(|g| g.m.w.swap.as_ref()).map(|s| (s.host_bytes(), s.bytes_copied));
    let (swap_host_bytes, copied_before) = swap_of(&engine).unwrap_or((0, 0));
    let offload_of = |e: &Engine| e.cuda().and_then(|g| g.m.offload.as_ref()).map(|o| (o.host_bytes(), o.bytes_copied));
    let trainable: usize = specs.iter().map(|s| s.param_count()).sum();
    let mut ranks = match env {
        Some(e) => {
            let config = |nccl: &str| -> Result<Config> {
                let show = [
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("NCCL", nccl.to_string()),
                    ("device", a.device.clone()),
                    ("model", format!("{cfg:?}")),
                    ("adapters", format!("rank {} targets {} ({trainable} parameters)", a.rank, a.targets)),
                    (
                        "step",
                        format!(
                            "{size}² {} text tokens, base {}, {} + {} steps",
                            a.text_tokens, a.base, a.warmup, a.steps
                        ),
                    ),
                ];
                Ok(show.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            };
            Some(crate::dist::join(e, config)?)
        }
        None => None,
    };

    // One synthetic sample: packed latent noise, T5-like states, pooled CLIP, σ = 0.5.
    let lat = size / 8;
    let n_img = (lat / 2) * (lat / 2);
    let inp = FluxInputs {
        b: 1,
        n_img,
        n_txt: a.text_tokens,
        img: rng.normal_vec(n_img * cfg.in_channels, 1.0),
        img_ids: img_ids(lat, lat),
        txt: rng.normal_vec(a.text_tokens * cfg.context_in_dim, 0.2),
        txt_ids: vec![0.0; a.text_tokens * 3],
        y: rng.normal_vec(cfg.vec_in_dim, 0.5),
        timesteps: vec![0.5],
        guidance: cfg.guidance_embed.then(|| vec![1.0]),
    };
    let target = rng.normal_vec(n_img * cfg.out_channels, 1.0);
    // One training step; with `comm`, the gradients' all-reduce between backward and optimizer.
    // The all-reduce starts bucket by bucket during the backward, as in training.
    let mut step = |engine: &mut Engine, comm: Option<&crate::dist::nccl::Comm>| -> Result<f64> {
        engine.zero_grads()?;
        if let Some(c) = comm {
            engine.arm_reduce(c, false)?;
        }
        let loss = engine.micro_step(&inp, &target, Some(&[1.0]), 1.0, None)?;
        if let Some(c) = comm {
            engine.reduce_grads(c, false, crate::dist::timeout())?;
        }
        engine.optimizer_step(&mut opt, 1e-4, 1.0)?;
        if let Some(g) = engine.cuda() {
            g.m.synchronize()?;
        }
        Ok(loss)
    };
    // With several ranks, each timed step is run twice, without and with the gradients'
    // all-reduce, interleaved so that both see the same load.
    let (mut times, mut times_reduced) = (Vec::new(), Vec::new());
    let mut last_loss = f64::NAN;
    if !a.dry_run {
        for i in 0..a.warmup + a.steps {
            for reduce in [false, true] {
                let comm = match (&ranks, reduce) {
                    (Some(j), true) => Some(&j.comm),
                    (None, true) => continue,
                    _ => None,
                };
                let t = Instant::now();
                last_loss = step(&mut engine, comm)?;
                if i >= a.warmup {
                    if reduce { &mut times_reduced } else { &mut times }.push(t.elapsed().as_secs_f64());
                }
            }
        }
        if !last_loss.is_finite() {
            bail!("the loss is not finite ({last_loss})");
        }
    }
    // The traced step comes after the timed ones (recording costs host time) or, dry, alone.
    let prediction: Option<Prediction> = if a.predict || a.dry_run {
        trace::start(a.dry_run);
        let r = step(&mut engine, None);
        let tr = trace::finish().context("the launch trace")?;
        r?;
        let p = steptime::predict(&tr, card);
        eprintln!("{}\n{}", p.table(), p.kernel_table());
        Some(p)
    } else {
        None
    };
    let median =
        if times.is_empty() { None } else { Some(slowest_median(&times, ranks.as_mut().map(|j| &mut j.control))?) };
    if let (Some(m), Some(p)) = (median, &prediction) {
        eprintln!("step: measured {m:.3} s (median), predicted {:.3} s (step-time model, a prediction)", p.total);
    }
    let plan_base = match base {
        BaseDtype::Int8 => Base::Int8,
        BaseDtype::Bf16 => Base::Bf16,
    };
    let settings = Settings {
        base: plan_base,
        width: size,
        height: size,
        batch: 1,
        text_tokens: a.text_tokens,
        checkpointing,
        modulation_on_host: false,
        lora: lc,
        hopper: hopper_used.0,
        blocks_to_swap: a.blocks_to_swap,
        offload_checkpoints: a.offload_checkpoints,
    };
    let predicted = plan(&cfg, &settings).map(|p| gib(p.gpu_total())).ok();
    // The plan without the parts outside the memory pool: what `peak_gib` measures.
    let predicted_allocated = predicted.map(|p| p - gib(CUDA_CONTEXT + CUBLAS_WORKSPACE));
    let peak = engine.cuda().and_then(|g| g.m.pool_peak());
    let in_use = engine.cuda().map(|g| gib(g.m.peak_used));
    // Steps run: the timed ones (twice each with several ranks: without and with the all-reduce)
    // and the traced one.
    let steps_run = if a.dry_run { 0 } else { (a.warmup + a.steps) * if ranks.is_some() { 2 } else { 1 } }
        + usize::from(a.predict || a.dry_run);
    let copied = swap_of(&engine).map_or(0, |s| s.1) - copied_before;
    // The offload's pinned buffers are allocated in the first step: everything it copied counts.
    let (offload_host, offload_copied) = offload_of(&engine).unwrap_or((0, 0));
    let swap_plan = plan(&cfg, &settings).map(|p| p.swap).unwrap_or_default();
    let mut j = serde_json::json!({
        "model": a.model,
        "size": size,
        "rank": a.rank,
        "targets": a.targets,
        "base": a.base,
        "checkpointing": checkpointing,
        "kernels": a.kernels,
        "hopper_lora_gemm": hopper_used.0,
        "hopper_attention": hopper_used.1,
        "steps": a.steps,
        "step_s_median": median,
        "step_s": times,
        "peak_gib": peak.map(gib),
        "peak_note": "memory pool high-water mark: bytes allocated at most, as torch.cuda.max_memory_allocated (CUDA context and cuBLAS workspace not included)",
        "in_use_sampled_gib": in_use,
        "in_use_note": "device memory in use (total - free, CUDA context included), sampled at block boundaries only",
        "weights_gib": gib(weights_bytes),
        "blocks_to_swap": a.blocks_to_swap,
        "offload_checkpoints": a.offload_checkpoints,
        "offload_host_gib": gib(offload_host),
        "offload_copied_gib_per_step": gib(offload_copied) / steps_run.max(1) as f64,
        "swap_host_gib": gib(swap_host_bytes),
        "swap_copied_gib_per_step": gib(copied) / steps_run.max(1) as f64,
        "swap_predicted_pcie_gib_per_step": gib(swap_plan.pcie_per_step),
        "predicted_gib": predicted,
        "predicted_allocated_gib": predicted_allocated,
        "trainable": trainable,
        "loss": if a.dry_run { None } else { Some(last_loss) },
        "dry_run": a.dry_run,
        "predicted_step_s": prediction.as_ref().map(|p| p.total),
        "predicted_step": prediction.as_ref().map(|p| p.json()),
        "load_s": load_s,
        "device": a.device,
    });
    if let Some(joined) = ranks.as_mut() {
        let reduced = slowest_median(&times_reduced, Some(&mut joined.control))?;
        let note = if a.device == "cpu" {
            "CPU processes sharing this machine's cores, emulated or real NCCL on host memory: not a GPU figure"
        } else if joined.comm.emulated() {
            "the emulated NCCL, so the CUDA emulation's processes sharing this machine's cores: not a GPU figure"
        } else {
            "each rank on its own GPU: step time with the all-reduce against the same step without it"
        };
        j["ranks"] = joined.comm.world.into();
        j["nccl"] = joined.comm.library().into();
        j["allreduce_bytes"] = (4 * trainable).into();
        j["allreduce_buckets"] = engine.reduce_summary().into();
        j["step_s_with_allreduce_median"] = reduced.into();
        j["step_s_with_allreduce"] = times_reduced.into();
        j["scaling_efficiency"] = median.map(|m| m / reduced).into();
        j["scaling_note"] = format!(
            "scaling efficiency = the slowest rank's median step without the all-reduce / with it (each rank's \
             batch fixed, so {} ranks do {}x the work per step); {note}",
            joined.comm.world, joined.comm.world
        )
        .into();
    }
    Ok(j.to_string())
}
