//! GPU kernels against their CPU twins. Where no GPU (or no nvcc at build time) is present each
//! test prints why it is skipped; a run on a lent GPU is recorded in docs/gpu-runs.md.

mod common;
use common::{gpu_or_skip, skip};
use flux_kernels::kernels::activation::GpuActivation;
use flux_kernels::kernels::gpu::Gpu;
use flux_kernels::kernels::launch::DevMat;
use flux_kernels::ops::activation::gelu_tanh_forward;
use flux_kernels::util::{rel_l2, Rng};

#[test]
fn gpu_gelu_tanh_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_gelu_tanh_matches_cpu", Gpu::new()) else {
        return;
    };
    let mut rng = Rng::new(11);
    // Ragged length: not a multiple of the block size.
    let x = rng.normal_vec(100_003, 3.0);
    let act = GpuActivation::new(&gpu).unwrap();
    let (n, st) = (x.len(), &gpu.stream);
    let (xd, out) = (st.clone_htod(&x).unwrap(), st.clone_htod(&vec![f32::NAN; n]).unwrap());
    act.gelu_tanh(1, n, DevMat::f32(&xd, n), DevMat::f32(&out, n)).unwrap();
    let got = st.clone_dtoh(&out).unwrap();
    let mut want = vec![0f32; x.len()];
    gelu_tanh_forward(&mut want, &x);
    let err = rel_l2(&got, &want);
    println!("gelu_tanh f32: rel L2 {err:.2e}");
    assert!(err <= 1e-5, "rel L2 {err:e}");
}

#[test]
fn kernels_are_embedded_when_built_with_nvcc() {
    if flux_kernels::kernels::COMPILED {
        let fb = flux_kernels::kernels::module("activation").expect("activation fatbin");
        // A fatbin starts with the magic 0xBA55ED50.
        assert_eq!(&fb[..4], &0xBA55_ED50u32.to_le_bytes());
    } else {
        skip("kernels_are_embedded_when_built_with_nvcc", "built without nvcc");
        assert!(flux_kernels::kernels::MODULES.is_empty());
    }
}
