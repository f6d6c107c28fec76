//! Every training setting, from a TOML file and/or flags (a flag wins over the file).

use crate::adapters::config::MAX_RANK;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model path; empty: the built-in tiny FLUX.
    pub model: String,
    /// Folder of cached samples (`latent`, `txt`, `y` per .safetensors); empty: built-in synthetic set.
    pub data: String,
    /// Prior preservation: folder of class samples, and the weight λ of their loss.
    pub class_data: String,
    pub prior_weight: f32,
    pub out: String,
    /// peft (diffusers) or kohya.
    pub format: String,
    /// f32, bf16 or f16 storage of the written LoRA.
    pub save_dtype: String,
    /// A starting point for rank, alpha, targets and lr (`style`, `character`, `concept`; empty:
    /// none); any of those keys given by flag or in the TOML file wins over it.
    pub preset: String,
    pub rank: usize,
    /// 0: alpha = rank.
    pub alpha: f32,
    pub targets: String,
    pub include_modulation: bool,
    pub rank_pattern: String,
    pub alpha_pattern: String,
    pub rslora: bool,
    pub dropout: f32,
    /// kaiming (PEFT's default) or gaussian.
    pub init: String,
    /// lora, dora (PEFT's use_dora: a trained magnitude per output row) or lokr
    /// (LyCORIS's LoKr; CPU path only, written with LyCORIS keys in the kohya format).
    pub adapter: String,
    /// LoKr's split of each dimension (LyCORIS's `factor`): the part of w1 nearest it; −1 the most
    /// balanced split.
    pub lokr_factor: i64,
    pub steps: usize,
    pub lr: f64,
    /// Samples per micro-batch on each rank: with N ranks (`train --gpus N`, or torchrun's
    /// variables) a micro-batch of the run is N × batch_size samples, rank r takes its slice.
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Each rank's micro-batch runs as this many slices one after another, their gradients added
    /// in order: less activation memory, and the arithmetic of that many data-parallel ranks (a
    /// 1-rank run with batch N·B and batch_slices N equals N ranks of batch B with
    /// deterministic_reduce bit for bit on the CPU path and the emulated CUDA path; docs/multi-gpu.md).
    pub batch_slices: usize,
    /// Data parallelism: add the ranks' gradients in rank order (an all-gather, then rank 0's +
    /// rank 1's + …) instead of NCCL's all-reduce, whose order is its own. CPU and CUDA (per
    /// gradient bucket on the device: src/engine/cuda/reduce.rs).
    pub deterministic_reduce: bool,
    pub seed: u64,
    /// constant or cosine, after `warmup_steps` of linear warm-up.
    pub lr_schedule: String,
    pub warmup_steps: usize,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables.
    pub max_grad_norm: f64,
    /// uniform, logit_normal, sigmoid, flux_shift or shift.
    pub timestep_sampling: String,
    pub logit_mean: f64,
    pub logit_std: f64,
    pub sigmoid_scale: f64,
    /// The fixed shift of `shift` sampling (kohya's discrete_flow_shift).
    pub shift: f64,
    /// none, sigma_sqrt or cosmap.
    pub loss_weighting: String,
    /// Guidance value fed to the guidance embedding while training.
    pub guidance: f32,
    /// Probability of zeroing a sample's text states (txt and y).
    pub caption_dropout: f32,
    /// Save a resumable checkpoint every N steps (0: only on Ctrl-C).
    pub checkpoint_every: usize,
    /// Checkpoint folder; empty: `<out>.ckpt`.
    pub checkpoint_dir: String,
    /// JSON-lines metrics file; empty: none.
    pub metrics: String,
    pub rope_axes: String,
    /// Print a log line every N steps (0: about 20 lines per run).
    pub log_every: usize,
    /// Pipeline components when the data are images or samples are previewed; empty: from the
    /// model folder (vae/ or ae.safetensors, text_encoder_2/, tokenizer_2/, text_encoder/, tokenizer/).
    pub vae: String,
    pub t5: String,
    pub t5_tokenizer: String,
    pub clip: String,
    pub clip_tokenizer: String,
    /// Image datasets: target areas as square sides, comma-separated ("512" or "512,1024").
    pub resolution: String,
    /// Bucket sides are multiples of this (16 × k for FLUX).
    pub bucket_step: usize,
    /// Also train on horizontally flipped images.
    pub flip: bool,
    /// T5 sequence length (512 for FLUX.1-dev, 256 as an option).
    pub t5_max_len: usize,
    /// Encode a VAE sample instead of the mean.
    pub vae_sample: bool,
    /// Where image datasets are cached; empty: `<data>/.flux-cache`.
    pub cache_dir: String,
    /// Prompts sampled every `sample_every` steps (PNGs in `<out>-samples/`).
    pub sample_prompts: Vec<String>,
    pub sample_every: usize,
    pub sample_steps: usize,
    pub sample_guidance: f32,
    pub sample_seed: u64,
    /// Sample side in pixels; 0: the first resolution side.
    pub sample_size: usize,
    /// The NSFW classifier the preview images pass (a Falconsai/nsfw_image_detection folder);
    /// empty: the model folder's nsfw_classifier/ when it has one.
    pub nsfw_model: String,
    /// true: a missing classifier is an error; false: previews are not checked (a warning says
    /// so); absent: checked when a classifier is found.
    pub nsfw_check: Option<bool>,
    /// cpu, cuda or auto: where the transformer runs (on CUDA: the whole step, device-resident).
    pub device: String,
    /// Frozen base weights on the GPU: bf16 (or the file's own 8-bit codes) or int8 (quantised
    /// per output channel at load).
    pub base: String,
    /// GPU: keep only each block's input in the forward and recompute the block in the backward.
    pub gradient_checkpointing: bool,
    /// GPU: keep the last N transformer blocks' frozen weights in pinned host memory and stream
    /// each in while the block before it computes (block swap, for cards too small for the
    /// whole base). 0: every block on the device.
    pub blocks_to_swap: usize,
    /// GPU memory in GiB to fit: the memory plan chooses the fewest blocks to swap that fit it
    /// (replaces blocks_to_swap). 0: off.
    pub max_vram: f64,
    /// GPU, with gradient_checkpointing: the block inputs it keeps go to pinned host memory and
    /// come back one block ahead of the backward (the same bits, less device memory).
    pub offload_checkpoints: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: String::new(),
            data: String::new(),
            class_data: String::new(),
            prior_weight: 1.0,
            out: "lora.safetensors".into(),
            format: "peft".into(),
            save_dtype: "bf16".into(),
            preset: String::new(),
            rank: 16,
            alpha: 0.0,
            targets: "attn-mlp".into(),
            include_modulation: false,
            rank_pattern: String::new(),
            alpha_pattern: String::new(),
            rslora: false,
            dropout: 0.0,
            init: "kaiming".into(),
            adapter: "lora".into(),
            lokr_factor: -1,
            steps: 1000,
            lr: 1e-4,
            batch_size: 1,
            grad_accum: 1,
            batch_slices: 1,
            deterministic_reduce: false,
            seed: 42,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            timestep_sampling: "sigmoid".into(),
            logit_mean: 0.0,
            logit_std: 1.0,
            sigmoid_scale: 1.0,
            shift: 3.0,
            loss_weighting: "none".into(),
            guidance: 1.0,
            caption_dropout: 0.0,
            checkpoint_every: 0,
            checkpoint_dir: String::new(),
            metrics: String::new(),
            rope_axes: String::new(),
            log_every: 0,
            vae: String::new(),
            t5: String::new(),
            t5_tokenizer: String::new(),
            clip: String::new(),
            clip_tokenizer: String::new(),
            resolution: "512".into(),
            bucket_step: 64,
            flip: false,
            t5_max_len: 512,
            vae_sample: false,
            cache_dir: String::new(),
            sample_prompts: Vec::new(),
            sample_every: 0,
            sample_steps: 20,
            sample_guidance: 3.5,
            sample_seed: 0,
            nsfw_model: String::new(),
            nsfw_check: None,
            sample_size: 0,
            device: "auto".into(),
            base: "bf16".into(),
            gradient_checkpointing: false,
            blocks_to_swap: 0,
            max_vram: 0.0,
            offload_checkpoints: false,
        }
    }
}

