//! The transformer's frozen parameters, as a tree that mirrors BFL's module tree name for name.

use super::adapt::{AdapterGrads, Frozen, LinearAdapters, LinearCall};
use super::config::{FluxConfig, ModuleKind};
use super::param::Param;
use crate::ops::matmul::{linear_backward_input_pieces, linear_forward, linear_forward_pieces};
use crate::quant::{qlinear_backward_input, qlinear_forward};
use crate::util::Rng;
use anyhow::{Context, Result};
use std::collections::HashMap;

pub struct Linear {
    /// BFL module name: the key LoRA terms are looked up by.
    pub name: String,
    pub weight: Param,
    pub bias: Option<Param>,
    pub d_out: usize,
    pub d_in: usize,
}

impl Linear {
    fn call<'a>(&'a self, inp: &'a [f32], m: usize) -> LinearCall<'a> {
        LinearCall { module: &self.name, inp, m, k: self.d_in, n: self.d_out, frozen: None }
    }

    /// The frozen weight (dequantised) and its product with `inp` without the bias, for adapters
    /// that rescale the frozen linear (DoRA); None when no adapter on this module asks.
    fn frozen_parts(&self, inp: &[f32], m: usize, ad: &dyn LinearAdapters) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !ad.needs_frozen(&self.name) {
            return Ok(None);
        }
        let w = self.weight.load().with_context(|| self.name.clone())?.into_owned();
        let mut out = vec![0f32; m * self.d_out];
        linear_forward(&mut out, inp, &w, None, m, self.d_in, self.d_out);
        Ok(Some((w, out)))
    }

    /// out[m, d_out] = inp[m, d_in]·Wᵀ + b, then whatever `ad` attaches to this module.
    pub fn forward(&self, out: &mut [f32], inp: &[f32], m: usize, ad: &dyn LinearAdapters) -> Result<()> {
        let b = match &self.bias {
            Some(b) => Some(b.load()?),
            None => None,
        };
        // An 8-bit weight is never expanded whole: it is multiplied block by block.
        if let Some(q) = self.weight.quant() {
            let w = q.view().with_context(|| self.name.clone())?;
            qlinear_forward(out, inp, &w, b.as_deref(), m, self.d_in, self.d_out);
        } else {
            let pieces = self.weight.row_pieces(self.d_out).with_context(|| self.name.clone())?;
            linear_forward_pieces(out, inp, &pieces, b.as_deref(), m, self.d_in, self.d_out);
        }
        let frozen = self.frozen_parts(inp, m, ad)?;
        let frozen = frozen.as_ref().map(|(weight, out)| Frozen { weight, out });
        ad.forward(LinearCall { frozen, ..self.call(inp, m) }, out);
        Ok(())
    }

    /// Backward through the frozen weight: accumulates the gradients of this module's adapters
    /// into `grads` and, when `dinp` is given, overwrites it with the input gradient.
    pub fn backward(
        &self,
        dinp: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        m: usize,
        ad: &dyn LinearAdapters,
        grads: &mut AdapterGrads,
    ) -> Result<()> {
        if !ad.on(&self.name) && dinp.is_none() {
            return Ok(());
        }
        let mut dinp = dinp;
        if let Some(dx) = dinp.as_deref_mut() {
            if let Some(q) = self.weight.quant() {
                let w = q.view().with_context(|| self.name.clone())?;
                qlinear_backward_input(dx, dout, &w, m, self.d_in, self.d_out, 0.0);
            } else {
                let pieces = self.weight.row_pieces(self.d_out).with_context(|| self.name.clone())?;
                linear_backward_input_pieces(dx, dout, &pieces, m, self.d_in, self.d_out, 0.0);
            }
        }
        let frozen = self.frozen_parts(inp, m, ad)?;
        let frozen = frozen.as_ref().map(|(weight, out)| Frozen { weight, out });
        ad.backward(LinearCall { frozen, ..self.call(inp, m) }, dout, dinp, grads);
        Ok(())
    }

    /// The input gradient as a new buffer.
    pub fn backward_new(
        &self,
        dout: &[f32],
        inp: &[f32],
        m: usize,
        ad: &dyn LinearAdapters,
        grads: &mut AdapterGrads,
    ) -> Result<Vec<f32>> {
        let mut dx = vec![0f32; m * self.d_in];
        self.backward(Some(&mut dx), dout, inp, m, ad, grads)?;
        Ok(dx)
    }

    pub fn apply(&self, inp: &[f32], m: usize, ad: &dyn LinearAdapters) -> Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.d_out];
        self.forward(&mut out, inp, m, ad)?;
        Ok(out)
    }
}

/// in_layer → SiLU → out_layer (BFL `MLPEmbedder`).
pub struct MlpEmbedder {
    pub in_layer: Linear,
    pub out_layer: Linear,
}

/// One stream (image or text) of a double block: BFL's `{img,txt}_mod`, `_attn`, `_mlp`.
pub struct StreamWeights {
    pub modulation: Linear,
    pub qkv: Linear,
    pub q_norm: Param,
    pub k_norm: Param,
    pub proj: Linear,
    pub mlp0: Linear,
    pub mlp2: Linear,
}

pub struct DoubleBlock {
    pub img: StreamWeights,
    pub txt: StreamWeights,
}

pub struct SingleBlock {
    pub linear1: Linear,
    pub linear2: Linear,
    pub q_norm: Param,
    pub k_norm: Param,
    pub modulation: Linear,
}

