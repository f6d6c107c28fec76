//! A quantised weight as the model holds it: 8-bit rows (memory-mapped from a file, or owned
//! after quantising in memory) with their scales, viewed as a `QWeight` for the matmul without
//! copying the bytes.

use super::matmul::{QRows, QWeight};
use super::scheme::{quantize, Code, Scale, Scheme};
use crate::io::safetensors::SafeTensors;
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// Where a stored tensor's codes are.
#[derive(Clone)]
pub enum Codes {
    Mapped { file: SafeTensors, key: String },
    Owned(Arc<Vec<u8>>),
}

/// Rows `rows` of one stored [rows_total, k] tensor of codes, with that tensor's scale.
#[derive(Clone)]
pub struct QPiece {
    pub code: Code,
    pub codes: Codes,
    pub rows: Range<usize>,
    pub scale: Arc<Scale>,
}

/// A frozen [n, k] weight in 8 bits: pieces stacked by rows (diffusers stores q, k, v of a
/// fused BFL projection as separate tensors, each quantised with its own scales).
#[derive(Clone)]
pub struct QuantParam {
    pub pieces: Vec<QPiece>,
    pub k: usize,
}

impl QuantParam {
    /// Quantises an in-memory [rows, cols] weight.
    pub fn from_f32(scheme: Scheme, w: &[f32], rows: usize, cols: usize) -> Result<QuantParam> {
        let qz = quantize(scheme, w, rows, cols)?;
        Ok(QuantParam {
            pieces: vec![QPiece {
                code: scheme.code,
                codes: Codes::Owned(Arc::new(qz.q)),
                rows: 0..rows,
                scale: Arc::new(qz.scale),
            }],
            k: cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.pieces.iter().map(|p| p.rows.len()).sum()
    }

    pub fn numel(&self) -> usize {
        self.rows() * self.k
    }

    /// The matmul's view: the codes borrowed from the map, the scales expanded per row.
    pub fn view(&self) -> Result<QWeight<'_>> {
        let k = self.k;
        let segments = self
            .pieces
            .iter()
            .map(|p| {
                let all: &[u8] = match &p.codes {
                    Codes::Mapped { file, key } => file.bytes(key)?,
                    Codes::Owned(v) => v.as_slice(),
                };
                let Some(q) = all.get(p.rows.start * k..p.rows.end * k) else {
                    bail!("quantised rows {:?} × {k} run past the {} stored bytes", p.rows, all.len());
                };
                if let Scale::Rows(s) = p.scale.as_ref() {
                    if s.len() * k != all.len() {
                        bail!("{} per-channel scales for {} rows of {k} codes", s.len(), all.len() / k.max(1));
                    }
                }
                Ok(QRows { code: p.code, q, scale: Cow::Owned(p.scale.rows(p.rows.clone())) })
            })
            .collect::<Result<Vec<_>>>()
            .context("8-bit weight")?;
        Ok(QWeight { segments, k })
    }
}
