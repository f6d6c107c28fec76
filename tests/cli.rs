//! The binary end to end as a user runs it (`info`, `forward`, `plan`, `bench-step`), and the command
//! tree: every flag documented, the old spellings still accepted.

mod common;
use common::*;
use flux_kernels::io::safetensors::SafeTensors;
use flux_kernels::util::rel_l2;
use std::process::Command;

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
    let e = run(&["--model", "random:tiny", "--predict", "--card", "a100"]);
    assert!(e.contains("--card `a100`"), "{e}");
    if flux_kernels::engine::Device::parse("cuda").is_err() {
        let e = run(&["--model", "random:tiny", "--size", "64", "--text-tokens", "8"]);
        // The way out is named: the CPU reference.
        assert!(e.contains("CUDA GPU") && e.contains("--device cpu") && !e.contains("panicked"), "{e}");
    }
}

/// Every argument of every command (hidden ones included) says what it is: a description with
/// its default and unit, not a bare `--flag <FLAG>` in `--help`.
#[test]
fn every_argument_has_help_text() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                missing.push(format!("{path} {}", a.get_long().map_or(id.to_string(), |l| format!("--{l}"))));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(format!("{path} {} (the command itself)", sub.get_name()));
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let cmd = flux_kernels::cli::Cli::command();
    cmd.clone().debug_assert();
    let mut missing = Vec::new();
    walk(&cmd, "flux-kernels", &mut missing);
    assert!(missing.is_empty(), "{} arguments without help text:\n{}", missing.len(), missing.join("\n"));
}

/// The old spellings (`plan --batch`, `--checkpointing on`) still work, print the same plan as
/// the new ones, and say on stderr which flag to use instead; a bad old value names the flag.
#[test]
fn old_flag_spellings_still_work_with_a_note() {
    let plan = |args: &[&str]| {
        let out =
            bin().args(["plan", "--model", "flux1-dev", "--rank", "32", "--base", "int8"]).args(args).output().unwrap();
        assert!(out.status.success(), "plan {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (old, note) = plan(&["--batch", "2", "--checkpointing", "on"]);
    let (new, quiet) = plan(&["--batch-size", "2", "--gradient-checkpointing"]);
    assert_eq!(old, new);
    assert!(new.contains("batch 2") && new.contains("checkpointing on"), "{new}");
    assert!(note.contains("--batch-size") && note.contains("--gradient-checkpointing"), "{note}");
    assert!(!quiet.contains("deprecated"), "{quiet}");
    assert_eq!(plan(&["--batch-size", "2", "--gradient-checkpointing", "true"]).0, new);
    let (off, _) = plan(&["--checkpointing", "off"]);
    assert_eq!(off, plan(&["--gradient-checkpointing", "--no-gradient-checkpointing"]).0);
    assert!(off.contains("checkpointing off"), "{off}");

    let out = bin().args(["plan", "--model", "flux1-dev", "--checkpointing", "maybe"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--checkpointing"));
    // Hidden: `--help` shows one spelling per concept.
    let help = String::from_utf8(bin().args(["plan", "--help"]).output().unwrap().stdout).unwrap();
    assert!(help.contains("--batch-size") && !help.contains("--batch ") && !help.contains("--checkpointing"), "{help}");
}

/// `train --model X` without `--data` is an error naming the flag (it used to train the built-in
/// set for 1000 steps); `--data builtin` asks for that set explicitly.
#[test]
fn train_needs_data_with_a_model_unless_builtin_is_asked_for() {
    let dir = tmpdir("cli-train-data");
    let out = dir.join("l.safetensors");
    let model = fixture("tiny-bfl.safetensors");
    let base = |cmd: &mut Command| {
        cmd.args(["train", "--device", "cpu", "--rope-axes", "4,6,6", "--steps", "2", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out);
    };
    let mut c = bin();
    base(&mut c);
    let r = c.output().unwrap();
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("--data FOLDER") && e.contains("--data builtin") && !e.contains("panicked"), "{e}");
    assert!(!out.exists());

    let mut c = bin();
    base(&mut c);
    let r = c.args(["--data", "builtin", "--rank", "2"]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let so = String::from_utf8_lossy(&r.stdout);
    assert!(so.contains("wrote") && so.contains("l.safetensors"), "the result goes to stdout: {so}");
    assert!(out.exists());
}

/// Outputs: a missing parent folder is created (one rule for every command), and a folder output
/// is never named like a file.
#[test]
fn outputs_create_parent_folders_and_folders_are_not_named_like_files() {
    let dir = tmpdir("cli-outputs");
    let out = dir.join("missing/dir/f.safetensors");
    let r = bin()
        .args(["lora", "convert", "--format", "kohya", "--model"])
        .arg(fixture("tiny-diffusers"))
        .arg("--in")
        .arg(fixture("lora-peft.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.is_file());

    let r = bin()
        .args(["quantize", "--format", "int8", "--model"])
        .arg(fixture("tiny-diffusers"))
        .arg("--out")
        .arg(dir.join("q.safetensors"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("q.safetensors") && e.contains("folder") && !e.contains("panicked"), "{e}");
    assert!(!dir.join("q.safetensors").exists());
}

/// `cache --flip true` copies `train`'s syntax and is accepted like `--flip`.
#[test]
fn switches_take_an_optional_true_or_false() {
    use clap::Parser;
    use flux_kernels::cli::Cli;
    for args in [&["--flip", "true"][..], &["--flip"], &["--flip", "false"], &["--no-flip"]] {
        let mut argv = vec!["flux-kernels", "cache", "--model", "m", "--data", "d"];
        argv.extend_from_slice(args);
        assert!(Cli::try_parse_from(&argv).is_ok(), "cache {args:?} was refused");
    }
}

/// Errors that stop short of the fix: an empty data folder names what `train` looks for, and a
/// failed `sample` leaves no output folder behind.
#[test]
fn empty_data_and_failed_sample_say_what_is_missing_and_leave_nothing() {
    let dir = tmpdir("cli-empty");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let r = bin()
        .args(["train", "--device", "cpu", "--rope-axes", "4,6,6", "--steps", "1", "--model"])
        .arg(fixture("tiny-bfl.safetensors"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.join("l.safetensors"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("no images") && e.contains(".txt captions") && !e.contains("panicked"), "{e}");

    let out = dir.join("samples");
    let r = bin()
        .args(["sample", "--device", "cpu", "--steps", "1", "--width", "32", "--height", "32", "--lora"])
        .arg(dir.join("no-such-lora.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no-such-lora"), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!out.exists(), "a failed sample left {}", out.display());
}
