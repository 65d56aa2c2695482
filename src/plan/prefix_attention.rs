//! Planning of prefix attention (kernels/prefix_attention.cu): validation of every
//! argument, the kernel for the dtype and head dim, the grid and shared memory.

use super::{check_len, grid_for, Buf, KernelParams, Launch};
use crate::error::{Error, Result};
use crate::kernels::KernelId;
use crate::prefix_attention::{
    HeadLayout, KvConcatDims, LseMergeBackwardDims, LseMergeDims, MultiPrefixDims, PrefixAttention,
    PrefixAttentionBackwardDims, PrefixAttentionDims, HEAD_DIMS,
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
    pub prefix_ids: u64,
    pub prefix_offsets: u64,
    pub status: u64,
    pub rows: i64,
    pub prefix_rows: i64,
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
    pub prefixes: i32,
    pub scale_log2: f32,
}
// SAFETY: #[repr(C)], field for field the C++ struct (checked by a size test).
unsafe impl KernelParams for PrefixAttentionParams {
    /// A split-KV pass folds its runs of key tiles into grid.z (z = sequence · runs + run,
    /// kernels/prefix_attention.cu).
    fn profile_runs(&self, _: &Launch) -> Option<super::GridRuns> {
        (self.kv_splits > 1).then_some(super::GridRuns {
            dim: 2,
            runs: self.kv_splits as u32,
            inner: true,
        })
    }
}

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

/// The operands of `multi_prefix_attention`: the attention's (its `prefix_k` and `prefix_v`
/// the packed set), the set's offsets table, the per-sequence ids and the status word.
#[derive(Clone, Copy, Debug)]
pub struct MultiPrefixAttentionBufs {
    pub attention: PrefixAttentionBufs,
    /// u32 `[prefixes + 1]`.
    pub prefix_offsets: Buf,
    /// i32 `[B]`.
    pub prefix_ids: Buf,
    /// u32 `[1]`, or `None`.
    pub status: Option<Buf>,
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

/// The checks of an attention's dims that the forward and the backward share: model sizes of
/// at least 1 (batch and q_len may be 0: an empty batch), 32-bit positions, d_v = d, Hkv
/// dividing Hq, and a scale whose f32 scale·log2(e) is normal; returns that scale·log2(e) and
/// the scale in f32.
fn check_attention_dims(op: &PrefixAttention, d: &PrefixAttentionDims) -> Result<(f32, f32)> {
    positive("dims.heads", d.heads)?;
    positive("dims.kv_heads", d.kv_heads)?;
    positive("dims.head_dim", d.head_dim)?;
    at_most("dims.q_len", d.q_len, MAX_LEN, "32-bit positions")?;
    at_most("dims.kv_len", d.kv_len, MAX_LEN, "32-bit positions")?;
    at_most("dims.prefix_len", d.prefix_len, MAX_LEN, "32-bit positions")?;
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
    Ok((scale_log2, scale))
}

/// Checks `context_lens` values against Lk where they can be read (the emulator, or a
/// caller's host copy); the kernels clamp them anyway.
pub fn check_context_lens(lens: &[u32], dims: &PrefixAttentionDims) -> Result<()> {
    context_lens_within(lens, dims).map_err(|e| e.of("prefix_attention"))
}

/// [`check_context_lens`] for `prefix_attention_backward`.
pub fn check_backward_context_lens(lens: &[u32], dims: &PrefixAttentionBackwardDims) -> Result<()> {
    context_lens_within(lens, &dims.forward).map_err(|e| e.of("prefix_attention_backward"))
}

fn context_lens_within(lens: &[u32], dims: &PrefixAttentionDims) -> Result<()> {
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
        )),
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
    plan_prefix_attention(op, dims, dtype, b, None).map_err(|e| e.of("prefix_attention"))
}

