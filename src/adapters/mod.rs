//! Adapters, unmerged: the base weights are never touched, so adapters switch and rescale
//! instantly. One type describes an adapter term from file to device to export: `Term`, a kind
//! (`Kind`) with its parameter tensors on (rows of) one BFL linear. An `AdapterSet` holds the
//! terms of one call (several files at their strengths, or the adapters being trained) and is
//! what the CPU reference's linears consult (`model::adapt::LinearAdapters`).
//!
//! Adding an adapter kind (see docs/architecture.md): its math with the backward in a file of its
//! own beside `lora.rs`, a `Kind` variant with its arms below, its file dialects in `formats.rs` /
//! `export.rs`, and its device twin in `engine::cuda::adapters`.

pub mod config;
pub mod dora;
pub mod dora_columns;
pub mod export;
pub mod formats;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod per_sample;

use crate::model::adapt::{AdapterGrads, LinearAdapters, LinearCall};
use crate::ops::lora::Dropout;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

pub use per_sample::PerSample;

/// What an adapter term computes, with the sizes its parameters need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// ΔY = scale · (X·Aᵀ)·Bᵀ with A [rank, d_in] and B [rows, rank] (PEFT's lora_A, lora_B).
    Lora { rank: usize },
    /// DoRA (PEFT `use_dora`): LoRA's A and B plus a magnitude [rows] that rescales each output
    /// row of the frozen weight plus the update (`dora.rs`; on the CUDA engine the rescale is
    /// the fused GEMM's column scale, `engine::cuda::adapters`).
    Dora { rank: usize },
    /// DoRA decomposed per input column instead (LyCORIS `wd_on_out = false`: kohya-style files
    /// with `dora_scale` [1, in]): A, B and a magnitude [d_in] (`dora_columns.rs`). Loaded and
    /// applied, not trained. CPU engine only.
    DoraColumns { rank: usize },
    /// LyCORIS LoKr: ΔY = scale · X·(w1 ⊗ w2)ᵀ, w1 [a, c] and w2 [b, d] with a·b the rows and
    /// c·d the inputs, each stored whole or as a product of two factors of rank `r1` / `r2`
    /// (`lokr.rs`). CPU engine only.
    Lokr { w1: [usize; 2], w2: [usize; 2], r1: Option<usize>, r2: Option<usize> },
    /// LyCORIS LoHa: ΔY = scale · X·((w1_a·w1_b) ⊙ (w2_a·w2_b))ᵀ, the two products of ranks `r1`,
    /// `r2` (`loha.rs`). CPU engine only.
    Loha { r1: usize, r2: usize },
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lora { .. } => "LoRA",
            Kind::Dora { .. } | Kind::DoraColumns { .. } => "DoRA",
            Kind::Lokr { .. } => "LoKr",
            Kind::Loha { .. } => "LoHa",
        }
    }

    /// True for the LyCORIS kinds, whose parameters are not LoRA's A and B.
    pub fn is_lycoris(self) -> bool {
        matches!(self, Kind::Lokr { .. } | Kind::Loha { .. })
    }

    /// LyCORIS's names of the parameters in `Term::params` order (`lokr_w1` or `lokr_w1_a`,
    /// `lokr_w1_b`, then w2's; the four `hada_*`); empty for the LoRA kinds.
    pub fn lycoris_names(self) -> Vec<&'static str> {
        match self {
            Kind::Lokr { r1, r2, .. } => {
                let mut v = if r1.is_some() { vec!["lokr_w1_a", "lokr_w1_b"] } else { vec!["lokr_w1"] };
                v.extend(if r2.is_some() { vec!["lokr_w2_a", "lokr_w2_b"] } else { vec!["lokr_w2"] });
                v
            }
            Kind::Loha { .. } => vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
            Kind::Lora { .. } | Kind::Dora { .. } | Kind::DoraColumns { .. } => vec![],
        }
    }
}

/// One adapter term on (a slice of the output rows of) one linear, before any dropout.
#[derive(Clone, Debug)]
pub struct Term {
    /// The BFL module it acts on (`double_blocks.0.img_attn.qkv`).
    pub module: String,
    /// The output rows it writes: q, k or v of a fused qkv, the MLP part of linear1, or all.
    pub rows: Range<usize>,
    pub d_in: usize,
    /// Everything that multiplies its output: alpha/rank (alpha/√rank for rsLoRA) times the
    /// user's strength.
    pub scale: f32,
    pub kind: Kind,
    /// The parameter tensors in the kind's order (LoRA: A, then B with its rows in BFL order).
    /// Shared, so that sets built from the same file cost no copies.
    pub params: Vec<Arc<Vec<f32>>>,
}

