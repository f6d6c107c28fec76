//! The frozen weights on the device, uploaded once: bf16 (converted from whatever the file
//! stores, or generated on the device for `random:` models), or 8-bit codes with their per-row
//! scales, never expanded. Norm scales and biases stay f32.

use crate::engine::CudaBackend;
use crate::kernels::launch::View;
use crate::kernels::lora::WeightView;
use crate::kernels::random::{Fill, RandomFill};
use crate::model::param::Param;
use crate::model::random::{Init, RandomParam};
use crate::model::weights::{FluxWeights, Linear, MlpEmbedder, SingleBlock, StreamWeights};
use crate::quant::{Code, QuantParam, Scheme};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

/// How the frozen linear weights are held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseDtype {
    /// bf16, or the file's own 8-bit codes where it stores them.
    Bf16,
    /// int8 with one scale per output channel, quantised at load from bf16/f32 weights (files
    /// already in 8 bits keep their codes).
    Int8,
}

impl BaseDtype {
    pub fn parse(s: &str) -> Result<BaseDtype> {
        match s {
            "bf16" => Ok(BaseDtype::Bf16),
            "int8" => Ok(BaseDtype::Int8),
            _ => bail!("--base `{s}`: use bf16 or int8"),
        }
    }
}

impl From<&RandomParam> for RandomFill {
    fn from(p: &RandomParam) -> RandomFill {
        let init = match p.init {
            Init::Uniform(b) => Fill::Uniform(b),
            Init::Const(v) => Fill::Const(v),
        };
        RandomFill { stream: p.stream, numel: p.numel, init }
    }
}

enum DevW {
    Bf16(CudaSlice<bf16>),
    Q8 { code: i32, codes: CudaSlice<u8>, scales: CudaSlice<f32> },
}

pub struct DevLinear {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    w: DevW,
    pub bias: Option<CudaSlice<f32>>,
}

impl DevLinear {
    pub fn weight(&self) -> WeightView<'_> {
        match &self.w {
            DevW::Bf16(w) => WeightView::Bf16(w.into()),
            DevW::Q8 { code, codes, scales } => {
                WeightView::Q8 { code: *code, codes: codes.into(), scales: scales.into() }
            }
        }
    }

    /// Device bytes of the weight and bias.
    pub fn bytes(&self) -> usize {
        let w = match &self.w {
            DevW::Bf16(w) => 2 * w.len(),
            DevW::Q8 { codes, scales, .. } => codes.len() + 4 * scales.len(),
        };
        w + self.bias.as_ref().map_or(0, |b| 4 * b.len())
    }
}

pub struct DevEmbedder {
    pub in_layer: DevLinear,
    pub out_layer: DevLinear,
}

pub struct DevStream {
    pub modulation: DevLinear,
    pub qkv: DevLinear,
    pub q_norm: CudaSlice<f32>,
    pub k_norm: CudaSlice<f32>,
    pub proj: DevLinear,
    pub mlp0: DevLinear,
    pub mlp2: DevLinear,
}

pub struct DevDouble {
    pub img: DevStream,
    pub txt: DevStream,
}

pub struct DevSingle {
    pub linear1: DevLinear,
    pub linear2: DevLinear,
    pub q_norm: CudaSlice<f32>,
    pub k_norm: CudaSlice<f32>,
    pub modulation: DevLinear,
}

pub struct DevWeights {
    pub img_in: DevLinear,
    pub txt_in: DevLinear,
    pub time_in: DevEmbedder,
    pub guidance_in: Option<DevEmbedder>,
    pub vector_in: DevEmbedder,
    pub double: Vec<DevDouble>,
    pub single: Vec<DevSingle>,
    pub final_mod: DevLinear,
    pub final_linear: DevLinear,
}

