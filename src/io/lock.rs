//! One run per output: a lock file beside it (`<output>.lock`), so that a second trainer given
//! the same `--out` stops with a clear error instead of mixing its checkpoints, samples and
//! metrics with the first one's.
//!
//! The lock is the kernel's advisory lock on the open file (`File::try_lock`), which dies with
//! its process: a run killed with `kill -9` leaves the file but not the lock, and the next run
//! takes it over with a note. The file holds the owner's pid, for the messages.

use super::safetensors::{output_folder, pid_alive};
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// A held lock; dropping it removes the lock file (still holding the lock while doing so).
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

/// What taking a lock found.
pub struct Taken {
    pub lock: OutputLock,
    /// Set when a lock file of a process that no longer holds it was taken over.
    pub note: Option<String>,
}

impl OutputLock {
    /// The lock file of `output`.
    pub fn path_for(output: &Path) -> PathBuf {
        let mut s = output.as_os_str().to_os_string();
        s.push(".lock");
        PathBuf::from(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock of `output`, or says which process holds it.
    pub fn take(output: &Path) -> Result<Taken> {
        let path = Self::path_for(output);
        // Between our open and our lock the holder may remove the file (and a third run create a
        // new one): the lock we got then guards nothing, so open again. Twice is already rare.
        for _ in 0..8 {
            output_folder(&path)?;
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("cannot open the lock file {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = read_pid(&mut file).map_or(String::new(), |p| format!(" (pid {p})"));
                    bail!(
                        "{} is held by another run{holder} writing the same output; two runs on one --out would \
                         mix their checkpoints, samples and metrics: wait for it to finish or choose another --out",
                        path.display()
                    );
                }
                Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                    // A file system without locks: the pid in the file is all there is to go by.
                    if let Some(p) = read_pid(&mut file).filter(|&p| p != std::process::id()) {
                        if pid_alive(p) != Some(false) {
                            bail!(
                                "{} says process {p} is writing the same output (this file system has no locks; \
                                 remove the file if that process is not a run of this program)",
                                path.display()
                            );
                        }
                    }
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
            if !same_file(&file, &path) {
                continue;
            }
            let previous = read_pid(&mut file).filter(|&p| p != std::process::id());
            let own = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| file.write_all(own.as_bytes()))
                .with_context(|| format!("cannot write the lock file {}", path.display()))?;
            let note = previous.map(|p| {
                format!("took over the lock file {} of process {p}, which no longer holds it (killed?)", path.display())
            });
            return Ok(Taken { lock: OutputLock { path, _file: file }, note });
        }
        bail!("cannot lock {}: the lock file keeps being replaced", path.display())
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid a lock file names, if it names one (a lock file is a few bytes; more is not read).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.take(32).read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fk-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_second_taker_is_refused_and_the_file_goes_with_the_lock() {
        let d = dir("second");
        let out = d.join("lora.safetensors");
        let first = OutputLock::take(&out).unwrap();
        assert!(first.note.is_none());
        let e = format!("{:#}", OutputLock::take(&out).err().expect("second lock refused"));
        assert!(e.contains("lora.safetensors.lock") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        let lock_path = first.lock.path().to_path_buf();
        drop(first);
        assert!(!lock_path.exists());
        assert!(OutputLock::take(&out).is_ok());
    }

    #[test]
    fn a_stale_lock_file_is_taken_over_with_a_note() {
        let d = dir("stale");
        let out = d.join("lora.safetensors");
        // A pid that is surely not running: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(OutputLock::path_for(&out), format!("{dead}\n")).unwrap();
        let taken = OutputLock::take(&out).unwrap();
        let note = taken.note.expect("a note");
        assert!(note.contains(&dead.to_string()), "{note}");
    }

    #[test]
    fn a_lock_path_that_is_not_a_regular_file_is_refused() {
        let d = dir("notfile");
        let out = d.join("lora.safetensors");
        std::fs::create_dir_all(OutputLock::path_for(&out)).unwrap();
        let e = format!("{:#}", OutputLock::take(&out).err().unwrap());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
