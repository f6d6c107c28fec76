//! `flux-kernels info`: architecture, parameter counts, storage, and what each LoRA holds.

use super::args::{AdapterArgs, ModelArgs};
use super::{open_loras, open_model, parse_unknown, ModelSpec};
use crate::adapters::config::{resolve_targets, trainable_summary};
use crate::adapters::export::SCALE_IN_UP_KEY;
use crate::adapters::formats::{LoraFile, UnknownKeys};
use crate::adapters::Kind;
use crate::model::checkpoint::Layout;
use crate::model::config::{FluxConfig, ModuleKind};
use crate::util::thousands;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArgs,
    /// With --rank/--targets: print the trainable-parameter line PEFT prints for the same
    /// adapters on diffusers' FluxTransformer2DModel.
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

/// `flux-kernels info`: the model's description, each LoRA's, and with --rank or --targets the
/// trainable-parameter line.
pub fn main(a: Args) -> Result<()> {
    let m = &a.m;
    print!("{}", run(&m.model, &m.lora, m.rope.rope_axes.as_deref(), parse_unknown(&m.lora_unknown)?)?);
    if a.adapter.rank.is_some() || a.adapter.targets.is_some() {
        let spec = open_model(&m.model, m.rope.rope_axes.as_deref())?;
        let specs = resolve_targets(spec.cfg(), &a.adapter.config()?)?;
        println!("{}", trainable_summary(spec.cfg(), &specs));
    }
    Ok(())
}

pub fn run(model: &str, loras: &[String], rope_axes: Option<&str>, unknown: UnknownKeys) -> Result<String> {
    let spec = open_model(model, rope_axes)?;
    let cfg = spec.cfg().clone();
    let mut s = String::new();
    match &spec {
        ModelSpec::Named(n, _) => writeln!(s, "model: {n} (built-in configuration, no weights)")?,
        ModelSpec::Checkpoint(c) => {
            let layout = match c.layout {
                Layout::Bfl { prefixed: false } => "BFL single file".to_string(),
                Layout::Bfl { prefixed: true } => "BFL single file (keys prefixed model.diffusion_model.)".to_string(),
                Layout::Diffusers => {
                    format!("diffusers transformer folder, {} file(s)", c.files.len())
                }
            };
            writeln!(s, "model: {} ({layout})", c.path.display())?;
        }
    }
    describe_config(&mut s, &cfg)?;
    if let ModelSpec::Checkpoint(c) = &spec {
        let dt: Vec<String> = c.dtype_params.iter().map(|(d, n)| format!("{d} ({} params)", thousands(*n))).collect();
        writeln!(s, "stored dtype: {}", dt.join(", "))?;
        let b = c.bytes_on_disk();
        writeln!(s, "size on disk: {} bytes ({:.2} GiB)", thousands(b), b as f64 / (1u64 << 30) as f64)?;
    }
    for (f, strength) in open_loras(loras, &cfg, unknown)? {
        describe_lora(&mut s, &f, strength)?;
    }
    Ok(s)
}

fn describe_config(s: &mut String, c: &FluxConfig) -> Result<()> {
    writeln!(
        s,
        "architecture: hidden {} = {} heads × {}, MLP {}, {} double + {} single blocks",
        c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden, c.depth, c.depth_single
    )?;
    writeln!(
        s,
        "  inputs: img {} channels, txt {} wide, pooled vector {}, time embedding {}; output {} channels",
        c.in_channels, c.context_in_dim, c.vec_in_dim, c.time_dim, c.out_channels
    )?;
    writeln!(
        s,
        "  guidance embedding: {}, qkv bias: {}, rope axes: {:?} (theta {})",
        if c.guidance_embed { "yes" } else { "no" },
        if c.qkv_bias { "yes" } else { "no" },
        c.rope_axes,
        c.theta
    )?;
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    let mut modulation = 0;
    for (name, shape) in c.tensors() {
        let n: usize = shape.iter().product();
        let kind = if name.starts_with("double_blocks.") {
            "double"
        } else if name.starts_with("single_blocks.") {
            "single"
        } else {
            "other"
        };
        *per.entry(kind).or_default() += n;
        if name.contains("_mod.lin") || name.contains("modulation.lin") || name.contains("adaLN_modulation") {
            modulation += n;
        }
    }
    let total = c.param_count();
    writeln!(s, "parameters: {}", thousands(total))?;
    writeln!(s, "  embedders + final layer: {}", thousands(per.get("other").copied().unwrap_or(0)))?;
    if c.depth > 0 {
        let d = per["double"];
        writeln!(s, "  double blocks: {} × {} = {}", c.depth, thousands(d / c.depth), thousands(d))?;
    }
    if c.depth_single > 0 {
        let d = per["single"];
        writeln!(s, "  single blocks: {} × {} = {}", c.depth_single, thousands(d / c.depth_single), thousands(d))?;
    }
    writeln!(s, "  of which modulation (acts once per sample): {}", thousands(modulation))?;
    let linears = c.modules().iter().filter(|m| matches!(m.kind, ModuleKind::Linear { .. })).count();
    writeln!(s, "  linear modules: {linears}")?;
    Ok(())
}

