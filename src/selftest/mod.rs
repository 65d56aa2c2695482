//! Backend self-checks on the emulator: the kernels of `kernels/selftest.cu`, which
//! exercise what every real kernel relies on (shared-memory tiling and `__syncthreads`,
//! warp shuffles of every kind, ballots, dynamic shared memory, atomics, thread and block
//! indices, LoRA dropout's Philox generator), and deliberately broken kernels the
//! emulator must refuse.
//!
//! Each function takes host slices, validates them ([`Error::InvalidArgument`]), launches
//! the kernel through [`crate::emulator`] and returns the outputs. They exist to test the
//! backend (and to let a user check that it works on their machine), not as fast paths.

pub mod mma;

use crate::emulator::{self, CheckBuffer, Checks};
use crate::kernels::KernelId;
use crate::plan::{KernelParams, Launch};
use crate::{Error, Result};

/// `SgemmParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SgemmParams {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub m: u32,
    pub n: u32,
    pub k: u32,
}

/// `ReduceParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReduceParams {
    pub x: u64,
    pub block_sum: u64,
    pub block_max: u64,
    pub block_sum_sq: u64,
    pub n: u32,
}

/// `WarpOpsParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WarpOpsParams {
    pub x: u64,
    pub scan: u64,
    pub bcast: u64,
    pub down: u64,
    pub swap: u64,
    pub half_mirror: u64,
    pub ballot: u64,
    pub any_all: u64,
    pub n: u32,
    pub width: i32,
}

/// `ThreadIndexParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadIndexParams {
    pub coords: u64,
    pub n: u64,
}

/// `ReverseParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReverseParams {
    pub x: u64,
    pub y: u64,
    pub probe: u64,
    pub n: u32,
}

/// `AtomicsParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AtomicsParams {
    pub x: u64,
    pub hist: u64,
    pub isum: u64,
    pub fsum: u64,
    pub dsum: u64,
    pub count: u64,
    pub imax: u64,
    pub imin: u64,
    pub umax: u64,
    pub umin: u64,
    pub last: u64,
    pub cas_max: u64,
    pub n: u32,
    pub nbins: u32,
}

/// `PhiloxParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhiloxParams {
    pub ctr: u64,
    pub key: u64,
    pub out: u64,
    pub n: u32,
}

/// `DropoutMaskParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropoutMaskParams {
    pub out: u64,
    pub seed: u64,
    pub row0: u32,
    pub col0: u32,
    pub m: u32,
    pub k: u32,
    pub p: f32,
}

/// `BrokenParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BrokenParams {
    pub out: u64,
    pub n: u32,
}

// SAFETY: each is field for field its C++ twin (checked by the size tests).
unsafe impl KernelParams for SgemmParams {}
unsafe impl KernelParams for ReduceParams {}
unsafe impl KernelParams for WarpOpsParams {}
unsafe impl KernelParams for ThreadIndexParams {}
unsafe impl KernelParams for ReverseParams {}
unsafe impl KernelParams for AtomicsParams {}
unsafe impl KernelParams for BrokenParams {}
unsafe impl KernelParams for PhiloxParams {}
unsafe impl KernelParams for DropoutMaskParams {}

fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

/// The launch of `kernel` over `n` threads in one-dimensional blocks of `block` threads.
fn launch_1d(kernel: KernelId, n: usize, block: u32, dynamic_smem: u32) -> Result<Launch> {
    let blocks = n.div_ceil(block as usize);
    let blocks = u32::try_from(blocks)
        .map_err(|_| Error::invalid("x", format!("at most {} elements", u32::MAX), n))?;
    Ok(Launch {
        kernel,
        grid: [blocks, 1, 1],
        block: [block, 1, 1],
        dynamic_smem,
        overlap_previous: false,
    })
}

/// A length as the kernels' u32 element count.
fn count(arg: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(arg, format!("at most {} elements", u32::MAX), n))
}

