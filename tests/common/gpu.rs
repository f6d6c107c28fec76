//! Host-slice twins of the device kernels, for the GPU tests only: each uploads host slices,
//! poisons the outputs with NaN (whatever a kernel leaves unwritten shows), launches through the
//! library's typed wrappers, and downloads. The library itself has no host-slice kernel calls.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use flux_kernels::kernels::activation::GpuActivation;
use flux_kernels::kernels::attention::{
    AttnBuffers, AttnDims, BackwardStep, FwdVariant, GpuAttention, HeadsDims, QkGradViews, QkViews,
};
use flux_kernels::kernels::copy::GpuCopy;
use flux_kernels::kernels::embedding::GpuEmbedding;
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::kernels::launch::{DevMat, Elem, View};
use flux_kernels::kernels::lora::{GpuLora, LinearShape, Unfused};
use flux_kernels::kernels::norm::{GpuNorm, StepDims};
use flux_kernels::kernels::optim::GpuOptim;
use flux_kernels::kernels::random::{GpuRandom, RandomFill};
use flux_kernels::ops::lora::{LoraTerm, TermGrad};
use flux_kernels::ops::optim::AdamW;
use flux_kernels::quant::QWeight;
use half::bf16;
use std::sync::Arc;

/// Every kernel family on one device, with the stream to move data.
pub struct Twins {
    pub st: Arc<CudaStream>,
    pub attn: GpuAttention,
    pub norm: GpuNorm,
    pub act: GpuActivation,
    pub copy: GpuCopy,
    pub embed: GpuEmbedding,
    pub random: GpuRandom,
    pub optim: GpuOptim,
}

/// What `ln_modulate_host` returns: the normalised rows n (saved for the backward), mean and
/// rstd per row, and the modulated output.
pub struct LnModHost {
    pub n: Vec<f32>,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
    pub out: Vec<f32>,
}

/// Host slices of the QK prologue's inputs, shaped as in `QkViews`.
#[derive(Clone, Copy, Debug)]
pub struct QkHostInputs<'a> {
    /// f32; the prologue reads it rounded to bf16 when `qkv_bf16`
    pub qkv: &'a [f32],
    pub qkv_bf16: bool,
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

/// What a host-side attention forward + backward returns (all f32, [b, h, l, d] and [b, h, l]).
pub struct AttnHostResult {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

impl Twins {
    pub fn new(gpu: &Gpu) -> Result<Twins> {
        Ok(Twins {
            st: gpu.stream.clone(),
            attn: GpuAttention::new(gpu)?,
            norm: GpuNorm::new(gpu)?,
            act: GpuActivation::new(gpu)?,
            copy: GpuCopy::new(gpu)?,
            embed: GpuEmbedding::new(gpu)?,
            random: GpuRandom::new(gpu)?,
            optim: GpuOptim::new(gpu)?,
        })
    }

