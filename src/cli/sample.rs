//! `flux-kernels sample`: latents and PNGs of prompts (or a conditioning file) under any number
//! of LoRA sets, the base loaded once.

use super::args::ComponentArgs;
use super::args::NsfwArgs;
use super::args::RopeArgs;
use super::{open_loras, open_model, parse_unknown, ModelSpec};
use crate::adapters::formats::UnknownKeys;
use crate::adapters::AdapterSet;
use crate::engine::{Engine, EngineOptions};
use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use crate::model::config::FluxConfig;
use crate::model::weights::FluxWeights;
use crate::safety::NsfwClassifier;
use crate::sample::latents::{read_noise, write_latents, Latents};
use crate::sample::preview::write_preview;
use crate::sample::sampler::{sample_progress_from, SampleSpec};
use crate::train::builtin;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A FLUX transformer or FLUX.1 folder (as for `forward`; a folder's VAE and text encoders are
    /// used too). Default: the built-in tiny model with random weights.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Conditioning: `txt` [L,D] or [B,L,D] (T5 states) and `y` [D] or [B,D] (CLIP pooled).
    #[arg(long)]
    pub cond: Option<PathBuf>,
    /// Output folder: latents[-setK].safetensors and sample[-setK].png.
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Image width in pixels, a multiple of twice the VAE's factor. Default: 128 latent cells,
    /// 1024 px with FLUX.1's 8× VAE.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, as --width. Default: 128 latent cells (1024 px with FLUX.1's VAE).
    #[arg(long)]
    pub height: Option<usize>,
    /// Euler steps of the FLUX.1-dev schedule.
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Guidance fed to the guidance embedding (FLUX.1-dev is guidance-distilled).
    #[arg(long, default_value_t = 3.5)]
    pub guidance: f32,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per prompt (or per conditioning entry).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Initial noise instead of --seed's: a safetensors file with tensor `noise` [B, 16, H/8, W/8]
    /// (F32, BF16 or F16), the layout diffusers' FluxPipeline draws before packing; B is the number
    /// of images, and the size follows from it unless --width/--height say the same.
    #[arg(long, value_name = "FILE")]
    pub noise: Option<PathBuf>,
    /// Also write the final latents here: tensor `latents` [B, 16, H/8, W/8] (f32), the layout of
    /// --noise (with several --lora-set, `-setK` before the extension).
    #[arg(long, value_name = "FILE")]
    pub latents_out: Option<PathBuf>,
    /// LoRA applied to every set: FILE[:SCALE] (default strength 1), repeatable.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,
    /// A LoRA set sampled in its own pass: "a.safetensors:0.8,b.safetensors"; repeat for
    /// several sets (the base stays loaded; "none" for the base alone).
    #[arg(long, value_name = "FILE[:SCALE],…")]
    pub lora_set: Vec<String>,
    /// What to do with a LoRA key that matches no module of the model: `error` or `warn` (skip it
    /// with a warning).
    #[arg(long, value_name = "error|warn", default_value = "error")]
    pub lora_unknown: String,
    /// A prompt, encoded by the model folder's T5 and CLIP; repeat for several images.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A file of prompts, one per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub comps: ComponentArgs,
    /// T5 length in tokens (512 for FLUX.1-dev, 256 as an option).
    #[arg(long, default_value_t = 512)]
    pub t5_max_len: usize,
    /// Where the transformer runs: cpu, cuda, or auto (CUDA when a device and the kernels are
    /// there, else the CPU).
    #[arg(long, value_name = "cpu|cuda|auto", default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub nsfw: NsfwArgs,
}

/// `flux-kernels sample`: the prompts of --prompt and --prompts, each --lora-set with the
/// --lora files added (one set of the --lora files alone without --lora-set), one log line a set.
pub fn main(a: Args) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(p) = &a.prompts {
        let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        prompts.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
    }
    let mut sets: Vec<Vec<String>> = a
        .lora_set
        .iter()
        .map(|s| {
            let mut v: Vec<String> = s.split(',').filter(|x| !x.is_empty() && *x != "none").map(String::from).collect();
            v.extend(a.lora.iter().cloned());
            v
        })
        .collect();
    if sets.is_empty() {
        sets.push(a.lora.clone());
    }
    let model_root = a.model.as_deref().map(Path::new).filter(|p| p.is_dir());
    let nsfw = a.nsfw.open(model_root)?;
    super::print_log(std::slice::from_ref(&nsfw.status));
    let run_args = SampleArgs {
        model: a.model.as_deref(),
        rope_axes: a.rope.rope_axes.as_deref(),
        cond: a.cond.as_deref(),
        out: &a.out,
        width: a.width,
        height: a.height,
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        batch: a.batch_size,
        noise: a.noise.as_deref(),
        latents_out: a.latents_out.as_deref(),
        sets,
        unknown: parse_unknown(&a.lora_unknown)?,
        prompts,
        components: a.comps.components(),
        t5_len: a.t5_max_len,
        device: &a.device,
        nsfw: nsfw.classifier.as_ref(),
    };
    super::print_log(&run(&run_args)?);
    Ok(())
}

