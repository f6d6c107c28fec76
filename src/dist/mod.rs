//! Data-parallel ranks: who this process is (`RankEnv`, torchrun's variables), the launcher of
//! `train --gpus N` (`launch`: the binary started once per GPU), the TCP rendezvous where every
//! rank shows its configuration and rank 0 hands out NCCL's unique id, the control channel that
//! carries each step's scalars (`rendezvous`), and NCCL itself, loaded at run time (`nccl`).
//!
//! Nothing here knows models or trainers: a configuration is a list of (key, value) pairs the
//! caller builds, a gradient a slice of f32. docs/multi-gpu.md has the design.

pub mod nccl;
pub mod rendezvous;

use anyhow::{bail, Context, Result};
use nccl::{Comm, Nccl, UniqueId};
use rendezvous::{Config, Control};
use std::ffi::OsString;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This process's place among the ranks, from the variables torchrun (and Slurm or Kubernetes
/// wrappers written for it) sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
#[derive(Clone, Debug, PartialEq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// The GPU of this machine the rank uses.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// How long ranks wait for each other (rendezvous, each step's exchange): FLUX_KERNELS_DIST_TIMEOUT_S,
/// default 600 s, long enough for a rank to write a checkpoint or previews while the others wait.
pub fn timeout() -> Duration {
    let s = std::env::var("FLUX_KERNELS_DIST_TIMEOUT_S").ok().and_then(|v| v.parse::<f64>().ok());
    Duration::from_secs_f64(s.filter(|s| *s > 0.0).unwrap_or(600.0))
}

/// The gradients' all-reduce on GPUs goes in buckets of at most this many bytes:
/// FLUX_KERNELS_REDUCE_BUCKET_MB (MB of 10⁶ bytes, default 25: PyTorch DDP's `bucket_cap_mb`).
/// Smaller buckets start earlier in the backward and overlap more of it; larger ones make fewer,
/// more efficient NCCL launches. Every rank must use the same value (the rendezvous checks it).
pub fn bucket_bytes() -> Result<usize> {
    match std::env::var("FLUX_KERNELS_REDUCE_BUCKET_MB") {
        Err(_) => Ok(25_000_000),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(mb) if mb > 0.0 && mb.is_finite() => Ok((mb * 1e6).max(4.0) as usize),
            _ => bail!("FLUX_KERNELS_REDUCE_BUCKET_MB=`{v}`: a positive number of megabytes (default 25)"),
        },
    }
}

impl RankEnv {
    /// The ranks from the environment: None when WORLD_SIZE is not set (a single process);
    /// otherwise every variable is required and checked.
    pub fn from_env() -> Result<Option<RankEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        let num = |k: &str| -> Result<usize> {
            let v = get(k).with_context(|| format!("WORLD_SIZE is set, so {k} must be too (torchrun's variables)"))?;
            v.trim().parse().with_context(|| format!("{k}=`{v}` is not a non-negative integer"))
        };
        let world: usize = world.trim().parse().with_context(|| format!("WORLD_SIZE=`{world}` is not a number"))?;
        if world == 0 {
            bail!("WORLD_SIZE=0: at least one rank");
        }
        let rank = num("RANK")?;
        if rank >= world {
            bail!("RANK={rank} with WORLD_SIZE={world}: ranks are 0..{}", world - 1);
        }
        let local_rank = if get("LOCAL_RANK").is_some() { num("LOCAL_RANK")? } else { 0 };
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT=`{p}` is not a port number"))?,
            None if world == 1 => 0,
            None => bail!("WORLD_SIZE={world}: MASTER_PORT must be set (rank 0 listens there for the others)"),
        };
        Ok(Some(RankEnv { rank, world, local_rank, master_addr, master_port }))
    }

    /// On a GPU machine: the rank's GPU is the LOCAL_RANK-th visible one. Set before the CUDA
    /// driver starts (it reads CUDA_VISIBLE_DEVICES once), so the engine's device 0 is that GPU.
    pub fn pin_gpu(&self) {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let pick = match &visible {
            Some(v) if !v.trim().is_empty() => v.split(',').nth(self.local_rank).map(|s| s.trim().to_string()),
            _ => Some(self.local_rank.to_string()),
        };
        if let Some(dev) = pick {
            std::env::set_var("CUDA_VISIBLE_DEVICES", dev);
        }
    }
}

