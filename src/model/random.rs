//! A randomly initialised model that costs no memory until a tensor is read: every value is a
//! hash of (seed, tensor name, index), so any tensor, in any order, on any machine, comes out
//! the same. Initialised as PyTorch initialises a fresh model: nn.Linear's default
//! (kaiming_uniform with a = √5 gives U(±1/√fan_in) for the weight, and the bias draws from
//! the same bound), RMSNorm scales at one. For benchmarks at full size without a checkpoint.

use super::config::{FluxConfig, ModuleKind};
use super::param::Param;
use crate::util::{splitmix64 as mix, unit24};
use rayon::prelude::*;
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// U(−bound, bound)
    Uniform(f32),
    Const(f32),
}

/// A tensor generated on read.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomParam {
    /// The model seed mixed with the tensor name.
    pub stream: u64,
    pub init: Init,
    pub numel: usize,
}

/// FNV-1a over the name: stable across runs and platforms, unlike std's hasher.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

impl RandomParam {
    pub fn new(seed: u64, name: &str, init: Init, numel: usize) -> RandomParam {
        RandomParam { stream: mix(seed ^ mix(name_hash(name))), init, numel }
    }

    pub fn generate(&self) -> Vec<f32> {
        match self.init {
            Init::Const(v) => vec![v; self.numel],
            Init::Uniform(bound) => (0..self.numel)
                .into_par_iter()
                .map(|i| {
                    // 24 random bits: an exact f32 in [0, 1).
                    let u = unit24(mix(self.stream.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))));
                    bound * (2.0 * u - 1.0)
                })
                .collect(),
        }
    }
}

/// Every parameter of `cfg` under its BFL name, generated on read from `seed`.
pub fn random_params(cfg: &FluxConfig, seed: u64) -> HashMap<String, Param> {
    let mut out = HashMap::new();
    for m in cfg.modules() {
        match m.kind {
            ModuleKind::Linear { d_out, d_in, bias } => {
                let bound = 1.0 / (d_in as f32).sqrt();
                let mut put = |suffix: &str, numel| {
                    let name = format!("{}.{suffix}", m.name);
                    out.insert(name.clone(), Param::Random(RandomParam::new(seed, &name, Init::Uniform(bound), numel)));
                };
                put("weight", d_out * d_in);
                if bias {
                    put("bias", d_out);
                }
            }
            ModuleKind::Norm { dim } => {
                let name = format!("{}.scale", m.name);
                out.insert(name.clone(), Param::Random(RandomParam::new(seed, &name, Init::Const(1.0), dim)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_within_its_bound_with_its_moments_and_reproducible() {
        let p = RandomParam::new(3, "double_blocks.0.img_attn.qkv.weight", Init::Uniform(0.5), 100_000);
        let v = p.generate();
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        // U(−b, b): mean 0, variance b²/3 = 0.0833; 100k draws give about ±0.002 and ±0.0005.
        assert!(mean.abs() < 0.01 && (var - 0.25 / 3.0).abs() < 0.003, "mean {mean}, var {var}");
        assert_eq!(v, p.generate());
        let other_name = RandomParam::new(3, "double_blocks.0.img_attn.proj.weight", Init::Uniform(0.5), 8);
        let other_seed = RandomParam::new(4, "double_blocks.0.img_attn.qkv.weight", Init::Uniform(0.5), 8);
        assert_ne!(other_name.generate(), v[..8]);
        assert_ne!(other_seed.generate(), v[..8]);
    }

    #[test]
    fn every_tensor_of_the_config_with_pytorch_bounds() {
        let cfg = FluxConfig::tiny();
        let ps = random_params(&cfg, 0);
        assert_eq!(ps.len(), cfg.tensors().len());
        for (name, shape) in cfg.tensors() {
            let Param::Random(r) = &ps[&name] else { panic!("{name}") };
            assert_eq!(r.numel, shape.iter().product::<usize>());
        }
        let Param::Random(b) = &ps["single_blocks.0.linear2.bias"] else { panic!() };
        assert_eq!(b.init, Init::Uniform(1.0 / ((cfg.hidden_size + cfg.mlp_hidden) as f32).sqrt()));
        assert_eq!(ps["single_blocks.0.norm.key_norm.scale"].load().unwrap().to_vec(), vec![1.0; cfg.head_dim]);
    }
}
