//! Classifier-free guidance fused with the scheduler's update: one pass per
//! denoising step over the model output and the latents, where the unfused
//! path makes one per candle op (narrow, subtract, scale, add, then the
//! scheduler's three to eight).
//!
//! Every sampler we run steps linearly (`Scheduler::linear_step`):
//! `next = a * sample + b * guided + c * noise`; the guidance combine is
//! `guided = first + s * (second - first)` over the two halves of the batched
//! model output, in whichever order the pipeline stacks them.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_f32, cpu_output, cpu_store_like, same_dtype};
use crate::models::scheduler::LinearStep;

/// How the model output's rows combine into the guided prediction.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Guidance {
    /// One row per sample, used as is.
    None,
    /// Rows `[uncond..., cond...]`, `uncond + g * (cond - uncond)`: the SD
    /// family (`SdPipeline::sample`).
    UncondFirst(f64),
    /// Rows `[cond..., uncond...]`, `cond + g * (cond - uncond)`: Z-Image
    /// (`ZImagePipeline::model_output`).
    CondFirst(f64),
}

impl Guidance {
    /// (guided, s) for `first + s * (second - first)`.
    fn form(self) -> (bool, f32) {
        match self {
            Guidance::None => (false, 0.0),
            Guidance::UncondFirst(g) => (true, g as f32),
            // cond + g (cond - uncond) = first - g (second - first).
            Guidance::CondFirst(g) => (true, -g as f32),
        }
    }
}

/// The op: guidance and the step's scalars. Inputs: model output
/// ([2B, ...] guided, [B, ...] otherwise), sample [B, ...] and, where
/// `step.noise != 0`, noise [B, ...] (CustomOp3; CustomOp2 without).
#[derive(Copy, Clone, Debug)]
pub struct GuidedStep {
    pub guidance: Guidance,
    pub step: LinearStep,
}

/// The next latents from the batched model output, the current latents
/// (`sample`) and, for stochastic samplers, the step's noise (shaped like
/// `sample`; required when `step.noise != 0`, ignored otherwise). All of one
/// dtype; the result has the sample's shape and dtype.
pub fn guided_step(
    model_output: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
    guidance: Guidance,
    step: LinearStep,
) -> Result<Tensor> {
    let op = GuidedStep { guidance, step };
    let (out, sample) = (model_output.contiguous()?, sample.contiguous()?);
    match noise {
        _ if step.noise == 0.0 => out.apply_op2_no_bwd(&sample, &op),
        Some(noise) => out.apply_op3_no_bwd(&sample, &noise.contiguous()?, &op),
        None => bail!("guided_step: the step adds noise (coefficient {}) but no noise was given", step.noise),
    }
}

impl GuidedStep {
    /// Checks the shapes; returns the number of elements of the sample.
    fn check(&self, out: &Layout, sample: &Layout, noise: Option<&Layout>) -> Result<usize> {
        let (od, sd) = (out.dims(), sample.dims());
        let rows = if self.guidance.form().0 { 2 } else { 1 };
        let ok = !sd.is_empty() && od.len() == sd.len() && od[0] == rows * sd[0] && od[1..] == sd[1..];
        if !ok {
            bail!("guided_step: model output {od:?} does not match sample {sd:?} ({rows} rows per sample)");
        }
        if let Some(nl) = noise {
            if nl.dims() != sd {
                bail!("guided_step: noise {:?} is not shaped like the sample {sd:?}", nl.dims());
            }
        }
        Ok(sample.shape().elem_count())
    }

    /// The CPU reference, on f32 values.
    fn cpu(&self, out: &[f32], sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let n = sample.len();
        let (guided, s) = self.guidance.form();
        let LinearStep { sample: a, model_output: b, noise: c } = self.step;
        let (a, b, c) = (a as f32, b as f32, c as f32);
        let mut next = cpu_output(n);
        for (i, x) in next.iter_mut().enumerate() {
            let first = out[i];
            let pred = if guided { first + s * (out[n + i] - first) } else { first };
            let z = noise.map_or(0.0, |z| c * z[i]);
            *x = a * sample[i] + b * pred + z;
        }
        next
    }
}

