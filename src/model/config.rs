//! Hyper-parameters of a FLUX transformer, and the list of modules and tensors they imply.
//!
//! Names are BFL's (`double_blocks.N.img_attn.qkv`): the model speaks one vocabulary and the
//! diffusers layout and LoRA dialects are translated at the edge (`io/`).

use crate::util::count_indexed_blocks;
use anyhow::{bail, Context, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Packed latent channels (16 latent channels × 2×2 patch = 64 for FLUX.1).
    pub in_channels: usize,
    pub out_channels: usize,
    /// T5 hidden width (4096).
    pub context_in_dim: usize,
    /// CLIP pooled width (768).
    pub vec_in_dim: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub mlp_hidden: usize,
    pub depth: usize,
    pub depth_single: usize,
    /// Width of the sinusoidal timestep/guidance embedding (256).
    pub time_dim: usize,
    pub guidance_embed: bool,
    pub qkv_bias: bool,
    /// RoPE head-dim split over the three position axes; sums to head_dim.
    pub rope_axes: Vec<usize>,
    pub theta: f64,
}

impl FluxConfig {
    /// FLUX.1-dev (BFL `configs["flux-dev"]`).
    pub fn flux1_dev() -> FluxConfig {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            context_in_dim: 4096,
            vec_in_dim: 768,
            hidden_size: 3072,
            num_heads: 24,
            head_dim: 128,
            mlp_hidden: 12288,
            depth: 19,
            depth_single: 38,
            time_dim: 256,
            guidance_embed: true,
            qkv_bias: true,
            rope_axes: vec![16, 56, 56],
            theta: 10_000.0,
        }
    }

    /// The built-in demo's model (hidden 64, 4 heads of 16, MLP 256, 2 + 2 blocks): `random:tiny`
    /// runs anywhere.
    pub fn tiny() -> FluxConfig {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            context_in_dim: 32,
            vec_in_dim: 16,
            hidden_size: 64,
            num_heads: 4,
            head_dim: 16,
            mlp_hidden: 256,
            depth: 2,
            depth_single: 2,
            time_dim: 256,
            guidance_embed: true,
            qkv_bias: true,
            rope_axes: vec![4, 6, 6],
            theta: 10_000.0,
        }
    }

    /// A named built-in configuration.
    pub fn named(name: &str) -> Option<FluxConfig> {
        match name {
            "flux1-dev" => Some(Self::flux1_dev()),
            "flux1-schnell" => Some(FluxConfig { guidance_embed: false, ..Self::flux1_dev() }),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// Checks the sizes against each other and against sane bounds, with checked arithmetic: a
    /// config comes from untrusted files (shapes, config.json) and flags, and release builds do
    /// not trap on overflow.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("context_in_dim", self.context_in_dim),
            ("vec_in_dim", self.vec_in_dim),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("mlp_hidden", self.mlp_hidden),
            ("time_dim", self.time_dim),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_WIDTH {
                bail!("{name} = {v}: must be between 1 and {MAX_WIDTH}");
            }
        }
        // Packed latents: 2×2 patches of the VAE's channels (16 × 4 = 64 for FLUX.1).
        if !self.in_channels.is_multiple_of(4) || !self.out_channels.is_multiple_of(4) {
            bail!(
                "in/out channels {}/{}: must be multiples of 4 (2×2 patches of latent channels)",
                self.in_channels,
                self.out_channels
            );
        }
        for (name, v) in [("double blocks", self.depth), ("single blocks", self.depth_single)] {
            if v > MAX_BLOCKS {
                bail!("{v} {name}: at most {MAX_BLOCKS} are supported (FLUX.1 has 19 + 38)");
            }
        }
        if self.depth + self.depth_single == 0 {
            bail!("no double or single blocks");
        }
        if self.num_heads.checked_mul(self.head_dim) != Some(self.hidden_size) {
            bail!("heads {} × head dim {} != hidden size {}", self.num_heads, self.head_dim, self.hidden_size);
        }
        check_rope_axes(&self.rope_axes, self.head_dim)
    }

    /// Every module of the model in BFL names, in checkpoint order.
    pub fn modules(&self) -> Vec<Module> {
        let (h, m) = (self.hidden_size, self.mlp_hidden);
        let mut v = Vec::new();
        let lin = |v: &mut Vec<Module>, name: String, d_out, d_in, bias| {
            v.push(Module { name, kind: ModuleKind::Linear { d_out, d_in, bias } })
        };
        let norm = |v: &mut Vec<Module>, name: String, dim| v.push(Module { name, kind: ModuleKind::Norm { dim } });
        lin(&mut v, "img_in".into(), h, self.in_channels, true);
        lin(&mut v, "txt_in".into(), h, self.context_in_dim, true);
        lin(&mut v, "time_in.in_layer".into(), h, self.time_dim, true);
        lin(&mut v, "time_in.out_layer".into(), h, h, true);
        if self.guidance_embed {
            lin(&mut v, "guidance_in.in_layer".into(), h, self.time_dim, true);
            lin(&mut v, "guidance_in.out_layer".into(), h, h, true);
        }
        lin(&mut v, "vector_in.in_layer".into(), h, self.vec_in_dim, true);
        lin(&mut v, "vector_in.out_layer".into(), h, h, true);
        for i in 0..self.depth {
            for s in ["img", "txt"] {
                let p = format!("double_blocks.{i}.{s}");
                lin(&mut v, format!("{p}_mod.lin"), 6 * h, h, true);
                lin(&mut v, format!("{p}_attn.qkv"), 3 * h, h, self.qkv_bias);
                norm(&mut v, format!("{p}_attn.norm.query_norm"), self.head_dim);
                norm(&mut v, format!("{p}_attn.norm.key_norm"), self.head_dim);
                lin(&mut v, format!("{p}_attn.proj"), h, h, true);
                lin(&mut v, format!("{p}_mlp.0"), m, h, true);
                lin(&mut v, format!("{p}_mlp.2"), h, m, true);
            }
        }
        for i in 0..self.depth_single {
            let p = format!("single_blocks.{i}");
            lin(&mut v, format!("{p}.linear1"), 3 * h + m, h, true);
            lin(&mut v, format!("{p}.linear2"), h, h + m, true);
            norm(&mut v, format!("{p}.norm.query_norm"), self.head_dim);
            norm(&mut v, format!("{p}.norm.key_norm"), self.head_dim);
            lin(&mut v, format!("{p}.modulation.lin"), 3 * h, h, true);
        }
        lin(&mut v, "final_layer.adaLN_modulation.1".into(), 2 * h, h, true);
        lin(&mut v, "final_layer.linear".into(), self.out_channels, h, true);
        v
    }

    /// Every checkpoint tensor in BFL names with its shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for m in self.modules() {
            match m.kind {
                ModuleKind::Linear { d_out, d_in, bias } => {
                    out.push((format!("{}.weight", m.name), vec![d_out, d_in]));
                    if bias {
                        out.push((format!("{}.bias", m.name), vec![d_out]));
                    }
                }
                ModuleKind::Norm { dim } => out.push((format!("{}.scale", m.name), vec![dim])),
            }
        }
        out
    }

    /// Saturating: a validated config is far below the bound, but the count is also printed for
    /// configs that are not (yet) validated.
    pub fn param_count(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().fold(1usize, |a, &d| a.saturating_mul(d)))
            .fold(0, usize::saturating_add)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    pub name: String,
    pub kind: ModuleKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ModuleKind {
    Linear { d_out: usize, d_in: usize, bias: bool },
    Norm { dim: usize },
}

