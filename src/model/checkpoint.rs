//! Opening a FLUX transformer checkpoint in either layout, inferring its architecture and
//! validating every tensor before anything is computed.

use super::layout::{diffusers_module, diffusers_param};
use crate::io::read_json;
use crate::io::safetensors::{Dtype, SafeTensors, ShardIndex};
use crate::model::config::{infer_from_shapes, FluxConfig, ModuleKind};
use crate::model::param::{Param, Piece};
use crate::quant::load::{is_ignored_companion, piece as quant_piece};
use crate::quant::{Code, QuantParam};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Some single-file bundles (ComfyUI "checkpoint" files) prefix every key with this.
pub use crate::io::BFL_BUNDLE_PREFIX;

#[derive(Clone, Debug, PartialEq)]
pub enum Layout {
    /// BFL's single file, optionally with the bundle prefix.
    Bfl { prefixed: bool },
    /// diffusers' transformer folder (config.json + one or more shards).
    Diffusers,
}

pub struct Checkpoint {
    pub path: PathBuf,
    pub cfg: FluxConfig,
    pub layout: Layout,
    pub files: Vec<SafeTensors>,
    /// Every parameter under its BFL name (`double_blocks.0.img_attn.qkv.weight`).
    pub params: HashMap<String, Param>,
    /// Parameter count per stored dtype.
    pub dtype_params: BTreeMap<&'static str, usize>,
}

impl Checkpoint {
    pub fn bytes_on_disk(&self) -> usize {
        self.files.iter().map(|f| f.file_size()).sum()
    }

    pub fn param(&self, name: &str) -> Result<&Param> {
        self.params.get(name).with_context(|| format!("{}: no parameter `{name}`", self.path.display()))
    }

    /// Opens a BFL `.safetensors` file, a diffusers transformer folder, or a FLUX.1 repository
    /// folder holding `transformer/`.
    pub fn open(path: &Path, rope_axes: Option<Vec<usize>>) -> Result<Checkpoint> {
        if path.is_dir() {
            let sub = path.join("transformer");
            let dir = if sub.join("config.json").exists() { sub } else { path.to_path_buf() };
            open_diffusers(&dir, rope_axes)
        } else if path.exists() {
            open_bfl(path, rope_axes)
        } else if let Some(spec) = path.to_str().and_then(|s| s.strip_prefix(RANDOM_PREFIX)) {
            random(spec, rope_axes)
        } else {
            bail!("model path {} does not exist", path.display())
        }
    }
}

/// The stored dtype, if the model can hold it: any float, and int8 for linear weights (which
/// need their scale companion; `quant::load` checks that).
/// `--model random:NAME[:SEED]`: a built-in configuration with weights generated on read.
pub const RANDOM_PREFIX: &str = "random:";

fn random(spec: &str, rope_axes: Option<Vec<usize>>) -> Result<Checkpoint> {
    let (name, seed) = match spec.split_once(':') {
        Some((n, s)) => {
            let seed = s
                .parse::<u64>()
                .with_context(|| format!("--model {RANDOM_PREFIX}{spec}: seed `{s}` is not a number"))?;
            (n, seed)
        }
        None => (spec, 0),
    };
    let mut cfg = FluxConfig::named(name).with_context(|| {
        format!(
            "--model {RANDOM_PREFIX}{spec}: `{name}` is not a built-in configuration (flux1-dev, flux1-schnell, tiny)"
        )
    })?;
    if let Some(a) = rope_axes {
        cfg.rope_axes = a;
        cfg.validate()?;
    }
    let params = crate::model::random::random_params(&cfg, seed);
    let dtype_params = BTreeMap::from([("random (generated on read)", cfg.param_count())]);
    let path = PathBuf::from(format!("{RANDOM_PREFIX}{spec}"));
    Ok(Checkpoint { path, cfg, layout: Layout::Bfl { prefixed: false }, files: vec![], params, dtype_params })
}

fn check_dtype(file: &SafeTensors, key: &str) -> Result<Dtype> {
    let info = file.info(key).unwrap();
    match info.dtype {
        Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F8E4M3 => Ok(info.dtype),
        Dtype::I8 if info.shape.len() == 2 => Ok(info.dtype),
        other => bail!(
            "{}: tensor `{key}` has dtype {}; model weights must be BF16, F16, F32 or F8_E4M3 (I8 only for \
             2-D linear weights with a scale)",
            file.path().display(),
            other.name()
        ),
    }
}

