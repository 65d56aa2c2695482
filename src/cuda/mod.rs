//! The CUDA backend: the kernels' PTX and cubins, built by nvcc and embedded in the crate
//! (build/cuda.rs), loaded through cudarc on first use in each context and launched with
//! the geometry [`crate::plan`] computed.
//!
//! The driver library is opened at run time (cudarc's `fallback-dynamic-loading`, unless
//! another crate of the build, such as candle, links it): a program built with `cuda` also
//! runs on a machine without a driver, where [`is_available`] is false and [`context`]
//! returns [`Error::NoDevice`]. Only the driver is needed at run time: the kernels are
//! embedded cubins and PTX (no NVRTC), and cuBLAS only serves [`baseline`] (feature
//! `baseline`).
//!
//! A plan's step marked [`Launch::overlap_previous`] is a programmatic dependent launch
//! where the kernel came from the sm_90 cubin or the compute_90 PTX (not the sm_80 cubin,
//! whose kernels lack the wait it needs): it may start while the step before it runs.
//! `PEFT_KERNELS_NO_OVERLAP` (any value, read once) launches every step in plain stream
//! order instead, to measure what the overlap gains or to rule it out.
//!
//! A launch takes the kernel's parameter block, whose pointers are device addresses.
//! [`Buffers`] hands them out from cudarc buffers and keeps cudarc's stream ordering:
//!
//! ```text
//! let mut bufs = cuda::Buffers::new(&stream);
//! let params = SgemmParams { a: bufs.read(&a), c: bufs.write(&mut c), m, n, k, .. };
//! // SAFETY: `a` and `c` hold the elements the plan's shape makes the kernel touch.
//! unsafe { bufs.launch(&plan, &params) }?;
//! ```

#[cfg(feature = "baseline")]
pub mod baseline;
mod delta_linear;
mod dora;
mod modules;
mod multi_adapter;
mod optim;
mod prefix_attention;

pub use delta_linear::*;
pub use dora::*;
pub use multi_adapter::*;
pub use optim::*;
pub use prefix_attention::*;

use std::ffi::c_void;
use std::sync::{Arc, LazyLock};

pub use cudarc;
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute, CUlaunchAttributeID};
use cudarc::driver::{
    result, CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, SyncOnDrop, UnifiedSlice,
};
pub use modules::{cubin, image, resources, Image};

use crate::plan::{Buf, BufSource, KernelParams, Launch};
use crate::{Error, Result};

/// The nvcc release that built the embedded kernels, e.g. `13.0.88`.
pub const NVCC_VERSION: &str = modules::NVCC_VERSION;

/// Dynamic shared memory a kernel may use without opting in (a CUDA rule).
const DEFAULT_DYNAMIC_SMEM_LIMIT: u32 = 48 * 1024;

/// Whether a CUDA driver and at least one device are present. Never panics: without a
/// driver library it is false.
pub fn is_available() -> bool {
    device_count().is_ok_and(|n| n > 0)
}

/// The primary context of device `ordinal`; [`Error::NoDevice`] without a driver or device.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(Error::NoDevice(format!(
            "device {ordinal} asked for, {n} present"
        )));
    }
    Ok(CudaContext::new(ordinal)?)
}

fn device_count() -> Result<usize> {
    if !driver_library_present() {
        return Err(Error::NoDevice(
            "no CUDA driver library (libcuda) found".into(),
        ));
    }
    let n = CudaContext::device_count().map_err(|e| Error::NoDevice(e.to_string()))?;
    Ok(n.max(0) as usize)
}

/// Whether the CUDA driver library opens. Probed here, before cudarc touches it: under
/// cudarc's dynamic loading (this crate's default) a missing library is a panic inside
/// cudarc, and under dynamic linking (candle's choice) the program would not have started
/// without it. The names are the driver's own (what the NVIDIA driver installs, and cudarc
/// also tries).
fn driver_library_present() -> bool {
    static PRESENT: LazyLock<bool> = LazyLock::new(|| {
        let names: &[&str] = if cfg!(windows) {
            &["nvcuda.dll"]
        } else {
            &["libcuda.so.1", "libcuda.so"]
        };
        names.iter().any(|name| {
            // SAFETY: loading the driver library runs only its initialisers, as cudarc's own
            // loading would; nothing in it is called here and it is unloaded on drop.
            unsafe { libloading::Library::new(*name) }.is_ok()
        })
    });
    *PRESENT
}

