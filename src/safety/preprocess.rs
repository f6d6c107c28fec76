//! The classifier's input as HF's `ViTImageProcessor` makes it (the PIL backend, which the
//! Falconsai model ships a `preprocessor_config.json` for): resize to the model's size with
//! PIL's BILINEAR filter on the 8-bit image, rescale by 1/255, normalise per channel with
//! mean and std (0.5, 0.5, 0.5), channels first.
//!
//! The resize is PIL's own algorithm (`libImaging/Resample.c`), integer for integer, so the
//! 8-bit image the model sees is the one transformers gives it, bit for bit (tests/nsfw.rs
//! compares every byte at 224² against PIL): a triangle filter whose support widens with the
//! reduction factor (so a downscale averages every source pixel, unlike a plain bilinear
//! sample of 4 neighbours), weights normalised in f64 and rounded to 22-bit fixed point, the
//! horizontal pass first into an 8-bit intermediate (rounded, clipped), then the vertical pass.

use crate::io::read_json;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// PIL's `PRECISION_BITS` for 8-bit images: 32 − 8 − 2.
const PRECISION_BITS: u32 = 22;

/// The largest image side accepted (as io::images::MAX_IMAGE_SIDE for decoded files).
pub const MAX_INPUT_SIDE: usize = 16384;

/// For each output index of one axis: the first source index and the fixed-point weights of
/// the source indices from there (PIL `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct AxisCoeffs {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// PIL's bilinear filter: the triangle 1 − |x| on [−1, 1] (support 1).
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn axis_coeffs(in_size: usize, out_size: usize) -> AxisCoeffs {
    let scale = in_size as f64 / out_size as f64;
    // Reducing: the filter stretches to cover `scale` source pixels per output pixel.
    let filterscale = scale.max(1.0);
    let support = filterscale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero, as `as i64` does; both ends are then clamped.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let w: Vec<f64> = (xmin..xmax).map(|x| triangle((x as f64 - center + 0.5) * ss)).collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&v| {
                let v = if total != 0.0 { v / total } else { v };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                (if v < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    AxisCoeffs { first, weights }
}

/// PIL's `clip8`: the fixed-point sum shifted back to 8 bits, clamped to 0..=255.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((out_w, out_h), Image.BILINEAR)` of an 8-bit RGB image [h, w, 3] (row-major),
/// as Pillow computes it (no `reducing_gap`): [out_h, out_w, 3].
pub fn resize_bilinear_rgb8(rgb: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    assert_eq!(rgb.len(), w * h * 3, "resize: {w}×{h} RGB needs {} bytes", w * h * 3);
    assert!(w > 0 && h > 0 && out_w > 0 && out_h > 0, "resize: empty image");
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width stays, as PIL does): [h, out_w, 3].
    let horizontal = if out_w != w {
        let cx = axis_coeffs(w, out_w);
        let mut tmp = vec![0u8; h * out_w * 3];
        for y in 0..h {
            let row = &rgb[y * w * 3..(y + 1) * w * 3];
            for xx in 0..out_w {
                let (x0, k) = (cx.first[xx], &cx.weights[xx]);
                for c in 0..3 {
                    let acc =
                        k.iter().enumerate().fold(half, |a, (i, &kv)| a + row[(x0 + i) * 3 + c] as i64 * kv as i64);
                    tmp[(y * out_w + xx) * 3 + c] = clip8(acc);
                }
            }
        }
        tmp
    } else {
        rgb.to_vec()
    };
    if out_h == h {
        return horizontal;
    }
    // Vertical pass: [out_h, out_w, 3].
    let cy = axis_coeffs(h, out_h);
    let stride = out_w * 3;
    let mut out = vec![0u8; out_h * stride];
    for yy in 0..out_h {
        let (y0, k) = (cy.first[yy], &cy.weights[yy]);
        for (j, o) in out[yy * stride..(yy + 1) * stride].iter_mut().enumerate() {
            let acc =
                k.iter().enumerate().fold(half, |a, (i, &kv)| a + horizontal[(y0 + i) * stride + j] as i64 * kv as i64);
            *o = clip8(acc);
        }
    }
    out
}

/// The steps of a `ViTImageProcessor`, from the folder's `preprocessor_config.json` or its
/// defaults (which are Falconsai's settings).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// (height, width) to resize to; None: `do_resize` false (the image must already be the
    /// model's size).
    pub resize: Option<(usize, usize)>,
    /// `rescale_factor` (1/255) when `do_rescale`.
    pub rescale: Option<f64>,
    /// (`image_mean`, `image_std`) per channel when `do_normalize`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// PIL's resample code for BILINEAR (`PILImageResampling.BILINEAR`).
const PIL_BILINEAR: u32 = 2;

/// The fields of a `preprocessor_config.json` that are read; the rest (`image_processor_type`,
/// `do_convert_rgb` …) do not change an RGB input.
#[derive(Deserialize)]
struct HfProcessorConfig {
    do_resize: Option<bool>,
    size: Option<HfSize>,
    resample: Option<u32>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    do_center_crop: Option<bool>,
}

#[derive(Deserialize)]
struct HfSize {
    height: Option<usize>,
    width: Option<usize>,
    shortest_edge: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f32),
    Three([f32; 3]),
}

