//! Self-checks of the dtype and architecture layer on the emulator: the kernels of
//! `kernels/selftest_mma.cu`, which exercise `kernels/arch.cuh` (`mma.sync`, `ldmatrix`,
//! `cp.async` and their emulated twins) and `kernels/common.cuh` (16-bit conversions,
//! 16-byte vector access, activations, warp and block reductions).
//!
//! - [`mma_gemm`]: a tensor-core GEMM (cp.async double buffering, ldmatrix, mma.sync)
//!   on ragged shapes; [`mma_gemm_launch`] is its geometry.
//! - [`mma_probe`] and [`ldmatrix_probe`]: one instruction each, lane by lane, so a test
//!   can hold the fragment layouts against the PTX ISA, and show that a wrong lane
//!   mapping changes the result.
//! - [`convert`] and [`arith`]: the 16-bit conversions and arithmetic, bit for bit.
//! - [`activation`] and [`reductions`]: the activations through vector loads and stores,
//!   the warp and block reductions.
//! - [`broken_mma_gemm_no_wait`]: the GEMM without its `cp.async` wait, which the
//!   emulator must turn into a wrong answer.
//!
//! As in the parent module, inputs are host slices, validated ([`Error::InvalidArgument`])
//! before anything runs. Inputs the kernels read with 16-byte accesses are first copied
//! into 16-byte aligned buffers, as a device allocation would be.

use std::marker::PhantomData;

use bytemuck::{Pod, Zeroable};
use half::bf16;

use super::{addr, addr_mut, check_len, count, launch_1d};
use crate::emulator::{self, CheckBuffer};
use crate::kernels::KernelId;
use crate::plan::{KernelParams, Launch};
use crate::{Activation, DType, Element, Error, Result};

/// `MmaGemmParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MmaGemmParams {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub lda: u32,
    pub ldb: u32,
    pub ldc: u32,
}

/// `MmaProbeParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MmaProbeParams {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub a_lane_xor: u32,
    pub b_lane_xor: u32,
}

/// `LdmatrixProbeParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LdmatrixProbeParams {
    pub src: u64,
    pub row_of_lane: u64,
    pub out: u64,
    pub misalign: u32,
}

/// `HalfConvertParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HalfConvertParams {
    pub x: u64,
    pub bits: u64,
    pub back: u64,
    pub pair_bits: u64,
    pub pair_back: u64,
    pub n: u32,
}

/// `HalfArithParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HalfArithParams {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub add: u64,
    pub sub: u64,
    pub mul: u64,
    pub fma: u64,
    pub n: u32,
}

/// `ActivationCheckParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ActivationCheckParams {
    pub x: u64,
    pub y: u64,
    pub n: u32,
    /// An [`Activation`] discriminant.
    pub act: u32,
}

/// `ReductionCheckParams` of `kernels/selftest_mma.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReductionCheckParams {
    pub x: u64,
    pub warp_sum: u64,
    pub warp_max: u64,
    pub block_sum: u64,
    pub block_max: u64,
    pub block_sum_twice: u64,
}

// SAFETY: each is field for field its C++ twin (checked by the size tests).
unsafe impl KernelParams for MmaGemmParams {}
unsafe impl KernelParams for MmaProbeParams {}
unsafe impl KernelParams for LdmatrixProbeParams {}
unsafe impl KernelParams for HalfConvertParams {}
unsafe impl KernelParams for HalfArithParams {}
unsafe impl KernelParams for ActivationCheckParams {}
unsafe impl KernelParams for ReductionCheckParams {}

/// 16 bytes at 16-byte alignment: the unit of [`Aligned`].
#[repr(C, align(16))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Chunk([u8; 16]);

/// A host buffer of `len` elements aligned like a device allocation, for kernels that
/// read it with 16-byte accesses.
struct Aligned<T> {
    chunks: Vec<Chunk>,
    len: usize,
    elem: PhantomData<T>,
}

impl<T: Pod> Aligned<T> {
    fn filled(len: usize, value: T) -> Self {
        let bytes = len * size_of::<T>();
        let mut buf = Aligned {
            chunks: vec![Chunk::zeroed(); bytes.div_ceil(16)],
            len,
            elem: PhantomData,
        };
        buf.as_mut_slice().fill(value);
        buf
    }

    fn copy_of(src: &[T]) -> Self {
        let mut buf = Aligned::filled(src.len(), T::zeroed());
        buf.as_mut_slice().copy_from_slice(src);
        buf
    }

    fn as_slice(&self) -> &[T] {
        &bytemuck::cast_slice(&self.chunks)[..self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.chunks)[..self.len]
    }
}