/// f32 values of a small parameter (norm scales, biases) on the device.
fn upload_f32(g: &CudaBackend, p: &Param, what: &str) -> Result<CudaSlice<f32>> {
    let v = p.load().with_context(|| what.to_string())?;
    ensure!(v.iter().all(|x| x.is_finite()), "{what}: non-finite value in the weights");
    Ok(g.stream.clone_htod(&*v)?)
}

/// Upload granularity of a weight converted on the host: rows enough for ~16 M values, so a
/// 3072 × 12288 weight never sits whole in host memory as f32 beside its bf16 copy.
const HOST_CHUNK: usize = 1 << 24;

fn upload_linear(g: &CudaBackend, l: &Linear, base: BaseDtype) -> Result<DevLinear> {
    let st = &g.stream;
    let (n, k) = (l.d_out, l.d_in);
    let name = &l.name;
    let w = match (&l.weight, base) {
        (Param::Quant(q), _) => upload_q(g, q, n, k).with_context(|| format!("{name}.weight (8-bit)"))?,
        (p, BaseDtype::Int8) => {
            let v = p.load().with_context(|| format!("{name}.weight"))?;
            let q = QuantParam::from_f32(Scheme::INT8, &v, n, k).with_context(|| format!("{name}: int8"))?;
            upload_q(g, &q, n, k).with_context(|| format!("{name}.weight (int8)"))?
        }
        (Param::Random(r), BaseDtype::Bf16) => {
            ensure!(r.numel == n * k, "{name}.weight: {} values for a {n}×{k} weight", r.numel);
            // SAFETY: every element is written by fill_random before any read.
            let buf = unsafe { st.alloc::<bf16>(n * k) }?;
            g.random.fill(&r.into(), View::from(&buf), 0).with_context(|| format!("{name}.weight"))?;
            DevW::Bf16(buf)
        }
        (p, BaseDtype::Bf16) => {
            let v = p.load().with_context(|| format!("{name}.weight"))?;
            ensure!(v.len() == n * k, "{name}.weight: {} values for a {n}×{k} weight", v.len());
            // SAFETY: filled chunk by chunk below, every element once.
            let mut buf = unsafe { st.alloc::<bf16>(n * k) }?;
            for (i, chunk) in v.chunks(HOST_CHUNK).enumerate() {
                if let Some(j) = chunk.iter().position(|x| !x.is_finite()) {
                    bail!("{name}.weight: non-finite value at flat index {}", i * HOST_CHUNK + j);
                }
                let h: Vec<bf16> = chunk.iter().map(|&x| bf16::from_f32(x)).collect();
                let at = i * HOST_CHUNK;
                st.memcpy_htod(&h, &mut buf.slice_mut(at..at + h.len()))?;
            }
            DevW::Bf16(buf)
        }
    };
    let bias = match &l.bias {
        Some(b) => {
            let v = upload_f32(g, b, &format!("{name}.bias"))?;
            ensure!(v.len() == n, "{name}.bias: {} values, expected {n}", v.len());
            Some(v)
        }
        None => None,
    };
    Ok(DevLinear { name: name.clone(), d_in: k, d_out: n, w, bias })
}

fn upload_q(g: &CudaBackend, q: &QuantParam, n: usize, k: usize) -> Result<DevW> {
    let w = q.view()?;
    ensure!(w.k == k && w.rows() == n, "8-bit weight is {}×{}, expected {n}×{k}", w.rows(), w.k);
    let code = match w.segments.first().map(|s| s.code) {
        Some(Code::I8) => crate::kernels::abi::FK_CODE_I8,
        Some(Code::E4M3) => crate::kernels::abi::FK_CODE_E4M3,
        None => bail!("8-bit weight with no rows"),
    };
    ensure!(
        w.segments.iter().all(|s| s.code == w.segments[0].code),
        "an 8-bit weight whose parts use different codes (int8 and fp8) is not supported on the GPU"
    );
    let codes: Vec<u8> = w.segments.iter().flat_map(|s| s.q.iter().copied()).collect();
    let scales: Vec<f32> = w.segments.iter().flat_map(|s| s.scale.iter().copied()).collect();
    Ok(DevW::Q8 { code: code as i32, codes: g.stream.clone_htod(&codes)?, scales: g.stream.clone_htod(&scales)? })
}