/// A block size of whole warps, as the warp-level kernels need.
fn whole_warps(block: u32) -> Result<()> {
    if block == 0 || block > 1024 || block % 32 != 0 {
        return Err(Error::invalid(
            "block",
            "a multiple of 32 in [32, 1024]",
            block,
        ));
    }
    Ok(())
}

fn check_len(arg: &'static str, len: usize, expected: usize, dims: &str) -> Result<()> {
    if len != expected {
        return Err(Error::invalid(
            arg,
            format!("{expected} elements ({dims})"),
            format!("{len} elements"),
        ));
    }
    Ok(())
}

/// `c = a · b` for row-major contiguous `a` (m × k), `b` (k × n) and `c` (m × n) by the
/// tiled shared-memory SGEMM (64 × 64 tiles, 16 × 16 threads, 4 × 4 outputs per thread).
pub fn sgemm_tiled(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    sgemm(KernelId::selftest_sgemm_tiled_f32, a, b, c, m, n, k)
}

/// [`sgemm_tiled`] without the barrier that ends each K slice, so fast threads overwrite
/// the shared tiles slow ones still read. A broken kernel: with K over one slice (16) the
/// emulator must either report it or give a wrong `c`.
pub fn sgemm_missing_barrier(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    sgemm(
        KernelId::selftest_sgemm_missing_barrier_f32,
        a,
        b,
        c,
        m,
        n,
        k,
    )
}

