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
mod multi_adapter;
mod optim;
mod prefix_attention;
mod profile;

pub use delta_linear::*;
pub use dora::*;
pub use multi_adapter::*;
pub use optim::*;
pub use prefix_attention::*;
pub use profile::{profile, LaunchProfile, OperandProfile, Sampling, SharedTraffic, Traffic};

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
    fn emu_check_next_launch(checks: u32, buffers: *const BufferSpec, n: usize, known: i32);
    fn emu_profile_next_runs(dim: u32, runs: u32, inner: i32);
    fn emu_check_plan(open: i32);
}

/// Runs later launches of every thread of the process over `n` worker OS threads (blocks
/// are spread over them; each worker has its own fibers and shared memory). `0` restores
/// the default: `PEFT_KERNELS_EMU_WORKERS` if set, else 1, which runs the blocks in order
/// on the calling thread. Results are the same for any `n` unless a kernel's blocks race
/// (floating-point atomics, say). A checked launch ([`Checks`]) always runs on one.
pub fn set_workers(n: u32) {
    // SAFETY: stores an integer.
    unsafe { emu_set_workers(n) }
}

/// The emulator's checks, the CPU's compute-sanitizer (kernels/emu/check.cpp): a set of
/// [`Checks::MEMCHECK`], [`Checks::RACECHECK`] and [`Checks::INITCHECK`]. A launch with any
/// on runs the checked copy of the kernels, whose every memory access is reported to the
/// emulator, on one OS thread; a finding fails the launch with [`Error::Emulator`] naming
/// the check, the kernel, the block, the thread and the memory. Off (the default), launches
/// run the plain copy and pay nothing.
///
/// - memcheck: every global access lies inside one of the launch's buffers (else the
///   message names the nearest buffer and how far past its end the access reaches); every
///   dynamic shared access inside the launch's dynamic shared memory. Static `__shared__`
///   arrays share one region, so an overrun from one into the next is not seen.
/// - racecheck: shared memory, two threads' accesses to a byte, one a write, with no
///   `__syncthreads()` between them (nor, for two lanes of one warp, a warp collective such
///   as `__syncwarp()`), by the GPU's rules, whatever order the fibers ran in; global
///   memory, a byte one block writes and another block of the same launch reads or writes
///   (atomics excepted).
/// - initcheck: a read of shared memory no thread of the block has written since the block
///   started; a read of workspace bytes no launch of the plan has written.
///
/// Set per thread with [`set_checks`], or for the whole process with the environment
/// variable `PEFT_KERNELS_EMU_CHECK` (`memcheck,racecheck,initcheck`, `all` or `none`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Checks(u32);

impl Checks {
    pub const NONE: Checks = Checks(0);
    pub const MEMCHECK: Checks = Checks(1);
    pub const RACECHECK: Checks = Checks(2);
    pub const INITCHECK: Checks = Checks(4);
    pub const ALL: Checks = Checks(7);

    /// Whether every check of `other` is on in `self`.
    pub fn contains(self, other: Checks) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `self` without the checks of `other`.
    pub fn without(self, other: Checks) -> Checks {
        Checks(self.0 & !other.0)
    }

    /// `memcheck,racecheck,initcheck` (any subset, comma-separated), `all`, or `none` / ``.
    pub fn parse(s: &str) -> Result<Checks> {
        let mut c = Checks::NONE;
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            c =
                c | match word {
                    "memcheck" => Checks::MEMCHECK,
                    "racecheck" => Checks::RACECHECK,
                    "initcheck" => Checks::INITCHECK,
                    "all" => Checks::ALL,
                    "none" => Checks::NONE,
                    _ => return Err(Error::invalid(
                        "PEFT_KERNELS_EMU_CHECK",
                        "a comma-separated list of memcheck, racecheck, initcheck, or all or none",
                        s,
                    )),
                };
        }
        Ok(c)
    }
}

impl std::ops::BitOr for Checks {
    type Output = Checks;
    fn bitor(self, o: Checks) -> Checks {
        Checks(self.0 | o.0)
    }
}

thread_local! {
    static THREAD_CHECKS: std::cell::Cell<Option<Checks>> = const { std::cell::Cell::new(None) };
}

