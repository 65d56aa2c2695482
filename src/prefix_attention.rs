//! Prefix tuning's gated attention (kernels/prefix_attention.cu): per head,
//!
//! ```text
//! out = (1 − λ)·Attn(q, K_c, V_c) + λ·Attn(q, P_k, P_v),    λ = sigmoid(LSE_p − LSE_c)
//! ```
//!
//! which is softmax attention over the concatenation `[P; C]` (UNIFIED-VIEW.md), computed by
//! one flash-style pass over the prefix and then the masked context, without concatenating
//! anything in memory. The math, masking (every query sees the prefix; the context is
//! padded by `context_lens` and, when causal, masked bottom-right aligned), grouped-query
//! heads, layouts and empty rows are exactly those of [`crate::reference::attention`], whose
//! [`PrefixAttention`] description the kernels take too.
//!
//! The operations, each on both backends with the same argument structs over the backend's
//! buffer types (`&[T]` / `&mut [T]` in the emulator, `cuda::DeviceRead` /
//! `cuda::DeviceWrite` on the GPU; LSE and λ are f32, `context_lens` u32):
//! - `prefix_attention`: the fused forward, [`PrefixAttentionArgs`]: the output and, when
//!   asked for, the LSE over prefix and context and the gate λ. With `prefix_len = 0` it is
//!   plain (masked, grouped-query) attention. Decoding (few query rows), in every dtype,
//!   packs a GQA group's query heads into one block and, given the f32 workspace of
//!   [`PrefixAttentionDims::workspace_len`], splits the keys over more blocks and merges the
//!   runs (flash-decoding).
//! - `multi_prefix_attention`: the same fused pass for a batch of sequences each with its own
//!   prefix (or none) from a packed set of prefixes of different lengths, looked up on the
//!   device through an offsets table and per-sequence ids ([`MultiPrefixDims`],
//!   [`MultiPrefixAttentionArgs`]): serving many prefix-tuning fine-tunes in one batch. The
//!   reference is the single-prefix one, sequence by sequence
//!   ([`crate::reference::multi_prefix_attention`]). Forward only.
//! - `prefix_only_attention`: the prefix part alone, `(out_p, LSE_p)` ([`PrefixOnlyArgs`]),
//!   to pair with an attention of your own over the context through
//! - `lse_merge`: two attention states `(o, LSE)` of the same rows merged into the gated
//!   output, its LSE and λ ([`LseMergeArgs`]).
//! - `kv_concat`: `[P; C]` along the sequence ([`KvConcatArgs`]), the copy the unfused path
//!   makes (the benchmarks' baseline).
//! - `prefix_attention_backward`: the gradients dq, dK, dV, dP_k, dP_v from the forward's
//!   merged output and LSE and the output gradient ([`PrefixAttentionBackwardArgs`],
//!   [`PrefixAttentionBackwardDims`]); with `kv_len = 0` the backward of
//!   `prefix_only_attention` inside a split form (see `lse_merge_backward`).
//! - `lse_merge_backward`: the merged output's gradient into each state's output and LSE
//!   ([`LseMergeBackwardArgs`]), for a part whose own backward takes both.
//!
//! Training the split form (`prefix_only_attention` + your own attention + `lse_merge`):
//! run each part's backward against the MERGED output, LSE and dO, unchanged (TRAINING.md):
//! ours with `kv_len = 0` for the prefix part (dq_p, dP_k, dP_v), yours for the context with
//! `out` = the merged output and `lse` = the merged LSE (FlashAttention-2's backward takes
//! both), and add the two dq. That is exact, because p_j = exp(s_j − L) with the merged L is
//! each key's share of the merged softmax. A part backward that instead takes its own
//! output's and LSE's gradients gets them from `lse_merge_backward`.
//!
//! Supported head dims ([`HEAD_DIMS`]): 32, 64, 80, 96, 128, 256, with `d_v = d`. f16 and
//! bf16 run on tensor cores, which copy 16-byte chunks: strides must be multiples of 8
//! elements, and on the GPU (`cuda::*`, cudarc buffers, whose allocations are 256-byte
//! aligned) each tensor must start 16-byte aligned, else the call is refused naming it. The
//! host entry points (`emulator::*`, `host::*`) take slices of any alignment, since a
//! `Vec<bf16>` promises only 2 bytes: the emulator copies a 16-bit tensor that does not
//! start 16-byte aligned into aligned scratch (an output copied back), one copy of that
//! slice per call; `host` on a GPU uploads into fresh, aligned allocations anyway. f32 runs
//! on the CUDA cores in f32 throughout, any alignment, never copied.
//!
//! An empty batch (`batch = 0` or `q_len = 0`; for `kv_concat`, `batch = 0` or no positions)
//! is a valid call of every operation, checked as any other, that launches nothing.
//!
//! Build an argument struct in the call, or in a `let` annotated with the backend's alias
//! ([`HostPrefixAttentionArgs`] and the like; `cuda::DevicePrefixAttentionArgs` on the GPU),
//! so that `&v` of a `Vec` coerces to a slice and `None` fields get their type:
//!
//! ```
//! # #[cfg(feature = "emulator")] {
//! use half::bf16;
//! use peft_kernels::prefix_attention::{
//!     HostPrefixAttentionArgs, PrefixAttention, PrefixAttentionArgs, PrefixAttentionDims,
//! };
//!
//! // 2 sequences, 4 query heads over 2 KV heads, 3 queries, 5 context keys, 4 prefix vectors.
//! let dims = PrefixAttentionDims::new(2, 4, 2, 3, 5, 4, 64);
//! let (q, kv, prefix) = (
//!     vec![bf16::from_f32(0.1); 2 * 4 * 3 * 64],
//!     vec![bf16::from_f32(0.2); 2 * 2 * 5 * 64],
//!     vec![bf16::from_f32(0.2); 2 * 2 * 4 * 64],
//! );
//! let mut out = vec![bf16::ZERO; q.len()];
//! let mut lambda = vec![0.0f32; dims.rows()];
//! let args: HostPrefixAttentionArgs<bf16> = PrefixAttentionArgs {
//!     q: &q, k: &kv, v: &kv, prefix_k: &prefix, prefix_v: &prefix,
//!     context_lens: None, out: &mut out, lse: None, lambda: Some(&mut lambda), workspace: None,
//! };
//! peft_kernels::emulator::prefix_attention(&PrefixAttention::default(), &dims, args)?;
//! // Prefix and context keys alike, so equal scores: λ = 4 / (4 + 5), the prefix's share.
//! assert!(lambda.iter().all(|&l| (l - 4.0 / 9.0).abs() < 1e-3));
//! # }
//! # Ok::<(), peft_kernels::Error>(())
//! ```

