//! Attention without the score matrix: `softmax(Q Kᵀ · scale) V` with the
//! keys visited in order and the softmax kept as a running maximum and sum
//! (the "online softmax" of Milakov & Gimelshein 2018, tiled as in
//! FlashAttention, Dao et al. 2022). The UNet's self-attention at 64×64
//! latents has 4096 queries and keys per head: the unfused path writes and
//! reads back a 4096×4096 score matrix per head, twice (scores, then softmax).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_f32, cpu_output, cpu_store_like, same_dtype};

/// The op: inputs q [..., lq, d], k and v [..., lk, d] with the same leading
/// dimensions; output [..., lq, d].
#[derive(Copy, Clone, Debug)]
pub struct Attention {
    pub scale: f64,
    /// Which CUDA kernel runs (the CPU reference ignores it).
    pub kernel: AttentionKernel,
}

/// The CUDA kernels of [`Attention`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// The tensor-core kernel (`attention_mma.cu`) for f16 and bf16 with an
    /// even head dimension of at most 160 on compute capability 8.0 or newer;
    /// the SIMT kernel otherwise.
    #[default]
    Auto,
    /// The SIMT kernel (`attention.cu`, f32 arithmetic on the CUDA cores)
    /// always: the baseline the tensor-core kernel is measured against.
    Simt,
}

/// `softmax(q kᵀ · scale) v` for q [B, H, Lq, D], k and v [B, H, Lk, D] (any
/// leading dimensions shared by all three), all of one dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, scale, AttentionKernel::Auto)
}

/// [`attention`] with the CUDA kernel chosen by the caller (benchmarks).
pub fn attention_with(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, kernel: AttentionKernel) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { scale, kernel })
}

/// Attention in the tokens-major layout the projections produce: q
/// [B, Lq, H, D], k and v [B, Lk, H, D] (the head dimension contiguous, any
/// other strides: `to_q(x).reshape((b, l, h, d))` as it comes), output
/// [B, Lq, H, D] contiguous, ready for the output projection. On CUDA with
/// f16/bf16 and an even head dimension of at most 160 it runs the v2
/// tensor-core kernel, which reads these layouts directly; elsewhere it
/// transposes to [B, H, L, D] around [`attention`].
pub fn attention_bshd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = q.device() {
        let (b, lq, h, d) = q.dims4()?;
        let fits = matches!(q.dtype(), candle_core::DType::F16 | candle_core::DType::BF16)
            && [q, k, v].iter().all(|t| t.stride()[3] == 1)
            && gpu::mma_fits(dev, &Dims { heads: b * h, lq, lk: k.dim(1)?, d });
        if fits {
            return q.apply_op3_no_bwd(k, v, &AttentionBshd { scale });
        }
    }
    let t = |x: &Tensor| x.transpose(1, 2);
    attention(&t(q)?, &t(k)?, &t(v)?, scale)?.transpose(1, 2)?.contiguous()
}

/// The op behind [`attention_bshd`] on CUDA (no CPU half: the CPU path
/// transposes around [`Attention`]).
#[derive(Copy, Clone, Debug)]
pub struct AttentionBshd {
    pub scale: f64,
}

impl CustomOp3 for AttentionBshd {
    fn name(&self) -> &'static str {
        "attention-bshd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("attention-bshd: CUDA only (attention_bshd transposes on the CPU)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let out = match &qs.slice {
            S::F16(q) => gpu::launch_bshd(self, (q, ql), (ks, kl), (vs, vl), "f16")?,
            S::BF16(q) => gpu::launch_bshd(self, (q, ql), (ks, kl), (vs, vl), "bf16")?,
            _ => bail!("attention-bshd: f16 or bf16 only"),
        };
        Ok((out, ql.shape().clone()))
    }
}

/// (heads: the product of the leading dimensions, lq, lk, d).
struct Dims {
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
}

