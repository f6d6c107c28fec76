//! LoRA files in the dialects users have, translated to terms on BFL modules.
//!
//! - diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `lora_B.weight`, alpha
//!   in the `lora_adapter_metadata` JSON when present, else alpha = rank;
//! - kohya sd-scripts: `lora_unet_<BFL module, dots as underscores>.lora_down/up.weight`, `.alpha`;
//! - ComfyUI: `diffusion_model.<BFL module>.lora_{A,B,down,up}.weight`, `.alpha`;
//! - OneTrainer: `lora_transformer_<diffusers module, dots as underscores>…`, `.alpha`;
//! - LyCORIS LoKr and LoHa (`lokr_w1`, `lokr_w2_a`, … `hada_w1_a`, …, `.alpha`) under the names
//!   ComfyUI maps for FLUX: `lycoris_<diffusers module, dots as underscores>` (SimpleTuner) and
//!   `lora_unet_<BFL module, dots as underscores>` (kohya-style), also under the other prefixes.
//!
//! A term on diffusers' separate q/k/v lands on rows of BFL's fused qkv (or linear1), so every
//! dialect works on either base layout. A key that matches nothing is an error by default: the
//! most reported failure of other tools is a LoRA that silently does nothing.

use super::{Kind, Term};
use crate::io::safetensors::{require_float, SafeTensors};
use crate::model::config::{FluxConfig, ModuleKind};
use crate::model::layout::{diffusers_to_bfl, BflTarget};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoraFormat {
    Peft,
    Kohya,
    ComfyUi,
    OneTrainer,
    /// SimpleTuner's LyCORIS names: `lycoris_<diffusers module, dots as underscores>`.
    Lycoris,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Peft => "diffusers/PEFT",
            LoraFormat::Kohya => "kohya sd-scripts",
            LoraFormat::ComfyUi => "ComfyUI",
            LoraFormat::OneTrainer => "OneTrainer",
            LoraFormat::Lycoris => "LyCORIS (lycoris_ names)",
        }
    }
}

/// What to do with keys that match no module of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownKeys {
    Error,
    Warn,
}

pub struct LoraFile {
    pub path: PathBuf,
    pub formats: BTreeSet<LoraFormat>,
    /// The terms on BFL modules (scale from the file's alpha, strength 1), in file order of the
    /// modules.
    pub terms: Vec<Term>,
    /// The stored names behind each term, in the same order.
    pub keys: Vec<FactorKeys>,
    /// Per stored module name: rank and alpha as resolved.
    pub modules: BTreeMap<String, (usize, f32)>,
    /// Keys skipped under `UnknownKeys::Warn`.
    pub skipped: Vec<String>,
    pub alpha_source: &'static str,
}

impl LoraFile {
    pub fn param_count(&self) -> usize {
        self.terms.iter().map(|t| t.param_count()).sum()
    }
}

/// The file's own tensor names for one delta.
#[derive(Clone, Debug)]
pub struct FactorKeys {
    /// LoRA's down and up (empty for the LyCORIS kinds, whose names are in `params`).
    pub down: String,
    pub up: String,
    /// Every stored tensor of the term in its kind's parameter order (LoRA: down, up, then a DoRA
    /// magnitude; LoKr: `lokr_w1` or `lokr_w1_a`, `lokr_w1_b`, then w2's; LoHa: the four `hada_*`).
    pub params: Vec<String>,
    pub alpha: Option<String>,
    /// DoRA's magnitude vector (PEFT `lora_magnitude_vector` [out], or LyCORIS/kohya `dora_scale`
    /// [out, 1] as ComfyUI reads it), when the term is DoRA.
    pub magnitude: Option<String>,
    /// B's rows are stored in diffusers' [scale; shift] order (norm_out.linear).
    pub swap_halves: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
    Magnitude,
    /// LyCORIS's DoRA magnitude as kohya-style files carry it (`<module>.dora_scale`).
    DoraScale,
    /// A LyCORIS LoKr or LoHa tensor, by its name (`lokr_w1`, `hada_w2_b`, …).
    Lycoris(&'static str),
}

/// The LyCORIS tensor names of a linear's LoKr and LoHa (and the Tucker cores, which only
/// convolutions have and which are refused).
const LYCORIS_NAMES: [&str; 14] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t1",
    "lokr_t2",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
];

