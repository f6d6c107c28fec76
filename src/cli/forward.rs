//! `flux-kernels forward`: one forward pass, `out` [B, N, C] in f32: the CPU reference, or with
//! `--device cuda` the device-resident GPU model.

use super::{open_loras, open_model, ModelSpec};
use crate::device::Device;
use crate::io::lora_formats::UnknownKeys;
use crate::io::safetensors::{write_tensors, Dtype, OutTensor};
use crate::lora::LoraSet;
use crate::model::flux::{flux_forward, FluxInputs};
use crate::model::gpu::{BaseDtype, GpuFlux};
use crate::model::weights::FluxWeights;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub fn run(
    model: &str,
    inputs: &Path,
    out: &Path,
    loras: &[String],
    rope_axes: Option<&str>,
    unknown: UnknownKeys,
    device: &str,
) -> Result<()> {
    let spec = open_model(model, rope_axes)?;
    let ModelSpec::Checkpoint(ckpt) = spec else {
        bail!("--model {model} is a built-in configuration without weights; forward needs a checkpoint");
    };
    let cfg = &ckpt.cfg;
    let weights = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned())?;
    let inp = FluxInputs::from_file(inputs, cfg)?;
    let mut set = LoraSet::new();
    for (f, strength) in open_loras(loras, cfg, unknown)? {
        set.add(&f.deltas, strength);
    }
    set.device = super::device(device)?;
    let y = match &set.device {
        // The whole model device-resident (weights uploaded once, every op a kernel).
        Device::Cuda(_) => {
            let mut m = GpuFlux::new(cfg, &weights, &set.device, BaseDtype::Bf16)?;
            let lora = m.adapters(&set, false)?;
            let y = m.forward(&inp, &lora)?;
            m.download(&y, inp.b * inp.n_img * cfg.out_channels)?
        }
        Device::Cpu => flux_forward(cfg, &weights, &inp, &set)?,
    };
    if let Some(i) = y.iter().position(|v| !v.is_finite()) {
        bail!("the forward pass produced a non-finite value at flat index {i}; nothing written");
    }
    let shape = vec![inp.b, inp.n_img, cfg.out_channels];
    write_tensors(out, &[OutTensor { name: "out", shape, data: &y, dtype: Dtype::F32 }], &BTreeMap::new())
}