/// A rank joined to the others: the control channel and NCCL's communicator.
pub struct Joined {
    pub control: Control,
    pub comm: Comm,
}

/// Joins the other ranks (`env`): the rendezvous, then NCCL's communicator. `config(nccl)` is this
/// rank's configuration given what it found of NCCL; each rank opens NCCL first and shows rank 0
/// what it found, so a rank without it stops every rank with its reason.
pub fn join(env: &RankEnv, config: impl FnOnce(&str) -> Result<Config>) -> Result<Joined> {
    let nccl = Nccl::open().map(Arc::new);
    let found = match &nccl {
        Ok(n) if n.emulated => "emulated NCCL".to_string(),
        Ok(n) => n.describe().split(" (").next().unwrap_or("NCCL").to_string(),
        Err(_) => "missing".to_string(),
    };
    let mut cfg = config(&found)?;
    // The ranks' NCCL calls must match one for one: the same buckets everywhere.
    cfg.push(("gradient all-reduce bucket bytes".into(), bucket_bytes()?.to_string()));
    let make_id = || -> Result<[u8; 128]> {
        match &nccl {
            Ok(n) => Ok(n.unique_id()?.to_bytes()),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        }
    };
    let (control, id) = match rendezvous::join(env, &cfg, make_id, timeout()) {
        Ok(j) => j,
        // A rank without NCCL says why, after what rank 0 said (unless that was it already).
        Err(e) => match &nccl {
            Err(own) if !format!("{e:#}").contains(&format!("{own:#}")) => {
                bail!("{e:#}; this rank: {own:#}")
            }
            _ => return Err(e),
        },
    };
    let comm = Comm::init(nccl?, UniqueId::from_bytes(&id), env.world, env.rank)?;
    Ok(Joined { control, comm })
}

/// A free TCP port on the loopback for a single-machine launch.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// `--gpus N` on one machine: the current binary started N times with the same arguments and
/// RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free port unless
/// MASTER_PORT is set) in its environment; waits for all of them. When a rank fails, the others
/// fail on their own within the timeout (NCCL or the control channel sees the rank go); any
/// still running after that are killed. The error names each rank that failed.
pub fn launch(gpus: usize, args: &[OsString]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program's path to start the ranks")?;
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p.parse().with_context(|| format!("MASTER_PORT=`{p}` is not a port number"))?,
        Err(_) => free_port()?,
    };
    let mut children: Vec<(usize, Child)> = Vec::new();
    for r in 0..gpus {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", gpus.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("cannot start rank {r} ({})", exe.display()));
        match child {
            Ok(c) => children.push((r, c)),
            Err(e) => {
                for (_, c) in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    wait_ranks(children, timeout())
}

/// Waits for every rank; after the first failure the rest get `grace` to end on their own.
fn wait_ranks(mut running: Vec<(usize, Child)>, grace: Duration) -> Result<()> {
    let mut failed: Vec<String> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    while !running.is_empty() {
        let mut still = Vec::new();
        for (r, mut c) in running {
            match c.try_wait()? {
                Some(st) if st.success() => {}
                Some(st) => {
                    failed.push(format!("rank {r} ({st})"));
                    first_failure.get_or_insert_with(Instant::now);
                }
                None => still.push((r, c)),
            }
        }
        running = still;
        if first_failure.is_some_and(|t| t.elapsed() > grace) {
            for (r, c) in running.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
                failed.push(format!("rank {r} (killed: still running {} s after a rank failed)", grace.as_secs()));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !failed.is_empty() {
        bail!("the run failed: {} (each rank's own error is above)", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<RankEnv>> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RankEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.master_addr.as_str(), e.master_port), (3, 4, 1, "n0", 29500));
        let msg = |p: &[(&str, &str)]| format!("{:#}", env(p).unwrap_err());
        assert!(msg(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK must be"));
        assert!(msg(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).contains("ranks are 0..1"));
        assert!(msg(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_PORT must be set"));
        assert!(msg(&[("WORLD_SIZE", "x")]).contains("WORLD_SIZE=`x`"));
    }
}