/// Sets the checks of the calling thread's later launches; `None` restores the default,
/// `PEFT_KERNELS_EMU_CHECK`. Fails with [`Error::Emulator`] at launch when this build has
/// no checked copy (built with `PEFT_KERNELS_EMU_SANITIZE`).
pub fn set_checks(checks: Option<Checks>) {
    THREAD_CHECKS.with(|c| c.set(checks));
}

/// Whether this build has the checked copy of the kernels that [`Checks`] need (every
/// build but one made with `PEFT_KERNELS_EMU_SANITIZE`, the AddressSanitizer build).
pub fn checks_available() -> bool {
    crate::kernels::emu_entry::checked_entry(crate::kernels::KernelId::ALL[0]).is_some()
}

/// Runs `f` with the calling thread's launches checked by `checks` (a per-launch setting:
/// wrap one launch), then restores the previous setting, also when `f` panics.
pub fn with_checks<R>(checks: Checks, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Checks>);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_checks(self.0);
        }
    }
    let _restore = Restore(THREAD_CHECKS.with(|c| c.replace(Some(checks))));
    f()
}

/// The checks the calling thread's next launch runs with.
pub fn checks() -> Result<Checks> {
    if let Some(c) = THREAD_CHECKS.with(|c| c.get()) {
        return Ok(c);
    }
    // The variable's value, kept to report it again at every launch if it does not parse.
    static ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match ENV.get_or_init(|| std::env::var("PEFT_KERNELS_EMU_CHECK").ok()) {
        Some(v) => Checks::parse(v),
        None => Ok(Checks::NONE),
    }
}

/// A buffer a launch may touch, for the checks: memcheck's extent and the name its
/// messages use. `written`: the launch may write it (memcheck refuses writes to the others,
/// racecheck follows only these). `workspace`: scratch that initcheck follows over a plan,
/// refusing reads of bytes no launch of the plan wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckBuffer {
    pub name: &'static str,
    pub addr: u64,
    pub bytes: usize,
    pub written: bool,
    pub workspace: bool,
}

impl CheckBuffer {
    /// `s`, which the launch only reads, named `name`.
    pub fn input<T>(name: &'static str, s: &[T]) -> CheckBuffer {
        CheckBuffer {
            name,
            addr: s.as_ptr() as u64,
            bytes: std::mem::size_of_val(s),
            written: false,
            workspace: false,
        }
    }

    /// `s`, which the launch may write, named `name`.
    pub fn output<T>(name: &'static str, s: &[T]) -> CheckBuffer {
        CheckBuffer {
            written: true,
            ..CheckBuffer::input(name, s)
        }
    }
}

/// kernels/emu/check.cpp's `BufferSpec`.
#[repr(C)]
struct BufferSpec {
    addr: u64,
    bytes: u64,
    name: *const u8,
    name_len: usize,
    flags: u32,
}

/// Runs `launch.kernel` on the CPU with `params` as its only argument and returns when
/// every block has finished, or with [`Error::Emulator`] when the emulator refused the
/// launch or caught the kernel misbehaving. With [`checks`] on, global accesses are not
/// memchecked (the buffers are unknown): [`launch_with`] names them.
///
/// # Safety
/// `params` must be the parameter block of `launch.kernel`, and every address in it must
/// point to host memory that holds every element the kernel touches for the shape in
/// `params`, readable (and writable for outputs, with no other reference to them) for the
/// duration of the call.
pub unsafe fn launch<P: KernelParams>(launch: &Launch, params: &P) -> Result<()> {
    // SAFETY: the caller's promise.
    unsafe { launch_impl(launch, params, None) }
}

/// [`launch`] with the buffers the kernel may touch, which the checks hold it to (every
/// global access of a checked launch must lie in one of them).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_with<P: KernelParams>(
    launch: &Launch,
    params: &P,
    buffers: &[CheckBuffer],
) -> Result<()> {
    // SAFETY: the caller's promise.
    unsafe { launch_impl(launch, params, Some(buffers)) }
}

