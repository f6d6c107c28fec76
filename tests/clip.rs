//! CLIP-L text encoder and tokenizer against HF transformers on the tiny fixtures of
//! tools/make_clip_fixtures.py (tests/fixtures/clip/, tests/fixtures/pipeline/{text_encoder,tokenizer}/).

mod common;

use common::{err_string, fixture, read_all, rewrite, tmpdir, write_all};
use flux_kernels::io::safetensors::{f8e4m3_to_f32, Dtype, SafeTensors};
use flux_kernels::text::clip::{ClipConfig, ClipTextModel, ClipTokenizer};
use flux_kernels::util::{rel_l2, Rng};
use std::collections::BTreeMap;
use std::path::Path;

/// Relative L2 bound of the f32 reference against HF's float32 forward.
const TOL: f64 = 1e-4;
const L: usize = 16;

fn expected() -> SafeTensors {
    SafeTensors::open(&fixture("clip/expected.safetensors")).unwrap()
}

fn exp_f32(name: &str) -> Vec<f32> {
    expected().read_f32(name).unwrap().1
}

/// An I64 tensor of the expected file (token ids) as u32, with its shape.
fn exp_ids(name: &str) -> (Vec<usize>, Vec<u32>) {
    let st = expected();
    let info = st.info(name).unwrap().clone();
    assert_eq!(info.dtype.name(), "I64", "{name}");
    let ids =
        st.bytes(name).unwrap().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    (info.shape, ids)
}

fn meta_prompts(key: &str) -> Vec<String> {
    serde_json::from_str(&expected().metadata()[key]).unwrap()
}

fn meta_u32(key: &str) -> u32 {
    expected().metadata()[key].parse().unwrap()
}

fn tiny_config() -> ClipConfig {
    ClipConfig { vocab: 674, hidden: 12, heads: 3, mlp: 20, layers: 2, max_pos: 16, eps: 1e-5, eos_id: 673 }
}

/// Tokenizes every prompt of the fixture and compares with HF's ids, row by row.
fn check_tokenizer(tok: &ClipTokenizer, what: &str) {
    let (shape, want) = exp_ids("ids");
    assert_eq!(shape, [2, L]);
    for (i, p) in meta_prompts("prompts").iter().enumerate() {
        assert_eq!(tok.encode(p, L).unwrap(), want[i * L..(i + 1) * L], "{what}: prompt {p:?}");
    }
    let (shape, want) = exp_ids("tok_ids");
    let n = shape[1];
    assert_eq!(n, 77);
    let prompts = meta_prompts("tok_prompts");
    assert_eq!(prompts.len(), shape[0]);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(tok.encode(p, n).unwrap(), want[i * n..(i + 1) * n], "{what}: prompt {p:?}");
    }
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (meta_u32("bos_id"), meta_u32("eos_id"), meta_u32("pad_id"))
    );
    assert_eq!(tok.vocab_size(), tiny_config().vocab);
}

#[test]
fn tokenizer_from_vocab_and_merges_matches_hf() {
    let dir = fixture("pipeline/tokenizer");
    check_tokenizer(&ClipTokenizer::open(&dir).unwrap(), "tokenizer/ folder");
    check_tokenizer(&ClipTokenizer::open(&dir.join("vocab.json")).unwrap(), "vocab.json");
}

#[test]
fn tokenizer_from_tokenizer_json_matches_hf() {
    check_tokenizer(&ClipTokenizer::open(&fixture("clip/tokenizer.json")).unwrap(), "tokenizer.json");
    check_tokenizer(&ClipTokenizer::open(&fixture("clip")).unwrap(), "folder with tokenizer.json");
}

