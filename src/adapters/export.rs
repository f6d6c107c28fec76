//! Writing adapters: diffusers/PEFT (the default, what `load_lora_adapter` and
//! `FluxPipeline.load_lora_weights` read) or kohya (BFL names with `.alpha`, what ComfyUI, Forge,
//! sd-scripts and stable-diffusion.cpp read). Every conversion here is exact: fused ↔ split
//! projections duplicate A and split B (or concatenate ranks with a block-diagonal B).
//!
//! **Every file is self-describing**: each term's whole scale (alpha/rank, alpha/√rank with
//! rsLoRA, times any strength) is multiplied into its B (lora_B / lora_up) and the file says
//! alpha = rank (PEFT's `lora_alpha`/`alpha_pattern` in `lora_adapter_metadata`, kohya's
//! `<module>.alpha` tensors). Loaders disagree about where alpha lives (docs/lora-formats.md
//! §3.3): diffusers' `load_lora_adapter(file)` ignores the metadata and ComfyUI and Forge read only
//! `.alpha` tensors, falling back to a scale of 1. With the scale in B every one of those rules
//! gives the same ΔW (tests/loader_rules.rs applies each rule to trained exports). The training
//! alpha stays in the trainer's `flux_kernels.*` metadata; `--resume` reads the checkpoint folder,
//! whose factors are never baked.
//!
//! LyCORIS LoKr and LoHa terms are written in the kohya dialect only, as LyCORIS writes them
//! (`lokr_w1`, `lokr_w2_a`, … `hada_w1_a`, …, `.alpha`), under `lora_unet_<BFL module>` when the
//! term covers its whole module and `lycoris_<diffusers module>` when it covers a part (q, k or v of
//! a fused projection), the names ComfyUI maps for FLUX. Their scale goes into the first factor
//! (`lokr_w1` / `lokr_w1_a`, `hada_w1_a`) and alpha is the rank the scale divides by, so ComfyUI's
//! and LyCORIS's rules both give a scale of 1 (a LoKr with both factors whole gets alpha 1, which
//! both rules ignore for it; LyCORIS's loader needs the tensor).

use super::{Kind, Term};
use crate::io::safetensors::{write_tensors, Dtype, OutTensor};
use crate::model::config::FluxConfig;
use crate::model::layout::diffusers_module;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormatOut {
    Peft,
    Kohya,
}

impl std::str::FromStr for LoraFormatOut {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" | "diffusers" => Ok(LoraFormatOut::Peft),
            // LoKr and LoHa terms are written with LyCORIS's keys in the kohya dialect.
            "kohya" | "lycoris" => Ok(LoraFormatOut::Kohya),
            _ => bail!("--format takes peft (diffusers) or kohya (lycoris: the same), got `{s}`"),
        }
    }
}

/// A named tensor ready to write.
pub type Named = (String, Vec<usize>, Vec<f32>);

/// (A, B, rank, scale) of one term.
type Factors = (Vec<f32>, Vec<f32>, usize, f32);

/// The terms on the same output rows as one: ranks concatenate, each term's scale folded into its
/// block of B, so the result has scale 1 (alpha = total rank). One term is its B times its scale.
fn concat_terms(parts: &[Factors], rows: usize, d_in: usize) -> (Vec<f32>, Vec<f32>, usize) {
    let r_total: usize = parts.iter().map(|p| p.2).sum();
    let mut a = Vec::with_capacity(r_total * d_in);
    let mut b = vec![0f32; rows * r_total];
    let mut off = 0;
    for (pa, pb, r, s) in parts {
        a.extend_from_slice(pa);
        for i in 0..rows {
            for j in 0..*r {
                b[i * r_total + off + j] = pb[i * r + j] * s;
            }
        }
        off += r;
    }
    (a, b, r_total)
}

/// Why DoRA terms cannot be written as they are: DoRA rescales the frozen weight plus its own
/// update, so a DoRA term does not add to another term on the same rows, and a file holds one
/// magnitude per row.
fn dora_not_alone(module: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`{module}` would carry a DoRA term together with other terms on the same rows; DoRA rescales the frozen \
         weight plus its own update, so it does not sum with another adapter exactly: merge the DoRA file alone, \
         or apply the files side by side (--lora A --lora B)"
    )
}