fn split_role(key: &str) -> Option<(&str, Role)> {
    for (suf, role) in [
        (".lora_A.weight", Role::Down),
        (".lora_down.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora_up.weight", Role::Up),
        (".alpha", Role::Alpha),
        (".lora_magnitude_vector", Role::Magnitude),
        (".lora_magnitude_vector.weight", Role::Magnitude),
        (".dora_scale", Role::DoraScale),
    ] {
        if let Some(m) = key.strip_suffix(suf) {
            return Some((m, role));
        }
    }
    LYCORIS_NAMES.iter().find_map(|n| {
        let m = key.strip_suffix(n)?.strip_suffix('.')?;
        Some((m, Role::Lycoris(n)))
    })
}

struct Names {
    bfl: HashMap<String, (usize, usize)>,
    bfl_us: HashMap<String, String>,
    dif: HashMap<String, BflTarget>,
    dif_us: HashMap<String, String>,
}

impl Names {
    fn new(cfg: &FluxConfig) -> Names {
        let mut bfl = HashMap::new();
        let mut bfl_us = HashMap::new();
        for m in cfg.modules() {
            if let ModuleKind::Linear { d_out, d_in, .. } = m.kind {
                bfl_us.insert(m.name.replace('.', "_"), m.name.clone());
                bfl.insert(m.name, (d_out, d_in));
            }
        }
        // Norm scales are not LoRA targets; keep only diffusers names of linears.
        let dif: HashMap<String, BflTarget> =
            diffusers_to_bfl(cfg).into_iter().filter(|(_, t)| bfl.contains_key(&t.module)).collect();
        let dif_us = dif.keys().map(|k| (k.replace('.', "_"), k.clone())).collect();
        Names { bfl, bfl_us, dif, dif_us }
    }

    fn bfl_target(&self, name: &str) -> Option<BflTarget> {
        self.bfl.get(name).map(|&(d_out, _)| BflTarget { module: name.to_string(), rows: 0..d_out, swap_halves: false })
    }

    /// Resolves a stored module name to (format, diffusers name if any, target).
    fn resolve(&self, module: &str, role_is_ab: bool) -> Option<(LoraFormat, Option<String>, BflTarget)> {
        let dotted = |s: &str| -> Option<(Option<String>, BflTarget)> {
            if let Some(t) = self.bfl_target(s) {
                return Some((None, t));
            }
            self.dif.get(s).map(|t| (Some(s.to_string()), t.clone()))
        };
        let underscored = |s: &str, dif_first: bool| -> Option<(Option<String>, BflTarget)> {
            let b = || self.bfl_us.get(s).and_then(|n| self.bfl_target(n)).map(|t| (None, t));
            let d = || self.dif_us.get(s).map(|n| (Some(n.clone()), self.dif[n].clone()));
            if dif_first {
                d().or_else(b)
            } else {
                b().or_else(d)
            }
        };
        let (fmt, hit) = if let Some(s) = module.strip_prefix("lora_unet_") {
            (LoraFormat::Kohya, underscored(s, false))
        } else if let Some(s) = module.strip_prefix("lora_transformer_") {
            (LoraFormat::OneTrainer, underscored(s, true))
        } else if let Some(s) = module.strip_prefix("lycoris_") {
            (LoraFormat::Lycoris, underscored(s, true))
        } else if let Some(s) =
            module.strip_prefix("model.diffusion_model.").or(module.strip_prefix("diffusion_model."))
        {
            (LoraFormat::ComfyUi, dotted(s))
        } else if let Some(s) = module.strip_prefix("transformer.") {
            (LoraFormat::Peft, dotted(s))
        } else {
            (if role_is_ab { LoraFormat::Peft } else { LoraFormat::Kohya }, dotted(module))
        };
        hit.map(|(d, t)| (fmt, d, t))
    }
}

