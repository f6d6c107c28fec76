//! Files from the internet and runs that were killed (issue 15): each defect found by fuzzing and
//! by hand, rebuilt in a temp folder, ends in a clear error naming the file and the tensor, key
//! or process, or in a clean run. Safetensors headers, I8 tensors taken for numbers, shard paths
//! outside the model folder, outputs over things that are not regular files, two trainers on one
//! `--out`, stale lock and temp files of killed runs, the metrics file on resume.

mod common;
use common::*;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::cli::quantize;
use flux_kernels::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::train::builtin::{synthetic_samples, tiny_config, write_samples};
use flux_kernels::train::config::TrainConfig;
use flux_kernels::train::trainer::train;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A safetensors file written byte for byte: `header` as given (so it can say anything), then `data`.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

/// A copy of `src` with the tensors named in `replace` stored as (dtype, bytes) instead, the
/// shapes kept: a well-formed file whose dtypes say something else.
fn copy_with_dtypes(src: &Path, dst: &Path, replace: &[(&str, &str, Vec<u8>)]) {
    let st = SafeTensors::open(src).unwrap();
    let mut header = serde_json::Map::new();
    if !st.metadata().is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(st.metadata()).unwrap());
    }
    let mut data = Vec::new();
    for (name, info) in st.tensors() {
        let (dtype, bytes) = match replace.iter().find(|r| r.0 == name) {
            Some((_, d, b)) => (d.to_string(), b.clone()),
            None => (info.dtype.name().to_string(), st.bytes(name).unwrap().to_vec()),
        };
        let begin = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": info.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    write_raw(dst, &serde_json::Value::Object(header).to_string(), &data);
}

/// The pid of a process that has exited (and been reaped): surely not running.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
const SHARD2: &str = "diffusion_pytorch_model-00002-of-00002.safetensors";

/// The tiny diffusers model with its index's second shard renamed to `shard` everywhere.
fn with_shard_named(dir: &Path, shard: &str) {
    let p = dir.join(INDEX);
    let text = std::fs::read_to_string(&p).unwrap();
    let shard = serde_json::to_string(shard).unwrap();
    std::fs::write(&p, text.replace(&format!("\"{SHARD2}\""), &shard)).unwrap();
}

fn open_tiny(dir: &Path) -> anyhow::Result<Checkpoint> {
    Checkpoint::open(dir, Some(TINY_AXES.to_vec()))
}

#[test]
fn a_header_key_given_twice_is_refused_naming_key_and_file() {
    let dir = tmpdir("untrusted-dup");
    let p = dir.join("twice.safetensors");
    // Two entries for `w`: serde_json (and the safetensors crate) would keep the last one.
    let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    write_raw(&p, header, &[0; 8]);
    let e = err_string(SafeTensors::open(&p));
    assert!(e.contains("twice.safetensors") && e.contains("`w` appears twice"), "{e}");
    // Inside the metadata too (PEFT's alpha lives there).
    let header =
        r#"{"__metadata__":{"format":"pt","format":"np"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    write_raw(&p, header, &[0; 4]);
    let e = err_string(SafeTensors::open(&p));
    assert!(e.contains("`format` appears twice"), "{e}");
    // And in the JSON files next to a model: config.json.
    let model = dir.join("model");
    copy_dir(&fixture("tiny-diffusers"), &model);
    let cfg = model.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"num_layers\": 2,", "\"num_layers\": 2, \"num_layers\": 100000000,")).unwrap();
    let e = err_string(open_tiny(&model));
    assert!(e.contains("config.json") && e.contains("`num_layers` appears twice"), "{e}");
}

#[test]
fn headers_the_safetensors_crate_refuses_are_explained_by_tensor() {
    let dir = tmpdir("untrusted-header");
    let p = dir.join("gap.safetensors");
    // Offsets with a gap between the tensors, and bytes after the last one: both were read before.
    let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    write_raw(&p, gap, &[0; 12]);
    let e = err_string(SafeTensors::open(&p));
    assert!(e.contains("gap.safetensors") && e.contains("before tensor `b`"), "{e}");
    let p = dir.join("trailing.safetensors");
    write_raw(&p, r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 9]);
    let e = err_string(SafeTensors::open(&p));
    assert!(e.contains("trailing.safetensors") && e.contains("5 bytes after the last tensor"), "{e}");
    // A shape whose product overflows (release builds do not check arithmetic).
    let p = dir.join("overflow.safetensors");
    write_raw(&p, r#"{"big":{"dtype":"BF16","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}}"#, &[]);
    let e = err_string(SafeTensors::open(&p));
    assert!(e.contains("overflow.safetensors") && e.contains("`big`") && e.contains("overflows"), "{e}");
}

