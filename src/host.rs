//! Every operation on host buffers, on whichever backend is at hand: the emulator runs on
//! them directly; the GPU gets copies (inputs up, outputs — poison and all — up and back
//! down) and the very same plan. For tests, examples and checks against the reference; a
//! program that keeps its tensors on the GPU calls [`crate::cuda`] with device buffers.

use crate::delta_linear::{
    DeltaApplyArgs, DeltaApplyDims, DeltaLinear, DeltaLinearArgs, DeltaLinearDims, LoraMergeArgs,
    LoraMergeDims,
};
#[cfg(feature = "cuda")]
use crate::plan::{delta_linear as plan, Buf, BufSource, KernelParams, Launch};
use crate::{Element, Error, Result};

/// Where host-buffer operations run.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU emulator, from the same kernel sources.
    #[cfg(feature = "emulator")]
    Emulator,
    /// A CUDA stream; each call copies its buffers in and out and waits for the stream.
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<cudarc::driver::CudaStream>),
}

impl Backend {
    /// The default stream of CUDA device `ordinal`.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> Result<Backend> {
        Ok(Backend::Cuda(
            crate::cuda::context(ordinal)?.default_stream(),
        ))
    }

    /// The GPU when the crate was built with `cuda` and a device is present, else the
    /// emulator; an error only when neither backend was built in or the device fails.
    pub fn best() -> Result<Backend> {
        #[cfg(feature = "cuda")]
        if crate::cuda::is_available() {
            return Backend::cuda(0);
        }
        #[cfg(feature = "emulator")]
        return Ok(Backend::Emulator);
        #[allow(unreachable_code)]
        Err(Error::NoDevice(
            "built without the emulator, and no CUDA device is present".into(),
        ))
    }

    /// A one-line description: "emulator (CPU)" or the GPU's name.
    pub fn describe(&self) -> String {
        match self {
            #[cfg(feature = "emulator")]
            Backend::Emulator => "emulator (CPU)".into(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(s) => s.context().name().unwrap_or_else(|_| "CUDA device".into()),
        }
    }
}

/// [`crate::emulator::delta_linear`] / [`crate::cuda::delta_linear`] on host buffers.
pub fn delta_linear<T: Element>(
    backend: &Backend,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeltaLinearArgs<&[T], &mut [T]>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::delta_linear(op, dims, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let mut up = Upload::new(stream);
            let steps = plan::delta_linear(op, dims, T::DTYPE, &args.bufs(&mut up))?;
            up.run(&steps)
        }
    }
}

/// [`crate::emulator::delta_apply`] / [`crate::cuda::delta_apply`] on host buffers.
pub fn delta_apply<T: Element>(
    backend: &Backend,
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeltaApplyArgs<&[T], &mut [T]>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::delta_apply(op, dims, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let mut up = Upload::new(stream);
            let steps = plan::delta_apply(op, dims, T::DTYPE, &args.bufs(&mut up))?;
            up.run(&steps)
        }
    }
}

/// [`crate::emulator::lora_merge`] / [`crate::cuda::lora_merge`] on host buffers.
pub fn lora_merge<T: Element>(
    backend: &Backend,
    dims: &LoraMergeDims,
    alpha: f32,
    args: LoraMergeArgs<&[T], &mut [T]>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::lora_merge(dims, alpha, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let mut up = Upload::new(stream);
            let step = plan::lora_merge(T::DTYPE, dims, alpha, &args.bufs(&mut up))?;
            up.run(&[step])
        }
    }
}

/// Host buffers copied to the GPU as a plan's operands: inputs once, outputs up (so that
/// what a kernel leaves unwritten stays as it was) and back down after the launches.
#[cfg(feature = "cuda")]
pub(crate) struct Upload<'h, T: Element> {
    stream: &'h std::sync::Arc<cudarc::driver::CudaStream>,
    inputs: Vec<cudarc::driver::CudaSlice<T>>,
    outputs: Vec<(cudarc::driver::CudaSlice<T>, &'h mut [T])>,
    error: Option<Error>,
}

#[cfg(feature = "cuda")]
impl<'h, T: Element> Upload<'h, T> {
    pub(crate) fn new(stream: &'h std::sync::Arc<cudarc::driver::CudaStream>) -> Self {
        Upload {
            stream,
            inputs: Vec::new(),
            outputs: Vec::new(),
            error: None,
        }
    }

    /// A device copy of `host` and its address; empty buffers are not allocated.
    fn copy(&mut self, host: &[T]) -> Option<(cudarc::driver::CudaSlice<T>, Buf)> {
        use cudarc::driver::DevicePtr;
        if host.is_empty() || self.error.is_some() {
            return None;
        }
        match self.stream.clone_htod(host) {
            Ok(d) => {
                let addr = d.device_ptr(self.stream).0;
                Some((
                    d,
                    Buf {
                        addr,
                        len: host.len(),
                    },
                ))
            }
            Err(e) => {
                self.error = Some(e.into());
                None
            }
        }
    }

    /// Launches the steps, copies the outputs back and waits for the stream.
    pub(crate) fn run<P: KernelParams>(self, steps: &[(Launch, P)]) -> Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        for (l, p) in steps {
            // SAFETY: every address in the steps is a device copy made here, of the length
            // the plan checked.
            unsafe { crate::cuda::launch(self.stream, l, p) }?;
        }
        for (d, host) in self.outputs {
            self.stream.memcpy_dtoh(&d, host)?;
        }
        self.stream.synchronize()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl<'h, T: Element> BufSource<&'h [T], &'h mut [T]> for Upload<'h, T> {
    fn read(&mut self, r: &'h [T]) -> Buf {
        let len = r.len();
        match self.copy(r) {
            Some((d, buf)) => {
                self.inputs.push(d);
                buf
            }
            None => Buf { addr: 0, len },
        }
    }
    fn write(&mut self, w: &'h mut [T]) -> Buf {
        let len = w.len();
        match self.copy(w) {
            Some((d, buf)) => {
                self.outputs.push((d, w));
                buf
            }
            None => Buf { addr: 0, len },
        }
    }
}
