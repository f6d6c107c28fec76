//! The whole FLUX.1 pipeline around the transformer: T5 + CLIP text encoders with their
//! tokenizers, and the VAE. Components come from a FLUX.1-dev folder as the official repository
//! lays it out (transformer/, vae/ or ae.safetensors, text_encoder/, text_encoder_2/, tokenizer/,
//! tokenizer_2/), each overridable by its own path.

use crate::model::config::FluxConfig;
use crate::text::clip::{ClipTextModel, ClipTokenizer};
use crate::text::t5::{T5Encoder, T5Tokenizer};
use crate::vae::AutoEncoder;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where each component lives; None where neither the folder nor a flag names it.
#[derive(Clone, Debug, Default)]
pub struct Components {
    pub transformer: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub t5: Option<PathBuf>,
    pub t5_tokenizer: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    pub clip_tokenizer: Option<PathBuf>,
}

impl Components {
    /// The components of a FLUX.1 repository folder (those that exist).
    pub fn from_root(root: &Path) -> Components {
        let some = |p: PathBuf| p.exists().then_some(p);
        Components {
            transformer: some(root.join("transformer")),
            vae: some(root.join("vae")).or_else(|| some(root.join("ae.safetensors"))),
            t5: some(root.join("text_encoder_2")),
            t5_tokenizer: some(root.join("tokenizer_2")),
            clip: some(root.join("text_encoder")),
            clip_tokenizer: some(root.join("tokenizer")),
        }
    }

    /// Flags win over the folder's components.
    pub fn with_overrides(mut self, o: &Components) -> Components {
        macro_rules! over {
            ($($f:ident),*) => { $( if o.$f.is_some() { self.$f = o.$f.clone(); } )* };
        }
        over!(transformer, vae, t5, t5_tokenizer, clip, clip_tokenizer);
        self
    }

    fn need<'a>(p: &'a Option<PathBuf>, what: &str, flag: &str) -> Result<&'a Path> {
        p.as_deref().with_context(|| format!("no {what}: pass a FLUX.1 folder as --model, or --{flag} PATH"))
    }
}

/// Prompt → (T5 states, CLIP pooled), as FLUX conditions on them.
pub struct TextEncoders {
    pub t5: T5Encoder,
    pub t5_tokenizer: T5Tokenizer,
    pub clip: ClipTextModel,
    pub clip_tokenizer: ClipTokenizer,
    /// T5 length: 512 for FLUX.1-dev (256 as an option).
    pub t5_len: usize,
}

/// CLIP's context length in FLUX.
pub const CLIP_LEN: usize = 77;

impl TextEncoders {
    pub fn open(c: &Components, cfg: &FluxConfig, t5_len: usize) -> Result<TextEncoders> {
        crate::text::t5::check_max_len(t5_len)?;
        let t5 = T5Encoder::open(Components::need(&c.t5, "T5 encoder", "t5")?)?;
        let t5_tokenizer = T5Tokenizer::open(Components::need(&c.t5_tokenizer, "T5 tokenizer", "t5-tokenizer")?)?;
        let clip = ClipTextModel::open(Components::need(&c.clip, "CLIP text model", "clip")?)?;
        let clip_tokenizer =
            ClipTokenizer::open(Components::need(&c.clip_tokenizer, "CLIP tokenizer", "clip-tokenizer")?)?;
        if t5.cfg.d_model != cfg.context_in_dim {
            bail!(
                "the T5 encoder is {} wide but the transformer takes {}-wide text states",
                t5.cfg.d_model,
                cfg.context_in_dim
            );
        }
        if clip.cfg.hidden != cfg.vec_in_dim {
            bail!(
                "the CLIP model is {} wide but the transformer takes a {}-wide pooled vector",
                clip.cfg.hidden,
                cfg.vec_in_dim
            );
        }
        Ok(TextEncoders { t5, t5_tokenizer, clip, clip_tokenizer, t5_len })
    }

    /// (txt [b, t5_len, d_ctx], y [b, d_vec]) for b prompts.
    pub fn encode(&self, prompts: &[String]) -> Result<(Vec<f32>, Vec<f32>)> {
        let b = prompts.len();
        let mut t5_ids = Vec::with_capacity(b * self.t5_len);
        let clip_len = CLIP_LEN.min(self.clip.cfg.max_pos);
        let mut clip_ids = Vec::with_capacity(b * clip_len);
        for p in prompts {
            t5_ids.extend(self.t5_tokenizer.encode(p, self.t5_len)?);
            clip_ids.extend(self.clip_tokenizer.encode(p, clip_len)?);
        }
        let txt = self.t5.encode(&t5_ids, b, self.t5_len)?;
        let (_, y) = self.clip.encode(&clip_ids, b, clip_len)?;
        Ok((txt, y))
    }
}

pub fn open_vae(c: &Components, cfg: &FluxConfig) -> Result<AutoEncoder> {
    let vae = AutoEncoder::open(Components::need(&c.vae, "VAE", "vae")?)?;
    if vae.cfg.z_channels * 4 != cfg.in_channels {
        bail!(
            "the VAE has {} latent channels but the transformer takes {} packed channels (4 × latent)",
            vae.cfg.z_channels,
            cfg.in_channels
        );
    }
    Ok(vae)
}
