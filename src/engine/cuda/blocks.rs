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

/// LayerNorm + modulation's saved tensors: the normalised rows in bf16 and 1/std per row. The
/// modulated output (a linear's bf16 input) is not kept: `Run::ln_out` recomputes its bits from
/// n and the modulation vectors.
pub(crate) struct LnSaved {
    pub n: B16,
    pub rstd: F32,
}

/// What the attention core keeps over the joint sequence: O [b, h, l, d] and the log-sum-exp.
/// Q, K, V and the QK norms' 1/rms are rebuilt from the saved qkv by the prologue in the backward
/// (the same kernel on the same bits: the same values), which costs one elementwise pass and
/// saves 3 of the 4 bf16 [l, c] tensors flash attention would otherwise keep.
pub(crate) struct AttnAct {
    o: B16,
    lse: F32,
}

/// The QK prologue's outputs: Q, K, V bf16 [b, h, l, d] and 1/rms of q and k per row.
struct HeadsQkv {
    q: B16,
    k: B16,
    v: B16,
    rq: F32,
    rk: F32,
}

/// One stream of a double block. Every linear's output is kept as the bf16 it was rounded to
/// (what the next op read); the proj input is re-merged from the attention output and the GELU
/// output recomputed from the MLP's pre-activation in the backward (same kernels, same bits).
pub(crate) struct StreamAct {
    /// [shift1, scale1, gate1, shift2, scale2, gate2], each [b, c]
    mods: Vec<F32>,
    ln1: LnSaved,
    /// qkv output [b·l, 3c]: the QK prologue's input, read again by its backward
    qkv: B16,
    /// proj output [b·l, c]: the gate's gradient
    p: B16,
    ln2: LnSaved,
    /// mlp.0 output [b·l, mlp]: GELU's input (forward and backward), mlp.2 output [b·l, c]
    h0: B16,
    mlp_out: B16,
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
    /// linear1 output [b·l, 3c + mlp] (the QK prologue's and GELU's input), linear2 output
    /// [b·l, c]; linear2's input [attention | GELU] is rebuilt from `attn.o` and `h1`
    h1: B16,
    out: B16,
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
    Ok(AttnAct { o: r.b16(dm.attn().numel())?, lse: r.f32(dm.attn().rows())? })
}

fn heads_alloc(r: &Run, dm: Dims) -> Result<HeadsQkv> {
    let (n, rows) = (dm.attn().numel(), dm.attn().rows());
    Ok(HeadsQkv { q: r.b16(n)?, k: r.b16(n)?, v: r.b16(n)?, rq: r.f32(rows)?, rk: r.f32(rows)? })
}

fn heads(dm: Dims, ls: usize, t0: usize, ld: usize) -> HeadsDims {
    HeadsDims { b: dm.b, h: dm.h, d: dm.d, l: dm.l(), ls, t0, ld }
}

fn qk_views<'a>(a: &'a HeadsQkv, qkv: &'a B16, ld: usize, qn: &'a F32, kn: &'a F32, bx: &Ctx<'a>) -> QkViews<'a> {
    QkViews {
        qkv: DevMat::bf16(qkv, ld),
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

fn attn_views<'a>(h: &'a HeadsQkv, a: &'a AttnAct) -> AttnViews<'a> {
    AttnViews { q: (&h.q).into(), k: (&h.k).into(), v: (&h.v).into(), o: (&a.o).into(), lse: (&a.lse).into() }
}

/// dq, dk, dv from dO (bf16 [b, h, l, d]).
fn attn_bwd(r: &Run, h: &HeadsQkv, a: &AttnAct, d_o: &B16, dm: Dims) -> Result<(B16, B16, B16)> {
    let (n, rows) = (dm.attn().numel(), dm.attn().rows());
    let (dq, dk, dv, delta) = (r.b16(n)?, r.b16(n)?, r.b16(n)?, r.f32(rows)?);
    let g = AttnGradViews {
        dout: d_o.into(),
        dq: (&dq).into(),
        dk: (&dk).into(),
        dv: (&dv).into(),
        delta: (&delta).into(),
    };
    r.g.attn.backward_dev(dm.attn(), &attn_views(h, a), &g)?;
    Ok((dq, dk, dv))
}

/// A stream's first half: modulation vectors, LN + modulate, qkv projection.
fn stream_first(r: &mut Run, s: &DevStream, x: &F32, ls: usize, bx: &Ctx) -> Result<(Vec<F32>, LnSaved, B16)> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let mods_all = r.lin(&s.modulation, b, bx.svec16.into())?;
    let mods = r.chunks(&mods_all, b, 6, c)?;
    let (ln1, x1) = r.ln_mod(x, &mods[0], &mods[1], b, ls, c)?;
    let qkv = r.lin16(&s.qkv, b * ls, View::from(&x1))?;
    Ok((mods, ln1, qkv))
}