fn sgemm(
    kernel: KernelId,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    check_len("a", a.len(), m.saturating_mul(k), "m × k")?;
    check_len("b", b.len(), k.saturating_mul(n), "k × n")?;
    check_len("c", c.len(), m.saturating_mul(n), "m × n")?;
    let params = SgemmParams {
        a: addr(a),
        b: addr(b),
        c: addr_mut(c),
        m: count("m", m)?,
        n: count("n", n)?,
        k: count("k", k)?,
    };
    if m == 0 || n == 0 {
        return Ok(());
    }
    const TILE: u32 = 64;
    let launch = Launch {
        kernel,
        grid: [params.n.div_ceil(TILE), params.m.div_ceil(TILE), 1],
        block: [16, 16, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let buffers = [
        CheckBuffer::input("a", a),
        CheckBuffer::input("b", b),
        CheckBuffer::output("c", c),
    ];
    // SAFETY: the buffers hold m·k, k·n and m·n elements, the kernel's whole footprint.
    unsafe { emulator::launch_with(&launch, &params, &buffers) }
}

/// Per-block reductions of [`block_reduce`].
#[derive(Clone, Debug, PartialEq)]
pub struct BlockReduction {
    /// Sum of each block's elements (f32, xor-butterfly order).
    pub sum: Vec<f32>,
    /// Maximum of each block's elements (`-inf` for none).
    pub max: Vec<f32>,
    /// Sum of squares of each block's elements, accumulated in f64.
    pub sum_sq: Vec<f64>,
}

/// Reduces each run of `block` elements of `x` (the last one ragged) with warp shuffles
/// (`__shfl_xor_sync` for the sums, `__shfl_down_sync` for the maximum) and a
/// shared-memory pass over the warps. `block` is a multiple of 32 up to 1024.
pub fn block_reduce(x: &[f32], block: u32) -> Result<BlockReduction> {
    whole_warps(block)?;
    let n = count("x", x.len())?;
    let blocks = x.len().div_ceil(block as usize);
    let mut out = BlockReduction {
        sum: vec![f32::NAN; blocks],
        max: vec![f32::NAN; blocks],
        sum_sq: vec![f64::NAN; blocks],
    };
    if blocks == 0 {
        return Ok(out);
    }
    let params = ReduceParams {
        x: addr(x),
        block_sum: addr_mut(&mut out.sum),
        block_max: addr_mut(&mut out.max),
        block_sum_sq: addr_mut(&mut out.sum_sq),
        n,
    };
    let launch = launch_1d(KernelId::selftest_block_reduce_f32, x.len(), block, 0)?;
    let buffers = [
        CheckBuffer::input("x", x),
        CheckBuffer::output("block_sum", &out.sum),
        CheckBuffer::output("block_max", &out.max),
        CheckBuffer::output("block_sum_sq", &out.sum_sq),
    ];
    // SAFETY: x has n elements, each output one per block.
    unsafe { emulator::launch_with(&launch, &params, &buffers) }?;
    Ok(out)
}

/// Per-element and per-warp results of [`warp_ops`] (see `kernels/selftest.cu`).
#[derive(Clone, Debug, PartialEq)]
pub struct WarpOps {
    /// Inclusive prefix sum over the element's `width`-lane segment (`__shfl_up_sync`).
    pub scan: Vec<i32>,
    /// The segment's lane `3 & (width − 1)` (`__shfl_sync` with `width`).
    pub bcast: Vec<i32>,
    /// The lane `width − 1` further, or the element itself past the segment's end
    /// (`__shfl_down_sync` with `width`).
    pub down: Vec<i32>,
    /// Lane `l ^ 1` (`__shfl_xor_sync`).
    pub swap: Vec<i32>,
    /// The mirror lane within the half warp, each half under its own mask.
    pub half_mirror: Vec<i32>,
    /// Per warp: the ballot of `x > 0`.
    pub ballot: Vec<u32>,
    /// Per warp: `any(x < 0) | all(x != 0) << 1`.
    pub any_all: Vec<i32>,
}

/// Runs the warp-operation kernel over `x` in blocks of `block` threads (a multiple of 32)
/// with segment width `width` (a power of two up to 32). Lanes past the end of `x`
/// contribute 0.
pub fn warp_ops(x: &[i32], block: u32, width: u32) -> Result<WarpOps> {
    whole_warps(block)?;
    if !width.is_power_of_two() || width > 32 {
        return Err(Error::invalid("width", "a power of two in [1, 32]", width));
    }
    let n = count("x", x.len())?;
    let warps = x.len().div_ceil(32);
    let mut out = WarpOps {
        scan: vec![i32::MIN; x.len()],
        bcast: vec![i32::MIN; x.len()],
        down: vec![i32::MIN; x.len()],
        swap: vec![i32::MIN; x.len()],
        half_mirror: vec![i32::MIN; x.len()],
        ballot: vec![0xDEAD_BEEF; warps],
        any_all: vec![i32::MIN; warps],
    };
    if x.is_empty() {
        return Ok(out);
    }
    let params = WarpOpsParams {
        x: addr(x),
        scan: addr_mut(&mut out.scan),
        bcast: addr_mut(&mut out.bcast),
        down: addr_mut(&mut out.down),
        swap: addr_mut(&mut out.swap),
        half_mirror: addr_mut(&mut out.half_mirror),
        ballot: addr_mut(&mut out.ballot),
        any_all: addr_mut(&mut out.any_all),
        n,
        width: width as i32,
    };
    let launch = launch_1d(KernelId::selftest_warp_ops_i32, x.len(), block, 0)?;
    let buffers = [
        CheckBuffer::input("x", x),
        CheckBuffer::output("scan", &out.scan),
        CheckBuffer::output("bcast", &out.bcast),
        CheckBuffer::output("down", &out.down),
        CheckBuffer::output("swap", &out.swap),
        CheckBuffer::output("half_mirror", &out.half_mirror),
        CheckBuffer::output("ballot", &out.ballot),
        CheckBuffer::output("any_all", &out.any_all),
    ];
    // SAFETY: per-element outputs have n elements, per-warp ones ceil(n / 32).
    unsafe { emulator::launch_with(&launch, &params, &buffers) }?;
    Ok(out)
}

/// Every thread's `[threadIdx.x, .y, .z, blockIdx.x, .y, .z]` for a launch of `grid` ×
/// `block`, indexed by global linear thread id (x fastest within a block, blocks x
/// fastest). At most 2^24 threads; the emulator refuses geometries over the device limits.
pub fn thread_index(grid: [u32; 3], block: [u32; 3], dynamic_smem: u32) -> Result<Vec<[u32; 6]>> {
    const MAX_THREADS: u64 = 1 << 24;
    let threads = [grid, block]
        .iter()
        .flatten()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&t| t <= MAX_THREADS)
        .ok_or_else(|| {
            Error::invalid(
                "grid, block",
                format!("at most {MAX_THREADS} threads in all"),
                format!("grid {grid:?}, block {block:?}"),
            )
        })?;
    let mut coords = vec![[u32::MAX; 6]; threads as usize];
    let params = ThreadIndexParams {
        coords: coords.as_mut_ptr() as u64,
        n: threads,
    };
    let launch = Launch {
        kernel: KernelId::selftest_thread_index,
        grid,
        block,
        dynamic_smem,
        overlap_previous: false,
    };
    let buffers = [CheckBuffer::output("coords", &coords)];
    // SAFETY: coords has 6 u32 per thread of the launch; the kernel writes 6 per thread
    // with a global index below n.
    unsafe { emulator::launch_with(&launch, &params, &buffers) }?;
    Ok(coords)
}

/// Output of [`reverse_dynamic_smem`].
#[derive(Clone, Debug, PartialEq)]
pub struct Reversed {
    /// `x` with each block's run of elements reversed (the last, ragged block reversed
    /// as if padded with zeros to `block` elements).
    pub y: Vec<f32>,
    /// Per block: the bits of the dynamic shared memory word after the `block` staged
    /// floats, which no thread writes (the emulator's poison, `0xFFFF_FFFF`).
    pub probe: Vec<u32>,
}

/// Reverses each run of `block` elements of `x` through dynamic shared memory of
/// `dynamic_smem` bytes, at least `4 · (block + 1)`.
pub fn reverse_dynamic_smem(x: &[f32], block: u32, dynamic_smem: u32) -> Result<Reversed> {
    if block == 0 || block > 1024 {
        return Err(Error::invalid("block", "a block size in [1, 1024]", block));
    }
    let needed = 4 * (block + 1);
    if dynamic_smem < needed {
        return Err(Error::invalid(
            "dynamic_smem",
            format!("at least 4 · (block + 1) = {needed} bytes"),
            dynamic_smem,
        ));
    }
    let n = count("x", x.len())?;
    let blocks = x.len().div_ceil(block as usize);
    let mut out = Reversed {
        y: vec![f32::NAN; x.len()],
        probe: vec![0; blocks],
    };
    if x.is_empty() {
        return Ok(out);
    }
    let params = ReverseParams {
        x: addr(x),
        y: addr_mut(&mut out.y),
        probe: addr_mut(&mut out.probe),
        n,
    };
    let launch = launch_1d(
        KernelId::selftest_reverse_dynamic_smem_f32,
        x.len(),
        block,
        dynamic_smem,
    )?;
    let buffers = [
        CheckBuffer::input("x", x),
        CheckBuffer::output("y", &out.y),
        CheckBuffer::output("probe", &out.probe),
    ];
    // The probe reads a word no thread writes, by design: initcheck would refuse it.
    let checks = emulator::checks()?.without(Checks::INITCHECK);
    // SAFETY: x and y have n elements, probe one per block; the kernel's shared-memory
    // footprint is 4 · (block + 1) bytes, checked above.
    emulator::with_checks(checks, || unsafe {
        emulator::launch_with(&launch, &params, &buffers)
    })?;
    Ok(out)
}

/// Output of [`atomics`]: what the kernel's atomic operations accumulated over `x`.
#[derive(Clone, Debug, PartialEq)]
pub struct Atomics {
    /// `atomicAdd(unsigned)`: counts of `x` by `x mod nbins` (non-negative residue).
    pub hist: Vec<u32>,
    /// `atomicAdd(int)`: the sum (wrapping).
    pub isum: i32,
    /// `atomicAdd(float)`: the sum in f32, in some order.
    pub fsum: f32,
    /// `atomicAdd(double)`: the sum of `x / 2`.
    pub dsum: f64,
    /// `atomicAdd(unsigned long long)`: the element count.
    pub count: u64,
    /// `atomicMax(int)` / `atomicMin(int)` (from `i32::MIN` / `i32::MAX`).
    pub imax: i32,
    pub imin: i32,
    /// `atomicMax(unsigned)` / `atomicMin(unsigned)` of `x as u32` (from 0 / `u32::MAX`).
    pub umax: u32,
    pub umin: u32,
    /// `atomicExch`: the index of some element (the last to swap), -1 for none.
    pub last: i32,
    /// A compare-and-swap loop's float maximum of `x` (from `-inf`).
    pub cas_max: f32,
}

/// Runs the atomics kernel over `x` with `nbins` histogram bins (at least 1).
pub fn atomics(x: &[i32], nbins: u32) -> Result<Atomics> {
    if nbins == 0 || nbins > i32::MAX as u32 {
        return Err(Error::invalid("nbins", "a bin count in [1, 2^31)", nbins));
    }
    let n = count("x", x.len())?;
    let mut out = Atomics {
        hist: vec![0; nbins as usize],
        isum: 0,
        fsum: 0.0,
        dsum: 0.0,
        count: 0,
        imax: i32::MIN,
        imin: i32::MAX,
        umax: 0,
        umin: u32::MAX,
        last: -1,
        cas_max: f32::NEG_INFINITY,
    };
    if x.is_empty() {
        return Ok(out);
    }
    let params = AtomicsParams {
        x: addr(x),
        hist: addr_mut(&mut out.hist),
        isum: &mut out.isum as *mut i32 as u64,
        fsum: &mut out.fsum as *mut f32 as u64,
        dsum: &mut out.dsum as *mut f64 as u64,
        count: &mut out.count as *mut u64 as u64,
        imax: &mut out.imax as *mut i32 as u64,
        imin: &mut out.imin as *mut i32 as u64,
        umax: &mut out.umax as *mut u32 as u64,
        umin: &mut out.umin as *mut u32 as u64,
        last: &mut out.last as *mut i32 as u64,
        cas_max: &mut out.cas_max as *mut f32 as u64,
        n,
        nbins,
    };
    let launch = launch_1d(KernelId::selftest_atomics, x.len(), 128, 0)?;
    let one = |name, p: u64, bytes| CheckBuffer {
        name,
        addr: p,
        bytes,
        written: true,
        workspace: false,
    };
    let buffers = [
        CheckBuffer::input("x", x),
        CheckBuffer::output("hist", &out.hist),
        one("isum", params.isum, 4),
        one("fsum", params.fsum, 4),
        one("dsum", params.dsum, 8),
        one("count", params.count, 8),
        one("imax", params.imax, 4),
        one("imin", params.imin, 4),
        one("umax", params.umax, 4),
        one("umin", params.umin, 4),
        one("last", params.last, 4),
        one("cas_max", params.cas_max, 4),
    ];
    // SAFETY: x has n elements, hist nbins; the rest are single values.
    unsafe { emulator::launch_with(&launch, &params, &buffers) }?;
    Ok(out)
}

/// Philox4x32-10 (`kernels/philox.cuh`) of each `(counter, key)` pair, one thread a pair.
pub fn philox4x32_10(counters: &[[u32; 4]], keys: &[[u32; 2]]) -> Result<Vec<[u32; 4]>> {
    check_len("keys", keys.len(), counters.len(), "one key per counter")?;
    let n = count("counters", counters.len())?;
    let mut out = vec![[0xDEAD_BEEF; 4]; counters.len()];
    if counters.is_empty() {
        return Ok(out);
    }
    let params = PhiloxParams {
        ctr: addr(counters),
        key: addr(keys),
        out: addr_mut(&mut out),
        n,
    };
    let launch = launch_1d(KernelId::selftest_philox4x32_10, counters.len(), 64, 0)?;
    // SAFETY: counters and out hold n × 4 u32, keys n × 2.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(out)
}

/// The dropout factors (`kernels/philox.cuh`) of the window of rows `[row0, row0 + m)` ×
/// columns `[col0, col0 + k)` under `seed` and `p`, row-major: `scale(p)` where the element
/// is kept, 0 where dropped. `grid` and `block` (x over columns, y over rows) set the launch
/// shape; the kernel's grid-stride loops cover the window with any of them.
#[allow(clippy::too_many_arguments)]
pub fn dropout_mask(
    seed: u64,
    p: f32,
    row0: u32,
    col0: u32,
    m: usize,
    k: usize,
    grid: [u32; 2],
    block: [u32; 2],
) -> Result<Vec<f32>> {
    let (m32, k32) = (count("m", m)?, count("k", k)?);
    let mut out = vec![f32::NAN; m.saturating_mul(k)];
    if out.is_empty() {
        return Ok(out);
    }
    let params = DropoutMaskParams {
        out: addr_mut(&mut out),
        seed,
        row0,
        col0,
        m: m32,
        k: k32,
        p,
    };
    let launch = Launch {
        kernel: KernelId::selftest_dropout_mask,
        grid: [grid[0], grid[1], 1],
        block: [block[0], block[1], 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    // SAFETY: out holds m × k floats, every index the kernel writes.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(out)
}

/// The deliberately broken kernels, each with the launch that shows its defect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// Only the even threads of the block reach `__syncthreads()`; the odd ones exit.
    DivergentBarrier,
    /// Every lane calls `__shfl_xor_sync` with a mask naming only the low half warp.
    ShflWrongMask,
    /// A full-mask `__shfl_xor_sync` inside `if (lane < 16)`.
    ShflDivergent,
    /// A full-mask `__shfl_xor_sync` in a block of 48 threads: the second warp has 16
    /// lanes, so the mask names lanes that do not exist.
    ShflPartialWarp,
    /// Lane 0 returns; the other lanes shuffle with a mask that still names it.
    ShflExitedLane,
    /// Each half warp shuffles under its own mask but reads a lane of the other half.
    ShflSourceOutsideMask,
    /// One half warp calls `__ballot_sync`, the other `__shfl_xor_sync`, both with the
    /// full mask: each half waits for the other.
    MismatchedWarpOps,
    /// One half warp calls `__any_sync`, the other `__all_sync`, both with the full mask:
    /// different instructions, so each half waits for the other.
    MismatchedVotes,
    /// Three groups of lanes shuffle with masks that each overlap another group: a cycle
    /// of waits, so no thread can proceed.
    WarpDeadlock,
    /// A warpgroup issues a wgmma and exits without `wgmma_wait`, reading accumulators the
    /// tensor cores may still be writing.
    WgmmaNotWaited,
}

impl Broken {
    /// Every broken kernel.
    pub const ALL: [Broken; 10] = [
        Broken::DivergentBarrier,
        Broken::ShflWrongMask,
        Broken::ShflDivergent,
        Broken::ShflPartialWarp,
        Broken::ShflExitedLane,
        Broken::ShflSourceOutsideMask,
        Broken::MismatchedWarpOps,
        Broken::MismatchedVotes,
        Broken::WarpDeadlock,
        Broken::WgmmaNotWaited,
    ];

    /// The kernel.
    pub fn kernel(self) -> KernelId {
        match self {
            Broken::DivergentBarrier => KernelId::selftest_broken_divergent_barrier,
            Broken::ShflWrongMask => KernelId::selftest_broken_shfl_wrong_mask,
            Broken::ShflDivergent => KernelId::selftest_broken_shfl_divergent,
            Broken::ShflPartialWarp => KernelId::selftest_broken_shfl_partial_warp,
            Broken::ShflExitedLane => KernelId::selftest_broken_shfl_exited_lane,
            Broken::ShflSourceOutsideMask => KernelId::selftest_broken_shfl_source_outside_mask,
            Broken::MismatchedWarpOps => KernelId::selftest_broken_mismatched_warp_ops,
            Broken::MismatchedVotes => KernelId::selftest_broken_mismatched_votes,
            Broken::WarpDeadlock => KernelId::selftest_broken_warp_deadlock,
            Broken::WgmmaNotWaited => KernelId::selftest_broken_wgmma_not_waited,
        }
    }
}

/// Launches a broken kernel over two blocks (of 64 threads; 48 for
/// [`Broken::ShflPartialWarp`]; a warpgroup of 128 with 16 KiB of dynamic shared memory for
/// [`Broken::WgmmaNotWaited`]). On a correct emulator this returns [`Error::Emulator`].
pub fn run_broken(kind: Broken) -> Result<()> {
    let (block, smem) = match kind {
        Broken::ShflPartialWarp => (48, 0),
        Broken::WgmmaNotWaited => (128, 16 << 10),
        _ => (64, 0),
    };
    let mut out = vec![f32::NAN; 2 * block as usize];
    let params = BrokenParams {
        out: addr_mut(&mut out),
        n: out.len() as u32,
    };
    let launch = launch_1d(kind.kernel(), out.len(), block, smem)?;
    let buffers = [CheckBuffer::output("out", &out)];
    // SAFETY: out has n elements; the kernels write only below n.
    unsafe { emulator::launch_with(&launch, &params, &buffers) }
}

/// `CheckedParams` of `kernels/selftest.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CheckedParams {
    pub x: u64,
    pub out: u64,
    pub n: u32,
}

// SAFETY: field for field its C++ twin (checked by the size test).
unsafe impl KernelParams for CheckedParams {}

/// Broken kernels that only the emulator's checks ([`Checks`]) catch: without them they
/// run to completion on the CPU (and misbehave on a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokenCheck {
    /// A block's last thread reads the element after its tile of `x`: one past the end of
    /// `x` in the last block (memcheck).
    ReadPastTile,
    /// Threads read a shared tile element another warp writes, with no barrier between
    /// (racecheck).
    MissingBarrierRead,
    /// A thread reads a shared word that no thread wrote (initcheck).
    UninitSharedRead,
    /// Every block writes the same outputs (racecheck).
    BlocksWriteOneOutput,
    /// A block reads an output another block of the launch writes (racecheck).
    BlockReadsAnothersOutput,
}

