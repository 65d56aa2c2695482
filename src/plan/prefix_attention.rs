//! Planning of prefix attention (kernels/prefix_attention.cu): validation of every
//! argument, the kernel for the dtype and head dim, the grid and shared memory.

use super::{check_len, grid_for, Buf, KernelParams, Launch};
use crate::error::{Error, Result};
use crate::kernels::KernelId;
use crate::prefix_attention::{
    HeadLayout, KvConcatDims, LseMergeDims, PrefixAttention, PrefixAttentionDims, HEAD_DIMS,
};
use crate::spec::DType;

/// Twin of `HeadStrides` in kernels/prefix_attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadStrides {
    pub batch: i64,
    pub head: i64,
    pub seq: i64,
}

impl From<HeadLayout> for HeadStrides {
    fn from(l: HeadLayout) -> Self {
        // `check_tensor` bounds the stride of every dimension longer than 1 by a buffer
        // length; the others are only ever multiplied by 0.
        HeadStrides {
            batch: l.batch as i64,
            head: l.head as i64,
            seq: l.seq as i64,
        }
    }
}

/// Twin of `PrefixAttentionParams` in kernels/prefix_attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefixAttentionParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub prefix_k: u64,
    pub prefix_v: u64,
    pub context_lens: u64,
    pub out: u64,
    pub lse: u64,
    pub lambda: u64,
    pub partial: u64,
    pub rows: i64,
    pub sq: HeadStrides,
    pub sk: HeadStrides,
    pub sv: HeadStrides,
    pub spk: HeadStrides,
    pub spv: HeadStrides,
    pub so: HeadStrides,
    pub heads: i32,
    pub group: i32,
    pub q_len: i32,
    pub kv_len: i32,
    pub prefix_len: i32,
    pub causal: i32,
    pub kv_splits: i32,
    pub head_dim: i32,
    pub pack: i32,
    pub scale_log2: f32,
}
// SAFETY: #[repr(C)], field for field the C++ struct (checked by a size test).
unsafe impl KernelParams for PrefixAttentionParams {}

/// Twin of `LseMergeParams` in kernels/prefix_attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LseMergeParams {
    pub o_prefix: u64,
    pub lse_prefix: u64,
    pub o_context: u64,
    pub lse_context: u64,
    pub out: u64,
    pub lse: u64,
    pub lambda: u64,
    pub sp: HeadStrides,
    pub sc: HeadStrides,
    pub so: HeadStrides,
    pub rows: i64,
    pub heads: i32,
    pub len: i32,
    pub dim: i32,
}
// SAFETY: as above.
unsafe impl KernelParams for LseMergeParams {}

/// Twin of `KvConcatParams` in kernels/prefix_attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvConcatParams {
    pub prefix: u64,
    pub src: u64,
    pub dst: u64,
    pub sp: HeadStrides,
    pub ss: HeadStrides,
    pub sd: HeadStrides,
    pub rows: i64,
    pub heads: i32,
    pub prefix_len: i32,
    pub len: i32,
    pub dim: i32,
}
// SAFETY: as above.
unsafe impl KernelParams for KvConcatParams {}

/// The operands of `prefix_attention`, as addresses.
#[derive(Clone, Copy, Debug)]
pub struct PrefixAttentionBufs {
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    pub prefix_k: Buf,
    pub prefix_v: Buf,
    pub context_lens: Option<Buf>,
    pub out: Buf,
    pub lse: Option<Buf>,
    pub lambda: Option<Buf>,
    /// f32 scratch for split-KV decoding ([`kv_splits`]); `None`: never split.
    pub workspace: Option<Buf>,
}

/// The operands of `prefix_only_attention`.
#[derive(Clone, Copy, Debug)]
pub struct PrefixOnlyBufs {
    pub q: Buf,
    pub prefix_k: Buf,
    pub prefix_v: Buf,
    pub out: Buf,
    pub lse: Buf,
}

/// The operands of `lse_merge`.
#[derive(Clone, Copy, Debug)]
pub struct LseMergeBufs {
    pub o_prefix: Buf,
    pub lse_prefix: Buf,
    pub o_context: Buf,
    pub lse_context: Buf,
    pub out: Buf,
    pub lse: Option<Buf>,
    pub lambda: Option<Buf>,
}

