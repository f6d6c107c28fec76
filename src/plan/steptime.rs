//! The step-time model: a trace of the step's launches (`kernels::trace`: kernel, shape, FLOPs,
//! bytes) turned into a predicted time per op family, from a card's rates. A prediction, never a
//! measurement: it is there to give a number for every change made between GPU runs, and
//! `bench-step --predict` prints it beside the measured step on a GPU, which says how far to
//! trust it.
//!
//! Per op: time = max(FLOPs / the kernel's rate, bytes / sustained bandwidth); per launch a fixed
//! gap on top. The kernel's rate is the one last measured on the card (docs/gpu-runs.md) where a
//! measurement exists, else the documented prediction for that kernel, each labelled in the
//! table below and in the breakdown. Caches, overlap between kernels and tail effects are not
//! modelled.

use crate::kernels::trace::{OpFamily, Trace};
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// A kernel's compute rate on a card: `kernel` is its name or a prefix of names.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub kernel: &'static str,
    pub tflops: f64,
    /// Measured (with the run) or predicted (with the document).
    pub source: &'static str,
}

/// A card's figures for the model.
#[derive(Clone, Copy, Debug)]
pub struct Card {
    pub name: &'static str,
    /// Dense bf16 tensor peak, for kernels with no rate of their own.
    pub peak_tflops: f64,
    /// Sustained memory bandwidth, bytes per second.
    pub bandwidth: f64,
    pub bandwidth_source: &'static str,
    /// Seconds between two back-to-back launches (launch overhead and the idle gap).
    pub launch_gap: f64,
    pub launch_source: &'static str,
    pub rates: &'static [Rate],
}

/// The H200 (the card of every GPU run so far).
pub const H200: Card = Card {
    name: "H200",
    peak_tflops: 989.0,
    bandwidth: 4.3e12,
    bandwidth_source: "4.8 TB/s HBM3e spec (docs/lora-hopper.md) × 0.9, the sustained fraction measured on an \
                       H100 (3.0 of 3.35 TB/s, shared/reference/kernel-anchors.md §6): assumed, not measured here",
    launch_gap: 3.0e-6,
    launch_source: "assumed (\"a few µs each\", kernel-anchors.md §2); no launch overhead has been measured yet",
    rates: &[
        Rate {
            kernel: "cublasGemmEx",
            tflops: 670.0,
            source: "measured: cuBLAS X·Wᵀ at M = 4608, 662–709 (gpu-runs.md runs 1, 5)",
        },
        Rate {
            kernel: "fk_gemm_",
            tflops: 175.0,
            source: "measured: the sm_80 fused kernel's base GEMM, 25–28 % of cuBLAS (gpu-runs.md run 1)",
        },
        Rate {
            kernel: "fk_gemm90_",
            tflops: 500.0,
            source: "predicted, not measured: 75–95 % of cuBLAS's 670 (docs/lora-hopper.md), the low end",
        },
        Rate { kernel: "fk_attn_fwd", tflops: 240.0, source: "measured: l = 4608 (gpu-runs.md run 4)" },
        Rate { kernel: "fk_attn_fwd_r64", tflops: 219.0, source: "measured: l = 4608 (gpu-runs.md run 4)" },
        Rate {
            kernel: "fk_attn_fwd_sm90",
            tflops: 520.0,
            source: "predicted, not measured: 520–620 (docs/attention-hopper.md), the low end",
        },
        Rate {
            kernel: "fk_attn_fwd_sm90_serial",
            tflops: 400.0,
            source: "predicted, not measured: 400–520 (docs/attention-hopper.md), the low end",
        },
        Rate {
            kernel: "fk_attn_bwd_dkdv",
            tflops: 181.0,
            source: "measured: backward 3.606 ms at l = 4608, 2.5× convention (gpu-runs.md run 4)",
        },
        Rate {
            kernel: "fk_attn_bwd_dq",
            tflops: 181.0,
            source: "measured: backward 3.606 ms at l = 4608, 2.5× convention (gpu-runs.md run 4)",
        },
        Rate {
            kernel: "fk_attn_bwd_dkdv_sm90",
            tflops: 300.0,
            source:
                "predicted, not measured: 300–420 by the convention, overlapped (docs/attention-hopper.md), the low end",
        },
        Rate {
            kernel: "fk_attn_bwd_dq_sm90",
            tflops: 300.0,
            source:
                "predicted, not measured: 300–420 by the convention, overlapped (docs/attention-hopper.md), the low end",
        },
        Rate {
            kernel: "fk_attn_bwd_dkdv_sm90_serial",
            tflops: 260.0,
            source:
                "predicted, not measured: 260–380 by the convention, serial (docs/attention-hopper.md), the low end",
        },
        Rate {
            kernel: "fk_attn_bwd_dq_sm90_serial",
            tflops: 260.0,
            source:
                "predicted, not measured: 260–380 by the convention, serial (docs/attention-hopper.md), the low end",
        },
    ],
};

