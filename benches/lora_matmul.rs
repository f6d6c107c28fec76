//! Fused vs unfused LoRA linear, forward and backward (criterion, harness = false).
//!
//! GPU (when a device and the kernels are present): the fused kernels of kernels/lora_gemm.cu
//! against the PEFT-style and the best unfused (accumulate into Y) cuBLAS paths, at FLUX shapes:
//! M = 4608 tokens (and 1536 with FK_BENCH_FULL=1); d_in×d_out = 3072×3072, 3072×9216,
//! 3072×12288, 12288×3072, 3072×21504, 15360×3072; r = 16, 32, 64. Timed with CUDA events.
//! Reported: time, TFLOP/s, the ratio to cuBLAS's bare X·Wᵀ, and fused vs unfused speedups.
//!
//! CPU (always, unless FK_BENCH_CPU=0): the CPU reference's `lora_linear_forward` /
//! `lora_linear_backward` (one call, low-rank terms accumulated into Y: "fused" in the sense of
//! no extra passes) against a PEFT-style chain of separate GEMMs, scale and add. Reduced shapes
//! (M = 256; 3072×3072, 3072×12288; r = 16, 64) so a 2-core machine finishes in minutes;
//! FK_BENCH_QUICK=1 times 3 shapes at r = 32 only (M = 4608: 3072×3072, 3072×12288, 15360×3072).
//! FK_BENCH_FULL=1 runs the GPU shape set on the CPU too (hours). FK_BENCH_CPU=0 or
//! FK_BENCH_GPU=0 drops a part. Under `cargo test --benches` every routine runs once on tiny
//! shapes, as a smoke test.
//!
//! Tables are printed last, as markdown, ready for docs/perf.md.

// Ops take buffers and shapes explicitly (as in the library).
#![allow(clippy::too_many_arguments)]

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::kernels::lora::{BaseGemm, GpuLora, LinearShape, Unfused};
use flux_kernels::ops::lora::{lora_linear_backward, lora_linear_forward, LoraTerm, TermGrad};
use flux_kernels::ops::matmul::{gemm, linear_backward_input, linear_forward};
use flux_kernels::util::{rel_l2, Rng};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::rc::Rc;
use std::time::{Duration, Instant};

const FLUX_LINEARS: [(usize, usize); 6] =
    [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)];

fn env_flag(name: &str, default: bool) -> bool {
    std::env::var(name).map(|v| v == "1").unwrap_or(default)
}

/// Seconds per call of every benchmark, as measured inside criterion's own loop.
type Timings = Rc<RefCell<BTreeMap<String, Vec<f64>>>>;

fn record(t: &Timings, key: &str, secs: f64) {
    t.borrow_mut().entry(key.to_string()).or_default().push(secs);
}

fn median(t: &Timings, key: &str) -> Option<f64> {
    let mut v = t.borrow().get(key)?.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn say(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

/// Appends table lines to $FK_BENCH_TABLE as soon as they exist, so a run cut short by a
/// time limit still leaves the rows it finished (tools/gpu-run.sh reads it).
fn stream_rows(lines: &[String]) {
    if let Some(path) = std::env::var_os("FK_BENCH_TABLE") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            for l in lines {
                let _ = writeln!(f, "{l}");
            }
        }
    }
}

// ---- CPU ------------------------------------------------------------------------------------

/// PEFT-style forward on the CPU: every stage its own pass over its output.
fn peft_forward_cpu(
    y: &mut [f32],
    t_s: &mut [f32],
    t2: &mut [f32],
    x: &[f32],
    w: &[f32],
    term: &LoraTerm,
    m: usize,
    k: usize,
    n: usize,
) {
    let r = term.rank;
    linear_forward(y, x, w, None, m, k, n);
    linear_forward(t_s, x, term.a, None, m, k, r);
    linear_forward(t2, t_s, term.b, None, m, r, n);
    t2.iter_mut().for_each(|v| *v *= term.scale);
    y.iter_mut().zip(t2.iter()).for_each(|(o, v)| *o += v);
}

