//! The NSFW classifier (src/safety/) against transformers on the tiny fixture of
//! tools/make_nsfw_fixture.py (tests/fixtures/nsfw/): PIL's resize byte for byte at Falconsai's
//! 224², the processor's pixel_values, the logits and probabilities, the verdict, and the files
//! it refuses.

mod common;

use common::{err_string, fixture, read_all, rewrite, tmpdir, write_all};
use flux_kernels::io::safetensors::{Dtype, SafeTensors};
use flux_kernels::safety::preprocess::resize_bilinear_rgb8;
use flux_kernels::safety::{NsfwClassifier, NSFW_THRESHOLD};
use flux_kernels::util::rel_l2;
use std::path::{Path, PathBuf};

/// Relative L2 bound of the f32 forward against transformers' float32 one.
const TOL: f64 = 1e-4;

fn model_dir() -> PathBuf {
    fixture("nsfw/model")
}

fn expected(name: &str) -> Vec<f32> {
    SafeTensors::open(&fixture("nsfw/expected.safetensors")).unwrap().read_f32(name).unwrap().1
}

/// An 8-bit RGB PNG of the fixture: (pixels [h, w, 3], width, height).
fn png(name: &str) -> (Vec<u8>, usize, usize) {
    let img = image::open(fixture(&format!("nsfw/{name}"))).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    (img.into_raw(), w, h)
}

/// A copy of the fixture model folder to break.
fn copy_model(tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(model_dir().join(f), d.join(f)).unwrap();
    }
    d
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn resize_matches_pil_byte_for_byte_at_224() {
    // Falconsai's 224² input: wide.png (320×240) is reduced on both axes, small.png (37×23)
    // enlarged on both; the expected bytes are transformers' ViTImageProcessor (PIL backend).
    for name in ["wide", "small"] {
        let (rgb, w, h) = png(&format!("{name}.png"));
        let (want, ww, wh) = png(&format!("{name}-224.png"));
        assert_eq!((ww, wh), (224, 224));
        let got = resize_bilinear_rgb8(&rgb, w, h, 224, 224);
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let worst = got.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
        assert_eq!(differing, 0, "{name}: {differing} of {} bytes differ from PIL (worst by {worst})", got.len());
    }
}

#[test]
fn pixel_values_match_the_processor() {
    // The tiny model's processor (32×32): wide is reduced on both axes, small reduced across and
    // enlarged down.
    let c = NsfwClassifier::load(&model_dir()).unwrap();
    for name in ["wide", "small"] {
        let (rgb, w, h) = png(&format!("{name}.png"));
        let got = c.pixel_values(&rgb, w, h).unwrap();
        let want = expected(&format!("pixel_values.{name}"));
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: pixel_values differ by up to {worst}");
    }
}

#[test]
fn logits_and_probabilities_match_transformers() {
    let c = NsfwClassifier::load(&model_dir()).unwrap();
    assert_eq!(c.labels(), ["normal", "nsfw"]);
    // The model alone, on random pixel values.
    let got = c.logits(&expected("random_pixels"), 2).unwrap();
    let want = expected("logits.random");
    let e = rel_l2(&got, &want);
    eprintln!("nsfw golden: logits of random pixels rel L2 {e:.2e}");
    assert!(e < TOL, "random pixels: rel L2 {e:e}\n got {got:?}\nwant {want:?}");
    // End to end from the PNG bytes: preprocessing, logits, softmax, the verdict.
    let mut flagged = 0;
    for name in ["wide", "small"] {
        let (rgb, w, h) = png(&format!("{name}.png"));
        let logits = c.logits(&c.pixel_values(&rgb, w, h).unwrap(), 1).unwrap();
        let e = rel_l2(&logits, &expected(&format!("logits.{name}")));
        let probs = c.probabilities(&rgb, w, h).unwrap();
        let want = expected(&format!("probs.{name}"));
        let ep = rel_l2(&probs, &want);
        eprintln!("nsfw golden: {name}: logits rel L2 {e:.2e}, probabilities rel L2 {ep:.2e} ({probs:?})");
        assert!(e < TOL && ep < TOL, "{name}: logits {e:e}, probabilities {ep:e}: {probs:?} vs {want:?}");
        let p = c.nsfw_probability(&rgb, w, h).unwrap();
        assert_eq!(p, probs[1]);
        let verdict = c.check(&rgb, w, h).unwrap();
        // The fixture puts one image on each side of the threshold, with room.
        assert_eq!(verdict.is_some(), want[1] >= NSFW_THRESHOLD, "{name}: p = {p}");
        assert!((want[1] - NSFW_THRESHOLD).abs() > 0.05);
        if let Some(why) = verdict {
            assert!(why.contains("nsfw probability") && why.contains("0.85"), "{why}");
            flagged += 1;
        }
    }
    assert_eq!(flagged, 1, "one fixture image is above the threshold and one below");
}

