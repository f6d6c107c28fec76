//! The NSFW check BFL's FLUX reference code runs on every generated image: the ViT classifier
//! `Falconsai/nsfw_image_detection` (HF `ViTForImageClassification`, labels normal/nsfw), with
//! an image flagged when the probability of its `nsfw` label is at least 0.85 (BFL's
//! `NSFW_THRESHOLD`; `cli.py` keeps an image only when `nsfw_score < NSFW_THRESHOLD`).
//!
//! `preprocess` makes the classifier's input exactly as transformers' `ViTImageProcessor` does
//! (PIL bilinear resize to 224², rescale, normalise); `vit` is the model. docs/safety.md has the
//! measured agreement with transformers and the time per image.

pub mod preprocess;
pub mod vit;

use crate::ops::attention::softmax_in_place;
use anyhow::{bail, ensure, Result};
use preprocess::Preprocess;
use std::path::{Path, PathBuf};
use vit::Vit;

/// BFL's threshold: an image whose `nsfw` probability is at least this is not shown.
pub const NSFW_THRESHOLD: f32 = 0.85;

/// The label whose probability is compared with the threshold.
pub const NSFW_LABEL: &str = "nsfw";

/// A loaded NSFW classifier. Immutable after `load`, so one instance serves any number of
/// threads (`Send + Sync`; each call allocates its own activations).
pub struct NsfwClassifier {
    vit: Vit,
    pre: Preprocess,
    nsfw_index: usize,
    dir: PathBuf,
}

impl NsfwClassifier {
    /// Loads a `ViTForImageClassification` folder: `config.json`, `model.safetensors` and, when
    /// present, `preprocessor_config.json` (else ViTImageProcessor's defaults, which are
    /// Falconsai's). The config's id2label must name a label `nsfw`.
    pub fn load(dir: &Path) -> Result<NsfwClassifier> {
        ensure!(
            dir.is_dir(),
            "NSFW classifier {}: not a folder (expected a ViTForImageClassification folder with config.json and \
             model.safetensors, e.g. a download of Falconsai/nsfw_image_detection)",
            dir.display()
        );
        let config = dir.join("config.json");
        ensure!(config.is_file(), "NSFW classifier {}: no config.json", dir.display());
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            let hint = if dir.join("pytorch_model.bin").is_file() {
                " (only pytorch_model.bin is there: pickled weights are not read; use the repository's \
                 model.safetensors)"
            } else {
                ""
            };
            bail!("NSFW classifier {}: no model.safetensors{hint}", dir.display());
        }
        let cfg = vit::read_config(&config)?;
        let Some(nsfw_index) = cfg.labels.iter().position(|l| l == NSFW_LABEL) else {
            bail!(
                "{}: id2label {:?} has no label `{NSFW_LABEL}`; the NSFW check needs a classifier with one \
                 (Falconsai/nsfw_image_detection: normal, nsfw)",
                config.display(),
                cfg.labels
            );
        };
        let pre = preprocess::for_folder(dir, cfg.image)?;
        let vit = Vit::open(&weights, cfg)?;
        Ok(NsfwClassifier { vit, pre, nsfw_index, dir: dir.to_path_buf() })
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The labels in the model's order (id2label).
    pub fn labels(&self) -> &[String] {
        &self.vit.cfg.labels
    }

    pub fn config(&self) -> &vit::VitConfig {
        &self.vit.cfg
    }

    /// The model's input for an 8-bit RGB image [height, width, 3] (row-major): pixel_values
    /// [3, H, W] as transformers' processor makes them.
    pub fn pixel_values(&self, rgb8: &[u8], width: usize, height: usize) -> Result<Vec<f32>> {
        self.pre.pixel_values(rgb8, width, height, self.vit.cfg.image)
    }

    /// logits [b, labels] of pixel_values [b, 3, H, W].
    pub fn logits(&self, pixel_values: &[f32], b: usize) -> Result<Vec<f32>> {
        self.vit.logits(pixel_values, b)
    }

    /// The probability of each label (softmax of the logits, as the image-classification
    /// pipeline BFL calls applies to a single-label model), in the order of `labels()`.
    pub fn probabilities(&self, rgb8: &[u8], width: usize, height: usize) -> Result<Vec<f32>> {
        let mut probs = self.logits(&self.pixel_values(rgb8, width, height)?, 1)?;
        softmax_in_place(&mut probs);
        Ok(probs)
    }