pub struct FluxWeights {
    pub img_in: Linear,
    pub txt_in: Linear,
    pub time_in: MlpEmbedder,
    pub guidance_in: Option<MlpEmbedder>,
    pub vector_in: MlpEmbedder,
    pub double_blocks: Vec<DoubleBlock>,
    pub single_blocks: Vec<SingleBlock>,
    /// Final adaLN, rows [shift; scale] (BFL order).
    pub final_mod: Linear,
    pub final_linear: Linear,
}

impl FluxWeights {
    /// Builds the tree from BFL-named parameters (`get("img_in.weight")`).
    pub fn new(cfg: &FluxConfig, get: &dyn Fn(&str) -> Result<Param>) -> Result<FluxWeights> {
        let shapes: HashMap<String, (usize, usize, bool)> = cfg
            .modules()
            .into_iter()
            .filter_map(|m| match m.kind {
                ModuleKind::Linear { d_out, d_in, bias } => Some((m.name, (d_out, d_in, bias))),
                ModuleKind::Norm { .. } => None,
            })
            .collect();
        let lin = |name: String| -> Result<Linear> {
            let (d_out, d_in, has_bias) = shapes[&name];
            let bias = if has_bias { Some(get(&format!("{name}.bias"))?) } else { None };
            Ok(Linear { weight: get(&format!("{name}.weight"))?, bias, name, d_out, d_in })
        };
        let mlp = |p: &str| -> Result<MlpEmbedder> {
            Ok(MlpEmbedder { in_layer: lin(format!("{p}.in_layer"))?, out_layer: lin(format!("{p}.out_layer"))? })
        };
        let mut double_blocks = Vec::new();
        for i in 0..cfg.depth {
            let p = format!("double_blocks.{i}");
            let stream = |s: &str| -> Result<StreamWeights> {
                Ok(StreamWeights {
                    modulation: lin(format!("{p}.{s}_mod.lin"))?,
                    qkv: lin(format!("{p}.{s}_attn.qkv"))?,
                    q_norm: get(&format!("{p}.{s}_attn.norm.query_norm.scale"))?,
                    k_norm: get(&format!("{p}.{s}_attn.norm.key_norm.scale"))?,
                    proj: lin(format!("{p}.{s}_attn.proj"))?,
                    mlp0: lin(format!("{p}.{s}_mlp.0"))?,
                    mlp2: lin(format!("{p}.{s}_mlp.2"))?,
                })
            };
            double_blocks.push(DoubleBlock { img: stream("img")?, txt: stream("txt")? });
        }
        let mut single_blocks = Vec::new();
        for i in 0..cfg.depth_single {
            let p = format!("single_blocks.{i}");
            single_blocks.push(SingleBlock {
                linear1: lin(format!("{p}.linear1"))?,
                linear2: lin(format!("{p}.linear2"))?,
                q_norm: get(&format!("{p}.norm.query_norm.scale"))?,
                k_norm: get(&format!("{p}.norm.key_norm.scale"))?,
                modulation: lin(format!("{p}.modulation.lin"))?,
            });
        }
        Ok(FluxWeights {
            img_in: lin("img_in".into())?,
            txt_in: lin("txt_in".into())?,
            time_in: mlp("time_in")?,
            guidance_in: if cfg.guidance_embed { Some(mlp("guidance_in")?) } else { None },
            vector_in: mlp("vector_in")?,
            double_blocks,
            single_blocks,
            final_mod: lin("final_layer.adaLN_modulation.1".into())?,
            final_linear: lin("final_layer.linear".into())?,
        })
    }

    /// Every linear of the model, in forward order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.img_in, &self.txt_in, &self.time_in.in_layer, &self.time_in.out_layer];
        if let Some(g) = &self.guidance_in {
            v.extend([&g.in_layer, &g.out_layer]);
        }
        v.extend([&self.vector_in.in_layer, &self.vector_in.out_layer]);
        for b in &self.double_blocks {
            for s in [&b.img, &b.txt] {
                v.extend([&s.modulation, &s.qkv, &s.proj, &s.mlp0, &s.mlp2]);
            }
        }
        for b in &self.single_blocks {
            v.extend([&b.linear1, &b.linear2, &b.modulation]);
        }
        v.extend([&self.final_mod, &self.final_linear]);
        v
    }

    /// The linear named `name` (BFL module name), when the model has it.
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        self.linears().into_iter().find(|l| l.name == name)
    }

    /// Random weights for tests and shape-only runs: linears N(0, 1/fan_in), biases N(0, 0.02²),
    /// QK-norm scales 1 + N(0, 0.1²). Returned as BFL-named tensors.
    pub fn random_tensors(cfg: &FluxConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = Rng::new(seed);
        cfg.tensors()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.ends_with(".scale") {
                    rng.normal_vec(n, 0.1).into_iter().map(|v| 1.0 + v).collect()
                } else if name.ends_with(".bias") {
                    rng.normal_vec(n, 0.02)
                } else {
                    rng.normal_vec(n, 1.0 / (shape[1] as f32).sqrt())
                };
                (name, shape, data)
            })
            .collect()
    }

    pub fn from_tensors(cfg: &FluxConfig, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<FluxWeights> {
        let map: HashMap<String, Param> = tensors.into_iter().map(|(n, _, d)| (n, Param::owned(d))).collect();
        FluxWeights::new(cfg, &|n| map.get(n).cloned().ok_or_else(|| anyhow::anyhow!("no parameter `{n}`")))
    }
}
