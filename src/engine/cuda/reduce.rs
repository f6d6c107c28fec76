//! Data parallelism on the device: the adapters' gradients summed over the ranks through NCCL,
//! in buckets started while the backward still runs (issue 21 §3, docs/multi-gpu.md).
//!
//! The gradient tensors are grouped into buckets of at most `dist::bucket_bytes()` (25 MB by
//! default, PyTorch DDP's `bucket_cap_mb`), in the order the backward finishes them: the final
//! layer first, then the single blocks from the last to the first, then the double blocks, then
//! the embeddings. The backward reports each finished part (`GradsDone`); once every tensor of a
//! bucket is final, an event is recorded on the compute stream, a communication stream waits for
//! it and runs the bucket's all-reduces there as one NCCL group, so the wire works while the
//! compute stream goes on with the earlier blocks' backward. `CudaEngine::all_reduce_grads`
//! starts what is left (everything, when no backward was armed) and waits, polling NCCL's async
//! error against a timeout so that a lost rank is an error, not a hang; the compute stream then
//! waits for the communication stream before the optimizer reads the gradients.
//!
//! Deterministic (`--deterministic-reduce`): each bucket is all-gathered instead ([world × n] per
//! tensor) and, after the wait, added on the compute stream in rank order (rank 0's + rank 1's +
//! …), the order of the CPU path and of one rank running the ranks' slices one after another.
//! It costs world × the gradients' bytes of transient device memory and world × the bytes on
//! the wire.
//!
//! Every rank makes the same NCCL calls in the same order whatever its backward did (a rank whose
//! backward was skipped starts all its buckets in `all_reduce_grads`), as NCCL requires.

use super::train::CudaEngine;
use super::{FwdState, F32};
use crate::dist::nccl::Comm;
use crate::kernels::launch::{DevMat, View};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far the backward has come: the adapter gradients of the part it names are final (and
/// those of every part before it in the backward's order). `All`: the whole backward is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradsDone {
    /// The final layer (its linear and adaLN modulation).
    Head,
    /// single_blocks.i (the backward runs them from the last to the first).
    Single(usize),
    /// double_blocks.i (after every single block, from the last to the first).
    Double(usize),
    All,
}

impl GradsDone {
    /// The part's place in the backward's order, for a model of `n_double` and `n_single` blocks.
    fn position(self, n_double: usize, n_single: usize) -> usize {
        match self {
            GradsDone::Head => 0,
            GradsDone::Single(i) if i < n_single => 1 + (n_single - 1 - i),
            GradsDone::Double(i) if i < n_double => 1 + n_single + (n_double - 1 - i),
            _ => 1 + n_single + n_double,
        }
    }

    /// The part whose backward finishes the adapter gradients of module `name` (anything outside
    /// the blocks and the final layer, such as img_in or time_in, finishes at the end).
    pub fn of_module(name: &str) -> GradsDone {
        let block = |prefix: &str| name.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok();
        if let Some(i) = block("single_blocks.") {
            GradsDone::Single(i)
        } else if let Some(i) = block("double_blocks.") {
            GradsDone::Double(i)
        } else if name.starts_with("final_layer.") {
            GradsDone::Head
        } else {
            GradsDone::All
        }
    }
}

/// Gradient tensors all-reduced together, and the position in the backward after which every one
/// of them is final.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    pub tensors: Vec<usize>,
    pub ready: usize,
    pub bytes: usize,
}

/// Buckets of at most `cap` bytes over tensors given as (f32 count, position where it is final),
/// filled in the order the backward finishes them; a tensor above the cap is a bucket alone.
pub fn plan_buckets(tensors: &[(usize, usize)], cap: usize) -> Vec<Bucket> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&t| (tensors[t].1, t));
    let mut out: Vec<Bucket> = Vec::new();
    for t in order {
        let (n, at) = tensors[t];
        let bytes = 4 * n;
        match out.last_mut() {
            Some(b) if b.bytes + bytes <= cap => {
                b.tensors.push(t);
                b.ready = b.ready.max(at);
                b.bytes += bytes;
            }
            _ => out.push(Bucket { tensors: vec![t], ready: at, bytes }),
        }
    }
    out
}

