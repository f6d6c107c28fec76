//! `flux-kernels sample` and `flux-kernels synth-data`.

use super::{open_loras, open_model, ModelSpec};
use crate::io::lora_formats::UnknownKeys;
use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use crate::lora::LoraSet;
use crate::model::config::FluxConfig;
use crate::model::weights::FluxWeights;
use crate::sample::preview::write_preview;
use crate::sample::sampler::{sample, SampleSpec};
use crate::train::builtin;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

fn model_or_builtin(model: Option<&str>, rope_axes: Option<&str>) -> Result<(FluxConfig, FluxWeights)> {
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

pub struct SampleArgs<'a> {
    pub model: Option<&'a str>,
    pub rope_axes: Option<&'a str>,
    pub cond: Option<&'a Path>,
    pub out: &'a Path,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub batch: usize,
    /// LoRA sets: each a list of FILE[:SCALE]; one run samples every set.
    pub sets: Vec<Vec<String>>,
    pub unknown: UnknownKeys,
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

pub fn run(a: &SampleArgs) -> Result<Vec<String>> {
    let (cfg, w) = model_or_builtin(a.model, a.rope_axes)?;
    let Cond { txt, y, n_txt } = match a.cond {
        Some(p) => load_cond(p, &cfg, a.batch)?,
        None if a.model.is_none() => {
            let ds = builtin::synthetic_dataset(&cfg)?;
            let s = &ds.samples[0];
            Cond { txt: vec![s.txt.clone(); a.batch], y: vec![s.y.clone(); a.batch], n_txt: s.n_txt }
        }
        None => bail!("--cond FILE (txt, y) is needed until native text encoders exist"),
    };
    if !a.width.is_multiple_of(16) || !a.height.is_multiple_of(16) || a.width == 0 || a.height == 0 {
        bail!("--width and --height must be positive multiples of 16, got {}×{}", a.width, a.height);
    }
    std::fs::create_dir_all(a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let spec = SampleSpec {
        txt,
        y,
        n_txt,
        h: a.height / 8,
        w: a.width / 8,
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
    };
    let c = cfg.in_channels / 4;
    // Every file is read once; switching sets only rebuilds the term lists.
    let sets = if a.sets.is_empty() { vec![vec![]] } else { a.sets.clone() };
    let mut loaded = Vec::new();
    for s in &sets {
        loaded.push(open_loras(s, &cfg, a.unknown)?);
    }
    let mut log = Vec::new();
    for (k, files) in loaded.iter().enumerate() {
        let t = Instant::now();
        let mut set = LoraSet::new();
        files.iter().for_each(|(f, s)| set.add(&f.deltas, *s));
        let switch = t.elapsed();
        let t = Instant::now();
        let lats = sample(&cfg, &w, &spec, &set)?;
        let tag = if sets.len() > 1 { format!("-set{k}") } else { String::new() };
        let flat: Vec<f32> = lats.concat();
        let lp = a.out.join(format!("latents{tag}.safetensors"));
        let shape = vec![lats.len(), c, spec.h, spec.w];
        write_tensors(
            &lp,
            &[OutTensor { name: "latents", shape, data: &flat, dtype: Dtype::F32 }],
            &Default::default(),
        )?;
        let pp = a.out.join(format!("sample{tag}.png"));
        if c == 16 {
            write_preview(&pp, &lats, spec.h, spec.w, 8usize.max(256 / spec.w.max(1)).min(16))?;
        }
        let names: Vec<String> = sets[k].clone();
        log.push(format!(
            "set {k} [{}]: LoRA switch {:.3} ms, sampling {:.2} s ({} steps × {} images) → {}{}",
            if names.is_empty() { "base".into() } else { names.join(", ") },
            switch.as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64(),
            spec.steps,
            lats.len(),
            lp.display(),
            if c == 16 { format!(", {}", pp.display()) } else { String::new() }
        ));
    }
    Ok(log)
}

/// Writes a synthetic dataset for a model's widths (or the built-in tiny model's).
pub fn synth_data(
    model: Option<&str>,
    rope_axes: Option<&str>,
    out: &Path,
    n: usize,
    size: usize,
    n_txt: usize,
    seed: u64,
) -> Result<String> {
    let cfg = match model {
        None => builtin::tiny_config(),
        Some(m) => open_model(m, rope_axes)?.cfg().clone(),
    };
    if size == 0 || !size.is_multiple_of(2) {
        bail!("--size must be even");
    }
    let s = builtin::synthetic_samples(&cfg, n, size, n_txt, seed);
    builtin::write_samples(out, &s, cfg.context_in_dim)?;
    Ok(format!("wrote {n} samples to {}", out.display()))
}