/// Launches `launch.kernel` on `stream` with `params` as its only argument, loading the
/// kernel's module into the stream's context on first use (the cubin for the device's
/// architecture, else the PTX) and opting in to more than 48 KiB of dynamic shared memory
/// when the launch asks for it. Returns when the launch is queued.
///
/// # Safety
/// `params` must be the parameter block of `launch.kernel`, and every device address in it
/// must point to memory of the stream's context that holds every element the kernel
/// touches for the shape in `params`, readable (and writable for outputs) until the kernel
/// completes. [`Buffers`] gives addresses that are ordered on the stream. With
/// [`Launch::overlap_previous`], the kernel may start before the previous operation on the
/// stream completes: that operation must be the plan's step before this one (launched
/// right before it, nothing queued in between), whose writes the kernel waits for.
pub unsafe fn launch<P: KernelParams>(
    stream: &CudaStream,
    launch: &Launch,
    params: &P,
) -> Result<()> {
    let ctx = stream.context();
    let (f, image) = modules::function(ctx, launch.kernel)?;
    if launch.kernel.needs_sm90a() && image != Image::Sm90 {
        return Err(Error::Unsupported(format!(
            "`{}` uses Hopper's wgmma: it needs a GPU of compute capability 9.0 (H100, H200) \
             running the sm_90a cubin, not the {image:?} image",
            launch.kernel.name()
        )));
    }
    let failed = |e: DriverError| Error::Cuda(format!("launching `{}`: {e}", launch.kernel.name()));
    if launch.dynamic_smem > DEFAULT_DYNAMIC_SMEM_LIMIT {
        ctx.bind_to_thread().map_err(failed)?;
        // SAFETY: a function of the current context; a plain attribute write.
        unsafe {
            result::function::set_function_attribute(
                f.handle(),
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                launch.dynamic_smem as i32,
            )
        }
        .map_err(|e| too_much_shared_memory(ctx, launch).unwrap_or_else(|| failed(e)))?;
    }
    let config = LaunchConfig {
        grid_dim: launch.grid.into(),
        block_dim: launch.block.into(),
        shared_mem_bytes: launch.dynamic_smem,
    };
    if launch.overlap_previous && image != Image::Sm80 && !*NO_OVERLAP {
        // SAFETY: as below; the plan set `overlap_previous` only for a kernel that waits
        // for the previous launch before touching what it writes or reads.
        unsafe { launch_overlapping(stream, f, config, params) }.map_err(failed)?;
        return Ok(());
    }
    ctx.bind_to_thread().map_err(failed)?;
    // The kernel's one argument, by address; cuLaunchKernel copies it before returning.
    let mut args = [params as *const P as *mut c_void];
    // SAFETY: the caller's contract; the kernel's one parameter is a `P`.
    unsafe {
        result::launch_kernel(
            f.handle(),
            config.grid_dim,
            config.block_dim,
            config.shared_mem_bytes,
            stream.cu_stream(),
            &mut args,
        )
    }
    .map_err(failed)?;
    Ok(())
}

/// `PEFT_KERNELS_NO_OVERLAP` is set: no programmatic dependent launches.
static NO_OVERLAP: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("PEFT_KERNELS_NO_OVERLAP").is_some());

