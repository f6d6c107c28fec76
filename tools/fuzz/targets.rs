//! The fuzz targets: each takes one input (the bytes of one file the program reads from users)
//! and runs it through the same library calls the commands make, returning the outcome. A target
//! must never panic, abort or allocate out of proportion to its input; an `Err` is a clean
//! rejection. Shared by the fuzzer (tools/fuzz/main.rs) and the regression test that replays the
//! crashes it found (tests/fuzz_regressions.rs), so both run exactly the same code.

use anyhow::{Context, Result};
use flux_kernels::adapters::formats::UnknownKeys;
use flux_kernels::model::config::FluxConfig;
use flux_kernels::model::weights::FluxWeights;
use std::path::{Path, PathBuf};

/// Where the fixtures live, whatever the working folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// How a target's input is shaped, which decides how it is mutated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shape {
    /// A safetensors file: mostly its JSON header is mutated and the length prefix kept right.
    Safetensors,
    /// Text (JSON, TOML): numbers and tokens are mutated as well as bytes.
    Text,
    /// Opaque bytes (protobuf, images).
    Bytes,
    /// An image and its caption: `caption bytes ++ 0xFF 0x00 FUZZ 0x00 ++ image bytes`.
    ImageCaption,
}

pub struct Target {
    pub name: &'static str,
    pub shape: Shape,
    /// Seed inputs (file contents).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input; `dir` is a scratch folder of this run.
    pub run: fn(&[u8], &Path) -> Result<()>,
    /// Tokens worth inserting (keys, dtypes, numbers that sit on boundaries).
    pub dict: &'static [&'static str],
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "safetensors",
        shape: Shape::Safetensors,
        seeds: seeds_safetensors,
        run: run_safetensors,
        dict: ST_DICT,
    },
    Target { name: "lora", shape: Shape::Safetensors, seeds: seeds_lora, run: run_lora, dict: LORA_DICT },
    Target { name: "model", shape: Shape::Safetensors, seeds: seeds_model, run: run_model, dict: MODEL_DICT },
    Target {
        name: "config-json",
        shape: Shape::Text,
        seeds: seeds_config_json,
        run: run_config_json,
        dict: CONFIG_DICT,
    },
    Target { name: "index-json", shape: Shape::Text, seeds: seeds_index_json, run: run_index_json, dict: INDEX_DICT },
    Target { name: "toml", shape: Shape::Text, seeds: seeds_toml, run: run_toml, dict: TOML_DICT },
    Target { name: "spiece", shape: Shape::Bytes, seeds: seeds_spiece, run: run_spiece, dict: &[] },
    Target {
        name: "tokenizer-json",
        shape: Shape::Text,
        seeds: seeds_tokenizer_json,
        run: run_tokenizer_json,
        dict: TOK_DICT,
    },
    Target { name: "images", shape: Shape::ImageCaption, seeds: seeds_images, run: run_images, dict: &[] },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "100000000",
    "1e8",
    "1e308",
    "-1e308",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1.5",
    "0.0",
];

pub fn numbers() -> &'static [&'static str] {
    NUMBERS
}

const ST_DICT: &[&str] = &[
    "\"dtype\":\"I8\"",
    "\"dtype\":\"U8\"",
    "\"dtype\":\"F64\"",
    "\"dtype\":\"BOOL\"",
    "\"dtype\":\"F8_E4M3\"",
    "\"shape\":[]",
    "\"shape\":[0]",
    "\"shape\":[4294967296,4294967296]",
    "\"data_offsets\":[0,0]",
    "\"__metadata__\":{}",
    "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}",
];
const LORA_DICT: &[&str] = &[
    "lora_A",
    "lora_B",
    "lora_down",
    "lora_up",
    ".alpha",
    "lora_unet_",
    "transformer.",
    "double_blocks.100000000.",
    "single_blocks.4294967296.",
    "diffusion_model.",
    "lora_te1_",
    "\"dtype\":\"I8\"",
    "\"shape\":[]",
    "\"lora_adapter_metadata\":\"{\\\"r\\\":4,\\\"lora_alpha\\\":1e30}\"",
];
const MODEL_DICT: &[&str] = &[
    "double_blocks.100000000.x",
    "single_blocks.99999.",
    "img_attn.qkv.weight",
    "\"shape\":[]",
    "\"shape\":[0,0]",
    "\"dtype\":\"I8\"",
    "\"dtype\":\"F8_E4M3\"",
    "guidance_in.",
    "model.diffusion_model.",
];
const CONFIG_DICT: &[&str] = &[
    "\"axes_dims_rope\": [18446744073709551615, 1, 1]",
    "\"num_layers\": 100000000",
    "\"num_single_layers\": 0",
    "\"attention_head_dim\": 0",
    "\"num_attention_heads\": 4294967296",
    "\"guidance_embeds\": true",
    "null",
    "\"in_channels\": 1",
    "\"patch_size\": 3",
];
const INDEX_DICT: &[&str] =
    &["\"/etc/passwd\"", "\"../../x.safetensors\"", "\"weight_map\": {}", "\"metadata\": null", ".safetensors\""];