/// PEFT-style backward (autograd of the chain above; T = X·Aᵀ saved by the forward).
fn peft_backward_cpu(
    dx: &mut [f32],
    g: &mut TermGrad,
    scratch: &mut [Vec<f32>; 3],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    t_s: &[f32],
    term: &LoraTerm,
    m: usize,
    k: usize,
    n: usize,
) {
    let r = term.rank;
    let [dt2, dt, dxl] = scratch;
    linear_backward_input(dx, dy, w, m, k, n, 0.0);
    dt2.iter_mut().zip(dy).for_each(|(o, v)| *o = v * term.scale);
    gemm(n, m, r, 1.0, dt2, (1, n), t_s, (r, 1), 1.0, &mut g.db, (r, 1));
    gemm(m, n, r, 1.0, dt2, (n, 1), term.b, (r, 1), 0.0, dt, (r, 1));
    gemm(r, m, k, 1.0, dt, (1, r), x, (k, 1), 1.0, &mut g.da, (k, 1));
    gemm(m, r, k, 1.0, dt, (r, 1), term.a, (k, 1), 0.0, dxl, (k, 1));
    dx.iter_mut().zip(dxl.iter()).for_each(|(o, v)| *o += v);
}

/// Which shapes to run: the short set, the full FLUX set, or (under `cargo test --benches`,
/// where criterion runs each routine once) a smoke-test size.
#[derive(Clone, Copy, PartialEq)]
enum Size {
    Smoke,
    Short,
    Full,
}