/// diffusers/PEFT tensors and the PEFT config (`lora_adapter_metadata`) describing them. DoRA
/// terms are written as PEFT writes them (`lora_magnitude_vector` [out], `use_dora`), each
/// diffusers module either all DoRA or all LoRA across the file (PEFT's config has one `use_dora`).
pub fn peft_tensors(cfg: &FluxConfig, terms: &[Term]) -> Result<(Vec<Named>, serde_json::Value)> {
    if let Some(t) = terms.iter().find(|t| t.kind.is_lycoris()) {
        bail!(
            "the {} term on `{}` has no diffusers/PEFT LoRA form; write --format kohya (LyCORIS's keys, which ComfyUI \
             loads)",
            t.kind.name(),
            t.module
        );
    }
    if let Some(t) = terms.iter().find(|t| matches!(t.kind, Kind::DoraColumns { .. })) {
        bail!(
            "the DoRA term on `{}` is decomposed per input column (a LyCORIS dora_scale [1, in]), which PEFT's \
             lora_magnitude_vector cannot hold; write --format kohya",
            t.module
        );
    }
    // diffusers module → (rows, [(A, B rows of that module in diffusers order, rank, scale)],
    // magnitude of those rows when the one term is DoRA)
    type Part = (usize, Vec<Factors>, Option<Vec<f32>>);
    let mut by_part: BTreeMap<String, Part> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for t in terms {
        let dm = diffusers_module(&t.module, cfg).ok_or_else(|| anyhow::anyhow!("`{}` is not a module", t.module))?;
        let mut start = 0;
        for p in &dm.parts {
            let pr = start..start + p.rows;
            start += p.rows;
            if pr.end <= t.rows.start || pr.start >= t.rows.end {
                continue;
            }
            if pr.start < t.rows.start || pr.end > t.rows.end {
                bail!("a LoRA term on rows {:?} of `{}` cuts diffusers' `{}` in part", t.rows, t.module, p.name);
            }
            let lo = pr.start - t.rows.start;
            let mut b = t.b()[lo * t.rank()..(lo + p.rows) * t.rank()].to_vec();
            let mut mag = matches!(t.kind, Kind::Dora { .. }).then(|| t.magnitude()[lo..lo + p.rows].to_vec());
            if dm.swap_halves {
                b.rotate_left(p.rows / 2 * t.rank());
                if let Some(m) = mag.as_mut() {
                    m.rotate_left(p.rows / 2);
                }
            }
            let e = by_part.entry(p.name.clone()).or_insert_with(|| {
                order.push(p.name.clone());
                (p.rows, Vec::new(), None)
            });
            if mag.is_some() || e.2.is_some() {
                if !e.1.is_empty() {
                    return Err(dora_not_alone(&p.name));
                }
                e.2 = mag;
            }
            e.1.push((t.a().to_vec(), b, t.rank(), t.scale));
        }
    }
    let dora = order.iter().filter(|n| by_part[*n].2.is_some()).count();
    if dora > 0 && dora < order.len() {
        let lora = order.iter().find(|n| by_part[*n].2.is_none()).expect("some module is LoRA");
        bail!(
            "the terms mix DoRA and plain LoRA modules (`{lora}` is LoRA): PEFT's config has one use_dora for the \
             whole file, so diffusers would rescale the LoRA modules too; write --format kohya, which marks DoRA \
             per module"
        );
    }
    let mut tensors = Vec::new();
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    let mut alphas: BTreeMap<String, f32> = BTreeMap::new();
    for name in &order {
        let (rows, parts, mag) = &by_part[name];
        let d_in = parts[0].0.len() / parts[0].2;
        let (a, b, r) = concat_terms(parts, *rows, d_in);
        // The scale is in B: alpha = rank for every loader (module doc). DoRA's rescale depends on
        // W + s·B·A only, so it is unchanged by moving s into B.
        let alpha = r as f32;
        tensors.push((format!("transformer.{name}.lora_A.weight"), vec![r, d_in], a));
        tensors.push((format!("transformer.{name}.lora_B.weight"), vec![*rows, r], b));
        if let Some(m) = mag {
            tensors.push((format!("transformer.{name}.lora_magnitude_vector"), vec![*rows], m.clone()));
        }
        ranks.insert(name.clone(), r);
        alphas.insert(name.clone(), alpha);
    }
    let mode = |v: Vec<String>| -> String {
        let mut c: BTreeMap<String, usize> = BTreeMap::new();
        v.into_iter().for_each(|x| *c.entry(x).or_default() += 1);
        c.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k).unwrap_or_default()
    };
    let r0: usize = mode(ranks.values().map(|r| r.to_string()).collect()).parse().unwrap_or(1);
    let a0: f32 = mode(alphas.values().map(|a| a.to_string()).collect()).parse().unwrap_or(1.0);
    let rank_pattern: serde_json::Map<String, serde_json::Value> =
        ranks.iter().filter(|(_, &r)| r != r0).map(|(k, &r)| (k.clone(), r.into())).collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> =
        alphas.iter().filter(|(_, &a)| a != a0).map(|(k, &a)| (k.clone(), (a as f64).into())).collect();
    let meta = serde_json::json!({
        "transformer.r": r0,
        "transformer.lora_alpha": a0 as f64,
        "transformer.target_modules": order,
        "transformer.rank_pattern": rank_pattern,
        "transformer.alpha_pattern": alpha_pattern,
        "transformer.lora_dropout": 0.0,
        "transformer.use_rslora": false,
        "transformer.use_dora": dora > 0,
        "transformer.init_lora_weights": true,
        "transformer.bias": "none",
        "transformer.fan_in_fan_out": false,
        "transformer.peft_type": "LORA",
    });
    Ok((tensors, meta))
}