#[test]
fn tokenizer_framing_truncation_and_padding() {
    let tok = ClipTokenizer::open(&fixture("pipeline/tokenizer")).unwrap();
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    // <|endoftext|> has the largest id, as in openai's vocab (HF's legacy argmax pooling needs it).
    assert_eq!(eos as usize, tok.vocab_size() - 1);
    assert_eq!(tok.encode("", 4).unwrap(), [bos, eos, eos, eos]);
    assert_eq!(tok.encode("a photo of a cat", 2).unwrap(), [bos, eos]);
    let long = tok.encode(&"cat ".repeat(100), 77).unwrap();
    assert_eq!((long.len(), long[0], long[76]), (77, bos, eos));
    assert!(long[1..76].iter().all(|&t| t != eos));
    assert!(err_string(tok.encode("x", 1)).contains("max_len"));
    // The pad token is read from the config: a tokenizer_config.json that pads with `!` (as
    // SD 2's CLIP tokenizer does) must be obeyed.
    let dir = tmpdir("clip-pad");
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json"] {
        std::fs::copy(fixture("pipeline/tokenizer").join(f), dir.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(fixture("pipeline/tokenizer/tokenizer_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["pad_token"] = "!".into();
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok2 = ClipTokenizer::open(&dir).unwrap();
    assert_eq!(tok2.pad_id(), 0, "`!` is byte symbol 0");
    assert_eq!(tok2.encode("", 4).unwrap(), [bos, eos, 0, 0]);
    assert!(err_string(ClipTokenizer::open(&tmpdir("clip-empty"))).contains("vocab.json"));
}

fn check_encoder(model: &ClipTextModel, hidden_key: &str, pooled_key: &str, what: &str) {
    let (_, ids) = exp_ids("ids");
    let (hidden, pooled) = model.encode(&ids, 2, L).unwrap();
    let (eh, ep) = (exp_f32(hidden_key), exp_f32(pooled_key));
    let (rh, rp) = (rel_l2(&hidden, &eh), rel_l2(&pooled, &ep));
    println!("{what}: rel L2 hidden {rh:.3e}, pooled {rp:.3e}");
    assert!(rh < TOL, "{what}: hidden rel L2 {rh:e}");
    assert!(rp < TOL, "{what}: pooled rel L2 {rp:e}");
}

/// The f16 file's reference: its own outputs where f16 rounding changed a weight, else the bf16 ones.
fn f16_keys() -> (&'static str, &'static str) {
    if expected().info("hidden_f16").is_some() {
        ("hidden_f16", "pooled_f16")
    } else {
        ("hidden", "pooled")
    }
}

#[test]
fn text_encoder_folder_matches_hf() {
    let model = ClipTextModel::open(&fixture("pipeline/text_encoder")).unwrap();
    assert_eq!(model.cfg, tiny_config());
    check_encoder(&model, "hidden", "pooled", "text_encoder/ (bf16)");
}

#[test]
fn single_file_matches_hf_and_ignores_projection() {
    let path = fixture("clip/clip-single.safetensors");
    let st = SafeTensors::open(&path).unwrap();
    assert!(st.info("text_projection.weight").is_some() && st.info("logit_scale").is_some());
    let model = ClipTextModel::open(&path).unwrap();
    assert_eq!(model.cfg, tiny_config());
    let (h, p) = f16_keys();
    check_encoder(&model, h, p, "clip-single (f16)");
}

#[test]
fn tokenizer_then_encoder_matches_hf_pooled() {
    let tok = ClipTokenizer::open(&fixture("pipeline/tokenizer")).unwrap();
    let model = ClipTextModel::open(&fixture("pipeline/text_encoder")).unwrap();
    assert_eq!(tok.eos_id(), model.cfg.eos_id);
    let ids: Vec<u32> = meta_prompts("prompts").iter().flat_map(|p| tok.encode(p, L).unwrap()).collect();
    let (_, pooled) = model.encode(&ids, 2, L).unwrap();
    assert!(rel_l2(&pooled, &exp_f32("pooled")) < TOL);
}

#[test]
fn pooled_is_hidden_at_first_eos_and_attention_is_causal() {
    let model = ClipTextModel::open(&fixture("pipeline/text_encoder")).unwrap();
    let (c, eos) = (model.cfg.hidden, model.cfg.eos_id);
    let (_, ids) = exp_ids("ids");
    let (hidden, pooled) = model.encode(&ids, 2, L).unwrap();
    for b in 0..2 {
        let t = ids[b * L..(b + 1) * L].iter().position(|&x| x == eos).unwrap();
        assert_eq!(pooled[b * c..(b + 1) * c], hidden[(b * L + t) * c..(b * L + t + 1) * c]);
    }
    // An EOS in the middle (a prompt containing "<|endoftext|>") is the one pooled, not the
    // last, and tokens after position t cannot change hidden[..=t] (causal mask).
    let a = [672, 320, 572, eos, 320, 631, eos, eos];
    let b = [672, 320, 572, eos, 5, 6, 7, eos];
    let (ha, pa) = model.encode(&a, 1, 8).unwrap();
    let (hb, pb) = model.encode(&b, 1, 8).unwrap();
    assert_eq!(pa, ha[3 * c..4 * c]);
    assert_eq!(pa, pb);
    assert_eq!(ha[..4 * c], hb[..4 * c]);
    assert_ne!(ha[4 * c..], hb[4 * c..]);
}

#[test]
fn transformers5_unprefixed_keys_load_the_same() {
    // transformers >= 5 saves CLIPTextModel without the `text_model.` prefix.
    let dir = tmpdir("clip-noprefix");
    let dst = dir.join("clip.safetensors");
    rewrite(&fixture("clip/clip-single.safetensors"), &dst, |t| {
        t.retain(|(n, ..)| n.starts_with("text_model."));
        for (n, ..) in t.iter_mut() {
            *n = n.trim_start_matches("text_model.").to_string();
        }
    });
    let model = ClipTextModel::open(&dst).unwrap();
    let (h, p) = f16_keys();
    check_encoder(&model, h, p, "unprefixed keys");
}

/// Nearest e4m3fn code of v (ties to the lower code; only used to make test data).
fn to_e4m3(v: f32) -> u8 {
    (0u8..=255)
        .filter(|&b| f8e4m3_to_f32(b).is_finite())
        .min_by(|&a, &b| (f8e4m3_to_f32(a) - v).abs().total_cmp(&(f8e4m3_to_f32(b) - v).abs()))
        .unwrap()
}

/// Writes a safetensors file whose tensors are all F8_E4M3 (write_tensors cannot encode FP8).
fn write_f8(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)], meta: &BTreeMap<String, String>) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(meta).unwrap());
    let mut off = 0;
    for (n, s, d) in tensors {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F8_E4M3", "shape": s, "data_offsets": [off, off + d.len()]}),
        );
        off += d.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut buf = (h.len() as u64).to_le_bytes().to_vec();
    buf.extend(h);
    tensors.iter().for_each(|(_, _, d)| buf.extend(d));
    std::fs::write(path, buf).unwrap();
}