/// An 8-bit 2-D weight stays 8-bit in memory; everything else is decoded to f32 when used.
fn is_quantised(file: &SafeTensors, key: &str) -> bool {
    let info = file.info(key).unwrap();
    Code::from_dtype(info.dtype).is_some() && info.shape.len() == 2
}

fn list_some(names: &[String]) -> String {
    let mut s = names.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s += &format!(" and {} more", names.len() - 5);
    }
    s
}

fn open_bfl(path: &Path, rope_axes: Option<Vec<usize>>) -> Result<Checkpoint> {
    let file = SafeTensors::open(path)?;
    let keys: Vec<&String> = file.tensors().keys().collect();
    let prefixed = keys.iter().any(|k| k.starts_with(BFL_BUNDLE_PREFIX));
    if !prefixed && keys.iter().any(|k| k.starts_with("transformer_blocks.") || k.as_str() == "x_embedder.weight") {
        bail!(
            "{}: this is a diffusers-layout transformer; pass the folder holding it with its config.json",
            path.display()
        );
    }
    let mut stored: HashMap<String, String> = HashMap::new();
    let mut foreign = Vec::new();
    for k in keys {
        match (prefixed, k.strip_prefix(BFL_BUNDLE_PREFIX)) {
            (true, Some(s)) => {
                stored.insert(s.to_string(), k.clone());
            }
            (true, None) => foreign.push(k.clone()),
            (false, _) => {
                stored.insert(k.clone(), k.clone());
            }
        }
    }
    if !foreign.is_empty() {
        bail!(
            "{}: unexpected tensors outside `{BFL_BUNDLE_PREFIX}` (a bundle with a VAE or text encoders?): {}",
            path.display(),
            list_some(&foreign)
        );
    }
    stored.retain(|name, _| !is_ignored_companion(name));
    let names: Vec<(String, String)> = stored.iter().map(|(n, k)| (n.clone(), k.clone())).collect();
    let shape_of =
        |n: &str| -> Result<Option<Vec<usize>>> { Ok(stored.get(n).map(|k| file.info(k).unwrap().shape.clone())) };
    // Scale companions are looked up by stored key and removed from `stored` once used.
    let stored_keys: std::collections::HashSet<String> = stored.values().cloned().collect();
    let lookup = |k: &str| stored_keys.contains(k).then(|| file.clone());
    let cfg = infer_from_shapes(&shape_of, &names, rope_axes).with_context(|| format!("{}", path.display()))?;
    let mut params = HashMap::new();
    let mut dtype_params = BTreeMap::new();
    let mut missing = Vec::new();
    for (name, shape) in cfg.tensors() {
        let Some(key) = stored.remove(&name) else {
            missing.push(name);
            continue;
        };
        let info = file.info(&key).unwrap();
        if info.shape != shape {
            bail!("{}: tensor `{key}` has shape {:?}, expected {:?}", path.display(), info.shape, shape);
        }
        let dt = check_dtype(&file, &key)?;
        *dtype_params.entry(dt.name()).or_insert(0) += info.numel();
        let param = if is_quantised(&file, &key) {
            let (piece, scale_key) = quant_piece(&file, &key, 0..shape[0], &lookup)?;
            if let Some(k) = scale_key {
                stored.retain(|_, v| *v != k);
            }
            Param::Quant(QuantParam { pieces: vec![piece], k: shape[1] })
        } else {
            let piece = Piece { file: file.clone(), key, rows: 0..shape[0] };
            Param::Mapped { pieces: vec![piece], numel: shape.iter().product() }
        };
        params.insert(name, param);
    }
    if !missing.is_empty() {
        bail!("{}: missing tensors {}", path.display(), list_some(&missing));
    }
    if !stored.is_empty() {
        let mut extra: Vec<String> = stored.into_values().collect();
        extra.sort();
        bail!("{}: unexpected tensors {}", path.display(), list_some(&extra));
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        cfg,
        layout: Layout::Bfl { prefixed },
        files: vec![file],
        params,
        dtype_params,
    })
}

/// The fields of a diffusers `FluxTransformer2DModel` config.json that are read: the RoPE split,
/// and the sizes checked against what the weights say (the architecture itself is inferred from
/// the tensor shapes).
#[derive(Deserialize)]
struct DiffusersConfig {
    axes_dims_rope: Option<Vec<usize>>,
    num_layers: Option<usize>,
    num_single_layers: Option<usize>,
    attention_head_dim: Option<usize>,
    num_attention_heads: Option<usize>,
    joint_attention_dim: Option<usize>,
    pooled_projection_dim: Option<usize>,
    in_channels: Option<usize>,
    guidance_embeds: Option<bool>,
}

