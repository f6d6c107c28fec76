//! Cached training samples: one safetensors per sample with `latent` [C, h, w] (VAE latent,
//! already scaled and shifted), `txt` [L, D_ctx] (T5 states) and `y` [D_vec] (CLIP pooled).
//! Batches hold samples of one size (bucketing), shuffled per epoch from the seed.

use crate::io::safetensors::SafeTensors;
use crate::model::config::FluxConfig;
use crate::util::Rng;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone)]
pub struct Sample {
    pub name: String,
    /// [c, h, w]
    pub latent: Vec<f32>,
    pub h: usize,
    pub w: usize,
    pub txt: Vec<f32>,
    pub n_txt: usize,
    pub y: Vec<f32>,
}

pub struct Dataset {
    pub samples: Vec<Sample>,
    /// Sample indices per (h, w, n_txt) bucket.
    buckets: BTreeMap<(usize, usize, usize), Vec<usize>>,
}

impl Dataset {
    pub fn new(samples: Vec<Sample>) -> Result<Dataset> {
        if samples.is_empty() {
            bail!("the dataset has no samples");
        }
        let mut buckets: BTreeMap<_, Vec<usize>> = BTreeMap::new();
        for (i, s) in samples.iter().enumerate() {
            buckets.entry((s.h, s.w, s.n_txt)).or_default().push(i);
        }
        Ok(Dataset { samples, buckets })
    }

    /// Loads every `*.safetensors` in `dir`, validated against the model's widths.
    pub fn load(dir: &Path, cfg: &FluxConfig) -> Result<Dataset> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read dataset folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!(
                "{}: no training data: no images (.png, .jpg, .jpeg, .webp with same-name .txt captions) and no \
                 cached .safetensors samples",
                dir.display()
            );
        }
        let c = cfg.in_channels / 4;
        let mut samples = Vec::new();
        for p in files {
            let st = SafeTensors::open(&p)?;
            let pd = p.display();
            let get = |n: &str| -> Result<(Vec<usize>, Vec<f32>)> {
                if st.info(n).is_none() {
                    bail!("{pd}: missing tensor `{n}` (a sample holds latent, txt, y)");
                }
                let (s, v) = st.read_f32(n)?;
                if v.iter().any(|x| !x.is_finite()) {
                    bail!("{pd}: tensor `{n}` has non-finite values");
                }
                Ok((s, v))
            };
            let (ls, latent) = get("latent")?;
            if ls.len() != 3 || ls[0] != c || ls[1] % 2 != 0 || ls[2] % 2 != 0 || ls[1] == 0 || ls[2] == 0 {
                bail!("{pd}: `latent` has shape {ls:?}, expected [{c}, h, w] with h and w even");
            }
            let (ts, txt) = get("txt")?;
            if ts.len() != 2 || ts[0] == 0 || ts[1] != cfg.context_in_dim {
                bail!("{pd}: `txt` has shape {ts:?}, expected [L, {}] with L ≥ 1", cfg.context_in_dim);
            }
            let (ys, y) = get("y")?;
            if ys != [cfg.vec_in_dim] {
                bail!("{pd}: `y` has shape {ys:?}, expected [{}]", cfg.vec_in_dim);
            }
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            samples.push(Sample { name, latent, h: ls[1], w: ls[2], txt, n_txt: ts[0], y });
        }
        Dataset::new(samples)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The batches of epoch `epoch`: within each bucket a seeded shuffle cut into batches of
    /// `batch_size` (the last may be smaller), then the batch order shuffled too.
    pub fn epoch_batches(&self, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0xBA7C);
        let mut batches = Vec::new();
        for idx in self.buckets.values() {
            let mut v = idx.clone();
            shuffle(&mut v, &mut rng);
            batches.extend(v.chunks(batch_size).map(|c| c.to_vec()));
        }
        shuffle(&mut batches, &mut rng);
        batches
    }

    /// Batches per epoch (the same every epoch).
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.buckets.values().map(|v| v.len().div_ceil(batch_size)).sum()
    }

    /// The k-th micro-batch of the whole run.
    pub fn batch(&self, k: u64, batch_size: usize, seed: u64) -> Vec<usize> {
        let nb = self.batches_per_epoch(batch_size) as u64;
        self.epoch_batches(batch_size, seed, k / nb)[(k % nb) as usize].clone()
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(h: usize) -> Sample {
        Sample { name: String::new(), latent: vec![], h, w: 2, txt: vec![], n_txt: 1, y: vec![] }
    }

    #[test]
    fn batches_group_sizes_cover_each_epoch_and_are_seeded() {
        let d = Dataset::new(vec![s(2), s(4), s(2), s(2), s(4), s(2), s(2)]).unwrap();
        let e0 = d.epoch_batches(2, 7, 0);
        assert_eq!(d.batches_per_epoch(2), e0.len());
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        for b in &e0 {
            assert!(b.iter().all(|&i| d.samples[i].h == d.samples[b[0]].h), "one size per batch");
        }
        assert_eq!(e0, d.epoch_batches(2, 7, 0));
        assert_ne!(e0, d.epoch_batches(2, 7, 1));
        assert_eq!(d.batch(e0.len() as u64 + 1, 2, 7), d.epoch_batches(2, 7, 1)[1]);
    }
}