/// The transformer of `--model` (a checkpoint or FLUX.1 folder), or the built-in tiny model.
pub fn model_or_builtin(model: Option<&str>, rope_axes: Option<&str>) -> Result<(FluxConfig, FluxWeights)> {
    match model {
        None => {
            let cfg = builtin::tiny_config();
            let w = builtin::tiny_weights(&cfg)?;
            Ok((cfg, w))
        }
        Some(m) => match open_model(m, rope_axes)? {
            ModelSpec::Checkpoint(c) => {
                let w = FluxWeights::new(&c.cfg, &|n| c.param(n).cloned())?;
                Ok((c.cfg.clone(), w))
            }
            ModelSpec::Named(..) => bail!("--model {m} is a built-in configuration without weights"),
        },
    }
}

/// A `sample` run with its flags resolved: prompts read, LoRA sets assembled.
pub struct SampleArgs<'a> {
    pub model: Option<&'a str>,
    pub rope_axes: Option<&'a str>,
    pub cond: Option<&'a Path>,
    pub out: &'a Path,
    /// Pixels; None: 128 latent cells.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub batch: usize,
    /// Initial noise file (tensor `noise` [B, c, h, w]) instead of the seed's.
    pub noise: Option<&'a Path>,
    /// Where the final latents [B, c, h, w] also go (`-setK` inserted with several sets).
    pub latents_out: Option<&'a Path>,
    /// LoRA sets: each a list of FILE[:SCALE]; one run samples every set.
    pub sets: Vec<Vec<String>>,
    pub unknown: UnknownKeys,
    /// Prompts to encode with the pipeline's T5 and CLIP (instead of --cond); one image each.
    pub prompts: Vec<String>,
    /// Component overrides (VAE, encoders, tokenizers) over the --model folder's.
    pub components: crate::pipeline::Components,
    pub t5_len: usize,
    pub device: &'a str,
    /// The NSFW check run on every decoded image (None: off; the caller has said so).
    pub nsfw: Option<&'a NsfwClassifier>,
}

/// Conditioning per image: T5 states [L, D] and CLIP pooled, and L.
struct Cond {
    txt: Vec<Vec<f32>>,
    y: Vec<Vec<f32>>,
    n_txt: usize,
}

/// From a conditioning file: txt [L,D] or [B,L,D], y [D] or [B,D]; repeated to `batch` images.
fn load_cond(path: &Path, cfg: &FluxConfig, batch: usize) -> Result<Cond> {
    let st = SafeTensors::open(path)?;
    let p = path.display();
    let get = |n: &str| st.read_f32(n).with_context(|| format!("{p}: needs tensor `{n}`"));
    let (ts, txt) = get("txt")?;
    let (ys, y) = get("y")?;
    let (b, l) = match ts.as_slice() {
        [l, d] if *d == cfg.context_in_dim => (1, *l),
        [b, l, d] if *d == cfg.context_in_dim => (*b, *l),
        _ => bail!("{p}: `txt` has shape {ts:?}, expected [L, {0}] or [B, L, {0}]", cfg.context_in_dim),
    };
    // A batch or length of 0 would leave nothing to sample (and `i % b` below would divide by 0).
    if b == 0 || l == 0 {
        bail!("{p}: `txt` has shape {ts:?}: the batch and the token count must be at least 1");
    }
    if ys != [cfg.vec_in_dim] && ys != [b, cfg.vec_in_dim] {
        bail!("{p}: `y` has shape {ys:?}, expected [{}] or [{b}, {}]", cfg.vec_in_dim, cfg.vec_in_dim);
    }
    let per_t = l * cfg.context_in_dim;
    let tx: Vec<Vec<f32>> = (0..batch).map(|i| txt[(i % b) * per_t..(i % b + 1) * per_t].to_vec()).collect();
    let yb = y.len() / cfg.vec_in_dim;
    let yy: Vec<Vec<f32>> =
        (0..batch).map(|i| y[(i % yb) * cfg.vec_in_dim..(i % yb + 1) * cfg.vec_in_dim].to_vec()).collect();
    Ok(Cond { txt: tx, y: yy, n_txt: l })
}

