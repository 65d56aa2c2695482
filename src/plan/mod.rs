//! Launch planning, written once for both backends: validation of every argument, the
//! choice of kernel by dtype and shape, the grid / block / shared-memory geometry, and the
//! parameter block the kernel receives. A backend only allocates and launches a [`Launch`].

pub mod delta_linear;
pub mod delta_linear_backward;
pub mod dora;
pub mod multi_adapter;
pub mod optim;
pub mod prefix_attention;

use crate::error::{Error, Result};
use crate::kernels::KernelId;

/// Geometry of one kernel launch, identical on the GPU and in the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: KernelId,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub dynamic_smem: u32,
    /// The kernel may start while the previous launch on the stream still runs (a
    /// programmatic dependent launch, sm_90 and newer: the sm_90 cubin or the compute_90 PTX):
    /// it calls `grid_dependency_wait` (kernels/arch.cuh) before it reads what that launch
    /// writes or writes what it reads.
    /// Only a plan sets it, for a step whose kernel does so and whose previous step is its
    /// own; the emulator runs launches in order and ignores it.
    pub overlap_previous: bool,
}

/// A kernel's parameter block: a `#[repr(C)]` struct passed by value as the kernel's only
/// argument, field for field the C++ `struct` of the same name in `kernels/*.cu`.
/// Pointers are device addresses (`u64`) on the GPU and host addresses in the emulator.
///
/// # Safety
/// The type must have exactly the layout of its C++ twin.
pub unsafe trait KernelParams: Copy + Send + Sync + 'static {
    /// For the emulator's sampled profile (kernels/emu/profile.cpp): the runs of a split
    /// reduction (split-K, split-KV) that `launch` folds into a grid dimension, whose blocks
    /// do different work, so that the sample runs every run of each sampled tile. `None`
    /// (the default): the grid is tiles only.
    fn profile_runs(&self, launch: &Launch) -> Option<GridRuns> {
        let _ = launch;
        None
    }
}

/// Runs of a split reduction folded into grid dimension `dim` (0 x, 1 y, 2 z) of a launch:
/// its index is `run · tiles + tile`, or `tile · runs + run` when `inner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridRuns {
    pub dim: u32,
    pub runs: u32,
    pub inner: bool,
}

/// A buffer as the planner sees it: its address (device or host) and its length in
/// elements. Each backend makes these from its own buffer types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: usize,
}

/// Grid limits of every CUDA device since compute capability 3.0.
const MAX_GRID: [u64; 3] = [(1 << 31) - 1, 65_535, 65_535];

/// The grid of a kernel that tiles `x.1` by `x.2` (grid.x), `y.1` by `y.2` (grid.y) and
/// `z.1` by `z.2` (grid.z), each given as (argument, extent, tile). An error naming the
/// argument when its tiles exceed the device's grid limits, or when the tiles' last element
/// index does not fit the `int` the kernels compute tile coordinates in.
pub fn grid_for(dims: [(&'static str, usize, usize); 3]) -> Result<[u32; 3]> {
    let mut grid = [0u32; 3];
    for (i, (arg, extent, tile)) in dims.into_iter().enumerate() {
        let max_tiles = MAX_GRID[i].min(i32::MAX as u64 / tile as u64);
        let tiles = extent.div_ceil(tile) as u64;
        if tiles > max_tiles {
            return Err(Error::invalid(
                arg,
                format!(
                    "at most {} ({max_tiles} tiles of {tile} along the grid's {} dimension)",
                    max_tiles * tile as u64,
                    ["x", "y", "z"][i]
                ),
                extent,
            ));
        }
        grid[i] = tiles.max(1) as u32;
    }
    Ok(grid)
}

/// An error naming `arg` when its buffer, if given, holds fewer than `len` elements; `what`
/// (the expected shape) goes into the message.
pub(crate) fn check_len(
    arg: &'static str,
    buf: Option<Buf>,
    len: usize,
    what: Option<&str>,
) -> Result<()> {
    match buf {
        Some(b) if b.len < len => Err(Error::invalid(
            arg,
            match what {
                Some(what) => format!("at least {len} elements ({what})"),
                None => format!("at least {len} elements"),
            },
            format!("{} elements", b.len),
        )),
        _ => Ok(()),
    }
}

/// How a backend turns its buffers into [`Buf`]s: host slices in the emulator, cudarc
/// device buffers on the GPU (keeping their stream-order guards alive until the launch).
/// `R` is a buffer the kernels only read, `W` one they write.
pub trait BufSource<R, W> {
    fn read(&mut self, r: R) -> Buf;
    fn write(&mut self, w: W) -> Buf;
}
