//! fk-fuzz: mutation fuzzing of the files users hand the program, on stable Rust (no nightly,
//! no sanitizer coverage is reachable here). Each target (tools/fuzz/targets.rs) starts from the
//! fixtures; inputs are mutated byte-wise and, where the format allows, structure-wise (the JSON
//! header of a safetensors file with its length prefix kept right, numbers and tokens in text, a
//! PNG's IHDR with its CRC recomputed). Without coverage feedback an input joins the corpus when it
//! reaches an outcome not seen before (a new error message, digits ignored).
//!
//! What counts as a crash: a panic (caught, saved, the run goes on); a single allocation over
//! `--max-alloc` or live memory over `--max-live` (the input is saved, then the process aborts:
//! memory must stay proportional to the input); one input running longer than `--timeout`
//! seconds (saved, abort). Crashes go to `<out>/crashes/<target>/`; copy them into
//! tests/fuzz-crashes/<target>/ to keep them as regression tests (tests/fuzz_regressions.rs).
//!
//! Usage: fk-fuzz TARGET [--seconds S] [--execs N] [--seed N] [--out DIR] [--timeout S]
//!        fk-fuzz --list
//! tools/fuzz.sh runs every target with a time budget and writes the counts table.

#[path = "targets.rs"]
mod targets;

use flux_kernels::util::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use targets::{Shape, Target};

/// The largest input the mutator makes (the largest seed is 150 KB).
const MAX_INPUT: usize = 1 << 20;

// ---- the input under test, readable from the allocator and the watchdog ------------------------

/// A copy of the input being run, kept in static memory so that the allocator (which must not
/// allocate) and the watchdog thread can save it before the process aborts.
struct Current {
    buf: UnsafeCell<[u8; MAX_INPUT]>,
    len: AtomicUsize,
}
// SAFETY: only the fuzzing thread writes `buf`, between runs (while `len` is 0); readers read
// `len` bytes after loading `len` with Acquire, and only while a run is in progress.
unsafe impl Sync for Current {}

static CURRENT: Current = Current { buf: UnsafeCell::new([0; MAX_INPUT]), len: AtomicUsize::new(0) };

fn set_current(input: &[u8]) {
    CURRENT.len.store(0, Ordering::Release);
    // SAFETY: see `Current`; input.len() <= MAX_INPUT is the mutator's bound.
    unsafe { (&mut *CURRENT.buf.get())[..input.len()].copy_from_slice(input) };
    CURRENT.len.store(input.len(), Ordering::Release);
}

/// Files opened at start-up, so that saving an input on abort needs no allocation.
struct Pending {
    oom: File,
    slow: File,
}
static PENDING: OnceLock<Pending> = OnceLock::new();

fn save_current(f: &File, why: &str) {
    let n = CURRENT.len.load(Ordering::Acquire);
    // SAFETY: see `Current`.
    let bytes = unsafe { &(&*CURRENT.buf.get())[..n] };
    let _ = f.set_len(0);
    let _ = f.write_all_at(bytes, 0);
    let _ = f.sync_all();
    let mut e = std::io::stderr();
    let _ = e.write_all(b"\nfk-fuzz: ");
    let _ = e.write_all(why.as_bytes());
    let _ = e.write_all(b": input saved; aborting\n");
}

// ---- allocation guard --------------------------------------------------------------------------

static MAX_ALLOC: AtomicUsize = AtomicUsize::new(usize::MAX);
static MAX_LIVE: AtomicUsize = AtomicUsize::new(usize::MAX);
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Guard;

impl Guard {
    fn admit(size: usize) -> bool {
        let live = LIVE.load(Ordering::Relaxed);
        if size <= MAX_ALLOC.load(Ordering::Relaxed) && live.saturating_add(size) <= MAX_LIVE.load(Ordering::Relaxed) {
            return true;
        }
        if CURRENT.len.load(Ordering::Acquire) > 0 {
            if let Some(p) = PENDING.get() {
                save_current(&p.oom, "allocation over the limit");
            }
        }
        false
    }
}

// SAFETY: forwards to the system allocator; refuses (null) over the limits, which Rust turns
// into handle_alloc_error (an abort) after the input has been saved.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !Guard::admit(l.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !Guard::admit(l.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && !Guard::admit(new - l.size()) {
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Guard = Guard;

// ---- mutation ----------------------------------------------------------------------------------

struct Mutator<'a> {
    rng: Rng,
    dict: &'a [&'a str],
}

