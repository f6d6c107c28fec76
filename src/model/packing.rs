//! The FLUX input layout of latents: 2×2 patches packed into tokens, and their position ids.

/// Calls `f(token-major index, latent index)` for every element: token r·(w/2) + col, channel
/// ch·4 + ph·2 + pw (BFL `"c (h ph) (w pw) -> (h w) (c ph pw)"`).
fn for_each_packed(c: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
    let ww = w / 2;
    for r in 0..h / 2 {
        for col in 0..ww {
            for ch in 0..c {
                for ph in 0..2 {
                    for pw in 0..2 {
                        f((r * ww + col) * 4 * c + ch * 4 + ph * 2 + pw, (ch * h + 2 * r + ph) * w + 2 * col + pw);
                    }
                }
            }
        }
    }
}

/// Packs a latent [c, h, w] into tokens [(h/2)·(w/2), 4c].
pub fn pack_latent(lat: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(lat.len(), c * h * w);
    let mut out = vec![0f32; lat.len()];
    for_each_packed(c, h, w, |p, l| out[p] = lat[l]);
    out
}

/// The inverse of `pack_latent`.
pub fn unpack_latent(tokens: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(tokens.len(), c * h * w);
    let mut out = vec![0f32; tokens.len()];
    for_each_packed(c, h, w, |p, l| out[l] = tokens[p]);
    out
}

/// Image position ids (0, row, col) on the packed grid, row-major: [(h/2)·(w/2), 3].
pub fn img_ids(h: usize, w: usize) -> Vec<f32> {
    let ww = w / 2;
    (0..(h / 2) * ww).flat_map(|i| [0.0, (i / ww) as f32, (i % ww) as f32]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_layout_and_round_trip() {
        let (c, h, w) = (2, 4, 6);
        let lat: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let p = pack_latent(&lat, c, h, w);
        // Token 1 = packed row 0, col 1; channel 1·4 + 1·2 + 0 = latent[1, 1, 2].
        assert_eq!(p[8 + 6], lat[(h + 1) * w + 2]);
        assert_eq!(unpack_latent(&p, c, h, w), lat);
        assert_eq!(&img_ids(4, 6)[3 * 4..3 * 5], &[0.0, 1.0, 1.0]);
    }
}
