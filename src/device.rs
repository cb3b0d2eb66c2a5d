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
        DeviceSpec::Cuda(i) => cmd.run::<models::backend::Gpu>(models::backend::cuda_device(i)),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("ensure_available refuses CUDA without the feature"),
    }
}

/// A training command body, generic over an autodiff backend.
pub trait OnTrainDevice {
    type Output;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        device: B::Device,
    ) -> Result<Self::Output>;
}

pub fn dispatch_train<C: OnTrainDevice>(spec: &str, cmd: C) -> Result<C::Output> {
    let spec: DeviceSpec = spec.parse()?;
    match spec.ensure_available()? {
        DeviceSpec::Cpu => cmd.run::<models::backend::CpuTrain>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            cmd.run::<models::backend::GpuTrain>(models::backend::cuda_device(i))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("ensure_available refuses CUDA without the feature"),
    }
}