#[test]
fn int8_lora_factors_are_refused_naming_tensor_dtype_and_file() {
    let dir = tmpdir("untrusted-i8-lora");
    let src = fixture("lora-peft.safetensors");
    let key = "transformer.context_embedder.lora_A.weight";
    let n = SafeTensors::open(&src).unwrap().info(key).unwrap().numel();
    for dtype in ["I8", "U8"] {
        let p = dir.join(format!("lora-{dtype}.safetensors"));
        copy_with_dtypes(&src, &p, &[(key, dtype, vec![3u8; n])]);
        let cfg = open_tiny(&fixture("tiny-diffusers")).unwrap().cfg;
        let e = err_string(load_lora(&p, &cfg, UnknownKeys::Error));
        assert!(e.contains(&format!("lora-{dtype}.safetensors")) && e.contains(key) && e.contains(dtype), "{e}");
    }
}

#[test]
fn int8_forward_inputs_are_refused_naming_tensor_dtype_and_file() {
    let dir = tmpdir("untrusted-i8-inputs");
    let src = fixture("tiny-inputs.safetensors");
    let n = SafeTensors::open(&src).unwrap().info("img").unwrap().numel();
    let bad = dir.join("inputs-i8.safetensors");
    copy_with_dtypes(&src, &bad, &[("img", "I8", vec![1u8; n])]);
    let out = dir.join("out.safetensors");
    let run = bin()
        .args(["forward", "--rope-axes", "4,6,6", "--model"])
        .arg(fixture("tiny-bfl.safetensors"))
        .arg("--inputs")
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "forward accepted I8 inputs");
    assert!(e.contains("inputs-i8.safetensors") && e.contains("`img`") && e.contains("I8"), "{e}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn shard_paths_are_confined_to_the_model_folder() {
    let dir = tmpdir("untrusted-shards");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // A file that must not be opened, let alone quoted: its first 8 bytes would read as a
    // header length and land in the error text.
    let secret = outside.join("secret.txt");
    std::fs::write(&secret, b"SECRETS!SECRETS!SECRETS!").unwrap();
    let leaked = u64::from_le_bytes(*b"SECRETS!").to_string();
    // A valid shard outside the folder: reachable only through `..` or a link.
    std::fs::copy(fixture("tiny-diffusers").join(SHARD2), outside.join("shard.safetensors")).unwrap();

    let cases = [
        ("absolute", secret.display().to_string(), "not a relative path"),
        ("parent", "../outside/shard.safetensors".to_string(), "leaves the folder"),
        ("link", "link.safetensors".to_string(), "outside the model folder"),
    ];
    for (tag, shard, why) in cases {
        let model = dir.join(tag);
        copy_dir(&fixture("tiny-diffusers"), &model);
        std::os::unix::fs::symlink(outside.join("shard.safetensors"), model.join("link.safetensors")).unwrap();
        with_shard_named(&model, &shard);
        let e = err_string(open_tiny(&model));
        assert!(e.contains(INDEX) && e.contains(&shard) && e.contains(why), "{tag}: {e}");
        assert!(!e.contains("SECRETS") && !e.contains(&leaked), "{tag}: the target's bytes leak: {e}");
    }

    // The Hugging Face cache: a snapshot's files are links into the repository's blobs/, which
    // lies outside the snapshot folder. That layout still loads.
    let repo = dir.join("hub/models--tiny");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots/abc123/transformer");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, e) in std::fs::read_dir(fixture("tiny-diffusers")).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = blobs.join(format!("blob{i}"));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(e.file_name())).unwrap();
    }
    let ckpt = open_tiny(&snap).unwrap();
    assert_eq!(ckpt.files.len(), 2);
}

#[test]
fn a_temp_file_name_planted_as_a_link_is_not_followed() {
    let dir = tmpdir("untrusted-tmp-link");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let out = dir.join("out.safetensors");
    // The name the atomic writer of this process uses for `out`.
    let tmp = dir.join(format!(".out.safetensors.{}.tmp", std::process::id()));
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    let v = [1.0f32, 2.0];
    write_tensors(&out, &[OutTensor { name: "x", shape: vec![2], data: &v, dtype: Dtype::F32 }], &Default::default())
        .unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(std::fs::symlink_metadata(&out).unwrap().is_file(), "the output is a file, not the planted link");
    assert_eq!(SafeTensors::open(&out).unwrap().read_f32("x").unwrap().1, v);
}

