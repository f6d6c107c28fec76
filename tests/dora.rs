//! PEFT DoRA files (issue 16 §2, loading): `lora_A`, `lora_B` and `lora_magnitude_vector`
//! applied unmerged by the CPU reference, checked against PEFT's own forward and autograd
//! (tests/fixtures/lora-peft-dora*.safetensors from tools/make_dora_fixture.py), at any strength;
//! kohya/LyCORIS files (`dora_scale` [out, 1], as ComfyUI reads them) built by hand from the same
//! A, B and magnitudes give the same output, alone, at any strength and stacked; `lora convert` /
//! `lora merge` write DoRA exactly in both formats or refuse what a format cannot hold; bad
//! magnitudes are refused naming the file and key.

mod common;
use common::*;
use flux_kernels::adapters::export::{kohya_tensors, LoraFormatOut};
use flux_kernels::adapters::formats::{load_lora, LoraFormat, UnknownKeys};
use flux_kernels::adapters::Kind;
use flux_kernels::cli::lora_cmd::{convert, merge};
use flux_kernels::io::safetensors::{Dtype, SafeTensors};
use flux_kernels::util::rel_l2;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn want(name: &str) -> Vec<f32> {
    SafeTensors::open(&fixture("lora-peft-dora-expected.safetensors")).unwrap().read_f32(name).unwrap().1
}

#[test]
fn peft_dora_forward_matches_peft_at_any_strength() {
    let model = fixture("tiny-diffusers");
    let dora = fixture("lora-peft-dora.safetensors");
    let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&model, None).unwrap().cfg;
    let f = load_lora(&dora, &cfg, UnknownKeys::Error).unwrap();
    assert_eq!(f.terms.len(), 26);
    assert!(f.terms.iter().all(|t| matches!(t.kind, Kind::Dora { rank: 4 }) && t.sizes_ok()));
    for (strength, name) in [(1.0, "out"), (0.5, "out_half")] {
        let got = run_forward(&model, None, &[(dora.clone(), strength)]).unwrap();
        let e = rel_l2(&got, &want(name));
        println!("PEFT DoRA at strength {strength}: rel L2 {e:.2e}");
        assert!(e < 1e-4, "strength {strength}: rel L2 {e:e}");
    }
    // The magnitudes matter: the same A and B as plain LoRA compute something else.
    let dir = tmpdir("dora-plain");
    let plain = dir.join("plain.safetensors");
    let (t, meta) = read_all(&dora);
    let t: Tensors = t.into_iter().filter(|x| !x.0.ends_with("lora_magnitude_vector")).collect();
    write_all(&plain, &t, &meta);
    let lora = run_forward(&model, None, &[(plain, 1.0)]).unwrap();
    assert!(rel_l2(&lora, &want("out")) > 1e-2, "DoRA's rescale had no effect");
}

#[test]
fn info_reports_dora() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flux-kernels"))
        .args(["info", "--model"])
        .arg(fixture("tiny-diffusers"))
        .arg("--lora")
        .arg(fixture("lora-peft-dora.safetensors"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.contains("kind: DoRA (26 of 26 terms"), "{s}");
}

#[test]
fn peft_dora_gradients_match_peft_autograd() {
    let dir = tmpdir("dora-grad");
    let out = dir.join("grad.safetensors");
    let loss = tiny_grad(&fixture("lora-peft-dora.safetensors"), &out).unwrap();
    assert!((loss - want("loss")[0] as f64).abs() < 1e-4 * loss.abs(), "loss {loss} vs PEFT {}", want("loss")[0]);
    let got = SafeTensors::open(&out).unwrap();
    let reference = SafeTensors::open(&fixture("lora-peft-dora-expected.safetensors")).unwrap();
    let mut n = 0;
    let mut worst = 0f64;
    for key in reference.tensors().keys().filter_map(|k| k.strip_prefix("grad.")) {
        let g = got.read_f32(key).unwrap_or_else(|e| panic!("no gradient for `{key}`: {e}")).1;
        let e = rel_l2(&g, &reference.read_f32(&format!("grad.{key}")).unwrap().1);
        assert!(e < 1e-4, "{key}: rel L2 {e:e}");
        worst = worst.max(e);
        n += 1;
    }
    println!("{n} DoRA gradients vs PEFT autograd: worst rel L2 {worst:.2e}");
    assert_eq!(n, 78);
}