impl Term {
    /// A LoRA term: A [rank, d_in], B [rows.len(), rank].
    pub fn lora(
        module: &str,
        rows: Range<usize>,
        d_in: usize,
        rank: usize,
        scale: f32,
        a: Vec<f32>,
        b: Vec<f32>,
    ) -> Term {
        Term {
            module: module.to_string(),
            rows,
            d_in,
            scale,
            kind: Kind::Lora { rank },
            params: vec![Arc::new(a), Arc::new(b)],
        }
    }

    /// A term of a LyCORIS kind with its parameters in the kind's order (`param_shapes`).
    pub fn lycoris(
        module: &str,
        rows: Range<usize>,
        d_in: usize,
        kind: Kind,
        scale: f32,
        params: Vec<Vec<f32>>,
    ) -> Term {
        Term { module: module.to_string(), rows, d_in, scale, kind, params: params.into_iter().map(Arc::new).collect() }
    }

    /// This LoRA term as a DoRA term with the magnitude [rows] of each of its output rows.
    pub fn with_magnitude(mut self, magnitude: Vec<f32>) -> Term {
        self.kind = Kind::Dora { rank: self.rank() };
        self.params.truncate(2);
        self.params.push(Arc::new(magnitude));
        self
    }

    /// This LoRA term as a DoRA term decomposed per input column, with the magnitude [d_in] of
    /// each input column of its rows' weight.
    pub fn with_column_magnitude(mut self, magnitude: Vec<f32>) -> Term {
        self.kind = Kind::DoraColumns { rank: self.rank() };
        self.params.truncate(2);
        self.params.push(Arc::new(magnitude));
        self
    }

    /// True for either DoRA form (a magnitude besides LoRA's A and B).
    pub fn is_dora(&self) -> bool {
        matches!(self.kind, Kind::Dora { .. } | Kind::DoraColumns { .. })
    }

    /// The shape of each parameter tensor, in `params` order.
    pub fn param_shapes(&self) -> Vec<Vec<usize>> {
        match self.kind {
            Kind::Lora { rank } => vec![vec![rank, self.d_in], vec![self.rows.len(), rank]],
            Kind::Dora { rank } => vec![vec![rank, self.d_in], vec![self.rows.len(), rank], vec![self.rows.len()]],
            Kind::DoraColumns { rank } => vec![vec![rank, self.d_in], vec![self.rows.len(), rank], vec![self.d_in]],
            Kind::Lokr { w1, w2, r1, r2 } => {
                let mut v = Vec::new();
                for (w, r) in [(w1, r1), (w2, r2)] {
                    match r {
                        Some(r) => v.extend([vec![w[0], r], vec![r, w[1]]]),
                        None => v.push(w.to_vec()),
                    }
                }
                v
            }
            Kind::Loha { r1, r2 } => {
                let (n, k) = (self.rows.len(), self.d_in);
                vec![vec![n, r1], vec![r1, k], vec![n, r2], vec![r2, k]]
            }
        }
    }

    /// The low-rank width: LoRA's r; for LoKr the rank its scale divides by (ComfyUI's rule: w2's
    /// when factored, else w1's, 0 when both are whole); for LoHa w1's.
    pub fn rank(&self) -> usize {
        match self.kind {
            Kind::Lora { rank } | Kind::Dora { rank } | Kind::DoraColumns { rank } => rank,
            Kind::Lokr { r1, r2, .. } => r2.or(r1).unwrap_or(0),
            Kind::Loha { r1, .. } => r1,
        }
    }

    pub fn param_count(&self) -> usize {
        self.params.iter().map(|p| p.len()).sum()
    }

    /// LoRA's A (lora_down).
    pub fn a(&self) -> &[f32] {
        &self.params[0]
    }

    /// LoRA's B (lora_up), rows in BFL order.
    pub fn b(&self) -> &[f32] {
        &self.params[1]
    }

    /// DoRA's magnitude per output row (BFL order), or per input column for `DoraColumns`; empty
    /// for other kinds.
    pub fn magnitude(&self) -> &[f32] {
        self.params.get(2).map_or(&[], |p| p.as_slice())
    }

    /// True when every parameter has the size its shape says.
    pub fn sizes_ok(&self) -> bool {
        self.params.len() == self.param_shapes().len()
            && self.params.iter().zip(self.param_shapes()).all(|(p, s)| p.len() == s.iter().product::<usize>())
    }
}

