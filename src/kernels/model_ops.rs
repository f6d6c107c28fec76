//! The whole-model training step's layout moves and remaining pointwise kernels on the GPU
//! (kernels/model_ops.cu). Each is the twin of a CPU function:
//!
//! | GPU                                     | CPU (the specification)                               |
//! |-----------------------------------------|-------------------------------------------------------|
//! | `cast_f32_to_bf16`, `cast_bf16_to_f32`, `copy2d` | slice copies, `half::bf16::from_f32`, `+=`   |
//! | `qk_prologue`                           | `model::attention::attention_block`'s QK-RMSNorm per head + `ops::rope::rope_forward`, on heads split from a token-major qkv (`ops::attention::split_heads`) |
//! | `qk_prologue_backward`                  | `attention_block_backward`'s `rope_backward` + head RMSNorm backward (`ops::norm::rmsnorm_backward`, frozen weight), merged token-major |
//! | `merge_heads` / `merge_heads_backward`  | `ops::attention::merge_heads` / `split_heads`          |
//! | `gelu_tanh` / `gelu_tanh_backward`      | `ops::activation::gelu_tanh_forward` / `_backward`     |
//! | `timestep_embedding`                    | `ops::embedding::timestep_embedding`                   |
//! | `fill_random`                           | `model::random::RandomParam::generate`                 |
//!
//! Device-level functions take raw device addresses (`u64`) and shapes: the caller owns the
//! buffers (an arena, a column block of a wider matrix) and sizes them for the shapes it passes.
//! Token-major activations are [rows, ld] with an explicit row stride `ld` in elements;
//! attention tensors are head-major [b, h, l, d] bf16 of the joint [txt ; img] sequence. The
//! `*_host` functions upload host slices, poison the outputs with NaN, launch, and download
//! (tests/gpu_model_ops.rs compares them with the CPU).

use super::abi::*;
use super::gpu::Gpu;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

const THREADS: usize = FK_MODEL_THREADS as usize;
const WARPS: usize = THREADS / 32;

/// The element types of the device tensors: f32, and bf16 (round to nearest even).
pub trait Elem: DeviceRepr + Copy + Default + std::fmt::Debug + 'static {
    /// The kernels' flag: 1 for bf16.
    const BF16: bool;
    /// The poison written to outputs before a launch.
    const NAN: Self;
}

impl Elem for f32 {
    const BF16: bool = false;
    const NAN: f32 = f32::NAN;
}

impl Elem for bf16 {
    const BF16: bool = true;
    const NAN: bf16 = bf16::NAN;
}

/// A row-major matrix window on the device: element (r, c) at `ptr + (r·ld + c)·size`, f32 or
/// bf16. Offsetting `ptr` addresses a column block of a wider matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevMat {
    pub ptr: u64,
    pub ld: usize,
    pub bf16: bool,
}

impl DevMat {
    pub fn f32(ptr: u64, ld: usize) -> DevMat {
        DevMat { ptr, ld, bf16: false }
    }
    pub fn bf16(ptr: u64, ld: usize) -> DevMat {
        DevMat { ptr, ld, bf16: true }
    }
    fn elem_bytes(&self) -> u64 {
        if self.bf16 {
            2
        } else {
            4
        }
    }
    fn check(&self, what: &str, cols: usize) -> Result<()> {
        check_ptr(what, self.ptr, self.elem_bytes())?;
        ensure!(self.ld >= cols, "{what}: row stride {} is below the {cols} columns", self.ld);
        Ok(())
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
    fn check(&self, what: &str, cols: usize) -> Result<()> {
        let HeadsDims { b, h, d, l, ls, t0, ld } = *self;
        ensure!(b > 0 && h > 0 && d > 0 && ls > 0, "{what}: empty shape {self:?}");
        ensure!(t0 + ls <= l, "{what}: tokens {t0}..{} outside the joint sequence of {l}", t0 + ls);
        ensure!(ld >= cols, "{what}: row stride {ld} is below the {cols} columns it covers ({self:?})");
        Ok(())
    }
}

/// Device addresses of the QK prologue's tensors (shapes in `HeadsDims`):
/// qkv f32 [b·ls, ld] (q, k, v in columns [0, hd), [hd, 2hd), [2hd, 3hd)), the norm weights
/// q_scale, k_scale f32 [d], the RoPE tables cos, sin f32 [b, l, d/2] of the joint sequence,
/// q, k, v bf16 [b, h, l, d] and rstd_q, rstd_k f32 [b, h, l]. The forward reads qkv, the
/// weights and the tables and writes the rest at tokens t0..t0 + ls; the backward reads all
/// but q, k, v.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QkPtrs {
    pub qkv: u64,
    pub q_scale: u64,
    pub k_scale: u64,
    pub cos: u64,
    pub sin: u64,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub rstd_q: u64,
    pub rstd_k: u64,
}

