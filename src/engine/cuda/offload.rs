//! Checkpoint offload (`--offload-checkpoints`, with `--gradient-checkpointing`): the block inputs
//! that per-block checkpointing keeps (f32, so that the recomputed forward gives the same bits)
//! go to pinned host memory instead of staying on the device, and come back one block ahead of
//! the backward. At 1024² they are 57 × 56.6 MB = 3.0 GiB of FLUX.1-dev's step, the largest part
//! of what checkpointing keeps (docs/memory.md).
//!
//! Forward: block k's inputs are copied on the device as without offload, then a second stream
//! copies them to the host once the compute stream has written them (event), and the device
//! copies are freed once that copy is done (the compute stream waits for it two blocks later, by
//! when a block's compute has long covered a 57 MB copy). Backward, in reverse: block k's inputs
//! are copied back into fresh device buffers on the second stream while block k + 1 computes, and
//! the compute stream waits for them before the recompute. The values are the same bits either
//! way: the step's results do not change (tests/gpu_flux_step.rs).

use super::{CudaBackend, F32};
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
use std::collections::VecDeque;
use std::sync::Arc;

/// Device copies of the forward in flight to the host before they are freed.
const IN_FLIGHT: usize = 2;

pub struct CkptOffload {
    copy: Arc<CudaStream>,
    ctx: Arc<cudarc::driver::CudaContext>,
    /// Per block (chain index: double blocks, then single blocks): its saved inputs.
    host: Vec<Vec<PinnedHostSlice<f32>>>,
    /// Device copies being copied to the host, with the event recorded after their copy.
    out: VecDeque<(Vec<F32>, CudaEvent)>,
    /// The backward's prefetch: block, its device buffers, the event after their copy.
    ahead: Option<(usize, Vec<F32>, CudaEvent)>,
    /// Bytes copied either way so far (`bench-step` divides by steps).
    pub bytes_copied: usize,
}

impl Drop for CkptOffload {
    fn drop(&mut self) {
        // The pinned buffers and device copies are freed after this: no copy may still use them.
        let _ = self.copy.synchronize();
    }
}

impl CkptOffload {
    /// A copy stream on `g`'s context. Its automatic cross-stream tracking is switched off, as for
    /// the block swap: the buffers the copy stream touches are ordered by the events here.
    pub fn new(g: &CudaBackend) -> Result<CkptOffload> {
        // SAFETY: buffers created from here on carry no tracking events. The only buffers a second
        // stream touches are this offload's (ordered by its events, synchronised on drop) and the
        // block swap's (ordered by its own).
        unsafe { g.ctx.disable_event_tracking() };
        let copy = g.ctx.new_stream().context("checkpoint offload: the copy stream")?;
        Ok(CkptOffload {
            copy,
            ctx: g.ctx.clone(),
            host: Vec::new(),
            out: VecDeque::new(),
            ahead: None,
            bytes_copied: 0,
        })
    }

    /// Bytes of pinned host memory held.
    pub fn host_bytes(&self) -> usize {
        self.host.iter().flatten().map(|h| h.num_bytes()).sum()
    }

    fn event(&self, on: &CudaStream) -> Result<CudaEvent> {
        let e = self.ctx.new_event(None)?;
        e.record(on)?;
        Ok(e)
    }

    /// Forward, after block `k`'s inputs were copied into `bufs` on `compute`: sends them to
    /// the host; frees the device copies of earlier blocks whose copies are done.
    pub fn put(&mut self, compute: &CudaStream, k: usize, bufs: Vec<F32>) -> Result<()> {
        while self.host.len() <= k {
            self.host.push(Vec::new());
        }
        if self.host[k].len() != bufs.len() || self.host[k].iter().zip(&bufs).any(|(h, d)| h.len() != d.len()) {
            // First step, or the shapes changed (another aspect bucket): (re)allocate.
            self.copy.synchronize()?;
            self.host[k] = bufs
                .iter()
                // SAFETY: written whole by the copy below before any read.
                .map(|d| unsafe { self.ctx.alloc_pinned::<f32>(d.len()) })
                .collect::<std::result::Result<_, _>>()
                .context("pinned host memory for the offloaded checkpoints")?;
        }
        let written = self.event(compute)?;
        self.copy.wait(&written)?;
        for (d, h) in bufs.iter().zip(self.host[k].iter_mut()) {
            self.copy.memcpy_dtoh(d, h)?;
            self.bytes_copied += 4 * d.len();
        }
        let done = self.event(&self.copy)?;
        self.out.push_back((bufs, done));
        while self.out.len() > IN_FLIGHT {
            self.retire(compute)?;
        }
        Ok(())
    }

    /// Frees the oldest device copy on its way out, after its copy (ordered on `compute`).
    fn retire(&mut self, compute: &CudaStream) -> Result<()> {
        if let Some((bufs, done)) = self.out.pop_front() {
            compute.wait(&done)?;
            drop(bufs);
        }
        Ok(())
    }

    /// End of the forward: every device copy freed once its copy is done.
    pub fn finish_forward(&mut self, compute: &CudaStream) -> Result<()> {
        while !self.out.is_empty() {
            self.retire(compute)?;
        }
        Ok(())
    }

    /// Starts copying block `k`'s inputs back into fresh device buffers (allocated on
    /// `compute`, which the copy waits for).
    fn start(&mut self, compute: &Arc<CudaStream>, k: usize) -> Result<(Vec<F32>, CudaEvent)> {
        ensure!(k < self.host.len() && !self.host[k].is_empty(), "checkpoint offload: block {k} was never saved");
        let mut bufs: Vec<F32> = self.host[k]
            .iter()
            // SAFETY: written whole by the copy below, which the compute stream waits for before
            // any read.
            .map(|h| unsafe { compute.alloc::<f32>(h.len()) })
            .collect::<std::result::Result<_, _>>()?;
        let allocated = self.event(compute)?;
        self.copy.wait(&allocated)?;
        for (h, d) in self.host[k].iter().zip(bufs.iter_mut()) {
            self.copy.memcpy_htod(h, d)?;
            self.bytes_copied += 4 * h.len();
        }
        let done = self.event(&self.copy)?;
        Ok((bufs, done))
    }

    /// Backward, before block `k`'s recompute: its inputs on the device (waited for on
    /// `compute`); the copy of block `next`'s started.
    pub fn get(&mut self, compute: &Arc<CudaStream>, k: usize, next: Option<usize>) -> Result<Vec<F32>> {
        let bufs = match self.ahead.take() {
            Some((j, bufs, done)) if j == k => {
                compute.wait(&done)?;
                bufs
            }
            other => {
                if let Some((_, stale, done)) = other {
                    compute.wait(&done)?;
                    drop(stale);
                }
                let (bufs, done) = self.start(compute, k)?;
                compute.wait(&done)?;
                bufs
            }
        };
        if let Some(n) = next {
            let (b, done) = self.start(compute, n)?;
            self.ahead = Some((n, b, done));
        }
        Ok(bufs)
    }
}
