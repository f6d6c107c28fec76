//! Opening the autoencoder in either layout: BFL's `ae.safetensors` (config inferred from the shapes)
//! or a diffusers `AutoencoderKL` folder (config.json). The model only ever sees BFL names; diffusers
//! names are translated here (docs/flux-model.md §8.3, diffusers
//! `convert_ldm_vae_checkpoint`). Every tensor is checked (present, expected, shape, float dtype)
//! before any is converted.

use super::{AutoEncoder, VaeConfig, FLUX_GROUPS, FLUX_SCALE_FACTOR, FLUX_SHIFT_FACTOR};
use crate::io::read_json;
use crate::io::safetensors::{Dtype, SafeTensors};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The diffusers weights file inside an `AutoencoderKL` folder.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

pub fn open(path: &Path) -> Result<AutoEncoder> {
    if path.is_dir() {
        let sub = path.join("vae");
        let dir = if sub.join("config.json").exists() { sub } else { path.to_path_buf() };
        open_diffusers(&dir)
    } else if path.exists() {
        open_bfl(path)
    } else {
        bail!("autoencoder path {} does not exist", path.display())
    }
}

/// The diffusers name of a BFL autoencoder parameter (`levels` = number of resolution levels, for the
/// reversed `up` index).
pub fn diffusers_name(bfl: &str, levels: usize) -> String {
    let p: Vec<&str> = bfl.split('.').collect();
    let rest = |from: usize| p[from..].join(".");
    let (part, sub) = (p[0], p.get(1).copied().unwrap_or(""));
    let mapped = match sub {
        "down" if p.len() > 4 && p[3] == "block" => {
            format!("down_blocks.{}.resnets.{}.{}", p[2], p[4], resnet_leaf(&rest(5)))
        }
        "down" if p.len() > 3 && p[3] == "downsample" => format!("down_blocks.{}.downsamplers.0.{}", p[2], rest(4)),
        "up" if p.len() > 4 => {
            let k: usize = p[2].parse().unwrap_or(usize::MAX);
            let i = levels.checked_sub(1).and_then(|l| l.checked_sub(k)).map_or(p[2].to_string(), |i| i.to_string());
            match p[3] {
                "block" => format!("up_blocks.{i}.resnets.{}.{}", p[4], resnet_leaf(&rest(5))),
                "upsample" => format!("up_blocks.{i}.upsamplers.0.{}", rest(4)),
                _ => rest(1),
            }
        }
        "mid" if p.len() > 3 => match p[2] {
            "block_1" => format!("mid_block.resnets.0.{}", resnet_leaf(&rest(3))),
            "block_2" => format!("mid_block.resnets.1.{}", resnet_leaf(&rest(3))),
            "attn_1" => {
                let m = match p[3] {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    other => other,
                };
                format!("mid_block.attentions.0.{m}.{}", rest(4))
            }
            _ => rest(1),
        },
        "norm_out" => format!("conv_norm_out.{}", rest(2)),
        _ => rest(1),
    };
    format!("{part}.{mapped}")
}

fn resnet_leaf(s: &str) -> String {
    s.replacen("nin_shortcut", "conv_shortcut", 1)
}

/// The 1×1 attention projections, which BFL stores as convs [c, c, 1, 1] and diffusers as Linear [c, c].
fn is_attn_projection(bfl: &str) -> bool {
    bfl.contains(".mid.attn_1.") && bfl.ends_with(".weight") && !bfl.contains(".attn_1.norm.")
}

fn list_some(names: &[String]) -> String {
    let mut s = names.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s += &format!(" and {} more", names.len() - 5);
    }
    s
}