/// Plans `multi_prefix_attention`: `prefix_attention`'s launches, each sequence reading its
/// own prefix of the packed set (the same kernels, which look the prefix up on the device).
/// The ids and offsets are checked for length here, for value by [`check_prefix_set`]
/// where the host can read them.
pub fn multi_prefix_attention(
    op: &PrefixAttention,
    dims: &MultiPrefixDims,
    dtype: DType,
    b: &MultiPrefixAttentionBufs,
) -> Result<Vec<(Launch, PrefixAttentionParams)>> {
    plan_prefix_attention(op, &dims.attention, dtype, &b.attention, Some((dims, b)))
        .map_err(|e| e.of("multi_prefix_attention"))
}

/// Checks the values of a prefix set's offsets and of the per-sequence ids where the host
/// can read them (the emulator, or a caller's host copies; on the GPU the kernel reads an
/// id or a range outside the set as no prefix and flags it in `status`): `offsets`
/// non-decreasing and within `dims.set_rows`, each prefix at most `dims.attention.prefix_len`
/// rows, every id −1 or below `dims.prefixes`.
pub fn check_prefix_set(ids: &[i32], offsets: &[u32], dims: &MultiPrefixDims) -> Result<()> {
    prefix_set_within(ids, offsets, dims).map_err(|e| e.of("multi_prefix_attention"))
}

fn prefix_set_within(ids: &[i32], offsets: &[u32], dims: &MultiPrefixDims) -> Result<()> {
    let offsets = &offsets[..dims.prefixes.saturating_add(1).min(offsets.len())];
    for (i, w) in offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::invalid(
                "prefix_offsets",
                "non-decreasing offsets (prefix i is rows offsets[i]..offsets[i + 1])",
                format!("offsets[{i}] = {} > offsets[{}] = {}", w[0], i + 1, w[1]),
            ));
        }
        let len = (w[1] - w[0]) as usize;
        if len > dims.attention.prefix_len {
            return Err(Error::invalid(
                "prefix_offsets",
                format!(
                    "prefixes of at most dims.attention.prefix_len = {} rows",
                    dims.attention.prefix_len
                ),
                format!("{len} rows for prefix {i}"),
            ));
        }
    }
    if let Some(&last) = offsets.last() {
        if last as usize > dims.set_rows {
            return Err(Error::invalid(
                "prefix_offsets",
                format!(
                    "offsets within the set's dims.set_rows = {} rows",
                    dims.set_rows
                ),
                format!("offsets[{}] = {last}", offsets.len() - 1),
            ));
        }
    }
    let bad = ids
        .iter()
        .take(dims.attention.batch)
        .enumerate()
        .find(|(_, &id)| id < -1 || id as i64 >= dims.prefixes as i64);
    match bad {
        Some((b, &id)) => Err(Error::invalid(
            "prefix_ids",
            format!("−1 (no prefix) or an id below prefixes = {}", dims.prefixes),
            format!("{id} for sequence {b}"),
        )),
        None => Ok(()),
    }
}