#[test]
fn bad_dora_files_are_refused_naming_file_and_key() {
    let dir = tmpdir("dora-bad");
    let model = fixture("tiny-diffusers");
    let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&model, None).unwrap().cfg;
    let key = "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector";
    // A magnitude of the wrong length.
    let short = dir.join("short.safetensors");
    rewrite(&fixture("lora-peft-dora.safetensors"), &short, |t| {
        let e = t.iter_mut().find(|e| e.0 == key).unwrap();
        e.1 = vec![31];
        e.3.truncate(31);
    });
    let e = err_string(load_lora(&short, &cfg, UnknownKeys::Error));
    assert!(e.contains("short.safetensors") && e.contains(key) && e.contains("[32]"), "{e}");
    // A magnitude without its factors.
    let lone = dir.join("lone.safetensors");
    let prefix = "transformer.transformer_blocks.0.attn.to_q.lora_";
    rewrite(&fixture("lora-peft-dora.safetensors"), &lone, |t| t.retain(|e| !e.0.starts_with(prefix) || e.0 == key));
    let e = err_string(load_lora(&lone, &cfg, UnknownKeys::Error));
    assert!(e.contains("lone.safetensors") && e.contains(key) && e.contains("no matching"), "{e}");
    // kohya's dora_scale covers a whole BFL module: the fixture's add_k_proj alone leaves the rest of
    // txt_attn.qkv without magnitudes. Without the frozen weights that is refused, naming the module.
    let f = load_lora(&fixture(PEFT_DORA), &cfg, UnknownKeys::Error).unwrap();
    let e = err_string(kohya_tensors(&cfg, &f.terms, None));
    assert!(e.contains("double_blocks.0.txt_attn.qkv") && e.contains("--format peft"), "{e}");
}

#[test]
fn peft_dora_to_kohya_fills_uncovered_rows_with_their_frozen_norms() {
    // With a model file, the rows no DoRA term updates take ‖W_row‖ (g = 1): exact.
    let dir = tmpdir("dora-to-kohya");
    let model = fixture("tiny-diffusers");
    let out = dir.join("kohya.safetensors");
    let src = fixture(PEFT_DORA);
    convert(model.to_str().unwrap(), src.to_str().unwrap(), &out, LoraFormatOut::Kohya, None, UnknownKeys::Error)
        .unwrap();
    let (t, _) = read_all(&out);
    let ds = t.iter().find(|x| x.0 == "lora_unet_double_blocks_0_txt_attn_qkv.dora_scale").expect("txt qkv");
    assert_eq!(ds.1, vec![96, 1]);
    let e = same_output(&out, &[(src, 1.0)]);
    println!("lora convert PEFT DoRA -> kohya (add_k_proj alone on txt_attn.qkv): rel L2 {e:.2e}");
    assert!(e < 1e-5, "{e:e}");
}

// ---- kohya / LyCORIS / ComfyUI DoRA files (`dora_scale`) ----

const PEFT_DORA: &str = "lora-peft-dora.safetensors";
/// The PEFT fixture's alpha / rank (8 / 4).
const FIXTURE_SCALE: f32 = 2.0;

