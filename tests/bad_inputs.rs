//! Every kind of bad input is an error that names the file and the tensor or setting, never a
//! panic and never a silently wrong result.

mod common;
use common::*;
use flux_kernels::adapters::formats::{load_lora, UnknownKeys};
use flux_kernels::io::safetensors::Dtype;
use flux_kernels::model::checkpoint::Checkpoint;
use flux_kernels::model::config::FluxConfig;
use flux_kernels::model::flux::FluxInputs;
use std::path::Path;

fn open_err(p: &Path) -> String {
    err_string(Checkpoint::open(p, Some(TINY_AXES.to_vec())))
}

fn tiny_cfg() -> FluxConfig {
    Checkpoint::open(&fixture("tiny-bfl.safetensors"), Some(TINY_AXES.to_vec())).unwrap().cfg
}

#[test]
fn checkpoint_missing_unexpected_wrong_shape_wrong_dtype() {
    let dir = tmpdir("bad-ckpt");
    let src = fixture("tiny-bfl.safetensors");

    let p = dir.join("missing.safetensors");
    rewrite(&src, &p, |t| t.retain(|e| e.0 != "double_blocks.1.txt_mlp.2.bias"));
    let e = open_err(&p);
    assert!(
        e.contains("missing") && e.contains("double_blocks.1.txt_mlp.2.bias") && e.contains("missing.safetensors"),
        "{e}"
    );

    let p = dir.join("extra.safetensors");
    rewrite(&src, &p, |t| t.push(("double_blocks.0.img_attn.lora_extra".into(), vec![2], Dtype::BF16, vec![0.0; 2])));
    let e = open_err(&p);
    assert!(e.contains("unexpected") && e.contains("double_blocks.0.img_attn.lora_extra"), "{e}");

    let p = dir.join("shape.safetensors");
    rewrite(&src, &p, |t| {
        let e = t.iter_mut().find(|e| e.0 == "single_blocks.0.linear2.weight").unwrap();
        e.1 = vec![e.1[1], e.1[0]];
    });
    let e = open_err(&p);
    assert!(e.contains("single_blocks.0.linear2.weight") && e.contains("shape"), "{e}");

    let p = dir.join("dtype.safetensors");
    rewrite(&src, &p, |t| {
        let e = t.iter_mut().find(|e| e.0 == "img_in.bias").unwrap();
        e.2 = Dtype::F64;
    });
    let e = open_err(&p);
    assert!(e.contains("img_in.bias") && e.contains("F64"), "{e}");
}

