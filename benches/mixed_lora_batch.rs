//! Issue 20's goal on the CPU engine: one batch of 8 images with 8 different LoRAs (ranks 16–64,
//! on every linear of every block) against a batch of 8 with one LoRA, and against the 8 run one
//! after another (the way a server without mixed batching must run them).
//!
//!     cargo bench --bench mixed_lora_batch            # 8 images, 64² px, 4 steps, median of 3
//!     cargo test --bench mixed_lora_batch -- --bench  # the same in the (warm) test profile
//!     FK_BENCH_SIDE=32 FK_BENCH_STEPS=2 FK_BENCH_REPS=1 cargo bench --bench mixed_lora_batch
//!
//! Without --bench (as `cargo test --benches` runs it) it is a quick smoke run at 8² px.
//!
//! The model is the tiny FLUX.1 fixture (tests/fixtures/pipeline/transformer); its VAE factor is
//! 2, so 64² px is 32² latent cells, 256 image tokens, plus 32 text tokens. Prints one markdown
//! table and one JSON line. Also checks that the mixed batch gives each image exactly what it
//! gets alone (the property `serve` relies on).
//!
//! On a GPU (the GPU check, tools/gpu-run.sh) the same comparison at FLUX.1-dev's size:
//!
//!     FK_BENCH_DEVICE=cuda FK_BENCH_MODEL=random:flux1-dev FK_BENCH_SIDE=1024 FK_BENCH_TXT=512 \
//!       FK_BENCH_STEPS=2 FK_BENCH_REPS=1 ./mixed_lora_batch --bench
//!
//! FK_BENCH_MODEL is any `--model` (a checkpoint or random:flux1-dev[:SEED]); FK_BENCH_FACTOR the
//! VAE factor (default 2 for the fixture, 8 otherwise); FK_BENCH_TXT the text tokens (32). On
//! CUDA a cuBLAS call may pick another algorithm for another row count, so the mixed batch's
//! agreement with the images alone is reported as a relative L2 there, not asserted bit for bit
//! (tests/gpu_model.rs asserts the bits under the emulation).

use flux_kernels::adapters::{AdapterSet, Term};
use flux_kernels::engine::{Device, Engine, EngineOptions};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::config::{FluxConfig, ModuleKind};
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::sample::sampler::{noise, sample_images, SampleSpec};
use flux_kernels::util::Rng;
use std::path::Path;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A random LoRA of `rank` on every linear of the double and single blocks.
fn random_lora(cfg: &FluxConfig, rank: usize, seed: u64) -> AdapterSet {
    let mut rng = Rng::new(seed);
    let mut set = AdapterSet::new();
    for m in cfg.modules() {
        let ModuleKind::Linear { d_out, d_in, .. } = m.kind else { continue };
        if !m.name.contains("blocks.") {
            continue;
        }
        let a = rng.normal_vec(rank * d_in, 1.0 / (d_in as f32).sqrt());
        let b = rng.normal_vec(d_out * rank, 0.02);
        set.push(Term::lora(&m.name, 0..d_out, d_in, rank, 1.0, a, b));
    }
    set
}

struct Run<'a> {
    cfg: &'a FluxConfig,
    txt: Vec<Vec<f32>>,
    y: Vec<Vec<f32>>,
    n_txt: usize,
    side: usize,
    steps: usize,
}