    /// A device copy of `host` (one NaN for an empty slice: no zero-size allocations).
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.poisoned(1);
        }
        Ok(self.st.clone_htod(host)?)
    }

    /// A device buffer of `n` NaNs.
    pub fn poisoned<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.st.clone_htod(&vec![T::NAN; n.max(1)])?)
    }

    pub fn download<T: Elem>(&self, s: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut v = self.st.clone_dtoh(s)?;
        v.truncate(n);
        Ok(v)
    }

    // ---- norm.cu ------------------------------------------------------------------------------

    /// `model::double_block::ln_modulate` (plus the mean).
    pub fn ln_modulate_host(
        &self,
        dims: StepDims,
        eps: f32,
        x: &[f32],
        shift: &[f32],
        scale: &[f32],
    ) -> Result<LnModHost> {
        let (numel, bc, rows) = (dims.numel(), dims.b * dims.c, dims.b * dims.l);
        ensure!(x.len() == numel && shift.len() == bc && scale.len() == bc, "ln_modulate_host: lengths for {dims:?}");
        let (xd, shd, scd) = (self.upload(x)?, self.upload(shift)?, self.upload(scale)?);
        let (out, n, mean, rstd) =
            (self.poisoned(numel)?, self.poisoned(numel)?, self.poisoned(rows)?, self.poisoned(rows)?);
        self.norm.ln_modulate(dims, eps, &xd, &shd, &scd, &out, &n, Some(&mean), &rstd)?;
        Ok(LnModHost {
            n: self.download(&n, numel)?,
            mean: self.download(&mean, rows)?,
            rstd: self.download(&rstd, rows)?,
            out: self.download(&out, numel)?,
        })
    }

    /// `model::double_block::ln_modulate_backward`: (dx, dshift, dscale).
    /// `ln_modulate` keeping n and out in bf16: (n, out, rstd), then `modulate` from that n
    /// (which must give out's bits again).
    #[allow(clippy::type_complexity)]
    pub fn ln_modulate16_host(
        &self,
        dims: StepDims,
        eps: f32,
        x: &[f32],
        shift: &[f32],
        scale: &[f32],
    ) -> Result<(Vec<bf16>, Vec<bf16>, Vec<f32>, Vec<bf16>)> {
        let (numel, rows) = (dims.numel(), dims.b * dims.l);
        let (xd, shd, scd) = (self.upload(x)?, self.upload(shift)?, self.upload(scale)?);
        let (out, n, rstd) = (self.poisoned::<bf16>(numel)?, self.poisoned::<bf16>(numel)?, self.poisoned(rows)?);
        self.norm.ln_modulate(dims, eps, &xd, &shd, &scd, &out, &n, None, &rstd)?;
        let again = self.poisoned::<bf16>(numel)?;
        self.norm.modulate(dims, &n, &shd, &scd, &again)?;
        Ok((
            self.download(&n, numel)?,
            self.download(&out, numel)?,
            self.download(&rstd, rows)?,
            self.download(&again, numel)?,
        ))
    }

    pub fn ln_modulate_backward_host<N: Elem>(
        &self,
        dims: StepDims,
        n: &[N],
        rstd: &[f32],
        dout: &[f32],
        scale: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (numel, bc) = (dims.numel(), dims.b * dims.c);
        let (nd, rd, dod, scd) = (self.upload(n)?, self.upload(rstd)?, self.upload(dout)?, self.upload(scale)?);
        let (dx, dsh, dsc) = (self.poisoned(numel)?, self.poisoned(bc)?, self.poisoned(bc)?);
        let scratch = self.poisoned(GpuNorm::ln_modulate_scratch(dims))?;
        self.norm.ln_modulate_backward(dims, &dod, &nd, &rd, &scd, &dx, &dsh, &dsc, &scratch)?;
        Ok((self.download(&dx, numel)?, self.download(&dsh, bc)?, self.download(&dsc, bc)?))
    }

    /// `ops::modulation::gated_residual_forward` (returns the new x).
    pub fn gated_residual_host<Y: Elem>(&self, dims: StepDims, x: &[f32], y: &[Y], gate: &[f32]) -> Result<Vec<f32>> {
        let numel = dims.numel();
        let (xd, yd, gd, out) = (self.upload(x)?, self.upload(y)?, self.upload(gate)?, self.poisoned(numel)?);
        self.norm.gated_residual(dims, &xd, &yd, &gd, &out)?;
        self.download(&out, numel)
    }

    /// `ops::modulation::gated_residual_backward` plus x's pass-through: (dx, dy, dgate), dy
    /// written as `D`.
    #[allow(clippy::type_complexity)]
    pub fn gated_residual_backward_host<Y: Elem, D: Elem>(
        &self,
        dims: StepDims,
        dout: &[f32],
        y: &[Y],
        gate: &[f32],
    ) -> Result<(Vec<f32>, Vec<D>, Vec<f32>)> {
        let (numel, bc) = (dims.numel(), dims.b * dims.c);
        let (dod, yd, gd) = (self.upload(dout)?, self.upload(y)?, self.upload(gate)?);
        let (dx, dy, dg) = (self.poisoned(numel)?, self.poisoned::<D>(numel)?, self.poisoned(bc)?);
        let scratch = self.poisoned(GpuNorm::gated_residual_scratch(dims))?;
        self.norm.gated_residual_backward(dims, &dod, &yd, &gd, Some(&dx), &dy, &dg, &scratch)?;
        Ok((self.download(&dx, numel)?, self.download(&dy, numel)?, self.download(&dg, bc)?))
    }

    // ---- activation.cu ------------------------------------------------------------------------

    /// `ops::activation::silu_forward`.
    pub fn silu_host(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (xd, out) = (self.upload(x)?, self.poisoned(x.len())?);
        self.act.silu(x.len(), &xd, &out)?;
        self.download(&out, x.len())
    }

    /// `ops::activation::silu_backward`.
    pub fn silu_backward_host(&self, x: &[f32], dout: &[f32]) -> Result<Vec<f32>> {
        let (xd, dd, out) = (self.upload(x)?, self.upload(dout)?, self.poisoned(x.len())?);
        self.act.silu_backward(x.len(), &xd, &dd, &out)?;
        self.download(&out, x.len())
    }

    /// `gelu_tanh` on a window: x [rows, ld_x] → out [rows, ld_out], NaN outside the window.
    pub fn gelu_tanh_host<T: Elem>(
        &self,
        rows: usize,
        cols: usize,
        x: &[f32],
        ld_x: usize,
        ld_out: usize,
    ) -> Result<Vec<T>> {
        let (xd, out) = (self.upload(x)?, self.poisoned::<T>(rows * ld_out)?);
        self.act.gelu_tanh(rows, cols, DevMat::f32(&xd, ld_x), DevMat::of(&out, ld_out))?;
        self.download(&out, rows * ld_out)
    }

    /// `gelu_tanh` and `gelu_tanh_backward` over contiguous bf16 x, both outputs bf16.
    pub fn gelu_tanh16_host(&self, x: &[bf16], dy: &[f32]) -> Result<(Vec<bf16>, Vec<bf16>)> {
        let n = x.len();
        let (xd, dyd) = (self.upload(x)?, self.upload(dy)?);
        let (out, dx) = (self.poisoned::<bf16>(n)?, self.poisoned::<bf16>(n)?);
        self.act.gelu_tanh(1, n, DevMat::bf16(&xd, n), DevMat::bf16(&out, n))?;
        self.act.gelu_tanh_backward(1, n, DevMat::bf16(&xd, n), DevMat::f32(&dyd, n), DevMat::bf16(&dx, n))?;
        Ok((self.download(&out, n)?, self.download(&dx, n)?))
    }

    /// `gelu_tanh_backward` on a window: dx [rows, ld_dx], NaN outside the window.
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
        let (xd, dyd, dx) = (self.upload(x)?, self.upload(dy)?, self.poisoned::<f32>(rows * ld_dx)?);
        self.act.gelu_tanh_backward(
            rows,
            cols,
            DevMat::f32(&xd, ld_x),
            DevMat::f32(&dyd, ld_dy),
            DevMat::f32(&dx, ld_dx),
        )?;
        self.download(&dx, rows * ld_dx)
    }

    /// `ops::activation::gelu_tanh_backward` over contiguous values.
    pub fn gelu_tanh_backward_flat(&self, x: &[f32], dout: &[f32]) -> Result<Vec<f32>> {
        let n = x.len();
        self.gelu_tanh_backward_host(1, n, x, n, dout, n, n)
    }

    // ---- optim.cu -----------------------------------------------------------------------------

    /// `ops::loss::mse_forward` and `mse_backward`: (loss, dpred).
    pub fn mse_host(&self, pred: &[f32], target: &[f32], weight: Option<&[f32]>) -> Result<(f64, Vec<f32>)> {
        let n = pred.len();
        let (pd, td, grad) = (self.upload(pred)?, self.upload(target)?, self.poisoned::<f32>(n)?);
        let wd = weight.map(|w| self.upload(w)).transpose()?;
        let loss = self.st.clone_htod(&[f64::NAN])?;
        let scratch = self.st.clone_htod(&vec![f64::NAN; GpuOptim::mse_scratch(n)])?;
        self.optim.mse(n, &pd, &td, wd.as_ref().zip(weight.map(|w| w.len())), &grad, &loss, &scratch)?;
        let sum = self.st.clone_dtoh(&loss)?[0];
        Ok((sum / n as f64, self.download(&grad, n)?))
    }

    /// `AdamW::step` (with `clip_grad_norm`'s factor as `grad_scale`): uploads parameters,
    /// gradients and moments, steps on the device, writes them back and advances `opt.t`.
    pub fn adamw_step_host(
        &self,
        opt: &mut AdamW,
        params: &mut [&mut Vec<f32>],
        grads: &[&[f32]],
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        ensure!(params.len() == grads.len() && params.len() == opt.m.len(), "adamw_step_host: list lengths");
        // A one-element buffer stands in for an empty tensor (no zero-size allocations); it is
        // stepped on zeros and dropped.
        let up = |v: &[f32]| -> Result<CudaSlice<f32>> { self.upload(if v.is_empty() { &[0.0] } else { v }) };
        let (mut pd, mut gd, mut md, mut vd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..params.len() {
            pd.push(up(params[i])?);
            gd.push(up(grads[i])?);
            md.push(up(&opt.m[i])?);
            vd.push(up(&opt.v[i])?);
        }
        let t = opt.t + 1;
        let ps: Vec<&CudaSlice<f32>> = pd.iter().collect();
        let gs: Vec<&CudaSlice<f32>> = gd.iter().collect();
        let ms: Vec<&CudaSlice<f32>> = md.iter().collect();
        let vs: Vec<&CudaSlice<f32>> = vd.iter().collect();
        self.optim.adamw_step(opt, t, lr, grad_scale, &ps, &gs, &ms, &vs)?;
        for i in 0..params.len() {
            let n = params[i].len();
            *params[i] = self.download(&pd[i], n)?;
            opt.m[i] = self.download(&md[i], n)?;
            opt.v[i] = self.download(&vd[i], n)?;
        }
        opt.t = t;
        Ok(())
    }

    /// The global gradient norm (`clip_grad_norm`'s return value).
    pub fn grad_norm_host(&self, grads: &[&[f32]]) -> Result<f64> {
        let gd: Vec<CudaSlice<f32>> =
            grads.iter().filter(|g| !g.is_empty()).map(|g| self.upload(g)).collect::<Result<_>>()?;
        let gs: Vec<&CudaSlice<f32>> = gd.iter().collect();
        self.optim.grad_norm(&gs)
    }

    // ---- copy.cu ------------------------------------------------------------------------------

    /// A cast between any two element types (f32 → bf16 rounds to nearest even).
    pub fn cast_host<S: Elem, D: Elem>(&self, src: &[S]) -> Result<Vec<D>> {
        let n = src.len();
        let (s, d) = (self.upload(src)?, self.poisoned::<D>(n)?);
        self.copy.copy2d(1, n, DevMat::of(&s, n), DevMat::of(&d, n), false)?;
        self.download(&d, n)
    }

    /// `copy2d`: `src` [rows, ld_src], `dst` [rows, ld_dst] the destination's content before the
    /// launch (NaN to see what is written; values to accumulate onto); returns it after.
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
        let (s, d) = (self.upload(src)?, self.upload(dst)?);
        self.copy.copy2d(rows, cols, DevMat::of(&s, ld_src), DevMat::of(&d, ld_dst), accumulate)?;
        self.download(&d, dst.len())
    }

    // ---- attention.cu: the QK prologue and the head merge --------------------------------------

    fn qk_upload(&self, dims: HeadsDims, inp: &QkHostInputs) -> Result<[CudaSlice<f32>; 5]> {
        let tab = dims.b * dims.l * dims.d / 2;
        ensure!(
            inp.qkv.len() == dims.tokens_numel()
                && inp.q_scale.len() == dims.d
                && inp.k_scale.len() == dims.d
                && inp.cos.len() == tab
                && inp.sin.len() == tab,
            "qk inputs: lengths for {dims:?}"
        );
        Ok([
            self.upload(inp.qkv)?,
            self.upload(inp.q_scale)?,
            self.upload(inp.k_scale)?,
            self.upload(inp.cos)?,
            self.upload(inp.sin)?,
        ])
    }

    /// `qk_prologue`; outputs start as NaN.
    pub fn qk_prologue_host(&self, dims: HeadsDims, inp: &QkHostInputs, eps: f32) -> Result<QkHost> {
        let b = self.qk_upload(dims, inp)?;
        let q16 = self.upload(&inp.qkv.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())?;
        let qkv = if inp.qkv_bf16 { DevMat::bf16(&q16, dims.ld) } else { DevMat::f32(&b[0], dims.ld) };
        let (nh, nr) = (dims.heads_numel(), dims.rows_numel());
        let (q, k, v) = (self.poisoned::<bf16>(nh)?, self.poisoned::<bf16>(nh)?, self.poisoned::<bf16>(nh)?);
        let (rq, rk) = (self.poisoned::<f32>(nr)?, self.poisoned::<f32>(nr)?);
        let t = QkViews {
            qkv,
            q_scale: (&b[1]).into(),
            k_scale: (&b[2]).into(),
            cos: (&b[3]).into(),
            sin: (&b[4]).into(),
            q: (&q).into(),
            k: (&k).into(),
            v: (&v).into(),
            rstd_q: (&rq).into(),
            rstd_k: (&rk).into(),
        };
        self.attn.qk_prologue(dims, &t, eps)?;
        Ok(QkHost {
            q: self.download(&q, nh)?,
            k: self.download(&k, nh)?,
            v: self.download(&v, nh)?,
            rstd_q: self.download(&rq, nr)?,
            rstd_k: self.download(&rk, nr)?,
        })
    }

    /// `qk_prologue_backward`: dqkv [b·ls, ld] written as `D`, NaN outside columns [0, 3hd).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_prologue_backward_host<D: Elem>(
        &self,
        dims: HeadsDims,
        inp: &QkHostInputs,
        eps: f32,
        rstd_q: &[f32],
        rstd_k: &[f32],
        dq: &[bf16],
        dk: &[bf16],
        dv: &[bf16],
    ) -> Result<Vec<D>> {
        let (nh, nr) = (dims.heads_numel(), dims.rows_numel());
        ensure!(
            rstd_q.len() == nr && rstd_k.len() == nr && dq.len() == nh && dk.len() == nh && dv.len() == nh,
            "qk_prologue_backward_host: lengths for {dims:?}"
        );
        let b = self.qk_upload(dims, inp)?;
        let q16 = self.upload(&inp.qkv.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())?;
        let qkv = if inp.qkv_bf16 { DevMat::bf16(&q16, dims.ld) } else { DevMat::f32(&b[0], dims.ld) };
        let (rq, rk) = (self.upload(rstd_q)?, self.upload(rstd_k)?);
        let (dqd, dkd, dvd) = (self.upload(dq)?, self.upload(dk)?, self.upload(dv)?);
        let out = self.poisoned::<D>(dims.tokens_numel())?;
        // q, k, v are not read by the backward: any bf16 buffers of the right size do.
        let t = QkViews {
            qkv,
            q_scale: (&b[1]).into(),
            k_scale: (&b[2]).into(),
            cos: (&b[3]).into(),
            sin: (&b[4]).into(),
            q: (&dqd).into(),
            k: (&dkd).into(),
            v: (&dvd).into(),
            rstd_q: (&rq).into(),
            rstd_k: (&rk).into(),
        };
        let g =
            QkGradViews { dq: (&dqd).into(), dk: (&dkd).into(), dv: (&dvd).into(), dqkv: DevMat::of(&out, dims.ld) };
        self.attn.qk_prologue_backward(dims, &t, eps, &g)?;
        self.download(&out, dims.tokens_numel())
    }

    /// `merge_heads`: o [b, h, l, d] → [b·ls, ld], NaN outside columns [0, hd).
    pub fn merge_heads_host(&self, dims: HeadsDims, o: &[bf16]) -> Result<Vec<bf16>> {
        let (od, out) = (self.upload(o)?, self.poisoned::<bf16>(dims.tokens_numel())?);
        self.attn.merge_heads(dims, (&od).into(), (&out).into())?;
        self.download(&out, dims.tokens_numel())
    }

    /// `merge_heads_backward`: dout [b·ls, ld] → dO [b, h, l, d], NaN outside tokens t0..t0 + ls.
    pub fn merge_heads_backward_host(&self, dims: HeadsDims, dout: &[f32]) -> Result<Vec<bf16>> {
        let (dd, d_o) = (self.upload(dout)?, self.poisoned::<bf16>(dims.heads_numel())?);
        self.attn.merge_heads_backward(dims, (&dd).into(), (&d_o).into())?;
        self.download(&d_o, dims.heads_numel())
    }

    // ---- embedding.cu and random.cu -----------------------------------------------------------

    /// `timestep_embedding`: [t.len(), dim].
    pub fn timestep_embedding_host(
        &self,
        t: &[f32],
        dim: usize,
        time_factor: f32,
        max_period: f32,
    ) -> Result<Vec<f32>> {
        let n = t.len() * dim;
        let (td, out) = (self.upload(t)?, self.poisoned::<f32>(n)?);
        self.embed.timestep_embedding(t.len(), dim, time_factor, max_period, (&td).into(), (&out).into())?;
        self.download(&out, n)
    }

    /// Elements offset..offset + n of the random tensor `p`.
    pub fn fill_random_host<T: Elem>(&self, p: &RandomFill, offset: usize, n: usize) -> Result<Vec<T>> {
        let out = self.poisoned::<T>(n)?;
        self.random.fill(p, View::from(&out).slice(0..n)?, offset)?;
        self.download(&out, n)
    }
}

