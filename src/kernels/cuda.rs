//! What the CUDA halves of the ops share: NVRTC compilation (once per
//! process and module), contiguous input views, and output allocation.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{result, CudaSlice, CudaView, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, Layout, Result};

/// One `.cu` source, compiled to PTX on first use.
pub(crate) struct Module {
    /// The name candle caches the loaded module under (per device).
    pub name: &'static str,
    src: &'static str,
    /// NVRTC's `--gpu-architecture` (its default when `None`).
    arch: Option<&'static str>,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Module {
    pub(crate) const fn new(name: &'static str, src: &'static str) -> Self {
        Module { name, src, arch: None, ptx: OnceLock::new() }
    }

    /// A module whose PTX targets `arch` (e.g. `compute_80`), for
    /// instructions the default target lacks.
    pub(crate) const fn with_arch(name: &'static str, src: &'static str, arch: &'static str) -> Self {
        Module { name, src, arch: Some(arch), ptx: OnceLock::new() }
    }

    /// The module's PTX, compiled by NVRTC for the driver to JIT to the
    /// device at load; a compile error is kept and returned on every call.
    pub(crate) fn ptx(&self) -> Result<&str> {
        let ptx = self.ptx.get_or_init(|| {
            let opts =
                CompileOptions { name: Some(format!("{}.cu", self.name)), arch: self.arch, ..Default::default() };
            compile_ptx_with_opts(self.src, opts).map(|p| p.to_src()).map_err(|e| e.to_string())
        });
        match ptx {
            Ok(p) => Ok(p),
            Err(e) => bail!("compiling {}.cu with NVRTC: {e}", self.name),
        }
    }
}

/// The view of a contiguous input, or an error naming the op.
pub(crate) fn view<'a, T>(op: &str, slice: &'a CudaSlice<T>, layout: &Layout) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!("{op}: inputs must be contiguous"),
    }
}

/// An output buffer of `n` elements. In tests it is filled with NaN first
/// (all bits set is a NaN in f32, f16 and bf16), so an element the kernel
/// does not write fails the comparison.
pub(crate) fn alloc_output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel launched next (which the
    // tests check by this poisoning).
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if cfg!(test) && n > 0 {
        let stream = dev.cuda_stream();
        let bytes = out.num_bytes();
        let (ptr, _sync) = out.device_ptr_mut(&stream);
        // SAFETY: `ptr` points at `bytes` bytes owned by `out`, on this stream.
        unsafe { result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }.w()?;
    }
    Ok(out)
}

/// Blocks for a grid-stride loop over `n` elements with `threads` per block.
pub(crate) fn grid_for(n: usize, threads: u32) -> u32 {
    (n.div_ceil(threads as usize)).clamp(1, 65_535 * 8) as u32
}