/// PEFT's LoraConfig as diffusers stores it in `lora_adapter_metadata` (keys prefixed with the
/// component, `transformer.r`).
struct PeftMeta {
    alpha: Option<f32>,
    rslora: bool,
    alpha_pattern: Vec<(String, f32)>,
}

/// The keys of `lora_adapter_metadata` that set the scale: diffusers' (prefixed with the
/// component, preferred) or PEFT's own bare ones.
#[derive(Deserialize)]
struct LoraAdapterMetadata {
    #[serde(rename = "transformer.lora_alpha")]
    transformer_lora_alpha: Option<f64>,
    lora_alpha: Option<f64>,
    #[serde(rename = "transformer.use_rslora")]
    transformer_use_rslora: Option<bool>,
    use_rslora: Option<bool>,
    #[serde(rename = "transformer.alpha_pattern")]
    transformer_alpha_pattern: Option<BTreeMap<String, f64>>,
    alpha_pattern: Option<BTreeMap<String, f64>>,
}

fn peft_meta(st: &SafeTensors) -> Result<Option<PeftMeta>> {
    let Some(raw) = st.metadata().get("lora_adapter_metadata") else {
        return Ok(None);
    };
    let m: LoraAdapterMetadata = serde_json::from_str(raw).with_context(|| {
        format!("{}: lora_adapter_metadata is not valid JSON (or not PEFT's LoraConfig)", st.path().display())
    })?;
    let alpha = m.transformer_lora_alpha.or(m.lora_alpha).map(|a| a as f32);
    let rslora = m.transformer_use_rslora.or(m.use_rslora).unwrap_or(false);
    let alpha_pattern = m.transformer_alpha_pattern.or(m.alpha_pattern).unwrap_or_default();
    let alpha_pattern = alpha_pattern.into_iter().map(|(k, x)| (k, x as f32)).collect();
    Ok(Some(PeftMeta { alpha, rslora, alpha_pattern }))
}

