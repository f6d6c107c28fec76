//! `bench-step`: full LoRA training steps (forward, backward, clipping, AdamW) of the
//! device-resident GPU model on synthetic inputs, timed one by one after warm-up, with the peak
//! device memory (the memory pool's high-water mark) and the planner's prediction beside it: the engine's side of
//! docs/side-by-side.md and the points of docs/scaling.md (tools/scaling.sh drives it).

use super::args::{deprecated, CheckpointingArgs};
use crate::engine::{BaseDtype, CudaBackend, Engine, EngineOptions};
use crate::kernels::attention::FwdVariant;
use crate::kernels::lora::BaseGemm;
use crate::model::checkpoint::Checkpoint;
use crate::model::flux::FluxInputs;
use crate::model::packing::img_ids;
use crate::model::weights::FluxWeights;
use crate::ops::optim::AdamW;
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
    /// Keep the last N blocks' frozen weights in pinned host memory and stream them in per use
    /// (block swap, as `train --blocks-to-swap`): measures what the copies cost.
    #[arg(long, default_value_t = 0)]
    pub blocks_to_swap: usize,
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
    println!("{}", run(&a)?);
    Ok(())
}

/// Runs the benchmark; returns one line of JSON.
pub fn run(a: &Args) -> Result<String> {
    let (size, flag) = a.side();
    if size == 0 || !size.is_multiple_of(16) {
        bail!("{flag} {size}: a positive multiple of 16 pixels");
    }
    let checkpointing = a.checkpointing.get(true);
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let base = BaseDtype::parse(&a.base)?;
    let dev = CudaBackend::device().context("bench-step times the step on a CUDA GPU")?;
    let hopper_used = {
        let crate::engine::Device::Cuda(be) = &dev else { bail!("bench-step needs a CUDA device") };
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
    let opts = EngineOptions { base, checkpointing, blocks_to_swap: a.blocks_to_swap };
    let mut engine = Engine::new(&dev, &cfg, weights, opts).context("loading the model onto the GPU")?;
    engine.train_adapters(&set, None).context("loading the adapters onto the GPU")?;
    let gt = engine.cuda().context("bench-step runs on the GPU")?;
    gt.m.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let weights_bytes = gt.m.w.device_bytes();
    let swap_host_bytes = gt.m.w.swap.as_ref().map_or(0, |s| s.host_bytes());
    let copied_before = gt.m.w.swap.as_ref().map_or(0, |s| s.bytes_copied);

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
    let mut times = Vec::new();
    let mut last_loss = f64::NAN;
    for i in 0..a.warmup + a.steps {
        let t = Instant::now();
        engine.zero_grads()?;
        last_loss = engine.micro_step(&inp, &target, Some(&[1.0]), 1.0, None)?;
        engine.optimizer_step(&mut opt, 1e-4, 1.0)?;
        if let Some(g) = engine.cuda() {
            g.m.synchronize()?;
        }
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    if !last_loss.is_finite() {
        bail!("the loss is not finite ({last_loss})");
    }
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median = sorted[sorted.len() / 2];
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
    };
    let predicted = plan(&cfg, &settings).map(|p| gib(p.gpu_total())).ok();
    // The plan without the parts outside the memory pool: what `peak_gib` measures.
    let predicted_allocated = predicted.map(|p| p - gib(CUDA_CONTEXT + CUBLAS_WORKSPACE));
    let gt = engine.cuda().context("bench-step runs on the GPU")?;
    let peak = gt.m.pool_peak();
    let copied = gt.m.w.swap.as_ref().map_or(0, |s| s.bytes_copied) - copied_before;
    let swap_plan = plan(&cfg, &settings).map(|p| p.swap).unwrap_or_default();
    let trainable: usize = specs.iter().map(|s| s.param_count()).sum();
    let j = serde_json::json!({
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
        "in_use_sampled_gib": gib(gt.m.peak_used),
        "in_use_note": "device memory in use (total - free, CUDA context included), sampled at block boundaries only",
        "weights_gib": gib(weights_bytes),
        "blocks_to_swap": a.blocks_to_swap,
        "swap_host_gib": gib(swap_host_bytes),
        "swap_copied_gib_per_step": gib(copied) / (a.warmup + a.steps) as f64,
        "swap_predicted_pcie_gib_per_step": gib(swap_plan.pcie_per_step),
        "predicted_gib": predicted,
        "predicted_allocated_gib": predicted_allocated,
        "trainable": trainable,
        "loss": last_loss,
        "load_s": load_s,
    });
    Ok(j.to_string())
}