/// The kernel of a pair instantiated for f16 and bf16 only.
fn half_kernel<T: Element>(f16_kernel: KernelId, bf16_kernel: KernelId) -> Result<KernelId> {
    match T::DTYPE {
        DType::F16 => Ok(f16_kernel),
        DType::BF16 => Ok(bf16_kernel),
        DType::F32 => Err(Error::invalid("T", "f16 or bf16", T::DTYPE)),
    }
}

// ---------------------------------------------------------------------------------------
// GEMM

/// How B is stored for [`mma_gemm`] (row-major, contiguous).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BLayout {
    /// `n × k`, as `nn.Linear` stores a weight: `c = a · bᵀ`, fragments by `ldmatrix`.
    Nk,
    /// `k × n`: `c = a · b`, fragments by `ldmatrix.trans`.
    Kn,
}

/// The problem of an [`mma_gemm`]: `c (m × n, f32) = a (m × k) · B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub b_layout: BLayout,
}

/// The C tile of one block (`kGemmBM`, `kGemmBN` in the kernel) and its thread count.
const GEMM_TILE: u32 = 64;
const GEMM_THREADS: u32 = 128;

/// The kernel and geometry of an [`mma_gemm`] with `dtype` operands (f16 or bf16): one
/// block of 128 threads (4 warps) per 64 × 64 tile of `c`, grid x over n and y over m,
/// static shared memory only. `m` and `n` must be at least 1.
pub fn mma_gemm_launch(dtype: DType, gemm: &MmaGemm) -> Result<Launch> {
    use KernelId::*;
    let kernel = match (dtype, gemm.b_layout) {
        (DType::F16, BLayout::Nk) => selftest_mma_gemm_nk_f16,
        (DType::F16, BLayout::Kn) => selftest_mma_gemm_kn_f16,
        (DType::BF16, BLayout::Nk) => selftest_mma_gemm_nk_bf16,
        (DType::BF16, BLayout::Kn) => selftest_mma_gemm_kn_bf16,
        (DType::F32, _) => return Err(Error::invalid("dtype", "f16 or bf16", dtype)),
    };
    gemm_geometry(kernel, gemm)
}

fn gemm_geometry(kernel: KernelId, gemm: &MmaGemm) -> Result<Launch> {
    let tiles = |arg: &'static str, v: usize, limit: u32| -> Result<u32> {
        let max = limit as usize * GEMM_TILE as usize;
        if v == 0 || v > max {
            return Err(Error::invalid(arg, format!("in [1, {max}]"), v));
        }
        Ok((v as u32).div_ceil(GEMM_TILE))
    };
    Ok(Launch {
        kernel,
        // grid.y may not exceed 65535 blocks; grid.x (2^31 − 1) outlasts n's u32 count.
        grid: [
            tiles("n", gemm.n, u32::MAX / GEMM_TILE)?,
            tiles("m", gemm.m, 65535)?,
            1,
        ],
        block: [GEMM_THREADS, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    })
}

/// `c = a · B` on the tensor-core path of `kernels/selftest_mma.cu`, in f32: `a` is
/// `m × k`, `b` is `n × k` or `k × n` ([`BLayout`]), `c` is `m × n`, all row-major and
/// contiguous; `T` is f16 or bf16. `a` and `b` are staged into 16-byte aligned copies
/// whose rows are padded to a multiple of 8 elements with NaN, so a kernel that read past
/// `k` (or `n`) would produce NaN. Every element of `c` is written (zeros when `k = 0`).
pub fn mma_gemm<T: Element>(gemm: &MmaGemm, a: &[T], b: &[T], c: &mut [f32]) -> Result<()> {
    let kernel = match gemm.b_layout {
        BLayout::Nk => half_kernel::<T>(
            KernelId::selftest_mma_gemm_nk_f16,
            KernelId::selftest_mma_gemm_nk_bf16,
        )?,
        BLayout::Kn => half_kernel::<T>(
            KernelId::selftest_mma_gemm_kn_f16,
            KernelId::selftest_mma_gemm_kn_bf16,
        )?,
    };
    run_gemm(kernel, gemm, a, b, c)
}

/// [`mma_gemm`] (bf16, [`BLayout::Nk`]) with the `cp.async` wait removed, so the warps
/// multiply shared tiles whose copies have not landed. A broken kernel: the emulator
/// performs copies at the wait, so `c` comes out wrong.
pub fn broken_mma_gemm_no_wait(
    gemm: &MmaGemm,
    a: &[bf16],
    b: &[bf16],
    c: &mut [f32],
) -> Result<()> {
    if gemm.b_layout != BLayout::Nk {
        return Err(Error::invalid(
            "gemm.b_layout",
            "BLayout::Nk",
            format!("{:?}", gemm.b_layout),
        ));
    }
    run_gemm(
        KernelId::selftest_broken_mma_gemm_no_wait_bf16,
        gemm,
        a,
        b,
        c,
    )
}