impl Mutator<'_> {
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.rng.next_u64() % n as u64) as usize
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.uniform() < p
    }

    fn mutate(&mut self, parent: &[u8], shape: Shape, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut out = match shape {
            Shape::Safetensors if self.chance(0.8) => match split_safetensors(parent) {
                Some((header, rest)) => {
                    let mut h = header.to_vec();
                    self.stack(&mut h, true, corpus);
                    let mut body = rest.to_vec();
                    if self.chance(0.1) {
                        self.bytes_op(&mut body, corpus);
                    }
                    let mut v = (h.len() as u64).to_le_bytes().to_vec();
                    v.extend_from_slice(&h);
                    v.extend_from_slice(&body);
                    v
                }
                None => self.stacked(parent, false, corpus),
            },
            Shape::Text => self.stacked(parent, true, corpus),
            Shape::ImageCaption => {
                let cut = parent.windows(targets::CAPTION_SEP.len()).position(|w| w == targets::CAPTION_SEP);
                let (cap, img) = match cut {
                    Some(i) => (parent[..i].to_vec(), parent[i + targets::CAPTION_SEP.len()..].to_vec()),
                    None => (Vec::new(), parent.to_vec()),
                };
                let (mut cap, mut img) = (cap, img);
                if self.chance(0.3) {
                    self.stack(&mut cap, true, corpus);
                } else if self.chance(0.3) && img.starts_with(b"\x89PNG") {
                    self.png_size(&mut img);
                } else {
                    self.stack(&mut img, false, corpus);
                }
                cap.extend_from_slice(targets::CAPTION_SEP);
                cap.extend_from_slice(&img);
                cap
            }
            _ => self.stacked(parent, false, corpus),
        };
        out.truncate(MAX_INPUT);
        out
    }

    fn stacked(&mut self, parent: &[u8], text: bool, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut v = parent.to_vec();
        self.stack(&mut v, text, corpus);
        v
    }

    /// One to eight operations, fewer more often.
    fn stack(&mut self, v: &mut Vec<u8>, text: bool, corpus: &[Vec<u8>]) {
        let n = 1 + self.below(4) * self.below(3);
        for _ in 0..n {
            if text && self.chance(0.6) {
                self.text_op(v);
            } else {
                self.bytes_op(v, corpus);
            }
            v.truncate(MAX_INPUT);
        }
    }

    fn text_op(&mut self, v: &mut Vec<u8>) {
        match self.below(5) {
            0 | 1 => {
                // Replace a run of digits (with its sign and fraction) by a boundary number.
                let runs: Vec<(usize, usize)> = digit_runs(v);
                if let Some(&(a, b)) = runs.get(self.below(runs.len())) {
                    let num = targets::numbers()[self.below(targets::numbers().len())];
                    v.splice(a..b, num.bytes());
                }
            }
            2 if !self.dict.is_empty() => {
                let tok = self.dict[self.below(self.dict.len())];
                let at = self.below(v.len() + 1);
                v.splice(at..at, tok.bytes());
            }
            3 if !self.dict.is_empty() => {
                // Replace one quoted string by a dictionary token.
                let quotes: Vec<usize> = v.iter().enumerate().filter(|(_, &c)| c == b'"').map(|(i, _)| i).collect();
                if quotes.len() >= 2 {
                    let i = self.below(quotes.len() - 1);
                    let tok = self.dict[self.below(self.dict.len())];
                    v.splice(quotes[i]..=quotes[i + 1], tok.bytes());
                }
            }
            _ => {
                // Delete or duplicate a line / a JSON member.
                let seps: Vec<usize> =
                    v.iter().enumerate().filter(|(_, &c)| c == b'\n' || c == b',').map(|(i, _)| i).collect();
                if seps.len() >= 2 {
                    let i = self.below(seps.len() - 1);
                    let (a, b) = (seps[i], seps[i + 1]);
                    if self.chance(0.5) {
                        v.drain(a..b);
                    } else {
                        let dup = v[a..b].to_vec();
                        v.splice(b..b, dup);
                    }
                }
            }
        }
    }

    fn bytes_op(&mut self, v: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        const INTERESTING: &[u64] =
            &[0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, u64::MAX, 1 << 40];
        let len = v.len();
        match self.below(8) {
            0 if len > 0 => {
                let i = self.below(len);
                v[i] ^= 1 << self.below(8);
            }
            1 if len > 0 => {
                let i = self.below(len);
                v[i] = self.rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let x = INTERESTING[self.below(INTERESTING.len())];
                let w = [1, 2, 4, 8][self.below(4)];
                let bytes = if self.chance(0.5) { x.to_le_bytes() } else { x.to_be_bytes() };
                let i = self.below(len);
                let bytes = if self.chance(0.5) { &bytes[..w] } else { &bytes[8 - w..] };
                for (k, b) in bytes.iter().enumerate() {
                    if i + k < len {
                        v[i + k] = *b;
                    }
                }
            }
            3 => {
                let at = self.below(len + 1);
                let n = 1 + self.below(16);
                let fill: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                v.splice(at..at, fill);
            }
            4 if len > 1 => {
                let a = self.below(len);
                let n = 1 + self.below((len - a).min(256));
                v.drain(a..a + n);
            }
            5 if len > 1 => {
                let a = self.below(len);
                let n = 1 + self.below((len - a).min(256));
                let chunk = v[a..a + n].to_vec();
                let at = self.below(len + 1);
                v.splice(at..at, chunk);
            }
            6 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[self.below(corpus.len())];
                let a = self.below(len + 1);
                let b = self.below(other.len() + 1);
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            7 if len > 0 => {
                let n = self.below(len);
                v.truncate(n);
            }
            _ => {}
        }
    }

    /// A PNG whose IHDR declares another width/height, the chunk's CRC kept valid so that the
    /// decoder believes it.
    fn png_size(&mut self, img: &mut [u8]) {
        if img.len() < 33 || &img[12..16] != b"IHDR" {
            return;
        }
        const SIDES: &[u32] = &[0, 1, 2, 15, 16, 17, 20000, 65535, 65536, 1 << 24, 0x7fff_ffff, u32::MAX];
        let w = SIDES[self.below(SIDES.len())];
        let h = SIDES[self.below(SIDES.len())];
        if self.chance(0.5) {
            img[16..20].copy_from_slice(&w.to_be_bytes());
        }
        if self.chance(0.7) {
            img[20..24].copy_from_slice(&h.to_be_bytes());
        }
        let crc = crc32(&img[12..29]);
        img[29..33].copy_from_slice(&crc.to_be_bytes());
    }
}

