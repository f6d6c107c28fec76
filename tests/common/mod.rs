//! Shared helpers of the integration tests: fixture paths, running the reference forward, and
//! rewriting fixture files into broken or re-encoded variants.
#![allow(dead_code)]

use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::AdapterSet;
use flux_kernels::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::{flux_forward, FluxInputs};
use flux_kernels::model::weights::FluxWeights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const TINY_AXES: &[usize] = &[4, 6, 6];

/// A fixture file. FK_FIXTURES overrides the folder: the GPU check runs these test binaries on
/// another machine, where the source tree sits at another path.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("FK_FIXTURES") {
        Some(d) => PathBuf::from(d).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name),
    }
}

/// A fresh temp folder per test.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn expected(name: &str) -> Vec<f32> {
    SafeTensors::open(&fixture("tiny-expected.safetensors")).unwrap().read_f32(name).unwrap().1
}

/// Forward of the CPU reference on the tiny inputs with the given LoRAs and strengths.
pub fn run_forward(model: &Path, axes: Option<&[usize]>, loras: &[(PathBuf, f32)]) -> anyhow::Result<Vec<f32>> {
    let ckpt = Checkpoint::open(model, axes.map(|a| a.to_vec()))?;
    let w = FluxWeights::new(&ckpt.cfg, &|n| ckpt.param(n).cloned())?;
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), &ckpt.cfg)?;
    let mut set = AdapterSet::new();
    for (p, s) in loras {
        set.add(&load_lora(p, &ckpt.cfg, UnknownKeys::Error)?.terms, *s);
    }
    flux_forward(&ckpt.cfg, &w, &inp, &set)
}

/// `grad` on the tiny fixture (its inputs, the golden target, the CPU engine) with `lora`,
/// gradients written to `out`; returns the loss.
pub fn tiny_grad(lora: &Path, out: &Path) -> anyhow::Result<f64> {
    flux_kernels::cli::grad::run(
        fixture("tiny-diffusers").to_str().unwrap(),
        &fixture("tiny-inputs.safetensors"),
        &fixture("tiny-grad-target.safetensors"),
        lora,
        out,
        None,
        UnknownKeys::Error,
        "cpu",
    )
}

/// All tensors of a file as (name, shape, dtype, f32 values), plus its metadata.
pub type Tensors = Vec<(String, Vec<usize>, Dtype, Vec<f32>)>;

pub fn read_all(path: &Path) -> (Tensors, BTreeMap<String, String>) {
    let st = SafeTensors::open(path).unwrap();
    let t = st
        .tensors()
        .iter()
        .map(|(n, info)| (n.clone(), info.shape.clone(), info.dtype, st.read_f32(n).unwrap().1))
        .collect();
    (t, st.metadata().clone())
}

pub fn write_all(path: &Path, tensors: &Tensors, meta: &BTreeMap<String, String>) {
    let out: Vec<OutTensor> =
        tensors.iter().map(|(n, s, d, v)| OutTensor { name: n, shape: s.clone(), data: v, dtype: *d }).collect();
    write_tensors(path, &out, meta).unwrap();
}

/// Copies a file with its tensors transformed by `f`.
pub fn rewrite(src: &Path, dst: &Path, f: impl FnOnce(&mut Tensors)) {
    let (mut t, meta) = read_all(src);
    f(&mut t);
    write_all(dst, &t, &meta);
}

/// Every tensor of an adapter file by name.
pub fn file_tensors(p: &str) -> BTreeMap<String, Vec<f32>> {
    read_all(Path::new(p)).0.into_iter().map(|(n, _, _, v)| (n, v)).collect()
}

/// `tc` (a run of `steps` steps that wrote `want` to another path) stopped after its first step,
/// then resumed from its checkpoint: the file it writes must be `want` bit for bit. Returns the
/// checkpoint folder.
pub fn resumes_bit_for_bit(
    tc: &flux_kernels::train::config::TrainConfig,
    want: &BTreeMap<String, Vec<f32>>,
) -> PathBuf {
    use flux_kernels::train::trainer::train;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let o = train(tc.clone(), None, Arc::new(AtomicBool::new(true)), true).unwrap();
    assert!(o.interrupted && o.steps_done == 1);
    let ckpt = PathBuf::from(tc.checkpoint_path());
    let steps = train(tc.clone(), Some(&ckpt), Arc::new(AtomicBool::new(false)), true).unwrap().steps_done;
    assert_eq!(steps, tc.steps);
    let resumed = file_tensors(&tc.out);
    assert_eq!(want.keys().collect::<Vec<_>>(), resumed.keys().collect::<Vec<_>>());
    for (k, v) in want {
        assert!(v == &resumed[k], "{k}: resumed run differs");
    }
    ckpt
}