impl Attention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let r = qd.len();
        if r < 2 || kd != vd || kd.len() != r || qd[..r - 2] != kd[..r - 2] || qd[r - 1] != kd[r - 1] || kd[r - 2] == 0
        {
            bail!("attention: q {qd:?}, k {kd:?} and v {vd:?} must be [..., lq, d], [..., lk, d], [..., lk, d] with lk > 0");
        }
        Ok(Dims { heads: qd[..r - 2].iter().product(), lq: qd[r - 2], lk: kd[r - 2], d: qd[r - 1] })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(self.name(), &[qs.dtype(), ks.dtype(), vs.dtype()])?;
        let Dims { heads, lq, lk, d } = self.dims(ql, kl, vl)?;
        let (q, k, v) = (cpu_f32(self.name(), qs, ql)?, cpu_f32(self.name(), ks, kl)?, cpu_f32(self.name(), vs, vl)?);
        let mut o = cpu_output(q.len());
        let scale = self.scale as f32;
        let mut acc = vec![0f32; d];
        for h in 0..heads {
            let (kh, vh) = (&k[h * lk * d..][..lk * d], &v[h * lk * d..][..lk * d]);
            for i in 0..lq {
                let qi = &q[(h * lq + i) * d..][..d];
                // One query row at a time: the running maximum `m`, the sum
                // of exp(score - m) `l`, and the weighted sum of values `acc`,
                // rescaled whenever the maximum grows.
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                acc.fill(0.0);
                for (kj, vj) in kh.chunks(d).zip(vh.chunks(d)) {
                    let s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    let m_new = m.max(s);
                    let (correction, p) = ((m - m_new).exp(), (s - m_new).exp());
                    l = l * correction + p;
                    for (a, &vv) in acc.iter_mut().zip(vj) {
                        *a = *a * correction + p * vv;
                    }
                    m = m_new;
                }
                for (out, a) in o[(h * lq + i) * d..][..d].iter_mut().zip(&acc) {
                    *out = a / l;
                }
            }
        }
        Ok((cpu_store_like(o, qs)?, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dims = self.dims(ql, kl, vl)?;
        let mma = self.kernel == AttentionKernel::Auto && gpu::mma_fits(&qs.device, &dims);
        let out = match &qs.slice {
            S::F32(q) => gpu::launch(self, &dims, (q, ql), (ks, kl), (vs, vl), "f32")?,
            S::F16(q) if mma => gpu::launch_mma(self, &dims, (q, ql), (ks, kl), (vs, vl), "f16")?,
            S::BF16(q) if mma => gpu::launch_mma(self, &dims, (q, ql), (ks, kl), (vs, vl), "bf16")?,
            S::F16(q) => gpu::launch(self, &dims, (q, ql), (ks, kl), (vs, vl), "f16")?,
            S::BF16(q) => gpu::launch(self, &dims, (q, ql), (ks, kl), (vs, vl), "bf16")?,
            _ => bail!("attention: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(qs)),
        };
        Ok((out, ql.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result};

    use super::{Attention, Dims};
    use crate::kernels::cuda::{alloc_output, view, Module};

    static MODULE: Module =
        Module::new("raftgen_attention", concat!(include_str!("common.cuh"), include_str!("attention.cu")));
    /// The tensor-core kernels: mma.sync with bf16 operands needs PTX for
    /// sm_80, which the driver JITs for the device (sm_90 on Hopper).
    static MMA_MODULE: Module = Module::with_arch(
        "raftgen_attention_mma",
        concat!(include_str!("common.cuh"), include_str!("attention_mma.cu")),
        "compute_80",
    );
    /// The padded head dimensions attention_mma.cu instantiates.
    const MMA_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];
    /// MMA_ROWS in attention_mma.cu: query rows per block (4 warps of 16).
    const MMA_ROWS: usize = 64;

    /// Whether the tensor-core kernel takes this call: an even head dim of at
    /// most 160, on compute capability 8.0 or newer.
    pub(super) fn mma_fits(dev: &candle_core::CudaDevice, dims: &Dims) -> bool {
        dims.d % 2 == 0
            && dims.d <= MMA_DIMS[MMA_DIMS.len() - 1]
            && dims.heads <= 65_535
            && dims.lq <= i32::MAX as usize
            && dims.lk <= i32::MAX as usize
            && compute_major(dev) >= 8
    }

    /// The device's compute capability major version (0 if unknown), read once.
    fn compute_major(dev: &candle_core::CudaDevice) -> i32 {
        static MAJOR: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
        *MAJOR.get_or_init(|| dev.cuda_stream().context().compute_capability().map_or(0, |(major, _)| major))
    }

    /// V2_ROWS in attention_mma.cu: query rows per block (8 warps of 16).
    const V2_ROWS: usize = 128;

    pub(super) fn launch_bshd<T: DeviceRepr + CudaDType>(
        op: &super::AttentionBshd,
        (q, ql): (&CudaSlice<T>, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let (&[b, lq, h, d], &[_, lk, kh, kd], vd) = (ql.dims(), kl.dims(), vl.dims()) else {
            bail!("attention-bshd: q, k and v must be [B, L, H, D]");
        };
        if kl.dims()[0] != b || kh != h || kd != d || vd != kl.dims() {
            bail!("attention-bshd: q {:?}, k {:?}, v {vd:?} do not agree", ql.dims(), kl.dims());
        }
        let Some(&dp) = MMA_DIMS.iter().find(|&&p| p >= d) else {
            bail!("attention-bshd: head dim {d} is too large");
        };
        if lk == 0 || [ql, kl, vl].iter().any(|l| l.stride()[3] != 1) {
            bail!("attention-bshd: the head dimension must be contiguous and lk > 0");
        }
        let dev = &ks.device;
        let qv = q.slice(ql.start_offset()..);
        let kv = T::as_cuda_slice(ks)?.slice(kl.start_offset()..);
        let vv = T::as_cuda_slice(vs)?.slice(vl.start_offset()..);
        let mut o = alloc_output::<T>(dev, b * lq * h * d)?;
        if b * lq * h * d > 0 {
            // 16-byte K/V loads need every row start 8-element aligned.
            let aligned = |l: &Layout| l.start_offset() % 8 == 0 && l.stride()[..3].iter().all(|s| s % 8 == 0);
            let vec = i32::from(d % 8 == 0 && aligned(kl) && aligned(vl));
            let st = |l: &Layout| -> [i64; 3] { [l.stride()[0] as i64, l.stride()[1] as i64, l.stride()[2] as i64] };
            let (qst, kst, vst) = (st(ql), st(kl), st(vl));
            let ost: [i64; 3] = [(lq * h * d) as i64, (h * d) as i64, d as i64];
            let name = format!("attention_bshd_{suffix}_{dp}");
            let func = dev.get_or_load_custom_func(&name, MMA_MODULE.name, MMA_MODULE.ptx()?)?;
            let scale_log2 = (op.scale * std::f64::consts::LOG2_E) as f32;
            let (h32, lq32, lk32, d32) = (h as i32, lq as i32, lk as i32, d as i32);
            let mut bld = func.builder();
            bld.arg(&qv).arg(&kv).arg(&vv).arg(&mut o).arg(&h32).arg(&lq32).arg(&lk32).arg(&d32).arg(&scale_log2);
            for s in qst.iter().chain(&kst).chain(&vst).chain(&ost) {
                bld.arg(s);
            }
            bld.arg(&vec);
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(V2_ROWS) as u32, (b * h) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match attention_bshd_* in attention_mma.cu;
            // the strides keep every access inside the views (checked shapes).
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(o, dev.clone()))
    }

    pub(super) fn launch_mma<T: DeviceRepr + CudaDType>(
        op: &Attention,
        dims: &Dims,
        (q, ql): (&CudaSlice<T>, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let &Dims { heads, lq, lk, d } = dims;
        let Some(&dp) = MMA_DIMS.iter().find(|&&p| p >= d) else {
            bail!("attention: head dim {d} is too large for the tensor-core kernel");
        };
        let dev = &ks.device;
        let q = view("attention", q, ql)?;
        let k = view("attention", T::as_cuda_slice(ks)?, kl)?;
        let v = view("attention", T::as_cuda_slice(vs)?, vl)?;
        let mut o = alloc_output::<T>(dev, heads * lq * d)?;
        if heads * lq * d > 0 {
            let name = format!("attention_mma_{suffix}_{dp}");
            let func = dev.get_or_load_custom_func(&name, MMA_MODULE.name, MMA_MODULE.ptx()?)?;
            let scale_log2 = (op.scale * std::f64::consts::LOG2_E) as f32;
            let (lq32, lk32, d32) = (lq as i32, lk as i32, d as i32);
            let mut b = func.builder();
            b.arg(&q).arg(&k).arg(&v).arg(&mut o).arg(&lq32).arg(&lk32).arg(&d32).arg(&scale_log2);
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(MMA_ROWS) as u32, heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match attention_mma_* in attention_mma.cu
            // (16-bit element pointers; T is f16 or bf16 here).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(o, dev.clone()))
    }
    /// ATT_WARPS in attention.cu: query rows per block.
    const WARPS: u32 = 8;
    /// 32 * ATT_MAX_DIMS_PER_LANE in attention.cu.
    const MAX_HEAD_DIM: usize = 256;

    pub(super) fn launch<T: DeviceRepr + CudaDType>(
        op: &Attention,
        dims: &Dims,
        (q, ql): (&CudaSlice<T>, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        let &Dims { heads, lq, lk, d } = dims;
        if d > MAX_HEAD_DIM || heads > 65_535 || lq > i32::MAX as usize || lk > i32::MAX as usize {
            bail!(
                "attention: head dim {d} (at most {MAX_HEAD_DIM}), {heads} heads (at most 65535) or length too large"
            );
        }
        let dev = &ks.device;
        let q = view("attention", q, ql)?;
        let k = view("attention", T::as_cuda_slice(ks)?, kl)?;
        let v = view("attention", T::as_cuda_slice(vs)?, vl)?;
        let mut o = alloc_output::<T>(dev, heads * lq * d)?;
        if heads * lq * d > 0 {
            // Keys per shared-memory tile: 2 * kt * (d + 1) + WARPS * d floats
            // stay under the 48 KiB a block gets without opting in.
            let kt = if d <= 128 { 32 } else { 16 };
            let shared = (2 * kt * (d + 1) + WARPS as usize * d) * std::mem::size_of::<f32>();
            let func = dev.get_or_load_custom_func(&format!("attention_{suffix}"), MODULE.name, MODULE.ptx()?)?;
            let (lq32, lk32, d32, kt32, scale) = (lq as i32, lk as i32, d as i32, kt as i32, op.scale as f32);
            let mut b = func.builder();
            b.arg(&q).arg(&k).arg(&v).arg(&mut o).arg(&lq32).arg(&lk32).arg(&d32).arg(&kt32).arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(WARPS as usize) as u32, heads as u32, 1),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            // SAFETY: the arguments match attention_* in attention.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(T::wrap_cuda_slice(o, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor};

    use super::attention;
    use crate::kernels::test_util::{randn, rel_err};

    /// candle's SD `CrossAttention::attention` without flash attention.
    fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
    }

    /// ([B, H], lq, lk, d): self-attention, cross-attention with 77 tokens,
    /// SD's head dims 40/80/160, sizes no multiple of the tiles, one key.
    const CASES: &[([usize; 2], usize, usize, usize)] = &[
        ([1, 2], 16, 16, 8),
        ([2, 8], 33, 77, 40),
        ([1, 3], 70, 70, 80),
        ([2, 1], 5, 131, 160),
        ([1, 1], 3, 1, 24),
        ([1, 2], 1, 45, 256),
    ];

    fn inputs(
        case: &([usize; 2], usize, usize, usize),
        seed: u64,
        device: &Device,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let &([b, h], lq, lk, d) = case;
        // Larger q makes the softmax peaked, which tests the running maximum.
        let q = (randn(&[b, h, lq, d], seed, device)? * 1.5)?;
        let k = randn(&[b, h, lk, d], seed + 1, device)?;
        let v = randn(&[b, h, lk, d], seed + 2, device)?;
        Ok((q, k, v))
    }

    #[test]
    fn cpu_reference_matches_unfused_ops() -> Result<()> {
        for (n, case) in CASES.iter().enumerate() {
            let (q, k, v) = inputs(case, n as u64, &Device::Cpu)?;
            let scale = 1.0 / (case.3 as f64).sqrt();
            let err = rel_err(&attention(&q, &k, &v, scale)?, &unfused(&q, &k, &v, scale)?)?;
            assert!(err <= 1e-4, "{case:?}: relative error {err}");
        }
        Ok(())
    }

    #[test]
    fn half_precision_strided_and_bad_inputs() -> Result<()> {
        let (q, k, v) = inputs(&([1, 2], 9, 12, 16), 4, &Device::Cpu)?;
        let want = unfused(&q, &k, &v, 0.25)?;
        for dtype in [DType::F16, DType::BF16] {
            let [qh, kh, vh] = [&q, &k, &v].map(|t| t.to_dtype(dtype));
            let got = attention(&qh?, &kh?, &vh?, 0.25)?;
            assert_eq!(got.dtype(), dtype);
            let err = rel_err(&got, &want)?;
            assert!(err <= 1e-2, "{dtype:?}: relative error {err}");
        }
        // Heads-last layouts, as a projection's output reshaped, transposed.
        let qt = q.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
        let err = rel_err(&attention(&qt, &k, &v, 0.25)?, &want)?;
        assert!(err <= 1e-4, "strided q: relative error {err}");
        assert!(attention(&q, &k.narrow(3, 0, 8)?, &v, 0.25).is_err(), "head dims differ");
        assert!(attention(&q, &k, &v.narrow(2, 0, 5)?, 0.25).is_err(), "k and v lengths differ");
        Ok(())
    }

    #[test]
    fn bshd_layout_on_the_cpu() -> Result<()> {
        let (q, k, v) = inputs(&([2, 3], 7, 9, 8), 11, &Device::Cpu)?;
        let want = unfused(&q, &k, &v, 0.3)?.transpose(1, 2)?;
        let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let got = super::attention_bshd(&t(&q), &t(&k), &t(&v), 0.3)?;
        assert_eq!(got.dims(), &[2, 7, 3, 8]);
        let err = rel_err(&got, &want.contiguous()?)?;
        assert!(err <= 1e-5, "relative error {err}");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_bshd_matches_unfused_ops() -> Result<()> {
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        let cases = CASES.iter().copied().chain([
            ([2, 8], 4096, 4096, 40),
            ([2, 8], 1024, 77, 80),
            ([1, 30], 515, 515, 128),
            ([2, 4], 100, 100, 20),
        ]);
        for (n, case) in cases.enumerate() {
            let (q, k, v) = inputs(&case, 100 + n as u64, &Device::Cpu)?;
            let scale = 1.0 / (case.3 as f64).sqrt();
            for (dtype, tolerance) in GPU_TOLERANCES {
                let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap());
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = unfused(&f(&q), &f(&k), &f(&v), scale)?.transpose(1, 2)?.contiguous()?;
                // Contiguous [B, L, H, D], and strided: k and v as halves of
                // one [B, L, 2, H, D] tensor (a fused kv projection).
                let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
                let got = super::attention_bshd(&t(&q), &t(&k), &t(&v), scale)?;
                let err = rel_err(&got, &want)?;
                let kv = Tensor::stack(&[t(&k), t(&v)], 2)?;
                let got2 = super::attention_bshd(
                    &t(&q),
                    &kv.narrow(2, 0, 1)?.squeeze(2)?,
                    &kv.narrow(2, 1, 1)?.squeeze(2)?,
                    scale,
                )?;
                let err2 = rel_err(&got2, &want)?;
                eprintln!("attention_bshd {case:?} {dtype:?}: relative error {err:.2e}, strided k/v {err2:.2e}");
                assert!(err <= tolerance && err2 <= tolerance, "{case:?} {dtype:?}: relative error {err}, {err2}");
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_unfused_ops() -> Result<()> {
        use super::{attention_with, AttentionKernel};
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        let cases = CASES.iter().copied().chain([
            ([2, 8], 4096, 4096, 40),
            ([1, 8], 1024, 77, 160),
            ([1, 4], 515, 515, 128),
            ([1, 2], 200, 70, 64),
        ]);
        for (n, case) in cases.enumerate() {
            let (q, k, v) = inputs(&case, n as u64, &Device::Cpu)?;
            let scale = 1.0 / (case.3 as f64).sqrt();
            for (dtype, tolerance) in GPU_TOLERANCES {
                let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).and_then(|t| t.to_dtype(DType::F32)));
                let (q, k, v) = (q?, k?, v?);
                // The reference runs on the GPU too (candle's matmul + softmax):
                // the CPU would take minutes on the 4096-token case.
                let [qg, kg, vg] = [&q, &k, &v].map(|t| t.to_device(&gpu));
                let (qg, kg, vg) = (qg?, kg?, vg?);
                let want = unfused(&qg, &kg, &vg, scale)?;
                let [qg, kg, vg] = [&qg, &kg, &vg].map(|t| t.to_dtype(dtype));
                let (qg, kg, vg) = (qg?, kg?, vg?);
                // Auto is the tensor-core kernel for f16/bf16 where it fits.
                for kernel in [AttentionKernel::Auto, AttentionKernel::Simt] {
                    let got = attention_with(&qg, &kg, &vg, scale, kernel)?;
                    let err = rel_err(&got, &want)?;
                    eprintln!("attention {case:?} {dtype:?} {kernel:?}: relative error {err:.2e}");
                    assert!(err <= tolerance, "{case:?} {dtype:?} {kernel:?}: relative error {err}");
                }
            }
        }
        Ok(())
    }
}
