//! Planning of the delta-linear family (kernels/delta_linear.cu): validation, kernel choice
//! and the launch sequence of each method of the unified view.

use super::{check_len, grid_for, Buf, Launch};
use crate::delta_linear::{
    DeltaApplyDims, DeltaLinear, DeltaLinearDims, KernelVariant, LoraDropout, LoraMergeDims,
};
use crate::error::{Error, Result};
use crate::kernels::KernelId;
use crate::quant::{Fp8Scaling, Nf4Absmax, QuantWeight};
use crate::spec::{Activation, Composition, DType, Insertion, MatrixLayout};

/// Twin of `FusedLinearParams` in kernels/delta_linear.cu (see its header for the math).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FusedLinearParams {
    pub a1: u64,
    pub b1: u64,
    pub bias: u64,
    pub h_in: u64,
    pub a2: u64,
    pub b2: u64,
    pub bias2: u64,
    pub gate: u64,
    pub out: u64,
    pub partial: u64,
    pub save: u64,
    pub col_scale: u64,
    pub lda1: i64,
    pub ldb1: i64,
    pub ldh: i64,
    pub lda2: i64,
    pub ldb2: i64,
    pub ldo: i64,
    pub ldp: i64,
    pub ld_save: i64,
    pub bs_a1: i64,
    pub bs_b1: i64,
    pub bs_bias: i64,
    pub bs_h: i64,
    pub bs_a2: i64,
    pub bs_b2: i64,
    pub bs_bias2: i64,
    pub bs_out: i64,
    pub bs_save: i64,
    pub drop_seed: u64,
    pub m: i32,
    pub n: i32,
    pub k1: i32,
    pub k2: i32,
    pub k_splits: i32,
    pub activation: i32,
    pub compose: i32,
    pub c_main: i32,
    pub c_bias2: i32,
    pub c_out: i32,
    pub save_stored: i32,
    pub dropout: i32,
    pub scale: f32,
    pub drop_p: f32,
    /// Phase 1's B1 quantized (`delta_linear_quant`); `format` 0: B1 is the dense `b1`.
    pub quant: QuantParams,
    /// A multi-adapter batch whose per-row deltas are phase 2 (the `_multi` kernels, and the
    /// split-K reduction after them); `table` 0: none.
    pub multi: super::multi_adapter::MultiBatch,
}
// SAFETY: #[repr(C)], field for field the C++ struct (checked by a size test).
unsafe impl super::KernelParams for FusedLinearParams {
    /// A split pass folds its `k_splits` runs into grid.x (run = blockIdx.x / n_tiles,
    /// kernels/delta_linear.cu); its reduction, launched with the same parameters, does not.
    fn profile_runs(&self, launch: &Launch) -> Option<super::GridRuns> {
        use KernelId::{fused_linear_split_reduce_bf16, fused_linear_split_reduce_f16};
        match launch.kernel {
            fused_linear_split_reduce_f16 | fused_linear_split_reduce_bf16 => None,
            _ if self.k_splits > 1 => Some(super::GridRuns {
                dim: 0,
                runs: self.k_splits as u32,
                inner: false,
            }),
            _ => None,
        }
    }
}

/// Twin of `QuantParams` in kernels/quant.cuh: a quantized frozen W [n, k] by address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QuantParams {
    pub data: u64,
    pub code: u64,
    pub absmax: u64,
    pub absmax_codes: u64,
    pub nested_code: u64,
    pub nested_absmax: u64,
    pub scale: u64,
    pub k: i64,
    pub scale_ld: i64,
    pub format: i32,
    pub block_shift: i32,
    pub block_rows: i32,
    pub block_cols: i32,
    pub offset: f32,
    pub pad_: i32,
}

impl QuantParams {
    /// The kernels' view of a quantized W [n, k], after checking it against that shape
    /// ([`QuantWeight::check`]).
    pub fn new(w: &QuantWeight<Buf, Buf>, n: usize, k: usize) -> Result<QuantParams> {
        w.map(|b| b.len, |b| b.len).check(n, k)?;
        let k_i64 = k as i64;
        Ok(match *w {
            QuantWeight::Nf4(w) => {
                let mut q = QuantParams {
                    data: w.packed.addr,
                    code: w.code.addr,
                    k: k_i64,
                    format: QUANT_NF4,
                    block_shift: w.blocksize.trailing_zeros() as i32,
                    ..Default::default()
                };
                match w.absmax {
                    Nf4Absmax::F32(a) => q.absmax = a.addr,
                    Nf4Absmax::Double {
                        codes,
                        code,
                        scales,
                        offset,
                    } => {
                        (q.absmax_codes, q.nested_code, q.nested_absmax, q.offset) =
                            (codes.addr, code.addr, scales.addr, offset)
                    }
                }
                q
            }
            QuantWeight::Fp8(w) => {
                let (block_rows, block_cols) = match w.scaling {
                    Fp8Scaling::PerRow => (0, 0),
                    // Blocks wider than W act as one block: clamp them into i32.
                    Fp8Scaling::Block { rows, cols } => (rows.min(n), cols.min(k)),
                };
                QuantParams {
                    data: w.weight.addr,
                    scale: w.scale.addr,
                    k: k_i64,
                    scale_ld: k.div_ceil(block_cols.max(1)) as i64,
                    format: QUANT_FP8,
                    block_rows: block_rows as i32,
                    block_cols: block_cols as i32,
                    ..Default::default()
                }
            }
        })
    }
}

/// Twin of `QuantDequantizeParams` in kernels/delta_linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QuantDequantizeParams {
    pub q: QuantParams,
    pub out: u64,
    pub n: i64,
}
// SAFETY: as above.
unsafe impl super::KernelParams for QuantDequantizeParams {}

/// Threads per block of `quant_dequantize`, and its grid cap (a grid-stride loop covers the
/// rest).
const DEQUANTIZE_THREADS: usize = 256;
const DEQUANTIZE_MAX_BLOCKS: usize = 65_536;

/// Plans `quant_dequantize`: the quantized W [n, k] to a contiguous `out` [n, k] in `dtype`
/// (each element the libraries' f32 value rounded to dtype: the values the fused kernels multiply
/// with), for the unfused baseline and for users who want W materialised.
pub fn quant_dequantize(
    n: usize,
    k: usize,
    dtype: DType,
    b: &QuantDequantizeBufs,
) -> Result<Vec<(Launch, QuantDequantizeParams)>> {
    plan_dequantize(&b.w, n, k, dtype, b.out).map_err(|e| e.of("quant_dequantize"))
}

/// The operands of a `quant_dequantize` call.
#[derive(Clone, Copy, Debug)]
pub struct QuantDequantizeBufs {
    pub w: QuantWeight<Buf, Buf>,
    pub out: Buf,
}

