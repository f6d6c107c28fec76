//! `serve` on the tiny FLUX.1 folder (tests/fixtures/pipeline) with the LoRA fixtures in a
//! --lora-dir: the A1111 API's answers, LoRA tags, batching of requests with different LoRAs
//! (bit-identical to running alone), the registry, limits and errors, the API key, interrupt,
//! the post-filter, and SIGTERM finishing in-flight work (the binary as a child process).
//! Every server listens on port 0 on loopback; every wait is bounded.

mod common;
use common::*;
use flux_kernels::engine::Device;
use flux_kernels::pipeline::Components;
use flux_kernels::serve::registry::Registry;
use flux_kernels::serve::{ImageFilter, Limits, ServeOptions, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fixtures' LoRAs under plain names, plus one whose factors overflow (sampling diverges).
fn lora_dir(tag: &str) -> PathBuf {
    let dir = tmpdir(tag);
    for (name, file) in [
        ("peft", "lora-peft.safetensors"),
        ("kohya", "lora-kohya.safetensors"),
        ("comfy", "lora-comfy.safetensors"),
        ("onetrainer", "lora-onetrainer.safetensors"),
        ("dora", "lora-peft-dora.safetensors"),
    ] {
        std::fs::copy(fixture(file), dir.join(format!("{name}.safetensors"))).unwrap();
    }
    rewrite(&fixture("lora-kohya.safetensors"), &dir.join("huge.safetensors"), |t| {
        t.iter_mut()
            .filter(|(n, ..)| n.contains("lora_"))
            .for_each(|(_, _, _, v)| v.iter_mut().for_each(|x| *x *= 1e30));
    });
    dir
}

fn limits() -> Limits {
    Limits {
        max_side: 64,
        max_steps: 500,
        max_images: 4,
        max_batch: 8,
        max_queue: 16,
        max_loras: 4,
        max_body: 64 << 10,
    }
}

fn start_with(dir: &Path, limits: Limits, api_key: Option<&str>, filter: Option<ImageFilter>, mixed: bool) -> Server {
    let model = fixture("pipeline");
    let (cfg, weights) = flux_kernels::cli::sample::model_or_builtin(Some(model.to_str().unwrap()), None).unwrap();
    Server::start(ServeOptions {
        cfg,
        weights,
        components: Components::from_root(&model),
        lora_dir: dir.to_path_buf(),
        addr: "127.0.0.1:0".parse().unwrap(),
        api_key: api_key.map(String::from),
        limits,
        device: Device::Cpu,
        t5_len: 16,
        lora_budget: 64 << 20,
        image_filter: filter,
        mixed_batches: mixed,
    })
    .unwrap()
}

fn start(dir: &Path) -> Server {
    start_with(dir, limits(), None, None, true)
}

/// One HTTP/1.1 exchange (Connection: close): (status, headers, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = headers.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, headers.to_string(), body.to_string())
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (st, _, b) = http(addr, "POST", path, Some(&body.to_string()), &[]);
    (st, serde_json::from_str(&b).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {b}")))
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (st, _, b) = http(addr, "GET", path, None, &[]);
    (st, serde_json::from_str(&b).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {b}")))
}

/// A small txt2img body.
fn req(prompt: &str, seed: i64, steps: usize) -> Value {
    json!({ "prompt": prompt, "width": 16, "height": 16, "steps": steps, "seed": seed, "distilled_cfg_scale": 3.5 })
}

/// The images of a 200 answer as RGB pixels, with its parsed `info`.
fn images(answer: &Value) -> (Vec<(u32, u32, Vec<u8>)>, Value) {
    let info: Value = serde_json::from_str(answer["info"].as_str().expect("info is a JSON string")).unwrap();
    #[allow(deprecated)]
    let imgs = answer["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let png = base64::decode(b.as_str().unwrap()).unwrap();
            let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgb8();
            (img.width(), img.height(), img.into_raw())
        })
        .collect();
    (imgs, info)
}

/// Keeps the worker busy with a long request of another size (64², 500 steps) until `release`.
fn block_worker(addr: SocketAddr) -> std::thread::JoinHandle<(u16, Value)> {
    let h = std::thread::spawn(move || {
        post(addr, "/sdapi/v1/txt2img", &json!({"width": 64, "height": 64, "steps": 500, "seed": 1}))
    });
    wait_running(addr, 500);
    h
}

/// Ends `block_worker`'s request by interrupting it.
fn release(addr: SocketAddr, blocker: std::thread::JoinHandle<(u16, Value)>) {
    assert_eq!(post(addr, "/sdapi/v1/interrupt", &json!({})).0, 200);
    let (st, a) = blocker.join().unwrap();
    assert_eq!(st, 409, "the blocker was interrupted: {a}");
}

/// Images waiting in the queue.
fn queued(addr: SocketAddr) -> u64 {
    get(addr, "/health").1["queued_images"].as_u64().unwrap()
}

/// Waits (bounded) until at least `n` images wait in the queue.
fn wait_queued(addr: SocketAddr, n: u64) {
    let t = Instant::now();
    while queued(addr) < n {
        assert!(t.elapsed() < Duration::from_secs(60), "fewer than {n} images ever queued");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits (bounded) until the worker runs a batch of `steps` steps, at step ≥ 1.
fn wait_running(addr: SocketAddr, steps: u64) {
    let t = Instant::now();
    let mut p = Value::Null;
    while t.elapsed() < Duration::from_secs(60) {
        p = get(addr, "/sdapi/v1/progress").1;
        let s = &p["state"];
        if s["sampling_steps"] == steps && s["sampling_step"].as_u64().unwrap_or(0) >= 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the worker never started a {steps}-step batch: {p}");
}

#[test]
fn txt2img_answers_in_a1111_shape_with_seeds_and_loras() {
    let dir = lora_dir("serve-shape");
    let s = start(&dir);
    let body = json!({
        "prompt": "a red cube <lora:peft:0.8> <lora:kohya:-0.5>", "width": 16, "height": 32, "steps": 2,
        "seed": 5, "batch_size": 2, "sampler_name": "Euler"
    });
    let (st, a) = post(s.addr(), "/sdapi/v1/txt2img", &body);
    assert_eq!(st, 200, "{a}");
    let (imgs, info) = images(&a);
    assert_eq!(imgs.len(), 2);
    assert!(imgs.iter().all(|(w, h, _)| (*w, *h) == (16, 32)));
    assert_ne!(imgs[0].2, imgs[1].2, "two seeds, two images");
    assert_eq!(info["all_seeds"], json!([5, 6]));
    assert_eq!(info["prompt"], "a red cube");
    assert_eq!(info["loras"], json!([{"name": "peft", "weight": 0.8}, {"name": "kohya", "weight": -0.5}]));
    assert_eq!(info["ignored_fields"], json!(["sampler_name"]));
    assert_eq!(info["nsfw"], json!([null, null]));
    assert_eq!(a["parameters"]["width"], 16);
    assert_eq!(a["parameters"]["distilled_cfg_scale"], 3.5);
    assert!(info["infotexts"][1].as_str().unwrap().contains("Seed: 6, Size: 16x32"), "{info}");

    // Same seed, same answer; the LoRAs change the image; seed -1 draws one and reports it.
    let one = |prompt: &str, seed: i64| images(&post(s.addr(), "/sdapi/v1/txt2img", &req(prompt, seed, 2)).1);
    let (a1, _) = one("a red cube <lora:peft:0.8>", 9);
    let (a2, _) = one("a red cube <lora:peft:0.8>", 9);
    let (base, _) = one("a red cube", 9);
    assert_eq!(a1[0].2, a2[0].2);
    assert_ne!(a1[0].2, base[0].2, "the LoRA moved the image");
    let (_, info) = one("a red cube", -1);
    assert!(info["seed"].as_u64().is_some(), "{info}");

    // True CFG against a negative prompt changes the image and is repeatable.
    let cfg = |neg: &str| {
        let mut b = req("a red cube", 9, 2);
        b["cfg_scale"] = json!(3.0);
        b["negative_prompt"] = json!(neg);
        images(&post(s.addr(), "/sdapi/v1/txt2img", &b).1).0
    };
    let c1 = cfg("blurry");
    assert_ne!(c1[0].2, base[0].2);
    assert_eq!(c1[0].2, cfg("blurry")[0].2);
    s.shutdown().unwrap();
}

/// The test that matters (issue 20): requests with different LoRA sets run in one transformer
/// batch, and each gets exactly the image it gets alone. A request whose LoRA makes sampling
/// diverge fails alone, without taking its batch-mates down.
#[test]
fn mixed_lora_batch_is_bit_identical_to_each_request_alone() {
    let dir = lora_dir("serve-batch");
    let s = start(&dir);
    let addr = s.addr();
    let prompts = [
        ("a cat <lora:peft:0.7>", 11),
        ("a dog <lora:kohya:1.2> <lora:comfy:0.5>", 12),
        ("a tree <lora:dora:1>", 13),
        ("a house", 14),
        ("a cat <lora:onetrainer:-0.8>", 11),
    ];
    let alone: Vec<Vec<u8>> = prompts
        .iter()
        .map(|(p, seed)| {
            let (st, a) = post(addr, "/sdapi/v1/txt2img", &req(p, *seed, 3));
            assert_eq!(st, 200, "{a}");
            let (imgs, info) = images(&a);
            assert_eq!(info["batch_sizes"], json!([1]));
            imgs[0].2.clone()
        })
        .collect();
    assert_ne!(alone[0], alone[4], "same seed, different LoRAs, different images");

    // Keep the worker busy with a long request of another size, queue the five and one that
    // diverges behind it: they are grouped into one pass.
    let blocker = block_worker(addr);
    let mut waiting: Vec<_> = prompts
        .iter()
        .map(|(p, seed)| {
            let body = req(p, *seed, 3);
            std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &body))
        })
        .collect();
    waiting.insert(2, std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &req("a cat <lora:huge:1>", 3, 3))));
    // Every request is queued before the blocker ends.
    wait_queued(addr, 6);
    release(addr, blocker);
    let answers: Vec<(u16, Value)> = waiting.into_iter().map(|h| h.join().unwrap()).collect();
    let (st, bad) = &answers[2];
    assert_eq!(*st, 500, "{bad}");
    assert!(bad["detail"].as_str().unwrap().contains("diverged"), "{bad}");
    let good: Vec<&(u16, Value)> = answers.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, a)| a).collect();
    for (i, (st, a)) in good.iter().enumerate() {
        assert_eq!(*st, 200, "{a}");
        let (imgs, _) = images(a);
        assert!(imgs[0].2 == alone[i], "request {i} ({}): batched image differs from its image alone", prompts[i].0);
    }
    // The failed batch of six was retried one image at a time: before that retry, all six
    // shared one pass (the health count shows the batches run).
    let h = get(addr, "/health").1;
    assert_eq!(h["batches_done"].as_u64().unwrap(), 5 + 1 + 1, "{h}");

    // Once more without the bad request: all five in one batch, answered as one.
    let blocker = block_worker(addr);
    let waiting: Vec<_> = prompts
        .iter()
        .map(|(p, seed)| {
            let body = req(p, *seed, 3);
            std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &body))
        })
        .collect();
    wait_queued(addr, 5);
    release(addr, blocker);
    for (i, h) in waiting.into_iter().enumerate() {
        let (st, a) = h.join().unwrap();
        assert_eq!(st, 200, "{a}");
        let (imgs, info) = images(&a);
        assert_eq!(info["batch_sizes"], json!([5]), "{info}");
        assert!(imgs[0].2 == alone[i], "request {i}: batched image differs from its image alone");
    }
    s.shutdown().unwrap();
}