/// The largest image side in pixels (resolution, sample size): FLUX.1 works at 0.25–2 MP, so
/// 4096 (16 MP) is well past any side it was trained for, and keeps a bucket's pixel count and
/// its VAE activations bounded.
pub const MAX_SIDE: usize = 4096;

/// The bucket step: positive and at most every target side (a side must hold one step).
pub fn check_bucket_step(step: usize, sides: &[usize]) -> Result<()> {
    if step == 0 || sides.iter().any(|&s| s < step) {
        bail!("bucket_step = {step}: must be at least 1 and at most every resolution side {sides:?}");
    }
    Ok(())
}

/// The first non-finite float of a TOML table as (dotted key, value).
fn non_finite(t: &toml::Table, prefix: &str) -> Option<(String, f64)> {
    fn walk(v: &toml::Value, key: String) -> Option<(String, f64)> {
        match v {
            toml::Value::Float(f) if !f.is_finite() => Some((key, *f)),
            toml::Value::Table(t) => non_finite(t, &format!("{key}.")),
            toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| walk(v, format!("{key}[{i}]"))),
            _ => None,
        }
    }
    t.iter().find_map(|(k, v)| walk(v, format!("{prefix}{k}")))
}

/// What a `--preset` sets. The seed's rank guidance for FLUX LoRAs: rank 8–16 for a style, 32
/// for a character or subject, 64 for a complex concept; learning rates 1e-4 to 5e-4. alpha =
/// rank (scale 1, what ai-toolkit forces for FLUX), so the learning rate alone sets the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub rank: usize,
    pub alpha: f32,
    pub targets: &'static str,
    pub lr: f64,
    /// Why these values, printed with them.
    pub why: &'static str,
}

pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "style",
        rank: 16,
        alpha: 16.0,
        targets: "attn-mlp",
        lr: 4e-4,
        why: "a look shared by every image: low rank, attention and MLP of both streams, a brisk learning rate",
    },
    Preset {
        name: "character",
        rank: 32,
        alpha: 32.0,
        targets: "attn-mlp",
        lr: 2e-4,
        why: "one subject's identity: rank 32 on attention and MLP, a moderate learning rate",
    },
    Preset {
        name: "concept",
        rank: 64,
        alpha: 64.0,
        targets: "all",
        lr: 1e-4,
        why: "a complex concept: rank 64 on every linear in the blocks, the cautious learning rate",
    },
];

/// The preset called `name`, or an error listing them.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).with_context(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!("preset `{name}`: expected one of {}", names.join(", "))
    })
}

/// `--data builtin`: the built-in synthetic set, for any model's widths.
pub const BUILTIN_DATA: &str = "builtin";

impl TrainConfig {
    pub fn from_toml(path: &Path) -> Result<TrainConfig> {
        let s = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        // TOML has `nan` and `inf`; no setting takes them, and once in the config they would reach
        // JSON (the checkpoint, the LoRA's metadata) as `null`. Refused here, naming key and file.
        let table: toml::Table =
            toml::from_str(&s).with_context(|| format!("{}: invalid training config", path.display()))?;
        if let Some((key, v)) = non_finite(&table, "") {
            bail!("{}: `{key}` = {v}: settings must be finite numbers", path.display());
        }
        toml::from_str(&s).with_context(|| format!("{}: invalid training config", path.display()))
    }

    /// The defaults of the built-in demo: the tiny model and synthetic set, sized to train on a
    /// CPU in about 30 s (600 steps, 27–29 s measured on 2 loaded cores).
    pub fn builtin_demo(mut self) -> TrainConfig {
        let d = TrainConfig::default();
        let keep = |v: &mut usize, dv: usize, demo: usize| {
            if *v == dv {
                *v = demo
            }
        };
        keep(&mut self.steps, d.steps, 600);
        keep(&mut self.batch_size, d.batch_size, 4);
        // A preset's learning rate and targets are chosen, not defaults: the demo keeps them.
        let preset = !self.preset.is_empty();
        if self.lr == d.lr && !preset {
            self.lr = 5e-3;
        }
        if self.lr_schedule == d.lr_schedule {
            self.lr_schedule = "cosine".into();
        }
        if self.targets == d.targets && !preset {
            self.targets = "all".into();
            self.include_modulation = true;
        }
        if self.out == d.out {
            self.out = "demo/lora.safetensors".into();
        }
        self
    }

