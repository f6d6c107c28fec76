//! A PNG preview of FLUX latents without the VAE: a fixed linear projection of the 16 latent
//! channels to RGB (the factors ComfyUI's latent_formats.py uses for its Flux previews).

use anyhow::Result;
use std::path::Path;

const RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// RGB in [-1, 1] (unclamped) of a latent [16, h, w]: [h·w, 3].
pub fn latent_rgb(lat: &[f32], h: usize, w: usize) -> Vec<[f32; 3]> {
    (0..h * w)
        .map(|p| {
            let mut rgb = RGB_BIAS;
            for (ch, f) in RGB_FACTORS.iter().enumerate() {
                let v = lat[ch * h * w + p];
                (0..3).for_each(|k| rgb[k] += v * f[k]);
            }
            rgb
        })
        .collect()
}

/// Writes latents [n][16, h, w] side by side as one PNG, each pixel scaled up `zoom`×.
pub fn write_preview(path: &Path, latents: &[Vec<f32>], h: usize, w: usize, zoom: usize) -> Result<()> {
    let (pw, ph) = (w * zoom * latents.len() + (latents.len().saturating_sub(1)) * zoom, h * zoom);
    let mut img = vec![255u8; pw * ph * 3];
    for (k, lat) in latents.iter().enumerate() {
        let rgb = latent_rgb(lat, h, w);
        let x0 = k * (w * zoom + zoom);
        for y in 0..ph {
            for x in 0..w * zoom {
                let px = rgb[(y / zoom) * w + x / zoom];
                let at = (y * pw + x0 + x) * 3;
                for c in 0..3 {
                    img[at + c] = (((px[c] + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
    crate::io::images::write_rgb8_png(path, img, ph, pw)
}