/// With mixing off (what the CUDA engine does until it has per-sample adapters), only requests
/// with the same LoRA set, names, weights and file, share a pass; images are still those alone.
#[test]
fn without_mixed_batches_only_the_same_set_shares_a_pass() {
    let dir = lora_dir("serve-unmixed");
    let s = start_with(&dir, limits(), None, None, false);
    let addr = s.addr();
    let prompts = [
        ("a <lora:peft:0.7>", 1),
        ("b <lora:kohya:1>", 2),
        ("c <lora:peft:0.7>", 3),
        ("d", 4),
        ("e <lora:peft:0.5>", 5),
    ];
    let alone: Vec<Vec<u8>> = prompts
        .iter()
        .map(|(p, seed)| images(&post(addr, "/sdapi/v1/txt2img", &req(p, *seed, 2)).1).0[0].2.clone())
        .collect();
    let blocker = block_worker(addr);
    let waiting: Vec<_> = prompts
        .iter()
        .map(|(p, seed)| {
            let body = req(p, *seed, 2);
            // In order: the first of each set leads its batch.
            let n = queued(addr);
            let h = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &body));
            wait_queued(addr, n + 1);
            h
        })
        .collect();
    release(addr, blocker);
    let sizes: Vec<Value> = waiting
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let (st, a) = h.join().unwrap();
            assert_eq!(st, 200, "{a}");
            let (imgs, info) = images(&a);
            assert!(imgs[0].2 == alone[i], "request {i}: differs from its image alone");
            info["batch_sizes"][0].clone()
        })
        .collect();
    // peft 0.7 twice together; kohya, no LoRA and peft 0.5 each alone.
    assert_eq!(sizes, vec![json!(2), json!(1), json!(2), json!(1), json!(1)]);
    s.shutdown().unwrap();
}