#[test]
fn fp8_storage_decodes_like_f32() {
    // The same weights stored as F8_E4M3 and (decoded) as F32 must give identical outputs.
    let dir = tmpdir("clip-fp8");
    let (mut t, meta) = read_all(&fixture("clip/clip-single.safetensors"));
    t.retain(|(n, ..)| n.starts_with("text_model."));
    let f8: Vec<(String, Vec<usize>, Vec<u8>)> =
        t.iter().map(|(n, s, _, v)| (n.clone(), s.clone(), v.iter().map(|&x| to_e4m3(x)).collect())).collect();
    write_f8(&dir.join("f8.safetensors"), &f8, &meta);
    for ((_, _, d, v), (_, _, q)) in t.iter_mut().zip(&f8) {
        *d = Dtype::F32;
        *v = q.iter().map(|&b| f8e4m3_to_f32(b)).collect();
    }
    write_all(&dir.join("f32.safetensors"), &t, &meta);
    let m8 = ClipTextModel::open(&dir.join("f8.safetensors")).unwrap();
    let m32 = ClipTextModel::open(&dir.join("f32.safetensors")).unwrap();
    let (_, ids) = exp_ids("ids");
    let (h8, p8) = m8.encode(&ids, 2, L).unwrap();
    let (h32, p32) = m32.encode(&ids, 2, L).unwrap();
    assert_eq!((h8, p8), (h32, p32));
}

