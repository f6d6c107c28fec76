//! `cache`: images + captions → the cached-sample format the trainer reads (VAE latent, T5
//! states, CLIP pooled), once. A sample already cached from the same file, caption and settings is
//! skipped; a corrupt image is skipped with a warning naming it and counted.

use crate::io::images::{dimensions, has_images, load_bucketed, pick_bucket, scan};
use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use crate::pipeline::TextEncoders;
use crate::util::Rng;
use crate::vae::AutoEncoder;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize)]
pub struct CacheSettings {
    /// Target areas as square sides (512, 1024 …): buckets of about side² pixels.
    pub sides: Vec<usize>,
    /// Bucket sides are multiples of this (a multiple of 2 × the VAE factor: 16 for FLUX).
    pub step: usize,
    /// Also cache the horizontally flipped image.
    pub flip: bool,
    pub t5_len: usize,
    /// Encode a VAE sample instead of the mean.
    pub vae_sample: bool,
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct CacheReport {
    pub written: usize,
    pub unchanged: usize,
    pub corrupt: Vec<String>,
    /// Folder entries skipped before decoding (`path: why`): unreadable, broken links, folders,
    /// captions that cannot be read.
    pub skipped: Vec<String>,
    pub out: PathBuf,
}

impl std::fmt::Display for CacheReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cache {}: {} written, {} unchanged, {} corrupt image(s) skipped{}",
            self.out.display(),
            self.written,
            self.unchanged,
            self.corrupt.len(),
            if self.corrupt.is_empty() { String::new() } else { format!(" ({})", self.corrupt.join(", ")) }
        )?;
        if !self.skipped.is_empty() {
            write!(f, "; skipped {} entries ({})", self.skipped.len(), self.skipped.join("; "))?;
        }
        Ok(())
    }
}

pub fn cache_images(
    data: &Path,
    out: &Path,
    text: &TextEncoders,
    vae: &AutoEncoder,
    s: &CacheSettings,
    quiet: bool,
) -> Result<CacheReport> {
    let f = vae.factor();
    if s.step == 0 || !s.step.is_multiple_of(2 * f) {
        bail!("bucket step {} must be a multiple of {} (2 × the VAE's downsampling factor {f})", s.step, 2 * f);
    }
    if s.sides.is_empty() || s.sides.iter().any(|&x| x < s.step) {
        bail!("resolution {:?}: each side must be at least the bucket step {}", s.sides, s.step);
    }
    crate::text::t5::check_max_len(s.t5_len)?;
    let found = scan(data)?;
    if !quiet {
        for w in found.warnings.iter().chain(&found.skipped) {
            eprintln!("warning: {w}");
        }
    }
    let entries = found.entries;
    if entries.is_empty() {
        bail!(
            "{}: no usable images (png, jpg, jpeg, webp){}",
            data.display(),
            if found.skipped.is_empty() { String::new() } else { format!("; skipped: {}", found.skipped.join("; ")) }
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create cache folder {}", out.display()))?;
    let settings = serde_json::to_string(s)?;
    let mut rep = CacheReport { out: out.to_path_buf(), skipped: found.skipped, ..Default::default() };
    for e in &entries {
        let name = e.path.file_stem().unwrap().to_string_lossy().to_string();
        let meta_file = match std::fs::metadata(&e.path) {
            Ok(m) => m,
            Err(err) => {
                if !quiet {
                    eprintln!("warning: skipping {}: {err}", e.path.display());
                }
                rep.skipped.push(format!("{}: {err}", e.path.display()));
                continue;
            }
        };
        let mtime = meta_file
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let meta = BTreeMap::from([
            ("source".to_string(), e.path.display().to_string()),
            ("source_size".to_string(), meta_file.len().to_string()),
            ("source_mtime".to_string(), mtime.to_string()),
            ("caption".to_string(), e.caption.clone()),
            ("settings".to_string(), settings.clone()),
        ]);
        let variants: &[bool] = if s.flip { &[false, true] } else { &[false] };
        let targets: Vec<(bool, PathBuf)> = variants
            .iter()
            .map(|&fl| (fl, out.join(format!("{name}{}.safetensors", if fl { "-flip" } else { "" }))))
            .collect();
        let fresh = targets.iter().all(|(_, p)| SafeTensors::open(p).map(|st| st.metadata() == &meta).unwrap_or(false));
        if fresh {
            rep.unchanged += targets.len();
            continue;
        }
        let (w, h) = match dimensions(&e.path) {
            Ok(d) => d,
            Err(err) => {
                if !quiet {
                    eprintln!("warning: skipping {}: {err:#}", e.path.display());
                }
                rep.corrupt.push(e.path.display().to_string());
                continue;
            }
        };
        let (bw, bh) = pick_bucket(w, h, &s.sides, s.step);
        let (txt, y) = text.encode(std::slice::from_ref(&e.caption))?;
        for (fl, p) in &targets {
            let img = match load_bucketed(&e.path, bw, bh, *fl) {
                Ok(i) => i,
                Err(err) => {
                    if !quiet {
                        eprintln!("warning: skipping {}: {err:#}", e.path.display());
                    }
                    rep.corrupt.push(e.path.display().to_string());
                    break;
                }
            };
            let mut rng = Rng::new(s.seed ^ (rep.written as u64 + 1).wrapping_mul(0x9E37_79B9));
            let lat = vae.encode(&img, 1, bh, bw, if s.vae_sample { Some(&mut rng) } else { None })?;
            let z = vae.cfg.z_channels;
            let t = [
                OutTensor { name: "latent", shape: vec![z, bh / f, bw / f], data: &lat, dtype: Dtype::F32 },
                OutTensor { name: "txt", shape: vec![text.t5_len, text.t5.cfg.d_model], data: &txt, dtype: Dtype::F32 },
                OutTensor { name: "y", shape: vec![text.clip.cfg.hidden], data: &y, dtype: Dtype::F32 },
            ];
            write_tensors(p, &t, &meta)?;
            rep.written += 1;
        }
    }
    if rep.written + rep.unchanged == 0 {
        bail!(
            "{}: no usable image ({} corrupt: {}; {} entries skipped)",
            data.display(),
            rep.corrupt.len(),
            rep.corrupt.join(", "),
            rep.skipped.len()
        );
    }
    Ok(rep)
}

/// True when `dir` holds images rather than cached samples (by file name: a folder whose images
/// are all bad still goes to `cache_images`, which says why each is skipped).
pub fn holds_images(dir: &Path) -> bool {
    has_images(dir)
}
