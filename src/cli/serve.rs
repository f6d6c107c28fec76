//! `flux-kernels serve`: the image server (src/serve/) on a FLUX.1 folder and a folder of LoRAs,
//! until SIGTERM or Ctrl-C, which finish the queued requests first.

use super::args::{switch, ComponentArgs, NsfwArgs, RopeArgs};
use crate::serve::{ImageFilter, Limits, ServeOptions, Server};
use anyhow::{Context, Result};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A FLUX.1 folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
    /// tokenizer_2/), or a transformer with the other components given by their flags.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub rope: RopeArgs,
    #[command(flatten)]
    pub comps: ComponentArgs,
    /// The folder of LoRA files (`NAME.safetensors`, used in prompts as `<lora:NAME:WEIGHT>`);
    /// nothing outside it is ever read for a request.
    #[arg(long)]
    pub lora_dir: PathBuf,
    /// The address to listen on. The default takes connections from this machine only; 0.0.0.0
    /// opens the server to the network (then set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// The port (A1111's default 7860; 0 picks a free one, printed at start).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /sdapi/ (the page asks for it). Also read from
    /// FK_API_KEY, which keeps it out of the process list.
    #[arg(long, env = "FK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest width or height in pixels.
    #[arg(long, default_value_t = Limits::default().max_side)]
    pub max_side: usize,
    /// Most Euler steps a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_steps)]
    pub max_steps: usize,
    /// Most images per request (batch_size × n_iter).
    #[arg(long, default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// Most images in one transformer pass (queued requests of one size are grouped up to it;
    /// an image with cfg_scale > 1 counts twice).
    #[arg(long, default_value_t = Limits::default().max_batch)]
    pub max_batch: usize,
    /// Most images queued or running; past it requests get 503 with Retry-After.
    #[arg(long, default_value_t = Limits::default().max_queue)]
    pub max_queue: usize,
    /// Most LoRA tags in one prompt.
    #[arg(long, default_value_t = Limits::default().max_loras)]
    pub max_loras: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = Limits::default().max_body)]
    pub max_body: usize,
    /// MiB of LoRA parameters (f32) kept loaded; the least recently used go first.
    #[arg(long, default_value_t = 2048)]
    pub lora_cache_mb: usize,
    /// T5 length in tokens (512 for FLUX.1-dev, 256 as an option).
    #[arg(long, default_value_t = 512)]
    pub t5_max_len: usize,
    /// Where the transformer runs: cpu, cuda, or auto. Requests with different LoRA sets share a
    /// pass on the CPU engine; on CUDA, only requests with the same set do (for now).
    #[arg(long, value_name = "cpu|cuda|auto", default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub nsfw: NsfwArgs,
    /// Put requests with different LoRA sets into one transformer batch (the default, where the
    /// engine can: the CPU engine). Off: only requests with the same set share a pass, as on CUDA.
    #[arg(long, overrides_with = "no_mixed_batches")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub mixed_batches: Option<bool>,
    /// Turn --mixed-batches off.
    #[arg(long, overrides_with = "mixed_batches")]
    pub no_mixed_batches: bool,
}

/// The post-filter every image passes (`serve::worker::Generator::post_filter`): the NSFW
/// classifier of `sample` (src/safety, BFL's check: Falconsai's ViT, p ≥ 0.85 → black image and
/// the reason in the response's info), or None when it is off (`NsfwArgs::open` says why).
pub fn nsfw_filter(nsfw: &NsfwArgs, model_root: Option<&Path>) -> Result<Option<ImageFilter>> {
    let setting = nsfw.open(model_root)?;
    super::print_log(std::slice::from_ref(&setting.status));
    Ok(setting.classifier.map(|c| -> ImageFilter { Box::new(move |rgb, w, h| c.check(rgb, w, h)) }))
}

pub fn main(a: Args) -> Result<()> {
    let limits = Limits {
        max_side: a.max_side,
        max_steps: a.max_steps,
        max_images: a.max_images,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_loras: a.max_loras,
        max_body: a.max_body,
    };
    let image_filter = nsfw_filter(&a.nsfw, Some(Path::new(&a.model)).filter(|p| p.is_dir()))?;
    let (cfg, weights) = super::sample::model_or_builtin(Some(&a.model), a.rope.rope_axes.as_deref())?;
    let root = Path::new(&a.model);
    let components = if root.is_dir() { crate::pipeline::Components::from_root(root) } else { Default::default() }
        .with_overrides(&a.comps.components());
    let opts = ServeOptions {
        cfg,
        weights,
        components,
        lora_dir: a.lora_dir.clone(),
        addr: SocketAddr::new(a.listen, a.port),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        limits,
        device: super::device(&a.device)?,
        t5_len: a.t5_max_len,
        lora_budget: a.lora_cache_mb.saturating_mul(1 << 20),
        image_filter,
        mixed_batches: switch(a.mixed_batches, a.no_mixed_batches).unwrap_or(true),
    };
    let auth = if opts.api_key.is_some() { "API key required" } else { "no API key" };
    if !a.listen.is_loopback() && opts.api_key.is_none() {
        eprintln!("warning: --listen {} without --api-key: anyone who can reach this port can use it", a.listen);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut signals = 0;
    ctrlc::set_handler(move || {
        signals += 1;
        if signals > 1 {
            eprintln!("serve: second signal, exiting without finishing the queue");
            std::process::exit(130);
        }
        let _ = tx.send(());
    })
    .context("installing the SIGTERM/Ctrl-C handler")?;
    let server = Server::start(opts)?;
    // One line a script can wait for (the port when 0 was asked).
    println!("serving on http://{} ({}, {auth}); LoRAs from {}", server.addr(), server.device(), a.lora_dir.display());
    let _ = rx.recv();
    eprintln!("serve: stopping: finishing the queued requests (a second signal exits at once)");
    server.shutdown()?;
    eprintln!("serve: stopped");
    Ok(())
}