/// The ops' name in errors and in candle's op list.
const NAME: &str = "guided-step";

impl CustomOp2 for GuidedStep {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, os: &CpuStorage, ol: &Layout, ss: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(NAME, &[os.dtype(), ss.dtype()])?;
        self.check(ol, sl, None)?;
        let next = self.cpu(&cpu_f32(NAME, os, ol)?, &cpu_f32(NAME, ss, sl)?, None);
        Ok((cpu_store_like(next, ss)?, sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        os: &candle_core::CudaStorage,
        ol: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = self.check(ol, sl, None)?;
        Ok((gpu::dispatch(self, n, (os, ol), (ss, sl), None)?, sl.shape().clone()))
    }
}

impl CustomOp3 for GuidedStep {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        os: &CpuStorage,
        ol: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        ns: &CpuStorage,
        nl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        same_dtype(NAME, &[os.dtype(), ss.dtype(), ns.dtype()])?;
        self.check(ol, sl, Some(nl))?;
        let noise = cpu_f32(NAME, ns, nl)?;
        let next = self.cpu(&cpu_f32(NAME, os, ol)?, &cpu_f32(NAME, ss, sl)?, Some(&noise));
        Ok((cpu_store_like(next, ss)?, sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        os: &candle_core::CudaStorage,
        ol: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        ns: &candle_core::CudaStorage,
        nl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = self.check(ol, sl, Some(nl))?;
        Ok((gpu::dispatch(self, n, (os, ol), (ss, sl), Some((ns, nl)))?, sl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result};

    use super::GuidedStep;
    use crate::kernels::cuda::{alloc_output, grid_for, view, Module};

    static MODULE: Module =
        Module::new("raftgen_guided_step", concat!(include_str!("common.cuh"), include_str!("guided_step.cu")));
    const THREADS: u32 = 256;

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    pub(super) fn dispatch(
        op: &GuidedStep,
        n: usize,
        out: Input,
        sample: Input,
        noise: Option<Input>,
    ) -> Result<CudaStorage> {
        match &out.0.slice {
            S::F32(o) => launch(op, n, (o, out.1), sample, noise, "f32"),
            S::F16(o) => launch(op, n, (o, out.1), sample, noise, "f16"),
            S::BF16(o) => launch(op, n, (o, out.1), sample, noise, "bf16"),
            _ => bail!("guided_step: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(out.0)),
        }
    }

    fn launch<T: DeviceRepr + CudaDType>(
        op: &GuidedStep,
        n: usize,
        (o, ol): (&CudaSlice<T>, &Layout),
        (ss, sl): Input,
        noise: Option<Input>,
        suffix: &str,
    ) -> Result<CudaStorage> {
        let name = "guided_step";
        let dev = &ss.device;
        let model_output = view(name, o, ol)?;
        let sample = view(name, T::as_cuda_slice(ss)?, sl)?;
        let mut next = alloc_output::<T>(dev, n)?;
        if n > 0 {
            let (guided, scale) = op.guidance.form();
            let guided = guided as i32;
            let (a, b, c) = (op.step.sample as f32, op.step.model_output as f32, op.step.noise as f32);
            let n64 = n as u64;
            let cfg = LaunchConfig {
                grid_dim: (grid_for(n, THREADS), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            match noise {
                None => {
                    let func =
                        dev.get_or_load_custom_func(&format!("guided_step_{suffix}"), MODULE.name, MODULE.ptx()?)?;
                    let mut bld = func.builder();
                    bld.arg(&model_output).arg(&sample).arg(&mut next).arg(&n64);
                    bld.arg(&guided).arg(&scale).arg(&a).arg(&b);
                    // SAFETY: the arguments match guided_step_* in guided_step.cu.
                    unsafe { bld.launch(cfg) }.w()?;
                }
                Some((ns, nl)) => {
                    let noise = view(name, T::as_cuda_slice(ns)?, nl)?;
                    let func = dev.get_or_load_custom_func(
                        &format!("guided_step_noise_{suffix}"),
                        MODULE.name,
                        MODULE.ptx()?,
                    )?;
                    let mut bld = func.builder();
                    bld.arg(&model_output).arg(&sample).arg(&noise).arg(&mut next).arg(&n64);
                    bld.arg(&guided).arg(&scale).arg(&a).arg(&b).arg(&c);
                    // SAFETY: the arguments match guided_step_noise_* in guided_step.cu.
                    unsafe { bld.launch(cfg) }.w()?;
                }
            }
        }
        Ok(T::wrap_cuda_slice(next, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor};

    use super::{guided_step, Guidance};
    use crate::kernels::test_util::{randn, rel_err};
    use crate::models::scheduler::{self, LinearStep, SamplerKind, Scheduler, SchedulerConfig};
    use crate::models::z_image::ZImagePipeline;

    const SD_BETAS: &str = r#""beta_schedule":"scaled_linear","beta_start":0.00085,"beta_end":0.012"#;

    /// The samplers as the pipelines build them: (name, scheduler, whether
    /// the test runs it the Z-Image way).
    fn samplers(steps: usize) -> Vec<(String, Box<dyn Scheduler>, bool)> {
        let cfg = |json: String| -> SchedulerConfig { serde_json::from_str(&json).unwrap() };
        let sd = cfg(format!(r#"{{{SD_BETAS},"steps_offset":1}}"#));
        let sd_v = cfg(format!(r#"{{{SD_BETAS},"prediction_type":"v_prediction","timestep_spacing":"trailing"}}"#));
        let sd_linspace = cfg(format!(r#"{{{SD_BETAS},"timestep_spacing":"linspace"}}"#));
        let flow = cfg(r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","shift":3.0}"#.to_string());
        let mut out = Vec::new();
        for (label, config) in [("eps", &sd), ("v", &sd_v), ("linspace", &sd_linspace)] {
            for kind in [SamplerKind::Ddim, SamplerKind::Euler, SamplerKind::EulerAncestral] {
                out.push((format!("{} ({label})", kind.name()), scheduler::build(kind, config, steps).unwrap(), false));
            }
        }
        out.push((
            "flow_match_euler".into(),
            scheduler::build(SamplerKind::FlowMatchEuler, &flow, steps).unwrap(),
            true,
        ));
        out
    }

    /// The pipelines' unfused step: the SD guidance combine (or Z-Image's
    /// `model_output`), then the scheduler's `step` drawing `noise`.
    fn unfused(
        sched: &dyn Scheduler,
        z_image: bool,
        i: usize,
        out: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
        guidance: f64,
    ) -> Result<Tensor> {
        let guided = guidance > 1.0;
        let pred = if z_image {
            ZImagePipeline::model_output(&out.unsqueeze(2)?, guided, guidance)?
        } else if guided {
            let b = sample.dim(0)?;
            let (unc, txt) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
            (&unc + ((txt - &unc)? * guidance)?)?
        } else {
            out.clone()
        };
        let mut draw = |_: &[usize]| Ok(noise.clone());
        sched.step(&pred, i, sample, &mut draw)
    }

    fn fused(
        sched: &dyn Scheduler,
        z_image: bool,
        i: usize,
        out: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
        guidance: f64,
    ) -> Result<Tensor> {
        let mut step = sched.linear_step(i).expect("every sampler steps linearly");
        let guidance = match (guidance > 1.0, z_image) {
            (false, _) => Guidance::None,
            (true, false) => Guidance::UncondFirst(guidance),
            (true, true) => Guidance::CondFirst(guidance),
        };
        if z_image {
            // Z-Image's scheduler steps with the negated prediction.
            step = LinearStep { model_output: -step.model_output, ..step };
        }
        guided_step(out, sample, Some(noise), guidance, step)
    }

    /// (sample shape, guidance): SD latents, an odd size, unguided.
    const CASES: &[(&[usize], f64)] =
        &[(&[1, 4, 8, 8], 7.5), (&[2, 4, 7, 9], 5.0), (&[3, 16, 5, 3], 1.0), (&[1, 1, 1, 1], 3.0)];

    fn inputs(shape: &[usize], guidance: f64, seed: u64, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = if guidance > 1.0 { 2 * shape[0] } else { shape[0] };
        let mut out_shape = shape.to_vec();
        out_shape[0] = rows;
        let out = randn(&out_shape, seed, device)?;
        let sample = (randn(shape, seed + 1, device)? * 3.0)?;
        let noise = randn(shape, seed + 2, device)?;
        Ok((out, sample, noise))
    }

    #[test]
    fn cpu_reference_matches_guidance_then_scheduler_step() -> Result<()> {
        let steps = 7;
        for (name, sched, z_image) in samplers(steps) {
            for (k, &(shape, guidance)) in CASES.iter().enumerate() {
                for i in [0, 3, steps - 1] {
                    let (out, sample, noise) = inputs(shape, guidance, (k * 10 + i) as u64, &Device::Cpu)?;
                    let want = unfused(sched.as_ref(), z_image, i, &out, &sample, &noise, guidance)?;
                    let got = fused(sched.as_ref(), z_image, i, &out, &sample, &noise, guidance)?;
                    let err = rel_err(&got, &want)?;
                    assert!(err <= 1e-4, "{name}, step {i}, {shape:?}, guidance {guidance}: relative error {err}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_and_bad_inputs() -> Result<()> {
        let (name, sched, _) = samplers(4).swap_remove(2);
        assert!(name.starts_with("euler_a"), "{name}");
        let (out, sample, noise) = inputs(&[2, 4, 5, 6], 6.0, 9, &Device::Cpu)?;
        let want = unfused(sched.as_ref(), false, 1, &out, &sample, &noise, 6.0)?;
        for dtype in [DType::F16, DType::BF16] {
            let [o, s, n] = [&out, &sample, &noise].map(|t| t.to_dtype(dtype));
            let got = fused(sched.as_ref(), false, 1, &o?, &s?, &n?, 6.0)?;
            assert_eq!(got.dtype(), dtype);
            let err = rel_err(&got, &want)?;
            assert!(err <= 1e-2, "{dtype:?}: relative error {err}");
        }
        let step = sched.linear_step(1).unwrap();
        assert!(guided_step(&out, &sample, None, Guidance::UncondFirst(6.0), step).is_err(), "noise missing");
        assert!(guided_step(&sample, &sample, Some(&noise), Guidance::UncondFirst(6.0), step).is_err(), "one row each");
        assert!(guided_step(&out, &sample, Some(&out), Guidance::UncondFirst(6.0), step).is_err(), "noise shape");
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernel_matches_guidance_then_scheduler_step() -> Result<()> {
        use crate::kernels::test_util::{cuda_device, GPU_TOLERANCES};
        let Some(gpu) = cuda_device() else { return Ok(()) };
        let steps = 5;
        let cases = CASES.iter().copied().chain([(&[2usize, 4, 64, 64][..], 7.5), (&[1, 16, 127, 129][..], 4.0)]);
        for (k, (shape, guidance)) in cases.enumerate() {
            for (name, sched, z_image) in samplers(steps) {
                let i = k % steps;
                let (out, sample, noise) = inputs(shape, guidance, k as u64, &Device::Cpu)?;
                for (dtype, tolerance) in GPU_TOLERANCES {
                    let [o, s, n] =
                        [&out, &sample, &noise].map(|t| t.to_dtype(dtype).and_then(|t| t.to_dtype(DType::F32)));
                    let (o, s, n) = (o?, s?, n?);
                    let want = unfused(sched.as_ref(), z_image, i, &o, &s, &n, guidance)?;
                    let [og, sg, ng] = [&o, &s, &n].map(|t| t.to_dtype(dtype).and_then(|t| t.to_device(&gpu)));
                    let got = fused(sched.as_ref(), z_image, i, &og?, &sg?, &ng?, guidance)?;
                    let err = rel_err(&got, &want)?;
                    assert!(err <= tolerance, "{name}, step {i}, {shape:?}, {dtype:?}: relative error {err}");
                }
            }
        }
        Ok(())
    }
}