#[test]
fn truncated_and_lying_headers() {
    let dir = tmpdir("bad-trunc");
    let bytes = std::fs::read(fixture("tiny-bfl.safetensors")).unwrap();
    let p = dir.join("trunc.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(&p);
    assert!(e.contains("trunc.safetensors") && e.contains("truncated"), "{e}");

    // Rewrite one tensor's data_offsets to point past the end of the data.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = header.get_mut("img_in.weight").unwrap();
    let end = entry["data_offsets"][1].as_u64().unwrap();
    entry["data_offsets"] = serde_json::json!([end + 1_000_000, end + 1_000_000 + 512 * 2]);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    let p = dir.join("lies.safetensors");
    std::fs::write(&p, out).unwrap();
    let e = open_err(&p);
    assert!(e.contains("img_in.weight") && e.contains("data_offsets"), "{e}");

    let p = dir.join("empty.safetensors");
    std::fs::write(&p, b"").unwrap();
    assert!(open_err(&p).contains("too short"));
    assert!(open_err(&dir.join("nope.safetensors")).contains("does not exist"));
}

#[test]
fn diffusers_folder_problems() {
    let dir = tmpdir("bad-dif");
    let src = fixture("tiny-diffusers");
    let copy = |d: &Path| {
        std::fs::create_dir_all(d).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    };
    let d = dir.join("noshard");
    copy(&d);
    std::fs::remove_file(d.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let e = err_string(Checkpoint::open(&d, None));
    assert!(e.contains("00002-of-00002") && e.contains("missing"), "{e}");

    let d = dir.join("badcfg");
    copy(&d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"num_single_layers\": 2", "\"num_single_layers\": 3");
    assert!(cfg.contains("\"num_single_layers\": 3"), "fixture config.json format changed");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = err_string(Checkpoint::open(&d, None));
    assert!(e.contains("num_single_layers") && e.contains("config.json"), "{e}");

    let e = err_string(Checkpoint::open(&src, Some(vec![8, 4, 4])));
    assert!(e.contains("--rope-axes") && e.contains("axes_dims_rope"), "{e}");
}

#[test]
fn head_dim_not_128_without_rope_axes_says_what_to_pass() {
    let e = err_string(Checkpoint::open(&fixture("tiny-bfl.safetensors"), None));
    assert!(e.contains("--rope-axes") && e.contains("tiny-bfl.safetensors"), "{e}");
}

#[test]
fn lora_unknown_key_misfit_and_missing_factor() {
    let dir = tmpdir("bad-lora");
    let cfg = tiny_cfg();
    let src = fixture("lora-kohya.safetensors");

    let p = dir.join("unknown.safetensors");
    rewrite(&src, &p, |t| {
        t.push((
            "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight".into(),
            vec![4, 32],
            Dtype::F32,
            vec![0.0; 128],
        ))
    });
    let e = err_string(load_lora(&p, &cfg, UnknownKeys::Error));
    assert!(e.contains("lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight") && e.contains("matches no"), "{e}");
    // As a warning the key is skipped and named; the rest still loads.
    let f = load_lora(&p, &cfg, UnknownKeys::Warn).unwrap();
    assert_eq!(f.skipped, vec!["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight".to_string()]);
    assert_eq!(f.terms.len(), load_lora(&src, &cfg, UnknownKeys::Error).unwrap().terms.len());

    let p = dir.join("te.safetensors");
    rewrite(&src, &p, |t| {
        t.push((
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(),
            vec![4, 8],
            Dtype::F32,
            vec![0.0; 32],
        ))
    });
    assert!(err_string(load_lora(&p, &cfg, UnknownKeys::Error)).contains("lora_te1_text_model"));

    let p = dir.join("misfit.safetensors");
    rewrite(&src, &p, |t| {
        let e = t.iter_mut().find(|e| e.0 == "lora_unet_single_blocks_1_linear2.lora_up.weight").unwrap();
        e.1 = vec![e.1[0] / 2, e.1[1] * 2];
    });
    let e = err_string(load_lora(&p, &cfg, UnknownKeys::Error));
    assert!(e.contains("lora_unet_single_blocks_1_linear2.lora_up.weight") && e.contains("shape"), "{e}");

    let p = dir.join("wrong-in.safetensors");
    rewrite(&src, &p, |t| {
        let e = t.iter_mut().find(|e| e.0 == "lora_unet_img_in.lora_down.weight").unwrap();
        e.1 = vec![e.1[0] * 2, e.1[1] / 2];
    });
    let e = err_string(load_lora(&p, &cfg, UnknownKeys::Error));
    assert!(e.contains("lora_unet_img_in.lora_down.weight") && e.contains("inputs"), "{e}");

    let p = dir.join("half.safetensors");
    rewrite(&src, &p, |t| t.retain(|e| e.0 != "lora_unet_txt_in.lora_up.weight"));
    let e = err_string(load_lora(&p, &cfg, UnknownKeys::Error));
    assert!(e.contains("lora_unet_txt_in") && e.contains("up"), "{e}");

    let p = dir.join("dora.safetensors");
    rewrite(&src, &p, |t| t.push(("lora_unet_txt_in.dora_scale".into(), vec![32], Dtype::F32, vec![1.0; 32])));
    assert!(err_string(load_lora(&p, &cfg, UnknownKeys::Error)).contains("lora_unet_txt_in.dora_scale"));

    let p = dir.join("nan.safetensors");
    rewrite(&src, &p, |t| t.iter_mut().find(|e| e.0 == "lora_unet_txt_in.lora_up.weight").unwrap().3[0] = f32::NAN);
    assert!(err_string(load_lora(&p, &cfg, UnknownKeys::Error)).contains("non-finite"));
}

#[test]
fn inputs_wrong_shape_missing_guidance_nan() {
    let dir = tmpdir("bad-inputs");
    let cfg = tiny_cfg();
    let src = fixture("tiny-inputs.safetensors");
    let p = dir.join("shape.safetensors");
    rewrite(&src, &p, |t| {
        let e = t.iter_mut().find(|e| e.0 == "txt").unwrap();
        e.1 = vec![2, 10, 12];
    });
    let e = err_string(FluxInputs::from_file(&p, &cfg));
    assert!(e.contains("`txt`") && e.contains("[2, 10, 12]"), "{e}");

    let p = dir.join("noguid.safetensors");
    rewrite(&src, &p, |t| t.retain(|e| e.0 != "guidance"));
    let e = err_string(FluxInputs::from_file(&p, &cfg));
    assert!(e.contains("`guidance`"), "{e}");

    let p = dir.join("nan.safetensors");
    rewrite(&src, &p, |t| t.iter_mut().find(|e| e.0 == "y").unwrap().3[3] = f32::NAN);
    let e = err_string(FluxInputs::from_file(&p, &cfg));
    assert!(e.contains("`y`") && e.contains("non-finite"), "{e}");

    let p = dir.join("ids.safetensors");
    rewrite(&src, &p, |t| t.iter_mut().find(|e| e.0 == "img_ids").unwrap().1 = vec![8, 6]);
    let e = err_string(FluxInputs::from_file(&p, &cfg));
    assert!(e.contains("`img_ids`"), "{e}");

    // f16 inputs are fine ("any float dtype").
    let p = dir.join("f16.safetensors");
    rewrite(&src, &p, |t| t.iter_mut().for_each(|e| e.2 = Dtype::F16));
    assert!(FluxInputs::from_file(&p, &cfg).is_ok());
}
