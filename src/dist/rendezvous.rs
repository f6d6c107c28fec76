//! The TCP rendezvous at MASTER_ADDR:MASTER_PORT and the control channel it leaves open.
//!
//! Rank 0 listens; every other rank connects (retrying until rank 0 is up) and sends its rank,
//! the world size and its configuration (key, value pairs: the binary's version, the model, the
//! adapters, the batch settings, a digest of the starting weights). Rank 0 compares each with
//! its own; when all agree it makes NCCL's unique id and sends it to everyone, otherwise every
//! rank gets the same error naming the rank and the keys that differ. Every socket operation has
//! a deadline (`super::timeout`), so a rank that never comes or dies is an error, not a hang.
//!
//! The connections stay open as the control channel: each step's scalars (loss, a Ctrl-C seen)
//! travel there, gathered at rank 0 and sent back to all, in rank order. They are small, and on
//! the host, where real NCCL cannot take them (it reduces device memory only).

use super::RankEnv;
use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"FKRV";
const PROTOCOL: u32 = 1;
/// A configuration larger than this is not one of ours.
const MAX_CONFIG: u32 = 1 << 20;

/// A rank's configuration: (key, value) pairs in a fixed order.
pub type Config = Vec<(String, String)>;

/// The open connections after the rendezvous: rank 0 holds one per other rank, the others one to
/// rank 0.
pub struct Control {
    pub rank: usize,
    pub world: usize,
    /// Rank 0: `peers[r]` is rank r's connection (`peers[0]` None). Others: `peers[0]` is rank 0.
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8], peer: &str, timeout: Duration) -> Result<()> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            anyhow!("{peer} is gone (closed its connection: exited, killed or failed)")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            anyhow!("no word from {peer} in {} s (FLUX_KERNELS_DIST_TIMEOUT_S)", timeout.as_secs_f64())
        }
        _ => anyhow!("reading from {peer}: {e}"),
    })
}

fn write_all(s: &mut TcpStream, buf: &[u8], peer: &str) -> Result<()> {
    s.write_all(buf).and_then(|_| s.flush()).map_err(|e| anyhow!("{peer} is gone (sending failed: {e})"))
}

fn read_u32(s: &mut TcpStream, peer: &str, t: Duration) -> Result<u32> {
    let mut b = [0u8; 4];
    read_exact(s, &mut b, peer, t)?;
    Ok(u32::from_le_bytes(b))
}

fn prepare(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(())
}

/// Which keys differ between rank 0's configuration and another's ("key: a (rank 0) vs b").
fn differences(mine: &Config, theirs: &Config, rank: usize) -> Vec<String> {
    let get = |c: &Config, k: &str| c.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let mut keys: Vec<&String> = mine.iter().map(|(k, _)| k).collect();
    keys.extend(theirs.iter().map(|(k, _)| k).filter(|k| !mine.iter().any(|(x, _)| x == *k)));
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (get(mine, k), get(theirs, k));
            (a != b).then(|| {
                let show = |v: Option<String>| v.unwrap_or_else(|| "(not given)".into());
                format!("{k}: {} (rank 0) vs {} (rank {rank})", show(a), show(b))
            })
        })
        .collect()
}

/// Joins the ranks of `env`: returns the control channel and NCCL's unique id (`make_id` runs on
/// rank 0 only, once every rank has shown a configuration equal to `config`).
pub fn join(
    env: &RankEnv,
    config: &Config,
    make_id: impl FnOnce() -> Result<[u8; 128]>,
    timeout: Duration,
) -> Result<(Control, [u8; 128])> {
    if env.world == 1 {
        return Ok((Control { rank: 0, world: 1, peers: vec![], timeout }, make_id()?));
    }
    if env.rank == 0 {
        serve(env, config, make_id, timeout)
    } else {
        connect(env, config, timeout)
    }
}

