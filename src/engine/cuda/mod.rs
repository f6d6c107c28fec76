//! The whole transformer on the GPU with weights, adapters and activations resident on the
//! device: `model::flux` op by op (the CPU reference is the specification; tests/gpu_flux_step.rs
//! compares the two), forward for the sampler, forward + backward to the LoRA gradients for the
//! trainer, with optional per-block activation checkpointing (the backward reruns a block's
//! forward from its saved input).
//!
//! Precision: the residual streams, the norms' statistics, modulation vectors, gradients between
//! ops and every accumulation are f32. What a linear reads and writes inside a block is bf16,
//! rounded once where it is produced (LayerNorm + modulate writes the bf16 input, the GEMM's
//! epilogue the bf16 output), and that is also what the backward keeps: LayerNorm's normalised
//! rows, qkv, the proj/MLP outputs and the MLP pre-activation in bf16; the linears' inputs are
//! recomputed from them in the backward (modulate from n, GELU from the pre-activation, the merged
//! attention output from O), bit for bit what the forward fed the GEMM. Attention reads bf16
//! Q/K/V in [b, h, l, d] with f32 softmax statistics. src/plan/activations.rs counts it.

pub mod adapters;
mod blocks;
pub mod offload;
pub mod reduce;
pub mod swap;
pub mod train;
pub mod weights;

use super::Device;
use crate::kernels::activation::GpuActivation;
use crate::kernels::attention::{AttnDims, GpuAttention};
use crate::kernels::copy::GpuCopy;
use crate::kernels::embedding::GpuEmbedding;
use crate::kernels::gpu::Gpu;
use crate::kernels::launch::{DevMat, View};
use crate::kernels::lora::{GpuLora, LinearShape, LinearViews, OutView, TermShape};
use crate::kernels::norm::{GpuNorm, StepDims};
use crate::kernels::optim::GpuOptim;
use crate::kernels::random::GpuRandom;
use crate::model::config::FluxConfig;
use crate::model::double_block::LN_EPS;
use crate::model::embed::{MAX_PERIOD, TIME_FACTOR};
use crate::model::flux::{joint_rope, FluxInputs};
use crate::model::weights::FluxWeights;
use adapters::DevLora;
use anyhow::{bail, ensure, Context, Result};
use blocks::{DoubleAct, SingleAct};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use reduce::GradsDone;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use swap::Dir;
pub use weights::BaseDtype;
use weights::{DevEmbedder, DevLinear, DevWeights};

pub(crate) type F32 = CudaSlice<f32>;
pub(crate) type B16 = CudaSlice<bf16>;

/// The kernels one CUDA context holds. Dereferences to the LoRA linear, its most used part.
pub struct CudaBackend {
    pub lora: GpuLora,
    pub attn: GpuAttention,
    pub norm: GpuNorm,
    pub act: GpuActivation,
    pub copy: GpuCopy,
    pub embed: GpuEmbedding,
    pub random: GpuRandom,
    pub optim: GpuOptim,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

impl Deref for CudaBackend {
    type Target = GpuLora;
    fn deref(&self) -> &GpuLora {
        &self.lora
    }
}

impl DerefMut for CudaBackend {
    fn deref_mut(&mut self) -> &mut GpuLora {
        &mut self.lora
    }
}

impl CudaBackend {
    /// A CUDA device with every kernel module loaded, or an error that says why not (no driver,
    /// no device, no kernels in this build).
    pub fn device() -> Result<Device> {
        let gpu = Gpu::new()?;
        let backend = CudaBackend {
            lora: GpuLora::new(&gpu)?,
            attn: GpuAttention::new(&gpu)?,
            norm: GpuNorm::new(&gpu)?,
            act: GpuActivation::new(&gpu)?,
            copy: GpuCopy::new(&gpu)?,
            embed: GpuEmbedding::new(&gpu)?,
            random: GpuRandom::new(&gpu)?,
            optim: GpuOptim::new(&gpu)?,
            ctx: gpu.ctx.clone(),
            stream: gpu.stream.clone(),
        };
        Ok(Device::Cuda(Arc::new(Mutex::new(backend))))
    }

    /// The backend behind a `Device::Cuda`, locked; a call that panicked while holding it leaves
    /// the context unusable, which is an error here rather than a second panic.
    pub fn lock(b: &Mutex<CudaBackend>) -> Result<MutexGuard<'_, CudaBackend>> {
        b.lock().map_err(|_| anyhow::anyhow!("the CUDA context was poisoned by a failed call"))
    }
}

/// The model on one CUDA device.
pub struct GpuFlux {
    pub cfg: FluxConfig,
    pub be: Arc<Mutex<CudaBackend>>,
    pub w: DevWeights,
    /// Per-block activation checkpointing in `forward_train`.
    pub checkpointing: bool,
    /// Fill every new activation buffer with NaN first (tests: an unwritten element shows).
    pub poison: bool,
    /// Largest device memory in use seen at block boundaries (total − free, bytes).
    pub peak_used: usize,
    /// When Some, the memory pool's bytes in use after each block of a forward are pushed here
    /// (tests hold src/plan's per-block counts to what the step allocates).
    pub block_memory: Option<Vec<usize>>,
    /// With checkpointing: the block inputs kept in pinned host memory (`--offload-checkpoints`).
    pub offload: Option<offload::CkptOffload>,
}

