//! Data parallelism on the CUDA path (issue 21) under the emulations: the real binary with
//! `--device cuda` against the CPU emulation of the CUDA driver (kernels/host_emulation.h as
//! libcuda.so, `tools/gpu-check.sh --emulate`) and the emulated NCCL
//! (tools/nccl-emulation/nccl_emulation.c), whose collectives run in stream order on the
//! communication stream. Small buckets (FLUX_KERNELS_REDUCE_BUCKET_MB) make the backward start
//! most of them while it still runs. Two ranks equal one rank with twice the batch in two slices
//! bit for bit, with `--deterministic-reduce` (all-gather, rank-order sum on the device) and
//! with the all-reduce (the emulated NCCL adds in rank order too; on GPUs NCCL's all-reduce
//! agrees within rounding only). That one rank with the batch in one backward agrees with the
//! sliced one within rounding is the engine's own property (tests/data_parallel.rs checks it on
//! the CPU path); it is left out here to keep this test short (10 s on 2 cores; the CUDA engine on the sm_80 kernels).
//!
//! Without the CUDA emulation (no driver, kernels not built, or a real GPU, whose device memory
//! the emulated NCCL cannot read) the test prints SKIPPED (a failure under FK_REQUIRE_GPU=1).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_flux-kernels");

/// Why this test cannot run here, if it cannot: it needs the CUDA driver emulation.
fn emulation_missing() -> Option<String> {
    let gpu = match flux_kernels::kernels::gpu::Gpu::new() {
        Ok(g) => g,
        Err(e) => return Some(format!("{e:#} (build the emulator with tools/gpu-check.sh --emulate)")),
    };
    let name = gpu.ctx.name().unwrap_or_default();
    (!name.contains("fkemu")).then(|| {
        format!(
            "the device is `{name}`, not the CUDA emulation: the emulated NCCL reads host memory (on GPUs the \
             multi-GPU path runs with the real NCCL: docs/gpu-runs.md)"
        )
    })
}

/// `train --device cuda` on `data` (the tiny model), started in the background.
fn train(dir: &Path, data: &Path, name: &str, flags: &[&str], bucket_mb: &str) -> (Child, PathBuf, PathBuf) {
    let (out, metrics) = (dir.join(format!("{name}.safetensors")), dir.join(format!("{name}.jsonl")));
    let child = Command::new(BIN)
        .arg("train")
        .arg("--data")
        .arg(data)
        .args(["--device", "cuda", "--steps", "2", "--lr", "5e-3", "--save-dtype", "f32", "--log-every", "1"])
        .args(["--caption-dropout", "0.3"])
        .arg("--out")
        .arg(&out)
        .arg("--metrics")
        .arg(&metrics)
        .args(flags)
        .env("FLUX_KERNELS_NCCL", emulated_nccl())
        .env("FLUX_KERNELS_REDUCE_BUCKET_MB", bucket_mb)
        // The sm_80 kernels: a third of the sm_90a ones' time under the emulation, and the reduce
        // does not depend on them (the Hopper kernels have their own tests).
        .env("FLUX_KERNELS_NO_SM90", "1")
        .env("FLUX_KERNELS_DIST_TIMEOUT_S", "120")
        .env("FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS", "120000")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("MASTER_PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, out, metrics)
}

fn finish(c: Child, what: &str) -> String {
    let o = c.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{what}: {}\n{text}", o.status);
    text
}

#[test]
fn two_cuda_ranks_equal_one_with_twice_the_batch() {
    if let Some(why) = emulation_missing() {
        skip("two_cuda_ranks_equal_one_with_twice_the_batch", &why);
        return;
    }
    let t0 = std::time::Instant::now();
    let dir = tmpdir("gpu-data-parallel");
    let data = dir.join("data");
    let o = Command::new(BIN)
        .args(["synth-data", "--n", "4", "--size", "4", "--n-txt", "4", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "synth-data: {}", String::from_utf8_lossy(&o.stderr));
    // One rank, the batch of 2 as two slices one after another; two ranks of 1 sample,
    // deterministic, and with the all-reduce. Buckets of 2 kB and 20 kB (the tiny LoRA's tensors
    // are 0.5–2 kB): many, started during the backward.
    let runs = [
        train(&dir, &data, "sliced", &["--batch-size", "2", "--batch-slices", "2"], "25"),
        train(&dir, &data, "ranks-det", &["--gpus", "2", "--batch-size", "1", "--deterministic-reduce"], "0.002"),
        train(&dir, &data, "ranks", &["--gpus", "2", "--batch-size", "1"], "0.02"),
    ];
    let mut results = Vec::new();
    for (child, out, metrics) in runs {
        let log = finish(child, &out.display().to_string());
        results.push((lora(&out), losses(&metrics), log));
    }
    let [sliced, det, reduced] = &results[..] else { unreachable!() };
    for (name, run) in [("--deterministic-reduce", det), ("the all-reduce", reduced)] {
        // The overlap happened: several buckets, most started before the backward's end.
        let line = run.2.lines().find(|l| l.starts_with("gradient all-reduce:")).unwrap_or_else(|| panic!("{}", run.2));
        let nums: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
        let (buckets, early) = (nums[0], nums[nums.len() - 1]);
        assert!(buckets > 2 && early >= buckets / 2, "{name}: {line}");
        assert_eq!(run.1.len(), 2, "{name}: two steps' metrics");
        assert_eq!(run.1, sliced.1, "{name}: each step's loss and gradient norm, bit for bit");
        assert_eq!(bits(&run.0), bits(&sliced.0), "{name}: every LoRA tensor, bit for bit");
    }
    eprintln!("3 runs (5 processes) under the emulation in {:.1} s", t0.elapsed().as_secs_f64());
}