// ---- attention.cu: the flash kernels -----------------------------------------------------------

/// Host-slice forward and backward, the twin of `ops::attention::attention_forward_masked`
/// followed by `attention_backward_masked` (the outputs are poisoned first).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_backward(
    attn: &GpuAttention,
    variant: FwdVariant,
    dims: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    mask: Option<&[u8]>,
) -> Result<AttnHostResult> {
    attention_forward_backward_steps(attn, variant, None, dims, q, k, v, dout, mask)
}

/// The same with the backward's launches named (`None`: the ones `GpuAttention::backward` picks).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_backward_steps(
    attn: &GpuAttention,
    variant: FwdVariant,
    steps: Option<[BackwardStep; 3]>,
    dims: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    mask: Option<&[u8]>,
) -> Result<AttnHostResult> {
    let mut bufs = attention_inputs(attn, dims, mask, q, k, v)?;
    attn.upload(&mut bufs.dout, dout)?;
    attn.poison(&mut bufs)?;
    attn.forward_variant(&bufs, variant)?;
    match steps {
        None => attn.backward(&bufs)?,
        Some(steps) => {
            for s in steps {
                attn.backward_step(&bufs, s)?;
            }
        }
    }
    Ok(AttnHostResult {
        o: attn.download(&bufs.o)?,
        lse: attn.download_f32(&bufs.lse)?,
        dq: attn.download(&bufs.dq)?,
        dk: attn.download(&bufs.dk)?,
        dv: attn.download(&bufs.dv)?,
    })
}