/// The inputs of one batch on the device.
pub struct DevInputs {
    pub b: usize,
    pub n_img: usize,
    pub n_txt: usize,
    img16: B16,
    txt16: B16,
    y16: B16,
    temb16: B16,
    gemb16: Option<B16>,
    cos: F32,
    sin: F32,
}

/// What a block keeps for the backward: its activations, or (checkpointing) only its inputs.
enum Saved<A> {
    Acts(A),
    Inputs(Vec<F32>),
    /// The inputs, in the checkpoint offload's pinned host memory (offload.rs).
    Host,
}

/// Everything `backward` needs from `forward_train`.
pub struct FwdState {
    inp: DevInputs,
    vec: F32,
    svec16: B16,
    double: Vec<Saved<DoubleAct>>,
    single: Vec<Saved<SingleAct>>,
    final_mods: Vec<F32>,
    final_ln: blocks::LnSaved,
}

impl FwdState {
    /// Values in the prediction of this forward.
    pub fn pred_len(&self, out_channels: usize) -> usize {
        self.inp.b * self.inp.n_img * out_channels
    }
}

/// Shapes shared by every block of one call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub lt: usize,
    pub li: usize,
    pub h: usize,
    pub d: usize,
    pub c: usize,
    pub mlp: usize,
}

impl Dims {
    pub fn l(&self) -> usize {
        self.lt + self.li
    }
    pub fn attn(&self) -> AttnDims {
        AttnDims { b: self.b, h: self.h, l: self.l(), d: self.d }
    }
}

/// One call's context: the kernels, the adapters, the allocation policy.
pub(crate) struct Run<'a> {
    pub g: &'a mut CudaBackend,
    pub lora: &'a DevLora,
    pub st: Arc<CudaStream>,
    pub poison: bool,
    pub peak: &'a mut usize,
    pub block_memory: Option<&'a mut Vec<usize>>,
    pub offload: Option<&'a mut offload::CkptOffload>,
}

