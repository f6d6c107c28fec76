//! The whole pipeline on the tiny random FLUX.1 folder the fixture scripts build
//! (tests/fixtures/pipeline: transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
//! tokenizer_2/): images + captions → cache → train → prompt → PNG.

mod common;
use common::*;
use flux_kernels::io::images::write_png;

fn image(w: usize, h: usize, seed: usize) -> Vec<f32> {
    (0..3 * w * h).map(|i| (((i * 7 + seed * 13) % 17) as f32 / 8.0 - 1.0) * 0.9).collect()
}

#[test]
fn images_to_cache_to_training_to_prompted_png() {
    let dir = tmpdir("pipeline");
    let data = dir.join("images");
    std::fs::create_dir_all(&data).unwrap();
    for (i, (w, h)) in [(20, 16), (16, 24), (32, 32)].iter().enumerate() {
        write_png(&data.join(format!("img{i}.png")), &image(*w, *h, i), *h, *w).unwrap();
        std::fs::write(data.join(format!("img{i}.txt")), format!("a photo of thing {i}")).unwrap();
    }
    std::fs::write(data.join("broken.png"), b"\x89PNG but not really").unwrap();
    let model = fixture("pipeline");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let common_args = ["--resolution", "16", "--bucket-step", "4", "--t5-max-len", "16"];

    let mut args = vec!["cache", "--model", m, "--data", d];
    args.extend(common_args);
    let (ok, out) = run(&args);
    assert!(ok, "{out}");
    assert!(out.contains("3 written") && out.contains("1 corrupt") && out.contains("broken.png"), "{out}");
    let (ok, out) = run(&args);
    assert!(ok && out.contains("0 written, 3 unchanged"), "{out}");

    let lora = dir.join("out/lora.safetensors");
    let l = lora.to_str().unwrap();
    let mut args = vec![
        "train",
        "--model",
        m,
        "--data",
        d,
        "--steps",
        "4",
        "--rank",
        "2",
        "--batch-size",
        "1",
        "--sample-prompt",
        "a red cube",
        "--sample-every",
        "2",
        "--sample-size",
        "16",
        "--sample-steps",
        "3",
        "--out",
        l,
    ];
    args.extend(common_args);
    let (ok, out) = run(&args);
    assert!(ok, "{out}");
    assert!(lora.exists());
    let samples = dir.join("out/lora-samples");
    for f in ["step000002-0.png", "step000004-0.png"] {
        let (w, h) = image::image_dimensions(samples.join(f)).unwrap();
        assert_eq!((w, h), (16, 16), "{f}");
    }

    let s = dir.join("samples");
    let (ok, out) = run(&[
        "sample",
        "--model",
        m,
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--width",
        "16",
        "--height",
        "16",
        "--steps",
        "3",
        "--t5-max-len",
        "16",
        "--lora",
        l,
        "--out",
        s.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    for i in 0..2 {
        assert_eq!(image::image_dimensions(s.join(format!("sample-{i}.png"))).unwrap(), (16, 16));
    }
}

#[test]
fn only_corrupt_images_is_an_error_naming_them() {
    let dir = tmpdir("pipeline-bad");
    std::fs::write(dir.join("a.jpg"), b"nope").unwrap();
    let m = fixture("pipeline");
    let (ok, out) = run(&[
        "cache",
        "--model",
        m.to_str().unwrap(),
        "--data",
        dir.to_str().unwrap(),
        "--resolution",
        "16",
        "--bucket-step",
        "4",
        "--t5-max-len",
        "16",
    ]);
    assert!(!ok && out.contains("no usable image") && out.contains("a.jpg"), "{out}");
    let (ok, out) =
        run(&["cache", "--model", m.to_str().unwrap(), "--data", dir.to_str().unwrap(), "--bucket-step", "6"]);
    assert!(!ok && out.contains("multiple of 4"), "{out}");
}

/// The shipped tiny FLUX.1 folder is a diffusers pipeline folder: model_index.json names every
/// component folder present (and only those), the scheduler is FLUX.1-dev's shifted flow-matching
/// Euler, and the CLIP tokenizer pads to no more positions than the CLIP model has (FluxPipeline
/// pads to `model_max_length`). tools/compare_diffusers_pipeline.py runs FluxPipeline on it.
#[test]
fn the_tiny_pipeline_folder_is_what_diffusers_loads() {
    let root = fixture("pipeline");
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))).unwrap()
    };
    let index = read("model_index.json");
    assert_eq!(index["_class_name"], "FluxPipeline");
    let mut named: Vec<String> = index
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| !k.starts_with('_') && v.is_array())
        .map(|(k, _)| k.clone())
        .collect();
    named.sort();
    let mut present: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    assert_eq!(named, present, "model_index.json and the component folders disagree");
    let sched = read("scheduler/scheduler_config.json");
    assert_eq!(sched["_class_name"], "FlowMatchEulerDiscreteScheduler");
    assert_eq!((sched["shift"].as_f64(), sched["use_dynamic_shifting"].as_bool()), (Some(3.0), Some(true)));
    let tok_len = read("tokenizer/tokenizer_config.json")["model_max_length"].as_u64().unwrap();
    let positions = read("text_encoder/config.json")["max_position_embeddings"].as_u64().unwrap();
    assert!(tok_len <= positions, "CLIP tokenizer pads to {tok_len} but the model has {positions} positions");
}