pub fn err_string<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ---- GPU tests ---------------------------------------------------------------------------------

/// Writes straight to stderr: libtest captures print!/eprintln!, so a skip line written that
/// way would never reach the CI log (the GPU check counts these lines as failures). Under
/// FK_REQUIRE_GPU=1 (the emulated run in CI, `tools/gpu-check.sh --emulate`) a skip is a failure,
/// so a GPU test that silently stopped running cannot count as passed there.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    if std::env::var_os("FK_REQUIRE_GPU").is_some_and(|v| v == "1") {
        panic!("{test} would be SKIPPED, but FK_REQUIRE_GPU=1 asks for every GPU test to run: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The GPU object a test needs, or None after a SKIPPED line saying why (no device, no driver,
/// no kernels in this build).
pub fn gpu_or_skip<T>(test: &str, made: anyhow::Result<T>) -> Option<T> {
    match made {
        Ok(t) => Some(t),
        Err(e) => {
            skip(test, &format!("{e:#}"));
            None
        }
    }
}

/// A different seed every run, printed with any failure so it can be replayed (FK_TEST_SEED).
pub fn fresh_seed() -> u64 {
    if let Some(s) = std::env::var("FK_TEST_SEED").ok().and_then(|s| s.parse().ok()) {
        return s;
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    t.as_nanos() as u64 ^ 0x5DEE_CE66_D1CE_4E5B
}

pub fn bf16_round(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
}

/// Normal values already rounded to bf16, so CPU and GPU see the same operands.
pub fn normal_bf16(rng: &mut flux_kernels::util::Rng, n: usize, std: f32) -> Vec<f32> {
    let mut v = rng.normal_vec(n, std);
    bf16_round(&mut v);
    v
}

/// Relative L2 of `got` against `want` within `tol`, every value finite (an unwritten, poisoned
/// output shows as NaN); prints the error; the seed goes into every failure message.
pub fn check(what: &str, got: &[f32], want: &[f32], tol: f64, seed: u64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite values (unwritten or NaN); seed {seed}");
    let e = flux_kernels::util::rel_l2(got, want);
    println!("{what}: rel L2 {e:.2e}");
    assert!(e <= tol, "{what}: rel L2 {e:.3e} > {tol:e}; seed {seed}");
    e
}
pub mod gpu;

// ---- the command-line binary -------------------------------------------------------------------

/// The flux-kernels binary of this build.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_flux-kernels"))
}

/// Runs the binary: (exit success, stdout + stderr). A panic is never an acceptable answer.
pub fn run(args: &[&str]) -> (bool, String) {
    let o = bin().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    (o.status.success(), text)
}

/// The emulated libnccl.so.2, compiled once per test binary.
pub fn emulated_nccl() -> PathBuf {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let dir = tmpdir("nccl-emulation");
        let out = dir.join("libnccl.so.2");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/nccl-emulation/nccl_emulation.c");
        let st = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-lpthread")
            .status()
            .expect("a C compiler (cc) to build the emulated NCCL");
        assert!(st.success(), "compiling {} failed", src.display());
        out
    })
    .clone()
}

/// A LoRA file's tensors (name, f32 values).
pub fn lora(p: &Path) -> Vec<(String, Vec<f32>)> {
    read_all(p).0.into_iter().map(|t| (t.0, t.3)).collect()
}

/// Each step's (loss, gradient norm) from a metrics file.
pub fn losses(metrics: &Path) -> Vec<(f64, f64)> {
    let num = |j: &serde_json::Value, k: &str| j[k].as_f64().unwrap();
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|j| (num(&j, "loss"), num(&j, "grad_norm")))
        .collect()
}

pub fn bits(t: &[(String, Vec<f32>)]) -> Vec<(String, Vec<u32>)> {
    t.iter().map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
}
