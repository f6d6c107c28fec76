//! `flux-kernels cache`: an image + caption folder encoded into the trainer's cached samples.

use super::args::{switch, ComponentArgs};
use super::open_model;
use crate::pipeline::{open_vae, Components, TextEncoders};
use crate::train::cache::{cache_images, CacheSettings};
use crate::train::sources::parse_sides;
use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/) or a transformer
    /// with the components given by flag.
    #[arg(long)]
    pub model: String,
    /// Folder of images (png, jpg, jpeg, webp) with same-name .txt captions.
    #[arg(long)]
    pub data: PathBuf,
    /// Cache folder. Default <data>/.flux-cache
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub comps: ComponentArgs,
    /// Bucket target sides in pixels, comma-separated (512, or 512,1024).
    #[arg(long, default_value = "512")]
    pub resolution: String,
    /// Bucket sides are multiples of this many pixels.
    #[arg(long, default_value_t = 64)]
    pub bucket_step: usize,
    /// Also cache horizontal flips. Default off.
    #[arg(long, overrides_with = "no_flip")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub flip: Option<bool>,
    /// Turn --flip off.
    #[arg(long, overrides_with = "flip")]
    pub no_flip: bool,
    /// T5 length in tokens (512 for FLUX.1-dev, 256 as an option).
    #[arg(long, default_value_t = 512)]
    pub t5_max_len: usize,
    /// Encode a VAE sample instead of the mean. Default off.
    #[arg(long, overrides_with = "no_vae_sample")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub vae_sample: Option<bool>,
    /// Turn --vae-sample off.
    #[arg(long, overrides_with = "vae_sample")]
    pub no_vae_sample: bool,
    /// Seed of the VAE samples (with --vae-sample).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn main(a: Args) -> Result<()> {
    let settings = CacheSettings {
        sides: parse_sides(&a.resolution)?,
        step: a.bucket_step,
        flip: switch(a.flip, a.no_flip).unwrap_or(false),
        t5_len: a.t5_max_len,
        vae_sample: switch(a.vae_sample, a.no_vae_sample).unwrap_or(false),
        seed: a.seed,
    };
    println!("{}", cache(&a.model, &a.data, a.out.as_deref(), &a.comps.components(), &settings)?);
    Ok(())
}

/// `cache`: encode an image + caption folder into the trainer's cached-sample format.
pub fn cache(
    model: &str,
    data: &Path,
    out: Option<&Path>,
    overrides: &Components,
    settings: &CacheSettings,
) -> Result<String> {
    let spec = open_model(model, None)?;
    let cfg = spec.cfg().clone();
    let root = Path::new(model);
    let comps = if root.is_dir() { Components::from_root(root) } else { Default::default() }.with_overrides(overrides);
    let text = TextEncoders::open(&comps, &cfg, settings.t5_len)?;
    let vae = open_vae(&comps, &cfg)?;
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| data.join(".flux-cache"));
    Ok(cache_images(data, &out, &text, &vae, settings, false)?.to_string())
}