fn cpu_benches(c: &mut Criterion, timings: &Timings, size: Size) -> Vec<String> {
    let (ms, shapes, ranks): (Vec<usize>, Vec<(usize, usize)>, Vec<usize>) = match size {
        Size::Full => (vec![1536, 4608], FLUX_LINEARS.to_vec(), vec![16, 32, 64]),
        Size::Short => (vec![256], vec![(3072, 3072), (3072, 12288)], vec![16, 64]),
        Size::Smoke => (vec![32], vec![(256, 384)], vec![16]),
    };
    let mut rows = Vec::new();
    let mut g = c.benchmark_group("lora_cpu");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
    let mut rng = Rng::new(17);
    for &m in &ms {
        for &(k, n) in &shapes {
            let x = rng.normal_vec(m * k, 1.0);
            let w = rng.normal_vec(n * k, 1.0 / (k as f32).sqrt());
            let dy = rng.normal_vec(m * n, 1.0);
            let mut y = vec![0f32; m * n];
            let mut dx = vec![0f32; m * k];
            let id = format!("{m}x{k}x{n}");
            let base_key = format!("cpu base {id}");
            g.throughput(Throughput::Elements((2 * m * k * n) as u64));
            g.bench_function(BenchmarkId::new("base", &id), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        linear_forward(&mut y, &x, &w, None, m, k, n);
                    }
                    let d = t.elapsed();
                    record(timings, &base_key, d.as_secs_f64() / iters as f64);
                    d
                })
            });
            for &r in &ranks {
                let a = rng.normal_vec(r * k, 1.0 / (k as f32).sqrt());
                let bm = rng.normal_vec(n * r, 1.0 / (r as f32).sqrt());
                let term = LoraTerm { a: &a, b: &bm, rank: r, scale: 1.0, rows: 0..n, dropout: None };
                let terms = [term.clone()];
                let shape = LinearShape::new(m, k, n, false, &terms).unwrap();
                let id = format!("{m}x{k}x{n}_r{r}");
                let (mut t_s, mut t2) = (vec![0f32; m * r], vec![0f32; m * n]);
                let mut scratch = [vec![0f32; m * n], vec![0f32; m * r], vec![0f32; m * k]];
                let mut grads = vec![TermGrad::default()];
                let mut g_peft = TermGrad { da: vec![0.0; r * k], db: vec![0.0; n * r] };

                // The two forwards agree (a check that the baseline computes the same thing).
                let mut y2 = vec![0f32; m * n];
                lora_linear_forward(&mut y, &x, &w, None, &terms, m, k, n);
                peft_forward_cpu(&mut y2, &mut t_s, &mut t2, &x, &w, &term, m, k, n);
                assert!(rel_l2(&y2, &y) < 1e-5, "CPU PEFT-style forward disagrees with the reference");

                let mut run = |name: &str, flops: f64, f: &mut dyn FnMut()| {
                    let key = format!("cpu {name} {id}");
                    g.throughput(Throughput::Elements(flops as u64));
                    g.bench_function(BenchmarkId::new(name, &id), |b| {
                        b.iter_custom(|iters| {
                            let t = Instant::now();
                            for _ in 0..iters {
                                f();
                            }
                            let d = t.elapsed();
                            record(timings, &key, d.as_secs_f64() / iters as f64);
                            d
                        })
                    });
                };
                run("fused_fwd", shape.forward_flops(), &mut || {
                    lora_linear_forward(&mut y, &x, &w, None, &terms, m, k, n)
                });
                run("peft_fwd", shape.forward_flops(), &mut || {
                    peft_forward_cpu(&mut y2, &mut t_s, &mut t2, &x, &w, &term, m, k, n)
                });
                run("fused_bwd", shape.backward_flops(), &mut || {
                    lora_linear_backward(Some(&mut dx), &mut grads, &dy, &x, &w, &terms, m, k, n)
                });
                run("peft_bwd", shape.backward_flops(), &mut || {
                    peft_backward_cpu(&mut dx, &mut g_peft, &mut scratch, &dy, &x, &w, &t_s, &term, m, k, n)
                });
                let get = |v: &str| median(timings, &format!("cpu {v} {id}")).unwrap_or(f64::NAN);
                let base = median(timings, &base_key).unwrap_or(f64::NAN);
                let (ff, pf, fb, pb) = (get("fused_fwd"), get("peft_fwd"), get("fused_bwd"), get("peft_bwd"));
                rows.push(format!(
                    "| {m} | {k}×{n} | {r} | {:.1} ms ({:.0} GFLOP/s) | {:.1} ms ({:.0} GFLOP/s, {:.2}× base) | {:.1} ms ({:.2}×) | {:.1} ms ({:.0} GFLOP/s) | {:.1} ms ({:.2}×) |",
                    base * 1e3,
                    shape.base_flops() / base / 1e9,
                    ff * 1e3,
                    shape.forward_flops() / ff / 1e9,
                    ff / base,
                    pf * 1e3,
                    pf / ff,
                    fb * 1e3,
                    shape.backward_flops() / fb / 1e9,
                    pb * 1e3,
                    pb / fb,
                ));
            }
        }
    }
    g.finish();
    let mut out = vec![
        "| M | d_in×d_out | r | base X·Wᵀ | reference fused forward | PEFT-style forward (× fused) | reference fused backward (dX, dA, dB) | PEFT-style backward (× fused) |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    out.extend(rows);
    out
}

// ---- GPU ------------------------------------------------------------------------------------

/// Device time of `f` per call, with CUDA events around `iters` calls.
fn device_time(gpu: &Gpu, lora: &mut GpuLora, iters: u64, f: &mut dyn FnMut(&mut GpuLora)) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    let stop = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    start.record(&gpu.stream).unwrap();
    for _ in 0..iters {
        f(lora);
    }
    stop.record(&gpu.stream).unwrap();
    stop.synchronize().unwrap();
    start.elapsed_ms(&stop).unwrap() as f64 / 1e3 / iters as f64
}

