//! NCCL loaded at run time: `libnccl.so.2` (or the file in `FLUX_KERNELS_NCCL`) is opened with
//! dlopen when a run asks for more than one rank, so the binary builds and runs without it. The
//! declarations below are NCCL's C ABI as nccl.h (2.x) gives it; `Comm` is the safe face: every
//! call checked, the error text NCCL gives attached, the communicator aborted (not destroyed) once
//! it has failed, as NCCL asks.
//!
//! The CPU path hands host memory to the collectives: only the emulated NCCL
//! (tools/nccl-emulation/nccl_emulation.c, which exports `flux_kernels_nccl_emulation`) accepts
//! that; real NCCL takes device memory, so `Comm::all_reduce_host` and friends refuse a real
//! library with a message saying so.

use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// nccl.h: `typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;` (128 bytes).
pub const UNIQUE_ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

impl UniqueId {
    pub fn to_bytes(&self) -> [u8; UNIQUE_ID_BYTES] {
        self.internal.map(|c| c as u8)
    }

    pub fn from_bytes(b: &[u8; UNIQUE_ID_BYTES]) -> UniqueId {
        UniqueId { internal: b.map(|c| c as c_char) }
    }
}

/// `ncclResult_t` values (nccl.h).
pub const NCCL_SUCCESS: c_int = 0;
pub const NCCL_IN_PROGRESS: c_int = 7;
/// `ncclDataType_t`: ncclFloat32 (= ncclFloat) and ncclFloat64 (= ncclDouble).
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
/// The host element types the collectives take, with their `ncclDataType_t`.
pub trait Elem: Copy + Default {
    const NCCL: c_int;
}

impl Elem for f32 {
    const NCCL: c_int = NCCL_FLOAT32;
}

impl Elem for f64 {
    const NCCL: c_int = NCCL_FLOAT64;
}

/// `ncclRedOp_t`: ncclSum.
const NCCL_SUM: c_int = 0;

type RawComm = *mut c_void;
type Stream = *mut c_void;

/// The functions used, resolved once from the library.
struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int,
    comm_destroy: unsafe extern "C" fn(RawComm) -> c_int,
    comm_abort: unsafe extern "C" fn(RawComm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> c_int,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, Stream) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
}

/// An opened NCCL library.
pub struct Nccl {
    api: Api,
    version: c_int,
    /// The library is the emulation (host memory, loopback TCP), not NCCL.
    pub emulated: bool,
    pub path: String,
    // Last: the function pointers above must not outlive the mapping.
    _lib: libloading::Library,
}

/// Where NCCL is looked for: `FLUX_KERNELS_NCCL` (a file), else the loader's search path.
pub fn library_name() -> String {
    std::env::var("FLUX_KERNELS_NCCL").unwrap_or_else(|_| "libnccl.so.2".into())
}

const HOW_TO_GET: &str = "install NCCL 2 (the pip wheel `nvidia-nccl-cu13` — its lib/ folder then goes in \
     LD_LIBRARY_PATH —, or the system package libnccl2), or point FLUX_KERNELS_NCCL at libnccl.so.2";

impl Nccl {
    /// Opens NCCL (see `library_name`); the error says what is missing and how to get it.
    pub fn open() -> Result<Nccl> {
        Self::open_named(&library_name())
    }

    /// Opens the NCCL library `name` (a file path or a name the loader searches for).
    pub fn open_named(name: &str) -> Result<Nccl> {
        let name = name.to_string();
        // SAFETY: loading a shared library runs its initialisers; NCCL's (and the emulation's)
        // have no preconditions.
        let lib = unsafe { libloading::Library::new(&name) }.map_err(|e| {
            let why = format!("{:#}", anyhow::Error::from(e));
            anyhow!("more than one rank needs NCCL, and `{name}` cannot be loaded ({why}); {HOW_TO_GET}")
        })?;
        // SAFETY: each symbol is read as the function type nccl.h declares for it (the field's
        // type in `Api`); the pointers live as long as `lib`, which `Nccl` keeps.
        unsafe {
            fn sym<T: Copy>(lib: &libloading::Library, name: &str, n: &str) -> Result<T> {
                // SAFETY: the caller names the symbol's true type.
                unsafe { lib.get::<T>(n.as_bytes()) }
                    .map(|s| *s)
                    .map_err(|e| anyhow!("`{name}` has no `{n}` ({e}): not NCCL 2; {HOW_TO_GET}"))
            }
            let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym(&lib, &name, "ncclGetVersion")?;
            let api = Api {
                get_unique_id: sym(&lib, &name, "ncclGetUniqueId")?,
                comm_init_rank: sym(&lib, &name, "ncclCommInitRank")?,
                comm_destroy: sym(&lib, &name, "ncclCommDestroy")?,
                comm_abort: sym(&lib, &name, "ncclCommAbort")?,
                get_error_string: sym(&lib, &name, "ncclGetErrorString")?,
                // Since NCCL 2.13; older libraries work without the detail it gives.
                get_last_error: sym(&lib, &name, "ncclGetLastError").ok(),
                comm_get_async_error: sym(&lib, &name, "ncclCommGetAsyncError")?,
                all_reduce: sym(&lib, &name, "ncclAllReduce")?,
                broadcast: sym(&lib, &name, "ncclBroadcast")?,
                all_gather: sym(&lib, &name, "ncclAllGather")?,
                group_start: sym(&lib, &name, "ncclGroupStart")?,
                group_end: sym(&lib, &name, "ncclGroupEnd")?,
            };
            let mut version = 0;
            if get_version(&mut version) != NCCL_SUCCESS {
                bail!("`{name}`: ncclGetVersion failed");
            }
            let emulated = lib.get::<*const c_void>(b"flux_kernels_nccl_emulation").is_ok();
            Ok(Nccl { api, version, emulated, path: name, _lib: lib })
        }
    }

