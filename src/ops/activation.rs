//! Pointwise activations: GELU with the tanh approximation (every FLUX MLP), exact GELU (the
//! erf form: the ViT of the NSFW check) and SiLU (the embedders and the input of every
//! modulation linear).

use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// Elements per parallel task of the pointwise ops.
const CHUNK: usize = 1 << 14;

/// e^x in f32 without a libm call, so that loops over it vectorise: 2^n·p(r) with
/// n = round(x·log₂e), r = x − n·ln 2 (in two parts) and Cephes' degree-6 polynomial for expf
/// (within 2 ulp of the exact value over the finite range; the test below checks 3 ulp against
/// f64). Below −87.3 (where f32 would go subnormal) it returns 0; NaN stays NaN. Measured reason:
/// libm's tanhf (through expm1f) took 21 % of a LoRA gradient's time on 2 cores (perf, issue 23);
/// tanh_f32 below costs 1.3 ns an element against libm's 11.4. For exp alone libm is as fast
/// (1.24 against 1.07 ns, and slower inside the softmax's f64 sum), so softmax and SiLU keep it.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer (|v| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_54, 88.722_83);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // 2^n for n in −126..=128, built from the integer in t's low mantissa bits (no float-to-int
    // conversion, so the loop vectorises); at 128 (x near the top of the range) in two halves.
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let v = y * s1 * s2;
    if x.is_nan() {
        x
    } else if x < -87.336_54 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else {
        v
    }
}

/// tanh(u) = 1 − 2/(e^{2u} + 1): within about 3·10⁻⁷ absolute of the exact value (the forms it
/// enters, ½(1 + T) and 1 − T², need absolute, not relative, accuracy).
#[inline(always)]
pub fn tanh_f32(u: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh_f32(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

/// erfc(z) for z ≥ 0 in f64: Numerical Recipes' Chebyshev fit `erfcc` (fractional error below
/// 1.2·10⁻⁷ everywhere, about one f32 ulp), so the exact GELU needs no libm erf (std has none).
fn erfc_nonneg(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * (-z * z + p).exp()
}

/// GELU as `nn.GELU()` / HF's `"gelu"` compute it: x·Φ(x) = ½x·erfc(−x/√2), not the tanh
/// approximation. Written with erfc so that the negative side, where the value is a small
/// fraction of x, keeps its relative accuracy.
#[inline]
pub fn gelu_erf(x: f32) -> f32 {
    let z = x as f64 * std::f64::consts::FRAC_1_SQRT_2;
    let v = if z >= 0.0 { x as f64 * (1.0 - 0.5 * erfc_nonneg(z)) } else { 0.5 * x as f64 * erfc_nonneg(-z) };
    v as f32
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// d/dx of gelu_tanh: ½(1+T) + ½x(1−T²)·√(2/π)(1 + 3·0.044715x²), T = tanh(u).
#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let t = tanh_f32(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x)
}

/// d/dx of silu: σ(x)·(1 + x·(1 − σ(x))).
#[inline(always)]
pub fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// out[i] = f(a[i]) over all cores (on one below 4 chunks: waking workers costs more).
pub fn map_par(out: &mut [f32], a: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    assert_eq!(out.len(), a.len());
    if out.len() < 4 * CHUNK {
        return out.iter_mut().zip(a).for_each(|(o, &x)| *o = f(x));
    }
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(o, a)| {
        o.iter_mut().zip(a).for_each(|(o, &x)| *o = f(x));
    });
}

/// out[i] = f(a[i], b[i]) over all cores.
pub fn zip_map_par(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    assert_eq!(out.len(), a.len());
    assert_eq!(out.len(), b.len());
    if out.len() < 4 * CHUNK {
        return out.iter_mut().zip(a).zip(b).for_each(|((o, &x), &y)| *o = f(x, y));
    }
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        o.iter_mut().zip(a).zip(b).for_each(|((o, &x), &y)| *o = f(x, y));
    });
}

/// dinp = dout ⊙ gelu'(inp). Overwrites dinp.
pub fn gelu_tanh_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    zip_map_par(dinp, inp, dout, |x, g| g * gelu_tanh_grad(x));
}

