//! Replays every input the fuzzer (tools/fuzz.sh) ever found a crash with, kept under
//! tests/fuzz-crashes/<target>/, through the same target code, and checks that each now ends in
//! a clean run or an error: no panic, and no allocation out of proportion to the input (this
//! binary's allocator refuses any single allocation over 1 GiB, which aborts the test binary).
//! Also runs every target's seeds, which must be accepted: a harness that cannot reach past the
//! first check would fuzz nothing.

// The mutation side of the targets (shapes, dictionaries) is the fuzzer's, unused here.
#[allow(dead_code)]
#[path = "../tools/fuzz/targets.rs"]
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};

struct Capped;

// SAFETY: forwards to the system allocator; refuses (null) single allocations over 1 GiB.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > 1 << 30 {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > 1 << 30 {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fk-fuzz-regress-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_target_accepts_its_seeds() {
    for t in targets::TARGETS {
        let dir = scratch(t.name);
        for (i, s) in (t.seeds)().iter().enumerate() {
            if let Err(e) = (t.run)(s, &dir) {
                panic!("fuzz target {}: seed {i} is rejected, so mutants of it test little: {e:#}", t.name);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn crashes_found_by_the_fuzzer_stay_fixed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashes");
    let mut failures = Vec::new();
    let mut n = 0;
    for t in targets::TARGETS {
        let Ok(rd) = std::fs::read_dir(root.join(t.name)) else { continue };
        let dir = scratch(t.name);
        let mut files: Vec<_> =
            rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "bin")).collect();
        files.sort();
        for f in files {
            let input = std::fs::read(&f).unwrap();
            n += 1;
            let started = std::time::Instant::now();
            let r = std::panic::catch_unwind(|| (t.run)(&input, &dir));
            if r.is_err() {
                failures.push(format!("{}: panics", f.display()));
            } else if started.elapsed().as_secs() > 20 {
                failures.push(format!("{}: took {:.0} s", f.display(), started.elapsed().as_secs_f64()));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    assert!(failures.is_empty(), "{} of {n} saved fuzz crashes fail:\n{}", failures.len(), failures.join("\n"));
}
