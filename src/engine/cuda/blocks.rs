//! The double- and single-stream blocks on the device, forward and backward, op for op as
//! `model::double_block` and `model::single_block` (the CPU reference).

use super::weights::{DevDouble, DevLinear, DevSingle, DevStream};
use super::{Dims, Run, B16, F32};
use crate::kernels::attention::{AttnGradViews, AttnViews, HeadsDims, QkGradViews, QkViews};
use crate::kernels::launch::{DevMat, View};
use crate::model::attention::QK_NORM_EPS;
use anyhow::Result;

/// Shared by every block of a call: shapes, SiLU(vec) in bf16, the RoPE tables.
pub(crate) struct Ctx<'a> {
    pub dm: Dims,
    pub svec16: &'a B16,
    pub cos: &'a F32,
    pub sin: &'a F32,
}

/// LayerNorm + modulation's saved tensors: normalised rows, rstd, the bf16 output (a linear's
/// input).
pub(crate) struct LnSaved {
    pub n: F32,
    pub rstd: F32,
    pub out16: B16,
}

/// The attention core's tensors over the joint sequence.
pub(crate) struct AttnAct {
    q: B16,
    k: B16,
    v: B16,
    o: B16,
    lse: F32,
    rq: F32,
    rk: F32,
}

pub(crate) struct StreamAct {
    /// [shift1, scale1, gate1, shift2, scale2, gate2], each [b, c]
    mods: Vec<F32>,
    ln1: LnSaved,
    /// qkv output f32 [b·l, 3c] (the QK prologue's input, read again by its backward)
    qkv: F32,
    /// merged attention output (proj input) bf16, proj output f32
    a16: B16,
    p: F32,
    ln2: LnSaved,
    /// mlp.0 output f32, GELU of it bf16 (mlp.2 input), mlp.2 output f32
    h0: F32,
    act16: B16,
    mlp_out: F32,
}

pub(crate) struct DoubleAct {
    img: StreamAct,
    txt: StreamAct,
    attn: AttnAct,
}

pub(crate) struct SingleAct {
    /// [shift, scale, gate]
    mods: Vec<F32>,
    ln: LnSaved,
    /// linear1 output f32 [b·l, 3c + mlp]; linear2 input bf16 [b·l, c + mlp]; linear2 output f32
    h1: F32,
    cat16: B16,
    out: F32,
    attn: AttnAct,
}

/// x [b, l, c] = cat(txt, img) along the sequence, per sample.
pub(crate) fn join(r: &Run, txt: &F32, img: &F32, x: &F32, dm: Dims) -> Result<()> {
    let (b, lt, li, c) = (dm.b, dm.lt, dm.li, dm.c);
    let l = lt + li;
    let (x, txt, img) = (View::from(x), View::from(txt), View::from(img));
    for bi in 0..b {
        let to = x.tail(bi * l * c)?;
        r.g.copy.copy2d(lt, c, DevMat::f32(txt.tail(bi * lt * c)?, c), DevMat::f32(to, c), false)?;
        let io = to.tail(lt * c)?;
        r.g.copy.copy2d(li, c, DevMat::f32(img.tail(bi * li * c)?, c), DevMat::f32(io, c), false)?;
    }
    Ok(())
}

/// The inverse of `join` (either part may be skipped).
pub(crate) fn split(r: &Run, x: &F32, txt: Option<&F32>, img: Option<&F32>, dm: Dims) -> Result<()> {
    let (b, lt, li, c) = (dm.b, dm.lt, dm.li, dm.c);
    let l = lt + li;
    for bi in 0..b {
        let from = View::from(x).tail(bi * l * c)?;
        if let Some(t) = txt {
            r.g.copy.copy2d(lt, c, DevMat::f32(from, c), DevMat::f32(View::from(t).tail(bi * lt * c)?, c), false)?;
        }
        if let Some(i) = img {
            let src = DevMat::f32(from.tail(lt * c)?, c);
            r.g.copy.copy2d(li, c, src, DevMat::f32(View::from(i).tail(bi * li * c)?, c), false)?;
        }
    }
    Ok(())
}

