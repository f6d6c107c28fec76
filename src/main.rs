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
    /// transformer/, or a built-in configuration name (flux1-dev, flux1-schnell) where only shapes
    /// are needed.
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the architecture, parameter counts, dtype and size of a model, and what each LoRA holds.
    Info {
        #[command(flatten)]
        m: ModelArgs,
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
        Cmd::Info { m } => {
            let unknown = cli::parse_unknown(&m.lora_unknown)?;
            print!("{}", cli::info::run(&m.model, &m.lora, m.rope_axes.as_deref(), unknown)?);
        }
        Cmd::Forward { m, inputs, out } => {
            let unknown = cli::parse_unknown(&m.lora_unknown)?;
            cli::forward::run(&m.model, &inputs, &out, &m.lora, m.rope_axes.as_deref(), unknown)?;
            println!("wrote {}", out.display());
        }
        Cmd::Grad { m, inputs, target, out } => {
            let unknown = cli::parse_unknown(&m.lora_unknown)?;
            let [lora] = m.lora.as_slice() else {
                anyhow::bail!("grad takes exactly one --lora FILE (the adapter to differentiate)");
            };
            let (path, scale) = flux_kernels::io::lora_formats::parse_lora_arg(lora)?;
            if scale != 1.0 {
                anyhow::bail!("grad differentiates at strength 1; drop the :{scale} from --lora");
            }
            let loss = cli::grad::run(&m.model, &inputs, &target, &path, &out, m.rope_axes.as_deref(), unknown)?;
            println!("loss {loss:.6e}; wrote {}", out.display());
        }
    }
    Ok(())
}
