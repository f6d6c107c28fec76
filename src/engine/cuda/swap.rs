//! Block swap for small cards (`--blocks-to-swap N`): the frozen weights of the last N blocks of
//! the chain (double blocks then single blocks, so the single blocks go first) live once in
//! pinned host memory, and each is copied into a device slot on a second stream while the block
//! before it computes. Two slots per block kind (a double and a single block differ in size), a
//! block's slot chosen by the parity of its index, so the block computing and the one arriving
//! never share one, in either direction. Events order the copy before the compute that reads a
//! slot (`ready`) and the compute before the copy that overwrites it (`free`). The backward runs
//! the blocks in reverse and prefetches in reverse; with checkpointing a block's recomputed
//! forward and its backward read the same slot. A slot that still holds the block asked for is
//! not copied again (the last two blocks of each kind at the forward/backward turn).
//! Adapters are never swapped: they stay on the device with their gradients.

use super::weights::{DevDouble, DevSingle, SwapBlock, TensorMut, TensorRef};
use super::CudaBackend;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
use half::bf16;
use std::sync::Arc;

/// Which way the blocks are being visited (what to prefetch next).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Forward,
    Backward,
}

enum HostTensor {
    Bf16(PinnedHostSlice<bf16>),
    U8(PinnedHostSlice<u8>),
    F32(PinnedHostSlice<f32>),
}

impl HostTensor {
    fn bytes(&self) -> usize {
        match self {
            HostTensor::Bf16(h) => h.num_bytes(),
            HostTensor::U8(h) => h.num_bytes(),
            HostTensor::F32(h) => h.num_bytes(),
        }
    }
}

/// One swapped block in pinned host memory: its tensors in `SwapBlock::tensors` order, and its
/// linears' names, (input, output) widths and 8-bit codes.
struct HostBlock {
    linears: Vec<(String, (usize, usize), Option<i32>)>,
    tensors: Vec<HostTensor>,
}

