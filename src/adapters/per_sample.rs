//! Different adapters for each sample of one batch: the rows of sample i of every linear see only
//! the terms of `sets[i]`, at their own strengths. This is what lets `serve` put requests with
//! different LoRA sets into one transformer pass (issue 20).
//!
//! Every linear of the model takes its input sample-major, [b · rows, k] with the rows of sample
//! i contiguous (tokens, or one row per sample for the modulations and embedders), so a call's
//! input splits into b equal row ranges. Each range goes through its own set exactly as it would
//! in a batch of one: the same products on the same rows, so a sample's output does not depend on
//! what else is in its batch (bit for bit on the CPU; tests/serve.rs checks it through `serve`).

use super::AdapterSet;
use crate::model::adapt::{AdapterGrads, Frozen, LinearAdapters, LinearCall};

/// One adapter set per sample of a batch (inference only: no backward).
#[derive(Clone, Default)]
pub struct PerSample {
    sets: Vec<AdapterSet>,
}

impl PerSample {
    /// `sets[i]` applies to sample i; the batch must have `sets.len()` samples.
    pub fn new(sets: Vec<AdapterSet>) -> PerSample {
        PerSample { sets }
    }

    /// The number of samples the batch must have.
    pub fn batch(&self) -> usize {
        self.sets.len()
    }

    pub fn sets(&self) -> &[AdapterSet] {
        &self.sets
    }

    /// Sample i's slice of a call: its rows of the input, of the frozen product, and of the output
    /// width `n`, as (call, output range).
    fn sample_call<'a>(&self, call: &LinearCall<'a>, i: usize) -> (LinearCall<'a>, std::ops::Range<usize>) {
        let rows = call.m / self.sets.len();
        let frozen =
            call.frozen.map(|f| Frozen { weight: f.weight, out: &f.out[i * rows * call.n..(i + 1) * rows * call.n] });
        let sub = LinearCall { inp: &call.inp[i * rows * call.k..(i + 1) * rows * call.k], m: rows, frozen, ..*call };
        (sub, i * rows * call.n..(i + 1) * rows * call.n)
    }
}

impl LinearAdapters for PerSample {
    fn on(&self, module: &str) -> bool {
        self.sets.iter().any(|s| s.on(module))
    }

    fn needs_frozen(&self, module: &str) -> bool {
        self.sets.iter().any(|s| s.needs_frozen(module))
    }

    fn forward(&self, call: LinearCall, out: &mut [f32]) {
        let b = self.sets.len();
        // The engine checks the batch size before the forward (`engine::cpu`); a call whose rows
        // do not split by sample would be a model bug, not a user's input.
        assert!(b > 0 && call.m.is_multiple_of(b), "{}: {} rows do not split into {b} samples", call.module, call.m);
        for (i, set) in self.sets.iter().enumerate() {
            if set.on(call.module) {
                let (sub, range) = self.sample_call(&call, i);
                set.forward(sub, &mut out[range]);
            }
        }
    }

    fn backward(&self, call: LinearCall, _: &[f32], _: Option<&mut [f32]>, _: &mut AdapterGrads) {
        // The engines refuse a backward without trainable adapters before reaching the model, and
        // per-sample sets are never trainable (`Engine::set_batch_adapters`).
        unreachable!("{}: per-sample adapter sets are for inference only", call.module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::Term;
    use crate::util::Rng;

    fn term(rng: &mut Rng, rows: std::ops::Range<usize>, k: usize, rank: usize, scale: f32) -> Term {
        let a = rng.normal_vec(rank * k, 0.5);
        let b = rng.normal_vec(rows.len() * rank, 0.5);
        Term::lora("m", rows, k, rank, scale, a, b)
    }

    /// Each sample's rows get exactly what its own set gives it alone; other rows are untouched.
    #[test]
    fn each_sample_sees_only_its_own_set() {
        let (rows, k, n) = (3, 5, 7);
        let mut rng = Rng::new(5);
        let mut s0 = AdapterSet::new();
        s0.push(term(&mut rng, 0..7, k, 2, 0.5));
        let mut s2 = AdapterSet::new();
        s2.push(term(&mut rng, 2..6, k, 3, -1.5));
        s2.push(term(&mut rng, 0..7, k, 1, 2.0));
        let sets = vec![s0, AdapterSet::new(), s2];
        let inp = rng.normal_vec(3 * rows * k, 1.0);
        let base = rng.normal_vec(3 * rows * n, 1.0);
        let mut out = base.clone();
        let call = LinearCall { module: "m", inp: &inp, m: 3 * rows, k, n, frozen: None };
        PerSample::new(sets.clone()).forward(call, &mut out);
        for (i, set) in sets.iter().enumerate() {
            let mut alone = base[i * rows * n..(i + 1) * rows * n].to_vec();
            let call =
                LinearCall { module: "m", inp: &inp[i * rows * k..(i + 1) * rows * k], m: rows, k, n, frozen: None };
            set.forward(call, &mut alone);
            assert_eq!(out[i * rows * n..(i + 1) * rows * n], alone[..], "sample {i}");
        }
        assert_eq!(out[rows * n..2 * rows * n], base[rows * n..2 * rows * n], "the empty set adds nothing");
        assert_ne!(out[..rows * n], base[..rows * n], "set 0 moved its rows");
        assert!(PerSample::new(sets).on("m"));
    }
}