fn plan_dequantize(
    w: &QuantWeight<Buf, Buf>,
    n: usize,
    k: usize,
    dtype: DType,
    out: Buf,
) -> Result<Vec<(Launch, QuantDequantizeParams)>> {
    positive("n", n)?;
    positive("k", k)?;
    let q = QuantParams::new(w, n, k)?;
    check_exact("out", Some(out), &[n, k])?;
    let runs = n.saturating_mul(k.div_ceil(32));
    let blocks = runs
        .div_ceil(DEQUANTIZE_THREADS)
        .clamp(1, DEQUANTIZE_MAX_BLOCKS);
    let kernel = match dtype {
        DType::F32 => KernelId::quant_dequantize_f32,
        DType::F16 => KernelId::quant_dequantize_f16,
        DType::BF16 => KernelId::quant_dequantize_bf16,
    };
    let launch = Launch {
        kernel,
        grid: [blocks as u32, 1, 1],
        block: [DEQUANTIZE_THREADS as u32, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let p = QuantDequantizeParams {
        q,
        out: out.addr,
        n: n as i64,
    };
    Ok(vec![(launch, p)])
}

// kernels/quant.cuh `QuantFormat`.
const QUANT_NF4: i32 = 1;
const QUANT_FP8: i32 = 2;

/// Twin of `LoraMergeParams` in kernels/delta_linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoraMergeParams {
    pub w: u64,
    /// LoRA A.
    pub w_down: u64,
    /// LoRA B.
    pub w_up: u64,
    pub ldw: i64,
    pub ld_down: i64,
    pub ld_up: i64,
    pub n: i32,
    pub k: i32,
    pub r: i32,
    /// The scale of B·A: ±s.
    pub scale: f32,
}
// SAFETY: as above.
unsafe impl super::KernelParams for LoraMergeParams {}

// Row coefficients (kernels/delta_linear.cu `Coef`).
const COEF_ONE: i32 = 0;
const COEF_H: i32 = 1;
const COEF_D: i32 = 2;

/// The operands of one delta-linear call, as addresses; `None` for absent optional tensors.
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearBufs {
    pub x: Buf,
    pub w: Buf,
    pub bias: Option<Buf>,
    pub u: Option<Buf>,
    pub w_down: Buf,
    pub b_down: Option<Buf>,
    pub w_up: Buf,
    pub b_up: Option<Buf>,
    pub gate: Option<Buf>,
    pub workspace: Buf,
    pub y: Buf,
    /// DoRA's column scale g `[n]`, f32 (`crate::dora::DoraLinearArgs`): y = g ⊙ (x·Wᵀ + Δ) + b.
    /// Parallel insertion without a gate only; a training forward then also saves x·Wᵀ + Δ.
    pub col_scale: Option<Buf>,
}

/// The operands of one delta-apply call (a delta on a given h, per head).
#[derive(Clone, Copy, Debug)]
pub struct DeltaApplyBufs {
    /// The frozen output; `None`: read from `y` in place.
    pub h: Option<Buf>,
    pub u: Option<Buf>,
    pub w_down: Buf,
    pub b_down: Option<Buf>,
    pub w_up: Buf,
    pub b_up: Option<Buf>,
    pub gate: Option<Buf>,
    pub workspace: Buf,
    pub y: Buf,
}

/// The operands of a LoRA merge.
#[derive(Clone, Copy, Debug)]
pub struct LoraMergeBufs {
    pub w: Buf,
    pub w_down: Buf,
    pub w_up: Buf,
}

/// The row-coefficient encoding of a composition over a bottleneck of width `r` (≥ 1,
/// checked before): (compose code, scale), LoRA's α resolved against r here.
pub(crate) fn composition_code(c: Composition, r: usize) -> Result<(i32, f32)> {
    match c {
        Composition::Add => Ok((0, 1.0)),
        Composition::Scaled(s) if s.is_finite() => Ok((1, s)),
        Composition::Scaled(s) => Err(Error::invalid("composition", "a finite scale s", s)),
        Composition::Lora { alpha, .. } if alpha.is_finite() => Ok((1, c.scale(r))),
        Composition::Lora { alpha, .. } => {
            Err(Error::invalid("composition", "a finite LoRA alpha", alpha))
        }
        Composition::Gated => Ok((2, 1.0)),
    }
}

pub(crate) fn dim_i32(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(arg, format!("at most {}", i32::MAX), v))
}

/// The largest width or reduction length (n, k, r, head dims): the kernels round such a
/// length up to whole tiles in 32-bit ints (ceil_div(k, BK), a rank loop's j += 16), which
/// wraps within a tile of i32::MAX; 2^30, as attention's lengths.
const MAX_DIM: usize = 1 << 30;

/// A width or reduction length: at least 1, at most [`MAX_DIM`].
pub(crate) fn positive(arg: &'static str, v: usize) -> Result<i32> {
    if v == 0 || v > MAX_DIM {
        return Err(Error::invalid(arg, format!("between 1 and {MAX_DIM}"), v));
    }
    dim_i32(arg, v)
}

/// Checks that `buf` holds the matrix `layout` (and that `ld ≥ cols`). The length is computed
/// without wrapping: a huge `ld` must not pass as a small matrix (the kernels would index
/// with it).
pub(crate) fn check_matrix(arg: &'static str, buf: Buf, layout: MatrixLayout) -> Result<()> {
    if layout.ld < layout.cols {
        return Err(Error::invalid(
            arg,
            format!("a leading dimension ≥ {} (its columns)", layout.cols),
            layout.ld,
        ));
    }
    let need = if layout.rows == 0 || layout.cols == 0 {
        Some(0)
    } else {
        (layout.rows - 1)
            .checked_mul(layout.ld)
            .and_then(|v| v.checked_add(layout.cols))
    };
    if need.is_none_or(|need| buf.len < need) {
        let need = need.map_or_else(
            || "more than usize::MAX".into(),
            |n| format!("at least {n}"),
        );
        return Err(Error::invalid(
            arg,
            format!(
                "{need} elements for a {}×{} matrix with leading dimension {}",
                layout.rows, layout.cols, layout.ld
            ),
            format!("{} elements", buf.len),
        ));
    }
    Ok(())
}

/// Checks that `buf`, if given, is exactly the contiguous tensor of `shape`: a tensor
/// without a stride that is longer than its shape is a mistaken shape (a parallel adapter's
/// W_down given to a sequential one, a whole fused QKV weight), not room to spare.
pub(crate) fn check_exact(arg: &'static str, buf: Option<Buf>, shape: &[usize]) -> Result<()> {
    let Some(buf) = buf else { return Ok(()) };
    let need = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let shape = format!("{shape:?}");
    match need {
        Some(len) if buf.len == len => Ok(()),
        need => Err(Error::invalid(
            arg,
            match need {
                Some(len) => format!("exactly {len} elements, a contiguous {shape}"),
                None => format!("a contiguous {shape}, more than usize::MAX elements"),
            },
            format!("{} elements", buf.len),
        )),
    }
}

pub(crate) fn check_gate(gate: Option<Buf>, composition: Composition, m: usize) -> Result<()> {
    match (composition, gate) {
        (Composition::Gated, None) => Err(Error::invalid(
            "gate",
            format!("a per-row gate λ of {m} elements for Composition::Gated"),
            "None",
        )),
        (Composition::Gated, g) => check_exact("gate", g, &[m]),
        (_, Some(_)) => Err(Error::invalid(
            "gate",
            "None unless composition is Composition::Gated",
            "a gate tensor",
        )),
        (_, None) => Ok(()),
    }
}

/// Which implementation runs a fused-linear pass for `dtype` on these operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Naive,
    Simt,
    MmaDecode,
    MmaSmall,
    MmaMid,
    MmaLarge,
    /// Hopper's warpgroup MMA (only on request).
    Wgmma,
    /// The reduction after a split-K pass (one thread per output).
    SplitReduce,
}

