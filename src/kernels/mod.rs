//! Fused kernels: candle custom ops doing in one pass what the pipelines do
//! with several candle ops, each of which reads and writes a whole tensor in
//! GPU memory. Diffusion denoisers are largely memory-bound outside their
//! matmuls and convolutions, so fewer passes is where the time goes.
//!
//! Each op is a candle `CustomOp` with
//! - a CPU reference (`cpu_fwd`): f32 arithmetic written to read like the
//!   unfused math (f16/bf16 inputs are computed in f32 and rounded once), which
//!   the tests compare with the unfused candle ops;
//! - with the `cuda` feature, a CUDA C kernel (`*.cu` beside this file, after
//!   the shared `common.cuh`) compiled once per process with NVRTC through
//!   candle's re-export of cudarc, loaded per device with candle's
//!   `get_or_load_custom_func` and launched on candle's stream: f32, f16 and
//!   bf16, computing in f32. Inputs must be contiguous (the public functions
//!   make them so); the ops return an error otherwise.
//!
//! The models call them through `models::blocks::Kernels` (fused on CUDA,
//! candle's ops on the CPU, where they are as fast; docs/gpu.md):
//! - [`group_norm_silu()`]: `silu(GroupNorm(x))`, twice in every ResNet block
//!   of the UNet and the autoencoder (`models::blocks::resnet`) and at the
//!   UNet's and decoder's output norms.
//! - [`guided_step()`]: the guidance combine and `Scheduler::step` of each
//!   denoising step, with the scalars of `Scheduler::linear_step`: SD rows
//!   `[uncond, cond]` ([`Guidance::UncondFirst`]), Z-Image rows `[cond,
//!   uncond]` ([`Guidance::CondFirst`]) with the step's `model_output`
//!   coefficient negated (Z-Image steps with the negated prediction).
//! - [`geglu()`]: the feed-forward gate of the UNet's transformer blocks.
//! - [`attention()`] / [`attention_bshd()`]: `softmax(Q Kᵀ · scale) V` without
//!   the score matrix; on CUDA for f16/bf16 on the tensor cores (mma.sync),
//!   the second reading the tokens-major layout the projections produce.
//! - [`conv2d()`] through [`im2col()`]: the convolutions on CUDA.
//! - [`rms_norm_rope()`]: Z-Image's QK-norm and rotary embedding in one pass.

mod attention;
#[cfg(feature = "cuda")]
mod cuda;
mod geglu;
mod group_norm_silu;
mod guided_step;
mod im2col;
mod rms_norm_rope;

pub use attention::{attention, attention_bshd, attention_with, Attention, AttentionBshd, AttentionKernel};
pub use geglu::{geglu, Geglu, Gelu};
pub use group_norm_silu::{group_norm_silu, GroupNormSilu};
pub use guided_step::{guided_step, Guidance, GuidedStep};
pub use im2col::{conv2d, im2col, Im2Col};
pub use rms_norm_rope::{rms_norm_rope, RmsNormRope};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, WithDType};

/// The contiguous elements of `storage` under `layout`, as f32.
fn cpu_f32(op: &str, storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: inputs must be contiguous");
    };
    fn convert<T: WithDType>(v: &[T]) -> Vec<f32> {
        v.iter().map(|x| x.to_f64() as f32).collect()
    }
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::F16(v) => convert(&v[start..end]),
        CpuStorage::BF16(v) => convert(&v[start..end]),
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// `values` rounded once to the dtype of `like` (an input of the op).
fn cpu_store_like(values: Vec<f32>, like: &CpuStorage) -> Result<CpuStorage> {
    fn convert<T: WithDType>(_like: &[T], v: Vec<f32>) -> CpuStorage {
        T::to_cpu_storage_owned(v.into_iter().map(|x| T::from_f64(x as f64)).collect())
    }
    Ok(match like {
        CpuStorage::F32(_) => CpuStorage::F32(values),
        CpuStorage::F16(l) => convert(l, values),
        CpuStorage::BF16(l) => convert(l, values),
        other => bail!("unsupported dtype {:?}", other.dtype()),
    })
}

/// The output buffer of a CPU reference: NaN until written, so an element a
/// kernel forgets to write shows up in the comparison.
fn cpu_output(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Checks that all inputs of an op share one dtype, returning it.
fn same_dtype(op: &str, dtypes: &[DType]) -> Result<DType> {
    let first = dtypes[0];
    if let Some(other) = dtypes.iter().find(|&&d| d != first) {
        bail!("{op}: inputs must share one dtype, got {first:?} and {other:?}");
    }
    Ok(first)
}

#[cfg(test)]
mod test_util {
    use candle_core::{DType, Device, Result, Tensor};
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// A standard normal tensor from a fixed seed, so failures reproduce.
    pub fn randn(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, device)
    }

    /// Normwise relative error: `max |got - want| / max(max |want|, 1e-12)`
    /// over all elements, in f32 on the CPU. A NaN or infinity in `got` (an
    /// element the kernel never wrote stays NaN) counts as infinite error.
    pub fn rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
        assert_eq!(got.dims(), want.dims(), "shapes differ");
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let want = want.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if got.iter().any(|x| !x.is_finite()) {
            return Ok(f32::INFINITY);
        }
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        Ok(diff / scale)
    }

    /// The GPU tests' dtypes and their relative-error bounds.
    #[cfg(feature = "cuda")]
    pub const GPU_TOLERANCES: [(DType, f32); 3] = [(DType::F32, 1e-3), (DType::F16, 1e-2), (DType::BF16, 1e-2)];

    /// The first CUDA device, or `None` (with a message) where there is none.
    #[cfg(feature = "cuda")]
    pub fn cuda_device() -> Option<Device> {
        match std::panic::catch_unwind(|| Device::new_cuda(0)) {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                eprintln!("skipping: no CUDA device ({e})");
                None
            }
            Err(_) => {
                eprintln!("skipping: no CUDA driver");
                None
            }
        }
    }
}
