//! Peak GPU memory of a LoRA training step, predicted from the configuration: frozen weights by
//! dtype, LoRA factors with their gradients and AdamW state, activations with and without
//! per-block checkpointing, inputs, workspace, as the device-resident step (src/engine/cuda/)
//! allocates them. A model, not a measurement: that step has not run on a GPU yet, so there is
//! no measured peak to set beside it (docs/memory.md; `bench-step` measures one).

pub mod activations;
pub mod steptime;
pub mod suggest;
pub mod swap;

use crate::adapters::config::{resolve_targets, LoraConfig};
use crate::model::config::FluxConfig;
use crate::quant::quantised_by_default;
use activations::*;
use anyhow::{bail, Result};

/// How the frozen base is stored on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Bf16,
    /// int8 codes, one f32 scale per output row.
    Int8,
    /// Plain e4m3 cast, no scale.
    Fp8,
    /// e4m3, one f32 scale per tensor.
    Fp8Scaled,
}

impl Base {
    pub fn parse(s: &str) -> Result<Base> {
        Ok(match s {
            "bf16" => Base::Bf16,
            "int8" => Base::Int8,
            "fp8" => Base::Fp8,
            "fp8-scaled" => Base::Fp8Scaled,
            _ => bail!("--base `{s}`: use bf16, int8, fp8 or fp8-scaled"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Base::Bf16 => "bf16",
            Base::Int8 => "int8",
            Base::Fp8 => "fp8",
            Base::Fp8Scaled => "fp8-scaled",
        }
    }

    /// Bytes of one stored weight [rows, cols].
    fn weight_bytes(self, name: &str, shape: &[usize]) -> usize {
        let numel: usize = shape.iter().product();
        if self == Base::Bf16 || !quantised_by_default(name, shape) {
            return 2 * numel;
        }
        numel
            + match self {
                Base::Int8 => 4 * shape[0],
                Base::Fp8Scaled => 4,
                _ => 0,
            }
    }
}

/// Everything the prediction depends on.
#[derive(Clone, Debug)]
pub struct Settings {
    pub base: Base,
    /// Image side lengths in pixels.
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    pub text_tokens: usize,
    pub checkpointing: bool,
    /// The modulation linears (3.2 B of FLUX.1-dev's 11.9 B parameters, one vector per sample)
    /// kept in host memory.
    pub modulation_on_host: bool,
    pub lora: LoraConfig,
    /// An H100/H200 running the sm_90a LoRA GEMM (src/kernels/lora.rs `BaseGemm::Hopper`): no f32
    /// base-product scratch where every rank is a multiple of 8 (TMA's row strides), and an
    /// 8-bit base dequantised to bf16 one linear at a time. False: the cuBLAS-base path of other
    /// cards (and of the Hopper kernels' fallbacks).
    pub hopper: bool,
    /// Blocks whose frozen weights live in pinned host memory and pass through device slots
    /// (`--blocks-to-swap`; swap.rs).
    pub blocks_to_swap: usize,
    /// With `checkpointing`: the block inputs in pinned host memory, at most two blocks' on the
    /// device at a time (src/engine/cuda/offload.rs: two in flight to the host in the forward;
    /// the block recomputing and the one arriving in the backward).
    pub offload_checkpoints: bool,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    pub name: &'static str,
    pub bytes: usize,
    /// Held in host memory, not counted in the GPU total.
    pub host: bool,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub components: Vec<Component>,
    pub trainable: usize,
    pub tokens: Tokens,
    pub swap: swap::SwapPlan,
}

impl Plan {
    pub fn gpu_total(&self) -> usize {
        self.components.iter().filter(|c| !c.host).map(|c| c.bytes).sum()
    }
}

/// cuBLAS(Lt) workspace on Hopper (as mistral.rs allocates it; docs/kernel-notes.md §3.1).
pub const CUBLAS_WORKSPACE: usize = 32 << 20;
/// The CUDA context and the loaded kernel images. An assumption, not a measurement (typical
/// contexts take a few hundred MiB); kept apart so it can be checked when a GPU run exists.
pub const CUDA_CONTEXT: usize = 512 << 20;

/// Whether a tensor belongs to a modulation linear (acts once per sample on `vec`).
pub fn is_modulation(name: &str) -> bool {
    name.contains("_mod.lin.") || name.contains(".modulation.lin.") || name.starts_with("final_layer.adaLN_modulation")
}

/// Image tokens: the VAE downsamples 8×, packing takes 2×2 latent pixels per token.
pub fn image_tokens(width: usize, height: usize) -> usize {
    (height / 16) * (width / 16)
}

pub fn plan(cfg: &FluxConfig, s: &Settings) -> Result<Plan> {
    if !s.width.is_multiple_of(16) || !s.height.is_multiple_of(16) || s.width == 0 || s.height == 0 {
        bail!("resolution {}x{}: sides must be positive multiples of 16 (8× VAE, 2×2 packing)", s.width, s.height);
    }
    if s.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let t = Tokens { img: image_tokens(s.width, s.height), txt: s.text_tokens };
    let sw = swap::swap_plan(cfg, s, |n, sh| s.base.weight_bytes(n, sh))?;
    let first_swapped = cfg.depth + cfg.depth_single - s.blocks_to_swap;
    let (mut blocks, mut modulation, mut rest) = (0, 0, 0);
    for (name, shape) in cfg.tensors() {
        let b = s.base.weight_bytes(&name, &shape);
        if swap::chain_index(cfg, &name).is_some_and(|k| k >= first_swapped) {
            continue;
        } else if is_modulation(&name) {
            modulation += b;
        } else if quantised_by_default(&name, &shape) {
            blocks += b;
        } else {
            rest += b;
        }
    }
    let specs = resolve_targets(cfg, &s.lora)?;
    let trainable: usize = specs.iter().map(|sp| sp.param_count()).sum();

    let (dbl, sgl) = (double_block_saved(cfg, t), single_block_saved(cfg, t));
    let n_blocks = cfg.depth + cfg.depth_single;
    let offload = s.checkpointing && s.offload_checkpoints;
    let saved = if s.checkpointing {
        // Every block's input (two with offload), plus one block's saved set rebuilt for its
        // backward.
        let largest = if cfg.depth > 0 { dbl } else { 0 }.max(if cfg.depth_single > 0 { sgl } else { 0 });
        let inputs_on_device = if offload { n_blocks.min(2) } else { n_blocks };
        inputs_on_device * block_input(cfg, t) + largest
    } else {
        cfg.depth * dbl + cfg.depth_single * sgl
    };
    // The LoRA linear's device scratch, kept at its largest use: cuBLAS's f32 base product
    // [tokens, max(d_out, d_in)] of an adapted linear (added to the adapters in the fused
    // epilogue), and S', G' [tokens, Σ rank] in bf16.
    let shapes: std::collections::HashMap<String, (usize, usize)> = cfg
        .modules()
        .into_iter()
        .filter_map(|m| match m.kind {
            crate::model::config::ModuleKind::Linear { d_out, d_in, .. } => Some((m.name, (d_out, d_in))),
            crate::model::config::ModuleKind::Norm { .. } => None,
        })
        .collect();
    let largest_linear = shapes.values().map(|(o, i)| o * i).max().unwrap_or(0);
    let mut ranks: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for sp in &specs {
        *ranks.entry(sp.target.module.as_str()).or_default() += sp.rank.div_ceil(8) * 8;
    }
    let f32_base_product = !(s.hopper && specs.iter().all(|sp| sp.rank.is_multiple_of(8)));
    let lora_scratch = ranks
        .iter()
        .map(|(module, r)| {
            let n = module_tokens(module, t);
            let (d_out, d_in) = shapes.get(*module).copied().unwrap_or((0, 0));
            usize::from(f32_base_product) * n * d_out.max(d_in) * 4 + 2 * n * r * 2
        })
        .max()
        .unwrap_or(0);
    // DoRA's backward recomputes the pre-rescale product and forms g ⊙ dY, both bf16
    // [tokens, d_out], for one linear at a time (engine::cuda `dora_dy`; the product is not kept
    // from the forward, so nothing more stays for the step).
    let dora_scratch = specs
        .iter()
        .filter(|sp| sp.dora)
        .map(|sp| 2 * 2 * module_tokens(&sp.target.module, t) * shapes.get(&sp.target.module).map_or(0, |d| d.0))
        .max()
        .unwrap_or(0);
    let transient = [(cfg.depth > 0, false), (cfg.depth_single > 0, true)]
        .iter()
        .filter(|(present, _)| *present)
        .map(|&(_, single)| block_backward_transient(cfg, t, single))
        .max()
        .unwrap_or(0)
        + stream_and_gradient(cfg, t);
    // Latents, noise, target and output in f32; T5 states and pooled CLIP in bf16; RoPE cos/sin.
    let inputs = 4 * t.img * cfg.in_channels * 4
        + t.txt * cfg.context_in_dim * 2
        + cfg.vec_in_dim * 2
        + 2 * t.joint() * cfg.head_dim / 2 * 4;

    let b = s.batch;
    let components = vec![
        Component { name: "base weights: block linears", bytes: blocks, host: false },
        Component { name: "base weights: modulation linears", bytes: modulation, host: s.modulation_on_host },
        Component { name: "base weights: embedders, final, biases, norms", bytes: rest, host: false },
        Component { name: "block swap: device slots (2 per swapped block kind)", bytes: sw.slots, host: false },
        Component { name: "block swap: swapped blocks' weights (pinned)", bytes: sw.host, host: true },
        Component { name: "LoRA factors (f32)", bytes: 4 * trainable, host: false },
        Component { name: "LoRA factors (bf16 copies the kernels read)", bytes: 2 * trainable, host: false },
        Component { name: "LoRA gradients (f32)", bytes: 4 * trainable, host: false },
        Component { name: "AdamW moments (2 × f32)", bytes: 8 * trainable, host: false },
        Component {
            name: if offload {
                "activations: two blocks' inputs + one block (checkpoints offloaded)"
            } else if s.checkpointing {
                "activations: block inputs + one block (checkpointing)"
            } else {
                "activations: every block's saved set"
            },
            bytes: b * saved,
            host: false,
        },
        Component {
            name: "offloaded checkpoints: every block's input (pinned)",
            bytes: if offload { b * n_blocks * block_input(cfg, t) } else { 0 },
            host: true,
        },
        Component { name: "backward working set (one block) + stream", bytes: b * transient, host: false },
        Component { name: "inputs, targets, RoPE tables", bytes: b * inputs, host: false },
        Component { name: "GEMM scratch (largest adapted linear)", bytes: b * lora_scratch, host: false },
        Component {
            name: "DoRA backward: Ypre and g ⊙ dY (largest DoRA linear)",
            bytes: b * dora_scratch,
            host: false,
        },
        // On an H100/H200 an 8-bit weight is dequantised to bf16 one linear at a time for the
        // Hopper GEMM (src/kernels/lora.rs, Buf::Wdeq).
        Component {
            name: "8-bit weight dequantised for the Hopper GEMM (largest linear)",
            bytes: if s.hopper && s.base != Base::Bf16 { largest_linear * 2 } else { 0 },
            host: false,
        },
        Component { name: "cuBLAS workspace", bytes: CUBLAS_WORKSPACE, host: false },
        Component { name: "CUDA context (assumed, not measured)", bytes: CUDA_CONTEXT, host: false },
    ];
    Ok(Plan { components, trainable, tokens: t, swap: sw })
}

pub fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The table: one row per component, the GPU total, and the host side if any.
pub fn table(p: &Plan) -> String {
    let mut s = String::new();
    for c in &p.components {
        let where_ = if c.host { "  (host)" } else { "" };
        s += &format!("  {:<56} {:>8.2} GiB{where_}\n", c.name, gib(c.bytes));
    }
    s += &format!("  {:<56} {:>8.2} GiB\n", "total on the GPU (predicted)", gib(p.gpu_total()));
    s
}

#[cfg(test)]
mod tests;