#[test]
fn bad_requests_get_4xx_naming_the_field_lora_or_limit() {
    let dir = lora_dir("serve-bad");
    std::fs::write(dir.join("broken.safetensors"), b"not a safetensors file").unwrap();
    let s = start(&dir);
    let a = s.addr();
    for (body, status, want) in [
        (req("<lora:nosuch:1> x", 1, 2), 400, "unknown LoRA `nosuch`"),
        (req("<lora:../lora-peft:1> x", 1, 2), 400, "no paths"),
        (req("<lora:broken> x", 1, 2), 400, "broken"),
        (json!({"width": 20, "height": 16}), 400, "`width` is 20: it must be a multiple of 16"),
        (json!({"width": 128}), 400, "`width` is 128: it must be between 1 and 64"),
        (json!({"steps": 501}), 400, "`steps` is 501"),
        (json!({"batch_size": 3, "n_iter": 2}), 400, "at most 4 images"),
        (req("<lora:a><lora:b><lora:c><lora:d><lora:e>", 1, 2), 400, "more than 4 LoRAs"),
    ] {
        let (st, e) = post(a, "/sdapi/v1/txt2img", &body);
        assert_eq!(st, status, "{body}: {e}");
        assert!(e["detail"].as_str().unwrap().contains(want), "{body}: {e}");
    }
    let (st, _, b) = http(a, "POST", "/sdapi/v1/txt2img", Some("{not json"), &[]);
    assert!(st == 400 && b.contains("not valid JSON"), "{st} {b}");
    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(70_000));
    let (st, _, b) = http(a, "POST", "/sdapi/v1/txt2img", Some(&big), &[]);
    assert!(st == 413 && b.contains("--max-body"), "{st} {b}");
    let (st, _, b) = http(a, "GET", "/sdapi/v1/txt2img", None, &[]);
    assert!(st == 405 && b.contains("POST"), "{st} {b}");
    let (st, _, b) = http(a, "GET", "/sdapi/v1/nothing", None, &[]);
    assert!(st == 404 && b.contains("/sdapi/v1/nothing"), "{st} {b}");
    // None of it hurt the server.
    assert_eq!(post(a, "/sdapi/v1/txt2img", &req("fine", 1, 2)).0, 200);
    s.shutdown().unwrap();
}

