//! Pointwise activations: GELU with the tanh approximation (every FLUX MLP) and SiLU (the
//! embedders and the input of every modulation linear).

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn gelu_tanh_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.iter_mut()
        .zip(inp)
        .for_each(|(o, &x)| *o = gelu_tanh(x));
}

pub fn silu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.iter_mut().zip(inp).for_each(|(o, &x)| *o = silu(x));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // torch.nn.functional.gelu(x, approximate="tanh") and silu at a few points.
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-2.0) - -0.045_402_3).abs() < 1e-5);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert_eq!(silu(0.0), 0.0);
    }
}
