//! Image + caption datasets as kohya lays them out: `name.png|jpg|jpeg|webp` with `name.txt`
//! beside it. Aspect-ratio buckets per target area; resize to cover the bucket, centre crop;
//! pixels to [-1, 1] CHW f32 for the VAE.

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use std::path::{Path, PathBuf};

pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// The most bytes of a caption file read. T5 keeps 512 tokens and CLIP 77; 64 KiB is over 100
/// bytes per T5 token, more than any real caption, and the text past it would be truncated away
/// by the tokenizers anyway (which see at most `text::MAX_PROMPT_BYTES`, the same size). A 50 MB
/// caption read and tokenised whole took 3.3 GiB.
pub const CAPTION_BYTES: usize = 64 * 1024;

/// The largest image side decoded: past any camera (a 100 MP sensor is about 12,000 px wide),
/// and 16384² RGB8 is 768 MiB. Checked on the header, before decoding.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// What the decoder may allocate for one image (the `image` crate's `Limits::max_alloc`).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// The most elongated image taken, long side over short side: twice the most elongated bucket
/// (4:1). Past it, the centre crop to a bucket would cut away more than half the picture, and
/// what is left no longer shows what the caption says. (A 1×65535 PNG of 339 bytes used to be
/// resized to cover a bucket: 12.9 GB.)
pub const MAX_ASPECT: f64 = 8.0;

/// One image found in a dataset folder, with its caption (empty when there is no .txt).
#[derive(Clone, Debug)]
pub struct ImageEntry {
    pub path: PathBuf,
    pub caption: String,
}

/// A dataset folder as found: the usable images, the entries skipped (each `path: why`), and
/// warnings about entries that are used (a caption read lossily or truncated).
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub entries: Vec<ImageEntry>,
    pub skipped: Vec<String>,
    pub warnings: Vec<String>,
}

fn is_image(p: &Path) -> bool {
    let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    EXTENSIONS.contains(&ext.as_str())
}

/// True when `dir` lists at least one file named like an image (nothing is opened).
pub fn has_images(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| rd.filter_map(|e| e.ok()).any(|e| is_image(&e.path())))
}

/// A caption: at most [`CAPTION_BYTES`] read, non-UTF-8 bytes replaced. Err: why it cannot be
/// used (a folder, a broken link, unreadable); Ok with a warning when it was cut or not UTF-8.
fn read_caption(txt: &Path) -> std::result::Result<(String, Option<String>), String> {
    use std::io::Read;
    let meta = std::fs::metadata(txt).map_err(|e| format!("caption {}: {e}", txt.display()))?;
    if !meta.is_file() {
        return Err(format!("caption {} is not a regular file", txt.display()));
    }
    let f = std::fs::File::open(txt).map_err(|e| format!("caption {}: {e}", txt.display()))?;
    let mut bytes = Vec::new();
    f.take(CAPTION_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(|e| format!("caption {}: {e}", txt.display()))?;
    let mut notes = Vec::new();
    if bytes.len() > CAPTION_BYTES {
        bytes.truncate(CAPTION_BYTES);
        // Drop a UTF-8 sequence cut in the middle rather than turning it into U+FFFD.
        if let Err(e) = std::str::from_utf8(&bytes) {
            if e.error_len().is_none() {
                bytes.truncate(e.valid_up_to());
            }
        }
        notes.push(format!("truncated to its first {CAPTION_BYTES} bytes ({} bytes on disk)", meta.len()));
    }
    let text = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            notes.push("not valid UTF-8, read with U+FFFD for the invalid bytes".into());
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }
    };
    let warning = (!notes.is_empty()).then(|| format!("caption {}: {}", txt.display(), notes.join("; ")));
    Ok((text.trim().to_string(), warning))
}

/// Lists the images of `dir` (sorted by name) with their captions. A bad entry (unreadable, a
/// broken link, not a file, a caption that cannot be read) is skipped and named in `skipped`;
/// the folder itself unreadable, or two images sharing a stem, is an error.
pub fn scan(dir: &Path) -> Result<Scan> {
    let mut out = Scan::default();
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read image folder {}", dir.display()))?;
    let mut paths = Vec::new();
    for e in rd {
        match e {
            Ok(e) => paths.push(e.path()),
            Err(err) => out.skipped.push(format!("{}: unreadable entry ({err})", dir.display())),
        }
    }
    paths.sort();
    // The caption and the cached sample are both named by the stem: two images sharing one
    // (x.png, x.jpg) would share a caption and overwrite each other's sample.
    let mut stems: std::collections::BTreeMap<std::ffi::OsString, Vec<&PathBuf>> = Default::default();
    for p in paths.iter().filter(|p| is_image(p)) {
        stems.entry(p.file_stem().unwrap_or_default().to_os_string()).or_default().push(p);
    }
    if let Some((stem, ps)) = stems.iter().find(|(_, ps)| ps.len() > 1) {
        let names: Vec<String> = ps.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{}: share the stem `{}`, so they would share the caption {}.txt and one cached sample; rename or \
             remove all but one",
            names.join(" and "),
            stem.to_string_lossy(),
            stem.to_string_lossy()
        );
    }
    for p in paths {
        if !is_image(&p) {
            continue;
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                out.skipped.push(format!("{}: not a regular file", p.display()));
                continue;
            }
            Err(e) => {
                let why = if std::fs::symlink_metadata(&p).is_ok() { "broken link" } else { "unreadable" };
                out.skipped.push(format!("{}: {why} ({e})", p.display()));
                continue;
            }
        }
        let txt = p.with_extension("txt");
        let caption = if std::fs::symlink_metadata(&txt).is_ok() {
            match read_caption(&txt) {
                Ok((c, warning)) => {
                    out.warnings.extend(warning);
                    c
                }
                Err(why) => {
                    out.skipped.push(format!("{}: {why}", p.display()));
                    continue;
                }
            }
        } else {
            String::new()
        };
        out.entries.push(ImageEntry { path: p, caption });
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