/// The PEFT DoRA fixture written out by hand as a kohya-style LyCORIS file, module by module
/// (those `keep` accepts, by diffusers name): `lora_unet_<diffusers name, dots as underscores>`
/// with lora_down = A, lora_up = B, alpha = 8 and dora_scale = the magnitude as [out, 1]; block 0's
/// to_q/to_k/to_v fused onto BFL's `double_blocks.0.img_attn.qkv` (down = [A_q; A_k; A_v], up
/// block-diagonal, alpha = scale · 3r, dora_scale the three magnitudes), and norm_out.linear
/// under BFL's `final_layer.adaLN_modulation.1` with its rows reordered to BFL's [shift; scale].
fn kohya_dora(dst: &Path, keep: impl Fn(&str) -> bool) -> usize {
    let (t, _) = read_all(&fixture(PEFT_DORA));
    let get = |k: String| t.iter().find(|x| x.0 == k).unwrap_or_else(|| panic!("no `{k}`")).3.clone();
    let modules: Vec<String> = t
        .iter()
        .filter_map(|x| x.0.strip_suffix(".lora_A.weight"))
        .map(|m| m.trim_start_matches("transformer.").to_string())
        .filter(|m| keep(m))
        .collect();
    let r = 4;
    let mut out: Tensors = Vec::new();
    let mut push = |key: &str, a: Vec<f32>, b: Vec<f32>, rank: usize, mag: Vec<f32>| {
        let (d_in, rows) = (a.len() / rank, mag.len());
        out.push((format!("{key}.lora_down.weight"), vec![rank, d_in], Dtype::F32, a));
        out.push((format!("{key}.lora_up.weight"), vec![rows, rank], Dtype::F32, b));
        out.push((format!("{key}.alpha"), vec![], Dtype::F32, vec![FIXTURE_SCALE * rank as f32]));
        out.push((format!("{key}.dora_scale"), vec![rows, 1], Dtype::F32, mag));
    };
    let part = |m: &str, f: &str| get(format!("transformer.{m}.{f}"));
    let fused = ["to_q", "to_k", "to_v"].map(|p| format!("transformer_blocks.0.attn.{p}"));
    for m in modules.iter().filter(|m| !fused.contains(m)) {
        let (mut a, mut b, mut mag) =
            (part(m, "lora_A.weight"), part(m, "lora_B.weight"), part(m, "lora_magnitude_vector"));
        if m == "norm_out.linear" {
            let half = mag.len() / 2;
            b.rotate_left(half * r);
            mag.rotate_left(half);
            push("lora_unet_final_layer_adaLN_modulation_1", std::mem::take(&mut a), b, r, mag);
        } else {
            push(&format!("lora_unet_{}", m.replace('.', "_")), a, b, r, mag);
        }
    }
    if fused.iter().all(|m| modules.contains(m)) {
        let h = 32;
        let (mut down, mut up, mut mag) = (Vec::new(), vec![0f32; 3 * h * 3 * r], Vec::new());
        for (j, m) in fused.iter().enumerate() {
            down.extend(part(m, "lora_A.weight"));
            let b = part(m, "lora_B.weight");
            for i in 0..h {
                for q in 0..r {
                    up[(j * h + i) * 3 * r + j * r + q] = b[i * r + q];
                }
            }
            mag.extend(part(m, "lora_magnitude_vector"));
        }
        push("lora_unet_double_blocks_0_img_attn_qkv", down, up, 3 * r, mag);
    }
    let n = out.len() / 4;
    write_all(dst, &out, &BTreeMap::new());
    n
}

#[test]
fn kohya_dora_scale_applies_as_the_peft_file_at_any_strength_and_stacked() {
    let dir = tmpdir("dora-kohya");
    let model = fixture("tiny-diffusers");
    let (peft, kohya) = (fixture(PEFT_DORA), dir.join("kohya-dora.safetensors"));
    assert_eq!(kohya_dora(&kohya, |_| true), 24);
    let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&model, None).unwrap().cfg;
    let f = load_lora(&kohya, &cfg, UnknownKeys::Error).unwrap();
    assert!(f.formats.contains(&LoraFormat::Kohya), "{:?}", f.formats);
    assert_eq!(f.terms.len(), 24);
    assert!(f.terms.iter().all(|t| matches!(t.kind, Kind::Dora { .. }) && t.sizes_ok()));
    for (strength, name) in [(1.0, "out"), (0.5, "out_half")] {
        let k = run_forward(&model, None, &[(kohya.clone(), strength)]).unwrap();
        let p = run_forward(&model, None, &[(peft.clone(), strength)]).unwrap();
        let (e, e_peft) = (rel_l2(&k, &p), rel_l2(&k, &want(name)));
        println!(
            "kohya dora_scale vs PEFT-format DoRA at strength {strength}: rel L2 {e:.2e} (vs PEFT itself {e_peft:.2e})"
        );
        assert!(e < 1e-5, "strength {strength}: {e:e}");
        assert!(e_peft < 1e-4, "strength {strength} vs PEFT: {e_peft:e}");
    }
    // Stacked with a plain LoRA on the same linears: the same sum either way, and not DoRA alone.
    let other = (fixture("lora-peft.safetensors"), 0.7);
    let k = run_forward(&model, None, &[(kohya.clone(), 0.5), other.clone()]).unwrap();
    let p = run_forward(&model, None, &[(peft, 0.5), other]).unwrap();
    let e = rel_l2(&k, &p);
    println!("stacked with a LoRA (0.5 + 0.7): kohya vs PEFT-format DoRA rel L2 {e:.2e}");
    assert!(e < 1e-5, "stacked: {e:e}");
    assert!(rel_l2(&k, &run_forward(&model, None, &[(kohya, 0.5)]).unwrap()) > 1e-2, "the LoRA did not stack");
}

