//! Sinusoidal embedding of the timestep and of the guidance scale (BFL `timestep_embedding`).

/// out[b, :] = [cos(t'·f_0..f_{h−1}), sin(t'·f_0..f_{h−1})] with t' = time_factor·t[b],
/// f_j = exp(−ln(max_period)·j/h), h = dim/2. Cos first, as BFL (diffusers flips to match).
pub fn timestep_embedding(out: &mut [f32], t: &[f32], dim: usize, time_factor: f32, max_period: f32) {
    assert_eq!(out.len(), t.len() * dim);
    let half = dim / 2;
    for (bi, &tv) in t.iter().enumerate() {
        // All in f32, as diffusers and BFL compute it: at guidance 3.5 the argument is 3500, so
        // the f32 rounding of the product is visible at the golden tests' tolerance.
        let tt = time_factor * tv;
        let row = &mut out[bi * dim..(bi + 1) * dim];
        for j in 0..half {
            let f = (-((max_period as f64).ln() as f32) * j as f32 / half as f32).exp();
            let arg = (tt * f) as f64;
            row[j] = arg.cos() as f32;
            row[half + j] = arg.sin() as f32;
        }
        if dim % 2 == 1 {
            row[dim - 1] = 0.0;
        }
    }
}
