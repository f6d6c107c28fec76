//! PEFT-style adapter configuration: rank, alpha (α/r or α/√r with rsLoRA), dropout, which
//! modules to adapt, per-pattern rank/alpha overrides, and PEFT's initialisation.
//!
//! Targets, comma-separated, each one of:
//! - a preset: `attn` (q, k, v, out of both streams plus single-block q, k, v), `attn-mlp`
//!   (diffusers' DreamBooth default set), `all` (every linear inside the blocks, kohya's set;
//!   modulation linears only with `include_modulation`);
//! - a diffusers module name matched as PEFT matches it, as a suffix at a dot (`to_q` hits double
//!   and single blocks);
//! - a BFL module name, also by suffix (`img_attn.qkv`, `linear1`): the adapter is then one
//!   low-rank term on the whole fused projection, as kohya trains it;
//! - a glob with `*` / `?` over full diffusers or BFL names (`single_transformer_blocks.1*.proj_mlp`).
//!
//! Every linear of the model is a candidate, the top-level ones included: `x_embedder` (BFL
//! `img_in`), `context_embedder` (`txt_in`), the time/guidance/text embedders, `norm_out.linear`
//! and `proj_out` (`final_layer.linear`; `proj_out` also names every single block's output linear,
//! as in PEFT, so the BFL name picks the last linear alone). The presets stay inside the blocks.

use super::{Kind, Term};
use crate::model::config::{FluxConfig, ModuleKind};
use crate::model::layout::{diffusers_to_bfl, BflTarget};
use crate::util::{thousands, Rng};
use anyhow::{bail, Result};
use std::collections::HashSet;

pub use super::lora::Init;

#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub rslora: bool,
    pub dropout: f32,
    pub targets: Vec<String>,
    pub include_modulation: bool,
    /// (pattern, rank) and (pattern, alpha), matched as PEFT's rank_pattern / alpha_pattern.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f32)>,
    pub init: Init,
    /// DoRA (PEFT's `use_dora`): each adapter also trains a magnitude per output row.
    pub use_dora: bool,
    /// LoKr (LyCORIS) with this factor instead of LoRA: w1 ⊗ w2 with `rank` for w2's factors.
    pub lokr_factor: Option<i64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 16.0,
            rslora: false,
            dropout: 0.0,
            targets: vec!["attn-mlp".into()],
            include_modulation: false,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            init: Init::KaimingUniform,
            use_dora: false,
            lokr_factor: None,
        }
    }
}

/// One adapter to train: a low-rank term on `target` (a diffusers module, or a whole BFL module).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    /// The module name as targeted: diffusers (`transformer_blocks.0.attn.to_q`) or BFL.
    pub name: String,
    pub diffusers: bool,
    pub target: BflTarget,
    pub d_in: usize,
    pub rank: usize,
    pub alpha: f32,
    /// DoRA: a magnitude per output row besides A and B.
    pub dora: bool,
    /// LoKr with this factor (LyCORIS's split, `lokr::lycoris_kind`) instead of LoRA.
    pub lokr_factor: Option<i64>,
}

impl AdapterSpec {
    pub fn param_count(&self) -> usize {
        let rows = self.target.rows.len();
        if let Some(f) = self.lokr_factor {
            let kind = super::lokr::lycoris_kind(rows, self.d_in, self.rank, f);
            let t = Term::lycoris(&self.name, self.target.rows.clone(), self.d_in, kind, 1.0, vec![]);
            return t.param_shapes().iter().map(|s| s.iter().product::<usize>()).sum();
        }
        self.rank * (self.d_in + rows) + if self.dora { rows } else { 0 }
    }
}

const ATTN: &[&str] = &["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"];
const MLP: &[&str] = &["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"];
const MODULATION: &[&str] = &["norm1.linear", "norm1_context.linear", "norm.linear"];

type Predicate = Box<dyn Fn(&str) -> bool>;

/// PEFT's `(.*\.)?key$` rule.
pub fn suffix_match(name: &str, key: &str) -> bool {
    name == key || name.ends_with(&format!(".{key}"))
}