/// Checks every tensor the config needs against the file (stored under `stored_name(bfl)`), then builds
/// the model from it.
fn load_checked(file: &SafeTensors, cfg: VaeConfig, stored_name: &dyn Fn(&str) -> String) -> Result<AutoEncoder> {
    let path = file.path().display().to_string();
    check_bounds(&cfg).with_context(|| path.clone())?;
    cfg.validate().with_context(|| path.clone())?;
    let mut unused: BTreeSet<&String> = file.tensors().keys().collect();
    let mut missing = Vec::new();
    let mut keys = BTreeMap::new();
    for (name, shape) in cfg.tensors() {
        let key = stored_name(&name);
        let Some(info) = file.info(&key) else {
            missing.push(key);
            continue;
        };
        unused.remove(&key);
        let squeezed = is_attn_projection(&name) && info.shape == shape[..2];
        if info.shape != shape && !squeezed {
            bail!("{path}: tensor `{key}` has shape {:?}, expected {:?}", info.shape, shape);
        }
        if !matches!(info.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            bail!(
                "{path}: tensor `{key}` has dtype {}; autoencoder weights must be BF16, F16 or F32",
                info.dtype.name()
            );
        }
        keys.insert(name, key);
    }
    if !missing.is_empty() {
        bail!("{path}: missing tensors {} (config {cfg:?})", list_some(&missing));
    }
    if !unused.is_empty() {
        let extra: Vec<String> = unused.into_iter().cloned().collect();
        bail!("{path}: unexpected tensors {}", list_some(&extra));
    }
    let get = |name: &str, _shape: &[usize]| -> Result<Vec<f32>> {
        let key = keys.get(name).with_context(|| format!("{path}: no tensor for `{name}`"))?;
        Ok(file.read_f32(key)?.1)
    };
    AutoEncoder::from_params(cfg, &get)
}

/// The largest channel count of any level: FLUX's autoencoder has 512. Sizes come from a
/// config.json or from shapes, so they are bounded before the tensor list is built from them.
const MAX_CHANNELS: usize = 1 << 16;
/// Resolution levels (FLUX: 4; each halves the image) and ResnetBlocks per level (FLUX: 2).
const MAX_LEVELS: usize = 16;
const MAX_RES_BLOCKS: usize = 64;

fn check_bounds(cfg: &VaeConfig) -> Result<()> {
    if cfg.levels() > MAX_LEVELS || cfg.num_res_blocks > MAX_RES_BLOCKS {
        bail!(
            "autoencoder with {} levels of {} ResnetBlocks: at most {MAX_LEVELS} levels of {MAX_RES_BLOCKS} are \
             supported (FLUX: 4 of 2)",
            cfg.levels(),
            cfg.num_res_blocks
        );
    }
    let widest = cfg.ch_mult.iter().map(|&m| cfg.ch.checked_mul(m)).try_fold(cfg.ch, |a, c| c.map(|c| a.max(c)));
    for (name, v) in [
        ("channels", widest.unwrap_or(usize::MAX)),
        ("in_channels", cfg.in_channels),
        ("z_channels", cfg.z_channels),
        ("norm_num_groups", cfg.groups),
    ] {
        if v > MAX_CHANNELS {
            bail!("autoencoder {name} {v}: at most {MAX_CHANNELS} are supported (FLUX: 512 channels, 16 latent)");
        }
    }
    Ok(())
}

fn open_bfl(path: &Path) -> Result<AutoEncoder> {
    let file = SafeTensors::open(path)?;
    if file.tensors().keys().any(|k| k.starts_with("encoder.down_blocks.") || k.starts_with("decoder.up_blocks.")) {
        bail!(
            "{}: this is a diffusers-layout autoencoder; pass the folder holding it with its config.json",
            path.display()
        );
    }
    let cfg =
        infer_bfl_config(&file).with_context(|| format!("{}: cannot infer the autoencoder config", path.display()))?;
    load_checked(&file, cfg, &|n| n.to_string())
}