use crate::plan::prefix_attention::{
    KvConcatBufs, LseMergeBackwardBufs, LseMergeBufs, MultiPrefixAttentionBufs,
    PrefixAttentionBackwardBufs, PrefixAttentionBufs, PrefixGradBuf, PrefixOnlyBufs,
};
use crate::plan::BufSource;
pub use crate::reference::PrefixAttention;
use crate::spec::DEFAULT_SPLIT_TARGET;

/// The head dims the attention kernels are built for.
pub const HEAD_DIMS: [usize; 6] = [32, 64, 80, 96, 128, 256];

/// Element strides of a `[batch, heads, seq, dim]` tensor whose last dimension is
/// contiguous. A stride of 0 broadcasts (one prefix shared by the batch, say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadLayout {
    /// Elements from one sequence to the next.
    pub batch: usize,
    /// Elements from one head to the next.
    pub head: usize,
    /// Elements from one position (row) to the next.
    pub seq: usize,
}

impl HeadLayout {
    /// `[B, H, L, d]`, contiguous.
    pub const fn bhsd(heads: usize, len: usize, dim: usize) -> Self {
        HeadLayout {
            batch: heads.saturating_mul(len).saturating_mul(dim),
            head: len.saturating_mul(dim),
            seq: dim,
        }
    }

    /// `[B, L, H, d]`, contiguous: the layout of a projection's output split into heads.
    pub const fn bshd(len: usize, heads: usize, dim: usize) -> Self {
        HeadLayout {
            batch: len.saturating_mul(heads).saturating_mul(dim),
            head: dim,
            seq: heads.saturating_mul(dim),
        }
    }

    /// The same with batch stride 0: one tensor shared by every sequence of the batch.
    pub const fn shared_by_batch(self) -> Self {
        HeadLayout { batch: 0, ..self }
    }

    /// The offset of element `[b, h, i, 0]`.
    pub const fn offset(&self, b: usize, h: usize, i: usize) -> usize {
        b.saturating_mul(self.batch)
            .saturating_add(h.saturating_mul(self.head))
            .saturating_add(i.saturating_mul(self.seq))
    }
}

/// Sizes and layouts of a prefix attention. Q [B, Hq, Lq, d]; K, V [B, Hkv, Lk, d]; the
/// prefix P_k, P_v [B, Hkv, l, d] (per KV head, as PEFT's `past_key_values`); the output
/// [B, Hq, Lq, d]; LSE and λ [B, Hq, Lq], contiguous.
///
/// An empty batch (`batch = 0` or `q_len = 0`) is checked as any call and launches nothing;
/// `kv_len` and `prefix_len` may be 0 (no context, no prefix); heads, kv_heads and head_dim
/// must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixAttentionDims {
    pub batch: usize,
    /// Query heads Hq.
    pub heads: usize,
    /// KV heads Hkv, dividing Hq (grouped-query attention; 1: multi-query).
    pub kv_heads: usize,
    /// Queries per sequence Lq (1 when decoding).
    pub q_len: usize,
    /// Context keys per sequence Lk (the valid ones per sequence: `context_lens`); 0 for
    /// none.
    pub kv_len: usize,
    /// Prefix vectors l; 0 for plain attention.
    pub prefix_len: usize,
    /// d, one of [`HEAD_DIMS`].
    pub head_dim: usize,
    /// d_v, which must equal d.
    pub value_dim: usize,
    pub q: HeadLayout,
    pub k: HeadLayout,
    pub v: HeadLayout,
    pub prefix_k: HeadLayout,
    pub prefix_v: HeadLayout,
    pub out: HeadLayout,
    /// With a workspace, the blocks a grid of fewer aims at by splitting its key tiles into
    /// runs (flash-decoding): [`DEFAULT_SPLIT_TARGET`] unless tuning (benches/
    /// prefix_attention.rs sweeps it); 0 never splits. The workspace follows it.
    pub split_target: usize,
}