impl PerChannel {
    fn get(&self) -> [f32; 3] {
        match *self {
            PerChannel::One(v) => [v; 3],
            PerChannel::Three(v) => v,
        }
    }
}

impl Preprocess {
    /// `ViTImageProcessor`'s defaults for a model of `(height, width)`: resize there (BILINEAR),
    /// rescale 1/255, normalise with mean = std = 0.5 (IMAGENET_STANDARD_*).
    pub fn vit_default(size: (usize, usize)) -> Preprocess {
        Preprocess { resize: Some(size), rescale: Some(1.0 / 255.0), normalize: Some(([0.5; 3], [0.5; 3])) }
    }

    /// Reads `preprocessor_config.json` (fields missing there take the defaults); anything this
    /// does not implement is an error naming the setting, never a silent difference.
    pub fn from_file(path: &Path, model_size: (usize, usize)) -> Result<Preprocess> {
        let j: HfProcessorConfig = read_json(path)?;
        let src = path.display();
        let mut p = Preprocess::vit_default(model_size);
        ensure!(
            !j.do_center_crop.unwrap_or(false),
            "{src}: do_center_crop is not supported (ViTImageProcessor resizes to the model's size without a crop)"
        );
        if let Some(r) = j.resample {
            ensure!(
                r == PIL_BILINEAR,
                "{src}: resample {r} is not supported; only PIL's BILINEAR (2), ViTImageProcessor's default, is \
                 implemented"
            );
        }
        if j.do_resize == Some(false) {
            p.resize = None;
        } else if let Some(s) = &j.size {
            ensure!(
                s.shortest_edge.is_none(),
                "{src}: size {{\"shortest_edge\": …}} is not supported; expected {{\"height\": H, \"width\": W}}"
            );
            let hw = (s.height.unwrap_or(model_size.0), s.width.unwrap_or(model_size.1));
            ensure!(
                hw == model_size,
                "{src}: size {}×{} (height×width) differs from the model's image_size {}×{}; the model takes only its \
                 own size",
                hw.0,
                hw.1,
                model_size.0,
                model_size.1
            );
            p.resize = Some(hw);
        }
        if j.do_rescale == Some(false) {
            p.rescale = None;
        } else if let Some(f) = j.rescale_factor {
            ensure!(f.is_finite() && f > 0.0, "{src}: rescale_factor {f} must be a positive number");
            p.rescale = Some(f);
        }
        if j.do_normalize == Some(false) {
            p.normalize = None;
        } else {
            let (mut mean, mut std) = p.normalize.unwrap_or(([0.5; 3], [0.5; 3]));
            if let Some(m) = &j.image_mean {
                mean = m.get();
            }
            if let Some(s) = &j.image_std {
                std = s.get();
            }
            ensure!(
                mean.iter().chain(&std).all(|v| v.is_finite()) && std.iter().all(|&s| s != 0.0),
                "{src}: image_mean {mean:?} / image_std {std:?}: finite values and a nonzero std are needed"
            );
            p.normalize = Some((mean, std));
        }
        Ok(p)
    }

