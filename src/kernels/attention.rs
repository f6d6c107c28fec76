//! Attention on the GPU: the flash kernels of kernels/flash_attn.cu (forward with the saved
//! log-sum-exp; deterministic backward) and, for benchmarks, the materialised-softmax baseline
//! (cuBLAS S = scale·Q·Kᵀ, a row softmax, cuBLAS O = P·V). CPU twin: `ops::attention`
//! (`attention_forward_masked` / `attention_backward_masked`); tests/gpu_attention.rs compares.
//!
//! Tensors are head-major [b, h, l, d] bf16 on the device (f32 on the host side, rounded to
//! nearest even on upload), LSE and delta f32 [b, h, l], the optional key mask u8 [b, l].

use super::abi::*;
use super::gpu::Gpu;
use anyhow::{ensure, Context, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

/// Head dims the kernels are instantiated for (FLUX: 128; the tiny test models: 16).
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

const BLOCK: usize = FK_ATTN_BLOCK as usize;
const PAD: usize = FK_ATTN_PAD as usize;

const FWD_ROWS: usize = FK_ATTN_FWD_ROWS as usize;

/// Dynamic shared memory of each kernel at head dim `d` (flash_attn.cu: fwd_smem, dkdv_smem,
/// dq_smem; the kernels trap when given less): forward, dK/dV, dQ.
pub fn smem_bytes(d: usize) -> (usize, usize, usize) {
    let tile = BLOCK * (d + PAD) * 2;
    (fwd_smem(d, FWD_ROWS), 6 * tile + 4 * BLOCK * 4, 6 * tile)
}

/// The forward's shared memory for blocks of `rows` query rows: Q plus two K and two V tiles.
fn fwd_smem(d: usize, rows: usize) -> usize {
    (rows + 4 * BLOCK) * (d + PAD) * 2
}

/// Forward kernel variants (benchmarks compare them; `forward` uses the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdVariant {
    /// 128 query rows per block, two 16-row groups per warp (fk_attn_fwd).
    Rows128,
    /// 64 query rows per block, one group per warp (fk_attn_fwd_r64), the first version.
    Rows64,
}

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