/// The frozen weight's norm per output row of a BFL module (`dora::frozen_row_norms`), from a caller
/// that has the weights: a kohya `dora_scale` covers the whole module, and a row no DoRA term
/// updates keeps its output when its magnitude is that norm (g = 1).
pub type FrozenNorms<'a> = &'a dyn Fn(&str) -> Result<Vec<f32>>;

/// kohya tensors: per BFL module `lora_down` [R, in], `lora_up` [out, R], `alpha`, and for DoRA
/// LyCORIS's `dora_scale` [out, 1] (the form ComfyUI and LyCORIS read for a per-row norm), or
/// [1, in] for a term decomposed per input column.
pub fn kohya_tensors(cfg: &FluxConfig, terms: &[Term], norms: Option<FrozenNorms>) -> Result<Vec<Named>> {
    let d_outs: BTreeMap<String, usize> = cfg
        .modules()
        .into_iter()
        .filter_map(|m| match m.kind {
            crate::model::config::ModuleKind::Linear { d_out, .. } => Some((m.name, d_out)),
            _ => None,
        })
        .collect();
    let mut out = lycoris_tensors(cfg, terms)?;
    let mut by_module: BTreeMap<&str, Vec<&Term>> = BTreeMap::new();
    let mut order = Vec::new();
    for t in terms.iter().filter(|t| !t.kind.is_lycoris()) {
        if !d_outs.contains_key(&t.module) {
            bail!("`{}` is not a linear module", t.module);
        }
        by_module.entry(&t.module).or_insert_with(|| {
            order.push(t.module.as_str());
            Vec::new()
        });
        by_module.get_mut(t.module.as_str()).unwrap().push(t);
    }
    for m in order {
        let ts = &by_module[m];
        let d_out = d_outs[m];
        let d_in = ts[0].d_in;
        let key = format!("lora_unet_{}", m.replace('.', "_"));
        // Block layout over the full output: each term's B, times its scale, sits at its rows and
        // rank columns (one term on every row is just B·scale). alpha = rank (module doc).
        let r: usize = ts.iter().map(|t| t.rank()).sum();
        let mut down = Vec::with_capacity(r * d_in);
        let mut up = vec![0f32; d_out * r];
        let mut off = 0;
        for t in ts {
            down.extend_from_slice(t.a());
            for (i, row) in t.rows.clone().enumerate() {
                for j in 0..t.rank() {
                    up[row * r + off + j] = t.b()[i * t.rank() + j] * t.scale;
                }
            }
            off += t.rank();
        }
        if out.iter().any(|(k, ..)| k.starts_with(&format!("{key}.")))
            || (ts.iter().any(|t| t.is_dora()) && terms.iter().any(|t| t.kind.is_lycoris() && t.module == m))
        {
            return Err(lycoris_not_alone(m));
        }
        let scale = dora_scale(m, ts, d_out, norms)?;
        let scale_shape = match ts[0].kind {
            Kind::DoraColumns { .. } => vec![1, d_in],
            _ => vec![d_out, 1],
        };
        out.push((format!("{key}.lora_down.weight"), vec![r, d_in], down));
        out.push((format!("{key}.lora_up.weight"), vec![d_out, r], up));
        out.push((format!("{key}.alpha"), vec![], vec![r as f32]));
        if let Some(s) = scale {
            out.push((format!("{key}.dora_scale"), scale_shape, s));
        }
    }
    Ok(out)
}

