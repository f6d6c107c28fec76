//! What every kernel wrapper shares: loading a family's module from the embedded fatbins, one
//! launch helper, and typed, length-checked views of device memory. No public function of
//! `kernels` takes a raw device address: the wrappers take `View`s (a borrowed buffer, an offset
//! and a length) and check that every view covers what the launch will touch before it goes.

use super::abi::FkTensorMap;
use super::gpu::Gpu;
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::bf16;
use std::ops::Range;
use std::sync::Arc;

/// One kernels/*.cu module, loaded on the context of a `Gpu`.
pub(crate) struct Family {
    pub stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    name: &'static str,
}

impl Family {
    pub fn load(gpu: &Gpu, name: &'static str) -> Result<Family> {
        let fatbin = super::module(name).with_context(|| format!("{name} kernels missing from the build"))?;
        let module = gpu
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
            .with_context(|| format!("loading kernels/{name}.cu"))?;
        Ok(Family { stream: gpu.stream.clone(), module, name })
    }

    pub fn function(&self, kernel: &str) -> Result<CudaFunction> {
        self.module.load_function(kernel).with_context(|| format!("kernel {kernel} in kernels/{}.cu", self.name))
    }

    /// A kernel that takes `smem` bytes of dynamic shared memory (above 48 KiB it must say so).
    pub fn function_smem(&self, kernel: &str, smem: usize) -> Result<CudaFunction> {
        let f = self.function(kernel)?;
        if smem > 48 * 1024 {
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .with_context(|| format!("{kernel}: {smem} bytes of shared memory (sm_80 or newer needed)"))?;
        }
        Ok(f)
    }
}

/// A family of one grid-stride kernel of FK_MODEL_THREADS-thread blocks (copy, embedding,
/// random): its module and its function.
pub(crate) struct OneKernel {
    pub fam: Family,
    f: CudaFunction,
}

impl OneKernel {
    pub fn load(gpu: &Gpu, module: &'static str, kernel: &str) -> Result<OneKernel> {
        let fam = Family::load(gpu, module)?;
        Ok(OneKernel { f: fam.function(kernel)?, fam })
    }

    /// Launches the kernel over `n` elements.
    ///
    /// # Safety
    /// As `launch`.
    pub unsafe fn run<P: DeviceRepr>(&self, p: &P, n: usize, name: &str) -> Result<()> {
        let threads = super::abi::FK_MODEL_THREADS as usize;
        // SAFETY: the caller's contract.
        unsafe { launch(&self.fam.stream, &self.f, p, (grid_blocks(n, threads), 1, 1), threads, 0, name) }
    }
}

/// Launches `f` on `stream` with its one argument, the FK_GRID_PARAMS struct `p`, on a grid of
/// `threads`-thread blocks.
///
/// # Safety
/// `p` must be the parameter struct `f` was compiled for (the layouts are asserted in abi.rs), and
/// every device address in it must point into a live buffer on this context large enough for
/// everything the kernel reads and writes at the shapes `p` carries. The wrappers establish this
/// from their `View`s before they call it.
pub(crate) unsafe fn launch<P: DeviceRepr>(
    stream: &Arc<CudaStream>,
    f: &CudaFunction,
    p: &P,
    grid: (usize, usize, usize),
    threads: usize,
    smem: usize,
    name: &str,
) -> Result<()> {
    ensure!(
        grid.0 <= u32::MAX as usize && grid.1 <= 65535 && grid.2 <= 65535,
        "{name}: grid {grid:?} exceeds the device's limits"
    );
    if super::trace::launched(name) {
        return Ok(()); // a dry run: recorded, not run
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut b = stream.launch_builder(f);
    b.arg(p);
    // SAFETY: the caller's contract above.
    unsafe { b.launch(cfg) }.with_context(|| name.to_string())?;
    Ok(())
}

/// A window of a device buffer: elements `off .. off + len` of `buf`. It borrows the buffer, so
/// the buffer cannot be freed while a view of it is being handed to a launch.
#[derive(Debug)]
pub struct View<'a, T> {
    buf: &'a CudaSlice<T>,
    off: usize,
    len: usize,
}

impl<T> Clone for View<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for View<'_, T> {}

impl<'a, T> From<&'a CudaSlice<T>> for View<'a, T> {
    fn from(buf: &'a CudaSlice<T>) -> Self {
        View { buf, off: 0, len: buf.len() }
    }
}

impl<'a, T> View<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `r` of this view.
    pub fn slice(self, r: Range<usize>) -> Result<View<'a, T>> {
        ensure!(r.start <= r.end && r.end <= self.len, "device view: elements {r:?} outside its {}", self.len);
        Ok(View { buf: self.buf, off: self.off + r.start, len: r.len() })
    }

    /// The elements from `start` to the end.
    pub fn tail(self, start: usize) -> Result<View<'a, T>> {
        self.slice(start..self.len)
    }

    /// Errors unless the view holds at least `n` elements (`what` names the operand).
    pub(crate) fn need(&self, n: usize, what: &str) -> Result<()> {
        ensure!(self.len >= n, "{what}: {n} elements needed, the device buffer holds {}", self.len);
        Ok(())
    }

    /// The device address of the first element.
    pub(crate) fn addr(&self, stream: &Arc<CudaStream>) -> u64 {
        let (p, _sync) = self.buf.device_ptr(stream);
        p + (self.off * std::mem::size_of::<T>()) as u64
    }
}