/// The operands of `kv_concat`.
#[derive(Clone, Copy, Debug)]
pub struct KvConcatBufs {
    pub prefix: Buf,
    pub src: Buf,
    pub dst: Buf,
}

/// Threads of every kernel of the module, and the rows an attention block or a
/// merge / concat block covers (kernels/prefix_attention.cu).
const THREADS: u32 = 128;
const QUERY_ROWS: usize = 64;
const WARP_ROWS: usize = 4;

/// Sequence lengths and row widths the kernels index with 32-bit ints (with room for a
/// tile, or a warp's stride over a row, past the end).
const MAX_LEN: usize = 1 << 30;

/// Split-KV: a grid of fewer blocks than the dims' `split_target` splits its key tiles into
/// runs, at most MAX_KV_SPLITS (the merge gives each a lane), each of at least
/// MIN_TILES_PER_RUN of the kernel's tiles ([`key_tile`]: 256 keys on tensor cores at
/// d ≤ 128, 128 in f32, whose keys cost more each) so that a run outweighs its share of the
/// merge. Guesses until measured.
const MAX_KV_SPLITS: usize = 32;
const MIN_TILES_PER_RUN: usize = 4;

/// The query heads of a GQA group the fused pass puts in one block (1: none), whatever the
/// dtype: the whole group when its Lq queries per head fit the block's 64 rows (decoding,
/// short chunks), so the group's keys and values are read and multiplied once, not once per
/// head. The packed rows must be one stride apart in Q and the output: Lq = 1, or Lq rows per
/// head.
pub fn packed_heads(d: &PrefixAttentionDims) -> usize {
    let group = d.heads / d.kv_heads.max(1);
    let rows_per_head = |l: &HeadLayout| l.head == d.q_len.saturating_mul(l.seq);
    let contiguous = d.q_len == 1 || (rows_per_head(&d.q) && rows_per_head(&d.out));
    let fits = group.saturating_mul(d.q_len) <= QUERY_ROWS;
    if group <= 1 || !fits || !contiguous || d.heads % d.kv_heads.max(1) != 0 {
        return 1;
    }
    group
}

/// Keys per tile of the attention kernel for `dtype` and head dim `d` (`MmaTile`,
/// `SimtTile` in kernels/prefix_attention.cu): the unit a split-KV run is cut in.
fn key_tile(dtype: DType, d: usize) -> usize {
    match dtype {
        DType::F32 => 32,
        DType::F16 | DType::BF16 if d <= 128 => 64,
        DType::F16 | DType::BF16 => 32,
    }
}

/// The runs of key tiles the fused pass splits into for these dims (1: none): flash-decoding
/// for a grid too small to fill the GPU (decode: q_len = 1, few sequences and heads) over
/// long keys. The same decision for every dtype, over the dtype's kernel's tiles; each run
/// leaves an unnormalised state in the workspace and `prefix_attention_split_merge` combines
/// them.
pub fn kv_splits(d: &PrefixAttentionDims, dtype: DType) -> usize {
    runs(d, dtype, packed_heads(d), usize::MAX)
}

/// [`kv_splits`] for a grid whose blocks take `pack` query heads each, in at most `fit` runs
/// (what the caller's workspace has room for).
fn runs(d: &PrefixAttentionDims, dtype: DType, pack: usize, fit: usize) -> usize {
    let keys = key_tile(dtype, d.head_dim);
    let blocks = (d.q_len * pack)
        .div_ceil(QUERY_ROWS)
        .saturating_mul(d.heads / pack)
        .saturating_mul(d.batch);
    if blocks == 0 || blocks >= d.split_target {
        return 1;
    }
    let tiles = d.prefix_len.div_ceil(keys) + d.kv_len.div_ceil(keys);
    // grid.z is batch × run: within its limit whatever the target.
    let grid_z_room = super::MAX_GRID[2] as usize / d.batch.max(1);
    let want = d
        .split_target
        .div_ceil(blocks)
        .min(tiles / MIN_TILES_PER_RUN)
        .min(grid_z_room)
        .min(fit)
        .clamp(1, MAX_KV_SPLITS);
    // Runs of ceil(tiles / want) tiles, as the kernel cuts them, and no empty one at the end.
    tiles.div_ceil(tiles.div_ceil(want).max(1)).max(1)
}