/// This step's reduce once started: the communicator, the mode, the buckets started so far and,
/// deterministic, each tensor's gathered copies.
struct Armed {
    comm: Comm,
    deterministic: bool,
    launched: usize,
    /// Buckets started before the backward's end (overlapping it).
    early: usize,
    gathered: Vec<(usize, F32)>,
}

/// The engine's reduce: the communication stream, the bucket plan (rebuilt when the adapters
/// change) and this step's state.
pub struct GradReduce {
    comm_stream: Arc<CudaStream>,
    /// The tensor sizes the plan was made for.
    sizes: Vec<usize>,
    buckets: Vec<Bucket>,
    /// Positions in the backward's order: (double blocks, single blocks).
    blocks: (usize, usize),
    armed: Option<Armed>,
    /// The last finished step's buckets started during the backward.
    last_early: Option<usize>,
}

impl GradReduce {
    /// Starts every bucket whose tensors are final at `done`, not started yet: one event on the
    /// compute stream, the communication stream waits for it, then each bucket's collectives as
    /// one NCCL group there.
    fn launch_ready(&mut self, compute: &Arc<CudaStream>, grads: &[F32], done: GradsDone) -> Result<()> {
        let Some(a) = self.armed.as_mut() else { return Ok(()) };
        let pos = done.position(self.blocks.0, self.blocks.1);
        let ready = self.buckets[a.launched..].iter().take_while(|b| b.ready <= pos).count();
        if ready == 0 {
            return Ok(());
        }
        let batch = &self.buckets[a.launched..a.launched + ready];
        // Deterministic: each tensor's gathered copies [world × n], allocated on the compute
        // stream before the event, so that the communication stream uses them after their
        // allocation (stream-ordered with memory pools).
        let world = a.comm.world;
        let mut fresh: Vec<Vec<(usize, F32)>> = Vec::new();
        for b in batch {
            let mut outs = Vec::new();
            if a.deterministic {
                for &t in &b.tensors {
                    // SAFETY: the all-gather below writes every element before anything reads them.
                    outs.push((t, unsafe { compute.alloc::<f32>(world * grads[t].len()) }?));
                }
            }
            fresh.push(outs);
        }
        let written = compute.record_event(None).context("all-reduce: an event on the compute stream")?;
        self.comm_stream.wait(&written).context("all-reduce: the communication stream's wait")?;
        let cs = self.comm_stream.cu_stream() as *mut c_void;
        for (b, outs) in batch.iter().zip(fresh) {
            let comm = &a.comm;
            comm.group(|| {
                if a.deterministic {
                    for (t, out) in &outs {
                        let (src, _s) = grads[*t].device_ptr(&self.comm_stream);
                        let (dst, _d) = out.device_ptr(&self.comm_stream);
                        // SAFETY: `grads[t]` holds n f32 and `out` world × n, both kept (by the
                        // engine and by `Armed`) until `all_reduce_grads` has waited for the stream.
                        unsafe { comm.all_gather_device(src, dst, grads[*t].len(), cs)? };
                    }
                } else {
                    for &t in &b.tensors {
                        let (p, _s) = grads[t].device_ptr(&self.comm_stream);
                        // SAFETY: in place on n f32 the engine keeps past the wait in
                        // `all_reduce_grads`; the stream is this context's.
                        unsafe { comm.all_reduce_device(p, grads[t].len(), cs)? };
                    }
                }
                Ok(())
            })?;
            a.gathered.extend(outs);
        }
        a.launched += ready;
        if done != GradsDone::All {
            a.early += ready;
        }
        Ok(())
    }
}