fn gpu_benches(c: &mut Criterion, timings: &Timings, size: Size) -> Vec<String> {
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            say(&format!("SKIPPED GPU benchmarks: {e:#}"));
            return vec![format!("GPU benchmarks skipped: {e:#}")];
        }
    };
    let mut lora = GpuLora::new(&gpu).expect("GPU LoRA kernels");
    let cublas = lora.has_cublas();
    if !cublas {
        say("GPU benchmarks: cuBLAS not found, the unfused baselines are skipped");
    }
    let (ms, ranks, linears): (Vec<usize>, Vec<usize>, Vec<(usize, usize)>) = match size {
        Size::Full => (vec![1536, 4608], vec![16, 32, 64], FLUX_LINEARS.to_vec()),
        Size::Short if std::env::var("FK_BENCH_QUICK").is_ok_and(|v| v == "1") => {
            (vec![4608], vec![32], vec![FLUX_LINEARS[0], FLUX_LINEARS[2], FLUX_LINEARS[5]])
        }
        Size::Short => (vec![4608], vec![16, 32, 64], FLUX_LINEARS.to_vec()),
        Size::Smoke => (vec![200], vec![16], vec![(256, 384)]),
    };
    // Inputs: a pool of normal values tiled to the largest sizes, each shape using a prefix
    // (random, never zeros; drawing 240 M normals would cost more device-lease time than it is
    // worth for timing).
    let max_m = *ms.iter().max().unwrap();
    let max_k = linears.iter().map(|s| s.0).max().unwrap();
    let max_n = linears.iter().map(|s| s.1).max().unwrap();
    let max_nk = linears.iter().map(|s| s.0 * s.1).max().unwrap();
    let mut rng = Rng::new(23);
    let pool = rng.normal_vec((1 << 20) + 7, 1.0);
    let tiled = |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|i| pool[i % pool.len()] * scale).collect() };
    let x = tiled(max_m * max_k, 1.0);
    let w = tiled(max_nk, 0.02);
    let dy = tiled(max_m * max_n, 1.0);
    let mut g = c.benchmark_group("lora_gpu");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_millis(300));
    let name = gpu.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let mut out = vec![
        format!("GPU: {name}. Times in ms, TFLOP/s in parentheses; 'base' is cuBLAS's bare X·Wᵀ (bf16, f32 compute); speedups are unfused time / fused time (PEFT-style / accumulate-into-Y)."),
        String::new(),
        "| M | d_in×d_out | r | cuBLAS X·Wᵀ | fused kernel, X·Wᵀ alone (% of cuBLAS speed) | fused fwd | fwd speedup | fused bwd | bwd speedup | fused fwd+bwd | fwd+bwd speedup | hybrid (cuBLAS base) fwd / bwd / fwd+bwd (fwd × base) | hybrid fwd+bwd speedup | rel L2 fused vs cuBLAS Y |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    stream_rows(&out);
    let mut hopper_rows = vec![
        "Hopper (sm_90a) kernels: times in ms (TFLOP/s or % of cuBLAS X·Wᵀ's speed); 'base GEMMs' = cuBLAS X·Wᵀ + cuBLAS dY·W; speedups are PEFT-style / accumulate-into-Y / hybrid fwd+bwd time over the Hopper fwd+bwd.".to_string(),
        String::new(),
        "| M | d_in×d_out | r | cuBLAS X·Wᵀ | cuBLAS dY·W | Hopper X·Wᵀ alone, 128×256 tiles | 128×128 tiles | Hopper fwd | Hopper bwd | Hopper fwd+bwd | speedup vs PEFT / accumulate / hybrid | rel L2 Hopper vs accumulate Y |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    if lora.has_hopper() && cublas {
        stream_rows(&hopper_rows);
    }
    for &m in &ms {
        for &(k, n) in &linears {
            let base_shape = LinearShape::new(m, k, n, false, &[]).unwrap();
            lora.upload_base(&base_shape, &x[..m * k], &w[..n * k], None).unwrap();
            lora.upload_dout(&base_shape, &dy[..m * n]).unwrap();
            for &r in &ranks {
                let a = rng.normal_vec(r * k, 1.0 / (k as f32).sqrt());
                let bm = rng.normal_vec(n * r, 1.0 / (r as f32).sqrt());
                let terms = [LoraTerm { a: &a, b: &bm, rank: r, scale: 0.5, rows: 0..n, dropout: None }];
                let s = LinearShape::new(m, k, n, false, &terms).unwrap();
                lora.upload_terms(&s, &terms).unwrap();
                lora.upload_grads(&s, None).unwrap();
                let id = format!("{m}x{k}x{n}_r{r}");
                // Correctness at scale: the fused forward against the accumulate-into-Y baseline.
                let mut check = String::from("—");
                if cublas {
                    lora.set_base_gemm(BaseGemm::Fused).unwrap();
                    lora.run_forward(&s).unwrap();
                    let fused = lora.download_y(&s).unwrap();
                    lora.run_forward_unfused(&s, Unfused::Accumulate).unwrap();
                    let unfused = lora.download_y(&s).unwrap();
                    check = format!("{:.1e}", rel_l2(&fused, &unfused));
                }
                // (name, FLOPs, needs cuBLAS, setup run once before timing, timed call)
                type Step = fn(&mut GpuLora, &LinearShape);
                let nothing: Step = |_, _| {};
                // "fused": the base product inside the fused kernel; "hybrid": cuBLAS's base
                // product, the adapters and bias added by the fused kernel (the default).
                let fused_fwd: Step = |l, s| {
                    l.set_base_gemm(BaseGemm::Fused).unwrap();
                    l.run_forward(s).unwrap()
                };
                let fused_bwd: Step = |l, s| {
                    l.set_base_gemm(BaseGemm::Fused).unwrap();
                    l.run_backward(s, true, true).unwrap()
                };
                let hybrid_fwd: Step = |l, s| {
                    l.set_base_gemm(BaseGemm::Cublas).unwrap();
                    l.run_forward(s).unwrap()
                };
                let hybrid_bwd: Step = |l, s| {
                    l.set_base_gemm(BaseGemm::Cublas).unwrap();
                    l.run_backward(s, true, true).unwrap()
                };
                let peft_fwd: Step = |l, s| l.run_forward_unfused(s, Unfused::Peft).unwrap();
                let peft_bwd: Step = |l, s| l.run_backward_unfused(s, Unfused::Peft, true).unwrap();
                let acc_fwd: Step = |l, s| l.run_forward_unfused(s, Unfused::Accumulate).unwrap();
                let acc_bwd: Step = |l, s| l.run_backward_unfused(s, Unfused::Accumulate, true).unwrap();
                let (fwd, bwd, both) = (s.forward_flops(), s.backward_flops(), s.forward_flops() + s.backward_flops());
                let variants: [(&str, f64, bool, Step, Step); 14] = [
                    ("cublas_base", s.base_flops(), true, nothing, |l, s| l.run_base_cublas(s).unwrap()),
                    ("fused_base", s.base_flops(), false, nothing, |l, s| l.run_base_fused_kernel(s).unwrap()),
                    ("fused_fwd", fwd, false, nothing, fused_fwd),
                    ("peft_fwd", fwd, true, nothing, peft_fwd),
                    ("accum_fwd", fwd, true, nothing, acc_fwd),
                    // Each backward reads the S its own forward saved.
                    ("fused_bwd", bwd, false, fused_fwd, fused_bwd),
                    ("peft_bwd", bwd, true, peft_fwd, peft_bwd),
                    ("accum_bwd", bwd, true, acc_fwd, acc_bwd),
                    ("fused_fwd_bwd", both, false, nothing, |l, s| {
                        l.set_base_gemm(BaseGemm::Fused).unwrap();
                        l.run_forward(s).unwrap();
                        l.run_backward(s, true, true).unwrap()
                    }),
                    ("hybrid_fwd", fwd, true, nothing, hybrid_fwd),
                    ("hybrid_bwd", bwd, true, hybrid_fwd, hybrid_bwd),
                    ("hybrid_fwd_bwd", both, true, nothing, |l, s| {
                        l.set_base_gemm(BaseGemm::Cublas).unwrap();
                        l.run_forward(s).unwrap();
                        l.run_backward(s, true, true).unwrap()
                    }),
                    ("peft_fwd_bwd", both, true, nothing, |l, s| {
                        l.run_forward_unfused(s, Unfused::Peft).unwrap();
                        l.run_backward_unfused(s, Unfused::Peft, true).unwrap()
                    }),
                    ("accum_fwd_bwd", both, true, nothing, |l, s| {
                        l.run_forward_unfused(s, Unfused::Accumulate).unwrap();
                        l.run_backward_unfused(s, Unfused::Accumulate, true).unwrap()
                    }),
                ];
                for (name, flops, needs_blas, setup, f) in variants {
                    if needs_blas && !cublas {
                        continue;
                    }
                    setup(&mut lora, &s);
                    let key = format!("gpu {name} {id}");
                    g.throughput(Throughput::Elements(flops as u64));
                    g.bench_function(BenchmarkId::new(name, &id), |b| {
                        b.iter_custom(|iters| {
                            let t = device_time(&gpu, &mut lora, iters, &mut |l| f(l, &s));
                            record(timings, &key, t);
                            Duration::from_secs_f64(t * iters as f64)
                        })
                    });
                }
                let get = |v: &str| median(timings, &format!("gpu {v} {id}")).unwrap_or(f64::NAN);
                let tf = |flops: f64, t: f64| flops / t / 1e12;
                let base = get("cublas_base");
                let (fbase, ff, pf, af) = (get("fused_base"), get("fused_fwd"), get("peft_fwd"), get("accum_fwd"));
                let (fb, pb, ab) = (get("fused_bwd"), get("peft_bwd"), get("accum_bwd"));
                let (fall, pall, aall) = (get("fused_fwd_bwd"), get("peft_fwd_bwd"), get("accum_fwd_bwd"));
                let (hf, hb, hall) = (get("hybrid_fwd"), get("hybrid_bwd"), get("hybrid_fwd_bwd"));
                out.push(format!(
                    "| {m} | {k}×{n} | {r} | {:.3} ({:.0}) | {:.0} % | {:.3} ({:.0}; {:.2}× base) | {:.2}× / {:.2}× | {:.3} ({:.0}) | {:.2}× / {:.2}× | {:.3} | {:.2}× / {:.2}× | {:.3} / {:.3} / {:.3} ({:.2}× base) | {:.2}× / {:.2}× | {check} |",
                    base * 1e3,
                    tf(s.base_flops(), base),
                    100.0 * base / fbase,
                    ff * 1e3,
                    tf(fwd, ff),
                    ff / base,
                    pf / ff,
                    af / ff,
                    fb * 1e3,
                    tf(bwd, fb),
                    pb / fb,
                    ab / fb,
                    fall * 1e3,
                    pall / fall,
                    aall / fall,
                    hf * 1e3,
                    hb * 1e3,
                    hall * 1e3,
                    hf / base,
                    pall / hall,
                    aall / hall,
                ));
                stream_rows(&out[out.len() - 1..]);
                if lora.has_hopper() && cublas {
                    hopper_rows.push(hopper_row(&gpu, &mut lora, &mut g, timings, &s, &id));
                    stream_rows(&hopper_rows[hopper_rows.len() - 1..]);
                }
            }
        }
    }
    if lora.has_hopper() && cublas {
        // An int8 base (`quantize --format int8`) on Hopper: dequantised per call, then the
        // sm_90a GEMM, beside the bf16 Hopper path and the sm_80 kernel that dequantises tile by
        // tile. One shape (the largest K×N of the set at r = 32) to keep the device time small.
        let (k, n) = *linears.iter().max_by_key(|(k, n)| k * n).unwrap();
        let (m, r) = (*ms.iter().max().unwrap(), 32);
        let a = rng.normal_vec(r * k, 1.0 / (k as f32).sqrt());
        let bm = rng.normal_vec(n * r, 1.0 / (r as f32).sqrt());
        let terms = [LoraTerm { a: &a, b: &bm, rank: r, scale: 0.5, rows: 0..n, dropout: None }];
        let s = LinearShape::new(m, k, n, false, &terms).unwrap();
        let q = flux_kernels::quant::QuantParam::from_f32(
            flux_kernels::quant::Scheme::parse_format("int8").unwrap(),
            &w[..n * k],
            n,
            k,
        )
        .unwrap();
        let mut time = |name: &str, lora: &mut GpuLora, mode: BaseGemm| {
            lora.set_base_gemm(mode).unwrap();
            lora.set_hopper_tile_n(None).unwrap();
            let key = format!("gpu {name} int8");
            let flops = s.forward_flops() + s.backward_flops();
            g.throughput(Throughput::Elements(flops as u64));
            g.bench_function(BenchmarkId::new(name, format!("{m}x{k}x{n}_r{r}")), |b| {
                b.iter_custom(|iters| {
                    let t = device_time(&gpu, lora, iters, &mut |l| {
                        l.run_forward(&s).unwrap();
                        l.run_backward(&s, true, true).unwrap()
                    });
                    record(timings, &key, t);
                    Duration::from_secs_f64(t * iters as f64)
                })
            });
            median(timings, &key).unwrap_or(f64::NAN)
        };
        lora.upload_base(&s, &x[..m * k], &w[..n * k], None).unwrap();
        lora.upload_dout(&s, &dy[..m * n]).unwrap();
        lora.upload_terms(&s, &terms).unwrap();
        lora.upload_grads(&s, None).unwrap();
        let bf16_hopper = time("hopper_bf16_fwd_bwd", &mut lora, BaseGemm::Hopper);
        lora.upload_base_q(&s, &x[..m * k], &q.view().unwrap(), None).unwrap();
        let int8_hopper = time("hopper_int8_fwd_bwd", &mut lora, BaseGemm::Hopper);
        let int8_sm80 = time("fused_int8_fwd_bwd", &mut lora, BaseGemm::Fused);
        let flops = s.forward_flops() + s.backward_flops();
        let tf = |t: f64| flops / t / 1e12;
        hopper_rows.push(String::new());
        hopper_rows.push(format!(
            "int8 base, M = {m}, {k}×{n}, r = {r}, fwd+bwd: Hopper (dequantised per call) {:.3} ms ({:.0} TFLOP/s, {:.2}× the bf16 Hopper path's {:.3} ms); sm_80 kernel dequantising per tile {:.3} ms ({:.0}).",
            int8_hopper * 1e3,
            tf(int8_hopper),
            int8_hopper / bf16_hopper,
            bf16_hopper * 1e3,
            int8_sm80 * 1e3,
            tf(int8_sm80),
        ));
        stream_rows(&hopper_rows[hopper_rows.len() - 2..]);
    }
    g.finish();
    if hopper_rows.len() > 2 {
        out.push(String::new());
        out.extend(hopper_rows);
    }
    out
}