/// The adapters of one forward/backward call.
#[derive(Clone, Default)]
pub struct AdapterSet {
    terms: Vec<Term>,
    /// Indices into `terms` per module, in the order the terms were added.
    by_module: HashMap<String, Vec<usize>>,
    /// Training only: dropout probability on every adapter input and this step's mask seed.
    dropout: Option<(f32, u64)>,
}

impl AdapterSet {
    pub fn new() -> AdapterSet {
        AdapterSet::default()
    }

    /// Adds `terms` (one adapter file's, say) at strength `strength`.
    pub fn add(&mut self, terms: &[Term], strength: f32) {
        for t in terms {
            let mut t = t.clone();
            t.scale *= strength;
            self.push(t);
        }
    }

    pub fn push(&mut self, t: Term) {
        self.by_module.entry(t.module.clone()).or_default().push(self.terms.len());
        self.terms.push(t);
    }

    /// LoRA dropout with probability `p`, masks drawn from `seed` (one seed per step; every
    /// module and term gets its own stream from it). `p` = 0 turns it off.
    pub fn set_dropout(&mut self, p: f32, seed: u64) {
        self.dropout = if p > 0.0 { Some((p, seed)) } else { None };
    }

    /// The dropout probability and step seed, when set.
    pub fn dropout(&self) -> Option<(f32, u64)> {
        self.dropout
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Every term, in the order added.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Every parameter tensor of every term, in term order then the kind's order (LoRA: A0, B0,
    /// A1, B1, …): the trainer's, the optimizer's and the checkpoint's order.
    pub fn params(&self) -> impl Iterator<Item = &Arc<Vec<f32>>> {
        self.terms.iter().flat_map(|t| t.params.iter())
    }

    /// Mutable parameter tensors in `params` order (the optimizer's update; unshared on write).
    pub fn params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.terms.iter_mut().flat_map(|t| t.params.iter_mut().map(Arc::make_mut)).collect()
    }

    /// Replaces every parameter tensor, given in `params` order (a resumed checkpoint, or the
    /// trained values back from the engine).
    pub fn set_params(&mut self, params: Vec<Vec<f32>>) -> anyhow::Result<()> {
        let n = self.params().count();
        anyhow::ensure!(params.len() == n, "{} adapter tensors given for {n}", params.len());
        for (dst, src) in self.terms.iter_mut().flat_map(|t| t.params.iter_mut()).zip(params) {
            anyhow::ensure!(dst.len() == src.len(), "adapter tensor of {} values given {}", dst.len(), src.len());
            *dst = Arc::new(src);
        }
        Ok(())
    }

    /// The terms on module `module` with their index among that module's terms.
    pub fn on_module<'a>(&'a self, module: &str) -> impl Iterator<Item = (usize, &'a Term)> + 'a {
        let idx: &[usize] = self.by_module.get(module).map_or(&[], |v| v.as_slice());
        idx.iter().map(|&i| &self.terms[i]).enumerate()
    }

    /// The position of every term among its module's terms (the dropout seed's index).
    pub fn index_in_module(&self) -> Vec<usize> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        self.terms
            .iter()
            .map(|t| {
                let n = seen.entry(&t.module).or_insert(0);
                *n += 1;
                *n - 1
            })
            .collect()
    }

    /// The dropout of term `i` of module `module` this step, when dropout is on.
    pub fn term_dropout(&self, module: &str, i: usize) -> Option<Dropout> {
        self.dropout.map(|(p, seed)| Dropout { p, seed: term_seed(seed, module, i) })
    }

    /// The gradients of every parameter in `params` order (zeros for a term the backward never
    /// reached).
    pub fn flat_grads(&self, g: &AdapterGrads) -> Vec<Vec<f32>> {
        let index = self.index_in_module();
        self.terms
            .iter()
            .zip(index)
            .flat_map(|(t, i)| match g.get(&t.module, i) {
                Some(tg) => tg.clone(),
                None => t.params.iter().map(|p| vec![0.0; p.len()]).collect(),
            })
            .collect()
    }
}

impl LinearAdapters for AdapterSet {
    fn on(&self, module: &str) -> bool {
        self.by_module.contains_key(module)
    }

    fn needs_frozen(&self, module: &str) -> bool {
        self.on_module(module).any(|(_, t)| t.is_dora())
    }