/// Backward of a modulation linear (input SiLU(vec)): d SiLU(vec) is added into `dsvec`.
pub(crate) fn modulation_bwd(r: &mut Run, lin: &DevLinear, dmods: &[F32], bx: &Ctx, dsvec: &F32) -> Result<()> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let dm16 = r.join16(dmods, b, c)?;
    let d = r.f32(b * c)?;
    r.lin_bwd(lin, b, bx.svec16.into(), View::from(&dm16), Some(&d))?;
    r.acc(dsvec, &d, b * c)
}

fn attn_alloc(r: &Run, dm: Dims) -> Result<AttnAct> {
    let (n, rows) = (dm.attn().numel(), dm.attn().rows());
    Ok(AttnAct {
        q: r.b16(n)?,
        k: r.b16(n)?,
        v: r.b16(n)?,
        o: r.b16(n)?,
        lse: r.f32(rows)?,
        rq: r.f32(rows)?,
        rk: r.f32(rows)?,
    })
}

fn heads(dm: Dims, ls: usize, t0: usize, ld: usize) -> HeadsDims {
    HeadsDims { b: dm.b, h: dm.h, d: dm.d, l: dm.l(), ls, t0, ld }
}

fn qk_views<'a>(a: &'a AttnAct, qkv: &'a F32, qn: &'a F32, kn: &'a F32, bx: &Ctx<'a>) -> QkViews<'a> {
    QkViews {
        qkv: qkv.into(),
        q_scale: qn.into(),
        k_scale: kn.into(),
        cos: bx.cos.into(),
        sin: bx.sin.into(),
        q: (&a.q).into(),
        k: (&a.k).into(),
        v: (&a.v).into(),
        rstd_q: (&a.rq).into(),
        rstd_k: (&a.rk).into(),
    }
}

fn attn_views(a: &AttnAct) -> AttnViews<'_> {
    AttnViews { q: (&a.q).into(), k: (&a.k).into(), v: (&a.v).into(), o: (&a.o).into(), lse: (&a.lse).into() }
}

/// dq, dk, dv from dO (bf16 [b, h, l, d]).
fn attn_bwd(r: &Run, a: &AttnAct, d_o: &B16, dm: Dims) -> Result<(B16, B16, B16)> {
    let (n, rows) = (dm.attn().numel(), dm.attn().rows());
    let (dq, dk, dv, delta) = (r.b16(n)?, r.b16(n)?, r.b16(n)?, r.f32(rows)?);
    let g = AttnGradViews {
        dout: d_o.into(),
        dq: (&dq).into(),
        dk: (&dk).into(),
        dv: (&dv).into(),
        delta: (&delta).into(),
    };
    r.g.attn.backward_dev(dm.attn(), &attn_views(a), &g)?;
    Ok((dq, dk, dv))
}

/// A stream's first half: modulation vectors, LN + modulate, qkv projection.
fn stream_first(r: &mut Run, s: &DevStream, x: &F32, ls: usize, bx: &Ctx) -> Result<(Vec<F32>, LnSaved, F32)> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let mods_all = r.lin(&s.modulation, b, bx.svec16.into())?;
    let mods = r.chunks(&mods_all, b, 6, c)?;
    let ln1 = r.ln_mod(x, &mods[0], &mods[1], b, ls, c)?;
    let qkv = r.lin(&s.qkv, b * ls, View::from(&ln1.out16))?;
    Ok((mods, ln1, qkv))
}

