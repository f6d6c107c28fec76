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

    /// diffusers' `FluxPipeline._pack_latents`: `view(B, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3,
    /// 5).reshape(B, (H/2)·(W/2), 4C)`, worked by hand for C = 2, H = 2, W = 4 with latent[c, y, x]
    /// = 8c + 4y + x: token 0 is the 2×2 patch at columns 0–1, channel 0's four values then
    /// channel 1's, each patch row-major; token 1 the patch at columns 2–3.
    #[test]
    fn packs_as_diffusers_pack_latents() {
        let lat: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let want = [0., 1., 4., 5., 8., 9., 12., 13., 2., 3., 6., 7., 10., 11., 14., 15.];
        assert_eq!(pack_latent(&lat, 2, 2, 4), want);
        // Two patch rows: the token order is row-major over the (H/2, W/2) grid.
        let lat: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let want = [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.];
        assert_eq!(pack_latent(&lat, 1, 4, 4), want);
    }
}