#[test]
fn full_queue_answers_503_with_retry_after_and_others_still_finish() {
    let dir = lora_dir("serve-queue");
    let s = start_with(&dir, Limits { max_queue: 4, max_batch: 1, ..limits() }, None, None, true);
    let addr = s.addr();
    let blocker = block_worker(addr);
    let body = json!({"width": 16, "height": 16, "steps": 2, "batch_size": 3});
    let queued = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &body));
    wait_queued(addr, 3);
    let (st, headers, b) = http(addr, "POST", "/sdapi/v1/txt2img", Some(&req("one more", 1, 2).to_string()), &[]);
    assert_eq!(st, 503, "{b}");
    assert!(b.contains("queue is full") && b.contains("--max-queue"), "{b}");
    assert!(headers.to_ascii_lowercase().contains("retry-after:"), "{headers}");
    release(addr, blocker);
    let (st, a) = queued.join().unwrap();
    assert_eq!(st, 200, "{a}");
    assert_eq!(images(&a).0.len(), 3);
    s.shutdown().unwrap();
}

#[test]
fn api_key_guards_the_api_but_not_health_or_page() {
    let dir = lora_dir("serve-key");
    let s = start_with(&dir, limits(), Some("s3cret"), None, true);
    let a = s.addr();
    let (st, h, _) = http(a, "GET", "/sdapi/v1/loras", None, &[]);
    assert!(st == 401 && h.contains("WWW-Authenticate"), "{st} {h}");
    let (st, ..) = http(a, "GET", "/sdapi/v1/loras", None, &[("Authorization", "Bearer wrong")]);
    assert_eq!(st, 401);
    let (st, _, b) = http(a, "GET", "/sdapi/v1/loras", None, &[("Authorization", "Bearer s3cret")]);
    assert!(st == 200 && b.contains("peft"), "{st} {b}");
    assert_eq!(http(a, "GET", "/health", None, &[]).0, 200);
    assert_eq!(http(a, "GET", "/", None, &[]).0, 200);
    s.shutdown().unwrap();
}

