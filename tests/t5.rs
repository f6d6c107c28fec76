//! T5 v1.1 encoder and tokenizer against HF transformers (tools/make_t5_fixtures.py): a tiny random T5EncoderModel
//! (d_model 24, 3 heads × 8, d_ff 40, 2 layers) in every storage users have, and a SentencePiece unigram
//! tokenizer as spiece.model and as tokenizer.json.

mod common;
use common::*;
use flux_kernels::io::safetensors::{Dtype, SafeTensors};
use flux_kernels::text::t5::{relative_position_bucket, T5Config, T5Encoder, T5Tokenizer};
use flux_kernels::util::rel_l2;
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn t5_fixture(name: &str) -> PathBuf {
    fixture("t5").join(name)
}

fn pipeline(name: &str) -> PathBuf {
    fixture("pipeline").join(name)
}

fn expected() -> SafeTensors {
    SafeTensors::open(&t5_fixture("expected.safetensors")).unwrap()
}

/// An integer tensor (I64 or I32) of the expected file as i64, with its shape.
fn ints(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<i64>) {
    let info = st.info(name).unwrap_or_else(|| panic!("expected.safetensors has no `{name}`"));
    let bytes = st.bytes(name).unwrap();
    let v = match info.dtype.name() {
        "I64" => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
        "I32" => bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64).collect(),
        d => panic!("`{name}` is {d}"),
    };
    (info.shape.clone(), v)
}

fn ids_u32(st: &SafeTensors, name: &str) -> (usize, usize, Vec<u32>) {
    let (shape, v) = ints(st, name);
    (shape[0], shape[1], v.iter().map(|&x| x as u32).collect())
}

/// The fixture's description: one JSON object in the metadata key `t5_fixture`.
fn info(st: &SafeTensors) -> serde_json::Value {
    serde_json::from_str(&st.metadata()["t5_fixture"]).unwrap()
}

fn meta_list(st: &SafeTensors, key: &str) -> Vec<String> {
    serde_json::from_value(info(st)[key].clone()).unwrap()
}

fn tiny_config() -> T5Config {
    T5Config {
        vocab: 344,
        d_model: 24,
        d_kv: 8,
        num_heads: 3,
        d_ff: 40,
        num_layers: 2,
        num_buckets: 32,
        max_distance: 128,
        eps: 1e-6,
    }
}

// ------------------------------------------------------------------------------------------------------------
// Tokenizer
// ------------------------------------------------------------------------------------------------------------

fn check_tokenizer(path: &Path) {
    let st = expected();
    let prompts = meta_list(&st, "tok_prompts");
    let (n, len, want) = ids_u32(&st, "tok_ids");
    assert_eq!(n, prompts.len());
    let tok = T5Tokenizer::open(path).unwrap();
    assert_eq!((tok.eos_id(), tok.pad_id()), (1, 0));
    for (i, p) in prompts.iter().enumerate() {
        let got = tok.encode(p, len).unwrap();
        assert_eq!(got, want[i * len..(i + 1) * len], "{}: prompt {p:?}", path.display());
    }
}

#[test]
fn tokenizer_spiece_model_matches_hf() {
    // The FLUX.1-dev layout: tokenizer_2/ holds spiece.model (no tokenizer.json), as a folder and as the file.
    let dir = pipeline("tokenizer_2");
    assert!(!dir.join("tokenizer.json").exists());
    check_tokenizer(&dir);
    check_tokenizer(&dir.join("spiece.model"));
}

#[test]
fn tokenizer_json_matches_hf() {
    check_tokenizer(&t5_fixture("tokenizer.json"));
}

#[test]
fn tokenizer_truncates_keeping_eos_and_pads_to_max_len() {
    let st = expected();
    let long = info(&st)["long_prompt"].as_str().unwrap().to_string();
    let long = &long;
    let (_, len, want) = ids_u32(&st, "ids_long");
    for path in [pipeline("tokenizer_2"), t5_fixture("tokenizer.json")] {
        let tok = T5Tokenizer::open(&path).unwrap();
        assert_eq!(tok.vocab_size(), info(&st)["tokenizer_vocab"].as_u64().unwrap() as usize);
        assert_eq!(tok.encode(long, len).unwrap(), want);
        // FLUX length: the same tokens, EOS right after them, then pads; no truncation at 512.
        let full = tok.encode(long, 512).unwrap();
        assert_eq!(full.len(), 512);
        let eos = full.iter().position(|&t| t == 1).unwrap();
        assert!(eos > len && full[eos + 1..].iter().all(|&t| t == 0), "{full:?}");
        assert_eq!(full[..len - 1], want[..len - 1]);
        assert_eq!(tok.encode("", 4).unwrap(), [1, 0, 0, 0]);
        assert_eq!(tok.encode(long, 1).unwrap(), [1]);
        assert!(tok.encode(long, 0).is_err());
    }
}

