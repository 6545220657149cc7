//! GPU utilisation and memory, read from NVIDIA's management library (NVML)
//! at scrape time.
//!
//! NVML ships with the NVIDIA driver (`libnvidia-ml.so.1`), not with the CUDA
//! toolkit, and is loaded at run time: the same binary runs on a machine
//! without a GPU, where it exports no `raftgen_gpu_*` family at all (rather than
//! zeros that would read as an idle GPU), and logs once why. On a GPU machine
//! every device the driver shows is reported, labelled by index and name.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;

use super::exposition::{Exposition, Kind};

/// One device's numbers at one scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    /// Fraction of the last sample period (driver-defined, about 1/6 s to 1 s)
    /// in which a kernel ran, 0..=1.
    pub utilization_ratio: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// NVML, initialised on first use; `None` where the library or a driver is
/// missing.
fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        // The unversioned name exists only with development packages.
        let loaded =
            Nvml::builder().lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1")).init().or_else(|_| Nvml::init());
        match loaded {
            Ok(nvml) => {
                tracing::info!("NVML loaded: GPU metrics on /metrics");
                Some(nvml)
            }
            Err(e) => {
                tracing::info!("no GPU metrics: NVML unavailable ({e})");
                None
            }
        }
    })
    .as_ref()
}

/// Every device NVML shows; empty without NVML. A device that fails to answer
/// is skipped (and the others still reported).
pub fn sample() -> Vec<GpuSample> {
    let Some(nvml) = nvml() else { return Vec::new() };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let utilization = device.utilization_rates().ok()?;
            let memory = device.memory_info().ok()?;
            Some(GpuSample {
                index,
                name: device.name().unwrap_or_else(|_| "unknown".into()),
                utilization_ratio: f64::from(utilization.gpu.min(100)) / 100.0,
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
            })
        })
        .collect()
}

/// Writes the `raftgen_gpu_*` families (nothing when `gpus` is empty).
pub fn write(e: &mut Exposition, gpus: &[GpuSample]) {
    let labels: Vec<(String, &str)> = gpus.iter().map(|g| (g.index.to_string(), g.name.as_str())).collect();
    let with = |f: fn(&GpuSample) -> f64| {
        gpus.iter().zip(&labels).map(move |(g, (i, n))| ([("gpu", i.as_str()), ("name", *n)], f(g))).collect::<Vec<_>>()
    };
    e.family(
        "raftgen_gpu_utilization_ratio",
        Kind::Gauge,
        "Fraction of the driver's last sample period in which this GPU ran a kernel (NVML), per device.",
        with(|g| g.utilization_ratio),
    );
    e.family(
        "raftgen_gpu_memory_used_bytes",
        Kind::Gauge,
        "GPU memory in use, all processes (NVML), per device.",
        with(|g| g.memory_used_bytes as f64),
    );
    e.family(
        "raftgen_gpu_memory_total_bytes",
        Kind::Gauge,
        "GPU memory on the device (NVML), per device.",
        with(|g| g.memory_total_bytes as f64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_carry_device_labels_and_vanish_without_devices() {
        let mut e = Exposition::new();
        write(&mut e, &[]);
        assert_eq!(e.finish(), "", "no device, no family");

        let mut e = Exposition::new();
        let gpu = GpuSample {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization_ratio: 0.93,
            memory_used_bytes: 70 << 30,
            memory_total_bytes: 80 << 30,
        };
        write(&mut e, &[gpu]);
        let text = e.finish();
        assert!(
            text.contains("raftgen_gpu_utilization_ratio{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 0.93"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "raftgen_gpu_memory_used_bytes{{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"}} {}",
                70u64 << 30
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE raftgen_gpu_memory_total_bytes gauge"), "{text}");
    }
}