/// `*` any run of characters, `?` one character.
pub fn glob_match(pat: &str, s: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], s) || (!s.is_empty() && go(p, &s[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    go(pat.as_bytes(), s.as_bytes())
}

/// Every linear module in both vocabularies, in diffusers' module order for the diffusers ones.
struct Candidates {
    dif: Vec<(String, BflTarget)>,
    bfl: Vec<(String, usize, usize)>,
}

fn candidates(cfg: &FluxConfig) -> Candidates {
    let map = diffusers_to_bfl(cfg);
    let mut bfl = Vec::new();
    let mut dif = Vec::new();
    for m in cfg.modules() {
        if let ModuleKind::Linear { d_out, d_in, .. } = m.kind {
            let mut parts: Vec<(String, BflTarget)> =
                map.iter().filter(|(_, t)| t.module == m.name).map(|(n, t)| (n.clone(), t.clone())).collect();
            parts.sort_by_key(|(_, t)| t.rows.start);
            dif.extend(parts);
            bfl.push((m.name, d_out, d_in));
        }
    }
    Candidates { dif, bfl }
}

fn in_blocks(dif_name: &str) -> bool {
    dif_name.starts_with("transformer_blocks.") || dif_name.starts_with("single_transformer_blocks.")
}

/// Resolves the targets to adapters, each module at most once, in diffusers module order.
pub fn resolve_targets(cfg: &FluxConfig, lc: &LoraConfig) -> Result<Vec<AdapterSpec>> {
    if lc.rank == 0 {
        bail!("--rank must be at least 1");
    }
    if !(0.0..1.0).contains(&lc.dropout) {
        bail!("--dropout must be in [0, 1), got {}", lc.dropout);
    }
    let c = candidates(cfg);
    let d_in_of = |bfl: &str| c.bfl.iter().find(|(n, ..)| n == bfl).map(|x| x.2).unwrap();
    let mut dif_sel: HashSet<String> = HashSet::new();
    let mut bfl_sel: HashSet<String> = HashSet::new();
    for entry in lc.targets.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let before = dif_sel.len() + bfl_sel.len();
        let preset: Option<Predicate> = match entry {
            "attn" => Some(Box::new(|n: &str| ATTN.iter().any(|k| suffix_match(n, k)))),
            "attn-mlp" => Some(Box::new(|n: &str| ATTN.iter().chain(MLP).any(|k| suffix_match(n, k)))),
            "all" => {
                let modl = lc.include_modulation;
                Some(Box::new(move |n: &str| in_blocks(n) && (modl || !MODULATION.iter().any(|k| suffix_match(n, k)))))
            }
            _ => None,
        };
        if let Some(p) = preset {
            dif_sel.extend(c.dif.iter().filter(|(n, _)| p(n)).map(|(n, _)| n.clone()));
        } else if entry.contains(['*', '?']) {
            dif_sel.extend(c.dif.iter().filter(|(n, _)| glob_match(entry, n)).map(|(n, _)| n.clone()));
            bfl_sel.extend(c.bfl.iter().filter(|(n, ..)| glob_match(entry, n)).map(|(n, ..)| n.clone()));
        } else {
            let d: Vec<String> = c.dif.iter().filter(|(n, _)| suffix_match(n, entry)).map(|(n, _)| n.clone()).collect();
            if d.is_empty() {
                bfl_sel.extend(c.bfl.iter().filter(|(n, ..)| suffix_match(n, entry)).map(|(n, ..)| n.clone()));
            } else {
                dif_sel.extend(d);
            }
        }
        if dif_sel.len() + bfl_sel.len() == before {
            bail!(
                "--targets: `{entry}` matches no linear module of this model (presets: attn, attn-mlp, all; \
                 or a diffusers name such as to_q, a BFL name such as img_attn.qkv, or a glob)"
            );
        }
    }
    if dif_sel.is_empty() && bfl_sel.is_empty() {
        bail!("--targets selects no module");
    }
    let pick = |name: &str, rank: usize, alpha: f32| -> (usize, f32) {
        let r = lc.rank_pattern.iter().find(|(k, _)| suffix_match(name, k)).map_or(rank, |x| x.1);
        let a = lc.alpha_pattern.iter().find(|(k, _)| suffix_match(name, k)).map_or(alpha, |x| x.1);
        (r, a)
    };
    let mut out = Vec::new();
    for (name, t) in &c.dif {
        if dif_sel.contains(name) {
            if bfl_sel.contains(&t.module) {
                bail!("--targets selects both `{name}` and the fused `{}` it is part of; choose one", t.module);
            }
            let (rank, alpha) = pick(name, lc.rank, lc.alpha);
            out.push(AdapterSpec {
                name: name.clone(),
                diffusers: true,
                target: t.clone(),
                d_in: d_in_of(&t.module),
                rank,
                alpha,
                dora: lc.use_dora,
                lokr_factor: lc.lokr_factor,
            });
        }
    }
    for (name, d_out, d_in) in &c.bfl {
        if bfl_sel.contains(name) {
            let (rank, alpha) = pick(name, lc.rank, lc.alpha);
            let target = BflTarget { module: name.clone(), rows: 0..*d_out, swap_halves: false };
            let (dora, lokr_factor) = (lc.use_dora, lc.lokr_factor);
            out.push(AdapterSpec {
                name: name.clone(),
                diffusers: false,
                target,
                d_in: *d_in,
                rank,
                alpha,
                dora,
                lokr_factor,
            });
        }
    }
    if let Some(s) = out.iter().find(|s| s.rank == 0) {
        bail!("rank 0 for `{}` (from --rank-pattern)", s.name);
    }
    // Ranks are bounded before anything is sized by them (PEFT itself takes any rank, and so does
    // this count; the factors are only allocated through `resolve_targets_to_train`).
    if let Some(s) = out.iter().find(|s| s.rank > MAX_RANK) {
        bail!("{}: rank {} for `{}` is more than {MAX_RANK}", rank_source(lc, &s.name), s.rank, s.name);
    }
    Ok(out)
}

/// The largest LoRA rank any setting may ask for: FLUX.1's widest module input is 12,288, and no
/// useful LoRA rank comes near it.
pub const MAX_RANK: usize = 1 << 14;

/// The setting a spec's rank came from, for an error: its rank_pattern entry or --rank.
fn rank_source(lc: &LoraConfig, name: &str) -> String {
    match lc.rank_pattern.iter().find(|(k, _)| suffix_match(name, k)) {
        Some((k, r)) => format!("rank_pattern (--rank-pattern) `{k}={r}`"),
        None => format!("rank (--rank) {}", lc.rank),
    }
}

/// `resolve_targets` for adapters about to be allocated and trained: each rank at most its
/// module's width (the larger of inputs and outputs). A rank past it adds no expressiveness, only
/// memory: rank × (in + out) parameters and as many of each AdamW moment, so a rank from a setting
/// cannot size the factors past a few times the module's own weight.
pub fn resolve_targets_to_train(cfg: &FluxConfig, lc: &LoraConfig) -> Result<Vec<AdapterSpec>> {
    let out = resolve_targets(cfg, lc)?;
    for s in &out {
        let width = s.d_in.max(s.target.rows.len());
        if s.rank > width {
            bail!(
                "{}: rank {} for `{}` exceeds the module's width {width} ({} inputs, {} outputs)",
                rank_source(lc, &s.name),
                s.rank,
                s.name,
                s.d_in,
                s.target.rows.len()
            );
        }
    }
    Ok(out)
}

impl LoraConfig {
    pub fn scale(&self, spec: &AdapterSpec) -> f32 {
        if self.rslora {
            spec.alpha / (spec.rank as f32).sqrt()
        } else {
            spec.alpha / spec.rank as f32
        }
    }

    /// A new term for `spec` with PEFT's initialisation (B = 0, so it starts as the base model).
    /// `frozen` gives a module's frozen weight [d_out, d_in] (f32), which a DoRA term's magnitude
    /// starts from: PEFT's ‖W + s·B·A‖ per output row with B = 0, so g = 1 at the start.
    pub fn init_term(
        &self,
        spec: &AdapterSpec,
        rng: &mut Rng,
        frozen: &dyn Fn(&str) -> Result<Vec<f32>>,
    ) -> Result<Term> {
        if let Some(f) = spec.lokr_factor {
            // LyCORIS's LokrModule: scale alpha / lora_dim (√ with rs_lora) when w2 is factored;
            // both factors whole is scale 1 whatever alpha says.
            let kind = super::lokr::lycoris_kind(spec.target.rows.len(), spec.d_in, spec.rank, f);
            let scale = if matches!(kind, Kind::Lokr { r2: Some(_), .. }) { self.scale(spec) } else { 1.0 };
            let params = super::lokr::init(kind, rng);
            return Ok(Term::lycoris(&spec.target.module, spec.target.rows.clone(), spec.d_in, kind, scale, params));
        }
        let (a, b) = super::lora::init(self.init, spec.rank, spec.d_in, spec.target.rows.len(), rng);
        let t = Term::lora(&spec.target.module, spec.target.rows.clone(), spec.d_in, spec.rank, self.scale(spec), a, b);
        if !spec.dora {
            return Ok(t);
        }
        let w = frozen(&spec.target.module)?;
        let magnitude = super::dora::row_norms(&t, &w, spec.d_in);
        Ok(t.with_magnitude(magnitude))
    }
}

/// `trainable params: N || all params: M || trainable%: P`, as PEFT's print_trainable_parameters.
pub fn trainable_summary(cfg: &FluxConfig, specs: &[AdapterSpec]) -> String {
    let n: usize = specs.iter().map(|s| s.param_count()).sum();
    let m = cfg.param_count() + n;
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(n),
        thousands(m),
        100.0 * n as f64 / m as f64
    )
}