/// Host-slice materialised-softmax baseline forward (O only).
pub fn attention_forward_naive(
    attn: &GpuAttention,
    dims: AttnDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[u8]>,
) -> Result<Vec<f32>> {
    let mut bufs = attention_inputs(attn, dims, mask, q, k, v)?;
    attn.poison(&mut bufs)?;
    attn.forward_naive(&mut bufs)?;
    attn.download(&bufs.o)
}

fn attention_inputs(
    attn: &GpuAttention,
    dims: AttnDims,
    mask: Option<&[u8]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<AttnBuffers> {
    let mut bufs = attn.alloc(dims, mask)?;
    attn.upload(&mut bufs.q, q)?;
    attn.upload(&mut bufs.k, k)?;
    attn.upload(&mut bufs.v, v)?;
    Ok(bufs)
}

// ---- lora_gemm.cu: the LoRA linear on host slices ------------------------------------------------

/// The frozen weight of a host-slice call: f32 values (uploaded as bf16) or 8-bit codes.
#[derive(Clone, Copy)]
pub enum BaseWeight<'a> {
    F32(&'a [f32]),
    Q(&'a QWeight<'a>),
}

/// `ops::lora::lora_linear_forward` (or, with an 8-bit `w`, `quant::qlinear_forward` plus
/// `lora_terms_forward`) through `GpuLora`'s arena: upload, poison the outputs when poisoning is
/// on, run the fused kernels, download.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    g: &mut GpuLora,
    out: &mut [f32],
    inp: &[f32],
    w: BaseWeight,
    bias: Option<&[f32]>,
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let s = LinearShape::new(m, k, n, bias.is_some(), terms)?;
    ensure!(out.len() == m * n, "lora gpu: out has the wrong length");
    upload_weight(g, &s, inp, w, bias)?;
    g.upload_terms(&s, terms)?;
    g.poison_outputs(&s)?;
    g.run_forward(&s)?;
    out.copy_from_slice(&g.download_y(&s)?);
    Ok(())
}