impl CudaEngine {
    /// The reduce's state, (re)planned for the current adapters' gradients.
    fn grad_reduce(&mut self) -> Result<&mut GradReduce> {
        let t = self.lora.train.as_ref().context("no training state on the device")?;
        let sizes: Vec<usize> = t.grads.iter().map(|g| g.len()).collect();
        let (nd, ns) = (self.m.w.n_double(), self.m.w.n_single());
        // Where each tensor is final: LoRA terms hold [A, B] in term order; any other layout
        // (another kind's tensors) is treated as final only at the end, which is always safe.
        let at: Vec<usize> = if sizes.len() == 2 * self.lora.terms.len() {
            let pos = |i: usize| GradsDone::of_module(&self.lora.terms[i / 2].module).position(nd, ns);
            (0..sizes.len()).map(pos).collect()
        } else {
            vec![GradsDone::All.position(nd, ns); sizes.len()]
        };
        if self.reduce.as_ref().is_none_or(|r| r.sizes != sizes) {
            ensure!(
                self.reduce.as_ref().is_none_or(|r| r.armed.is_none()),
                "the adapters changed while a gradient all-reduce was under way"
            );
            let comm_stream = match self.reduce.take() {
                Some(r) => r.comm_stream,
                None => {
                    let g = super::CudaBackend::lock(&self.m.be)?;
                    g.ctx.new_stream().context("all-reduce: the communication stream")?
                }
            };
            let tensors: Vec<(usize, usize)> = sizes.iter().copied().zip(at).collect();
            let buckets = plan_buckets(&tensors, crate::dist::bucket_bytes()?);
            let r = GradReduce { comm_stream, sizes, buckets, blocks: (nd, ns), armed: None, last_early: None };
            self.reduce = Some(r);
        }
        Ok(self.reduce.as_mut().expect("made above"))
    }

    /// What the last step's reduce did: its buckets and how many of them started during the
    /// backward (None before the first).
    pub fn reduce_summary(&self) -> Option<String> {
        let r = self.reduce.as_ref()?;
        let early = r.last_early?;
        let largest = r.buckets.iter().map(|b| b.bytes).max().unwrap_or(0);
        Some(format!(
            "gradient all-reduce: {} buckets (largest {:.3} MB, FLUX_KERNELS_REDUCE_BUCKET_MB), {early} of them started \
             during the backward",
            r.buckets.len(),
            largest as f64 / 1e6
        ))
    }

    /// Arms the overlapped reduce: the next backward starts each bucket's collectives as soon as
    /// its gradients are final. Call it before the step's last backward only (a later backward
    /// would add to gradients already on the wire: refused).
    pub fn arm_reduce(&mut self, comm: &Comm, deterministic: bool) -> Result<()> {
        check_nccl_reads_this_device(self, comm)?;
        let r = self.grad_reduce()?;
        ensure!(r.armed.is_none(), "the previous step's gradient all-reduce was not waited for");
        r.armed = Some(Armed { comm: comm.clone(), deterministic, launched: 0, early: 0, gathered: Vec::new() });
        Ok(())
    }

    /// The backward into the gradient accumulators, starting the armed reduce's buckets as the
    /// backward finishes them.
    pub(super) fn backward_reducing(&mut self, state: FwdState, dpred: &F32) -> Result<()> {
        if let Some(a) = self.reduce.as_ref().and_then(|r| r.armed.as_ref()) {
            ensure!(
                a.launched == 0,
                "a backward after this step's gradient all-reduce had started: arm the reduce before the \
                 step's last backward only"
            );
        }
        let (m, lora, reduce) = (&mut self.m, &self.lora, &mut self.reduce);
        let grads: &[F32] = lora.train.as_ref().map_or(&[], |t| &t.grads);
        m.backward_reporting(state, dpred, lora, &mut |st, done| match reduce.as_mut() {
            Some(r) => r.launch_ready(st, grads, done),
            None => Ok(()),
        })
    }