    /// Sets `preset` and the keys it picks (rank, alpha, targets, lr); the caller applies the
    /// TOML keys and flags after, so they win.
    pub fn apply_preset(&mut self, name: &str) -> Result<()> {
        let p = preset(name)?;
        self.preset = p.name.to_string();
        self.rank = p.rank;
        self.alpha = p.alpha;
        self.targets = p.targets.to_string();
        self.lr = p.lr;
        Ok(())
    }

    /// What the preset chose, and which of its keys the flags or the TOML file overrode; None
    /// without a preset.
    pub fn preset_summary(&self) -> Option<String> {
        let p = preset(&self.preset).ok()?;
        let alpha = if self.alpha > 0.0 { self.alpha } else { self.rank as f32 };
        let mut kept = Vec::new();
        let mut over = Vec::new();
        let mut note = |key: &str, now: String, preset: String| {
            if now == preset {
                kept.push(format!("{key} {now}"));
            } else {
                over.push(format!("{key} {now} (preset: {preset})"));
            }
        };
        note("rank", self.rank.to_string(), p.rank.to_string());
        note("alpha", alpha.to_string(), p.alpha.to_string());
        note("targets", self.targets.clone(), p.targets.to_string());
        note("lr", format!("{:e}", self.lr), format!("{:e}", p.lr));
        let mut s = format!("preset {}: {} ({})", p.name, kept.join(", "), p.why);
        if !over.is_empty() {
            s += &format!("; given explicitly: {}", over.join(", "));
        }
        Some(s)
    }