/// A stream's second half: gated projection residual, LN + modulate, MLP, gated residual.
fn stream_second(
    r: &mut Run,
    s: &DevStream,
    x: &F32,
    a16: B16,
    first: (Vec<F32>, LnSaved, F32),
    ls: usize,
    bx: &Ctx,
) -> Result<StreamAct> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let m = b * ls;
    let (mods, ln1, qkv) = first;
    let p = r.lin(&s.proj, m, View::from(&a16))?;
    r.gated(x, &p, &mods[2], b, ls, c)?;
    let ln2 = r.ln_mod(x, &mods[3], &mods[4], b, ls, c)?;
    let h0 = r.lin(&s.mlp0, m, View::from(&ln2.out16))?;
    let hid = s.mlp0.d_out;
    let act16 = r.b16(m * hid)?;
    r.g.act.gelu_tanh(m, hid, DevMat::f32(&h0, hid), DevMat::bf16(&act16, hid))?;
    let mlp_out = r.lin(&s.mlp2, m, View::from(&act16))?;
    r.gated(x, &mlp_out, &mods[5], b, ls, c)?;
    Ok(StreamAct { mods, ln1, qkv, a16, p, ln2, h0, act16, mlp_out })
}

/// Updates img [b, li, c] and txt [b, lt, c] in place; the activations when `keep`.
pub(crate) fn double_fwd(
    r: &mut Run,
    w: &DevDouble,
    img: &F32,
    txt: &F32,
    bx: &Ctx,
    keep: bool,
) -> Result<Option<DoubleAct>> {
    let dm = bx.dm;
    let (b, lt, li, c) = (dm.b, dm.lt, dm.li, dm.c);
    let fi = stream_first(r, &w.img, img, li, bx)?;
    let ft = stream_first(r, &w.txt, txt, lt, bx)?;
    let a = attn_alloc(r, dm)?;
    // Joint sequence, text first.
    r.g.attn.qk_prologue(
        heads(dm, lt, 0, 3 * c),
        &qk_views(&a, &ft.2, &w.txt.q_norm, &w.txt.k_norm, bx),
        QK_NORM_EPS,
    )?;
    r.g.attn.qk_prologue(
        heads(dm, li, lt, 3 * c),
        &qk_views(&a, &fi.2, &w.img.q_norm, &w.img.k_norm, bx),
        QK_NORM_EPS,
    )?;
    r.g.attn.forward_dev(dm.attn(), &attn_views(&a))?;
    let (ta16, ia16) = (r.b16(b * lt * c)?, r.b16(b * li * c)?);
    r.g.attn.merge_heads(heads(dm, lt, 0, c), View::from(&a.o), View::from(&ta16))?;
    r.g.attn.merge_heads(heads(dm, li, lt, c), View::from(&a.o), View::from(&ia16))?;
    let img_a = stream_second(r, &w.img, img, ia16, fi, li, bx)?;
    let txt_a = stream_second(r, &w.txt, txt, ta16, ft, lt, bx)?;
    Ok(keep.then_some(DoubleAct { img: img_a, txt: txt_a, attn: a }))
}

/// Backward of `stream_second`: `dx` holds d(stream output) on entry and d(after the attention
/// residual) on exit; returns d(merged attention output) f32 and the six d mods (0 and 1 are
/// written by `stream_first_bwd`).
fn stream_second_bwd(
    r: &mut Run,
    s: &DevStream,
    a: &StreamAct,
    dx: &F32,
    ls: usize,
    bx: &Ctx,
) -> Result<(Vec<F32>, F32)> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let m = b * ls;
    let hid = s.mlp0.d_out;
    let dmods: Vec<F32> = (0..6).map(|_| r.f32(b * c)).collect::<Result<_>>()?;
    let dmlp = r.gated_bwd(dx, &a.mlp_out, &a.mods[5], &dmods[5], b, ls, c)?;
    let dmlp16 = r.cast16(&dmlp, m * c)?;
    drop(dmlp);
    let dact = r.f32(m * hid)?;
    r.lin_bwd(&s.mlp2, m, View::from(&a.act16), View::from(&dmlp16), Some(&dact))?;
    let dh0 = r.f32(m * hid)?;
    r.g.act.gelu_tanh_backward(m, hid, DevMat::f32(&a.h0, hid), DevMat::f32(&dact, hid), DevMat::f32(&dh0, hid))?;
    drop(dact);
    let dh016 = r.cast16(&dh0, m * hid)?;
    drop(dh0);
    let dxm2 = r.f32(m * c)?;
    r.lin_bwd(&s.mlp0, m, View::from(&a.ln2.out16), View::from(&dh016), Some(&dxm2))?;
    r.ln_mod_bwd(&a.ln2, &dxm2, &a.mods[4], dx, &dmods[3], &dmods[4], b, ls, c)?;
    let dp = r.gated_bwd(dx, &a.p, &a.mods[2], &dmods[2], b, ls, c)?;
    let dp16 = r.cast16(&dp, m * c)?;
    let da = r.f32(m * c)?;
    r.lin_bwd(&s.proj, m, View::from(&a.a16), View::from(&dp16), Some(&da))?;
    Ok((dmods, da))
}

