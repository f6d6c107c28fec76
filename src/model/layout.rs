//! The two checkpoint layouts, translated to BFL names at the edge.
//!
//! A BFL module maps to one or more diffusers modules whose output rows, concatenated, are the
//! BFL module's rows (q/k/v of a fused qkv; q/k/v/proj_mlp of a single block's linear1), except
//! the final adaLN whose two halves are swapped (BFL shift,scale; diffusers scale,shift).

use crate::model::config::{FluxConfig, ModuleKind};

/// One diffusers module that supplies `rows` consecutive output rows of a BFL module.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub name: String,
    pub rows: usize,
}

/// How a BFL module is stored in diffusers' layout.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusersModule {
    pub parts: Vec<Part>,
    /// Rows are [scale; shift] in diffusers and [shift; scale] in BFL.
    pub swap_halves: bool,
}

/// The diffusers module(s) behind a BFL module, or None for a name that is not a module.
pub fn diffusers_module(bfl: &str, cfg: &FluxConfig) -> Option<DiffusersModule> {
    let h = cfg.hidden_size;
    let one =
        |n: &str, rows: usize| DiffusersModule { parts: vec![Part { name: n.to_string(), rows }], swap_halves: false };
    let fixed = match bfl {
        "img_in" => Some(one("x_embedder", h)),
        "txt_in" => Some(one("context_embedder", h)),
        "time_in.in_layer" => Some(one("time_text_embed.timestep_embedder.linear_1", h)),
        "time_in.out_layer" => Some(one("time_text_embed.timestep_embedder.linear_2", h)),
        "guidance_in.in_layer" => Some(one("time_text_embed.guidance_embedder.linear_1", h)),
        "guidance_in.out_layer" => Some(one("time_text_embed.guidance_embedder.linear_2", h)),
        "vector_in.in_layer" => Some(one("time_text_embed.text_embedder.linear_1", h)),
        "vector_in.out_layer" => Some(one("time_text_embed.text_embedder.linear_2", h)),
        "final_layer.linear" => Some(one("proj_out", cfg.out_channels)),
        "final_layer.adaLN_modulation.1" => {
            Some(DiffusersModule { swap_halves: true, ..one("norm_out.linear", 2 * h) })
        }
        _ => None,
    };
    if fixed.is_some() {
        return fixed;
    }
    let parts = |names: &[(&str, usize)], pre: &str| DiffusersModule {
        parts: names.iter().map(|(n, r)| Part { name: format!("{pre}{n}"), rows: *r }).collect(),
        swap_halves: false,
    };
    if let Some(rest) = bfl.strip_prefix("double_blocks.") {
        let (i, sub) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let pre = format!("transformer_blocks.{i}.");
        let (m, hd) = (cfg.mlp_hidden, cfg.head_dim);
        let r = match sub {
            "img_mod.lin" => parts(&[("norm1.linear", 6 * h)], &pre),
            "txt_mod.lin" => parts(&[("norm1_context.linear", 6 * h)], &pre),
            "img_attn.qkv" => parts(&[("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h)], &pre),
            "txt_attn.qkv" => parts(&[("attn.add_q_proj", h), ("attn.add_k_proj", h), ("attn.add_v_proj", h)], &pre),
            "img_attn.proj" => parts(&[("attn.to_out.0", h)], &pre),
            "txt_attn.proj" => parts(&[("attn.to_add_out", h)], &pre),
            "img_mlp.0" => parts(&[("ff.net.0.proj", m)], &pre),
            "img_mlp.2" => parts(&[("ff.net.2", h)], &pre),
            "txt_mlp.0" => parts(&[("ff_context.net.0.proj", m)], &pre),
            "txt_mlp.2" => parts(&[("ff_context.net.2", h)], &pre),
            "img_attn.norm.query_norm" => parts(&[("attn.norm_q", hd)], &pre),
            "img_attn.norm.key_norm" => parts(&[("attn.norm_k", hd)], &pre),
            "txt_attn.norm.query_norm" => parts(&[("attn.norm_added_q", hd)], &pre),
            "txt_attn.norm.key_norm" => parts(&[("attn.norm_added_k", hd)], &pre),
            _ => return None,
        };
        return Some(r);
    }
    if let Some(rest) = bfl.strip_prefix("single_blocks.") {
        let (i, sub) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let pre = format!("single_transformer_blocks.{i}.");
        let r = match sub {
            "linear1" => {
                parts(&[("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h), ("proj_mlp", cfg.mlp_hidden)], &pre)
            }
            "linear2" => parts(&[("proj_out", h)], &pre),
            "modulation.lin" => parts(&[("norm.linear", 3 * h)], &pre),
            "norm.query_norm" => parts(&[("attn.norm_q", cfg.head_dim)], &pre),
            "norm.key_norm" => parts(&[("attn.norm_k", cfg.head_dim)], &pre),
            _ => return None,
        };
        return Some(r);
    }
    None
}

/// Where a diffusers module lands in BFL terms: the BFL module, the output rows it covers,
/// and whether its halves are swapped relative to BFL.
#[derive(Clone, Debug, PartialEq)]
pub struct BflTarget {
    pub module: String,
    pub rows: std::ops::Range<usize>,
    pub swap_halves: bool,
}

/// Reverse map: every diffusers module name → its place in a BFL module.
pub fn diffusers_to_bfl(cfg: &FluxConfig) -> std::collections::HashMap<String, BflTarget> {
    let mut map = std::collections::HashMap::new();
    for m in cfg.modules() {
        if let Some(d) = diffusers_module(&m.name, cfg) {
            let mut start = 0;
            for p in &d.parts {
                map.insert(
                    p.name.clone(),
                    BflTarget { module: m.name.clone(), rows: start..start + p.rows, swap_halves: d.swap_halves },
                );
                start += p.rows;
            }
        }
    }
    map
}

/// Parameter suffix in diffusers for a BFL parameter suffix: norms store `weight`, not `scale`.
pub fn diffusers_param(kind: ModuleKind, bfl_param: &str) -> &'static str {
    match (kind, bfl_param) {
        (ModuleKind::Norm { .. }, _) => "weight",
        (_, "bias") => "bias",
        _ => "weight",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_maps_and_rows_add_up() {
        let cfg = FluxConfig::flux1_dev();
        let mut n_dif = 0;
        for m in cfg.modules() {
            let d = diffusers_module(&m.name, &cfg).unwrap_or_else(|| panic!("{} unmapped", m.name));
            let rows: usize = d.parts.iter().map(|p| p.rows).sum();
            let want = match m.kind {
                ModuleKind::Linear { d_out, .. } => d_out,
                ModuleKind::Norm { dim } => dim,
            };
            assert_eq!(rows, want, "{}", m.name);
            for _ in &d.parts {
                n_dif += match m.kind {
                    ModuleKind::Linear { bias: true, .. } => 2,
                    _ => 1,
                };
            }
        }
        // docs/flux-model.md §4.4: 1,160 tensors in diffusers' layout.
        assert_eq!(n_dif, 1160);
        let rev = diffusers_to_bfl(&cfg);
        let t = &rev["single_transformer_blocks.3.proj_mlp"];
        assert_eq!((t.module.as_str(), t.rows.clone()), ("single_blocks.3.linear1", 9216..21504));
        assert_eq!(rev["transformer_blocks.0.attn.add_k_proj"].rows, 3072..6144);
        assert!(rev["norm_out.linear"].swap_halves);
    }
}