/// A stream's second half: gated projection residual, LN + modulate, MLP, gated residual.
fn stream_second(
    r: &mut Run,
    s: &DevStream,
    x: &F32,
    a16: B16,
    first: (Vec<F32>, LnSaved, B16),
    ls: usize,
    bx: &Ctx,
) -> Result<StreamAct> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let m = b * ls;
    let (mods, ln1, qkv) = first;
    let p = r.lin16(&s.proj, m, View::from(&a16))?;
    drop(a16);
    r.gated(x, &p, &mods[2], b, ls, c)?;
    let (ln2, x2) = r.ln_mod(x, &mods[3], &mods[4], b, ls, c)?;
    let h0 = r.lin16(&s.mlp0, m, View::from(&x2))?;
    drop(x2);
    let act16 = r.gelu16(&h0, m, s.mlp0.d_out)?;
    let mlp_out = r.lin16(&s.mlp2, m, View::from(&act16))?;
    drop(act16);
    r.gated(x, &mlp_out, &mods[5], b, ls, c)?;
    Ok(StreamAct { mods, ln1, qkv, p, ln2, h0, mlp_out })
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
    let (lt, li) = (dm.lt, dm.li);
    let fi = stream_first(r, &w.img, img, li, bx)?;
    let ft = stream_first(r, &w.txt, txt, lt, bx)?;
    let a = attn_alloc(r, dm)?;
    let hq = double_heads(r, w, &fi.2, &ft.2, bx)?;
    r.g.attn.forward_dev(dm.attn(), &attn_views(&hq, &a))?;
    drop(hq);
    let (ta16, ia16) = (merged(r, &a, dm, lt, 0)?, merged(r, &a, dm, li, lt)?);
    let img_a = stream_second(r, &w.img, img, ia16, fi, li, bx)?;
    let txt_a = stream_second(r, &w.txt, txt, ta16, ft, lt, bx)?;
    Ok(keep.then_some(DoubleAct { img: img_a, txt: txt_a, attn: a }))
}

/// The QK prologue of both streams into the joint sequence, text first (the forward's, and the
/// backward's rebuild from the saved qkv).
fn double_heads(r: &Run, w: &DevDouble, qkv_img: &B16, qkv_txt: &B16, bx: &Ctx) -> Result<HeadsQkv> {
    let (dm, c) = (bx.dm, bx.dm.c);
    let hq = heads_alloc(r, dm)?;
    let qk = qk_views(&hq, qkv_txt, 3 * c, &w.txt.q_norm, &w.txt.k_norm, bx);
    r.g.attn.qk_prologue(heads(dm, dm.lt, 0, 3 * c), &qk, QK_NORM_EPS)?;
    let qk = qk_views(&hq, qkv_img, 3 * c, &w.img.q_norm, &w.img.k_norm, bx);
    r.g.attn.qk_prologue(heads(dm, dm.li, dm.lt, 3 * c), &qk, QK_NORM_EPS)?;
    Ok(hq)
}

/// The attention output of one stream's tokens t0..t0 + ls, token-major bf16 [b·ls, c]: the
/// proj input (recomputed from `a.o` in the backward instead of kept).
fn merged(r: &Run, a: &AttnAct, dm: Dims, ls: usize, t0: usize) -> Result<B16> {
    let out = r.b16(dm.b * ls * dm.c)?;
    r.g.attn.merge_heads(heads(dm, ls, t0, dm.c), View::from(&a.o), View::from(&out))?;
    Ok(out)
}

/// Backward of `stream_second`: `dx` holds d(stream output) on entry and d(after the attention
/// residual) on exit; returns d(merged attention output) f32 and the six d mods (0 and 1 are
/// written by `stream_first_bwd`). `t0`: the stream's first joint token.
#[allow(clippy::too_many_arguments)]
fn stream_second_bwd(
    r: &mut Run,
    s: &DevStream,
    a: &StreamAct,
    attn: &AttnAct,
    dx: &F32,
    ls: usize,
    t0: usize,
    bx: &Ctx,
) -> Result<(Vec<F32>, F32)> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let m = b * ls;
    let hid = s.mlp0.d_out;
    let dmods: Vec<F32> = (0..6).map(|_| r.f32(b * c)).collect::<Result<_>>()?;
    let dmlp16 = r.gated_bwd(dx, &a.mlp_out, &a.mods[5], &dmods[5], b, ls, c)?;
    let act16 = r.gelu16(&a.h0, m, hid)?;
    let dact = r.f32(m * hid)?;
    r.lin_bwd(&s.mlp2, m, View::from(&act16), View::from(&dmlp16), Some(&dact))?;
    drop((act16, dmlp16));
    let dh016 = r.b16(m * hid)?;
    r.g.act.gelu_tanh_backward(m, hid, DevMat::bf16(&a.h0, hid), DevMat::f32(&dact, hid), DevMat::bf16(&dh016, hid))?;
    drop(dact);
    let dxm2 = r.f32(m * c)?;
    let x2 = r.ln_out(&a.ln2, &a.mods[3], &a.mods[4], b, ls, c)?;
    r.lin_bwd(&s.mlp0, m, View::from(&x2), View::from(&dh016), Some(&dxm2))?;
    drop((x2, dh016));
    r.ln_mod_bwd(&a.ln2, &dxm2, &a.mods[4], dx, &dmods[3], &dmods[4], b, ls, c)?;
    let dp16 = r.gated_bwd(dx, &a.p, &a.mods[2], &dmods[2], b, ls, c)?;
    let da = r.f32(m * c)?;
    let a16 = merged(r, attn, bx.dm, ls, t0)?;
    r.lin_bwd(&s.proj, m, View::from(&a16), View::from(&dp16), Some(&da))?;
    Ok((dmods, da))
}

