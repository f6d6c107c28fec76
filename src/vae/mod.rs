//! The FLUX autoencoder (16-channel latents, 8× downsampling): encoder and decoder, CPU reference.
//!
//! Structure: docs/flux-model.md §8.3 (BFL `modules/autoencoder.py`); latent scaling
//! docs/flux-model.md §5.4. `blocks` holds the module tree under BFL's names and the forwards; `weights` reads BFL's
//! `ae.safetensors` or a diffusers `AutoencoderKL` folder and translates the latter's names at the edge.

pub mod blocks;
pub mod weights;

use crate::util::Rng;
use anyhow::{bail, Result};
use blocks::{Decoder, Encoder, ParamSource};
use std::path::Path;

/// Hyperparameters of the autoencoder (BFL `AutoEncoderParams`, minus the unused `resolution`).
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Image channels in and out (3).
    pub in_channels: usize,
    /// Channels of the first level (128); level i has ch·ch_mult[i].
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    /// ResnetBlocks per encoder level (the decoder has one more per level).
    pub num_res_blocks: usize,
    /// Latent channels (16).
    pub z_channels: usize,
    pub scale_factor: f32,
    pub shift_factor: f32,
    /// GroupNorm groups (32).
    pub groups: usize,
}

/// FLUX's latent scale and shift (BFL `util.py` ae_params; diffusers `scaling_factor` / `shift_factor`).
pub const FLUX_SCALE_FACTOR: f32 = 0.3611;
pub const FLUX_SHIFT_FACTOR: f32 = 0.1159;
pub const FLUX_GROUPS: usize = 32;

impl VaeConfig {
    /// FLUX.1's `ae.safetensors`: ch 128, ch_mult [1, 2, 4, 4], 2 ResnetBlocks, 16 latent channels.
    pub fn flux() -> VaeConfig {
        VaeConfig {
            in_channels: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            scale_factor: FLUX_SCALE_FACTOR,
            shift_factor: FLUX_SHIFT_FACTOR,
            groups: FLUX_GROUPS,
        }
    }

    pub fn levels(&self) -> usize {
        self.ch_mult.len()
    }

    /// Channels of level i.
    pub fn channels(&self, level: usize) -> usize {
        self.ch * self.ch_mult[level]
    }

    /// Downsampling factor 2^(levels−1).
    pub fn factor(&self) -> usize {
        1 << (self.levels() - 1)
    }

    /// Every parameter under its BFL name, with its shape, in module order (the 1×1 attention
    /// projections as BFL's [c, c, 1, 1]). Read off the loaders themselves, so it cannot drift from them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let seen = std::cell::RefCell::new(Vec::new());
        let record = |name: &str, shape: &[usize]| {
            seen.borrow_mut().push((name.to_string(), shape.to_vec()));
            Ok(Vec::new())
        };
        // Recording cannot fail; the model built from empty buffers is dropped unused.
        Encoder::load(self, &record).expect("recording loader");
        Decoder::load(self, &record).expect("recording loader");
        seen.into_inner()
    }

    /// Checks what the shapes cannot: positive sizes and groups that split every channel count.
    pub fn validate(&self) -> Result<()> {
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) || self.z_channels == 0 {
            bail!("autoencoder config {self:?}: channel counts must be positive and ch_mult non-empty");
        }
        if self.in_channels == 0 || self.num_res_blocks == 0 {
            bail!("autoencoder config {self:?}: in_channels and num_res_blocks must be positive");
        }
        for c in (0..self.levels()).map(|i| self.channels(i)).chain([self.ch]) {
            if self.groups == 0 || !c.is_multiple_of(self.groups) {
                bail!(
                    "GroupNorm groups {} do not divide {c} channels (FLUX uses 32; a BFL-layout file can set \
                     `__metadata__` `norm_num_groups`, a diffusers config `norm_num_groups`)",
                    self.groups
                );
            }
        }
        if !(self.scale_factor.is_finite() && self.scale_factor != 0.0 && self.shift_factor.is_finite()) {
            bail!(
                "autoencoder scale factor {} / shift factor {} must be finite, scale non-zero",
                self.scale_factor,
                self.shift_factor
            );
        }
        Ok(())
    }
}

/// The FLUX autoencoder with its weights in f32.
pub struct AutoEncoder {
    pub cfg: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
}

