//! LoRA conversion and merging are exact: the converted or merged file computes what the
//! originals compute.

mod common;
use common::*;
use flux_kernels::adapters::export::LoraFormatOut;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::cli::lora_cmd::{convert, merge};
use flux_kernels::io::safetensors::Dtype;
use flux_kernels::util::rel_l2;

#[test]
fn convert_round_trips_every_dialect_to_both_formats() {
    let dir = tmpdir("lora-convert");
    let model = fixture("tiny-diffusers");
    for name in ["peft", "peft-nometa", "kohya", "comfy", "onetrainer"] {
        let src = fixture(&format!("lora-{name}.safetensors"));
        let want = run_forward(&model, None, &[(src.clone(), 1.0)]).unwrap();
        for fmt in [LoraFormatOut::Peft, LoraFormatOut::Kohya] {
            let out = dir.join(format!("{name}-{fmt:?}.safetensors"));
            convert(model.to_str().unwrap(), src.to_str().unwrap(), &out, fmt, Some(Dtype::F32), UnknownKeys::Error)
                .unwrap();
            let got = run_forward(&model, None, &[(out.clone(), 1.0)]).unwrap();
            let err = rel_l2(&got, &want);
            assert!(err < 1e-6, "{name} → {fmt:?}: rel L2 {err:e}");
            // Converting back gives the same again (kohya → peft splits fused terms, and back).
            let back = dir.join(format!("{name}-{fmt:?}-back.safetensors"));
            let other = if fmt == LoraFormatOut::Peft { LoraFormatOut::Kohya } else { LoraFormatOut::Peft };
            convert(model.to_str().unwrap(), out.to_str().unwrap(), &back, other, Some(Dtype::F32), UnknownKeys::Error)
                .unwrap();
            assert!(rel_l2(&run_forward(&model, None, &[(back, 1.0)]).unwrap(), &want) < 1e-6);
        }
    }
}

#[test]
fn merge_is_exact_and_written_files_carry_their_format() {
    let dir = tmpdir("lora-merge");
    let model = fixture("tiny-diffusers");
    let inputs: Vec<String> = [("peft", 0.8), ("kohya", -0.5), ("onetrainer", 1.3)]
        .iter()
        .map(|(n, s)| format!("{}:{s}", fixture(&format!("lora-{n}.safetensors")).display()))
        .collect();
    for fmt in [LoraFormatOut::Peft, LoraFormatOut::Kohya] {
        let out = dir.join(format!("merged-{fmt:?}.safetensors"));
        merge(model.to_str().unwrap(), &inputs, &out, fmt, Some(Dtype::F32), UnknownKeys::Error).unwrap();
        let got = run_forward(&model, None, &[(out.clone(), 1.0)]).unwrap();
        let err = rel_l2(&got, &expected("stack"));
        assert!(err < 1e-4, "{fmt:?}: rel L2 {err:e}");
        let cfg = flux_kernels::model::checkpoint::Checkpoint::open(&model, None).unwrap().cfg;
        let f = load_lora(&out, &cfg, UnknownKeys::Error).unwrap();
        let want = if fmt == LoraFormatOut::Peft { "diffusers/PEFT" } else { "kohya sd-scripts" };
        assert_eq!(f.formats.iter().map(|x| x.name()).collect::<Vec<_>>(), vec![want]);
    }
    // The built-in configuration is enough for shapes.
    let e = err_string(merge(
        "flux1-dev",
        &inputs,
        &dir.join("x.safetensors"),
        LoraFormatOut::Peft,
        Some(Dtype::F32),
        UnknownKeys::Error,
    ));
    assert!(e.contains("lora-peft.safetensors") || e.contains("shape"), "{e}");
}

#[test]
fn trained_lora_fixtures_still_compute_what_diffusers_checked() {
    // tools/check_trained_lora.py verified these files in diffusers against these outputs.
    for fmt in ["peft", "kohya"] {
        let lora = fixture(&format!("trained-{fmt}.safetensors"));
        let got = run_forward(&fixture("tiny-diffusers"), None, &[(lora, 1.0)]).unwrap();
        let want =
            flux_kernels::io::safetensors::SafeTensors::open(&fixture(&format!("trained-{fmt}-expected.safetensors")))
                .unwrap()
                .read_f32("out")
                .unwrap()
                .1;
        assert!(rel_l2(&got, &want) < 1e-6, "{fmt}");
    }
}