/// Backward of `stream_first` from d qkv (bf16 [b·ls, 3c]): adds into `dx`, d SiLU(vec) into
/// `dsvec`.
#[allow(clippy::too_many_arguments)]
fn stream_first_bwd(
    r: &mut Run,
    s: &DevStream,
    a: &StreamAct,
    dqkv16: &B16,
    dx: &F32,
    dmods: Vec<F32>,
    ls: usize,
    bx: &Ctx,
    dsvec: &F32,
) -> Result<()> {
    let (b, c) = (bx.dm.b, bx.dm.c);
    let m = b * ls;
    let dxm1 = r.f32(m * c)?;
    let x1 = r.ln_out(&a.ln1, &a.mods[0], &a.mods[1], b, ls, c)?;
    r.lin_bwd(&s.qkv, m, View::from(&x1), View::from(dqkv16), Some(&dxm1))?;
    drop(x1);
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
    let (dmi, da_img) = stream_second_bwd(r, &w.img, &act.img, &act.attn, d_img, li, lt, bx)?;
    let (dmt, da_txt) = stream_second_bwd(r, &w.txt, &act.txt, &act.attn, d_txt, lt, 0, bx)?;
    let d_o = r.b16(dm.attn().numel())?;
    r.g.attn.merge_heads_backward(heads(dm, lt, 0, c), View::from(&da_txt), View::from(&d_o))?;
    r.g.attn.merge_heads_backward(heads(dm, li, lt, c), View::from(&da_img), View::from(&d_o))?;
    drop((da_img, da_txt));
    let hq = double_heads(r, w, &act.img.qkv, &act.txt.qkv, bx)?;
    let (dq, dk, dv) = attn_bwd(r, &hq, &act.attn, &d_o, dm)?;
    drop(d_o);
    for (s, sa, dx, dmods, ls, t0) in [(&w.img, &act.img, d_img, dmi, li, lt), (&w.txt, &act.txt, d_txt, dmt, lt, 0)] {
        let dqkv16 = r.b16(dm.b * ls * 3 * c)?;
        let qp = qk_views(&hq, &sa.qkv, 3 * c, &s.q_norm, &s.k_norm, bx);
        r.g.attn.qk_prologue_backward(
            heads(dm, ls, t0, 3 * c),
            &qp,
            QK_NORM_EPS,
            &QkGradViews { dq: (&dq).into(), dk: (&dk).into(), dv: (&dv).into(), dqkv: DevMat::bf16(&dqkv16, 3 * c) },
        )?;
        stream_first_bwd(r, s, sa, &dqkv16, dx, dmods, ls, bx, dsvec)?;
    }
    Ok(())
}

/// Updates x [b, l, c] (the joint sequence) in place; the activations when `keep`.
pub(crate) fn single_fwd(r: &mut Run, w: &DevSingle, x: &F32, bx: &Ctx, keep: bool) -> Result<Option<SingleAct>> {
    let dm = bx.dm;
    let (b, c, l) = (dm.b, dm.c, dm.l());
    let m = b * l;
    let mods_all = r.lin(&w.modulation, b, bx.svec16.into())?;
    let mods = r.chunks(&mods_all, b, 3, c)?;
    let (ln, xm) = r.ln_mod(x, &mods[0], &mods[1], b, l, c)?;
    let h1 = r.lin16(&w.linear1, m, View::from(&xm))?;
    drop(xm);
    let a = attn_alloc(r, dm)?;
    let hq = single_heads(r, w, &h1, bx)?;
    r.g.attn.forward_dev(dm.attn(), &attn_views(&hq, &a))?;
    drop(hq);
    let cat16 = single_cat(r, &a, &h1, dm)?;
    let out = r.lin16(&w.linear2, m, View::from(&cat16))?;
    drop(cat16);
    r.gated(x, &out, &mods[2], b, l, c)?;
    Ok(keep.then_some(SingleAct { mods, ln, h1, out, attn: a }))
}

