//! The emulator backend: the kernels' own `kernels/*.cu` sources compiled as C++ and run
//! on the CPU with the GPU's grid, block, shared-memory and warp semantics (see
//! `kernels/emu/emu.h`).
//!
//! Every CUDA thread is a fiber with its own 64 KiB stack; one OS thread runs one block
//! at a time, blocks in order on the calling thread unless [`set_workers`] (or the
//! `PEFT_KERNELS_EMU_WORKERS` environment variable) asks for a pool. Pointers in a
//! parameter block are host addresses.
//!
//! A launch fails with [`Error::Emulator`] where a GPU would misbehave silently: a
//! `__syncthreads()` that not every thread of the block reaches, a warp operation whose
//! mask is not exactly the lanes that arrive, a deadlock, a launch over the device limits
//! (1024 threads per block, 227 KiB of dynamic shared memory, grid and block dimensions).
//! A failed launch leaves the outputs partly written; later launches are unaffected.
//!
//! Host slices of any alignment are accepted: `delta_linear`, `delta_apply` and
//! `lora_merge` run unaligned f16/bf16 operands on their unaligned path (the SIMT kernel
//! under `KernelVariant::Auto`); the f16/bf16 attention kernels (`prefix_attention`,
//! `prefix_only_attention`), which copy 16-byte chunks and on the GPU refuse a tensor that
//! does not start 16-byte aligned, get a 16-byte aligned copy of such a slice here (an
//! output copied back after the launches): one copy of each misaligned slice per call.
//! Strides must still be multiples of 8 elements there, as on the GPU.

use std::ffi::{c_char, c_void, CStr};

mod delta_linear;
mod dora;
mod prefix_attention;

pub use delta_linear::*;
pub use dora::*;
pub use prefix_attention::*;

use crate::plan::{Buf, BufSource, KernelParams, Launch};
use crate::{Error, Result};

/// Grid or block dimensions, as the emulator's C ABI takes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl From<[u32; 3]> for Dim3 {
    fn from([x, y, z]: [u32; 3]) -> Self {
        Dim3 { x, y, z }
    }
}

unsafe extern "C" {
    fn emu_last_error() -> *const c_char;
    fn emu_set_workers(n: u32);
}

/// Runs later launches of every thread of the process over `n` worker OS threads (blocks
/// are spread over them; each worker has its own fibers and shared memory). `0` restores
/// the default: `PEFT_KERNELS_EMU_WORKERS` if set, else 1, which runs the blocks in order
/// on the calling thread. Results are the same for any `n` unless a kernel's blocks race
/// (floating-point atomics, say).
pub fn set_workers(n: u32) {
    // SAFETY: stores an integer.
    unsafe { emu_set_workers(n) }
}

/// Runs `launch.kernel` on the CPU with `params` as its only argument and returns when
/// every block has finished, or with [`Error::Emulator`] when the emulator refused the
/// launch or caught the kernel misbehaving.
///
/// # Safety
/// `params` must be the parameter block of `launch.kernel`, and every address in it must
/// point to host memory that holds every element the kernel touches for the shape in
/// `params`, readable (and writable for outputs, with no other reference to them) for the
/// duration of the call.
pub unsafe fn launch<P: KernelParams>(launch: &Launch, params: &P) -> Result<()> {
    let entry = crate::kernels::emu_entry::entry(launch.kernel);
    let mut block = *params;
    let mut args = [(&mut block as *mut P).cast::<c_void>()];
    // SAFETY: the entry reads `size_of::<P>()` bytes through args[0] (the caller vouches
    // that P is the kernel's parameter block) and the kernel touches what the caller
    // vouches for.
    let rc = unsafe {
        entry(
            launch.grid.into(),
            launch.block.into(),
            launch.dynamic_smem,
            args.as_mut_ptr(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: a NUL-terminated thread-local string, valid until the next launch on this
    // thread; copied at once.
    let message = unsafe { CStr::from_ptr(emu_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Emulator {
        kernel: launch.kernel.name(),
        message,
    })
}

/// Host slices of any element types as the planner's buffers: the emulator's device memory
/// is host memory.
pub(crate) struct HostBufs;

impl<'r, 'w, A, B> BufSource<&'r [A], &'w mut [B]> for HostBufs {
    fn read(&mut self, r: &'r [A]) -> Buf {
        Buf {
            addr: r.as_ptr() as u64,
            len: r.len(),
        }
    }
    fn write(&mut self, w: &'w mut [B]) -> Buf {
        Buf {
            addr: w.as_mut_ptr() as u64,
            len: w.len(),
        }
    }
}

/// Runs the steps of a plan in order.
///
/// The plan checked every buffer its steps address (made by [`HostBufs`]) against the
/// shapes it launches with, which is what makes this safe to call with a plan's output.
pub(crate) fn run<P: KernelParams>(steps: &[(Launch, P)]) -> Result<()> {
    for (l, p) in steps {
        // SAFETY: see above.
        unsafe { launch(l, p) }?;
    }
    Ok(())
}