    /// "NCCL 2.21.5" or "emulated NCCL 2.21.5 (…path)".
    pub fn describe(&self) -> String {
        let v = self.version;
        // NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9.
        let text = format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
        if self.emulated {
            format!("emulated NCCL {text} ({})", self.path)
        } else {
            format!("NCCL {text} ({})", self.path)
        }
    }

    fn error_text(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let p = unsafe { (self.api.get_error_string)(code) };
        if p.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: a NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// A fresh unique id (rank 0 makes it; the rendezvous hands it to the others).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: `id` is a valid ncclUniqueId to write.
        let r = unsafe { (self.api.get_unique_id)(&mut id) };
        if r != NCCL_SUCCESS {
            bail!("ncclGetUniqueId: {}", self.error_text(r));
        }
        Ok(id)
    }
}

/// One rank's communicator. Dropped: destroyed, or aborted after a failure.
/// The communicator itself, shared by a `Comm`'s clones (the trainer's and, during a step's
/// all-reduce, the engine's).
struct Handle {
    nccl: Arc<Nccl>,
    comm: RawComm,
    failed: AtomicBool,
    /// Held for each call: NCCL takes a communicator's calls one at a time.
    calls: Mutex<()>,
}

// SAFETY: the communicator is an opaque handle that NCCL lets any thread use (not bound to the
// thread that made it); `calls` makes the calls on it one at a time, and `failed` is atomic.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    fn one_call(&self) -> MutexGuard<'_, ()> {
        // A panic while holding it left no state to repair: the guard protects no data.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One rank's communicator; clones share it. Dropped (the last clone): destroyed, or aborted
/// after a failure.
#[derive(Clone)]
pub struct Comm {
    h: Arc<Handle>,
    pub rank: usize,
    pub world: usize,
}

