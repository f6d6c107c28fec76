//! CPU reference ops side by side: the LoRA linear unmerged (base GEMM + low-rank terms, what
//! inference with switchable adapters costs) against the same product with the adapter merged
//! into the weight, and against the bare base GEMM. Ratios from one run on one machine are what
//! docs/perf.md quotes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flux_kernels::ops::lora::{lora_linear_forward, LoraTerm};
use flux_kernels::ops::matmul::linear_forward;
use flux_kernels::util::Rng;

fn lora_linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("lora_linear_cpu");
    g.sample_size(10);
    // Sized for a 2-core machine; FLUX's own widths are 3072 and up.
    let (m, k, n) = (256usize, 1024usize, 1024usize);
    let mut rng = Rng::new(5);
    let x = rng.normal_vec(m * k, 1.0);
    let w = rng.normal_vec(n * k, 0.03);
    let bias = rng.normal_vec(n, 0.1);
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    let mut out = vec![0f32; m * n];
    g.bench_function(BenchmarkId::new("base", format!("{m}x{k}x{n}")), |bch| {
        bch.iter(|| linear_forward(&mut out, &x, &w, Some(&bias), m, k, n))
    });
    for r in [16usize, 64] {
        let a = rng.normal_vec(r * k, 0.03);
        let b = rng.normal_vec(n * r, 0.03);
        let terms = [LoraTerm { a: &a, b: &b, rank: r, scale: 1.0, rows: 0..n, dropout: None }];
        g.bench_function(BenchmarkId::new(format!("unmerged_r{r}"), format!("{m}x{k}x{n}")), |bch| {
            bch.iter(|| lora_linear_forward(&mut out, &x, &w, Some(&bias), &terms, m, k, n))
        });
    }
    g.finish();
}

criterion_group!(benches, lora_linear);
criterion_main!(benches);