impl Run<'_> {
    /// An f32 buffer that a kernel fills (NaN first when poisoning).
    pub fn f32(&self, n: usize) -> Result<F32> {
        if self.poison {
            return Ok(self.st.clone_htod(&vec![f32::NAN; n.max(1)])?);
        }
        // SAFETY: callers allocate only outputs that a kernel writes whole before any read.
        Ok(unsafe { self.st.alloc::<f32>(n.max(1)) }?)
    }

    pub fn zeros(&self, n: usize) -> Result<F32> {
        Ok(self.st.alloc_zeros::<f32>(n.max(1))?)
    }

    pub fn b16(&self, n: usize) -> Result<B16> {
        if self.poison {
            return Ok(self.st.clone_htod(&vec![bf16::NAN; n.max(1)])?);
        }
        // SAFETY: as in `f32`.
        Ok(unsafe { self.st.alloc::<bf16>(n.max(1)) }?)
    }

    /// A bf16 copy of the first `n` values of `x`.
    pub fn cast16(&self, x: &F32, n: usize) -> Result<B16> {
        let out = self.b16(n)?;
        self.g.copy.cast_f32_to_bf16(x.into(), (&out).into(), n)?;
        Ok(out)
    }

    /// dst[..n] += src[..n]
    pub fn acc(&self, dst: &F32, src: &F32, n: usize) -> Result<()> {
        self.g.copy.copy2d(1, n, DevMat::f32(src, n), DevMat::f32(dst, n), true)
    }

    pub fn copy(&self, src: &F32, n: usize) -> Result<F32> {
        let out = self.f32(n)?;
        self.g.copy.copy2d(1, n, DevMat::f32(src, n), DevMat::f32(&out, n), false)?;
        Ok(out)
    }

    /// The `n` chunks [b, c] of a modulation output [b, n·c].
    pub fn chunks(&self, mods: &F32, b: usize, n: usize, c: usize) -> Result<Vec<F32>> {
        (0..n)
            .map(|j| {
                let out = self.f32(b * c)?;
                let src = DevMat::f32(View::from(mods).tail(j * c)?, n * c);
                self.g.copy.copy2d(b, c, src, DevMat::f32(&out, c), false)?;
                Ok(out)
            })
            .collect()
    }

    /// The inverse of `chunks`, as bf16 (a linear's dY).
    pub fn join16(&self, chunks: &[F32], b: usize, c: usize) -> Result<B16> {
        let n = chunks.len();
        let out = self.b16(b * n * c)?;
        for (j, ch) in chunks.iter().enumerate() {
            let dst = DevMat::bf16(View::from(&out).tail(j * c)?, n * c);
            self.g.copy.copy2d(b, c, DevMat::f32(ch, c), dst, false)?;
        }
        Ok(out)
    }

    /// The shape of a call of `l` on `m` rows with the terms `idx`.
    fn shape(&self, l: &DevLinear, m: usize, bias: bool, idx: &[usize]) -> Result<LinearShape> {
        let terms = idx.iter().map(|&i| self.lora.shape(i)).collect();
        for &i in idx {
            ensure!(
                self.lora.terms[i].d_in == l.d_in,
                "adapter on {}: A has {} inputs, the linear {}",
                l.name,
                self.lora.terms[i].d_in,
                l.d_in
            );
        }
        LinearShape::of_terms(m, l.d_in, l.d_out, bias, terms).with_context(|| l.name.clone())
    }

    /// y = x16·Wᵀ + b + the adapters on `l`, into `y` [m, d_out]: one fused call, or with
    /// per-sample sets one call per run of samples that see the same terms (`DevLora::calls`), each
    /// on its rows exactly as in a batch of its own.
    fn lin_into(&mut self, l: &DevLinear, m: usize, x16: View<bf16>, y: OutView) -> Result<()> {
        for (rows, idx) in self.lora.calls(&l.name, m)? {
            let s = self.shape(l, rows.len(), l.bias.is_some(), &idx)?;
            let x = x16.slice(rows.start * l.d_in..rows.end * l.d_in)?;
            let v = prepared(self.g, self.lora, l, &s, x, &idx, true).with_context(|| format!("{} DoRA", l.name))?;
            let y = y.slice(rows.start * l.d_out..rows.end * l.d_out)?;
            self.g.lora.forward_dev(&s, &v, y).with_context(|| format!("{} on the GPU", l.name))?;
        }
        Ok(())
    }

    /// y [m, d_out] f32 = x16 [m, d_in]·Wᵀ + b + the adapters on `l`.
    pub fn lin(&mut self, l: &DevLinear, m: usize, x16: View<bf16>) -> Result<F32> {
        let y = self.f32(m * l.d_out)?;
        self.lin_into(l, m, x16, OutView::F32((&y).into()))?;
        Ok(y)
    }

    /// y [m, d_out] bf16: `lin` with its output rounded once in the GEMM's epilogue (what the
    /// next op reads and the backward keeps).
    pub fn lin16(&mut self, l: &DevLinear, m: usize, x16: View<bf16>) -> Result<B16> {
        let y = self.b16(m * l.d_out)?;
        self.lin_into(l, m, x16, OutView::Bf16((&y).into()))?;
        Ok(y)
    }

    /// GELU-tanh of bf16 h [m, cols] to bf16 (the MLP's hidden activation; the backward
    /// recomputes it from h, the same bits).
    pub fn gelu16(&self, h: &B16, m: usize, cols: usize) -> Result<B16> {
        let out = self.b16(m * cols)?;
        self.g.act.gelu_tanh(m, cols, DevMat::bf16(h, cols), DevMat::bf16(&out, cols))?;
        Ok(out)
    }

    /// Backward through `l`: the adapters' gradients accumulate, dX (f32 [m, d_in]) is written
    /// when `dx` is given.
    pub fn lin_bwd(
        &mut self,
        l: &DevLinear,
        m: usize,
        x16: View<bf16>,
        dy16: View<bf16>,
        dx: Option<&F32>,
    ) -> Result<()> {
        ensure!(
            self.lora.batch().is_none(),
            "{}: per-sample adapter sets are for inference only (no backward)",
            l.name
        );
        let idx = self.lora.on(&l.name).to_vec();
        let s = self.shape(l, m, false, &idx)?;
        if idx.is_empty() && dx.is_none() {
            return Ok(());
        }
        let grads: &[F32] = match self.lora.train.as_ref() {
            Some(t) => &t.grads,
            None if idx.is_empty() => &[],
            None => bail!("{}: backward without gradient buffers (the adapters were loaded for sampling)", l.name),
        };
        let lora = self.lora;
        let da: Vec<View<f32>> = idx.iter().map(|&i| View::from(&grads[lora.terms[i].param0])).collect();
        let db: Vec<View<f32>> = idx.iter().map(|&i| View::from(&grads[lora.terms[i].param0 + 1])).collect();
        let v = prepared(self.g, lora, l, &s, x16, &idx, false).with_context(|| format!("{} DoRA", l.name))?;
        let dy_scaled = match lora.dora_of(&l.name, &idx) {
            Some(d) => Some(self.dora_dy(&s, &idx, &v, d, dy16, grads).with_context(|| format!("{} DoRA", l.name))?),
            None => None,
        };
        let dx = dx.map(|d| OutView::F32(d.into()));
        let dys = dy_scaled.as_ref().map(View::from);
        self.g
            .lora
            .backward_dev(&s, &v, dy16, dys, dx, &da, &db)
            .with_context(|| format!("{} backward on the GPU", l.name))
    }

    /// DoRA's part of the backward of `l` (g and the norms already in `d`, the norm a constant as
    /// PEFT has it): the magnitudes' gradients accumulate into `grads`, and the returned
    /// dY' = g ⊙ dY (bf16 [m, d_out], dY itself outside the DoRA rows) is what the frozen
    /// product and the DoRA terms' own branches read. The pre-rescale product
    /// Ypre = X·Wᵀ + s·S'·Bᵀ is recomputed here (one forward GEMM of the linear without bias or
    /// rescale, bf16, freed at once) rather than kept from the forward: keeping it would cost
    /// m·d_out bf16 per DoRA linear for the whole step (all of them at once without
    /// checkpointing), recomputing costs one base GEMM per DoRA linear.
    #[allow(clippy::too_many_arguments)]
    fn dora_dy(
        &mut self,
        s: &LinearShape,
        idx: &[usize],
        v: &LinearViews,
        d: &adapters::DoraLinear,
        dy16: View<bf16>,
        grads: &[F32],
    ) -> Result<B16> {
        let (m, n) = (s.m, s.n);
        let dora: Vec<usize> = (0..idx.len()).filter(|&j| s.terms[j].col_scaled).collect();
        let pre_terms = dora.iter().map(|&j| TermShape { col_scaled: false, ..s.terms[j].clone() }).collect();
        let pre_shape = LinearShape::of_terms(m, s.k, n, false, pre_terms)?;
        let pre_views = LinearViews {
            x: v.x,
            w: v.w,
            bias: None,
            a: dora.iter().map(|&j| v.a[j]).collect(),
            b: dora.iter().map(|&j| v.b[j]).collect(),
            col_scale: None,
        };
        let ypre = self.b16(m * n)?;
        self.g.lora.forward_dev(&pre_shape, &pre_views, OutView::Bf16((&ypre).into()))?;
        let dys = self.b16(m * n)?;
        self.g.copy.copy2d(m, n, DevMat::bf16(dy16, n), DevMat::bf16(&dys, n), false)?;
        for &j in &dora {
            let t = &self.lora.terms[idx[j]];
            let rows = t.rows.clone();
            let ypre_rows = (View::from(&ypre).tail(rows.start)?, n);
            let dm = View::from(&grads[t.param0 + 2]);
            let (g, norm) = ((&d.g).into(), (&d.norm).into());
            self.g.lora.dora_column_grads(m, n, rows, dy16, ypre_rows, g, norm, dm, (&dys).into())?;
        }
        Ok(dys)
    }

    pub fn has_terms(&self, l: &DevLinear) -> bool {
        !self.lora.on(&l.name).is_empty()
    }

    /// LayerNorm + modulation of x [b·l, c]: saves n (bf16) and rstd; returns them with the
    /// bf16 output, which is computed from the rounded n so that `ln_out` gives its bits again.
    pub fn ln_mod(
        &self,
        x: &F32,
        shift: &F32,
        scale: &F32,
        b: usize,
        l: usize,
        c: usize,
    ) -> Result<(blocks::LnSaved, B16)> {
        let dims = StepDims { b, l, c };
        let (n, rstd, out) = (self.b16(b * l * c)?, self.f32(b * l)?, self.b16(b * l * c)?);
        self.g.norm.ln_modulate(dims, LN_EPS, x, shift, scale, &out, &n, None, &rstd)?;
        Ok((blocks::LnSaved { n, rstd }, out))
    }

    /// `ln_mod`'s bf16 output again, from what it saved (the backward's linear input).
    pub fn ln_out(&self, ln: &blocks::LnSaved, shift: &F32, scale: &F32, b: usize, l: usize, c: usize) -> Result<B16> {
        let out = self.b16(b * l * c)?;
        self.g.norm.modulate(StepDims { b, l, c }, &ln.n, shift, scale, &out)?;
        Ok(out)
    }

    /// dx += d(input) of `ln_mod`; writes dshift and dscale.
    #[allow(clippy::too_many_arguments)]
    pub fn ln_mod_bwd(
        &self,
        ln: &blocks::LnSaved,
        dout: &F32,
        scale: &F32,
        dx: &F32,
        dshift: &F32,
        dscale: &F32,
        b: usize,
        l: usize,
        c: usize,
    ) -> Result<()> {
        let dims = StepDims { b, l, c };
        let (d, scratch) = (self.f32(b * l * c)?, self.f32(GpuNorm::ln_modulate_scratch(dims))?);
        self.g.norm.ln_modulate_backward(dims, dout, &ln.n, &ln.rstd, scale, &d, dshift, dscale, &scratch)?;
        self.acc(dx, &d, b * l * c)
    }

    /// x += gate⊙y (y a linear's bf16 output)
    pub fn gated(&self, x: &F32, y: &B16, gate: &F32, b: usize, l: usize, c: usize) -> Result<()> {
        self.g.norm.gated_residual(StepDims { b, l, c }, x, y, gate, x)
    }

    /// For x_out = x + gate⊙y: returns d y in bf16 (the dY of the linear that made y, rounded
    /// once where it is computed); writes d gate (d x is d x_out itself).
    #[allow(clippy::too_many_arguments)]
    pub fn gated_bwd(&self, dout: &F32, y: &B16, gate: &F32, dgate: &F32, b: usize, l: usize, c: usize) -> Result<B16> {
        let dims = StepDims { b, l, c };
        let (dy, scratch) = (self.b16(b * l * c)?, self.f32(GpuNorm::gated_residual_scratch(dims))?);
        self.g.norm.gated_residual_backward(dims, dout, y, gate, None, &dy, dgate, &scratch)?;
        Ok(dy)
    }

    /// Checkpointing: block `k`'s input copies kept for its recompute, on the device or (offload)
    /// on their way to the host, the copy overlapping the block's compute.
    fn save<A>(&mut self, k: usize, bufs: Vec<F32>) -> Result<Saved<A>> {
        match self.offload.as_deref_mut() {
            Some(o) => {
                o.put(&self.st, k, bufs)?;
                Ok(Saved::Host)
            }
            None => Ok(Saved::Inputs(bufs)),
        }
    }

    /// Backward: a checkpointed block `k`'s saved inputs on the device, from where they were
    /// kept; with offload the copy of block k − 1's starts.
    fn saved_inputs<A>(&mut self, k: usize, saved: Saved<A>) -> Result<Vec<F32>> {
        match (saved, self.offload.as_deref_mut()) {
            (Saved::Inputs(x), _) => Ok(x),
            (Saved::Host, Some(o)) => o.get(&self.st, k, k.checked_sub(1)),
            (Saved::Host, None) => bail!("block {k}: inputs offloaded without the checkpoint offload"),
            (Saved::Acts(_), _) => bail!("block {k}: kept its activations, not its inputs"),
        }
    }

    /// After a forward block: `sample_memory`, and the pool's bytes in use when asked for.
    pub fn block_done(&mut self) {
        self.sample_memory();
        if let Some(v) = self.block_memory.as_deref_mut() {
            v.push(pool_attribute(&self.g.ctx, PoolAttr::UsedNow).unwrap_or(0) as usize);
        }
    }

    /// Records the device memory in use now if it is the most so far.
    pub fn sample_memory(&mut self) {
        if let Ok((free, total)) = self.g.ctx.mem_get_info() {
            *self.peak = (*self.peak).max(total.saturating_sub(free));
        }
    }
}

