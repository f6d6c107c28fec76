//! Data-parallel training (issue 21) without GPUs: the emulated NCCL
//! (tools/nccl-emulation/nccl_emulation.c, compiled here with the system C compiler) between
//! processes of the real binary on the built-in tiny model. N ranks equal one rank with the batch
//! cut into N slices bit for bit, through `train --gpus N` and through torchrun's variables; a
//! killed rank stops the others with an error within seconds; ranks with different settings, or
//! without NCCL, stop with an error naming what differs or what is missing.

mod common;
use common::*;
use flux_kernels::dist::nccl::{Comm, Nccl};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flux-kernels");

/// A `train` command on the built-in tiny model (CPU), with the emulated NCCL and short timeouts.
fn train_cmd(out: &Path, flags: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("train")
        // `--data builtin`: the demo's data without the demo's settings (its cosine schedule
        // depends on the run's length, which a resumed run changes).
        .args(["--data", "builtin", "--lr", "5e-3", "--device", "cpu", "--save-dtype", "f32"])
        .args(["--caption-dropout", "0.3", "--log-every", "1"])
        .arg("--out")
        .arg(out)
        .args(flags)
        .env("FLUX_KERNELS_NCCL", emulated_nccl())
        .env("FLUX_KERNELS_DIST_TIMEOUT_S", "60")
        .env("FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS", "60000")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("MASTER_PORT");
    c
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One process per rank with torchrun's variables (the multi-node launch, here on one machine).
fn torchrun(world: usize, cmd: impl Fn(usize) -> Command) -> Vec<std::process::Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|r| {
            let mut c = cmd(r);
            c.env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect()
}

#[test]
fn emulated_nccl_collectives_follow_nccl_and_fail_instead_of_hanging() {
    let nccl = Arc::new(Nccl::open_named(emulated_nccl().to_str().unwrap()).unwrap());
    assert!(nccl.emulated, "{}", nccl.describe());
    let id = nccl.unique_id().unwrap();
    let world = 3;
    let hs: Vec<_> = (0..world)
        .map(|r| {
            let nccl = nccl.clone();
            std::thread::spawn(move || {
                let comm = Comm::init(nccl, id, world, r).unwrap();
                let mut x = vec![r as f32 + 0.5, 10.0 * r as f32];
                comm.all_reduce_host(&mut x).unwrap();
                let g = comm.all_gather_host(&[r as f64, -(r as f64)]).unwrap();
                let mut b = vec![r as f32; 3];
                comm.broadcast_host(&mut b, 1).unwrap();
                // Different counts on one rank: NCCL's "invalid usage" on every rank, then the
                // communicator refuses further work (an error, not a hang).
                let mut bad = vec![0f32; if r == 2 { 5 } else { 4 }];
                let e = comm.all_reduce_host(&mut bad).unwrap_err().to_string();
                let again = comm.all_reduce_host(&mut x).unwrap_err().to_string();
                (x, g, b, e, again)
            })
        })
        .collect();
    for h in hs {
        let (x, g, b, e, again) = h.join().unwrap();
        assert_eq!(x, [0.5 + 1.5 + 2.5, 30.0]);
        assert_eq!(g, [0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
        assert_eq!(b, [1.0; 3]);
        assert!(e.contains("invalid usage") || e.contains("remote process exited"), "{e}");
        assert!(!again.is_empty());
    }
    // A rank that never joins: ncclCommInitRank fails after the timeout.
    std::env::set_var("FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS", "300");
    let id = nccl.unique_id().unwrap();
    let t = Instant::now();
    let e = Comm::init(nccl.clone(), id, 2, 0).err().unwrap().to_string();
    std::env::remove_var("FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS");
    assert!(e.contains("ncclCommInitRank") && t.elapsed() < Duration::from_secs(5), "{e}");
}

#[test]
fn n_ranks_equal_one_rank_with_the_batch_in_n_slices_bit_for_bit() {
    let dir = tmpdir("dp-equal");
    let run = |name: &str, flags: &[&str]| {
        let out = dir.join(format!("{name}/lora.safetensors"));
        let metrics = dir.join(format!("{name}.jsonl"));
        let mut c = train_cmd(&out, &["--steps", "3", "--metrics", metrics.to_str().unwrap()]);
        ok(c.args(flags).output().unwrap(), name);
        (lora(&out), losses(&metrics))
    };
    // `train --gpus 2`: the binary starts its own ranks.
    // LoRA dropout too: each slice draws its own masks, the same on either layout.
    let two = run("two", &["--gpus", "2", "--batch-size", "2", "--deterministic-reduce", "--dropout", "0.1"]);
    let one = run("one", &["--batch-size", "4", "--batch-slices", "2", "--dropout", "0.1"]);
    assert_eq!(bits(&two.0), bits(&one.0), "2 ranks vs 1 rank with the batch in 2 slices");
    assert_eq!(two.1, one.1, "losses and gradient norms");
    assert!(one.0.iter().any(|(n, v)| n.contains("lora_B") && v.iter().any(|&x| x != 0.0)), "B trained");

    // NCCL's all-reduce (the emulation's adds in rank order too) and three ranks.
    let three = run("three", &["--gpus", "3", "--batch-size", "2"]);
    let one3 = run("one3", &["--batch-size", "6", "--batch-slices", "3"]);
    assert_eq!(bits(&three.0), bits(&one3.0), "3 ranks vs 1 rank with the batch in 3 slices");
    assert_eq!(three.1, one3.1);

    // Without the slicing a one-rank run of the whole batch agrees within rounding only: the
    // batched backward adds the samples' gradient rows in another order. Compared at the first
    // step, before AdamW's normalisation magnifies rounding in near-zero gradients.
    let whole = run("whole", &["--batch-size", "4"]);
    let l = whole.1[0];
    let sliced = run("sliced", &["--batch-size", "2", "--gpus", "2"]).1[0];
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    println!(
        "step 1, whole batch of 4 vs 2 ranks of 2: loss rel {:.1e}, gradient norm rel {:.1e}",
        rel(sliced.0, l.0),
        rel(sliced.1, l.1)
    );
    assert!(rel(sliced.0, l.0) < 1e-6 && rel(sliced.1, l.1) < 1e-5, "{sliced:?} vs {l:?}");
}

#[test]
fn resume_with_another_number_of_ranks_continues_the_same_run() {
    let dir = tmpdir("dp-resume");
    let out = |n: &str| dir.join(format!("{n}/lora.safetensors"));
    let straight = out("straight");
    ok(train_cmd(&straight, &["--gpus", "2", "--batch-size", "2", "--steps", "4"]).output().unwrap(), "2 ranks");
    // Two steps on one rank (the same global batch of 4 in 2 slices), then two on 2 ranks.
    let part = out("part");
    ok(
        train_cmd(&part, &["--batch-size", "4", "--batch-slices", "2", "--steps", "2", "--checkpoint-every", "2"])
            .output()
            .unwrap(),
        "1 rank, 2 steps",
    );
    let ckpt = dir.join("part/lora.safetensors.ckpt");
    assert!(ckpt.join("state.safetensors").exists());
    let flags = ["--gpus", "2", "--batch-size", "2", "--batch-slices", "1", "--steps", "4", "--resume"];
    let mut c = train_cmd(&part, &flags);
    ok(c.arg(&ckpt).output().unwrap(), "resumed on 2 ranks");
    assert_eq!(bits(&lora(&part)), bits(&lora(&straight)));
}

/// Reads a child's stderr in a thread; returns the lines so far.
fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<std::sync::Mutex<Vec<String>>> {
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

#[test]
fn a_killed_rank_stops_the_others_with_an_error_not_a_hang() {
    let dir = tmpdir("dp-kill");
    let out = dir.join("lora.safetensors");
    let mut kids = torchrun(3, |_| train_cmd(&out, &["--batch-size", "1", "--steps", "100000"]));
    let logs: Vec<_> = kids.iter_mut().map(|k| collect(k.stderr.take().unwrap())).collect();
    let t = Instant::now();
    while !logs[0].lock().unwrap().iter().any(|l| l.starts_with("step 2/")) {
        assert!(t.elapsed() < Duration::from_secs(60), "rank 0 never reached step 2: {:?}", logs[0].lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    kids[1].kill().unwrap();
    kids[1].wait().unwrap();
    let killed = Instant::now();
    for r in [0, 2] {
        loop {
            if let Some(st) = kids[r].try_wait().unwrap() {
                assert!(!st.success(), "rank {r} ended well after rank 1 was killed");
                break;
            }
            if killed.elapsed() > Duration::from_secs(20) {
                let _ = kids[r].kill();
                panic!("rank {r} still running 20 s after rank 1 was killed: {:?}", logs[r].lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!("ranks 0 and 2 ended {:.2} s after rank 1 was killed", killed.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(100));
    let e0 = logs[0].lock().unwrap().join("\n");
    assert!(e0.contains("rank 1") && (e0.contains("gone") || e0.contains("closed")), "{e0}");
    let e2 = logs[2].lock().unwrap().join("\n");
    assert!(e2.contains("rank 0") && (e2.contains("gone") || e2.contains("closed")), "{e2}");
    assert!(!out.exists(), "no LoRA from a failed run");
}

#[test]
fn ranks_with_different_settings_or_without_nccl_stop_with_the_reason() {
    let dir = tmpdir("dp-mismatch");
    let out = dir.join("lora.safetensors");
    let kids = torchrun(2, |r| train_cmd(&out, &["--steps", "2", "--batch-size", if r == 0 { "2" } else { "3" }]));
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "rank {r}");
        assert!(
            e.contains("rank 1's configuration differs") && e.contains("batch_size: 2 (rank 0) vs 3 (rank 1)"),
            "{e}"
        );
    }
    let o = train_cmd(&out, &["--steps", "2", "--gpus", "2"])
        .env("FLUX_KERNELS_NCCL", dir.join("nowhere/libnccl.so.2"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("cannot be loaded") && e.contains("nvidia-nccl-cu13") && e.contains("the run failed"), "{e}");
}

#[test]
fn bench_step_on_two_ranks_reports_the_all_reduce_and_its_efficiency() {
    let o = Command::new(BIN)
        .args(["bench-step", "--model", "random:tiny", "--resolution", "64", "--text-tokens", "8", "--rank", "4"])
        .args(["--steps", "3", "--gpus", "2", "--device", "cpu"])
        .env("FLUX_KERNELS_NCCL", emulated_nccl())
        .env("FLUX_KERNELS_DIST_TIMEOUT_S", "60")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let o = ok(o, "bench-step --gpus 2");
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "rank 0 alone prints: {text}");
    let j: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    println!("{j}");
    assert_eq!(j["ranks"], 2);
    assert_eq!(j["allreduce_bytes"].as_u64().unwrap(), 4 * j["trainable"].as_u64().unwrap());
    let eff = j["scaling_efficiency"].as_f64().unwrap();
    assert!(eff > 0.0 && eff.is_finite(), "{eff}");
    assert!(j["scaling_note"].as_str().unwrap().contains("not a GPU figure"));
}

#[test]
fn a_rank_that_stops_answering_is_a_timeout_not_a_hang() {
    let dir = tmpdir("dp-stall");
    let out = dir.join("lora.safetensors");
    let mut kids = torchrun(2, |_| {
        let mut c = train_cmd(&out, &["--batch-size", "1", "--steps", "100000"]);
        c.env("FLUX_KERNELS_DIST_TIMEOUT_S", "5").env("FLUX_KERNELS_NCCL_EMU_TIMEOUT_MS", "5000");
        c
    });
    let logs: Vec<_> = kids.iter_mut().map(|k| collect(k.stderr.take().unwrap())).collect();
    let t = Instant::now();
    while !logs[0].lock().unwrap().iter().any(|l| l.starts_with("step 2/")) {
        assert!(t.elapsed() < Duration::from_secs(60), "rank 0 never reached step 2: {:?}", logs[0].lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Rank 1 stopped, not dead: its sockets stay open, so only the timeouts can see it.
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(kids[1].id() as i32, libc::SIGSTOP) };
    let stalled = Instant::now();
    let st = loop {
        if let Some(st) = kids[0].try_wait().unwrap() {
            break st;
        }
        if stalled.elapsed() > Duration::from_secs(30) {
            let _ = kids[0].kill();
            let _ = kids[1].kill();
            panic!("rank 0 still running 30 s after rank 1 stopped: {:?}", logs[0].lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let waited = stalled.elapsed().as_secs_f64();
    unsafe { libc::kill(kids[1].id() as i32, libc::SIGCONT) };
    let st1 = kids[1].wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let e0 = logs[0].lock().unwrap().join("\n");
    println!("rank 0 gave up {waited:.1} s after rank 1 stopped (timeout 5 s)");
    assert!(!st.success() && !st1.success());
    assert!(e0.contains("rank 1") && (e0.contains("no word") || e0.contains("timed out")), "{e0}");
    assert!((4.0..20.0).contains(&waited), "{waited}");
}