/// Parses `to_q=8,proj_mlp=32`.
pub fn parse_patterns<T: std::str::FromStr>(s: &str, flag: &str) -> Result<Vec<(String, T)>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("{flag}: `{kv}` is not NAME=VALUE"))?;
            let v = v.trim().parse::<T>().map_err(|_| anyhow::anyhow!("{flag}: `{v}` is not a number"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(targets: &str, modl: bool) -> Vec<AdapterSpec> {
        let lc = LoraConfig {
            targets: targets.split(',').map(String::from).collect(),
            include_modulation: modl,
            ..LoraConfig::default()
        };
        resolve_targets(&FluxConfig::flux1_dev(), &lc).unwrap()
    }

    #[test]
    fn presets_and_name_kinds() {
        // attn: 8 per double block + 3 per single block.
        assert_eq!(specs("attn", false).len(), 19 * 8 + 38 * 3);
        assert_eq!(specs("attn-mlp", false).len(), 19 * 12 + 38 * 3);
        // all: 12 + 2 modulation per double block, q, k, v, proj_mlp, proj_out + modulation per single.
        assert_eq!(specs("all", false).len(), 19 * 12 + 38 * 5);
        assert_eq!(specs("all", true).len(), 19 * 14 + 38 * 6);
        // `to_q` is a suffix: both block kinds.
        assert_eq!(specs("to_q", false).len(), 19 + 38);
        // A BFL name gives one fused adapter per module.
        let q = specs("img_attn.qkv", false);
        assert_eq!(q.len(), 19);
        assert!(!q[0].diffusers && q[0].target.rows == (0..9216));
        assert_eq!(specs("single_transformer_blocks.1?.proj_mlp", false).len(), 10);
        assert!(glob_match("a*c", "abbbc") && !glob_match("a?c", "abbc"));
    }

    #[test]
    fn bad_targets_are_named() {
        let lc = LoraConfig { targets: vec!["to_qq".into()], ..LoraConfig::default() };
        let e = resolve_targets(&FluxConfig::flux1_dev(), &lc).unwrap_err().to_string();
        assert!(e.contains("to_qq"), "{e}");
        let lc = LoraConfig { targets: vec!["to_q".into(), "linear1".into()], ..LoraConfig::default() };
        assert!(resolve_targets(&FluxConfig::flux1_dev(), &lc).is_err());
    }
}
