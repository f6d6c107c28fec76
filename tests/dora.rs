//! PEFT DoRA files (issue 16 §2, loading): `lora_A`, `lora_B` and `lora_magnitude_vector`
//! applied unmerged by the CPU reference, checked against PEFT's own forward and autograd
//! (tests/fixtures/lora-peft-dora*.safetensors from tools/make_dora_fixture.py), at any strength;
//! bad magnitudes are refused naming the file and key; writing DoRA is refused, naming the module.

mod common;
use common::*;
use flux_kernels::adapters::export::LoraFormatOut;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::adapters::Kind;
use flux_kernels::cli::lora_cmd::convert;
use flux_kernels::io::safetensors::SafeTensors;
use flux_kernels::util::rel_l2;

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
    let loss = flux_kernels::cli::grad::run(
        fixture("tiny-diffusers").to_str().unwrap(),
        &fixture("tiny-inputs.safetensors"),
        &fixture("tiny-grad-target.safetensors"),
        &fixture("lora-peft-dora.safetensors"),
        &out,
        None,
        UnknownKeys::Error,
        "cpu",
    )
    .unwrap();
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
    // Writing DoRA is not supported yet: a clear error naming the module, nothing written.
    let out = dir.join("out.safetensors");
    let e = err_string(convert(
        model.to_str().unwrap(),
        fixture("lora-peft-dora.safetensors").to_str().unwrap(),
        &out,
        LoraFormatOut::Peft,
        None,
        UnknownKeys::Error,
    ));
    assert!(e.contains("DoRA") && e.contains("final_layer.adaLN_modulation.1") && e.contains("convert"), "{e}");
    assert!(!out.exists());
}