#[test]
fn info_reports_kohya_dora() {
    let dir = tmpdir("dora-kohya-info");
    let kohya = dir.join("kohya-dora.safetensors");
    kohya_dora(&kohya, |_| true);
    let (ok, s) =
        run(&["info", "--model", fixture("tiny-diffusers").to_str().unwrap(), "--lora", kohya.to_str().unwrap()]);
    assert!(ok, "{s}");
    assert!(s.contains("kind: DoRA (24 of 24 terms carry a magnitude vector, dora_scale)"), "{s}");
    assert!(s.contains("format: kohya sd-scripts"), "{s}");
}

/// Forward of `file` at strength 1 against forward of `want` (file, strength) pairs.
fn same_output(file: &Path, want: &[(PathBuf, f32)]) -> f64 {
    let model = fixture("tiny-diffusers");
    rel_l2(&run_forward(&model, None, &[(file.to_path_buf(), 1.0)]).unwrap(), &run_forward(&model, None, want).unwrap())
}

#[test]
fn lora_convert_and_merge_write_dora_exactly() {
    let dir = tmpdir("dora-merge");
    let model = fixture("tiny-diffusers");
    let m = model.to_str().unwrap();
    let kohya = dir.join("kohya-dora.safetensors");
    kohya_dora(&kohya, |_| true);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // PEFT → PEFT and kohya → PEFT (the fused qkv split into to_q/to_k/to_v): magnitudes as
    // PEFT writes them, use_dora in the config, the same output.
    for (src, name) in [(fixture(PEFT_DORA), "peft"), (kohya.clone(), "kohya")] {
        let out = dir.join(format!("{name}-to-peft.safetensors"));
        convert(m, &s(&src), &out, LoraFormatOut::Peft, None, UnknownKeys::Error).unwrap();
        let (t, meta) = read_all(&out);
        assert_eq!(t.iter().filter(|x| x.0.ends_with(".lora_magnitude_vector")).count(), 26, "{name}");
        assert!(t.iter().any(|x| x.0 == "transformer.transformer_blocks.0.attn.to_k.lora_magnitude_vector"));
        let config: serde_json::Value = serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
        assert_eq!(config["transformer.use_dora"], true, "{name}");
        let e = same_output(&out, &[(src.clone(), 1.0)]);
        println!("lora convert {name} DoRA -> peft: rel L2 {e:.2e}");
        assert!(e < 1e-5, "{name} -> peft: {e:e}");
    }
    // kohya → kohya at strength 0.5.
    let whole = dir.join("kohya-whole.safetensors");
    kohya_dora(&whole, |m| !m.ends_with("add_k_proj"));
    let out = dir.join("kohya-half.safetensors");
    merge(m, &[format!("{}:0.5", s(&whole))], &out, LoraFormatOut::Kohya, None, UnknownKeys::Error).unwrap();
    let (t, _) = read_all(&out);
    let ds = t.iter().find(|x| x.0 == "lora_unet_double_blocks_1_img_attn_qkv.dora_scale").expect("fused dora_scale");
    assert_eq!(ds.1, vec![96, 1]);
    let e = same_output(&out, &[(whole.clone(), 0.5)]);
    println!("lora merge kohya DoRA:0.5 -> kohya: rel L2 {e:.2e}");
    assert!(e < 1e-5, "kohya:0.5 -> kohya: {e:e}");
    // A DoRA file and a LoRA on other linears: kohya marks DoRA per module, so they merge exactly;
    // PEFT has one use_dora per file and is refused, as is DoRA with anything on the same rows.
    let lora = dir.join("lora-elsewhere.safetensors");
    rewrite(&fixture("lora-peft.safetensors"), &lora, |t| {
        t.retain(|x| x.0.contains("context_embedder") || x.0.contains("ff_context.net.2"))
    });
    let both = [format!("{}:0.5", s(&whole)), format!("{}:0.7", s(&lora))];
    let out = dir.join("mixed-kohya.safetensors");
    merge(m, &both, &out, LoraFormatOut::Kohya, None, UnknownKeys::Error).unwrap();
    let e = same_output(&out, &[(whole.clone(), 0.5), (lora.clone(), 0.7)]);
    println!("lora merge kohya DoRA:0.5 + LoRA:0.7 -> kohya: rel L2 {e:.2e}");
    assert!(e < 1e-5, "mixed -> kohya: {e:e}");
    let out = dir.join("mixed-peft.safetensors");
    let e = err_string(merge(m, &both, &out, LoraFormatOut::Peft, None, UnknownKeys::Error));
    assert!(e.contains("mix DoRA and plain LoRA") && e.contains("--format kohya"), "{e}");
    assert!(!out.exists());
    let twice = [s(&whole), s(&whole)];
    for fmt in [LoraFormatOut::Peft, LoraFormatOut::Kohya] {
        let e = err_string(merge(m, &twice, &out, fmt, None, UnknownKeys::Error));
        assert!(e.contains("DoRA term together with other terms"), "{fmt:?}: {e}");
        assert!(!out.exists());
    }
}

