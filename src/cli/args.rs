//! Argument groups several commands share (the model and its LoRAs, adapter settings, pipeline
//! components), and the two conventions every command follows:
//!
//! - **Boolean flags are switches**: `--x` turns a setting on, `--no-x` off, the last one given
//!   wins. The old value forms (`--x true`, `--x false`) still parse: each switch takes an
//!   optional value. A switch is an `Option<bool>` beside a `no_x: bool`, read through [`switch`],
//!   so that `train` can tell "not given" (keep the `--config` value) from on and off.
//! - **One spelling per concept** (`--batch-size`, `--resolution`, `--gradient-checkpointing`):
//!   an older spelling stays as a hidden argument, read through [`deprecated`], which says on
//!   stderr what to write instead.

use crate::adapters::config::{parse_patterns, LoraConfig};
use crate::pipeline::Components;
use crate::safety::NsfwSetting;
use anyhow::Result;
use clap::builder::BoolishValueParser;
use std::path::{Path, PathBuf};

/// A switch's setting: `--no-x` (off), else `--x [true|false]`, else not given.
pub fn switch(on: Option<bool>, off: bool) -> Option<bool> {
    if off {
        Some(false)
    } else {
        on
    }
}

/// The value of a deprecated spelling, with a note on stderr naming the flag to use instead.
pub fn deprecated<T>(value: Option<T>, old: &str, new: &str) -> Option<T> {
    if value.is_some() {
        eprintln!("note: {old} is deprecated and will be removed; use {new}");
    }
    value
}

/// `--gradient-checkpointing` / `--no-gradient-checkpointing` of `plan` and `bench-step`, with
/// their deprecated `--checkpointing on|off|true|false`.
#[derive(clap::Args)]
pub struct CheckpointingArgs {
    /// Per-block activation checkpointing: recompute each block's activations in the backward
    /// instead of keeping them. Default: off for `plan` (as for `train`), on for `bench-step`.
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub gradient_checkpointing: Option<bool>,
    /// Turn --gradient-checkpointing off.
    #[arg(long, overrides_with = "gradient_checkpointing")]
    pub no_gradient_checkpointing: bool,
    /// Deprecated spelling of --gradient-checkpointing: on or off (true, false).
    #[arg(long, hide = true, conflicts_with_all = ["gradient_checkpointing", "no_gradient_checkpointing"])]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub checkpointing: Option<bool>,
}

impl CheckpointingArgs {
    /// The setting, `default` when no flag is given.
    pub fn get(&self, default: bool) -> bool {
        let old = deprecated(self.checkpointing, "--checkpointing", "--gradient-checkpointing");
        old.or(switch(self.gradient_checkpointing, self.no_gradient_checkpointing)).unwrap_or(default)
    }
}

/// `--model`, `--rope-axes`, `--lora`, `--lora-unknown` and `--device`: a model with its LoRAs.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A FLUX transformer: BFL single .safetensors file (e.g. flux1-dev.safetensors, keys
    /// optionally prefixed model.diffusion_model.), a diffusers transformer folder (config.json +
    /// diffusion_pytorch_model*.safetensors, sharded or not), a FLUX.1 repository folder holding
    /// transformer/, a built-in configuration name (flux1-dev, flux1-schnell, tiny) where only
    /// shapes are needed, or random:NAME[:SEED] (random:flux1-dev:7) for that configuration with
    /// PyTorch-default random weights generated on read, no file needed.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// A LoRA file (diffusers/PEFT, kohya, ComfyUI or OneTrainer keys), optionally with a
    /// strength after a colon: style.safetensors:0.8 (default strength 1). Repeat to stack adapters.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,
    /// What to do with a LoRA key that matches no module of the model: `error` (default) or
    /// `warn` (skip it with a warning).
    #[arg(long, value_name = "error|warn", default_value = "error")]
    pub lora_unknown: String,
    /// Where the transformer runs: cpu, cuda, or auto (CUDA when a device and the kernels are
    /// there, else the CPU).
    #[arg(long, value_name = "cpu|cuda|auto", default_value = "auto")]
    pub device: String,
}

/// Adapter settings (PEFT's LoraConfig).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AdapterArgs {
    /// LoRA rank r. Default 16.
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the adapter's scale is alpha/r (alpha/√r with --rslora). Default: the rank.
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Comma-separated targets: presets attn, attn-mlp (diffusers' default), all (every linear in
    /// the blocks, kohya's set); diffusers names matched as PEFT does, by suffix (to_q hits double
    /// and single blocks); BFL names (img_attn.qkv, linear1) for one adapter on a fused
    /// projection; or globs over full names (single_transformer_blocks.1?.proj_mlp). The
    /// top-level linears too: x_embedder, context_embedder, and final_layer.linear (diffusers'
    /// proj_out, a name that also hits every single block's proj_out). Default attn-mlp (the
    /// built-in training demo: all, with modulation).
    #[arg(long)]
    pub targets: Option<String>,
    /// With the `all` preset, also adapt the modulation linears (norm1.linear, norm.linear …).
    /// Default off (the built-in training demo: on).
    #[arg(long, overrides_with = "no_include_modulation")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub include_modulation: Option<bool>,
    /// Turn --include-modulation off.
    #[arg(long, overrides_with = "include_modulation")]
    pub no_include_modulation: bool,
    /// Per-module rank overrides, PEFT rank_pattern style: to_q=8,proj_mlp=32
    #[arg(long, value_name = "NAME=R,…")]
    pub rank_pattern: Option<String>,
    /// Per-module alpha overrides: to_q=8,proj_mlp=32
    #[arg(long, value_name = "NAME=ALPHA,…")]
    pub alpha_pattern: Option<String>,
    /// rsLoRA scaling alpha/√r instead of alpha/r. Default off.
    #[arg(long, overrides_with = "no_rslora")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub rslora: Option<bool>,
    /// Turn --rslora off.
    #[arg(long, overrides_with = "rslora")]
    pub no_rslora: bool,
}

