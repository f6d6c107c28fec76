//! The autoencoder against diffusers: a tiny random `AutoencoderKL` with FLUX's structure, stored as a
//! diffusers folder (tests/fixtures/pipeline/vae/) and as BFL's `ae.safetensors` (tests/fixtures/vae/),
//! both bf16; references from tools/make_vae_fixtures.py (float32, CPU).

mod common;
use common::*;
use flux_kernels::io::safetensors::{Dtype, SafeTensors};
use flux_kernels::util::{rel_l2, Rng};
use flux_kernels::vae::{AutoEncoder, VaeConfig};
use std::path::{Path, PathBuf};

/// Golden tolerance: f32 on both sides, different summation orders.
const TOL: f64 = 1e-4;

fn bfl_path() -> PathBuf {
    fixture("vae/ae.safetensors")
}

fn diffusers_path() -> PathBuf {
    fixture("pipeline/vae")
}

fn expected(name: &str) -> (Vec<usize>, Vec<f32>) {
    SafeTensors::open(&fixture("vae/expected.safetensors")).unwrap().read_f32(name).unwrap()
}

fn tiny_config() -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        ch: 8,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        z_channels: 2,
        scale_factor: 0.3611,
        shift_factor: 0.1159,
        groups: 4,
    }
}

fn check_golden(ae: &AutoEncoder, what: &str) {
    assert_eq!(ae.cfg, tiny_config(), "{what}: config");
    assert_eq!(ae.factor(), 2);
    let (shape, img) = expected("img");
    assert_eq!(shape, [1, 3, 16, 16]);
    let (_, want) = expected("latent_mean");
    let got = ae.encode(&img, 1, 16, 16, None).unwrap();
    let err = rel_l2(&got, &want);
    eprintln!("{what}: encode (mean) rel L2 {err:.3e}");
    assert!(err < TOL, "{what}: encode rel L2 {err:e}");

    let (shape, z) = expected("z_in");
    assert_eq!(shape, [1, 2, 8, 8]);
    let (_, want) = expected("decoded");
    let got = ae.decode(&z, 1, 8, 8).unwrap();
    let err = rel_l2(&got, &want);
    eprintln!("{what}: decode rel L2 {err:.3e}");
    assert!(err < TOL, "{what}: decode rel L2 {err:e}");
}

#[test]
fn golden_diffusers_folder() {
    check_golden(&AutoEncoder::open(&diffusers_path()).unwrap(), "diffusers folder");
}

#[test]
fn golden_bfl_file() {
    check_golden(&AutoEncoder::open(&bfl_path()).unwrap(), "BFL ae.safetensors");
}

#[test]
fn repository_folder_with_vae_subfolder() {
    // `AutoEncoder::open(<FLUX repo>)` finds `vae/`.
    let ae = AutoEncoder::open(&fixture("pipeline")).unwrap();
    assert_eq!(ae.cfg, tiny_config());
}

#[test]
fn batch_of_two_is_two_images() {
    let ae = AutoEncoder::open(&bfl_path()).unwrap();
    let (_, img) = expected("img");
    let flipped: Vec<f32> = img.iter().map(|v| -v).collect();
    let both: Vec<f32> = img.iter().chain(&flipped).copied().collect();
    let lat = ae.encode(&both, 2, 16, 16, None).unwrap();
    let n = lat.len() / 2;
    assert!(rel_l2(&lat[..n], &ae.encode(&img, 1, 16, 16, None).unwrap()) < 1e-6);
    assert!(rel_l2(&lat[n..], &ae.encode(&flipped, 1, 16, 16, None).unwrap()) < 1e-6);
    let dec = ae.decode(&lat, 2, 8, 8).unwrap();
    let m = dec.len() / 2;
    assert!(rel_l2(&dec[m..], &ae.decode(&lat[n..], 1, 8, 8).unwrap()) < 1e-6);
}

