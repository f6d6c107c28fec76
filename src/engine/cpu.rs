//! The engine on the CPU: the f32 reference (`model::flux`) with the adapters of an
//! `AdapterSet`, gradient accumulators on the host, and AdamW as `ops::optim` computes it.

use crate::adapters::{AdapterSet, PerSample};
use crate::dist::nccl::Comm;
use crate::model::config::FluxConfig;
use crate::model::flux::{flux_backward, flux_forward, flux_forward_train, FluxCache, FluxInputs};
use crate::model::weights::FluxWeights;
use crate::ops::loss::{mse_backward, mse_forward};
use crate::ops::optim::{clip_grad_norm, AdamW};
use anyhow::{ensure, Result};

pub struct CpuEngine {
    pub cfg: FluxConfig,
    weights: FluxWeights,
    set: AdapterSet,
    /// Inference with one set per sample instead of `set` (`Engine::set_batch_adapters`).
    per_sample: Option<PerSample>,
    /// One accumulator per trainable tensor (parameter order); None for inference adapters.
    grads: Option<Vec<Vec<f32>>>,
}

/// A CPU forward kept for the backward: its inputs, prediction, intermediates and dropout.
pub struct CpuForward {
    inp: FluxInputs,
    pub pred: Vec<f32>,
    cache: FluxCache,
    dropout: Option<(f32, u64)>,
}

impl CpuEngine {
    pub fn new(cfg: &FluxConfig, weights: FluxWeights) -> CpuEngine {
        CpuEngine { cfg: cfg.clone(), weights, set: AdapterSet::new(), per_sample: None, grads: None }
    }

    pub fn set_adapters(&mut self, set: &AdapterSet, train: bool) -> Result<()> {
        self.set = set.clone();
        self.set.set_dropout(0.0, 0);
        self.per_sample = None;
        self.grads = train.then(|| self.set.params().map(|p| vec![0.0; p.len()]).collect());
        Ok(())
    }

    /// One set per sample for the following forwards (inference; replaces any adapters before).
    pub fn set_batch_adapters(&mut self, sets: &[AdapterSet]) -> Result<()> {
        ensure!(!sets.is_empty(), "per-sample adapters for an empty batch");
        self.set = AdapterSet::new();
        self.grads = None;
        self.per_sample = Some(PerSample::new(sets.to_vec()));
        Ok(())
    }

    pub fn forward(&mut self, inp: &FluxInputs) -> Result<Vec<f32>> {
        if let Some(ps) = &self.per_sample {
            ensure!(
                inp.b == ps.batch(),
                "a batch of {} samples given to per-sample adapters for {}",
                inp.b,
                ps.batch()
            );
            return flux_forward(&self.cfg, &self.weights, inp, ps);
        }
        self.set.set_dropout(0.0, 0);
        flux_forward(&self.cfg, &self.weights, inp, &self.set)
    }

    pub fn forward_train(&mut self, inp: &FluxInputs, dropout: Option<(f32, u64)>) -> Result<CpuForward> {
        ensure!(self.per_sample.is_none(), "per-sample adapter sets are for inference only");
        let (p, seed) = dropout.unwrap_or((0.0, 0));
        self.set.set_dropout(p, seed);
        let (pred, cache) = flux_forward_train(&self.cfg, &self.weights, inp, &self.set)?;
        Ok(CpuForward { inp: inp.clone(), pred, cache, dropout })
    }

    pub fn backward_mse(&mut self, f: CpuForward, target: &[f32], weights: Option<&[f32]>, gscale: f32) -> Result<f64> {
        ensure!(target.len() == f.pred.len(), "target has {} values, the prediction {}", target.len(), f.pred.len());
        let loss = mse_forward(&f.pred, target, weights);
        if !loss.is_finite() || gscale == 0.0 {
            return Ok(loss);
        }
        let mut dpred = vec![0f32; f.pred.len()];
        mse_backward(&mut dpred, &f.pred, target, weights);
        dpred.iter_mut().for_each(|d| *d *= gscale);
        self.backward(f, dpred)?;
        Ok(loss)
    }

    pub fn backward(&mut self, f: CpuForward, dpred: Vec<f32>) -> Result<()> {
        ensure!(
            dpred.len() == f.pred.len(),
            "d(prediction) has {} values, the prediction {}",
            dpred.len(),
            f.pred.len()
        );
        let accum = self.grads.as_mut().ok_or_else(|| anyhow::anyhow!("backward without trainable adapters"))?;
        let (p, seed) = f.dropout.unwrap_or((0.0, 0));
        self.set.set_dropout(p, seed);
        let g = flux_backward(&self.cfg, &self.weights, &f.inp, &f.cache, &dpred, &self.set)?;
        for (acc, fresh) in accum.iter_mut().zip(self.set.flat_grads(&g)) {
            acc.iter_mut().zip(&fresh).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        if let Some(g) = self.grads.as_mut() {
            g.iter_mut().for_each(|v| v.iter_mut().for_each(|x| *x = 0.0));
        }
        Ok(())
    }

    pub fn grads(&self) -> Result<Vec<Vec<f32>>> {
        self.grads.clone().ok_or_else(|| anyhow::anyhow!("no trainable adapters"))
    }

    /// Data parallelism (dist): the accumulators summed over the ranks of `comm`, on the host
    /// (the emulated NCCL), as one flat buffer. `deterministic`: all-gathered, then added in rank
    /// order (rank 0's + rank 1's + …), an order real NCCL's all-reduce does not promise.
    pub fn reduce_grads(&mut self, comm: &Comm, deterministic: bool) -> Result<()> {
        let grads = self.grads.as_mut().ok_or_else(|| anyhow::anyhow!("no trainable adapters"))?;
        let mut flat: Vec<f32> = grads.concat();
        let n = flat.len();
        if deterministic {
            let all = comm.all_gather_host(&flat)?;
            flat.copy_from_slice(&all[..n]);
            for theirs in all[n..].chunks(n) {
                flat.iter_mut().zip(theirs).for_each(|(a, b)| *a += b);
            }
        } else {
            comm.all_reduce_host(&mut flat)?;
        }
        let mut at = 0;
        for g in grads.iter_mut() {
            let n = g.len();
            g.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        Ok(())
    }

    pub fn optimizer_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let grads = self.grads.as_mut().ok_or_else(|| anyhow::anyhow!("no trainable adapters"))?;
        let mut gref: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
        let gnorm = clip_grad_norm(&mut gref, max_norm);
        let g: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
        let mut p = self.set.params_mut();
        opt.step(&mut p, &g, lr);
        Ok(gnorm)
    }

    pub fn params(&self) -> Vec<Vec<f32>> {
        self.set.params().map(|p| p.to_vec()).collect()
    }
}