#[test]
fn tokenizer_bad_inputs_are_errors() {
    let dir = tmpdir("t5-tok-bad");
    let e = err_string(T5Tokenizer::open(&dir));
    assert!(e.contains("no tokenizer.json or spiece.model"), "{e}");
    let p = dir.join("spiece.model");
    let good = std::fs::read(pipeline("tokenizer_2/spiece.model")).unwrap();
    std::fs::write(&p, &good[..good.len() / 2]).unwrap();
    let e = err_string(T5Tokenizer::open(&p));
    assert!(e.contains("spiece.model") && e.contains("SentencePiece"), "{e}");
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, "{\"model\": 3}").unwrap();
    let e = err_string(T5Tokenizer::open(&p));
    assert!(e.contains("tokenizer.json"), "{e}");
}

// ------------------------------------------------------------------------------------------------------------
// Encoder
// ------------------------------------------------------------------------------------------------------------

/// Encodes the fixture ids with the model at `path` and returns the rel-L2 error against `want`.
fn encoder_error(path: &Path, want: &str) -> f64 {
    let st = expected();
    let (b, l, ids) = ids_u32(&st, "ids");
    let enc = T5Encoder::open(path).unwrap();
    assert_eq!(enc.cfg, tiny_config(), "{}", path.display());
    let out = enc.encode(&ids, b, l).unwrap();
    let (shape, want_v) = st.read_f32(want).unwrap();
    assert_eq!(shape, vec![b, l, 24]);
    let err = rel_l2(&out, &want_v);
    eprintln!("{} vs `{want}`: rel L2 {err:.3e}", path.display());
    assert!(err < TOL, "{}: rel L2 {err:.3e} ≥ {TOL:e}", path.display());
    err
}

#[test]
fn encoder_sharded_bf16_folder_matches_hf() {
    encoder_error(&pipeline("text_encoder_2"), "hidden");
    encoder_error(&pipeline("text_encoder_2/model.safetensors.index.json"), "hidden");
}

#[test]
fn encoder_single_file_f16_matches_hf() {
    encoder_error(&t5_fixture("t5-single-f16.safetensors"), "hidden_f16");
}

#[test]
fn encoder_single_file_fp8_matches_hf() {
    encoder_error(&t5_fixture("t5-single-fp8.safetensors"), "hidden_fp8");
}

#[test]
fn encoder_single_file_scaled_fp8_matches_hf() {
    encoder_error(&t5_fixture("t5-single-fp8-scaled.safetensors"), "hidden_fp8_scaled");
}

#[test]
fn tokenizer_then_encoder_end_to_end() {
    let st = expected();
    let prompts = meta_list(&st, "prompts");
    let (b, l, want_ids) = ids_u32(&st, "ids");
    let tok = T5Tokenizer::open(&pipeline("tokenizer_2")).unwrap();
    let ids: Vec<u32> = prompts.iter().flat_map(|p| tok.encode(p, l).unwrap()).collect();
    assert_eq!(ids, want_ids);
    let out = T5Encoder::open(&pipeline("text_encoder_2")).unwrap().encode(&ids, b, l).unwrap();
    assert!(rel_l2(&out, &st.read_f32("hidden").unwrap().1) < TOL);
    // Each prompt alone gives its row of the batch: nothing leaks across the batch.
    let one = T5Encoder::open(&pipeline("text_encoder_2")).unwrap().encode(&ids[l..], 1, l).unwrap();
    assert!(rel_l2(&one, &out[l * 24..]) < 1e-6);
}

