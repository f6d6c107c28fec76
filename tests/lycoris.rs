//! LyCORIS LoKr and LoHa files (issue 16 §3) against the `lycoris-lora` package: goldens from
//! tools/make_lycoris_fixture.py (tests/fixtures/lycoris-{lokr,loha}.safetensors, the adapters as
//! LyCORIS saves them under SimpleTuner's `lycoris_<diffusers module>` names, and
//! lycoris-{lokr,loha}-golden.safetensors, LyCORIS's forward at multipliers 1 and 0.6, the loss and
//! PyTorch autograd's gradient of every factor); no Python here. Also: the files rewritten under
//! kohya-style `lora_unet_<BFL module>` names, `lora convert` / `lora merge` (LyCORIS keys back,
//! stacked with a LoRA), `info`, and bad files refused naming the key with nothing written.

mod common;
use common::*;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::{lokr, AdapterSet, Kind};
use flux_kernels::cli::lora_cmd::{convert, merge};
use flux_kernels::engine::{Device, Engine, EngineOptions};
use flux_kernels::io::safetensors::{Dtype, SafeTensors};
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::flux::FluxInputs;
use flux_kernels::model::weights::FluxWeights;
use flux_kernels::util::{rel_l2, Rng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// LyCORIS's multiplier of `golden.out_m` (tools/make_lycoris_fixture.py's MULT).
const MULT: f32 = 0.6;

fn tiny_path() -> PathBuf {
    fixture("tiny-diffusers")
}

fn golden(kind: &str) -> SafeTensors {
    SafeTensors::open(&fixture(&format!("lycoris-{kind}-golden.safetensors"))).unwrap()
}

fn forward(loras: &[(PathBuf, f32)]) -> Vec<f32> {
    run_forward(&tiny_path(), None, loras).unwrap()
}

/// The forward with the file at multipliers 1 and 0.6 against LyCORIS's; returns the errors.
fn check_forward(kind: &str, file: &Path) -> (f64, f64) {
    let g = golden(kind);
    let base = forward(&[]);
    let want = g.read_f32("golden.out").unwrap().1;
    // The adapters move the output: the comparison is not of the base model with itself.
    let effect = rel_l2(&base, &want);
    assert!(effect > 0.05, "{kind}: effect {effect:e}");
    let e1 = rel_l2(&forward(&[(file.to_path_buf(), 1.0)]), &want);
    let em = rel_l2(&forward(&[(file.to_path_buf(), MULT)]), &g.read_f32("golden.out_m").unwrap().1);
    println!(
        "{kind} ({}): forward vs LyCORIS rel L2 {e1:.2e} at 1, {em:.2e} at {MULT} (effect {effect:.3})",
        file.display()
    );
    assert!(e1 < 1e-4 && em < 1e-4, "{kind}: {e1:e} {em:e}");
    (e1, em)
}

#[test]
fn lokr_and_loha_forward_match_lycoris() {
    let f = load_lora(
        &fixture("lycoris-lokr.safetensors"),
        &Checkpoint::open(&tiny_path(), None).unwrap().cfg,
        UnknownKeys::Error,
    )
    .unwrap();
    assert_eq!(f.terms.len(), 11);
    assert!(f.terms.iter().all(|t| matches!(t.kind, Kind::Lokr { .. }) && t.sizes_ok()));
    // to_k is factored on both sides, to_out.0 whole on both (scale 1 whatever alpha says).
    let by = |m: &str, rows: std::ops::Range<usize>| f.terms.iter().find(|t| t.module == m && t.rows == rows).unwrap();
    let to_k = by("double_blocks.0.img_attn.qkv", 32..64);
    assert_eq!(to_k.kind, Kind::Lokr { w1: [4, 4], w2: [8, 8], r1: Some(1), r2: Some(1) });
    assert_eq!(to_k.scale, 2.0);
    let proj = by("double_blocks.0.img_attn.proj", 0..32);
    assert!(matches!(proj.kind, Kind::Lokr { r1: None, r2: None, .. }) && proj.scale == 1.0);
    check_forward("lokr", &fixture("lycoris-lokr.safetensors"));
    check_forward("loha", &fixture("lycoris-loha.safetensors"));
}

/// `lora convert` of `src` on the tiny model to `out` in `format`.
fn convert_to(src: &Path, out: &Path, format: &str) -> anyhow::Result<String> {
    convert(tiny_path().to_str().unwrap(), src.to_str().unwrap(), out, format.parse()?, None, UnknownKeys::Error)
}

/// The same adapters under kohya-style names (`lora_unet_<BFL module>`): a term on a diffusers part
/// of a fused projection cannot be named so, so those keep their `lycoris_` names, and the
/// norm_out.linear one is written in BFL's row order by way of `lora convert`.
#[test]
fn converted_files_under_bfl_names_match_lycoris() {
    let dir = tmpdir("lycoris-convert");
    for kind in ["lokr", "loha"] {
        let out = dir.join(format!("{kind}-kohya.safetensors"));
        let src = fixture(&format!("lycoris-{kind}.safetensors"));
        convert_to(&src, &out, "kohya").unwrap();
        let (t, _) = read_all(&out);
        let names: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
        assert!(names.contains(&"lora_unet_final_layer_adaLN_modulation_1.alpha"), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("lycoris_transformer_blocks_0_attn_to_q.")), "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("lora_unet_") || n.starts_with("lycoris_")));
        // Every alpha is its module's rank: the scale is in the first factor. to_out.0's LoKr has
        // both factors whole (scale 1): alpha 1, which LyCORIS's loader needs present.
        if kind == "lokr" {
            let a = t.iter().find(|x| x.0 == "lora_unet_double_blocks_0_img_attn_proj.alpha").unwrap();
            assert_eq!(a.3, vec![1.0]);
        }
        check_forward(kind, &out);
        // The peft format has no LoKr/LoHa: refused, nothing written.
        let peft = dir.join(format!("{kind}-peft.safetensors"));
        let e = err_string(convert_to(&src, &peft, "peft"));
        assert!(e.contains("--format kohya"), "{e}");
        assert!(!peft.exists());
    }
}

/// The set's gradient of every factor against PyTorch autograd through LyCORIS's modules.
#[test]
fn lokr_and_loha_gradients_match_lycoris_autograd() {
    let ckpt = Checkpoint::open(&tiny_path(), None).unwrap();
    let cfg = ckpt.cfg.clone();
    let inp = FluxInputs::from_file(&fixture("tiny-inputs.safetensors"), &cfg).unwrap();
    let target = SafeTensors::open(&fixture("tiny-grad-target.safetensors")).unwrap().read_f32("target").unwrap().1;
    for kind in ["lokr", "loha"] {
        let g = golden(kind);
        let f = load_lora(&fixture(&format!("lycoris-{kind}.safetensors")), &cfg, UnknownKeys::Error).unwrap();
        let mut set = AdapterSet::new();
        set.add(&f.terms, 1.0);
        let w = FluxWeights::new(&cfg, &|n| ckpt.param(n).cloned()).unwrap();
        let mut engine = Engine::new(&Device::Cpu, &cfg, w, EngineOptions::default()).unwrap();
        engine.train_adapters(&set, None).unwrap();
        let fwd = engine.forward_train(&inp, None).unwrap();
        let loss = engine.backward_mse(fwd, &target, None, 1.0).unwrap();
        let want_loss = g.read_f32("golden.loss").unwrap().1[0] as f64;
        assert!((loss - want_loss).abs() < 1e-4 * want_loss, "{kind}: loss {loss} vs LyCORIS {want_loss}");
        let mut grads = engine.grads().unwrap().into_iter();
        let (mut worst, mut n) = ((0f64, String::new()), 0);
        for (t, k) in f.terms.iter().zip(&f.keys) {
            let mut gs: Vec<Vec<f32>> = grads.by_ref().take(t.params.len()).collect();
            if k.swap_halves {
                // Back to the file's (diffusers') row order: the same rotation by half.
                match t.kind {
                    Kind::Lokr { .. } => lokr::swap_halves(t.kind, &mut gs, "grad").unwrap(),
                    _ => flux_kernels::adapters::loha::swap_halves(t.kind, &mut gs, t.rows.len()),
                }
            }
            for (gv, key) in gs.iter().zip(&k.params) {
                let want = g.read_f32(&format!("golden.grad.{key}")).unwrap().1;
                let e = rel_l2(gv, &want);
                assert!(e < 1e-4, "{key}: rel L2 {e:e}");
                assert!(want.iter().any(|&v| v != 0.0), "{key}: a zero gradient checks nothing");
                n += 1;
                if e > worst.0 {
                    worst = (e, key.clone());
                }
            }
        }
        assert!(grads.next().is_none());
        let golden_count = g.tensors().keys().filter(|k| k.starts_with("golden.grad.")).count();
        assert_eq!(n, golden_count, "{kind}: every factor checked");
        println!(
            "{kind}: loss {loss:.6} vs {want_loss:.6}; {n} factor gradients vs LyCORIS autograd: worst rel L2 {:.2e} ({})",
            worst.0, worst.1
        );
    }
}

/// A small PEFT LoRA on transformer_blocks.1.attn.to_v, which no LyCORIS fixture touches.
fn small_lora(path: &Path) {
    let mut rng = Rng::new(4);
    let t: Tensors = vec![
        (
            "transformer.transformer_blocks.1.attn.to_v.lora_A.weight".into(),
            vec![2, 32],
            Dtype::F32,
            rng.normal_vec(64, 0.3),
        ),
        (
            "transformer.transformer_blocks.1.attn.to_v.lora_B.weight".into(),
            vec![32, 2],
            Dtype::F32,
            rng.normal_vec(64, 0.3),
        ),
    ];
    write_all(path, &t, &BTreeMap::new());
}

#[test]
fn lycoris_stacks_and_merges_with_lora() {
    let dir = tmpdir("lycoris-merge");
    let lora = dir.join("lora.safetensors");
    small_lora(&lora);
    let lokr = fixture("lycoris-lokr.safetensors");
    let loha = fixture("lycoris-loha.safetensors");
    // Side by side at strengths: each adds its own update.
    let side = forward(&[(lokr.clone(), 0.6), (lora.clone(), -0.8)]);
    assert!(rel_l2(&side, &forward(&[(lokr.clone(), 0.6)])) > 1e-3);
    let model = tiny_path();
    let model = model.to_str().unwrap();
    let out = dir.join("merged.safetensors");
    let inputs = [format!("{}:0.6", lokr.display()), format!("{}:-0.8", lora.display())];
    merge(model, &inputs, &out, "kohya".parse().unwrap(), Some(Dtype::F32), UnknownKeys::Error).unwrap();
    let e = rel_l2(&forward(&[(out.clone(), 1.0)]), &side);
    println!("LoKr 0.6 + LoRA -0.8 merged (kohya/LyCORIS keys) vs side by side: rel L2 {e:.2e}");
    assert!(e < 1e-6, "{e:e}");
    // LoKr and LoHa on the same modules (to_q, context_embedder, …): one name holds one kind; refused, nothing written.
    let out2 = dir.join("both.safetensors");
    let inputs = [lokr.display().to_string(), loha.display().to_string()];
    let e = err_string(merge(model, &inputs, &out2, "kohya".parse().unwrap(), None, UnknownKeys::Error));
    assert!(e.contains("side by side") && e.contains("LyCORIS"), "{e}");
    assert!(!out2.exists());
    // Applied side by side they stack.
    let both = forward(&[(lokr.clone(), 1.0), (loha.clone(), 0.5)]);
    assert!(rel_l2(&both, &forward(&[(lokr, 1.0)])) > 1e-3);
}

#[test]
fn info_reports_kind_shapes_and_alpha() {
    let model = tiny_path();
    let s = flux_kernels::cli::info::run(
        model.to_str().unwrap(),
        &[
            fixture("lycoris-lokr.safetensors").display().to_string(),
            fixture("lycoris-loha.safetensors").display().to_string(),
        ],
        None,
        UnknownKeys::Error,
    )
    .unwrap();
    println!("{s}");
    assert!(s.contains("format: LyCORIS (lycoris_ names)"), "{s}");
    assert!(s.contains("kind: LoKr (11 of 11 terms"), "{s}");
    assert!(s.contains("w1 4×4 whole ⊗ w2 8×8 rank 2, alpha 3 (scale 1.5)"), "{s}");
    assert!(s.contains("w1 4×4 rank 1 ⊗ w2 8×8 rank 1, alpha 2 (scale 2)"), "{s}");
    assert!(s.contains("kind: LoHa (7 of 7 terms"), "{s}");
    assert!(s.contains("rank 4, alpha 4 (scale 1)"), "{s}");
}

/// A copy of the LoKr fixture with `f` applied to its tensors.
fn bad(dir: &Path, name: &str, f: impl FnOnce(&mut Tensors)) -> PathBuf {
    let p = dir.join(name);
    rewrite(&fixture("lycoris-lokr.safetensors"), &p, f);
    p
}

#[test]
fn bad_lycoris_files_are_refused_naming_file_and_key() {
    let dir = tmpdir("lycoris-bad");
    let m = "lycoris_transformer_blocks_0_attn_to_q";
    let cases: Vec<(PathBuf, String)> = vec![
        // A missing factor.
        (bad(&dir, "no-w2b.safetensors", |t| t.retain(|x| x.0 != format!("{m}.lokr_w2_b"))), format!("{m}.lokr_w2_a")),
        (bad(&dir, "no-w1.safetensors", |t| t.retain(|x| x.0 != format!("{m}.lokr_w1"))), format!("{m}.lokr_w1")),
        // Two kinds on one module.
        (
            bad(&dir, "mixed.safetensors", |t| {
                t.push((format!("{m}.lora_down.weight"), vec![2, 32], Dtype::F32, vec![0.0; 64]));
                t.push((format!("{m}.lora_up.weight"), vec![32, 2], Dtype::F32, vec![0.0; 64]));
            }),
            "mixes adapter kinds".into(),
        ),
        (
            bad(&dir, "lokr-loha.safetensors", |t| {
                t.push((format!("{m}.hada_w1_a"), vec![32, 2], Dtype::F32, vec![0.0; 64]));
            }),
            format!("{m}.hada_w1_a"),
        ),
        // Wrong shapes: w1 ⊗ w2 not the module's.
        (
            bad(&dir, "shape.safetensors", |t| {
                let w1 = t.iter_mut().find(|x| x.0 == format!("{m}.lokr_w1")).unwrap();
                (w1.1, w1.3) = (vec![2, 4], vec![0.1; 8]);
            }),
            "made for a different model".into(),
        ),
        // A Tucker core.
        (
            bad(&dir, "tucker.safetensors", |t| t.push((format!("{m}.lokr_t2"), vec![2, 2], Dtype::F32, vec![1.0; 4]))),
            format!("{m}.lokr_t2"),
        ),
    ];
    for (path, want) in cases {
        let out = dir.join("out.safetensors");
        let e = err_string(convert_to(&path, &out, "kohya"));
        println!("{}: {e}", path.file_name().unwrap().to_string_lossy());
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(&want), "wants `{want}`: {e}");
        assert!(!out.exists());
    }
}
