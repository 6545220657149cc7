//! Convolution as one matrix product: `im2col` lays out, for every output
//! pixel, the input patch it sees, and the product with the weights
//! ([O, C*KH*KW]) computes every output channel at once on the tensor cores
//! (cuBLAS through candle's matmul).
//!
//! candle 0.11's CUDA convolution does the same, but its im2col kernel is
//! slow (one step of the SD-1.5 UNet at 512x512 spent 11.7 ms of 40 in it on
//! an H200) and its layout, [B, Ho*Wo, C*KH*KW], makes the product come out
//! pixel-major, so the result is transposed (copied) back to NCHW. Ours
//! writes [B, C*KH*KW, Ho*Wo] (each thread one element, consecutive threads
//! consecutive pixels: coalesced reads and writes), and `W @ col` is then
//! [B, O, Ho*Wo], NCHW already. A 1x1 convolution with stride 1 and no
//! padding needs no im2col at all (the input is its own column matrix).
//!
//! The op moves elements without arithmetic, so the CPU reference is exact
//! and the CUDA kernel copies raw 16- or 32-bit words.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The op: x [B, C, H, W] -> col [B, C*KH*KW, Ho*Wo].
#[derive(Copy, Clone, Debug)]
pub struct Im2Col {
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

/// The sizes of one call.
struct Dims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl Im2Col {
    fn dims(&self, layout: &Layout) -> Result<Dims> {
        let &[b, c, h, w] = layout.dims() else {
            bail!("im2col: input must be [B, C, H, W], got {:?}", layout.dims());
        };
        if self.stride == 0 || self.kh == 0 || self.kw == 0 {
            bail!("im2col: kernel and stride must be positive");
        }
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding);
        if hp < self.kh || wp < self.kw {
            bail!("im2col: the {}x{} kernel is larger than the padded {hp}x{wp} input", self.kh, self.kw);
        }
        Ok(Dims { b, c, h, w, ho: (hp - self.kh) / self.stride + 1, wo: (wp - self.kw) / self.stride + 1 })
    }

    fn out_shape(&self, d: &Dims) -> Shape {
        Shape::from((d.b, d.c * self.kh * self.kw, d.ho * d.wo))
    }
}

/// `x` [B, C, H, W] as the column matrix of a `kh` x `kw` convolution with
/// `stride` and zero `padding`: [B, C*KH*KW, Ho*Wo], row `(c*KH + i)*KW + j`
/// holding input channel `c` shifted by kernel tap `(i, j)`.
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Im2Col { kh, kw, stride, padding })
}

/// `conv2d(x, weight) + bias` (groups 1, dilation 1) through [`im2col`] and
/// one batched matrix product: x [B, C, H, W], weight [O, C, KH, KW], bias
/// [O]. Computes what `candle_nn::Conv2d` computes.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        bail!("conv2d: the input has {c} channels, the weight expects {wc}");
    }
    let k = c * kh * kw;
    let (col, ho, wo) = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        (x.reshape((b, c, h * w))?, h, w)
    } else {
        let col = im2col(x, kh, kw, stride, padding)?;
        let p = col.dim(2)?;
        let wo = (w + 2 * padding - kw) / stride + 1;
        (col, p / wo, wo)
    };
    // [O, K] broadcast over the batch (stride 0: one weight matrix in memory).
    let wm = weight.reshape((1, o, k))?.broadcast_as((b, o, k))?;
    let out = wm.matmul(&col)?.reshape((b, o, ho, wo))?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(out),
    }
}

