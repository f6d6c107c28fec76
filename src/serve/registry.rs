//! The LoRA files of `--lora-dir`, by name (the file name without `.safetensors`). A name
//! resolves only to a regular file directly inside the folder (a symlink only when its target is
//! inside it too): names from requests are looked up in a scan of the folder, never joined to a
//! path. Files load on first use and stay while they fit the memory budget, least recently used
//! first out; a file whose size or modification time changed is read again, and a new file is
//! found on the next look-up or listing.

use crate::adapters::formats::{load_lora, UnknownKeys};
use crate::adapters::Term;
use crate::model::config::FluxConfig;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The most files a scan reads: a folder of LoRAs, not a disk.
pub const MAX_FILES: usize = 10_000;

/// What `GET /sdapi/v1/loras` says of a file.
#[derive(Clone, Debug, Serialize)]
pub struct LoraInfo {
    pub name: String,
    pub path: String,
    /// The largest rank of its terms.
    pub rank: usize,
    /// alpha of its first module (files rarely mix alphas).
    pub alpha: f32,
    /// "LoRA" or "DoRA".
    pub kind: String,
    /// The BFL modules it acts on.
    pub targets: Vec<String>,
    pub format: String,
    pub bytes: u64,
}

/// A loaded file's terms (strength 1). A request holds the version it resolved, even when the
/// file changes or is evicted before it runs.
pub struct Loaded {
    pub terms: Vec<Term>,
    /// Unique per read of a file in this registry: two requests share a version only when they
    /// use the same bytes (engines that batch one set at a time group by it).
    pub version: u64,
}

/// A file's size and modification time: what tells that it changed.
type Stamp = (u64, Option<SystemTime>);

struct Entry {
    path: PathBuf,
    stamp: Stamp,
    /// Set once the file has been read (the listing reads it once; its terms may be evicted).
    info: Option<Result<LoraInfo, String>>,
    terms: Option<Arc<Loaded>>,
    last_use: u64,
}

struct State {
    by_name: BTreeMap<String, Entry>,
    clock: u64,
    /// Reads so far (the next `Loaded::version`).
    reads: u64,
}

pub struct Registry {
    dir: PathBuf,
    cfg: FluxConfig,
    /// Bytes of f32 parameters kept loaded.
    budget: usize,
    state: Mutex<State>,
}

/// Why a name did not resolve: unknown (404-like, told as 400 to the client) or a broken file.
#[derive(Debug)]
pub enum LookupError {
    Unknown(String),
    Broken(String),
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (meta.len(), meta.modified().ok())
}