/// The largest image side in pixels `sample` takes (FLUX.1 works at 0.25–2 MP; 4096² is 16 MP).
pub const MAX_SIDE: usize = 4096;
/// The most images per prompt or conditioning entry: each is a latent and a set of activations.
pub const MAX_BATCH: usize = 1024;

/// `path` with `tag` inserted before its extension (`out.safetensors` → `out-set1.safetensors`).
fn with_tag(path: &Path, tag: &str) -> PathBuf {
    if tag.is_empty() {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(e) => format!("{stem}{tag}.{}", e.to_string_lossy()),
        None => format!("{stem}{tag}"),
    };
    path.with_file_name(name)
}

pub fn run(a: &SampleArgs) -> Result<Vec<String>> {
    // Settings that size allocations are checked before anything is loaded.
    if a.batch == 0 || a.batch > MAX_BATCH {
        bail!("--batch-size {}: must be between 1 and {MAX_BATCH}", a.batch);
    }
    for (flag, v) in [("--width", a.width), ("--height", a.height)] {
        if let Some(v) = v.filter(|&v| v == 0 || v > MAX_SIDE) {
            bail!("{flag} {v}: must be between 1 and {MAX_SIDE} pixels");
        }
    }
    if !a.prompts.is_empty() {
        crate::text::t5::check_max_len(a.t5_len)?;
    }
    let (cfg, w) = model_or_builtin(a.model, a.rope_axes)?;
    let comps = match a.model {
        Some(m) if Path::new(m).is_dir() => crate::pipeline::Components::from_root(Path::new(m)),
        _ => crate::pipeline::Components::default(),
    }
    .with_overrides(&a.components);
    let Cond { txt, y, n_txt } = match a.cond {
        _ if !a.prompts.is_empty() => {
            let te = crate::pipeline::TextEncoders::open(&comps, &cfg, a.t5_len)?;
            let prompts: Vec<String> = (0..a.batch).flat_map(|_| a.prompts.iter().cloned()).collect();
            let (txt, y) = te.encode(&prompts)?;
            let (lt, dt, dv) = (a.t5_len, cfg.context_in_dim, cfg.vec_in_dim);
            Cond {
                txt: (0..prompts.len()).map(|i| txt[i * lt * dt..(i + 1) * lt * dt].to_vec()).collect(),
                y: (0..prompts.len()).map(|i| y[i * dv..(i + 1) * dv].to_vec()).collect(),
                n_txt: lt,
            }
        }
        Some(p) => load_cond(p, &cfg, a.batch)?,
        None if a.model.is_none() => {
            let ds = builtin::synthetic_dataset(&cfg)?;
            let s = &ds.samples[0];
            Cond { txt: vec![s.txt.clone(); a.batch], y: vec![s.y.clone(); a.batch], n_txt: s.n_txt }
        }
        None => bail!("--cond FILE (txt, y) is needed until native text encoders exist"),
    };
    // Decode through the VAE when there is one; otherwise latents and a linear preview.
    let vae = if comps.vae.is_some() { Some(crate::pipeline::open_vae(&comps, &cfg)?) } else { None };
    let f = vae.as_ref().map_or(8, |v| v.factor());
    let c = cfg.in_channels / 4;
    let noise = a.noise.map(|p| read_noise(p, c)).transpose()?;
    // The default is in latent cells, so a small test VAE does not turn 1024 px into 512² cells;
    // with --noise, the noise's size.
    let (dw, dh) = noise.as_ref().map_or((128 * f, 128 * f), |z| (z.w * f, z.h * f));
    let (width, height) = (a.width.unwrap_or(dw), a.height.unwrap_or(dh));
    if !width.is_multiple_of(2 * f) || !height.is_multiple_of(2 * f) || width == 0 || height == 0 {
        bail!("--width and --height must be positive multiples of {}, got {width}×{height}", 2 * f);
    }
    if let (Some(z), Some(p)) = (&noise, a.noise) {
        let p = p.display();
        if (z.w * f, z.h * f) != (width, height) {
            bail!(
                "{p}: tensor `noise` is [{}, {c}, {}, {}], a {}×{} image with this VAE (factor {f}), but \
                 --width/--height ask for {width}×{height}",
                z.images.len(),
                z.h,
                z.w,
                z.w * f,
                z.h * f
            );
        }
        if z.images.len() != txt.len() {
            bail!(
                "{p}: tensor `noise` has {} images (its first dimension), but this run samples {} \
                 (prompts or conditioning entries × --batch-size)",
                z.images.len(),
                txt.len()
            );
        }
    }
    // Outputs (and their folder) are written only once a set is sampled: a failed run leaves none.
    let spec =
        SampleSpec { txt, y, n_txt, h: height / f, w: width / f, steps: a.steps, guidance: a.guidance, seed: a.seed };
    // Every file is read once; switching sets only rebuilds the term lists.
    let sets = if a.sets.is_empty() { vec![vec![]] } else { a.sets.clone() };
    let mut loaded = Vec::new();
    for s in &sets {
        loaded.push(open_loras(s, &cfg, a.unknown)?);
    }
    let mut log = Vec::new();
    // The base is loaded (on CUDA: uploaded) once; a set switch replaces only the adapters.
    let mut engine = Engine::new(&super::device(a.device)?, &cfg, w, EngineOptions::default())?;
    for (k, files) in loaded.iter().enumerate() {
        let t = Instant::now();
        let mut set = AdapterSet::new();
        files.iter().for_each(|(f, s)| set.add(&f.terms, *s));
        engine.set_adapters(&set)?;
        let switch = t.elapsed();
        let t = Instant::now();
        let pb = indicatif::ProgressBar::new(spec.steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} step {pos}/{len} [{per_sec}, ETA {eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message(format!("set {k}, {} images", spec.txt.len()));
        let start = noise.as_ref().map(|z| z.images.as_slice());
        let mut lats = sample_progress_from(&mut engine, &spec, start, &mut |s| pb.set_position(s as u64))?;
        pb.finish_and_clear();
        let tag = if sets.len() > 1 { format!("-set{k}") } else { String::new() };
        let mut extra = String::new();
        // Decode and check every image before anything is written: a withheld image's latents
        // are written as zeros too (they would decode to the image).
        let mut decoded = Vec::new();
        if let Some(v) = &vae {
            let (h, w) = (spec.h * f, spec.w * f);
            for (i, z) in lats.iter_mut().enumerate() {
                let rgb = crate::io::images::rgb8_from_unit(&v.decode(z, 1, spec.h, spec.w)?, h, w);
                let verdict = match a.nsfw {
                    Some(c) => c.check(&rgb, w, h).with_context(|| format!("NSFW check of set {k}, image {i}"))?,
                    None => None,
                };
                match verdict {
                    Some(why) => {
                        let p = a.out.join(format!("sample{tag}-{i}-nsfw-filtered.png"));
                        log.push(format!("set {k}, image {i}: {why}; {} is black, its latents zero", p.display()));
                        z.iter_mut().for_each(|x| *x = 0.0);
                        decoded.push((p, crate::safety::black_rgb8(w, h)));
                    }
                    None => decoded.push((a.out.join(format!("sample{tag}-{i}.png")), rgb)),
                }
            }
        }
        if let Some(p) = a.latents_out {
            let p = with_tag(p, &tag);
            write_latents(&p, &Latents { c, h: spec.h, w: spec.w, images: lats.clone() })?;
            extra = format!(", {}", p.display());
        }
        let flat: Vec<f32> = lats.concat();
        let lp = a.out.join(format!("latents{tag}.safetensors"));
        let shape = vec![lats.len(), c, spec.h, spec.w];
        write_tensors(
            &lp,
            &[OutTensor { name: "latents", shape, data: &flat, dtype: Dtype::F32 }],
            &Default::default(),
        )?;
        let pp = a.out.join(format!("sample{tag}.png"));
        let mut pngs = Vec::new();
        if vae.is_some() {
            for (p, rgb) in decoded {
                crate::io::images::write_rgb8_png(&p, rgb, spec.h * f, spec.w * f)?;
                pngs.push(p.display().to_string());
            }
        } else if c == 16 {
            // Latents only: nothing is decoded, so nothing is classified (a latent preview is a
            // fixed linear projection at 1/8 of the size, not the image).
            if a.nsfw.is_some() && k == 0 {
                log.push("note: no VAE, so no image is decoded and the NSFW check has nothing to classify".into());
            }
            write_preview(&pp, &lats, spec.h, spec.w, 8usize.max(256 / spec.w.max(1)).min(16))?;
            pngs.push(pp.display().to_string());
        }
        let names: Vec<String> = sets[k].clone();
        log.push(format!(
            "set {k} [{}]: LoRA switch {:.3} ms, sampling {:.2} s ({} steps × {} images) → {}{}{}",
            if names.is_empty() { "base".into() } else { names.join(", ") },
            switch.as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64(),
            spec.steps,
            lats.len(),
            lp.display(),
            extra,
            if pngs.is_empty() { String::new() } else { format!(", {}", pngs.join(", ")) }
        ));
    }
    Ok(log)
}