/// diffusers `DiagonalGaussianDistribution` clamps the log-variance to this range before exp.
pub const LOGVAR_RANGE: (f32, f32) = (-30.0, 20.0);

impl AutoEncoder {
    /// BFL `ae.safetensors` (config inferred from the shapes; `__metadata__` may set `norm_num_groups`,
    /// `scale_factor`, `shift_factor`, else FLUX's 32 / 0.3611 / 0.1159) or a diffusers `AutoencoderKL`
    /// folder (config.json + diffusion_pytorch_model.safetensors; a FLUX repository folder holding `vae/`
    /// works too). Stored as F32, BF16 or F16. Missing, unexpected or wrongly shaped tensors are errors
    /// naming the file and the tensor.
    pub fn open(path: &Path) -> Result<AutoEncoder> {
        weights::open(path)
    }

    /// Builds the model from a parameter source keyed by BFL names (`get(name, shape)`); the loaders
    /// and random initialisation both go through here.
    pub fn from_params(cfg: VaeConfig, get: &ParamSource) -> Result<AutoEncoder> {
        cfg.validate()?;
        let encoder = Encoder::load(&cfg, get)?;
        let decoder = Decoder::load(&cfg, get)?;
        Ok(AutoEncoder { cfg, encoder, decoder })
    }

    /// Downsampling factor 2^(levels−1) (8 for FLUX).
    pub fn factor(&self) -> usize {
        self.cfg.factor()
    }

    /// img [b, 3, h, w] in [-1, 1] → latent [b, z, h/f, w/f], scaled and shifted: scale·(z − shift).
    /// `sample`: None → the mean (BFL HEAD); Some(rng) → mean + std·N(0, 1) with std = exp(½·logvar),
    /// logvar clamped to [-30, 20] as diffusers does, the noise drawn in [b, z, h/f, w/f] order.
    /// h and w must be multiples of the factor.
    pub fn encode(&self, img: &[f32], b: usize, h: usize, w: usize, sample: Option<&mut Rng>) -> Result<Vec<f32>> {
        let (f, z) = (self.factor(), self.cfg.z_channels);
        let moments = self.encode_moments(img, b, h, w)?;
        let n = z * (h / f) * (w / f);
        debug_assert_eq!(moments.len(), b * 2 * n);
        let (scale, shift) = (self.cfg.scale_factor, self.cfg.shift_factor);
        let mut out = Vec::with_capacity(b * n);
        let mut rng = sample;
        for m in moments.chunks(2 * n) {
            let (mean, logvar) = m.split_at(n);
            for (&mu, &lv) in mean.iter().zip(logvar) {
                let x = match rng.as_deref_mut() {
                    Some(r) => mu + (0.5 * lv.clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)).exp() * r.normal(),
                    None => mu,
                };
                out.push(scale * (x - shift));
            }
        }
        Ok(out)
    }

    /// The encoder's raw moments [b, 2·z, h/f, w/f]: mean ‖ logvar, unscaled and unclamped.
    pub fn encode_moments(&self, img: &[f32], b: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let (f, cin) = (self.factor(), self.cfg.in_channels);
        if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            bail!("encode: image size {h}×{w} must be a positive multiple of {f} (crop or resize it)");
        }
        if img.len() != b * cin * h * w {
            bail!("encode: image buffer has {} values, [{b}, {cin}, {h}, {w}] needs {}", img.len(), b * cin * h * w);
        }
        Ok(self.encoder.forward(img, b, h, w))
    }

    /// latent [b, z, h, w] (scaled, shifted) → image [b, 3, h·f, w·f], unclamped (callers clamp to [-1, 1]).
    pub fn decode(&self, z: &[f32], b: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let zc = self.cfg.z_channels;
        if h == 0 || w == 0 {
            bail!("decode: latent size {h}×{w} must be positive");
        }
        if z.len() != b * zc * h * w {
            bail!("decode: latent buffer has {} values, [{b}, {zc}, {h}, {w}] needs {}", z.len(), b * zc * h * w);
        }
        let (scale, shift) = (self.cfg.scale_factor, self.cfg.shift_factor);
        let raw: Vec<f32> = z.iter().map(|&v| v / scale + shift).collect();
        Ok(self.decoder.forward(&raw, b, h, w))
    }
}