impl Registry {
    /// The registry of `dir`, which must be a folder; `budget` bytes of loaded parameters.
    pub fn open(dir: &Path, cfg: &FluxConfig, budget: usize) -> Result<Registry> {
        let dir = dir.canonicalize().with_context(|| format!("--lora-dir {}", dir.display()))?;
        if !dir.is_dir() {
            bail!("--lora-dir {}: not a folder", dir.display());
        }
        let reg = Registry {
            dir,
            cfg: cfg.clone(),
            budget,
            state: Mutex::new(State { by_name: BTreeMap::new(), clock: 0, reads: 0 }),
        };
        reg.rescan()?;
        Ok(reg)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves only caches behind: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `*.safetensors` files directly in the folder, by name, with their stamps.
    fn scan(&self) -> Result<HashMap<String, (PathBuf, Stamp)>> {
        let mut out = HashMap::new();
        let rd = std::fs::read_dir(&self.dir).with_context(|| format!("--lora-dir {}", self.dir.display()))?;
        for e in rd.flatten().take(MAX_FILES) {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".safetensors"))
            else {
                continue;
            };
            if name.is_empty() || name.starts_with('.') {
                continue;
            }
            // A symlink counts only when it resolves inside the folder.
            let Ok(real) = path.canonicalize() else { continue };
            if real.parent() != Some(self.dir.as_path()) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&real) else { continue };
            if meta.is_file() {
                out.insert(name.to_string(), (real, stamp(&meta)));
            }
        }
        Ok(out)
    }

    /// Brings the names up to date with the folder: new files added, removed ones dropped,
    /// changed ones (size or mtime) forgotten so that they are read again.
    fn rescan(&self) -> Result<()> {
        let found = self.scan()?;
        let mut st = self.lock();
        st.by_name.retain(|n, e| found.get(n).is_some_and(|(p, s)| *p == e.path && *s == e.stamp));
        for (name, (path, stamp)) in found {
            st.by_name.entry(name).or_insert(Entry { path, stamp, info: None, terms: None, last_use: 0 });
        }
        Ok(())
    }

    /// Every file with what it holds, or why it does not load. A file is read for this only
    /// once per version: what it holds is kept when its terms are evicted.
    pub fn list(&self) -> Result<Vec<Result<LoraInfo, (String, String)>>> {
        self.rescan()?;
        let known: Vec<(String, Option<Result<LoraInfo, String>>)> =
            self.lock().by_name.iter().map(|(n, e)| (n.clone(), e.info.clone())).collect();
        Ok(known
            .into_iter()
            .filter_map(|(n, info)| {
                let info = match info {
                    Some(i) => i,
                    None => match self.get(&n) {
                        Ok(_) => self.lock().by_name.get(&n).and_then(|e| e.info.clone())?,
                        Err(LookupError::Broken(e)) => Err(e),
                        Err(LookupError::Unknown(_)) => return None,
                    },
                };
                Some(info.map_err(|e| (n, e)))
            })
            .collect())
    }

    /// The terms of LoRA `name`, read now if not loaded or changed on disk.
    pub fn get(&self, name: &str) -> Result<Arc<Loaded>, LookupError> {
        // The file as it is now: a changed stamp, or a name not seen, means a rescan.
        let current = {
            let st = self.lock();
            st.by_name.get(name).map(|e| (e.path.clone(), e.stamp))
        };
        let fresh = current.is_some_and(|(p, s)| std::fs::metadata(&p).is_ok_and(|m| stamp(&m) == s));
        if !fresh {
            self.rescan().map_err(|e| LookupError::Broken(format!("{e:#}")))?;
        }
        let path = {
            let mut st = self.lock();
            st.clock += 1;
            let clock = st.clock;
            let n_files = st.by_name.len();
            let Some(e) = st.by_name.get_mut(name) else {
                return Err(LookupError::Unknown(format!(
                    "unknown LoRA `{name}`: no {name}.safetensors in --lora-dir ({n_files} files; GET /sdapi/v1/loras lists them)"
                )));
            };
            e.last_use = clock;
            if let Some(t) = &e.terms {
                return Ok(t.clone());
            }
            if let Some(Err(msg)) = &e.info {
                return Err(LookupError::Broken(msg.clone()));
            }
            e.path.clone()
        };
        // Read outside the lock: a large file does not stall listings and other look-ups.
        let meta = std::fs::metadata(&path).map_err(|e| LookupError::Broken(format!("{}: {e}", path.display())))?;
        let loaded = load_lora(&path, &self.cfg, UnknownKeys::Error);
        let mut st = self.lock();
        st.reads += 1;
        let version = st.reads;
        let Some(e) = st.by_name.get_mut(name).filter(|e| e.path == path) else {
            return Err(LookupError::Unknown(format!("LoRA `{name}` was removed from --lora-dir while being read")));
        };
        match loaded {
            Err(err) => {
                let msg = format!("LoRA `{name}` does not load: {err:#}");
                e.info = Some(Err(msg.clone()));
                Err(LookupError::Broken(msg))
            }
            Ok(f) => {
                let first = f.modules.values().next().copied().unwrap_or((0, 0.0));
                let dora = f.terms.iter().any(|t| t.is_dora());
                let mut targets: Vec<String> = f.terms.iter().map(|t| t.module.clone()).collect();
                targets.dedup();
                e.info = Some(Ok(LoraInfo {
                    name: name.to_string(),
                    path: path.display().to_string(),
                    rank: f.terms.iter().map(Term::rank).max().unwrap_or(0),
                    alpha: first.1,
                    kind: if dora { "DoRA" } else { "LoRA" }.into(),
                    targets,
                    format: f.formats.iter().map(|x| x.name()).collect::<Vec<_>>().join(", "),
                    bytes: meta.len(),
                }));
                let loaded = Arc::new(Loaded { terms: f.terms, version });
                e.terms = Some(loaded.clone());
                evict(&mut st, self.budget);
                Ok(loaded)
            }
        }
    }

    /// Files read so far (each version of each file counts once per read).
    pub fn reads(&self) -> u64 {
        self.lock().reads
    }

    /// Bytes of parameters loaded now, and the names loaded (least recently used first).
    pub fn loaded(&self) -> (usize, Vec<String>) {
        let st = self.lock();
        let mut v: Vec<(&String, &Entry)> = st.by_name.iter().filter(|(_, e)| e.terms.is_some()).collect();
        v.sort_by_key(|(_, e)| e.last_use);
        (v.iter().map(|(_, e)| bytes_of(e)).sum(), v.iter().map(|(n, _)| n.to_string()).collect())
    }
}

fn bytes_of(e: &Entry) -> usize {
    e.terms.as_ref().map_or(0, |t| t.terms.iter().map(Term::param_count).sum::<usize>() * 4)
}

/// Drops the least recently used terms until the loaded ones fit `budget` (the newest stays
/// even when it alone is over: it is in use). Requests holding a dropped file keep their copy.
fn evict(st: &mut State, budget: usize) {
    loop {
        let total: usize = st.by_name.values().map(bytes_of).sum();
        let loaded = st.by_name.values().filter(|e| e.terms.is_some()).count();
        if total <= budget || loaded <= 1 {
            return;
        }
        if let Some(e) = st.by_name.values_mut().filter(|e| e.terms.is_some()).min_by_key(|e| e.last_use) {
            e.terms = None;
        }
    }
}