/// Backward of `stream_first` from d qkv (f32 [b·ls, 3c]): adds into `dx`, d SiLU(vec) into
/// `dsvec`.
#[allow(clippy::too_many_arguments)]
fn stream_first_bwd(
    r: &mut Run,
    s: &DevStream,
    a: &StreamAct,
    dqkv: &F32,
    dx: &F32,
    dmods: Vec<F32>,
    ls: usize,
    bx: &Ctx,
    dsvec: &F32,
) -> Result<()> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let m = b * ls;
    let dqkv16 = r.cast16(dqkv, m * 3 * c)?;
    let dxm1 = r.f32(m * c)?;
    r.lin_bwd(&s.qkv, m, View::from(&a.ln1.out16), View::from(&dqkv16), Some(&dxm1))?;
    r.ln_mod_bwd(&a.ln1, &dxm1, &a.mods[1], dx, &dmods[0], &dmods[1], b, ls, c)?;
    modulation_bwd(r, &s.modulation, &dmods, bx, dsvec)
}

/// Backward of `double_fwd`: d_img, d_txt hold the output gradients on entry and the input
/// gradients on exit.
pub(crate) fn double_bwd(
    r: &mut Run,
    w: &DevDouble,
    act: DoubleAct,
    d_img: &F32,
    d_txt: &F32,
    bx: &Ctx,
    dsvec: &F32,
) -> Result<()> {
    let dm = bx.dm;
    let (lt, li, c) = (dm.lt, dm.li, dm.c);
    let (dmi, da_img) = stream_second_bwd(r, &w.img, &act.img, d_img, li, bx)?;
    let (dmt, da_txt) = stream_second_bwd(r, &w.txt, &act.txt, d_txt, lt, bx)?;
    let d_o = r.b16(dm.attn().numel())?;
    r.g.attn.merge_heads_backward(heads(dm, lt, 0, c), View::from(&da_txt), View::from(&d_o))?;
    r.g.attn.merge_heads_backward(heads(dm, li, lt, c), View::from(&da_img), View::from(&d_o))?;
    drop((da_img, da_txt));
    let (dq, dk, dv) = attn_bwd(r, &act.attn, &d_o, dm)?;
    drop(d_o);
    let a = &act.attn;
    for (s, sa, dx, dmods, ls, t0) in [(&w.img, &act.img, d_img, dmi, li, lt), (&w.txt, &act.txt, d_txt, dmt, lt, 0)] {
        let dqkv = r.f32(dm.b * ls * 3 * c)?;
        let qp = qk_views(a, &sa.qkv, &s.q_norm, &s.k_norm, bx);
        r.g.attn.qk_prologue_backward(
            heads(dm, ls, t0, 3 * c),
            &qp,
            QK_NORM_EPS,
            &QkGradViews { dq: (&dq).into(), dk: (&dk).into(), dv: (&dv).into(), dqkv: (&dqkv).into() },
        )?;
        stream_first_bwd(r, s, sa, &dqkv, dx, dmods, ls, bx, dsvec)?;
    }
    Ok(())
}