/// An operand of a pass's frozen GEMM (phase 1): (base address, leading dimension, batch
/// stride), all in elements of `dtype`.
type VecOperand = (u64, usize, usize);

/// The tensor-core tile of a pass over m × n. A narrow output (the down pass's r columns, a
/// head's slice) takes the small tile at any m: the large tile's 128 columns would leave most
/// of its MMA work padding and give the pass ceil(m/128) blocks, 32 for m = 4096 and r = 16, a
/// quarter of an H100.
fn mma_kind(m: usize, n: usize) -> Kind {
    match (m, n) {
        (..=DECODE_ROWS, _) => Kind::MmaDecode,
        (_, ..=64) => Kind::MmaSmall,
        // One row tile for every row: W read once.
        (..=64, _) => Kind::MmaMid,
        _ => Kind::MmaLarge,
    }
}

/// `Auto` takes the tensor cores for f16/bf16 when the phase-1 operands can be copied in
/// 16-byte chunks (aligned bases, strides multiples of 8 elements): the kernel loads any other
/// operand element by element, which costs nothing on the delta's few K steps (W_up's rows
/// of r elements are unaligned for most ranks) but would starve the frozen GEMM, so unaligned
/// phase-1 operands go to the SIMT kernel. An explicit `TensorCore` runs on any alignment.
fn kind_for(
    variant: KernelVariant,
    dtype: DType,
    (m, n): (usize, usize),
    phase1: &[VecOperand],
) -> Result<Kind> {
    let vec_ok = |&(addr, ld, bs): &VecOperand| {
        let per = 16 / dtype.size();
        addr % 16 == 0 && ld % per == 0 && bs % per == 0
    };
    let mma = mma_kind(m, n);
    let tensor_cores = matches!(variant, KernelVariant::TensorCore | KernelVariant::Wgmma);
    if tensor_cores && dtype == DType::F32 {
        return Err(Error::Unsupported(
            "the tensor-core kernels take f16/bf16 operands, not f32 (whose accuracy contract \
             rules out TF32)"
                .into(),
        ));
    }
    Ok(match variant {
        KernelVariant::Auto if dtype != DType::F32 && phase1.iter().all(vec_ok) => mma,
        KernelVariant::Auto | KernelVariant::Simt => Kind::Simt,
        KernelVariant::Naive => Kind::Naive,
        KernelVariant::TensorCore => mma,
        KernelVariant::Wgmma => Kind::Wgmma,
    })
}

/// The block tile (BM, BN, BK) of each kind: the configurations of kernels/delta_linear.cu (BK
/// only matters to the kinds that split).
fn tile(kind: Kind) -> (usize, usize, usize) {
    match kind {
        Kind::Naive => (16, 16, 1),
        Kind::Simt => (64, 64, 16),
        Kind::MmaDecode => (16, 32, 128),
        Kind::MmaSmall => (16, 64, 64),
        Kind::MmaMid => (64, 64, 64),
        Kind::MmaLarge => (128, 128, 32),
        Kind::Wgmma => (128, 128, 64),
        Kind::SplitReduce => (1, 128, 1),
    }
}

/// Whether the kernel of `kind` can split its K over blocks (`FusedLinearParams::k_splits`).
fn splits_k(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::MmaDecode | Kind::MmaSmall | Kind::MmaMid | Kind::MmaLarge
    )
}