/// Host f32 to bf16 (round to nearest even) for an upload.
pub(crate) fn to16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn embed_fwd(r: &mut Run, e: &DevEmbedder, x16: View<bf16>, b: usize) -> Result<F32> {
    let h = r.lin(&e.in_layer, b, x16)?;
    let n = b * e.in_layer.d_out;
    let a = r.f32(n)?;
    r.g.act.silu(n, &h, &a)?;
    let a16 = r.cast16(&a, n)?;
    r.lin(&e.out_layer, b, View::from(&a16))
}

/// LoRA gradients of an embedder from d vec (its input is data: no input gradient). Recomputes
/// the hidden layer (b rows).
fn embed_bwd(r: &mut Run, e: &DevEmbedder, x16: View<bf16>, dvec16: View<bf16>, b: usize) -> Result<()> {
    if !r.has_terms(&e.in_layer) && !r.has_terms(&e.out_layer) {
        return Ok(());
    }
    let h = r.lin(&e.in_layer, b, x16)?;
    let n = b * e.in_layer.d_out;
    let a = r.f32(n)?;
    r.g.act.silu(n, &h, &a)?;
    let a16 = r.cast16(&a, n)?;
    let da = r.f32(n)?;
    r.lin_bwd(&e.out_layer, b, View::from(&a16), dvec16, Some(&da))?;
    let dh = r.f32(n)?;
    r.g.act.silu_backward(n, &h, &da, &dh)?;
    let dh16 = r.cast16(&dh, n)?;
    r.lin_bwd(&e.in_layer, b, x16, View::from(&dh16), None)
}