impl BrokenCheck {
    /// Every one, with the check that catches it.
    pub const ALL: [(BrokenCheck, Checks); 5] = [
        (BrokenCheck::ReadPastTile, Checks::MEMCHECK),
        (BrokenCheck::MissingBarrierRead, Checks::RACECHECK),
        (BrokenCheck::UninitSharedRead, Checks::INITCHECK),
        (BrokenCheck::BlocksWriteOneOutput, Checks::RACECHECK),
        (BrokenCheck::BlockReadsAnothersOutput, Checks::RACECHECK),
    ];

    /// The kernel.
    pub fn kernel(self) -> KernelId {
        match self {
            BrokenCheck::ReadPastTile => KernelId::selftest_broken_read_past_tile,
            BrokenCheck::MissingBarrierRead => KernelId::selftest_broken_missing_barrier_read,
            BrokenCheck::UninitSharedRead => KernelId::selftest_broken_uninit_shared_read,
            BrokenCheck::BlocksWriteOneOutput => KernelId::selftest_broken_blocks_write_one_output,
            BrokenCheck::BlockReadsAnothersOutput => {
                KernelId::selftest_broken_block_reads_anothers_output
            }
        }
    }
}

/// Runs a [`BrokenCheck`] kernel over `x` and `out` of 128 elements (two blocks of 64
/// threads) under `checks`. With the check that catches it on, this returns
/// [`Error::Emulator`]; without, `Ok`.
pub fn run_broken_check(kind: BrokenCheck, checks: Checks) -> Result<()> {
    const N: usize = 128;
    // One element more than the kernel's x: the read past the tile stays inside this
    // allocation when memcheck is off, and lands past the buffer memcheck knows.
    let x: Vec<f32> = (0..=N).map(|i| i as f32).collect();
    let mut out = vec![f32::NAN; N];
    let params = CheckedParams {
        x: addr(&x),
        out: addr_mut(&mut out),
        n: N as u32,
    };
    let launch = launch_1d(kind.kernel(), N, 64, 0)?;
    let buffers = [
        CheckBuffer::input("x", &x[..N]),
        CheckBuffer::output("out", &out),
    ];
    // SAFETY: x has n + 1 elements and out n; the kernels read at most x[n].
    emulator::with_checks(checks, || unsafe {
        emulator::launch_with(&launch, &params, &buffers)
    })
}
