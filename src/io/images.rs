//! Image + caption datasets as kohya lays them out: `name.png|jpg|jpeg|webp` with `name.txt`
//! beside it. Aspect-ratio buckets per target area; resize to cover the bucket, centre crop;
//! pixels to [-1, 1] CHW f32 for the VAE.

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use std::path::{Path, PathBuf};

pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// One image found in a dataset folder, with its caption (empty when there is no .txt).
#[derive(Clone, Debug)]
pub struct ImageEntry {
    pub path: PathBuf,
    pub caption: String,
}

/// Lists the images of `dir` (sorted by name) with their captions.
pub fn scan(dir: &Path) -> Result<Vec<ImageEntry>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read image folder {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if !EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let txt = p.with_extension("txt");
        let caption = if txt.exists() {
            std::fs::read_to_string(&txt)
                .with_context(|| format!("cannot read caption {}", txt.display()))?
                .trim()
                .to_string()
        } else {
            String::new()
        };
        out.push(ImageEntry { path: p, caption });
    }
    Ok(out)
}

/// Bucket sizes (width, height) for a target area side² : multiples of `step`, area ≤ side²,
/// each side between `step` and 2·side.
pub fn buckets(side: usize, step: usize) -> Vec<(usize, usize)> {
    let area = side * side;
    let mut v = Vec::new();
    let mut w = step;
    while w <= 2 * side {
        let h = (area / w / step) * step;
        if h >= step && h <= 2 * side {
            v.push((w, h));
        }
        w += step;
    }
    v
}

/// The bucket whose aspect ratio is closest to w/h (in log space), across every target area;
/// ties go to the larger area.
pub fn pick_bucket(w: usize, h: usize, sides: &[usize], step: usize) -> (usize, usize) {
    let ar = (w as f64 / h as f64).ln();
    let mut best = (step, step);
    let mut best_key = (f64::INFINITY, 0usize);
    for &s in sides {
        for (bw, bh) in buckets(s, step) {
            let d = ((bw as f64 / bh as f64).ln() - ar).abs();
            let key = (d, usize::MAX - bw * bh);
            if key.0 < best_key.0 - 1e-12 || ((key.0 - best_key.0).abs() <= 1e-12 && key.1 < best_key.1) {
                best_key = key;
                best = (bw, bh);
            }
        }
    }
    best
}

/// Decodes an image, resizes it to cover (bw, bh) and centre-crops: [3, bh, bw] in [-1, 1].
pub fn load_bucketed(path: &Path, bw: usize, bh: usize, flip: bool) -> Result<Vec<f32>> {
    let img = image::open(path).with_context(|| format!("cannot decode image {}", path.display()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("{}: empty image", path.display());
    }
    let scale = (bw as f64 / w as f64).max(bh as f64 / h as f64);
    let (rw, rh) =
        (((w as f64 * scale).round() as u32).max(bw as u32), ((h as f64 * scale).round() as u32).max(bh as u32));
    let resized = image::imageops::resize(&img, rw, rh, FilterType::Lanczos3);
    let (x0, y0) = ((rw as usize - bw) / 2, (rh as usize - bh) / 2);
    let mut out = vec![0f32; 3 * bw * bh];
    for y in 0..bh {
        for x in 0..bw {
            let sx = if flip { x0 + bw - 1 - x } else { x0 + x };
            let p = resized.get_pixel(sx as u32, (y0 + y) as u32);
            for c in 0..3 {
                out[(c * bh + y) * bw + x] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(out)
}

/// Image size without decoding the pixels.
pub fn dimensions(path: &Path) -> Result<(usize, usize)> {
    let (w, h) = image::image_dimensions(path).with_context(|| format!("cannot read image {}", path.display()))?;
    Ok((w as usize, h as usize))
}

/// Writes an image [3, h, w] in [-1, 1] as PNG (clamped), atomically.
pub fn write_png(path: &Path, img: &[f32], h: usize, w: usize) -> Result<()> {
    let mut rgb = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = img[(c * h + y) * w + x];
                rgb[(y * w + x) * 3 + c] = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    write_rgb8_png(path, rgb, h, w)
}

/// Writes 8-bit RGB pixels, row-major [h, w, 3], as PNG, atomically: the one PNG writer of the
/// crate (sample and training images, latent previews), through the `image` crate that decoding
/// needs anyway.
pub fn write_rgb8_png(path: &Path, rgb: Vec<u8>, h: usize, w: usize) -> Result<()> {
    let n = rgb.len();
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .with_context(|| format!("{}: {n} bytes for a {w}×{h} RGB image", path.display()))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::io::safetensors::atomic_write(path, |w| std::io::Write::write_all(w, &bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_area_and_pick_closest_aspect() {
        for (w, h) in buckets(1024, 64) {
            assert!(w * h <= 1024 * 1024 && w % 64 == 0 && h % 64 == 0);
        }
        assert_eq!(pick_bucket(1000, 1000, &[1024], 64), (1024, 1024));
        let (w, h) = pick_bucket(1600, 900, &[1024], 64);
        assert!(w > h && (w as f64 / h as f64 - 16.0 / 9.0).abs() < 0.15, "{w}x{h}");
        // Two target areas: a square image goes to the larger square.
        assert_eq!(pick_bucket(300, 300, &[512, 1024], 64), (1024, 1024));
    }

    #[test]
    fn png_round_trip_crop_and_flip() {
        let dir = std::env::temp_dir().join(format!("fk-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (h, w) = (4, 6);
        let img: Vec<f32> = (0..3 * h * w).map(|i| (i % 7) as f32 / 3.5 - 1.0).collect();
        let p = dir.join("a.png");
        write_png(&p, &img, h, w).unwrap();
        let back = load_bucketed(&p, w, h, false).unwrap();
        assert!(back.iter().zip(&img).all(|(a, b)| (a - b).abs() < 1.0 / 127.0));
        let fl = load_bucketed(&p, w, h, true).unwrap();
        assert!((fl[0] - back[w - 1]).abs() < 1e-6);
        std::fs::write(dir.join("bad.png"), b"not an image").unwrap();
        std::fs::write(dir.join("bad.txt"), "caption").unwrap();
        let e = format!("{:#}", load_bucketed(&dir.join("bad.png"), 4, 4, false).unwrap_err());
        assert!(e.contains("bad.png"), "{e}");
        let s = scan(&dir).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].caption, "caption");
    }

    #[test]
    fn rgb8_png_decodes_to_the_same_pixels() {
        let dir = std::env::temp_dir().join(format!("fk-rgb8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (h, w) = (5, 7);
        let rgb: Vec<u8> = (0..h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
        let p = dir.join("p.png");
        write_rgb8_png(&p, rgb.clone(), h, w).unwrap();
        let back = image::open(&p).unwrap().to_rgb8();
        assert_eq!((back.width(), back.height()), (w as u32, h as u32));
        assert_eq!(back.into_raw(), rgb);
        let e = format!("{:#}", write_rgb8_png(&dir.join("q.png"), vec![0; 3], h, w).unwrap_err());
        assert!(e.contains("q.png") && e.contains("7×5"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