/// The config of a BFL file from its shapes; GroupNorm groups and the latent scale/shift are invisible
/// in shapes, so they come from `__metadata__` (`norm_num_groups`, `scale_factor`, `shift_factor`) or
/// default to FLUX's.
fn infer_bfl_config(file: &SafeTensors) -> Result<VaeConfig> {
    let shape = |n: &str| -> Result<Vec<usize>> {
        let s = file.info(n).map(|i| i.shape.clone()).with_context(|| format!("missing tensor `{n}`"))?;
        if s.len() != 4 {
            bail!("tensor `{n}` has shape {s:?}, expected a 4-D conv weight");
        }
        Ok(s)
    };
    let conv_in = shape("encoder.conv_in.weight")?;
    let (ch, in_channels) = (conv_in[0], conv_in[1]);
    let mut ch_mult = Vec::new();
    while file.info(&format!("encoder.down.{}.block.0.conv2.weight", ch_mult.len())).is_some() {
        let name = format!("encoder.down.{}.block.0.conv2.weight", ch_mult.len());
        let c = shape(&name)?[0];
        if ch == 0 || !c.is_multiple_of(ch) {
            bail!("tensor `{name}`: {c} channels are not a multiple of conv_in's {ch}");
        }
        ch_mult.push(c / ch);
    }
    if ch_mult.is_empty() {
        bail!("missing tensor `encoder.down.0.block.0.conv2.weight`");
    }
    let mut num_res_blocks = 0;
    while file.info(&format!("encoder.down.0.block.{num_res_blocks}.conv1.weight")).is_some() {
        num_res_blocks += 1;
    }
    let z_channels = shape("decoder.conv_in.weight")?[1];
    let meta = |k: &str| file.metadata().get(k);
    let groups = match meta("norm_num_groups") {
        Some(s) => s.trim().parse().with_context(|| format!("metadata norm_num_groups `{s}` is not an integer"))?,
        None => FLUX_GROUPS,
    };
    let float = |k: &str, default: f32| -> Result<f32> {
        match meta(k) {
            Some(s) => s.trim().parse().with_context(|| format!("metadata {k} `{s}` is not a number")),
            None => Ok(default),
        }
    };
    Ok(VaeConfig {
        in_channels,
        ch,
        ch_mult,
        num_res_blocks,
        z_channels,
        scale_factor: float("scale_factor", FLUX_SCALE_FACTOR)?,
        shift_factor: float("shift_factor", FLUX_SHIFT_FACTOR)?,
        groups,
    })
}

fn open_diffusers(dir: &Path) -> Result<AutoEncoder> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        bail!("cannot read {} (a diffusers AutoencoderKL folder needs one)", cfg_path.display());
    }
    let cfg = diffusers_config(read_json(&cfg_path)?).with_context(|| format!("{}", cfg_path.display()))?;
    let weights = dir.join(DIFFUSERS_WEIGHTS);
    if !weights.exists() {
        bail!(
            "{}: no {DIFFUSERS_WEIGHTS} beside config.json (only safetensors weights are read; convert a .bin first)",
            dir.display()
        );
    }
    let file = SafeTensors::open(&weights)?;
    let levels = cfg.levels();
    load_checked(&file, cfg, &|n| diffusers_name(n, levels))
}

/// The fields of a diffusers `AutoencoderKL` config.json that are read; absent (or null) ones take
/// diffusers' defaults.
#[derive(Deserialize)]
struct DiffusersVaeConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    act_fn: Option<String>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
    layers_per_block: Option<usize>,
    latent_channels: Option<usize>,
    norm_num_groups: Option<usize>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
}