/// cuLaunchKernelEx with programmatic stream serialization: the kernel may start once every
/// block of the previous kernel on the stream has executed `allow_dependent_launch`
/// (kernels/arch.cuh; the fused-linear kernels do so on entry) or exited.
///
/// # Safety
/// As for [`launch`], and the kernel must call `grid_dependency_wait` before it touches
/// memory the previous kernel writes, or writes memory it reads.
unsafe fn launch_overlapping<P: KernelParams>(
    stream: &CudaStream,
    f: modules::Function,
    config: LaunchConfig,
    params: &P,
) -> std::result::Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: a C union of plain data; all zeros is a valid value of every member.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let ex = sys::CUlaunchConfig {
        gridDimX: config.grid_dim.0,
        gridDimY: config.grid_dim.1,
        gridDimZ: config.grid_dim.2,
        blockDimX: config.block_dim.0,
        blockDimY: config.block_dim.1,
        blockDimZ: config.block_dim.2,
        sharedMemBytes: config.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    // The kernel's one argument, by address; the driver copies it before returning.
    let mut args = [params as *const P as *mut c_void];
    // SAFETY: `ex` and `args` outlive the call; the caller's contract covers the kernel.
    unsafe { sys::cuLaunchKernelEx(&ex, f.handle(), args.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
}

/// The device addresses of the buffers a launch reads and writes, each with cudarc's
/// stream-order guard: `stream` first waits for the buffer's pending writes (and, for an
/// output, reads), and when the guards drop, after the launch is queued, the buffer
/// records this launch's use so later work on other streams waits for it.
pub struct Buffers<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
    /// Buffers of another context (device) than the stream's: refused before any launch,
    /// since a kernel reading one faults and leaves the context unusable.
    foreign: usize,
}

impl<'a> Buffers<'a> {
    pub fn new(stream: &'a CudaStream) -> Self {
        Buffers {
            stream,
            guards: Vec::new(),
            foreign: 0,
        }
    }

    /// The device address of a buffer the kernel only reads.
    pub fn read<T>(&mut self, buf: &'a (impl DevicePtr<T> + ?Sized)) -> u64 {
        self.note_context(buf.stream());
        let (ptr, guard) = buf.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// The device address of a buffer the kernel writes (and may read).
    pub fn write<T>(&mut self, buf: &'a mut (impl DevicePtrMut<T> + ?Sized)) -> u64 {
        self.note_context(buf.stream());
        let (ptr, guard) = buf.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }

    fn note_context(&mut self, owner: &CudaStream) {
        if owner.context() != self.stream.context() {
            self.foreign += 1;
        }
    }

    /// An error if a buffer belongs to another context than the stream's, or if cudarc
    /// recorded a failure while handing out the addresses (a stream wait for a buffer's
    /// pending writes, a unified buffer this device cannot access): cudarc defers those to
    /// `check_err`, and a launch on such a buffer would race or fault. Every launch through
    /// these buffers checks it first (and the baseline before its cuBLAS calls).
    pub(crate) fn check_before_launch(&self) -> Result<()> {
        self.stream.context().check_err().map_err(|e| {
            Error::Cuda(format!(
                "cudarc recorded an error before the launch (ordering or accessing its \
                 buffers, or earlier deferred work): {e}"
            ))
        })?;
        if self.foreign == 0 {
            return Ok(());
        }
        Err(Error::invalid(
            "device buffers",
            format!(
                "memory of the stream's context (device {})",
                self.stream.context().ordinal()
            ),
            format!("{} buffer(s) of another context", self.foreign),
        ))
    }

    /// [`launch`] on this stream, then the guards' release.
    ///
    /// # Safety
    /// As for [`launch`].
    pub unsafe fn launch<P: KernelParams>(self, launch: &Launch, params: &P) -> Result<()> {
        self.check_before_launch()?;
        // SAFETY: the caller's contract.
        unsafe { self::launch(self.stream, launch, params) }
    }

    /// Launches the steps of a plan in order on this stream, then releases the guards.
    ///
    /// # Safety
    /// Every address in the steps' parameters came from these buffers, and the plan checked
    /// them against the shapes it launches with.
    pub(crate) unsafe fn run<P: KernelParams>(self, steps: &[(Launch, P)]) -> Result<()> {
        self.check_before_launch()?;
        for (l, p) in steps {
            // SAFETY: the caller's contract.
            unsafe { self::launch(self.stream, l, p) }?;
        }
        Ok(())
    }
}

/// The error of a launch that asks for more dynamic shared memory than the device gives one
/// block (99 KiB on compute capability 8.6, 8.9 and 12.x; 163 KiB on an A100, 227 KiB on an
/// H100), or None when that is not why the opt-in failed. Asked only after a failure: a
/// launch that succeeds pays no device query.
fn too_much_shared_memory(ctx: &CudaContext, launch: &Launch) -> Option<Error> {
    let attribute = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN;
    let limit = ctx.attribute(attribute).ok()?;
    (i64::from(launch.dynamic_smem) > i64::from(limit)).then(|| {
        Error::Unsupported(format!(
            "`{}` needs {} bytes of shared memory a block and this device gives at most {limit}",
            launch.kernel.name(),
            launch.dynamic_smem
        ))
    })
}

/// A device buffer an operation reads: a cudarc `CudaSlice`, `CudaView`, `CudaViewMut` or
/// `UnifiedSlice` (`&x` coerces).
///
/// ```no_run
/// # use peft_kernels::cuda::{self, DeviceRead};
/// let stream = cuda::context(0)?.default_stream();
/// let x = stream.alloc_zeros::<f32>(16).map_err(|e| peft_kernels::Error::Cuda(e.to_string()))?;
/// let read: DeviceRead<f32> = &x;
/// let slice_of_it: DeviceRead<f32> = &x.slice(4..8);
/// # let _ = (read, slice_of_it);
/// # Ok::<(), peft_kernels::Error>(())
/// ```
///
/// Only those: cudarc's `DevicePtr` is a safe trait, so a type of the caller's could hand
/// any address and length to a safe launch. [`DeviceBuffer`] is sealed to close that:
///
/// ```compile_fail
/// # use peft_kernels::cuda::{cudarc::driver::*, DeviceRead};
/// struct Forged;
/// impl DeviceSlice<f32> for Forged {
///     fn len(&self) -> usize { 1 << 20 }
///     fn stream(&self) -> &std::sync::Arc<CudaStream> { unimplemented!() }
/// }
/// impl DevicePtr<f32> for Forged {
///     fn device_ptr<'a>(&'a self, _: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
///         (0x1000, SyncOnDrop::Sync(None))
///     }
/// }
/// let forged: DeviceRead<f32> = &Forged;
/// ```
pub type DeviceRead<'a, T> = &'a dyn DeviceBuffer<T>;
/// A device buffer an operation writes: a cudarc `CudaSlice`, `CudaViewMut` or
/// `UnifiedSlice`.
pub type DeviceWrite<'a, T> = &'a mut dyn DeviceBufferMut<T>;

/// cudarc's buffer types, whose address and length come from cudarc's own allocation or
/// view (sealed: see [`DeviceRead`]).
pub trait DeviceBuffer<T>: DevicePtr<T> + sealed::Sealed {}
/// The [`DeviceBuffer`]s a kernel may write.
pub trait DeviceBufferMut<T>: DeviceBuffer<T> + DevicePtrMut<T> {}

mod sealed {
    pub trait Sealed {}
}

/// Implements [`DeviceBuffer`] (and with `mut`, [`DeviceBufferMut`]) for a cudarc type.
macro_rules! device_buffer {
    ($ty:ty) => {
        impl<T> sealed::Sealed for $ty {}
        impl<T> DeviceBuffer<T> for $ty {}
    };
    (mut $ty:ty) => {
        device_buffer!($ty);
        impl<T> DeviceBufferMut<T> for $ty {}
    };
}
device_buffer!(mut CudaSlice<T>);
device_buffer!(CudaView<'_, T>);
device_buffer!(mut CudaViewMut<'_, T>);
device_buffer!(mut UnifiedSlice<T>);

impl<'a, A, B> BufSource<DeviceRead<'a, A>, DeviceWrite<'a, B>> for Buffers<'a> {
    fn read(&mut self, r: DeviceRead<'a, A>) -> Buf {
        let len = r.len();
        Buf {
            addr: Buffers::read(self, r),
            len,
        }
    }
    fn write(&mut self, w: DeviceWrite<'a, B>) -> Buf {
        let len = w.len();
        Buf {
            addr: Buffers::write(self, w),
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver or device, asking for one is an error, never a panic: not even one
    /// caught on the way (cudarc's loader panics when it cannot open libcuda, printing its
    /// message, so the library is probed before cudarc is asked).
    #[test]
    fn no_device_is_an_error() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static PANICKED: AtomicBool = AtomicBool::new(false);
        // The hook is the process's: count only this thread's panics (tests run in parallel).
        let me = std::thread::current().id();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |_| {
            if std::thread::current().id() == me {
                PANICKED.store(true, Ordering::SeqCst);
            }
        }));
        let available = is_available();
        std::panic::set_hook(previous);
        assert!(
            !PANICKED.load(Ordering::SeqCst),
            "is_available panicked on the way"
        );
        assert_eq!(
            available,
            driver_library_present() && device_count().is_ok_and(|n| n > 0)
        );
        match context(0) {
            Ok(ctx) => assert!(is_available() && ctx.ordinal() == 0),
            Err(Error::NoDevice(_)) => assert!(!is_available()),
            Err(e) => panic!("unexpected error: {e}"),
        }
        assert!(matches!(context(usize::MAX), Err(Error::NoDevice(_))));
    }
}
