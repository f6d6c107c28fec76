//! Attention on the GPU (kernels/attention.cu): the flash kernels (forward with the saved
//! log-sum-exp; deterministic backward), for benchmarks the materialised-softmax baseline
//! (cuBLAS S = scale·Q·Kᵀ, a row softmax, cuBLAS O = P·V), and the layout work around them in
//! the model: the QK prologue (QK-RMSNorm per head + RoPE, token-major to head-major) and the
//! merge of the heads back to token-major rows. CPU twins: `ops::attention`
//! (`attention_forward_masked` / `attention_backward_masked`, `merge_heads` / `split_heads`) and
//! `model::attention::attention_block`'s prologue; tests/gpu_attention.rs and
//! tests/gpu_model_ops.rs compare.
//!
//! Tensors are head-major [b, h, l, d] bf16 on the device (f32 on the host side, rounded to
//! nearest even on upload), LSE and delta f32 [b, h, l], the optional key mask u8 [b, l].

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{addr, grid_blocks, launch, tensor_map_bf16, DevMat, Family, View};
use super::trace::{record, OpFamily, DKDV_SHARE};
use anyhow::{ensure, Context, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DeviceRepr};
use half::bf16;
use std::sync::Arc;

/// Head dims the kernels are instantiated for (FLUX: 128; the tiny test models: 16).
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

const BLOCK: usize = FK_ATTN_BLOCK as usize;
const PAD: usize = FK_ATTN_PAD as usize;

const FWD_ROWS: usize = FK_ATTN_FWD_ROWS as usize;

/// Dynamic shared memory of each kernel at head dim `d` (attention.cu: fwd_smem, dkdv_smem,
/// dq_smem; the kernels trap when given less): forward, dK/dV, dQ.
pub fn smem_bytes(d: usize) -> (usize, usize, usize) {
    let tile = BLOCK * (d + PAD) * 2;
    (fwd_smem(d, FWD_ROWS), 6 * tile + 4 * BLOCK * 4, 6 * tile)
}

/// The forward's shared memory for blocks of `rows` query rows: Q plus two K and two V tiles.
fn fwd_smem(d: usize, rows: usize) -> usize {
    (rows + 4 * BLOCK) * (d + PAD) * 2
}

/// Forward kernel variants (benchmarks compare them; `forward` picks `Hopper` where it can run,
/// else `Rows128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdVariant {
    /// 128 query rows per block, two 16-row groups per warp (fk_attn_fwd).
    Rows128,
    /// 64 query rows per block, one group per warp (fk_attn_fwd_r64), the first version.
    Rows64,
    /// The sm_90a kernel (kernels/attention_sm90.cu: TMA, wgmma, warp specialisation, the
    /// softmax overlapped with the products and ping-pong between the consumer warpgroups):
    /// compute capability 9.0, head dims 64 and 128, Q/K/V 16-byte aligned.
    Hopper,
    /// The same without the overlaps (fk_attn_fwd_sm90_serial), for the side-by-side benchmark.
    HopperSerial,
}

/// Head dims the Hopper forward is built for.
pub const HOPPER_HEAD_DIMS: [usize; 2] = [64, 128];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub h: usize,
    pub l: usize,
    pub d: usize,
}

impl AttnDims {
    pub fn numel(&self) -> usize {
        self.b * self.h * self.l * self.d
    }
    pub fn rows(&self) -> usize {
        self.b * self.h * self.l
    }
    /// Matrix FLOPs of the forward, 4·b·h·l²·d (Q·Kᵀ and P·V), the usual count for TFLOP/s.
    pub fn forward_flops(&self) -> f64 {
        4.0 * (self.b * self.h) as f64 * (self.l as f64).powi(2) * self.d as f64
    }
    /// The backward's conventional count, 2.5× the forward (dV, dP, dQ, dK and the recomputed
    /// S), as FlashAttention reports it; the deterministic split recomputes S and dP once more,
    /// which this count leaves out on purpose so figures compare across implementations.
    pub fn backward_flops(&self) -> f64 {
        2.5 * self.forward_flops()
    }
}

/// The backward's launches, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackwardStep {
    /// delta = rowsum(dO ∘ O)
    Prep,
    /// dK and dV, one block per key tile
    DkDv,
    /// dQ, one block per query tile
    Dq,
    /// dK and dV on the sm_90a kernel (TMA, wgmma; compute capability 9.0, head dim 64/128),
    /// each tile's element-wise work overlapped with its products
    DkDvHopper,
    /// dQ on the sm_90a kernel, overlapped
    DqHopper,
    /// `DkDvHopper` with each tile's products one after another (fk_attn_bwd_dkdv_sm90_serial):
    /// the same bits, for the side-by-side benchmark
    DkDvHopperSerial,
    /// `DqHopper` one product after another (fk_attn_bwd_dq_sm90_serial)
    DqHopperSerial,
}

/// The device tensors of one attention problem.
pub struct AttnBuffers {
    pub dims: AttnDims,
    pub q: CudaSlice<bf16>,
    pub k: CudaSlice<bf16>,
    pub v: CudaSlice<bf16>,
    pub o: CudaSlice<bf16>,
    pub lse: CudaSlice<f32>,
    pub mask: Option<CudaSlice<u8>>,
    pub dout: CudaSlice<bf16>,
    pub dq: CudaSlice<bf16>,
    pub dk: CudaSlice<bf16>,
    pub dv: CudaSlice<bf16>,
    delta: CudaSlice<f32>,
    /// The baseline's materialised scores and probabilities, allocated on first use.
    scores: Option<(CudaSlice<f32>, CudaSlice<bf16>)>,
}

