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

pub fn save(dir: &Path, s: &State) -> Result<()> {
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
    let read = |k: String| st.read_f32(&k).map(|x| x.1);
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
    Ok(State { step, params, opt, config, layout })
}