/// `ops::lora::lora_linear_backward` (8-bit `w`: dX through the dequantised codes): dA, dB
/// accumulate into `grads`, dX is overwritten when given.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    g: &mut GpuLora,
    dinp: Option<&mut [f32]>,
    grads: &mut [TermGrad],
    dout: &[f32],
    inp: &[f32],
    w: BaseWeight,
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let s = LinearShape::new(m, k, n, false, terms)?;
    ensure!(grads.len() == terms.len(), "lora gpu: one TermGrad per term");
    upload_weight(g, &s, inp, w, None)?;
    g.upload_terms(&s, terms)?;
    g.upload_dout(&s, dout)?;
    g.upload_grads(&s, Some(grads))?;
    g.poison_outputs(&s)?;
    g.run_backward(&s, dinp.is_some(), false)?;
    if let Some(dx) = dinp {
        ensure!(dx.len() == m * k, "lora gpu: dinp has the wrong length");
        dx.copy_from_slice(&g.download_dx(&s)?);
    }
    for (t, d) in grads.iter_mut().zip(g.download_grads(&s)?) {
        *t = d;
    }
    Ok(())
}

fn upload_weight(g: &mut GpuLora, s: &LinearShape, inp: &[f32], w: BaseWeight, bias: Option<&[f32]>) -> Result<()> {
    match w {
        BaseWeight::F32(w) => g.upload_base(s, inp, w, bias),
        BaseWeight::Q(w) => g.upload_base_q(s, inp, w, bias),
    }
}

/// `lora_linear_forward` through an unfused baseline (no bias, no dropout).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_unfused(
    g: &mut GpuLora,
    style: Unfused,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let s = LinearShape::new(m, k, n, false, terms)?;
    g.upload(&s, inp, w, None, terms)?;
    g.poison_outputs(&s)?;
    g.run_forward_unfused(&s, style)?;
    out.copy_from_slice(&g.download_y(&s)?);
    Ok(())
}

/// `lora_linear_backward` through an unfused baseline (forward included, for its saved S).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_unfused(
    g: &mut GpuLora,
    style: Unfused,
    dinp: &mut [f32],
    grads: &mut [TermGrad],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    terms: &[LoraTerm],
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let s = LinearShape::new(m, k, n, false, terms)?;
    g.upload(&s, inp, w, None, terms)?;
    g.upload_dout(&s, dout)?;
    g.upload_grads(&s, Some(grads))?;
    g.poison_outputs(&s)?;
    g.run_forward_unfused(&s, style)?;
    g.run_backward_unfused(&s, style, true)?;
    dinp.copy_from_slice(&g.download_dx(&s)?);
    for (t, d) in grads.iter_mut().zip(g.download_grads(&s)?) {
        *t = d;
    }
    Ok(())
}