/// Host slices of the QK prologue's inputs, shaped as in `QkPtrs`.
#[derive(Clone, Copy, Debug)]
pub struct QkHostInputs<'a> {
    pub qkv: &'a [f32],
    pub q_scale: &'a [f32],
    pub k_scale: &'a [f32],
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// What `qk_prologue_host` returns: q, k, v [b, h, l, d] and rstd [b, h, l], NaN outside tokens
/// t0..t0 + ls (never written).
pub struct QkHost {
    pub q: Vec<bf16>,
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    pub rstd_q: Vec<f32>,
    pub rstd_k: Vec<f32>,
}

/// A tensor whose every element is a hash of (stream, index), as the CPU's random parameters
/// generate it (`model::random`): what `fill_random` reproduces bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomFill {
    /// The tensor's stream (model seed mixed with its name).
    pub stream: u64,
    pub numel: usize,
    pub init: Fill,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fill {
    /// U(−bound, bound) from 24 random bits per element.
    Uniform(f32),
    Const(f32),
}

pub struct GpuModelOps {
    stream: Arc<CudaStream>,
    copy2d: CudaFunction,
    qk_fwd: CudaFunction,
    qk_bwd: CudaFunction,
    merge: CudaFunction,
    merge_bwd: CudaFunction,
    gelu_fwd: CudaFunction,
    gelu_bwd: CudaFunction,
    temb: CudaFunction,
    random: CudaFunction,
}

fn check_ptr(what: &str, ptr: u64, align: u64) -> Result<()> {
    ensure!(ptr != 0, "{what}: null device address");
    ensure!(ptr.is_multiple_of(align), "{what}: device address {ptr:#x} not aligned to {align} bytes");
    Ok(())
}

/// Blocks of a grid-stride launch over `n` elements.
fn pointwise_blocks(n: usize) -> usize {
    n.div_ceil(THREADS).clamp(1, 65535 * 8)
}

/// Blocks of a warp-per-item launch over `n` items.
fn warp_blocks(n: usize) -> usize {
    n.div_ceil(WARPS).clamp(1, 65535 * 8)
}