/// Module names with block indices folded: `double_blocks.*.img_attn.qkv ×19`. Only a number
/// right after a `blocks` segment is a block index (`mlp.0` and `linear_1` stay as they are).
fn fold_targets(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        let mut out = String::new();
        let mut prev_blocks = false;
        for (i, part) in n.split_inclusive(['.', '_']).enumerate() {
            let body = part.trim_end_matches(['.', '_']);
            let is_index = prev_blocks && i > 0 && !body.is_empty() && body.chars().all(|c| c.is_ascii_digit());
            out.push_str(if is_index { "*" } else { body });
            out.push_str(&part[body.len()..]);
            prev_blocks = body.ends_with("blocks");
        }
        *counts.entry(out).or_default() += 1;
    }
    counts.into_iter().map(|(k, n)| if n > 1 { format!("{k} ×{n}") } else { k }).collect()
}

fn describe_lora(s: &mut String, f: &LoraFile, strength: f32) -> Result<()> {
    let formats: Vec<&str> = f.formats.iter().map(|x| x.name()).collect();
    // (rank, alpha) pairs, so a rank reads next to its own alpha.
    let mut pairs: Vec<(usize, String)> = f.modules.values().map(|(r, a)| (*r, format!("{a}"))).collect();
    pairs.sort();
    pairs.dedup();
    writeln!(s, "lora: {} (strength {strength})", f.path.display())?;
    writeln!(s, "  format: {}", formats.join(" + "))?;
    let dora = f.terms.iter().filter(|t| t.is_dora()).count();
    if dora > 0 {
        // Which form the magnitudes have: PEFT's lora_magnitude_vector [out], LyCORIS's dora_scale
        // [out, 1], or [1, in] (per input column).
        let mut forms: Vec<&str> = f
            .keys
            .iter()
            .zip(&f.terms)
            .filter_map(|(k, t)| k.magnitude.as_deref().map(|m| (m, t)))
            .map(|(m, t)| match (m.ends_with(".dora_scale"), t.kind) {
                (true, Kind::DoraColumns { .. }) => "dora_scale per input column",
                (true, _) => "dora_scale",
                _ => "lora_magnitude_vector",
            })
            .collect();
        forms.sort();
        forms.dedup();
        writeln!(
            s,
            "  kind: DoRA ({dora} of {} terms carry a magnitude vector, {})",
            f.terms.len(),
            forms.join(" + ")
        )?;
    }
    for line in describe_lycoris(f) {
        writeln!(s, "  {line}")?;
    }
    let ra: Vec<String> = pairs.iter().map(|(r, a)| format!("rank: {r}, alpha: {a}")).collect();
    writeln!(s, "  {} (from {})", ra.join("; "), f.alpha_source)?;
    // This engine's exports store alpha = rank with the scale in B (docs/adapters.md §1): say what
    // the run trained with, so alpha = rank does not read as a mistake.
    let meta = crate::io::safetensors::SafeTensors::open(&f.path)?.metadata().clone();
    if meta.get(SCALE_IN_UP_KEY).is_some_and(|v| v == "true") {
        let trained = meta.get("flux_kernels.alpha").map_or(String::new(), |a| format!("trained with alpha {a}; "));
        writeln!(s, "  ({trained}the scale is multiplied into lora_B/lora_up, so every loader applies it alike)")?;
    }
    writeln!(s, "  modules: {}, parameters: {}", f.modules.len(), thousands(f.param_count()))?;
    for t in fold_targets(f.modules.keys().cloned()) {
        writeln!(s, "    {t}")?;
    }
    Ok(())
}

/// One line per LyCORIS kind in the file: how many terms, and each distinct shape with its alpha
/// (`kind: LoKr (3 of 3 terms; …): w1 4×4 whole ⊗ w2 8×8 rank 2, alpha 3 (scale 1.5) ×2; …`).
fn describe_lycoris(f: &LoraFile) -> Vec<String> {
    let mut by_kind: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for (t, k) in f.terms.iter().zip(&f.keys) {
        let alpha = match (&k.alpha, t.rank()) {
            (Some(_), r) if r > 0 => format!("alpha {} (scale {})", t.scale * r as f32, t.scale),
            _ => "scale 1".to_string(),
        };
        let shape = match t.kind {
            Kind::Lokr { w1, w2, r1, r2 } => {
                let half = |w: [usize; 2], r: Option<usize>| {
                    let r = r.map_or("whole".to_string(), |r| format!("rank {r}"));
                    format!("{}×{} {r}", w[0], w[1])
                };
                format!("w1 {} ⊗ w2 {}", half(w1, r1), half(w2, r2))
            }
            Kind::Loha { r1, r2 } if r1 == r2 => format!("rank {r1}"),
            Kind::Loha { r1, r2 } => format!("ranks {r1} and {r2}"),
            Kind::Lora { .. } | Kind::Dora { .. } | Kind::DoraColumns { .. } => continue,
        };
        *by_kind.entry(t.kind.name()).or_default().entry(format!("{shape}, {alpha}")).or_default() += 1;
    }
    by_kind
        .into_iter()
        .map(|(kind, shapes)| {
            let n: usize = shapes.values().sum();
            let list: Vec<String> =
                shapes.into_iter().map(|(s, c)| if c > 1 { format!("{s} ×{c}") } else { s }).collect();
            format!("kind: {kind} ({n} of {} terms; CPU engine only): {}", f.terms.len(), list.join("; "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn folds_only_block_indices() {
        let names = [
            "lora_unet_double_blocks_0_img_mlp_0",
            "lora_unet_double_blocks_1_img_mlp_0",
            "transformer.single_transformer_blocks.3.proj_out",
        ];
        let f = super::fold_targets(names.iter().map(|s| s.to_string()));
        assert_eq!(
            f,
            vec!["lora_unet_double_blocks_*_img_mlp_0 ×2", "transformer.single_transformer_blocks.*.proj_out"]
        );
    }
}
