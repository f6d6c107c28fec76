//! Resumable training state: every LoRA factor, AdamW's moments, the step and the config. The
//! run's randomness is a pure function of (seed, micro-batch index), so (seed, step) is its whole
//! RNG state and a resumed run continues bit for bit.

use super::config::TrainConfig;
use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use crate::ops::optim::AdamW;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub struct State {
    pub step: usize,
    /// Factors in optimizer order: A0, B0, A1, B1, …
    pub params: Vec<Vec<f32>>,
    pub opt: AdamW,
    pub config: TrainConfig,
    /// Adapter names and ranks, to refuse a checkpoint of a different adapter layout.
    pub layout: Vec<String>,
}

const FILE: &str = "state.safetensors";

/// The first tensor of the state (`param.3`, `adam_v.0`) with a NaN or infinity, if any.
fn first_non_finite(s: &State) -> Option<String> {
    let groups = [("param", &s.params), ("adam_m", &s.opt.m), ("adam_v", &s.opt.v)];
    groups
        .iter()
        .find_map(|(kind, ts)| ts.iter().position(|t| t.iter().any(|x| !x.is_finite())).map(|i| format!("{kind}.{i}")))
}

/// Moments the same size as their parameters, one pair per parameter.
fn check_consistent(s: &State, file: &Path) -> Result<()> {
    let (n, nm, nv) = (s.params.len(), s.opt.m.len(), s.opt.v.len());
    if nm != n || nv != n {
        bail!("{}: {n} parameters but {nm} first and {nv} second AdamW moments", file.display());
    }
    for (i, p) in s.params.iter().enumerate() {
        for (kind, t) in [("adam_m", &s.opt.m[i]), ("adam_v", &s.opt.v[i])] {
            if t.len() != p.len() {
                bail!(
                    "{}: tensor `{kind}.{i}` holds {} values but `param.{i}` holds {}: the AdamW state does not \
                     match the parameters",
                    file.display(),
                    t.len(),
                    p.len()
                );
            }
        }
    }
    Ok(())
}

/// Writes the state atomically. A state with a NaN or infinity is refused, so the checkpoint on
/// disk stays the last good one (the trainer points the user to it).
pub fn save(dir: &Path, s: &State) -> Result<()> {
    let file = dir.join(FILE);
    check_consistent(s, &file)?;
    if let Some(t) = first_non_finite(s) {
        bail!(
            "step {}: tensor `{t}` of the training state is not finite; not writing it over the checkpoint in {}",
            s.step,
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint folder {}", dir.display()))?;
    let mut names = Vec::new();
    for i in 0..s.params.len() {
        names.push((format!("param.{i}"), &s.params[i]));
        names.push((format!("adam_m.{i}"), &s.opt.m[i]));
        names.push((format!("adam_v.{i}"), &s.opt.v[i]));
    }
    let tensors: Vec<OutTensor> =
        names.iter().map(|(n, v)| OutTensor { name: n, shape: vec![v.len()], data: v, dtype: Dtype::F32 }).collect();
    let meta = BTreeMap::from([
        ("step".to_string(), s.step.to_string()),
        ("adam_t".to_string(), s.opt.t.to_string()),
        ("config".to_string(), serde_json::to_string(&s.config)?),
        ("layout".to_string(), serde_json::to_string(&s.layout)?),
    ]);
    write_tensors(&dir.join(FILE), &tensors, &meta)
}

pub fn load(dir: &Path) -> Result<State> {
    let path = dir.join(FILE);
    let st = SafeTensors::open(&path).with_context(|| format!("cannot resume from {}", dir.display()))?;
    let meta = st.metadata();
    let get = |k: &str| meta.get(k).with_context(|| format!("{}: metadata `{k}` missing", path.display()));
    let step: usize = get("step")?.parse().context("step")?;
    let t: u64 = get("adam_t")?.parse().context("adam_t")?;
    let config: TrainConfig = serde_json::from_str(get("config")?).context("config")?;
    let layout: Vec<String> = serde_json::from_str(get("layout")?).context("layout")?;
    let n = st.tensors().keys().filter(|k| k.starts_with("param.")).count();
    let read = |k: String| {
        if st.info(&k).is_none() {
            bail!("{}: tensor `{k}` is missing (a checkpoint holds param.i, adam_m.i and adam_v.i)", path.display());
        }
        st.read_f32(&k).map(|x| x.1)
    };
    let mut params = Vec::new();
    let mut opt = AdamW::new(&[], config.adam_beta1, config.adam_beta2, config.adam_eps, config.weight_decay);
    for i in 0..n {
        params.push(read(format!("param.{i}"))?);
        opt.m.push(read(format!("adam_m.{i}"))?);
        opt.v.push(read(format!("adam_v.{i}"))?);
    }
    opt.t = t;
    if params.is_empty() {
        bail!("{}: no parameters in the checkpoint", path.display());
    }
    let state = State { step, params, opt, config, layout };
    check_consistent(&state, &path)?;
    if let Some(t) = first_non_finite(&state) {
        bail!("{}: tensor `{t}` is not finite (NaN or infinity); this state cannot be resumed", path.display());
    }
    // Every tensor was read above; one beyond param/adam_m/adam_v 0..n means a mixed-up file.
    let expected = 3 * state.params.len();
    if st.tensors().len() != expected {
        let extra: Vec<&String> = st
            .tensors()
            .keys()
            .filter(|k| {
                let (kind, i) = k.split_once('.').unwrap_or((k, ""));
                !(["param", "adam_m", "adam_v"].contains(&kind)
                    && i.parse::<usize>().is_ok_and(|i| i < state.params.len()))
            })
            .collect();
        bail!("{}: unexpected tensors {extra:?} beside the {} parameters", path.display(), state.params.len());
    }
    Ok(state)
}