impl Run<'_> {
    /// Images `idx` in one batch; returns (seconds, latents).
    fn batch(&self, engine: &mut Engine, idx: &[usize]) -> (f64, Vec<Vec<f32>>) {
        let c = self.cfg.in_channels / 4;
        let spec = SampleSpec {
            txt: idx.iter().map(|&i| self.txt[i].clone()).collect(),
            y: idx.iter().map(|&i| self.y[i].clone()).collect(),
            n_txt: self.n_txt,
            h: self.side,
            w: self.side,
            steps: self.steps,
            guidance: 3.5,
            seed: 0,
        };
        let start: Vec<Vec<f32>> =
            idx.iter().map(|&i| noise(1, c, self.side, self.side, 100 + i as u64).remove(0)).collect();
        let t = Instant::now();
        let lats = sample_images(self.cfg, &spec, Some(&start), None, &mut |inp| engine.forward(inp)).unwrap();
        (t.elapsed().as_secs_f64(), lats)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: a quick smoke run then.
    let quick = !std::env::args().any(|a| a == "--bench") || std::env::var_os("FK_BENCH_QUICK").is_some();
    let n = 8;
    let model = std::env::var("FK_BENCH_MODEL").ok();
    let factor = env("FK_BENCH_FACTOR", if model.is_some() { 8 } else { 2 });
    let side = env("FK_BENCH_SIDE", if quick { 8 } else { 64 }) / factor;
    let steps = env("FK_BENCH_STEPS", if quick { 1 } else { 4 });
    let reps = env("FK_BENCH_REPS", if quick { 1 } else { 3 });
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/transformer");
    let ckpt = Checkpoint::open(model.as_ref().map_or(fixture.as_path(), Path::new), None).unwrap();
    let cfg = ckpt.cfg.clone();
    let weights = || FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned()).unwrap();
    let device = std::env::var("FK_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = Device::parse(&device).unwrap_or_else(|e| panic!("FK_BENCH_DEVICE={device}: {e:#}")).0;
    let cuda = !matches!(dev, Device::Cpu);
    let mut engine = Engine::new(&dev, &cfg, weights(), EngineOptions::default()).unwrap();
    let ranks = [16, 24, 32, 40, 48, 56, 64, 16];
    let loras: Vec<AdapterSet> = ranks.iter().enumerate().map(|(i, &r)| random_lora(&cfg, r, 7 + i as u64)).collect();
    let mut rng = Rng::new(3);
    let n_txt = env("FK_BENCH_TXT", 32);
    let run = Run {
        cfg: &cfg,
        txt: (0..n).map(|_| rng.normal_vec(n_txt * cfg.context_in_dim, 1.0)).collect(),
        y: (0..n).map(|_| rng.normal_vec(cfg.vec_in_dim, 1.0)).collect(),
        n_txt,
        side,
        steps,
    };
    let all: Vec<usize> = (0..n).collect();
    let (mut mixed, mut one, mut seq) = (Vec::new(), Vec::new(), Vec::new());
    let mut alone_lats = vec![Vec::new(); n];
    let mut mixed_lats = Vec::new();
    for _ in 0..reps {
        engine.set_batch_adapters(&loras).unwrap();
        let (t, l) = run.batch(&mut engine, &all);
        mixed.push(t);
        mixed_lats = l;
        // One LoRA (the largest rank, 64) for all eight: the plain path.
        engine.set_adapters(&loras[6]).unwrap();
        one.push(run.batch(&mut engine, &all).0);
        let mut total = 0.0;
        for i in 0..n {
            engine.set_adapters(&loras[i]).unwrap();
            let (t, l) = run.batch(&mut engine, &[i]);
            total += t;
            alone_lats[i] = l.into_iter().next().unwrap();
        }
        seq.push(total);
    }
    // Bit for bit on the CPU; on CUDA the worst relative L2 over the images (see the module doc).
    let mut worst = 0f64;
    for i in 0..n {
        if cuda {
            worst = worst.max(flux_kernels::util::rel_l2(&mixed_lats[i], &alone_lats[i]));
        } else {
            assert!(mixed_lats[i] == alone_lats[i], "image {i}: the mixed batch differs from the image alone");
        }
    }
    let (m, o, s) = (median(mixed), median(one), median(seq));
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    println!(
        "| {n} images, {}² px ({} tokens + {n_txt} text), {steps} steps, {} | seconds | images/s |",
        side * factor,
        side * side / 4,
        if cuda { device.clone() } else { format!("{threads} threads") }
    );
    println!("|---|---|---|");
    println!("| one batch, 8 different LoRAs (r 16–64) | {m:.3} | {:.2} |", n as f64 / m);
    println!("| one batch, one LoRA (r 64) | {o:.3} | {:.2} |", n as f64 / o);
    println!("| 8 one after another, each its LoRA | {s:.3} | {:.2} |", n as f64 / s);
    println!(
        "mixed / one-LoRA time: {:.2}× (goal ≤ 1.2×); mixed throughput / sequential: {:.2}× (goal ≥ 3×)",
        m / o,
        s / m
    );
    if cuda {
        println!("mixed batch against each image alone: worst rel L2 {worst:.2e}");
    }
    println!(
        "{{\"images\":{n},\"side_px\":{},\"steps\":{steps},\"reps\":{reps},\"device\":\"{device}\",\"threads\":{threads},\"mixed_s\":{m:.4},\"one_lora_s\":{o:.4},\"sequential_s\":{s:.4},\"mixed_over_one\":{:.3},\"throughput_vs_sequential\":{:.3},\"worst_rel_l2_vs_alone\":{worst:.3e}}}",
        side * factor,
        m / o,
        s / m
    );
}