impl PrefixAttentionDims {
    /// Every tensor contiguous `[B, H, L, d]`.
    pub fn new(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        q_len: usize,
        kv_len: usize,
        prefix_len: usize,
        head_dim: usize,
    ) -> Self {
        let d = head_dim;
        PrefixAttentionDims {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            prefix_len,
            head_dim,
            value_dim: d,
            q: HeadLayout::bhsd(heads, q_len, d),
            k: HeadLayout::bhsd(kv_heads, kv_len, d),
            v: HeadLayout::bhsd(kv_heads, kv_len, d),
            prefix_k: HeadLayout::bhsd(kv_heads, prefix_len, d),
            prefix_v: HeadLayout::bhsd(kv_heads, prefix_len, d),
            out: HeadLayout::bhsd(heads, q_len, d),
            split_target: DEFAULT_SPLIT_TARGET,
        }
    }

    /// Dims for `prefix_only_attention`, which reads no context: [`PrefixAttentionDims::new`]
    /// with no context keys (its `kv_len`, `k` and `v` are not used; nor is the op's
    /// `causal`, as every query sees every prefix vector).
    pub fn prefix_only(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        q_len: usize,
        prefix_len: usize,
        head_dim: usize,
    ) -> Self {
        Self::new(batch, heads, kv_heads, q_len, 0, prefix_len, head_dim)
    }

    /// The same with one prefix `[Hkv, l, d]` shared by the whole batch.
    pub fn with_shared_prefix(self) -> Self {
        PrefixAttentionDims {
            prefix_k: self.prefix_k.shared_by_batch(),
            prefix_v: self.prefix_v.shared_by_batch(),
            ..self
        }
    }

    /// f32 elements of the split-KV workspace with which `prefix_attention` splits as the plan
    /// wants for `dtype` (0: these dims never split; a shorter workspace splits less, see
    /// [`PrefixAttentionArgs::workspace`]). It depends on the dtype
    /// (whose kernel's key tiles the runs are cut in) and on every field, the layouts too
    /// (they decide whether a GQA group's heads share a block, and so the number of runs):
    /// compute it from the dims you launch with.
    pub fn workspace_len(&self, dtype: crate::DType) -> usize {
        crate::plan::prefix_attention::workspace_len(self, dtype)
    }

    /// Query rows B·Hq·Lq: the length of LSE and λ.
    pub fn rows(&self) -> usize {
        self.batch
            .saturating_mul(self.heads)
            .saturating_mul(self.q_len)
    }
}

/// The tensors of `prefix_attention`, over a backend's buffer types: `R` / `W` for the
/// element tensors, `Lens` for `context_lens` (u32) and `Stats` for LSE and λ (f32).
#[derive(Debug)]
pub struct PrefixAttentionArgs<R, W, Lens, Stats> {
    /// Queries [B, Hq, Lq, d], strides `dims.q`.
    pub q: R,
    /// Context keys [B, Hkv, Lk, d], strides `dims.k` (not read when Lk = 0).
    pub k: R,
    /// Context values [B, Hkv, Lk, d], strides `dims.v`.
    pub v: R,
    /// Prefix keys [B, Hkv, l, d], strides `dims.prefix_k` (not read when l = 0).
    pub prefix_k: R,
    /// Prefix values [B, Hkv, l, d], strides `dims.prefix_v`.
    pub prefix_v: R,
    /// Valid context keys per sequence, `[B]`; `None`: all Lk. On the GPU the lengths cannot be
    /// checked without a device read: one above Lk counts as Lk.
    pub context_lens: Option<Lens>,
    /// The output [B, Hq, Lq, d], strides `dims.out`.
    pub out: W,
    /// LSE over the prefix and the visible context, natural log (−∞ for a row that sees
    /// nothing): `ln Σ_j exp(scale·q·k_j)`, f32 `[B, Hq, Lq]` contiguous.
    ///
    /// Training: the backward (`prefix_attention_backward`, [`PrefixAttentionBackwardArgs`])
    /// needs exactly two things from the forward, this merged LSE and the merged `out`; keep
    /// both (never a part's own LSE from a split computation). Nothing else (λ, the
    /// workspace) is saved.
    pub lse: Option<Stats>,
    /// The gate λ, the prefix's share of the softmax mass.
    pub lambda: Option<Stats>,
    /// f32 scratch of [`PrefixAttentionDims::workspace_len`] elements, which lets a grid too
    /// small to fill the GPU (decoding: q_len = 1, few sequences) split the keys over more
    /// blocks (flash-decoding); `None`, or a length of 0 needed, runs one pass. A shorter
    /// one is accepted and splits into as many runs as it has room for (one run's states:
    /// B·Hq·Lq·(d + 4) f32), or none: an engine can allocate one for its largest need and
    /// pass it to every call. It need not be initialised, and may be reused by any call
    /// queued after this one completes (stream order).
    pub workspace: Option<Stats>,
}