/// The body of `GpuFlux::run_forward` (the backend locked, `r` its context).
fn forward_impl(
    r: &mut Run,
    w: &mut DevWeights,
    inp: DevInputs,
    dm: Dims,
    keep: bool,
    ckpt: bool,
) -> Result<(F32, Option<FwdState>)> {
    let (b, li, lt) = (inp.b, inp.n_img, inp.n_txt);
    let c = dm.c;

    let img = r.lin(&w.img_in, b * li, View::from(&inp.img16)).context("img_in")?;
    let txt = r.lin(&w.txt_in, b * lt, View::from(&inp.txt16)).context("txt_in")?;
    let x16 = View::from(&inp.temb16);
    let vec = embed_fwd(r, &w.time_in, x16, b).context("time_in")?;
    if let (Some(e), Some(g16)) = (&w.guidance_in, &inp.gemb16) {
        let x16 = View::from(g16);
        let gv = embed_fwd(r, e, x16, b).context("guidance_in")?;
        r.acc(&vec, &gv, b * c)?;
    }
    let x16 = View::from(&inp.y16);
    let yv = embed_fwd(r, &w.vector_in, x16, b).context("vector_in")?;
    r.acc(&vec, &yv, b * c)?;
    // Every modulation linear reads SiLU(vec): computed and rounded once.
    let svec = r.f32(b * c)?;
    r.g.act.silu(b * c, &vec, &svec)?;
    let svec16 = r.cast16(&svec, b * c)?;
    let bx = blocks::Ctx { dm, svec16: &svec16, cos: &inp.cos, sin: &inp.sin };

    let mut double = Vec::new();
    let nd = w.n_double();
    for i in 0..nd {
        w.fetch(&r.st, i, Dir::Forward)?;
        let blk = w.double_block(i)?;
        let saved = if ckpt {
            let bufs = vec![r.copy(&img, b * li * c)?, r.copy(&txt, b * lt * c)?];
            Some(r.save(i, bufs)?)
        } else {
            None
        };
        let act =
            blocks::double_fwd(r, blk, &img, &txt, &bx, keep && !ckpt).with_context(|| format!("double_blocks.{i}"))?;
        w.release(&r.st, i)?;
        r.block_done();
        if keep {
            double.push(match saved {
                Some(s) => s,
                None => Saved::Acts(act.expect("kept")),
            });
        }
    }
    let l = lt + li;
    let x = r.f32(b * l * c)?;
    blocks::join(r, &txt, &img, &x, dm)?;
    drop((img, txt));
    let mut single = Vec::new();
    for i in 0..w.n_single() {
        w.fetch(&r.st, nd + i, Dir::Forward)?;
        let blk = w.single_block(i)?;
        let saved = if ckpt {
            let bufs = vec![r.copy(&x, b * l * c)?];
            Some(r.save(nd + i, bufs)?)
        } else {
            None
        };
        let act = blocks::single_fwd(r, blk, &x, &bx, keep && !ckpt).with_context(|| format!("single_blocks.{i}"))?;
        w.release(&r.st, nd + i)?;
        r.block_done();
        if keep {
            single.push(match saved {
                Some(s) => s,
                None => Saved::Acts(act.expect("kept")),
            });
        }
    }
    let img = r.f32(b * li * c)?;
    blocks::split(r, &x, None, Some(&img), dm)?;
    drop(x);
    let fm = r.lin(&w.final_mod, b, bx.svec16.into()).context("final_layer.adaLN_modulation")?;
    let final_mods = r.chunks(&fm, b, 2, c)?;
    let (final_ln, xf) = r.ln_mod(&img, &final_mods[0], &final_mods[1], b, li, c)?;
    let out = r.lin(&w.final_linear, b * li, View::from(&xf)).context("final_layer.linear")?;
    drop(xf);
    if let Some(o) = r.offload.as_deref_mut() {
        o.finish_forward(&r.st)?;
    }
    r.sample_memory();
    let state = keep.then_some(FwdState { inp, vec, svec16, double, single, final_mods, final_ln });
    Ok((out, state))
}