#[test]
fn the_nsfw_label_is_found_by_name() {
    // Labels swapped in the config: the probability reported is that of index 0 now.
    let d = copy_model("nsfw-swapped");
    edit_config(&d, |v| v["id2label"] = serde_json::json!({"0": "nsfw", "1": "normal"}));
    let (c, swapped) = (NsfwClassifier::load(&model_dir()).unwrap(), NsfwClassifier::load(&d).unwrap());
    let (rgb, w, h) = png("small.png");
    let probs = c.probabilities(&rgb, w, h).unwrap();
    assert_eq!(swapped.nsfw_probability(&rgb, w, h).unwrap(), probs[0]);
    assert_ne!(probs[0], probs[1]);
}

#[test]
fn f32_and_f16_copies_give_the_same_answer() {
    let (t, meta) = read_all(&model_dir().join("model.safetensors"));
    let (rgb, w, h) = png("wide.png");
    let want = NsfwClassifier::load(&model_dir()).unwrap().probabilities(&rgb, w, h).unwrap();
    for (dtype, tol) in [(Dtype::F32, 0.0), (Dtype::F16, 1e-2)] {
        let d = copy_model(&format!("nsfw-{}", dtype.name()));
        let t: Vec<_> = t.iter().map(|(n, s, _, v)| (n.clone(), s.clone(), dtype, v.clone())).collect();
        write_all(&d.join("model.safetensors"), &t, &meta);
        let got = NsfwClassifier::load(&d).unwrap().probabilities(&rgb, w, h).unwrap();
        let e = rel_l2(&got, &want);
        // bf16 values are f32 values exactly; f16 rounds the small ones.
        assert!(e <= tol, "{}: rel L2 {e:e}", dtype.name());
    }
}

#[test]
fn refuses_broken_folders_naming_what_is_wrong() {
    // A tensor missing.
    let d = copy_model("nsfw-missing");
    let w = d.join("model.safetensors");
    rewrite(&w, &w, |t| t.retain(|(n, ..)| n != "vit.encoder.layer.1.output.dense.bias"));
    let e = err_string(NsfwClassifier::load(&d));
    assert!(
        e.contains("model.safetensors") && e.contains("missing tensor `vit.encoder.layer.1.output.dense.bias`"),
        "{e}"
    );

    // A wrong shape.
    let d = copy_model("nsfw-shape");
    let w = d.join("model.safetensors");
    rewrite(&w, &w, |t| {
        let q = t.iter_mut().find(|(n, ..)| n == "vit.encoder.layer.0.attention.attention.query.weight").unwrap();
        q.1 = vec![16, 64];
    });
    let e = err_string(NsfwClassifier::load(&d));
    assert!(
        e.contains("`vit.encoder.layer.0.attention.attention.query.weight` has shape [16, 64], expected [32, 32]"),
        "{e}"
    );

    // A tensor the layout does not explain (a config that says fewer layers than the file has).
    let d = copy_model("nsfw-layers");
    edit_config(&d, |v| v["num_hidden_layers"] = 1.into());
    let e = err_string(NsfwClassifier::load(&d));
    assert!(e.contains("unexpected tensor `vit.encoder.layer.1."), "{e}");

    // No nsfw label.
    let d = copy_model("nsfw-nolabel");
    edit_config(&d, |v| v["id2label"] = serde_json::json!({"0": "safe", "1": "unsafe"}));
    let e = err_string(NsfwClassifier::load(&d));
    assert!(e.contains("config.json") && e.contains("no label `nsfw`"), "{e}");

    // The tanh GELU is not what this model computes.
    let d = copy_model("nsfw-act");
    edit_config(&d, |v| v["hidden_act"] = "gelu_new".into());
    let e = err_string(NsfwClassifier::load(&d));
    assert!(e.contains("hidden_act `gelu_new`"), "{e}");

    // A truncated weights file.
    let d = copy_model("nsfw-truncated");
    let w = d.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    let e = err_string(NsfwClassifier::load(&d));
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");

    // A preprocessing this does not implement.
    let d = copy_model("nsfw-bicubic");
    let p = d.join("preprocessor_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"resample\": 2", "\"resample\": 3");
    std::fs::write(&p, text).unwrap();
    let e = err_string(NsfwClassifier::load(&d));
    assert!(e.contains("preprocessor_config.json") && e.contains("resample 3"), "{e}");

    // No weights file; not a folder.
    let d = copy_model("nsfw-noweights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = err_string(NsfwClassifier::load(&d));
    assert!(e.contains("no model.safetensors"), "{e}");
    let e = err_string(NsfwClassifier::load(&model_dir().join("config.json")));
    assert!(e.contains("not a folder"), "{e}");

    // Bad images.
    let c = NsfwClassifier::load(&model_dir()).unwrap();
    assert!(err_string(c.nsfw_probability(&[0; 11], 2, 2)).contains("11 bytes"));
    assert!(err_string(c.nsfw_probability(&[], 0, 0)).contains("empty image"));
}

#[test]
fn is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<NsfwClassifier>();
}

