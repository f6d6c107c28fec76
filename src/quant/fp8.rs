//! f32 → fp8 e4m3fn, the encoder to the decoder `io::safetensors::f8e4m3_to_f32`.
//!
//! e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits, exponent 0 subnormal (steps of 2⁻⁹),
//! S.1111.111 NaN, no infinities, largest finite ±448.

use crate::io::safetensors::f8e4m3_to_f32;
use std::sync::OnceLock;

/// Largest finite e4m3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Round-to-nearest-even cast that saturates: anything beyond ±448 (infinities included) becomes
/// ±448, as kohya's `--fp8_base` weights are clamped before the cast; NaN becomes NaN (0x7f).
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0x7f | sign;
    }
    if a >= E4M3_MAX {
        return 0x7e | sign;
    }
    // Exponent of `a` as a normal f32; f32 subnormals are far below e4m3's range and land in
    // the subnormal branch below through the same comparison.
    let exp = ((a.to_bits() >> 23) as i32) - 127;
    if exp < -6 {
        // Subnormal: a multiple of 2⁻⁹. Scaling by 2⁹ is exact, so rounding the product rounds
        // `a`; a result of 8 is the smallest normal, whose code is 8 as well.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Normal: a·2^(3−exp) lies in [8, 16); its rounding is the 4-bit significand 1.mmm.
    let v = (a * 2f32.powi(3 - exp)).round_ties_even() as i32;
    let (e, v) = if v == 16 { (exp + 1, 8) } else { (exp, v) };
    // a < 448 keeps (e, v) at or below (8, 14) = 448 itself: no carry into the NaN code.
    sign | (((e + 7) as u8) << 3) | (v - 8) as u8
}

/// The 256 decoded values, so decoding a weight row is one lookup per byte.
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| f8e4m3_to_f32(i as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for c in 0..=255u8 {
            let v = f8e4m3_to_f32(c);
            if v.is_nan() {
                assert_eq!(f32_to_e4m3(v) & 0x7f, 0x7f, "NaN code {c:#04x}");
                continue;
            }
            assert_eq!(f32_to_e4m3(v), c, "code {c:#04x} = {v}");
        }
    }

    /// Between neighbouring codes the midpoint goes to the even code and anything off the
    /// midpoint by one f32 ulp goes to the nearer one.
    #[test]
    fn midpoints_round_to_even() {
        for c in 0..0x7eu8 {
            let (lo, hi) = (f8e4m3_to_f32(c), f8e4m3_to_f32(c + 1));
            let mid = (lo + hi) / 2.0;
            assert!(mid > lo && mid < hi);
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(f32_to_e4m3(mid), even, "midpoint {mid} of {c:#04x}");
            assert_eq!(f32_to_e4m3(-mid), even | 0x80, "midpoint -{mid}");
            assert_eq!(f32_to_e4m3(mid.next_down()), c, "just below {mid}");
            assert_eq!(f32_to_e4m3(mid.next_up()), c + 1, "just above {mid}");
        }
    }

    #[test]
    fn saturates_and_keeps_nan_and_signed_zero() {
        for v in [448.0f32, 448.5, 464.0, 479.9, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_e4m3(v), 0x7e, "{v}");
            assert_eq!(f32_to_e4m3(-v), 0xfe, "-{v}");
        }
        assert!(f8e4m3_to_f32(f32_to_e4m3(f32::NAN)).is_nan());
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        assert_eq!(f32_to_e4m3(0.0), 0x00);
        // Below half the smallest subnormal (2⁻¹⁰) rounds to zero; exactly half is a tie to 0.
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(2f32.powi(-10).next_up()), 0x01);
        assert_eq!(f32_to_e4m3(f32::from_bits(1)), 0x00);
    }

    /// Against a brute-force nearest search over the finite codes (ties to the even code).
    #[test]
    fn random_values_match_brute_force_nearest() {
        let mut rng = crate::util::Rng::new(5);
        let finite: Vec<u8> = (0..=255u8).filter(|&c| !f8e4m3_to_f32(c).is_nan()).collect();
        for i in 0..20000 {
            let x = (rng.normal() as f64 * 2f64.powi(i % 24 - 12)) as f32;
            let best = finite
                .iter()
                .copied()
                .filter(|&c| (c & 0x80 != 0) == x.is_sign_negative())
                .min_by(|&a, &b| {
                    let d = |c: u8| (f8e4m3_to_f32(c) as f64 - x as f64).abs();
                    let (da, db) = (d(a), d(b));
                    da.partial_cmp(&db).unwrap().then((a & 1).cmp(&(b & 1)))
                })
                .unwrap();
            let want = if x.abs() >= E4M3_MAX { 0x7e | (x.is_sign_negative() as u8) << 7 } else { best };
            assert_eq!(f32_to_e4m3(x), want, "{x}");
        }
        assert_eq!(e4m3_table()[0x38], 1.0);
    }
}