impl AdapterArgs {
    pub fn config(&self) -> Result<LoraConfig> {
        let mut c = LoraConfig::default();
        if let Some(r) = self.rank {
            c.rank = r;
        }
        c.alpha = self.alpha.unwrap_or(c.rank as f32);
        if let Some(t) = &self.targets {
            c.targets = t.split(',').map(String::from).collect();
        }
        c.include_modulation = switch(self.include_modulation, self.no_include_modulation).unwrap_or(false);
        c.rslora = switch(self.rslora, self.no_rslora).unwrap_or(false);
        if let Some(p) = &self.rank_pattern {
            c.rank_pattern = parse_patterns(p, "--rank-pattern")?;
        }
        if let Some(p) = &self.alpha_pattern {
            c.alpha_pattern = parse_patterns(p, "--alpha-pattern")?;
        }
        Ok(c)
    }
}

/// Pipeline components, each overriding the --model folder's.
#[derive(clap::Args, Clone, Default)]
pub struct ComponentArgs {
    /// VAE: diffusers folder or ae.safetensors. Default: the model folder's vae/ or ae.safetensors.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// T5 encoder: HF folder or t5xxl_*.safetensors. Default: the model folder's text_encoder_2/.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// T5 tokenizer: tokenizer.json, spiece.model or a folder. Default: the model folder's tokenizer_2/.
    #[arg(long)]
    pub t5_tokenizer: Option<PathBuf>,
    /// CLIP text model: HF folder or clip_l.safetensors. Default: the model folder's text_encoder/.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// CLIP tokenizer: tokenizer.json, vocab.json + merges.txt, or a folder. Default: the model
    /// folder's tokenizer/.
    #[arg(long)]
    pub clip_tokenizer: Option<PathBuf>,
}

impl ComponentArgs {
    pub fn components(&self) -> Components {
        Components {
            transformer: None,
            vae: self.vae.clone(),
            t5: self.t5.clone(),
            t5_tokenizer: self.t5_tokenizer.clone(),
            clip: self.clip.clone(),
            clip_tokenizer: self.clip_tokenizer.clone(),
        }
    }
}

/// The NSFW check on generated images (`sample`, `serve` and `train`'s previews take the same flags): BFL's reference
/// code classifies every image with Falconsai/nsfw_image_detection and withholds it at an nsfw
/// probability of 0.85 or more (docs/safety.md).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NsfwArgs {
    /// The NSFW classifier run on every generated image: a folder holding Falconsai/
    /// nsfw_image_detection's config.json, model.safetensors and preprocessor_config.json (a Hugging
    /// Face ViTForImageClassification). Default: the --model folder's nsfw_classifier/ when it has
    /// one. A flagged image is written black, named *-nsfw-filtered.png.
    #[arg(long, value_name = "DIR")]
    pub nsfw_model: Option<PathBuf>,
    /// Require the NSFW check: an error when no classifier is found (without it, a missing
    /// classifier leaves the check off with a note).
    #[arg(long, overrides_with = "no_nsfw_check")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub nsfw_check: Option<bool>,
    /// Turn the NSFW check off (a warning says so on every run).
    #[arg(long, overrides_with = "nsfw_check")]
    pub no_nsfw_check: bool,
}

impl NsfwArgs {
    /// Loads the classifier named by --nsfw-model, else `model_root`'s nsfw_classifier/
    /// (`safety::NsfwSetting::open`).
    pub fn open(&self, model_root: Option<&Path>) -> Result<NsfwSetting> {
        NsfwSetting::open(self.nsfw_model.as_deref(), switch(self.nsfw_check, self.no_nsfw_check), model_root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_and_old_values() {
        assert_eq!(switch(None, false), None);
        assert_eq!(switch(Some(true), false), Some(true));
        assert_eq!(switch(None, true), Some(false));
        let ck = |gradient_checkpointing, no_gradient_checkpointing, checkpointing| CheckpointingArgs {
            gradient_checkpointing,
            no_gradient_checkpointing,
            checkpointing,
        };
        assert!(ck(None, false, Some(true)).get(false));
        assert!(!ck(None, false, Some(false)).get(true));
        assert!(ck(None, false, None).get(true));
        assert!(!ck(None, false, None).get(false));
        assert!(!ck(Some(true), true, None).get(true));
    }
}

/// `--rope-axes`, shared by every command that opens a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RopeArgs {
    /// RoPE split of the head dim over the three position axes (FLUX.1: 16,56,56). Needed only
    /// when the head dim is not 128 and the checkpoint has no config.json saying it.
    #[arg(long, value_name = "A,B,C")]
    pub rope_axes: Option<String>,
}
