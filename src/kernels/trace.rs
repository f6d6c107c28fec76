//! A record of every launch a piece of host code makes: kernel, shape, FLOPs, bytes read and
//! written. Off by default and per thread (the engine's step runs on its caller's thread; tests
//! that run side by side do not see each other's launches). `plan::steptime` turns a trace into
//! a predicted time per op family.
//!
//! How it stays true to the step: a wrapper calls `record` with the cost of what it is about to
//! launch (counted from the shapes it already checks), and the shared launch points (`launch`,
//! the cuBLAS calls) call `launched`, which adds each real launch to the last record. So the
//! launch counts are the launches made, not a second walk of the model that could drift. In a
//! dry run (`start(true)`) `launched` tells the launch points to skip the kernel: the host code
//! walks the same path, allocates the same buffers and records the same launches, but nothing
//! runs on the device (the trace of a full-size step without its compute).
//!
//! FLOP conventions: a GEMM is 2·m·n·k; attention is FlashAttention's count (forward 4·b·h·l²·d,
//! backward 2.5× that), the convention the measured rates in docs/gpu-runs.md use. Bytes are the
//! tensors a kernel must read and write once (caches not modelled).

use std::cell::RefCell;

/// What an op is for, the rows of the step-time breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpFamily {
    /// The LoRA linears: base GEMM, the thin low-rank GEMMs, their epilogues.
    Linear,
    /// The attention core (flash forward and backward).
    Attention,
    /// LayerNorm + modulation, gated residuals, activations, the QK prologue, head layout,
    /// copies and casts, embeddings, random fills.
    Elementwise,
    /// The loss, the gradient norm and AdamW.
    Optimizer,
}

impl OpFamily {
    pub const ALL: [OpFamily; 4] = [OpFamily::Linear, OpFamily::Attention, OpFamily::Elementwise, OpFamily::Optimizer];

    pub fn name(self) -> &'static str {
        match self {
            OpFamily::Linear => "linears",
            OpFamily::Attention => "attention",
            OpFamily::Elementwise => "elementwise",
            OpFamily::Optimizer => "optimizer",
        }
    }
}

/// One recorded op: what the wrapper was asked to do and the launches it made.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub family: OpFamily,
    /// The kernel (or kernel group, e.g. `fk_ln_mod_bwd`) the cost is for.
    pub kernel: String,
    pub shape: String,
    pub flops: f64,
    /// Bytes read plus bytes written.
    pub bytes: f64,
    /// Launches made for this op (0 when the call had nothing to do).
    pub launches: usize,
    /// The names the launch points gave those launches, in order (kernel names, or the launch
    /// helper's label: tests check that each belongs to its op).
    pub launched: Vec<String>,
}

/// What `finish` returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    pub ops: Vec<Op>,
    /// Launches made before any op was recorded (a wrapper that does not record; a test checks
    /// that the step has none).
    pub unattributed: usize,
    /// Whether the kernels were skipped.
    pub dry: bool,
}

impl Trace {
    pub fn launches(&self) -> usize {
        self.ops.iter().map(|o| o.launches).sum::<usize>() + self.unattributed
    }
}

thread_local! {
    static ACTIVE: RefCell<Option<Trace>> = const { RefCell::new(None) };
}

/// Starts recording on this thread (a trace already running is discarded). With `dry`, the
/// launch points skip every kernel from now until `finish`: device memory is allocated but not
/// computed, so every value read back is garbage.
pub fn start(dry: bool) {
    ACTIVE.with(|t| *t.borrow_mut() = Some(Trace { dry, ..Default::default() }));
}

/// Stops recording and returns the trace (None when none was started).
pub fn finish() -> Option<Trace> {
    ACTIVE.with(|t| t.borrow_mut().take())
}

/// Whether a trace is being recorded on this thread.
pub fn active() -> bool {
    ACTIVE.with(|t| t.borrow().is_some())
}

/// Records an op about to be launched (nothing when no trace is running; `shape` is only
/// formatted then).
pub fn record(family: OpFamily, kernel: &str, flops: f64, bytes: f64, shape: impl FnOnce() -> String) {
    ACTIVE.with(|t| {
        if let Some(tr) = t.borrow_mut().as_mut() {
            let kernel = kernel.to_string();
            tr.ops.push(Op { family, kernel, shape: shape(), flops, bytes, launches: 0, launched: Vec::new() });
        }
    });
}