/// The launch of a pass over `m` rows × `cols.1` columns (the argument `cols.0` sets) in
/// `batch` = `dims.heads` problems, its K split over `splits` runs of blocks (1: no split;
/// see [`pass_steps`]).
fn launch_for(
    kind: Kind,
    dtype: DType,
    m: usize,
    cols: (&'static str, usize),
    batch: usize,
    splits: usize,
) -> Result<Launch> {
    use KernelId::*;
    // (kernel per dtype f32/f16/bf16, threads, dynamic shared memory): the kernels of
    // kernels/delta_linear.cu.
    let (kernels, threads, smem) = match kind {
        Kind::Naive => (
            [
                Some(fused_linear_naive_f32),
                Some(fused_linear_naive_f16),
                Some(fused_linear_naive_bf16),
            ],
            256,
            0,
        ),
        Kind::Simt => (
            [
                Some(fused_linear_simt_f32),
                Some(fused_linear_simt_f16),
                Some(fused_linear_simt_bf16),
            ],
            256,
            0,
        ),
        Kind::MmaDecode => (
            [
                None,
                Some(fused_linear_mma_decode_f16),
                Some(fused_linear_mma_decode_bf16),
            ],
            128,
            6 * (16 + 32) * (128 + 8) * 2,
        ),
        Kind::MmaSmall => (
            [
                None,
                Some(fused_linear_mma_small_f16),
                Some(fused_linear_mma_small_bf16),
            ],
            128,
            4 * (16 + 64) * (64 + 8) * 2,
        ),
        Kind::MmaMid => (
            [
                None,
                Some(fused_linear_mma_mid_f16),
                Some(fused_linear_mma_mid_bf16),
            ],
            128,
            4 * (64 + 64) * (64 + 8) * 2,
        ),
        Kind::MmaLarge => (
            [
                None,
                Some(fused_linear_mma_large_f16),
                Some(fused_linear_mma_large_bf16),
            ],
            256,
            4 * (128 + 128) * (32 + 8) * 2,
        ),
        Kind::Wgmma => (
            [
                None,
                Some(fused_linear_wgmma_f16),
                Some(fused_linear_wgmma_bf16),
            ],
            256,
            3 * (128 + 128) * 64 * 2 + 1024,
        ),
        Kind::SplitReduce => (
            [
                None,
                Some(fused_linear_split_reduce_f16),
                Some(fused_linear_split_reduce_bf16),
            ],
            128,
            0,
        ),
    };
    let (bm, bn, _) = tile(kind);
    let index = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    let kernel = kernels[index]
        .ok_or_else(|| Error::Unsupported(format!("no tensor-core kernel for {dtype}")))?;
    // The naive kernel is a 16×16 thread square; the others are 1-D blocks.
    let block = if kind == Kind::Naive {
        [16, 16, 1]
    } else {
        [threads, 1, 1]
    };
    let mut grid = grid_for([
        (cols.0, cols.1, bn),
        ("dims.m", m, bm),
        ("dims.heads", batch, 1),
    ])?;
    // Column tile x of run s is block s·tiles + x. grid_for keeps the tiles within
    // i32::MAX / bn, and every kind that splits has bn ≥ 32 ≥ MAX_K_SPLITS runs: the product
    // stays within grid.x.
    debug_assert!(splits == 1 || splits_k(kind));
    debug_assert!(splits <= MAX_K_SPLITS && (splits == 1 || bn >= MAX_K_SPLITS));
    grid[0] *= splits as u32;
    Ok(Launch {
        kernel,
        grid,
        block,
        dynamic_smem: smem,
        overlap_previous: false,
    })
}

/// The launch of a step that always follows the one writing what it reads: an up-projection
/// pass after the down pass (or its reduction) that writes t, which may start early and
/// stream its phase 1 (the frozen GEMM) while that runs, waiting for t at its first phase-2
/// tile; a split pass's reduction after the split runs, waiting before it reads the partial
/// sums (see kernels/delta_linear.cu).
fn overlapping(launch: Launch) -> Launch {
    Launch {
        overlap_previous: true,
        ..launch
    }
}

/// The leading dimension of the workspace t = [rows, r]: r rounded up to 8 elements so that
/// every row starts 16-byte aligned for the tensor-core kernels.
pub(crate) fn workspace_ld(r: usize) -> usize {
    r.div_ceil(8).saturating_mul(8)
}

/// Passes of at most this many rows take the decode tile (kernels/delta_linear.cu, MmaDecode:
/// BM = 16, BN = 32, BK = 128): weight streaming.
const DECODE_ROWS: usize = 16;
/// The most runs a split-K pass has.
const MAX_K_SPLITS: usize = 32;
/// A pass of fewer k-tiles is not split (1024 columns of the decode tile): one block streams
/// them in a few round trips to memory, about what the reduction's extra launch costs where
/// launches do not overlap (sm_80, PEFT_KERNELS_NO_OVERLAP). A guess until measured.
const MIN_SPLIT_K_TILES: usize = 8;

/// The most runs a pass of `kind` over m × n splits its K into: enough that it has about
/// `target` blocks (`split_target` of the dims; a down pass of rank 16 at decode has one
/// column tile: one block streaming all of W_down at one SM's bandwidth; the large tile's
/// frozen GEMM at m = 128, n = 4096 has 32 blocks, a quarter of an H100). 1: the pass never
/// splits, and a pass of more rows than a grid has in y (the reduction's grid is a row per
/// block) does not either, whatever the target.
fn max_k_splits(kind: Kind, m: usize, n: usize, target: usize) -> usize {
    if !splits_k(kind) || m as u64 > super::MAX_GRID[1] {
        return 1;
    }
    let (bm, bn, _) = tile(kind);
    let blocks = n.div_ceil(bn).saturating_mul(m.div_ceil(bm)).max(1);
    target.div_ceil(blocks).clamp(1, MAX_K_SPLITS)
}

/// The runs a pass of `kind` over m × n with `k_tiles` k-tiles (both phases) splits into: up
/// to [`max_k_splits`] and to `fit` (the runs whose partial sums the workspace has room
/// for), each at least one k-tile, none below [`MIN_SPLIT_K_TILES`].
fn k_splits(kind: Kind, m: usize, n: usize, k_tiles: usize, target: usize, fit: usize) -> usize {
    if k_tiles < MIN_SPLIT_K_TILES {
        return 1;
    }
    let want = max_k_splits(kind, m, n, target).min(k_tiles).min(fit);
    if want < 2 {
        return 1;
    }
    k_tiles.div_ceil(k_tiles.div_ceil(want))
}

/// Where a delta's workspace keeps what, in elements of a 2-byte dtype (only f16/bf16 passes
/// split, so an f32 workspace has room to spare): t [m, heads·workspace_ld(r)] at 0, then,
/// each 16-byte aligned, the f32 partial sums of a split down pass, [runs][m][workspace_ld(r)],
/// and of a split main pass (the frozen GEMM or the up-projection over n columns),
/// [runs][m][n], each sized for the most runs the plan may choose for `split_target`. Only a
/// single bottleneck (heads = 1) splits. The two regions are apart although a main pass, a
/// dependent launch of the down pass's reduction, writes its sums only after waiting for
/// that reduction: sharing would save the smaller region but tie the layout to that
/// ordering. Sizes saturate where they pass usize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WorkspaceLayout {
    /// Elements of t, at 0: the least workspace a call takes (it then splits nothing).
    pub t: usize,
    /// The down pass's partial sums: offset in elements, room in f32s.
    pub down: (usize, usize),
    /// The main passes' partial sums: offset in elements, room in f32s.
    pub main: (usize, usize),
    /// The split target the rooms are sized for, which the passes then split by.
    pub split_target: usize,
    /// Elements in all.
    pub len: usize,
}

pub(crate) fn workspace_layout(
    m: usize,
    heads: usize,
    r: usize,
    n: usize,
    split_target: usize,
) -> WorkspaceLayout {
    let t = m.saturating_mul(heads).saturating_mul(workspace_ld(r));
    let runs = |cols: usize| max_k_splits(mma_kind(m, cols), m, cols, split_target);
    let room = |cols: usize, ld: usize| match runs(cols) {
        runs if runs > 1 && heads == 1 => runs.saturating_mul(m).saturating_mul(ld),
        _ => 0,
    };
    let aligned = |x: usize| x.checked_next_multiple_of(8).unwrap_or(usize::MAX);
    let (down_room, main_room) = (room(r, workspace_ld(r)), room(n, n));
    let down = aligned(t);
    let main = aligned(down.saturating_add(down_room.saturating_mul(2)));
    let len = match (down_room, main_room) {
        (0, 0) => t,
        (_, 0) => down.saturating_add(down_room.saturating_mul(2)),
        _ => main.saturating_add(main_room.saturating_mul(2)),
    };
    WorkspaceLayout {
        t,
        down: (down, down_room),
        main: (main, main_room),
        split_target,
        len,
    }
}

/// An error naming the workspace unless it holds t, the least a call takes (a shorter one
/// than `layout.len` splits less: see [`partials`]).
fn check_workspace(workspace: Buf, layout: &WorkspaceLayout) -> Result<()> {
    let least = "t: m × heads × (r rounded up to 8), heads = 1 for delta_linear; \
                 workspace_len() of the dims adds the room to split passes with few blocks";
    check_len("workspace", Some(workspace), layout.t, Some(least))
}

/// Where a pass may keep the partial sums of a split: the address and the room, in f32s;
/// and the split target that room was sized for.
#[derive(Clone, Copy, Debug)]
struct Partials {
    addr: u64,
    room: usize,
    split_target: usize,
}

/// The down and the main passes' partial sums in `workspace`, laid out as `layout` says,
/// each region's room cut to what `workspace` holds (a workspace shorter than `layout.len`
/// but at least t is accepted: its passes split into fewer runs, or none).
fn partials(workspace: Buf, layout: &WorkspaceLayout, dtype: DType) -> (Partials, Partials) {
    let at = |(offset, room): (usize, usize)| {
        let held = workspace
            .len
            .saturating_sub(offset)
            .saturating_mul(dtype.size())
            / 4;
        let bytes = offset.min(workspace.len).saturating_mul(dtype.size());
        Partials {
            addr: workspace.addr.saturating_add(bytes as u64),
            room: room.min(held),
            split_target: layout.split_target,
        }
    };
    (at(layout.down), at(layout.main))
}

