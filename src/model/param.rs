//! A frozen parameter: owned f32 values, rows of memory-mapped tensors converted to f32 only
//! when an op needs them (so a 23.8 GB checkpoint is never read whole into RAM), or an 8-bit
//! weight that the linears multiply without a full f32 copy, or values generated on read.

use super::random::RandomParam;
use crate::io::safetensors::{Dtype, SafeTensors};
use crate::quant::QuantParam;
use anyhow::{bail, Result};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// Rows `rows` (dim 0) of tensor `key` in `file`.
#[derive(Clone)]
pub struct Piece {
    pub file: SafeTensors,
    pub key: String,
    pub rows: Range<usize>,
}

/// Rows of a parameter (dim 0) and their values as f32, borrowed or decoded.
pub type RowPiece<'a> = (Range<usize>, Cow<'a, [f32]>);

#[derive(Clone)]
pub enum Param {
    Owned(Arc<Vec<f32>>),
    /// Output rows concatenated from one or more stored tensors (fused qkv from diffusers'
    /// separate q/k/v, the final adaLN with its halves swapped, or simply one whole tensor).
    Mapped {
        pieces: Vec<Piece>,
        numel: usize,
    },
    /// A linear weight in 8 bits with its scales (int8 or fp8 e4m3).
    Quant(QuantParam),
    /// Generated from a seed each time it is read (`--model random:flux1-dev`).
    Random(RandomParam),
}

impl Param {
    pub fn owned(v: Vec<f32>) -> Param {
        Param::Owned(Arc::new(v))
    }

    pub fn numel(&self) -> usize {
        match self {
            Param::Owned(v) => v.len(),
            Param::Mapped { numel, .. } => *numel,
            Param::Quant(q) => q.numel(),
            Param::Random(r) => r.numel,
        }
    }

    /// The 8-bit weight, for the ops that multiply by it directly.
    pub fn quant(&self) -> Option<&QuantParam> {
        match self {
            Param::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// The values as f32 in stored pieces of whole rows (dim 0): each with its row range in the
    /// parameter. A piece is borrowed from the mapped file when it is stored as little-endian f32
    /// at a 4-byte-aligned offset (no copy, no allocation), decoded otherwise. The linears
    /// multiply piece by piece, so an f32 model is never copied per call (issue 23: re-decoding
    /// every weight on every use cost 8.3 s of system time and 1.77 M page faults in a 20-step
    /// run).
    /// `rows` is the parameter's dim 0 (a linear's d_out).
    pub fn row_pieces(&self, rows: usize) -> Result<Vec<RowPiece<'_>>> {
        let Param::Mapped { pieces, numel } = self else {
            return Ok(vec![(0..rows, self.load()?)]);
        };
        let mut out = Vec::with_capacity(pieces.len());
        let (mut row, mut total) = (0, 0);
        for p in pieces {
            let info = p.file.info(&p.key).expect("validated at load");
            let row_len: usize = info.shape.iter().skip(1).product();
            let n = p.rows.len() * row_len;
            let stored = p.file.bytes(&p.key)?;
            let span = stored.get(p.rows.start * row_len * 4..p.rows.end * row_len * 4);
            let borrowed = match (info.dtype, span) {
                (Dtype::F32, Some(b)) if cfg!(target_endian = "little") => bytemuck::try_cast_slice::<u8, f32>(b).ok(),
                _ => None,
            };
            let v = match borrowed {
                Some(v) => Cow::Borrowed(v),
                None => {
                    let mut v = vec![0f32; n];
                    p.file.read_rows_f32(&p.key, p.rows.clone(), &mut v)?;
                    Cow::Owned(v)
                }
            };
            out.push((row..row + p.rows.len(), v));
            row += p.rows.len();
            total += n;
        }
        if total != *numel || row != rows {
            bail!("parameter assembled from {total} values in {row} rows, expected {numel} in {rows}");
        }
        Ok(out)
    }

    /// The values as f32: borrowed when owned, decoded (and dequantised) otherwise.
    pub fn load(&self) -> Result<Cow<'_, [f32]>> {
        match self {
            Param::Owned(v) => Ok(Cow::Borrowed(v.as_slice())),
            Param::Mapped { pieces, numel } => {
                let mut out = vec![0f32; *numel];
                let mut at = 0;
                for p in pieces {
                    let info = p.file.info(&p.key).expect("validated at load");
                    let row: usize = info.shape.iter().skip(1).product();
                    let n = p.rows.len() * row;
                    if at + n > out.len() {
                        bail!("{}: tensor `{}` does not fit its parameter", p.file.path().display(), p.key);
                    }
                    p.file.read_rows_f32(&p.key, p.rows.clone(), &mut out[at..at + n])?;
                    at += n;
                }
                if at != out.len() {
                    bail!("parameter assembled from {} values, expected {}", at, out.len());
                }
                Ok(Cow::Owned(out))
            }
            Param::Quant(q) => Ok(Cow::Owned(q.view()?.dequantize())),
            Param::Random(r) => Ok(Cow::Owned(r.generate())),
        }
    }
}