/// Decodes an image within the limits ([`MAX_IMAGE_SIDE`], [`MAX_DECODE_BYTES`], [`MAX_ASPECT`]),
/// crops it to the bucket's aspect, resizes that to cover (bw, bh) and centre-crops the last
/// pixel of rounding: [3, bh, bw] in [-1, 1]. Cropping before resizing keeps the resized image
/// the bucket's size whatever the source's aspect, so memory follows the source and the bucket.
pub fn load_bucketed(path: &Path, bw: usize, bh: usize, flip: bool) -> Result<Vec<f32>> {
    dimensions(path)?;
    let mut reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    reader.limits(decode_limits());
    let img = reader.decode().with_context(|| format!("cannot decode image {}", path.display()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || bw == 0 || bh == 0 {
        bail!("{}: empty image", path.display());
    }
    // The largest centred region of the bucket's aspect.
    let (cw, ch) = if w * bh > h * bw {
        (((h * bw) as f64 / bh as f64).round().max(1.0) as usize, h)
    } else {
        (w, ((w * bh) as f64 / bw as f64).round().max(1.0) as usize)
    };
    let (cw, ch) = (cw.min(w), ch.min(h));
    let cropped =
        image::imageops::crop_imm(&img, ((w - cw) / 2) as u32, ((h - ch) / 2) as u32, cw as u32, ch as u32).to_image();
    let scale = (bw as f64 / cw as f64).max(bh as f64 / ch as f64);
    let (rw, rh) =
        (((cw as f64 * scale).round() as u32).max(bw as u32), ((ch as f64 * scale).round() as u32).max(bh as u32));
    let resized = if (rw as usize, rh as usize) == (cw, ch) {
        cropped
    } else {
        image::imageops::resize(&cropped, rw, rh, FilterType::Lanczos3)
    };
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

fn decode_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_BYTES);
    l
}

/// Image size from the header, without decoding the pixels; an image past [`MAX_IMAGE_SIDE`] or
/// more elongated than [`MAX_ASPECT`] is an error naming the file.
pub fn dimensions(path: &Path) -> Result<(usize, usize)> {
    let (w, h) = image::image_dimensions(path).with_context(|| format!("cannot read image {}", path.display()))?;
    if w == 0 || h == 0 {
        bail!("{}: empty image ({w}×{h})", path.display());
    }
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        bail!("{}: {w}×{h} pixels; at most {MAX_IMAGE_SIDE} on a side are read (downscale it first)", path.display());
    }
    let aspect = w.max(h) as f64 / w.min(h) as f64;
    if aspect > MAX_ASPECT {
        bail!(
            "{}: {w}×{h} pixels is {aspect:.1}:1; at most {MAX_ASPECT}:1 is taken (the buckets reach 4:1, and a \
             centre crop would cut most of it away)",
            path.display()
        );
    }
    Ok((w as usize, h as usize))
}

/// 8-bit RGB [h, w, 3] of an image [3, h, w] in [-1, 1] (clamped, rounded): the pixels
/// `write_png` saves, what the NSFW check classifies and what `serve` encodes.
pub fn rgb8_from_unit(img: &[f32], h: usize, w: usize) -> Vec<u8> {
    assert_eq!(img.len(), 3 * h * w, "image: {} values for 3×{h}×{w}", img.len());
    let mut rgb = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = img[(c * h + y) * w + x];
                rgb[(y * w + x) * 3 + c] = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    rgb
}

/// Writes an image [3, h, w] in [-1, 1] as PNG (clamped), atomically.
pub fn write_png(path: &Path, img: &[f32], h: usize, w: usize) -> Result<()> {
    write_rgb8_png(path, rgb8_from_unit(img, h, w), h, w)
}

/// 8-bit RGB pixels, row-major [h, w, 3], as the bytes of a PNG file: the one PNG encoder of the
/// crate (sample and training images, previews, `serve`'s responses), through the `image` crate
/// that decoding needs anyway.
pub fn encode_rgb8_png(rgb: Vec<u8>, h: usize, w: usize) -> Result<Vec<u8>> {
    let n = rgb.len();
    let img = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .with_context(|| format!("{n} bytes for a {w}×{h} RGB image"))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// Writes 8-bit RGB pixels, row-major [h, w, 3], as PNG, atomically.
pub fn write_rgb8_png(path: &Path, rgb: Vec<u8>, h: usize, w: usize) -> Result<()> {
    let bytes = encode_rgb8_png(rgb, h, w).with_context(|| path.display().to_string())?;
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
        let s = scan(&dir).unwrap().entries;
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