/// f32 elements of the split-KV workspace for these dims: per run, the unnormalised output
/// and 4 row statistics of every query row; 0 when the pass does not split.
pub fn workspace_len(d: &PrefixAttentionDims, dtype: DType) -> usize {
    run_states_len(d, kv_splits(d, dtype))
}

/// f32 elements of `splits` runs' states (0 for one run, which keeps none).
fn run_states_len(d: &PrefixAttentionDims, splits: usize) -> usize {
    match splits {
        1 => 0,
        s => s.saturating_mul(run_state_len(d)),
    }
}

/// f32 elements of one run's states: the output and 4 statistics of every query row.
fn run_state_len(d: &PrefixAttentionDims) -> usize {
    d.rows().saturating_mul(d.head_dim.saturating_add(4))
}

fn positive(arg: &'static str, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(Error::invalid(arg, "at least 1", 0));
    }
    Ok(v)
}

fn at_most(arg: &'static str, v: usize, max: usize, why: &str) -> Result<()> {
    if v > max {
        return Err(Error::invalid(arg, format!("at most {max} ({why})"), v));
    }
    Ok(())
}

/// The highest element offset of a `shape` tensor plus one: the buffer length it needs.
/// `None` when a dimension is 0 (nothing is read or written) or the size overflows.
fn extent(layout: HeadLayout, [b, h, l, d]: [usize; 4]) -> Option<Option<usize>> {
    if b == 0 || h == 0 || l == 0 || d == 0 {
        return Some(None);
    }
    let last = (b - 1)
        .checked_mul(layout.batch)?
        .checked_add((h - 1).checked_mul(layout.head)?)?
        .checked_add((l - 1).checked_mul(layout.seq)?)?
        .checked_add(d)?;
    Some(Some(last))
}

/// Checks that `buf` holds a `shape` tensor with `layout`'s strides.
fn check_tensor(arg: &'static str, buf: Buf, layout: HeadLayout, shape: [usize; 4]) -> Result<()> {
    let need = extent(layout, shape).ok_or_else(|| {
        Error::invalid(
            arg,
            "strides whose extent fits in memory",
            format!("{layout:?}"),
        )
    })?;
    match need {
        Some(need) if buf.len < need => Err(Error::invalid(
            arg,
            format!(
                "at least {need} elements for shape {shape:?} with strides (batch {}, head {}, \
                 seq {}, 1)",
                layout.batch, layout.head, layout.seq
            ),
            format!("{} elements", buf.len),
        )),
        _ => Ok(()),
    }
}

/// Checks that an output's elements are distinct: ordering the dimensions by stride, each
/// stride must step over everything the smaller ones span (otherwise threads would race on
/// one element).
fn check_distinct(arg: &'static str, layout: HeadLayout, [b, h, l, d]: [usize; 4]) -> Result<()> {
    if [b, h, l, d].contains(&0) {
        return Ok(()); // no element (an empty batch: its contiguous strides may be 0)
    }
    let mut dims = [(layout.seq, l), (layout.head, h), (layout.batch, b)];
    dims.sort_unstable();
    let mut span = d;
    for (stride, n) in dims {
        if n <= 1 {
            continue;
        }
        if stride < span {
            return Err(Error::invalid(
                arg,
                "strides that give every element its own address",
                format!(
                    "strides (batch {}, head {}, seq {}, 1) for shape {:?}",
                    layout.batch,
                    layout.head,
                    layout.seq,
                    [b, h, l, d]
                ),
            ));
        }
        span = span.saturating_add(stride.saturating_mul(n - 1));
    }
    Ok(())
}

