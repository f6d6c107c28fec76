//! The 8-bit schemes: how a byte decodes (int8 or fp8 e4m3) and where the f32 scale lives
//! (none, one per tensor, one per output row), and quantising a weight into them.

use super::fp8::{e4m3_table, f32_to_e4m3, E4M3_MAX};
use crate::io::safetensors::Dtype;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::ops::Range;

/// How one stored byte decodes to a number (before its scale).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    I8,
    E4M3,
}

impl Code {
    pub fn from_dtype(d: Dtype) -> Option<Code> {
        match d {
            Dtype::I8 => Some(Code::I8),
            Dtype::F8E4M3 => Some(Code::E4M3),
            _ => None,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            Code::I8 => Dtype::I8,
            Code::E4M3 => Dtype::F8E4M3,
        }
    }

    /// The largest magnitude a code holds: a scale of amax/qmax uses the whole range.
    fn qmax(self) -> f32 {
        match self {
            // Symmetric: -128 is never produced, so negating a row never overflows.
            Code::I8 => 127.0,
            Code::E4M3 => E4M3_MAX,
        }
    }

    fn encode(self, v: f32) -> u8 {
        match self {
            Code::I8 => v.round_ties_even().clamp(-127.0, 127.0) as i8 as u8,
            Code::E4M3 => f32_to_e4m3(v),
        }
    }

    /// out[i] = value of byte q[i], unscaled.
    pub fn decode(self, q: &[u8], out: &mut [f32]) {
        debug_assert_eq!(q.len(), out.len());
        match self {
            Code::I8 => q.iter().zip(out.iter_mut()).for_each(|(&b, o)| *o = b as i8 as f32),
            Code::E4M3 => {
                let t = e4m3_table();
                q.iter().zip(out.iter_mut()).for_each(|(&b, o)| *o = t[b as usize]);
            }
        }
    }

    /// The scale that maps a row's (or tensor's) largest magnitude onto the code's largest.
    /// An all-zero row keeps scale 1: its codes are all zero whatever the scale, and 1 keeps
    /// the division finite. A positive amax too small for amax/qmax to be nonzero in f32 gets
    /// the smallest positive scale, which still divides without overflow past the clamp.
    fn scale_for(self, amax: f32) -> f32 {
        if amax == 0.0 {
            1.0
        } else {
            (amax / self.qmax()).max(f32::from_bits(1))
        }
    }
}

/// Where a quantised weight's scale lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// No scale: the plain cast of the shared `flux1-dev-fp8` files and kohya's `--fp8_base`.
    None,
    PerTensor,
    /// One scale per output row (the weight is [out, in]).
    PerChannel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheme {
    pub code: Code,
    pub scale: Granularity,
}

impl Scheme {
    pub const INT8: Scheme = Scheme { code: Code::I8, scale: Granularity::PerChannel };
    pub const FP8: Scheme = Scheme { code: Code::E4M3, scale: Granularity::None };
    pub const FP8_TENSOR: Scheme = Scheme { code: Code::E4M3, scale: Granularity::PerTensor };
    pub const FP8_CHANNEL: Scheme = Scheme { code: Code::E4M3, scale: Granularity::PerChannel };
    const ALL: [(&'static str, &'static str, Scheme); 4] = [
        ("int8", "int8-per-channel", Scheme::INT8),
        ("fp8", "fp8-e4m3", Scheme::FP8),
        ("fp8-scaled", "fp8-e4m3-per-tensor", Scheme::FP8_TENSOR),
        ("fp8-channel", "fp8-e4m3-per-channel", Scheme::FP8_CHANNEL),
    ];

    /// `quantize --format`: int8, fp8, fp8-scaled (per-tensor) or fp8-channel.
    pub fn parse_format(s: &str) -> Result<Scheme> {
        match Self::ALL.iter().find(|(f, _, _)| *f == s) {
            Some(&(_, _, sc)) => Ok(sc),
            None => bail!(
                "--format `{s}` is not a quantisation format; use int8 (per-channel scales), fp8 (plain \
                 e4m3 cast), fp8-scaled (e4m3, one scale per tensor) or fp8-channel (e4m3, per-channel scales)"
            ),
        }
    }