impl HostBlock {
    /// A pinned copy of a block uploaded to the device (ordered on the compute stream).
    fn of<B: SwapBlock>(g: &CudaBackend, blk: &B) -> Result<HostBlock> {
        fn pinned<T: cudarc::driver::DeviceRepr>(
            g: &CudaBackend,
            src: &cudarc::driver::CudaSlice<T>,
        ) -> Result<PinnedHostSlice<T>> {
            // SAFETY: written whole by the copy below before any read.
            let mut h = unsafe { g.ctx.alloc_pinned::<T>(src.len()) }.context("pinned host memory for block swap")?;
            g.stream.memcpy_dtoh(src, &mut h)?;
            Ok(h)
        }
        let tensors = blk
            .tensors()
            .into_iter()
            .map(|t| {
                Ok(match t {
                    TensorRef::Bf16(d) => HostTensor::Bf16(pinned(g, d)?),
                    TensorRef::U8(d) => HostTensor::U8(pinned(g, d)?),
                    TensorRef::F32(d) => HostTensor::F32(pinned(g, d)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let linears = blk.linears().into_iter().map(|l| (l.name.clone(), (l.d_in, l.d_out), l.code())).collect();
        Ok(HostBlock { linears, tensors })
    }

    fn bytes(&self) -> usize {
        self.tensors.iter().map(HostTensor::bytes).sum()
    }
}

/// A device copy of one block, reused by every swapped block of its kind and parity.
struct Slot<B> {
    blk: B,
    /// The chain index of the block it holds (or is being filled with).
    holds: usize,
    /// Fetched and not yet released (a step that failed half-way leaves it set).
    in_use: bool,
    /// Recorded on the copy stream after the copy into it.
    ready: CudaEvent,
    /// Recorded on the compute stream after the last launch that read it.
    free: CudaEvent,
}

impl<B: SwapBlock> Slot<B> {
    fn new(g: &CudaBackend, blk: B, holds: usize) -> Result<Slot<B>> {
        let (ready, free) = (g.ctx.new_event(None)?, g.ctx.new_event(None)?);
        Ok(Slot { blk, holds, in_use: false, ready, free })
    }

    /// Starts copying block `k` (`host`) into this slot on `copy` unless it holds it already;
    /// returns the bytes copied.
    fn fill(&mut self, copy: &Arc<CudaStream>, compute: &CudaStream, host: &HostBlock, k: usize) -> Result<usize> {
        if self.holds == k {
            return Ok(0);
        }
        if self.in_use {
            // A use that was never released (a failed step): wait for everything queued.
            copy.join(compute)?;
        } else {
            copy.wait(&self.free)?;
        }
        let what = || host.linears.first().map_or("a block".to_string(), |l| l.0.clone());
        ensure!(
            self.blk.tensors().len() == host.tensors.len(),
            "block swap: {} has a different layout from its slot",
            what()
        );
        let codes = self.blk.linears().iter().map(|l| l.code()).collect::<Vec<_>>();
        ensure!(
            codes.iter().eq(host.linears.iter().map(|l| &l.2)),
            "block swap: {} mixes bf16 and 8-bit weights differently from its slot's first block",
            what()
        );
        let dst = self.blk.tensors_mut();
        for (h, d) in host.tensors.iter().zip(dst) {
            match (h, d) {
                (HostTensor::Bf16(h), TensorMut::Bf16(d)) if h.len() == d.len() => copy.memcpy_htod(h, d)?,
                (HostTensor::U8(h), TensorMut::U8(d)) if h.len() == d.len() => copy.memcpy_htod(h, d)?,
                (HostTensor::F32(h), TensorMut::F32(d)) if h.len() == d.len() => copy.memcpy_htod(h, d)?,
                _ => bail!("block swap: a tensor of {} differs in type or size from its slot's", what()),
            }
        }
        for (l, (name, ..)) in self.blk.linears_mut().into_iter().zip(&host.linears) {
            l.name.clone_from(name);
        }
        self.ready.record(copy)?;
        self.holds = k;
        Ok(host.bytes())
    }
}

/// The swapped blocks: their pinned host copies, the device slots, the copy stream.
pub struct BlockSwap {
    copy: Arc<CudaStream>,
    /// Chain index (double blocks 0.., then single blocks) of the first swapped block: every
    /// block from it to the end is swapped.
    pub first: usize,
    pub n_double: usize,
    pub n_total: usize,
    host: Vec<HostBlock>,
    doubles: [Option<Slot<DevDouble>>; 2],
    singles: [Option<Slot<DevSingle>>; 2],
    /// Bytes copied host → device so far (`bench-step` divides by steps).
    pub bytes_copied: usize,
}

impl Drop for BlockSwap {
    fn drop(&mut self) {
        // The slots and pinned buffers are freed after this: no copy may still be reading them.
        let _ = self.copy.synchronize();
    }
}

impl BlockSwap {
    /// Swap for blocks `first..n_total` of a chain whose first `n_double` are double blocks.
    /// Creates the copy stream; the context's automatic cross-stream tracking is switched off,
    /// since every other buffer lives on the one compute stream and the swap orders its own.
    pub fn new(g: &CudaBackend, first: usize, n_double: usize, n_total: usize) -> Result<BlockSwap> {
        // SAFETY: buffers created from here on carry no tracking events. Only the swap's slots
        // and pinned buffers are touched by a second stream, ordered by the `ready`/`free`
        // events, synchronised before upload ends and before they are freed (Drop).
        unsafe { g.ctx.disable_event_tracking() };
        let copy = g.ctx.new_stream().context("block swap: the copy stream")?;
        Ok(BlockSwap {
            copy,
            first,
            n_double,
            n_total,
            host: Vec::new(),
            doubles: [None, None],
            singles: [None, None],
            bytes_copied: 0,
        })
    }

    /// Takes double block `i` (uploaded): keeps it as a slot if its parity has none yet.
    pub fn add_double(&mut self, g: &CudaBackend, i: usize, blk: DevDouble) -> Result<()> {
        self.add_host(g, i, &blk)?;
        if self.doubles[i % 2].is_none() {
            self.doubles[i % 2] = Some(Slot::new(g, blk, i)?);
        }
        Ok(())
    }

    /// As `add_double` for single block `j`.
    pub fn add_single(&mut self, g: &CudaBackend, j: usize, blk: DevSingle) -> Result<()> {
        let k = self.n_double + j;
        self.add_host(g, k, &blk)?;
        if self.singles[j % 2].is_none() {
            self.singles[j % 2] = Some(Slot::new(g, blk, k)?);
        }
        Ok(())
    }

    fn add_host<B: SwapBlock>(&mut self, g: &CudaBackend, k: usize, blk: &B) -> Result<()> {
        ensure!(k == self.first + self.host.len(), "block swap: blocks added out of order");
        self.host.push(HostBlock::of(g, blk)?);
        Ok(())
    }

    /// Blocks swapped, and how many of them are double blocks.
    pub fn swapped(&self) -> (usize, usize) {
        (self.n_total - self.first, self.n_double.saturating_sub(self.first))
    }

    /// Bytes of the pinned host copies.
    pub fn host_bytes(&self) -> usize {
        self.host.iter().map(HostBlock::bytes).sum()
    }

    /// Bytes of the device slots.
    pub fn slot_bytes(&self) -> usize {
        let d: usize =
            self.doubles.iter().flatten().map(|s| s.blk.tensors().iter().map(TensorRef::bytes).sum::<usize>()).sum();
        let s: usize =
            self.singles.iter().flatten().map(|s| s.blk.tensors().iter().map(TensorRef::bytes).sum::<usize>()).sum();
        d + s
    }

    /// (input, output) widths of a swapped block's linear `name`.
    pub fn dims_of(&self, name: &str) -> Option<(usize, usize)> {
        self.host.iter().flat_map(|h| &h.linears).find(|l| l.0 == name).map(|l| l.1)
    }

    /// Starts the copy of block `k` into its slot (nothing if `k` is not swapped or is there).
    fn start(&mut self, compute: &CudaStream, k: usize) -> Result<()> {
        if k < self.first || k >= self.n_total {
            return Ok(());
        }
        let host = &self.host[k - self.first];
        let n = if k < self.n_double {
            let slot = self.doubles[k % 2].as_mut().context("block swap: no slot for a double block")?;
            slot.fill(&self.copy, compute, host, k)?
        } else {
            let j = k - self.n_double;
            let slot = self.singles[j % 2].as_mut().context("block swap: no slot for a single block")?;
            slot.fill(&self.copy, compute, host, k)?
        };
        self.bytes_copied += n;
        Ok(())
    }

    /// Before block `k` computes: its copy started (now, if no prefetch did) and waited for on
    /// `compute`; the next block in `dir` started on the copy stream.
    pub(crate) fn fetch(&mut self, compute: &CudaStream, k: usize, dir: Dir) -> Result<()> {
        self.start(compute, k)?;
        if k >= self.first {
            let (ready, in_use) = self.events(k)?;
            compute.wait(ready)?;
            *in_use = true;
        }
        let next = match dir {
            Dir::Forward => k.checked_add(1),
            Dir::Backward => k.checked_sub(1),
        };
        if let Some(n) = next {
            self.start(compute, n)?;
        }
        Ok(())
    }

    /// After block `k`'s last launch: its slot may be refilled once `compute` gets there.
    pub(crate) fn release(&mut self, compute: &CudaStream, k: usize) -> Result<()> {
        if k < self.first {
            return Ok(());
        }
        let free = if k < self.n_double {
            let s = self.doubles[k % 2].as_mut().context("block swap: no slot")?;
            s.in_use = false;
            &s.free
        } else {
            let s = self.singles[(k - self.n_double) % 2].as_mut().context("block swap: no slot")?;
            s.in_use = false;
            &s.free
        };
        free.record(compute)?;
        Ok(())
    }

    fn events(&mut self, k: usize) -> Result<(&CudaEvent, &mut bool)> {
        let (holds, ready, in_use) = if k < self.n_double {
            let s = self.doubles[k % 2].as_mut().context("block swap: no slot")?;
            (s.holds, &s.ready, &mut s.in_use)
        } else {
            let s = self.singles[(k - self.n_double) % 2].as_mut().context("block swap: no slot")?;
            (s.holds, &s.ready, &mut s.in_use)
        };
        ensure!(holds == k, "block swap: block {k} is not in its slot");
        Ok((ready, in_use))
    }

    /// Double block `i`, fetched.
    pub fn double(&self, i: usize) -> Result<&DevDouble> {
        match &self.doubles[i % 2] {
            Some(s) if s.holds == i && s.in_use => Ok(&s.blk),
            _ => bail!("double_blocks.{i}: not fetched into its swap slot"),
        }
    }

    /// Single block `j`, fetched.
    pub fn single(&self, j: usize) -> Result<&DevSingle> {
        match &self.singles[j % 2] {
            Some(s) if s.holds == self.n_double + j && s.in_use => Ok(&s.blk),
            _ => bail!("single_blocks.{j}: not fetched into its swap slot"),
        }
    }
}