/// The tensor-core kernels copy 16-byte chunks: every row must start 16-byte aligned.
fn check_aligned(arg: &'static str, buf: Buf, layout: HeadLayout, dtype: DType) -> Result<()> {
    let per = 16 / dtype.size();
    let ok = buf.addr % 16 == 0
        && [layout.batch, layout.head, layout.seq]
            .iter()
            .all(|s| s % per == 0);
    if !ok {
        return Err(Error::invalid(
            arg,
            format!(
                "a 16-byte aligned {dtype} buffer with strides that are multiples of {per} \
                 elements (the tensor-core kernels copy 16-byte chunks; cudarc allocations \
                 are aligned, a view into one must start a multiple of {per} elements in)"
            ),
            format!(
                "address {:#x}, strides (batch {}, head {}, seq {})",
                buf.addr, layout.batch, layout.head, layout.seq
            ),
        ));
    }
    Ok(())
}

fn addr(b: Option<Buf>) -> u64 {
    b.map_or(0, |b| b.addr)
}

/// The attention kernel for `dtype` and head dim `d`, and its dynamic shared memory (the
/// tile configurations of kernels/prefix_attention.cu: `MmaTile`, `SimtTile`).
fn attention_kernel(dtype: DType, d: usize) -> Result<(KernelId, u32)> {
    use KernelId::*;
    let index = HEAD_DIMS
        .iter()
        .position(|&h| h == d)
        .ok_or_else(|| Error::invalid("dims.head_dim", format!("one of {HEAD_DIMS:?}"), d))?;
    let keys = key_tile(dtype, d);
    let (kernels, smem) = match dtype {
        DType::F32 => {
            let floats = (QUERY_ROWS + 2 * keys) * (d + 4) + QUERY_ROWS * (keys + 4);
            (
                [
                    prefix_attention_f32_d32,
                    prefix_attention_f32_d64,
                    prefix_attention_f32_d80,
                    prefix_attention_f32_d96,
                    prefix_attention_f32_d128,
                    prefix_attention_f32_d256,
                ],
                floats * 4,
            )
        }
        DType::F16 | DType::BF16 => {
            let elems = (QUERY_ROWS + 4 * keys) * (d + 8);
            let kernels = if dtype == DType::F16 {
                [
                    prefix_attention_f16_d32,
                    prefix_attention_f16_d64,
                    prefix_attention_f16_d80,
                    prefix_attention_f16_d96,
                    prefix_attention_f16_d128,
                    prefix_attention_f16_d256,
                ]
            } else {
                [
                    prefix_attention_bf16_d32,
                    prefix_attention_bf16_d64,
                    prefix_attention_bf16_d80,
                    prefix_attention_bf16_d96,
                    prefix_attention_bf16_d128,
                    prefix_attention_bf16_d256,
                ]
            };
            (kernels, elems * 2)
        }
    };
    Ok((kernels[index], smem as u32))
}

/// Checks `context_lens` values against Lk where they can be read (the emulator, or a
/// caller's host copy); the kernels clamp them anyway.
pub fn check_context_lens(lens: &[u32], dims: &PrefixAttentionDims) -> Result<()> {
    match lens
        .iter()
        .take(dims.batch)
        .enumerate()
        .find(|(_, &n)| n as usize > dims.kv_len)
    {
        Some((b, &n)) => Err(Error::invalid(
            "context_lens",
            format!("lengths <= kv_len = {}", dims.kv_len),
            format!("{n} for sequence {b}"),
        )
        .of("prefix_attention")),
        None => Ok(()),
    }
}

/// Plans `prefix_attention`: one launch of the fused kernel; with a workspace and a grid of
/// fewer than 128 blocks, the split-KV pass and then `prefix_attention_split_merge`.
pub fn prefix_attention(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    dtype: DType,
    b: &PrefixAttentionBufs,
) -> Result<Vec<(Launch, PrefixAttentionParams)>> {
    plan_prefix_attention(op, dims, dtype, b).map_err(|e| e.of("prefix_attention"))
}