fn open_diffusers(dir: &Path, rope_axes: Option<Vec<usize>>) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let config: DiffusersConfig = read_json(&cfg_path)?;
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let shard_names: Vec<String> = if index.exists() {
        let mut v: Vec<String> = ShardIndex::read(&index)?.weight_map.into_values().collect();
        v.sort();
        v.dedup();
        v
    } else {
        vec!["diffusion_pytorch_model.safetensors".to_string()]
    };
    let mut files = Vec::new();
    let mut key_file: HashMap<String, usize> = HashMap::new();
    for s in &shard_names {
        let p = dir.join(s);
        if !p.exists() {
            bail!("{}: shard {} is missing", dir.display(), p.display());
        }
        let f = SafeTensors::open(&p)?;
        for k in f.tensors().keys() {
            if let Some(prev) = key_file.insert(k.clone(), files.len()) {
                bail!("tensor `{k}` is stored twice, in {} and {}", shard_names[prev], s);
            }
        }
        files.push(f);
    }
    let shape_dif = |k: &str| key_file.get(k).map(|&i| (files[i].path(), files[i].info(k).unwrap().shape.clone()));
    // Infer the architecture through the same BFL-named rules as a BFL file: a BFL tensor's shape
    // is its diffusers parts' rows stacked. Every part must have the rank of the BFL tensor
    // (a 0-d `to_q.weight` is an error naming it, not an index out of bounds) and the same
    // trailing dims as the first part; the row sum is checked.
    let probe = FluxConfig::flux1_dev();
    let shape_of = |bfl_key: &str| -> Result<Option<Vec<usize>>> {
        let Some((module, param)) = bfl_key.rsplit_once('.') else { return Ok(None) };
        let (kind, rank) = match param {
            "scale" => (ModuleKind::Norm { dim: 0 }, 1),
            "bias" => (ModuleKind::Linear { d_out: 0, d_in: 0, bias: true }, 1),
            _ => (ModuleKind::Linear { d_out: 0, d_in: 0, bias: true }, 2),
        };
        let Some(d) = diffusers_module(module, &probe) else { return Ok(None) };
        let mut shape: Option<Vec<usize>> = None;
        for p in &d.parts {
            let key = format!("{}.{}", p.name, diffusers_param(kind, param));
            let Some((file, s)) = shape_dif(&key) else { return Ok(None) };
            if s.len() != rank || s[0] == 0 {
                bail!(
                    "{}: tensor `{key}` has shape {s:?}, expected {rank} dimension(s) with at least one row \
                     (a part of BFL's `{bfl_key}`)",
                    file.display()
                );
            }
            shape = Some(match shape {
                None => s,
                Some(mut acc) => {
                    if acc[1..] != s[1..] {
                        bail!(
                            "{}: tensor `{key}` has shape {s:?}, but the other parts of BFL's `{bfl_key}` have \
                             {:?} after the rows",
                            file.display(),
                            &acc[1..]
                        );
                    }
                    acc[0] = acc[0]
                        .checked_add(s[0])
                        .with_context(|| format!("{}: tensor `{key}`: row count overflows", file.display()))?;
                    acc
                }
            });
        }
        Ok(shape)
    };
    let names: Vec<(String, String)> = key_file
        .keys()
        .filter_map(|k| {
            let bfl = if let Some(r) = k.strip_prefix("transformer_blocks.") {
                format!("double_blocks.{r}")
            } else {
                format!("single_blocks.{}", k.strip_prefix("single_transformer_blocks.")?)
            };
            Some((bfl, format!("{k} (in {})", files[key_file[k]].path().display())))
        })
        .collect();
    let cfg_axes = config.axes_dims_rope;
    let axes = match (rope_axes, cfg_axes) {
        (Some(a), Some(c)) if a != c => {
            bail!("--rope-axes {a:?} contradicts axes_dims_rope {c:?} in {}", cfg_path.display())
        }
        (a, c) => a.or(c),
    };
    let cfg = infer_from_shapes(&shape_of, &names, axes).with_context(|| format!("{}", dir.display()))?;
    let cross = [
        ("num_layers", config.num_layers, cfg.depth),
        ("num_single_layers", config.num_single_layers, cfg.depth_single),
        ("attention_head_dim", config.attention_head_dim, cfg.head_dim),
        ("num_attention_heads", config.num_attention_heads, cfg.num_heads),
        ("joint_attention_dim", config.joint_attention_dim, cfg.context_in_dim),
        ("pooled_projection_dim", config.pooled_projection_dim, cfg.vec_in_dim),
        ("in_channels", config.in_channels, cfg.in_channels),
    ];
    for (field, v, got) in cross {
        if let Some(v) = v.filter(|&v| v != got) {
            bail!("{}: {field} = {v} but the weights say {got}", cfg_path.display());
        }
    }
    if let Some(g) = config.guidance_embeds.filter(|&g| g != cfg.guidance_embed) {
        bail!("{}: guidance_embeds = {g} but the weights say {}", cfg_path.display(), cfg.guidance_embed);
    }

    let mut used: HashMap<String, ()> = HashMap::new();
    let mut params = HashMap::new();
    let mut dtype_params = BTreeMap::new();
    let mut missing = Vec::new();
    for m in cfg.modules() {
        let d = diffusers_module(&m.name, &cfg).expect("every module maps");
        let bfl_params: Vec<(&str, usize)> = match m.kind {
            ModuleKind::Linear { d_in, bias, .. } => {
                let mut v = vec![("weight", d_in)];
                if bias {
                    v.push(("bias", 0));
                }
                v
            }
            ModuleKind::Norm { .. } => vec![("scale", 0)],
        };
        for (param, cols) in bfl_params {
            let mut pieces = Vec::new();
            let mut qpieces = Vec::new();
            let mut numel = 0;
            for p in &d.parts {
                let key = format!("{}.{}", p.name, diffusers_param(m.kind, param));
                let Some(&fi) = key_file.get(&key) else {
                    missing.push(key);
                    continue;
                };
                let info = files[fi].info(&key).unwrap();
                let want: Vec<usize> = if cols > 0 { vec![p.rows, cols] } else { vec![p.rows] };
                if info.shape != want {
                    bail!(
                        "{}: tensor `{key}` has shape {:?}, expected {:?}",
                        files[fi].path().display(),
                        info.shape,
                        want
                    );
                }
                let dt = check_dtype(&files[fi], &key)?;
                *dtype_params.entry(dt.name()).or_insert(0) += info.numel();
                numel += info.numel();
                used.insert(key.clone(), ());
                if is_quantised(&files[fi], &key) {
                    let lookup = |k: &str| key_file.get(k).map(|&i| files[i].clone());
                    // BFL's [shift; scale] is diffusers' [scale; shift]: the second half comes first.
                    let split = if d.swap_halves { p.rows / 2 } else { 0 };
                    for rows in [split..p.rows, 0..split].into_iter().filter(|r| !r.is_empty()) {
                        let (piece, scale_key) = quant_piece(&files[fi], &key, rows, &lookup)?;
                        if let Some(k) = scale_key {
                            used.insert(k, ());
                        }
                        qpieces.push(piece);
                    }
                } else if d.swap_halves {
                    let half = p.rows / 2;
                    pieces.push(Piece { file: files[fi].clone(), key: key.clone(), rows: half..p.rows });
                    pieces.push(Piece { file: files[fi].clone(), key, rows: 0..half });
                } else {
                    pieces.push(Piece { file: files[fi].clone(), key, rows: 0..p.rows });
                }
            }
            let bfl = format!("{}.{}", m.name, param);
            let p = match (pieces.is_empty(), qpieces.is_empty()) {
                (_, true) => Param::Mapped { pieces, numel },
                (true, false) => Param::Quant(QuantParam { pieces: qpieces, k: cols }),
                (false, false) => bail!(
                    "{}: the parts of `{bfl}` mix 8-bit and 16/32-bit dtypes; quantise all of them or none",
                    dir.display()
                ),
            };
            params.insert(bfl, p);
        }
    }
    if !missing.is_empty() {
        bail!("{}: missing tensors {}", dir.display(), list_some(&missing));
    }
    let mut extra: Vec<String> =
        key_file.keys().filter(|k| !used.contains_key(*k) && !is_ignored_companion(k)).cloned().collect();
    if !extra.is_empty() {
        extra.sort();
        bail!("{}: unexpected tensors {}", dir.display(), list_some(&extra));
    }
    Ok(Checkpoint { path: dir.to_path_buf(), cfg, layout: Layout::Diffusers, files, params, dtype_params })
}
