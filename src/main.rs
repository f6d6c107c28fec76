use anyhow::Result;
use clap::{Parser, Subcommand};
use flux_kernels::cli;
use std::path::PathBuf;

/// LoRA fine-tuning and sampling of FLUX.1-dev: a CPU reference and CUDA kernels.
#[derive(Parser)]
#[command(name = "flux-kernels", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A FLUX transformer: BFL single .safetensors file (e.g. flux1-dev.safetensors, keys
    /// optionally prefixed model.diffusion_model.), a diffusers transformer folder (config.json +
    /// diffusion_pytorch_model*.safetensors, sharded or not), a FLUX.1 repository folder holding
    /// transformer/, a built-in configuration name (flux1-dev, flux1-schnell, tiny) where only
    /// shapes are needed, or random:NAME[:SEED] (random:flux1-dev:7) for that configuration with
    /// PyTorch-default random weights generated on read, no file needed.
    #[arg(long)]
    model: String,
    /// RoPE split of the head dim over the three position axes (FLUX.1: 16,56,56). Needed only
    /// when the head dim is not 128 and the checkpoint has no config.json saying it.
    #[arg(long, value_name = "A,B,C")]
    rope_axes: Option<String>,
    /// A LoRA file (diffusers/PEFT, kohya, ComfyUI or OneTrainer keys), optionally with a
    /// strength after a colon: style.safetensors:0.8. Repeat to stack adapters.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// What to do with a LoRA key that matches no module of the model: `error` (default) or
    /// `warn` (skip it with a warning).
    #[arg(long, value_name = "error|warn", default_value = "error")]
    lora_unknown: String,
    /// Where the LoRA linears run: cpu, cuda, or auto (CUDA when a device and the kernels are
    /// there). Attention, norms and the rest stay on the CPU for now.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Adapter settings (PEFT's LoraConfig).
#[derive(clap::Args, Clone)]
struct AdapterArgs {
    /// LoRA rank r.
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha; the adapter's scale is alpha/r (alpha/√r with --rslora). Default: the rank.
    #[arg(long)]
    alpha: Option<f32>,
    /// Comma-separated targets: presets attn, attn-mlp (diffusers' default), all (every linear in
    /// the blocks, kohya's set); diffusers names matched as PEFT does, by suffix (to_q hits double
    /// and single blocks); BFL names (img_attn.qkv, linear1) for one adapter on a fused
    /// projection; or globs over full names (single_transformer_blocks.1?.proj_mlp).
    #[arg(long)]
    targets: Option<String>,
    /// With the `all` preset, also adapt the modulation linears (norm1.linear, norm.linear …).
    #[arg(long)]
    include_modulation: bool,
    /// Per-module rank overrides, PEFT rank_pattern style: to_q=8,proj_mlp=32
    #[arg(long, value_name = "NAME=R,…")]
    rank_pattern: Option<String>,
    /// Per-module alpha overrides: to_q=8,proj_mlp=32
    #[arg(long, value_name = "NAME=ALPHA,…")]
    alpha_pattern: Option<String>,
    /// rsLoRA scaling alpha/√r.
    #[arg(long)]
    rslora: bool,
}