fn plan_prefix_attention(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    dtype: DType,
    b: &PrefixAttentionBufs,
) -> Result<Vec<(Launch, PrefixAttentionParams)>> {
    let d = dims;
    // batch = 0 or q_len = 0 (no query rows) is checked as any call and launches nothing.
    positive("dims.heads", d.heads)?;
    positive("dims.kv_heads", d.kv_heads)?;
    positive("dims.head_dim", d.head_dim)?;
    let grid = grid_for([
        ("dims.q_len", d.q_len, QUERY_ROWS),
        ("dims.heads", d.heads, 1),
        ("dims.batch", d.batch, 1),
    ])?;
    at_most("dims.q_len", d.q_len, MAX_LEN, "32-bit positions")?;
    at_most("dims.kv_len", d.kv_len, MAX_LEN, "32-bit positions")?;
    at_most("dims.prefix_len", d.prefix_len, MAX_LEN, "32-bit positions")?;
    let (kernel, smem) = attention_kernel(dtype, d.head_dim)?;
    if d.value_dim != d.head_dim {
        return Err(Error::invalid(
            "dims.value_dim",
            format!("the head dim d = {} (d_v = d)", d.head_dim),
            d.value_dim,
        ));
    }
    if d.heads % d.kv_heads != 0 {
        return Err(Error::invalid(
            "dims.kv_heads",
            format!("a divisor of heads = {} (grouped-query attention)", d.heads),
            d.kv_heads,
        ));
    }
    let scale = op.scale_for(d.head_dim);
    // The kernels scale scores by scale·log2(e) in f32, which must be a normal positive
    // number too: one that rounds to 0 makes a masked score −∞·0 = NaN, one that overflows
    // makes the scores infinite (and a subnormal one keeps few digits).
    let scale_log2 = (f64::from(scale) * std::f64::consts::LOG2_E) as f32;
    if !(scale_log2.is_normal() && scale_log2 > 0.0) {
        return Err(Error::invalid(
            "op.scale",
            "a scale > 0 whose scale·log2(e) is a normal f32",
            scale,
        ));
    }
    let (hd, hkv) = (d.head_dim, d.kv_heads);
    let tensors = [
        ("q", b.q, d.q, [d.batch, d.heads, d.q_len, hd]),
        ("k", b.k, d.k, [d.batch, hkv, d.kv_len, hd]),
        ("v", b.v, d.v, [d.batch, hkv, d.kv_len, hd]),
        (
            "prefix_k",
            b.prefix_k,
            d.prefix_k,
            [d.batch, hkv, d.prefix_len, hd],
        ),
        (
            "prefix_v",
            b.prefix_v,
            d.prefix_v,
            [d.batch, hkv, d.prefix_len, hd],
        ),
        ("out", b.out, d.out, [d.batch, d.heads, d.q_len, hd]),
    ];
    for (arg, buf, layout, shape) in tensors {
        check_tensor(arg, buf, layout, shape)?;
        // The tensor-core kernels need 16-byte rows, unless the tensor is not read.
        if dtype != DType::F32 && shape[2] > 0 {
            check_aligned(arg, buf, layout, dtype)?;
        }
    }
    check_distinct("out", d.out, [d.batch, d.heads, d.q_len, hd])?;
    check_len(
        "context_lens",
        b.context_lens,
        d.batch,
        Some("one length per sequence"),
    )?;
    check_len("lse", b.lse, d.rows(), Some("[B, Hq, Lq]"))?;
    check_len("lambda", b.lambda, d.rows(), Some("[B, Hq, Lq]"))?;
    if d.rows() == 0 {
        return Ok(Vec::new());
    }
    // Split only with a workspace (callers who pass none keep one launch), into as many
    // runs as it has room for. Packed GQA groups: one block row per group (grid.x is 1: the
    // rows fit one block).
    let pack = packed_heads(d);
    let splits = match b.workspace {
        Some(w) => runs(d, dtype, pack, w.len / run_state_len(d).max(1)),
        None => 1,
    };
    debug_assert!(b
        .workspace
        .is_none_or(|w| w.len >= run_states_len(d, splits)));

    let mut grid = grid;
    // Packed rows fit one block (grid.x is 1 already); the pack is the group, dividing Hq.
    debug_assert!(pack == 1 || (grid[0] == 1 && grid[1] % pack as u32 == 0));
    grid[1] /= pack as u32;
    // grid.z is batch × run, which `runs` keeps within the grid's limit.
    debug_assert!(u64::from(grid[2]) * splits as u64 <= super::MAX_GRID[2]);
    grid[2] *= splits as u32;
    let launch = Launch {
        kernel,
        grid,
        block: [THREADS, 1, 1],
        dynamic_smem: smem,
        overlap_previous: false,
    };
    let params = PrefixAttentionParams {
        q: b.q.addr,
        k: b.k.addr,
        v: b.v.addr,
        prefix_k: b.prefix_k.addr,
        prefix_v: b.prefix_v.addr,
        context_lens: addr(b.context_lens),
        out: b.out.addr,
        lse: addr(b.lse),
        lambda: addr(b.lambda),
        partial: if splits > 1 { addr(b.workspace) } else { 0 },
        rows: d.rows() as i64,
        sq: d.q.into(),
        sk: d.k.into(),
        sv: d.v.into(),
        spk: d.prefix_k.into(),
        spv: d.prefix_v.into(),
        so: d.out.into(),
        heads: d.heads as i32,
        group: (d.heads / d.kv_heads) as i32,
        q_len: d.q_len as i32,
        kv_len: d.kv_len as i32,
        prefix_len: d.prefix_len as i32,
        causal: i32::from(op.causal),
        kv_splits: splits as i32,
        head_dim: d.head_dim as i32,
        pack: pack as i32,
        scale_log2,
    };
    if splits == 1 {
        return Ok(vec![(launch, params)]);
    }
    let merge = match dtype {
        DType::F32 => KernelId::prefix_attention_split_merge_f32,
        DType::F16 => KernelId::prefix_attention_split_merge_f16,
        DType::BF16 => KernelId::prefix_attention_split_merge_bf16,
    };
    Ok(vec![
        (launch, params),
        (row_launch(merge, d.rows())?, params),
    ])
}