#[test]
fn sampling_is_mean_plus_std_times_noise() {
    let ae = AutoEncoder::open(&diffusers_path()).unwrap();
    let (_, img) = expected("img");
    let (_, mean) = expected("latent_mean"); // scaled and shifted
    let (_, logvar) = expected("latent_logvar"); // raw, from diffusers
    let cfg = &ae.cfg;
    let got = ae.encode(&img, 1, 16, 16, Some(&mut Rng::new(42))).unwrap();
    // Recompute with the same noise stream: scale·(mean_raw + std·ε − shift) = mean + scale·std·ε.
    let mut rng = Rng::new(42);
    let want: Vec<f32> = mean
        .iter()
        .zip(&logvar)
        .map(|(&m, &lv)| m + cfg.scale_factor * (0.5 * lv.clamp(-30.0, 20.0)).exp() * rng.normal())
        .collect();
    let err = rel_l2(&got, &want);
    eprintln!("sampled latent vs mean + std·noise (diffusers logvar): rel L2 {err:.3e}");
    assert!(err < TOL, "{err:e}");
    // Statistically: (sample − mean)/(scale·std) over many draws is N(0, 1).
    let mut rng = Rng::new(7);
    let (mut s1, mut s2, mut n) = (0f64, 0f64, 0f64);
    for _ in 0..50 {
        let x = ae.encode(&img, 1, 16, 16, Some(&mut rng)).unwrap();
        for ((&x, &m), &lv) in x.iter().zip(&mean).zip(&logvar) {
            let e = ((x - m) / (cfg.scale_factor * (0.5 * lv).exp())) as f64;
            (s1, s2, n) = (s1 + e, s2 + e * e, n + 1.0);
        }
    }
    let (mu, var) = (s1 / n, s2 / n - (s1 / n).powi(2));
    assert!(mu.abs() < 0.05 && (var - 1.0).abs() < 0.05, "standardised noise mean {mu}, variance {var}");
}

#[test]
fn f32_and_f16_storage_load() {
    let dir = tmpdir("vae-dtype");
    for dt in [Dtype::F32, Dtype::F16] {
        let p = dir.join(format!("ae-{}.safetensors", dt.name()));
        rewrite(&bfl_path(), &p, |t| t.iter_mut().for_each(|e| e.2 = dt));
        let ae = AutoEncoder::open(&p).unwrap();
        let (_, img) = expected("img");
        let (_, want) = expected("latent_mean");
        let err = rel_l2(&ae.encode(&img, 1, 16, 16, None).unwrap(), &want);
        // bf16 values are exact in f32; f16 rounds some of them (a few 1e-4 relative).
        assert!(err < if dt == Dtype::F32 { TOL } else { 1e-2 }, "{}: {err:e}", dt.name());
    }
}

fn open_err(p: &Path) -> String {
    err_string(AutoEncoder::open(p))
}

/// Copies the diffusers folder with its weights transformed by `f`.
fn diffusers_variant(dir: &Path, name: &str, f: impl FnOnce(&mut Tensors)) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(diffusers_path().join("config.json"), d.join("config.json")).unwrap();
    rewrite(
        &diffusers_path().join("diffusion_pytorch_model.safetensors"),
        &d.join("diffusion_pytorch_model.safetensors"),
        f,
    );
    d
}

