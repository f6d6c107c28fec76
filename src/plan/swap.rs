//! Block swap in the plan (src/engine/cuda/swap.rs is what it models): the last N blocks of the
//! chain (double blocks then single blocks) keep their frozen weights in pinned host memory; the
//! device holds two slots per swapped block kind (one when only one block of that kind is
//! swapped); a step copies each swapped block in once per direction, except the two of each
//! kind still in their slots at each turn (forward → backward, and backward → the next forward).

use super::{plan, Settings};
use crate::model::config::FluxConfig;
use anyhow::{bail, Result};

/// PCIe 4.0 x16's usable host → device rate, assumed (not measured here): the figure the
/// swap's cost is predicted with.
pub const PCIE4_X16_BYTES_PER_S: f64 = 25e9;

/// The chain index of the block a tensor belongs to: double block i → i, single block j →
/// depth + j; None outside the blocks.
pub fn chain_index(cfg: &FluxConfig, name: &str) -> Option<usize> {
    let num = |rest: &str| rest.split('.').next()?.parse::<usize>().ok();
    if let Some(r) = name.strip_prefix("double_blocks.") {
        num(r)
    } else if let Some(r) = name.strip_prefix("single_blocks.") {
        num(r).map(|j| cfg.depth + j)
    } else {
        None
    }
}

/// What block swap moves, in bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SwapPlan {
    /// Swapped double and single blocks.
    pub double: usize,
    pub single: usize,
    /// The swapped blocks' weights in pinned host memory.
    pub host: usize,
    /// The device slots they pass through.
    pub slots: usize,
    /// Host → device bytes of one training step once warm (see the module comment).
    pub pcie_per_step: usize,
}

impl SwapPlan {
    /// Seconds the copies of one step take at `bytes_per_s` (a prediction from an assumed rate).
    pub fn pcie_seconds(&self, bytes_per_s: f64) -> f64 {
        self.pcie_per_step as f64 / bytes_per_s
    }
}

/// The swap of `s.blocks_to_swap` blocks, with `bytes(name, shape)` the stored size of a tensor.
pub fn swap_plan(cfg: &FluxConfig, s: &Settings, bytes: impl Fn(&str, &[usize]) -> usize) -> Result<SwapPlan> {
    let n_blocks = cfg.depth + cfg.depth_single;
    if s.blocks_to_swap > n_blocks {
        bail!(
            "--blocks-to-swap {}: this model has {n_blocks} blocks ({} double + {} single)",
            s.blocks_to_swap,
            cfg.depth,
            cfg.depth_single
        );
    }
    let first = n_blocks - s.blocks_to_swap;
    let (mut double_block, mut single_block, mut host) = (0, 0, 0);
    for (name, shape) in cfg.tensors() {
        let Some(k) = chain_index(cfg, &name) else { continue };
        let b = bytes(&name, &shape);
        match k {
            0 => double_block += b,
            k if k == cfg.depth => single_block += b,
            _ => {}
        }
        if k >= first {
            host += b;
        }
    }
    let double = cfg.depth.saturating_sub(first);
    let single = s.blocks_to_swap - double;
    let slots = double.min(2) * double_block + single.min(2) * single_block;
    let pcie_per_step = 2 * (double.saturating_sub(2) * double_block + single.saturating_sub(2) * single_block);
    Ok(SwapPlan { double, single, host, slots, pcie_per_step })
}

/// The smallest number of blocks to swap for the step to fit `limit` bytes (`--max-vram`), with
/// its predicted total; an error naming the setting when even swapping every block does not.
pub fn choose(cfg: &FluxConfig, s: &Settings, limit: usize) -> Result<(usize, usize)> {
    let n_blocks = cfg.depth + cfg.depth_single;
    let mut total = 0;
    for n in 0..=n_blocks {
        total = plan(cfg, &Settings { blocks_to_swap: n, ..s.clone() })?.gpu_total();
        if total <= limit {
            return Ok((n, total));
        }
    }
    // Only what is not set already.
    let mut tries: Vec<&str> = Vec::new();
    if !s.checkpointing {
        tries.push("--gradient-checkpointing");
    }
    if s.base == super::Base::Bf16 {
        tries.push("--base int8");
    }
    tries.push("a lower resolution or rank");
    bail!(
        "--max-vram {:.2} GiB: the step does not fit even with all {n_blocks} blocks swapped \
         ({:.2} GiB predicted); try {}",
        super::gib(limit),
        super::gib(total),
        tries.join(", ")
    )
}
