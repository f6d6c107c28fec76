//! `flux-kernels grad`: the gradient of mean((out − target)²) with respect to every factor of
//! one LoRA file (at strength 1), written under that file's own tensor names.

use super::{open_model, parse_unknown, ModelSpec};
use crate::adapters::formats::{load_lora, parse_lora_arg, LoraFile, UnknownKeys};
use crate::adapters::{AdapterSet, Kind};
use crate::engine::{Engine, EngineOptions};
use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use crate::model::config::FluxConfig;
use crate::model::flux::FluxInputs;
use crate::model::weights::FluxWeights;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `forward`'s model, LoRA and inputs, and the target.
#[derive(clap::Args)]
#[group(id = "grad::Args")] // not `Args`, forward's group id
pub struct Args {
    #[command(flatten)]
    pub pass: super::forward::Args,
    /// A safetensors with `target` [B,N,C_in].
    #[arg(long)]
    pub target: PathBuf,
}

pub fn main(a: Args) -> Result<()> {
    let super::forward::Args { m, inputs, out } = &a.pass;
    let unknown = parse_unknown(&m.lora_unknown)?;
    let [lora] = m.lora.as_slice() else {
        bail!("grad takes exactly one --lora FILE (the adapter to differentiate)");
    };
    let (path, scale) = parse_lora_arg(lora)?;
    if scale != 1.0 {
        bail!("grad differentiates at strength 1; drop the :{scale} from --lora");
    }
    let loss = run(&m.model, inputs, &a.target, &path, out, m.rope.rope_axes.as_deref(), unknown, &m.device)?;
    println!("loss {loss:.6e}; wrote {}", out.display());
    Ok(())
}

/// What `grad` and `bench-cpu` differentiate: a checkpoint's weights, inputs, the target and one
/// LoRA file, each checked against the model.
pub struct Problem {
    pub cfg: FluxConfig,
    pub weights: FluxWeights,
    pub inp: FluxInputs,
    pub target: Vec<f32>,
    pub file: LoraFile,
}

pub fn open_problem(
    model: &str,
    inputs: &Path,
    target: &Path,
    lora: &Path,
    rope_axes: Option<&str>,
    unknown: UnknownKeys,
) -> Result<Problem> {
    let ModelSpec::Checkpoint(ckpt) = open_model(model, rope_axes)? else {
        bail!("--model {model} is a built-in configuration without weights; grad and bench-cpu need a checkpoint");
    };
    let cfg = ckpt.cfg.clone();
    let weights = FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned())?;
    let inp = FluxInputs::from_file(inputs, &cfg)?;
    let tf = SafeTensors::open(target)?;
    let want = [inp.b, inp.n_img, cfg.out_channels];
    let info = tf.info("target").with_context(|| format!("{}: missing tensor `target`", target.display()))?;
    if info.shape != want {
        bail!("{}: tensor `target` has shape {:?}, expected {want:?}", target.display(), info.shape);
    }
    let target = tf.read_f32("target")?.1;
    let file = load_lora(lora, &cfg, unknown)?;
    if let Some(t) = file.terms.iter().find(|t| t.kind.is_lycoris()) {
        bail!(
            "{}: `{}` is a {} term; `grad` writes LoRA and DoRA gradients under the file's keys only (the LyCORIS \
             kinds' gradients are checked by tests/lycoris.rs)",
            lora.display(),
            t.module,
            t.kind.name()
        );
    }
    Ok(Problem { cfg, weights, inp, target, file })
}

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
    let Problem { cfg, weights: w, inp, target: tgt, file } =
        open_problem(model, inputs, target, lora, rope_axes, unknown)?;
    let cfg = &cfg;
    let mut set = AdapterSet::new();
    set.add(&file.terms, 1.0);
    // On CUDA this is the device-resident model (bf16 operands), on the CPU the f32 reference.
    let mut engine = Engine::new(&super::device(device)?, cfg, w, EngineOptions::default())?;
    engine.train_adapters(&set, None)?;
    let loss = engine.micro_step(&inp, &tgt, None, 1.0, None)?;
    if !loss.is_finite() {
        bail!("the loss is not finite ({loss}); nothing written");
    }
    // One gradient per parameter in the set's order: dA, dB (and DoRA's dm) of each term, in file order.
    let mut grads = engine.grads()?.into_iter();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (t, k) in file.terms.iter().zip(&file.keys) {
        let g: Vec<Vec<f32>> = grads.by_ref().take(t.params.len()).collect();
        let [da, db, rest @ ..] = g.as_slice() else { bail!("a LoRA term without its gradients") };
        let mut db = db.clone();
        let mut dm = rest.first().cloned();
        if k.swap_halves {
            // Back to the file's [scale; shift] row order.
            let half = t.rows.len() / 2;
            db.rotate_right(half * t.rank());
            // A per-column magnitude keeps its order (it is per input, not per row).
            if !matches!(t.kind, Kind::DoraColumns { .. }) {
                dm.iter_mut().for_each(|v| v.rotate_right(half));
            }
        }
        tensors.push((k.down.clone(), vec![t.rank(), t.d_in], da.clone()));
        tensors.push((k.up.clone(), vec![t.rows.len(), t.rank()], db));
        if let (Some(name), Some(dm)) = (&k.magnitude, dm) {
            // In the file's shape: PEFT's [out], LyCORIS's dora_scale [out, 1] or [1, in].
            let shape = match t.kind {
                Kind::DoraColumns { .. } => vec![1, t.d_in],
                _ if name.ends_with(".dora_scale") => vec![t.rows.len(), 1],
                _ => vec![t.rows.len()],
            };
            tensors.push((name.clone(), shape, dm));
        }
    }
    let outs: Vec<OutTensor> =
        tensors.iter().map(|(n, s, v)| OutTensor { name: n, shape: s.clone(), data: v, dtype: Dtype::F32 }).collect();
    let meta = BTreeMap::from([("loss".to_string(), format!("{loss}"))]);
    write_tensors(out, &outs, &meta)?;
    Ok(loss)
}
