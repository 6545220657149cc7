//! Where the diffusion executor computes and in which precision, chosen once
//! at start from `--device` and `--dtype`; and which run errors mean the GPU
//! ran out of memory.
//!
//! Device:
//! - `auto` (the default) takes CUDA device 0 when the binary has the `cuda`
//!   feature and the device answers, else the CPU, with one log line saying
//!   why. `cuda`/`cuda:N` asked for explicitly never falls back: the node
//!   refuses to start, so a GPU node cannot silently become a slow CPU node.
//! - Probing creates the device. candle links the driver library
//!   (`libcuda.so.1`) when the program is loaded (cudarc's `dynamic-linking`,
//!   see docs/gpu.md), so a running `cuda` binary always has one, and cudarc's
//!   `is_culib_present` (a `dynamic-loading` function) does not exist in this
//!   build. Creating the context can still fail: no GPU or driver mismatch, or
//!   the build machine's stub library (error 34). The probe also catches a
//!   panic, which is what cudarc does when it loads the library itself and
//!   finds none, so a change of linking mode cannot bring the node down.
//!
//! Precision (`auto`): f32 on the CPU. On CUDA it depends on the model, so
//! [`Precision::PerFamily`] is resolved per model at load: f16 for SD 1/2
//! (their published weights are f16); bf16 for SDXL, whose VAE overflows f16
//! (diffusers upcasts it to f32, `force_upcast`; bf16 has f32's range), and
//! for Z-Image, released in bf16 (its Qwen3 text encoder's activations exceed
//! f16's range; candle's Z-Image example runs it in bf16). f16 on the CPU
//! works (a test runs the tiny models so) but candle computes it slowly there,
//! which the start-up log says; bf16 on the CPU is refused at start, since
//! candle 0.11's CPU matmul has no bf16 (the same test checks that it fails).
//!
//! Out of memory: [`is_out_of_memory`] tells, from its text, a run that failed
//! because the GPU ran out of memory; the executor then retries a batch one
//! job at a time, and fails a single job with "does not fit in GPU memory"
//! as a *retryable* failure, bounded by `--max-attempts`: another node may
//! have a bigger or less busy GPU, and the memory may have been taken by
//! something passing (another process). A failure for good would be wrong for
//! the cluster; retrying forever is prevented by the attempt limit.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// `--device`: where to run the models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA device 0 when usable, else the CPU.
    Auto,
    Cpu,
    /// This CUDA device, or the node refuses to start.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok().filter(|_| n.bytes().all(|b| b.is_ascii_digit())))
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("'{s}' is not auto, cpu, cuda or cuda:N (N a device index)")),
        }
    }
}

/// `--dtype`: the precision of weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// f32 on the CPU; on CUDA f16 for SD 1/2, bf16 for SDXL and Z-Image.
    Auto,
    F32,
    /// Slow on the CPU.
    F16,
    /// CUDA only (candle's CPU matmul has no bf16).
    Bf16,
}

/// The dtype the executor loads models in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fixed(DType),
    /// f16 for SD 1/2, bf16 for SDXL and Z-Image (see the module doc).
    PerFamily,
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Precision::Fixed(dtype)
    }
}

impl Precision {
    /// The dtype for a model of `family` ([`crate::models::ModelMeta::family`]).
    pub fn for_family(self, family: &str) -> DType {
        match self {
            Precision::Fixed(dtype) => dtype,
            Precision::PerFamily if family == "sd" => DType::F16,
            Precision::PerFamily => DType::BF16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Precision::Fixed(dtype) => f.write_str(dtype.as_str()),
            Precision::PerFamily => f.write_str("auto (f16 for sd, bf16 for sdxl and z-image)"),
        }
    }
}

/// What [`decide`] chose; `D` is the probed device (a candle `Device`, or
/// anything in tests).
#[derive(Debug, PartialEq)]
pub struct Decision<D> {
    /// `None`: the CPU; else the CUDA device index and its probe result.
    pub cuda: Option<(usize, D)>,
    pub precision: Precision,
    /// Lines for the start-up log: why `auto` fell back to the CPU, a slow
    /// precision.
    pub notes: Vec<String>,
}