/// A callback told each time a part of the adapters' gradients is final (`reduce::GradsDone`),
/// with the compute stream the backward runs on.
pub type OnGradsDone<'a> = &'a mut dyn FnMut(&Arc<CudaStream>, GradsDone) -> Result<()>;

/// The body of `GpuFlux::backward`.
fn backward_impl(r: &mut Run, w: &mut DevWeights, s: FwdState, dpred: &F32, dm: Dims, done: OnGradsDone) -> Result<()> {
    let FwdState { inp, vec, svec16, double, single, final_mods, final_ln } = s;
    let (b, li, lt) = (inp.b, inp.n_img, inp.n_txt);
    let (c, l) = (dm.c, dm.l());
    let bx = blocks::Ctx { dm, svec16: &svec16, cos: &inp.cos, sin: &inp.sin };
    // d SiLU(vec), summed over every modulation linear; d vec follows once at the end.
    let dsvec = r.zeros(b * c)?;

    let n_out = b * li * w.final_linear.d_out;
    let dpred16 = r.cast16(dpred, n_out)?;
    let dxm = r.f32(b * li * c)?;
    let xf = r.ln_out(&final_ln, &final_mods[0], &final_mods[1], b, li, c)?;
    r.lin_bwd(&w.final_linear, b * li, View::from(&xf), View::from(&dpred16), Some(&dxm))?;
    drop(xf);
    let dimg = r.zeros(b * li * c)?;
    let (dsh, dsc) = (r.f32(b * c)?, r.f32(b * c)?);
    r.ln_mod_bwd(&final_ln, &dxm, &final_mods[1], &dimg, &dsh, &dsc, b, li, c)?;
    blocks::modulation_bwd(r, &w.final_mod, &[dsh, dsc], &bx, &dsvec)?;
    drop((dxm, final_ln, final_mods, dpred16));
    done(&r.st, GradsDone::Head)?;

    // Text tokens after the last single block get no gradient from the loss.
    let dx = r.zeros(b * l * c)?;
    let dtxt0 = r.zeros(b * lt * c)?;
    blocks::join(r, &dtxt0, &dimg, &dx, dm)?;
    drop((dtxt0, dimg));
    let nd = w.n_double();
    for (i, saved) in single.into_iter().enumerate().rev() {
        w.fetch(&r.st, nd + i, Dir::Backward)?;
        let blk = w.single_block(i)?;
        let act = match saved {
            Saved::Acts(a) => a,
            inputs => {
                let x =
                    r.saved_inputs(nd + i, inputs).with_context(|| format!("single_blocks.{i}: its saved inputs"))?;
                blocks::single_fwd(r, blk, &x[0], &bx, true)
                    .with_context(|| format!("single_blocks.{i} recompute"))?
                    .expect("kept")
            }
        };
        blocks::single_bwd(r, blk, act, &dx, &bx, &dsvec).with_context(|| format!("single_blocks.{i} backward"))?;
        done(&r.st, GradsDone::Single(i))?;
        w.release(&r.st, nd + i)?;
        r.sample_memory();
    }
    let (dtxt, dimg) = (r.f32(b * lt * c)?, r.f32(b * li * c)?);
    blocks::split(r, &dx, Some(&dtxt), Some(&dimg), dm)?;
    drop(dx);
    for (i, saved) in double.into_iter().enumerate().rev() {
        w.fetch(&r.st, i, Dir::Backward)?;
        let blk = w.double_block(i)?;
        let act = match saved {
            Saved::Acts(a) => a,
            inputs => {
                let x = r.saved_inputs(i, inputs).with_context(|| format!("double_blocks.{i}: its saved inputs"))?;
                blocks::double_fwd(r, blk, &x[0], &x[1], &bx, true)
                    .with_context(|| format!("double_blocks.{i} recompute"))?
                    .expect("kept")
            }
        };
        blocks::double_bwd(r, blk, act, &dimg, &dtxt, &bx, &dsvec)
            .with_context(|| format!("double_blocks.{i} backward"))?;
        done(&r.st, GradsDone::Double(i))?;
        w.release(&r.st, i)?;
        r.sample_memory();
    }
    let dtxt16 = r.cast16(&dtxt, b * lt * c)?;
    r.lin_bwd(&w.txt_in, b * lt, View::from(&inp.txt16), View::from(&dtxt16), None)?;
    let dimg16 = r.cast16(&dimg, b * li * c)?;
    r.lin_bwd(&w.img_in, b * li, View::from(&inp.img16), View::from(&dimg16), None)?;
    let dvec = r.f32(b * c)?;
    r.g.act.silu_backward(b * c, &vec, &dsvec, &dvec)?;
    let dvec16 = r.cast16(&dvec, b * c)?;
    let (x16, d16) = (View::from(&inp.temb16), View::from(&dvec16));
    embed_bwd(r, &w.time_in, x16, d16, b).context("time_in backward")?;
    if let (Some(e), Some(g16)) = (&w.guidance_in, &inp.gemb16) {
        let x16 = View::from(g16);
        embed_bwd(r, e, x16, d16, b).context("guidance_in backward")?;
    }
    let x16 = View::from(&inp.y16);
    embed_bwd(r, &w.vector_in, x16, d16, b).context("vector_in backward")?;
    done(&r.st, GradsDone::All)
}