/// The forward's tensors of one attention call on the caller's device buffers (the
/// device-resident model): Q, K, V, O bf16 [b, h, l, d], LSE f32 [b, h, l].
#[derive(Clone, Copy, Debug)]
pub struct AttnViews<'a> {
    pub q: View<'a, bf16>,
    pub k: View<'a, bf16>,
    pub v: View<'a, bf16>,
    pub o: View<'a, bf16>,
    pub lse: View<'a, f32>,
}

/// The backward's extra tensors: dO, dQ, dK, dV bf16 [b, h, l, d]; delta f32 [b, h, l] scratch.
#[derive(Clone, Copy, Debug)]
pub struct AttnGradViews<'a> {
    pub dout: View<'a, bf16>,
    pub dq: View<'a, bf16>,
    pub dk: View<'a, bf16>,
    pub dv: View<'a, bf16>,
    pub delta: View<'a, f32>,
}

/// Device addresses of one attention problem (the parameter struct's pointer fields; 0 where a
/// launch does not use one).
#[derive(Clone, Copy, Debug, Default)]
struct AttnPtrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub kv_mask: u64,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub delta: u64,
}

fn params_of(dims: AttnDims, p: &AttnPtrs) -> FkAttnParams {
    let AttnDims { b, h, l, d } = dims;
    FkAttnParams {
        q: p.q,
        k: p.k,
        v: p.v,
        o: p.o,
        lse: p.lse,
        kv_mask: p.kv_mask,
        dout: p.dout,
        dq: p.dq,
        dk: p.dk,
        dv: p.dv,
        delta: p.delta,
        b: b as i64,
        h: h as i64,
        l: l as i64,
        d: d as i64,
        scale: 1.0 / (d as f32).sqrt(),
        ..Default::default()
    }
}

fn check_dims(dims: AttnDims) -> Result<()> {
    let AttnDims { b, h, l, d } = dims;
    ensure!(HEAD_DIMS.contains(&d), "attention on the GPU: head dim {d} is not one of {HEAD_DIMS:?}");
    ensure!(b > 0 && h > 0 && l > 0, "attention on the GPU: empty shape {dims:?}");
    ensure!(b * h <= 65535, "attention on the GPU: b·h = {} exceeds the grid's 65535", b * h);
    Ok(())
}

/// The sm_90a forward, loaded only on compute capability 9.0 (its module holds sm_90a code only).
struct HopperFwd {
    _fam: Family,
    pipelined: CudaFunction,
    serial: CudaFunction,
    dkdv: CudaFunction,
    dq: CudaFunction,
    dkdv_serial: CudaFunction,
    dq_serial: CudaFunction,
}

/// A TMA descriptor over one [b·h, l, d] bf16 tensor at `ptr`, boxes of 64 columns (128 bytes:
/// the 128-byte swizzle's span) × `box_rows` rows of one (batch, head); rows past l read as zeros.
fn tensor_map(ptr: u64, dims: AttnDims, box_rows: usize) -> Result<FkTensorMap> {
    let AttnDims { b, h, l, d } = dims;
    tensor_map_bf16(ptr, [d, l, b * h], [d, l * d], [64, box_rows])
        .with_context(|| format!("TMA descriptor for attention {dims:?}"))
}

pub struct GpuAttention {
    fam: Family,
    hopper: Option<HopperFwd>,
    /// False: `forward`, `forward_dev` and the backward keep the sm_80 kernels even where the
    /// sm_90a ones are loaded (`bench-step --kernels sm80`, the side-by-side measurement).
    use_hopper: bool,
    stream: Arc<CudaStream>,
    fwd: CudaFunction,
    fwd_r64: CudaFunction,
    prep: CudaFunction,
    dkdv: CudaFunction,
    dq: CudaFunction,
    softmax: CudaFunction,
    blas: Option<CudaBlas>,
    qk_fwd: CudaFunction,
    qk_bwd: CudaFunction,
    merge: CudaFunction,
    merge_bwd: CudaFunction,
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    addr(s, stream)
}