#[test]
fn bad_dora_scales_are_refused_naming_file_and_key() {
    let dir = tmpdir("dora-kohya-bad");
    let model = fixture("tiny-diffusers");
    let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&model, None).unwrap().cfg;
    let good = dir.join("good.safetensors");
    kohya_dora(&good, |_| true);
    let key = "lora_unet_transformer_blocks_1_attn_to_out_0.dora_scale";
    let cases: [(&str, Vec<usize>, usize, &str); 3] = [
        ("flat", vec![32], 32, "expected [32, 1]"),
        ("wide", vec![32, 2], 64, "expected [32, 1]"),
        ("columns", vec![1, 31], 31, "or [1, 32] (one per input column)"),
    ];
    for (name, shape, n, says) in cases {
        let bad = dir.join(format!("{name}.safetensors"));
        rewrite(&good, &bad, |t| {
            let e = t.iter_mut().find(|e| e.0 == key).unwrap();
            e.1 = shape.clone();
            e.3 = vec![1.0; n];
        });
        let e = err_string(load_lora(&bad, &cfg, UnknownKeys::Error));
        assert!(e.contains(&format!("{name}.safetensors")) && e.contains(key) && e.contains(says), "{name}: {e}");
    }
    // Both magnitude forms on one module.
    let both = dir.join("both.safetensors");
    rewrite(&good, &both, |t| {
        let mag = t.iter().find(|e| e.0 == key).unwrap().3.clone();
        t.push((
            "lora_unet_transformer_blocks_1_attn_to_out_0.lora_magnitude_vector".into(),
            vec![32],
            Dtype::F32,
            mag,
        ));
    });
    let e = err_string(load_lora(&both, &cfg, UnknownKeys::Error));
    assert!(e.contains("both.safetensors") && e.contains(key) && e.contains("lora_magnitude_vector"), "{e}");
    // A non-finite magnitude.
    let nan = dir.join("nan.safetensors");
    rewrite(&good, &nan, |t| t.iter_mut().find(|e| e.0 == key).unwrap().3[3] = f32::NAN);
    let e = err_string(load_lora(&nan, &cfg, UnknownKeys::Error));
    assert!(e.contains("nan.safetensors") && e.contains(key) && e.contains("non-finite"), "{e}");
}