#[test]
fn loras_lists_the_folder_and_notices_new_changed_and_broken_files() {
    let dir = lora_dir("serve-loras");
    let outside = tmpdir("serve-loras-outside");
    std::fs::copy(fixture("lora-peft.safetensors"), outside.join("secret.safetensors")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.safetensors"), dir.join("escape.safetensors")).unwrap();
    std::os::unix::fs::symlink(dir.join("peft.safetensors"), dir.join("alias.safetensors")).unwrap();
    let s = start(&dir);
    let a = s.addr();
    let list = |a| -> Vec<Value> { get(a, "/sdapi/v1/loras").1.as_array().unwrap().clone() };
    let find = |l: &[Value], n: &str| l.iter().find(|x| x["name"] == n).cloned();
    let l = list(a);
    let peft = find(&l, "peft").unwrap();
    assert_eq!(peft["kind"], "LoRA");
    assert!(peft["rank"].as_u64().unwrap() >= 1 && !peft["targets"].as_array().unwrap().is_empty(), "{peft}");
    assert_eq!(find(&l, "dora").unwrap()["kind"], "DoRA");
    assert!(find(&l, "escape").is_none(), "a symlink out of --lora-dir is not listed: {l:?}");
    assert!(find(&l, "alias").is_some(), "a symlink inside it is");
    assert_eq!(post(a, "/sdapi/v1/txt2img", &req("<lora:escape>", 1, 2)).0, 400);

    // A new file appears; a broken one is listed with its error; a changed one is read again.
    std::fs::copy(fixture("lora-onetrainer.safetensors"), dir.join("fresh.safetensors")).unwrap();
    std::fs::write(dir.join("bad.safetensors"), b"\x08\0\0\0\0\0\0\0{}").unwrap();
    assert_eq!(post(a, "/sdapi/v1/refresh-loras", &json!({})).0, 200);
    let l = list(a);
    assert!(find(&l, "fresh").is_some(), "{l:?}");
    assert!(find(&l, "bad").unwrap()["error"].as_str().unwrap().contains("bad"), "{l:?}");
    assert_eq!(post(a, "/sdapi/v1/txt2img", &req("x <lora:fresh:1>", 1, 2)).0, 200);
    let before = images(&post(a, "/sdapi/v1/txt2img", &req("x <lora:fresh:1>", 4, 2)).1).0;
    std::fs::copy(fixture("lora-kohya.safetensors"), dir.join("fresh.safetensors")).unwrap();
    let l = list(a);
    assert_ne!(find(&l, "fresh").unwrap()["format"], find(&list(a), "onetrainer").unwrap()["format"]);
    let after = images(&post(a, "/sdapi/v1/txt2img", &req("x <lora:fresh:1>", 4, 2)).1).0;
    assert_ne!(before[0].2, after[0].2, "the changed file was read again");
    std::fs::remove_file(dir.join("fresh.safetensors")).unwrap();
    assert!(find(&list(a), "fresh").is_none());
    s.shutdown().unwrap();
}

#[test]
fn registry_keeps_the_most_recently_used_within_its_budget() {
    let dir = lora_dir("serve-lru");
    let model = fixture("pipeline");
    let (cfg, _) = flux_kernels::cli::sample::model_or_builtin(Some(model.to_str().unwrap()), None).unwrap();
    let size = |n: &str| {
        let r = Registry::open(&dir, &cfg, usize::MAX).unwrap();
        r.get(n).unwrap();
        r.loaded().0
    };
    let (p, k) = (size("peft"), size("kohya"));
    assert!(p > 0 && k > 0);
    // Room for peft and kohya, not for a third.
    let reg = Registry::open(&dir, &cfg, p + k).unwrap();
    let held = reg.get("peft").unwrap();
    reg.get("kohya").unwrap();
    assert_eq!(reg.loaded().1, vec!["peft", "kohya"]);
    reg.get("peft").unwrap(); // peft is now the most recent
    reg.get("comfy").unwrap();
    let (bytes, names) = reg.loaded();
    assert_eq!(names, vec!["peft", "comfy"], "kohya, the least recently used, went");
    assert!(bytes <= p + k);
    // A request holding an evicted file keeps its terms.
    reg.get("onetrainer").unwrap();
    assert!(!held.terms.is_empty());
    assert!(matches!(reg.get("nosuch"), Err(flux_kernels::serve::registry::LookupError::Unknown(_))));
}

#[test]
fn interrupt_stops_the_running_batch_and_progress_reports_steps() {
    let dir = lora_dir("serve-interrupt");
    let s = start(&dir);
    let addr = s.addr();
    let long =
        std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &json!({"width": 32, "height": 32, "steps": 400})));
    wait_running(addr, 400);
    let (_, p) = get(addr, "/sdapi/v1/progress");
    assert_eq!(p["state"]["sampling_steps"], 400, "{p}");
    assert!(p["progress"].as_f64().unwrap() > 0.0 && p["eta_relative"].as_f64().unwrap() > 0.0, "{p}");
    assert_eq!(post(addr, "/sdapi/v1/interrupt", &json!({})).0, 200);
    let (st, a) = long.join().unwrap();
    assert_eq!(st, 409, "{a}");
    assert!(a["detail"].as_str().unwrap().contains("interrupt"), "{a}");
    assert_eq!(get(addr, "/sdapi/v1/progress").1["state"]["interrupted"], true);
    // The next request is not interrupted.
    assert_eq!(post(addr, "/sdapi/v1/txt2img", &req("after", 1, 2)).0, 200);
    s.shutdown().unwrap();
}

