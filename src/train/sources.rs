//! Where the trainer's samples and preview prompts come from when the data are images and
//! captions: the pipeline's text encoders and VAE, opened from the model folder or flags.

use super::cache::{cache_images, holds_images, CacheSettings};
use super::config::{TrainConfig, MAX_SIDE};
use super::data::Dataset;
use crate::model::config::FluxConfig;
use crate::pipeline::{open_vae, Components, TextEncoders};
use crate::vae::AutoEncoder;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The pipeline components named by the config: the model folder's, overridden by each path key.
pub fn components(tc: &TrainConfig) -> Components {
    let root = Path::new(&tc.model);
    let base = if root.is_dir() { Components::from_root(root) } else { Components::default() };
    let p = |s: &String| (!s.is_empty()).then(|| PathBuf::from(s));
    base.with_overrides(&Components {
        transformer: None,
        vae: p(&tc.vae),
        t5: p(&tc.t5),
        t5_tokenizer: p(&tc.t5_tokenizer),
        clip: p(&tc.clip),
        clip_tokenizer: p(&tc.clip_tokenizer),
    })
}

/// `resolution` (`--resolution 512,1024`): target sides in pixels, each 1..=[`MAX_SIDE`], checked
/// before any bucket is sized by them.
pub fn parse_sides(s: &str) -> Result<Vec<usize>> {
    let sides: Vec<usize> = s
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse::<usize>().with_context(|| format!("resolution: `{x}` is not a number")))
        .collect::<Result<_>>()?;
    if sides.is_empty() {
        bail!("resolution `{s}`: give at least one side in pixels (512, or 512,1024)");
    }
    if let Some(x) = sides.iter().find(|&&x| x == 0 || x > MAX_SIDE) {
        bail!("resolution: side {x} must be between 1 and {MAX_SIDE} pixels");
    }
    Ok(sides)
}

/// Text encoders and VAE, opened on first use.
pub struct Pipeline<'a> {
    tc: &'a TrainConfig,
    cfg: &'a FluxConfig,
    text: Option<TextEncoders>,
    vae: Option<AutoEncoder>,
}

impl<'a> Pipeline<'a> {
    pub fn new(tc: &'a TrainConfig, cfg: &'a FluxConfig) -> Pipeline<'a> {
        Pipeline { tc, cfg, text: None, vae: None }
    }

    pub fn text(&mut self) -> Result<&TextEncoders> {
        if self.text.is_none() {
            self.text = Some(TextEncoders::open(&components(self.tc), self.cfg, self.tc.t5_max_len)?);
        }
        Ok(self.text.as_ref().unwrap())
    }

    pub fn vae(&mut self) -> Result<&AutoEncoder> {
        if self.vae.is_none() {
            self.vae = Some(open_vae(&components(self.tc), self.cfg)?);
        }
        Ok(self.vae.as_ref().unwrap())
    }

    /// A dataset folder: cached samples as they are, or images + captions cached first (into
    /// `cache_dir`, default `<folder>/.flux-cache`).
    pub fn dataset(&mut self, dir: &str, quiet: bool) -> Result<Dataset> {
        let d = Path::new(dir);
        if !holds_images(d) {
            return Dataset::load(d, self.cfg);
        }
        let out = if self.tc.cache_dir.is_empty() {
            d.join(".flux-cache")
        } else {
            Path::new(&self.tc.cache_dir).join(d.file_name().unwrap_or_default())
        };
        let s = CacheSettings {
            sides: parse_sides(&self.tc.resolution)?,
            step: self.tc.bucket_step,
            flip: self.tc.flip,
            t5_len: self.tc.t5_max_len,
            vae_sample: self.tc.vae_sample,
            seed: self.tc.seed,
        };
        self.text()?;
        self.vae()?;
        let rep = cache_images(d, &out, self.text.as_ref().unwrap(), self.vae.as_ref().unwrap(), &s, quiet)?;
        if !quiet {
            eprintln!("{rep}");
        }
        Dataset::load(&out, self.cfg)
    }
}