    /// Data parallelism (dist): the gradient accumulators summed over the ranks of `comm` in
    /// place. Starts the buckets the backward did not (all of them when `arm_reduce` was not
    /// called), then waits for the communication stream, polling the communicator's async error
    /// and giving up after `timeout` (the communicator is then aborted), so that a lost rank is an
    /// error, not a hang. `deterministic`: the rank-order sum of the all-gathered gradients.
    pub fn all_reduce_grads(&mut self, comm: &Comm, deterministic: bool, timeout: Duration) -> Result<()> {
        if self.reduce.as_ref().is_none_or(|r| r.armed.is_none()) {
            self.arm_reduce(comm, deterministic)?;
        }
        let compute = super::CudaBackend::lock(&self.m.be)?.stream.clone();
        let (lora, reduce) = (&self.lora, self.reduce.as_mut().expect("armed above"));
        let grads: &[F32] = &lora.train.as_ref().context("no training state on the device")?.grads;
        {
            let a = reduce.armed.as_ref().expect("armed above");
            ensure!(
                a.comm.same(comm) && a.deterministic == deterministic,
                "the gradient all-reduce was armed with another communicator or mode"
            );
        }
        let started = reduce.launch_ready(&compute, grads, GradsDone::All);
        let a = reduce.armed.take().expect("armed above");
        started?;
        let done = reduce.comm_stream.record_event(None)?;
        let start = Instant::now();
        while !done.try_is_complete()? {
            comm.async_error()?;
            if start.elapsed() > timeout {
                comm.mark_failed();
                bail!(
                    "rank {}: the gradient all-reduce did not finish in {} s (a rank stopped?; FLUX_KERNELS_DIST_TIMEOUT_S)",
                    comm.rank,
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        comm.async_error()?;
        // The optimizer and the next step's zeroing run on the compute stream: after the wire.
        compute.wait(&done)?;
        reduce.last_early = Some(a.early);
        if a.deterministic {
            let g = super::CudaBackend::lock(&self.m.be)?;
            for (t, all) in &a.gathered {
                let n = grads[*t].len();
                for r in 0..a.comm.world {
                    let theirs = View::from(all).slice(r * n..(r + 1) * n)?;
                    // Rank 0's copied, then each next rank's added: (g₀ + g₁) + g₂ + …
                    g.copy.copy2d(1, n, DevMat::f32(theirs, n), DevMat::f32(&grads[*t], n), r > 0)?;
                }
            }
        }
        Ok(())
    }
}

/// The emulated NCCL reads and writes host memory: right for the CUDA emulation (whose device
/// memory is host memory), wrong for a GPU's.
fn check_nccl_reads_this_device(e: &CudaEngine, comm: &Comm) -> Result<()> {
    if !comm.emulated() {
        return Ok(());
    }
    let name = super::CudaBackend::lock(&e.m.be)?.ctx.name().unwrap_or_default();
    if !name.contains("fkemu") {
        bail!(
            "{} works on host memory and this is a GPU ({name}): use the real NCCL (unset FLUX_KERNELS_NCCL)",
            comm.library()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_ordered_as_the_backward_runs() {
        let at = |n: &str| GradsDone::of_module(n).position(2, 3);
        assert_eq!(at("final_layer.linear"), 0);
        assert_eq!(at("single_blocks.2.linear1"), 1);
        assert_eq!(at("single_blocks.0.modulation.lin"), 3);
        assert_eq!(at("double_blocks.1.img_attn.qkv"), 4);
        assert_eq!(at("double_blocks.0.txt_mlp.2"), 5);
        assert_eq!(at("img_in"), 6);
        assert_eq!(at("time_in.in_layer"), 6);
        // An index past the model's blocks: final only at the end (safe).
        assert_eq!(at("single_blocks.9.linear1"), 6);
    }

    #[test]
    fn buckets_fill_in_backward_order_up_to_the_cap() {
        // (f32 count, position): 100 values = 400 bytes.
        let t = [(100, 3), (100, 0), (300, 1), (100, 1), (50, 3)];
        let b = plan_buckets(&t, 800);
        let got: Vec<(Vec<usize>, usize, usize)> = b.iter().map(|b| (b.tensors.clone(), b.ready, b.bytes)).collect();
        assert_eq!(got, vec![(vec![1], 0, 400), (vec![2], 1, 1200), (vec![3, 0], 3, 800), (vec![4], 3, 200)]);
        // Every tensor exactly once.
        let mut all: Vec<usize> = b.iter().flat_map(|b| b.tensors.clone()).collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert_eq!(plan_buckets(&t, usize::MAX).len(), 1);
    }
}