    /// blocks_to_swap and max_vram: one of them, on the GPU, max_vram a size in GiB.
    pub fn check_block_swap(&self) -> Result<()> {
        if !(self.max_vram.is_finite() && self.max_vram >= 0.0) {
            bail!("max_vram = {}: GiB of GPU memory, a positive number (0: off)", self.max_vram);
        }
        if (self.max_vram > 0.0 || self.blocks_to_swap > 0) && self.device == "cpu" {
            bail!("blocks_to_swap / max_vram with device = cpu: block swap is for the GPU; use --device cuda or drop them");
        }
        if self.offload_checkpoints && !self.gradient_checkpointing {
            bail!("offload_checkpoints moves what gradient_checkpointing keeps: turn gradient_checkpointing on too");
        }
        if self.offload_checkpoints && self.device == "cpu" {
            bail!("offload_checkpoints with device = cpu: the offload is for the GPU; use --device cuda or drop it");
        }
        if self.max_vram > 0.0 && self.blocks_to_swap > 0 {
            bail!(
                "max_vram = {} and blocks_to_swap = {}: give one (max_vram makes the memory plan choose blocks_to_swap)",
                self.max_vram,
                self.blocks_to_swap
            );
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        let one_of = |name: &str, v: &str, ok: &[&str]| -> Result<()> {
            if !ok.contains(&v) {
                bail!("{name} = `{v}`: expected one of {}", ok.join(", "));
            }
            Ok(())
        };
        one_of("format", &self.format, &["peft", "diffusers", "kohya"])?;
        if !self.preset.is_empty() {
            preset(&self.preset)?;
        }
        one_of("save_dtype", &self.save_dtype, &["f32", "bf16", "f16"])?;
        one_of("init", &self.init, &["kaiming", "gaussian"])?;
        one_of("adapter", &self.adapter, &["lora", "dora", "lokr"])?;
        self.check_block_swap()?;
        if self.adapter == "lokr" {
            if self.device == "cuda" {
                bail!(
                    "adapter = lokr with device = cuda: LoKr training runs on the CPU path for now (the CUDA engine \
                     has no Kronecker update yet); pass --device cpu (or auto, which then picks the CPU)"
                );
            }
            if self.format != "kohya" {
                bail!(
                    "adapter = lokr with format = {}: a LoKr is written with LyCORIS's keys (what ComfyUI loads), \
                     which only the kohya format holds; pass --format kohya",
                    self.format
                );
            }
            if self.dropout > 0.0 {
                bail!("adapter = lokr with dropout = {}: LyCORIS's LoKr has no input dropout", self.dropout);
            }
            if self.lokr_factor == 0 || self.lokr_factor < -1 {
                bail!(
                    "lokr_factor = {}: expected a positive factor, or -1 for the most balanced split",
                    self.lokr_factor
                );
            }
        }
        one_of("base", &self.base, &["bf16", "int8"])?;
        one_of("lr_schedule", &self.lr_schedule, &["constant", "cosine"])?;
        one_of(
            "timestep_sampling",
            &self.timestep_sampling,
            &["uniform", "logit_normal", "sigmoid", "flux_shift", "shift"],
        )?;
        one_of("loss_weighting", &self.loss_weighting, &["none", "sigma_sqrt", "cosmap"])?;
        if self.data.is_empty() && !self.model.is_empty() {
            bail!(
                "train --model {}: give --data FOLDER (images with same-name .txt captions, or cached \
                 .safetensors samples); `--data builtin` trains on the built-in synthetic set instead",
                self.model
            );
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.batch_slices == 0 {
            bail!("steps, batch_size, grad_accum and batch_slices must be at least 1");
        }
        if self.batch_slices > self.batch_size {
            bail!(
                "batch_slices = {} is more than batch_size = {}: a slice holds at least one sample",
                self.batch_slices,
                self.batch_size
            );
        }
        // The micro-batch index is steps × grad_accum (and must fit the u64 the RNG streams take).
        if self.steps.checked_mul(self.grad_accum).is_none_or(|n| n > u32::MAX as usize) {
            bail!("steps × grad_accum = {} × {} is more than 2^32 micro-batches", self.steps, self.grad_accum);
        }
        let floats = [
            ("lr", self.lr),
            ("prior_weight", self.prior_weight as f64),
            ("alpha", self.alpha as f64),
            ("dropout", self.dropout as f64),
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
            ("adam_eps", self.adam_eps),
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
            ("logit_mean", self.logit_mean),
            ("logit_std", self.logit_std),
            ("sigmoid_scale", self.sigmoid_scale),
            ("shift", self.shift),
            ("guidance", self.guidance as f64),
            ("caption_dropout", self.caption_dropout as f64),
            ("sample_guidance", self.sample_guidance as f64),
        ];
        if let Some((name, v)) = floats.iter().find(|(_, v)| !v.is_finite()) {
            bail!("{name} = {v}: must be a finite number");
        }
        if self.lr <= 0.0 {
            bail!("lr must be positive, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.caption_dropout) || !(0.0..1.0).contains(&self.dropout) {
            bail!("caption_dropout and dropout must be in [0, 1)");
        }
        if self.rank == 0 || self.rank > MAX_RANK {
            bail!(
                "rank = {}: must be between 1 and {MAX_RANK} (and at most the width of each adapted module)",
                self.rank
            );
        }
        let sides = super::sources::parse_sides(&self.resolution)?;
        check_bucket_step(self.bucket_step, &sides)?;
        if self.sample_size > MAX_SIDE {
            bail!("sample_size = {}: at most {MAX_SIDE} pixels", self.sample_size);
        }
        crate::text::t5::check_max_len(self.t5_max_len)?;
        if !self.rope_axes.is_empty() {
            // Checked here too: the built-in model does not read it, and a bad value should not
            // wait for a run with a checkpoint to be found.
            crate::model::config::parse_rope_axes(&self.rope_axes).context("rope_axes")?;
        }
        Ok(())
    }

    /// True when the run trains on the built-in synthetic set (`--data builtin`, or the demo
    /// with neither a model nor data).
    pub fn builtin_data(&self) -> bool {
        self.data.is_empty() || self.data == BUILTIN_DATA
    }

    pub fn checkpoint_path(&self) -> String {
        if self.checkpoint_dir.is_empty() {
            format!("{}.ckpt", self.out)
        } else {
            self.checkpoint_dir.clone()
        }
    }
}