/// The steps of pass `p` of `kind` (its columns named `cols` in errors, `batch` problems):
/// the pass, or, where its blocks are few and its K long, the pass split over K into runs
/// whose f32 sums go to `partials` (rows `ldp` apart) and their reduction (a dependent
/// launch). Only a single problem splits, into as many runs as its partial sums have room
/// for, and only where they are 4-byte aligned (a fresh allocation's always are).
/// `overlap`: the pass is a dependent launch of the step before it (see [`overlapping`]).
fn pass_steps(
    (kind, dtype): (Kind, DType),
    cols: &'static str,
    batch: usize,
    mut p: FusedLinearParams,
    (partials, ldp): (Partials, usize),
    overlap: bool,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    let (m, n) = (p.m as usize, p.n as usize);
    let (_, _, bk) = tile(kind);
    let k_tiles = (p.k1 as usize).div_ceil(bk) + (p.k2 as usize).div_ceil(bk);
    let fit = match batch == 1 && partials.addr % 4 == 0 {
        true => partials.room / m.saturating_mul(ldp).max(1),
        false => 0,
    };
    let splits = k_splits(kind, m, n, k_tiles, partials.split_target, fit);
    let mut pass = launch_for(kind, dtype, m, (cols, n), batch, splits)?;
    pass.overlap_previous = overlap;
    if p.quant.format != 0 {
        pass.kernel = quantized_kernel(pass.kernel);
    }
    if splits == 1 {
        return Ok(vec![(pass, p)]);
    }
    (p.partial, p.ldp, p.k_splits) = (partials.addr, ldp as i64, splits as i32);
    let reduce = launch_for(Kind::SplitReduce, dtype, m, (cols, n), 1, 1)?;
    Ok(vec![(pass, p), (overlapping(reduce), p)])
}

/// The tensor-core kernel that reads a quantized B1: each mma kernel's `_q` instantiation
/// (kernels/delta_linear.cu: the dense ones do not carry the quantized loader's registers);
/// the naive and SIMT kernels read either.
fn quantized_kernel(kernel: KernelId) -> KernelId {
    use KernelId::*;
    match kernel {
        fused_linear_mma_large_f16 => fused_linear_mma_large_q_f16,
        fused_linear_mma_large_bf16 => fused_linear_mma_large_q_bf16,
        fused_linear_mma_small_f16 => fused_linear_mma_small_q_f16,
        fused_linear_mma_small_bf16 => fused_linear_mma_small_q_bf16,
        fused_linear_mma_decode_f16 => fused_linear_mma_decode_q_f16,
        fused_linear_mma_decode_bf16 => fused_linear_mma_decode_q_bf16,
        fused_linear_mma_mid_f16 => fused_linear_mma_mid_q_f16,
        fused_linear_mma_mid_bf16 => fused_linear_mma_mid_q_bf16,
        fused_linear_wgmma_f16 => fused_linear_wgmma_q_f16,
        fused_linear_wgmma_bf16 => fused_linear_wgmma_q_bf16,
        other => other,
    }
}

/// One fused-linear pass with every operand absent: callers fill what they use.
/// `composition` is [`composition_code`]'s encoding.
fn pass(composition: (i32, f32), m: i32, n: i32, out: u64, ldo: usize) -> FusedLinearParams {
    let (compose, scale) = composition;
    FusedLinearParams {
        out,
        ldo: ldo as i64,
        m,
        n,
        k_splits: 1,
        compose,
        scale,
        activation: Activation::Identity as i32,
        ..Default::default()
    }
}

fn addr(b: Option<Buf>) -> u64 {
    b.map_or(0, |b| b.addr)
}

/// Plans `delta_linear`: parallel insertion is [down, main] (the delta is r more K steps
/// of the frozen GEMM), sequential is [frozen, down, up] (the delta needs whole rows of h);
/// a pass with few blocks and a long K is two steps, [split, reduce]: its runs of k-tiles,
/// then the reduction of their partial sums.
pub fn delta_linear(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    plan_delta_linear(op, d, dtype, b, None, None).map_err(|e| e.of("delta_linear"))
}

/// The operands of a training-mode forward: the forward's, and the f32 buffer it saves into.
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearTrainBufs {
    pub forward: DeltaLinearBufs,
    pub saved: Buf,
    pub dropout: Option<LoraDropout>,
}

/// Whether the backward of `op` needs h (a sequential delta reads it, a gate's dλ = Σ dy·(Δ −
/// h) needs it): the training forward then saves it.
pub(crate) fn saves_h(op: &DeltaLinear) -> bool {
    op.insertion == Insertion::Sequential || op.composition == Composition::Gated
}

/// The f32 elements of a training forward's `saved`: z [m, r] at 0, then h [m, n] where
/// [`saves_h`]. Saturates at usize::MAX.
pub(crate) fn saved_len(op: &DeltaLinear, m: usize, n: usize, r: usize) -> usize {
    let h = if saves_h(op) { m.saturating_mul(n) } else { 0 };
    m.saturating_mul(r).saturating_add(h)
}

/// The f32 elements of a training forward's `saved` with a column scale (DoRA): z [m, r] at
/// 0, then the main pass's output before the scale, x·Wᵀ + Δ [m, n] (a column scale is
/// refused where [`saves_h`]). Saturates at usize::MAX.
pub(crate) fn scaled_saved_len(m: usize, n: usize, r: usize) -> usize {
    m.saturating_mul(r).saturating_add(m.saturating_mul(n))
}

/// Plans `delta_linear_train`: `delta_linear` that also saves, in f32, what the backward
/// reads (see [`DeltaLinearDims::saved_len`]). A gated parallel delta then runs as a
/// sequential one does, [frozen, down, up], so that h is stored (in y, rounded to T) and
/// saved before the delta composes with it.
pub fn delta_linear_train(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearTrainBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    plan_delta_linear(op, d, dtype, &b.forward, Some((b.saved, b.dropout)), None)
        .map_err(|e| e.of("delta_linear_train"))
}

/// The operands of a `delta_linear_quant` call: the dense call's, whose `w` is the quantized
/// weight's data buffer (the kernels read W through `w`, never as a dense [n, k]).
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearQuantBufs {
    pub forward: DeltaLinearBufs,
    pub w: QuantWeight<Buf, Buf>,
}

/// The operands of a training-mode `delta_linear_quant`.
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearQuantTrainBufs {
    pub forward: DeltaLinearQuantBufs,
    pub saved: Buf,
    pub dropout: Option<LoraDropout>,
}

/// Plans `delta_linear_quant`: `delta_linear` (the same passes, kernels and splits) with the
/// frozen GEMM's B1 read through the quantized weight (kernels/quant.cuh).
pub fn delta_linear_quant(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearQuantBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    plan_delta_linear(op, d, dtype, &b.forward, None, Some(&b.w))
        .map_err(|e| e.of("delta_linear_quant"))
}

/// Plans `delta_linear_quant_train`: `delta_linear_train` over a quantized W.
pub fn delta_linear_quant_train(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearQuantTrainBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    let train = Some((b.saved, b.dropout));
    plan_delta_linear(op, d, dtype, &b.forward.forward, train, Some(&b.forward.w))
        .map_err(|e| e.of("delta_linear_quant_train"))
}