/// Updates x [b, l, c] (the joint sequence) in place; the activations when `keep`.
pub(crate) fn single_fwd(r: &mut Run, w: &DevSingle, x: &F32, bx: &Ctx, keep: bool) -> Result<Option<SingleAct>> {
    let dm = bx.dm;
    let (b, c, mlp, l) = (dm.b, dm.c, dm.mlp, dm.l());
    let (w1, w2) = (3 * c + mlp, c + mlp);
    let m = b * l;
    let mods_all = r.lin(&w.modulation, b, bx.svec16.into())?;
    let mods = r.chunks(&mods_all, b, 3, c)?;
    let ln = r.ln_mod(x, &mods[0], &mods[1], b, l, c)?;
    let h1 = r.lin(&w.linear1, m, View::from(&ln.out16))?;
    let a = attn_alloc(r, dm)?;
    r.g.attn.qk_prologue(heads(dm, l, 0, w1), &qk_views(&a, &h1, &w.q_norm, &w.k_norm, bx), QK_NORM_EPS)?;
    r.g.attn.forward_dev(dm.attn(), &attn_views(&a))?;
    // linear2 input: [attention output | GELU(mlp part of linear1)]
    let cat16 = r.b16(m * w2)?;
    r.g.attn.merge_heads(heads(dm, l, 0, w2), View::from(&a.o), View::from(&cat16))?;
    let src = DevMat::f32(View::from(&h1).tail(3 * c)?, w1);
    r.g.act.gelu_tanh(m, mlp, src, DevMat::bf16(View::from(&cat16).tail(c)?, w2))?;
    let out = r.lin(&w.linear2, m, View::from(&cat16))?;
    r.gated(x, &out, &mods[2], b, l, c)?;
    Ok(keep.then_some(SingleAct { mods, ln, h1, cat16, out, attn: a }))
}

/// Backward of `single_fwd`: `dx` holds d(output) on entry and d(input) on exit.
pub(crate) fn single_bwd(r: &mut Run, w: &DevSingle, act: SingleAct, dx: &F32, bx: &Ctx, dsvec: &F32) -> Result<()> {
    let dm = bx.dm;
    let (b, c, mlp, l) = (dm.b, dm.c, dm.mlp, dm.l());
    let (w1, w2) = (3 * c + mlp, c + mlp);
    let m = b * l;
    let dmods: Vec<F32> = (0..3).map(|_| r.f32(b * c)).collect::<Result<_>>()?;
    let dout = r.gated_bwd(dx, &act.out, &act.mods[2], &dmods[2], b, l, c)?;
    let dout16 = r.cast16(&dout, m * c)?;
    drop(dout);
    let dcat = r.f32(m * w2)?;
    r.lin_bwd(&w.linear2, m, View::from(&act.cat16), View::from(&dout16), Some(&dcat))?;
    let dh1 = r.f32(m * w1)?;
    r.g.act.gelu_tanh_backward(
        m,
        mlp,
        DevMat::f32(View::from(&act.h1).tail(3 * c)?, w1),
        DevMat::f32(View::from(&dcat).tail(c)?, w2),
        DevMat::f32(View::from(&dh1).tail(3 * c)?, w1),
    )?;
    let d_o = r.b16(dm.attn().numel())?;
    r.g.attn.merge_heads_backward(heads(dm, l, 0, w2), View::from(&dcat), View::from(&d_o))?;
    drop(dcat);
    let (dq, dk, dv) = attn_bwd(r, &act.attn, &d_o, dm)?;
    drop(d_o);
    let qp = qk_views(&act.attn, &act.h1, &w.q_norm, &w.k_norm, bx);
    let g = QkGradViews { dq: (&dq).into(), dk: (&dk).into(), dv: (&dv).into(), dqkv: (&dh1).into() };
    r.g.attn.qk_prologue_backward(heads(dm, l, 0, w1), &qp, QK_NORM_EPS, &g)?;
    drop((dq, dk, dv));
    let dh116 = r.cast16(&dh1, m * w1)?;
    drop(dh1);
    let dxm = r.f32(m * c)?;
    r.lin_bwd(&w.linear1, m, View::from(&act.ln.out16), View::from(&dh116), Some(&dxm))?;
    r.ln_mod_bwd(&act.ln, &dxm, &act.mods[1], dx, &dmods[0], &dmods[1], b, l, c)?;
    modulation_bwd(r, &w.modulation, &dmods, bx, dsvec)
}