impl AdapterArgs {
    fn config(&self) -> Result<flux_kernels::adapters::config::LoraConfig> {
        use flux_kernels::adapters::config::{parse_patterns, LoraConfig};
        let mut c = LoraConfig::default();
        if let Some(r) = self.rank {
            c.rank = r;
        }
        c.alpha = self.alpha.unwrap_or(c.rank as f32);
        if let Some(t) = &self.targets {
            c.targets = t.split(',').map(String::from).collect();
        }
        c.include_modulation = self.include_modulation;
        c.rslora = self.rslora;
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
struct ComponentArgs {
    /// VAE: diffusers folder or ae.safetensors.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// T5 encoder: HF folder or t5xxl_*.safetensors.
    #[arg(long)]
    t5: Option<PathBuf>,
    /// T5 tokenizer: tokenizer.json, spiece.model or a folder.
    #[arg(long)]
    t5_tokenizer: Option<PathBuf>,
    /// CLIP text model: HF folder or clip_l.safetensors.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// CLIP tokenizer: tokenizer.json, vocab.json + merges.txt, or a folder.
    #[arg(long)]
    clip_tokenizer: Option<PathBuf>,
}

impl ComponentArgs {
    fn components(&self) -> flux_kernels::pipeline::Components {
        flux_kernels::pipeline::Components {
            transformer: None,
            vae: self.vae.clone(),
            t5: self.t5.clone(),
            t5_tokenizer: self.t5_tokenizer.clone(),
            clip: self.clip.clone(),
            clip_tokenizer: self.clip_tokenizer.clone(),
        }
    }
}

/// Where and how `lora convert` / `lora merge` write.
#[derive(clap::Args)]
struct LoraWriteArgs {
    /// Model or built-in configuration the LoRA belongs to (for module shapes).
    #[arg(long)]
    model: String,
    #[arg(long)]
    out: PathBuf,
    /// peft (diffusers, default) or kohya.
    #[arg(long, default_value = "peft")]
    format: String,
    /// Storage dtype of the factors: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "error")]
    lora_unknown: String,
}

#[derive(Subcommand)]
enum LoraCmd {
    /// Rewrite a LoRA file in another format (exact): peft (diffusers) or kohya.
    Convert {
        #[command(flatten)]
        w: LoraWriteArgs,
        /// Input LoRA file, any supported dialect; FILE:SCALE folds a strength in.
        #[arg(long = "in", value_name = "FILE[:SCALE]")]
        input: String,
    },
    /// Sum several LoRAs with strengths into one file, exactly (ranks concatenate per module).
    Merge {
        #[command(flatten)]
        w: LoraWriteArgs,
        /// LoRA files with optional strengths: a.safetensors:0.8 b.safetensors:-0.5
        #[arg(required = true, value_name = "FILE[:SCALE]")]
        inputs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the architecture, parameter counts, dtype and size of a model, and what each LoRA holds.
    Info {
        #[command(flatten)]
        m: ModelArgs,
        /// With --rank/--targets: print the trainable-parameter line PEFT prints for the same
        /// adapters on diffusers' FluxTransformer2DModel.
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Train a LoRA (flow matching, AdamW) on cached samples; with no --model and no --data, the
    /// built-in demo: a tiny FLUX and a synthetic set, about a minute on a CPU.
    Train(Box<cli::train::TrainArgs>),
    /// Sample latents (and PNG previews) with the FLUX.1-dev Euler schedule, any number of LoRA
    /// sets switched without reloading the base. Without --model: the built-in tiny model.
    Sample {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_name = "A,B,C")]
        rope_axes: Option<String>,
        /// Conditioning: `txt` [L,D] or [B,L,D] (T5 states) and `y` [D] or [B,D] (CLIP pooled).
        #[arg(long)]
        cond: Option<PathBuf>,
        /// Output folder: latents[-setK].safetensors and sample[-setK].png.
        #[arg(long, default_value = "samples")]
        out: PathBuf,
        #[arg(long, default_value_t = 1024)]
        width: usize,
        #[arg(long, default_value_t = 1024)]
        height: usize,
        #[arg(long, default_value_t = 28)]
        steps: usize,
        /// Guidance fed to the guidance embedding (FLUX.1-dev is guidance-distilled).
        #[arg(long, default_value_t = 3.5)]
        guidance: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        /// LoRA applied to every set: FILE[:SCALE], repeatable.
        #[arg(long, value_name = "FILE[:SCALE]")]
        lora: Vec<String>,
        /// A LoRA set sampled in its own pass: "a.safetensors:0.8,b.safetensors"; repeat for
        /// several sets (the base stays loaded; "none" for the base alone).
        #[arg(long, value_name = "FILE[:SCALE],…")]
        lora_set: Vec<String>,
        #[arg(long, default_value = "error")]
        lora_unknown: String,
        /// A prompt, encoded by the model folder's T5 and CLIP; repeat for several images.
        #[arg(long)]
        prompt: Vec<String>,
        /// A file of prompts, one per line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        #[command(flatten)]
        comps: ComponentArgs,
        /// T5 length (512 for FLUX.1-dev, 256 as an option).
        #[arg(long, default_value_t = 512)]
        t5_max_len: usize,
        /// cpu, cuda or auto: where the transformer's LoRA linears run.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Encode a folder of images + same-name .txt captions into the trainer's cached samples
    /// (VAE latents, T5 states, CLIP pooled), skipping those already cached and unchanged.
    Cache {
        /// A FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/) or a transformer
        /// with the components given by flag.
        #[arg(long)]
        model: String,
        #[arg(long)]
        data: PathBuf,
        /// Cache folder. Default <data>/.flux-cache
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        comps: ComponentArgs,
        /// Bucket target sides, comma-separated (512, or 512,1024).
        #[arg(long, default_value = "512")]
        resolution: String,
        /// Bucket sides are multiples of this.
        #[arg(long, default_value_t = 64)]
        bucket_step: usize,
        /// Also cache horizontal flips.
        #[arg(long)]
        flip: bool,
        #[arg(long, default_value_t = 512)]
        t5_max_len: usize,
        /// Encode a VAE sample instead of the mean.
        #[arg(long)]
        vae_sample: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a synthetic cached-sample dataset for a model's widths (try the trainer without data).
    SynthData {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_name = "A,B,C")]
        rope_axes: Option<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 16)]
        n: usize,
        /// Latent height and width (even).
        #[arg(long, default_value_t = 16)]
        size: usize,
        #[arg(long, default_value_t = 8)]
        n_txt: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert or merge LoRA files.
    Lora {
        #[command(subcommand)]
        cmd: LoraCmd,
    },
    /// Run one forward pass of the CPU reference and write `out` [B, N, C] (f32).
    Forward {
        #[command(flatten)]
        m: ModelArgs,
        /// Inputs (safetensors, any float dtype): img [B,N,C_in] packed latents, img_ids [N,3] or
        /// [B,N,3], txt [B,L,D_ctx] T5 states, txt_ids [L,3] or [B,L,3], y [B,D_vec] CLIP pooled,
        /// timesteps [B] (sigma in [0,1]), guidance [B] (the scale itself, e.g. 3.5; required
        /// when the model has a guidance embedding).
        #[arg(long)]
        inputs: PathBuf,
        /// Output safetensors file; written atomically (temp file, then rename).
        #[arg(long)]
        out: PathBuf,
    },
    /// Quantise a transformer's block linears to 8 bits (int8 per-channel or fp8 e4m3), streamed
    /// tensor by tensor; forward, train and sample load the result through --model.
    Quantize {
        /// A bf16/f16/f32 transformer: BFL file or diffusers folder.
        #[arg(long)]
        model: String,
        /// Output: a .safetensors file for a BFL input, a new folder for a diffusers one.
        #[arg(long)]
        out: PathBuf,
        /// int8 (per-output-channel scales), fp8 (plain e4m3 cast, as flux1-dev-fp8 files),
        /// fp8-scaled (e4m3, one scale per tensor) or fp8-channel (e4m3, per-channel scales).
        #[arg(long, value_name = "int8|fp8|fp8-scaled|fp8-channel")]
        format: String,
        #[arg(long, value_name = "A,B,C")]
        rope_axes: Option<String>,
    },
    /// Time full LoRA training steps of the device-resident GPU model on synthetic inputs (one
    /// JSON line: median step time, peak device memory, the planner's prediction).
    BenchStep {
        /// A checkpoint or random:flux1-dev[:SEED].
        #[arg(long)]
        model: String,
        /// Image side in pixels (square).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value = "attn-mlp")]
        targets: String,
        /// bf16 or int8 (quantised at load).
        #[arg(long, default_value = "bf16")]
        base: String,
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        checkpointing: bool,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 512)]
        text_tokens: usize,
        /// Accepted for scripts; the output is always one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Predict the peak GPU memory of a LoRA training step (weights by dtype, LoRA and AdamW
    /// state, activations, workspace), whether it fits, and which settings would.
    Plan {
        /// A checkpoint or a built-in configuration name (flux1-dev).
        #[arg(long)]
        model: String,
        #[arg(long, value_name = "A,B,C")]
        rope_axes: Option<String>,
        /// Base weights on the GPU: bf16, int8, fp8 or fp8-scaled. Default: what the checkpoint
        /// holds (bf16 for a configuration name).
        #[arg(long)]
        base: Option<String>,
        /// Image size in pixels: 1024 (square) or 1024x768 (width × height).
        #[arg(long, default_value = "1024")]
        resolution: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// T5 tokens (512 for FLUX.1-dev, 256 for schnell).
        #[arg(long, default_value_t = 512)]
        text_tokens: usize,
        /// Per-block activation checkpointing: on or off (train --gradient-checkpointing true).
        #[arg(long, default_value = "off")]
        checkpointing: String,
        /// Where the modulation linears' weights live: gpu or host.
        #[arg(long, default_value = "gpu")]
        modulation: String,
        /// GPU memory in GiB to check the plan against.
        #[arg(long, default_value_t = 24.0)]
        gpu_memory: f64,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Gradient of mean((out − target)²), averaged over all elements, with respect to every
    /// factor of one LoRA file at strength 1, written under the file's own tensor names (f32).
    Grad {
        #[command(flatten)]
        m: ModelArgs,
        /// Inputs, as for `forward`.
        #[arg(long)]
        inputs: PathBuf,
        /// A safetensors with `target` [B,N,C_in].
        #[arg(long)]
        target: PathBuf,
        /// Output safetensors; the loss is in its metadata.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Info { m, adapter } => {
            let unknown = cli::parse_unknown(&m.lora_unknown)?;
            print!("{}", cli::info::run(&m.model, &m.lora, m.rope_axes.as_deref(), unknown)?);
            if adapter.rank.is_some() || adapter.targets.is_some() {
                let spec = cli::open_model(&m.model, m.rope_axes.as_deref())?;
                let lc = adapter.config()?;
                let specs = flux_kernels::adapters::config::resolve_targets(spec.cfg(), &lc)?;
                println!("{}", flux_kernels::adapters::config::trainable_summary(spec.cfg(), &specs));
            }
        }
        Cmd::Train(args) => {
            let o = cli::train::run(&args)?;
            if o.interrupted {
                println!("interrupted after step {}", o.steps_done);
            }
        }
        Cmd::Sample {
            model,
            rope_axes,
            cond,
            out,
            width,
            height,
            steps,
            guidance,
            seed,
            batch_size,
            lora,
            lora_set,
            lora_unknown,
            prompt,
            prompts,
            comps,
            t5_max_len,
            device,
        } => {
            let mut all_prompts = prompt.clone();
            if let Some(p) = &prompts {
                let text =
                    std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
                all_prompts.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
            }
            let mut sets: Vec<Vec<String>> = lora_set
                .iter()
                .map(|s| {
                    let mut v: Vec<String> =
                        s.split(',').filter(|x| !x.is_empty() && *x != "none").map(String::from).collect();
                    v.extend(lora.iter().cloned());
                    v
                })
                .collect();
            if sets.is_empty() {
                sets.push(lora.clone());
            }
            let args = cli::sample::SampleArgs {
                model: model.as_deref(),
                rope_axes: rope_axes.as_deref(),
                cond: cond.as_deref(),
                out: &out,
                width,
                height,
                steps,
                guidance,
                seed,
                batch: batch_size,
                sets,
                unknown: cli::parse_unknown(&lora_unknown)?,
                prompts: all_prompts,
                components: comps.components(),
                t5_len: t5_max_len,
                device: &device,
            };
            for line in cli::sample::run(&args)? {
                println!("{line}");
            }
        }
        Cmd::Cache { model, data, out, comps, resolution, bucket_step, flip, t5_max_len, vae_sample, seed } => {
            let settings = flux_kernels::train::cache::CacheSettings {
                sides: flux_kernels::train::sources::parse_sides(&resolution)?,
                step: bucket_step,
                flip,
                t5_len: t5_max_len,
                vae_sample,
                seed,
            };
            println!("{}", cli::sample::cache(&model, &data, out.as_deref(), &comps.components(), &settings)?);
        }
        Cmd::SynthData { model, rope_axes, out, n, size, n_txt, seed } => {
            println!(
                "{}",
                cli::sample::synth_data(model.as_deref(), rope_axes.as_deref(), &out, n, size, n_txt, seed)?
            );
        }
        Cmd::Lora { cmd } => {
            // A conversion is a merge of one file.
            let (w, inputs) = match cmd {
                LoraCmd::Convert { w, input } => (w, vec![input]),
                LoraCmd::Merge { w, inputs } => (w, inputs),
            };
            let msg = cli::lora_cmd::merge(
                &w.model,
                &inputs,
                &w.out,
                w.format.parse()?,
                cli::lora_cmd::parse_dtype(&w.dtype)?,
                cli::parse_unknown(&w.lora_unknown)?,
            )?;
            println!("{msg}");
        }
        Cmd::Forward { m, inputs, out } => {
            let unknown = cli::parse_unknown(&m.lora_unknown)?;
            cli::forward::run(&m.model, &inputs, &out, &m.lora, m.rope_axes.as_deref(), unknown, &m.device)?;
            println!("wrote {}", out.display());
        }
        Cmd::Plan {
            model,
            rope_axes,
            base,
            resolution,
            batch,
            text_tokens,
            checkpointing,
            modulation,
            gpu_memory,
            adapter,
        } => {
            let (width, height) = cli::plan::parse_resolution(&resolution)?;
            let settings = flux_kernels::plan::Settings {
                base: flux_kernels::plan::Base::Bf16,
                width,
                height,
                batch,
                text_tokens,
                checkpointing: cli::plan::parse_on_off(&checkpointing, "--checkpointing")?,
                modulation_on_host: cli::plan::parse_modulation(&modulation)?,
                lora: adapter.config()?,
            };
            print!("{}", cli::plan::run(&model, rope_axes.as_deref(), base.as_deref(), settings, gpu_memory)?);
        }
        Cmd::BenchStep { model, size, rank, targets, base, checkpointing, steps, warmup, text_tokens, json: _ } => {
            let a = cli::bench_step::BenchStep {
                model,
                size,
                rank,
                targets,
                base,
                checkpointing,
                steps,
                warmup,
                text_tokens,
            };
            println!("{}", cli::bench_step::run(&a)?);
        }
        Cmd::Quantize { model, out, format, rope_axes } => {
            println!("{}", cli::quantize::run(&model, &out, &format, rope_axes.as_deref())?);
        }
        Cmd::Grad { m, inputs, target, out } => {
            let unknown = cli::parse_unknown(&m.lora_unknown)?;
            let [lora] = m.lora.as_slice() else {
                anyhow::bail!("grad takes exactly one --lora FILE (the adapter to differentiate)");
            };
            let (path, scale) = flux_kernels::adapters::formats::parse_lora_arg(lora)?;
            if scale != 1.0 {
                anyhow::bail!("grad differentiates at strength 1; drop the :{scale} from --lora");
            }
            let loss =
                cli::grad::run(&m.model, &inputs, &target, &path, &out, m.rope_axes.as_deref(), unknown, &m.device)?;
            println!("loss {loss:.6e}; wrote {}", out.display());
        }
    }
    Ok(())
}