pub(crate) fn plan_delta_linear(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearBufs,
    train: Option<(Buf, Option<LoraDropout>)>,
    quant: Option<&QuantWeight<Buf, Buf>>,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    let saved = train.map(|t| t.0);
    // Dropout with p = 0 keeps everything: no dropout at all.
    let dropout = train.and_then(|t| t.1);
    if let Some(dr) = dropout {
        crate::dropout::check_p("dropout.p", dr.p)?;
    }
    let dropout = dropout.filter(|dr| dr.p > 0.0);
    let n = positive("dims.n", d.n)?;
    let k = positive("dims.k", d.k)?;
    let r = positive("dims.r", d.r)?;
    let m = dim_i32("dims.m", d.m)?;
    let composition = composition_code(op.composition, d.r)?;
    check_matrix(
        "x",
        b.x,
        MatrixLayout {
            rows: d.m,
            cols: d.k,
            ld: d.ld_x,
        },
    )?;
    let quant = match quant {
        Some(w) => QuantParams::new(w, d.n, d.k)?,
        None => {
            check_exact("w", Some(b.w), &[d.n, d.k])?;
            QuantParams::default()
        }
    };
    check_exact("bias", b.bias, &[d.n])?;
    let k_u = match (op.insertion, b.u) {
        (Insertion::Sequential, Some(_)) => {
            return Err(Error::invalid(
                "u",
                "None for sequential insertion (the delta reads h)",
                "a delta input",
            ))
        }
        (Insertion::Sequential, None) => d.n,
        (Insertion::Parallel, Some(u)) => {
            check_matrix(
                "u",
                u,
                MatrixLayout {
                    rows: d.m,
                    cols: d.k_u,
                    ld: d.ld_u,
                },
            )?;
            d.k_u
        }
        (Insertion::Parallel, None) => d.k,
    };
    let k_u32 = positive("dims.k_u", k_u)?;
    check_exact("w_down", Some(b.w_down), &[d.r, k_u])?;
    check_exact("b_down", b.b_down, &[d.r])?;
    check_exact("w_up", Some(b.w_up), &[d.n, d.r])?;
    check_exact("b_up", b.b_up, &[d.n])?;
    check_gate(b.gate, op.composition, d.m)?;
    if b.col_scale.is_some() && (op.insertion == Insertion::Sequential || b.gate.is_some()) {
        return Err(Error::invalid(
            "col_scale",
            "None unless the delta is parallel and not gated (DoRA's scale multiplies x·Wᵀ + Δ)",
            "a column scale",
        ));
    }
    check_exact("col_scale", b.col_scale, &[d.n])?;
    let ldt = workspace_ld(d.r);
    let layout = workspace_layout(d.m, 1, d.r, d.n, d.split_target);
    check_workspace(b.workspace, &layout)?;
    check_matrix(
        "y",
        b.y,
        MatrixLayout {
            rows: d.m,
            cols: d.n,
            ld: d.ld_y,
        },
    )?;
    if b.col_scale.is_some() {
        check_len(
            "saved",
            saved,
            scaled_saved_len(d.m, d.n, d.r),
            Some("dims.dora_saved_len(): z [m, r], then x·Wᵀ + Δ [m, n], f32"),
        )?;
    } else {
        check_len(
            "saved",
            saved,
            saved_len(op, d.m, d.n, d.r),
            Some(
                "dims.saved_len(op): z [m, r], then h [m, n] for a sequential or gated delta, f32",
            ),
        )?;
    }
    if d.m == 0 {
        return Ok(Vec::new());
    }
    // The saved z, and h (or DoRA's x·Wᵀ + Δ) after it (byte addresses of f32 elements).
    let saved_z = addr(saved);
    let saved_h = saved.map_or(0, |s| s.addr + 4 * (d.m * d.r) as u64);

    let t = b.workspace.addr;
    let (down_partials, main_partials) = partials(b.workspace, &layout, dtype);
    let gate = addr(b.gate);
    // The delta's input: u, x, or (sequential) h in y.
    let (u_addr, ld_u) = match (op.insertion, b.u) {
        (Insertion::Sequential, _) => (b.y.addr, d.ld_y),
        (Insertion::Parallel, Some(u)) => (u.addr, d.ld_u),
        (Insertion::Parallel, None) => (b.x.addr, d.ld_x),
    };
    let down = {
        let mut p = pass(composition, m, r, t, ldt);
        (p.a1, p.lda1, p.b1, p.ldb1, p.k1) =
            (u_addr, ld_u as i64, b.w_down.addr, k_u as i64, k_u32);
        (p.bias, p.gate, p.activation) = (addr(b.b_down), gate, op.activation as i32);
        (p.c_main, p.c_out) = (COEF_ONE, COEF_D);
        (p.save, p.ld_save) = (saved_z, d.r as i64);
        let mut kind = kind_for(
            d.kernel,
            dtype,
            (d.m, d.r),
            &[(u_addr, ld_u, 0), (b.w_down.addr, k_u, 0)],
        )?;
        if let Some(dr) = dropout {
            // Only the naive and SIMT kernels drop while loading u (the tensor-core kernels
            // copy u to shared memory asynchronously); the down pass is r/n of the layer's
            // work, and the frozen GEMM keeps its kernel.
            (p.dropout, p.drop_seed, p.drop_p) = (1, dr.seed, dr.p);
            if kind != Kind::Naive {
                kind = Kind::Simt;
            }
        }
        pass_steps((kind, dtype), "dims.r", 1, p, (down_partials, ldt), false)?
    };
    // Phase 1 as the frozen GEMM x·Wᵀ + b, and the operands it reads with vector copies (a
    // quantized W's loader picks its own: kernels/delta_linear.cu mma_load_tile_quant).
    let dense_operands = [(b.x.addr, d.ld_x, 0), (b.w.addr, d.k, 0)];
    let frozen_operands = match quant.format {
        0 => &dense_operands[..],
        _ => &dense_operands[..1],
    };
    let set_frozen = |p: &mut FusedLinearParams| {
        (p.a1, p.lda1, p.ldb1, p.k1) = (b.x.addr, d.ld_x as i64, d.k as i64, k);
        if quant.format == 0 {
            p.b1 = b.w.addr;
        }
        p.quant = quant;
        p.bias = addr(b.bias);
    };
    // The up-projection of t, with the frozen part (x·Wᵀ) when `frozen`, or h from y.
    let up = |frozen: bool| -> Result<Vec<(Launch, FusedLinearParams)>> {
        let mut p = pass(composition, m, n, b.y.addr, d.ld_y);
        let phase1: &[VecOperand] = if frozen {
            set_frozen(&mut p);
            frozen_operands
        } else {
            (p.h_in, p.ldh) = (b.y.addr, d.ld_y as i64);
            &[]
        };
        (p.a2, p.lda2, p.b2, p.ldb2, p.k2) = (t, ldt as i64, b.w_up.addr, d.r as i64, r);
        (p.bias2, p.gate) = (addr(b.b_up), gate);
        (p.c_main, p.c_bias2, p.c_out) = (COEF_H, COEF_D, COEF_ONE);
        if let Some(g) = b.col_scale {
            // Only a parallel delta has one (checked): this pass is its frozen GEMM too.
            p.col_scale = g.addr;
            (p.save, p.ld_save) = (saved_h, d.n as i64);
        }
        let kind = kind_for(d.kernel, dtype, (d.m, d.n), phase1)?;
        pass_steps((kind, dtype), "dims.n", 1, p, (main_partials, d.n), true)
    };
    if op.insertion == Insertion::Parallel && (saved.is_none() || !saves_h(op)) {
        Ok([down, up(true)?].concat())
    } else {
        // The frozen pass's partial sums share the main region with the up pass's: the
        // down pass between them is a plain launch, so they never run at once.
        let mut p = pass(composition, m, n, b.y.addr, d.ld_y);
        set_frozen(&mut p);
        (p.c_main, p.c_out) = (COEF_ONE, COEF_ONE);
        if saved.is_some() {
            (p.save, p.ld_save, p.save_stored) = (saved_h, d.n as i64, 1);
        }
        let kind = kind_for(d.kernel, dtype, (d.m, d.n), frozen_operands)?;
        let frozen = pass_steps((kind, dtype), "dims.n", 1, p, (main_partials, d.n), false)?;
        Ok([frozen, down, up(false)?].concat())
    }
}