impl GpuModelOps {
    pub fn new(gpu: &Gpu) -> Result<GpuModelOps> {
        let fatbin = super::module("model_ops").context("model_ops kernels missing from the build")?;
        let m = gpu.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec())).context("loading model_ops")?;
        let f = |name: &str| m.load_function(name).with_context(|| format!("kernel {name}"));
        Ok(GpuModelOps {
            stream: gpu.stream.clone(),
            copy2d: f(FK_MODEL_COPY2D)?,
            qk_fwd: f(FK_MODEL_QK_FWD)?,
            qk_bwd: f(FK_MODEL_QK_BWD)?,
            merge: f(FK_MODEL_MERGE_HEADS)?,
            merge_bwd: f(FK_MODEL_MERGE_HEADS_BWD)?,
            gelu_fwd: f(FK_MODEL_GELU_FWD)?,
            gelu_bwd: f(FK_MODEL_GELU_BWD)?,
            temb: f(FK_MODEL_TIMESTEP_EMB)?,
            random: f(FK_MODEL_RANDOM_FILL)?,
        })
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    fn launch<P: DeviceRepr>(&self, f: &CudaFunction, p: &P, blocks: usize, name: &str) -> Result<()> {
        let cfg =
            LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(f);
        b.arg(p);
        // SAFETY: `p` is the FK_GRID_PARAMS struct of the kernel (layout asserted in abi.rs); every
        // address in it was checked non-null and aligned, and the caller sized each buffer for the
        // dims it carries (the contract of every public function here).
        unsafe { b.launch(cfg) }.with_context(|| name.to_string())?;
        Ok(())
    }

    fn p<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    /// A device copy of `host` (one NaN for an empty slice: no zero-size allocations).
    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.poisoned(1);
        }
        Ok(self.stream.clone_htod(host)?)
    }

    /// A device buffer of `n` NaNs: whatever a kernel leaves unwritten shows.
    fn poisoned<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(&vec![T::NAN; n.max(1)])?)
    }

    fn download<T: Elem>(&self, s: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut v = self.stream.clone_dtoh(s)?;
        v.truncate(n);
        Ok(v)
    }

    // ---- copies and casts ---------------------------------------------------------------------

    /// dst[r, c] = src[r, c] over a [rows, cols] window, either side f32 or bf16 (bf16 stores
    /// round to nearest even); with `accumulate`, dst[r, c] += src[r, c] (f32 dst only). Splits
    /// and joins [txt ; img] along the sequence (rows of one sample) and moves column blocks.
    pub fn copy2d(&self, rows: usize, cols: usize, src: DevMat, dst: DevMat, accumulate: bool) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        src.check("copy2d source", cols)?;
        dst.check("copy2d destination", cols)?;
        ensure!(!(accumulate && dst.bf16), "copy2d: accumulation needs an f32 destination");
        let p = FkModelCopyParams {
            src: src.ptr,
            dst: dst.ptr,
            rows: rows as i64,
            cols: cols as i64,
            ld_src: src.ld as i64,
            ld_dst: dst.ld as i64,
            src_bf16: src.bf16 as i32,
            dst_bf16: dst.bf16 as i32,
            accumulate: accumulate as i32,
            ..Default::default()
        };
        self.launch(&self.copy2d, &p, pointwise_blocks(rows * cols), "fk_model_copy2d")
    }

    /// dst[i] = bf16(src[i]) for i < n (round to nearest even).
    pub fn cast_f32_to_bf16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        self.copy2d(1, n, DevMat::f32(src, n), DevMat::bf16(dst, n), false)
    }

    /// dst[i] = f32(src[i]) for i < n (exact).
    pub fn cast_bf16_to_f32(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        self.copy2d(1, n, DevMat::bf16(src, n), DevMat::f32(dst, n), false)
    }

    /// Host-slice cast between any two element types (f32 → bf16 rounds to nearest even).
    pub fn cast_host<S: Elem, D: Elem>(&self, src: &[S]) -> Result<Vec<D>> {
        let n = src.len();
        let (s, d) = (self.upload(src)?, self.poisoned::<D>(n)?);
        self.copy2d(
            1,
            n,
            DevMat { ptr: self.p(&s), ld: n, bf16: S::BF16 },
            DevMat { ptr: self.p(&d), ld: n, bf16: D::BF16 },
            false,
        )?;
        self.download(&d, n)
    }

    /// Host-slice `copy2d`: `src` [rows, ld_src], `dst` [rows, ld_dst] is the destination's
    /// content before the launch (NaN to see what is written; values to accumulate onto);
    /// returns the destination after.
    #[allow(clippy::too_many_arguments)]
    pub fn copy2d_host<S: Elem, D: Elem>(
        &self,
        rows: usize,
        cols: usize,
        src: &[S],
        ld_src: usize,
        dst: &[D],
        ld_dst: usize,
        accumulate: bool,
    ) -> Result<Vec<D>> {
        ensure!(
            src.len() >= rows * ld_src && dst.len() >= rows * ld_dst,
            "copy2d_host: buffers shorter than {rows} rows of stride {ld_src} / {ld_dst}"
        );
        let (s, d) = (self.upload(src)?, self.upload(dst)?);
        let src_m = DevMat { ptr: self.p(&s), ld: ld_src, bf16: S::BF16 };
        let dst_m = DevMat { ptr: self.p(&d), ld: ld_dst, bf16: D::BF16 };
        self.copy2d(rows, cols, src_m, dst_m, accumulate)?;
        self.download(&d, dst.len())
    }

    // ---- the attention prologue ---------------------------------------------------------------

    fn qk_params(&self, dims: HeadsDims, t: &QkPtrs, eps: f32, what: &str) -> Result<FkModelQkParams> {
        dims.check(what, 3 * dims.hd())?;
        ensure!(dims.d.is_multiple_of(2), "{what}: head dim {} is odd (RoPE turns pairs)", dims.d);
        for (name, ptr) in
            [("qkv", t.qkv), ("q_scale", t.q_scale), ("k_scale", t.k_scale), ("cos", t.cos), ("sin", t.sin)]
        {
            check_ptr(&format!("{what}: {name}"), ptr, 4)?;
        }
        check_ptr(&format!("{what}: rstd_q"), t.rstd_q, 4)?;
        check_ptr(&format!("{what}: rstd_k"), t.rstd_k, 4)?;
        Ok(FkModelQkParams {
            qkv: t.qkv,
            q_scale: t.q_scale,
            k_scale: t.k_scale,
            cos: t.cos,
            sin: t.sin,
            rstd_q: t.rstd_q,
            rstd_k: t.rstd_k,
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

    /// QK-RMSNorm per head (weights q_scale, k_scale, epsilon `eps`), then RoPE on q and k, of
    /// one token stream: q, k, v bf16 and rstd_q, rstd_k at tokens t0..t0 + ls (`QkPtrs` gives
    /// the layouts). Other tokens are not touched.
    pub fn qk_prologue(&self, dims: HeadsDims, t: &QkPtrs, eps: f32) -> Result<()> {
        let mut p = self.qk_params(dims, t, eps, "qk_prologue")?;
        for (name, ptr) in [("q", t.q), ("k", t.k), ("v", t.v)] {
            check_ptr(&format!("qk_prologue: {name}"), ptr, 2)?;
        }
        (p.q, p.k, p.v) = (t.q, t.k, t.v);
        self.launch(&self.qk_fwd, &p, warp_blocks(dims.rows() * dims.h), "fk_model_qk_fwd")
    }

    /// Backward of `qk_prologue`: from dq, dk, dv bf16 [b, h, l, d] (tokens t0..t0 + ls) and the
    /// forward's qkv, rstd, weights and tables (`t`; its q, k, v are not read) to dqkv f32
    /// [b·ls, ld], columns [0, 3hd) overwritten, the others untouched. The weights are frozen.
    pub fn qk_prologue_backward(
        &self,
        dims: HeadsDims,
        t: &QkPtrs,
        eps: f32,
        dq: u64,
        dk: u64,
        dv: u64,
        dqkv: u64,
    ) -> Result<()> {
        let mut p = self.qk_params(dims, t, eps, "qk_prologue_backward")?;
        for (name, ptr) in [("dq", dq), ("dk", dk), ("dv", dv)] {
            check_ptr(&format!("qk_prologue_backward: {name}"), ptr, 2)?;
        }
        check_ptr("qk_prologue_backward: dqkv", dqkv, 4)?;
        (p.dq, p.dk, p.dv, p.dqkv) = (dq, dk, dv, dqkv);
        self.launch(&self.qk_bwd, &p, warp_blocks(dims.rows() * dims.h), "fk_model_qk_bwd")
    }

    fn qk_upload(&self, dims: HeadsDims, inp: &QkHostInputs, what: &str) -> Result<[CudaSlice<f32>; 5]> {
        let tab = dims.b * dims.l * dims.d / 2;
        ensure!(
            inp.qkv.len() == dims.tokens_numel()
                && inp.q_scale.len() == dims.d
                && inp.k_scale.len() == dims.d
                && inp.cos.len() == tab
                && inp.sin.len() == tab,
            "{what}: input lengths for {dims:?}"
        );
        Ok([
            self.upload(inp.qkv)?,
            self.upload(inp.q_scale)?,
            self.upload(inp.k_scale)?,
            self.upload(inp.cos)?,
            self.upload(inp.sin)?,
        ])
    }

    /// The addresses of `qk_upload`'s buffers (qkv, scales, tables); the rest 0.
    fn qk_inputs(&self, b: &[CudaSlice<f32>; 5]) -> QkPtrs {
        QkPtrs {
            qkv: self.p(&b[0]),
            q_scale: self.p(&b[1]),
            k_scale: self.p(&b[2]),
            cos: self.p(&b[3]),
            sin: self.p(&b[4]),
            ..Default::default()
        }
    }

    /// Host-slice `qk_prologue`; outputs start as NaN.
    pub fn qk_prologue_host(&self, dims: HeadsDims, inp: &QkHostInputs, eps: f32) -> Result<QkHost> {
        let inputs = self.qk_upload(dims, inp, "qk_prologue_host")?;
        let (nh, nr) = (dims.heads_numel(), dims.rows_numel());
        let (q, k, v) = (self.poisoned::<bf16>(nh)?, self.poisoned::<bf16>(nh)?, self.poisoned::<bf16>(nh)?);
        let (rq, rk) = (self.poisoned::<f32>(nr)?, self.poisoned::<f32>(nr)?);
        let t = QkPtrs {
            q: self.p(&q),
            k: self.p(&k),
            v: self.p(&v),
            rstd_q: self.p(&rq),
            rstd_k: self.p(&rk),
            ..self.qk_inputs(&inputs)
        };
        self.qk_prologue(dims, &t, eps)?;
        Ok(QkHost {
            q: self.download(&q, nh)?,
            k: self.download(&k, nh)?,
            v: self.download(&v, nh)?,
            rstd_q: self.download(&rq, nr)?,
            rstd_k: self.download(&rk, nr)?,
        })
    }

    /// Host-slice `qk_prologue_backward`: dqkv [b·ls, ld], NaN outside columns [0, 3hd).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_prologue_backward_host(
        &self,
        dims: HeadsDims,
        inp: &QkHostInputs,
        eps: f32,
        rstd_q: &[f32],
        rstd_k: &[f32],
        dq: &[bf16],
        dk: &[bf16],
        dv: &[bf16],
    ) -> Result<Vec<f32>> {
        let (nh, nr) = (dims.heads_numel(), dims.rows_numel());
        ensure!(
            rstd_q.len() == nr && rstd_k.len() == nr && dq.len() == nh && dk.len() == nh && dv.len() == nh,
            "qk_prologue_backward_host: gradient or rstd lengths for {dims:?}"
        );
        let inputs = self.qk_upload(dims, inp, "qk_prologue_backward_host")?;
        let (rq, rk) = (self.upload(rstd_q)?, self.upload(rstd_k)?);
        let (dqd, dkd, dvd) = (self.upload(dq)?, self.upload(dk)?, self.upload(dv)?);
        let out = self.poisoned::<f32>(dims.tokens_numel())?;
        let t = QkPtrs { rstd_q: self.p(&rq), rstd_k: self.p(&rk), ..self.qk_inputs(&inputs) };
        self.qk_prologue_backward(dims, &t, eps, self.p(&dqd), self.p(&dkd), self.p(&dvd), self.p(&out))?;
        self.download(&out, dims.tokens_numel())
    }

    // ---- merge heads --------------------------------------------------------------------------

    /// out[bi·ls + t, hi·d + di] = o[bi, hi, t0 + t, di]: the attention output bf16 [b, h, l, d]
    /// to token-major bf16 [b·ls, ld], columns [0, hd) (the others untouched).
    pub fn merge_heads(&self, dims: HeadsDims, o: u64, out: u64) -> Result<()> {
        dims.check("merge_heads", dims.hd())?;
        check_ptr("merge_heads: o", o, 2)?;
        check_ptr("merge_heads: out", out, 2)?;
        let p = self.heads_params(dims, o, out);
        self.launch(&self.merge, &p, pointwise_blocks(dims.rows() * dims.hd()), "fk_model_merge_heads")
    }

    /// Backward of `merge_heads`: d_o[bi, hi, t0 + t, di] = bf16(dout[bi·ls + t, hi·d + di]),
    /// dout f32 [b·ls, ld] columns [0, hd), d_o bf16 [b, h, l, d] (other tokens untouched).
    pub fn merge_heads_backward(&self, dims: HeadsDims, dout: u64, d_o: u64) -> Result<()> {
        dims.check("merge_heads_backward", dims.hd())?;
        check_ptr("merge_heads_backward: dout", dout, 4)?;
        check_ptr("merge_heads_backward: d_o", d_o, 2)?;
        let p = self.heads_params(dims, d_o, dout);
        self.launch(&self.merge_bwd, &p, pointwise_blocks(dims.rows() * dims.hd()), "fk_model_merge_heads_bwd")
    }

    fn heads_params(&self, dims: HeadsDims, heads: u64, tokens: u64) -> FkModelHeadsParams {
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

    /// Host-slice `merge_heads`: o [b, h, l, d] → [b·ls, ld], NaN outside columns [0, hd).
    pub fn merge_heads_host(&self, dims: HeadsDims, o: &[bf16]) -> Result<Vec<bf16>> {
        ensure!(o.len() == dims.heads_numel(), "merge_heads_host: o length for {dims:?}");
        let (od, out) = (self.upload(o)?, self.poisoned::<bf16>(dims.tokens_numel())?);
        self.merge_heads(dims, self.p(&od), self.p(&out))?;
        self.download(&out, dims.tokens_numel())
    }

    /// Host-slice `merge_heads_backward`: dout [b·ls, ld] → dO [b, h, l, d], NaN outside tokens
    /// t0..t0 + ls.
    pub fn merge_heads_backward_host(&self, dims: HeadsDims, dout: &[f32]) -> Result<Vec<bf16>> {
        ensure!(dout.len() == dims.tokens_numel(), "merge_heads_backward_host: dout length for {dims:?}");
        let (dd, d_o) = (self.upload(dout)?, self.poisoned::<bf16>(dims.heads_numel())?);
        self.merge_heads_backward(dims, self.p(&dd), self.p(&d_o))?;
        self.download(&d_o, dims.heads_numel())
    }

    // ---- GELU-tanh ----------------------------------------------------------------------------

    /// out = gelu_tanh(x) on a [rows, cols] window; x f32, out f32 or bf16.
    pub fn gelu_tanh(&self, rows: usize, cols: usize, x: DevMat, out: DevMat) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        ensure!(!x.bf16, "gelu_tanh: x must be f32");
        x.check("gelu_tanh: x", cols)?;
        out.check("gelu_tanh: out", cols)?;
        let p = FkModelGeluParams {
            x: x.ptr,
            out: out.ptr,
            rows: rows as i64,
            cols: cols as i64,
            ld_x: x.ld as i64,
            ld_out: out.ld as i64,
            out_bf16: out.bf16 as i32,
            ..Default::default()
        };
        self.launch(&self.gelu_fwd, &p, pointwise_blocks(rows * cols), "fk_model_gelu_fwd")
    }

    /// dx = dy⊙gelu_tanh'(x) on a [rows, cols] window, all f32.
    pub fn gelu_tanh_backward(&self, rows: usize, cols: usize, x: DevMat, dy: DevMat, dx: DevMat) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        ensure!(!x.bf16 && !dy.bf16 && !dx.bf16, "gelu_tanh_backward: x, dy and dx must be f32");
        x.check("gelu_tanh_backward: x", cols)?;
        dy.check("gelu_tanh_backward: dy", cols)?;
        dx.check("gelu_tanh_backward: dx", cols)?;
        let p = FkModelGeluParams {
            x: x.ptr,
            dy: dy.ptr,
            out: dx.ptr,
            rows: rows as i64,
            cols: cols as i64,
            ld_x: x.ld as i64,
            ld_dy: dy.ld as i64,
            ld_out: dx.ld as i64,
            ..Default::default()
        };
        self.launch(&self.gelu_bwd, &p, pointwise_blocks(rows * cols), "fk_model_gelu_bwd")
    }

    /// Host-slice `gelu_tanh`: x [rows, ld_x] → out [rows, ld_out], NaN outside the window.
    pub fn gelu_tanh_host<T: Elem>(
        &self,
        rows: usize,
        cols: usize,
        x: &[f32],
        ld_x: usize,
        ld_out: usize,
    ) -> Result<Vec<T>> {
        ensure!(x.len() >= rows * ld_x, "gelu_tanh_host: x shorter than {rows} rows of stride {ld_x}");
        let (xd, out) = (self.upload(x)?, self.poisoned::<T>(rows * ld_out)?);
        let out_m = DevMat { ptr: self.p(&out), ld: ld_out, bf16: T::BF16 };
        self.gelu_tanh(rows, cols, DevMat::f32(self.p(&xd), ld_x), out_m)?;
        self.download(&out, rows * ld_out)
    }

    /// Host-slice `gelu_tanh_backward`: dx [rows, ld_dx], NaN outside the window.
    #[allow(clippy::too_many_arguments)]
    pub fn gelu_tanh_backward_host(
        &self,
        rows: usize,
        cols: usize,
        x: &[f32],
        ld_x: usize,
        dy: &[f32],
        ld_dy: usize,
        ld_dx: usize,
    ) -> Result<Vec<f32>> {
        ensure!(
            x.len() >= rows * ld_x && dy.len() >= rows * ld_dy,
            "gelu_tanh_backward_host: inputs shorter than {rows} rows"
        );
        let (xd, dyd, dx) = (self.upload(x)?, self.upload(dy)?, self.poisoned::<f32>(rows * ld_dx)?);
        self.gelu_tanh_backward(
            rows,
            cols,
            DevMat::f32(self.p(&xd), ld_x),
            DevMat::f32(self.p(&dyd), ld_dy),
            DevMat::f32(self.p(&dx), ld_dx),
        )?;
        self.download(&dx, rows * ld_dx)
    }

    // ---- timestep embedding -------------------------------------------------------------------

    /// out [b, dim] = the sinusoidal embedding of t [b] (f32), as
    /// `ops::embedding::timestep_embedding(out, t, dim, time_factor, max_period)`.
    pub fn timestep_embedding(
        &self,
        b: usize,
        dim: usize,
        time_factor: f32,
        max_period: f32,
        t: u64,
        out: u64,
    ) -> Result<()> {
        if b == 0 || dim == 0 {
            return Ok(());
        }
        check_ptr("timestep_embedding: t", t, 4)?;
        check_ptr("timestep_embedding: out", out, 4)?;
        let p = FkModelTimestepParams {
            t,
            out,
            b: b as i64,
            dim: dim as i64,
            time_factor,
            // The CPU's −(ln(max_period) in f64, rounded to f32).
            neg_log_max_period: -((max_period as f64).ln() as f32),
        };
        self.launch(&self.temb, &p, pointwise_blocks(b * dim), "fk_model_timestep_emb")
    }

    /// Host-slice `timestep_embedding`: [t.len(), dim].
    pub fn timestep_embedding_host(
        &self,
        t: &[f32],
        dim: usize,
        time_factor: f32,
        max_period: f32,
    ) -> Result<Vec<f32>> {
        let n = t.len() * dim;
        let (td, out) = (self.upload(t)?, self.poisoned::<f32>(n)?);
        self.timestep_embedding(t.len(), dim, time_factor, max_period, self.p(&td), self.p(&out))?;
        self.download(&out, n)
    }

    // ---- random initialisation ----------------------------------------------------------------

    /// dst[k] = element `offset + k` of `p.generate()`, k < n, as f32 or (rounded to nearest
    /// even) bf16: the same bits as the CPU, so a tensor can be filled in pieces at any offsets.
    pub fn fill_random(&self, p: &RandomFill, dst: u64, bf16: bool, offset: usize, n: usize) -> Result<()> {
        ensure!(
            offset + n <= p.numel,
            "fill_random: elements {offset}..{} outside the tensor's {}",
            offset + n,
            p.numel
        );
        if n == 0 {
            return Ok(());
        }
        check_ptr("fill_random: dst", dst, if bf16 { 2 } else { 4 })?;
        let (uniform, bound, value) = match p.init {
            Fill::Uniform(bound) => (1, bound, 0.0),
            Fill::Const(v) => (0, 0.0, v),
        };
        let params = FkModelRandomParams {
            dst,
            stream: p.stream,
            offset: offset as i64,
            n: n as i64,
            bound,
            value,
            uniform,
            dst_bf16: bf16 as i32,
        };
        self.launch(&self.random, &params, pointwise_blocks(n), "fk_model_random_fill")
    }

    /// Host-slice `fill_random` of elements offset..offset + n.
    pub fn fill_random_host<T: Elem>(&self, p: &RandomFill, offset: usize, n: usize) -> Result<Vec<T>> {
        let out = self.poisoned::<T>(n)?;
        self.fill_random(p, self.p(&out), T::BF16, offset, n)?;
        self.download(&out, n)
    }
}
