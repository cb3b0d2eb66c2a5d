//! Backends and devices. CPU (burn-flex) is the default build; `--features cuda` adds
//! burn-cuda, selected at run time with `--device cuda:N`.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use std::str::FromStr;

pub type Cpu = burn::backend::Flex;
pub type CpuTrain = burn::backend::Autodiff<Cpu>;
/// `[train] gradient_checkpointing = true`: the graph behaves as without checkpointing, and
/// the model, seeing this backend, recomputes each decoder layer in the backward pass
/// (`layer_checkpoint`). A strategy of the vendored burn-autodiff.
pub type Checkpointing = burn::backend::autodiff::checkpoint::strategy::LayerRecompute;
pub type CpuTrainCheckpointed = burn::backend::Autodiff<Cpu, Checkpointing>;
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
#[cfg(feature = "cuda")]
pub type GpuTrain = burn::backend::Autodiff<Gpu>;
#[cfg(feature = "cuda")]
pub type GpuTrainCheckpointed = burn::backend::Autodiff<Gpu, Checkpointing>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => bail!("unknown device `{s}`; expected `cpu`, `cuda` or `cuda:N`"),
            },
        }
    }
}

impl DeviceSpec {
    /// Fails clearly when CUDA is asked for but this binary was built without it.
    pub fn ensure_available(self) -> Result<Self> {
        match self {
            Self::Cpu => Ok(self),
            Self::Cuda(_) if cfg!(feature = "cuda") => {
                if !cuda_driver_present() {
                    bail!(
                        "--device cuda: the NVIDIA driver library (libcuda.so) cannot be loaded; this machine has no usable GPU, \
                         or the driver is not on LD_LIBRARY_PATH (use --device cpu)"
                    );
                }
                Ok(self)
            }
            Self::Cuda(_) => bail!(
                "this burnish binary was built without CUDA support; rebuild with `cargo build --release --features cuda`, or use `--device cpu`"
            ),
        }
    }
}

/// Whether the CUDA driver library loads: cudarc panics (on a runtime thread) when it does not.
fn cuda_driver_present() -> bool {
    ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        let name = std::ffi::CString::new(*name).expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is closed again at once.
        unsafe {
            let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
            if handle.is_null() {
                return false;
            }
            libc::dlclose(handle);
            true
        }
    })
}

#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(index)
}

/// Whether `B` compiles a kernel for each new tensor shape (the cubecl backends: CUDA), so
/// batches must come in few shapes.
pub fn compiles_per_shape<B: Backend>(device: &B::Device) -> bool {
    B::name(device).contains("cubecl")
}

/// The width multiple batches are padded to when a recipe does not say: 64 (transformers'
/// usual `pad_to_multiple_of`) where kernels compile per shape, 1 on the CPU, where
/// padding would only add work.
pub fn default_pad_multiple<B: Backend>(device: &B::Device) -> usize {
    if compiles_per_shape::<B>(device) {
        64
    } else {
        1
    }
}