/// Plans `delta_apply`: a delta on a given h, one bottleneck per head slice (heads = 1: a
/// plain delta; heads = H: the multi-head parallel adapter). [down, up]; a single head's
/// passes split their K as delta_linear's do.
pub fn delta_apply(
    op: &DeltaLinear,
    d: &DeltaApplyDims,
    dtype: DType,
    b: &DeltaApplyBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    plan_delta_apply(op, d, dtype, b, None).map_err(|e| e.of("delta_apply"))
}

/// The operands of a training-mode delta apply: the forward's, and the f32 buffer of
/// [`DeltaApplyDims::saved_len`] elements it saves z into.
#[derive(Clone, Copy, Debug)]
pub struct DeltaApplyTrainBufs {
    pub forward: DeltaApplyBufs,
    pub saved: Buf,
}

/// Plans `delta_apply_train`: `delta_apply` that also saves z [m, heads·r] (f32) for the
/// backward. A sequential or gated delta's backward reads h, so h must be given (not read
/// from y in place, which the call overwrites).
pub fn delta_apply_train(
    op: &DeltaLinear,
    d: &DeltaApplyDims,
    dtype: DType,
    b: &DeltaApplyTrainBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    plan_delta_apply(op, d, dtype, &b.forward, Some(b.saved)).map_err(|e| e.of("delta_apply_train"))
}

fn plan_delta_apply(
    op: &DeltaLinear,
    d: &DeltaApplyDims,
    dtype: DType,
    b: &DeltaApplyBufs,
    saved: Option<Buf>,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    if saved.is_some() && saves_h(op) && b.h.is_none() {
        return Err(Error::invalid(
            "h",
            "the frozen output h (a sequential or gated delta's backward reads it; y is \
             overwritten)",
            "None",
        ));
    }
    check_len(
        "saved",
        saved,
        d.m.saturating_mul(d.heads).saturating_mul(d.r),
        Some("dims.saved_len(): z [m, heads·r], f32"),
    )?;
    positive("dims.heads", d.heads)?;
    let dh = positive("dims.head_dim", d.head_dim)?;
    let r = positive("dims.r", d.r)?;
    let m = dim_i32("dims.m", d.m)?;
    let composition = composition_code(op.composition, d.r)?;
    let width = d.heads * d.head_dim;
    dim_i32("dims.heads × dims.head_dim", width)?;
    if let Some(h) = b.h {
        check_matrix(
            "h",
            h,
            MatrixLayout {
                rows: d.m,
                cols: width,
                ld: d.ld_h,
            },
        )?;
    }
    // The delta's input per head: du columns of u (parallel) or of h (sequential).
    let (u_addr, ld_u, du, du32) = match (op.insertion, b.u) {
        (Insertion::Sequential, Some(_)) => {
            return Err(Error::invalid(
                "u",
                "None for sequential insertion (the delta reads h)",
                "a delta input",
            ))
        }
        (Insertion::Sequential, None) => match b.h {
            Some(h) => (h.addr, d.ld_h, d.head_dim, dh),
            None => (b.y.addr, d.ld_y, d.head_dim, dh),
        },
        (Insertion::Parallel, None) => {
            return Err(Error::invalid(
                "u",
                "the delta input for parallel insertion",
                "None",
            ))
        }
        (Insertion::Parallel, Some(u)) => {
            let du32 = positive("dims.u_head_dim", d.u_head_dim)?;
            let cols = d.heads * d.u_head_dim;
            check_matrix(
                "u",
                u,
                MatrixLayout {
                    rows: d.m,
                    cols,
                    ld: d.ld_u,
                },
            )?;
            (u.addr, d.ld_u, d.u_head_dim, du32)
        }
    };
    check_exact("w_down", Some(b.w_down), &[d.heads, d.r, du])?;
    check_exact("b_down", b.b_down, &[d.heads, d.r])?;
    check_exact("w_up", Some(b.w_up), &[d.heads, d.head_dim, d.r])?;
    check_exact("b_up", b.b_up, &[d.heads, d.head_dim])?;
    check_gate(b.gate, op.composition, d.m)?;
    let ldt = d.heads * workspace_ld(d.r);
    // m·heads·r can pass usize::MAX (heads is bounded only by the grid, checked later).
    let layout = workspace_layout(d.m, d.heads, d.r, d.head_dim, d.split_target);
    check_workspace(b.workspace, &layout)?;
    check_matrix(
        "y",
        b.y,
        MatrixLayout {
            rows: d.m,
            cols: width,
            ld: d.ld_y,
        },
    )?;
    if d.m == 0 {
        return Ok(Vec::new());
    }
    let t = b.workspace.addr;
    let (down_partials, up_partials) = partials(b.workspace, &layout, dtype);
    let gate = addr(b.gate);
    let rs = workspace_ld(d.r);

    let mut down = pass(composition, m, r, t, ldt);
    (down.a1, down.lda1, down.bs_a1) = (u_addr, ld_u as i64, du as i64);
    (down.b1, down.ldb1, down.bs_b1) = (b.w_down.addr, du as i64, (d.r * du) as i64);
    (down.bias, down.bs_bias) = (addr(b.b_down), d.r as i64);
    (down.k1, down.bs_out) = (du32, rs as i64);
    (down.gate, down.activation) = (gate, op.activation as i32);
    (down.save, down.ld_save, down.bs_save) = (addr(saved), (d.heads * d.r) as i64, d.r as i64);
    (down.c_main, down.c_out) = (COEF_ONE, COEF_D);
    let kind = kind_for(
        d.kernel,
        dtype,
        (d.m, d.r),
        &[(u_addr, ld_u, du), (b.w_down.addr, du, d.r * du)],
    )?;
    let batch = d.heads;
    let down = pass_steps(
        (kind, dtype),
        "dims.r",
        batch,
        down,
        (down_partials, ldt),
        false,
    )?;

    let (h_addr, ld_h) = b.h.map_or((b.y.addr, d.ld_y), |h| (h.addr, d.ld_h));
    let mut up = pass(composition, m, dh, b.y.addr, d.ld_y);
    (up.h_in, up.ldh, up.bs_h) = (h_addr, ld_h as i64, d.head_dim as i64);
    (up.a2, up.lda2, up.bs_a2) = (t, ldt as i64, rs as i64);
    (up.b2, up.ldb2, up.bs_b2) = (b.w_up.addr, d.r as i64, (d.head_dim * d.r) as i64);
    (up.bias2, up.bs_bias2) = (addr(b.b_up), d.head_dim as i64);
    (up.k2, up.bs_out, up.gate) = (r, d.head_dim as i64, gate);
    (up.c_main, up.c_bias2, up.c_out) = (COEF_H, COEF_D, COEF_ONE);
    // No phase 1: the pass reads h per element and runs the r steps of the up-projection.
    let kind = kind_for(d.kernel, dtype, (d.m, d.head_dim), &[])?;
    let partials = (up_partials, d.head_dim);
    let up = pass_steps((kind, dtype), "dims.head_dim", batch, up, partials, true)?;
    Ok([down, up].concat())
}

