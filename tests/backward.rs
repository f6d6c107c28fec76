//! The whole-model backward against finite differences: every LoRA term on every kind of module
//! (fused qkv slices, linear1 parts, modulation, embedders, the final layer), with dropout.

mod common;
use common::*;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::{AdapterSet, Term};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::{flux_backward, flux_forward, flux_forward_train, FluxInputs};
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::util::{rel_l2, Rng};
use std::sync::Arc;

fn set_of(deltas: &[Term], dropout: Option<(f32, u64)>) -> AdapterSet {
    let mut s = AdapterSet::new();
    s.add(deltas, 1.0);
    if let Some((p, seed)) = dropout {
        s.set_dropout(p, seed);
    }
    s
}

fn check(dropout: Option<(f32, u64)>) {
    let ckpt = Checkpoint::open(&fixture("tiny-bfl.safetensors"), Some(TINY_AXES.to_vec())).unwrap();
    let cfg = &ckpt.cfg;
    let w = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), cfg).unwrap();
    // PEFT targets every diffusers linear (q/k/v slices, modulation, embedders, final layer);
    // kohya adds fused-qkv and linear1 terms on top.
    let mut deltas = load_lora(&fixture("lora-peft.safetensors"), cfg, UnknownKeys::Error).unwrap().terms;
    deltas.extend(load_lora(&fixture("lora-kohya.safetensors"), cfg, UnknownKeys::Error).unwrap().terms);
    let mut rng = Rng::new(5);
    let dy = rng.normal_vec(inp.b * inp.n_img * cfg.out_channels, 1.0);

    let set = set_of(&deltas, dropout);
    let (_, cache) = flux_forward_train(cfg, &w, &inp, &set).unwrap();
    let grads = flux_backward(cfg, &w, &inp, &cache, &dy, &set).unwrap();
    let loss = |d: &[Term]| {
        let y = flux_forward(cfg, &w, &inp, &set_of(d, dropout)).unwrap();
        y.iter().zip(&dy).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
    };

    // Term index within its module, in AdapterSet order.
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let (mut ana, mut num) = (Vec::new(), Vec::new());
    for i in 0..deltas.len() {
        let module = deltas[i].module.clone();
        let ti = *seen.entry(module.clone()).and_modify(|x| *x += 1).or_insert(0);
        let g = grads.get(&module, ti).unwrap_or_else(|| panic!("no gradient for {module}"));
        #[allow(clippy::needless_range_loop)] // `which` indexes the term's parameters and the copy
        for which in 0..2 {
            let n = deltas[i].params[which].len();
            let j = (rng.next_u64() as usize) % n;
            let mut d = deltas.clone();
            let v = Arc::make_mut(&mut d[i].params[which]);
            let x0 = v[j];
            let h = 1e-2 * x0.abs().max(0.05);
            v[j] = x0 + h;
            let lp = loss(&d);
            let v = Arc::make_mut(&mut d[i].params[which]);
            v[j] = x0 - h;
            let lm = loss(&d);
            num.push(((lp - lm) / (2.0 * h as f64)) as f32);
            ana.push(g[which][j]);
        }
    }
    let err = rel_l2(&ana, &num);
    println!("{} sampled LoRA elements, rel L2 vs finite differences {err:.2e}", ana.len());
    assert!(err < 5e-3, "rel L2 {err:e}\nanalytic {ana:?}\nnumeric {num:?}");
}

#[test]
fn lora_gradients_match_finite_differences() {
    check(None);
}

#[test]
fn lora_gradients_with_dropout_match_finite_differences() {
    check(Some((0.25, 1234)));
}