    fn forward(&self, call: LinearCall, out: &mut [f32]) {
        for (i, t) in self.on_module(call.module) {
            let drop = self.term_dropout(call.module, i);
            match t.kind {
                Kind::Lora { .. } => lora::forward(t, drop, call, out),
                Kind::Dora { .. } => dora::forward(t, drop, call, out),
                Kind::DoraColumns { .. } => dora_columns::forward(t, drop, call, out),
                Kind::Lokr { .. } => lokr::forward(t, call, out),
                Kind::Loha { .. } => loha::forward(t, call, out),
            }
        }
    }

    fn backward(&self, call: LinearCall, dout: &[f32], dinp: Option<&mut [f32]>, grads: &mut AdapterGrads) {
        let count = self.by_module.get(call.module).map_or(0, |v| v.len());
        let slot = grads.slot(call.module, count);
        let mut dinp = dinp;
        for ((i, t), g) in self.on_module(call.module).zip(slot.iter_mut()) {
            let drop = self.term_dropout(call.module, i);
            match t.kind {
                Kind::Lora { .. } => lora::backward(t, drop, call, dout, dinp.as_deref_mut(), g),
                Kind::Dora { .. } => dora::backward(t, drop, call, dout, dinp.as_deref_mut(), g),
                Kind::DoraColumns { .. } => dora_columns::backward(t, drop, call, dout, dinp.as_deref_mut(), g),
                Kind::Lokr { .. } => lokr::backward(t, call, dout, dinp.as_deref_mut(), g),
                Kind::Loha { .. } => loha::backward(t, call, dout, dinp.as_deref_mut(), g),
            }
        }
    }
}