fn serve(
    env: &RankEnv,
    config: &Config,
    make_id: impl FnOnce() -> Result<[u8; 128]>,
    timeout: Duration,
) -> Result<(Control, [u8; 128])> {
    // A loopback MASTER_ADDR keeps the port off the network; any other is reached from other nodes.
    let loopback = matches!(env.master_addr.as_str(), "127.0.0.1" | "localhost" | "::1");
    let bind = if loopback { "127.0.0.1" } else { "0.0.0.0" };
    let listener = TcpListener::bind((bind, env.master_port))
        .with_context(|| format!("rank 0: cannot listen on {bind}:{} (MASTER_PORT)", env.master_port))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
    let mut problem: Option<String> = None;
    let mut joined = 1;
    // A rank whose configuration differs still counts as joined: rank 0 waits for every rank,
    // so that all of them hear why the run stops rather than waiting for their own timeout.
    while joined < env.world {
        let (mut s, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> =
                        (1..env.world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                    let late = format!(
                        "rank(s) {} did not join within {} s (FLUX_KERNELS_DIST_TIMEOUT_S)",
                        missing.join(", "),
                        timeout.as_secs_f64()
                    );
                    problem = Some(problem.map_or(late.clone(), |p| format!("{p}; {late}")));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e).context("rank 0: accept on MASTER_PORT"),
        };
        s.set_nonblocking(false)?;
        prepare(&s, timeout)?;
        let who = format!("a rank at {addr}");
        let mut head = [0u8; 4];
        // A stray connection (a port scanner, an old run): dropped, not fatal.
        if read_exact(&mut s, &mut head, &who, timeout).is_err() || &head != MAGIC {
            continue;
        }
        let proto = read_u32(&mut s, &who, timeout)?;
        let rank = read_u32(&mut s, &who, timeout)? as usize;
        let world = read_u32(&mut s, &who, timeout)? as usize;
        let len = read_u32(&mut s, &who, timeout)?;
        if proto != PROTOCOL || len > MAX_CONFIG {
            problem = Some(format!("{who} speaks another rendezvous protocol (a different flux-kernels version)"));
            peers.push(Some(s));
            break;
        }
        let mut body = vec![0u8; len as usize];
        read_exact(&mut s, &mut body, &who, timeout)?;
        let theirs: Config = serde_json::from_slice(&body).context("a rank's configuration")?;
        if world != env.world || rank == 0 || rank >= env.world || peers[rank].is_some() {
            // The ranks cannot be counted any more: stop now.
            problem = Some(if world != env.world {
                format!("rank {rank} was started with WORLD_SIZE={world}, rank 0 with {}", env.world)
            } else {
                format!("two processes joined as rank {rank}: check RANK on each node")
            });
            peers.push(Some(s));
            break;
        }
        let d = differences(config, &theirs, rank);
        if !d.is_empty() && problem.is_none() {
            problem = Some(format!(
                "rank {rank}'s configuration differs from rank 0's: {}; every rank must run the same binary, \
                 model, adapters and batch settings",
                d.join("; ")
            ));
        }
        peers[rank] = Some(s);
        joined += 1;
    }
    let id = match problem {
        None => make_id(),
        Some(p) => Err(anyhow!(p)),
    };
    let id = match id {
        Ok(id) => id,
        Err(e) => {
            // Everyone who came hears why the run stops.
            let msg = format!("{e:#}");
            for s in peers.iter_mut().flatten() {
                let mut m = vec![1u8];
                m.extend((msg.len() as u32).to_le_bytes());
                m.extend(msg.as_bytes());
                let _ = s.write_all(&m);
            }
            bail!("rank 0: {msg}");
        }
    };
    for (r, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("every rank joined");
        let mut m = vec![0u8];
        m.extend(id);
        write_all(s, &m, &format!("rank {r}"))?;
    }
    Ok((Control { rank: 0, world: env.world, peers, timeout }, id))
}