    /// The name written to the file's `flux_kernels.quantization` metadata.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, _, sc)| *sc == self).map(|(_, n, _)| *n).expect("every scheme is listed")
    }
}

/// A weight's scale as stored beside its codes.
#[derive(Clone, Debug, PartialEq)]
pub enum Scale {
    None,
    Tensor(f32),
    Rows(Vec<f32>),
}

impl Scale {
    /// The scale of every row in `rows`, for a matmul that folds one scale per output row.
    pub fn rows(&self, rows: Range<usize>) -> Vec<f32> {
        match self {
            Scale::None => vec![1.0; rows.len()],
            Scale::Tensor(s) => vec![*s; rows.len()],
            Scale::Rows(v) => v[rows].to_vec(),
        }
    }
}

pub struct Quantized {
    pub q: Vec<u8>,
    pub scale: Scale,
}

/// Rows per parallel task: enough work to amortise the task, small enough to spread a weight
/// over the cores.
fn chunk_rows(cols: usize) -> usize {
    (65536 / cols.max(1)).max(1)
}

fn check_finite(v: &[f32], first_row: usize, cols: usize) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => bail!("non-finite value {} at row {}, column {}", v[i], first_row + i / cols, i % cols),
        None => Ok(()),
    }
}

fn amax(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, &x| a.max(x.abs()))
}

/// Fills the buffer with rows `range` of a weight, as f32.
pub type RowReader<'a> = dyn Fn(Range<usize>, &mut [f32]) -> Result<()> + Sync + 'a;

/// Quantises a [rows, cols] weight read row range by row range through `read` (so a mapped
/// bf16 tensor never needs an f32 copy of the whole), the ranges in parallel. Per-tensor scales
/// take a first pass for the amax.
pub fn quantize_tensor(scheme: Scheme, rows: usize, cols: usize, read: &RowReader) -> Result<Quantized> {
    let step = chunk_rows(cols);
    let ranges: Vec<Range<usize>> = (0..rows).step_by(step).map(|r| r..(r + step).min(rows)).collect();
    let code = scheme.code;
    let tensor_scale = match scheme.scale {
        Granularity::PerTensor => {
            let maxes = ranges
                .par_iter()
                .map(|r| {
                    let mut buf = vec![0f32; r.len() * cols];
                    read(r.clone(), &mut buf)?;
                    check_finite(&buf, r.start, cols)?;
                    Ok(amax(&buf))
                })
                .collect::<Result<Vec<f32>>>()?;
            Some(code.scale_for(maxes.into_iter().fold(0.0, f32::max)))
        }
        Granularity::None => Some(1.0),
        Granularity::PerChannel => None,
    };
    let mut q = vec![0u8; rows * cols];
    let mut row_scales = vec![1f32; rows];
    q.par_chunks_mut(step * cols.max(1)).zip(row_scales.par_chunks_mut(step)).zip(ranges.par_iter()).try_for_each(
        |((qc, sc), r)| -> Result<()> {
            let mut buf = vec![0f32; r.len() * cols];
            read(r.clone(), &mut buf)?;
            check_finite(&buf, r.start, cols)?;
            for ((qrow, s), row) in qc.chunks_mut(cols.max(1)).zip(sc.iter_mut()).zip(buf.chunks(cols.max(1))) {
                *s = tensor_scale.unwrap_or_else(|| code.scale_for(amax(row)));
                // Division, not a multiply by the reciprocal: q = round(W / s) exactly as stated.
                qrow.iter_mut().zip(row).for_each(|(o, &w)| *o = code.encode(w / *s));
            }
            Ok(())
        },
    )?;
    let scale = match (scheme.scale, tensor_scale) {
        (Granularity::None, _) => Scale::None,
        (Granularity::PerTensor, Some(s)) => Scale::Tensor(s),
        _ => Scale::Rows(row_scales),
    };
    Ok(Quantized { q, scale })
}