/// Sizes and layouts of `multi_prefix_attention`, multi-tenant prefix tuning: each sequence
/// of the batch reads its own prefix (or none) from a set of prefixes of different lengths,
/// packed along the rows of one `[set_rows, Hkv, d]` tensor per keys and values, prefix `i`
/// being rows `offsets[i]..offsets[i + 1]` (a CSR offsets table, `[prefixes + 1]`).
///
/// `attention` holds the attention's sizes and layouts as for `prefix_attention`, with two
/// readings: `prefix_len` is the longest prefix a sequence may use (the bound the host checks
/// the offsets against; the split-KV planning counts it), and `prefix_k` / `prefix_v` are the
/// set's layout, `seq` from one row to the next and `head` from one KV head to the next
/// (their `batch` is not used). [`MultiPrefixDims::new`] lays the set out contiguously.
///
/// Adding a prefix appends its rows after `offsets[prefixes]` (in spare capacity, rows up to
/// `set_rows`) and one offset: nothing moves and no launch argument but `prefixes` changes.
/// Removing one leaves its rows in place until the caller compacts the set (which moves the
/// later prefixes and rewrites their offsets); a sequence stops using it by its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultiPrefixDims {
    pub attention: PrefixAttentionDims,
    /// Prefixes in the set n (`prefix_offsets` holds n + 1 entries).
    pub prefixes: usize,
    /// Rows the set's buffers hold, used or spare: every offset is at most this.
    pub set_rows: usize,
}

impl MultiPrefixDims {
    /// Contiguous `[B, H, L, d]` queries, context and output, and a contiguous
    /// `[set_rows, Hkv, d]` set of `prefixes` prefixes of at most `max_prefix_len` rows each.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        q_len: usize,
        kv_len: usize,
        head_dim: usize,
        prefixes: usize,
        set_rows: usize,
        max_prefix_len: usize,
    ) -> Self {
        let mut attention = PrefixAttentionDims::new(
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            max_prefix_len,
            head_dim,
        );
        let set = HeadLayout::bshd(set_rows, kv_heads, head_dim).shared_by_batch();
        attention.prefix_k = set;
        attention.prefix_v = set;
        MultiPrefixDims {
            attention,
            prefixes,
            set_rows,
        }
    }

    /// f32 elements of the split-KV workspace ([`PrefixAttentionDims::workspace_len`]).
    pub fn workspace_len(&self, dtype: crate::DType) -> usize {
        self.attention.workspace_len(dtype)
    }

    /// Query rows B·Hq·Lq: the length of LSE and λ.
    pub fn rows(&self) -> usize {
        self.attention.rows()
    }
}

/// The tensors of `multi_prefix_attention`: [`PrefixAttentionArgs`]' with the prefix set in
/// place of the prefix (`Ids` is i32, `Flags` u32; the others as there).
///
/// The ids and offsets live on the device, so a step launches with no host synchronisation
/// (and can be captured in a graph). Where the host can read them (`emulator::*`, `host::*`)
/// bad values are refused before launch ([`crate::plan::prefix_attention::check_prefix_set`]).
/// On the GPU (`cuda::*`) they cannot be checked, and the kernel never reads outside the set
/// for them: a sequence whose id is neither −1 nor below `prefixes` (status bit 0), or whose
/// prefix's offsets are decreasing or past `set_rows` (bit 1), runs with NO prefix (plain
/// attention, λ = 0), and the kernel ORs the bit into `status` when given.
#[derive(Debug)]
pub struct MultiPrefixAttentionArgs<R, W, Lens, Ids, Stats, Flags> {
    /// Queries [B, Hq, Lq, d], strides `dims.attention.q`.
    pub q: R,
    /// Context keys [B, Hkv, Lk, d], strides `dims.attention.k`.
    pub k: R,
    /// Context values [B, Hkv, Lk, d], strides `dims.attention.v`.
    pub v: R,
    /// The set's prefix keys, `[set_rows, Hkv, d]`, strides `dims.attention.prefix_k`.
    pub prefix_k: R,
    /// The set's prefix values, `[set_rows, Hkv, d]`, strides `dims.attention.prefix_v`.
    pub prefix_v: R,
    /// u32 `[prefixes + 1]`, non-decreasing: prefix i is rows `offsets[i]..offsets[i + 1]`
    /// (an empty range is a prefix of length 0, the same as none). One table serves every
    /// layer whose sets are packed alike.
    pub prefix_offsets: Lens,
    /// i32 `[B]`: each sequence's prefix, or −1 for none (plain attention over its context,
    /// λ = 0, as `prefix_attention` with l = 0).
    pub prefix_ids: Ids,
    /// As in [`PrefixAttentionArgs::context_lens`].
    pub context_lens: Option<Lens>,
    /// The output [B, Hq, Lq, d], strides `dims.attention.out`.
    pub out: W,
    /// As in [`PrefixAttentionArgs::lse`].
    pub lse: Option<Stats>,
    /// As in [`PrefixAttentionArgs::lambda`].
    pub lambda: Option<Stats>,
    /// As in [`PrefixAttentionArgs::workspace`] ([`MultiPrefixDims::workspace_len`]).
    pub workspace: Option<Stats>,
    /// u32 `[1]`: the kernel ORs in bit 0 for an id out of range and bit 1 for a prefix whose
    /// offsets leave the set (each such sequence ran with no prefix). Only ever set, never
    /// cleared: zero it before the step, read it whenever convenient.
    pub status: Option<Flags>,
}