    /// pixel_values [3, H, W] of an 8-bit RGB image [h, w, 3] (row-major), `model_size` the
    /// (H, W) the model takes.
    pub fn pixel_values(&self, rgb8: &[u8], w: usize, h: usize, model_size: (usize, usize)) -> Result<Vec<f32>> {
        ensure!(w > 0 && h > 0, "NSFW check: empty image ({w}×{h})");
        ensure!(
            w <= MAX_INPUT_SIDE && h <= MAX_INPUT_SIDE,
            "NSFW check: {w}×{h} image; at most {MAX_INPUT_SIDE} pixels a side"
        );
        ensure!(
            rgb8.len() == w * h * 3,
            "NSFW check: {} bytes for a {w}×{h} RGB image (expected {}: 8-bit RGB, row-major)",
            rgb8.len(),
            w * h * 3
        );
        let (mh, mw) = model_size;
        let resized;
        let pixels = match self.resize {
            Some((rh, rw)) if (rw, rh) != (w, h) => {
                resized = resize_bilinear_rgb8(rgb8, w, h, rw, rh);
                &resized
            }
            Some(_) => rgb8,
            None if (w, h) == (mw, mh) => rgb8,
            None => bail!(
                "NSFW check: the classifier's preprocessor_config.json turns resizing off, and the image is {w}×{h}, \
                 not the model's {mw}×{mh}"
            ),
        };
        let mut out = vec![0f32; 3 * mh * mw];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                // As transformers: rescale in f64, stored as f32, normalised in f32.
                let mut x = self.rescale.map_or(v as f32, |f| (v as f64 * f) as f32);
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * mh * mw + i] = x;
            }
        }
        Ok(out)
    }
}

/// The preprocessing of a classifier folder: its `preprocessor_config.json`, else the defaults.
pub fn for_folder(dir: &Path, model_size: (usize, usize)) -> Result<Preprocess> {
    let p = dir.join("preprocessor_config.json");
    if p.is_file() {
        Preprocess::from_file(&p, model_size).with_context(|| format!("{}: cannot use it", p.display()))
    } else {
        Ok(Preprocess::vit_default(model_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_a_flat_image_flat_and_an_identity_is_a_copy() {
        let flat = vec![77u8; 13 * 9 * 3];
        assert!(resize_bilinear_rgb8(&flat, 13, 9, 224, 224).iter().all(|&v| v == 77));
        assert!(resize_bilinear_rgb8(&flat, 13, 9, 3, 2).iter().all(|&v| v == 77));
        let img: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 29 % 256) as u8).collect();
        assert_eq!(resize_bilinear_rgb8(&img, 5, 4, 5, 4), img);
    }

    #[test]
    fn halving_widens_the_triangle() {
        // 4 → 2 columns: scale 2, so the triangle spans 2 source pixels each side. Output 0 is
        // centred at 1.0 and weighs sources 0..3 as triangle((x − 0.5)/2) = (¾, ¾, ¼), normalised
        // to (3, 3, 1)/7: 600/7 = 85.7 → 86. Output 1 (centre 3): sources 1..4 as (1, 3, 3)/7:
        // 800/7 = 114.3 → 114. PIL gives [86, 114] (Image.fromarray(row).resize((2, 1), BILINEAR)).
        let row: Vec<u8> = [0u8, 200, 0, 200].iter().flat_map(|&v| [v, v, v]).collect();
        let out = resize_bilinear_rgb8(&row, 4, 1, 2, 1);
        assert_eq!(out, vec![86, 86, 86, 114, 114, 114]);
    }

    #[test]
    fn pixel_values_rescale_and_normalise() {
        let p = Preprocess::vit_default((1, 2));
        let v = p.pixel_values(&[0, 255, 51, 255, 0, 102], 2, 1, (1, 2)).unwrap();
        // Channels first: R of both pixels, then G, then B; (v/255 − 0.5)/0.5.
        let want = [-1.0f32, 1.0, 1.0, -1.0, -0.6, -0.2];
        assert!(v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{v:?}");
        let e = p.pixel_values(&[0; 5], 2, 1, (1, 2)).unwrap_err().to_string();
        assert!(e.contains("5 bytes"), "{e}");
    }
}