/// The card named `name` (`h200`).
pub fn card(name: &str) -> Result<&'static Card> {
    match name.to_ascii_lowercase().as_str() {
        "h200" => Ok(&H200),
        _ => bail!("--card `{name}`: the step-time model has no rates for this card (known: h200)"),
    }
}

impl Card {
    /// The rate of `kernel`: its own name, else the longest prefix listed, else the peak.
    pub fn rate(&self, kernel: &str) -> (f64, &'static str) {
        let best = self.rates.iter().filter(|r| kernel.starts_with(r.kernel)).max_by_key(|r| r.kernel.len());
        match best {
            Some(r) => (r.tflops * 1e12, r.source),
            None => (self.peak_tflops * 1e12, "the card's dense bf16 peak (no rate of its own)"),
        }
    }
}

/// Totals of one row of the breakdown.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub launches: usize,
    pub flops: f64,
    pub bytes: f64,
    /// Predicted seconds of the kernels themselves (gaps apart).
    pub seconds: f64,
}

impl Row {
    fn add(&mut self, launches: usize, flops: f64, bytes: f64, seconds: f64) {
        self.launches += launches;
        self.flops += flops;
        self.bytes += bytes;
        self.seconds += seconds;
    }
}

/// The predicted step: per family, per kernel, the launch gaps and the total.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub card: &'static Card,
    pub families: Vec<(OpFamily, Row)>,
    pub kernels: BTreeMap<String, Row>,
    pub launches: usize,
    pub launch_gaps: f64,
    pub total: f64,
}

/// The prediction for a trace on `card`.
pub fn predict(trace: &Trace, card: &'static Card) -> Prediction {
    let mut fam: BTreeMap<OpFamily, Row> = OpFamily::ALL.iter().map(|&f| (f, Row::default())).collect();
    let mut kernels: BTreeMap<String, Row> = BTreeMap::new();
    for op in trace.ops.iter().filter(|o| o.launches > 0) {
        let (rate, _) = card.rate(&op.kernel);
        let t = (op.flops / rate).max(op.bytes / card.bandwidth);
        fam.get_mut(&op.family).expect("every family").add(op.launches, op.flops, op.bytes, t);
        kernels.entry(op.kernel.clone()).or_default().add(op.launches, op.flops, op.bytes, t);
    }
    let launches = trace.launches();
    let launch_gaps = launches as f64 * card.launch_gap;
    let total = fam.values().map(|r| r.seconds).sum::<f64>() + launch_gaps;
    Prediction { card, families: fam.into_iter().collect(), kernels, launches, launch_gaps, total }
}

impl Prediction {
    /// The breakdown as a markdown table, labelled a prediction.
    pub fn table(&self) -> String {
        let mut s = format!(
            "Predicted step time on an {} (a prediction from the launch trace, not a measurement)\n\n\
             | family | launches | TFLOP | GB moved | predicted ms |\n|---|---|---|---|---|\n",
            self.card.name
        );
        for (f, r) in &self.families {
            s += &format!(
                "| {} | {} | {:.2} | {:.2} | {:.1} |\n",
                f.name(),
                r.launches,
                r.flops / 1e12,
                r.bytes / 1e9,
                r.seconds * 1e3
            );
        }
        s += &format!(
            "| launch gaps ({:.0} µs each, assumed) | {} | | | {:.1} |\n| **total** | {} | {:.2} | {:.2} | **{:.1}** |\n",
            self.card.launch_gap * 1e6,
            self.launches,
            self.launch_gaps * 1e3,
            self.launches,
            self.families.iter().map(|(_, r)| r.flops).sum::<f64>() / 1e12,
            self.families.iter().map(|(_, r)| r.bytes).sum::<f64>() / 1e9,
            self.total * 1e3
        );
        s
    }