/// VaeConfig from an `AutoencoderKL` config.json, with diffusers' own defaults for absent keys; the
/// features FLUX's autoencoder does not have (quant convs, other block types, no mid attention) are
/// errors rather than silently ignored.
fn diffusers_config(j: DiffusersVaeConfig) -> Result<VaeConfig> {
    let class = j.class_name.as_deref().unwrap_or("AutoencoderKL");
    if class != "AutoencoderKL" {
        bail!("_class_name is `{class}`, expected `AutoencoderKL`");
    }
    let boc = j.block_out_channels.context("missing `block_out_channels`")?;
    let ch = *boc.first().context("`block_out_channels` is empty")?;
    if ch == 0 || boc.iter().any(|&c| !c.is_multiple_of(ch)) {
        bail!("`block_out_channels` {boc:?} must be multiples of the first entry");
    }
    for (key, types, want) in [
        ("down_block_types", &j.down_block_types, "DownEncoderBlock2D"),
        ("up_block_types", &j.up_block_types, "UpDecoderBlock2D"),
    ] {
        let types = types.as_ref().with_context(|| format!("missing `{key}`"))?;
        if types.len() != boc.len() || types.iter().any(|t| t != want) {
            bail!("`{key}` must be {} × \"{want}\" (one per block_out_channels entry)", boc.len());
        }
    }
    if let Some(act) = j.act_fn.as_deref().filter(|&a| a != "silu") {
        bail!("`act_fn` is `{act}`; the FLUX autoencoder uses silu");
    }
    if j.use_quant_conv.unwrap_or(true) || j.use_post_quant_conv.unwrap_or(true) {
        bail!("`use_quant_conv` / `use_post_quant_conv` are set: not a FLUX autoencoder (FLUX has no quant convs)");
    }
    if !j.mid_block_add_attention.unwrap_or(true) {
        bail!("`mid_block_add_attention` is false: the FLUX autoencoder has a mid attention block");
    }
    let in_channels = j.in_channels.unwrap_or(3);
    let out_channels = j.out_channels.unwrap_or(3);
    if in_channels != out_channels {
        bail!("`in_channels` {in_channels} ≠ `out_channels` {out_channels}: the autoencoder maps images to images");
    }
    Ok(VaeConfig {
        in_channels,
        ch,
        ch_mult: boc.iter().map(|&c| c / ch).collect(),
        num_res_blocks: j.layers_per_block.unwrap_or(1),
        z_channels: j.latent_channels.unwrap_or(4),
        // diffusers' defaults for the scale (SD's 0.18215) and a missing shift (none); FLUX's config sets both.
        scale_factor: j.scaling_factor.map_or(0.18215, |x| x as f32),
        shift_factor: j.shift_factor.map_or(0.0, |x| x as f32),
        groups: j.norm_num_groups.unwrap_or(32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_config_counts_match_the_reference() {
        // docs/flux-model.md §8.3: 244 tensors, 83,819,683 parameters.
        let t = VaeConfig::flux().tensors();
        assert_eq!(t.len(), 244);
        let n: usize = t.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(n, 83_819_683);
        let enc: usize =
            t.iter().filter(|(k, _)| k.starts_with("encoder.")).map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(enc, 34_274_208);
    }

    #[test]
    fn diffusers_names() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            ("encoder.down.1.block.0.nin_shortcut.bias", "encoder.down_blocks.1.resnets.0.conv_shortcut.bias"),
            ("encoder.down.2.block.1.norm2.weight", "encoder.down_blocks.2.resnets.1.norm2.weight"),
            ("encoder.down.0.downsample.conv.weight", "encoder.down_blocks.0.downsamplers.0.conv.weight"),
            ("encoder.mid.block_1.conv1.weight", "encoder.mid_block.resnets.0.conv1.weight"),
            ("decoder.mid.block_2.norm1.bias", "decoder.mid_block.resnets.1.norm1.bias"),
            ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight"),
            ("decoder.mid.attn_1.proj_out.bias", "decoder.mid_block.attentions.0.to_out.0.bias"),
            ("encoder.mid.attn_1.q.weight", "encoder.mid_block.attentions.0.to_q.weight"),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
            ("decoder.up.3.block.2.conv1.weight", "decoder.up_blocks.0.resnets.2.conv1.weight"),
            ("decoder.up.1.upsample.conv.bias", "decoder.up_blocks.2.upsamplers.0.conv.bias"),
            ("decoder.up.0.block.0.nin_shortcut.weight", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"),
            ("decoder.conv_out.bias", "decoder.conv_out.bias"),
        ];
        for (bfl, dif) in cases {
            assert_eq!(diffusers_name(bfl, 4), dif, "{bfl}");
        }
        // One-to-one over the whole FLUX tree.
        let names: BTreeSet<String> = VaeConfig::flux().tensors().iter().map(|(n, _)| diffusers_name(n, 4)).collect();
        assert_eq!(names.len(), 244);
    }
}