/// Plans `prefix_only_attention`: the fused kernel with no context.
pub fn prefix_only_attention(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    dtype: DType,
    b: &PrefixOnlyBufs,
) -> Result<Vec<(Launch, PrefixAttentionParams)>> {
    plan_prefix_only_attention(op, dims, dtype, b).map_err(|e| e.of("prefix_only_attention"))
}

fn plan_prefix_only_attention(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    dtype: DType,
    b: &PrefixOnlyBufs,
) -> Result<Vec<(Launch, PrefixAttentionParams)>> {
    let none = Buf { addr: 0, len: 0 };
    let dims = PrefixAttentionDims { kv_len: 0, ..*dims };
    let bufs = PrefixAttentionBufs {
        q: b.q,
        k: none,
        v: none,
        prefix_k: b.prefix_k,
        prefix_v: b.prefix_v,
        context_lens: None,
        out: b.out,
        lse: Some(b.lse),
        lambda: None,
        workspace: None,
    };
    let op = PrefixAttention {
        causal: false,
        ..*op
    };
    // The private planner, whose errors the caller attributes to prefix_only_attention.
    plan_prefix_attention(&op, &dims, dtype, &bufs)
}

fn merge_kernel(dtype: DType) -> KernelId {
    match dtype {
        DType::F32 => KernelId::lse_merge_f32,
        DType::F16 => KernelId::lse_merge_f16,
        DType::BF16 => KernelId::lse_merge_bf16,
    }
}

fn concat_kernel(dtype: DType) -> KernelId {
    match dtype {
        DType::F32 => KernelId::kv_concat_f32,
        DType::F16 => KernelId::kv_concat_f16,
        DType::BF16 => KernelId::kv_concat_bf16,
    }
}

/// The argument the row count of a one-warp-per-row kernel is named by in errors: the product,
/// not one of its factors.
const ROWS_ARG: &str = "dims.batch × dims.heads × rows per head";

/// B·H·L, or an error when it overflows.
fn row_count(batch: usize, heads: usize, len: usize) -> Result<usize> {
    batch
        .checked_mul(heads)
        .and_then(|n| n.checked_mul(len))
        .ok_or_else(|| Error::invalid(ROWS_ARG, "a product that fits in memory", "more"))
}