/// Falconsai's size: a random ViT-B/16 written by `tools/make_nsfw_fixture.py --vit-b16 DIR`,
/// FK_NSFW_VIT_B16=DIR. Prints the time per image and the agreement with transformers there.
#[test]
#[ignore = "needs FK_NSFW_VIT_B16=DIR from tools/make_nsfw_fixture.py --vit-b16 DIR (343 MB)"]
fn vit_b16_time_and_agreement() {
    let dir = PathBuf::from(std::env::var_os("FK_NSFW_VIT_B16").expect("FK_NSFW_VIT_B16=DIR"));
    let t = std::time::Instant::now();
    let c = NsfwClassifier::load(&dir).unwrap();
    let load = t.elapsed();
    let img = image::open(dir.join("wide.png")).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let rgb = img.into_raw();
    let want = SafeTensors::open(&dir.join("expected.safetensors")).unwrap();
    let pv = c.pixel_values(&rgb, w, h).unwrap();
    let ep = rel_l2(&pv, &want.read_f32("pixel_values.wide").unwrap().1);
    let logits = c.logits(&pv, 1).unwrap();
    let e = rel_l2(&logits, &want.read_f32("logits.wide").unwrap().1);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        c.nsfw_probability(&rgb, w, h).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "ViT-B/16: load {:.2} s; pixel_values rel L2 {ep:.2e}, logits rel L2 {e:.2e}; per image (resize + forward) \
         median {:.1} ms of {times:.1?}, {} rayon threads",
        load.as_secs_f64(),
        times[2],
        rayon::current_num_threads()
    );
    assert!(e < TOL && ep < 1e-6, "logits {e:e}, pixel_values {ep:e}");
}

/// A copy of the fixture classifier whose nsfw logit is pushed by `shift`: +50 flags every image,
/// −50 none.
fn biased_model(tag: &str, shift: f32) -> PathBuf {
    let d = copy_model(tag);
    let w = d.join("model.safetensors");
    rewrite(&w, &w, |t| t.iter_mut().find(|(n, ..)| n == "classifier.bias").unwrap().3[1] += shift);
    d
}

