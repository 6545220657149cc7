//! GroupNorm followed by SiLU, the pair that opens both halves of every
//! ResNet block: one read for the statistics and one read and write for the
//! output, where the unfused ops make about ten passes (mean, centre, square,
//! variance, divide, cast, scale, shift, silu).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_f32, cpu_output, cpu_store_like, same_dtype};

/// `silu(group_norm(x) * gamma + beta)` over x [N, C, ...] with C split into
/// `groups` groups, as `candle_nn::GroupNorm` then `candle_nn::ops::silu`.
#[derive(Clone, Debug)]
pub struct GroupNormSilu {
    pub groups: usize,
    pub eps: f64,
}

/// `silu(GroupNorm(x))` for x [N, C, H, W] or [N, C, L] (any rank >= 3),
/// gamma and beta `[C]`, all of one dtype (f32, f16 or bf16).
pub fn group_norm_silu(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &GroupNormSilu { groups, eps })
}

/// The sizes the op works with: (rows N * groups, channels per group,
/// elements per channel).
struct Dims {
    per_group: usize,
    spatial: usize,
}

impl GroupNormSilu {
    fn dims(&self, x: &Layout, gamma: &Layout, beta: &Layout) -> Result<Dims> {
        let d = x.dims();
        if d.len() < 3 {
            bail!("group_norm_silu: x must be [N, C, ...] with rank >= 3, got {d:?}");
        }
        let channels = d[1];
        if self.groups == 0 || !channels.is_multiple_of(self.groups) {
            bail!("group_norm_silu: {channels} channels do not split into {} groups", self.groups);
        }
        if gamma.dims() != [channels] || beta.dims() != [channels] {
            bail!("group_norm_silu: gamma and beta must be [{channels}], got {:?} and {:?}", gamma.dims(), beta.dims());
        }
        let spatial: usize = d[2..].iter().product();
        if (channels / self.groups).saturating_mul(spatial) > i32::MAX as usize
            || d[0] * self.groups > u32::MAX as usize
        {
            bail!("group_norm_silu: x {d:?} is too large");
        }
        Ok(Dims { per_group: channels / self.groups, spatial })
    }
}

