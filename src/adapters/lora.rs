//! The LoRA kind: ΔY[:, rows] = scale · (X̃·Aᵀ)·Bᵀ, X̃ the (dropped-out) input, on the CPU.
//! The slice-level math and its tests are `ops::lora` (the kernels are tested against it); this
//! file maps a `Term` onto it and holds PEFT's initialisation.

use super::Term;
use crate::model::adapt::{LinearCall, TermGrads};
use crate::ops::lora::{lora_terms_backward, lora_terms_forward, Dropout, LoraTerm, TermGrad};
use crate::util::Rng;

/// PEFT's initialisations of a new adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// PEFT's default: A ~ U(−1/√in, 1/√in) (kaiming_uniform with a = √5), B = 0.
    KaimingUniform,
    /// PEFT's "gaussian": A ~ N(0, 1/r²), B = 0.
    Gaussian,
}

/// The op-level view of a LoRA term (`ops::lora`'s argument).
pub fn view(t: &Term, dropout: Option<Dropout>) -> LoraTerm<'_> {
    LoraTerm { a: t.a(), b: t.b(), rank: t.rank(), scale: t.scale, rows: t.rows.clone(), dropout }
}

/// out[m, n] += the term's output for the call's input.
pub fn forward(t: &Term, dropout: Option<Dropout>, c: LinearCall, out: &mut [f32]) {
    lora_terms_forward(out, c.inp, std::slice::from_ref(&view(t, dropout)), c.m, c.k, c.n);
}

/// dA, dB accumulate into `g` (created zeroed on first use); the input gradient through the
/// term is added to `dinp`.
pub fn backward(
    t: &Term,
    dropout: Option<Dropout>,
    c: LinearCall,
    dout: &[f32],
    dinp: Option<&mut [f32]>,
    g: &mut TermGrads,
) {
    g.resize(2, Vec::new());
    let mut tg = TermGrad { da: std::mem::take(&mut g[0]), db: std::mem::take(&mut g[1]) };
    lora_terms_backward(dinp, std::slice::from_mut(&mut tg), dout, c.inp, &[view(t, dropout)], c.m, c.k, c.n);
    (g[0], g[1]) = (tg.da, tg.db);
}

/// A new adapter's factors: (A [rank, d_in], B [rows, rank] = 0).
pub fn init(init: Init, rank: usize, d_in: usize, rows: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let n = rank * d_in;
    let a = match init {
        Init::KaimingUniform => {
            let bound = 1.0 / (d_in as f64).sqrt();
            (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
        }
        Init::Gaussian => rng.normal_vec(n, 1.0 / rank as f32),
    };
    (a, vec![0.0; rows * rank])
}