#[test]
fn kohya_dora_gradients_match_peft_autograd() {
    // `grad` on the hand-built kohya file: each module's lora_down/up/dora_scale gradient is PEFT's
    // A/B/magnitude gradient (same A, B, m and scale), dora_scale's in its own [out, 1] shape. The
    // two modules written by hand in another layout (block 0's fused qkv, the BFL-ordered final
    // adaLN) are covered by the forward tests.
    let dir = tmpdir("dora-kohya-grad");
    let kohya = dir.join("kohya-dora.safetensors");
    kohya_dora(&kohya, |_| true);
    let out = dir.join("grad.safetensors");
    tiny_grad(&kohya, &out).unwrap();
    let got = SafeTensors::open(&out).unwrap();
    let reference = SafeTensors::open(&fixture("lora-peft-dora-expected.safetensors")).unwrap();
    let (mut n, mut worst) = (0, 0f64);
    for (key, info) in got.tensors() {
        let Some((module, part)) = key.strip_prefix("lora_unet_").and_then(|k| k.split_once('.')) else { continue };
        let peft_part = match part {
            "lora_down.weight" => "lora_A.weight",
            "lora_up.weight" => "lora_B.weight",
            "dora_scale" => {
                assert_eq!(info.shape[1..], [1], "{key}");
                "lora_magnitude_vector"
            }
            _ => unreachable!("{key}"),
        };
        let peft_key = format!("grad.transformer.{}.{peft_part}", module.replace('_', "."));
        // diffusers names with underscores of their own (to_out.0, ff.net.2, proj_mlp …) are found
        // by trying the reference's keys with dots as underscores.
        let want = reference
            .tensors()
            .keys()
            .find(|k| k.replace('.', "_") == peft_key.replace('.', "_"))
            .map(|k| reference.read_f32(k).unwrap().1);
        let Some(want) = want else { continue };
        let e = rel_l2(&got.read_f32(key).unwrap().1, &want);
        assert!(e < 1e-4, "{key}: rel L2 {e:e}");
        worst = worst.max(e);
        n += 1;
    }
    println!("{n} kohya DoRA gradients vs PEFT autograd: worst rel L2 {worst:.2e}");
    assert_eq!(n, 3 * 22);
}

#[test]
fn grad_writes_per_column_dora_scale_gradients_in_their_shape() {
    // A kohya file with one module's dora_scale in the per-input-column form [1, in] (LyCORIS
    // wd_on_out = false): `grad` writes that gradient as [1, in], and it matches central finite
    // differences of the loss `grad` itself reports (the norm is a constant only for A and B).
    let dir = tmpdir("dora-columns-grad");
    let rows = dir.join("rows.safetensors");
    assert_eq!(kohya_dora(&rows, |m| m == "transformer_blocks.1.attn.to_out.0"), 1);
    let key = "lora_unet_transformer_blocks_1_attn_to_out_0.dora_scale";
    let m0 = read_all(&rows).0.into_iter().find(|t| t.0 == key).unwrap().3;
    let k = m0.len();
    let with = |name: &str, m: &[f32]| {
        let p = dir.join(name);
        rewrite(&rows, &p, |t| {
            let e = t.iter_mut().find(|e| e.0 == key).unwrap();
            (e.1, e.3) = (vec![1, k], m.to_vec());
        });
        p
    };
    let out = dir.join("grad.safetensors");
    tiny_grad(&with("cols.safetensors", &m0), &out).unwrap();
    let st = SafeTensors::open(&out).unwrap();
    assert_eq!(st.info(key).unwrap().shape, vec![1, k], "the gradient keeps the file's [1, in] shape");
    let g = st.read_f32(key).unwrap().1;
    let (mut fd, mut an) = (Vec::new(), Vec::new());
    for j in [0, k / 3, k - 1] {
        let eps = 1e-2 * m0[j].abs().max(1e-2);
        let loss = |sign: f32| {
            let mut m = m0.clone();
            m[j] += sign * eps;
            tiny_grad(&with("fd.safetensors", &m), &dir.join("fd-grad.safetensors")).unwrap()
        };
        fd.push(((loss(1.0) - loss(-1.0)) / (2.0 * eps as f64)) as f32);
        an.push(g[j]);
    }
    let e = rel_l2(&an, &fd);
    println!("per-column dora_scale gradient vs finite differences: rel L2 {e:.2e} ({an:?} vs {fd:?})");
    assert!(e < 2e-2, "rel L2 {e:e}: {an:?} vs {fd:?}");
}