/// [`MultiPrefixAttentionArgs`] over host slices (`emulator::multi_prefix_attention`,
/// `host::multi_prefix_attention`).
pub type HostMultiPrefixAttentionArgs<'a, T> = MultiPrefixAttentionArgs<
    &'a [T],
    &'a mut [T],
    &'a [u32],
    &'a [i32],
    &'a mut [f32],
    &'a mut [u32],
>;

impl<R, W, Lens, Ids, Stats, Flags> MultiPrefixAttentionArgs<R, W, Lens, Ids, Stats, Flags> {
    /// The planner's view of these tensors (as [`PrefixAttentionArgs::bufs`]).
    pub fn bufs<S>(self, s: &mut S) -> MultiPrefixAttentionBufs
    where
        S: BufSource<R, W> + BufSource<Lens, Stats> + BufSource<Ids, Flags>,
    {
        let attention = PrefixAttentionArgs {
            q: self.q,
            k: self.k,
            v: self.v,
            prefix_k: self.prefix_k,
            prefix_v: self.prefix_v,
            context_lens: self.context_lens,
            out: self.out,
            lse: self.lse,
            lambda: self.lambda,
            workspace: self.workspace,
        }
        .bufs(s);
        MultiPrefixAttentionBufs {
            attention,
            prefix_offsets: BufSource::<Lens, Stats>::read(s, self.prefix_offsets),
            prefix_ids: BufSource::<Ids, Flags>::read(s, self.prefix_ids),
            status: self.status.map(|b| BufSource::<Ids, Flags>::write(s, b)),
        }
    }
}

/// The tensors of `prefix_only_attention` (the dims' `kv_len`, `k` and `v` are not used:
/// [`PrefixAttentionDims::prefix_only`] makes dims without them): `out` = Attn(q, P_k, P_v)
/// and its `lse` (−∞ and output 0 when l = 0).
#[derive(Debug)]
pub struct PrefixOnlyArgs<R, W, Stats> {
    /// Queries [B, Hq, Lq, d], strides `dims.q`.
    pub q: R,
    /// Prefix keys [B, Hkv, l, d], strides `dims.prefix_k`.
    pub prefix_k: R,
    /// Prefix values [B, Hkv, l, d], strides `dims.prefix_v`.
    pub prefix_v: R,
    /// Attn(q, P_k, P_v) [B, Hq, Lq, d], strides `dims.out`.
    pub out: W,
    /// Its LSE [B, Hq, Lq] (f32, natural log), what `lse_merge` takes as `lse_prefix`.
    pub lse: Stats,
}

/// Sizes and layouts of `lse_merge`: the two states and the output are [B, H, L, d], the
/// LSEs and λ [B, H, L] contiguous. An empty batch (`batch = 0` or `q_len = 0`) is checked
/// as any call and launches nothing; heads and head_dim must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LseMergeDims {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    /// Any d ≥ 1.
    pub head_dim: usize,
    pub o_prefix: HeadLayout,
    pub o_context: HeadLayout,
    pub out: HeadLayout,
}

impl LseMergeDims {
    /// Every tensor contiguous `[B, H, L, d]`.
    pub fn new(batch: usize, heads: usize, q_len: usize, head_dim: usize) -> Self {
        let l = HeadLayout::bhsd(heads, q_len, head_dim);
        LseMergeDims {
            batch,
            heads,
            q_len,
            head_dim,
            o_prefix: l,
            o_context: l,
            out: l,
        }
    }

    /// Rows B·H·L: the length of the LSEs and λ.
    pub fn rows(&self) -> usize {
        self.batch
            .saturating_mul(self.heads)
            .saturating_mul(self.q_len)
    }
}

/// The tensors of `lse_merge`: `out = (1 − λ)·o_context + λ·o_prefix` with
/// `λ = sigmoid(lse_prefix − lse_context)`, and optionally `lse = logaddexp(lse_prefix,
/// lse_context)` and λ. A state with LSE −∞ (nothing attended) weighs 0 and its output is
/// not read; two such states give output 0, LSE −∞, λ = 0. `StatsR` / `StatsW` are f32.
/// Both LSEs must be natural-log sums over the same scaled scores (`ln Σ exp(scale·q·k)`,
/// what `prefix_only_attention` returns): an attention kernel that reports its LSE in base
/// 2, or over unscaled scores, must be converted first (multiply a base-2 LSE by ln 2).
#[derive(Debug)]
pub struct LseMergeArgs<R, W, StatsR, StatsW> {
    /// The prefix state's output [B, H, L, d], strides `dims.o_prefix`.
    pub o_prefix: R,
    /// Its LSE [B, H, L].
    pub lse_prefix: StatsR,
    /// The context state's output [B, H, L, d], strides `dims.o_context`.
    pub o_context: R,
    /// Its LSE [B, H, L].
    pub lse_context: StatsR,
    /// The merged output [B, H, L, d], strides `dims.out`.
    pub out: W,
    /// `logaddexp(lse_prefix, lse_context)` [B, H, L], when given.
    pub lse: Option<StatsW>,
    /// λ [B, H, L], when given.
    pub lambda: Option<StatsW>,
}

