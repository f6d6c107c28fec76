//! Flash attention at FLUX.1 shapes on the GPU: forward, backward (and each of its three
//! launches), against the materialised-softmax baseline (cuBLAS + a row softmax), timed with CUDA
//! events (median of FK_BENCH_REPS timed calls after warm-up). b = 1, 24 heads × 128, and
//! l = 1536 (512² image: 1024 image + 512 text tokens) and 4608 (1024²: 4096 + 512), with and
//! without a T5 padding mask. PyTorch's scaled_dot_product_attention on the same card is timed by
//! tools/attn_bench_torch.py in the same device call (tools/gpu-run.sh).
//!
//! Writes the markdown table to stdout and, when set, to $FK_BENCH_TABLE. Without a GPU it says
//! why and exits 0 (CI builds it; it never runs there). FK_BENCH_SMOKE=1 runs a tiny shape once.

use flux_kernels::kernels::attention::{AttnBuffers, AttnDims, BackwardStep, FwdVariant, GpuAttention};
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::util::Rng;
use std::fmt::Write as _;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Median seconds per call of `f`, each call timed with its own pair of CUDA events.
fn median_time(gpu: &Gpu, warm: usize, reps: usize, f: &mut dyn FnMut()) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    for _ in 0..warm {
        f();
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let stop = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        start.record(&gpu.stream).unwrap();
        f();
        stop.record(&gpu.stream).unwrap();
        stop.synchronize().unwrap();
        t.push(start.elapsed_ms(&stop).unwrap() as f64 / 1e3);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn fill(attn: &GpuAttention, bufs: &mut AttnBuffers, rng: &mut Rng) {
    let n = bufs.dims.numel();
    // Random data, never zeros (zeros run faster than real data on these cards); unit-RMS q and
    // k as QK-RMSNorm leaves them.
    let pool = rng.normal_vec(n.min(1 << 22) + 3, 1.0);
    let tiled = |off: usize| -> Vec<f32> { (0..n).map(|i| pool[(i + off) % pool.len()]).collect() };
    let (mut q, mut k, mut v, mut o) = (tiled(0), tiled(1), tiled(2), tiled(3));
    attn.upload(&mut bufs.q, &q).unwrap();
    attn.upload(&mut bufs.k, &k).unwrap();
    attn.upload(&mut bufs.v, &v).unwrap();
    attn.upload(&mut bufs.dout, &o).unwrap();
    q.clear();
    k.clear();
    v.clear();
    o.clear();
}

fn main() {
    let smoke = std::env::var("FK_BENCH_SMOKE").is_ok_and(|v| v == "1") || !std::env::args().any(|a| a == "--bench");
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            println!("SKIPPED attention benchmark: {e:#}");
            return;
        }
    };
    let attn = match GpuAttention::new(&gpu) {
        Ok(a) => a,
        Err(e) => {
            println!("SKIPPED attention benchmark: {e:#}");
            return;
        }
    };
    let (lens, heads, warm, reps) =
        if smoke { (vec![100], 2, 1, 1) } else { (vec![1536, 4608], 24, 3, env_usize("FK_BENCH_REPS", 15)) };
    let name = gpu.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let mut table = String::new();
    let _ = writeln!(
        table,
        "GPU: {name}. b = 1, {heads} heads × 128. Median of {reps} calls (CUDA events), ms and TFLOP/s \
         (forward 4·h·l²·d FLOPs, backward 2.5× that, the FlashAttention convention)."
    );
    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| l | mask | flash fwd (128-row blocks) | flash fwd, 64-row blocks | Hopper fwd (sm_90a: TMA, wgmma, overlapped) | Hopper fwd, serial schedule | flash bwd, sm_80 kernels (prep / dK,dV / dQ) | Hopper bwd (sm_90a dK,dV / dQ, overlapped; speedup) | Hopper bwd, serial schedule (dK,dV / dQ) | flash fwd+bwd (the defaults) | materialised fwd (cuBLAS + softmax) | flash fwd speedup |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rng = Rng::new(5);
    for &l in &lens {
        for masked in [false, true] {
            // T5 padding: a prompt of 77 real tokens out of 512 text tokens (the text comes first
            // in FLUX's joint sequence), every image token kept.
            let mask: Option<Vec<u8>> = masked.then(|| (0..l).map(|i| u8::from(i >= 512.min(l) || i < 77)).collect());
            let dims = AttnDims { b: 1, h: heads, l, d: 128 };
            let mut bufs = attn.alloc(dims, mask.as_deref()).expect("device buffers");
            fill(&attn, &mut bufs, &mut rng);
            let fwd = median_time(&gpu, warm, reps, &mut || attn.forward_variant(&bufs, FwdVariant::Rows128).unwrap());
            let hop = |v: FwdVariant| {
                attn.has_hopper()
                    .then(|| median_time(&gpu, warm, reps, &mut || attn.forward_variant(&bufs, v).unwrap()))
            };
            let (hopper, hopper_serial) = (hop(FwdVariant::Hopper), hop(FwdVariant::HopperSerial));
            let fwd64 = median_time(&gpu, warm, reps, &mut || attn.forward_variant(&bufs, FwdVariant::Rows64).unwrap());
            attn.forward(&bufs).unwrap();
            let step = |s: BackwardStep| median_time(&gpu, warm, reps, &mut || attn.backward_step(&bufs, s).unwrap());
            let steps = |ss: [BackwardStep; 3]| {
                median_time(&gpu, warm, reps, &mut || {
                    for s in ss {
                        attn.backward_step(&bufs, s).unwrap()
                    }
                })
            };
            let (prep, dkdv, dq) = (step(BackwardStep::Prep), step(BackwardStep::DkDv), step(BackwardStep::Dq));
            let bwd = steps([BackwardStep::Prep, BackwardStep::DkDv, BackwardStep::Dq]);
            // The sm_90a backward: (all three launches, dK/dV, dQ), overlapped and serial.
            let hop_bwd_of = |kv: BackwardStep, q: BackwardStep| {
                attn.has_hopper().then(|| (steps([BackwardStep::Prep, kv, q]), step(kv), step(q)))
            };
            let hop_bwd = hop_bwd_of(BackwardStep::DkDvHopper, BackwardStep::DqHopper);
            let hop_bwd_serial = hop_bwd_of(BackwardStep::DkDvHopperSerial, BackwardStep::DqHopperSerial);
            let both = median_time(&gpu, warm, reps, &mut || {
                attn.forward(&bufs).unwrap();
                attn.backward(&bufs).unwrap();
            });
            let naive = if attn.has_cublas() {
                Some(median_time(&gpu, warm, reps, &mut || attn.forward_naive(&mut bufs).unwrap()))
            } else {
                None
            };
            let tf = |flops: f64, s: f64| flops / s / 1e12;
            let (ff, bf) = (dims.forward_flops(), dims.backward_flops());
            let naive_txt = naive.map_or("no cuBLAS".into(), |t| format!("{:.3} ({:.0})", t * 1e3, tf(ff, t)));
            let speedup = naive.map_or("—".into(), |t| format!("{:.2}×", t / fwd));
            let cell = |t: Option<f64>| {
                t.map_or("not compute capability 9.0".into(), |t| format!("{:.3} ({:.0})", t * 1e3, tf(ff, t)))
            };
            let (hopper_txt, serial_txt) = (cell(hopper), cell(hopper_serial));
            let hop_bwd_txt = hop_bwd.map_or("not compute capability 9.0".into(), |(all, kv, q)| {
                format!(
                    "{:.3} ({:.0}) (– / {:.3} / {:.3}; {:.2}× sm_80)",
                    all * 1e3,
                    tf(bf, all),
                    kv * 1e3,
                    q * 1e3,
                    bwd / all
                )
            });
            let serial_bwd_txt = hop_bwd_serial.map_or("not compute capability 9.0".into(), |(all, kv, q)| {
                format!("{:.3} ({:.0}) ({:.3} / {:.3})", all * 1e3, tf(bf, all), kv * 1e3, q * 1e3)
            });
            let _ = writeln!(
                table,
                "| {l} | {} | {:.3} ({:.0}) | {:.3} ({:.0}) | {hopper_txt} | {serial_txt} | {:.3} ({:.0}) ({:.3} / {:.3} / {:.3}) | {hop_bwd_txt} | {serial_bwd_txt} | {:.3} ({:.0}) | {naive_txt} | {speedup} |",
                if masked { "77 of 512 text tokens" } else { "none" },
                fwd * 1e3,
                tf(ff, fwd),
                fwd64 * 1e3,
                tf(ff, fwd64),
                bwd * 1e3,
                tf(bf, bwd),
                prep * 1e3,
                dkdv * 1e3,
                dq * 1e3,
                both * 1e3,
                tf(ff + bf, both),
            );
            // Flush each row as it is measured, so a run cut short keeps what it finished.
            if let Some(path) = std::env::var_os("FK_BENCH_TABLE") {
                let _ = std::fs::write(path, &table);
            }
        }
    }
    print!("{table}");
}
