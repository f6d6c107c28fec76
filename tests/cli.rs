//! The binary end to end: `info` and `forward` as a user runs them.

mod common;
use common::*;
use flux_kernels::io::safetensors::SafeTensors;
use flux_kernels::util::rel_l2;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flux-kernels"))
}

#[test]
fn info_on_flux1_dev_prints_exact_counts() {
    let out = bin().args(["info", "--model", "flux1-dev"]).output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("parameters: 11,901,408,320"), "{s}");
    assert!(s.contains("double blocks: 19 × 339,831,296"), "{s}");
    assert!(s.contains("single blocks: 38 × 141,591,808"), "{s}");
    assert!(s.contains("modulation (acts once per sample): 3,247,448,064"), "{s}");
}

#[test]
fn info_describes_each_lora() {
    let out = bin()
        .args(["info", "--model"])
        .arg(fixture("tiny-diffusers"))
        .arg("--lora")
        .arg(fixture("lora-peft.safetensors"))
        .arg("--lora")
        .arg(format!("{}:0.5", fixture("lora-kohya.safetensors").display()))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.contains("diffusers/PEFT") && s.contains("rank: 4, alpha: 8"), "{s}");
    assert!(s.contains("kohya sd-scripts") && s.contains("strength 0.5"), "{s}");
}

#[test]
fn forward_writes_out_matching_the_fixture() {
    let dir = tmpdir("cli-forward");
    let out = dir.join("out.safetensors");
    let st = bin()
        .args(["forward", "--rope-axes", "4,6,6", "--model"])
        .arg(fixture("tiny-bfl.safetensors"))
        .arg("--inputs")
        .arg(fixture("tiny-inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .arg("--lora")
        .arg(format!("{}:0.8", fixture("lora-peft.safetensors").display()))
        .arg("--lora")
        .arg(format!("{}:-0.5", fixture("lora-kohya.safetensors").display()))
        .arg("--lora")
        .arg(format!("{}:1.3", fixture("lora-onetrainer.safetensors").display()))
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let f = SafeTensors::open(&out).unwrap();
    assert_eq!(f.info("out").unwrap().shape, vec![2, 16, 8]);
    assert!(rel_l2(&f.read_f32("out").unwrap().1, &expected("stack")) < 1e-4);
}

#[test]
fn failures_exit_nonzero_name_the_problem_and_write_nothing() {
    let dir = tmpdir("cli-fail");
    let out = dir.join("out.safetensors");
    let r = bin()
        .args(["forward", "--model"])
        .arg(fixture("tiny-bfl.safetensors"))
        .arg("--inputs")
        .arg(fixture("tiny-inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("--rope-axes"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no temp file left behind");

    let r = bin().args(["forward", "--model", "flux1-dev", "--inputs", "x", "--out", "y"]).output().unwrap();
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("without weights"));
    let r = bin().args(["info", "--model", "flux2-pro"]).output().unwrap();
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("not a built-in configuration"));
}

/// `bench-step` refuses bad settings before touching a device, naming the flag, and without a
/// GPU says why instead of panicking.
#[test]
fn bench_step_names_bad_settings_and_a_missing_gpu() {
    let run = |args: &[&str]| {
        let out = bin().arg("bench-step").args(args).output().unwrap();
        assert!(!out.status.success(), "bench-step {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--model", "random:tiny", "--size", "100"]);
    assert!(e.contains("--size 100"), "{e}");
    let e = run(&["--model", "random:tiny", "--steps", "0"]);
    assert!(e.contains("--steps"), "{e}");
    let e = run(&["--model", "random:tiny", "--base", "fp4"]);
    assert!(e.contains("--base `fp4`"), "{e}");
    if flux_kernels::engine::Device::parse("cuda").is_err() {
        let e = run(&["--model", "random:tiny", "--size", "64", "--text-tokens", "8"]);
        assert!(e.contains("--device cuda") && !e.contains("panicked"), "{e}");
    }
}