#[test]
fn config_inferred_from_shapes() {
    // No config anywhere: hidden 64 → 1 head (CLIP's head width 64), eos = vocab − 1, and the
    // keys a CLIP checkpoint carries beside the text tower are ignored.
    let (vocab, c, m, max_pos) = (10, 64, 8, 5);
    let mut rng = Rng::new(7);
    let mut t: common::Tensors = Vec::new();
    let mut add = |n: &str, s: Vec<usize>| {
        let v = rng.normal_vec(s.iter().product(), 0.2);
        t.push((n.to_string(), s, Dtype::BF16, v));
    };
    add("text_model.embeddings.token_embedding.weight", vec![vocab, c]);
    add("text_model.embeddings.position_embedding.weight", vec![max_pos, c]);
    let p = "text_model.encoder.layers.0.";
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        add(&format!("{p}self_attn.{proj}.weight"), vec![c, c]);
        add(&format!("{p}self_attn.{proj}.bias"), vec![c]);
    }
    for n in ["layer_norm1", "layer_norm2"] {
        add(&format!("{p}{n}.weight"), vec![c]);
        add(&format!("{p}{n}.bias"), vec![c]);
    }
    add(&format!("{p}mlp.fc1.weight"), vec![m, c]);
    add(&format!("{p}mlp.fc1.bias"), vec![m]);
    add(&format!("{p}mlp.fc2.weight"), vec![c, m]);
    add(&format!("{p}mlp.fc2.bias"), vec![c]);
    add("text_model.final_layer_norm.weight", vec![c]);
    add("text_model.final_layer_norm.bias", vec![c]);
    add("text_projection.weight", vec![c, c]);
    add("logit_scale", vec![]);
    add("text_model.embeddings.position_ids", vec![1, max_pos]);
    add("vision_model.post_layernorm.weight", vec![c]);
    let path = tmpdir("clip-infer").join("clip.safetensors");
    write_all(&path, &t, &BTreeMap::new());
    let model = ClipTextModel::open(&path).unwrap();
    let want = ClipConfig { vocab, hidden: c, heads: 1, mlp: m, layers: 1, max_pos, eps: 1e-5, eos_id: 9 };
    assert_eq!(model.cfg, want);
    let (h, p) = model.encode(&[1, 2, 9, 9, 3], 1, 5).unwrap();
    assert_eq!((h.len(), p), (5 * c, h[2 * c..3 * c].to_vec()));

    // The tiny single file without its metadata config: hidden 12 gives no head count.
    let dst = tmpdir("clip-nometa").join("clip.safetensors");
    let (t, _) = read_all(&fixture("clip/clip-single.safetensors"));
    write_all(&dst, &t, &BTreeMap::new());
    let e = err_string(ClipTextModel::open(&dst));
    assert!(e.contains("config.json") && e.contains("head"), "{e}");
}

/// A copy of the text_encoder/ folder whose weights are transformed by `f`.
fn broken_folder(tag: &str, f: impl FnOnce(&mut common::Tensors)) -> std::path::PathBuf {
    let dir = tmpdir(tag);
    std::fs::copy(fixture("pipeline/text_encoder/config.json"), dir.join("config.json")).unwrap();
    rewrite(&fixture("pipeline/text_encoder/model.safetensors"), &dir.join("model.safetensors"), f);
    dir
}