const TOML_DICT: &[&str] = &[
    "rank = 100000000",
    "rank = 9223372036854775807",
    "alpha = nan",
    "lr = inf",
    "resolution = \"100000000000\"",
    "t5_max_len = 100000000",
    "rank_pattern = \"img_attn=100000000\"",
    "steps = 0",
    "batch_size = 0",
    "rope_axes = \"1,1,18446744073709551615\"",
    "targets = \"all\"",
    "dropout = 2.0",
];
const TOK_DICT: &[&str] =
    &["\"model\"", "\"vocab\"", "\"Unigram\"", "\"BPE\"", "\"merges\"", "\"unk_id\": 4294967295", "[\"</s>\", 0.0]"];

// ---- seeds -------------------------------------------------------------------------------------

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = fixtures().join(p);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fuzz seed {}: {e}", p.display()))
}

fn seeds_safetensors() -> Vec<Vec<u8>> {
    vec![read("lora-peft.safetensors"), read("tiny-inputs.safetensors"), read("t5/t5-single-fp8-scaled.safetensors")]
}

fn seeds_lora() -> Vec<Vec<u8>> {
    [
        "lora-peft.safetensors",
        "lora-kohya.safetensors",
        "lora-comfy.safetensors",
        "lora-onetrainer.safetensors",
        "lora-peft-nometa.safetensors",
    ]
    .iter()
    .map(read)
    .collect()
}

fn seeds_model() -> Vec<Vec<u8>> {
    vec![read("tiny-bfl.safetensors")]
}

fn seeds_config_json() -> Vec<Vec<u8>> {
    vec![read("tiny-diffusers/config.json")]
}

fn seeds_index_json() -> Vec<Vec<u8>> {
    vec![read("tiny-diffusers/diffusion_pytorch_model.safetensors.index.json")]
}

fn seeds_toml() -> Vec<Vec<u8>> {
    vec![
        b"steps = 3\nrank = 4\nalpha = 4.0\nlr = 1e-4\ntargets = \"attn\"\nresolution = \"64\"\nbatch_size = 1\n".to_vec(),
        b"rank = 2\nrank_pattern = \"img_attn.qkv=4\"\nalpha_pattern = \"img_attn.qkv=2\"\ndropout = 0.1\ninit = \"gaussian\"\n".to_vec(),
    ]
}

fn seeds_spiece() -> Vec<Vec<u8>> {
    vec![read("pipeline/tokenizer_2/spiece.model")]
}

fn seeds_tokenizer_json() -> Vec<Vec<u8>> {
    vec![read("t5/tokenizer.json"), read("clip/tokenizer.json")]
}

/// Separates the caption from the image in an `images` input.
pub const CAPTION_SEP: &[u8] = b"\xff\x00FUZZ\x00";

fn seeds_images() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let (w, h) = (24u32, 16u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x + y) * 5) as u8]));
    for fmt in [image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::WebP] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut bytes, fmt).expect("encode a seed image");
        let mut input = b"a photo of a red square, studio light".to_vec();
        input.extend_from_slice(CAPTION_SEP);
        input.extend_from_slice(bytes.get_ref());
        out.push(input);
    }
    out
}

// ---- runs --------------------------------------------------------------------------------------

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).with_context(|| format!("fuzz: cannot write {}", p.display()))?;
    Ok(p)
}

/// The reader itself: header, then every tensor converted to f32.
fn run_safetensors(input: &[u8], dir: &Path) -> Result<()> {
    let p = put(dir, "x.safetensors", input)?;
    let st = flux_kernels::io::safetensors::SafeTensors::open(&p)?;
    let names: Vec<String> = st.tensors().keys().cloned().collect();
    for n in names {
        st.read_f32(&n)?;
    }
    Ok(())
}

/// A LoRA file as `info --model tiny --lora FILE` reads it (key parsing, factor shapes, alpha).
fn run_lora(input: &[u8], dir: &Path) -> Result<()> {
    let p = put(dir, "lora.safetensors", input)?;
    let model = fixtures().join("tiny-bfl.safetensors");
    let lora = p.display().to_string();
    flux_kernels::cli::info::run(&model.display().to_string(), &[lora], Some(TINY_ROPE), UnknownKeys::Error)?;
    Ok(())
}

/// A BFL model file as `info` and `forward` open it: the config inferred from its keys and
/// shapes, then the weights assembled.
fn run_model(input: &[u8], dir: &Path) -> Result<()> {
    let p = put(dir, "model.safetensors", input)?;
    model_and_weights(&p, Some(TINY_ROPE))
}

/// The tiny BFL fixture's head dim (16) needs its RoPE split named; config.json says it itself.
const TINY_ROPE: &str = "4,6,6";