/// The sm_90a kernels (kernels/lora_gemm_sm90.cu) at one shape, beside cuBLAS's bare base GEMMs
/// and the other paths measured in the same call: one row of the Hopper table.
fn hopper_row(
    gpu: &Gpu,
    lora: &mut GpuLora,
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    timings: &Timings,
    s: &LinearShape,
    id: &str,
) -> String {
    type Step = fn(&mut GpuLora, &LinearShape);
    let nothing: Step = |_, _| {};
    let hop_fwd: Step = |l, s| {
        l.set_base_gemm(BaseGemm::Hopper).unwrap();
        l.set_hopper_tile_n(None).unwrap();
        l.run_forward(s).unwrap()
    };
    let (fwd, bwd) = (s.forward_flops(), s.backward_flops());
    let variants: [(&str, f64, Step, Step); 6] = [
        ("hopper_base256", s.base_flops(), nothing, |l, s| {
            l.set_hopper_tile_n(Some(256)).unwrap();
            l.run_base_hopper(s).unwrap()
        }),
        ("hopper_base128", s.base_flops(), nothing, |l, s| {
            l.set_hopper_tile_n(Some(128)).unwrap();
            l.run_base_hopper(s).unwrap()
        }),
        ("cublas_dx_base", s.base_flops(), nothing, |l, s| l.run_base_cublas_dx(s).unwrap()),
        ("hopper_fwd", fwd, nothing, hop_fwd),
        ("hopper_bwd", bwd, hop_fwd, |l, s| {
            l.set_base_gemm(BaseGemm::Hopper).unwrap();
            l.run_backward(s, true, true).unwrap()
        }),
        ("hopper_fwd_bwd", fwd + bwd, nothing, |l, s| {
            l.set_base_gemm(BaseGemm::Hopper).unwrap();
            l.set_hopper_tile_n(None).unwrap();
            l.run_forward(s).unwrap();
            l.run_backward(s, true, true).unwrap()
        }),
    ];
    let before = lora.hopper_launches();
    for (name, flops, setup, f) in variants {
        setup(lora, s);
        let key = format!("gpu {name} {id}");
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new(name, id), |b| {
            b.iter_custom(|iters| {
                let t = device_time(gpu, lora, iters, &mut |l| f(l, s));
                record(timings, &key, t);
                Duration::from_secs_f64(t * iters as f64)
            })
        });
    }
    // The Hopper forward's Y against the accumulate-into-Y baseline's, and whether every timed
    // call took the Hopper kernels (a fallback would time the sm_80 path under this name).
    let took = lora.hopper_launches() > before;
    hop_fwd(lora, s);
    let hy = lora.download_y(s).unwrap();
    lora.run_forward_unfused(s, Unfused::Accumulate).unwrap();
    let check = rel_l2(&hy, &lora.download_y(s).unwrap());
    let get = |v: &str| median(timings, &format!("gpu {v} {id}")).unwrap_or(f64::NAN);
    let tf = |flops: f64, t: f64| flops / t / 1e12;
    let (cb, cdx) = (get("cublas_base"), get("cublas_dx_base"));
    let (h256, h128) = (get("hopper_base256"), get("hopper_base128"));
    let (hf, hb, hall) = (get("hopper_fwd"), get("hopper_bwd"), get("hopper_fwd_bwd"));
    let (pall, aall, yall) = (get("peft_fwd_bwd"), get("accum_fwd_bwd"), get("hybrid_fwd_bwd"));
    format!(
        "| {} | {} | {} | {:.3} ({:.0}) | {:.3} ({:.0}) | {:.3} ({:.0} %) | {:.3} ({:.0} %) | {:.3} ({:.0}) | {:.3} ({:.0}) | {:.3} ({:.2}× base GEMMs) | {:.2}× / {:.2}× / {:.2}× | {:.1e}{} |",
        s.m,
        format_args!("{}×{}", s.k, s.n),
        s.terms.first().map_or(0, |t| t.rank),
        cb * 1e3,
        tf(s.base_flops(), cb),
        cdx * 1e3,
        tf(s.base_flops(), cdx),
        h256 * 1e3,
        100.0 * cb / h256,
        h128 * 1e3,
        100.0 * cb / h128,
        hf * 1e3,
        tf(fwd, hf),
        hb * 1e3,
        tf(bwd, hb),
        hall * 1e3,
        hall / (cb + cdx),
        pall / hall,
        aall / hall,
        yall / hall,
        check,
        if took { "" } else { " (fell back!)" },
    )
}