impl GpuAttention {
    pub fn new(gpu: &Gpu) -> Result<GpuAttention> {
        let fam = Family::load(gpu, "attention")?;
        let (fwd_max, dkdv_max, dq_max) = smem_bytes(*HEAD_DIMS.last().unwrap());
        let f = |name: &str, smem: usize| fam.function_smem(name, smem);
        // SAFETY: only probes whether libcublas can be dlopen'ed.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            Some(CudaBlas::new(gpu.stream.clone()).context("cuBLAS handle")?)
        } else {
            None
        };
        let hopper = if super::gpu::sm90_enabled(gpu)? {
            let hfam = Family::load(gpu, "attention_sm90")?;
            let smem = FK_ATTN90_SMEM_D128 as usize;
            let pipelined = hfam.function_smem(FK_ATTN_FWD_SM90, smem)?;
            let serial = hfam.function_smem(FK_ATTN_FWD_SM90_SERIAL, smem)?;
            let bsmem = FK_ATTN90_BWD_SMEM_D128 as usize;
            let dkdv = hfam.function_smem(FK_ATTN_BWD_DKDV_SM90, bsmem)?;
            let dq = hfam.function_smem(FK_ATTN_BWD_DQ_SM90, bsmem)?;
            let dkdv_serial = hfam.function_smem(FK_ATTN_BWD_DKDV_SM90_SERIAL, bsmem)?;
            let dq_serial = hfam.function_smem(FK_ATTN_BWD_DQ_SM90_SERIAL, bsmem)?;
            Some(HopperFwd { _fam: hfam, pipelined, serial, dkdv, dq, dkdv_serial, dq_serial })
        } else {
            None
        };
        Ok(GpuAttention {
            use_hopper: hopper.is_some(),
            hopper,
            stream: gpu.stream.clone(),
            fwd: f(FK_ATTN_FWD, fwd_max)?,
            fwd_r64: f(FK_ATTN_FWD_R64, fwd_smem(*HEAD_DIMS.last().unwrap(), BLOCK))?,
            prep: f(FK_ATTN_BWD_PREP, 0)?,
            dkdv: f(FK_ATTN_BWD_DKDV, dkdv_max)?,
            dq: f(FK_ATTN_BWD_DQ, dq_max)?,
            softmax: f(FK_SOFTMAX_ROWS, 0)?,
            qk_fwd: f(FK_MODEL_QK_FWD, 0)?,
            qk_bwd: f(FK_MODEL_QK_BWD, 0)?,
            merge: f(FK_MODEL_MERGE_HEADS, 0)?,
            merge_bwd: f(FK_MODEL_MERGE_HEADS_BWD, 0)?,
            blas,
            fam,
        })
    }

    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// Whether the sm_90a forward is loaded (compute capability 9.0).
    pub fn has_hopper(&self) -> bool {
        self.hopper.is_some()
    }

    /// Whether the defaults may take the sm_90a kernels (where they are loaded); off, the model's
    /// attention runs the sm_80 kernels, for the side-by-side measurement of the whole step.
    pub fn set_use_hopper(&mut self, on: bool) {
        self.use_hopper = on && self.hopper.is_some();
    }

    /// The forward `forward` and `forward_dev` run for head dim `d`.
    pub fn default_variant(&self, d: usize) -> FwdVariant {
        if self.use_hopper && HOPPER_HEAD_DIMS.contains(&d) {
            FwdVariant::Hopper
        } else {
            FwdVariant::Rows128
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Device buffers for `dims`, with the key mask [b, l] uploaded when given.
    pub fn alloc(&self, dims: AttnDims, mask: Option<&[u8]>) -> Result<AttnBuffers> {
        let AttnDims { b, l, .. } = dims;
        check_dims(dims)?;
        let n = dims.numel();
        let s = &self.stream;
        // SAFETY: every buffer is written (upload, poison or a kernel) before it is read.
        let bf = || unsafe { s.alloc::<bf16>(n) };
        let f32s = || unsafe { s.alloc::<f32>(dims.rows()) };
        let mask = match mask {
            Some(m) => {
                ensure!(m.len() == b * l, "attention key mask: {} values, expected b·l = {}", m.len(), b * l);
                Some(s.clone_htod(m)?)
            }
            None => None,
        };
        Ok(AttnBuffers {
            dims,
            q: bf()?,
            k: bf()?,
            v: bf()?,
            o: bf()?,
            lse: f32s()?,
            mask,
            dout: bf()?,
            dq: bf()?,
            dk: bf()?,
            dv: bf()?,
            delta: f32s()?,
            scores: None,
        })
    }

    /// f32 host values into a bf16 device tensor of the same length.
    pub fn upload(&self, dst: &mut CudaSlice<bf16>, host: &[f32]) -> Result<()> {
        ensure!(dst.len() == host.len(), "attention upload: {} values for a tensor of {}", host.len(), dst.len());
        let v: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        self.stream.memcpy_htod(&v, dst)?;
        Ok(())
    }

    pub fn download(&self, src: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        let mut v = vec![bf16::ZERO; src.len()];
        self.stream.memcpy_dtoh(src, &mut v)?;
        self.stream.synchronize()?;
        Ok(v.iter().map(|x| x.to_f32()).collect())
    }

    pub fn download_f32(&self, src: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let mut v = vec![0f32; src.len()];
        self.stream.memcpy_dtoh(src, &mut v)?;
        self.stream.synchronize()?;
        Ok(v)
    }

    /// NaN in every output and scratch tensor: whatever a kernel leaves unwritten shows.
    pub fn poison(&self, bufs: &mut AttnBuffers) -> Result<()> {
        let nan16 = vec![bf16::NAN; bufs.dims.numel()];
        let nan32 = vec![f32::NAN; bufs.dims.rows()];
        for t in [&mut bufs.o, &mut bufs.dq, &mut bufs.dk, &mut bufs.dv] {
            self.stream.memcpy_htod(&nan16, t)?;
        }
        self.stream.memcpy_htod(&nan32, &mut bufs.lse)?;
        self.stream.memcpy_htod(&nan32, &mut bufs.delta)?;
        Ok(())
    }

    fn params(&self, bufs: &AttnBuffers) -> FkAttnParams {
        let s = &self.stream;
        let ptrs = AttnPtrs {
            q: ptr(&bufs.q, s),
            k: ptr(&bufs.k, s),
            v: ptr(&bufs.v, s),
            o: ptr(&bufs.o, s),
            lse: ptr(&bufs.lse, s),
            kv_mask: bufs.mask.as_ref().map_or(0, |m| ptr(m, s)),
            dout: ptr(&bufs.dout, s),
            dq: ptr(&bufs.dq, s),
            dk: ptr(&bufs.dk, s),
            dv: ptr(&bufs.dv, s),
            delta: ptr(&bufs.delta, s),
        };
        params_of(bufs.dims, &ptrs)
    }

    /// # Safety
    /// Every pointer in `p` must be a live buffer sized for its dims: an `AttnBuffers`', or views
    /// checked by `forward_dev` / `backward_dev`.
    unsafe fn launch(&self, f: &CudaFunction, p: &FkAttnParams, grid: (usize, usize), smem: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { launch(&self.stream, f, p, (grid.0, grid.1, 1), FK_ATTN_THREADS as usize, smem, "attention") }
    }

    /// O and LSE from Q, K, V (and the mask).
    pub fn forward(&self, bufs: &AttnBuffers) -> Result<()> {
        self.forward_variant(bufs, self.default_variant(bufs.dims.d))
    }

    pub fn forward_variant(&self, bufs: &AttnBuffers, v: FwdVariant) -> Result<()> {
        // SAFETY: every pointer is a buffer of `bufs`, allocated for its dims by `alloc`.
        unsafe { self.launch_forward(bufs.dims, &self.params(bufs), v) }
    }

    /// The forward's pointers after checking every view against `dims`.
    fn checked(&self, dims: AttnDims, t: &AttnViews, what: &str) -> Result<AttnPtrs> {
        check_dims(dims)?;
        for (v, name) in [(t.q, "Q"), (t.k, "K"), (t.v, "V"), (t.o, "O")] {
            v.need(dims.numel(), &format!("{what}: {name}"))?;
        }
        t.lse.need(dims.rows(), &format!("{what}: LSE"))?;
        let s = &self.stream;
        Ok(AttnPtrs {
            q: t.q.addr(s),
            k: t.k.addr(s),
            v: t.v.addr(s),
            o: t.o.addr(s),
            lse: t.lse.addr(s),
            ..Default::default()
        })
    }

    /// O and LSE on the caller's device buffers (the device-resident model).
    pub fn forward_dev(&self, dims: AttnDims, t: &AttnViews) -> Result<()> {
        let p = self.checked(dims, t, "attention")?;
        let mut v = self.default_variant(dims.d);
        if [p.q, p.k, p.v].iter().any(|a| !a.is_multiple_of(16)) {
            v = FwdVariant::Rows128; // TMA needs 16-byte aligned tensors
        }
        // SAFETY: every tensor was checked against dims.
        unsafe { self.launch_forward(dims, &params_of(dims, &p), v) }
    }

    /// dQ, dK, dV on the caller's device buffers from dO and the forward's tensors.
    pub fn backward_dev(&self, dims: AttnDims, t: &AttnViews, g: &AttnGradViews) -> Result<()> {
        let mut p = self.checked(dims, t, "attention backward")?;
        for (v, name) in [(g.dout, "dO"), (g.dq, "dQ"), (g.dk, "dK"), (g.dv, "dV")] {
            v.need(dims.numel(), &format!("attention backward: {name}"))?;
        }
        g.delta.need(dims.rows(), "attention backward: delta")?;
        let s = &self.stream;
        (p.dout, p.dq, p.dk, p.dv, p.delta) =
            (g.dout.addr(s), g.dq.addr(s), g.dk.addr(s), g.dv.addr(s), g.delta.addr(s));
        let fp = params_of(dims, &p);
        for step in self.backward_steps(dims.d, &[fp.q, fp.k, fp.v, fp.dout]) {
            // SAFETY: every tensor was checked against dims.
            unsafe { self.launch_backward(dims, &fp, step)? };
        }
        Ok(())
    }

    /// # Safety
    /// As `launch`.
    unsafe fn launch_forward(&self, dims: AttnDims, p: &FkAttnParams, v: FwdVariant) -> Result<()> {
        let AttnDims { b, h, l, d } = dims;
        let kernel = match v {
            FwdVariant::Rows128 => "fk_attn_fwd",
            FwdVariant::Rows64 => "fk_attn_fwd_r64",
            FwdVariant::Hopper => "fk_attn_fwd_sm90",
            FwdVariant::HopperSerial => "fk_attn_fwd_sm90_serial",
        };
        // Q, K, V read, O (bf16) and LSE written.
        let bytes = (8 * dims.numel() + 4 * dims.rows()) as f64;
        record(OpFamily::Attention, kernel, dims.forward_flops(), bytes, || format!("{dims:?}"));
        let (f, rows, name) = match v {
            FwdVariant::Rows128 => (&self.fwd, FWD_ROWS, "fk_attn_fwd"),
            FwdVariant::Rows64 => (&self.fwd_r64, BLOCK, "fk_attn_fwd_r64"),
            FwdVariant::Hopper | FwdVariant::HopperSerial => {
                let hop = self.hopper.as_ref().context("the Hopper attention forward needs compute capability 9.0")?;
                ensure!(HOPPER_HEAD_DIMS.contains(&d), "the Hopper attention forward: head dim {d} is not 64 or 128");
                let (bm, bn) = (FK_ATTN90_BLOCK_M as usize, FK_ATTN90_BLOCK_N as usize);
                let hp = FkAttn90Params {
                    tq: tensor_map(p.q, dims, bm)?,
                    tk: tensor_map(p.k, dims, bn)?,
                    tv: tensor_map(p.v, dims, bn)?,
                    a: *p,
                };
                let smem = if d == 128 { FK_ATTN90_SMEM_D128 } else { FK_ATTN90_SMEM_D64 } as usize;
                let threads = FK_ATTN90_THREADS as usize;
                // SAFETY: the caller's contract; the descriptors cover the same tensors as `p`.
                return unsafe {
                    let (f, name) = if v == FwdVariant::Hopper {
                        (&hop.pipelined, "fk_attn_fwd_sm90")
                    } else {
                        (&hop.serial, "fk_attn_fwd_sm90_serial")
                    };
                    launch(&self.stream, f, &hp, (l.div_ceil(bm), b * h, 1), threads, smem, name)
                };
            }
        };
        // SAFETY: the caller's contract.
        unsafe { self.launch(f, p, (l.div_ceil(rows), b * h), fwd_smem(d, rows)) }.context(name)
    }

    /// The backward's launches for head dim `d` with these tensor addresses: the sm_90a kernels
    /// (overlapped schedule) where they can run (compute capability 9.0, d 64/128, every tensor
    /// TMA reads 16-byte aligned), else the sm_80 ones.
    pub fn backward_steps(&self, d: usize, addrs: &[u64]) -> [BackwardStep; 3] {
        if self.use_hopper && HOPPER_HEAD_DIMS.contains(&d) && addrs.iter().all(|a| a.is_multiple_of(16)) {
            [BackwardStep::Prep, BackwardStep::DkDvHopper, BackwardStep::DqHopper]
        } else {
            [BackwardStep::Prep, BackwardStep::DkDv, BackwardStep::Dq]
        }
    }

    /// dQ, dK, dV from dO, Q, K, V, O and LSE (the forward's outputs in the same buffers).
    pub fn backward(&self, bufs: &AttnBuffers) -> Result<()> {
        let p = self.params(bufs);
        for step in self.backward_steps(bufs.dims.d, &[p.q, p.k, p.v, p.dout]) {
            self.backward_step(bufs, step)?;
        }
        Ok(())
    }

    /// One launch of the backward (benchmarks time them apart; each needs the ones before it).
    pub fn backward_step(&self, bufs: &AttnBuffers, step: BackwardStep) -> Result<()> {
        // SAFETY: every pointer is a buffer of `bufs`, allocated for its dims by `alloc`.
        unsafe { self.launch_backward(bufs.dims, &self.params(bufs), step) }
    }

    /// # Safety
    /// As `launch`.
    unsafe fn launch_backward(&self, dims: AttnDims, p: &FkAttnParams, step: BackwardStep) -> Result<()> {
        let AttnDims { b, h, l, d } = dims;
        let (_, dkdv_smem, dq_smem) = smem_bytes(d);
        let (n, rows) = (dims.numel(), dims.rows());
        // prep: dO, O read, delta written; dK/dV: Q, K, V, dO, LSE, delta read, dK, dV written;
        // dQ: the same reads, dQ written. The backward's count is split as `DKDV_SHARE` says.
        let (kernel, flops, bytes) = match step {
            BackwardStep::Prep => ("fk_attn_bwd_prep", 0.0, 4 * n + 4 * rows),
            BackwardStep::DkDv => ("fk_attn_bwd_dkdv", dims.backward_flops() * DKDV_SHARE, 12 * n + 8 * rows),
            BackwardStep::Dq => ("fk_attn_bwd_dq", dims.backward_flops() * (1.0 - DKDV_SHARE), 10 * n + 8 * rows),
            BackwardStep::DkDvHopper => {
                ("fk_attn_bwd_dkdv_sm90", dims.backward_flops() * DKDV_SHARE, 12 * n + 8 * rows)
            }
            BackwardStep::DqHopper => {
                ("fk_attn_bwd_dq_sm90", dims.backward_flops() * (1.0 - DKDV_SHARE), 10 * n + 8 * rows)
            }
            BackwardStep::DkDvHopperSerial => {
                ("fk_attn_bwd_dkdv_sm90_serial", dims.backward_flops() * DKDV_SHARE, 12 * n + 8 * rows)
            }
            BackwardStep::DqHopperSerial => {
                ("fk_attn_bwd_dq_sm90_serial", dims.backward_flops() * (1.0 - DKDV_SHARE), 10 * n + 8 * rows)
            }
        };
        record(OpFamily::Attention, kernel, flops, bytes as f64, || format!("{dims:?}"));
        // SAFETY: the caller's contract.
        unsafe {
            match step {
                BackwardStep::Prep => {
                    let warps = (FK_ATTN_THREADS / 32) as usize;
                    self.launch(&self.prep, p, (dims.rows().div_ceil(warps), 1), 0).context("fk_attn_bwd_prep")
                }
                BackwardStep::DkDv => {
                    self.launch(&self.dkdv, p, (l.div_ceil(BLOCK), b * h), dkdv_smem).context("fk_attn_bwd_dkdv")
                }
                BackwardStep::Dq => {
                    self.launch(&self.dq, p, (l.div_ceil(BLOCK), b * h), dq_smem).context("fk_attn_bwd_dq")
                }
                BackwardStep::DkDvHopper
                | BackwardStep::DqHopper
                | BackwardStep::DkDvHopperSerial
                | BackwardStep::DqHopperSerial => {
                    let hop =
                        self.hopper.as_ref().context("the Hopper attention backward needs compute capability 9.0")?;
                    ensure!(
                        HOPPER_HEAD_DIMS.contains(&d),
                        "the Hopper attention backward: head dim {d} is not 64 or 128"
                    );
                    let (blk, tile) = (FK_ATTN90_BWD_BLOCK as usize, FK_ATTN90_BWD_TILE as usize);
                    // dK/dV: blocks of keys hold K and V, stream Q and dO; dQ: the reverse.
                    let dkdv = matches!(step, BackwardStep::DkDvHopper | BackwardStep::DkDvHopperSerial);
                    let ((x1, x2), (y1, y2)) =
                        if dkdv { ((p.k, p.v), (p.q, p.dout)) } else { ((p.q, p.dout), (p.k, p.v)) };
                    let hp = FkAttn90BwdParams {
                        x1: tensor_map(x1, dims, blk)?,
                        x2: tensor_map(x2, dims, blk)?,
                        y1: tensor_map(y1, dims, tile)?,
                        y2: tensor_map(y2, dims, tile)?,
                        a: *p,
                    };
                    let smem = if d == 128 { FK_ATTN90_BWD_SMEM_D128 } else { FK_ATTN90_BWD_SMEM_D64 } as usize;
                    let f = match step {
                        BackwardStep::DkDvHopper => &hop.dkdv,
                        BackwardStep::DqHopper => &hop.dq,
                        BackwardStep::DkDvHopperSerial => &hop.dkdv_serial,
                        // DqHopperSerial (the other steps do not reach this arm)
                        _ => &hop.dq_serial,
                    };
                    // SAFETY: the caller's contract; the descriptors cover the same tensors as `p`.
                    launch(&self.stream, f, &hp, (l.div_ceil(blk), b * h, 1), FK_ATTN90_THREADS as usize, smem, kernel)
                }
            }
        }
    }

    /// The materialised-softmax baseline (no LSE): S = scale·Q·Kᵀ in f32 through cuBLAS,
    /// P = softmax(S) in bf16, O = P·V through cuBLAS. Needs b·h·l²·6 bytes of scratch.
    pub fn forward_naive(&self, bufs: &mut AttnBuffers) -> Result<()> {
        let blas = self.blas.as_ref().context("cuBLAS is not available (libcublas not found)")?;
        let AttnDims { b, h, l, d } = bufs.dims;
        let bh = b * h;
        if bufs.scores.is_none() {
            // SAFETY: the scores are written by the first GEMM, the probabilities by the softmax.
            let s = unsafe { self.stream.alloc::<f32>(bh * l * l) }.context("baseline scores")?;
            let pr = unsafe { self.stream.alloc::<bf16>(bh * l * l) }.context("baseline probabilities")?;
            bufs.scores = Some((s, pr));
        }
        let st = &self.stream;
        let (s_buf, p_buf) = bufs.scores.as_ref().unwrap();
        let (s_ptr, p_ptr) = (ptr(s_buf, st), ptr(p_buf, st));
        let (q, k, v, o) = (ptr(&bufs.q, st), ptr(&bufs.k, st), ptr(&bufs.v, st), ptr(&bufs.o, st));
        let (alpha, zero, one) = (1.0 / (d as f32).sqrt(), 0.0f32, 1.0f32);
        let (li, di) = (l as i32, d as i32);
        let (hd, ll) = ((l * d) as i64, (l * l) as i64);
        // Column-major view of the row-major tensors: Sᵀ = (K)·(Q)ᵀ as op(A)=T on K [d×l col-major],
        // op(B)=N on Q; then Oᵀ = Vᵀ·Pᵀ with both as stored.
        // SAFETY: pointers are buffers of `bufs` sized b·h·l·d and b·h·l²; alpha/beta are host f32
        // as CUBLAS_COMPUTE_32F expects.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                li,
                li,
                di,
                (&alpha) as *const f32 as *const _,
                k as *const _,
                cudaDataType_t::CUDA_R_16BF,
                di,
                hd,
                q as *const _,
                cudaDataType_t::CUDA_R_16BF,
                di,
                hd,
                (&zero) as *const f32 as *const _,
                s_ptr as *mut _,
                cudaDataType_t::CUDA_R_32F,
                li,
                ll,
                bh as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .context("baseline S = Q·Kᵀ (cublasGemmStridedBatchedEx)")?;
        let sp = FkSoftmaxParams {
            p: p_ptr,
            s: s_ptr,
            kv_mask: bufs.mask.as_ref().map_or(0, |m| ptr(m, st)),
            rows: (bh * l) as i64,
            l: l as i64,
            rows_per_batch: (h * l) as i64,
        };
        let (threads, smem) = (FK_ATTN_THREADS as usize, FK_SMEM_SOFTMAX as usize);
        // SAFETY: S and P hold b·h·l² elements; the mask b·l.
        unsafe { launch(st, &self.softmax, &sp, (bh * l, 1, 1), threads, smem, "fk_softmax_rows")? };
        // SAFETY: as above.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_N,
                cublasOperation_t::CUBLAS_OP_N,
                di,
                li,
                li,
                (&one) as *const f32 as *const _,
                v as *const _,
                cudaDataType_t::CUDA_R_16BF,
                di,
                hd,
                p_ptr as *const _,
                cudaDataType_t::CUDA_R_16BF,
                li,
                ll,
                (&zero) as *const f32 as *const _,
                o as *mut _,
                cudaDataType_t::CUDA_R_16BF,
                di,
                hd,
                bh as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .context("baseline O = P·V (cublasGemmStridedBatchedEx)")?;
        Ok(())
    }

    // ---- the layout work around the attention core ----------------------------------------------

    /// QK-RMSNorm per head (weights `q_scale`, `k_scale`, epsilon `eps`), then RoPE on q and k,
    /// of one token stream: q, k, v bf16 and rstd_q, rstd_k at tokens t0..t0 + ls (`QkViews` gives
    /// the layouts). Other tokens are not touched.
    pub fn qk_prologue(&self, dims: HeadsDims, t: &QkViews, eps: f32) -> Result<()> {
        let mut p = self.qk_params(dims, t, eps, "qk_prologue")?;
        let s = &self.stream;
        for (v, name) in [(t.q, "q"), (t.k, "k"), (t.v, "v")] {
            v.need(dims.heads_numel(), &format!("qk_prologue: {name}"))?;
        }
        (p.q, p.k, p.v) = (t.q.addr(s), t.k.addr(s), t.v.addr(s));
        // qkv read (f32 or bf16), q, k, v written in bf16
        let bytes = (6.0 + 3.0 * if t.qkv.is_bf16() { 2.0 } else { 4.0 }) * (dims.rows() * dims.hd()) as f64;
        record(OpFamily::Elementwise, "fk_model_qk_fwd", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every tensor was checked against dims (qk_params and above).
        unsafe { self.run_model(&self.qk_fwd, &p, dims.rows() * dims.h, true, "fk_model_qk_fwd") }
    }

    /// Backward of `qk_prologue`: from dq, dk, dv bf16 [b, h, l, d] (tokens t0..t0 + ls) and the
    /// forward's qkv, rstd, weights and tables (`t`; its q, k, v are not read) to dqkv f32 or bf16
    /// [b·ls, ld], columns [0, 3hd) overwritten, the others untouched. The weights are frozen.
    pub fn qk_prologue_backward(&self, dims: HeadsDims, t: &QkViews, eps: f32, g: &QkGradViews) -> Result<()> {
        let mut p = self.qk_params(dims, t, eps, "qk_prologue_backward")?;
        for (v, name) in [(g.dq, "dq"), (g.dk, "dk"), (g.dv, "dv")] {
            v.need(dims.heads_numel(), &format!("qk_prologue_backward: {name}"))?;
        }
        ensure!(
            g.dqkv.ld() == dims.ld,
            "qk_prologue_backward: dqkv row stride {} is not the dims' {}",
            g.dqkv.ld(),
            dims.ld
        );
        let s = &self.stream;
        p.dqkv = g.dqkv.window(dims.b * dims.ls, 3 * dims.hd(), "qk_prologue_backward: dqkv", s)?;
        p.dqkv_bf16 = g.dqkv.is_bf16() as i32;
        (p.dq, p.dk, p.dv) = (g.dq.addr(s), g.dk.addr(s), g.dv.addr(s));
        // dq, dk, dv bf16 and qkv read, dqkv written (f32 or bf16)
        let (qkv_b, dqkv_b) = (if t.qkv.is_bf16() { 2.0 } else { 4.0 }, if g.dqkv.is_bf16() { 2.0 } else { 4.0 });
        let bytes = (6.0 + 3.0 * qkv_b + 3.0 * dqkv_b) * (dims.rows() * dims.hd()) as f64;
        record(OpFamily::Elementwise, "fk_model_qk_bwd", 0.0, bytes, || format!("{dims:?}"));
        // SAFETY: every tensor was checked against dims (qk_params and above).
        unsafe { self.run_model(&self.qk_bwd, &p, dims.rows() * dims.h, true, "fk_model_qk_bwd") }
    }

    fn qk_params(&self, dims: HeadsDims, t: &QkViews, eps: f32, what: &str) -> Result<FkModelQkParams> {
        dims.check(what, 3 * dims.hd())?;
        ensure!(dims.d.is_multiple_of(2), "{what}: head dim {} is odd (RoPE turns pairs)", dims.d);
        ensure!(t.qkv.ld() == dims.ld, "{what}: qkv row stride {} is not the dims' {}", t.qkv.ld(), dims.ld);
        let qkv = t.qkv.window(dims.b * dims.ls, 3 * dims.hd(), &format!("{what}: qkv"), &self.stream)?;
        for (v, name) in [(t.q_scale, "q_scale"), (t.k_scale, "k_scale")] {
            v.need(dims.d, &format!("{what}: {name}"))?;
        }
        for (v, name) in [(t.cos, "cos"), (t.sin, "sin")] {
            v.need(dims.b * dims.l * dims.d / 2, &format!("{what}: {name}"))?;
        }
        for (v, name) in [(t.rstd_q, "rstd_q"), (t.rstd_k, "rstd_k")] {
            v.need(dims.rows_numel(), &format!("{what}: {name}"))?;
        }
        let s = &self.stream;
        Ok(FkModelQkParams {
            qkv,
            qkv_bf16: t.qkv.is_bf16() as i32,
            q_scale: t.q_scale.addr(s),
            k_scale: t.k_scale.addr(s),
            cos: t.cos.addr(s),
            sin: t.sin.addr(s),
            rstd_q: t.rstd_q.addr(s),
            rstd_k: t.rstd_k.addr(s),
            b: dims.b as i64,
            h: dims.h as i64,
            l: dims.l as i64,
            d: dims.d as i64,
            ls: dims.ls as i64,
            t0: dims.t0 as i64,
            ld: dims.ld as i64,
            eps,
            ..Default::default()
        })
    }

    /// out[bi·ls + t, hi·d + di] = o[bi, hi, t0 + t, di]: the attention output bf16 [b, h, l, d]
    /// to token-major bf16 [b·ls, ld], columns [0, hd) (the others untouched).
    pub fn merge_heads(&self, dims: HeadsDims, o: View<bf16>, out: View<bf16>) -> Result<()> {
        dims.check("merge_heads", dims.hd())?;
        o.need(dims.heads_numel(), "merge_heads: o")?;
        out.need(dims.tokens_window(dims.hd()), "merge_heads: out")?;
        let p = heads_params(dims, o.addr(&self.stream), out.addr(&self.stream));
        record(OpFamily::Elementwise, "fk_model_merge_heads", 0.0, 4.0 * (dims.rows() * dims.hd()) as f64, || {
            format!("{dims:?}")
        });
        // SAFETY: both tensors were checked against dims.
        unsafe { self.run_model(&self.merge, &p, dims.rows() * dims.hd(), false, "fk_model_merge_heads") }
    }

    /// Backward of `merge_heads`: d_o[bi, hi, t0 + t, di] = bf16(dout[bi·ls + t, hi·d + di]),
    /// dout f32 [b·ls, ld] columns [0, hd), d_o bf16 [b, h, l, d] (other tokens untouched).
    pub fn merge_heads_backward(&self, dims: HeadsDims, dout: View<f32>, d_o: View<bf16>) -> Result<()> {
        dims.check("merge_heads_backward", dims.hd())?;
        dout.need(dims.tokens_window(dims.hd()), "merge_heads_backward: dout")?;
        d_o.need(dims.heads_numel(), "merge_heads_backward: d_o")?;
        let p = heads_params(dims, d_o.addr(&self.stream), dout.addr(&self.stream));
        record(OpFamily::Elementwise, "fk_model_merge_heads_bwd", 0.0, 6.0 * (dims.rows() * dims.hd()) as f64, || {
            format!("{dims:?}")
        });
        // SAFETY: both tensors were checked against dims.
        unsafe { self.run_model(&self.merge_bwd, &p, dims.rows() * dims.hd(), false, "fk_model_merge_heads_bwd") }
    }

    /// A launch of one of the layout kernels over `n` items (one warp per item when `per_warp`,
    /// else one thread).
    ///
    /// # Safety
    /// As `launch::launch`.
    unsafe fn run_model<P: DeviceRepr>(
        &self,
        f: &CudaFunction,
        p: &P,
        n: usize,
        per_warp: bool,
        name: &str,
    ) -> Result<()> {
        let threads = FK_MODEL_THREADS as usize;
        let blocks = if per_warp { grid_blocks(n, threads / 32) } else { grid_blocks(n, threads) };
        // SAFETY: the caller's contract.
        unsafe { launch(&self.fam.stream, f, p, (blocks, 1, 1), threads, 0, name) }
    }
}

/// One token stream's place in the joint attention sequence: `b` samples, `h` heads of width
/// `d`, `l` joint tokens of which this stream's `ls` tokens are `t0..t0 + ls` (the double
/// block's txt at t0 = 0, img at t0 = l_txt; a single block's whole sequence at t0 = 0, ls = l).
/// The stream's token-major tensors are [b·ls, ld]; head-major ones [b, h, l, d].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadsDims {
    pub b: usize,
    pub h: usize,
    pub d: usize,
    pub l: usize,
    pub ls: usize,
    pub t0: usize,
    pub ld: usize,
}

impl HeadsDims {
    /// Width of one of q, k, v: h·d.
    pub fn hd(&self) -> usize {
        self.h * self.d
    }
    /// Token rows of the stream: b·ls.
    pub fn rows(&self) -> usize {
        self.b * self.ls
    }
    /// Elements of a head-major [b, h, l, d] tensor.
    pub fn heads_numel(&self) -> usize {
        self.b * self.h * self.l * self.d
    }
    /// Elements of a token-major [b·ls, ld] tensor.
    pub fn tokens_numel(&self) -> usize {
        self.rows() * self.ld
    }
    /// Elements of a [b, h, l] tensor (rstd).
    pub fn rows_numel(&self) -> usize {
        self.b * self.h * self.l
    }
    /// Elements a token-major tensor must hold to cover `cols` columns of every row.
    fn tokens_window(&self, cols: usize) -> usize {
        if self.rows() == 0 {
            0
        } else {
            (self.rows() - 1) * self.ld + cols
        }
    }
    fn check(&self, what: &str, cols: usize) -> Result<()> {
        let HeadsDims { b, h, d, l, ls, t0, ld } = *self;
        ensure!(b > 0 && h > 0 && d > 0 && ls > 0, "{what}: empty shape {self:?}");
        ensure!(t0 + ls <= l, "{what}: tokens {t0}..{} outside the joint sequence of {l}", t0 + ls);
        ensure!(ld >= cols, "{what}: row stride {ld} is below the {cols} columns it covers ({self:?})");
        Ok(())
    }
}

/// The QK prologue's tensors (shapes in `HeadsDims`): qkv f32 [b·ls, ld] (q, k, v in columns
/// [0, hd), [hd, 2hd), [2hd, 3hd)), the norm weights q_scale, k_scale f32 [d], the RoPE tables
/// cos, sin f32 [b, l, d/2] of the joint sequence, q, k, v bf16 [b, h, l, d] and rstd_q, rstd_k
/// f32 [b, h, l]. The forward reads qkv, the weights and the tables and writes the rest at tokens
/// t0..t0 + ls; the backward reads all but q, k, v.
#[derive(Clone, Copy, Debug)]
pub struct QkViews<'a> {
    /// f32 or bf16 [b·ls, ld] (ld = the dims' ld)
    pub qkv: DevMat<'a>,
    pub q_scale: View<'a, f32>,
    pub k_scale: View<'a, f32>,
    pub cos: View<'a, f32>,
    pub sin: View<'a, f32>,
    pub q: View<'a, bf16>,
    pub k: View<'a, bf16>,
    pub v: View<'a, bf16>,
    pub rstd_q: View<'a, f32>,
    pub rstd_k: View<'a, f32>,
}

/// The QK prologue's backward tensors: dq, dk, dv bf16 [b, h, l, d] in, dqkv f32 or bf16
/// [b·ls, ld] out (ld = the dims' ld).
#[derive(Clone, Copy, Debug)]
pub struct QkGradViews<'a> {
    pub dq: View<'a, bf16>,
    pub dk: View<'a, bf16>,
    pub dv: View<'a, bf16>,
    pub dqkv: DevMat<'a>,
}

fn heads_params(dims: HeadsDims, heads: u64, tokens: u64) -> FkModelHeadsParams {
    FkModelHeadsParams {
        heads,
        tokens,
        b: dims.b as i64,
        h: dims.h as i64,
        l: dims.l as i64,
        d: dims.d as i64,
        ls: dims.ls as i64,
        t0: dims.t0 as i64,
        ld: dims.ld as i64,
    }
}