fn run_gemm<T: Element>(
    kernel: KernelId,
    gemm: &MmaGemm,
    a: &[T],
    b: &[T],
    c: &mut [f32],
) -> Result<()> {
    let &MmaGemm { m, n, k, b_layout } = gemm;
    check_len("a", a.len(), m.saturating_mul(k), "m × k")?;
    let (b_rows, b_cols, b_dims) = match b_layout {
        BLayout::Nk => (n, k, "n × k"),
        BLayout::Kn => (k, n, "k × n"),
    };
    check_len("b", b.len(), n.saturating_mul(k), b_dims)?;
    check_len("c", c.len(), m.saturating_mul(n), "m × n")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let launch = gemm_geometry(kernel, gemm)?;
    let (a_dev, lda) = stage_padded(a, m, k)?;
    let (b_dev, ldb) = stage_padded(b, b_rows, b_cols)?;
    let params = MmaGemmParams {
        a: addr(a_dev.as_slice()),
        b: addr(b_dev.as_slice()),
        c: addr_mut(c),
        m: count("m", m)?,
        n: count("n", n)?,
        k: count("k", k)?,
        lda,
        ldb,
        ldc: count("n", n)?,
    };
    let buffers = [
        CheckBuffer::input("a", a_dev.as_slice()),
        CheckBuffer::input("b", b_dev.as_slice()),
        CheckBuffer::output("c", c),
    ];
    // SAFETY: a_dev holds m rows of lda ≥ k elements, b_dev b_rows rows of ldb ≥ b_cols,
    // both 16-byte aligned with lda, ldb multiples of 8; c holds m · n floats. The kernel
    // reads and writes nothing outside the m × n × k problem.
    unsafe { emulator::launch_with(&launch, &params, &buffers) }
}

/// `rows × cols` row-major `src` copied into an aligned buffer whose rows are padded to a
/// multiple of 8 elements (16 bytes) with NaN; returns it and its leading dimension.
fn stage_padded<T: Element>(src: &[T], rows: usize, cols: usize) -> Result<(Aligned<T>, u32)> {
    let ld = cols.next_multiple_of(8);
    let ld32 = count("leading dimension", ld)?;
    let mut dev = Aligned::filled(rows * ld, T::nan());
    if cols > 0 {
        for (dst, row) in dev
            .as_mut_slice()
            .chunks_exact_mut(ld)
            .zip(src.chunks_exact(cols))
        {
            dst[..cols].copy_from_slice(row);
        }
    }
    Ok((dev, ld32))
}

// ---------------------------------------------------------------------------------------
// Fragment-layout probes

/// `d = a · b + c` through one `mma.sync.m16n8k16` of `T` (f16 or bf16) on one warp: `a`
/// is 16 × 16, `b` 16 × 8 stored `k × n`, `c` and the returned `d` 16 × 8 in f32, all
/// row-major. Each lane gathers its fragments from memory by the documented layout, but
/// lane `l` takes the A fragments of lane `l ^ a_lane_xor` and the B fragments of lane
/// `l ^ b_lane_xor` (each below 32): a nonzero xor is a deliberately wrong lane mapping.
pub fn mma_probe<T: Element>(
    a: &[T],
    b: &[T],
    c: &[f32],
    a_lane_xor: u32,
    b_lane_xor: u32,
) -> Result<Vec<f32>> {
    let kernel = half_kernel::<T>(
        KernelId::selftest_mma_probe_f16,
        KernelId::selftest_mma_probe_bf16,
    )?;
    check_len("a", a.len(), 256, "16 × 16")?;
    check_len("b", b.len(), 128, "16 × 8")?;
    check_len("c", c.len(), 128, "16 × 8")?;
    for (arg, xor) in [("a_lane_xor", a_lane_xor), ("b_lane_xor", b_lane_xor)] {
        if xor >= 32 {
            return Err(Error::invalid(arg, "a lane mask below 32", xor));
        }
    }
    let mut d = vec![f32::NAN; 128];
    let params = MmaProbeParams {
        a: addr(a),
        b: addr(b),
        c: addr(c),
        d: addr_mut(&mut d),
        a_lane_xor,
        b_lane_xor,
    };
    let launch = launch_1d(kernel, 32, 32, 0)?;
    // SAFETY: a, b, c and d hold the 256, 128, 128 and 128 elements the warp touches.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(d)
}

