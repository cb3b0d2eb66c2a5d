//! Runs a backend-generic command on the device chosen with `--device`.

use anyhow::Result;
use burn::tensor::backend::Backend;
use models::backend::DeviceSpec;

/// A command body generic over the backend.
pub trait OnDevice {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

pub fn dispatch<C: OnDevice>(spec: &str, cmd: C) -> Result<C::Output> {
    let spec: DeviceSpec = spec.parse()?;
    match spec.ensure_available()? {
        DeviceSpec::Cpu => cmd.run::<models::backend::Cpu>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            models::kernel_cache::configure(None)?;
            cmd.run::<models::backend::Gpu>(models::backend::cuda_device(i))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("ensure_available refuses CUDA without the feature"),
    }
}

/// A training command body, generic over an autodiff backend, on one device or several of
/// one kind (one data-parallel replica each).
pub trait OnTrainDevice {
    type Output;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        devices: Vec<B::Device>,
    ) -> Result<Self::Output>;
}

/// `cpu`, `cuda:1`, or a comma-separated list of one kind (`cuda:0,cuda:1`; a device listed
/// twice holds two replicas, as `cpu,cpu` does for tests). Under a multi-process launch (`local_rank`), a bare `cuda`
/// is `cuda:LOCAL_RANK`.
pub fn parse_devices(list: &str, local_rank: Option<usize>) -> Result<Vec<DeviceSpec>> {
    let specs = list
        .split(',')
        .map(|s| match (s.trim(), local_rank) {
            ("cuda", Some(r)) => Ok(DeviceSpec::Cuda(r)),
            (s, _) => s.parse::<DeviceSpec>()?.ensure_available(),
        })
        .collect::<Result<Vec<_>>>()?;
    let cpu = specs.iter().filter(|d| **d == DeviceSpec::Cpu).count();
    if cpu != 0 && cpu != specs.len() {
        anyhow::bail!("--device {list}: data-parallel replicas must all be CPU or all CUDA");
    }
    Ok(specs)
}

/// Runs `cmd` on the training backend of `specs`; with `checkpointing`, the autodiff
/// backend recomputes memory-bound activations in the backward pass (see
/// [`models::backend::Checkpointing`]).
pub fn dispatch_train<C: OnTrainDevice>(
    specs: &[DeviceSpec],
    checkpointing: bool,
    cmd: C,
) -> Result<C::Output> {
    use models::backend as b;
    match specs.first() {
        None => anyhow::bail!("no device given"),
        Some(DeviceSpec::Cpu) => {
            let devices = vec![Default::default(); specs.len()];
            match checkpointing {
                true => cmd.run::<b::CpuTrainCheckpointed>(devices),
                false => cmd.run::<b::CpuTrain>(devices),
            }
        }
        #[cfg(feature = "cuda")]
        Some(DeviceSpec::Cuda(_)) => {
            // Train commands configure it first with the recipe's autotune level.
            models::kernel_cache::configure(None)?;
            let devices: Vec<_> = specs
                .iter()
                .map(|d| match d {
                    DeviceSpec::Cuda(i) => b::cuda_device(*i),
                    DeviceSpec::Cpu => unreachable!("checked by parse_devices"),
                })
                .collect();
            match checkpointing {
                true => cmd.run::<b::GpuTrainCheckpointed>(devices),
                false => cmd.run::<b::GpuTrain>(devices),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Some(DeviceSpec::Cuda(_)) => {
            unreachable!("ensure_available refuses CUDA without the feature")
        }
    }
}
