//! The CPU reference against diffusers' FluxTransformer2DModel (+ PEFT) on the tiny random
//! model that tools/make_fixtures.py builds: both checkpoint layouts, bf16 storage, every LoRA
//! dialect alone and stacked with strengths. Relative L2 error < 1e-4 in f32.

mod common;
use common::*;
use flux_kernels::io::safetensors::Dtype;
use flux_kernels::util::rel_l2;
use std::path::PathBuf;

const TOL: f64 = 1e-4;

fn cases() -> Vec<(&'static str, Vec<(PathBuf, f32)>)> {
    let l = |n: &str, s: f32| (fixture(n), s);
    vec![
        ("base", vec![]),
        ("peft", vec![l("lora-peft.safetensors", 1.0)]),
        ("peft_nometa", vec![l("lora-peft-nometa.safetensors", 1.0)]),
        ("kohya", vec![l("lora-kohya.safetensors", 1.0)]),
        ("comfy", vec![l("lora-comfy.safetensors", 1.0)]),
        ("onetrainer", vec![l("lora-onetrainer.safetensors", 1.0)]),
        (
            "stack",
            vec![
                l("lora-peft.safetensors", 0.8),
                l("lora-kohya.safetensors", -0.5),
                l("lora-onetrainer.safetensors", 1.3),
            ],
        ),
    ]
}

fn check_all(model: &std::path::Path, axes: Option<&[usize]>, layout: &str) {
    for (name, loras) in cases() {
        let got = run_forward(model, axes, &loras).unwrap_or_else(|e| panic!("{layout}/{name}: {e:#}"));
        let err = rel_l2(&got, &expected(name));
        println!("{layout:>10} {name:<12} rel L2 {err:.2e}");
        assert!(err < TOL, "{layout}/{name}: rel L2 {err:.3e} ≥ {TOL:e}");
    }
}

#[test]
fn bfl_layout_matches_diffusers() {
    check_all(&fixture("tiny-bfl.safetensors"), Some(TINY_AXES), "bfl");
}

#[test]
fn diffusers_layout_matches_diffusers() {
    // Rope axes come from config.json here; nothing passed.
    check_all(&fixture("tiny-diffusers"), None, "diffusers");
}

#[test]
fn lora_output_differs_from_base() {
    // Guards the golden test itself: a loader that silently dropped every LoRA would fail here.
    let base = expected("base");
    for (name, _) in cases().into_iter().skip(1) {
        assert!(rel_l2(&expected(name), &base) > 0.05, "{name} is too close to base to test anything");
    }
}

#[test]
fn bundle_prefix_repo_folder_and_other_dtypes_load_the_same_model() {
    let dir = tmpdir("golden-variants");
    let base = expected("base");
    // model.diffusion_model. prefix, as single-file bundles store it.
    let prefixed = dir.join("prefixed.safetensors");
    rewrite(&fixture("tiny-bfl.safetensors"), &prefixed, |t| {
        t.iter_mut().for_each(|e| e.0 = format!("model.diffusion_model.{}", e.0))
    });
    assert!(rel_l2(&run_forward(&prefixed, Some(TINY_AXES), &[]).unwrap(), &base) < TOL);
    // f32 and f16 storage of the same (bf16-exact) values.
    for (dt, tol) in [(Dtype::F32, TOL), (Dtype::F16, 1e-3)] {
        let p = dir.join(format!("{}.safetensors", dt.name()));
        rewrite(&fixture("tiny-bfl.safetensors"), &p, |t| t.iter_mut().for_each(|e| e.2 = dt));
        let err = rel_l2(&run_forward(&p, Some(TINY_AXES), &[]).unwrap(), &base);
        assert!(err < tol, "{}: {err:e}", dt.name());
    }
    // A FLUX.1 repository folder: the transformer lives in transformer/.
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::os::unix::fs::symlink(fixture("tiny-diffusers"), repo.join("transformer")).unwrap();
    assert!(rel_l2(&run_forward(&repo, None, &[]).unwrap(), &base) < TOL);
}

#[test]
fn comfy_lora_with_up_down_names_and_kohya_on_diffusers_base() {
    let dir = tmpdir("golden-comfy");
    let p = dir.join("comfy-updown.safetensors");
    rewrite(&fixture("lora-comfy.safetensors"), &p, |t| {
        t.iter_mut().for_each(|e| e.0 = e.0.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."))
    });
    let got = run_forward(&fixture("tiny-diffusers"), None, &[(p, 1.0)]).unwrap();
    assert!(rel_l2(&got, &expected("comfy")) < TOL);
}

#[test]
fn peft_metadata_alpha_pattern_and_rslora() {
    use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
    let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&fixture("tiny-diffusers"), None).unwrap().cfg;
    let dir = tmpdir("golden-peftmeta");
    let (t, meta) = read_all(&fixture("lora-peft.safetensors"));
    let raw: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value), name: &str| {
        let mut m = raw.clone();
        edit(&mut m);
        let mut md = meta.clone();
        md.insert("lora_adapter_metadata".into(), m.to_string());
        let p = dir.join(name);
        write_all(&p, &t, &md);
        load_lora(&p, &cfg, UnknownKeys::Error).unwrap()
    };
    // r = 4, alpha 8 → scale 2 everywhere.
    let plain = load_lora(&fixture("lora-peft.safetensors"), &cfg, UnknownKeys::Error).unwrap();
    assert!(plain.terms.iter().all(|t| t.scale == 2.0));
    // rsLoRA: alpha / √r, so alpha 4 gives the same scale 2.
    let rs = with(
        &|m| {
            m["transformer.use_rslora"] = true.into();
            m["transformer.lora_alpha"] = 4.into();
        },
        "rs.safetensors",
    );
    assert!(rs.terms.iter().all(|t| t.scale == 2.0));
    // alpha_pattern overrides one module by PEFT's suffix rule; the rest keep lora_alpha.
    let pat = with(&|m| m["transformer.alpha_pattern"] = serde_json::json!({"x_embedder": 16}), "pat.safetensors");
    for t in &pat.terms {
        assert_eq!(t.scale, if t.module == "img_in" { 4.0 } else { 2.0 }, "{}", t.module);
    }
}