/// `sample` on the tiny FLUX.1 folder (tests/fixtures/pipeline, with its VAE): two prompts, 16².
fn sample(out: &Path, extra: &[&str]) -> (bool, String) {
    let m = fixture("pipeline");
    let mut args = vec![
        "sample",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--width",
        "16",
        "--height",
        "16",
        "--steps",
        "2",
        "--t5-max-len",
        "16",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    common::run(&args)
}

#[test]
fn sample_withholds_flagged_images_and_says_so() {
    let dir = tmpdir("nsfw-sample");
    let (always, never) = (biased_model("nsfw-always", 50.0), biased_model("nsfw-never", -50.0));

    // Every image flagged: black PNGs named -nsfw-filtered, latents zero, a log line each.
    let out = dir.join("flagged");
    let (ok, log) = sample(&out, &["--nsfw-model", always.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("NSFW check: on"), "{log}");
    for i in 0..2 {
        let p = out.join(format!("sample-{i}-nsfw-filtered.png"));
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (16, 16));
        assert!(img.as_raw().iter().all(|&v| v == 0), "{} is not black", p.display());
        assert!(!out.join(format!("sample-{i}.png")).exists());
        assert!(log.contains(&format!("image {i}: NSFW check: nsfw probability 1.000")), "{log}");
    }
    let lat = SafeTensors::open(&out.join("latents.safetensors")).unwrap().read_f32("latents").unwrap().1;
    assert!(lat.iter().all(|&v| v == 0.0), "a withheld image's latents are written as zeros");

    // None flagged: the images as the VAE decoded them, under their usual names.
    let shown = dir.join("shown");
    let (ok, log) = sample(&shown, &["--nsfw-model", never.to_str().unwrap()]);
    assert!(ok && !log.contains("withheld"), "{log}");
    for i in 0..2 {
        let img = image::open(shown.join(format!("sample-{i}.png"))).unwrap().to_rgb8();
        assert!(img.as_raw().iter().any(|&v| v != 0));
    }
    // The same run without the check writes the same pixels (the check only reads them).
    let off = dir.join("off");
    let (ok, log) = sample(&off, &["--no-nsfw-check"]);
    assert!(ok && log.contains("warning: the NSFW check is off (--no-nsfw-check)"), "{log}");
    for i in 0..2 {
        let f = format!("sample-{i}.png");
        assert_eq!(std::fs::read(shown.join(&f)).unwrap(), std::fs::read(off.join(&f)).unwrap(), "{f}");
    }

    // No weights and no flag: one line saying the check is off and how to turn it on.
    let (ok, log) = sample(&dir.join("none"), &[]);
    assert!(ok, "{log}");
    let notes: Vec<&str> = log.lines().filter(|l| l.contains("NSFW check is off")).collect();
    assert_eq!(notes.len(), 1, "{log}");
    assert!(notes[0].starts_with("note:") && notes[0].contains("--nsfw-model DIR"), "{log}");

    // --nsfw-check without weights, and a broken classifier folder: errors, nothing written.
    let (ok, log) = sample(&dir.join("required"), &["--nsfw-check"]);
    assert!(!ok && log.contains("--nsfw-check: no NSFW classifier"), "{log}");
    let broken = copy_model("nsfw-broken-for-sample");
    std::fs::remove_file(broken.join("model.safetensors")).unwrap();
    let (ok, log) = sample(&dir.join("broken"), &["--nsfw-model", broken.to_str().unwrap()]);
    assert!(!ok && log.contains("no model.safetensors"), "{log}");
    assert!(!dir.join("required").exists() && !dir.join("broken").exists());
}

/// `train` with preview prompts on the tiny FLUX.1 folder (two 16² images with captions, two
/// steps, a preview at each).
fn train_with_previews(dir: &Path, extra: &[&str]) -> (bool, String) {
    let data = dir.join("images");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..2 {
        let px: Vec<f32> = (0..3 * 16 * 16).map(|j| (((j * 7 + i * 13) % 17) as f32 / 8.0 - 1.0) * 0.9).collect();
        flux_kernels::io::images::write_png(&data.join(format!("img{i}.png")), &px, 16, 16).unwrap();
        std::fs::write(data.join(format!("img{i}.txt")), format!("a photo of thing {i}")).unwrap();
    }
    let m = fixture("pipeline");
    let lora = dir.join("out/lora.safetensors");
    let mut args = vec![
        "train",
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--resolution",
        "16",
        "--bucket-step",
        "4",
        "--t5-max-len",
        "16",
        "--steps",
        "2",
        "--rank",
        "2",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        "--sample-prompt",
        "a red cube",
        "--sample-every",
        "1",
        "--sample-size",
        "16",
        "--sample-steps",
        "2",
        "--out",
        lora.to_str().unwrap(),
    ];
    args.extend(extra);
    common::run(&args)
}

#[test]
fn training_previews_pass_the_nsfw_check() {
    // Every preview flagged: black PNGs named -nsfw-filtered, the reason in the log.
    let dir = tmpdir("nsfw-train-flagged");
    let always = biased_model("nsfw-always-train", 50.0);
    let (ok, log) = train_with_previews(&dir, &["--nsfw-model", always.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("previews: NSFW check: on"), "{log}");
    for step in 1..=2 {
        let p = dir.join(format!("out/lora-samples/step{step:06}-0-nsfw-filtered.png"));
        let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}\n{log}", p.display())).to_rgb8();
        assert!(img.as_raw().iter().all(|&v| v == 0), "{} is not black", p.display());
        assert!(!dir.join(format!("out/lora-samples/step{step:06}-0.png")).exists());
    }
    assert!(log.contains("nsfw probability 1.000"), "{log}");
    // None flagged: the previews under their usual names, not black.
    let dir = tmpdir("nsfw-train-shown");
    let never = biased_model("nsfw-never-train", -50.0);
    let (ok, log) = train_with_previews(&dir, &["--nsfw-model", never.to_str().unwrap()]);
    assert!(ok && !log.contains("withheld"), "{log}");
    let img = image::open(dir.join("out/lora-samples/step000002-0.png")).unwrap().to_rgb8();
    assert!(img.as_raw().iter().any(|&v| v != 0));
    // No weights: the one line saying the check is off and how to turn it on; --nsfw-check
    // without weights is an error before anything is trained.
    let (ok, log) = train_with_previews(&tmpdir("nsfw-train-none"), &[]);
    assert!(ok && log.contains("previews: note: the NSFW check is off"), "{log}");
    let dir = tmpdir("nsfw-train-required");
    let (ok, log) = train_with_previews(&dir, &["--nsfw-check"]);
    assert!(!ok && log.contains("--nsfw-check: no NSFW classifier"), "{log}");
    assert!(!dir.join("out/lora.safetensors").exists());
}