impl CustomOp3 for GroupNormSilu {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(self.name(), &[xs.dtype(), gs.dtype(), bs.dtype()])?;
        let Dims { per_group, spatial } = self.dims(xl, gl, bl)?;
        let x = cpu_f32(self.name(), xs, xl)?;
        let (gamma, beta) = (cpu_f32(self.name(), gs, gl)?, cpu_f32(self.name(), bs, bl)?);
        let mut y = cpu_output(x.len());
        let group_len = per_group * spatial;
        for (g, (xg, yg)) in x.chunks(group_len.max(1)).zip(y.chunks_mut(group_len.max(1))).enumerate() {
            // Two passes, as candle's GroupNorm: the mean, then the mean square
            // of the centred values (in f64 here, the reference).
            let mean = xg.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
            let var = xg.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for (i, (&v, out)) in xg.iter().zip(yg.iter_mut()).enumerate() {
                let c = (g % self.groups) * per_group + i / spatial;
                let normed = ((v as f64 - mean) * rstd) as f32 * gamma[c] + beta[c];
                *out = normed / (1.0 + (-normed).exp());
            }
        }
        Ok((cpu_store_like(y, xs)?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dims = self.dims(xl, gl, bl)?;
        let out = match &xs.slice {
            S::F32(x) => gpu::launch(self, &dims, (x, xl), (gs, gl), (bs, bl), "f32")?,
            S::F16(x) => gpu::launch(self, &dims, (x, xl), (gs, gl), (bs, bl), "f16")?,
            S::BF16(x) => gpu::launch(self, &dims, (x, xl), (gs, gl), (bs, bl), "bf16")?,
            _ => bail!("group_norm_silu: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(xs)),
        };
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result};

    use super::{Dims, GroupNormSilu};
    use crate::kernels::cuda::{alloc_output, view, Module};

    static MODULE: Module =
        Module::new("raftgen_group_norm_silu", concat!(include_str!("common.cuh"), include_str!("group_norm_silu.cu")));
    /// GN_THREADS in group_norm_silu.cu.
    const THREADS: u32 = 512;

    pub(super) fn launch<T: DeviceRepr + CudaDType>(
        op: &GroupNormSilu,
        dims: &Dims,
        (x, xl): (&CudaSlice<T>, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let name = "group_norm_silu";
        let dev = &gs.device;
        let x = view(name, x, xl)?;
        let gamma = view(name, T::as_cuda_slice(gs)?, gl)?;
        let beta = view(name, T::as_cuda_slice(bs)?, bl)?;
        let n = x.len();
        let mut out = alloc_output::<T>(dev, n)?;
        let blocks = n / (dims.per_group * dims.spatial).max(1);
        if blocks > 0 {
            let func = dev.get_or_load_custom_func(&format!("gn_silu_{suffix}"), MODULE.name, MODULE.ptx()?)?;
            let (cpg, spatial) = (dims.per_group as i32, dims.spatial as i32);
            let (groups, eps) = (op.groups as i32, op.eps as f32);
            let mut b = func.builder();
            b.arg(&x).arg(&gamma).arg(&beta).arg(&mut out).arg(&cpg).arg(&spatial).arg(&groups).arg(&eps);
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the arguments match gn_silu_* in group_norm_silu.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Result, Tensor};

    use super::group_norm_silu;
    use crate::kernels::test_util::{randn, rel_err};

    /// What the UNet's ResNet blocks compute today.
    fn unfused(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let norm = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), x.dim(1)?, groups, eps)?;
        candle_nn::ops::silu(&norm.forward(x)?)
    }

    /// (shape, groups): SD's 32 groups, odd sizes that are no multiple of the
    /// block size, one element per channel, [N, C, L].
    const CASES: &[(&[usize], usize)] = &[
        (&[1, 4, 3, 5], 2),
        (&[2, 32, 7, 9], 8),
        (&[2, 64, 17, 13], 32),
        (&[3, 6, 37], 3),
        (&[1, 96, 9, 11], 32),
        (&[2, 12, 1, 1], 4),
        (&[1, 2, 1031], 1),
    ];

    /// x with a non-zero mean and a spread, gamma and beta random.
    fn inputs(shape: &[usize], seed: u64, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let x = ((randn(shape, seed, device)? * 2.5)? + 0.7)?;
        let gamma = randn(&[shape[1]], seed + 100, device)?;
        let beta = randn(&[shape[1]], seed + 200, device)?;
        Ok((x, gamma, beta))
    }

    #[test]
    fn cpu_reference_matches_unfused_ops() -> Result<()> {
        for (k, &(shape, groups)) in CASES.iter().enumerate() {
            let (x, gamma, beta) = inputs(shape, k as u64, &Device::Cpu)?;
            let got = group_norm_silu(&x, groups, &gamma, &beta, 1e-5)?;
            let want = unfused(&x, groups, &gamma, &beta, 1e-5)?;
            let err = rel_err(&got, &want)?;
            assert!(err <= 1e-4, "{shape:?} / {groups} groups: relative error {err}");
        }
        Ok(())
    }

    #[test]
    fn cpu_reference_in_half_precision() -> Result<()> {
        let (x, gamma, beta) = inputs(&[2, 32, 5, 7], 7, &Device::Cpu)?;
        let want = unfused(&x, 8, &gamma, &beta, 1e-5)?;
        for dtype in [DType::F16, DType::BF16] {
            let (xh, gh, bh) = (x.to_dtype(dtype)?, gamma.to_dtype(dtype)?, beta.to_dtype(dtype)?);
            let got = group_norm_silu(&xh, 8, &gh, &bh, 1e-5)?;
            assert_eq!(got.dtype(), dtype);
            let err = rel_err(&got, &want)?;
            assert!(err <= 1e-2, "{dtype:?}: relative error {err}");
        }
        Ok(())
    }

    #[test]
    fn strided_input_and_bad_shapes() -> Result<()> {
        let (x, gamma, beta) = inputs(&[2, 8, 6, 5], 3, &Device::Cpu)?;
        let xt = x.transpose(2, 3)?;
        let err = rel_err(&group_norm_silu(&xt, 4, &gamma, &beta, 1e-6)?, &unfused(&xt, 4, &gamma, &beta, 1e-6)?)?;
        assert!(err <= 1e-4, "transposed input: relative error {err}");
        assert!(group_norm_silu(&x, 3, &gamma, &beta, 1e-5).is_err(), "8 channels in 3 groups");
        assert!(group_norm_silu(&x, 4, &gamma.narrow(0, 0, 4)?, &beta, 1e-5).is_err(), "short gamma");
        assert!(group_norm_silu(&x.flatten_from(1)?, 4, &gamma, &beta, 1e-5).is_err(), "rank 2");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_unfused_ops() -> Result<()> {
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        let cases = CASES.iter().copied().chain([(&[2usize, 320, 64, 64][..], 32), (&[1, 640, 33, 31][..], 32)]);
        for (k, (shape, groups)) in cases.enumerate() {
            let (x, gamma, beta) = inputs(shape, k as u64, &Device::Cpu)?;
            for (dtype, tolerance) in GPU_TOLERANCES {
                // The reference sees the inputs rounded as the kernel does.
                let [x, gamma, beta] =
                    [&x, &gamma, &beta].map(|t| t.to_dtype(dtype).and_then(|t| t.to_dtype(DType::F32)));
                let (x, gamma, beta) = (x?, gamma?, beta?);
                let want = unfused(&x, groups, &gamma, &beta, 1e-5)?;
                let [xg, gg, bg] = [&x, &gamma, &beta].map(|t| t.to_dtype(dtype).and_then(|t| t.to_device(&gpu)));
                let got = group_norm_silu(&xg?, groups, &gg?, &bg?, 1e-5)?;
                let err = rel_err(&got, &want)?;
                assert!(err <= tolerance, "{shape:?} {dtype:?}: relative error {err}");
            }
        }
        Ok(())
    }
}