/// PEFT matches pattern keys as a suffix at a module boundary (`(.*\.)?key$`).
fn pattern_matches(module: &str, key: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

#[derive(Default)]
struct Group {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
    magnitude: Option<String>,
    /// LyCORIS tensors by name (`lokr_w1` → its key).
    lycoris: BTreeMap<&'static str, String>,
}

pub fn load_lora(path: &Path, cfg: &FluxConfig, unknown: UnknownKeys) -> Result<LoraFile> {
    let st = SafeTensors::open(path)?;
    let p = path.display();
    let names = Names::new(cfg);
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut reject = |key: &str, why: String| -> Result<()> {
        match unknown {
            UnknownKeys::Error => {
                bail!("{p}: LoRA key `{key}` {why} (pass --lora-unknown warn to skip such keys)")
            }
            UnknownKeys::Warn => {
                skipped.push(key.to_string());
                Ok(())
            }
        }
    };
    for key in st.tensors().keys() {
        let Some((module, role)) = split_role(key) else {
            reject(
                key,
                "is not a LoRA factor, alpha, DoRA magnitude (`lora_magnitude_vector`, `dora_scale`) or LyCORIS \
                 LoKr/LoHa tensor (`lokr_w1`, `hada_w1_a`, …) this loader understands (biases are not supported)"
                    .into(),
            )?;
            continue;
        };
        if names.resolve(module, matches!(role, Role::Down | Role::Up | Role::Magnitude | Role::Lycoris(_))).is_none() {
            reject(key, "matches no linear module of this FLUX model".into())?;
            continue;
        }
        let g = groups.entry(module.to_string()).or_default();
        match role {
            Role::Down => g.down = Some(key.clone()),
            Role::Up => g.up = Some(key.clone()),
            Role::Alpha => g.alpha = Some(key.clone()),
            Role::Magnitude | Role::DoraScale => {
                if let Some(other) = &g.magnitude {
                    bail!("{p}: DoRA magnitudes `{other}` and `{key}` both act on `{module}`; a module takes one");
                }
                g.magnitude = Some(key.clone());
            }
            Role::Lycoris(n) => {
                g.lycoris.insert(n, key.clone());
            }
        }
    }
    let meta = peft_meta(&st)?;
    let mut formats = BTreeSet::new();
    let mut terms = Vec::new();
    let mut keys = Vec::new();
    let mut modules = BTreeMap::new();
    let mut alpha_source = "alpha = rank (no alpha stored)";
    for (module, g) in &groups {
        if let Some(lyco) = g.lycoris.values().next() {
            let (fmt, _, target) = names.resolve(module, true).expect("resolved above");
            formats.insert(fmt);
            let (_, d_in) = names.bfl[&target.module];
            let (term, params, alpha) = lycoris_term(&st, module, g, lyco, &target, d_in)?;
            if alpha.is_some() {
                alpha_source = "alpha tensors";
            }
            modules.insert(module.clone(), (term.rank(), alpha.unwrap_or(term.rank() as f32)));
            keys.push(FactorKeys {
                down: String::new(),
                up: String::new(),
                params,
                alpha: g.alpha.clone(),
                magnitude: None,
                swap_halves: target.swap_halves,
            });
            terms.push(term);
            continue;
        }
        let (Some(down), Some(up)) = (&g.down, &g.up) else {
            let have = g.down.as_ref().or(g.up.as_ref()).or(g.alpha.as_ref()).or(g.magnitude.as_ref()).unwrap();
            bail!(
                "{p}: LoRA key `{have}` has no matching {} factor",
                if g.down.is_none() { "down (lora_A)" } else { "up (lora_B)" }
            );
        };
        let (fmt, dif_name, target) = names.resolve(module, down.ends_with(".lora_A.weight")).expect("resolved above");
        formats.insert(fmt);
        let (_, d_in) = names.bfl[&target.module];
        // An I8/U8 factor would otherwise be integer codes taken for numbers: a LoRA has no scales.
        for k in [Some(down), Some(up), g.alpha.as_ref(), g.magnitude.as_ref()].into_iter().flatten() {
            if let Some(info) = st.info(k) {
                require_float(info.dtype).with_context(|| format!("{p}: LoRA tensor `{k}`"))?;
            }
        }
        let (sa, a) = st.read_f32(down)?;
        let (sb, mut b) = st.read_f32(up)?;
        if sa.len() != 2 || sa[1] != d_in {
            bail!(
                "{p}: LoRA key `{down}` has shape {sa:?}, but `{}` takes {d_in} inputs (expected [rank, {d_in}]): \
                 the LoRA was made for a different model than this one (hidden size {})",
                target.module,
                cfg.hidden_size
            );
        }
        let rank = sa[0];
        if rank == 0 {
            bail!("{p}: LoRA key `{down}` has rank 0");
        }
        if sb != [target.rows.len(), rank] {
            bail!(
                "{p}: LoRA key `{up}` has shape {sb:?}, expected [{}, {rank}] for {}",
                target.rows.len(),
                dif_name.as_deref().unwrap_or(&target.module)
            );
        }
        let alpha = if let Some(ak) = &g.alpha {
            let (s, v) = st.read_f32(ak)?;
            if v.len() != 1 {
                bail!("{p}: LoRA key `{ak}` has shape {s:?}, expected a scalar");
            }
            alpha_source = "alpha tensors";
            v[0]
        } else if let Some(m) = &meta {
            alpha_source = "lora_adapter_metadata";
            let name = dif_name.as_deref().unwrap_or(&target.module);
            m.alpha_pattern
                .iter()
                .find(|(k, _)| pattern_matches(name, k))
                .map(|(_, a)| *a)
                .or(m.alpha)
                .unwrap_or(rank as f32)
        } else {
            rank as f32
        };
        if !alpha.is_finite() || a.iter().chain(&b).any(|x| !x.is_finite()) {
            bail!("{p}: LoRA module `{module}` has non-finite values");
        }
        let rslora = meta.as_ref().is_some_and(|m| m.rslora) && g.alpha.is_none();
        let scale = if rslora { alpha / (rank as f32).sqrt() } else { alpha / rank as f32 };
        if target.swap_halves {
            // diffusers' norm_out.linear rows are [scale; shift]; the model's are [shift; scale].
            let half = target.rows.len() / 2 * rank;
            b.rotate_left(half);
        }
        let magnitude = match &g.magnitude {
            Some(mk) => Some(read_magnitude(&st, mk, target.rows.len(), d_in, target.swap_halves)?),
            None => None,
        };
        modules.insert(module.clone(), (rank, alpha));
        keys.push(FactorKeys {
            down: down.clone(),
            up: up.clone(),
            params: [down, up].into_iter().chain(&g.magnitude).cloned().collect(),
            alpha: g.alpha.clone(),
            magnitude: g.magnitude.clone(),
            swap_halves: target.swap_halves,
        });
        let term = Term::lora(&target.module, target.rows, d_in, rank, scale, a, b);
        terms.push(match magnitude {
            Some(Magnitude::Rows(m)) => term.with_magnitude(m),
            Some(Magnitude::Columns(m)) => term.with_column_magnitude(m),
            None => term,
        });
    }
    if terms.is_empty() {
        bail!("{p}: no LoRA factors found for this model");
    }
    Ok(LoraFile { path: path.to_path_buf(), formats, terms, keys, modules, skipped, alpha_source })
}

/// A stored tensor: its key, shape and values.
type Stored = (String, Vec<usize>, Vec<f32>);

/// The LoKr or LoHa term of stored module `module` (its tensors in `g`, `first` one of them), with
/// the keys of its parameters in order and its alpha. Scale as ComfyUI computes it (`lokr.rs`,
/// `loha.rs`); a module that mixes kinds, lacks a factor, has Tucker cores or factors of the wrong
/// shapes is refused naming the key.
fn lycoris_term(
    st: &SafeTensors,
    module: &str,
    g: &Group,
    first: &str,
    target: &BflTarget,
    d_in: usize,
) -> Result<(Term, Vec<String>, Option<f32>)> {
    let p = st.path().display();
    let rows = target.rows.len();
    if let Some(other) = g.down.as_ref().or(g.up.as_ref()) {
        bail!("{p}: `{module}` mixes adapter kinds: LoRA key `{other}` and LyCORIS key `{first}`; a module takes one kind per file");
    }
    if let Some(m) = &g.magnitude {
        bail!(
            "{p}: `{m}`: weight-decomposed (DoRA) LyCORIS modules are not supported; `{first}` is a LoKr/LoHa \
             tensor of the same module"
        );
    }
    let lokr = g.lycoris.keys().find(|n| n.starts_with("lokr_"));
    let hada = g.lycoris.keys().find(|n| n.starts_with("hada_"));
    if let (Some(a), Some(b)) = (lokr, hada) {
        bail!(
            "{p}: `{module}` mixes adapter kinds: LoKr key `{}` and LoHa key `{}`; a module takes one kind per file",
            g.lycoris[a],
            g.lycoris[b]
        );
    }
    for t in ["lokr_t1", "lokr_t2", "hada_t1", "hada_t2"] {
        if let Some(k) = g.lycoris.get(t) {
            bail!(
                "{p}: `{k}` is a Tucker core, which LyCORIS makes for convolutions only; FLUX's linears take none \
                 (no loader applies it to a linear)"
            );
        }
    }
    let read = |name: &str| -> Result<Stored> {
        let key = g.lycoris[name].clone();
        if let Some(info) = st.info(&key) {
            require_float(info.dtype).with_context(|| format!("{p}: LyCORIS tensor `{key}`"))?;
        }
        let (shape, v) = st.read_f32(&key)?;
        if shape.len() != 2 {
            bail!("{p}: LyCORIS tensor `{key}` has shape {shape:?}, expected a matrix (a linear's factor)");
        }
        if v.iter().any(|x| !x.is_finite()) {
            bail!("{p}: LyCORIS tensor `{key}` has non-finite values");
        }
        Ok((key, shape, v))
    };
    let alpha = match &g.alpha {
        Some(ak) => {
            let (s, v) = st.read_f32(ak)?;
            if v.len() != 1 || !v[0].is_finite() {
                bail!("{p}: LyCORIS key `{ak}` has shape {s:?} or a non-finite value, expected a finite scalar");
            }
            Some(v[0])
        }
        None => None,
    };
    let what = format!("{p}: `{module}` ({})", target.module);
    let (kind, mut tensors) = if lokr.is_some() {
        // w1 and w2: whole, or two factors of one rank.
        let half = |w: &str| -> Result<([usize; 2], Option<usize>, Vec<Stored>)> {
            let (whole, a, b) = (format!("lokr_{w}"), format!("lokr_{w}_a"), format!("lokr_{w}_b"));
            let has = |n: &str| g.lycoris.contains_key(n);
            match (has(&whole), has(&a), has(&b)) {
                (true, false, false) => {
                    let t = read(&whole)?;
                    Ok(([t.1[0], t.1[1]], None, vec![t]))
                }
                (false, true, true) => {
                    let (ta, tb) = (read(&a)?, read(&b)?);
                    if ta.1[1] != tb.1[0] || ta.1[1] == 0 {
                        bail!(
                            "{p}: LoKr factors `{}` {:?} and `{}` {:?} do not multiply (rank {} against {})",
                            ta.0,
                            ta.1,
                            tb.0,
                            tb.1,
                            ta.1[1],
                            tb.1[0]
                        );
                    }
                    Ok(([ta.1[0], tb.1[1]], Some(ta.1[1]), vec![ta, tb]))
                }
                (false, false, false) => bail!(
                    "{p}: LoKr module `{module}` has no {w}: it needs `{module}.{whole}` or both `{module}.{a}` and \
                     `{module}.{b}` (found `{first}`)"
                ),
                (true, _, _) => bail!("{p}: LoKr module `{module}` has both `{whole}` and its factors `{a}`/`{b}`"),
                (false, true, false) => bail!("{p}: LoKr key `{}` has no matching `{b}`", g.lycoris[a.as_str()]),
                (false, false, true) => bail!("{p}: LoKr key `{}` has no matching `{a}`", g.lycoris[b.as_str()]),
            }
        };
        let (w1, r1, mut t1) = half("w1")?;
        let (w2, r2, t2) = half("w2")?;
        if w1[0] * w2[0] != rows || w1[1] * w2[1] != d_in {
            bail!(
                "{what}: LoKr w1 {w1:?} ⊗ w2 {w2:?} is [{}, {}], but the module is [{rows}, {d_in}] (rows, inputs): \
                 the LoKr was made for a different model",
                w1[0] * w2[0],
                w1[1] * w2[1]
            );
        }
        t1.extend(t2);
        (Kind::Lokr { w1, w2, r1, r2 }, t1)
    } else {
        let mut ts = Vec::new();
        for n in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] {
            if !g.lycoris.contains_key(n) {
                bail!("{p}: LoHa module `{module}` has no `{module}.{n}` (found `{first}`)");
            }
            ts.push(read(n)?);
        }
        let (r1, r2) = (ts[0].1[1], ts[2].1[1]);
        let want = [[rows, r1], [r1, d_in], [rows, r2], [r2, d_in]];
        for (t, w) in ts.iter().zip(want) {
            if t.1 != w || r1 == 0 || r2 == 0 {
                bail!("{what}: LoHa tensor `{}` has shape {:?}, expected {w:?}", t.0, t.1);
            }
        }
        (Kind::Loha { r1, r2 }, ts)
    };
    let keys: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let mut params: Vec<Vec<f32>> = tensors.iter_mut().map(|t| std::mem::take(&mut t.2)).collect();
    if target.swap_halves {
        match kind {
            Kind::Lokr { .. } => super::lokr::swap_halves(kind, &mut params, &what)?,
            _ => super::loha::swap_halves(kind, &mut params, rows),
        }
    }
    let scale = match kind {
        Kind::Lokr { r1, r2, .. } => match (alpha, r2.or(r1)) {
            (Some(a), Some(dim)) => a / dim as f32,
            _ => 1.0,
        },
        Kind::Loha { r1, .. } => alpha.map_or(1.0, |a| a / r1 as f32),
        _ => unreachable!("a LyCORIS kind"),
    };
    let term = Term::lycoris(&target.module, target.rows.clone(), d_in, kind, scale, params);
    Ok((term, keys, alpha))
}