/// dinp = dout ⊙ silu'(inp). Overwrites dinp.
pub fn silu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    zip_map_par(dinp, inp, dout, |x, g| g * silu_grad(x));
}

pub fn gelu_tanh_forward(out: &mut [f32], inp: &[f32]) {
    map_par(out, inp, gelu_tanh);
}

pub fn silu_forward(out: &mut [f32], inp: &[f32]) {
    map_par(out, inp, silu);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{fd_check, Rng};

    #[test]
    fn backwards_match_finite_differences() {
        let mut rng = Rng::new(31);
        let x = rng.normal_vec(40, 2.0);
        let dy = rng.normal_vec(40, 1.0);
        let mut dx = vec![f32::NAN; 40];
        gelu_tanh_backward(&mut dx, &x, &dy);
        fd_check(&x, &dx, &dy, |x| x.iter().map(|&v| gelu_tanh(v)).collect(), 1e-3);
        silu_backward(&mut dx, &x, &dy);
        fd_check(&x, &dx, &dy, |x| x.iter().map(|&v| silu(v)).collect(), 1e-3);
    }

    #[test]
    fn exp_and_tanh_match_f64() {
        // Every 997th f32 bit pattern over the range that matters, plus the edges.
        let mut worst_ulp = 0f64;
        let mut worst_tanh = 0f64;
        let mut xs: Vec<f32> =
            (0..u32::MAX / 997).map(|i| f32::from_bits(i * 997)).filter(|x| x.abs() < 100.0).collect();
        xs.extend(xs.clone().iter().map(|x| -x));
        xs.extend([0.0, -0.0, 88.7, -87.3, 88.72283, -87.33654, 1e-30, -1e-30]);
        for &x in &xs {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if want < f32::MIN_POSITIVE as f64 {
                assert!(got == 0.0 || (got - want).abs() < 1e-37, "exp({x}) = {got}, want {want}");
            } else if want <= f32::MAX as f64 {
                let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits()) as f64;
                worst_ulp = worst_ulp.max(ulp);
            }
            worst_tanh = worst_tanh.max((tanh_f32(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst_ulp <= 3.0, "exp_f32: {worst_ulp} ulp");
        assert!(worst_tanh < 4e-7, "tanh_f32: {worst_tanh:e} absolute");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(tanh_f32(50.0), 1.0);
        assert_eq!(tanh_f32(-50.0), -1.0);
    }

    #[test]
    fn known_values() {
        // torch.nn.functional.gelu(x, approximate="tanh") and silu at a few points.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-2.0) - -0.045_402_3).abs() < 1e-5);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert_eq!(silu(0.0), 0.0);
        // torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64)) (exact erf form).
        for (x, want) in [
            (1.0f32, 0.841_344_746_068_542_9f64),
            (-2.0, -0.045_500_263_896_358_42),
            (0.5, 0.345_731_230_637_006_56),
            (-0.5, -0.154_268_769_362_993_44),
            (-5.0, -1.433_257_859_340_120_2e-6),
        ] {
            let got = gelu_erf(x) as f64;
            assert!((got - want).abs() <= 2e-7 * want.abs(), "gelu_erf({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn gelu_erf_matches_a_taylor_series_of_erf() {
        // erf(z) = 2/√π Σ (−1)ⁿ z^(2n+1) / (n! (2n+1)), summed in f64 (converges fast for |z| ≤ 3).
        let erf = |z: f64| {
            let (mut term, mut sum) = (z, 0.0);
            for n in 0..200 {
                sum += term / (2 * n + 1) as f64;
                term *= -z * z / (n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst = 0f64;
        for i in -400..=400 {
            let x = i as f32 / 100.0;
            let want = 0.5 * x as f64 * (1.0 + erf(x as f64 / 2f64.sqrt()));
            let err = (gelu_erf(x) as f64 - want).abs();
            worst = worst.max(err / want.abs().max(1e-3));
        }
        assert!(worst < 3e-7, "gelu_erf: worst relative error {worst:e}");
        // And it is not the tanh form: at x = −2 the two differ by 9·10⁻⁵.
        assert!((gelu_erf(-2.0) - gelu_tanh(-2.0)).abs() > 5e-5);
    }
}