/// Sizes and layouts of `kv_concat`: `prefix` [B, H, l, d] and `src` [B, H, L, d] into
/// `dst` [B, H, l + L, d]. An empty batch (`batch = 0`, or `prefix_len + len = 0`) is
/// checked as any call and launches nothing; heads and head_dim must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConcatDims {
    pub batch: usize,
    pub heads: usize,
    pub prefix_len: usize,
    pub len: usize,
    /// Any d ≥ 1.
    pub head_dim: usize,
    pub prefix: HeadLayout,
    pub src: HeadLayout,
    pub dst: HeadLayout,
}

impl KvConcatDims {
    /// Every tensor contiguous `[B, H, L, d]`.
    pub fn new(batch: usize, heads: usize, prefix_len: usize, len: usize, head_dim: usize) -> Self {
        KvConcatDims {
            batch,
            heads,
            prefix_len,
            len,
            head_dim,
            prefix: HeadLayout::bhsd(heads, prefix_len, head_dim),
            src: HeadLayout::bhsd(heads, len, head_dim),
            dst: HeadLayout::bhsd(heads, prefix_len.saturating_add(len), head_dim),
        }
    }
}

/// The tensors of `kv_concat`: `dst[b, h, j] = j < l ? prefix[b, h, j] : src[b, h, j − l]`.
#[derive(Debug)]
pub struct KvConcatArgs<R, W> {
    /// [B, H, l, d], strides `dims.prefix`.
    pub prefix: R,
    /// [B, H, L, d], strides `dims.src`.
    pub src: R,
    /// [B, H, l + L, d], strides `dims.dst`.
    pub dst: W,
}

/// [`PrefixAttentionArgs`] over host slices, as `emulator::prefix_attention` and
/// `host::prefix_attention` take them: annotate a `let` with it to build the arguments
/// before the call (module docs).
pub type HostPrefixAttentionArgs<'a, T> =
    PrefixAttentionArgs<&'a [T], &'a mut [T], &'a [u32], &'a mut [f32]>;
/// [`PrefixOnlyArgs`] over host slices (`emulator::prefix_only_attention`,
/// `host::prefix_only_attention`).
pub type HostPrefixOnlyArgs<'a, T> = PrefixOnlyArgs<&'a [T], &'a mut [T], &'a mut [f32]>;
/// [`LseMergeArgs`] over host slices (`emulator::lse_merge`, `host::lse_merge`).
pub type HostLseMergeArgs<'a, T> = LseMergeArgs<&'a [T], &'a mut [T], &'a [f32], &'a mut [f32]>;
/// [`KvConcatArgs`] over host slices (`emulator::kv_concat`, `host::kv_concat`).
pub type HostKvConcatArgs<'a, T> = KvConcatArgs<&'a [T], &'a mut [T]>;

impl<R, W, Lens, Stats> PrefixAttentionArgs<R, W, Lens, Stats> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> PrefixAttentionBufs
    where
        S: BufSource<R, W> + BufSource<Lens, Stats>,
    {
        PrefixAttentionBufs {
            q: BufSource::<R, W>::read(s, self.q),
            k: BufSource::<R, W>::read(s, self.k),
            v: BufSource::<R, W>::read(s, self.v),
            prefix_k: BufSource::<R, W>::read(s, self.prefix_k),
            prefix_v: BufSource::<R, W>::read(s, self.prefix_v),
            context_lens: self
                .context_lens
                .map(|b| BufSource::<Lens, Stats>::read(s, b)),
            out: BufSource::<R, W>::write(s, self.out),
            lse: self.lse.map(|b| BufSource::<Lens, Stats>::write(s, b)),
            lambda: self.lambda.map(|b| BufSource::<Lens, Stats>::write(s, b)),
            workspace: self
                .workspace
                .map(|b| BufSource::<Lens, Stats>::write(s, b)),
        }
    }
}

impl<R, W, Stats> PrefixOnlyArgs<R, W, Stats> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> PrefixOnlyBufs
    where
        S: BufSource<R, W> + BufSource<R, Stats>,
    {
        PrefixOnlyBufs {
            q: BufSource::<R, W>::read(s, self.q),
            prefix_k: BufSource::<R, W>::read(s, self.prefix_k),
            prefix_v: BufSource::<R, W>::read(s, self.prefix_v),
            out: BufSource::<R, W>::write(s, self.out),
            lse: BufSource::<R, Stats>::write(s, self.lse),
        }
    }
}