fn plan_prefix_attention(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    dtype: DType,
    b: &PrefixAttentionBufs,
    set: Option<(&MultiPrefixDims, &MultiPrefixAttentionBufs)>,
) -> Result<Vec<(Launch, PrefixAttentionParams)>> {
    let d = dims;
    let (scale_log2, _) = check_attention_dims(op, d)?;
    // A prefix set: [set_rows, Hkv, d] tensors, read through the offsets (one "sequence" of
    // set_rows rows, its batch stride unused), instead of [B, Hkv, l, d].
    let prefix_shape = match set {
        Some((s, sb)) => {
            at_most("dims.set_rows", s.set_rows, MAX_LEN, "32-bit positions")?;
            at_most(
                "dims.prefixes",
                s.prefixes,
                i32::MAX as usize - 1,
                "32-bit ids",
            )?;
            check_len(
                "prefix_offsets",
                Some(sb.prefix_offsets),
                s.prefixes + 1,
                Some("[prefixes + 1]: prefix i is rows offsets[i]..offsets[i + 1]"),
            )?;
            check_len(
                "prefix_ids",
                Some(sb.prefix_ids),
                d.batch,
                Some("one id per sequence"),
            )?;
            check_len("status", sb.status, 1, Some("one status word"))?;
            [1, d.kv_heads, s.set_rows, d.head_dim]
        }
        None => [d.batch, d.kv_heads, d.prefix_len, d.head_dim],
    };
    let set_layout = |l: HeadLayout| match set {
        Some(_) => l.shared_by_batch(),
        None => l,
    };
    let grid = grid_for([
        ("dims.q_len", d.q_len, QUERY_ROWS),
        ("dims.heads", d.heads, 1),
        ("dims.batch", d.batch, 1),
    ])?;
    let (kernel, smem) = attention_kernel(dtype, d.head_dim)?;
    let (hd, hkv) = (d.head_dim, d.kv_heads);
    let tensors = [
        ("q", b.q, d.q, [d.batch, d.heads, d.q_len, hd]),
        ("k", b.k, d.k, [d.batch, hkv, d.kv_len, hd]),
        ("v", b.v, d.v, [d.batch, hkv, d.kv_len, hd]),
        ("prefix_k", b.prefix_k, set_layout(d.prefix_k), prefix_shape),
        ("prefix_v", b.prefix_v, set_layout(d.prefix_v), prefix_shape),
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
        prefix_ids: set.map_or(0, |(_, sb)| sb.prefix_ids.addr),
        prefix_offsets: set.map_or(0, |(_, sb)| sb.prefix_offsets.addr),
        status: set.map_or(0, |(_, sb)| addr(sb.status)),
        rows: d.rows() as i64,
        prefix_rows: set.map_or(0, |(s, _)| s.set_rows as i64),
        sq: d.q.into(),
        sk: d.k.into(),
        sv: d.v.into(),
        spk: set_layout(d.prefix_k).into(),
        spv: set_layout(d.prefix_v).into(),
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
        prefixes: set.map_or(0, |(s, _)| s.prefixes as i32),
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
    plan_prefix_attention(&op, &dims, dtype, &bufs, None)
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

// ---------------------------------------------------------------------------------------
// The backward (kernels/prefix_attention_backward.cu).

/// Twin of `PrefixAttentionBackwardParams` in kernels/prefix_attention_backward.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefixAttentionBackwardParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub prefix_k: u64,
    pub prefix_v: u64,
    pub context_lens: u64,
    pub out: u64,
    pub dout: u64,
    pub lse: u64,
    pub delta: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dprefix_k: u64,
    pub dprefix_v: u64,
    pub rows: i64,
    pub sq: HeadStrides,
    pub sk: HeadStrides,
    pub sv: HeadStrides,
    pub spk: HeadStrides,
    pub spv: HeadStrides,
    pub so: HeadStrides,
    pub sdo: HeadStrides,
    pub sdq: HeadStrides,
    pub sdk: HeadStrides,
    pub sdv: HeadStrides,
    pub sdpk: HeadStrides,
    pub sdpv: HeadStrides,
    pub batch: i32,
    pub heads: i32,
    pub group: i32,
    pub q_len: i32,
    pub kv_len: i32,
    pub prefix_len: i32,
    pub causal: i32,
    pub shared_prefix: i32,
    pub dprefix_k_f32: i32,
    pub dprefix_v_f32: i32,
    pub head_dim: i32,
    pub scale: f32,
    pub scale_log2: f32,
}
// SAFETY: as above.
unsafe impl KernelParams for PrefixAttentionBackwardParams {}

/// A prefix gradient's buffer and its element type: the inputs' (`Elem`) or f32.
#[derive(Clone, Copy, Debug)]
pub enum PrefixGradBuf {
    Elem(Buf),
    F32(Buf),
}

impl PrefixGradBuf {
    pub(crate) fn buf(self) -> Buf {
        match self {
            PrefixGradBuf::Elem(b) | PrefixGradBuf::F32(b) => b,
        }
    }

    fn is_f32(self) -> bool {
        matches!(self, PrefixGradBuf::F32(_))
    }

    fn size(self, dtype: DType) -> usize {
        if self.is_f32() {
            4
        } else {
            dtype.size()
        }
    }
}

/// The operands of `prefix_attention_backward`.
#[derive(Clone, Copy, Debug)]
pub struct PrefixAttentionBackwardBufs {
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    pub prefix_k: Buf,
    pub prefix_v: Buf,
    pub context_lens: Option<Buf>,
    pub out: Buf,
    pub lse: Buf,
    pub dout: Buf,
    pub dq: Buf,
    pub dk: Buf,
    pub dv: Buf,
    pub dprefix_k: PrefixGradBuf,
    pub dprefix_v: PrefixGradBuf,
    pub workspace: Buf,
}

/// The backward kernels' tiles (`BwdTile` in kernels/prefix_attention_backward.cu): keys per
/// tile, query rows per step of the key kernel and query rows of a dq block.
fn backward_tiles(d: usize) -> (usize, usize, usize) {
    let keys = if d <= 64 {
        64
    } else if d <= 128 {
        32
    } else {
        16
    };
    (keys, 32, if d <= 128 { 64 } else { 32 })
}

/// The backward's kernels for `dtype` and head dim `d`: the pre-pass, the key kernel and its
/// dynamic shared memory, the dq kernel and its.
fn backward_kernels(dtype: DType, d: usize) -> Result<[(KernelId, u32); 3]> {
    use KernelId::*;
    let index = HEAD_DIMS
        .iter()
        .position(|&h| h == d)
        .ok_or_else(|| Error::invalid("dims.head_dim", format!("one of {HEAD_DIMS:?}"), d))?;
    let (dot, dkv, dq) = match dtype {
        DType::F32 => (
            prefix_attention_backward_dot_f32,
            [
                prefix_attention_backward_dkv_f32_d32,
                prefix_attention_backward_dkv_f32_d64,
                prefix_attention_backward_dkv_f32_d80,
                prefix_attention_backward_dkv_f32_d96,
                prefix_attention_backward_dkv_f32_d128,
                prefix_attention_backward_dkv_f32_d256,
            ],
            [
                prefix_attention_backward_dq_f32_d32,
                prefix_attention_backward_dq_f32_d64,
                prefix_attention_backward_dq_f32_d80,
                prefix_attention_backward_dq_f32_d96,
                prefix_attention_backward_dq_f32_d128,
                prefix_attention_backward_dq_f32_d256,
            ],
        ),
        DType::F16 => (
            prefix_attention_backward_dot_f16,
            [
                prefix_attention_backward_dkv_f16_d32,
                prefix_attention_backward_dkv_f16_d64,
                prefix_attention_backward_dkv_f16_d80,
                prefix_attention_backward_dkv_f16_d96,
                prefix_attention_backward_dkv_f16_d128,
                prefix_attention_backward_dkv_f16_d256,
            ],
            [
                prefix_attention_backward_dq_f16_d32,
                prefix_attention_backward_dq_f16_d64,
                prefix_attention_backward_dq_f16_d80,
                prefix_attention_backward_dq_f16_d96,
                prefix_attention_backward_dq_f16_d128,
                prefix_attention_backward_dq_f16_d256,
            ],
        ),
        DType::BF16 => (
            prefix_attention_backward_dot_bf16,
            [
                prefix_attention_backward_dkv_bf16_d32,
                prefix_attention_backward_dkv_bf16_d64,
                prefix_attention_backward_dkv_bf16_d80,
                prefix_attention_backward_dkv_bf16_d96,
                prefix_attention_backward_dkv_bf16_d128,
                prefix_attention_backward_dkv_bf16_d256,
            ],
            [
                prefix_attention_backward_dq_bf16_d32,
                prefix_attention_backward_dq_bf16_d64,
                prefix_attention_backward_dq_bf16_d80,
                prefix_attention_backward_dq_bf16_d96,
                prefix_attention_backward_dq_bf16_d128,
                prefix_attention_backward_dq_bf16_d256,
            ],
        ),
    };
    let (keys, kv_rows, q_rows) = backward_tiles(d);
    let pitch = d + 4;
    let kv_floats = 2 * (kv_rows + keys) * pitch + 2 * kv_rows * keys + 2 * kv_rows;
    let q_floats = 2 * (q_rows + keys) * pitch + q_rows * keys + 2 * q_rows;
    Ok([
        (dot, 0),
        (dkv[index], (kv_floats * 4) as u32),
        (dq[index], (q_floats * 4) as u32),
    ])
}

/// An error naming the first of `outputs` whose bytes overlap those of an input or of an
/// earlier output (a gradient written over what the kernels still read, or two gradients on
/// one address). Each operand is (name, buffer, element size); empty buffers share nothing.
fn check_no_alias(
    outputs: &[(&'static str, Buf, usize)],
    inputs: &[(&'static str, Buf, usize)],
) -> Result<()> {
    let range = |b: Buf, size: usize| {
        let start = u128::from(b.addr);
        (start, start + (b.len as u128) * (size as u128))
    };
    for (i, &(name, out, size)) in outputs.iter().enumerate() {
        if out.len == 0 {
            continue;
        }
        let (a0, a1) = range(out, size);
        for &(other, buf, other_size) in inputs.iter().chain(&outputs[..i]) {
            if buf.len == 0 {
                continue;
            }
            let (b0, b1) = range(buf, other_size);
            if a0 < b1 && b0 < a1 {
                return Err(Error::invalid(
                    name,
                    format!("a buffer that shares no memory with `{other}`"),
                    format!("bytes [{a0:#x}, {a1:#x}) overlapping [{b0:#x}, {b1:#x})"),
                ));
            }
        }
    }
    Ok(())
}

/// Plans `prefix_attention_backward`: the pre-pass D = rowsum(dO∘O) into the workspace, the
/// key-tile kernel (dK, dV, dP_k, dP_v) and the query-tile kernel (dq).
pub fn prefix_attention_backward(
    op: &PrefixAttention,
    dims: &PrefixAttentionBackwardDims,
    dtype: DType,
    b: &PrefixAttentionBackwardBufs,
) -> Result<Vec<(Launch, PrefixAttentionBackwardParams)>> {
    plan_prefix_attention_backward(op, dims, dtype, b)
        .map_err(|e| e.of("prefix_attention_backward"))
}

fn plan_prefix_attention_backward(
    op: &PrefixAttention,
    dims: &PrefixAttentionBackwardDims,
    dtype: DType,
    b: &PrefixAttentionBackwardBufs,
) -> Result<Vec<(Launch, PrefixAttentionBackwardParams)>> {
    let g = dims;
    let d = &dims.forward;
    let (scale_log2, scale) = check_attention_dims(op, d)?;
    // An empty batch is checked as any call and launches nothing; q_len = 0 with sequences
    // would still owe zero key gradients, which no kernel writes: refused.
    if d.batch > 0 {
        positive("dims.q_len", d.q_len)?;
    }
    let [(dot, _), (dkv, smem_kv), (dq, smem_q)] = backward_kernels(dtype, d.head_dim)?;
    let (keys, _, q_rows) = backward_tiles(d.head_dim);
    let key_tiles = d.prefix_len.div_ceil(keys) + d.kv_len.div_ceil(keys);
    let grid_kv = grid_for([
        ("dims.prefix_len + dims.kv_len", key_tiles, 1),
        ("dims.kv_heads", d.kv_heads, 1),
        ("dims.batch", d.batch, 1),
    ])?;
    let grid_q = grid_for([
        ("dims.q_len", d.q_len, q_rows),
        ("dims.heads", d.heads, 1),
        ("dims.batch", d.batch, 1),
    ])?;
    let shared = g.shared_prefix();
    if d.batch > 1 && d.prefix_len > 0 && (d.prefix_k.batch == 0) != (d.prefix_v.batch == 0) {
        return Err(Error::invalid(
            "dims.forward.prefix_v",
            "a batch stride of 0 exactly when prefix_k has one (a prefix shared by the batch)",
            d.prefix_v.batch,
        ));
    }
    let (hd, hkv) = (d.head_dim, d.kv_heads);
    let q_shape = [d.batch, d.heads, d.q_len, hd];
    let kv_shape = [d.batch, hkv, d.kv_len, hd];
    let p_shape = [d.batch, hkv, d.prefix_len, hd];
    let dp_shape = [if shared { 1 } else { d.batch }, hkv, d.prefix_len, hd];
    let inputs = [
        ("q", b.q, d.q, q_shape),
        ("k", b.k, d.k, kv_shape),
        ("v", b.v, d.v, kv_shape),
        ("prefix_k", b.prefix_k, d.prefix_k, p_shape),
        ("prefix_v", b.prefix_v, d.prefix_v, p_shape),
        ("out", b.out, d.out, q_shape),
        ("dout", b.dout, g.dout, q_shape),
    ];
    for (arg, buf, layout, shape) in inputs {
        check_tensor(arg, buf, layout, shape)?;
    }
    let outputs = [
        ("dq", b.dq, g.dq, q_shape),
        ("dk", b.dk, g.dk, kv_shape),
        ("dv", b.dv, g.dv, kv_shape),
        ("dprefix_k", b.dprefix_k.buf(), g.dprefix_k, dp_shape),
        ("dprefix_v", b.dprefix_v.buf(), g.dprefix_v, dp_shape),
    ];
    for (arg, buf, layout, shape) in outputs {
        check_tensor(arg, buf, layout, shape)?;
        check_distinct(arg, layout, shape)?;
    }
    check_len(
        "context_lens",
        b.context_lens,
        d.batch,
        Some("one length per sequence"),
    )?;
    let rows = d.rows();
    check_len("lse", Some(b.lse), rows, Some("[B, Hq, Lq]"))?;
    check_len("workspace", Some(b.workspace), rows, Some("B·Hq·Lq f32"))?;
    let es = dtype.size();
    let none = Buf { addr: 0, len: 0 };
    check_no_alias(
        &[
            ("dq", b.dq, es),
            ("dk", b.dk, es),
            ("dv", b.dv, es),
            ("dprefix_k", b.dprefix_k.buf(), b.dprefix_k.size(dtype)),
            ("dprefix_v", b.dprefix_v.buf(), b.dprefix_v.size(dtype)),
            ("workspace", b.workspace, 4),
        ],
        &[
            ("q", b.q, es),
            ("k", b.k, es),
            ("v", b.v, es),
            ("prefix_k", b.prefix_k, es),
            ("prefix_v", b.prefix_v, es),
            ("out", b.out, es),
            ("dout", b.dout, es),
            ("lse", b.lse, 4),
            ("context_lens", b.context_lens.unwrap_or(none), 4),
        ],
    )?;
    if d.batch == 0 {
        return Ok(Vec::new());
    }

    let params = PrefixAttentionBackwardParams {
        q: b.q.addr,
        k: b.k.addr,
        v: b.v.addr,
        prefix_k: b.prefix_k.addr,
        prefix_v: b.prefix_v.addr,
        context_lens: addr(b.context_lens),
        out: b.out.addr,
        dout: b.dout.addr,
        lse: b.lse.addr,
        delta: b.workspace.addr,
        dq: b.dq.addr,
        dk: b.dk.addr,
        dv: b.dv.addr,
        dprefix_k: b.dprefix_k.buf().addr,
        dprefix_v: b.dprefix_v.buf().addr,
        rows: rows as i64,
        sq: d.q.into(),
        sk: d.k.into(),
        sv: d.v.into(),
        spk: d.prefix_k.into(),
        spv: d.prefix_v.into(),
        so: d.out.into(),
        sdo: g.dout.into(),
        sdq: g.dq.into(),
        sdk: g.dk.into(),
        sdv: g.dv.into(),
        sdpk: g.dprefix_k.into(),
        sdpv: g.dprefix_v.into(),
        batch: d.batch as i32,
        heads: d.heads as i32,
        group: (d.heads / d.kv_heads) as i32,
        q_len: d.q_len as i32,
        kv_len: d.kv_len as i32,
        prefix_len: d.prefix_len as i32,
        causal: i32::from(op.causal),
        shared_prefix: i32::from(shared),
        dprefix_k_f32: i32::from(b.dprefix_k.is_f32()),
        dprefix_v_f32: i32::from(b.dprefix_v.is_f32()),
        head_dim: hd as i32,
        scale,
        scale_log2,
    };
    let launch = |kernel, grid, dynamic_smem| Launch {
        kernel,
        grid,
        block: [THREADS, 1, 1],
        dynamic_smem,
        overlap_previous: false,
    };
    let mut steps = vec![(row_launch(dot, rows)?, params)];
    if key_tiles > 0 {
        steps.push((launch(dkv, grid_kv, smem_kv), params));
    }
    steps.push((launch(dq, grid_q, smem_q), params));
    Ok(steps)
}

/// Twin of `LseMergeBackwardParams` in kernels/prefix_attention_backward.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LseMergeBackwardParams {
    pub o_prefix: u64,
    pub lse_prefix: u64,
    pub o_context: u64,
    pub lse_context: u64,
    pub dout: u64,
    pub do_prefix: u64,
    pub dlse_prefix: u64,
    pub do_context: u64,
    pub dlse_context: u64,
    pub sp: HeadStrides,
    pub sc: HeadStrides,
    pub sdo: HeadStrides,
    pub sdp: HeadStrides,
    pub sdc: HeadStrides,
    pub rows: i64,
    pub heads: i32,
    pub len: i32,
    pub dim: i32,
}
// SAFETY: as above.
unsafe impl KernelParams for LseMergeBackwardParams {}

/// The operands of `lse_merge_backward`.
#[derive(Clone, Copy, Debug)]
pub struct LseMergeBackwardBufs {
    pub o_prefix: Buf,
    pub lse_prefix: Buf,
    pub o_context: Buf,
    pub lse_context: Buf,
    pub dout: Buf,
    pub do_prefix: Buf,
    pub dlse_prefix: Buf,
    pub do_context: Buf,
    pub dlse_context: Buf,
}

/// Plans `lse_merge_backward`: one warp per row.
pub fn lse_merge_backward(
    dims: &LseMergeBackwardDims,
    dtype: DType,
    b: &LseMergeBackwardBufs,
) -> Result<Vec<(Launch, LseMergeBackwardParams)>> {
    plan_lse_merge_backward(dims, dtype, b).map_err(|e| e.of("lse_merge_backward"))
}

fn plan_lse_merge_backward(
    dims: &LseMergeBackwardDims,
    dtype: DType,
    b: &LseMergeBackwardBufs,
) -> Result<Vec<(Launch, LseMergeBackwardParams)>> {
    let d = &dims.merge;
    positive("dims.batch", d.batch)?;
    positive("dims.heads", d.heads)?;
    positive("dims.q_len", d.q_len)?;
    positive("dims.head_dim", d.head_dim)?;
    at_most("dims.heads", d.heads, i32::MAX as usize, "32-bit indices")?;
    at_most("dims.q_len", d.q_len, i32::MAX as usize, "32-bit indices")?;
    at_most("dims.head_dim", d.head_dim, MAX_LEN, "32-bit indices")?;
    let shape = [d.batch, d.heads, d.q_len, d.head_dim];
    let rows = row_count(d.batch, d.heads, d.q_len)?;
    check_tensor("o_prefix", b.o_prefix, d.o_prefix, shape)?;
    check_tensor("o_context", b.o_context, d.o_context, shape)?;
    check_tensor("dout", b.dout, dims.dout, shape)?;
    for (arg, buf, layout) in [
        ("do_prefix", b.do_prefix, dims.do_prefix),
        ("do_context", b.do_context, dims.do_context),
    ] {
        check_tensor(arg, buf, layout, shape)?;
        check_distinct(arg, layout, shape)?;
    }
    for (arg, buf) in [
        ("lse_prefix", b.lse_prefix),
        ("lse_context", b.lse_context),
        ("dlse_prefix", b.dlse_prefix),
        ("dlse_context", b.dlse_context),
    ] {
        check_len(arg, Some(buf), rows, Some("[B, H, L]"))?;
    }
    let es = dtype.size();
    check_no_alias(
        &[
            ("do_prefix", b.do_prefix, es),
            ("dlse_prefix", b.dlse_prefix, 4),
            ("do_context", b.do_context, es),
            ("dlse_context", b.dlse_context, 4),
        ],
        &[
            ("o_prefix", b.o_prefix, es),
            ("lse_prefix", b.lse_prefix, 4),
            ("o_context", b.o_context, es),
            ("lse_context", b.lse_context, 4),
            ("dout", b.dout, es),
        ],
    )?;
    let kernel = match dtype {
        DType::F32 => KernelId::lse_merge_backward_f32,
        DType::F16 => KernelId::lse_merge_backward_f16,
        DType::BF16 => KernelId::lse_merge_backward_bf16,
    };
    let params = LseMergeBackwardParams {
        o_prefix: b.o_prefix.addr,
        lse_prefix: b.lse_prefix.addr,
        o_context: b.o_context.addr,
        lse_context: b.lse_context.addr,
        dout: b.dout.addr,
        do_prefix: b.do_prefix.addr,
        dlse_prefix: b.dlse_prefix.addr,
        do_context: b.do_context.addr,
        dlse_context: b.dlse_context.addr,
        sp: d.o_prefix.into(),
        sc: d.o_context.into(),
        sdo: dims.dout.into(),
        sdp: dims.do_prefix.into(),
        sdc: dims.do_context.into(),
        rows: rows as i64,
        heads: d.heads as i32,
        len: d.q_len as i32,
        dim: d.head_dim as i32,
    };
    Ok(vec![(row_launch(kernel, rows)?, params)])
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

    /// A gradient (or the workspace) that shares memory with an input or with another output
    /// is refused, naming it; disjoint buffers pass (the planner alone: nothing runs).
    #[test]
    fn backward_buffers_must_not_alias() {
        let dims = PrefixAttentionBackwardDims::new(PrefixAttentionDims::new(1, 2, 1, 4, 5, 3, 32));
        let (nq, nk, np, rows) = (2 * 4 * 32, 5 * 32, 3 * 32, 8);
        let mut next = 1 << 20;
        let mut buf = |len: usize| {
            let b = Buf { addr: next, len };
            next += (len as u64) * 4 + 256;
            b
        };
        let good = PrefixAttentionBackwardBufs {
            q: buf(nq),
            k: buf(nk),
            v: buf(nk),
            prefix_k: buf(np),
            prefix_v: buf(np),
            context_lens: None,
            out: buf(nq),
            lse: buf(rows),
            dout: buf(nq),
            dq: buf(nq),
            dk: buf(nk),
            dv: buf(nk),
            dprefix_k: PrefixGradBuf::Elem(buf(np)),
            dprefix_v: PrefixGradBuf::F32(buf(np)),
            workspace: buf(rows),
        };
        let op = PrefixAttention {
            scale: None,
            causal: true,
        };
        let refused = |b: PrefixAttentionBackwardBufs| match prefix_attention_backward(
            &op,
            &dims,
            DType::F32,
            &b,
        ) {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            Ok(_) => "nothing",
            Err(_) => "another error",
        };
        assert_eq!(refused(good), "nothing");
        let at = |b: Buf, shift: u64, len: usize| Buf {
            addr: b.addr + shift,
            len,
        };
        // dq over q; dv overlapping dk by one element; dP_v inside O; the workspace on the LSE.
        assert_eq!(
            refused(PrefixAttentionBackwardBufs { dq: good.q, ..good }),
            "dq"
        );
        let dv = at(good.dk, (nk as u64 - 1) * 4, nk);
        assert_eq!(refused(PrefixAttentionBackwardBufs { dv, ..good }), "dv");
        let dpv = PrefixGradBuf::F32(at(good.out, 64, np));
        assert_eq!(
            refused(PrefixAttentionBackwardBufs {
                dprefix_v: dpv,
                ..good
            }),
            "dprefix_v"
        );
        let ws = at(good.lse, 4, rows);
        assert_eq!(
            refused(PrefixAttentionBackwardBufs {
                workspace: ws,
                ..good
            }),
            "workspace"
        );
        // Adjacent, not overlapping: fine.
        let dv = at(good.dk, nk as u64 * 4, nk);
        assert_eq!(
            refused(PrefixAttentionBackwardBufs { dv, ..good }),
            "nothing"
        );
    }
}
