//! Adapters, unmerged: the base weights are never touched, so adapters switch and rescale
//! instantly. A `LoraSet` holds the terms of every loaded (or trained) adapter keyed by the BFL
//! module they act on; `LoraGrads` holds their gradients in the same order.

pub mod config;
pub mod export;

use crate::ops::lora::{Dropout, LoraTerm, TermGrad};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// One low-rank term on (part of) one module, as loaded from a file, before the user's strength.
#[derive(Clone, Debug)]
pub struct LoraDelta {
    /// A [rank, d_in]
    pub a: Arc<Vec<f32>>,
    /// B [rows.len(), rank], rows already in BFL order (diffusers' final-layer halves swapped).
    pub b: Arc<Vec<f32>>,
    pub rank: usize,
    /// alpha / rank (alpha / √rank for rsLoRA).
    pub scale: f32,
    pub rows: Range<usize>,
}

/// The adapters of one forward/backward call, and the device their linears run on (the set is
/// the context every `Linear` receives, so it also says where the product is computed).
#[derive(Clone, Default)]
pub struct LoraSet {
    terms: HashMap<String, Vec<LoraDelta>>,
    /// Training only: dropout probability on every adapter input and this step's mask seed.
    dropout: Option<(f32, u64)>,
    pub device: crate::device::Device,
}

impl LoraSet {
    pub fn new() -> LoraSet {
        LoraSet::default()
    }

    /// Adds every delta of one adapter file at strength `strength`.
    pub fn add(&mut self, deltas: &[(String, LoraDelta)], strength: f32) {
        for (module, d) in deltas {
            let mut d = d.clone();
            d.scale *= strength;
            self.terms.entry(module.clone()).or_default().push(d);
        }
    }

    /// LoRA dropout with probability `p`, masks drawn from `seed` (one seed per step; every
    /// module and term gets its own stream from it).
    pub fn set_dropout(&mut self, p: f32, seed: u64) {
        self.dropout = if p > 0.0 { Some((p, seed)) } else { None };
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The dropout probability and step seed, when set.
    pub fn dropout(&self) -> Option<(f32, u64)> {
        self.dropout
    }

    /// Every module with terms, and its deltas in order.
    pub fn modules(&self) -> impl Iterator<Item = (&String, &Vec<LoraDelta>)> {
        self.terms.iter()
    }

    /// The terms on module `name`, ready for `lora_linear_forward`.
    pub fn terms(&self, name: &str) -> Vec<LoraTerm<'_>> {
        let Some(v) = self.terms.get(name) else { return Vec::new() };
        v.iter()
            .enumerate()
            .map(|(i, d)| LoraTerm {
                a: &d.a,
                b: &d.b,
                rank: d.rank,
                scale: d.scale,
                rows: d.rows.clone(),
                dropout: self.dropout.map(|(p, seed)| Dropout { p, seed: term_seed(seed, name, i) }),
            })
            .collect()
    }
}

/// The dropout seed of term `i` on module `name` for step seed `seed`: FNV-1a over the name,
/// folded with the others (the GPU model draws the same masks from it).
pub fn term_seed(seed: u64, name: &str, i: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes().chain((i as u64).to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Gradients of every term of a `LoraSet`, keyed and ordered like its terms.
#[derive(Clone, Default)]
pub struct LoraGrads {
    pub by_module: HashMap<String, Vec<TermGrad>>,
}

impl LoraGrads {
    /// The accumulators of module `name`'s `n` terms (created zeroed on first use).
    pub fn slot(&mut self, name: &str, n: usize) -> &mut [TermGrad] {
        let v = self.by_module.entry(name.to_string()).or_default();
        if v.len() < n {
            v.resize(n, TermGrad::default());
        }
        &mut v[..n]
    }

    pub fn get(&self, name: &str, i: usize) -> Option<&TermGrad> {
        self.by_module.get(name).and_then(|v| v.get(i))
    }
}