impl<R, W, StatsR, StatsW> LseMergeArgs<R, W, StatsR, StatsW> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> LseMergeBufs
    where
        S: BufSource<R, W> + BufSource<StatsR, StatsW>,
    {
        LseMergeBufs {
            o_prefix: BufSource::<R, W>::read(s, self.o_prefix),
            lse_prefix: BufSource::<StatsR, StatsW>::read(s, self.lse_prefix),
            o_context: BufSource::<R, W>::read(s, self.o_context),
            lse_context: BufSource::<StatsR, StatsW>::read(s, self.lse_context),
            out: BufSource::<R, W>::write(s, self.out),
            lse: self.lse.map(|b| BufSource::<StatsR, StatsW>::write(s, b)),
            lambda: self
                .lambda
                .map(|b| BufSource::<StatsR, StatsW>::write(s, b)),
        }
    }
}

impl<R, W> KvConcatArgs<R, W> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs(self, s: &mut impl BufSource<R, W>) -> KvConcatBufs {
        KvConcatBufs {
            prefix: s.read(self.prefix),
            src: s.read(self.src),
            dst: s.write(self.dst),
        }
    }
}

/// Sizes and layouts of `prefix_attention_backward`: the forward's dims (whose `out` layout is
/// the saved output O's), and the layouts of the output gradient dO and of the gradients.
///
/// The prefix is shared by the batch when the forward's `prefix_k` and `prefix_v` both have
/// batch stride 0 (and B > 1): then dP_k and dP_v are one `[1, Hkv, l, d]` tensor each, summed
/// over the batch; else `[B, Hkv, l, d]`. dq is `[B, Hq, Lq, d]`, dK and dV `[B, Hkv, Lk, d]`
/// (0 for the padding keys past `context_lens` and keys no query sees).
///
/// An empty batch (B = 0) is checked as any call and launches nothing, as in every
/// operation; `q_len = 0` with sequences is refused (`dims.q_len`): the key gradients it
/// owes are zeros that no kernel writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixAttentionBackwardDims {
    pub forward: PrefixAttentionDims,
    pub dout: HeadLayout,
    pub dq: HeadLayout,
    pub dk: HeadLayout,
    pub dv: HeadLayout,
    pub dprefix_k: HeadLayout,
    pub dprefix_v: HeadLayout,
}

impl PrefixAttentionBackwardDims {
    /// dO in the layout of the output, each gradient in the layout of its input (a shared
    /// prefix's gradient with batch stride 0, a single tensor).
    pub fn new(forward: PrefixAttentionDims) -> Self {
        PrefixAttentionBackwardDims {
            forward,
            dout: forward.out,
            dq: forward.q,
            dk: forward.k,
            dv: forward.v,
            dprefix_k: forward.prefix_k,
            dprefix_v: forward.prefix_v,
        }
    }

    /// Whether one prefix serves the batch (both prefix tensors with batch stride 0, B > 1).
    pub fn shared_prefix(&self) -> bool {
        let f = &self.forward;
        f.batch > 1 && f.prefix_k.batch == 0 && f.prefix_v.batch == 0
    }

    /// f32 elements of the workspace: one value a query row (D = rowsum(dO∘O)), B·Hq·Lq.
    pub fn workspace_len(&self) -> usize {
        self.forward.rows()
    }
}

/// A prefix gradient's buffer: in the element type of the inputs, or f32 (the trained
/// parameters' master gradients, for f16/bf16 inputs).
#[derive(Debug)]
pub enum PrefixGrad<W, F> {
    /// The inputs' element type.
    Elem(W),
    /// f32.
    F32(F),
}

/// The tensors of `prefix_attention_backward` over a backend's buffer types (`R` / `W`
/// element tensors, `Lens` u32, `StatsR` / `StatsW` f32). The contract with the forward
/// ([`PrefixAttentionArgs::lse`]): `out` and `lse` are the forward's merged output and merged
/// natural-log LSE, exactly as it returned them. Every gradient is written in full (not
/// accumulated into): add it to a running gradient yourself.
#[derive(Debug)]
pub struct PrefixAttentionBackwardArgs<R, W, Lens, StatsR, StatsW> {
    pub q: R,
    pub k: R,
    pub v: R,
    pub prefix_k: R,
    pub prefix_v: R,
    /// As in the forward: valid context keys per sequence, `[B]`; `None`: all Lk.
    pub context_lens: Option<Lens>,
    /// The forward's output O.
    pub out: R,
    /// The forward's LSE L, f32 `[B, Hq, Lq]` contiguous.
    pub lse: StatsR,
    /// The gradient of the loss with respect to the output, dO.
    pub dout: R,
    pub dq: W,
    pub dk: W,
    pub dv: W,
    pub dprefix_k: PrefixGrad<W, StatsW>,
    pub dprefix_v: PrefixGrad<W, StatsW>,
    /// f32 scratch of [`PrefixAttentionBackwardDims::workspace_len`] elements (need not be
    /// initialised).
    pub workspace: StatsW,
}

/// [`PrefixAttentionBackwardArgs`] over host slices (the emulator's and `host`'s).
pub type HostPrefixAttentionBackwardArgs<'a, T> =
    PrefixAttentionBackwardArgs<&'a [T], &'a mut [T], &'a [u32], &'a [f32], &'a mut [f32]>;

