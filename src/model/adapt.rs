//! What the model asks of adapters. The CPU reference names every linear by its BFL module name
//! (`double_blocks.3.img_attn.qkv`) and, after its frozen product, lets whatever is attached add
//! its output and, in the backward, take its gradients. The model knows no LoRA: the adapter
//! kinds live a layer above it (src/adapters/), which implements `LinearAdapters` for a set of terms.

use std::collections::HashMap;

/// One call of a linear as adapters see it: the module, its input [m, k] and its output width n.
#[derive(Clone, Copy, Debug)]
pub struct LinearCall<'a> {
    /// The BFL module name (`double_blocks.3.img_attn.qkv`).
    pub module: &'a str,
    pub inp: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// The frozen weight and product, given only where an adapter asks for them
    /// (`LinearAdapters::needs_frozen`).
    pub frozen: Option<Frozen<'a>>,
}

/// What an adapter that rescales the frozen linear (DoRA) needs of it: the weight [n, k]
/// (dequantised to f32) and its product with the input [m, n], without the bias.
#[derive(Clone, Copy, Debug)]
pub struct Frozen<'a> {
    pub weight: &'a [f32],
    pub out: &'a [f32],
}

/// The adapters attached to the linears of one forward/backward call.
pub trait LinearAdapters {
    /// True when some adapter acts on module `module` (its backward has work to do).
    fn on(&self, module: &str) -> bool;

    /// True when an adapter on `module` needs the frozen weight and product (`LinearCall::frozen`);
    /// the model computes them only then.
    fn needs_frozen(&self, _module: &str) -> bool {
        false
    }

    /// out[m, n] += the adapters' output for the call.
    fn forward(&self, call: LinearCall, out: &mut [f32]);

    /// Backward of `forward` through the frozen weight from dout [m, n]: the adapters' parameter
    /// gradients accumulate into `grads`, and their input gradient is added to `dinp` (which
    /// already holds the base weight's part) when it is given.
    fn backward(&self, call: LinearCall, dout: &[f32], dinp: Option<&mut [f32]>, grads: &mut AdapterGrads);
}

/// The base model alone.
pub struct NoAdapters;

impl LinearAdapters for NoAdapters {
    fn on(&self, _: &str) -> bool {
        false
    }
    fn forward(&self, _: LinearCall, _: &mut [f32]) {}
    fn backward(&self, _: LinearCall, _: &[f32], _: Option<&mut [f32]>, _: &mut AdapterGrads) {}
}

/// The gradients of one adapter term: one tensor per parameter, in its kind's order (LoRA: dA,
/// dB). Empty until the backward first reaches the term.
pub type TermGrads = Vec<Vec<f32>>;

/// Gradients of every adapter term of a call, per module, in the order the terms were attached.
#[derive(Clone, Default, Debug)]
pub struct AdapterGrads {
    by_module: HashMap<String, Vec<TermGrads>>,
}

impl AdapterGrads {
    /// The accumulators of module `module`'s first `n` terms (created empty on first use).
    pub fn slot(&mut self, module: &str, n: usize) -> &mut [TermGrads] {
        let v = self.by_module.entry(module.to_string()).or_default();
        if v.len() < n {
            v.resize(n, TermGrads::new());
        }
        &mut v[..n]
    }

    /// Term `i` of module `module`.
    pub fn get(&self, module: &str, i: usize) -> Option<&TermGrads> {
        self.by_module.get(module).and_then(|v| v.get(i)).filter(|g| !g.is_empty())
    }
}