/// Why a LyCORIS term cannot share its module's key: a file holds one adapter kind per key (ComfyUI
/// keeps the last kind it finds under a name), and a DoRA rescale would act on the LyCORIS update too.
fn lycoris_not_alone(module: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`{module}` would carry a LyCORIS (LoKr/LoHa) term together with another adapter under one name; a file holds \
         one kind per module: apply the files side by side (--lora A --lora B)"
    )
}

/// The LoKr and LoHa terms as LyCORIS tensors (module doc): per term its factors, the first times
/// the term's scale, and `alpha` = the rank the scale divides by.
fn lycoris_tensors(cfg: &FluxConfig, terms: &[Term]) -> Result<Vec<Named>> {
    let mut out: Vec<Named> = Vec::new();
    for t in terms.iter().filter(|t| t.kind.is_lycoris()) {
        let dm = diffusers_module(&t.module, cfg).ok_or_else(|| anyhow::anyhow!("`{}` is not a module", t.module))?;
        let d_out: usize = dm.parts.iter().map(|p| p.rows).sum();
        let key = if t.rows == (0..d_out) {
            format!("lora_unet_{}", t.module.replace('.', "_"))
        } else {
            let mut start = 0;
            let part = dm.parts.iter().find(|p| {
                start += p.rows;
                start - p.rows == t.rows.start && start == t.rows.end
            });
            let Some(part) = part else {
                bail!("a {} term on rows {:?} of `{}` is no module of its own", t.kind.name(), t.rows, t.module);
            };
            format!("lycoris_{}", part.name.replace('.', "_"))
        };
        if out.iter().any(|(k, ..)| k.starts_with(&format!("{key}."))) {
            return Err(lycoris_not_alone(&t.module));
        }
        for (i, ((name, shape), p)) in
            t.kind.lycoris_names().into_iter().zip(t.param_shapes()).zip(&t.params).enumerate()
        {
            let v = if i == 0 { p.iter().map(|x| x * t.scale).collect() } else { p.to_vec() };
            out.push((format!("{key}.{name}"), shape, v));
        }
        // A LoKr with both factors whole divides by nothing; both rules then ignore alpha, but
        // LyCORIS's loader needs the tensor (`float(alpha)`): 1.
        out.push((format!("{key}.alpha"), vec![], vec![t.rank().max(1) as f32]));
    }
    Ok(out)
}