/// The pure choice of device and precision. `probe(n)` tries CUDA device `n`
/// and says why it is not usable; it is called only when CUDA is wanted.
/// An error is the one line the node refuses to start with.
pub fn decide<D>(
    device: DeviceArg,
    dtype: DtypeArg,
    probe: impl FnOnce(usize) -> Result<D, String>,
) -> Result<Decision<D>, String> {
    let mut notes = Vec::new();
    let cuda = match device {
        DeviceArg::Cpu => None,
        DeviceArg::Cuda(n) => Some((n, probe(n).map_err(|why| format!("--device cuda:{n}: {why}"))?)),
        DeviceArg::Auto => match probe(0) {
            Ok(d) => Some((0, d)),
            Err(why) => {
                notes.push(format!("running the models on the CPU (--device auto): {why}"));
                None
            }
        },
    };
    let precision = match (dtype, cuda.is_some()) {
        (DtypeArg::Auto, true) => Precision::PerFamily,
        (DtypeArg::Auto, false) | (DtypeArg::F32, _) => Precision::Fixed(DType::F32),
        (DtypeArg::F16, _) => Precision::Fixed(DType::F16),
        (DtypeArg::Bf16, _) => Precision::Fixed(DType::BF16),
    };
    match (cuda.is_some(), precision) {
        (false, Precision::Fixed(DType::BF16)) => {
            return Err(format!(
                "--dtype bf16 needs a GPU: candle's CPU backend has no bf16 matmul; use f32 or f16 on the CPU{}",
                notes.first().map_or(String::new(), |n| format!(" ({n})"))
            ));
        }
        (false, Precision::Fixed(DType::F16)) => {
            notes.push("--dtype f16 on the CPU: candle computes f16 slowly there; f32 is faster".into())
        }
        _ => {}
    }
    Ok(Decision { cuda, precision, notes })
}

/// The device and precision the executor runs on, and what to report.
pub struct Placement {
    pub device: Device,
    pub precision: Precision,
    /// `cpu` or `cuda:N` (for `/metrics` and the start-up log).
    pub label: String,
    /// The GPU's name and total memory, when on CUDA and the driver says.
    pub gpu: Option<(String, u64)>,
}

/// Probes and chooses (see [`decide`]), logging the notes. An error is the
/// line the node refuses to start with.
pub fn choose(device: DeviceArg, dtype: DtypeArg) -> anyhow::Result<Placement> {
    let d = decide(device, dtype, probe).map_err(|e| anyhow::anyhow!(e))?;
    for note in &d.notes {
        tracing::warn!("{note}");
    }
    Ok(match d.cuda {
        None => Placement { device: Device::Cpu, precision: d.precision, label: "cpu".into(), gpu: None },
        Some((n, device)) => {
            let gpu = gpu_info(&device);
            Placement { device, precision: d.precision, label: format!("cuda:{n}"), gpu }
        }
    })
}

/// Creates CUDA device `n`, or says why it cannot be used.
fn probe(n: usize) -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("this binary was built without the `cuda` feature (see docs/gpu.md)".into());
    }
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(format!("CUDA device {n} is not usable: {e}")),
        Err(_) => Err(format!("CUDA device {n}: the CUDA driver library (libcuda.so.1) could not be loaded")),
    }
}

/// The GPU's name and total memory in bytes.
#[cfg(feature = "cuda")]
fn gpu_info(device: &Device) -> Option<(String, u64)> {
    let Device::Cuda(d) = device else { return None };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    Some((ctx.name().ok()?, ctx.total_mem().ok()? as u64))
}

#[cfg(not(feature = "cuda"))]
fn gpu_info(_device: &Device) -> Option<(String, u64)> {
    None
}

/// The model memory budget when `--model-memory-mb` is not given: 3/4 of the
/// GPU's memory (the rest is for activations, cuBLAS workspaces and the CUDA
/// context), or 16 GiB on the CPU.
pub fn default_model_memory_mb(gpu_total_bytes: Option<u64>) -> u64 {
    match gpu_total_bytes {
        Some(total) => (total / 4 * 3) >> 20,
        None => 16_384,
    }
}