/// Called by every launch point for one launch of `name`: counts it on the last op. Returns
/// true when the launch must be skipped (a dry run).
pub fn launched(name: &str) -> bool {
    ACTIVE.with(|t| match t.borrow_mut().as_mut() {
        Some(tr) => {
            match tr.ops.last_mut() {
                Some(op) => {
                    op.launches += 1;
                    op.launched.push(name.to_string());
                }
                None => tr.unattributed += 1,
            }
            tr.dry
        }
        None => false,
    })
}

/// Bytes of an element: 4 for f32, 2 for bf16.
pub fn elem(f32_elem: bool) -> f64 {
    if f32_elem {
        4.0
    } else {
        2.0
    }
}

/// FLOPs of a GEMM C [m, n] = A [m, k]·B [k, n].
pub fn gemm_flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

/// Bytes of that GEMM with bf16 operands: A and B read once, C written (`out` bytes per
/// element) and, with `beta`, read too.
pub fn gemm_bytes(m: usize, n: usize, k: usize, out: f64, beta: bool) -> f64 {
    let (m, n, k) = (m as f64, n as f64, k as f64);
    2.0 * (m * k + k * n) + m * n * out * if beta { 2.0 } else { 1.0 }
}

/// FLOPs of the attention forward over [b, h, l, d] (FlashAttention's count, no mask).
pub fn attention_forward_flops(b: usize, h: usize, l: usize, d: usize) -> f64 {
    4.0 * (b * h) as f64 * (l as f64).powi(2) * d as f64
}

/// The backward's count: 2.5× the forward.
pub fn attention_backward_flops(b: usize, h: usize, l: usize, d: usize) -> f64 {
    2.5 * attention_forward_flops(b, h, l, d)
}

/// The share of the backward's conventional count given to its dK/dV kernel: it runs 4 of the
/// 7 products the deterministic two-pass backward executes (dQ runs 3), so the two launches
/// split the 2.5× in that ratio and together add up to the count the rates are measured in.
pub const DKDV_SHARE: f64 = 4.0 / 7.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_for_known_shapes() {
        // FLUX.1-dev's img qkv at 1024²: 4096 tokens × 3072 → 9216.
        assert_eq!(gemm_flops(4096, 9216, 3072), 2.0 * 4096.0 * 9216.0 * 3072.0);
        assert_eq!(gemm_flops(4096, 9216, 3072), 231_928_233_984.0);
        // bf16 X [4096, 3072] and W [3072, 9216] read, f32 Y written.
        assert_eq!(
            gemm_bytes(4096, 9216, 3072, 4.0, false),
            2.0 * (4096.0 * 3072.0 + 3072.0 * 9216.0) + 4096.0 * 9216.0 * 4.0
        );
        // Y read and written when accumulating.
        assert_eq!(gemm_bytes(2, 3, 4, 4.0, true) - gemm_bytes(2, 3, 4, 4.0, false), 24.0);
        // Attention over the joint 4608 tokens, 24 heads × 128: 261 GFLOP forward.
        assert_eq!(attention_forward_flops(1, 24, 4608, 128), 4.0 * 24.0 * 4608.0 * 4608.0 * 128.0);
        assert!((attention_forward_flops(1, 24, 4608, 128) / 1e9 - 260.9).abs() < 0.1);
        assert_eq!(attention_backward_flops(1, 24, 4608, 128), 2.5 * attention_forward_flops(1, 24, 4608, 128));
        assert_eq!(elem(true) + elem(false), 6.0);
    }

    #[test]
    fn launches_count_on_the_last_op_and_dry_runs_skip() {
        assert!(!launched("k"), "no trace: launch");
        record(OpFamily::Linear, "x", 1.0, 1.0, || unreachable!("not formatted without a trace"));
        start(false);
        assert!(!launched("k"));
        record(OpFamily::Elementwise, "a", 0.0, 8.0, || "n=2".into());
        assert!(!launched("a") && !launched("a"));
        start(true);
        record(OpFamily::Optimizer, "b", 0.0, 4.0, || "n=1".into());
        assert!(launched("b"), "dry: skip");
        let t = finish().unwrap();
        assert!(t.dry && t.unattributed == 0 && t.ops.len() == 1 && t.ops[0].launched == ["b"], "{t:?}");
        assert!(finish().is_none() && !active());
        start(false);
        launched("k");
        assert_eq!(finish().unwrap().unattributed, 1);
    }
}