fn split_safetensors(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let end = 8usize.checked_add(n)?;
    Some((b.get(8..end)?, &b[end..]))
}

fn digit_runs(v: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if v[i].is_ascii_digit() {
            let mut a = i;
            if a > 0 && v[a - 1] == b'-' {
                a -= 1;
            }
            while i < v.len() && (v[i].is_ascii_digit() || v[i] == b'.' || v[i] == b'e' || v[i] == b'E') {
                i += 1;
            }
            runs.push((a, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

/// An outcome's signature: the error text with digits and the scratch folder taken out.
fn signature(msg: &str, scratch: &Path) -> u64 {
    let msg = msg.replace(&scratch.display().to_string(), "");
    let norm: String = msg.chars().filter(|c| !c.is_ascii_digit()).take(160).collect();
    fnv(norm.as_bytes())
}

// ---- the run -----------------------------------------------------------------------------------

struct Opts {
    target: &'static Target,
    seconds: f64,
    execs: u64,
    seed: u64,
    out: PathBuf,
    timeout: u64,
}

fn parse_args() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut target = None;
    let mut o = (60.0, u64::MAX, 1u64, PathBuf::from("target/fuzz"), 10u64);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--list" => {
                for t in targets::TARGETS {
                    println!("{}", t.name);
                }
                std::process::exit(0);
            }
            "--seconds" => o.0 = val("--seconds")?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--execs" => o.1 = val("--execs")?.parse().map_err(|e| format!("--execs: {e}"))?,
            "--seed" => o.2 = val("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--out" => o.3 = PathBuf::from(val("--out")?),
            "--timeout" => o.4 = val("--timeout")?.parse().map_err(|e| format!("--timeout: {e}"))?,
            "--max-alloc-mib" => MAX_ALLOC
                .store(val("--max-alloc-mib")?.parse::<usize>().map_err(|e| format!("{e}"))? << 20, Ordering::Relaxed),
            "--max-live-mib" => MAX_LIVE
                .store(val("--max-live-mib")?.parse::<usize>().map_err(|e| format!("{e}"))? << 20, Ordering::Relaxed),
            t if !t.starts_with('-') && target.is_none() => {
                target = Some(targets::target(t).ok_or(format!("unknown target `{t}` (--list shows them)"))?)
            }
            _ => return Err(format!("unknown argument `{a}`")),
        }
    }
    let target =
        target.ok_or("usage: fk-fuzz TARGET [--seconds S] [--execs N] [--seed N] [--out DIR] [--timeout S]")?;
    Ok(Opts { target, seconds: o.0, execs: o.1, seed: o.2, out: o.3, timeout: o.4 })
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fk-fuzz: {e}");
            std::process::exit(2);
        }
    };
    // Memory is bounded by what the tiny fixtures need; 1 GiB in one allocation or 3 GiB live
    // from an input of at most 1 MiB is the bug class the issue reports.
    if MAX_ALLOC.load(Ordering::Relaxed) == usize::MAX {
        MAX_ALLOC.store(1 << 30, Ordering::Relaxed);
    }
    if MAX_LIVE.load(Ordering::Relaxed) == usize::MAX {
        MAX_LIVE.store(3 << 30, Ordering::Relaxed);
    }
    if let Err(e) = run(&o) {
        eprintln!("fk-fuzz {}: {e}", o.target.name);
        std::process::exit(1);
    }
}