    /// The probability of the `nsfw` label.
    pub fn nsfw_probability(&self, rgb8: &[u8], width: usize, height: usize) -> Result<f32> {
        Ok(self.probabilities(rgb8, width, height)?[self.nsfw_index])
    }

    /// Some(reason) when the image is flagged (nsfw probability ≥ [`NSFW_THRESHOLD`]), None when it
    /// may be shown.
    pub fn check(&self, rgb8: &[u8], width: usize, height: usize) -> Result<Option<String>> {
        let p = self.nsfw_probability(rgb8, width, height)?;
        Ok(verdict(p))
    }
}

/// The reason an image with nsfw probability `p` is withheld, or None when it is not.
pub fn verdict(p: f32) -> Option<String> {
    // NaN (a broken model) is flagged: an image is shown only when the check says it may be.
    if p >= NSFW_THRESHOLD || p.is_nan() {
        Some(format!("NSFW check: nsfw probability {p:.3} ≥ {NSFW_THRESHOLD} (BFL's threshold); image withheld"))
    } else {
        None
    }
}

/// Black pixels in place of a flagged image, the same size, so that a caller keeps its slot and
/// shape (BFL's demos show a warning instead of the image).
pub fn black_rgb8(width: usize, height: usize) -> Vec<u8> {
    vec![0u8; width * height * 3]
}

/// The NSFW classifier to run, or None, and the one line to print about it: where the check runs
/// from, or (a `warning:` or `note:` line) why it is off and how to turn it on. What `sample`,
/// `serve` and the training previews share.
pub struct NsfwSetting {
    pub classifier: Option<NsfwClassifier>,
    pub status: String,
}

impl NsfwSetting {
    /// The classifier in `dir` (`--nsfw-model`), else `model_root`'s nsfw_classifier/. `check`:
    /// Some(false) turns the check off (with a warning), Some(true) makes a missing classifier an
    /// error, None runs it when weights are found. A folder that is named but cannot be loaded is
    /// an error, never a silent "off".
    pub fn open(dir: Option<&Path>, check: Option<bool>, model_root: Option<&Path>) -> Result<NsfwSetting> {
        if check == Some(false) {
            return Ok(NsfwSetting {
                classifier: None,
                status: "warning: the NSFW check is off (--no-nsfw-check): generated images are not passed through \
                         the classifier BFL's reference code runs on every image"
                    .into(),
            });
        }
        let dir = dir.map(Path::to_path_buf).or_else(|| model_root.and_then(default_folder));
        let Some(dir) = dir else {
            if check == Some(true) {
                bail!(
                    "--nsfw-check: no NSFW classifier; pass --nsfw-model DIR (a download of \
                     Falconsai/nsfw_image_detection) or put it in the model folder as nsfw_classifier/"
                );
            }
            return Ok(NsfwSetting {
                classifier: None,
                status: "note: the NSFW check is off: no classifier weights; to turn it on, download \
                         Falconsai/nsfw_image_detection (config.json, model.safetensors, preprocessor_config.json) \
                         and pass --nsfw-model DIR, or put it in the model folder as nsfw_classifier/"
                    .into(),
            });
        };
        let c = NsfwClassifier::load(&dir)?;
        let status = format!(
            "NSFW check: on ({}); an image with nsfw probability ≥ {NSFW_THRESHOLD} is replaced by a black one",
            dir.display()
        );
        Ok(NsfwSetting { classifier: Some(c), status })
    }
}

/// Where the check's weights come from when no flag names them: the FLUX.1 folder's
/// `nsfw_classifier/` (a copy of Falconsai/nsfw_image_detection placed there). A folder of that
/// name that cannot be loaded is the loader's error, not a silent "off".
pub fn default_folder(model_root: &Path) -> Option<PathBuf> {
    let p = model_root.join("nsfw_classifier");
    p.is_dir().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_at_the_threshold() {
        assert!(verdict(0.85).is_some());
        assert!(verdict(0.849_99).is_none());
        assert!(verdict(f32::NAN).is_some());
        assert!(verdict(0.0).is_none());
    }
}