fn cpu_im2col<T: Copy + Default>(x: &[T], op: &Im2Col, d: &Dims) -> Vec<T> {
    let (k, p) = (d.c * op.kh * op.kw, d.ho * d.wo);
    let mut out = vec![T::default(); d.b * k * p];
    for b in 0..d.b {
        for c in 0..d.c {
            for i in 0..op.kh {
                for j in 0..op.kw {
                    let row = (c * op.kh + i) * op.kw + j;
                    let dst = &mut out[(b * k + row) * p..][..p];
                    for ho in 0..d.ho {
                        // Input row of this output row and tap, if inside.
                        let y = (ho * op.stride + i).checked_sub(op.padding).filter(|&y| y < d.h);
                        for wo in 0..d.wo {
                            let xx = (wo * op.stride + j).checked_sub(op.padding).filter(|&xx| xx < d.w);
                            if let (Some(y), Some(xx)) = (y, xx) {
                                dst[ho * d.wo + wo] = x[((b * d.c + c) * d.h + y) * d.w + xx];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(layout)?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("im2col: the input must be contiguous");
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(cpu_im2col(&v[start..end], self, &d)),
            CpuStorage::F16(v) => CpuStorage::F16(cpu_im2col(&v[start..end], self, &d)),
            CpuStorage::BF16(v) => CpuStorage::BF16(cpu_im2col(&v[start..end], self, &d)),
            other => bail!("im2col: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(other)),
        };
        Ok((out, self.out_shape(&d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let d = self.dims(layout)?;
        let out = match &storage.slice {
            S::F32(x) => gpu::launch(self, &d, storage, x, layout, "u32")?,
            S::F16(x) => gpu::launch(self, &d, storage, x, layout, "u16")?,
            S::BF16(x) => gpu::launch(self, &d, storage, x, layout, "u16")?,
            _ => bail!("im2col: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(storage)),
        };
        Ok((out, self.out_shape(&d)))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    use super::{Dims, Im2Col};
    use crate::kernels::cuda::{alloc_output, grid_for, view, Module};

    static MODULE: Module =
        Module::new("raftgen_im2col", concat!(include_str!("common.cuh"), include_str!("im2col.cu")));
    const THREADS: u32 = 256;

    pub(super) fn launch<T: DeviceRepr + CudaDType>(
        op: &Im2Col,
        d: &Dims,
        storage: &CudaStorage,
        x: &CudaSlice<T>,
        layout: &Layout,
        suffix: &str,
    ) -> Result<CudaStorage> {
        let dev = &storage.device;
        let x = view("im2col", x, layout)?;
        let n = d.b * d.c * op.kh * op.kw * d.ho * d.wo;
        let mut col = alloc_output::<T>(dev, n)?;
        if n > 0 {
            let func = dev.get_or_load_custom_func(&format!("im2col_{suffix}"), MODULE.name, MODULE.ptx()?)?;
            let dims: [i32; 10] =
                [d.b, d.c, d.h, d.w, op.kh, op.kw, op.stride, op.padding, d.ho, d.wo].map(|v| v as i32);
            let n64 = n as u64;
            let mut b = func.builder();
            b.arg(&x).arg(&mut col).arg(&n64);
            for v in &dims {
                b.arg(v);
            }
            let cfg = LaunchConfig {
                grid_dim: (grid_for(n, THREADS), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match im2col_* in im2col.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(col, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Result, Tensor};
    use candle_nn::Conv2dConfig;

    use super::conv2d;
    use crate::kernels::test_util::{randn, rel_err};

    /// (B, C, H, W, O, K, stride, padding).
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// SD's 3x3 convolutions, the
    /// stride-2 downsampler, 1x1 projections, odd sizes, a 3-channel input.
    const CASES: &[Case] = &[
        (2, 4, 8, 8, 8, 3, 1, 1),
        (1, 6, 9, 7, 5, 3, 2, 1),
        (2, 8, 6, 6, 8, 3, 2, 0),
        (2, 5, 7, 9, 3, 1, 1, 0),
        (1, 3, 5, 5, 4, 3, 1, 1),
        (3, 2, 4, 4, 2, 2, 2, 0),
    ];

    fn candle_conv(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
        let cfg = Conv2dConfig { stride, padding, ..Default::default() };
        candle_nn::Conv2d::new(w.clone(), Some(b.clone()), cfg).forward(x)
    }

    fn inputs(case: &Case, seed: u64, dev: &Device) -> Result<[Tensor; 3]> {
        let &(b, c, h, w, o, k, _, _) = case;
        Ok([randn(&[b, c, h, w], seed, dev)?, randn(&[o, c, k, k], seed + 1, dev)?, randn(&[o], seed + 2, dev)?])
    }

    #[test]
    fn cpu_matches_candle_conv() -> Result<()> {
        for (n, case) in CASES.iter().enumerate() {
            let [x, w, b] = inputs(case, n as u64 * 3, &Device::Cpu)?;
            let (stride, padding) = (case.6, case.7);
            let err = rel_err(&conv2d(&x, &w, Some(&b), stride, padding)?, &candle_conv(&x, &w, &b, stride, padding)?)?;
            assert!(err <= 1e-5, "{case:?}: relative error {err}");
        }
        // Half precision moves the same bits.
        let x = randn(&[2, 3, 5, 6], 99, &Device::Cpu)?;
        for dtype in [DType::F16, DType::BF16] {
            let xh = x.to_dtype(dtype)?;
            let col = super::im2col(&xh, 3, 3, 1, 1)?;
            assert_eq!(col.dtype(), dtype);
            let want = super::im2col(&xh.to_dtype(DType::F32)?, 3, 3, 1, 1)?;
            assert_eq!(rel_err(&col, &want)?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let x = Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(super::im2col(&x, 3, 3, 1, 0).is_err(), "kernel larger than the input");
        assert!(super::im2col(&x, 1, 1, 0, 0).is_err(), "zero stride");
        assert!(super::im2col(&x.flatten_all()?, 1, 1, 1, 0).is_err(), "not 4-D");
        let w = Tensor::zeros((4, 3, 1, 1), DType::F32, &Device::Cpu)?;
        assert!(conv2d(&x, &w, None, 1, 0).is_err(), "channel mismatch");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_matches_candle_conv() -> Result<()> {
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        // Plus SD-1.5 sizes at 512x512: 320 channels at 64x64, the stride-2
        // downsampler, a 1x1 shortcut.
        let big = [(2, 320, 64, 64, 320, 3, 1, 1), (2, 320, 64, 64, 320, 3, 2, 1), (2, 640, 32, 32, 320, 1, 1, 0)];
        for (n, case) in CASES.iter().chain(big.iter()).enumerate() {
            let [x, w, b] = inputs(case, n as u64 * 3, &Device::Cpu)?;
            let (stride, padding) = (case.6, case.7);
            for (dtype, tolerance) in GPU_TOLERANCES {
                let [x, w, b] = [&x, &w, &b].map(|t| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap());
                // The reference: candle's CUDA convolution in f32.
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = candle_conv(&f(&x), &f(&w), &f(&b), stride, padding)?;
                let got = conv2d(&x, &w, Some(&b), stride, padding)?;
                let err = rel_err(&got, &want)?;
                eprintln!("conv2d {case:?} {dtype:?}: relative error {err:.2e}");
                assert!(err <= tolerance, "{case:?} {dtype:?}: relative error {err}");
            }
        }
        Ok(())
    }
}
