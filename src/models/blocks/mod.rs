//! The building blocks the SD UNet and the autoencoders share (ResNet blocks,
//! the spatial transformer, the autoencoder's attention), owned here rather
//! than taken from candle-transformers so that each can run our fused kernels
//! (`src/kernels`) in place of candle's chains of ops. Parameter names are
//! diffusers' own, so diffusers folders load unchanged.
//!
//! What a block runs is fixed when it is built, by [`Kernels`]: candle's ops
//! chained as candle-transformers chains them, or our fused ops. The two
//! compute the same function; `tests/fused_pipelines.rs` runs the tiny
//! pipelines both ways on the CPU (the fused ops' CPU references) and
//! compares the images.

pub mod attention;
pub mod conv;
pub mod norm;
pub mod resnet;
pub mod transformer;

use candle_core::{DType, Device, Result, Tensor};

/// Which implementation of the fusable op chains a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// candle's ops, chained as candle-transformers chains them (attention
    /// upcast to f32, as candle's SD attention does).
    Candle,
    /// Our fused ops: GroupNorm+SiLU, GEGLU, attention without the score
    /// matrix (tensor cores for f16/bf16 on CUDA). On the CPU their
    /// references run, which are written for clarity, not speed.
    Fused,
}

impl Kernels {
    /// The default on `device`: fused on CUDA; on the CPU candle's ops,
    /// measured faster there (`benches/executor.rs`, README "GPU"). The
    /// environment variable `RAFTGEN_KERNELS` (`fused` or `candle`) overrides
    /// both, for comparisons.
    pub fn for_device(device: &Device) -> Self {
        match std::env::var("RAFTGEN_KERNELS").as_deref() {
            Ok("fused") => return Kernels::Fused,
            Ok("candle") => return Kernels::Candle,
            _ => {}
        }
        if device.is_cuda() {
            Kernels::Fused
        } else {
            Kernels::Candle
        }
    }
}

/// `softmax(q kᵀ · scale) v` for q [B, H, Lq, D], k and v [B, H, Lk, D].
pub fn attention(kernels: Kernels, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => crate::kernels::attention(q, k, v, scale),
        Kernels::Candle => {
            let in_dtype = q.dtype();
            let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
            let scores = q.matmul(&(k.t()? * scale)?)?;
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?.to_dtype(in_dtype)
        }
    }
}