/// The dropout seed of term `i` on module `name` for step seed `seed`: FNV-1a over the name,
/// folded with the others (the GPU model draws the same masks from it).
pub fn term_seed(seed: u64, name: &str, i: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes().chain((i as u64).to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Checks of a kind's backward shared by the kinds' tests.
#[cfg(test)]
pub(crate) mod check {
    use super::{AdapterSet, Kind, Term};
    use crate::model::adapt::{AdapterGrads, Frozen, LinearAdapters, LinearCall};
    use crate::ops::lora::Dropout;
    use crate::ops::matmul::{linear_backward_input, linear_forward};
    use crate::util::{fd_check, Rng};
    use std::sync::Arc;

    /// The frozen product X·Wᵀ plus a DoRA term's output (either form), the term's own dropout.
    pub fn frozen_layer(t: &Term, w: &[f32], x: &[f32], m: usize, n: usize, drop: Option<Dropout>) -> Vec<f32> {
        let k = t.d_in;
        let mut base = vec![0f32; m * n];
        linear_forward(&mut base, x, w, None, m, k, n);
        let mut out = base.clone();
        let c = LinearCall { module: "m", inp: x, m, k, n, frozen: Some(Frozen { weight: w, out: &base }) };
        match t.kind {
            Kind::Dora { .. } => super::dora::forward(t, drop, c, &mut out),
            Kind::DoraColumns { .. } => super::dora_columns::forward(t, drop, c, &mut out),
            _ => panic!("frozen_layer: not a DoRA term"),
        }
        out
    }

    /// A DoRA form's backward against finite differences: a term made by `make(A, B, m)` on rows
    /// 2..6 of a 7 × 5 linear (rank 2) with `mag_len` magnitudes, whose norms `norms` gives; the
    /// norm held constant as PEFT detaches it (m moves with it while A and B move).
    pub fn dora_backward_matches_fd(
        make: impl Fn(&[f32], &[f32], &[f32]) -> Term,
        norms: fn(&Term, &[f32], usize) -> Vec<f32>,
        mag_len: usize,
    ) {
        let (m, k, n, r) = (3, 5, 7, 2);
        let mut rng = Rng::new(5);
        let w = rng.normal_vec(n * k, 0.5);
        let x = rng.normal_vec(m * k, 1.0);
        let a = rng.normal_vec(r * k, 0.5);
        let b = rng.normal_vec(4 * r, 0.5);
        let mag: Vec<f32> = (0..mag_len).map(|_| 1.0 + rng.uniform() as f32).collect();
        let drop = Some(Dropout { p: 0.25, seed: 3 });
        let t = make(&a, &b, &mag);
        assert!(t.sizes_ok() && t.rows == (2..6) && t.d_in == k);
        let dy = rng.normal_vec(m * n, 1.0);
        let mut base = vec![0f32; m * n];
        linear_forward(&mut base, &x, &w, None, m, k, n);
        let c = LinearCall { module: "m", inp: &x, m, k, n, frozen: Some(Frozen { weight: &w, out: &base }) };
        let mut g = Vec::new();
        let mut dx = vec![0f32; m * k];
        linear_backward_input(&mut dx, &dy, &w, m, k, n, 0.0);
        match t.kind {
            Kind::Dora { .. } => super::dora::backward(&t, drop, c, &dy, Some(&mut dx), &mut g),
            Kind::DoraColumns { .. } => super::dora_columns::backward(&t, drop, c, &dy, Some(&mut dx), &mut g),
            _ => panic!("not a DoRA term"),
        }
        let at = norms(&t, &w, k);
        let detached = |a: &[f32], b: &[f32]| {
            let now = norms(&make(a, b, &mag), &w, k);
            let m2: Vec<f32> = mag.iter().zip(now.iter().zip(&at)).map(|(m, (n1, n0))| m * n1 / n0).collect();
            frozen_layer(&make(a, b, &m2), &w, &x, m, n, drop)
        };
        fd_check(&a, &g[0], &dy, |v| detached(v, &b), 2e-2);
        fd_check(&b, &g[1], &dy, |v| detached(&a, v), 2e-2);
        fd_check(&mag, &g[2], &dy, |v| frozen_layer(&make(&a, &b, v), &w, &x, m, n, drop), 2e-2);
        fd_check(&x, &dx, &dy, |v| frozen_layer(&t, &w, v, m, n, drop), 2e-2);
    }

    /// A DoRA form whose magnitudes equal its norms (g = 1) is its LoRA branch alone: `with`
    /// turns a LoRA term into the form given those magnitudes, which `norms` computes.
    pub fn dora_at_its_norms_is_plain_lora(
        with: fn(Term, Vec<f32>) -> Term,
        norms: fn(&Term, &[f32], usize) -> Vec<f32>,
    ) {
        let (m, k, n, r) = (2, 4, 3, 2);
        let mut rng = Rng::new(9);
        let (w, x) = (rng.normal_vec(n * k, 0.5), rng.normal_vec(m * k, 1.0));
        let (a, b) = (rng.normal_vec(r * k, 0.5), rng.normal_vec(n * r, 0.5));
        let lora_term = Term::lora("m", 0..n, k, r, 1.5, a, b);
        let t = with(lora_term.clone(), norms(&lora_term, &w, k));
        let got = frozen_layer(&t, &w, &x, m, n, None);
        let mut want = vec![0f32; m * n];
        linear_forward(&mut want, &x, &w, None, m, k, n);
        super::lora::forward(&lora_term, None, LinearCall { module: "m", inp: &x, m, k, n, frozen: None }, &mut want);
        let e = crate::util::rel_l2(&got, &want);
        assert!(e < 1e-6, "rel L2 {e:e}");
    }

    /// `t` with every parameter drawn from N(0, σ²).
    pub fn random_params(t: Term, sigma: f32, rng: &mut Rng) -> Term {
        let params = t.param_shapes().iter().map(|s| Arc::new(rng.normal_vec(s.iter().product(), sigma))).collect();
        let t = Term { params, ..t };
        assert!(t.sizes_ok());
        t
    }

    /// The gradients of the input and of every parameter of `t` (a term on module "m" of a linear
    /// with `n` outputs, no frozen weight) against finite differences of its forward.
    pub fn term_backward_matches_fd(t: &Term, m: usize, n: usize, tol: f64, rng: &mut Rng) {
        let k = t.d_in;
        let x = rng.normal_vec(m * k, 1.0);
        let dy = rng.normal_vec(m * n, 1.0);
        let set_of = |t: &Term| {
            let mut s = AdapterSet::new();
            s.push(t.clone());
            s
        };
        let run = |t: &Term, x: &[f32]| {
            let mut out = vec![0f32; m * n];
            set_of(t).forward(LinearCall { module: "m", inp: x, m, k, n, frozen: None }, &mut out);
            out
        };
        let mut grads = AdapterGrads::default();
        let mut dx = vec![0f32; m * k];
        let call = LinearCall { module: "m", inp: &x, m, k, n, frozen: None };
        set_of(t).backward(call, &dy, Some(&mut dx), &mut grads);
        fd_check(&x, &dx, &dy, |v| run(t, v), tol);
        let g = grads.get("m", 0).expect("the backward reached the term");
        for (i, p) in t.params.iter().enumerate() {
            let with = |v: &[f32]| {
                let mut t2 = t.clone();
                t2.params[i] = Arc::new(v.to_vec());
                run(&t2, &x)
            };
            fd_check(p, &g[i], &dy, with, tol);
        }
    }
}