#[test]
fn post_filter_blacks_out_flagged_images_and_fails_closed() {
    let dir = lora_dir("serve-filter");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let filter: ImageFilter = Box::new(move |rgb, w, h| {
        assert_eq!(rgb.len(), w * h * 3);
        match seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 3 {
            0 => Ok(None),
            1 => Ok(Some("flagged by the test filter".into())),
            _ => anyhow::bail!("classifier exploded"),
        }
    });
    let s = start_with(&dir, limits(), None, Some(filter), true);
    let mut body = req("x", 3, 2);
    body["batch_size"] = json!(3);
    let (st, a) = post(s.addr(), "/sdapi/v1/txt2img", &body);
    assert_eq!(st, 200, "{a}");
    let (imgs, info) = images(&a);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(imgs[0].2.iter().any(|&v| v != 0), "passed: the image itself");
    assert!(imgs[1].2.iter().all(|&v| v == 0) && imgs[2].2.iter().all(|&v| v == 0), "flagged and failed: black");
    assert_eq!(info["nsfw"][0], Value::Null);
    assert_eq!(info["nsfw"][1], "flagged by the test filter");
    assert!(info["nsfw"][2].as_str().unwrap().contains("classifier exploded"), "{info}");
    s.shutdown().unwrap();
}

#[test]
fn page_is_self_contained() {
    let dir = lora_dir("serve-page");
    let s = start(&dir);
    let (st, headers, page) = http(s.addr(), "GET", "/", None, &[]);
    assert_eq!(st, 200);
    assert!(headers.contains("text/html") && headers.contains("Content-Security-Policy"), "{headers}");
    for needle in ["/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/loras", "type=\"range\"", "id=\"gallery\""] {
        assert!(page.contains(needle) || page.contains(&needle.replace('"', "")), "the page lacks {needle}");
    }
    for external in ["http://", "https://", "//cdn", "@import", "<link"] {
        assert!(!page.contains(external), "the page refers to something outside: {external}");
    }
    s.shutdown().unwrap();
}