#[test]
fn relative_position_buckets_match_hf_table() {
    let st = expected();
    let (_, rel) = ints(&st, "bucket_rel");
    for (nb, md) in [(32usize, 128usize), (16, 64)] {
        let (_, want) = ints(&st, &format!("buckets_{nb}_{md}"));
        for (&r, &w) in rel.iter().zip(&want) {
            assert_eq!(relative_position_bucket(r, nb, md) as i64, w, "rel {r}, {nb} buckets, max distance {md}");
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Bad inputs
// ------------------------------------------------------------------------------------------------------------

fn open_err(p: &Path) -> String {
    err_string(T5Encoder::open(p))
}

#[test]
fn encoder_single_file_missing_unexpected_wrong_shape() {
    let dir = tmpdir("t5-bad-single");
    let src = t5_fixture("t5-single-f16.safetensors");

    let p = dir.join("missing.safetensors");
    rewrite(&src, &p, |t| t.retain(|e| e.0 != "encoder.block.1.layer.1.DenseReluDense.wo.weight"));
    let e = open_err(&p);
    assert!(
        e.contains("missing")
            && e.contains("encoder.block.1.layer.1.DenseReluDense.wo.weight")
            && e.contains("missing.safetensors"),
        "{e}"
    );

    let p = dir.join("extra.safetensors");
    rewrite(&src, &p, |t| {
        t.push(("encoder.block.0.layer.0.SelfAttention.lora_extra.weight".into(), vec![2], Dtype::F16, vec![0.0; 2]))
    });
    let e = open_err(&p);
    assert!(e.contains("unexpected") && e.contains("SelfAttention.lora_extra.weight"), "{e}");

    let p = dir.join("shape.safetensors");
    rewrite(&src, &p, |t| {
        let w = t.iter_mut().find(|e| e.0 == "encoder.block.1.layer.1.DenseReluDense.wi_1.weight").unwrap();
        w.1 = vec![24, 40];
    });
    let e = open_err(&p);
    assert!(
        e.contains("encoder.block.1.layer.1.DenseReluDense.wi_1.weight")
            && e.contains("[24, 40]")
            && e.contains("shape.safetensors"),
        "{e}"
    );

    // Shapes that contradict each other when the config is inferred.
    let p = dir.join("tied.safetensors");
    rewrite(&src, &p, |t| {
        let w = t.iter_mut().find(|e| e.0 == "encoder.embed_tokens.weight").unwrap();
        w.1 = vec![172, 48];
    });
    let e = open_err(&p);
    assert!(e.contains("encoder.embed_tokens.weight") && e.contains("[172, 48]"), "{e}");

    // A T5 v1.0 file (ReLU `wi`) is named as such.
    let p = dir.join("v10.safetensors");
    rewrite(&src, &p, |t| {
        for e in t.iter_mut().filter(|e| e.0.ends_with("wi_0.weight")) {
            e.0 = e.0.replace("wi_0", "wi");
        }
    });
    let e = open_err(&p);
    assert!(e.contains("v1.0") && e.contains("wi.weight"), "{e}");

    // Integer storage is not a weight: the same bytes relabelled I16 in the header.
    let p = dir.join("int.safetensors");
    let mut bytes = std::fs::read(&src).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + hlen]).unwrap();
    let at = header.find("\"encoder.block.1.layer.0.layer_norm.weight\"").unwrap();
    let f16 = 8 + at + header[at..].find("F16").unwrap();
    bytes[f16] = b'I';
    std::fs::write(&p, bytes).unwrap();
    let e = open_err(&p);
    assert!(e.contains("encoder.block.1.layer.0.layer_norm.weight") && e.contains("I16"), "{e}");

    let e = open_err(Path::new("/nonexistent/t5.safetensors"));
    assert!(e.contains("/nonexistent/t5.safetensors"), "{e}");
}

#[test]
fn encoder_folder_bad_index_and_config() {
    let src = pipeline("text_encoder_2");
    let dir = tmpdir("t5-bad-folder");
    let copy = |dst: &Path| {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    };

    // The index names a tensor its shard does not have.
    let d = dir.join("index");
    copy(&d);
    let idx = d.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    let text = text.replacen("\"weight_map\": {", "\"weight_map\": {\n    \"encoder.block.9.layer.0.SelfAttention.q.weight\": \"model-00001-of-00002.safetensors\",", 1);
    std::fs::write(&idx, text).unwrap();
    let e = open_err(&d);
    assert!(e.contains("encoder.block.9.layer.0.SelfAttention.q.weight") && e.contains("model-00001-of-00002"), "{e}");

    // A missing shard.
    let d = dir.join("shard");
    copy(&d);
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = open_err(&d);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    // config.json disagrees with the weights: d_ff 48 instead of 40.
    let d = dir.join("config");
    copy(&d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"d_ff\": 40", "\"d_ff\": 48");
    std::fs::write(&cfg, text).unwrap();
    let e = open_err(&d);
    assert!(e.contains("DenseReluDense.wi_0.weight") && e.contains("[48, 24]"), "{e}");

    // A non-gated (T5 v1.0) config.
    let d = dir.join("relu");
    copy(&d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"gated-gelu\"", "\"relu\"");
    std::fs::write(&cfg, text).unwrap();
    let e = open_err(&d);
    assert!(e.contains("feed_forward_proj") && e.contains("relu"), "{e}");
}

#[test]
fn encoder_bad_ids_are_errors() {
    let enc = T5Encoder::open(&t5_fixture("t5-single-fp8.safetensors")).unwrap();
    let e = err_string(enc.encode(&[1, 2, 344], 1, 3));
    assert!(e.contains("344") && e.contains("vocabulary"), "{e}");
    let e = err_string(enc.encode(&[1, 2, 3], 2, 2));
    assert!(e.contains("3 ids"), "{e}");
}