/// What a host-side forward + backward returns (all f32, [b, h, l, d] and [b, h, l]).
pub struct AttnHostResult {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Device addresses of one attention problem (`forward_dev` / `backward_dev`): Q, K, V, O, dO,
/// dQ, dK, dV bf16 [b, h, l, d]; LSE and delta f32 [b, h, l]; the key mask u8 [b, l] or 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnPtrs {
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

pub struct GpuAttention {
    stream: Arc<CudaStream>,
    fwd: CudaFunction,
    fwd_r64: CudaFunction,
    prep: CudaFunction,
    dkdv: CudaFunction,
    dq: CudaFunction,
    softmax: CudaFunction,
    blas: Option<CudaBlas>,
    /// The last host-slice call's buffers, reused when the next call has the same shape.
    cached: Option<AttnBuffers>,
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

impl GpuAttention {
    pub fn new(gpu: &Gpu) -> Result<GpuAttention> {
        let fatbin = super::module("flash_attn").context("flash_attn kernels missing from the build")?;
        let m = gpu.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec())).context("loading flash_attn")?;
        let (fwd_max, dkdv_max, dq_max) = smem_bytes(*HEAD_DIMS.last().unwrap());
        let f = |name: &str, smem: usize| -> Result<CudaFunction> {
            let func = m.load_function(name).with_context(|| format!("kernel {name}"))?;
            if smem > 48 * 1024 {
                func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                    .with_context(|| format!("{name}: {smem} bytes of shared memory (sm_80 or newer needed)"))?;
            }
            Ok(func)
        };
        // SAFETY: only probes whether libcublas can be dlopen'ed.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            Some(CudaBlas::new(gpu.stream.clone()).context("cuBLAS handle")?)
        } else {
            None
        };
        Ok(GpuAttention {
            stream: gpu.stream.clone(),
            fwd: f(FK_ATTN_FWD, fwd_max)?,
            fwd_r64: f(FK_ATTN_FWD_R64, fwd_smem(*HEAD_DIMS.last().unwrap(), BLOCK))?,
            prep: f(FK_ATTN_BWD_PREP, 0)?,
            dkdv: f(FK_ATTN_BWD_DKDV, dkdv_max)?,
            dq: f(FK_ATTN_BWD_DQ, dq_max)?,
            softmax: f(FK_SOFTMAX_ROWS, 0)?,
            blas,
            cached: None,
        })
    }

    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
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

    fn launch(&self, f: &CudaFunction, p: &FkAttnParams, grid: (usize, usize), smem: usize) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, 1),
            block_dim: (FK_ATTN_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(p);
        // SAFETY: every pointer in `p` is a buffer of `AttnBuffers` sized for its dims; the struct
        // is the FK_GRID_PARAMS argument of the kernel (layout asserted in abi.rs).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// O and LSE from Q, K, V (and the mask).
    pub fn forward(&self, bufs: &AttnBuffers) -> Result<()> {
        self.forward_variant(bufs, FwdVariant::Rows128)
    }

    pub fn forward_variant(&self, bufs: &AttnBuffers, v: FwdVariant) -> Result<()> {
        self.launch_forward(bufs.dims, &self.params(bufs), v)
    }

    /// O and LSE on the caller's device buffers (the device-resident model).
    pub fn forward_dev(&self, dims: AttnDims, p: &AttnPtrs) -> Result<()> {
        ensure!(p.q != 0 && p.k != 0 && p.v != 0 && p.o != 0 && p.lse != 0, "attention: Q, K, V, O or LSE missing");
        check_dims(dims)?;
        self.launch_forward(dims, &params_of(dims, p), FwdVariant::Rows128)
    }

    /// dQ, dK, dV on the caller's device buffers; `p.delta` is f32 [b, h, l] scratch.
    pub fn backward_dev(&self, dims: AttnDims, p: &AttnPtrs) -> Result<()> {
        ensure!(
            [p.q, p.k, p.v, p.o, p.lse, p.dout, p.dq, p.dk, p.dv, p.delta].iter().all(|&x| x != 0),
            "attention backward: a buffer is missing"
        );
        check_dims(dims)?;
        let fp = params_of(dims, p);
        for step in [BackwardStep::Prep, BackwardStep::DkDv, BackwardStep::Dq] {
            self.launch_backward(dims, &fp, step)?;
        }
        Ok(())
    }

    fn launch_forward(&self, dims: AttnDims, p: &FkAttnParams, v: FwdVariant) -> Result<()> {
        let AttnDims { b, h, l, d } = dims;
        let (f, rows, name) = match v {
            FwdVariant::Rows128 => (&self.fwd, FWD_ROWS, "fk_attn_fwd"),
            FwdVariant::Rows64 => (&self.fwd_r64, BLOCK, "fk_attn_fwd_r64"),
        };
        self.launch(f, p, (l.div_ceil(rows), b * h), fwd_smem(d, rows)).context(name)
    }

    /// dQ, dK, dV from dO, Q, K, V, O and LSE (the forward's outputs in the same buffers).
    pub fn backward(&self, bufs: &AttnBuffers) -> Result<()> {
        for step in [BackwardStep::Prep, BackwardStep::DkDv, BackwardStep::Dq] {
            self.backward_step(bufs, step)?;
        }
        Ok(())
    }

    /// One launch of the backward (benchmarks time them apart; each needs the ones before it).
    pub fn backward_step(&self, bufs: &AttnBuffers, step: BackwardStep) -> Result<()> {
        self.launch_backward(bufs.dims, &self.params(bufs), step)
    }

    fn launch_backward(&self, dims: AttnDims, p: &FkAttnParams, step: BackwardStep) -> Result<()> {
        let AttnDims { b, h, l, d } = dims;
        let (_, dkdv_smem, dq_smem) = smem_bytes(d);
        match step {
            BackwardStep::Prep => {
                let warps = (FK_ATTN_THREADS / 32) as usize;
                self.launch(&self.prep, p, (dims.rows().div_ceil(warps), 1), 0).context("fk_attn_bwd_prep")
            }
            BackwardStep::DkDv => {
                self.launch(&self.dkdv, p, (l.div_ceil(BLOCK), b * h), dkdv_smem).context("fk_attn_bwd_dkdv")
            }
            BackwardStep::Dq => self.launch(&self.dq, p, (l.div_ceil(BLOCK), b * h), dq_smem).context("fk_attn_bwd_dq"),
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
        let cfg = LaunchConfig {
            grid_dim: ((bh * l) as u32, 1, 1),
            block_dim: (FK_ATTN_THREADS as u32, 1, 1),
            shared_mem_bytes: FK_SMEM_SOFTMAX as u32,
        };
        let mut lb = self.stream.launch_builder(&self.softmax);
        lb.arg(&sp);
        // SAFETY: S and P hold b·h·l² elements; the mask b·l.
        unsafe { lb.launch(cfg) }.context("fk_softmax_rows")?;
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

    /// Buffers for a host-slice call: the previous call's when the shape and the presence of a
    /// mask match, so the model path allocates nothing per call; otherwise new ones. Outputs are
    /// poisoned by every host-slice call, so a reused buffer cannot pass off stale values.
    fn host_buffers(&mut self, dims: AttnDims, mask: Option<&[u8]>) -> Result<AttnBuffers> {
        match self.cached.take() {
            Some(mut b) if b.dims == dims && b.mask.is_some() == mask.is_some() => {
                if let (Some(dst), Some(m)) = (b.mask.as_mut(), mask) {
                    ensure!(
                        m.len() == dims.b * dims.l,
                        "attention key mask: {} values, expected b·l = {}",
                        m.len(),
                        dims.b * dims.l
                    );
                    self.stream.memcpy_htod(m, dst)?;
                }
                Ok(b)
            }
            _ => self.alloc(dims, mask),
        }
    }

    /// `host_buffers` with Q, K and V uploaded.
    fn host_inputs(
        &mut self,
        dims: AttnDims,
        mask: Option<&[u8]>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<AttnBuffers> {
        let mut bufs = self.host_buffers(dims, mask)?;
        self.upload(&mut bufs.q, q)?;
        self.upload(&mut bufs.k, k)?;
        self.upload(&mut bufs.v, v)?;
        Ok(bufs)
    }

    /// Host-slice forward and backward, the twin of `ops::attention::attention_forward_masked`
    /// followed by `attention_backward_masked` (tests; the outputs are poisoned first).
    pub fn forward_backward(
        &mut self,
        variant: FwdVariant,
        dims: AttnDims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        mask: Option<&[u8]>,
    ) -> Result<AttnHostResult> {
        let mut bufs = self.host_inputs(dims, mask, q, k, v)?;
        self.upload(&mut bufs.dout, dout)?;
        self.poison(&mut bufs)?;
        self.forward_variant(&bufs, variant)?;
        self.backward(&bufs)?;
        let r = AttnHostResult {
            o: self.download(&bufs.o)?,
            lse: self.download_f32(&bufs.lse)?,
            dq: self.download(&bufs.dq)?,
            dk: self.download(&bufs.dk)?,
            dv: self.download(&bufs.dv)?,
        };
        self.cached = Some(bufs);
        Ok(r)
    }

    /// Host-slice forward (O, LSE): `ops::attention::attention_forward_masked`'s twin.
    pub fn forward_host(
        &mut self,
        dims: AttnDims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut bufs = self.host_inputs(dims, mask, q, k, v)?;
        self.poison(&mut bufs)?;
        self.forward(&bufs)?;
        let r = (self.download(&bufs.o)?, self.download_f32(&bufs.lse)?);
        self.cached = Some(bufs);
        Ok(r)
    }

    /// Host-slice backward from the forward's O and LSE (as `forward_host` returned them):
    /// `attention_backward_masked`'s twin, returning (dQ, dK, dV).
    pub fn backward_host(
        &mut self,
        dims: AttnDims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        dout: &[f32],
        mask: Option<&[u8]>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        ensure!(lse.len() == dims.rows(), "attention backward: LSE has {} values, expected {}", lse.len(), dims.rows());
        let mut bufs = self.host_inputs(dims, mask, q, k, v)?;
        self.upload(&mut bufs.o, o)?;
        self.upload(&mut bufs.dout, dout)?;
        self.stream.memcpy_htod(lse, &mut bufs.lse)?;
        for t in [&mut bufs.dq, &mut bufs.dk, &mut bufs.dv] {
            self.stream.memcpy_htod(&vec![bf16::NAN; dims.numel()], t)?;
        }
        self.backward(&bufs)?;
        let r = (self.download(&bufs.dq)?, self.download(&bufs.dk)?, self.download(&bufs.dv)?);
        self.cached = Some(bufs);
        Ok(r)
    }

    /// Host-slice baseline forward (O only).
    pub fn forward_naive_host(
        &mut self,
        dims: AttnDims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
    ) -> Result<Vec<f32>> {
        let mut bufs = self.host_inputs(dims, mask, q, k, v)?;
        self.poison(&mut bufs)?;
        self.forward_naive(&mut bufs)?;
        let o = self.download(&bufs.o)?;
        self.cached = Some(bufs);
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_an_sm80_block() {
        // 163 KB of dynamic shared memory per block on sm_80, 227 KB on sm_90.
        for d in HEAD_DIMS {
            let (a, b, c) = smem_bytes(d);
            assert!(a.max(b).max(c) <= 163 * 1024, "d = {d}");
        }
        assert_eq!(smem_bytes(128), (104448, 105472, 104448));
        assert_eq!(fwd_smem(128, BLOCK), 87040);
    }

    #[test]
    fn flop_counts() {
        let d = AttnDims { b: 1, h: 24, l: 4608, d: 128 };
        assert_eq!(d.forward_flops(), 4.0 * 24.0 * 4608.0 * 4608.0 * 128.0);
        assert_eq!(d.backward_flops(), 2.5 * d.forward_flops());
    }
}
