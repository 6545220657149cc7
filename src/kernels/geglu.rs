//! GEGLU (Shazeer 2020), the feed-forward gate of the UNet's transformer
//! blocks: the projection's output is split in two along the last dimension
//! and the first half multiplied by the GELU of the second. Fused, that is one
//! read of the projection and one write of half its size, where chunk, gelu
//! and mul make three passes and two copies of the halves.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{cpu_f32, cpu_output, cpu_store_like};

/// Which GELU.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`: candle's `Tensor::gelu`,
    /// which candle's SD `GeGlu` (and so our UNet) uses.
    Tanh,
    /// `0.5 x (1 + erf(x / √2))`: candle's `gelu_erf`, diffusers' default.
    Erf,
}

impl Gelu {
    fn apply(self, v: f32) -> f32 {
        match self {
            Gelu::Tanh => {
                let sqrt_two_over_pi = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * v * (1.0 + (sqrt_two_over_pi * v * (1.0 + 0.044715 * v * v)).tanh())
            }
            Gelu::Erf => (0.5 * v as f64 * (1.0 + erf(v as f64 / std::f64::consts::SQRT_2))) as f32,
        }
    }
}

/// The error function, to 1.2e-7 (Numerical Recipes' `erfc` by Chebyshev
/// fit), enough for an f32 reference.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// The op: input [..., 2h], output [..., h].
#[derive(Copy, Clone, Debug)]
pub struct Geglu {
    pub gelu: Gelu,
}

/// `a * gelu(b)` where `[a, b] = proj.chunk(2, last dim)`, for `proj`
/// [..., 2h] in f32, f16 or bf16: the output is [..., h].
pub fn geglu(proj: &Tensor, gelu: Gelu) -> Result<Tensor> {
    proj.contiguous()?.apply_op1_no_bwd(&Geglu { gelu })
}

impl Geglu {
    /// The output shape and its last dimension `h`.
    fn out_shape(&self, layout: &Layout) -> Result<(Shape, usize)> {
        let mut dims = layout.dims().to_vec();
        match dims.last_mut() {
            Some(last) if last.is_multiple_of(2) && *last > 0 => {
                *last /= 2;
                let h = *last;
                Ok((Shape::from(dims), h))
            }
            _ => bail!("geglu: the last dimension must be even and non-zero, got {:?}", layout.dims()),
        }
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, h) = self.out_shape(layout)?;
        let p = cpu_f32(self.name(), storage, layout)?;
        let mut y = cpu_output(shape.elem_count());
        for (row, out) in p.chunks(2 * h).zip(y.chunks_mut(h)) {
            let (a, b) = row.split_at(h);
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a * self.gelu.apply(b);
            }
        }
        Ok((cpu_store_like(y, storage)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let (shape, h) = self.out_shape(layout)?;
        let n = shape.elem_count();
        let out = match &storage.slice {
            S::F32(p) => gpu::launch(self, storage, p, layout, n, h, "f32")?,
            S::F16(p) => gpu::launch(self, storage, p, layout, n, h, "f16")?,
            S::BF16(p) => gpu::launch(self, storage, p, layout, n, h, "bf16")?,
            _ => bail!("geglu: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(storage)),
        };
        Ok((out, shape))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    use super::{Geglu, Gelu};
    use crate::kernels::cuda::{alloc_output, grid_for, view, Module};

    static MODULE: Module = Module::new("raftgen_geglu", concat!(include_str!("common.cuh"), include_str!("geglu.cu")));
    const THREADS: u32 = 256;

    pub(super) fn launch<T: DeviceRepr + CudaDType>(
        op: &Geglu,
        storage: &CudaStorage,
        p: &CudaSlice<T>,
        layout: &Layout,
        n: usize,
        h: usize,
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = &storage.device;
        let p = view("geglu", p, layout)?;
        let mut y = alloc_output::<T>(dev, n)?;
        if n > 0 {
            let func = dev.get_or_load_custom_func(&format!("geglu_{suffix}"), MODULE.name, MODULE.ptx()?)?;
            let (n64, h64, erf) = (n as u64, h as u64, (op.gelu == Gelu::Erf) as i32);
            let mut b = func.builder();
            b.arg(&p).arg(&mut y).arg(&n64).arg(&h64).arg(&erf);
            let cfg = LaunchConfig {
                grid_dim: (grid_for(n, THREADS), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match geglu_* in geglu.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(y, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, D};

    use super::{geglu, Gelu};
    use crate::kernels::test_util::{randn, rel_err};

    /// candle's SD `GeGlu::forward` after its projection.
    fn unfused(proj: &Tensor, gelu: Gelu) -> Result<Tensor> {
        let halves = proj.chunk(2, D::Minus1)?;
        let gate = match gelu {
            Gelu::Tanh => halves[1].gelu()?,
            Gelu::Erf => halves[1].gelu_erf()?,
        };
        &halves[0] * gate
    }

    /// SD's [B, tokens, 2 * 4 * 320] and odd sizes.
    const SHAPES: &[&[usize]] = &[&[2, 64, 2560], &[1, 7, 2 * 37], &[3, 2], &[2, 3, 5, 18], &[1, 1031, 6]];

    #[test]
    fn cpu_reference_matches_unfused_ops() -> Result<()> {
        for (k, shape) in SHAPES.iter().enumerate() {
            let proj = (randn(shape, k as u64, &Device::Cpu)? * 2.0)?;
            for gelu in [Gelu::Tanh, Gelu::Erf] {
                let err = rel_err(&geglu(&proj, gelu)?, &unfused(&proj, gelu)?)?;
                assert!(err <= 1e-4, "{shape:?} {gelu:?}: relative error {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_strided_and_bad_inputs() -> Result<()> {
        let proj = randn(&[2, 9, 40], 5, &Device::Cpu)?;
        let want = unfused(&proj, Gelu::Tanh)?;
        for dtype in [DType::F16, DType::BF16] {
            let got = geglu(&proj.to_dtype(dtype)?, Gelu::Tanh)?;
            assert_eq!((got.dtype(), got.dims()), (dtype, &[2, 9, 20][..]));
            let err = rel_err(&got, &want)?;
            assert!(err <= 1e-2, "{dtype:?}: relative error {err}");
        }
        let strided = randn(&[40, 9], 6, &Device::Cpu)?.t()?;
        let err = rel_err(&geglu(&strided, Gelu::Tanh)?, &unfused(&strided, Gelu::Tanh)?)?;
        assert!(err <= 1e-4, "transposed input: relative error {err}");
        assert!(geglu(&randn(&[2, 5], 1, &Device::Cpu)?, Gelu::Tanh).is_err(), "odd last dimension");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_unfused_ops() -> Result<()> {
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        let shapes = SHAPES.iter().copied().chain([&[2usize, 4096, 2560][..], &[1, 77, 2 * 1283][..]]);
        for (k, shape) in shapes.enumerate() {
            let proj = (randn(shape, k as u64, &Device::Cpu)? * 2.0)?;
            for (dtype, tolerance) in GPU_TOLERANCES {
                let proj = proj.to_dtype(dtype)?;
                for gelu in [Gelu::Tanh, Gelu::Erf] {
                    let want = unfused(&proj.to_dtype(DType::F32)?, gelu)?;
                    let got = geglu(&proj.to_device(&gpu)?, gelu)?;
                    let err = rel_err(&got, &want)?;
                    assert!(err <= tolerance, "{shape:?} {dtype:?} {gelu:?}: relative error {err}");
                }
            }
        }
        Ok(())
    }
}
