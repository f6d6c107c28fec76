//! The LoRA linear on the GPU: the fused kernels of kernels/lora_gemm.cu and, kept beside them
//! for benchmarks and as a fallback, the unfused cuBLAS paths (PEFT-style and the best unfused
//! one that accumulates into Y). CPU twin: `ops::lora` (the tests compare the two).
//!
//! Data lives in a small arena of device buffers, one per role (X, W, A, B, S, …), each grown to
//! the largest size asked for and then reused: steady-state calls never allocate. Operands are
//! bf16 on the device (converted from f32 on upload, round to nearest even), the bias and the
//! LoRA gradients f32. The host-slice entry points (`forward`, `backward`, `*_unfused`) mirror
//! `ops::lora::lora_linear_forward` / `lora_linear_backward` for tests; benchmarks upload once
//! and call the `run_*` functions, which only launch.
//!
//! Launch plan (see lora_gemm.cu for the kernel):
//!   forward:  S' = s·X̃·Aᵀ per term (small NT), Y = [X | S'₁ …]·[W | B₁ …]ᵀ + b (large NT).
//!   backward: G' = s·dY[:, rows]·B per term (small NN), dX = [dY | G'₁ …]·[W ; A₁ …] (large NN,
//!             the masked variant when a term has dropout), dA += G'ᵀ·X̃, dB += dY[:, rows]ᵀ·S'
//!             (small TN, 2 problems per term). S' is recomputed unless the caller says the
//!             forward's is still in the arena.
//! With `BaseGemm::Cublas` (the default where libcublas is found) the base product X·Wᵀ (dY·W)
//! is cuBLAS's (in f32, so the result is rounded to bf16 once, as in the fused path), and the
//! large fused launch carries only the adapter segments and the bias, adding that f32 product.

use super::abi::*;
use super::gpu::Gpu;
use super::launch::{launch, tensor_map_bf16, Family, View};
use super::trace::{self, elem, gemm_bytes, gemm_flops, record, OpFamily::Linear};
use crate::ops::lora::{Dropout, LoraTerm, TermGrad};
use crate::quant::{Code, QWeight};
use anyhow::{bail, ensure, Context, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Adapters per linear in one fused call (the backward needs two problems per adapter).
pub const MAX_TERMS: usize = (FK_MAX_PROBLEMS / 2) as usize;

/// One LoRA term without its data: what the launches need to know.
#[derive(Clone, Debug, PartialEq)]
pub struct TermShape {
    pub rank: usize,
    pub rows: Range<usize>,
    pub scale: f32,
    pub dropout: Option<Dropout>,
    /// Inside the linear's column scale (`LinearViews::col_scale`, DoRA's g): its branch is
    /// rescaled with the frozen product (a DoRA term's own branch); false: added after the
    /// rescale (every other term, also on the same rows).
    pub col_scaled: bool,
}

/// The shapes of one LoRA linear: X [m, k], W [n, k], terms on rows of the n outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub bias: bool,
    pub terms: Vec<TermShape>,
}

impl LinearShape {
    pub fn new(m: usize, k: usize, n: usize, bias: bool, terms: &[LoraTerm]) -> Result<LinearShape> {
        let terms: Vec<TermShape> = terms
            .iter()
            .map(|t| TermShape {
                rank: t.rank,
                rows: t.rows.clone(),
                scale: t.scale,
                dropout: t.dropout,
                col_scaled: false,
            })
            .collect();
        let s = LinearShape { m, k, n, bias, terms };
        s.check()?;
        Ok(s)
    }

    /// A shape from term shapes alone (the device-resident model holds no host factors).
    pub fn of_terms(m: usize, k: usize, n: usize, bias: bool, terms: Vec<TermShape>) -> Result<LinearShape> {
        let s = LinearShape { m, k, n, bias, terms };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<()> {
        ensure!(self.terms.len() <= MAX_TERMS, "at most {MAX_TERMS} LoRA terms per linear on the GPU");
        for t in &self.terms {
            ensure!(t.rows.start < t.rows.end && t.rows.end <= self.n, "LoRA rows {:?} outside 0..{}", t.rows, self.n);
            ensure!(t.rank > 0, "LoRA rank 0");
        }
        // Grid dimensions y (m tiles) are limited to 65535.
        ensure!(self.m.div_ceil(FK_GEMM_SMALL_BM as usize) < 65536, "too many tokens for one launch: {}", self.m);
        Ok(())
    }

    fn has_dropout(&self) -> bool {
        self.terms.iter().any(|t| t.dropout.is_some_and(|d| d.p > 0.0))
    }

    /// FLOPs of the bare base GEMM X·Wᵀ.
    pub fn base_flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }

    /// FLOPs of the LoRA linear's forward: base plus S = X·Aᵀ and S·Bᵀ per term.
    pub fn forward_flops(&self) -> f64 {
        self.base_flops()
            + self.terms.iter().map(|t| 2.0 * (self.m * t.rank * (self.k + t.rows.len())) as f64).sum::<f64>()
    }

    /// FLOPs of the backward with dX: dY·W plus G, G·A, dA, dB per term (S recomputation not
    /// counted).
    pub fn backward_flops(&self) -> f64 {
        self.base_flops()
            + self.terms.iter().map(|t| 2.0 * (self.m * t.rank * (2 * self.k + 2 * t.rows.len())) as f64).sum::<f64>()
    }
}

/// Where each term's data sits in the concatenated buffers. Every offset is a multiple of 8
/// elements so a term's rows start 16-byte aligned (the kernels' cp.async path).
#[derive(Clone, Debug)]
struct Layout {
    a_off: Vec<usize>,
    b_off: Vec<usize>,
    a_len: usize,
    b_len: usize,
    /// Column of each term in S' and G' [m, s_ld].
    s_col: Vec<usize>,
    s_ld: usize,
}

fn round8(v: usize) -> usize {
    v.div_ceil(8) * 8
}

impl Layout {
    fn of(s: &LinearShape) -> Layout {
        let (mut a, mut b, mut c) = (0, 0, 0);
        let (mut a_off, mut b_off, mut s_col) = (Vec::new(), Vec::new(), Vec::new());
        for t in &s.terms {
            a_off.push(a);
            b_off.push(b);
            s_col.push(c);
            a += round8(t.rank * s.k);
            b += round8(t.rows.len() * t.rank);
            c += round8(t.rank);
        }
        Layout { a_off, b_off, a_len: a.max(1), b_len: b.max(1), s_col, s_ld: c.max(8) }
    }
}

/// The arena's buffers, one per role.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Buf {
    X,
    W,
    A,
    B,
    S,
    G,
    Dy,
    Dx,
    Y,
    /// PEFT-style temporaries: the low-rank output before scaling, the scaled copy, dX's LoRA part.
    T2,
    T3,
    DxLora,
    Bias,
    Da,
    Db,
    /// f32 base product of the cuBLAS-base path (Y's or dX's), read once by the fused pass; with
    /// a column scale and unscaled terms, the rescaled part of Y that the second pass adds to.
    Base32,
    /// DoRA's thin products for one term: A·W[rows]ᵀ [r, rows] and A·Aᵀ [r, r], f32.
    DoraWa,
    DoraAa,
    /// An 8-bit base weight: its codes [n][k] and one f32 scale per row.
    Wq,
    Wscale,
    /// The 8-bit base weight dequantised to bf16 [n][k] for the Hopper kernels (one linear at a
    /// time: the largest linear's size, not a bf16 copy of the model).
    Wdeq,
}

/// Device buffers by role, grown to the largest request and then reused.
struct Arena {
    stream: Arc<CudaStream>,
    bf16: HashMap<Buf, CudaSlice<bf16>>,
    f32: HashMap<Buf, CudaSlice<f32>>,
    u8: HashMap<Buf, CudaSlice<u8>>,
    allocations: usize,
}

/// The buffer `b` of `map`, grown to at least `len` elements (a new allocation, counted) or
/// reused as it is.
fn grow<'m, T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    map: &'m mut HashMap<Buf, CudaSlice<T>>,
    allocations: &mut usize,
    b: Buf,
    len: usize,
) -> Result<&'m mut CudaSlice<T>> {
    if map.get(&b).is_none_or(|s| s.len() < len) {
        map.remove(&b);
        // SAFETY: every element is written (upload, poison or a kernel) before it is read.
        let s = unsafe { stream.alloc::<T>(len.max(1)) }?;
        *allocations += 1;
        map.insert(b, s);
    }
    Ok(map.get_mut(&b).unwrap())
}

impl Arena {
    fn bf16(&mut self, b: Buf, len: usize) -> Result<&mut CudaSlice<bf16>> {
        grow(&self.stream, &mut self.bf16, &mut self.allocations, b, len)
    }

    fn f32(&mut self, b: Buf, len: usize) -> Result<&mut CudaSlice<f32>> {
        grow(&self.stream, &mut self.f32, &mut self.allocations, b, len)
    }

    /// Bytes into a u8 buffer from offset 0; returns its device address.
    fn upload8(&mut self, b: Buf, host: &[u8]) -> Result<u64> {
        let stream = self.stream.clone();
        let buf = grow(&stream, &mut self.u8, &mut self.allocations, b, host.len())?;
        stream.memcpy_htod(host, &mut buf.slice_mut(0..host.len()))?;
        let (p, _sync) = buf.device_ptr(&stream);
        Ok(p)
    }

    /// The device address of a bf16 buffer of at least `len` elements.
    fn ptr16(&mut self, b: Buf, len: usize) -> Result<u64> {
        let stream = self.stream.clone();
        let (p, _sync) = self.bf16(b, len)?.device_ptr(&stream);
        Ok(p)
    }

    fn ptr32(&mut self, b: Buf, len: usize) -> Result<u64> {
        let stream = self.stream.clone();
        let (p, _sync) = self.f32(b, len)?.device_ptr(&stream);
        Ok(p)
    }

    fn upload16(&mut self, b: Buf, at: usize, host: &[f32]) -> Result<()> {
        let v: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        let stream = self.stream.clone();
        let buf = self.bf16(b, at + v.len())?;
        stream.memcpy_htod(&v, &mut buf.slice_mut(at..at + v.len()))?;
        Ok(())
    }

    fn upload32(&mut self, b: Buf, at: usize, host: &[f32]) -> Result<()> {
        let stream = self.stream.clone();
        let buf = self.f32(b, at + host.len())?;
        stream.memcpy_htod(host, &mut buf.slice_mut(at..at + host.len()))?;
        Ok(())
    }

    fn download16(&mut self, b: Buf, at: usize, len: usize) -> Result<Vec<f32>> {
        let stream = self.stream.clone();
        let buf = self.bf16(b, at + len)?;
        let mut v = vec![bf16::ZERO; len];
        stream.memcpy_dtoh(&buf.slice(at..at + len), &mut v)?;
        stream.synchronize()?;
        Ok(v.iter().map(|x| x.to_f32()).collect())
    }

    fn download32(&mut self, b: Buf, at: usize, len: usize) -> Result<Vec<f32>> {
        let stream = self.stream.clone();
        let buf = self.f32(b, at + len)?;
        let mut v = vec![0f32; len];
        stream.memcpy_dtoh(&buf.slice(at..at + len), &mut v)?;
        stream.synchronize()?;
        Ok(v)
    }

    /// Fills a buffer with NaN: whatever a kernel fails to write shows up in the comparison.
    fn poison16(&mut self, b: Buf, len: usize) -> Result<()> {
        self.upload16(b, 0, &vec![f32::NAN; len])
    }
}