fn tiny_run(dir: &Path) -> TrainConfig {
    let cfg = tiny_config();
    let data = dir.join("data");
    write_samples(&data, &synthetic_samples(&cfg, 4, 8, 4, 1), cfg.context_in_dim).unwrap();
    TrainConfig {
        data: data.display().to_string(),
        rank: 2,
        steps: 3,
        checkpoint_every: 2,
        out: dir.join("out/lora.safetensors").display().to_string(),
        metrics: dir.join("metrics.jsonl").display().to_string(),
        save_dtype: "f32".into(),
        ..TrainConfig::default()
    }
}

fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn a_metrics_path_that_is_a_link_is_not_written_through() {
    let dir = tmpdir("untrusted-metrics-link");
    let mut tc = tiny_run(&dir);
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    std::os::unix::fs::symlink(&victim, &tc.metrics).unwrap();
    tc.steps = 1;
    let e = err_string(train(tc.clone(), None, no_stop(), true));
    assert!(e.contains("metrics.jsonl") && e.contains("not a regular file"), "{e}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

#[test]
fn resume_truncates_the_metrics_to_the_resumed_step() {
    let dir = tmpdir("untrusted-metrics-resume");
    let tc = tiny_run(&dir);
    // Three steps with a checkpoint at step 2; then a kill in the middle of writing step 4's line.
    train(tc.clone(), None, no_stop(), true).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&tc.metrics).unwrap();
    std::io::Write::write_all(&mut f, b"{\"step\":4,\"lo").unwrap();
    drop(f);
    let ckpt = PathBuf::from(tc.checkpoint_path());
    let resumed = TrainConfig { steps: 5, ..tc.clone() };
    train(resumed, Some(&ckpt), no_stop(), true).unwrap();
    let text = std::fs::read_to_string(&tc.metrics).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5], "each step once, in order:\n{text}");
}

/// Waits for `path` to appear (a child process making it), up to a minute.
fn wait_for(path: &Path) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn one_trainer_per_out_and_a_killed_ones_lock_and_temps_are_taken_over() {
    let dir = tmpdir("untrusted-lock");
    let out = dir.join("lora.safetensors");
    let lock = dir.join("lora.safetensors.lock");
    // The built-in demo, long enough to be running while the second one starts.
    let mut first = bin()
        .args(["train", "--steps", "100000000", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id();
    let locked = wait_for(&lock);
    let second = bin().args(["train", "--steps", "2", "--out"]).arg(&out).output().unwrap();
    let _ = first.kill(); // SIGKILL: no chance to clean anything up.
    let _ = first.wait();
    assert!(locked, "the first trainer made no lock file {}", lock.display());
    let e = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second trainer on the same --out ran");
    assert!(e.contains("lora.safetensors.lock") && e.contains(&format!("pid {pid}")), "{e}");

    // What a kill during a write leaves: temp files named for the dead process.
    let ckpt = dir.join("lora.safetensors.ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let stale = [dir.join(format!(".lora.safetensors.{pid}.tmp")), ckpt.join(format!(".state.safetensors.{pid}.tmp"))];
    for s in &stale {
        std::fs::write(s, b"half a file").unwrap();
    }
    let third = bin().args(["train", "--steps", "2", "--out"]).arg(&out).output().unwrap();
    let log = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{log}");
    assert!(log.contains("took over") && log.contains(&pid.to_string()), "{log}");
    assert!(log.contains("removed 2 temp files"), "{log}");
    assert!(stale.iter().all(|s| !s.exists()), "stale temp files left");
    assert!(!lock.exists(), "the lock file goes with the run");
    assert!(out.is_file());
}

#[test]
fn quantize_removes_the_temp_files_of_a_killed_quantize() {
    let dir = tmpdir("untrusted-quant-stale");
    let out = dir.join("q.safetensors");
    let stale = dir.join(format!(".q.safetensors.{}.tmp", dead_pid()));
    let other = dir.join(format!(".other.safetensors.{}.tmp", dead_pid()));
    std::fs::write(&stale, b"half a file").unwrap();
    std::fs::write(&other, b"not ours").unwrap();
    let report = quantize::run(fixture("tiny-bfl.safetensors").to_str().unwrap(), &out, "int8", Some("4,6,6")).unwrap();
    assert!(report.contains("removed") && report.contains(".q.safetensors."), "{report}");
    assert!(!stale.exists() && other.exists());
    // The 8-bit base weights it wrote (I8 codes with their scales) still load and run.
    let y = run_forward(&out, Some(TINY_AXES), &[]).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
}
