//! Small helpers shared by tests, benches and random initialisation.

/// Relative L2 error ‖a − b‖ / ‖b‖ in f64; NaN anywhere gives infinity so no test passes on it.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_l2: lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// How many numbered blocks the keys `{prefix}N.…` hold, N counting from 0: every index must
/// parse, be below `max`, and the indices must run 0..n without a gap. A block count read off
/// untrusted key names is then bounded by the keys really present, never by the largest index one
/// key claims (`double_blocks.100000000.x` would otherwise size a 10⁸-block model).
/// `keys` yields (name to parse, name to report in an error: the key as stored).
pub fn count_indexed_blocks<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    prefix: &str,
    max: usize,
) -> anyhow::Result<usize> {
    let mut seen = std::collections::BTreeMap::new();
    for (name, stored) in keys {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let idx = rest.split('.').next().unwrap_or("");
        let Ok(i) = idx.parse::<usize>() else {
            anyhow::bail!("tensor `{stored}`: `{idx}` is not a block index");
        };
        if i >= max {
            anyhow::bail!("tensor `{stored}`: block index {i} is beyond the {max} blocks supported");
        }
        seen.entry(i).or_insert(stored);
    }
    let n = seen.len();
    if let Some((i, stored)) = seen.iter().find(|(&i, _)| i >= n) {
        anyhow::bail!(
            "tensor `{stored}`: block index {i}, but only {n} `{prefix}N` blocks are stored (indices must run \
             0..{n} without gaps)"
        );
    }
    Ok(n)
}

/// 11901408320 → "11,901,408,320"
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// splitmix64's finaliser: a bijection that scrambles every input bit into every output bit. The
/// hash behind random initialisation (`model::random`) and dropout masks (`ops::lora::Dropout`);
/// the kernels' twin is `fk::mix` in kernels/common.cuh.
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 24 bits of a hash as an exact f32 in [0, 1).
pub fn unit24(z: u64) -> f32 {
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// A small deterministic generator (xorshift64*), so random weights and inputs are the same on
/// every machine without pulling in a crate for it.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// Checks an analytic input gradient against central finite differences of the scalar
/// L(x) = Σ f(x)⊙dy, with the sum in f64. The ops are f32, so the step is large (1e-2 relative)
/// and the tolerance is on the relative L2 error over all elements.
pub fn fd_check(x: &[f32], grad: &[f32], dy: &[f32], f: impl Fn(&[f32]) -> Vec<f32>, tol: f64) {
    let loss = |x: &[f32]| f(x).iter().zip(dy).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
    let mut num = vec![0f32; x.len()];
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        let h = 1e-2f32 * x[i].abs().max(0.1);
        xp[i] = x[i] + h;
        let lp = loss(&xp);
        xp[i] = x[i] - h;
        let lm = loss(&xp);
        xp[i] = x[i];
        num[i] = ((lp - lm) / (2.0 * h as f64)) as f32;
    }
    let err = rel_l2(grad, &num);
    assert!(err < tol, "finite differences: rel L2 {err:.3e} ≥ {tol:e}\nanalytic {grad:?}\nnumeric  {num:?}");
}

/// Keeps freed buffers of up to 32 MiB in the heap for reuse instead of returning them to the
/// kernel. glibc serves allocations above its dynamic threshold (128 KiB at first) with fresh
/// mmap'd pages, which the kernel must zero on first touch: the CPU reference allocates its
/// activations per op, and zeroing pages (`clear_page_erms`) took 15 % of a LoRA gradient's time
/// on 2 cores (perf, issue 23). Peak memory does not change: a reused buffer is one not
/// requested anew. No-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; any values are accepted or refused (0).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_come_from_keys_present_not_from_the_largest_index() {
        let keys = |v: &[&'static str]| v.iter().map(|k| (*k, *k)).collect::<Vec<_>>();
        assert_eq!(count_indexed_blocks(keys(&["b.0.x", "b.1.x", "b.1.y", "c.5"]), "b.", 10).unwrap(), 2);
        assert_eq!(count_indexed_blocks(keys(&["c.5"]), "b.", 10).unwrap(), 0);
        let e = count_indexed_blocks(keys(&["b.0.x", "b.100000000.x"]), "b.", 1024).unwrap_err().to_string();
        assert!(e.contains("b.100000000.x") && e.contains("1024"), "{e}");
        let e = count_indexed_blocks(keys(&["b.0.x", "b.2.x"]), "b.", 10).unwrap_err().to_string();
        assert!(e.contains("b.2.x") && e.contains("gaps"), "{e}");
        assert!(count_indexed_blocks(keys(&["b.x.y"]), "b.", 10).unwrap_err().to_string().contains("b.x.y"));
    }
}