/// The unfused baselines (cuBLAS GEMMs plus, for PEFT, separate scale and add kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfused {
    /// PEFT's module chain: Y = X·Wᵀ; T = X·Aᵀ; T₂ = T·Bᵀ; T₃ = s·T₂; Y += T₃ (and its autograd).
    Peft,
    /// The best unfused chain (Unsloth's addmm): Y = X·Wᵀ; S = X·Aᵀ; Y += s·S·Bᵀ with beta = 1.
    Accumulate,
}

/// Who computes the frozen base product (X·Wᵀ forward, dY·W backward) in `run_forward` /
/// `run_backward`. The LoRA terms, the bias and the dropout masks always go through the fused
/// kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseGemm {
    /// The base product is the first K-segment of the fused mma.sync kernel: one pass over Y.
    Fused,
    /// cuBLAS computes the base product in f32, then the fused kernel adds it to the adapters'
    /// segments and the bias and writes Y (dX): one extra f32 write and read, but cuBLAS's Hopper
    /// GEMM ran 4.6× faster than the fused kernel's base product on an H200 (2026-11-28,
    /// docs/gpu-runs.md), far more than that pass costs. The default where cuBLAS is present
    /// and the card is not a Hopper.
    Cublas,
    /// The sm_90a kernels (kernels/lora_gemm_sm90.cu: TMA, wgmma, warp-specialised, persistent)
    /// run the whole large launch, base and adapter segments and bias, in one pass over Y (dX);
    /// the thin low-rank GEMMs go to cuBLAS as in `Cublas`. Loaded only on compute capability
    /// 9.0, and the default there. A call it cannot take (dX with more than one dropout term, a
    /// row stride or forward rank that is not a multiple of 8, operands not 16-byte aligned) runs
    /// as `Cublas` (`Fused` without libcublas); `hopper_launches` counts the calls it took. An
    /// 8-bit base weight is dequantised to bf16 first (one linear at a time, `Buf::Wdeq`).
    Hopper,
}

/// The frozen weight's device address: bf16 [n][k], or 8-bit codes [n][k] (FK_CODE_I8 /
/// FK_CODE_E4M3) with one f32 scale per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DevWeight {
    Bf16(u64),
    Q8 { code: i32, codes: u64, scales: u64 },
}

/// The frozen weight on the caller's device buffers: bf16 [n][k], or 8-bit codes [n][k] with
/// their code (FK_CODE_I8 / FK_CODE_E4M3) and one f32 scale per row.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    Bf16(View<'a, bf16>),
    Q8 { code: i32, codes: View<'a, u8>, scales: View<'a, f32> },
}

/// A linear's output (Y, or dX in the backward) on the device: f32 or bf16.
#[derive(Clone, Copy, Debug)]
pub enum OutView<'a> {
    F32(View<'a, f32>),
    Bf16(View<'a, bf16>),
}

impl<'a> OutView<'a> {
    /// Elements `r` of this output (a row range of a row-major Y).
    pub fn slice(self, r: Range<usize>) -> Result<OutView<'a>> {
        Ok(match self {
            OutView::F32(v) => OutView::F32(v.slice(r)?),
            OutView::Bf16(v) => OutView::Bf16(v.slice(r)?),
        })
    }

    fn check(&self, n: usize, what: &str, st: &Arc<CudaStream>) -> Result<(u64, bool)> {
        match self {
            OutView::F32(v) => v.need(n, what).map(|_| (v.addr(st), true)),
            OutView::Bf16(v) => v.need(n, what).map(|_| (v.addr(st), false)),
        }
    }
}

/// One LoRA linear's inputs on the caller's device buffers (the device-resident model): X bf16
/// [m, k], the frozen W [n, k], the bias f32 [n] when the shape has one, and per term i its
/// factors A bf16 [r, k] and B bf16 [rows, r].
#[derive(Clone, Debug)]
pub struct LinearViews<'a> {
    pub x: View<'a, bf16>,
    pub w: WeightView<'a>,
    pub bias: Option<View<'a, f32>>,
    pub a: Vec<View<'a, bf16>>,
    pub b: Vec<View<'a, bf16>>,
    /// DoRA's g [n] or None: Y = g ⊙ (X·Wᵀ + the `col_scaled` terms) + b + the other terms; in the
    /// backward the frozen product and the `col_scaled` terms read dY' = g ⊙ dY (`backward_dev`).
    pub col_scale: Option<View<'a, f32>>,
}

/// Device addresses of one linear call's operands: the arena's buffers for the host-slice calls,
/// checked views' for the device-resident model (`forward_dev` / `backward_dev`). X, dY and the
/// factors are bf16; Y and dX bf16 or f32 (`y_f32`, `dx_f32`); bias, dA and dB f32. Per term i:
/// A [r, k], B [rows, r], dA, dB (accumulated with +=). Unused roles are 0.
#[derive(Clone, Debug, Default)]
struct LinearPtrs {
    pub x: u64,
    pub w: Option<DevWeight>,
    pub bias: u64,
    pub y: u64,
    pub y_f32: bool,
    pub dy: u64,
    pub dx: u64,
    pub dx_f32: bool,
    pub a: Vec<u64>,
    pub b: Vec<u64>,
    pub da: Vec<u64>,
    pub db: Vec<u64>,
    /// DoRA: g [n] (forward) and dY' = g ⊙ dY bf16 [m, n] (backward); 0 when none.
    pub col_scale: u64,
    pub dy_scaled: u64,
}

/// The Hopper kernels' tile width for an m × n output on `sms` SMs. 128 × 256 tiles need 48 bytes
/// from L2 per 1024 clocks of tensor work against 64 for 128 × 128 (derived: (128 + 256)·64·2 B
/// per 2·128·256·64 FLOP at 4096 FLOP/clock/SM), so they are preferred, unless the last wave of
/// the persistent grid leaves enough SMs idle: at M = 4608, N = 3072 the 432 wide tiles fill
/// 3.27 waves of 132 SMs (82 % of 4 waves busy), the 864 narrow ones 6.55 (94 % of 7). The 0.9
/// weight on narrow tiles is a prediction, to be replaced by the benchmark's measured ratio
/// (it times both widths side by side).
fn hopper_tile_n(m: usize, n: usize, sms: usize) -> usize {
    if n <= 128 {
        return 128;
    }
    let fill = |bn: usize| {
        let waves = (m.div_ceil(FK_GEMM90_BM as usize) * n.div_ceil(bn)) as f64 / sms.max(1) as f64;
        waves / waves.ceil()
    };
    if 0.9 * fill(128) > fill(256) {
        128
    } else {
        256
    }
}

/// The sm_90a kernels, loaded only on compute capability 9.0 (their module holds sm_90a code
/// only), and the SM count that sizes their persistent grids.
struct HopperGemm {
    _fam: Family,
    nt256: CudaFunction,
    nt128: CudaFunction,
    nn256: CudaFunction,
    nn128: CudaFunction,
    sms: usize,
}

/// One operand of a Hopper GEMM segment: a bf16 matrix at `ptr` of `rows` × `cols` elements,
/// `ld` elements between rows.
#[derive(Clone, Copy, Debug)]
struct Mat {
    ptr: u64,
    rows: usize,
    cols: usize,
    ld: usize,
}

/// A K-segment of the Hopper GEMM: A [m, k] row-major (k = its columns); B [n_cols, k] (NT) or
/// [k, n_cols] (NN) feeding output columns `cols`.
#[derive(Clone, Debug)]
struct Seg90 {
    a: Mat,
    b: Mat,
    cols: Range<usize>,
    /// dX's dropout term: its product times the mask of X (row stride `.1`) at each output
    /// element. Only as the first segment of an NN launch.
    mask: Option<(Dropout, usize)>,
}

impl Mat {
    /// A dense row-major matrix (row stride = its columns).
    fn new(ptr: u64, rows: usize, cols: usize) -> Mat {
        Mat { ptr, rows, cols, ld: cols }
    }

    /// Its TMA descriptor: boxes of 64 columns × `box_rows` rows.
    fn tensor_map(&self, box_rows: usize) -> Result<FkTensorMap> {
        tensor_map_bf16(self.ptr, [self.cols, self.rows, 1], [self.ld, self.ld * self.rows], [64, box_rows])
    }
}

struct Kernels {
    dequant8: CudaFunction,
    nt_large: CudaFunction,
    nt_small: CudaFunction,
    nn_large: CudaFunction,
    nn_large_mask: CudaFunction,
    nn_small: CudaFunction,
    tn_small: CudaFunction,
    axpby: CudaFunction,
    row_sumsq: CudaFunction,
    dora_norm: CudaFunction,
    dora_bwd: CudaFunction,
}

/// The GPU LoRA linear: kernels loaded once, an arena of device buffers, a cuBLAS handle for
/// the baselines (None when libcublas is missing; the fused path does not need it).
pub struct GpuLora {
    stream: Arc<CudaStream>,
    k: Kernels,
    blas: Option<CudaBlas>,
    arena: Arena,
    poison: bool,
    base: BaseGemm,
    /// Set while the uploaded base weight is 8-bit (Buf::Wq + Buf::Wscale): (code, codes ptr,
    /// scales ptr). Its product always runs in the fused kernel, which dequantises tile by tile.
    w8: Option<(i32, u64, u64)>,
    hopper: Option<HopperGemm>,
    /// Output columns per Hopper tile (128 or 256), None: chosen per call.
    hopper_bn: Option<usize>,
    hopper_launches: usize,
}

fn segment(a: u64, lda: usize, b: u64, ldb: usize, k: usize, cols: Range<usize>) -> FkSegment {
    FkSegment {
        a,
        b,
        lda: lda as i64,
        ldb: ldb as i64,
        k: k as i64,
        n_begin: cols.start as i64,
        n_end: cols.end as i64,
        ..Default::default()
    }
}

/// The base weight's K-segment for the fused kernel: bf16 W, or the 8-bit codes with their
/// scales. `a`/`lda` is the other operand (X forward, dY backward).
fn base_segment(w: DevWeight, a: u64, lda: usize, ldb: usize, k: usize, cols: Range<usize>) -> FkSegment {
    match w {
        DevWeight::Q8 { code, codes, scales } => {
            FkSegment { b_code: code, b_scale: scales, ..segment(a, lda, codes, ldb, k, cols) }
        }
        DevWeight::Bf16(w) => segment(a, lda, w, ldb, k, cols),
    }
}

fn with_mask(mut s: FkSegment, d: Option<Dropout>, mode: i64, x_ld: usize) -> FkSegment {
    if let Some(d) = d.filter(|d| d.p > 0.0) {
        s.mask_mode = mode as i32;
        s.mask_seed = d.seed;
        s.mask_p = d.p;
        // The same f32 expression as Dropout::factor, so the kept scale matches bit for bit.
        s.mask_keep_scale = 1.0 / (1.0 - d.p);
        s.mask_ld = x_ld as i64;
    }
    s
}

fn problem(m: usize, n: usize, out: u64, ldc: usize) -> FkGemmProblem {
    FkGemmProblem { m: m as i64, n: n as i64, out, ldc: ldc as i64, alpha: 1.0, ..Default::default() }
}