/// One warp per row, four rows per block.
fn row_launch(kernel: KernelId, rows: usize) -> Result<Launch> {
    Ok(Launch {
        kernel,
        grid: grid_for([(ROWS_ARG, rows, WARP_ROWS), ("", 1, 1), ("", 1, 1)])?,
        block: [THREADS, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    })
}

/// Plans `lse_merge`.
pub fn lse_merge(
    dims: &LseMergeDims,
    dtype: DType,
    b: &LseMergeBufs,
) -> Result<Vec<(Launch, LseMergeParams)>> {
    plan_lse_merge(dims, dtype, b).map_err(|e| e.of("lse_merge"))
}

fn plan_lse_merge(
    dims: &LseMergeDims,
    dtype: DType,
    b: &LseMergeBufs,
) -> Result<Vec<(Launch, LseMergeParams)>> {
    let d = dims;
    // batch = 0 or q_len = 0 (no rows) is checked as any call and launches nothing.
    positive("dims.heads", d.heads)?;
    positive("dims.head_dim", d.head_dim)?;
    at_most("dims.heads", d.heads, i32::MAX as usize, "32-bit indices")?;
    at_most("dims.q_len", d.q_len, i32::MAX as usize, "32-bit indices")?;
    at_most("dims.head_dim", d.head_dim, MAX_LEN, "32-bit indices")?;
    let shape = [d.batch, d.heads, d.q_len, d.head_dim];
    let rows = row_count(d.batch, d.heads, d.q_len)?;
    check_tensor("o_prefix", b.o_prefix, d.o_prefix, shape)?;
    check_tensor("o_context", b.o_context, d.o_context, shape)?;
    check_tensor("out", b.out, d.out, shape)?;
    check_distinct("out", d.out, shape)?;
    check_len("lse_prefix", Some(b.lse_prefix), rows, Some("[B, H, L]"))?;
    check_len("lse_context", Some(b.lse_context), rows, Some("[B, H, L]"))?;
    check_len("lse", b.lse, rows, Some("[B, H, L]"))?;
    check_len("lambda", b.lambda, rows, Some("[B, H, L]"))?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let params = LseMergeParams {
        o_prefix: b.o_prefix.addr,
        lse_prefix: b.lse_prefix.addr,
        o_context: b.o_context.addr,
        lse_context: b.lse_context.addr,
        out: b.out.addr,
        lse: addr(b.lse),
        lambda: addr(b.lambda),
        sp: d.o_prefix.into(),
        sc: d.o_context.into(),
        so: d.out.into(),
        rows: rows as i64,
        heads: d.heads as i32,
        len: d.q_len as i32,
        dim: d.head_dim as i32,
    };
    Ok(vec![(row_launch(merge_kernel(dtype), rows)?, params)])
}

/// Plans `kv_concat`.
pub fn kv_concat(
    dims: &KvConcatDims,
    dtype: DType,
    b: &KvConcatBufs,
) -> Result<Vec<(Launch, KvConcatParams)>> {
    plan_kv_concat(dims, dtype, b).map_err(|e| e.of("kv_concat"))
}

fn plan_kv_concat(
    dims: &KvConcatDims,
    dtype: DType,
    b: &KvConcatBufs,
) -> Result<Vec<(Launch, KvConcatParams)>> {
    let d = dims;
    // batch = 0 or no positions at all (prefix_len + len = 0) is checked as any call and
    // launches nothing.
    positive("dims.heads", d.heads)?;
    positive("dims.head_dim", d.head_dim)?;
    let total = d.prefix_len.saturating_add(d.len);
    at_most("dims.heads", d.heads, i32::MAX as usize, "32-bit indices")?;
    at_most("dims.head_dim", d.head_dim, MAX_LEN, "32-bit indices")?;
    at_most(
        "dims.prefix_len + dims.len",
        total,
        MAX_LEN,
        "32-bit positions",
    )?;
    let rows = row_count(d.batch, d.heads, total)?;
    check_tensor(
        "prefix",
        b.prefix,
        d.prefix,
        [d.batch, d.heads, d.prefix_len, d.head_dim],
    )?;
    check_tensor("src", b.src, d.src, [d.batch, d.heads, d.len, d.head_dim])?;
    let dst_shape = [d.batch, d.heads, total, d.head_dim];
    check_tensor("dst", b.dst, d.dst, dst_shape)?;
    check_distinct("dst", d.dst, dst_shape)?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let params = KvConcatParams {
        prefix: b.prefix.addr,
        src: b.src.addr,
        dst: b.dst.addr,
        sp: d.prefix.into(),
        ss: d.src.into(),
        sd: d.dst.into(),
        rows: rows as i64,
        heads: d.heads as i32,
        prefix_len: d.prefix_len as i32,
        len: d.len as i32,
        dim: d.head_dim as i32,
    };
    Ok(vec![(row_launch(concat_kernel(dtype), rows)?, params)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_outputs() {
        let shape = [2, 3, 5, 8];
        assert!(check_distinct("out", HeadLayout::bhsd(3, 5, 8), shape).is_ok());
        assert!(check_distinct("out", HeadLayout::bshd(5, 3, 8), shape).is_ok());
        // Padded rows are fine; a row stride below d or heads on top of each other are not.
        let padded = HeadLayout {
            batch: 1000,
            head: 8,
            seq: 40,
        };
        assert!(check_distinct("out", padded, shape).is_ok());
        let short = HeadLayout {
            seq: 4,
            ..HeadLayout::bhsd(3, 5, 8)
        };
        assert!(check_distinct("out", short, shape).is_err());
        let shared = HeadLayout {
            head: 0,
            ..HeadLayout::bhsd(3, 5, 8)
        };
        assert!(check_distinct("out", shared, shape).is_err());
        // A dimension of one element may have any stride.
        assert!(check_distinct("out", shared, [2, 1, 5, 8]).is_ok());
    }

    /// The merge and the concatenation step over a row by 32 columns in an int: a width
    /// within 32 of i32::MAX would wrap past the end; and they run one warp per row, so a
    /// row count past the grid is refused naming the product, not the batch (the planner
    /// alone: nothing runs).
    #[test]
    fn rows_too_wide_or_too_many() {
        let all = Buf {
            addr: 4096,
            len: usize::MAX,
        };
        let d = i32::MAX as usize - 1;
        let merge = LseMergeBufs {
            o_prefix: all,
            lse_prefix: all,
            o_context: all,
            lse_context: all,
            out: all,
            lse: None,
            lambda: None,
        };
        fn refused<P>(r: Result<P>) -> &'static str {
            match r {
                Err(Error::InvalidArgument { arg, .. }) => arg,
                Ok(_) => "nothing",
                Err(_) => "another error",
            }
        }
        let ok = LseMergeDims::new(1, 1, 1, 1 << 30);
        assert!(lse_merge(&ok, DType::F32, &merge).is_ok());
        let wide = LseMergeDims::new(1, 1, 1, d);
        assert_eq!(
            refused(lse_merge(&wide, DType::F32, &merge)),
            "dims.head_dim"
        );
        let tall = LseMergeDims::new(1, 32, 1 << 26, 1);
        assert_eq!(
            refused(lse_merge(&tall, DType::F16, &merge)),
            "dims.batch × dims.heads × rows per head"
        );
        let concat = KvConcatBufs {
            prefix: all,
            src: all,
            dst: all,
        };
        let wide = KvConcatDims::new(1, 1, 1, 1, d);
        assert_eq!(
            refused(kv_concat(&wide, DType::F32, &concat)),
            "dims.head_dim"
        );
    }

    #[test]
    fn extent_of_a_tensor() {
        let l = HeadLayout::bhsd(3, 5, 8);
        assert_eq!(extent(l, [2, 3, 5, 8]), Some(Some(2 * 3 * 5 * 8)));
        assert_eq!(extent(l, [2, 3, 0, 8]), Some(None));
        let huge = HeadLayout {
            batch: usize::MAX,
            head: 1,
            seq: 1,
        };
        assert_eq!(extent(huge, [2, 1, 1, 1]), None);
    }
}