#[test]
fn bad_checkpoints_name_file_and_tensor() {
    let name = "text_model.encoder.layers.1.mlp.fc2.bias";
    let dir = broken_folder("clip-missing", |t| t.retain(|(n, ..)| n != name));
    let e = err_string(ClipTextModel::open(&dir));
    assert!(e.contains(name) && e.contains("model.safetensors") && e.contains("missing"), "{e}");

    let name = "text_model.encoder.layers.0.mlp.fc1.weight";
    let dir = broken_folder("clip-shape", |t| {
        t.iter_mut().find(|(n, ..)| n == name).unwrap().1 = vec![12, 20];
    });
    let e = err_string(ClipTextModel::open(&dir));
    assert!(e.contains(name) && e.contains("[12, 20]") && e.contains("[20, 12]"), "{e}");

    let name = "text_model.encoder.layers.0.self_attn.extra.weight";
    let dir = broken_folder("clip-unexpected", |t| t.push((name.into(), vec![3], Dtype::F32, vec![0.0; 3])));
    let e = err_string(ClipTextModel::open(&dir));
    assert!(e.contains(name) && e.contains("unexpected"), "{e}");

    // A config that disagrees with the file (3 layers) names the first absent layer's tensor.
    let dir = broken_folder("clip-config", |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = err_string(ClipTextModel::open(&dir));
    assert!(e.contains("text_model.encoder.layers.2."), "{e}");

    let e = err_string(ClipTextModel::open(&tmpdir("clip-nofile")));
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_ids_are_errors() {
    let model = ClipTextModel::open(&fixture("pipeline/text_encoder")).unwrap();
    let eos = model.cfg.eos_id;
    assert!(err_string(model.encode(&[672, 674, eos], 1, 3)).contains("674"));
    assert!(err_string(model.encode(&[eos; 17], 1, 17)).contains("17"));
    assert!(err_string(model.encode(&[672, 5, 6], 1, 3)).contains("EOS"));
    assert!(err_string(model.encode(&[672, eos], 2, 2)).contains("ids"));
}

/// CLIP-L-sized random weights (bf16, ~250 MB in the temp folder): open and encode timings.
/// `cargo test --test clip -- --ignored --nocapture clip_l_sized`
#[test]
#[ignore]
fn clip_l_sized_timing() {
    let cfg = ClipConfig::clip_l();
    let (c, m) = (cfg.hidden, cfg.mlp);
    let mut shapes = vec![
        ("text_model.embeddings.token_embedding.weight".to_string(), vec![cfg.vocab, c]),
        ("text_model.embeddings.position_embedding.weight".to_string(), vec![cfg.max_pos, c]),
        ("text_model.final_layer_norm.weight".to_string(), vec![c]),
        ("text_model.final_layer_norm.bias".to_string(), vec![c]),
    ];
    for i in 0..cfg.layers {
        let p = format!("text_model.encoder.layers.{i}.");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((format!("{p}self_attn.{proj}.weight"), vec![c, c]));
            shapes.push((format!("{p}self_attn.{proj}.bias"), vec![c]));
        }
        for n in ["layer_norm1", "layer_norm2"] {
            shapes.push((format!("{p}{n}.weight"), vec![c]));
            shapes.push((format!("{p}{n}.bias"), vec![c]));
        }
        shapes.push((format!("{p}mlp.fc1.weight"), vec![m, c]));
        shapes.push((format!("{p}mlp.fc1.bias"), vec![m]));
        shapes.push((format!("{p}mlp.fc2.weight"), vec![c, m]));
        shapes.push((format!("{p}mlp.fc2.bias"), vec![c]));
    }
    let mut rng = Rng::new(3);
    let t: common::Tensors = shapes
        .into_iter()
        .map(|(n, s)| {
            let v = rng.normal_vec(s.iter().product(), 0.02);
            (n, s, Dtype::BF16, v)
        })
        .collect();
    let path = tmpdir("clip-l-timing").join("clip_l.safetensors");
    write_all(&path, &t, &BTreeMap::new());
    drop(t);
    let t0 = std::time::Instant::now();
    let model = ClipTextModel::open(&path).unwrap();
    let t_open = t0.elapsed();
    assert_eq!(model.cfg, cfg);
    let mut ids = vec![cfg.eos_id; 77];
    ids[0] = 49406;
    (1..20).for_each(|i| ids[i] = 1000 + i as u32);
    let t0 = std::time::Instant::now();
    let (_, pooled) = model.encode(&ids, 1, 77).unwrap();
    let t_enc = t0.elapsed();
    assert!(pooled.iter().all(|v| v.is_finite()));
    println!("CLIP-L sized: open {t_open:?}, encode b=1 l=77 {t_enc:?}");
    let _ = std::fs::remove_file(&path);
}