#[test]
fn bad_bfl_files_name_the_tensor() {
    let dir = tmpdir("vae-bad-bfl");
    let src = bfl_path();

    let p = dir.join("missing.safetensors");
    rewrite(&src, &p, |t| t.retain(|e| e.0 != "decoder.up.1.block.1.norm2.bias"));
    let e = open_err(&p);
    assert!(
        e.contains("missing") && e.contains("decoder.up.1.block.1.norm2.bias") && e.contains("missing.safetensors"),
        "{e}"
    );

    let p = dir.join("extra.safetensors");
    rewrite(&src, &p, |t| t.push(("encoder.quant_conv.weight".into(), vec![4, 4, 1, 1], Dtype::BF16, vec![0.0; 16])));
    let e = open_err(&p);
    assert!(
        e.contains("unexpected") && e.contains("encoder.quant_conv.weight") && e.contains("extra.safetensors"),
        "{e}"
    );

    let p = dir.join("shape.safetensors");
    rewrite(&src, &p, |t| {
        let e = t.iter_mut().find(|e| e.0 == "encoder.mid.attn_1.k.weight").unwrap();
        e.1 = vec![16, 8, 2, 1];
    });
    let e = open_err(&p);
    assert!(
        e.contains("encoder.mid.attn_1.k.weight") && e.contains("[16, 8, 2, 1]") && e.contains("shape.safetensors"),
        "{e}"
    );

    let p = dir.join("dtype.safetensors");
    rewrite(&src, &p, |t| t.iter_mut().find(|e| e.0 == "decoder.conv_out.bias").unwrap().2 = Dtype::F64);
    let e = open_err(&p);
    assert!(e.contains("decoder.conv_out.bias") && e.contains("F64"), "{e}");

    // The first tensor the config is read from.
    let p = dir.join("noconv.safetensors");
    rewrite(&src, &p, |t| t.retain(|e| e.0 != "encoder.conv_in.weight"));
    let e = open_err(&p);
    assert!(e.contains("encoder.conv_in.weight") && e.contains("noconv.safetensors"), "{e}");

    // Without the metadata the loader assumes FLUX's 32 groups, which 8 channels cannot hold.
    let p = dir.join("nometa.safetensors");
    let (t, _) = read_all(&src);
    write_all(&p, &t, &Default::default());
    let e = open_err(&p);
    assert!(e.contains("groups") && e.contains("norm_num_groups"), "{e}");

    // A diffusers weights file passed on its own.
    let e = open_err(&diffusers_path().join("diffusion_pytorch_model.safetensors"));
    assert!(e.contains("diffusers") && e.contains("config.json"), "{e}");

    let e = open_err(&dir.join("nothing.safetensors"));
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn bad_diffusers_folders_name_the_tensor() {
    let dir = tmpdir("vae-bad-dif");

    let d = diffusers_variant(&dir, "missing", |t| t.retain(|e| e.0 != "decoder.up_blocks.0.upsamplers.0.conv.bias"));
    let e = open_err(&d);
    assert!(e.contains("missing") && e.contains("decoder.up_blocks.0.upsamplers.0.conv.bias"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");

    let d = diffusers_variant(&dir, "shape", |t| {
        t.iter_mut().find(|e| e.0 == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight").unwrap().1 =
            vec![16, 8, 1, 1, 1];
    });
    let e = open_err(&d);
    assert!(
        e.contains("encoder.down_blocks.1.resnets.0.conv_shortcut.weight") && e.contains("[16, 8, 1, 1, 1]"),
        "{e}"
    );

    let d = diffusers_variant(&dir, "extra", |t| {
        t.push(("encoder.mid_block.attentions.0.query.weight".into(), vec![16, 16], Dtype::BF16, vec![0.0; 256]))
    });
    let e = open_err(&d);
    assert!(e.contains("unexpected") && e.contains("encoder.mid_block.attentions.0.query.weight"), "{e}");

    // The attention projections may be stored either way in either layout: [c, c] or [c, c, 1, 1].
    let d = diffusers_variant(&dir, "conv-attn", |t| {
        for e in t.iter_mut().filter(|e| e.0.contains("attentions.0.to_") && e.0.ends_with("weight")) {
            e.1 = vec![16, 16, 1, 1];
        }
    });
    check_golden(&AutoEncoder::open(&d).unwrap(), "diffusers folder, attention as 1×1 convs");

    let d = dir.join("quant");
    std::fs::create_dir_all(&d).unwrap();
    let cfg = std::fs::read_to_string(diffusers_path().join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("\"use_quant_conv\": false", "\"use_quant_conv\": true"))
        .unwrap();
    let e = open_err(&d);
    assert!(e.contains("use_quant_conv") && e.contains("config.json"), "{e}");

    let d = dir.join("noweights");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(diffusers_path().join("config.json"), d.join("config.json")).unwrap();
    let e = open_err(&d);
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn bad_buffers_are_errors() {
    let ae = AutoEncoder::open(&bfl_path()).unwrap();
    let e = err_string(ae.encode(&[0.0; 3 * 15 * 16], 1, 15, 16, None));
    assert!(e.contains("multiple of 2"), "{e}");
    let e = err_string(ae.encode(&[0.0; 10], 1, 16, 16, None));
    assert!(e.contains("[1, 3, 16, 16]"), "{e}");
    let e = err_string(ae.decode(&[0.0; 10], 1, 8, 8));
    assert!(e.contains("[1, 2, 8, 8]"), "{e}");
}

/// Random FLUX-sized weights: GroupNorm affine 1/0, convs N(0, 1/fan_in), biases 0.
fn random_flux(seed: u64) -> AutoEncoder {
    let rng = std::cell::RefCell::new(Rng::new(seed));
    let get = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm");
        Ok(match (is_norm, name.ends_with("weight")) {
            (true, true) => vec![1.0; n],
            (_, false) => vec![0.0; n],
            (false, true) => rng.borrow_mut().normal_vec(n, 1.0 / ((n / shape[0]) as f32).sqrt()),
        })
    };
    AutoEncoder::from_params(VaeConfig::flux(), &get).unwrap()
}

/// CPU time of the FLUX-sized autoencoder at 256² (random weights). Run with
/// `cargo test --release --test vae -- --ignored --nocapture flux_size_timing`.
#[test]
#[ignore]
fn flux_size_timing() {
    let ae = random_flux(3);
    assert_eq!(ae.factor(), 8);
    let mut rng = Rng::new(1);
    let (b, h, w) = (1, 256, 256);
    let img: Vec<f32> = (0..b * 3 * h * w).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect();
    let t = std::time::Instant::now();
    let z = ae.encode(&img, b, h, w, None).unwrap();
    let enc = t.elapsed();
    assert_eq!(z.len(), b * 16 * 32 * 32);
    let t = std::time::Instant::now();
    let out = ae.decode(&z, b, 32, 32).unwrap();
    let dec = t.elapsed();
    assert_eq!(out.len(), img.len());
    assert!(out.iter().all(|v| v.is_finite()));
    eprintln!(
        "FLUX autoencoder {h}×{w}, {} threads: encode {:.2} s, decode {:.2} s",
        rayon::current_num_threads(),
        enc.as_secs_f64(),
        dec.as_secs_f64()
    );
}