impl<R, W, Lens, StatsR, StatsW> PrefixAttentionBackwardArgs<R, W, Lens, StatsR, StatsW> {
    /// The planner's view of these tensors (see [`PrefixAttentionArgs::bufs`]), for a caller
    /// who launches `plan::prefix_attention::prefix_attention_backward`'s steps itself.
    pub fn bufs<S>(self, s: &mut S) -> PrefixAttentionBackwardBufs
    where
        S: BufSource<R, W> + BufSource<Lens, StatsW> + BufSource<StatsR, StatsW>,
    {
        let grad = |g: PrefixGrad<W, StatsW>, s: &mut S| match g {
            PrefixGrad::Elem(w) => PrefixGradBuf::Elem(BufSource::<R, W>::write(s, w)),
            PrefixGrad::F32(w) => PrefixGradBuf::F32(BufSource::<StatsR, StatsW>::write(s, w)),
        };
        PrefixAttentionBackwardBufs {
            q: BufSource::<R, W>::read(s, self.q),
            k: BufSource::<R, W>::read(s, self.k),
            v: BufSource::<R, W>::read(s, self.v),
            prefix_k: BufSource::<R, W>::read(s, self.prefix_k),
            prefix_v: BufSource::<R, W>::read(s, self.prefix_v),
            context_lens: self
                .context_lens
                .map(|b| BufSource::<Lens, StatsW>::read(s, b)),
            out: BufSource::<R, W>::read(s, self.out),
            lse: BufSource::<StatsR, StatsW>::read(s, self.lse),
            dout: BufSource::<R, W>::read(s, self.dout),
            dq: BufSource::<R, W>::write(s, self.dq),
            dk: BufSource::<R, W>::write(s, self.dk),
            dv: BufSource::<R, W>::write(s, self.dv),
            dprefix_k: grad(self.dprefix_k, s),
            dprefix_v: grad(self.dprefix_v, s),
            workspace: BufSource::<StatsR, StatsW>::write(s, self.workspace),
        }
    }
}

/// Sizes and layouts of `lse_merge_backward`: the merge's ([`LseMergeDims`], whose `out` is
/// not read) and those of the merged output's gradient and of the two states' gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LseMergeBackwardDims {
    pub merge: LseMergeDims,
    pub dout: HeadLayout,
    pub do_prefix: HeadLayout,
    pub do_context: HeadLayout,
}

impl LseMergeBackwardDims {
    /// dO in the merged output's layout, each state's gradient in the state's.
    pub fn new(merge: LseMergeDims) -> Self {
        LseMergeBackwardDims {
            merge,
            dout: merge.out,
            do_prefix: merge.o_prefix,
            do_context: merge.o_context,
        }
    }
}

/// The tensors of `lse_merge_backward`: with λ = sigmoid(lse_prefix − lse_context),
/// `do_prefix = λ·dout`, `do_context = (1 − λ)·dout`, `dlse_prefix = λ(1 − λ)·dout·(o_prefix −
/// o_context) = −dlse_context` (f32 `[B, H, L]`). A state with LSE −∞ gets zero gradients and
/// its output is not read. The merged LSE has no gradient of its own.
#[derive(Debug)]
pub struct LseMergeBackwardArgs<R, W, StatsR, StatsW> {
    pub o_prefix: R,
    pub lse_prefix: StatsR,
    pub o_context: R,
    pub lse_context: StatsR,
    pub dout: R,
    pub do_prefix: W,
    pub dlse_prefix: StatsW,
    pub do_context: W,
    pub dlse_context: StatsW,
}

/// [`LseMergeBackwardArgs`] over host slices (the LSEs and their gradients f32).
pub type HostLseMergeBackwardArgs<'a, T> =
    LseMergeBackwardArgs<&'a [T], &'a mut [T], &'a [f32], &'a mut [f32]>;

impl<R, W, StatsR, StatsW> LseMergeBackwardArgs<R, W, StatsR, StatsW> {
    /// The planner's view of these tensors (see [`PrefixAttentionArgs::bufs`]).
    pub fn bufs<S>(self, s: &mut S) -> LseMergeBackwardBufs
    where
        S: BufSource<R, W> + BufSource<StatsR, StatsW>,
    {
        LseMergeBackwardBufs {
            o_prefix: BufSource::<R, W>::read(s, self.o_prefix),
            lse_prefix: BufSource::<StatsR, StatsW>::read(s, self.lse_prefix),
            o_context: BufSource::<R, W>::read(s, self.o_context),
            lse_context: BufSource::<StatsR, StatsW>::read(s, self.lse_context),
            dout: BufSource::<R, W>::read(s, self.dout),
            do_prefix: BufSource::<R, W>::write(s, self.do_prefix),
            dlse_prefix: BufSource::<StatsR, StatsW>::write(s, self.dlse_prefix),
            do_context: BufSource::<R, W>::write(s, self.do_context),
            dlse_context: BufSource::<StatsR, StatsW>::write(s, self.dlse_context),
        }
    }
}
