//! `sample --noise FILE` / `--latents-out FILE` (issue 16 §5): the initial noise in diffusers'
//! FluxPipeline layout before packing ([B, 16, H/8, W/8]) drives the run, the final latents come
//! back in the same layout, and a bad noise file is refused naming the file and tensor with
//! nothing written. The packing itself is checked against a hand-worked `_pack_latents` example
//! in `model::packing`.

mod common;
use common::*;
use flux_kernels::adapters::formats::UnknownKeys;
use flux_kernels::cli::sample::{run, SampleArgs};
use flux_kernels::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use flux_kernels::sample::sampler::noise;
use flux_kernels::util::Rng;
use std::path::Path;

/// The built-in tiny model (16 latent channels, no VAE: 8 px per latent cell).
const C: usize = 16;

fn args<'a>(out: &'a Path, noise: Option<&'a Path>, latents_out: Option<&'a Path>, batch: usize) -> SampleArgs<'a> {
    SampleArgs {
        model: None,
        rope_axes: None,
        cond: None,
        out,
        width: None,
        height: None,
        steps: 3,
        guidance: 3.5,
        seed: 9,
        batch,
        noise,
        latents_out,
        sets: vec![vec![]],
        unknown: UnknownKeys::Error,
        prompts: vec![],
        components: Default::default(),
        t5_len: 512,
        device: "cpu",
        nsfw: None,
    }
}

fn write_noise(path: &Path, shape: &[usize], v: &[f32], dtype: Dtype) {
    write_tensors(path, &[OutTensor { name: "noise", shape: shape.to_vec(), data: v, dtype }], &Default::default())
        .unwrap();
}

fn latents(path: &Path) -> (Vec<usize>, Vec<f32>) {
    SafeTensors::open(path).unwrap().read_f32("latents").unwrap()
}

#[test]
fn the_same_noise_gives_the_same_latents_and_another_noise_others() {
    let dir = tmpdir("sample-noise");
    let (b, h, w) = (2, 4, 6);
    let z = Rng::new(3).normal_vec(b * C * h * w, 1.0);
    let nz = dir.join("noise.safetensors");
    write_noise(&nz, &[b, C, h, w], &z, Dtype::F32);
    let sample = |noise: &Path, tag: &str| {
        let lo = dir.join(format!("{tag}/final.safetensors"));
        run(&args(&dir.join(tag), Some(noise), Some(&lo), b)).unwrap();
        latents(&lo)
    };
    let (shape, first) = sample(&nz, "a");
    assert_eq!(shape, vec![b, C, h, w], "--latents-out is in the noise's layout");
    let (_, again) = sample(&nz, "b");
    assert!(first == again, "the same noise file gave different latents");
    // The output folder's latents file holds the same.
    assert!(latents(&dir.join("a/latents.safetensors")).1 == first);

    // Another noise: other latents. Only the second image's noise changes: only it moves.
    let mut z2 = z.clone();
    let per = C * h * w;
    z2[per..].iter_mut().for_each(|v| *v = -*v);
    let nz2 = dir.join("noise2.safetensors");
    write_noise(&nz2, &[b, C, h, w], &z2, Dtype::F32);
    let (_, other) = sample(&nz2, "c");
    assert!(other[..per] == first[..per], "image 0's noise did not change, nor may its latents");
    assert!(flux_kernels::util::rel_l2(&other[per..], &first[per..]) > 1e-2, "another noise, the same latents");

    // The noise the seed would draw, given as a file, reproduces the seeded run: the file is
    // read in the [B, c, h, w] layout and packed as the sampler packs its own draw.
    let drawn: Vec<f32> = noise(b, C, h, w, 9).concat();
    let nz3 = dir.join("seeded.safetensors");
    write_noise(&nz3, &[b, C, h, w], &drawn, Dtype::F32);
    let (_, from_file) = sample(&nz3, "d");
    let seeded = dir.join("e");
    let mut a = args(&seeded, None, None, b);
    (a.width, a.height) = (Some(w * 8), Some(h * 8));
    run(&a).unwrap();
    assert!(latents(&seeded.join("latents.safetensors")).1 == from_file, "--noise of the seed's draw differs");

    // BF16 noise (diffusers draws in the pipeline's dtype) is read as stored.
    let nz4 = dir.join("bf16.safetensors");
    write_noise(&nz4, &[b, C, h, w], &z, Dtype::BF16);
    let (_, bf) = sample(&nz4, "f");
    assert!(bf != first && flux_kernels::util::rel_l2(&bf, &first) < 1e-1);
}

#[test]
fn a_bad_noise_file_is_refused_naming_file_and_tensor_with_nothing_written() {
    let dir = tmpdir("sample-noise-bad");
    // (name, shape, dtype, --width, what the error says)
    let cases = [
        ("three-d", &[C, 4, 4][..], Dtype::F32, None, "shape [16, 4, 4]"),
        ("channels", &[1, 4, 4, 4], Dtype::F32, None, "expected [B, 16"),
        ("odd", &[1, C, 3, 4], Dtype::F32, None, "even"),
        ("batch", &[2, C, 4, 4], Dtype::F32, None, "has 2 images"),
        ("size", &[1, C, 4, 4], Dtype::F32, Some(64), "ask for 64×32"),
        ("dtype", &[1, C, 4, 4], Dtype::F64, None, "dtype F64"),
    ];
    for (name, shape, dtype, width, want) in cases {
        let p = dir.join(format!("{name}.safetensors"));
        let n: usize = shape.iter().product();
        write_noise(&p, shape, &vec![0.5; n], dtype);
        let (out, lo) = (dir.join(format!("out-{name}")), dir.join(format!("lat-{name}.safetensors")));
        let mut a = args(&out, Some(&p), Some(&lo), 1);
        a.width = width;
        let e = err_string(run(&a));
        assert!(e.contains(&p.display().to_string()) && e.contains("`noise`") && e.contains(want), "{name}: {e}");
        assert!(!out.exists() && !lo.exists(), "{name}: something was written");
    }
    // No `noise` tensor: the error says what the file holds.
    let p = dir.join("named.safetensors");
    write_tensors(
        &p,
        &[OutTensor { name: "latents", shape: vec![1, C, 4, 4], data: &[0.0; 256], dtype: Dtype::F32 }],
        &Default::default(),
    )
    .unwrap();
    let e = err_string(run(&args(&dir.join("out-named"), Some(&p), None, 1)));
    assert!(e.contains("named.safetensors") && e.contains("no tensor `noise`") && e.contains("[latents]"), "{e}");
    // Non-finite noise.
    let p = dir.join("nan.safetensors");
    let mut v = vec![0.5; C * 16];
    v[7] = f32::NAN;
    write_noise(&p, &[1, C, 4, 4], &v, Dtype::F32);
    let e = err_string(run(&args(&dir.join("out-nan"), Some(&p), None, 1)));
    assert!(e.contains("nan.safetensors") && e.contains("non-finite") && e.contains("index 7"), "{e}");
    assert!(!dir.join("out-named").exists() && !dir.join("out-nan").exists());
}