/// The QK prologue from linear1's output (the forward's, and the backward's rebuild).
fn single_heads(r: &Run, w: &DevSingle, h1: &B16, bx: &Ctx) -> Result<HeadsQkv> {
    let (dm, w1) = (bx.dm, w.linear1.d_out);
    let hq = heads_alloc(r, dm)?;
    let qk = qk_views(&hq, h1, w1, &w.q_norm, &w.k_norm, bx);
    r.g.attn.qk_prologue(heads(dm, dm.l(), 0, w1), &qk, QK_NORM_EPS)?;
    Ok(hq)
}

/// linear2's input [attention output | GELU(mlp part of linear1's output)], bf16 [b·l, c + mlp]:
/// built in the forward and rebuilt (the same bits) in the backward.
fn single_cat(r: &Run, a: &AttnAct, h1: &B16, dm: Dims) -> Result<B16> {
    let (c, mlp, m) = (dm.c, dm.mlp, dm.b * dm.l());
    let (w1, w2) = (3 * c + mlp, c + mlp);
    let cat16 = r.b16(m * w2)?;
    r.g.attn.merge_heads(heads(dm, dm.l(), 0, w2), View::from(&a.o), View::from(&cat16))?;
    let src = DevMat::bf16(View::from(h1).tail(3 * c)?, w1);
    r.g.act.gelu_tanh(m, mlp, src, DevMat::bf16(View::from(&cat16).tail(c)?, w2))?;
    Ok(cat16)
}

/// Backward of `single_fwd`: `dx` holds d(output) on entry and d(input) on exit.
pub(crate) fn single_bwd(r: &mut Run, w: &DevSingle, act: SingleAct, dx: &F32, bx: &Ctx, dsvec: &F32) -> Result<()> {
    let dm = bx.dm;
    let (b, c, mlp, l) = (dm.b, dm.c, dm.mlp, dm.l());
    let (w1, w2) = (3 * c + mlp, c + mlp);
    let m = b * l;
    let dmods: Vec<F32> = (0..3).map(|_| r.f32(b * c)).collect::<Result<_>>()?;
    let dout16 = r.gated_bwd(dx, &act.out, &act.mods[2], &dmods[2], b, l, c)?;
    let cat16 = single_cat(r, &act.attn, &act.h1, dm)?;
    let dcat = r.f32(m * w2)?;
    r.lin_bwd(&w.linear2, m, View::from(&cat16), View::from(&dout16), Some(&dcat))?;
    drop((cat16, dout16));
    // d(linear1 output) in bf16 (linear1's dY), its MLP part from GELU's backward, its qkv part
    // from the QK prologue's, each rounded once where it is computed.
    let dh116 = r.b16(m * w1)?;
    r.g.act.gelu_tanh_backward(
        m,
        mlp,
        DevMat::bf16(View::from(&act.h1).tail(3 * c)?, w1),
        DevMat::f32(View::from(&dcat).tail(c)?, w2),
        DevMat::bf16(View::from(&dh116).tail(3 * c)?, w1),
    )?;
    let d_o = r.b16(dm.attn().numel())?;
    r.g.attn.merge_heads_backward(heads(dm, l, 0, w2), View::from(&dcat), View::from(&d_o))?;
    drop(dcat);
    let hq = single_heads(r, w, &act.h1, bx)?;
    let (dq, dk, dv) = attn_bwd(r, &hq, &act.attn, &d_o, dm)?;
    drop(d_o);
    let qp = qk_views(&hq, &act.h1, w1, &w.q_norm, &w.k_norm, bx);
    let g = QkGradViews { dq: (&dq).into(), dk: (&dk).into(), dv: (&dv).into(), dqkv: DevMat::bf16(&dh116, w1) };
    r.g.attn.qk_prologue_backward(heads(dm, l, 0, w1), &qp, QK_NORM_EPS, &g)?;
    drop((dq, dk, dv, hq));
    let dxm = r.f32(m * c)?;
    let xm = r.ln_out(&act.ln, &act.mods[0], &act.mods[1], b, l, c)?;
    r.lin_bwd(&w.linear1, m, View::from(&xm), View::from(&dh116), Some(&dxm))?;
    drop((xm, dh116));
    r.ln_mod_bwd(&act.ln, &dxm, &act.mods[1], dx, &dmods[0], &dmods[1], b, l, c)?;
    modulation_bwd(r, &w.modulation, &dmods, bx, dsvec)
}