/// Registers each lane receives in [`ldmatrix_probe`]: x1 (1), x2 (2), x4 (4), then
/// x1.trans (1), x2.trans (2), x4.trans (4).
pub const LDMATRIX_PROBE_REGS: usize = 14;

/// Every `ldmatrix` form on one warp: `src` (32 rows of 8 16-bit values, row-major) is
/// staged in shared memory, and lane `l` passes the address of row `row_of_lane[l]`
/// (each below 32) plus `misalign` bytes (below 16; nonzero breaks the 16-byte alignment
/// ldmatrix requires, which the emulator must refuse). Returns `[lane][register]`.
pub fn ldmatrix_probe(
    src: &[u16],
    row_of_lane: &[u32; 32],
    misalign: u32,
) -> Result<Vec<[u32; LDMATRIX_PROBE_REGS]>> {
    check_len("src", src.len(), 256, "32 × 8")?;
    if let Some(&row) = row_of_lane.iter().find(|&&r| r >= 32) {
        return Err(Error::invalid("row_of_lane", "rows below 32", row));
    }
    if misalign >= 16 {
        return Err(Error::invalid("misalign", "below 16 bytes", misalign));
    }
    let mut out = vec![[0xDEAD_BEEF_u32; LDMATRIX_PROBE_REGS]; 32];
    let params = LdmatrixProbeParams {
        src: addr(src),
        row_of_lane: addr(row_of_lane),
        out: addr_mut(&mut out),
        misalign,
    };
    let launch = launch_1d(KernelId::selftest_ldmatrix_probe, 32, 32, 0)?;
    // SAFETY: src holds 256 values, row_of_lane 32 rows below 32, out 32 · 14 registers.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Conversions and arithmetic

/// Output of [`convert`].
#[derive(Clone, Debug, PartialEq)]
pub struct Converted<T> {
    /// `from_float<T>` (`__float2half_rn` / `__float2bfloat16_rn`) of each element.
    pub scalar: Vec<T>,
    /// `to_float` of each of `scalar`.
    pub scalar_back: Vec<f32>,
    /// The same through the paired conversion (`__floats2half2_rn` / `__floats2bfloat162_rn`).
    pub pair: Vec<T>,
    /// `pair` widened by `__half22float2` / `__bfloat1622float2`.
    pub pair_back: Vec<f32>,
}

/// Rounds every element of `x` to `T` (f16 or bf16) and back on the device, through the
/// scalar and the paired intrinsics.
pub fn convert<T: Element>(x: &[f32]) -> Result<Converted<T>> {
    let kernel = half_kernel::<T>(
        KernelId::selftest_convert_f16,
        KernelId::selftest_convert_bf16,
    )?;
    let n = count("x", x.len())?;
    let mut out = Converted {
        scalar: vec![T::nan(); x.len()],
        scalar_back: vec![f32::NAN; x.len()],
        pair: vec![T::nan(); x.len()],
        pair_back: vec![f32::NAN; x.len()],
    };
    if x.is_empty() {
        return Ok(out);
    }
    let params = HalfConvertParams {
        x: addr(x),
        bits: addr_mut(&mut out.scalar),
        back: addr_mut(&mut out.scalar_back),
        pair_bits: addr_mut(&mut out.pair),
        pair_back: addr_mut(&mut out.pair_back),
        n,
    };
    let launch = launch_1d(kernel, x.len().div_ceil(2), 256, 0)?;
    // SAFETY: every buffer holds n elements; thread i touches elements 2i and 2i + 1 < n.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(out)
}

/// Output of [`arith`].
#[derive(Clone, Debug, PartialEq)]
pub struct Arith<T> {
    /// `__hadd(a, b)`.
    pub add: Vec<T>,
    /// `__hsub(a, b)`.
    pub sub: Vec<T>,
    /// `__hmul(a, b)`.
    pub mul: Vec<T>,
    /// `__hfma(a, b, c)`.
    pub fma: Vec<T>,
}

/// The 16-bit arithmetic intrinsics on `T` (f16 or bf16), elementwise.
pub fn arith<T: Element>(a: &[T], b: &[T], c: &[T]) -> Result<Arith<T>> {
    let kernel = half_kernel::<T>(KernelId::selftest_arith_f16, KernelId::selftest_arith_bf16)?;
    let n = count("a", a.len())?;
    check_len("b", b.len(), a.len(), "as many as a")?;
    check_len("c", c.len(), a.len(), "as many as a")?;
    let mut out = Arith {
        add: vec![T::nan(); a.len()],
        sub: vec![T::nan(); a.len()],
        mul: vec![T::nan(); a.len()],
        fma: vec![T::nan(); a.len()],
    };
    if a.is_empty() {
        return Ok(out);
    }
    let params = HalfArithParams {
        a: addr(a),
        b: addr(b),
        c: addr(c),
        add: addr_mut(&mut out.add),
        sub: addr_mut(&mut out.sub),
        mul: addr_mut(&mut out.mul),
        fma: addr_mut(&mut out.fma),
        n,
    };
    let launch = launch_1d(kernel, a.len(), 256, 0)?;
    // SAFETY: every buffer holds n elements, one per thread below n.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Activations and reductions

/// `act` applied to every element of `x` in f32 and rounded back to `T`, through 16-byte
/// vector loads and stores (the last, partial vector element by element).
pub fn activation<T: Element>(x: &[T], act: Activation) -> Result<Vec<T>> {
    let kernel = match T::DTYPE {
        DType::F32 => KernelId::selftest_activation_f32,
        DType::F16 => KernelId::selftest_activation_f16,
        DType::BF16 => KernelId::selftest_activation_bf16,
    };
    let n = count("x", x.len())?;
    if x.is_empty() {
        return Ok(Vec::new());
    }
    let x_dev = Aligned::copy_of(x);
    let mut y_dev = Aligned::filled(x.len(), T::nan());
    let params = ActivationCheckParams {
        x: addr(x_dev.as_slice()),
        y: addr_mut(y_dev.as_mut_slice()),
        n,
        act: act as u32,
    };
    let per_thread = 16 / size_of::<T>();
    let launch = launch_1d(kernel, x.len().div_ceil(per_thread), 128, 0)?;
    // SAFETY: x_dev and y_dev hold n elements, 16-byte aligned; each thread touches one
    // 16-byte vector, or the elements of the last partial one below n.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(y_dev.as_slice().to_vec())
}

/// Output of [`reductions`].
#[derive(Clone, Debug, PartialEq)]
pub struct Reductions {
    /// `warp_sum` of each warp's 32 elements.
    pub warp_sum: Vec<f32>,
    /// `warp_max` of each warp's 32 elements.
    pub warp_max: Vec<f32>,
    /// `block_sum` of each block's elements.
    pub block_sum: Vec<f32>,
    /// `block_max` of each block's elements.
    pub block_max: Vec<f32>,
    /// A second `block_sum` right after the first, of twice the elements: exactly
    /// `2 · block_sum` unless back-to-back reductions trample each other.
    pub block_sum_twice: Vec<f32>,
}

/// The warp and block reductions of `common.cuh` over `x`, in blocks of shape `block`
/// (whole warps: the thread count a multiple of 32, at most 1024); `x.len()` must be a
/// nonzero multiple of the thread count. Block `b`'s threads take `x[b·threads ..]` in
/// the order warps are formed (x fastest).
pub fn reductions(x: &[f32], block: [u32; 3]) -> Result<Reductions> {
    let threads = block.iter().map(|&d| d as usize).product::<usize>();
    if threads == 0 || threads > 1024 || threads % 32 != 0 {
        return Err(Error::invalid(
            "block",
            "a multiple of 32 threads, at most 1024",
            format!("{block:?}"),
        ));
    }
    if x.is_empty() || x.len() % threads != 0 {
        return Err(Error::invalid(
            "x",
            format!("a nonzero multiple of {threads} elements"),
            x.len(),
        ));
    }
    let blocks = x.len() / threads;
    let warps = x.len() / 32;
    let mut out = Reductions {
        warp_sum: vec![f32::NAN; warps],
        warp_max: vec![f32::NAN; warps],
        block_sum: vec![f32::NAN; blocks],
        block_max: vec![f32::NAN; blocks],
        block_sum_twice: vec![f32::NAN; blocks],
    };
    let params = ReductionCheckParams {
        x: addr(x),
        warp_sum: addr_mut(&mut out.warp_sum),
        warp_max: addr_mut(&mut out.warp_max),
        block_sum: addr_mut(&mut out.block_sum),
        block_max: addr_mut(&mut out.block_max),
        block_sum_twice: addr_mut(&mut out.block_sum_twice),
    };
    let launch = Launch {
        kernel: KernelId::selftest_reduction_f32,
        grid: [count("x", blocks)?, 1, 1],
        block,
        dynamic_smem: 0,
        overlap_previous: false,
    };
    // SAFETY: x holds blocks · threads elements, one per thread; the outputs one per warp
    // and per block.
    unsafe { emulator::launch(&launch, &params) }?;
    Ok(out)
}