fn run(o: &Opts) -> std::io::Result<()> {
    let t = o.target;
    let crashes = o.out.join("crashes").join(t.name);
    std::fs::create_dir_all(&crashes)?;
    // An input saved by an earlier process that aborted becomes a crash file now.
    let pending = |kind: &str| o.out.join(format!("{}.{kind}.pending", t.name));
    for kind in ["oom", "slow"] {
        let p = pending(kind);
        if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) {
            let bytes = std::fs::read(&p)?;
            let to = crashes.join(format!("{kind}-{:016x}.bin", fnv(&bytes)));
            std::fs::write(&to, &bytes)?;
            eprintln!("fk-fuzz {}: the last run aborted ({kind}); its input is {}", t.name, to.display());
        }
    }
    let oom = File::create(pending("oom"))?;
    let slow = File::create(pending("slow"))?;
    let _ = PENDING.set(Pending { oom, slow });

    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let scratch = base.join(format!("fk-fuzz-{}-{}", t.name, std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    // Panics are caught and recorded, not printed for every input.
    static PANIC_AT: OnceLock<std::sync::Mutex<String>> = OnceLock::new();
    PANIC_AT.get_or_init(Default::default);
    std::panic::set_hook(Box::new(|info| {
        let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if let Some(m) = PANIC_AT.get() {
            if let Ok(mut g) = m.lock() {
                *g = format!("{loc}: {msg}");
            }
        }
    }));

    // The watchdog: one input running past the timeout is saved and the process aborts.
    static STARTED_MS: AtomicU64 = AtomicU64::new(0);
    let t0 = Instant::now();
    let timeout_ms = o.timeout * 1000;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = STARTED_MS.load(Ordering::Acquire);
        if s != 0 && (t0.elapsed().as_millis() as u64).saturating_sub(s) > timeout_ms {
            if let Some(p) = PENDING.get() {
                save_current(&p.slow, "one input ran past --timeout");
            }
            std::process::abort();
        }
    });

    // Saved crashes are not seeds: an input that aborts would end every restart at once.
    let mut corpus: Vec<Vec<u8>> = (t.seeds)();
    let n_seeds = corpus.len();
    let mut m = Mutator { rng: Rng::new(o.seed ^ fnv(t.name.as_bytes())), dict: t.dict };
    let mut seen: HashSet<u64> = HashSet::new();
    let mut found: HashSet<String> = HashSet::new();
    let (mut execs, mut oks) = (0u64, 0u64);
    let deadline = Duration::from_secs_f64(o.seconds);
    let mut last_report = Instant::now();
    while execs < o.execs && t0.elapsed() < deadline {
        // Seeds run unmutated first.
        let input = if (execs as usize) < n_seeds {
            corpus[execs as usize].clone()
        } else {
            let parent = corpus[m.below(corpus.len())].clone();
            m.mutate(&parent, t.shape, &corpus)
        };
        set_current(&input);
        STARTED_MS.store((t0.elapsed().as_millis() as u64).max(1), Ordering::Release);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(&input, &scratch)));
        STARTED_MS.store(0, Ordering::Release);
        CURRENT.len.store(0, Ordering::Release);
        execs += 1;
        let sig = match r {
            Ok(Ok(())) => {
                oks += 1;
                0
            }
            Ok(Err(e)) => signature(&format!("{e:#}"), &scratch),
            Err(_) => {
                let at = PANIC_AT.get().and_then(|m| m.lock().ok().map(|g| g.clone())).unwrap_or_default();
                let key: String = at.split(": ").next().unwrap_or("").to_string();
                if found.insert(key) {
                    let p = crashes.join(format!("panic-{:016x}.bin", fnv(&input)));
                    std::fs::write(&p, &input)?;
                    std::fs::write(p.with_extension("txt"), format!("{at}\n"))?;
                    eprintln!("fk-fuzz {}: PANIC {at} (input {})", t.name, p.display());
                }
                continue;
            }
        };
        if seen.insert(sig) && corpus.len() < 4096 {
            corpus.push(input);
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "fk-fuzz {}: {execs} execs, {:.0}/s, corpus {}, {} outcomes, {} crashes",
                t.name,
                execs as f64 / t0.elapsed().as_secs_f64(),
                corpus.len(),
                seen.len(),
                found.len()
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&scratch);
    for kind in ["oom", "slow"] {
        let _ = std::fs::remove_file(pending(kind));
    }
    // One line the script collects: target, executions, seconds, accepted inputs, outcomes, crashes.
    println!("{}\t{execs}\t{secs:.0}\t{oks}\t{}\t{}\t{}", t.name, seen.len(), corpus.len(), found.len());
    Ok(())
}