/// The largest width (hidden size, MLP width, channels …) a config may have: FLUX.1's largest is
/// 12,288 (the MLP); 2^20 leaves room for any variant while keeping every product of two widths
/// (a weight's element count) far from overflow.
pub const MAX_WIDTH: usize = 1 << 20;

/// The most blocks of each kind: FLUX.1 has 19 double and 38 single blocks. A block count comes
/// from key names, so a bound keeps a single stray key (`double_blocks.100000000.x`) from
/// sizing the module list.
pub const MAX_BLOCKS: usize = 1024;

/// RoPE axes: three even sizes whose sum (checked, it may come from a file) is the head dim.
pub fn check_rope_axes(axes: &[usize], head_dim: usize) -> Result<()> {
    let sum = axes.iter().try_fold(0usize, |acc, &a| acc.checked_add(a));
    if axes.len() != 3 || sum != Some(head_dim) || axes.iter().any(|a| a % 2 != 0 || *a == 0) {
        bail!(
            "rope axes {axes:?} must be three positive even sizes summing to the head dim {head_dim} (set them \
             with --rope-axes a,b,c, `rope_axes` in a training config, or axes_dims_rope in config.json)"
        );
    }
    Ok(())
}

/// Parses `--rope-axes 16,56,56`.
pub fn parse_rope_axes(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>().with_context(|| format!("--rope-axes: `{x}` is not a number")))
        .collect::<Result<_>>()?;
    if v.len() != 3 {
        bail!("--rope-axes takes three comma-separated sizes (FLUX.1: 16,56,56), got {s}");
    }
    if let Some(a) = v.iter().find(|&&a| a == 0 || a > MAX_WIDTH || a % 2 != 0) {
        bail!("--rope-axes {s}: `{a}` must be a positive even size of at most {MAX_WIDTH}");
    }
    Ok(v)
}

