//! Launch planning, written once for both backends: validation of every argument, the
//! choice of kernel by dtype and shape, the grid / block / shared-memory geometry, and the
//! parameter block the kernel receives. A backend only allocates and launches a [`Launch`].

use crate::kernels::KernelId;

/// Geometry of one kernel launch, identical on the GPU and in the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: KernelId,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub dynamic_smem: u32,
}

/// A kernel's parameter block: a `#[repr(C)]` struct passed by value as the kernel's only
/// argument, field for field the C++ `struct` of the same name in `kernels/*.cu`.
/// Pointers are device addresses (`u64`) on the GPU and host addresses in the emulator.
///
/// # Safety
/// The type must have exactly the layout of its C++ twin.
pub unsafe trait KernelParams: Copy + Send + Sync + 'static {}