/// A DoRA magnitude as read: per output row of the module (`Term::with_magnitude`) or, for a
/// LyCORIS `dora_scale` [1, d_in], per input column (`Term::with_column_magnitude`).
enum Magnitude {
    Rows(Vec<f32>),
    Columns(Vec<f32>),
}

/// A DoRA magnitude: finite values, in BFL row order. PEFT's `lora_magnitude_vector` is [rows];
/// LyCORIS's `dora_scale` (kohya-style files, ComfyUI) is [rows, 1] when it decomposes per output
/// row (`wd_on_out`, LyCORIS's default and PEFT's rule) and [1, d_in] when per input column
/// (`wd_on_out = false`, `dora_columns.rs`). A module with one row and one input is read per row.
fn read_magnitude(st: &SafeTensors, key: &str, rows: usize, d_in: usize, swap_halves: bool) -> Result<Magnitude> {
    let p = st.path().display();
    let (shape, mut m) = st.read_f32(key)?;
    let columns = if key.ends_with(".dora_scale") {
        if shape == [1, d_in] && shape != [rows, 1] {
            true
        } else if shape == [rows, 1] {
            false
        } else {
            bail!(
                "{p}: DoRA magnitude `{key}` has shape {shape:?}, expected [{rows}, 1] (one per output row of its \
                 module) or [1, {d_in}] (one per input column)"
            );
        }
    } else if shape != [rows] {
        bail!("{p}: DoRA magnitude `{key}` has shape {shape:?}, expected [{rows}] (one per output row of its module)");
    } else {
        false
    };
    if m.iter().any(|x| !x.is_finite()) {
        bail!("{p}: DoRA magnitude `{key}` has non-finite values");
    }
    if columns {
        // The input columns keep their order when diffusers' [scale; shift] rows are swapped.
        return Ok(Magnitude::Columns(m));
    }
    if swap_halves {
        m.rotate_left(rows / 2);
    }
    Ok(Magnitude::Rows(m))
}

/// Parses `FILE[:SCALE]` (a scale after the last colon, when it parses as a number).
pub fn parse_lora_arg(s: &str) -> Result<(PathBuf, f32)> {
    if let Some((f, sc)) = s.rsplit_once(':') {
        if let Ok(v) = sc.parse::<f32>() {
            if !v.is_finite() {
                bail!("--lora {s}: scale must be finite");
            }
            return Ok((PathBuf::from(f), v));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}
