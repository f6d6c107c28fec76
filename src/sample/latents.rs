//! Latents as files, in the layout diffusers' FluxPipeline uses before packing: one tensor
//! [B, c, h, w] (c = 16 for FLUX.1, h and w the image size over the VAE's factor, 8). `sample
//! --noise` reads the initial noise as `noise`; `--latents-out` writes the final latents as
//! `latents`. FluxPipeline draws `randn([B, 16, H/8, W/8])` and packs it with `_pack_latents`
//! (`model::packing::pack_latent` packs the same way); its `latents=` argument takes the packed
//! [B, (h/2)·(w/2), 64] form, and `output_type="latent"` returns that form too
//! (`_unpack_latents` gives this layout back).

use crate::io::safetensors::{write_tensors, Dtype, OutTensor, SafeTensors};
use anyhow::{bail, Result};
use std::path::Path;

/// The tensor name of the initial noise in a `--noise` file.
pub const NOISE_TENSOR: &str = "noise";
/// The tensor name of the final latents in `--latents-out` files (and the output folder's).
pub const LATENTS_TENSOR: &str = "latents";

/// Latents of several images: one [c, h, w] vector per image.
#[derive(Clone, Debug, PartialEq)]
pub struct Latents {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub images: Vec<Vec<f32>>,
}

/// Reads the `noise` tensor of `path`: [B, c, h, w] with `c` channels, h and w even and
/// non-zero, stored as F32, BF16 or F16 (diffusers draws in the pipeline's dtype), finite.
pub fn read_noise(path: &Path, c: usize) -> Result<Latents> {
    let st = SafeTensors::open(path)?;
    let p = path.display();
    let Some(info) = st.info(NOISE_TENSOR) else {
        let have: Vec<&str> = st.tensors().keys().map(String::as_str).collect();
        bail!(
            "{p}: no tensor `{NOISE_TENSOR}` (the initial noise [B, {c}, H/8, W/8] as diffusers' FluxPipeline \
             draws it before packing); the file holds [{}]",
            have.join(", ")
        );
    };
    if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        bail!("{p}: tensor `{NOISE_TENSOR}` has dtype {}; store it as F32, BF16 or F16", info.dtype.name());
    }
    let shape = info.shape.clone();
    let (b, h, w) = match shape.as_slice() {
        &[b, cc, h, w] if cc == c && b > 0 && h > 0 && w > 0 && h % 2 == 0 && w % 2 == 0 => (b, h, w),
        _ => bail!(
            "{p}: tensor `{NOISE_TENSOR}` has shape {shape:?}; expected [B, {c}, H/8, W/8] with B ≥ 1 and even, \
             non-zero H/8 and W/8 (the layout before diffusers' _pack_latents)"
        ),
    };
    let (_, v) = st.read_f32(NOISE_TENSOR)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("{p}: tensor `{NOISE_TENSOR}` has a non-finite value at flat index {i}");
    }
    let per = c * h * w;
    Ok(Latents { c, h, w, images: (0..b).map(|i| v[i * per..(i + 1) * per].to_vec()).collect() })
}

/// Writes `lat` as the f32 tensor `latents` [B, c, h, w], atomically.
pub fn write_latents(path: &Path, lat: &Latents) -> Result<()> {
    let flat = lat.images.concat();
    let shape = vec![lat.images.len(), lat.c, lat.h, lat.w];
    write_tensors(
        path,
        &[OutTensor { name: LATENTS_TENSOR, shape, data: &flat, dtype: Dtype::F32 }],
        &Default::default(),
    )
}