fn model_and_weights(p: &Path, rope: Option<&str>) -> Result<()> {
    flux_kernels::cli::info::run(&p.display().to_string(), &[], rope, UnknownKeys::Warn)?;
    let axes = rope.map(flux_kernels::model::config::parse_rope_axes).transpose()?;
    let ck = flux_kernels::model::checkpoint::Checkpoint::open(p, axes)?;
    FluxWeights::new(&ck.cfg, &|n| ck.param(n).cloned())?;
    Ok(())
}

/// A copy of the tiny diffusers folder with `file` replaced by the input.
fn diffusers_with(input: &[u8], dir: &Path, file: &str) -> Result<PathBuf> {
    let src = fixtures().join("tiny-diffusers");
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_name() == file {
            std::fs::write(&to, input)?;
        } else if !to.exists() {
            // Copied once per scratch folder (a link out of the folder is refused, rightly).
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(dst)
}

fn run_config_json(input: &[u8], dir: &Path) -> Result<()> {
    let m = diffusers_with(input, dir, "config.json")?;
    model_and_weights(&m, None)
}

fn run_index_json(input: &[u8], dir: &Path) -> Result<()> {
    let m = diffusers_with(input, dir, "diffusion_pytorch_model.safetensors.index.json")?;
    model_and_weights(&m, None)
}

/// A training config as `train --config` reads it, through to the adapters it would create on
/// the tiny model.
fn run_toml(input: &[u8], dir: &Path) -> Result<()> {
    let p = put(dir, "run.toml", input)?;
    let tc = flux_kernels::train::config::TrainConfig::from_toml(&p)?;
    tc.validate()?;
    flux_kernels::train::sources::parse_sides(&tc.resolution)?;
    if !tc.rope_axes.is_empty() {
        flux_kernels::model::config::parse_rope_axes(&tc.rope_axes)?;
    }
    let lc = flux_kernels::train::trainer::lora_config(&tc)?;
    let mut rng = flux_kernels::util::Rng::new(1);
    flux_kernels::train::trainer::init_adapters(&FluxConfig::tiny(), &lc, &mut rng, None)?;
    Ok(())
}

const PROMPT: &str = "a photo of a red square, studio light, 35mm";

fn run_spiece(input: &[u8], dir: &Path) -> Result<()> {
    let p = put(dir, "spiece.model", input)?;
    let tok = flux_kernels::text::t5::T5Tokenizer::open(&p)?;
    tok.encode(PROMPT, 16)?;
    Ok(())
}

/// tokenizer.json as the T5 and the CLIP tokenizer read it (a seed is one or the other, so the
/// input is accepted when either takes it).
fn run_tokenizer_json(input: &[u8], dir: &Path) -> Result<()> {
    let p = put(dir, "tokenizer.json", input)?;
    let t5 = flux_kernels::text::t5::T5Tokenizer::open(&p).and_then(|t| t.encode(PROMPT, 16));
    let clip = flux_kernels::text::clip::ClipTokenizer::open(&p).and_then(|t| t.encode(PROMPT, 16));
    match (t5, clip) {
        (Err(e), Err(_)) => Err(e),
        _ => Ok(()),
    }
}

/// An image + caption folder as `cache` reads it: scan, caption, bucket, decode and resize, and
/// the caption through both tokenizers.
fn run_images(input: &[u8], dir: &Path) -> Result<()> {
    let cut = input.windows(CAPTION_SEP.len()).position(|w| w == CAPTION_SEP);
    let (caption, image) = match cut {
        Some(i) => (&input[..i], &input[i + CAPTION_SEP.len()..]),
        None => (&[][..], input),
    };
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let ext = match image.first() {
        Some(0x89) => "png",
        Some(0xff) => "jpg",
        _ => "webp",
    };
    for e in ["png", "jpg", "webp"] {
        let _ = std::fs::remove_file(data.join(format!("x.{e}")));
    }
    put(&data, &format!("x.{ext}"), image)?;
    put(&data, "x.txt", caption)?;
    use flux_kernels::io::images::{dimensions, load_bucketed, pick_bucket, scan};
    use flux_kernels::text::{clip::ClipTokenizer, t5::T5Tokenizer};
    // The tokenizers are the fixtures' (opening them per input would be most of the run time).
    static TOKS: std::sync::OnceLock<(T5Tokenizer, ClipTokenizer)> = std::sync::OnceLock::new();
    let (t5, clip) = TOKS.get_or_init(|| {
        let t5 = T5Tokenizer::open(&fixtures().join("pipeline/tokenizer_2")).expect("fixture T5 tokenizer");
        let clip = ClipTokenizer::open(&fixtures().join("pipeline/tokenizer")).expect("fixture CLIP tokenizer");
        (t5, clip)
    });
    for e in scan(&data)?.entries {
        t5.encode(&e.caption, 32)?;
        clip.encode(&e.caption, 16)?;
        let (w, h) = dimensions(&e.path)?;
        let (bw, bh) = pick_bucket(w, h, &[64], 16);
        load_bucketed(&e.path, bw, bh, false)?;
    }
    Ok(())
}
