//! Pointwise activations: GELU with the tanh approximation (every FLUX MLP) and SiLU (the
//! embedders and the input of every modulation linear).

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// d/dx of gelu_tanh: ½(1+T) + ½x(1−T²)·√(2/π)(1 + 3·0.044715x²), T = tanh(u).
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let t = (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x)
}

/// d/dx of silu: σ(x)·(1 + x·(1 − σ(x))).
pub fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// dinp = dout ⊙ gelu'(inp). Overwrites dinp.
pub fn gelu_tanh_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert_eq!(dinp.len(), inp.len());
    dinp.iter_mut().zip(inp).zip(dout).for_each(|((d, &x), &g)| *d = g * gelu_tanh_grad(x));
}

/// dinp = dout ⊙ silu'(inp). Overwrites dinp.
pub fn silu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert_eq!(dinp.len(), inp.len());
    dinp.iter_mut().zip(inp).zip(dout).for_each(|((d, &x), &g)| *d = g * silu_grad(x));
}

pub fn gelu_tanh_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.iter_mut().zip(inp).for_each(|(o, &x)| *o = gelu_tanh(x));
}

pub fn silu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.iter_mut().zip(inp).for_each(|(o, &x)| *o = silu(x));
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
    fn known_values() {
        // torch.nn.functional.gelu(x, approximate="tanh") and silu at a few points.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-2.0) - -0.045_402_3).abs() < 1e-5);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert_eq!(silu(0.0), 0.0);
    }
}
