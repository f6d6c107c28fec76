//! `flux-kernels grad`: the gradient of mean((out − target)²) with respect to every factor of
//! one LoRA file (at strength 1), written under that file's own tensor names.

use super::{open_model, ModelSpec};
use crate::io::lora_formats::{load_lora, UnknownKeys};
use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use crate::lora::LoraSet;
use crate::model::flux::{flux_backward, flux_forward_train, FluxInputs};
use crate::model::weights::FluxWeights;
use crate::ops::loss::{mse_backward, mse_forward};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub fn run(
    model: &str,
    inputs: &Path,
    target: &Path,
    lora: &Path,
    out: &Path,
    rope_axes: Option<&str>,
    unknown: UnknownKeys,
    device: &str,
) -> Result<f64> {
    let ModelSpec::Checkpoint(ckpt) = open_model(model, rope_axes)? else {
        bail!("--model {model} is a built-in configuration without weights; grad needs a checkpoint");
    };
    let cfg = &ckpt.cfg;
    let w = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned())?;
    let inp = FluxInputs::from_file(inputs, cfg)?;
    let tf = SafeTensors::open(target)?;
    let want = [inp.b, inp.n_img, cfg.out_channels];
    let info = tf.info("target").with_context(|| format!("{}: missing tensor `target`", target.display()))?;
    if info.shape != want {
        bail!("{}: tensor `target` has shape {:?}, expected {want:?}", target.display(), info.shape);
    }
    let tgt = tf.read_f32("target")?.1;
    let file = load_lora(lora, cfg, unknown)?;
    let mut set = LoraSet::new();
    set.add(&file.deltas, 1.0);
    set.device = super::device(device)?;

    let (pred, cache) = flux_forward_train(cfg, &w, &inp, &set)?;
    let loss = mse_forward(&pred, &tgt, None);
    if !loss.is_finite() {
        bail!("the loss is not finite ({loss}); nothing written");
    }
    let mut dpred = vec![0f32; pred.len()];
    mse_backward(&mut dpred, &pred, &tgt, None);
    let grads = flux_backward(cfg, &w, &inp, &cache, &dpred, &set)?;

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for ((module, d), k) in file.deltas.iter().zip(&file.keys) {
        let ti = *seen.entry(module).and_modify(|x| *x += 1).or_insert(0);
        let g = grads.get(module, ti).with_context(|| format!("no gradient reached `{module}`"))?;
        let mut db = g.db.clone();
        if k.swap_halves {
            // Back to the file's [scale; shift] row order.
            let half = d.rows.len() / 2 * d.rank;
            db.rotate_right(half);
        }
        tensors.push((k.down.clone(), vec![d.rank, d.a.len() / d.rank], g.da.clone()));
        tensors.push((k.up.clone(), vec![d.rows.len(), d.rank], db));
    }
    let outs: Vec<OutTensor> =
        tensors.iter().map(|(n, s, v)| OutTensor { name: n, shape: s.clone(), data: v, dtype: Dtype::F32 }).collect();
    let meta = BTreeMap::from([("loss".to_string(), format!("{loss}"))]);
    write_tensors(out, &outs, &meta)?;
    Ok(loss)
}
