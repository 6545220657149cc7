//! Z-Image's query/key preparation in one pass: RMSNorm over each head's
//! values (the QK-norm), then the rotary position embedding on interleaved
//! pairs. candle's chain is an RMSNorm kernel, then for RoPE a reshape into
//! pairs, two strided narrows, four broadcast multiplies, an add, a subtract
//! and a stack: one step of the Z-Image-Turbo DiT at 1024x1024 spent 76 ms of
//! 356 in broadcast multiplies on an H200, most of them here.
//!
//! The op computes in f32 and rounds once (candle rounds after every op in
//! half precision, so half-precision results differ by a few ulps).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_f32, cpu_output, cpu_store_like, same_dtype};

/// The op: x [..., L, H, D], weight [D], cs [2, L, D/2] (cos then sin).
#[derive(Copy, Clone, Debug)]
pub struct RmsNormRope {
    pub eps: f64,
}

/// `rope(rms_norm(x) * weight)` for x [B, L, H, D] (D even), weight [D],
/// cos and sin [L, D/2], all of one dtype; output [B, L, H, D].
pub fn rms_norm_rope(x: &Tensor, weight: &Tensor, cos: &Tensor, sin: &Tensor, eps: f64) -> Result<Tensor> {
    let cs = Tensor::stack(&[cos, sin], 0)?;
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &cs.contiguous()?, &RmsNormRope { eps })
}

/// (rows B*L*H, heads H, positions L, head dim D).
struct Dims {
    rows: usize,
    h: usize,
    l: usize,
    d: usize,
}

impl RmsNormRope {
    fn dims(&self, x: &Layout, w: &Layout, cs: &Layout) -> Result<Dims> {
        let xd = x.dims();
        let r = xd.len();
        if r < 3 || !xd[r - 1].is_multiple_of(2) || xd[r - 1] == 0 {
            bail!("rms_norm_rope: x must be [..., L, H, D] with D even, got {xd:?}");
        }
        let (l, h, d) = (xd[r - 3], xd[r - 2], xd[r - 1]);
        if w.dims() != [d] || cs.dims() != [2, l, d / 2] {
            bail!("rms_norm_rope: weight {:?} and cos/sin {:?} do not fit x {xd:?}", w.dims(), cs.dims());
        }
        Ok(Dims { rows: xd.iter().product::<usize>() / d, h, l, d })
    }
}