    /// The kernels, slowest first, with the source of each rate.
    pub fn kernel_table(&self) -> String {
        let mut rows: Vec<(&String, &Row)> = self.kernels.iter().collect();
        rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        let mut s =
            String::from("| kernel | launches | TFLOP | GB | predicted ms | rate used |\n|---|---|---|---|---|---|\n");
        for (k, r) in rows {
            let (rate, source) = self.card.rate(k);
            let used = if r.flops / rate >= r.bytes / self.card.bandwidth {
                format!("compute-bound: {:.0} TFLOP/s, {source}", rate / 1e12)
            } else {
                format!("bandwidth-bound: {:.1} TB/s", self.card.bandwidth / 1e12)
            };
            s += &format!(
                "| {k} | {} | {:.3} | {:.3} | {:.2} | {used} |\n",
                r.launches,
                r.flops / 1e12,
                r.bytes / 1e9,
                r.seconds * 1e3
            );
        }
        s
    }

    /// JSON fields for `bench-step`.
    pub fn json(&self) -> serde_json::Value {
        let fam: serde_json::Map<String, serde_json::Value> = self
            .families
            .iter()
            .map(|(f, r)| {
                let v = serde_json::json!({"launches": r.launches, "tflop": r.flops / 1e12, "gb": r.bytes / 1e9, "s": r.seconds});
                (f.name().to_string(), v)
            })
            .collect();
        serde_json::json!({
            "card": self.card.name,
            "note": "prediction from the launch trace and the card's rates (plan::steptime), not a measurement",
            "families": fam,
            "launches": self.launches,
            "launch_gaps_s": self.launch_gaps,
            "total_s": self.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::trace::Op;

    fn op(family: OpFamily, kernel: &str, flops: f64, bytes: f64, launches: usize) -> Op {
        Op { family, kernel: kernel.into(), shape: String::new(), flops, bytes, launches, launched: Vec::new() }
    }

    #[test]
    fn roofline_per_op_and_gaps_per_launch() {
        let trace = Trace {
            ops: vec![
                // 670 TFLOP/s measured: 0.67 TFLOP take 1 ms; its 1 GB would take 0.23 ms.
                op(OpFamily::Linear, "cublasGemmEx", 0.67e12, 1e9, 1),
                // Bandwidth-bound: 4.3 GB at 4.3 TB/s, 1 ms.
                op(OpFamily::Elementwise, "fk_ln_mod_fwd", 0.0, 4.3e9, 2),
                // The sm_80 flash forward at its measured 240.
                op(OpFamily::Attention, "fk_attn_fwd", 0.24e12, 0.0, 1),
                // Recorded but never launched: no time.
                op(OpFamily::Optimizer, "fk_adamw", 0.0, 1e12, 0),
            ],
            unattributed: 0,
            dry: true,
        };
        let p = predict(&trace, &H200);
        let ms = |f: OpFamily| p.families.iter().find(|(g, _)| *g == f).unwrap().1.seconds * 1e3;
        assert!((ms(OpFamily::Linear) - 1.0).abs() < 1e-9);
        assert!((ms(OpFamily::Elementwise) - 1.0).abs() < 1e-9);
        assert!((ms(OpFamily::Attention) - 1.0).abs() < 1e-9);
        assert_eq!(ms(OpFamily::Optimizer), 0.0);
        assert_eq!(p.launches, 4);
        assert!((p.total - (3e-3 + 4.0 * H200.launch_gap)).abs() < 1e-12);
        let t = p.table();
        assert!(t.contains("prediction") && t.contains("| linears | 1 |"), "{t}");
        assert!(p.kernel_table().contains("bandwidth-bound"));
    }

    #[test]
    fn rates_take_the_longest_prefix() {
        assert_eq!(H200.rate("fk_attn_fwd_sm90_serial").0, 400e12);
        assert_eq!(H200.rate("fk_attn_fwd_sm90").0, 520e12);
        assert_eq!(H200.rate("fk_attn_fwd").0, 240e12);
        assert_eq!(H200.rate("fk_attn_bwd_dkdv_sm90_serial").0, 260e12);
        assert_eq!(H200.rate("fk_attn_bwd_dkdv_sm90").0, 300e12);
        assert_eq!(H200.rate("fk_gemm90_nt_bn256").0, 500e12);
        assert_eq!(H200.rate("fk_gemm_large").0, 175e12);
        assert_eq!(H200.rate("fk_unknown").0, 989e12);
        assert!(card("H200").is_ok() && card("a100").is_err());
    }
}