/// `serve --nsfw-model` runs `sample`'s classifier (src/safety) on every served image: an image
/// it passes is returned as generated and the same classifier run here on its pixels agrees; one
/// it flags comes back black with the reason in info.nsfw.
#[test]
fn the_nsfw_classifier_checks_every_served_image() {
    use flux_kernels::cli::args::NsfwArgs;
    use flux_kernels::safety::NsfwClassifier;
    let dir = lora_dir("serve-nsfw");
    let model = fixture("nsfw/model");
    let args = NsfwArgs { nsfw_model: Some(model.clone()), nsfw_check: None, no_nsfw_check: false };
    let filter = flux_kernels::cli::serve::nsfw_filter(&args, None).unwrap().expect("the classifier is on");
    let s = start_with(&dir, limits(), None, Some(filter), true);
    let mut body = req("a red square", 5, 2);
    body["batch_size"] = json!(4);
    let (st, a) = post(s.addr(), "/sdapi/v1/txt2img", &body);
    assert_eq!(st, 200, "{a}");
    let (imgs, info) = images(&a);
    let classifier = NsfwClassifier::load(&model).unwrap();
    assert_eq!(imgs.len(), 4);
    for (i, (w, h, rgb)) in imgs.iter().enumerate() {
        match &info["nsfw"][i] {
            Value::Null => {
                let verdict = classifier.check(rgb, *w as usize, *h as usize).unwrap();
                assert_eq!(verdict, None, "image {i} was served, but the classifier flags its pixels");
            }
            Value::String(reason) => {
                assert!(rgb.iter().all(|&v| v == 0), "image {i} flagged ({reason}) but not blacked out");
                assert!(reason.contains("nsfw") || reason.contains("NSFW"), "{reason}");
            }
            other => panic!("info.nsfw[{i}] = {other}"),
        }
    }
    s.shutdown().unwrap();
    // Turned off on purpose: no filter, and the classifier folder is not needed.
    let off = NsfwArgs { nsfw_model: None, nsfw_check: None, no_nsfw_check: true };
    assert!(flux_kernels::cli::serve::nsfw_filter(&off, None).unwrap().is_none());
    // A folder named but unusable is an error, never a silent "off".
    let bad = NsfwArgs { nsfw_model: Some(dir.clone()), nsfw_check: None, no_nsfw_check: false };
    assert!(flux_kernels::cli::serve::nsfw_filter(&bad, None).is_err());
}