/// FLOPs and bytes of a fused launch: per problem, its segments' products (A [m, k] against
/// B's columns [n_begin, n_end) × k, bf16 or 8-bit codes) and its output (f32 or bf16, read too
/// when accumulating into it, plus the f32 C it adds and the bias).
fn fused_cost(p: &FkGemmParams) -> (f64, f64) {
    let (mut flops, mut bytes) = (0.0, 0.0);
    for pr in &p.problem[..p.num_problems as usize] {
        let (m, n) = (pr.m as usize, pr.n as usize);
        for sg in &p.segment[pr.seg_begin as usize..pr.seg_end as usize] {
            let (k, cols) = (sg.k as usize, (sg.n_end - sg.n_begin) as usize);
            flops += gemm_flops(m, cols, k);
            let b_elem = if sg.b_code != 0 { 1.0 } else { 2.0 };
            bytes += 2.0 * (m * k) as f64 + b_elem * (cols * k) as f64;
        }
        let out = (m * n) as f64 * elem(pr.out_f32 != 0);
        bytes += out * if pr.beta != 0.0 && pr.c_in == 0 { 2.0 } else { 1.0 };
        bytes +=
            if pr.c_in != 0 { 4.0 * (m * n) as f64 } else { 0.0 } + if pr.bias != 0 { 4.0 * n as f64 } else { 0.0 };
    }
    (flops, bytes)
}

/// Builds an FkGemmParams from (problem, its segments) pairs.
fn params(list: Vec<(FkGemmProblem, Vec<FkSegment>)>) -> Result<FkGemmParams> {
    let mut p = FkGemmParams::default();
    let mut ns = 0usize;
    ensure!(list.len() <= FK_MAX_PROBLEMS as usize, "too many GEMM problems in one launch");
    for (i, (mut pr, segs)) in list.into_iter().enumerate() {
        ensure!(ns + segs.len() <= FK_MAX_SEGMENTS as usize, "too many GEMM segments in one launch");
        pr.seg_begin = ns as i32;
        for s in segs {
            p.segment[ns] = s;
            ns += 1;
        }
        pr.seg_end = ns as i32;
        p.problem[i] = pr;
        p.num_problems = i as i32 + 1;
    }
    Ok(p)
}