/// A matrix of f32 or bf16 elements, row-major with row stride `ld` (elements): a column block of
/// a wider matrix is a view starting at its first column with the wider matrix's `ld`.
#[derive(Clone, Copy, Debug)]
pub enum DevMat<'a> {
    F32(View<'a, f32>, usize),
    Bf16(View<'a, bf16>, usize),
}

impl<'a> DevMat<'a> {
    pub fn f32(v: impl Into<View<'a, f32>>, ld: usize) -> DevMat<'a> {
        DevMat::F32(v.into(), ld)
    }

    pub fn bf16(v: impl Into<View<'a, bf16>>, ld: usize) -> DevMat<'a> {
        DevMat::Bf16(v.into(), ld)
    }

    /// A matrix of any element type.
    pub fn of<T: Elem>(v: impl Into<View<'a, T>>, ld: usize) -> DevMat<'a> {
        T::mat(v.into(), ld)
    }

    pub fn is_bf16(&self) -> bool {
        matches!(self, DevMat::Bf16(..))
    }

    pub fn ld(&self) -> usize {
        match *self {
            DevMat::F32(_, ld) | DevMat::Bf16(_, ld) => ld,
        }
    }

    /// Checks that a [rows, cols] window fits (row stride and length) and returns its address.
    pub(crate) fn window(&self, rows: usize, cols: usize, what: &str, stream: &Arc<CudaStream>) -> Result<u64> {
        let ld = self.ld();
        ensure!(ld >= cols, "{what}: row stride {ld} is below the {cols} columns");
        let need = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        match self {
            DevMat::F32(v, _) => {
                v.need(need, what)?;
                Ok(v.addr(stream))
            }
            DevMat::Bf16(v, _) => {
                v.need(need, what)?;
                Ok(v.addr(stream))
            }
        }
    }
}

/// Blocks of a grid-stride launch of `threads`-thread blocks over `n` elements (capped: the
/// kernels stride over the rest).
pub(crate) fn grid_blocks(n: usize, threads: usize) -> usize {
    n.div_ceil(threads).clamp(1, 65535 * 8)
}

/// Errors unless the device buffer `s` holds at least `n` elements (`what` names the operand).
pub(crate) fn need<T>(s: &CudaSlice<T>, n: usize, what: &str) -> Result<()> {
    ensure!(s.len() >= n, "{what}: {n} elements needed, the device buffer holds {}", s.len());
    Ok(())
}

/// The device address of a whole buffer.
pub(crate) fn addr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// The element types of the device tensors: f32, and bf16 (round to nearest even).
pub trait Elem: DeviceRepr + Copy + Default + std::fmt::Debug + 'static {
    /// The kernels' flag: true for bf16.
    const BF16: bool;
    /// A value that shows where a kernel left an output unwritten.
    const NAN: Self;
    /// A matrix of this element type.
    fn mat(v: View<'_, Self>, ld: usize) -> DevMat<'_>;
}

impl Elem for f32 {
    const BF16: bool = false;
    const NAN: f32 = f32::NAN;
    fn mat(v: View<'_, f32>, ld: usize) -> DevMat<'_> {
        DevMat::F32(v, ld)
    }
}

impl Elem for bf16 {
    const BF16: bool = true;
    const NAN: bf16 = bf16::NAN;
    fn mat(v: View<'_, bf16>, ld: usize) -> DevMat<'_> {
        DevMat::Bf16(v, ld)
    }
}

/// A TMA descriptor (cuTensorMapEncodeTiled) over a bf16 tensor of `dims` elements (innermost
/// first) at device address `ptr`, `strides` elements between consecutive indices of dims 1 and
/// 2, read in boxes of `boxd` = [columns, rows] × 1, 128-byte swizzled: a box's columns must be
/// 64 (128 bytes, the swizzle's span). Elements outside the tensor arrive as zeros, which the
/// Hopper kernels rely on for ragged edges and for LoRA factors narrower than a tile.
/// The kernels' rank-3 copies (kernels/ptx_sm90.h tma_load_3d) take 2-D tensors as [c, r, 1].
pub(crate) fn tensor_map_bf16(
    ptr: u64,
    dims: [usize; 3],
    strides: [usize; 2],
    boxd: [usize; 2],
) -> Result<FkTensorMap> {
    use cudarc::driver::sys::{
        cuTensorMapEncodeTiled, CUresult, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill,
        CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    ensure!(ptr.is_multiple_of(16), "TMA descriptor: tensor address {ptr:#x} is not 16-byte aligned");
    ensure!(boxd[0] == 64 && (1..=256).contains(&boxd[1]), "TMA descriptor: box {boxd:?} is not 64 × 1..256");
    for (i, s) in strides.iter().enumerate() {
        ensure!((s * 2).is_multiple_of(16), "TMA descriptor: stride {i} of {s} elements is not a multiple of 16 bytes");
    }
    ensure!(dims.iter().all(|&d| d > 0 && d <= u32::MAX as usize), "TMA descriptor: dims {dims:?} out of range");
    let gdim: [u64; 3] = dims.map(|d| d as u64);
    let gstride: [u64; 2] = strides.map(|s| (s * 2) as u64);
    let boxd: [u32; 3] = [boxd[0] as u32, boxd[1] as u32, 1];
    let estride: [u32; 3] = [1, 1, 1];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every array has `rank` (3) entries, strides rank − 1; `map` is a writable,
    // suitably aligned CUtensorMap; the driver only encodes (it reads no device memory).
    let r = unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut std::ffi::c_void,
            gdim.as_ptr(),
            gstride.as_ptr(),
            boxd.as_ptr(),
            estride.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    ensure!(r == CUresult::CUDA_SUCCESS, "cuTensorMapEncodeTiled over {dims:?}: {r:?}");
    // SAFETY: initialised by the successful call above (and zeroed before it).
    Ok(FkTensorMap { opaque: unsafe { map.assume_init() }.opaque })
}
