//! Adapters on the device: the device twin of an `AdapterSet`. Each term's factors in bf16 (what
//! the kernels read), and for training the f32 master factors, their gradients and AdamW's
//! moments, all resident. Terms keep the set's order, so the tensors follow its parameter order
//! (A0, B0, A1, B1, …, a DoRA term's magnitude after its B); `by_module` finds a linear's.
//!
//! DoRA terms (`Kind::Dora`) add their magnitude and, per linear that carries one, the rescale's
//! buffers (`DoraLinear`): ‖W_j‖² of the frozen weight (computed on first use, W never changes),
//! and g and the row norms, rewritten on the DoRA rows by every forward and backward.

use super::to16;
use crate::adapters::{term_seed, AdapterSet, Kind};
use crate::engine::CudaBackend;
use crate::kernels::launch::DevMat;
use crate::kernels::lora::TermShape;
use crate::ops::lora::Dropout;
use anyhow::{ensure, Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicBool;

/// One host vector per tensor, in the adapters' parameter order.
pub type HostTensors = Vec<Vec<f32>>;

pub struct DevTerm {
    pub module: String,
    /// Position among its module's terms (the dropout seed's index, as on the CPU).
    pub index: usize,
    pub rank: usize,
    pub rows: Range<usize>,
    pub scale: f32,
    pub d_in: usize,
    pub a16: CudaSlice<bf16>,
    pub b16: CudaSlice<bf16>,
    /// Which of a per-sample batch's distinct sets it came from (0 for one set): the samples of
    /// that group see it (`DevLora::calls`), and a linear's DoRA state is its set's (`dora_of`).
    pub group: usize,
    /// DoRA: the magnitude [rows] f32 (the kernels' copy; training refreshes it from the master).
    pub magnitude: Option<CudaSlice<f32>>,
    /// Index of its first tensor in the parameter order (A; then B, then a DoRA magnitude).
    pub param0: usize,
}

/// The rescale state of one linear with DoRA terms, all [d_out] f32.
pub struct DoraLinear {
    /// ‖W_j‖² of the frozen weight, filled on first use (`w_sumsq_ready`).
    pub w_sumsq: CudaSlice<f32>,
    pub w_sumsq_ready: AtomicBool,
    /// g = m / ‖W + s·B·A‖ on the DoRA rows, 1 elsewhere (the GEMM's column scale).
    pub g: CudaSlice<f32>,
    /// ‖W + s·B·A‖ on the DoRA rows (the magnitude's gradient divides by it).
    pub norm: CudaSlice<f32>,
}

/// What training adds: f32 factors [A0, B0, …], gradients and moments in the same order.
pub struct DevTrain {
    pub params: Vec<CudaSlice<f32>>,
    pub grads: Vec<CudaSlice<f32>>,
    pub m: Vec<CudaSlice<f32>>,
    pub v: Vec<CudaSlice<f32>>,
}

#[derive(Default)]
pub struct DevLora {
    pub terms: Vec<DevTerm>,
    by_module: HashMap<String, Vec<usize>>,
    /// The linears with DoRA terms, by name and the `group` of the set the terms came from (0
    /// unless each sample has its own set); `dora_of` finds a call's.
    pub dora: HashMap<(String, usize), DoraLinear>,
    /// Dropout probability and this step's seed (training).
    pub dropout: Option<(f32, u64)>,
    pub train: Option<DevTrain>,
    /// With one set per sample (`per_sample`; inference only): the group of each sample's set.
    pub sample_groups: Option<Vec<usize>>,
}

impl DevLora {
    /// The device twin of `set` (its terms in order, factors rounded to bf16); with `train`, also
    /// the f32 masters, zeroed gradients and moments. `dims_of` gives each module's input and
    /// output widths (None: no such linear).
    pub fn from_set(
        g: &CudaBackend,
        set: &AdapterSet,
        dims_of: &dyn Fn(&str) -> Option<(usize, usize)>,
        train: bool,
    ) -> Result<DevLora> {
        let st = &g.stream;
        let mut out = DevLora::default();
        let mut tr = DevTrain { params: Vec::new(), grads: Vec::new(), m: Vec::new(), v: Vec::new() };
        let mut param0 = 0;
        for (i, t) in set.terms().iter().enumerate() {
            let (Kind::Lora { rank } | Kind::Dora { rank }) = t.kind else {
                let kind = match t.kind {
                    Kind::DoraColumns { .. } => "DoRA decomposed per input column (a dora_scale [1, in])",
                    k => k.name(),
                };
                anyhow::bail!(
                    "adapter on `{}` is {kind}: the CUDA engine runs LoRA and per-row DoRA terms only so far; use \
                     --device cpu",
                    t.module
                );
            };
            let (d_in, d_out) = dims_of(&t.module)
                .ok_or_else(|| anyhow::anyhow!("adapter on `{}`: no such linear in the model", t.module))?;
            ensure!(
                t.rows.start < t.rows.end && t.rows.end <= d_out,
                "adapter on {}: output rows {:?} outside the linear's 0..{d_out}",
                t.module,
                t.rows
            );
            ensure!(
                t.d_in == d_in && t.sizes_ok(),
                "adapter on {}: A has {} values (expected {}), B {} (expected {}){}",
                t.module,
                t.a().len(),
                rank * d_in,
                t.b().len(),
                t.rows.len() * rank,
                match t.kind {
                    Kind::Dora { .. } => format!(", the magnitude {} (expected {})", t.magnitude().len(), t.rows.len()),
                    _ => String::new(),
                }
            );
            let dora = matches!(t.kind, Kind::Dora { .. });
            if dora {
                ensure!(
                    t.magnitude().iter().all(|m| m.is_finite()),
                    "DoRA adapter on {}: its magnitude holds a value that is not finite",
                    t.module
                );
                // One column scale per linear: DoRA terms on the same rows would each rescale
                // the frozen product (the CPU reference adds their (g − 1)·X·Wᵀ), which one
                // scale cannot express.
                let overlaps = out.on(&t.module).iter().any(|&j| {
                    let o = &out.terms[j];
                    o.magnitude.is_some() && o.rows.start < t.rows.end && t.rows.start < o.rows.end
                });
                ensure!(
                    !overlaps,
                    "adapter on {}: two DoRA terms on overlapping output rows; the CUDA engine rescales each row \
                     once (use --device cpu)",
                    t.module
                );
                if let std::collections::hash_map::Entry::Vacant(e) = out.dora.entry((t.module.clone(), 0)) {
                    e.insert(DoraLinear {
                        w_sumsq: st.alloc_zeros::<f32>(d_out)?,
                        w_sumsq_ready: AtomicBool::new(false),
                        g: st.clone_htod(&vec![1f32; d_out])?,
                        norm: st.clone_htod(&vec![1f32; d_out])?,
                    });
                }
            }
            let list = out.by_module.entry(t.module.clone()).or_default();
            let index = list.len();
            list.push(i);
            if train {
                for f in &t.params {
                    tr.params.push(st.clone_htod(f.as_slice())?);
                    tr.grads.push(st.alloc_zeros::<f32>(f.len())?);
                    tr.m.push(st.alloc_zeros::<f32>(f.len())?);
                    tr.v.push(st.alloc_zeros::<f32>(f.len())?);
                }
            }
            out.terms.push(DevTerm {
                module: t.module.clone(),
                index,
                rank,
                rows: t.rows.clone(),
                scale: t.scale,
                d_in,
                a16: st.clone_htod(&to16(t.a()))?,
                b16: st.clone_htod(&to16(t.b()))?,
                group: 0,
                magnitude: if dora { Some(st.clone_htod(t.magnitude())?) } else { None },
                param0,
            });
            param0 += t.params.len();
        }
        out.train = train.then_some(tr);
        out.dropout = set.dropout();
        Ok(out)
    }

    /// One set per sample of a batch (inference, issue 20): sample i's rows of every linear see
    /// only `sets[i]`'s terms. A set shared by several samples (the same terms, the same
    /// strengths) is uploaded once and its terms name all of them.
    pub fn per_sample(
        g: &CudaBackend,
        sets: &[AdapterSet],
        dims_of: &dyn Fn(&str) -> Option<(usize, usize)>,
    ) -> Result<DevLora> {
        ensure!(!sets.is_empty(), "per-sample adapters for an empty batch");
        let mut out = DevLora::default();
        let mut distinct: Vec<&AdapterSet> = Vec::new();
        let mut groups = Vec::with_capacity(sets.len());
        for (i, set) in sets.iter().enumerate() {
            if let Some(group) = distinct.iter().position(|s| same_set(s, set)) {
                groups.push(group);
                continue;
            }
            let one = DevLora::from_set(g, set, dims_of, false)
                .with_context(|| format!("the adapters of sample {i} of the batch"))?;
            // Each distinct set keeps its own DoRA state (g, the norms): calls of different
            // samples on one linear must not read another set's rescale.
            let group = distinct.len();
            out.dora.extend(one.dora.into_iter().map(|((m, _), d)| ((m, group), d)));
            for mut t in one.terms {
                t.group = group;
                out.by_module.entry(t.module.clone()).or_default().push(out.terms.len());
                out.terms.push(t);
            }
            distinct.push(set);
            groups.push(group);
        }
        out.sample_groups = Some(groups);
        Ok(out)
    }

    /// The batch size the adapters were set for, when each sample has its own set.
    pub fn batch(&self) -> Option<usize> {
        self.sample_groups.as_ref().map(Vec::len)
    }

    /// The calls a linear named `name` with `m` input rows makes: row ranges with the indices of
    /// the terms on them. One call over every row unless the sets differ per sample; then
    /// consecutive samples that see the same terms share a call. Every linear takes its input
    /// sample-major ([b · rows, k]), so sample i's rows are i·m/b .. (i+1)·m/b.
    pub fn calls(&self, name: &str, m: usize) -> Result<Vec<(Range<usize>, Vec<usize>)>> {
        let all = self.on(name);
        let Some(groups) = &self.sample_groups else { return Ok(vec![(0..m, all.to_vec())]) };
        let b = groups.len();
        ensure!(m.is_multiple_of(b), "{name}: {m} rows do not split into the batch's {b} samples");
        let rows = m / b;
        let mut out: Vec<(Range<usize>, Vec<usize>)> = Vec::new();
        for (i, &group) in groups.iter().enumerate() {
            let idx: Vec<usize> = all.iter().copied().filter(|&t| self.terms[t].group == group).collect();
            match out.last_mut() {
                Some((r, last)) if *last == idx => r.end += rows,
                _ => out.push((i * rows..(i + 1) * rows, idx)),
            }
        }
        Ok(out)
    }

    /// The DoRA state of linear `name` for a call with the terms `idx` when one of them is DoRA:
    /// their set's (every term of one call comes from one set).
    pub fn dora_of(&self, name: &str, idx: &[usize]) -> Option<&DoraLinear> {
        let t = idx.iter().find(|&&i| self.terms[i].magnitude.is_some())?;
        self.dora.get(&(name.to_string(), self.terms[*t].group))
    }

    /// Indices of the terms on module `name`.
    pub fn on(&self, name: &str) -> &[usize] {
        self.by_module.get(name).map_or(&[], |v| v.as_slice())
    }

    pub fn shape(&self, i: usize) -> TermShape {
        let t = &self.terms[i];
        TermShape {
            rank: t.rank,
            rows: t.rows.clone(),
            scale: t.scale,
            dropout: self.dropout.map(|(p, seed)| Dropout { p, seed: term_seed(seed, &t.module, t.index) }),
            col_scaled: t.magnitude.is_some(),
        }
    }

    /// Zeroes every gradient (before a step's micro-batches).
    pub fn zero_grads(&mut self, g: &CudaBackend) -> Result<()> {
        if let Some(t) = self.train.as_mut() {
            for x in t.grads.iter_mut() {
                g.stream.memset_zeros(x)?;
            }
        }
        Ok(())
    }

    /// Refreshes the bf16 factors (and DoRA's magnitudes) from the f32 masters (after an
    /// optimizer step).
    pub fn sync_factors(&mut self, g: &CudaBackend) -> Result<()> {
        let Some(t) = self.train.as_ref() else { return Ok(()) };
        for term in &self.terms {
            let (a, b) = (&t.params[term.param0], &t.params[term.param0 + 1]);
            g.copy.cast_f32_to_bf16(a.into(), (&term.a16).into(), a.len())?;
            g.copy.cast_f32_to_bf16(b.into(), (&term.b16).into(), b.len())?;
            if let Some(m) = &term.magnitude {
                let src = &t.params[term.param0 + 2];
                g.copy.copy2d(1, m.len(), DevMat::f32(src, m.len()), DevMat::f32(m, m.len()), false)?;
            }
        }
        Ok(())
    }

    /// Copies the f32 masters to the host (checkpoints and the exported LoRA).
    pub fn download_params(&self, g: &CudaBackend) -> Result<Vec<Vec<f32>>> {
        let t = self.train.as_ref().ok_or_else(|| anyhow::anyhow!("no training state on the device"))?;
        t.params.iter().map(|p| Ok(g.stream.clone_dtoh(p)?)).collect()
    }

    /// Gradients to the host (tests).
    pub fn download_grads(&self, g: &CudaBackend) -> Result<Vec<Vec<f32>>> {
        let t = self.train.as_ref().ok_or_else(|| anyhow::anyhow!("no training state on the device"))?;
        t.grads.iter().map(|p| Ok(g.stream.clone_dtoh(p)?)).collect()
    }

    /// Moments to and from the host (checkpoints).
    pub fn download_moments(&self, g: &CudaBackend) -> Result<(HostTensors, HostTensors)> {
        let t = self.train.as_ref().ok_or_else(|| anyhow::anyhow!("no training state on the device"))?;
        let dl = |v: &Vec<CudaSlice<f32>>| -> Result<HostTensors> {
            v.iter().map(|p| Ok(g.stream.clone_dtoh(p)?)).collect()
        };
        Ok((dl(&t.m)?, dl(&t.v)?))
    }

    pub fn upload_moments(&mut self, g: &CudaBackend, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        let t = self.train.as_mut().ok_or_else(|| anyhow::anyhow!("no training state on the device"))?;
        ensure!(m.len() == t.m.len() && v.len() == t.v.len(), "optimizer state: tensor count differs");
        for (d, h) in t.m.iter_mut().zip(m).chain(t.v.iter_mut().zip(v)) {
            ensure!(d.len() == h.len(), "optimizer state: tensor size differs");
            g.stream.memcpy_htod(h, d)?;
        }
        Ok(())
    }
}

/// True when two sets apply the same terms at the same strengths (the same parameter tensors).
fn same_set(a: &AdapterSet, b: &AdapterSet) -> bool {
    a.terms().len() == b.terms().len()
        && a.terms().iter().zip(b.terms()).all(|(x, y)| {
            x.module == y.module
                && x.rows == y.rows
                && x.scale == y.scale
                && x.kind == y.kind
                && x.params.len() == y.params.len()
                && x.params.iter().zip(&y.params).all(|(p, q)| std::sync::Arc::ptr_eq(p, q))
        })
}