fn main() {
    // `cargo bench` passes --bench; without it criterion runs each routine once as a test.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let size = match (bench_mode, env_flag("FK_BENCH_FULL", false)) {
        (false, _) => Size::Smoke,
        (true, false) => Size::Short,
        (true, true) => Size::Full,
    };
    let timings: Timings = Rc::new(RefCell::new(BTreeMap::new()));
    // Fewer bootstrap resamples than criterion's 100 000: the analysis would otherwise cost more
    // of a GPU lease than the measurements.
    let mut c = Criterion::default().nresamples(5000).without_plots().configure_from_args();
    let gpu_table = if env_flag("FK_BENCH_GPU", true) { gpu_benches(&mut c, &timings, size) } else { vec![] };
    let cpu_table = if env_flag("FK_BENCH_CPU", true) { cpu_benches(&mut c, &timings, size) } else { vec![] };
    c.final_summary();
    let mut out = std::io::stdout();
    if !cpu_table.is_empty() {
        let _ = writeln!(out, "\n## CPU reference: fused vs unfused LoRA linear (median of criterion samples)\n");
        for l in &cpu_table {
            let _ = writeln!(out, "{l}");
        }
    }
    if !gpu_table.is_empty() {
        let _ = writeln!(out, "\n## GPU: fused kernels vs cuBLAS baselines (median, CUDA events)\n");
        for l in &gpu_table {
            let _ = writeln!(out, "{l}");
        }
    }
}