fn connect(env: &RankEnv, config: &Config, timeout: Duration) -> Result<(Control, [u8; 128])> {
    let deadline = Instant::now() + timeout;
    let target = format!("{}:{}", env.master_addr, env.master_port);
    let me = env.rank;
    let mut s = loop {
        let addrs: Vec<_> = match target.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) if Instant::now() > deadline => bail!("rank {me}: cannot resolve MASTER_ADDR {target}: {e}"),
            Err(_) => vec![],
        };
        if let Some(s) = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok()) {
            break s;
        }
        if Instant::now() > deadline {
            bail!(
                "rank {me}: rank 0 did not answer at {target} within {} s (MASTER_ADDR, MASTER_PORT; \
                 FLUX_KERNELS_DIST_TIMEOUT_S)",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    prepare(&s, timeout)?;
    let body = serde_json::to_vec(config)?;
    let mut m = MAGIC.to_vec();
    for v in [PROTOCOL, me as u32, env.world as u32, body.len() as u32] {
        m.extend(v.to_le_bytes());
    }
    m.extend(&body);
    write_all(&mut s, &m, "rank 0")?;
    let mut status = [0u8; 1];
    read_exact(&mut s, &mut status, "rank 0", timeout).with_context(|| format!("rank {me}: the rendezvous"))?;
    if status[0] != 0 {
        let len = read_u32(&mut s, "rank 0", timeout)?.min(MAX_CONFIG);
        let mut msg = vec![0u8; len as usize];
        read_exact(&mut s, &mut msg, "rank 0", timeout)?;
        bail!("rank {me}: rank 0 stopped the run: {}", String::from_utf8_lossy(&msg));
    }
    let mut id = [0u8; 128];
    read_exact(&mut s, &mut id, "rank 0", timeout)?;
    Ok((Control { rank: me, world: env.world, peers: vec![Some(s)], timeout }, id))
}

impl Control {
    /// Every rank's `vals` (the same count on each), concatenated in rank order, on every rank.
    pub fn gather(&mut self, vals: &[f64]) -> Result<Vec<f64>> {
        if self.world == 1 {
            return Ok(vals.to_vec());
        }
        let n = vals.len();
        let bytes = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let floats = |b: &[u8]| b.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f64>>();
        let t = self.timeout;
        if self.rank != 0 {
            let s = self.peers[0].as_mut().expect("the connection to rank 0");
            let mut m = (n as u32).to_le_bytes().to_vec();
            m.extend(bytes(vals));
            write_all(s, &m, "rank 0")?;
            let mut all = vec![0u8; 8 * n * self.world];
            read_exact(s, &mut all, "rank 0", t)?;
            return Ok(floats(&all));
        }
        let mut all = vals.to_vec();
        for r in 1..self.world {
            let s = self.peers[r].as_mut().expect("every rank's connection");
            let who = format!("rank {r}");
            let k = read_u32(s, &who, t)? as usize;
            if k != n {
                bail!("rank {r} sent {k} values for a step's exchange, rank 0 {n}: the ranks run different code");
            }
            let mut b = vec![0u8; 8 * n];
            read_exact(s, &mut b, &who, t)?;
            all.extend(floats(&b));
        }
        let out = bytes(&all);
        for r in 1..self.world {
            write_all(self.peers[r].as_mut().unwrap(), &out, &format!("rank {r}"))?;
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, port: u16) -> RankEnv {
        RankEnv { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
    }

    fn cfg(batch: &str) -> Config {
        vec![("version".into(), "1".into()), ("batch_size".into(), batch.into())]
    }

    fn port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_agree_get_the_id_and_gather_in_rank_order() {
        let p = port();
        let t = Duration::from_secs(10);
        let hs: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let (mut c, id) = join(&env(r, 3, p), &cfg("2"), || unreachable!(), t).unwrap();
                    (id, c.gather(&[r as f64, 10.0 * r as f64]).unwrap())
                })
            })
            .collect();
        let (mut c, id) = join(&env(0, 3, p), &cfg("2"), || Ok([7u8; 128]), t).unwrap();
        let g = c.gather(&[0.0, 0.0]).unwrap();
        assert_eq!(id, [7u8; 128]);
        assert_eq!(g, [0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
        for h in hs {
            let (i, gr) = h.join().unwrap();
            assert_eq!((i, gr), (id, g.clone()));
        }
    }

    #[test]
    fn a_different_configuration_stops_every_rank_naming_the_key() {
        let p = port();
        let t = Duration::from_secs(10);
        let h = std::thread::spawn(move || join(&env(1, 2, p), &cfg("3"), || unreachable!(), t).err().unwrap());
        let e0 = format!("{:#}", join(&env(0, 2, p), &cfg("2"), || Ok([0; 128]), t).err().unwrap());
        let e1 = format!("{:#}", h.join().unwrap());
        for e in [&e0, &e1] {
            assert!(
                e.contains("rank 1's configuration differs") && e.contains("batch_size: 2 (rank 0) vs 3 (rank 1)"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_a_timeout_not_a_hang() {
        let e = join(&env(0, 2, port()), &cfg("2"), || Ok([0; 128]), Duration::from_millis(300)).err().unwrap();
        assert!(format!("{e:#}").contains("rank(s) 1 did not join"), "{e:#}");
        let e = join(&env(1, 2, port()), &cfg("2"), || Ok([0; 128]), Duration::from_millis(300)).err().unwrap();
        assert!(format!("{e:#}").contains("rank 0 did not answer"), "{e:#}");
    }
}
