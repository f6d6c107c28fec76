//! The frozen weights on the device, uploaded once: bf16 (converted from whatever the file
//! stores, or generated on the device for `random:` models), or 8-bit codes with their per-row
//! scales, never expanded. Norm scales and biases stay f32.

use super::swap::{BlockSwap, Dir};
use crate::engine::CudaBackend;
use crate::kernels::launch::View;
use crate::kernels::lora::WeightView;
use crate::kernels::random::{Fill, RandomFill};
use crate::model::param::Param;
use crate::model::random::{Init, RandomParam};
use crate::model::weights::{FluxWeights, Linear, MlpEmbedder, SingleBlock, StreamWeights};
use crate::quant::{Code, QuantParam, Scheme};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};
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

/// One device tensor of a block, for the block swap's copies (src/engine/cuda/swap.rs).
pub(crate) enum TensorMut<'a> {
    Bf16(&'a mut CudaSlice<bf16>),
    U8(&'a mut CudaSlice<u8>),
    F32(&'a mut CudaSlice<f32>),
}

/// Read-only twin of `TensorMut`.
pub(crate) enum TensorRef<'a> {
    Bf16(&'a CudaSlice<bf16>),
    U8(&'a CudaSlice<u8>),
    F32(&'a CudaSlice<f32>),
}

impl TensorRef<'_> {
    pub fn bytes(&self) -> usize {
        match self {
            TensorRef::Bf16(t) => t.num_bytes(),
            TensorRef::U8(t) => t.num_bytes(),
            TensorRef::F32(t) => t.num_bytes(),
        }
    }
}

impl DevLinear {
    fn tensors(&self) -> Vec<TensorRef<'_>> {
        let mut v = match &self.w {
            DevW::Bf16(w) => vec![TensorRef::Bf16(w)],
            DevW::Q8 { codes, scales, .. } => vec![TensorRef::U8(codes), TensorRef::F32(scales)],
        };
        v.extend(self.bias.as_ref().map(TensorRef::F32));
        v
    }

    fn tensors_mut(&mut self) -> Vec<TensorMut<'_>> {
        let mut v = match &mut self.w {
            DevW::Bf16(w) => vec![TensorMut::Bf16(w)],
            DevW::Q8 { codes, scales, .. } => vec![TensorMut::U8(codes), TensorMut::F32(scales)],
        };
        v.extend(self.bias.as_mut().map(TensorMut::F32));
        v
    }

    /// The 8-bit code, or None for bf16 (a slot and the block copied into it must agree).
    pub(crate) fn code(&self) -> Option<i32> {
        match &self.w {
            DevW::Bf16(_) => None,
            DevW::Q8 { code, .. } => Some(*code),
        }
    }
}

/// A transformer block whose frozen tensors the block swap copies as a whole: every tensor in a
/// fixed order, and its linears (their names say which block a slot holds).
pub(crate) trait SwapBlock {
    fn linears(&self) -> Vec<&DevLinear>;
    fn norms(&self) -> Vec<&CudaSlice<f32>>;
    /// The linears and the norm scales, mutable.
    fn parts_mut(&mut self) -> (Vec<&mut DevLinear>, Vec<&mut CudaSlice<f32>>);

    fn linears_mut(&mut self) -> Vec<&mut DevLinear> {
        self.parts_mut().0
    }

    fn tensors(&self) -> Vec<TensorRef<'_>> {
        let mut v: Vec<TensorRef> = self.linears().into_iter().flat_map(|l| l.tensors()).collect();
        v.extend(self.norms().into_iter().map(TensorRef::F32));
        v
    }

    fn tensors_mut(&mut self) -> Vec<TensorMut<'_>> {
        let (linears, norms) = self.parts_mut();
        let mut v: Vec<TensorMut> = linears.into_iter().flat_map(|l| l.tensors_mut()).collect();
        v.extend(norms.into_iter().map(TensorMut::F32));
        v
    }
}

impl SwapBlock for DevDouble {
    fn linears(&self) -> Vec<&DevLinear> {
        let (i, t) = (&self.img, &self.txt);
        vec![&i.modulation, &i.qkv, &i.proj, &i.mlp0, &i.mlp2, &t.modulation, &t.qkv, &t.proj, &t.mlp0, &t.mlp2]
    }
    fn norms(&self) -> Vec<&CudaSlice<f32>> {
        vec![&self.img.q_norm, &self.img.k_norm, &self.txt.q_norm, &self.txt.k_norm]
    }
    fn parts_mut(&mut self) -> (Vec<&mut DevLinear>, Vec<&mut CudaSlice<f32>>) {
        let (i, t) = (&mut self.img, &mut self.txt);
        let linears = vec![
            &mut i.modulation,
            &mut i.qkv,
            &mut i.proj,
            &mut i.mlp0,
            &mut i.mlp2,
            &mut t.modulation,
            &mut t.qkv,
            &mut t.proj,
            &mut t.mlp0,
            &mut t.mlp2,
        ];
        (linears, vec![&mut i.q_norm, &mut i.k_norm, &mut t.q_norm, &mut t.k_norm])
    }
}