fn upload_embedder(g: &CudaBackend, e: &MlpEmbedder, base: BaseDtype) -> Result<DevEmbedder> {
    Ok(DevEmbedder { in_layer: upload_linear(g, &e.in_layer, base)?, out_layer: upload_linear(g, &e.out_layer, base)? })
}

fn upload_stream(g: &CudaBackend, s: &StreamWeights, base: BaseDtype, p: &str) -> Result<DevStream> {
    Ok(DevStream {
        modulation: upload_linear(g, &s.modulation, base)?,
        qkv: upload_linear(g, &s.qkv, base)?,
        q_norm: upload_f32(g, &s.q_norm, &format!("{p}.norm.query_norm.scale"))?,
        k_norm: upload_f32(g, &s.k_norm, &format!("{p}.norm.key_norm.scale"))?,
        proj: upload_linear(g, &s.proj, base)?,
        mlp0: upload_linear(g, &s.mlp0, base)?,
        mlp2: upload_linear(g, &s.mlp2, base)?,
    })
}

fn upload_single(g: &CudaBackend, s: &SingleBlock, base: BaseDtype, p: &str) -> Result<DevSingle> {
    Ok(DevSingle {
        linear1: upload_linear(g, &s.linear1, base)?,
        linear2: upload_linear(g, &s.linear2, base)?,
        q_norm: upload_f32(g, &s.q_norm, &format!("{p}.norm.query_norm.scale"))?,
        k_norm: upload_f32(g, &s.k_norm, &format!("{p}.norm.key_norm.scale"))?,
        modulation: upload_linear(g, &s.modulation, base)?,
    })
}

impl DevWeights {
    /// Uploads every frozen weight, tensor by tensor (one host tensor at a time).
    pub fn upload(g: &CudaBackend, w: &FluxWeights, base: BaseDtype) -> Result<DevWeights> {
        let mut double = Vec::new();
        for (i, b) in w.double_blocks.iter().enumerate() {
            let p = format!("double_blocks.{i}");
            double.push(DevDouble {
                img: upload_stream(g, &b.img, base, &format!("{p}.img_attn"))?,
                txt: upload_stream(g, &b.txt, base, &format!("{p}.txt_attn"))?,
            });
        }
        let mut single = Vec::new();
        for (i, b) in w.single_blocks.iter().enumerate() {
            single.push(upload_single(g, b, base, &format!("single_blocks.{i}"))?);
        }
        Ok(DevWeights {
            img_in: upload_linear(g, &w.img_in, base)?,
            txt_in: upload_linear(g, &w.txt_in, base)?,
            time_in: upload_embedder(g, &w.time_in, base)?,
            guidance_in: w.guidance_in.as_ref().map(|e| upload_embedder(g, e, base)).transpose()?,
            vector_in: upload_embedder(g, &w.vector_in, base)?,
            double,
            single,
            final_mod: upload_linear(g, &w.final_mod, base)?,
            final_linear: upload_linear(g, &w.final_linear, base)?,
        })
    }

    /// Every linear, for lookups by name and byte counts.
    pub fn linears(&self) -> Vec<&DevLinear> {
        let mut v = vec![&self.img_in, &self.txt_in];
        for e in [Some(&self.time_in), self.guidance_in.as_ref(), Some(&self.vector_in)].into_iter().flatten() {
            v.push(&e.in_layer);
            v.push(&e.out_layer);
        }
        for d in &self.double {
            for s in [&d.img, &d.txt] {
                v.extend([&s.modulation, &s.qkv, &s.proj, &s.mlp0, &s.mlp2]);
            }
        }
        for s in &self.single {
            v.extend([&s.linear1, &s.linear2, &s.modulation]);
        }
        v.extend([&self.final_mod, &self.final_linear]);
        v
    }
}
