//! When a plan does not fit: the same model with one setting changed, then two, then changes
//! stacked in order of what each costs the user (checkpointing costs a recomputed forward, its
//! offload PCIe copies that overlap the compute, 8-bit costs a little accuracy, lower resolution
//! and batch cost the run itself), keeping those that fit. Block swap (the fewest blocks that make the setting
//! fit as it is: it costs PCIe copies, not accuracy) is offered beside the single changes.

use super::{plan, swap, Base, Settings};
use crate::model::config::FluxConfig;
use anyhow::Result;

type Change = (String, Box<dyn Fn(&mut Settings)>);

fn changes(s: &Settings) -> Vec<Change> {
    let mut v: Vec<Change> = Vec::new();
    if !s.checkpointing {
        v.push(("per-block checkpointing on".into(), Box::new(|s| s.checkpointing = true)));
    }
    if !s.offload_checkpoints {
        v.push((
            "checkpointed block inputs in pinned host memory (--offload-checkpoints, with checkpointing)".into(),
            Box::new(|s| (s.checkpointing, s.offload_checkpoints) = (true, true)),
        ));
    }
    if s.base == Base::Bf16 {
        v.push(("int8 base (quantize --format int8)".into(), Box::new(|s| s.base = Base::Int8)));
    }
    // Host-held modulation weights are a what-if of `plan --modulation host` only: the trainer
    // keeps them on the GPU, so they are not offered as a way to fit.
    if s.batch > 1 {
        v.push(("batch 1".into(), Box::new(|s| s.batch = 1)));
    }
    // Resolutions down to 512 on the long side, keeping the aspect ratio on the 16-pixel grid.
    let long = s.width.max(s.height);
    for side in [1024usize, 768, 512] {
        if side < long {
            let (w, h) = (s.width * side / long / 16 * 16, s.height * side / long / 16 * 16);
            v.push((format!("resolution {w}x{h}"), Box::new(move |s| (s.width, s.height) = (w, h))));
        }
    }
    v
}

/// Settings that fit in `limit` bytes, each with what changed and its predicted total: every
/// single change that fits; if none does, every pair that fits; if none does, the shortest
/// stack of changes (in the order above) that fits. Then block swap of the settings as they are,
/// where some number of swapped blocks fits.
pub fn fitting(cfg: &FluxConfig, s: &Settings, limit: usize) -> Result<Vec<(String, usize)>> {
    let mut out = changed(cfg, s, limit)?;
    // Nothing fits even with every block swapped: no swap line (`swap::choose` errs only there).
    if let Ok((n, total)) = swap::choose(cfg, s, limit) {
        if n > s.blocks_to_swap {
            out.push((
                format!("block swap: {n} blocks' weights in host memory (--blocks-to-swap {n}, or --max-vram)"),
                total,
            ));
        }
    }
    Ok(out)
}

/// `fitting` without block swap.
fn changed(cfg: &FluxConfig, s: &Settings, limit: usize) -> Result<Vec<(String, usize)>> {
    let all = changes(s);
    let try_set = |idx: &[usize]| -> Result<Option<(String, usize)>> {
        let mut t = s.clone();
        idx.iter().for_each(|&i| (all[i].1)(&mut t));
        let total = plan(cfg, &t)?.gpu_total();
        let what: Vec<&str> = idx.iter().map(|&i| all[i].0.as_str()).collect();
        Ok((total <= limit).then(|| (what.join(" + "), total)))
    };
    let singles: Vec<_> = (0..all.len()).map(|i| try_set(&[i])).collect::<Result<Vec<_>>>()?;
    let out: Vec<_> = singles.into_iter().flatten().collect();
    if !out.is_empty() {
        return Ok(out);
    }
    let is_res = |i: usize| all[i].0.starts_with("resolution");
    let mut pairs = Vec::new();
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            if !(is_res(i) && is_res(j)) {
                pairs.extend(try_set(&[i, j])?);
            }
        }
    }
    if !pairs.is_empty() {
        return Ok(pairs);
    }
    // Stacked in order; a resolution replaces the one before it.
    let mut stack: Vec<usize> = Vec::new();
    for i in 0..all.len() {
        if is_res(i) {
            stack.retain(|&k| !is_res(k));
        }
        stack.push(i);
        if let Some(hit) = try_set(&stack)? {
            return Ok(vec![hit]);
        }
    }
    Ok(vec![])
}