impl SwapBlock for DevSingle {
    fn linears(&self) -> Vec<&DevLinear> {
        vec![&self.linear1, &self.linear2, &self.modulation]
    }
    fn norms(&self) -> Vec<&CudaSlice<f32>> {
        vec![&self.q_norm, &self.k_norm]
    }
    fn parts_mut(&mut self) -> (Vec<&mut DevLinear>, Vec<&mut CudaSlice<f32>>) {
        (vec![&mut self.linear1, &mut self.linear2, &mut self.modulation], vec![&mut self.q_norm, &mut self.k_norm])
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
    /// The resident double blocks (all of them without block swap).
    pub double: Vec<DevDouble>,
    /// The resident single blocks: the first ones (the swap takes the chain's tail).
    pub single: Vec<DevSingle>,
    pub final_mod: DevLinear,
    pub final_linear: DevLinear,
    /// The swapped blocks (`--blocks-to-swap`), if any.
    pub swap: Option<BlockSwap>,
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
    /// Uploads every frozen weight, tensor by tensor (one host tensor at a time); the last
    /// `blocks_to_swap` blocks of the chain (double then single blocks) go to pinned host memory
    /// instead, each passing through the device once on the way (swap.rs).
    pub fn upload(g: &CudaBackend, w: &FluxWeights, base: BaseDtype, blocks_to_swap: usize) -> Result<DevWeights> {
        let (nd, ns) = (w.double_blocks.len(), w.single_blocks.len());
        ensure!(
            blocks_to_swap <= nd + ns,
            "--blocks-to-swap {blocks_to_swap}: this model has {} blocks ({nd} double + {ns} single)",
            nd + ns
        );
        let first = nd + ns - blocks_to_swap;
        let mut swap = match blocks_to_swap {
            0 => None,
            _ => Some(BlockSwap::new(g, first, nd, nd + ns)?),
        };
        let mut double = Vec::new();
        for (i, b) in w.double_blocks.iter().enumerate() {
            let p = format!("double_blocks.{i}");
            let blk = DevDouble {
                img: upload_stream(g, &b.img, base, &format!("{p}.img_attn"))?,
                txt: upload_stream(g, &b.txt, base, &format!("{p}.txt_attn"))?,
            };
            match swap.as_mut() {
                Some(s) if i >= first => s.add_double(g, i, blk).with_context(|| format!("{p} to host memory"))?,
                _ => double.push(blk),
            }
        }
        let mut single = Vec::new();
        for (j, b) in w.single_blocks.iter().enumerate() {
            let p = format!("single_blocks.{j}");
            let blk = upload_single(g, b, base, &p)?;
            match swap.as_mut() {
                Some(s) if nd + j >= first => s.add_single(g, j, blk).with_context(|| format!("{p} to host memory"))?,
                _ => single.push(blk),
            }
        }
        if swap.is_some() {
            // The copy stream's first fills overwrite slots that the compute stream uploaded.
            g.stream.synchronize()?;
        }
        Ok(DevWeights {
            swap,
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

    /// Double blocks in the model (resident and swapped).
    pub fn n_double(&self) -> usize {
        self.swap.as_ref().map_or(self.double.len(), |s| s.n_double)
    }

    /// Single blocks in the model (resident and swapped).
    pub fn n_single(&self) -> usize {
        self.swap.as_ref().map_or(self.single.len(), |s| s.n_total - s.n_double)
    }

    /// Before chain block `k` (double blocks, then single blocks) computes: with block swap,
    /// its weights on the device for `compute`, the next one in `dir` on its way.
    pub(crate) fn fetch(&mut self, compute: &CudaStream, k: usize, dir: Dir) -> Result<()> {
        self.swap.as_mut().map_or(Ok(()), |s| s.fetch(compute, k, dir))
    }

    /// After chain block `k`'s last launch.
    pub(crate) fn release(&mut self, compute: &CudaStream, k: usize) -> Result<()> {
        self.swap.as_mut().map_or(Ok(()), |s| s.release(compute, k))
    }

    /// Double block `i` (fetched first when swapped).
    pub fn double_block(&self, i: usize) -> Result<&DevDouble> {
        match (self.double.get(i), &self.swap) {
            (Some(b), _) => Ok(b),
            (None, Some(s)) => s.double(i),
            (None, None) => bail!("double_blocks.{i}: no such block"),
        }
    }

    /// Single block `j` (fetched first when swapped).
    pub fn single_block(&self, j: usize) -> Result<&DevSingle> {
        match (self.single.get(j), &self.swap) {
            (Some(b), _) => Ok(b),
            (None, Some(s)) => s.single(j),
            (None, None) => bail!("single_blocks.{j}: no such block"),
        }
    }

    /// (input, output) widths of the linear `name`, resident or swapped.
    pub fn dims_of(&self, name: &str) -> Option<(usize, usize)> {
        let resident = self.linears().into_iter().find(|l| l.name == name).map(|l| (l.d_in, l.d_out));
        resident.or_else(|| self.swap.as_ref().and_then(|s| s.dims_of(name)))
    }

    /// Device bytes of the frozen weights: the resident linears and, with block swap, the slots.
    pub fn device_bytes(&self) -> usize {
        let resident: usize = self.linears().iter().map(|l| l.bytes()).sum();
        resident + self.swap.as_ref().map_or(0, |s| s.slot_bytes())
    }

    /// Every resident linear (not those of swapped blocks), for lookups by name and byte counts.
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