/// Infers the architecture from BFL-named tensor shapes (`shape_of` returns None for a missing
/// tensor, an error for parts that cannot be put together). `names` pairs every BFL name with
/// its key as stored. `rope_axes` comes from the caller when the checkpoint alone cannot say.
pub fn infer_from_shapes(
    shape_of: &dyn Fn(&str) -> Result<Option<Vec<usize>>>,
    names: &[(String, String)],
    rope_axes: Option<Vec<usize>>,
) -> Result<FluxConfig> {
    let need = |n: &str, rank: usize| -> Result<Vec<usize>> {
        let s = shape_of(n)?.with_context(|| format!("missing tensor `{n}` (needed to infer the architecture)"))?;
        if s.len() != rank {
            bail!("tensor `{n}` has shape {s:?}, expected {rank} dimensions");
        }
        Ok(s)
    };
    let img_in = need("img_in.weight", 2)?;
    let (hidden_size, in_channels) = (img_in[0], img_in[1]);
    let context_in_dim = need("txt_in.weight", 2)?[1];
    let vec_in_dim = need("vector_in.in_layer.weight", 2)?[1];
    let time_dim = need("time_in.in_layer.weight", 2)?[1];
    let out_channels = need("final_layer.linear.weight", 2)?[0];
    let keys = || names.iter().map(|(n, k)| (n.as_str(), k.as_str()));
    let depth = count_indexed_blocks(keys(), "double_blocks.", MAX_BLOCKS)?;
    let depth_single = count_indexed_blocks(keys(), "single_blocks.", MAX_BLOCKS)?;
    let head_dim = if depth > 0 {
        need("double_blocks.0.img_attn.norm.query_norm.scale", 1)?[0]
    } else if depth_single > 0 {
        need("single_blocks.0.norm.query_norm.scale", 1)?[0]
    } else {
        bail!("no double_blocks.* or single_blocks.* tensors: not a FLUX transformer checkpoint");
    };
    if head_dim == 0 || hidden_size % head_dim != 0 {
        bail!("hidden size {hidden_size} is not a multiple of the head dim {head_dim} (from the QK-norm scale)");
    }
    let mlp_hidden = if depth > 0 {
        need("double_blocks.0.img_mlp.0.weight", 2)?[0]
    } else {
        let l1 = need("single_blocks.0.linear1.weight", 2)?[0];
        let qkv = hidden_size.checked_mul(3).context("img_in.weight: the hidden size overflows")?;
        l1.checked_sub(qkv).context("single_blocks.0.linear1.weight is narrower than 3 × hidden")?
    };
    let qkv_bias = if depth > 0 { shape_of("double_blocks.0.img_attn.qkv.bias")?.is_some() } else { true };
    let rope_axes = match rope_axes {
        Some(a) => a,
        None if head_dim == 128 => vec![16, 56, 56],
        None => bail!(
            "head dim is {head_dim}, not FLUX's 128, and nothing says how RoPE splits it over the three \
             position axes: pass --rope-axes a,b,c (even sizes summing to {head_dim})"
        ),
    };
    let cfg = FluxConfig {
        in_channels,
        out_channels,
        context_in_dim,
        vec_in_dim,
        hidden_size,
        num_heads: hidden_size / head_dim,
        head_dim,
        mlp_hidden,
        depth,
        depth_single,
        time_dim,
        guidance_embed: shape_of("guidance_in.in_layer.weight")?.is_some(),
        qkv_bias,
        rope_axes,
        theta: 10_000.0,
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux1_dev_counts_match_the_reference() {
        // docs/flux-model.md §4.4: 780 tensors, 11,901,408,320 parameters.
        let c = FluxConfig::flux1_dev();
        c.validate().unwrap();
        assert_eq!(c.tensors().len(), 780);
        assert_eq!(c.param_count(), 11_901_408_320);
    }

    #[test]
    fn infers_flux1_dev_from_its_own_shapes() {
        let c = FluxConfig::flux1_dev();
        let t = c.tensors();
        let names: Vec<(String, String)> = t.iter().map(|(n, _)| (n.clone(), n.clone())).collect();
        let shape_of =
            |n: &str| -> Result<Option<Vec<usize>>> { Ok(t.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone())) };
        assert_eq!(infer_from_shapes(&shape_of, &names, None).unwrap(), c);
        let schnell = FluxConfig::named("flux1-schnell").unwrap();
        let t = schnell.tensors();
        let names: Vec<(String, String)> = t.iter().map(|(n, _)| (n.clone(), n.clone())).collect();
        let shape_of =
            |n: &str| -> Result<Option<Vec<usize>>> { Ok(t.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone())) };
        assert!(!infer_from_shapes(&shape_of, &names, None).unwrap().guidance_embed);
    }

    #[test]
    fn small_head_dim_needs_rope_axes() {
        let c = FluxConfig {
            hidden_size: 32,
            num_heads: 2,
            head_dim: 16,
            mlp_hidden: 128,
            rope_axes: vec![4, 6, 6],
            ..FluxConfig::flux1_dev()
        };
        let t = c.tensors();
        let names: Vec<(String, String)> = t.iter().map(|(n, _)| (n.clone(), n.clone())).collect();
        let shape_of =
            |n: &str| -> Result<Option<Vec<usize>>> { Ok(t.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone())) };
        let e = infer_from_shapes(&shape_of, &names, None).unwrap_err().to_string();
        assert!(e.contains("--rope-axes"), "{e}");
        assert_eq!(infer_from_shapes(&shape_of, &names, Some(vec![4, 6, 6])).unwrap(), c);
        assert!(infer_from_shapes(&shape_of, &names, Some(vec![4, 4, 4])).is_err());
        assert_eq!(parse_rope_axes("16,56,56").unwrap(), vec![16, 56, 56]);
        assert!(parse_rope_axes("16,56").is_err());
    }
}