/// The `dora_scale` of BFL module `module` from its terms, when they are DoRA: one magnitude per
/// output row. The block layout of the up factor keeps each row's update its own term's, so each
/// row's norm is its term's; a row no term updates (a DoRA term on diffusers' q/k/v leaves the
/// rest of a fused linear) takes its frozen norm from `norms`, and is refused without it. No LoRA
/// term may share the module (its rows would be rescaled too).
fn dora_scale(module: &str, ts: &[&Term], d_out: usize, norms: Option<FrozenNorms>) -> Result<Option<Vec<f32>>> {
    if !ts.iter().any(|t| t.is_dora()) {
        return Ok(None);
    }
    if ts.iter().any(|t| matches!(t.kind, Kind::DoraColumns { .. })) {
        // Per input column: its norms run over the rows it updates, and the file's [1, in] scale
        // over the whole module, so the one term must cover every row alone.
        if ts.len() != 1 || ts[0].rows != (0..d_out) {
            bail!(
                "`{module}`: a DoRA term decomposed per input column must be the module's only term and cover all \
                 {d_out} rows to be written as kohya's dora_scale [1, in]; apply such files side by side \
                 (--lora A --lora B)"
            );
        }
        return Ok(Some(ts[0].magnitude().to_vec()));
    }
    let mut scale = vec![f32::NAN; d_out];
    for t in ts {
        if !matches!(t.kind, Kind::Dora { .. }) || t.rows.clone().any(|row| !scale[row].is_nan()) {
            return Err(dora_not_alone(module));
        }
        scale[t.rows.clone()].copy_from_slice(t.magnitude());
    }
    if let (Some(_), Some(norms)) = (scale.iter().position(|x| x.is_nan()), norms) {
        let frozen = norms(module)?;
        anyhow::ensure!(frozen.len() == d_out, "`{module}`: {} frozen row norms for {d_out} rows", frozen.len());
        scale.iter_mut().zip(frozen).filter(|(s, _)| s.is_nan()).for_each(|(s, f)| *s = f);
    }
    if let Some(row) = scale.iter().position(|x| x.is_nan()) {
        bail!(
            "`{module}`: its DoRA terms leave row {row} of {d_out} without a magnitude, and kohya's dora_scale covers \
             the whole module and the frozen row norms are not known here (give a model file, not a \
             configuration name); or write --format peft, which keeps diffusers' split modules"
        );
    }
    Ok(Some(scale))
}

/// Metadata key saying that every term's scale is multiplied into its up factor and the stored
/// alpha is the rank (files from before the change lack it and keep their own alpha).
pub const SCALE_IN_UP_KEY: &str = "flux_kernels.scale_in_up";

/// Writes `terms` in `format` atomically (scales baked into B, alpha = rank); returns the file
/// size in bytes. `norms`: the frozen row norms, for kohya DoRA modules the terms cover in part.
pub fn write_lora(
    path: &Path,
    cfg: &FluxConfig,
    terms: &[Term],
    format: LoraFormatOut,
    dtype: Dtype,
    mut metadata: BTreeMap<String, String>,
    norms: Option<FrozenNorms>,
) -> Result<u64> {
    metadata.insert(SCALE_IN_UP_KEY.into(), "true".into());
    let tensors = match format {
        LoraFormatOut::Peft => {
            let (t, meta) = peft_tensors(cfg, terms)?;
            metadata.insert("format".into(), "pt".into());
            metadata.insert("lora_adapter_metadata".into(), meta.to_string());
            t
        }
        LoraFormatOut::Kohya => {
            // LyCORIS's kohya wrapper names itself so; loaders read the keys, not this.
            let module = if terms.iter().any(|t| t.kind.is_lycoris()) { "lycoris.kohya" } else { "networks.lora_flux" };
            metadata.insert("ss_network_module".into(), module.into());
            metadata.insert("modelspec.architecture".into(), "flux-1-dev/lora".into());
            kohya_tensors(cfg, terms, norms)?
        }
    };
    let outs: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, s, v)| OutTensor {
            name: n,
            shape: s.clone(),
            data: v,
            // kohya's alpha is stored in the file dtype too; every float dtype holds small ranks exactly.
            dtype,
        })
        .collect();
    write_tensors(path, &outs, &metadata)?;
    Ok(std::fs::metadata(path)?.len())
}