/// Whether a run error (its `{:#}` text) means the GPU ran out of memory: an
/// allocation by the driver (`CUDA_ERROR_OUT_OF_MEMORY`, as cudarc's
/// `DriverError` prints it: `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of
/// memory")`), or one inside cuBLAS/cuBLASLt (`CublasError(
/// CUBLAS_STATUS_ALLOC_FAILED)`) or cuRAND (`CURAND_STATUS_ALLOCATION_FAILED`).
/// The CPU has no such error: a failed host allocation aborts the process.
pub fn is_out_of_memory(error: &str) -> bool {
    const MARKERS: [&str; 3] =
        ["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED", "CURAND_STATUS_ALLOCATION_FAILED"];
    MARKERS.iter().any(|m| error.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_gpu(_: usize) -> Result<&'static str, String> {
        Err("this binary was built without the `cuda` feature".into())
    }

    fn gpu(n: usize) -> Result<&'static str, String> {
        if n == 0 {
            Ok("gpu0")
        } else {
            Err(format!(
                "CUDA device {n} is not usable: DriverError(CUDA_ERROR_INVALID_DEVICE, \"invalid device ordinal\")"
            ))
        }
    }

    #[test]
    fn device_flag_parses() {
        assert_eq!("auto".parse(), Ok(DeviceArg::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "CUDA", ""] {
            assert!(bad.parse::<DeviceArg>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn auto_takes_the_gpu_when_usable_else_the_cpu_saying_why() {
        let d = decide(DeviceArg::Auto, DtypeArg::Auto, gpu).unwrap();
        assert_eq!(d.cuda, Some((0, "gpu0")));
        assert_eq!(d.precision, Precision::PerFamily);
        assert!(d.notes.is_empty(), "{:?}", d.notes);

        let d = decide(DeviceArg::Auto, DtypeArg::Auto, no_gpu).unwrap();
        assert_eq!(d.cuda, None);
        assert_eq!(d.precision, Precision::Fixed(DType::F32));
        assert_eq!(d.notes.len(), 1, "one line: {:?}", d.notes);
        assert!(d.notes[0].contains("CPU") && d.notes[0].contains("`cuda` feature"), "{}", d.notes[0]);
    }

    #[test]
    fn an_explicit_gpu_never_falls_back() {
        let e = decide(DeviceArg::Cuda(0), DtypeArg::Auto, no_gpu).unwrap_err();
        assert!(e.starts_with("--device cuda:0: ") && e.contains("`cuda` feature"), "{e}");
        let e = decide(DeviceArg::Cuda(1), DtypeArg::F16, gpu).unwrap_err();
        assert!(e.contains("cuda:1") && e.contains("INVALID_DEVICE"), "{e}");
        let d = decide(DeviceArg::Cuda(0), DtypeArg::F32, gpu).unwrap();
        assert_eq!((d.cuda, d.precision), (Some((0, "gpu0")), Precision::Fixed(DType::F32)));
    }

    #[test]
    fn the_cpu_is_never_probed_and_half_precision_there_is_flagged() {
        let probe = |_: usize| -> Result<(), String> { panic!("probed for --device cpu") };
        let d = decide(DeviceArg::Cpu, DtypeArg::Auto, probe).unwrap();
        assert_eq!((d.cuda, d.precision), (None, Precision::Fixed(DType::F32)));
        assert!(d.notes.is_empty());
        let d = decide(DeviceArg::Cpu, DtypeArg::F16, probe).unwrap();
        assert_eq!(d.precision, Precision::Fixed(DType::F16));
        assert!(d.notes.len() == 1 && d.notes[0].contains("slowly"), "{:?}", d.notes);
        // A fallback with f16 asked for: both lines.
        let d = decide(DeviceArg::Auto, DtypeArg::F16, no_gpu).unwrap();
        assert_eq!(d.precision, Precision::Fixed(DType::F16));
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
    }

    #[test]
    fn bf16_is_refused_on_the_cpu_but_not_on_a_gpu() {
        let e = decide(DeviceArg::Cpu, DtypeArg::Bf16, no_gpu).unwrap_err();
        assert!(e.starts_with("--dtype bf16 needs a GPU"), "{e}");
        // Falling back to the CPU: the refusal says why there is no GPU.
        let e = decide(DeviceArg::Auto, DtypeArg::Bf16, no_gpu).unwrap_err();
        assert!(e.contains("bf16") && e.contains("`cuda` feature"), "{e}");
        let d = decide(DeviceArg::Auto, DtypeArg::Bf16, gpu).unwrap();
        assert_eq!(d.precision, Precision::Fixed(DType::BF16));
    }

    #[test]
    fn auto_precision_depends_on_the_family() {
        assert_eq!(Precision::PerFamily.for_family("sd"), DType::F16);
        assert_eq!(Precision::PerFamily.for_family("sdxl"), DType::BF16);
        assert_eq!(Precision::PerFamily.for_family("z-image"), DType::BF16);
        assert_eq!(Precision::Fixed(DType::F32).for_family("sd"), DType::F32);
    }

    #[test]
    fn the_budget_defaults_to_three_quarters_of_the_gpu() {
        assert_eq!(default_model_memory_mb(None), 16_384);
        assert_eq!(default_model_memory_mb(Some(80 << 30)), 60 << 10);
    }

    #[test]
    fn out_of_memory_is_told_from_the_cuda_error_texts() {
        // As candle wraps cudarc's errors (`{:#}` of the anyhow chain).
        let oom = [
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
            r#"loading model 'sd': DriverError(CUDA_ERROR_OUT_OF_MEMORY, "<Failure when calling cuGetErrorString()>")"#,
            "CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
            "CurandError(CURAND_STATUS_ALLOCATION_FAILED)",
        ];
        for text in oom {
            assert!(is_out_of_memory(text), "{text}");
        }
        let other = [
            r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered")"#,
            "CublasError(CUBLAS_STATUS_EXECUTION_FAILED)",
            "shape mismatch in matmul, lhs: [2, 3], rhs: [4, 5]",
            "out of range",
        ];
        for text in other {
            assert!(!is_out_of_memory(text), "{text}");
        }
    }

    /// The texts come from the real error types (no driver call: cuBLAS's
    /// error prints its status name).
    #[cfg(feature = "cuda")]
    #[test]
    fn out_of_memory_matches_the_real_cublas_error() {
        use candle_core::cuda_backend::cudarc::cublas::result::CublasError;
        use candle_core::cuda_backend::cudarc::cublas::sys::cublasStatus_t;
        use candle_core::cuda_backend::WrapErr;
        let e = Err::<(), _>(CublasError(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED)).w().unwrap_err();
        assert!(is_out_of_memory(&format!("{:#}", anyhow::Error::from(e))));
    }
}
