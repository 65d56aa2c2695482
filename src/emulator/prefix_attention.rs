//! Prefix attention on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::plan::prefix_attention as plan;
use crate::prefix_attention::{
    KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeBackwardArgs, LseMergeBackwardDims,
    LseMergeDims, PrefixAttention, PrefixAttentionArgs, PrefixAttentionBackwardDims,
    PrefixAttentionBackwardHostArgs, PrefixAttentionDims, PrefixOnlyArgs,
};
use crate::{Element, Result};

/// Attention over the prefix and the masked context in one pass (see
/// [`crate::prefix_attention`]) on the CPU emulator: the output and, when given buffers,
/// the LSE and the gate λ. Every argument, `context_lens` values included, is checked
/// before anything runs.
pub fn prefix_attention<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: PrefixAttentionArgs<&[T], &mut [T], &[u32], &mut [f32]>,
) -> Result<()> {
    let lens = args.context_lens;
    let steps = plan::prefix_attention(op, dims, T::DTYPE, &args.bufs(&mut HostBufs))?;
    if let Some(lens) = lens {
        plan::check_context_lens(lens, dims)?;
    }
    run(&steps)
}

/// The prefix part alone, `(out_p, LSE_p)`, on the CPU emulator.
pub fn prefix_only_attention<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
) -> Result<()> {
    run(&plan::prefix_only_attention(
        op,
        dims,
        T::DTYPE,
        &args.bufs(&mut HostBufs),
    )?)
}

/// Two attention states merged by their LSEs into the gated output on the CPU emulator.
pub fn lse_merge<T: Element>(
    dims: &LseMergeDims,
    args: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
) -> Result<()> {
    run(&plan::lse_merge(dims, T::DTYPE, &args.bufs(&mut HostBufs))?)
}

/// `[P; C]` along the sequence on the CPU emulator.
pub fn kv_concat<T: Element>(
    dims: &KvConcatDims,
    args: KvConcatArgs<&[T], &mut [T]>,
) -> Result<()> {
    run(&plan::kv_concat(dims, T::DTYPE, &args.bufs(&mut HostBufs))?)
}

/// The backward of `prefix_attention` (dq, dK, dV, dP_k, dP_v from the forward's output and
/// LSE and the output gradient) on the CPU emulator. Every argument, `context_lens` values
/// included, is checked before anything runs.
pub fn prefix_attention_backward<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionBackwardDims,
    args: PrefixAttentionBackwardHostArgs<'_, T>,
) -> Result<()> {
    let lens = args.context_lens;
    let steps = plan::prefix_attention_backward(op, dims, T::DTYPE, &args.bufs(&mut HostBufs))?;
    if let Some(lens) = lens {
        plan::check_backward_context_lens(lens, dims)?;
    }
    run(&steps)
}

/// The LSE merge's backward (each state's output and LSE gradient) on the CPU emulator.
pub fn lse_merge_backward<T: Element>(
    dims: &LseMergeBackwardDims,
    args: LseMergeBackwardArgs<&[T], &mut [T], &[f32], &mut [f32]>,
) -> Result<()> {
    run(&plan::lse_merge_backward(
        dims,
        T::DTYPE,
        &args.bufs(&mut HostBufs),
    )?)
}