impl GpuLora {
    pub fn new(gpu: &Gpu) -> Result<GpuLora> {
        let fam = Family::load(gpu, "lora_gemm")?;
        let f = |name: &str, smem: i64| fam.function_smem(name, smem as usize);
        let k = Kernels {
            dequant8: f(FK_DEQUANT8_BF16, 0)?,
            nt_large: f(FK_GEMM_NT_LARGE, FK_SMEM_GEMM_NT_LARGE)?,
            nt_small: f(FK_GEMM_NT_SMALL, FK_SMEM_GEMM_NT_SMALL)?,
            nn_large: f(FK_GEMM_NN_LARGE, FK_SMEM_GEMM_NN_LARGE)?,
            nn_large_mask: f(FK_GEMM_NN_LARGE_MASK, FK_SMEM_GEMM_NN_LARGE)?,
            nn_small: f(FK_GEMM_NN_SMALL, FK_SMEM_GEMM_NN_SMALL)?,
            tn_small: f(FK_GEMM_TN_SMALL, FK_SMEM_GEMM_TN_SMALL)?,
            axpby: f(FK_AXPBY_BF16, 0)?,
            row_sumsq: f(FK_ROW_SUMSQ, 0)?,
            dora_norm: f(FK_DORA_NORM, 0)?,
            dora_bwd: f(FK_DORA_BWD, FK_SMEM_DORA_BWD)?,
        };
        // SAFETY: only probes whether libcublas can be dlopen'ed.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            Some(CudaBlas::new(gpu.stream.clone()).context("cuBLAS handle")?)
        } else {
            None
        };
        let stream = gpu.stream.clone();
        let arena = Arena {
            stream: stream.clone(),
            bf16: HashMap::new(),
            f32: HashMap::new(),
            u8: HashMap::new(),
            allocations: 0,
        };
        let hopper = if super::gpu::sm90_enabled(gpu)? {
            let hfam = Family::load(gpu, "lora_gemm_sm90")?;
            let h = |name: &str, smem: i64| hfam.function_smem(name, smem as usize);
            let sms = gpu
                .ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .context("multiprocessor count")?;
            Some(HopperGemm {
                nt256: h(FK_GEMM90_NT_BN256, FK_GEMM90_SMEM_BN256)?,
                nt128: h(FK_GEMM90_NT_BN128, FK_GEMM90_SMEM_BN128)?,
                nn256: h(FK_GEMM90_NN_BN256, FK_GEMM90_SMEM_BN256)?,
                nn128: h(FK_GEMM90_NN_BN128, FK_GEMM90_SMEM_BN128)?,
                sms: (sms.max(1)) as usize,
                _fam: hfam,
            })
        } else {
            None
        };
        let base = match (&hopper, &blas) {
            (Some(_), _) => BaseGemm::Hopper,
            (None, Some(_)) => BaseGemm::Cublas,
            (None, None) => BaseGemm::Fused,
        };
        Ok(GpuLora {
            stream,
            k,
            blas,
            arena,
            poison: false,
            base,
            w8: None,
            hopper,
            hopper_bn: None,
            hopper_launches: 0,
        })
    }

    /// Chooses who computes the base product (tests and benchmarks run both).
    pub fn set_base_gemm(&mut self, base: BaseGemm) -> Result<()> {
        if base == BaseGemm::Cublas && self.blas.is_none() {
            bail!("the cuBLAS base GEMM needs libcublas, which was not found");
        }
        if base == BaseGemm::Hopper && self.hopper.is_none() {
            bail!("the Hopper LoRA GEMM needs a GPU of compute capability 9.0 (H100/H200)");
        }
        self.base = base;
        Ok(())
    }

    pub fn base_gemm(&self) -> BaseGemm {
        self.base
    }

    /// Whether the cuBLAS baselines can run (libcublas was found).
    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// Whether the sm_90a kernels are loaded (compute capability 9.0).
    pub fn has_hopper(&self) -> bool {
        self.hopper.is_some()
    }

    /// Fixes the Hopper kernels' tile width (128 or 256 output columns; None: chosen per call)
    /// for the side-by-side benchmark.
    pub fn set_hopper_tile_n(&mut self, bn: Option<usize>) -> Result<()> {
        ensure!(
            bn.is_none_or(|b| b == 128 || b == 256),
            "Hopper LoRA GEMM tiles are 128 or 256 columns wide, not {bn:?}"
        );
        self.hopper_bn = bn;
        Ok(())
    }

    /// Large launches the Hopper kernels have run so far (tests check that a shape they can take
    /// did not fall back).
    pub fn hopper_launches(&self) -> usize {
        self.hopper_launches
    }

    /// Fill outputs and intermediates with NaN before each host-slice call (tests).
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    /// Device allocations made so far; constant once the largest shape has run.
    pub fn arena_allocations(&self) -> usize {
        self.arena.allocations
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    // ---- data in and out ---------------------------------------------------------------------

    /// Uploads X, W, the bias and every term's A and B.
    pub fn upload(
        &mut self,
        s: &LinearShape,
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        terms: &[LoraTerm],
    ) -> Result<()> {
        self.upload_base(s, inp, weight, bias)?;
        self.upload_terms(s, terms)
    }

    /// Uploads X, W and the bias.
    pub fn upload_base(&mut self, s: &LinearShape, inp: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Result<()> {
        ensure!(inp.len() == s.m * s.k && weight.len() == s.n * s.k, "lora gpu: X or W has the wrong length");
        self.arena.upload16(Buf::X, 0, inp)?;
        self.arena.upload16(Buf::W, 0, weight)?;
        self.w8 = None;
        if let Some(b) = bias {
            ensure!(b.len() == s.n && s.bias, "lora gpu: bias");
            self.arena.upload32(Buf::Bias, 0, b)?;
        }
        Ok(())
    }

    /// Uploads X, an 8-bit W (its codes as stored, [n][k], and one scale per row: the bytes go
    /// to the device as they are, never expanded) and the bias.
    pub fn upload_base_q(&mut self, s: &LinearShape, inp: &[f32], w: &QWeight, bias: Option<&[f32]>) -> Result<()> {
        ensure!(inp.len() == s.m * s.k, "lora gpu: X has the wrong length");
        ensure!(w.k == s.k && w.rows() == s.n, "lora gpu: 8-bit W is {}×{}, expected {}×{}", w.rows(), w.k, s.n, s.k);
        let code = match w.segments.first().map(|g| g.code) {
            Some(Code::I8) => FK_CODE_I8,
            Some(Code::E4M3) => FK_CODE_E4M3,
            None => bail!("lora gpu: 8-bit W has no rows"),
        };
        ensure!(
            w.segments.iter().all(|g| g.code == w.segments[0].code),
            "lora gpu: an 8-bit weight whose parts use different codes (int8 and fp8) is not supported on the GPU"
        );
        let codes: Vec<u8> = w.segments.iter().flat_map(|g| g.q.iter().copied()).collect();
        let scales: Vec<f32> = w.segments.iter().flat_map(|g| g.scale.iter().copied()).collect();
        self.arena.upload16(Buf::X, 0, inp)?;
        let q = self.arena.upload8(Buf::Wq, &codes)?;
        self.arena.upload32(Buf::Wscale, 0, &scales)?;
        let sc = self.arena.ptr32(Buf::Wscale, s.n)?;
        self.w8 = Some((code as i32, q, sc));
        if let Some(b) = bias {
            ensure!(b.len() == s.n && s.bias, "lora gpu: bias");
            self.arena.upload32(Buf::Bias, 0, b)?;
        }
        Ok(())
    }

    /// Uploads every term's A and B.
    pub fn upload_terms(&mut self, s: &LinearShape, terms: &[LoraTerm]) -> Result<()> {
        ensure!(terms.len() == s.terms.len(), "lora gpu: terms do not match the shape");
        let l = Layout::of(s);
        self.arena.bf16(Buf::A, l.a_len)?;
        self.arena.bf16(Buf::B, l.b_len)?;
        for (i, t) in terms.iter().enumerate() {
            ensure!(t.a.len() == t.rank * s.k && t.b.len() == t.rows.len() * t.rank, "lora gpu: A or B of term {i}");
            self.arena.upload16(Buf::A, l.a_off[i], t.a)?;
            self.arena.upload16(Buf::B, l.b_off[i], t.b)?;
        }
        Ok(())
    }

    pub fn upload_dout(&mut self, s: &LinearShape, dout: &[f32]) -> Result<()> {
        ensure!(dout.len() == s.m * s.n, "lora gpu: dY has the wrong length");
        self.arena.upload16(Buf::Dy, 0, dout)
    }

    /// Sets the f32 gradient accumulators dA, dB (zero when `grads` is None).
    pub fn upload_grads(&mut self, s: &LinearShape, grads: Option<&[TermGrad]>) -> Result<()> {
        let l = Layout::of(s);
        self.arena.f32(Buf::Da, l.a_len)?;
        self.arena.f32(Buf::Db, l.b_len)?;
        for (i, t) in s.terms.iter().enumerate() {
            let (na, nb) = (t.rank * s.k, t.rows.len() * t.rank);
            let g = grads.map(|g| &g[i]);
            let da = g.filter(|g| g.da.len() == na).map_or_else(|| vec![0.0; na], |g| g.da.clone());
            let db = g.filter(|g| g.db.len() == nb).map_or_else(|| vec![0.0; nb], |g| g.db.clone());
            self.arena.upload32(Buf::Da, l.a_off[i], &da)?;
            self.arena.upload32(Buf::Db, l.b_off[i], &db)?;
        }
        Ok(())
    }

    pub fn download_y(&mut self, s: &LinearShape) -> Result<Vec<f32>> {
        self.arena.download16(Buf::Y, 0, s.m * s.n)
    }

    pub fn download_dx(&mut self, s: &LinearShape) -> Result<Vec<f32>> {
        self.arena.download16(Buf::Dx, 0, s.m * s.k)
    }

    pub fn download_grads(&mut self, s: &LinearShape) -> Result<Vec<TermGrad>> {
        let l = Layout::of(s);
        let mut out = Vec::new();
        for (i, t) in s.terms.iter().enumerate() {
            let da = self.arena.download32(Buf::Da, l.a_off[i], t.rank * s.k)?;
            let db = self.arena.download32(Buf::Db, l.b_off[i], t.rows.len() * t.rank)?;
            out.push(TermGrad { da, db });
        }
        Ok(out)
    }

    // ---- fused kernels -----------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        f: &CudaFunction,
        name: &str,
        p: &FkGemmParams,
        grid: (usize, usize),
        threads: i64,
        smem: i64,
    ) -> Result<()> {
        if p.num_problems == 0 || grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let (flops, bytes) = fused_cost(p);
        record(Linear, name, flops, bytes, || format!("{} problems", p.num_problems));
        let grid = (grid.0, grid.1, p.num_problems as usize);
        // SAFETY: every pointer in `p` is an arena buffer sized for the shape or comes from views
        // checked against it (`view_ptrs`, `backward_dev`); callers are this module's only.
        unsafe { launch(&self.stream, f, p, grid, threads as usize, smem as usize, "fused LoRA GEMM") }
    }

    fn launch_large(&self, f: &CudaFunction, p: &FkGemmParams, m: usize, n: usize, smem: i64) -> Result<()> {
        let grid = (n.div_ceil(FK_GEMM_LARGE_BN as usize), m.div_ceil(FK_GEMM_LARGE_BM as usize));
        self.launch(f, "fk_gemm_large", p, grid, FK_GEMM_LARGE_THREADS, smem)
    }

    fn launch_small(&self, f: &CudaFunction, p: &FkGemmParams, m: usize, n: usize, smem: i64) -> Result<()> {
        let grid = (n.div_ceil(FK_GEMM_SMALL_BN as usize), m.div_ceil(FK_GEMM_SMALL_BM as usize));
        self.launch(f, "fk_gemm_small", p, grid, FK_GEMM_SMALL_THREADS, smem)
    }

    /// S' = s·X̃·Aᵀ for every term into the S buffer (one launch).
    fn run_shrink(&mut self, s: &LinearShape, l: &Layout, p: &LinearPtrs) -> Result<()> {
        if s.terms.is_empty() {
            return Ok(());
        }
        let x = p.x;
        let sp = self.arena.ptr16(Buf::S, s.m * l.s_ld)?;
        let mut list = Vec::new();
        for (i, t) in s.terms.iter().enumerate() {
            let (st, at) = (sp + 2 * l.s_col[i] as u64, p.a[i]);
            if self.thin_on_cublas(t.dropout) {
                self.gemm(s.m, t.rank, s.k, t.scale, (x, s.k, false), (at, s.k, true), 0.0, (st, l.s_ld, false))?;
                continue;
            }
            let mut pr = problem(s.m, t.rank, st, l.s_ld);
            pr.alpha = t.scale;
            let seg = segment(x, s.k, at, s.k, s.k, 0..t.rank);
            list.push((pr, vec![with_mask(seg, t.dropout, FK_MASK_A, s.k)]));
        }
        let max_r = s.terms.iter().map(|t| t.rank).max().unwrap_or(0);
        self.launch_small(&self.k.nt_small, &params(list)?, s.m, max_r, FK_SMEM_GEMM_NT_SMALL)
    }

    /// In the cuBLAS-base mode the thin low-rank GEMMs go to cuBLAS too, unless a dropout mask
    /// must be applied to X inside the product: the fused small kernels split the work only by
    /// output tile, so with N = r one column of 72 blocks walks all of K (or M) serially, which
    /// measured slower than the base GEMM itself on an H200 (docs/gpu-runs.md, run 4).
    fn thin_on_cublas(&self, dropout: Option<Dropout>) -> bool {
        self.thin_blas() && dropout.is_none_or(|d| d.p <= 0.0)
    }

    /// The thin low-rank GEMMs without a dropout mask go to cuBLAS in the cuBLAS and Hopper modes.
    fn thin_blas(&self) -> bool {
        self.blas.is_some() && matches!(self.base, BaseGemm::Cublas | BaseGemm::Hopper)
    }

    /// The bf16 weight the Hopper kernels read: W itself, or for an 8-bit W the arena buffer its
    /// dequantised copy goes to (`dequant_for_hopper` fills it once the call is known to run there).
    fn hopper_weight(&mut self, w: DevWeight, s: &LinearShape) -> Result<u64> {
        match w {
            DevWeight::Bf16(wp) => Ok(wp),
            DevWeight::Q8 { .. } => self.arena.ptr16(Buf::Wdeq, s.n * s.k),
        }
    }

    /// For an 8-bit W: its bf16 values (scale · code, rounded as lora_gemm.cu's tile loader
    /// rounds them) into `dst` [n][k]. The Hopper GEMM reads operands through TMA, which cannot
    /// convert; one extra pass over the codes (1 byte read, 2 written per element) costs a few
    /// percent of the GEMM at FLUX's shapes (derived: docs/lora-hopper.md), against the sm_80
    /// kernel's 25–28 % of cuBLAS's speed that 8-bit bases ran at before.
    fn dequant_for_hopper(&mut self, w: DevWeight, dst: u64, s: &LinearShape) -> Result<()> {
        let DevWeight::Q8 { code, codes, scales } = w else { return Ok(()) };
        let p = FkDequant8Params { out: dst, codes, scales, rows: s.n as i64, cols: s.k as i64, code, pad0: 0 };
        let threads = FK_POINTWISE_THREADS as usize;
        let blocks = (s.n * s.k).div_ceil(4 * threads).clamp(1, 65535);
        record(Linear, "fk_dequant8_bf16", 0.0, (3 * s.n * s.k + 4 * s.n) as f64, || format!("{}x{}", s.n, s.k));
        // SAFETY: `codes` [n][k] and `scales` [n] were checked against the shape (`view_ptrs`) or
        // uploaded for it (`upload_base_q`); `dst` is the arena's Wdeq, sized n·k.
        unsafe { launch(&self.stream, &self.k.dequant8, &p, (blocks, 1, 1), threads, 0, "fk_dequant8_bf16") }
    }

    /// The mode of the sm_80 launches: the chosen one, or for a call the Hopper kernels could
    /// not take, cuBLAS's base product (the fused kernel's without libcublas).
    fn base_or_fallback(&self) -> BaseGemm {
        match self.base {
            BaseGemm::Hopper if self.blas.is_some() => BaseGemm::Cublas,
            BaseGemm::Hopper => BaseGemm::Fused,
            b => b,
        }
    }

    /// Whether the Hopper kernels can take these segments: TMA needs 16-byte aligned addresses
    /// and row strides (a multiple of 8 bf16 elements).
    fn hopper_takes(segs: &[Seg90]) -> bool {
        segs.len() <= FK_GEMM90_MAX_SEGMENTS as usize
            && segs.iter().flat_map(|s| [s.a, s.b]).all(|m| m.ptr.is_multiple_of(16) && m.ld.is_multiple_of(8))
    }

    /// The large launch on the sm_90a kernels: one problem `pr` (its segment fields unused) over
    /// the K-segments `segs`, each B stored [columns][k] (NT) or [k][columns] (`nn`).
    fn launch_hopper(&mut self, nn: bool, pr: FkGemmProblem, segs: &[Seg90]) -> Result<()> {
        let h = self.hopper.as_ref().context("the Hopper LoRA GEMM is not loaded")?;
        ensure!(segs.len() <= FK_GEMM90_MAX_SEGMENTS as usize, "Hopper LoRA GEMM: {} K-segments", segs.len());
        let (m, n) = (pr.m as usize, pr.n as usize);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let bn = self.hopper_bn.unwrap_or_else(|| hopper_tile_n(m, n, h.sms));
        let bm = FK_GEMM90_BM as usize;
        ensure!(
            segs.iter().skip(1).all(|sg| sg.mask.is_none()) && (nn || segs.iter().all(|sg| sg.mask.is_none())),
            "Hopper LoRA GEMM: a dropout mask only on the first segment of dX"
        );
        let mut hp = FkGemm90Params { pr, num_segments: segs.len() as i32, ..Default::default() };
        for (i, sg) in segs.iter().enumerate() {
            let b_rows = if nn { 64 } else { bn };
            hp.ta[i] = sg.a.tensor_map(bm).context("Hopper LoRA GEMM: A")?;
            hp.tb[i] = sg.b.tensor_map(b_rows).context("Hopper LoRA GEMM: B")?;
            hp.seg[i] = FkGemm90Segment {
                k: sg.a.cols as i64,
                n_begin: sg.cols.start as i64,
                n_end: sg.cols.end as i64,
                ..Default::default()
            };
            if let Some((d, ld)) = sg.mask {
                hp.seg[i].mask = 1;
                hp.seg[i].mask_seed = d.seed;
                hp.seg[i].mask_p = d.p;
                // The same f32 expression as Dropout::factor and `with_mask`.
                hp.seg[i].mask_keep_scale = 1.0 / (1.0 - d.p);
                hp.seg[i].mask_ld = ld as i64;
            }
        }
        let (f, smem, name) = match (nn, bn) {
            (false, 256) => (&h.nt256, FK_GEMM90_SMEM_BN256, "fk_gemm90_nt_bn256"),
            (false, _) => (&h.nt128, FK_GEMM90_SMEM_BN128, "fk_gemm90_nt_bn128"),
            (true, 256) => (&h.nn256, FK_GEMM90_SMEM_BN256, "fk_gemm90_nn_bn256"),
            (true, _) => (&h.nn128, FK_GEMM90_SMEM_BN128, "fk_gemm90_nn_bn128"),
        };
        let tiles = m.div_ceil(bm) * n.div_ceil(bn);
        let grid = (tiles.min(h.sms), 1, 1);
        // Each segment: A [m, k] and its B [columns, k] read; Y (dX) written, bias read.
        let flops: f64 = segs.iter().map(|sg| gemm_flops(m, sg.cols.len(), sg.a.cols)).sum();
        let reads: f64 = segs.iter().map(|sg| 2.0 * (sg.a.rows * sg.a.cols + sg.cols.len() * sg.a.cols) as f64).sum();
        let out = (m * n) as f64 * elem(pr.out_f32 != 0) + if pr.bias != 0 { 4.0 * n as f64 } else { 0.0 };
        record(Linear, name, flops, reads + out, || format!("m={m} n={n} segments={}", segs.len()));
        // SAFETY: the descriptors cover device buffers checked against the shape (`view_ptrs`,
        // `backward_dev`) or sized for it (the arena); `pr`'s output and bias likewise.
        unsafe { launch(&self.stream, f, &hp, grid, FK_GEMM90_THREADS as usize, smem as usize, name) }?;
        self.hopper_launches += 1;
        Ok(())
    }

    /// The arena's addresses for a host-slice call on shape `s` (forward roles, plus the
    /// backward's when `backward`).
    fn arena_ptrs(&mut self, s: &LinearShape, backward: bool) -> Result<LinearPtrs> {
        let l = Layout::of(s);
        let w = match self.w8 {
            Some((code, codes, scales)) => DevWeight::Q8 { code, codes, scales },
            // No bf16 W buffer exists (or is allocated) while the base weight is 8-bit.
            None => DevWeight::Bf16(self.arena.ptr16(Buf::W, s.n * s.k)?),
        };
        let a = self.arena.ptr16(Buf::A, l.a_len)?;
        let b = self.arena.ptr16(Buf::B, l.b_len)?;
        let mut p = LinearPtrs {
            x: self.arena.ptr16(Buf::X, s.m * s.k)?,
            w: Some(w),
            bias: if s.bias { self.arena.ptr32(Buf::Bias, s.n)? } else { 0 },
            a: l.a_off.iter().map(|&o| a + 2 * o as u64).collect(),
            b: l.b_off.iter().map(|&o| b + 2 * o as u64).collect(),
            ..Default::default()
        };
        if backward {
            let da = self.arena.ptr32(Buf::Da, l.a_len)?;
            let db = self.arena.ptr32(Buf::Db, l.b_len)?;
            p.dy = self.arena.ptr16(Buf::Dy, s.m * s.n)?;
            p.dx = self.arena.ptr16(Buf::Dx, s.m * s.k)?;
            p.da = l.a_off.iter().map(|&o| da + 4 * o as u64).collect();
            p.db = l.b_off.iter().map(|&o| db + 4 * o as u64).collect();
        } else {
            p.y = self.arena.ptr16(Buf::Y, s.m * s.n)?;
        }
        Ok(p)
    }

    fn check_ptrs(s: &LinearShape, p: &LinearPtrs, backward: bool) -> Result<()> {
        let nt = s.terms.len();
        ensure!(p.w.is_some() && p.x != 0, "lora gpu: X or W missing");
        ensure!(p.a.len() == nt && p.b.len() == nt, "lora gpu: {nt} terms but {} A and {} B", p.a.len(), p.b.len());
        ensure!(s.bias == (p.bias != 0), "lora gpu: the shape's bias flag and the bias pointer disagree");
        if backward {
            ensure!(p.da.len() == nt && p.db.len() == nt && p.dy != 0, "lora gpu: dY, dA or dB missing");
        } else {
            ensure!(p.y != 0, "lora gpu: Y missing");
        }
        Ok(())
    }

    /// Fused forward on the uploaded data: Y = X·Wᵀ + b + Σ s·(X̃·Aᵀ)·Bᵀ on each term's rows.
    pub fn run_forward(&mut self, s: &LinearShape) -> Result<()> {
        let p = self.arena_ptrs(s, false)?;
        self.forward_ptrs(s, &p)
    }

    /// The pointers of `v` after checking every view against the shape `s`.
    fn view_ptrs(&self, s: &LinearShape, v: &LinearViews) -> Result<LinearPtrs> {
        let st = &self.stream;
        let nt = s.terms.len();
        ensure!(v.a.len() == nt && v.b.len() == nt, "lora gpu: {nt} terms but {} A and {} B", v.a.len(), v.b.len());
        v.x.need(s.m * s.k, "lora gpu: X")?;
        let w = match v.w {
            WeightView::Bf16(w) => {
                w.need(s.n * s.k, "lora gpu: W")?;
                DevWeight::Bf16(w.addr(st))
            }
            WeightView::Q8 { code, codes, scales } => {
                ensure!(
                    code == FK_CODE_I8 as i32 || code == FK_CODE_E4M3 as i32,
                    "lora gpu: unknown 8-bit code {code}"
                );
                codes.need(s.n * s.k, "lora gpu: W codes")?;
                scales.need(s.n, "lora gpu: W scales")?;
                DevWeight::Q8 { code, codes: codes.addr(st), scales: scales.addr(st) }
            }
        };
        ensure!(s.bias == v.bias.is_some(), "lora gpu: the shape's bias flag and the bias given disagree");
        if let Some(b) = v.bias {
            b.need(s.n, "lora gpu: bias")?;
        }
        for (i, t) in s.terms.iter().enumerate() {
            v.a[i].need(t.rank * s.k, &format!("lora gpu: A of term {i}"))?;
            v.b[i].need(t.rows.len() * t.rank, &format!("lora gpu: B of term {i}"))?;
        }
        ensure!(
            v.col_scale.is_some() || s.terms.iter().all(|t| !t.col_scaled),
            "lora gpu: a term inside the column scale but no column scale given"
        );
        if let Some(c) = v.col_scale {
            c.need(s.n, "lora gpu: column scale")?;
        }
        Ok(LinearPtrs {
            col_scale: v.col_scale.map_or(0, |c| c.addr(st)),
            x: v.x.addr(st),
            w: Some(w),
            bias: v.bias.map_or(0, |b| b.addr(st)),
            a: v.a.iter().map(|a| a.addr(st)).collect(),
            b: v.b.iter().map(|b| b.addr(st)).collect(),
            ..Default::default()
        })
    }

    /// The fused forward on the caller's device buffers (the device-resident model): Y [m, n].
    pub fn forward_dev(&mut self, s: &LinearShape, v: &LinearViews, y: OutView) -> Result<()> {
        let mut p = self.view_ptrs(s, v)?;
        (p.y, p.y_f32) = y.check(s.m * s.n, "lora gpu: Y", &self.stream)?;
        self.forward_ptrs(s, &p)
    }

    fn forward_ptrs(&mut self, s: &LinearShape, p: &LinearPtrs) -> Result<()> {
        Self::check_ptrs(s, p, false)?;
        let l = Layout::of(s);
        self.run_shrink(s, &l, p)?;
        let mut pr = problem(s.m, s.n, p.y, s.n);
        pr.out_f32 = p.y_f32 as i32;
        pr.bias = p.bias;
        let all: Vec<usize> = (0..s.terms.len()).collect();
        if p.col_scale == 0 {
            return self.forward_base(s, &l, p, pr, &all);
        }
        // DoRA: g ⊙ (X·Wᵀ + the column-scaled terms) in the base launch's epilogue; the other
        // terms must not be rescaled, so they follow in a second pass that adds the first one's
        // f32 result (c_in), rounding Y once. With cuBLAS's base product the first pass reads
        // and writes the same Base32 buffer: each element is read and then written by one thread.
        let (inside, after): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| s.terms[i].col_scaled);
        if after.is_empty() {
            pr.col_scale = p.col_scale;
            return self.forward_base(s, &l, p, pr, &inside);
        }
        let part = self.arena.ptr32(Buf::Base32, s.m * s.n)?;
        let mut first = problem(s.m, s.n, part, s.n);
        first.out_f32 = 1;
        first.col_scale = p.col_scale;
        self.forward_base(s, &l, p, first, &inside)?;
        let sp = self.arena.ptr16(Buf::S, s.m * l.s_ld)?;
        pr.c_in = part;
        pr.beta = 1.0;
        let segs = after
            .iter()
            .map(|&i| {
                let t = &s.terms[i];
                segment(sp + 2 * l.s_col[i] as u64, l.s_ld, p.b[i], t.rank, t.rank, t.rows.clone())
            })
            .collect();
        self.launch_large(&self.k.nt_large, &params(vec![(pr, segs)])?, s.m, s.n, FK_SMEM_GEMM_NT_LARGE)
    }

    /// The large forward launch of problem `pr` (Y, or DoRA's rescaled part): X·Wᵀ plus the
    /// terms `terms` (their S' already in the arena), on the Hopper kernels, cuBLAS's base
    /// product or the fused kernel as the mode says.
    fn forward_base(
        &mut self,
        s: &LinearShape,
        l: &Layout,
        p: &LinearPtrs,
        mut pr: FkGemmProblem,
        terms: &[usize],
    ) -> Result<()> {
        let (x, y, y_f32) = (p.x, pr.out, pr.out_f32 != 0);
        let w = p.w.expect("checked");
        let sp = self.arena.ptr16(Buf::S, s.m * l.s_ld)?;
        if self.base == BaseGemm::Hopper {
            let wp = self.hopper_weight(w, s)?;
            let mut segs =
                vec![Seg90 { a: Mat::new(x, s.m, s.k), b: Mat::new(wp, s.n, s.k), cols: 0..s.n, mask: None }];
            for &i in terms {
                let t = &s.terms[i];
                let a = Mat { ptr: sp + 2 * l.s_col[i] as u64, rows: s.m, cols: t.rank, ld: l.s_ld };
                segs.push(Seg90 { a, b: Mat::new(p.b[i], t.rows.len(), t.rank), cols: t.rows.clone(), mask: None });
            }
            if Self::hopper_takes(&segs) {
                self.dequant_for_hopper(w, wp, s)?;
                return self.launch_hopper(false, pr, &segs);
            }
        }
        let base = self.base_or_fallback();
        let mut segs = Vec::new();
        match (base, w) {
            (_, DevWeight::Q8 { .. }) | (BaseGemm::Fused, _) => segs.push(base_segment(w, x, s.k, s.k, s.k, 0..s.n)),
            (BaseGemm::Cublas, DevWeight::Bf16(w)) if terms.is_empty() && pr.bias == 0 && pr.col_scale == 0 => {
                return self.gemm(s.m, s.n, s.k, 1.0, (x, s.k, false), (w, s.k, true), 0.0, (y, s.n, y_f32));
            }
            (BaseGemm::Cublas, DevWeight::Bf16(w)) => {
                // f32 base product, so Y is rounded to bf16 once, as in the fused path.
                let c = self.arena.ptr32(Buf::Base32, s.m * s.n)?;
                self.gemm(s.m, s.n, s.k, 1.0, (x, s.k, false), (w, s.k, true), 0.0, (c, s.n, true))?;
                pr.beta = 1.0;
                pr.c_in = c;
            }
            (BaseGemm::Hopper, _) => unreachable!("base_or_fallback never returns Hopper"),
        }
        for &i in terms {
            let t = &s.terms[i];
            // B [rows, r] is the K-major operand for output columns `rows` only.
            segs.push(segment(sp + 2 * l.s_col[i] as u64, l.s_ld, p.b[i], t.rank, t.rank, t.rows.clone()));
        }
        self.launch_large(&self.k.nt_large, &params(vec![(pr, segs)])?, s.m, s.n, FK_SMEM_GEMM_NT_LARGE)
    }

    /// The fused kernel on the base GEMM alone (Y = X·Wᵀ), to compare with cuBLAS.
    pub fn run_base_fused_kernel(&mut self, s: &LinearShape) -> Result<()> {
        let x = self.arena.ptr16(Buf::X, s.m * s.k)?;
        let w = self.arena.ptr16(Buf::W, s.n * s.k)?;
        let y = self.arena.ptr16(Buf::Y, s.m * s.n)?;
        let p = params(vec![(problem(s.m, s.n, y, s.n), vec![segment(x, s.k, w, s.k, s.k, 0..s.n)])])?;
        self.launch_large(&self.k.nt_large, &p, s.m, s.n, FK_SMEM_GEMM_NT_LARGE)
    }

    /// The Hopper kernel on the base GEMM alone (Y = X·Wᵀ, tile width as `set_hopper_tile_n`),
    /// to compare with cuBLAS.
    pub fn run_base_hopper(&mut self, s: &LinearShape) -> Result<()> {
        let x = self.arena.ptr16(Buf::X, s.m * s.k)?;
        let w = self.arena.ptr16(Buf::W, s.n * s.k)?;
        let y = self.arena.ptr16(Buf::Y, s.m * s.n)?;
        let segs = [Seg90 { a: Mat::new(x, s.m, s.k), b: Mat::new(w, s.n, s.k), cols: 0..s.n, mask: None }];
        ensure!(Self::hopper_takes(&segs), "the Hopper GEMM needs K a multiple of 8, got {}", s.k);
        self.launch_hopper(false, problem(s.m, s.n, y, s.n), &segs)
    }

    /// Fused backward on the uploaded data (X, W, A, B, dY, gradient accumulators): dA and dB
    /// accumulate (+=), dX is overwritten when `want_dx`. `s_saved`: the S buffer still holds
    /// this shape's forward S' (else it is recomputed).
    pub fn run_backward(&mut self, s: &LinearShape, want_dx: bool, s_saved: bool) -> Result<()> {
        let p = self.arena_ptrs(s, true)?;
        self.backward_impl(s, &p, want_dx, s_saved)
    }

    /// The fused backward on the caller's device buffers from dY bf16 [m, n]: per term dA f32
    /// [r, k] and dB f32 [rows, r] accumulate (+=), dX [m, k] is overwritten when given. S' is
    /// recomputed (the arena's S is shared by every linear). With `dy_scaled` (DoRA's
    /// dY' = g ⊙ dY, `dora_column_grads`), the frozen product and the `col_scaled` terms read
    /// it and the other terms dY.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_dev(
        &mut self,
        s: &LinearShape,
        v: &LinearViews,
        dy: View<bf16>,
        dy_scaled: Option<View<bf16>>,
        dx: Option<OutView>,
        da: &[View<f32>],
        db: &[View<f32>],
    ) -> Result<()> {
        let mut p = self.view_ptrs(s, v)?;
        let st = &self.stream;
        dy.need(s.m * s.n, "lora gpu: dY")?;
        p.dy = dy.addr(st);
        ensure!(
            dy_scaled.is_some() || s.terms.iter().all(|t| !t.col_scaled),
            "lora gpu: a term inside the column scale but no scaled dY given"
        );
        if let Some(d) = dy_scaled {
            d.need(s.m * s.n, "lora gpu: scaled dY")?;
            p.dy_scaled = d.addr(st);
        }
        if let Some(d) = dx {
            (p.dx, p.dx_f32) = d.check(s.m * s.k, "lora gpu: dX", st)?;
        }
        let nt = s.terms.len();
        ensure!(da.len() == nt && db.len() == nt, "lora gpu: {nt} terms but {} dA and {} dB", da.len(), db.len());
        for (i, t) in s.terms.iter().enumerate() {
            da[i].need(t.rank * s.k, &format!("lora gpu: dA of term {i}"))?;
            db[i].need(t.rows.len() * t.rank, &format!("lora gpu: dB of term {i}"))?;
        }
        p.da = da.iter().map(|d| d.addr(st)).collect();
        p.db = db.iter().map(|d| d.addr(st)).collect();
        self.backward_impl(s, &p, dx.is_some(), false)
    }

    fn backward_impl(&mut self, s: &LinearShape, p: &LinearPtrs, want_dx: bool, s_saved: bool) -> Result<()> {
        Self::check_ptrs(s, p, true)?;
        let l = Layout::of(s);
        if !s_saved {
            self.run_shrink(s, &l, p)?;
        }
        let x = p.x;
        // dY as the frozen product sees it (DoRA: g ⊙ dY), and as term `t` does.
        let dy = if p.dy_scaled != 0 { p.dy_scaled } else { p.dy };
        let dy_of = |t: &TermShape| if t.col_scaled { dy } else { p.dy };
        let w = p.w.expect("checked");
        let sp = self.arena.ptr16(Buf::S, s.m * l.s_ld)?;
        let g = self.arena.ptr16(Buf::G, s.m * l.s_ld)?;

        // G' = s·dY[:, rows]·B: dY's columns `rows` as A [m, rows] (row stride n), B [rows, r].
        if !s.terms.is_empty() {
            let mut list = Vec::new();
            for (i, t) in s.terms.iter().enumerate() {
                let (gt, bt, a_op) = (g + 2 * l.s_col[i] as u64, p.b[i], dy_of(t) + 2 * t.rows.start as u64);
                if self.thin_blas() {
                    self.gemm(
                        s.m,
                        t.rank,
                        t.rows.len(),
                        t.scale,
                        (a_op, s.n, false),
                        (bt, t.rank, false),
                        0.0,
                        (gt, l.s_ld, false),
                    )?;
                    continue;
                }
                let mut pr = problem(s.m, t.rank, gt, l.s_ld);
                pr.alpha = t.scale;
                list.push((pr, vec![segment(a_op, s.n, bt, t.rank, t.rows.len(), 0..t.rank)]));
            }
            let max_r = s.terms.iter().map(|t| t.rank).max().unwrap();
            self.launch_small(&self.k.nn_small, &params(list)?, s.m, max_r, FK_SMEM_GEMM_NN_SMALL)?;
        }

        // dX = [dY | G'₁ …]·[W ; A₁ …], dropout terms as masked segments.
        if want_dx {
            let dx = p.dx;
            ensure!(dx != 0, "lora gpu: dX missing");
            let mut pr = problem(s.m, s.k, dx, s.k);
            pr.out_f32 = p.dx_f32 as i32;
            let mut hopper_segs = Vec::new();
            let dropped = |t: &TermShape| t.dropout.filter(|d| d.p > 0.0);
            let n_masked = s.terms.iter().filter(|t| dropped(t).is_some()).count();
            if self.base == BaseGemm::Hopper && n_masked <= 1 {
                let wp = self.hopper_weight(w, s)?;
                // dY [m, n] against W read N-major [n][k]; G'ᵢ [m, r] against Aᵢ [r][k]; a term
                // with dropout goes first (the kernel masks the first segment's product alone).
                let term = |i: usize, t: &TermShape| Seg90 {
                    a: Mat { ptr: g + 2 * l.s_col[i] as u64, rows: s.m, cols: t.rank, ld: l.s_ld },
                    b: Mat::new(p.a[i], t.rank, s.k),
                    cols: 0..s.k,
                    mask: dropped(t).map(|d| (d, s.k)),
                };
                let terms = s.terms.iter().enumerate();
                hopper_segs.extend(terms.clone().filter(|(_, t)| dropped(t).is_some()).map(|(i, t)| term(i, t)));
                let base = Seg90 { a: Mat::new(dy, s.m, s.n), b: Mat::new(wp, s.n, s.k), cols: 0..s.k, mask: None };
                hopper_segs.push(base);
                hopper_segs.extend(terms.filter(|(_, t)| dropped(t).is_none()).map(|(i, t)| term(i, t)));
            }
            if !hopper_segs.is_empty() && Self::hopper_takes(&hopper_segs) {
                let wdeq = hopper_segs[n_masked].b.ptr;
                self.dequant_for_hopper(w, wdeq, s)?;
                self.launch_hopper(true, pr, &hopper_segs)?;
            } else {
                self.dx_large(s, &l, p, pr, g, dy)?;
            }
        }

        // dA += G'ᵀ·X̃ [r, k] and dB += dY[:, rows]ᵀ·S' [rows, r]: reductions over the m tokens,
        // A stored [token][·] (the T layout), B stored [token][·].
        if !s.terms.is_empty() {
            let mut list = Vec::new();
            for (i, t) in s.terms.iter().enumerate() {
                let (gt, st) = (g + 2 * l.s_col[i] as u64, sp + 2 * l.s_col[i] as u64);
                let (dat, dbt) = (p.da[i], p.db[i]);
                let a_op = dy_of(t) + 2 * t.rows.start as u64;
                if self.thin_on_cublas(t.dropout) {
                    self.gemm(t.rank, s.k, s.m, 1.0, (gt, l.s_ld, true), (x, s.k, false), 1.0, (dat, s.k, true))?;
                } else {
                    let mut pa = problem(t.rank, s.k, dat, s.k);
                    pa.out_f32 = 1;
                    pa.beta = 1.0;
                    let seg = segment(gt, l.s_ld, x, s.k, s.m, 0..s.k);
                    list.push((pa, vec![with_mask(seg, t.dropout, FK_MASK_B, s.k)]));
                }
                if self.thin_blas() {
                    self.gemm(
                        t.rows.len(),
                        t.rank,
                        s.m,
                        1.0,
                        (a_op, s.n, true),
                        (st, l.s_ld, false),
                        1.0,
                        (dbt, t.rank, true),
                    )?;
                } else {
                    let mut pb = problem(t.rows.len(), t.rank, dbt, t.rank);
                    pb.out_f32 = 1;
                    pb.beta = 1.0;
                    list.push((pb, vec![segment(a_op, s.n, st, l.s_ld, s.m, 0..t.rank)]));
                }
            }
            let max_m = s.terms.iter().map(|t| t.rank.max(t.rows.len())).max().unwrap();
            let max_n = s.terms.iter().map(|t| t.rank.max(s.k)).max().unwrap();
            self.launch_small(&self.k.tn_small, &params(list)?, max_m, max_n, FK_SMEM_GEMM_TN_SMALL)?;
        }
        Ok(())
    }

    /// dX = [dY | G'₁ …]·[W ; A₁ …] on the sm_80 kernel (with cuBLAS's base product in the
    /// cuBLAS mode, the mode a call the Hopper kernels cannot take falls back to), dropout terms
    /// as masked segments.
    /// `dy`: the dY the frozen product reads (DoRA's g ⊙ dY where there is one).
    fn dx_large(
        &mut self,
        s: &LinearShape,
        l: &Layout,
        p: &LinearPtrs,
        mut pr: FkGemmProblem,
        g: u64,
        dy: u64,
    ) -> Result<()> {
        let (dx, w) = (p.dx, p.w.expect("checked"));
        let mut segs = Vec::new();
        match (self.base_or_fallback(), w) {
            (_, DevWeight::Q8 { .. }) | (BaseGemm::Fused, _) => segs.push(base_segment(w, dy, s.n, s.k, s.n, 0..s.k)),
            (BaseGemm::Cublas, DevWeight::Bf16(w)) if s.terms.is_empty() => {
                self.gemm(s.m, s.k, s.n, 1.0, (dy, s.n, false), (w, s.k, false), 0.0, (dx, s.k, p.dx_f32))?;
            }
            (BaseGemm::Cublas, DevWeight::Bf16(w)) => {
                let c = self.arena.ptr32(Buf::Base32, s.m * s.k)?;
                self.gemm(s.m, s.k, s.n, 1.0, (dy, s.n, false), (w, s.k, false), 0.0, (c, s.k, true))?;
                pr.beta = 1.0;
                pr.c_in = c;
            }
            (BaseGemm::Hopper, _) => unreachable!("base_or_fallback never returns Hopper"),
        }
        for (i, t) in s.terms.iter().enumerate() {
            let seg = segment(g + 2 * l.s_col[i] as u64, l.s_ld, p.a[i], s.k, t.rank, 0..s.k);
            segs.push(with_mask(seg, t.dropout, FK_MASK_OUT, s.k));
        }
        if !segs.is_empty() {
            let f = if s.has_dropout() { &self.k.nn_large_mask } else { &self.k.nn_large };
            self.launch_large(f, &params(vec![(pr, segs)])?, s.m, s.k, FK_SMEM_GEMM_NN_LARGE)?;
        }
        Ok(())
    }

    // ---- DoRA ------------------------------------------------------------------------------

    /// out[j] = ‖W_j‖² for every row of the frozen weight W [n, k] (f64 sums of the f32 values;
    /// 8-bit rows as scale · decode, unrounded). W is frozen: the engine runs it once per linear.
    pub fn row_sumsq(&mut self, w: WeightView, n: usize, k: usize, out: View<f32>) -> Result<()> {
        let st = &self.stream;
        out.need(n, "DoRA: ‖W‖² out")?;
        let (code, wp, scales) = match w {
            WeightView::Bf16(w) => {
                w.need(n * k, "DoRA: W")?;
                (FK_CODE_BF16 as i32, w.addr(st), 0)
            }
            WeightView::Q8 { code, codes, scales } => {
                ensure!(code == FK_CODE_I8 as i32 || code == FK_CODE_E4M3 as i32, "DoRA: unknown 8-bit code {code}");
                codes.need(n * k, "DoRA: W codes")?;
                scales.need(n, "DoRA: W scales")?;
                (code, codes.addr(st), scales.addr(st))
            }
        };
        if n == 0 {
            return Ok(());
        }
        let p = FkRowSumSqParams { out: out.addr(st), w: wp, scales, rows: n as i64, cols: k as i64, code, pad0: 0 };
        let threads = FK_POINTWISE_THREADS as usize;
        let blocks = n.div_ceil(threads / 32).clamp(1, 65535);
        let wbytes = if code == FK_CODE_BF16 as i32 { 2 } else { 1 };
        record(Linear, "fk_row_sumsq", 2.0 * (n * k) as f64, (wbytes * n * k + 4 * n) as f64, || format!("{n}x{k}"));
        // SAFETY: W [n][k] (or its codes and scales) and out [n] were checked above.
        unsafe { launch(&self.stream, &self.k.row_sumsq, &p, (blocks, 1, 1), threads, 0, "fk_row_sumsq") }
    }

    /// DoRA's rescale of term `i` of `s` (marked `col_scaled`): g[rows] = m / ‖W + s·B·A‖ and
    /// norm[rows] = ‖W + s·B·A‖ per output row, never forming W + s·B·A: ‖W_j‖² from `w_sumsq`
    /// [n], the cross term from the thin GEMM A·W[rows]ᵀ (the one pass over the frozen rows),
    /// the quadratic term from A·Aᵀ [r, r] (precision: docs/adapters.md). `g` and `norm` are
    /// [n], written on the term's rows only; `magnitude` is [rows].
    #[allow(clippy::too_many_arguments)]
    pub fn dora_norms(
        &mut self,
        s: &LinearShape,
        v: &LinearViews,
        i: usize,
        w_sumsq: View<f32>,
        magnitude: View<f32>,
        g: View<f32>,
        norm: View<f32>,
    ) -> Result<()> {
        let p = self.view_ptrs(s, v)?;
        let st = self.stream.clone();
        let t = s.terms.get(i).context("DoRA: no such term")?;
        let (r, rows, k) = (t.rank, t.rows.clone(), s.k);
        w_sumsq.need(s.n, "DoRA: ‖W‖²")?;
        magnitude.need(rows.len(), "DoRA: magnitude")?;
        g.need(s.n, "DoRA: g")?;
        norm.need(s.n, "DoRA: norm")?;
        // W's rows of the term as the B operand of an NT GEMM (8-bit codes decoded in the tile
        // loader as in the base product), A [r, k] as its A: A·W[rows]ᵀ [r, rows].
        let wrows = match p.w.expect("checked") {
            DevWeight::Bf16(w) => DevWeight::Bf16(w + 2 * (rows.start * k) as u64),
            DevWeight::Q8 { code, codes, scales } => {
                DevWeight::Q8 { code, codes: codes + (rows.start * k) as u64, scales: scales + 4 * rows.start as u64 }
            }
        };
        let wa = self.arena.ptr32(Buf::DoraWa, r * rows.len())?;
        let aa = self.arena.ptr32(Buf::DoraAa, r * r)?;
        let mut pw = problem(r, rows.len(), wa, rows.len());
        pw.out_f32 = 1;
        let mut pa = problem(r, r, aa, r);
        pa.out_f32 = 1;
        let list = vec![
            (pw, vec![base_segment(wrows, p.a[i], k, k, k, 0..rows.len())]),
            (pa, vec![segment(p.a[i], k, p.a[i], k, k, 0..r)]),
        ];
        self.launch_small(&self.k.nt_small, &params(list)?, r, rows.len().max(r), FK_SMEM_GEMM_NT_SMALL)?;
        let np = FkDoraNormParams {
            g: g.addr(&st) + 4 * rows.start as u64,
            norm: norm.addr(&st) + 4 * rows.start as u64,
            w_sumsq: w_sumsq.addr(&st) + 4 * rows.start as u64,
            wa,
            aa,
            b: p.b[i],
            magnitude: magnitude.addr(&st),
            rows: rows.len() as i64,
            rank: r as i64,
            ld_wa: rows.len() as i64,
            scale: t.scale,
            pad0: 0,
        };
        let threads = FK_POINTWISE_THREADS as usize;
        let blocks = rows.len().div_ceil(threads / 32).clamp(1, 65535);
        let n = rows.len();
        record(Linear, "fk_dora_norm", 2.0 * (n * r * (r + 1)) as f64, (4 * (n * r + r * r + 4 * n)) as f64, || {
            format!("{n} rows, rank {r}")
        });
        // SAFETY: wa [r][rows] and aa [r][r] are arena buffers of those sizes; B [rows][r] was
        // checked by `view_ptrs`; g, norm, ‖W‖² [n] and the magnitude [rows] above.
        unsafe { launch(&st, &self.k.dora_norm, &np, (blocks, 1, 1), threads, 0, "fk_dora_norm") }
    }

    /// The DoRA backward's column work on rows `rows` of an m × n linear, the norm a constant
    /// (as PEFT detaches it): dm [rows] += Σ_i dY[i, j]·Ypre[i, j] / norm[j] and
    /// dY'[:, rows] = g ⊙ dY[:, rows] (the rest of dY' is the caller's). `ypre` [m, ld_ypre] is
    /// X·Wᵀ + s·S'·Bᵀ before the rescale, its column 0 the term's first row; g and norm are [n].
    #[allow(clippy::too_many_arguments)]
    pub fn dora_column_grads(
        &mut self,
        m: usize,
        n: usize,
        rows: Range<usize>,
        dy: View<bf16>,
        ypre: (View<bf16>, usize),
        g: View<f32>,
        norm: View<f32>,
        dm: View<f32>,
        dy_scaled: View<bf16>,
    ) -> Result<()> {
        let st = self.stream.clone();
        let (yp, ld_ypre) = ypre;
        ensure!(rows.start < rows.end && rows.end <= n, "DoRA: rows {rows:?} outside 0..{n}");
        ensure!(ld_ypre >= rows.len(), "DoRA: Ypre's row stride {ld_ypre} < {} columns", rows.len());
        dy.need(m * n, "DoRA: dY")?;
        dy_scaled.need(m * n, "DoRA: scaled dY")?;
        yp.need(m.saturating_sub(1) * ld_ypre + rows.len(), "DoRA: Ypre")?;
        g.need(n, "DoRA: g")?;
        norm.need(n, "DoRA: norm")?;
        dm.need(rows.len(), "DoRA: dm")?;
        if m == 0 {
            return Ok(());
        }
        let p = FkDoraBwdParams {
            dy_scaled: dy_scaled.addr(&st) + 2 * rows.start as u64,
            dm: dm.addr(&st),
            dy: dy.addr(&st) + 2 * rows.start as u64,
            ypre: yp.addr(&st),
            g: g.addr(&st) + 4 * rows.start as u64,
            norm: norm.addr(&st) + 4 * rows.start as u64,
            m: m as i64,
            cols: rows.len() as i64,
            ld_dy: n as i64,
            ld_ypre: ld_ypre as i64,
        };
        let cols = rows.len();
        record(Linear, "fk_dora_bwd", 2.0 * (m * cols) as f64, (6 * m * cols + 12 * cols) as f64, || {
            format!("{m}x{cols}")
        });
        let (blocks, threads) = (cols.div_ceil(32), FK_POINTWISE_THREADS as usize);
        // SAFETY: every operand was checked above against m, n, the rows and Ypre's stride.
        unsafe { launch(&st, &self.k.dora_bwd, &p, (blocks, 1, 1), threads, FK_SMEM_DORA_BWD as usize, "fk_dora_bwd") }
    }

    /// NaN in Y, dX and the S, G scratch of shape `s` when poisoning is on (tests: whatever
    /// a launch leaves unwritten shows).
    pub fn poison_outputs(&mut self, s: &LinearShape) -> Result<()> {
        if self.poison {
            let l = Layout::of(s);
            self.arena.poison16(Buf::Y, s.m * s.n)?;
            self.arena.poison16(Buf::Dx, s.m * s.k)?;
            self.arena.poison16(Buf::S, s.m * l.s_ld)?;
            self.arena.poison16(Buf::G, s.m * l.s_ld)?;
        }
        Ok(())
    }

    // ---- unfused baselines (cuBLAS) ----------------------------------------------------------

    /// Row-major C[m, n] = alpha·op(A)·op(B) + beta·C through cublasGemmEx (bf16 operands, f32
    /// compute, bf16 or f32 C). `a_t`: A is stored [k][m]; `b_t`: B is stored [n][k]. cuBLAS is
    /// column-major, so this computes Cᵀ = op(B)ᵀ·op(A)ᵀ with the operands swapped.
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: (u64, usize, bool),
        b: (u64, usize, bool),
        beta: f32,
        c: (u64, usize, bool),
    ) -> Result<()> {
        let blas = self.blas.as_ref().context("cuBLAS is not available (libcublas not found)")?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        record(Linear, "cublasGemmEx", gemm_flops(m, n, k), gemm_bytes(m, n, k, elem(c.2), beta != 0.0), || {
            format!("m={m} n={n} k={k}")
        });
        if trace::launched("cublasGemmEx") {
            return Ok(()); // a dry run
        }
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let c_type = if c.2 { cudaDataType_t::CUDA_R_32F } else { cudaDataType_t::CUDA_R_16BF };
        // SAFETY: pointers are arena buffers sized for these shapes; alpha/beta are host f32 as
        // CUBLAS_COMPUTE_32F expects (not rounded to bf16, unlike cudarc's GemmConfig<bf16>).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                op(b.2),
                op(a.2),
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b.0 as *const _,
                cudaDataType_t::CUDA_R_16BF,
                b.1 as i32,
                a.0 as *const _,
                cudaDataType_t::CUDA_R_16BF,
                a.1 as i32,
                (&beta) as *const f32 as *const _,
                c.0 as *mut _,
                c_type,
                c.1 as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .context("cublasGemmEx")?;
        Ok(())
    }

    /// out = alpha·x + beta·y on [rows, cols] windows (the PEFT scale and add kernels).
    fn axpby(
        &self,
        rows: usize,
        cols: usize,
        out: (u64, usize),
        x: (u64, usize),
        y: (u64, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let p = FkAxpbyParams {
            out: out.0,
            x: x.0,
            y: y.0,
            rows: rows as i64,
            cols: cols as i64,
            ld_out: out.1 as i64,
            ld_x: x.1 as i64,
            ld_y: y.1 as i64,
            alpha,
            beta,
        };
        let threads = FK_POINTWISE_THREADS as usize;
        let blocks = (rows * cols).div_ceil(threads).clamp(1, 65535);
        record(Linear, "fk_axpby_bf16", 0.0, 6.0 * (rows * cols) as f64, || format!("{rows}x{cols}"));
        // SAFETY: windows lie inside arena buffers sized for the shape.
        unsafe { launch(&self.stream, &self.k.axpby, &p, (blocks, 1, 1), threads, 0, "fk_axpby_bf16") }
    }

    /// cuBLAS's bare X·Wᵀ (no bias), the reference point of the benchmarks.
    pub fn run_base_cublas(&mut self, s: &LinearShape) -> Result<()> {
        let x = self.arena.ptr16(Buf::X, s.m * s.k)?;
        let w = self.arena.ptr16(Buf::W, s.n * s.k)?;
        let y = self.arena.ptr16(Buf::Y, s.m * s.n)?;
        self.gemm(s.m, s.n, s.k, 1.0, (x, s.k, false), (w, s.k, true), 0.0, (y, s.n, false))
    }

    /// cuBLAS's bare dY·W (the backward's base product), the reference point of the benchmarks.
    pub fn run_base_cublas_dx(&mut self, s: &LinearShape) -> Result<()> {
        let dy = self.arena.ptr16(Buf::Dy, s.m * s.n)?;
        let w = self.arena.ptr16(Buf::W, s.n * s.k)?;
        let dx = self.arena.ptr16(Buf::Dx, s.m * s.k)?;
        self.gemm(s.m, s.k, s.n, 1.0, (dy, s.n, false), (w, s.k, false), 0.0, (dx, s.k, false))
    }

    fn check_unfused(s: &LinearShape) -> Result<()> {
        if s.bias || s.has_dropout() {
            bail!("the unfused baselines take no bias and no dropout (benchmark baselines only)");
        }
        Ok(())
    }

    /// Unfused forward on the uploaded data. S (unscaled X·Aᵀ) stays in the arena for the
    /// backward, as autograd would save it.
    pub fn run_forward_unfused(&mut self, s: &LinearShape, style: Unfused) -> Result<()> {
        Self::check_unfused(s)?;
        let l = Layout::of(s);
        let x = self.arena.ptr16(Buf::X, s.m * s.k)?;
        let a = self.arena.ptr16(Buf::A, l.a_len)?;
        let b = self.arena.ptr16(Buf::B, l.b_len)?;
        let sp = self.arena.ptr16(Buf::S, s.m * l.s_ld)?;
        let y = self.arena.ptr16(Buf::Y, s.m * s.n)?;
        let max_rows = s.terms.iter().map(|t| t.rows.len()).max().unwrap_or(0);
        let t2 = self.arena.ptr16(Buf::T2, s.m * max_rows)?;
        let t3 = self.arena.ptr16(Buf::T3, s.m * max_rows)?;
        self.run_base_cublas(s)?;
        for (i, t) in s.terms.iter().enumerate() {
            let (st, at, bt) = (sp + 2 * l.s_col[i] as u64, a + 2 * l.a_off[i] as u64, b + 2 * l.b_off[i] as u64);
            let yr = y + 2 * t.rows.start as u64;
            let (r, nr) = (t.rank, t.rows.len());
            self.gemm(s.m, r, s.k, 1.0, (x, s.k, false), (at, s.k, true), 0.0, (st, l.s_ld, false))?;
            match style {
                Unfused::Accumulate => {
                    self.gemm(s.m, nr, r, t.scale, (st, l.s_ld, false), (bt, r, true), 1.0, (yr, s.n, false))?
                }
                Unfused::Peft => {
                    self.gemm(s.m, nr, r, 1.0, (st, l.s_ld, false), (bt, r, true), 0.0, (t2, nr, false))?;
                    self.axpby(s.m, nr, (t3, nr), (t2, nr), (0, 0), t.scale, 0.0)?;
                    self.axpby(s.m, nr, (yr, s.n), (t3, nr), (yr, s.n), 1.0, 1.0)?;
                }
            }
        }
        Ok(())
    }

    /// Unfused backward on the uploaded data; needs the S of `run_forward_unfused`.
    pub fn run_backward_unfused(&mut self, s: &LinearShape, style: Unfused, want_dx: bool) -> Result<()> {
        Self::check_unfused(s)?;
        let l = Layout::of(s);
        let x = self.arena.ptr16(Buf::X, s.m * s.k)?;
        let w = self.arena.ptr16(Buf::W, s.n * s.k)?;
        let a = self.arena.ptr16(Buf::A, l.a_len)?;
        let b = self.arena.ptr16(Buf::B, l.b_len)?;
        let sp = self.arena.ptr16(Buf::S, s.m * l.s_ld)?;
        let g = self.arena.ptr16(Buf::G, s.m * l.s_ld)?;
        let dy = self.arena.ptr16(Buf::Dy, s.m * s.n)?;
        let dx = self.arena.ptr16(Buf::Dx, s.m * s.k)?;
        let da = self.arena.ptr32(Buf::Da, l.a_len)?;
        let db = self.arena.ptr32(Buf::Db, l.b_len)?;
        let max_rows = s.terms.iter().map(|t| t.rows.len()).max().unwrap_or(0);
        let t3 = self.arena.ptr16(Buf::T3, s.m * max_rows)?;
        let dxl = self.arena.ptr16(Buf::DxLora, s.m * s.k)?;
        if want_dx {
            self.gemm(s.m, s.k, s.n, 1.0, (dy, s.n, false), (w, s.k, false), 0.0, (dx, s.k, false))?;
        }
        for (i, t) in s.terms.iter().enumerate() {
            let (st, gt) = (sp + 2 * l.s_col[i] as u64, g + 2 * l.s_col[i] as u64);
            let (at, bt) = (a + 2 * l.a_off[i] as u64, b + 2 * l.b_off[i] as u64);
            let (dat, dbt) = (da + 4 * l.a_off[i] as u64, db + 4 * l.b_off[i] as u64);
            let dyr = dy + 2 * t.rows.start as u64;
            let (r, nr) = (t.rank, t.rows.len());
            match style {
                Unfused::Accumulate => {
                    // G = s·dY[:, rows]·B; dX += G·A; dA += Gᵀ·X; dB += s·dY[:, rows]ᵀ·S.
                    self.gemm(s.m, r, nr, t.scale, (dyr, s.n, false), (bt, r, false), 0.0, (gt, l.s_ld, false))?;
                    if want_dx {
                        self.gemm(s.m, s.k, r, 1.0, (gt, l.s_ld, false), (at, s.k, false), 1.0, (dx, s.k, false))?;
                    }
                    self.gemm(r, s.k, s.m, 1.0, (gt, l.s_ld, true), (x, s.k, false), 1.0, (dat, s.k, true))?;
                    self.gemm(nr, r, s.m, t.scale, (dyr, s.n, true), (st, l.s_ld, false), 1.0, (dbt, r, true))?;
                }
                Unfused::Peft => {
                    // Autograd of Y += s·((X·Aᵀ)·Bᵀ): dT₂ = s·dY[:, rows] (a scale kernel), then
                    // dB += dT₂ᵀ·T, dT = dT₂·B, dA += dTᵀ·X, dX_lora = dT·A, dX += dX_lora.
                    self.axpby(s.m, nr, (t3, nr), (dyr, s.n), (0, 0), t.scale, 0.0)?;
                    self.gemm(nr, r, s.m, 1.0, (t3, nr, true), (st, l.s_ld, false), 1.0, (dbt, r, true))?;
                    self.gemm(s.m, r, nr, 1.0, (t3, nr, false), (bt, r, false), 0.0, (gt, l.s_ld, false))?;
                    self.gemm(r, s.k, s.m, 1.0, (gt, l.s_ld, true), (x, s.k, false), 1.0, (dat, s.k, true))?;
                    if want_dx {
                        self.gemm(s.m, s.k, r, 1.0, (gt, l.s_ld, false), (at, s.k, false), 0.0, (dxl, s.k, false))?;
                        self.axpby(s.m, s.k, (dx, s.k), (dxl, s.k), (dx, s.k), 1.0, 1.0)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_every_term_16_byte_aligned() {
        let a = vec![0f32; 4 * 20];
        let b = vec![0f32; 3 * 4];
        let b2 = vec![0f32; 5 * 16];
        let a2 = vec![0f32; 16 * 20];
        let terms = [
            LoraTerm { a: &a, b: &b, rank: 4, scale: 1.0, rows: 0..3, dropout: None },
            LoraTerm { a: &a2, b: &b2, rank: 16, scale: 1.0, rows: 3..8, dropout: None },
        ];
        let s = LinearShape::new(7, 20, 8, false, &terms).unwrap();
        let l = Layout::of(&s);
        assert_eq!(l.a_off, vec![0, 80]);
        assert_eq!(l.b_off, vec![0, 16]);
        assert_eq!(l.s_col, vec![0, 8]);
        assert_eq!(l.s_ld, 24);
        assert!(l.a_off.iter().chain(&l.b_off).chain(&l.s_col).all(|o| o % 8 == 0));
    }

    #[test]
    fn shapes_outside_the_kernels_limits_are_refused() {
        let a = vec![0f32; 4];
        let b = vec![0f32; 4];
        let t = LoraTerm { a: &a, b: &b, rank: 1, scale: 1.0, rows: 0..4, dropout: None };
        let many = vec![t.clone(); MAX_TERMS + 1];
        assert!(LinearShape::new(2, 4, 4, false, &many).is_err());
        let past = LoraTerm { rows: 2..6, ..t };
        assert!(LinearShape::new(2, 4, 4, false, &[past]).is_err());
    }

    #[test]
    fn hopper_tiles_follow_the_wave_fill() {
        // FLUX at 1024²: 4608 tokens on an H100's 132 SMs.
        assert_eq!(hopper_tile_n(4608, 3072, 132), 128); // 432 wide tiles: 82 % of 4 waves
        assert_eq!(hopper_tile_n(4608, 9216, 132), 256); // 1296: 98 % of 10
        assert_eq!(hopper_tile_n(4608, 21504, 132), 256);
        assert_eq!(hopper_tile_n(4608, 64, 132), 128);
        // Under a wave, more tiles keep more SMs busy: 5 narrow beat 3 wide on 8 SMs.
        assert_eq!(hopper_tile_n(100, 600, 8), 128);
    }

    #[test]
    fn flop_counts() {
        let s = LinearShape { m: 2, k: 3, n: 4, bias: false, terms: vec![] };
        assert_eq!(s.base_flops(), 48.0);
        assert_eq!(s.forward_flops(), 48.0);
    }

    #[test]
    fn fused_launch_costs_for_known_shapes() {
        // The hybrid forward's large launch at FLUX's img qkv (1024²): base product from cuBLAS
        // (f32 C read), one r 32 adapter on the q rows, bf16 Y, bias.
        let (m, k, n, r) = (4096, 3072, 9216, 32);
        let mut pr = problem(m, n, 1, n);
        (pr.beta, pr.c_in, pr.bias) = (1.0, 2, 3);
        let p = params(vec![(pr, vec![segment(4, r, 5, r, r, 0..3072)])]).unwrap();
        let (flops, bytes) = fused_cost(&p);
        assert_eq!(flops, 2.0 * (m * 3072 * r) as f64);
        // S' [m, r] and B [3072, r] bf16 read; Y bf16 written; C f32 read; bias f32 read.
        assert_eq!(bytes, (2 * m * r + 2 * 3072 * r + 2 * m * n + 4 * m * n + 4 * n) as f64);
        // dA += G'ᵀ·X̃ (f32, accumulating: read and written) with an 8-bit-coded operand's
        // bytes at one per element.
        let mut pa = problem(r, k, 6, k);
        (pa.out_f32, pa.beta) = (1, 1.0);
        let mut seg = segment(7, r, 8, k, m, 0..k);
        seg.b_code = FK_CODE_I8 as i32;
        let (flops, bytes) = fused_cost(&params(vec![(pa, vec![seg])]).unwrap());
        assert_eq!(flops, 2.0 * (r * k * m) as f64);
        assert_eq!(bytes, (2 * r * m + k * m + 2 * 4 * r * k) as f64);
    }
}
