//! Files downloaded from the internet (models, LoRAs, images, captions, configs, checkpoints) and
//! settings never crash the program or size an allocation past the real work: each example of
//! issue 15's table ends in a clear error naming the file, tensor or setting, or in a clean run
//! that skips and names the bad item.

mod common;
use common::*;
use flux_kernels::adapters::config::{resolve_targets, resolve_targets_to_train, LoraConfig};
use flux_kernels::io::images::{dimensions, load_bucketed, scan, write_rgb8_png, CAPTION_BYTES};
use flux_kernels::io::safetensors::Dtype;
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::config::{parse_rope_axes, FluxConfig};
use flux_kernels::ops::optim::AdamW;
use flux_kernels::train::checkpoint::{self, State};
use flux_kernels::train::config::TrainConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One tensor of `Tensors`: (name, shape, dtype, values).
type Entry = (String, Vec<usize>, Dtype, Vec<f32>);

fn tiny_cfg() -> FluxConfig {
    Checkpoint::open(&fixture("tiny-bfl.safetensors"), Some(TINY_AXES.to_vec())).unwrap().cfg
}

/// A copy of the tiny diffusers folder, to be broken.
fn diffusers_copy(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(fixture("tiny-diffusers")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn depth_comes_from_the_blocks_present_not_from_a_key_index() {
    let dir = tmpdir("ui-depth");
    // A 0-byte tensor whose name claims block 100,000,000: it used to size a 10⁸-block model (3 GiB).
    let p = dir.join("deep.safetensors");
    rewrite(&fixture("tiny-bfl.safetensors"), &p, |t| {
        t.push(("double_blocks.100000000.x".into(), vec![0], Dtype::F32, vec![]))
    });
    let e = err_string(Checkpoint::open(&p, Some(TINY_AXES.to_vec())));
    assert!(e.contains("double_blocks.100000000.x") && e.contains("deep.safetensors"), "{e}");
    let (ok, out) = run(&["info", "--rope-axes", "4,6,6", "--model", s(&p)]);
    assert!(!ok && out.contains("double_blocks.100000000.x"), "{out}");

    // An index inside the bound but past the blocks present (a gap) is named too.
    let p = dir.join("gap.safetensors");
    rewrite(&fixture("tiny-bfl.safetensors"), &p, |t| {
        t.push(("single_blocks.5.x".into(), vec![0], Dtype::F32, vec![]))
    });
    let e = err_string(Checkpoint::open(&p, Some(TINY_AXES.to_vec())));
    assert!(e.contains("single_blocks.5.x") && e.contains("gap.safetensors"), "{e}");

    // The same in diffusers' layout names the stored key and its shard.
    let d = dir.join("dif");
    diffusers_copy(&d);
    let shard = d.join("diffusion_pytorch_model-00001-of-00002.safetensors");
    let tmp = dir.join("shard.safetensors");
    rewrite(&shard, &tmp, |t| {
        t.push(("transformer_blocks.100000000.attn.to_q.weight".into(), vec![0, 4], Dtype::F32, vec![]))
    });
    std::fs::rename(&tmp, &shard).unwrap();
    let e = err_string(Checkpoint::open(&d, None));
    assert!(e.contains("transformer_blocks.100000000.attn.to_q.weight") && e.contains("00001-of-00002"), "{e}");
}

#[test]
fn a_scalar_or_misshaped_qkv_part_is_an_error_naming_it() {
    let dir = tmpdir("ui-scalar");
    let shard = "diffusion_pytorch_model-00001-of-00002.safetensors";
    let broken = |name: &str, tensor: &str, f: &dyn Fn(&mut Entry)| -> PathBuf {
        let d = dir.join(name);
        diffusers_copy(&d);
        let tmp = dir.join(format!("{name}.safetensors"));
        rewrite(&d.join(shard), &tmp, |t| f(t.iter_mut().find(|e| e.0 == tensor).unwrap()));
        std::fs::rename(&tmp, d.join(shard)).unwrap();
        d
    };
    let to_scalar = |e: &mut Entry| {
        e.1 = vec![];
        e.3 = vec![0.5];
    };
    // The bias parts are read while the architecture is inferred (does qkv have a bias?): a 0-d
    // part used to be indexed there, a panic in `info`, `forward` and `lora convert`.
    for (case, tensor) in
        [("qbias", "transformer_blocks.0.attn.to_q.bias"), ("kbias", "transformer_blocks.0.attn.to_k.bias")]
    {
        let d = broken(case, tensor, &to_scalar);
        let e = err_string(Checkpoint::open(&d, None));
        assert!(e.contains(tensor) && e.contains(shard) && e.contains("[]"), "{e}");
        let (ok, out) = run(&["info", "--model", s(&d)]);
        assert!(!ok && out.contains(tensor), "{out}");
        let (ok, out) = run(&[
            "lora",
            "convert",
            "--model",
            s(&d),
            "--in",
            s(&fixture("lora-peft.safetensors")),
            "--out",
            s(&dir.join("out.safetensors")),
        ]);
        assert!(!ok && out.contains(tensor), "{out}");
        assert!(!dir.join("out.safetensors").exists());
    }
    let q = "transformer_blocks.0.attn.to_q.weight";
    let scalar = broken("scalar", q, &to_scalar);
    let e = err_string(Checkpoint::open(&scalar, None));
    assert!(e.contains(q) && e.contains(shard) && e.contains("[]"), "{e}");

    // 1-D, or 2-D with other columns than its siblings k and v.
    let flat = broken("flat", q, &|e| e.1 = vec![e.1.iter().product()]);
    let e = err_string(Checkpoint::open(&flat, None));
    assert!(e.contains(q), "{e}");
    let cols = broken("cols", q, &|e| e.1 = vec![e.1[0] / 2, e.1[1] * 2]);
    let e = err_string(Checkpoint::open(&cols, None));
    assert!(e.contains(q) && e.contains("shape"), "{e}");
}

#[test]
fn rope_axes_whose_sum_wraps_are_refused_at_config_time() {
    let dir = tmpdir("ui-rope");
    // 2^63 + 2^63 + 16 wraps to 16, the tiny model's head dim.
    let big = 1usize << 63;
    let d = dir.join("dif");
    diffusers_copy(&d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    j["axes_dims_rope"] = serde_json::json!([big, big, 16]);
    std::fs::write(d.join("config.json"), serde_json::to_string(&j).unwrap()).unwrap();
    let e = err_string(Checkpoint::open(&d, None));
    assert!(e.contains("rope axes") && e.contains("axes_dims_rope"), "{e}");
    let (ok, out) = run(&["info", "--model", s(&d)]);
    assert!(!ok && out.contains("rope axes"), "{out}");

    let e = err_string(Checkpoint::open(&fixture("tiny-bfl.safetensors"), Some(vec![big, big, 16])));
    assert!(e.contains("rope axes"), "{e}");
    let flag = format!("{big},{big},16");
    assert!(err_string(parse_rope_axes(&flag)).contains("--rope-axes"));
    let (ok, out) = run(&[
        "forward",
        "--rope-axes",
        &flag,
        "--model",
        s(&fixture("tiny-bfl.safetensors")),
        "--inputs",
        s(&fixture("tiny-inputs.safetensors")),
        "--out",
        s(&dir.join("out.safetensors")),
    ]);
    assert!(!ok && out.contains("--rope-axes"), "{out}");
    // A training config's rope_axes goes through the same parser.
    let toml = dir.join("rope.toml");
    std::fs::write(&toml, format!("rope_axes = \"{flag}\"\nsteps = 1\n")).unwrap();
    let (ok, out) = run(&["train", "--data", "builtin", "--config", s(&toml), "--out", s(&dir.join("l.safetensors"))]);
    assert!(!ok && out.contains("rope_axes") && out.contains(&flag), "{out}");
    let (ok, out) = run(&[
        "train",
        "--model",
        s(&d),
        "--data",
        "builtin",
        "--config",
        s(&toml),
        "--out",
        s(&dir.join("l.safetensors")),
    ]);
    assert!(!ok && out.contains("rope_axes"), "{out}");
}

#[test]
fn elongated_and_oversized_images_are_refused_before_decoding() {
    let dir = tmpdir("ui-aspect");
    for (w, h) in [(1usize, 65535usize), (1, 20000), (20000, 1)] {
        let p = dir.join(format!("img-{w}x{h}.png"));
        write_rgb8_png(&p, vec![128; w * h * 3], h, w).unwrap();
        let t = Instant::now();
        let e = err_string(dimensions(&p));
        assert!(e.contains(&format!("img-{w}x{h}.png")), "{e}");
        let e = err_string(load_bucketed(&p, 64, 16, false));
        assert!(e.contains(&format!("img-{w}x{h}.png")), "{e}");
        assert!(t.elapsed().as_secs_f64() < 5.0, "{w}x{h}: {:?}", t.elapsed());
    }
    // Within the bounds, an image of another aspect than its bucket is cropped first, then
    // resized: a 4:1 strip into a square bucket keeps its centre.
    let (w, h) = (64usize, 16usize);
    let rgb: Vec<u8> =
        (0..w * h).flat_map(|i| if (24..40).contains(&(i % w)) { [255u8; 3] } else { [0u8; 3] }).collect();
    let p = dir.join("strip.png");
    write_rgb8_png(&p, rgb, h, w).unwrap();
    let px = load_bucketed(&p, 16, 16, false).unwrap();
    assert_eq!(px.len(), 3 * 16 * 16);
    assert!(px.iter().all(|&v| v > 0.9), "the centre 16×16 of the strip is white");
}

#[test]
fn settings_that_size_allocations_are_bounded_and_named() {
    let cfg = tiny_cfg();
    let base = TrainConfig { data: "builtin".into(), ..TrainConfig::default() };
    for (c, name) in [
        (TrainConfig { rank: 100_000_000, ..base.clone() }, "rank"),
        (TrainConfig { rank: i64::MAX as usize, ..base.clone() }, "rank"),
        (TrainConfig { resolution: "100000000000".into(), ..base.clone() }, "resolution"),
        (TrainConfig { resolution: "512".into(), bucket_step: 1024, ..base.clone() }, "bucket_step"),
        (TrainConfig { t5_max_len: 100_000_000, ..base.clone() }, "t5_max_len"),
        (TrainConfig { sample_size: 100_000_000, ..base.clone() }, "sample_size"),
        (TrainConfig { steps: usize::MAX, grad_accum: 2, ..base.clone() }, "grad_accum"),
    ] {
        let e = err_string(c.validate());
        assert!(e.contains(name), "{name}: {e}");
    }
    base.validate().unwrap();

    // Ranks above a module's width (for training), from --rank or a rank_pattern entry; and past
    // any width, even for counting.
    let lc = LoraConfig { rank: 100, ..LoraConfig::default() };
    let e = err_string(resolve_targets_to_train(&cfg, &lc));
    assert!(e.contains("--rank") && e.contains("100") && e.contains("width"), "{e}");
    let lc = LoraConfig { rank: 4, rank_pattern: vec![("to_q".into(), 1_000)], ..LoraConfig::default() };
    let e = err_string(resolve_targets_to_train(&cfg, &lc));
    assert!(e.contains("rank_pattern") && e.contains("to_q=1000") && e.contains("width"), "{e}");
    let lc = LoraConfig { rank: 4, rank_pattern: vec![("to_q".into(), 100_000_000)], ..LoraConfig::default() };
    let e = err_string(resolve_targets(&cfg, &lc));
    assert!(e.contains("rank_pattern") && e.contains("to_q=100000000"), "{e}");
    let lc = LoraConfig { rank: i64::MAX as usize, ..LoraConfig::default() };
    assert!(err_string(resolve_targets(&cfg, &lc)).contains("--rank"));

    let dir = tmpdir("ui-settings");
    let (m, out) = (fixture("tiny-bfl.safetensors"), dir.join("l.safetensors"));
    let (ok, text) = run(&["info", "--rope-axes", "4,6,6", "--model", s(&m), "--rank", "9223372036854775807"]);
    assert!(!ok && text.contains("rank"), "{text}");
    let (ok, text) = run(&["train", "--data", "builtin", "--rank", "100000000", "--out", s(&out)]);
    assert!(!ok && text.contains("rank"), "{text}");
    let (ok, text) = run(&["train", "--data", "builtin", "--rank", "1000", "--out", s(&out)]);
    assert!(!ok && text.contains("width"), "{text}");
    let (ok, text) = run(&["train", "--data", "builtin", "--resolution", "100000000000", "--out", s(&out)]);
    assert!(!ok && text.contains("resolution"), "{text}");
    let (ok, text) = run(&["train", "--data", "builtin", "--t5-max-len", "100000000", "--out", s(&out)]);
    assert!(!ok && text.contains("t5_max_len"), "{text}");
    let (ok, text) = run(&["sample", "--width", "100000000000", "--steps", "1", "--out", s(&dir.join("samples"))]);
    assert!(!ok && text.contains("--width"), "{text}");
    let (ok, text) = run(&["sample", "--batch-size", "0", "--steps", "1", "--out", s(&dir.join("samples"))]);
    assert!(!ok && text.contains("--batch-size"), "{text}");
    let m = fixture("pipeline");
    let (ok, text) = run(&[
        "cache",
        "--model",
        s(&m),
        "--data",
        s(&dir),
        "--t5-max-len",
        "100000000",
        "--resolution",
        "16",
        "--bucket-step",
        "4",
    ]);
    assert!(!ok && text.contains("t5_max_len"), "{text}");
}

#[test]
fn a_huge_caption_is_truncated_with_a_warning_naming_it() {
    let dir = tmpdir("ui-caption");
    write_rgb8_png(&dir.join("a.png"), vec![100; 16 * 16 * 3], 16, 16).unwrap();
    // 8 MiB of words (the 50 MB behaves the same: only the first CAPTION_BYTES are read).
    let words = "a photo of a cat on a mat ".repeat(8 << 20 >> 5);
    std::fs::write(dir.join("a.txt"), &words).unwrap();
    let found = scan(&dir).unwrap();
    assert_eq!(found.entries.len(), 1);
    assert!(found.entries[0].caption.len() <= CAPTION_BYTES, "{}", found.entries[0].caption.len());
    assert!(words.starts_with(&found.entries[0].caption));
    assert!(found.warnings.iter().any(|w| w.contains("a.txt") && w.contains("truncated")), "{:?}", found.warnings);
}

#[test]
fn a_conditioning_file_with_an_empty_batch_is_an_error() {
    let dir = tmpdir("ui-cond");
    let cfg = tiny_cfg();
    let p = dir.join("cond.safetensors");
    let tensors: Tensors = vec![
        ("txt".into(), vec![0, 4, cfg.context_in_dim], Dtype::F32, vec![]),
        ("y".into(), vec![0, cfg.vec_in_dim], Dtype::F32, vec![]),
    ];
    write_all(&p, &tensors, &Default::default());
    let (ok, out) = run(&[
        "sample",
        "--rope-axes",
        "4,6,6",
        "--model",
        s(&fixture("tiny-bfl.safetensors")),
        "--cond",
        s(&p),
        "--width",
        "16",
        "--height",
        "16",
        "--steps",
        "1",
        "--out",
        s(&dir.join("out")),
    ]);
    assert!(!ok && out.contains("cond.safetensors") && out.contains("`txt`"), "{out}");
    assert!(!dir.join("out").exists());
}

fn small_state(dir: &Path) -> State {
    let sizes = [6usize, 4];
    let mut opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.01);
    opt.t = 3;
    opt.m.iter_mut().for_each(|m| m.iter_mut().for_each(|x| *x = 0.25));
    let state = State {
        step: 3,
        params: sizes.iter().map(|&n| vec![0.5; n]).collect(),
        opt,
        config: TrainConfig::default(),
        layout: vec!["a".into(), "b".into()],
    };
    checkpoint::save(dir, &state).unwrap();
    state
}

#[test]
fn inconsistent_or_non_finite_resume_state_is_refused() {
    let dir = tmpdir("ui-resume");
    let good = dir.join("good");
    small_state(&good);
    let st = checkpoint::load(&good).unwrap();
    assert_eq!((st.step, st.params.len(), st.opt.m[0][0]), (3, 2, 0.25));

    let file = "state.safetensors";
    let broken = |name: &str, f: &dyn Fn(&mut Tensors)| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        rewrite(&good.join(file), &d.join(file), |t| f(t));
        d
    };
    let short = broken("short", &|t| {
        let e = t.iter_mut().find(|e| e.0 == "adam_m.1").unwrap();
        e.1 = vec![2];
        e.3.truncate(2);
    });
    let e = err_string(checkpoint::load(&short));
    assert!(e.contains(file) && e.contains("adam_m.1"), "{e}");
    let long = broken("long", &|t| {
        let e = t.iter_mut().find(|e| e.0 == "adam_v.0").unwrap();
        e.1 = vec![9];
        e.3 = vec![0.0; 9];
    });
    let e = err_string(checkpoint::load(&long));
    assert!(e.contains(file) && e.contains("adam_v.0"), "{e}");
    let missing = broken("missing", &|t| t.retain(|e| e.0 != "adam_v.1"));
    let e = err_string(checkpoint::load(&missing));
    assert!(e.contains(file) && e.contains("adam_v.1"), "{e}");
    let nan = broken("nan", &|t| t.iter_mut().find(|e| e.0 == "param.1").unwrap().3[2] = f32::NAN);
    let e = err_string(checkpoint::load(&nan));
    assert!(e.contains(file) && e.contains("param.1") && e.contains("not finite"), "{e}");
    // The trainer's resume goes through the same check.
    let (ok, out) = run(&["train", "--data", "builtin", "--resume", s(&short), "--out", s(&dir.join("l.safetensors"))]);
    assert!(!ok && out.contains("adam_m.1"), "{out}");

    // A non-finite state is never written over the last good checkpoint.
    let mut st = checkpoint::load(&good).unwrap();
    let before = std::fs::read(good.join(file)).unwrap();
    st.step = 4;
    st.opt.v[0][1] = f32::INFINITY;
    let e = err_string(checkpoint::save(&good, &st));
    assert!(e.contains("adam_v.0") && e.contains("not finite"), "{e}");
    assert_eq!(std::fs::read(good.join(file)).unwrap(), before, "the good checkpoint is untouched");
}

#[test]
fn nan_or_inf_in_a_training_config_names_the_key_and_the_file() {
    let dir = tmpdir("ui-toml");
    for (body, key) in [("lr = nan\n", "lr"), ("steps = 3\nguidance = inf\n", "guidance"), ("shift = -inf\n", "shift")]
    {
        let p = dir.join(format!("{key}.toml"));
        std::fs::write(&p, body).unwrap();
        let e = err_string(TrainConfig::from_toml(&p));
        assert!(e.contains(&format!("`{key}`")) && e.contains(&format!("{key}.toml")), "{e}");
        let (ok, out) = run(&["train", "--data", "builtin", "--config", s(&p), "--out", s(&dir.join("l.safetensors"))]);
        assert!(!ok && out.contains(&format!("`{key}`")) && out.contains(&format!("{key}.toml")), "{out}");
    }
    // A flag is named the same way.
    let c = TrainConfig { data: "builtin".into(), adam_eps: f64::NAN, ..TrainConfig::default() };
    assert!(err_string(c.validate()).contains("adam_eps"));
}

#[test]
fn bad_dataset_entries_are_skipped_with_a_warning_and_counted() {
    let dir = tmpdir("ui-entries");
    let data = dir.join("images");
    std::fs::create_dir_all(&data).unwrap();
    for name in ["a", "b", "c", "e"] {
        write_rgb8_png(&data.join(format!("{name}.png")), vec![90; 16 * 16 * 3], 16, 16).unwrap();
    }
    std::fs::write(data.join("a.txt"), "a red cube").unwrap();
    // Latin-1, not UTF-8: read lossily with a warning.
    std::fs::write(data.join("b.txt"), b"caf\xe9 au lait").unwrap();
    // A caption that is a folder, and an image that is a dangling link: skipped and named.
    std::fs::create_dir_all(data.join("c.txt")).unwrap();
    std::os::unix::fs::symlink(dir.join("nowhere.png"), data.join("d.png")).unwrap();
    // A caption that is a dangling link: the image is skipped, not trained with an empty caption.
    std::os::unix::fs::symlink(dir.join("nowhere.txt"), data.join("e.txt")).unwrap();
    // Too elongated: skipped as unusable once its header is read.
    write_rgb8_png(&data.join("f.png"), vec![0; 65535 * 3], 65535, 1).unwrap();

    let found = scan(&data).unwrap();
    let names: Vec<String> =
        found.entries.iter().map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["a.png", "b.png", "f.png"]);
    assert_eq!(found.entries[1].caption, "caf\u{fffd} au lait");
    assert!(found.warnings.iter().any(|w| w.contains("b.txt") && w.contains("UTF-8")), "{:?}", found.warnings);
    assert_eq!(found.skipped.len(), 3, "{:?}", found.skipped);
    for n in ["c.png", "c.txt", "d.png", "e.png"] {
        assert!(found.skipped.iter().any(|s| s.contains(n)), "{n}: {:?}", found.skipped);
    }

    let m = fixture("pipeline");
    let args = ["--resolution", "16", "--bucket-step", "4", "--t5-max-len", "16"];
    let mut cache = vec!["cache", "--model", s(&m), "--data", s(&data)];
    cache.extend(args);
    let (ok, out) = run(&cache);
    assert!(ok, "{out}");
    assert!(out.contains("2 written") && out.contains("1 corrupt") && out.contains("f.png"), "{out}");
    assert!(out.contains("skipped 3 entries") && out.contains("b.txt"), "{out}");
    assert_eq!(std::fs::read_dir(data.join(".flux-cache")).unwrap().count(), 2);
    // train caches the same folder and goes on.
    let mut train = vec!["train", "--model", s(&m), "--data", s(&data), "--steps", "1", "--rank", "2", "--out"];
    let out_lora = dir.join("lora.safetensors");
    train.push(s(&out_lora));
    train.extend(args);
    let (ok, out) = run(&train);
    assert!(ok && out_lora.exists(), "{out}");
}

#[test]
fn images_sharing_a_stem_are_an_error_naming_both() {
    let dir = tmpdir("ui-stem");
    write_rgb8_png(&dir.join("x.png"), vec![10; 16 * 16 * 3], 16, 16).unwrap();
    let jpg = image::RgbImage::from_raw(16, 16, vec![200; 16 * 16 * 3]).unwrap();
    jpg.save(dir.join("x.jpg")).unwrap();
    std::fs::write(dir.join("x.txt"), "which one?").unwrap();
    let e = err_string(scan(&dir));
    assert!(e.contains("x.png") && e.contains("x.jpg") && e.contains("stem"), "{e}");
    let m = fixture("pipeline");
    let (ok, out) = run(&[
        "cache",
        "--model",
        s(&m),
        "--data",
        s(&dir),
        "--resolution",
        "16",
        "--bucket-step",
        "4",
        "--t5-max-len",
        "16",
    ]);
    assert!(!ok && out.contains("x.png") && out.contains("x.jpg"), "{out}");
    assert!(!dir.join(".flux-cache").exists(), "nothing cached");
}