/// Plans `lora_merge`: W ← W + scale·B·A (scale = ±s, `Composition::scale`) for W [N, K],
/// A = W_down [r, K], B = W_up [N, r].
pub fn lora_merge(
    dtype: DType,
    d: &LoraMergeDims,
    scale: f32,
    b: &LoraMergeBufs,
) -> Result<(Launch, LoraMergeParams)> {
    plan_lora_merge(dtype, d, scale, b).map_err(|e| e.of("lora_merge"))
}

fn plan_lora_merge(
    dtype: DType,
    d: &LoraMergeDims,
    scale: f32,
    b: &LoraMergeBufs,
) -> Result<(Launch, LoraMergeParams)> {
    let (n, k, r) = (d.n, d.k, d.r);
    let n32 = positive("dims.n", n)?;
    let k32 = positive("dims.k", k)?;
    let r32 = positive("dims.r", r)?;
    if !scale.is_finite() {
        return Err(Error::invalid("scale", "a finite scale", scale));
    }
    check_exact("w", Some(b.w), &[n, k])?;
    check_exact("w_down", Some(b.w_down), &[r, k])?;
    check_exact("w_up", Some(b.w_up), &[n, r])?;
    let kernel = match dtype {
        DType::F32 => KernelId::lora_merge_f32,
        DType::F16 => KernelId::lora_merge_f16,
        DType::BF16 => KernelId::lora_merge_bf16,
    };
    let launch = Launch {
        kernel,
        grid: grid_for([("dims.k", k, 64), ("dims.n", n, 64), ("batch", 1, 1)])?,
        block: [256, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let p = LoraMergeParams {
        w: b.w.addr,
        w_down: b.w_down.addr,
        w_up: b.w_up.addr,
        ldw: k as i64,
        ld_down: k as i64,
        ld_up: r as i64,
        n: n32,
        k: k32,
        r: r32,
        scale,
    };
    Ok((launch, p))
}

/// The frozen GEMM of a delta-linear call alone, planned as `delta_linear` plans it (kernel
/// by `d.kernel`, dtype and alignment; split-K into the main partial sums of the workspace
/// laid out for `d`): y = x·Wᵀ + b, plus y itself read in place when `add_y` (each element
/// read and written by one thread). A dependent launch of the step before it: it streams W
/// first and waits before it reads or writes y. For multi-adapter batches
/// ([`super::multi_adapter`]) whose kernel has no fused pass ([`multi_pass`]): their deltas
/// are written to y before it.
pub(crate) fn frozen_pass(
    d: &DeltaLinearDims,
    dtype: DType,
    operands: (Buf, Buf, Option<Buf>),
    y: Buf,
    workspace: Buf,
    add_y: bool,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    let (mut p, kind, partials) = frozen_params(d, dtype, operands, y, workspace)?;
    if add_y {
        (p.h_in, p.ldh) = (y.addr, d.ld_y as i64);
    }
    pass_steps((kind, dtype), "dims.n", 1, p, (partials, d.n), true)
}

/// A multi-adapter batch's fused pass ([`super::multi_adapter`]): [`frozen_pass`]'s frozen
/// GEMM (same kernel choice, tile and split-K) on the `_multi` instantiation of its
/// tensor-core kernel, whose phase 2 adds each row's own delta t·W_up,aᵀ + s_a·b_up,a from
/// t [m, ldt] (the shrink's output, `t`) and the batch `multi`: y is written once. `None`
/// where the frozen GEMM does not run on the mma kernels (f32, unaligned operands, the
/// Naive, Simt and Wgmma variants), which have no such instantiation.
pub(crate) fn multi_pass(
    d: &DeltaLinearDims,
    dtype: DType,
    operands: (Buf, Buf, Option<Buf>),
    y: Buf,
    workspace: Buf,
    (t, ldt): (u64, usize),
    multi: super::multi_adapter::MultiBatch,
) -> Result<Option<Vec<(Launch, FusedLinearParams)>>> {
    use KernelId::*;
    let (mut p, kind, partials) = frozen_params(d, dtype, operands, y, workspace)?;
    // k2 stays 0: each block's K2 is its row tile's (the kernel computes it); the split
    // planning counts phase 1's k-tiles.
    (p.a2, p.lda2, p.multi) = (t, ldt as i64, multi);
    let mut steps = pass_steps((kind, dtype), "dims.n", 1, p, (partials, d.n), true)?;
    let pass = &mut steps[0].0;
    pass.kernel = match pass.kernel {
        fused_linear_mma_large_f16 => fused_linear_mma_large_multi_f16,
        fused_linear_mma_large_bf16 => fused_linear_mma_large_multi_bf16,
        fused_linear_mma_small_f16 => fused_linear_mma_small_multi_f16,
        fused_linear_mma_small_bf16 => fused_linear_mma_small_multi_bf16,
        fused_linear_mma_mid_f16 => fused_linear_mma_mid_multi_f16,
        fused_linear_mma_mid_bf16 => fused_linear_mma_mid_multi_bf16,
        fused_linear_mma_decode_f16 => fused_linear_mma_decode_multi_f16,
        fused_linear_mma_decode_bf16 => fused_linear_mma_decode_multi_bf16,
        _ => return Ok(None),
    };
    // The row tile's adapters (`MultiTile<BM>`, kernels/multi_adapter.cuh: 18·BM + 8 bytes)
    // live in dynamic shared memory past the pipeline's.
    let bm: u32 = match pass.kernel {
        fused_linear_mma_large_multi_f16 | fused_linear_mma_large_multi_bf16 => 128,
        fused_linear_mma_mid_multi_f16 | fused_linear_mma_mid_multi_bf16 => 64,
        _ => 16,
    };
    pass.dynamic_smem += (18 * bm + 8).next_multiple_of(16);
    Ok(Some(steps))
}

/// The parameters, kernel kind and partial-sum room of the frozen GEMM y = x·Wᵀ + b alone.
fn frozen_params(
    d: &DeltaLinearDims,
    dtype: DType,
    (x, w, bias): (Buf, Buf, Option<Buf>),
    y: Buf,
    workspace: Buf,
) -> Result<(FusedLinearParams, Kind, Partials)> {
    let n = positive("dims.n", d.n)?;
    let k = positive("dims.k", d.k)?;
    let m = dim_i32("dims.m", d.m)?;
    let layout = workspace_layout(d.m, 1, d.r, d.n, d.split_target);
    let (_, main_partials) = partials(workspace, &layout, dtype);
    let mut p = pass((0, 1.0), m, n, y.addr, d.ld_y);
    (p.a1, p.lda1, p.b1, p.ldb1, p.k1) = (x.addr, d.ld_x as i64, w.addr, d.k as i64, k);
    p.bias = addr(bias);
    (p.c_main, p.c_out) = (COEF_ONE, COEF_ONE);
    let kind = kind_for(
        d.kernel,
        dtype,
        (d.m, d.n),
        &[(x.addr, d.ld_x, 0), (w.addr, d.k, 0)],
    )?;
    Ok((p, kind, main_partials))
}
