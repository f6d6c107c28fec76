//! The reference model on random weights: a schnell-like model without guidance embedding, and
//! memory-mapped parameters giving exactly what owned ones give.

mod common;
use common::*;
use flux_kernels::adapters::AdapterSet;
use flux_kernels::io::safetensors::{write_tensors, Dtype, OutTensor};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::config::FluxConfig;
use flux_kernels::model::flux::{flux_forward, FluxInputs};
use flux_kernels::model::weights::FluxWeights;
use std::collections::BTreeMap;

fn tiny_schnell() -> FluxConfig {
    FluxConfig {
        in_channels: 8,
        out_channels: 8,
        context_in_dim: 24,
        vec_in_dim: 12,
        hidden_size: 32,
        num_heads: 2,
        head_dim: 16,
        mlp_hidden: 128,
        depth: 1,
        depth_single: 2,
        time_dim: 256,
        guidance_embed: false,
        qkv_bias: true,
        rope_axes: TINY_AXES.to_vec(),
        theta: 10_000.0,
    }
}

#[test]
fn schnell_like_model_without_guidance_from_a_written_file() {
    let cfg = tiny_schnell();
    let dir = tmpdir("model-schnell");
    let tensors = FluxWeights::random_tensors(&cfg, 42);
    let path = dir.join("schnell.safetensors");
    let out: Vec<OutTensor> =
        tensors.iter().map(|(n, s, d)| OutTensor { name: n, shape: s.clone(), data: d, dtype: Dtype::F32 }).collect();
    write_tensors(&path, &out, &BTreeMap::new()).unwrap();

    let ckpt = Checkpoint::open(&path, Some(TINY_AXES.to_vec())).unwrap();
    assert_eq!(ckpt.cfg, cfg, "architecture inferred from the file");

    let with_g = fixture("tiny-inputs.safetensors");
    let e = err_string(FluxInputs::from_file(&with_g, &cfg));
    assert!(e.contains("`guidance`") && e.contains("no guidance embedding"), "{e}");
    let no_g = dir.join("inputs.safetensors");
    rewrite(&with_g, &no_g, |t| t.retain(|e| e.0 != "guidance"));
    let inp = FluxInputs::from_file(&no_g, &cfg).unwrap();

    let mapped = FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let owned = FluxWeights::from_tensors(&cfg, tensors).unwrap();
    let a = flux_forward(&cfg, &mapped, &inp, &AdapterSet::new()).unwrap();
    let b = flux_forward(&cfg, &owned, &inp, &AdapterSet::new()).unwrap();
    assert_eq!(a.len(), 2 * 16 * 8);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b, "memory-mapped and owned parameters must agree bit for bit");
}

#[test]
fn batch_elements_are_independent() {
    // Sample 1 of a batch of 2 equals that sample run alone: no mixing across the batch axis.
    let ckpt = Checkpoint::open(&fixture("tiny-bfl.safetensors"), Some(TINY_AXES.to_vec())).unwrap();
    let cfg = &ckpt.cfg;
    let w = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let full = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), cfg).unwrap();
    let both = flux_forward(cfg, &w, &full, &AdapterSet::new()).unwrap();
    let pick = |v: &[f32], per: usize| v[per..2 * per].to_vec();
    let one = FluxInputs {
        b: 1,
        img: pick(&full.img, 16 * 8),
        img_ids: pick(&full.img_ids, 16 * 3),
        txt: pick(&full.txt, 5 * 24),
        txt_ids: pick(&full.txt_ids, 5 * 3),
        y: pick(&full.y, 12),
        timesteps: pick(&full.timesteps, 1),
        guidance: full.guidance.as_ref().map(|g| pick(g, 1)),
        ..full.clone()
    };
    let alone = flux_forward(cfg, &w, &one, &AdapterSet::new()).unwrap();
    assert!(flux_kernels::util::rel_l2(&alone, &both[16 * 8..]) < 1e-6);
}