impl Comm {
    /// ncclCommInitRank: blocks until every rank of `world` has joined with `id`.
    pub fn init(nccl: Arc<Nccl>, id: UniqueId, world: usize, rank: usize) -> Result<Comm> {
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator.
        let r = unsafe { (nccl.api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        if r != NCCL_SUCCESS {
            bail!("rank {rank}: ncclCommInitRank ({world} ranks): {}", nccl.error_text(r));
        }
        let h = Handle { nccl, comm, failed: AtomicBool::new(false), calls: Mutex::new(()) };
        Ok(Comm { h: Arc::new(h), rank, world })
    }

    /// A failed call's error: NCCL's text, its last-error detail when it has one, and the
    /// communicator's async error; the communicator is marked for abort.
    fn check(&self, what: &str, r: c_int) -> Result<()> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        self.h.failed.store(true, Ordering::SeqCst);
        let mut msg = format!("rank {}: {what}: {}", self.rank, self.h.nccl.error_text(r));
        if let Some(last) = self.h.nccl.api.get_last_error {
            // SAFETY: a NUL-terminated string owned by the library (or null).
            let p = unsafe { last(self.h.comm) };
            if !p.is_null() {
                let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
                if !s.is_empty() {
                    msg.push_str(&format!(" ({s})"));
                }
            }
        }
        Err(anyhow!(msg))
    }

    /// The library is the emulation (host memory): see the module note.
    pub fn emulated(&self) -> bool {
        self.h.nccl.emulated
    }

    /// The library behind this communicator, as `Nccl::describe` says it.
    pub fn library(&self) -> String {
        self.h.nccl.describe()
    }

    /// Whether `other` is a clone of this communicator.
    pub fn same(&self, other: &Comm) -> bool {
        Arc::ptr_eq(&self.h, &other.h)
    }

    /// After a failure seen outside NCCL (a timeout): the communicator is aborted when dropped.
    pub fn mark_failed(&self) {
        self.h.failed.store(true, Ordering::SeqCst);
    }

    /// The communicator's asynchronous error (a peer lost, a network failure), if any.
    pub fn async_error(&self) -> Result<()> {
        let _one = self.h.one_call();
        let mut e = NCCL_SUCCESS;
        // SAFETY: `e` receives the state.
        let r = unsafe { (self.h.nccl.api.comm_get_async_error)(self.h.comm, &mut e) };
        self.check("ncclCommGetAsyncError", r)?;
        if e != NCCL_SUCCESS && e != NCCL_IN_PROGRESS {
            return self.check("asynchronous error", e);
        }
        Ok(())
    }

    fn host_only(&self, what: &str) -> Result<()> {
        if !self.h.nccl.emulated {
            bail!(
                "{what} on host memory needs the emulated NCCL (tools/nccl-emulation), and {} is the real \
                 library, which takes device memory: train across ranks with --device cuda",
                self.h.nccl.describe()
            );
        }
        Ok(())
    }

    /// In-place sum over the ranks of host f32 values (emulated NCCL only, see the module note).
    pub fn all_reduce_host(&self, buf: &mut [f32]) -> Result<()> {
        self.host_only("an all-reduce")?;
        let _one = self.h.one_call();
        let p = buf.as_mut_ptr() as *mut c_void;
        // SAFETY: in place, `buf.len()` f32 values; the emulation is synchronous on host memory.
        let r = unsafe {
            (self.h.nccl.api.all_reduce)(p, p, buf.len(), NCCL_FLOAT32, NCCL_SUM, self.h.comm, std::ptr::null_mut())
        };
        self.check("ncclAllReduce", r)
    }

    /// Every rank's `send` (all the same length), in rank order (emulated NCCL only).
    pub fn all_gather_host<T: Elem>(&self, send: &[T]) -> Result<Vec<T>> {
        self.host_only("an all-gather")?;
        let _one = self.h.one_call();
        let mut out = vec![T::default(); send.len() * self.world];
        // SAFETY: `out` holds world × send.len() values of the type NCCL is told.
        let r = unsafe {
            (self.h.nccl.api.all_gather)(
                send.as_ptr() as *const c_void,
                out.as_mut_ptr() as *mut c_void,
                send.len(),
                T::NCCL,
                self.h.comm,
                std::ptr::null_mut(),
            )
        };
        self.check("ncclAllGather", r)?;
        Ok(out)
    }

    /// Rank `root`'s values into every rank's `buf` (emulated NCCL only).
    pub fn broadcast_host(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.host_only("a broadcast")?;
        let _one = self.h.one_call();
        let p = buf.as_mut_ptr() as *mut c_void;
        // SAFETY: in place, `buf.len()` values on every rank.
        let r = unsafe {
            (self.h.nccl.api.broadcast)(p, p, buf.len(), NCCL_FLOAT32, root as c_int, self.h.comm, std::ptr::null_mut())
        };
        self.check("ncclBroadcast", r)
    }

    /// In-place sum of `count` f32 values of device memory at `ptr`, enqueued on `stream`.
    ///
    /// # Safety
    /// `ptr` is device memory of at least `count` f32 values on this rank's device, live until
    /// the stream has run the collective; `stream` a CUDA stream of that device's context.
    pub unsafe fn all_reduce_device(&self, ptr: u64, count: usize, stream: *mut c_void) -> Result<()> {
        let _one = self.h.one_call();
        let p = ptr as *mut c_void;
        let r = (self.h.nccl.api.all_reduce)(p, p, count, NCCL_FLOAT32, NCCL_SUM, self.h.comm, stream);
        self.check("ncclAllReduce", r)
    }

    /// Every rank's `count` f32 values at `send` into `recv` ([world × count], rank order),
    /// enqueued on `stream`.
    ///
    /// # Safety
    /// `send` holds `count` and `recv` world × `count` f32 values of this rank's device memory,
    /// live until the stream has run the collective; `stream` as in `all_reduce_device`.
    pub unsafe fn all_gather_device(&self, send: u64, recv: u64, count: usize, stream: *mut c_void) -> Result<()> {
        let _one = self.h.one_call();
        let r = (self.h.nccl.api.all_gather)(
            send as *const c_void,
            recv as *mut c_void,
            count,
            NCCL_FLOAT32,
            self.h.comm,
            stream,
        );
        self.check("ncclAllGather", r)
    }

    /// The collectives `calls` enqueues as one group (ncclGroupStart … ncclGroupEnd): NCCL launches
    /// them together, one kernel for a bucket of tensors instead of one per tensor. The group is
    /// closed even when a call fails (an open group would swallow the next collectives).
    pub fn group(&self, calls: impl FnOnce() -> Result<()>) -> Result<()> {
        // SAFETY: no arguments; the group is per thread.
        self.check("ncclGroupStart", unsafe { (self.h.nccl.api.group_start)() })?;
        let inner = calls();
        // SAFETY: closes the group opened above.
        let end = self.check("ncclGroupEnd", unsafe { (self.h.nccl.api.group_end)() });
        inner.and(end)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the communicator is live; after a failure NCCL wants ncclCommAbort, which does
        // not wait for peers that may be gone.
        unsafe {
            if self.failed.load(Ordering::SeqCst) {
                (self.nccl.api.comm_abort)(self.comm);
            } else {
                (self.nccl.api.comm_destroy)(self.comm);
            }
        }
    }
}