unsafe fn launch_impl<P: KernelParams>(
    launch: &Launch,
    params: &P,
    buffers: Option<&[CheckBuffer]>,
) -> Result<()> {
    let checks = checks()?;
    let profiling = profile::sampling()?;
    // A sampled profile skips blocks, so the workspace they would write stays unwritten for
    // the launches after: initcheck does not run beside it (memcheck and racecheck do).
    let checks = match profiling {
        Some((profile::Sampling::Sampled, _)) => Checks(checks.0 & !Checks::INITCHECK.0),
        _ => checks,
    };
    let bits = checks.0 | profiling.map_or(0, |(s, _)| profile::bits(s));
    let entry = if bits == 0 {
        crate::kernels::emu_entry::entry(launch.kernel)
    } else {
        let Some(entry) = crate::kernels::emu_entry::checked_entry(launch.kernel) else {
            return Err(Error::Emulator {
                kernel: launch.kernel.name(),
                message: "the emulator's checks are not in this build (built with \
                          PEFT_KERNELS_EMU_SANITIZE)"
                    .into(),
            });
        };
        let specs: Vec<BufferSpec> = buffers
            .unwrap_or(&[])
            .iter()
            .map(|b| BufferSpec {
                addr: b.addr,
                bytes: b.bytes as u64,
                name: b.name.as_ptr(),
                name_len: b.name.len(),
                flags: b.workspace as u32 | (b.written as u32) << 1,
            })
            .collect();
        // SAFETY: `specs` is valid for the call, which copies it (names included).
        unsafe {
            emu_check_next_launch(bits, specs.as_ptr(), specs.len(), buffers.is_some() as i32);
            if let (Some(_), Some(r)) = (profiling, params.profile_runs(launch)) {
                emu_profile_next_runs(r.dim, r.runs, r.inner as i32);
            }
        };
        entry
    };
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
        if let Some((_, print)) = profiling {
            profile::collect(
                launch,
                params.profile_runs(launch).map_or(1, |r| r.runs),
                buffers.unwrap_or(&[]),
                print,
            );
        }
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
/// is host memory. Keeps every buffer's extent for the checks; [`HostBufs::name`] names them.
#[derive(Default)]
pub(crate) struct HostBufs {
    buffers: Vec<CheckBuffer>,
}

impl HostBufs {
    /// Names the buffers the plan's view `named` lists (matched by address and length);
    /// `workspace` marks the one initcheck treats as scratch.
    pub(crate) fn name<const N: usize>(&mut self, named: [(&'static str, Option<Buf>); N]) {
        for (name, buf) in named {
            let Some(buf) = buf else { continue };
            if let Some(b) = self
                .buffers
                .iter_mut()
                .find(|b| b.addr == buf.addr && b.name == "an unnamed buffer")
            {
                b.name = name;
                b.workspace = name == "workspace";
            }
        }
    }

    fn record<T>(&mut self, s: &[T], written: bool) -> Buf {
        self.buffers.push(CheckBuffer {
            written,
            ..CheckBuffer::input("an unnamed buffer", s)
        });
        Buf {
            addr: s.as_ptr() as u64,
            len: s.len(),
        }
    }
}

impl<'r, 'w, A, B> BufSource<&'r [A], &'w mut [B]> for HostBufs {
    fn read(&mut self, r: &'r [A]) -> Buf {
        self.record(r, false)
    }
    fn write(&mut self, w: &'w mut [B]) -> Buf {
        self.record(w, true)
    }
}

/// Runs the steps of a plan in order, over the buffers `host` made.
///
/// The plan checked every buffer its steps address (made by [`HostBufs`]) against the
/// shapes it launches with, which is what makes this safe to call with a plan's output.
/// With checks on, initcheck follows the workspace across the steps.
pub(crate) fn run<P: KernelParams>(steps: &[(Launch, P)], host: &HostBufs) -> Result<()> {
    run2(steps, &[] as &[(Launch, P)], host)
}

/// [`run`] for a plan of two kernel families (DoRA's backward, merge): `first`'s steps, then
/// `second`'s, one plan to initcheck.
pub(crate) fn run2<P: KernelParams, Q: KernelParams>(
    first: &[(Launch, P)],
    second: &[(Launch, Q)],
    host: &HostBufs,
) -> Result<()> {
    struct Plan;
    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: clears thread-local state.
            unsafe { emu_check_plan(0) }
        }
    }
    // SAFETY: sets thread-local state.
    unsafe { emu_check_plan(1) };
    let _plan = Plan;
    for (l, p) in first {
        // SAFETY: see above.
        unsafe { launch_with(l, p, &host.buffers) }?;
    }
    for (l, p) in second {
        // SAFETY: see above.
        unsafe { launch_with(l, p, &host.buffers) }?;
    }
    Ok(())
}