/// The binary: `serve --port 0` prints its address; SIGTERM while a request runs lets it finish
/// (200), refuses new work, and exits 0.
#[test]
fn sigterm_finishes_the_running_request_then_exits() {
    let dir = lora_dir("serve-sigterm");
    let model = fixture("pipeline");
    let mut child = bin()
        .args(["serve", "--model", model.to_str().unwrap(), "--lora-dir", dir.to_str().unwrap()])
        .args(["--port", "0", "--t5-max-len", "16", "--device", "cpu", "--no-nsfw-check", "--max-steps", "400"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    assert!(addr.ip().is_loopback(), "binds to loopback by default: {line}");
    let running = std::thread::spawn(move || {
        post(addr, "/sdapi/v1/txt2img", &json!({"width": 64, "height": 64, "steps": 400, "prompt": "x <lora:peft:1>"}))
    });
    wait_running(addr, 400);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    while get(addr, "/health").1["status"] != "draining" {
        assert!(t.elapsed() < Duration::from_secs(30), "never drained");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (st, b) = post(addr, "/sdapi/v1/txt2img", &req("too late", 1, 2));
    assert!(st == 503 && b["detail"].as_str().unwrap().contains("shutting down"), "{st} {b}");
    let (st, a) = running.join().unwrap();
    assert_eq!(st, 200, "the in-flight request finished: {a}");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("--no-nsfw-check") && err.contains("stopped"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn listing_does_not_read_evicted_files_again() {
    let dir = lora_dir("serve-list-once");
    let model = fixture("pipeline");
    let (cfg, _) = flux_kernels::cli::sample::model_or_builtin(Some(model.to_str().unwrap()), None).unwrap();
    // A budget of one byte keeps only the newest file loaded.
    let reg = Registry::open(&dir, &cfg, 1).unwrap();
    let first: Vec<String> = reg.list().unwrap().into_iter().map(|r| r.map_or_else(|e| e.0, |i| i.name)).collect();
    assert_eq!(first.len(), 6, "{first:?}");
    let (_, loaded) = reg.loaded();
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert_eq!(reg.reads(), 6);
    // Listing again answers from what was read: no file is read again.
    let again = reg.list().unwrap();
    assert_eq!(again.len(), 6);
    assert_eq!(reg.reads(), 6);
    assert_eq!(reg.loaded().1, loaded);
    // Using an evicted file reads it again.
    reg.get("comfy").unwrap();
    assert_eq!(reg.reads(), 7);
    let huge = again.iter().find_map(|r| r.as_ref().ok().filter(|i| i.name == "huge")).unwrap();
    assert_eq!(huge.format, "kohya sd-scripts");
}

/// A panic while making a request's images (here in the post-filter) fails that request with a
/// 500; the worker lives on and serves the next.
#[test]
fn a_panic_fails_only_its_request() {
    let dir = lora_dir("serve-panic");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let filter: ImageFilter = Box::new(move |_, _, _| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("test filter panics on its first image");
        }
        Ok(None)
    });
    let s = start_with(&dir, limits(), None, Some(filter), true);
    let (st, a) = post(s.addr(), "/sdapi/v1/txt2img", &req("first", 1, 2));
    assert_eq!(st, 500, "{a}");
    assert!(a["detail"].as_str().unwrap().contains("panicked"), "{a}");
    let (st, a) = post(s.addr(), "/sdapi/v1/txt2img", &req("second", 1, 2));
    assert_eq!(st, 200, "{a}");
    s.shutdown().unwrap();
}