impl GpuFlux {
    /// Uploads the weights to the device of `be`.
    pub fn new(cfg: &FluxConfig, w: &FluxWeights, be: &Arc<Mutex<CudaBackend>>, base: BaseDtype) -> Result<GpuFlux> {
        GpuFlux::with_swap(cfg, w, be, base, 0)
    }

    /// As `new`, with the last `blocks_to_swap` blocks' weights in pinned host memory, streamed
    /// to the device block by block (swap.rs).
    pub fn with_swap(
        cfg: &FluxConfig,
        w: &FluxWeights,
        be: &Arc<Mutex<CudaBackend>>,
        base: BaseDtype,
        blocks_to_swap: usize,
    ) -> Result<GpuFlux> {
        let weights = {
            let g = CudaBackend::lock(be)?;
            DevWeights::upload(&g, w, base, blocks_to_swap).context("uploading the weights to the GPU")?
        };
        Ok(GpuFlux {
            cfg: cfg.clone(),
            be: be.clone(),
            w: weights,
            checkpointing: false,
            poison: false,
            peak_used: 0,
            block_memory: None,
            offload: None,
        })
    }

    fn dims(&self, b: usize, lt: usize, li: usize) -> Dims {
        let cfg = &self.cfg;
        Dims { b, lt, li, h: cfg.num_heads, d: cfg.head_dim, c: cfg.hidden_size, mlp: cfg.mlp_hidden }
    }

    /// The adapters of `set` on this model's device, checked against its linears; with `train`,
    /// gradient buffers too.
    pub fn adapters(&self, set: &crate::adapters::AdapterSet, train: bool) -> Result<DevLora> {
        let g = CudaBackend::lock(&self.be)?;
        DevLora::from_set(&g, set, &|n| self.w.dims_of(n), train)
    }

    /// One set per sample of the following batches (inference; `DevLora::per_sample`).
    pub fn adapters_per_sample(&self, sets: &[crate::adapters::AdapterSet]) -> Result<DevLora> {
        let g = CudaBackend::lock(&self.be)?;
        DevLora::per_sample(&g, sets, &|n| self.w.dims_of(n))
    }

    /// Inputs to the device: bf16 copies for the linears, the timestep embeddings computed there,
    /// the RoPE tables of the joint sequence.
    pub fn upload_inputs(&self, inp: &FluxInputs) -> Result<DevInputs> {
        let cfg = &self.cfg;
        ensure!(inp.n_txt > 0, "the GPU model needs at least one text token");
        ensure!(inp.img.len() == inp.b * inp.n_img * cfg.in_channels, "img: wrong length");
        ensure!(inp.txt.len() == inp.b * inp.n_txt * cfg.context_in_dim, "txt: wrong length");
        let g = CudaBackend::lock(&self.be)?;
        let st = g.stream.clone();
        let emb = |t: &[f32]| -> Result<B16> {
            let (td, out) = (st.clone_htod(t)?, st.alloc_zeros::<f32>(t.len() * cfg.time_dim)?);
            g.embed.timestep_embedding(t.len(), cfg.time_dim, TIME_FACTOR, MAX_PERIOD, (&td).into(), (&out).into())?;
            let o16 = st.alloc_zeros::<bf16>(t.len() * cfg.time_dim)?;
            g.copy.cast_f32_to_bf16((&out).into(), (&o16).into(), t.len() * cfg.time_dim)?;
            Ok(o16)
        };
        let rope = joint_rope(cfg, inp);
        Ok(DevInputs {
            b: inp.b,
            n_img: inp.n_img,
            n_txt: inp.n_txt,
            img16: st.clone_htod(&to16(&inp.img))?,
            txt16: st.clone_htod(&to16(&inp.txt))?,
            y16: st.clone_htod(&to16(&inp.y))?,
            temb16: emb(&inp.timesteps)?,
            gemb16: match (&self.w.guidance_in, &inp.guidance) {
                (Some(_), Some(gv)) => Some(emb(gv)?),
                (Some(_), None) => bail!("this model has a guidance embedding: the inputs need `guidance`"),
                _ => None,
            },
            cos: st.clone_htod(&rope.cos)?,
            sin: st.clone_htod(&rope.sin)?,
        })
    }

    /// Velocity prediction [b, n_img, out_channels] on the device (f32).
    pub fn forward(&mut self, inp: &FluxInputs, lora: &DevLora) -> Result<F32> {
        let dinp = self.upload_inputs(inp)?;
        Ok(self.run_forward(dinp, lora, false)?.0)
    }

    /// The forward keeping what `backward` needs (activations, or block inputs when
    /// checkpointing).
    pub fn forward_train(&mut self, inp: &FluxInputs, lora: &DevLora) -> Result<(F32, FwdState)> {
        let dinp = self.upload_inputs(inp)?;
        let (y, s) = self.run_forward(dinp, lora, true)?;
        Ok((y, s.expect("kept")))
    }