impl CustomOp3 for RmsNormRope {
    fn name(&self) -> &'static str {
        "rms-norm-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        css: &CpuStorage,
        csl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(self.name(), &[xs.dtype(), ws.dtype(), css.dtype()])?;
        let Dims { rows, h, l, d } = self.dims(xl, wl, csl)?;
        let (x, w, cs) =
            (cpu_f32(self.name(), xs, xl)?, cpu_f32(self.name(), ws, wl)?, cpu_f32(self.name(), css, csl)?);
        let half = d / 2;
        let (cos, sin) = cs.split_at(l * half);
        let mut out = cpu_output(x.len());
        for row in 0..rows {
            let pos = (row / h) % l;
            let xr = &x[row * d..][..d];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + self.eps as f32).sqrt();
            for i in 0..half {
                let (a, b) = (xr[2 * i] * inv * w[2 * i], xr[2 * i + 1] * inv * w[2 * i + 1]);
                let (c, s) = (cos[pos * half + i], sin[pos * half + i]);
                out[row * d + 2 * i] = a * c - b * s;
                out[row * d + 2 * i + 1] = a * s + b * c;
            }
        }
        Ok((cpu_store_like(out, xs)?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        css: &candle_core::CudaStorage,
        csl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dims = self.dims(xl, wl, csl)?;
        let out = match &xs.slice {
            S::F32(x) => gpu::launch(self, &dims, (x, xl), (ws, wl), (css, csl), "f32")?,
            S::F16(x) => gpu::launch(self, &dims, (x, xl), (ws, wl), (css, csl), "f16")?,
            S::BF16(x) => gpu::launch(self, &dims, (x, xl), (ws, wl), (css, csl), "bf16")?,
            _ => bail!("rms_norm_rope: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(xs)),
        };
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result};

    use super::{Dims, RmsNormRope};
    use crate::kernels::cuda::{alloc_output, view, Module};

    static MODULE: Module =
        Module::new("raftgen_rms_norm_rope", concat!(include_str!("common.cuh"), include_str!("rms_norm_rope.cu")));
    /// RR_WARPS in rms_norm_rope.cu: rows per block.
    const WARPS: usize = 8;
    /// 2 * 32 * RR_MAX_PAIRS_PER_LANE.
    const MAX_HEAD_DIM: usize = 256;

    pub(super) fn launch<T: DeviceRepr + CudaDType>(
        op: &RmsNormRope,
        dims: &Dims,
        (x, xl): (&CudaSlice<T>, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (css, csl): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let &Dims { rows, h, l, d } = dims;
        if d > MAX_HEAD_DIM {
            bail!("rms_norm_rope: head dim {d} is larger than {MAX_HEAD_DIM}");
        }
        let dev = &ws.device;
        let x = view("rms_norm_rope", x, xl)?;
        let w = view("rms_norm_rope", T::as_cuda_slice(ws)?, wl)?;
        let cs = view("rms_norm_rope", T::as_cuda_slice(css)?, csl)?;
        let (cos, sin) = (cs.slice(..l * d / 2), cs.slice(l * d / 2..));
        let mut out = alloc_output::<T>(dev, rows * d)?;
        if rows > 0 {
            let func = dev.get_or_load_custom_func(&format!("rms_norm_rope_{suffix}"), MODULE.name, MODULE.ptx()?)?;
            let (rows64, h32, l32, d32, eps) = (rows as u64, h as i32, l as i32, d as i32, op.eps as f32);
            let mut b = func.builder();
            b.arg(&x).arg(&w).arg(&cos).arg(&sin).arg(&mut out).arg(&rows64).arg(&h32).arg(&l32).arg(&d32).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
                block_dim: (WARPS as u32 * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match rms_norm_rope_* in rms_norm_rope.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Result, Tensor};
    use candle_transformers::models::z_image::transformer::apply_rotary_emb;

    use super::rms_norm_rope;
    use crate::kernels::test_util::{randn, rel_err};

    /// candle's chain, as Z-Image's attention runs it.
    fn unfused(x: &Tensor, w: &Tensor, cos: &Tensor, sin: &Tensor, eps: f64) -> Result<Tensor> {
        let norm = candle_nn::RmsNorm::new(w.clone(), eps);
        apply_rotary_emb(&norm.forward(x)?, cos, sin)
    }

    fn inputs(b: usize, l: usize, h: usize, d: usize, seed: u64, dev: &Device) -> Result<[Tensor; 4]> {
        let x = (randn(&[b, l, h, d], seed, dev)? * 3.0)?;
        let w = (randn(&[d], seed + 1, dev)? + 1.0)?;
        let angle = (randn(&[l, d / 2], seed + 2, dev)? * 3.0)?;
        Ok([x, w, angle.cos()?, angle.sin()?])
    }

    #[test]
    fn cpu_reference_matches_unfused_ops() -> Result<()> {
        for (n, &(b, l, h, d)) in [(1, 5, 2, 8), (2, 7, 3, 24), (1, 33, 4, 128), (2, 3, 1, 2)].iter().enumerate() {
            let [x, w, c, s] = inputs(b, l, h, d, n as u64 * 4, &Device::Cpu)?;
            let err = rel_err(&rms_norm_rope(&x, &w, &c, &s, 1e-5)?, &unfused(&x, &w, &c, &s, 1e-5)?)?;
            assert!(err <= 1e-5, "{:?}: relative error {err}", (b, l, h, d));
        }
        let [x, w, c, s] = inputs(1, 4, 2, 8, 9, &Device::Cpu)?;
        assert!(rms_norm_rope(&x, &w.narrow(0, 0, 6)?, &c, &s, 1e-5).is_err(), "weight too short");
        assert!(rms_norm_rope(&x, &w, &c.narrow(0, 0, 3)?, &s.narrow(0, 0, 3)?, 1e-5).is_err(), "too few positions");
        let xh = x.to_dtype(DType::BF16)?;
        let [wh, ch, sh] = [&w, &c, &s].map(|t| t.to_dtype(DType::BF16).unwrap());
        let err = rel_err(&rms_norm_rope(&xh, &wh, &ch, &sh, 1e-5)?, &unfused(&x, &w, &c, &s, 1e-5)?)?;
        assert!(err <= 2e-2, "bf16: relative error {err}");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_unfused_ops() -> Result<()> {
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        for (n, &(b, l, h, d)) in [(1, 5, 2, 8), (2, 7, 3, 24), (1, 4160, 30, 128), (2, 3, 1, 256)].iter().enumerate() {
            let [x, w, c, s] = inputs(b, l, h, d, 50 + n as u64 * 4, &Device::Cpu)?;
            for (dtype, tolerance) in GPU_TOLERANCES {
                let [x, w, c, s] = [&x, &w, &c, &s].map(|t| t.to_dtype(dtype).unwrap());
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = unfused(&f(&x), &f(&w), &f(&c), &f(&s), 1e-5)?;
                let [x, w, c, s] = [&x, &w, &c, &s].map(|t| t.to_device(&gpu).unwrap());
                let err = rel_err(&rms_norm_rope(&x, &w, &c, &s, 1e-5)?, &want)?;
                eprintln!("rms_norm_rope {:?} {dtype:?}: relative error {err:.2e}", (b, l, h, d));
                assert!(err <= tolerance, "{:?} {dtype:?}: relative error {err}", (b, l, h, d));
            }
        }
        Ok(())
    }
}