/// Quantises an in-memory [rows, cols] weight.
pub fn quantize(scheme: Scheme, w: &[f32], rows: usize, cols: usize) -> Result<Quantized> {
    if w.len() != rows * cols {
        bail!("weight has {} values, not {rows} × {cols}", w.len());
    }
    quantize_tensor(scheme, rows, cols, &|r, out| {
        out.copy_from_slice(&w[r.start * cols..r.end * cols]);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant(code: Code, qz: &Quantized, rows: usize, cols: usize) -> Vec<f32> {
        let s = qz.scale.rows(0..rows);
        let mut out = vec![0f32; rows * cols];
        code.decode(&qz.q, &mut out);
        out.chunks_mut(cols).zip(&s).for_each(|(r, &s)| r.iter_mut().for_each(|v| *v *= s));
        out
    }

    #[test]
    fn int8_per_channel_follows_the_definition() {
        let (rows, cols) = (5, 7);
        let mut rng = crate::util::Rng::new(9);
        let mut w = rng.normal_vec(rows * cols, 0.05);
        w[14..21].fill(0.0); // an all-zero row
        w[3] = 0.5; // row 0's amax
        let qz = quantize(Scheme::INT8, &w, rows, cols).unwrap();
        let Scale::Rows(s) = &qz.scale else { panic!("per-channel scales expected") };
        assert_eq!(s[0], 0.5 / 127.0);
        assert_eq!(s[2], 1.0);
        assert_eq!(qz.q[3] as i8, 127);
        for r in 0..rows {
            for c in 0..cols {
                let want = (w[r * cols + c] / s[r]).round_ties_even().clamp(-127.0, 127.0) as i8;
                assert_eq!(qz.q[r * cols + c] as i8, want);
            }
        }
        let d = dequant(Code::I8, &qz, rows, cols);
        for (i, (&a, &b)) in d.iter().zip(&w).enumerate() {
            assert!((a - b).abs() <= s[i / cols] / 2.0 * 1.0001, "{a} vs {b}");
        }
    }

    #[test]
    fn fp8_scales_map_amax_to_448() {
        let (rows, cols) = (3, 4);
        let w = [0.1f32, -2.0, 0.3, 0.0, 1.0, 0.25, -0.5, 0.125, 0.0, 0.0, 0.0, 0.0];
        let t = quantize(Scheme::FP8_TENSOR, &w, rows, cols).unwrap();
        assert_eq!(t.scale, Scale::Tensor(2.0 / 448.0));
        assert_eq!(t.q[1], 0xfe); // -2.0 → -448
        let c = quantize(Scheme::FP8_CHANNEL, &w, rows, cols).unwrap();
        assert_eq!(c.scale, Scale::Rows(vec![2.0 / 448.0, 1.0 / 448.0, 1.0]));
        let plain = quantize(Scheme::FP8, &w, rows, cols).unwrap();
        assert_eq!(plain.scale, Scale::None);
        assert_eq!(dequant(Code::E4M3, &plain, rows, cols)[..6], [0.1015625, -2.0, 0.3125, 0.0, 1.0, 0.25]);
    }

    #[test]
    fn non_finite_weights_are_refused_with_their_place() {
        let mut w = vec![0.5f32; 12];
        w[9] = f32::NAN;
        for sc in [Scheme::INT8, Scheme::FP8, Scheme::FP8_TENSOR] {
            let e = quantize(sc, &w, 3, 4).err().unwrap().to_string();
            assert!(e.contains("row 2, column 1"), "{e}");
        }
        assert!(Scheme::parse_format("int4").unwrap_err().to_string().contains("int4"));
        assert_eq!(Scheme::parse_format("fp8-scaled").unwrap().name(), "fp8-e4m3-per-tensor");
    }
}
