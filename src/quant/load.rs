//! Reading quantised weights from a checkpoint: the codes tensor `X.weight` (I8 or F8_E4M3)
//! and its scale companion, under our name `X.weight_scale` or ComfyUI's older `X.scale_weight`.

use super::scheme::{Code, Scale};
use super::stored::{Codes, QPiece};
use crate::io::safetensors::SafeTensors;
use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::sync::Arc;

/// The keys a weight's scale may be stored under.
pub fn scale_keys(weight_key: &str) -> [String; 2] {
    let module = weight_key.strip_suffix(".weight").unwrap_or(weight_key);
    [format!("{module}.weight_scale"), format!("{module}.scale_weight")]
}

/// Keys of scaled-fp8 files that describe fp8 *matmuls* (activation scales, ComfyUI's
/// `scaled_fp8` marker). The weights are dequantised to f32/bf16 here, so they do not apply
/// and are passed over rather than refused.
pub fn is_ignored_companion(key: &str) -> bool {
    key == "scaled_fp8"
        || key.ends_with(".scaled_fp8")
        || key.ends_with(".input_scale")
        || key.ends_with(".scale_input")
}

/// One stored 8-bit weight tensor as a piece of a parameter: rows `rows` of `key` in `file`,
/// with its scale found through `lookup` (the file holding a key, for sharded folders).
/// Returns the piece and the scale key it used, if any.
pub fn piece(
    file: &SafeTensors,
    key: &str,
    rows: Range<usize>,
    lookup: &dyn Fn(&str) -> Option<SafeTensors>,
) -> Result<(QPiece, Option<String>)> {
    let info = file.info(key).with_context(|| format!("{}: no tensor `{key}`", file.path().display()))?;
    let code = Code::from_dtype(info.dtype).with_context(|| format!("tensor `{key}` is not 8-bit"))?;
    let found: Vec<(String, SafeTensors)> =
        scale_keys(key).into_iter().filter_map(|k| lookup(&k).map(|f| (k, f))).collect();
    let (scale, used) = match found.as_slice() {
        [] if code == Code::I8 => bail!(
            "{}: int8 weight `{key}` has no scale tensor `{}` (int8 codes mean nothing without it)",
            file.path().display(),
            scale_keys(key)[0]
        ),
        [] => (Scale::None, None),
        [(k, f)] => (read_scale(f, k, info.shape[0])?, Some(k.clone())),
        _ => bail!("{}: weight `{key}` has two scales, `{}` and `{}`", file.path().display(), found[0].0, found[1].0),
    };
    let codes = Codes::Mapped { file: file.clone(), key: key.to_string() };
    Ok((QPiece { code, codes, rows, scale: Arc::new(scale) }, used))
}

/// A scale tensor: [] or [1] per tensor, [rows] per output channel; finite and not negative.
fn read_scale(file: &SafeTensors, key: &str, rows: usize) -> Result<Scale> {
    let at = || format!("{}: scale tensor `{key}`", file.path().display());
    let (shape, v) = file.read_f32(key).with_context(at)?;
    if let Some(x) = v.iter().find(|x| !x.is_finite() || **x < 0.0) {
        bail!("{}: holds {x}; scales must be finite and not negative", at());
    }
    match shape.as_slice() {
        [] | [1] => Ok(Scale::Tensor(v[0])),
        [n] if *n == rows => Ok(Scale::Rows(v)),
        _ => bail!("{}: shape {shape:?}; expected [] or [1] (per tensor) or [{rows}] (per output row)", at()),
    }
}
