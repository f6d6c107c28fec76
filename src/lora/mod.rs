//! Adapters at inference, unmerged: the base weights are never touched, so adapters switch
//! and rescale instantly. A `LoraSet` holds the terms of every loaded file, keyed by the BFL
//! module they act on.

use crate::ops::lora::LoraTerm;
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

#[derive(Clone, Default)]
pub struct LoraSet {
    terms: HashMap<String, Vec<LoraDelta>>,
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

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The terms on module `name`, ready for `lora_linear_forward`.
    pub fn terms(&self, name: &str) -> Vec<LoraTerm<'_>> {
        self.terms
            .get(name)
            .map(|v| {
                v.iter()
                    .map(|d| LoraTerm {
                        a: &d.a,
                        b: &d.b,
                        rank: d.rank,
                        scale: d.scale,
                        rows: d.rows.clone(),
                        dropout: None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