    /// Runs `f` with the backend locked, the call context and the weights; keeps the memory peak.
    fn with_run<T>(&mut self, lora: &DevLora, f: impl FnOnce(&mut Run, &mut DevWeights) -> Result<T>) -> Result<T> {
        let be = self.be.clone();
        let mut guard = CudaBackend::lock(&be)?;
        let st = guard.stream.clone();
        let mut peak = self.peak_used;
        let block_memory = self.block_memory.as_mut();
        let offload = self.offload.as_mut();
        let mut r = Run { g: &mut guard, lora, st, poison: self.poison, peak: &mut peak, block_memory, offload };
        let out = f(&mut r, &mut self.w);
        self.peak_used = peak;
        out
    }

    fn run_forward(&mut self, inp: DevInputs, lora: &DevLora, keep: bool) -> Result<(F32, Option<FwdState>)> {
        let dm = self.dims(inp.b, inp.n_txt, inp.n_img);
        let ckpt = keep && self.checkpointing;
        self.with_run(lora, |r, w| forward_impl(r, w, inp, dm, keep, ckpt))
    }

    /// Backward from d(pred) (f32 on the device, [b, n_img, out_channels]) to the adapters'
    /// gradients, which accumulate into `lora`'s gradient buffers.
    pub fn backward(&mut self, s: FwdState, dpred: &F32, lora: &DevLora) -> Result<()> {
        self.backward_reporting(s, dpred, lora, &mut |_, _| Ok(()))
    }

    /// `backward`, telling `done` each time a part of the adapters' gradients is final (the
    /// data-parallel reduce starts its buckets from there: reduce.rs).
    pub fn backward_reporting(&mut self, s: FwdState, dpred: &F32, lora: &DevLora, done: OnGradsDone) -> Result<()> {
        let dm = self.dims(s.inp.b, s.inp.n_txt, s.inp.n_img);
        self.with_run(lora, |r, w| backward_impl(r, w, s, dpred, dm, done))
    }
    pub fn synchronize(&self) -> Result<()> {
        let g = CudaBackend::lock(&self.be)?;
        Ok(g.stream.synchronize()?)
    }

    /// A device f32 buffer to the host.
    pub fn download(&self, x: &F32, n: usize) -> Result<Vec<f32>> {
        let g = CudaBackend::lock(&self.be)?;
        let mut v = g.stream.clone_dtoh(x)?;
        v.truncate(n);
        Ok(v)
    }

    /// The default memory pool's high-water mark of bytes allocated (every buffer here comes
    /// from it through cuMemAllocAsync): the comparable of PyTorch's `max_memory_allocated`. The
    /// CUDA context and cuBLAS's workspace are outside it. None where the driver has no pools.
    pub fn pool_peak(&self) -> Option<usize> {
        let g = CudaBackend::lock(&self.be).ok()?;
        pool_attribute(&g.ctx, PoolAttr::High).filter(|&h| h > 0).map(|h| h as usize)
    }
}

/// The two memory-pool counters read here.
enum PoolAttr {
    UsedNow,
    High,
}

/// A counter of the device's default memory pool; None where the driver has no pools.
fn pool_attribute(ctx: &CudaContext, which: PoolAttr) -> Option<u64> {
    use cudarc::driver::sys::{cuDeviceGetDefaultMemPool, cuMemPoolGetAttribute, CUmemPool_attribute, CUresult};
    let attr = match which {
        PoolAttr::UsedNow => CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        PoolAttr::High => CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    };
    let mut pool = std::ptr::null_mut();
    let mut v: u64 = 0;
    // SAFETY: plain driver queries into locals; a failure (no pool support) is an error code.
    unsafe {
        if cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) != CUresult::CUDA_SUCCESS {
            return None;
        }
        if cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _) != CUresult::CUDA_SUCCESS {
            return None;
        }
    }
    Some(v)
}

/// `operands`, and for a linear with DoRA terms their rescale computed on the device (‖W‖² on
/// first use, then g and the row norms of each DoRA term, `GpuLora::dora_norms`) and given as
/// the GEMM's column scale.
fn prepared<'b>(
    g: &mut CudaBackend,
    lora: &'b DevLora,
    l: &'b DevLinear,
    s: &LinearShape,
    x16: View<'b, bf16>,
    idx: &[usize],
    bias: bool,
) -> Result<LinearViews<'b>> {
    let mut v = operands(lora, l, x16, idx, bias);
    let Some(d) = lora.dora_of(&l.name, idx) else { return Ok(v) };
    if !d.w_sumsq_ready.load(std::sync::atomic::Ordering::Relaxed) {
        g.lora.row_sumsq(l.weight(), l.d_out, l.d_in, (&d.w_sumsq).into())?;
        d.w_sumsq_ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    v.col_scale = Some((&d.g).into());
    for (j, &i) in idx.iter().enumerate() {
        if let Some(mag) = &lora.terms[i].magnitude {
            g.lora.dora_norms(s, &v, j, (&d.w_sumsq).into(), mag.into(), (&d.g).into(), (&d.norm).into())?;
        }
    }
    Ok(v)
}

/// The operands of `l` with input `x16` and the adapters `idx` of `lora` (the bias only with
/// `bias`: the backward has none).
fn operands<'b>(
    lora: &'b DevLora,
    l: &'b DevLinear,
    x16: View<'b, bf16>,
    idx: &[usize],
    bias: bool,
) -> LinearViews<'b> {
    LinearViews {
        x: x16,
        w: l.weight(),
        bias: if bias { l.bias.as_ref().map(View::from) } else { None },
        a: idx.iter().map(|&i| View::from(&lora.terms[i].a16)).collect(),
        b: idx.iter().map(|&i| View::from(&lora.terms[i].b16)).collect(),
        col_scale: None,
    }
}
