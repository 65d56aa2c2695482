//! Prefix attention on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::plan::prefix_attention as plan;
use crate::prefix_attention::{
    KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeDims, PrefixAttention, PrefixAttentionArgs,
    PrefixAttentionDims, PrefixOnlyArgs,
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
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("q", Some(b.q)),
        ("k", Some(b.k)),
        ("v", Some(b.v)),
        ("prefix_k", Some(b.prefix_k)),
        ("prefix_v", Some(b.prefix_v)),
        ("context_lens", b.context_lens),
        ("out", Some(b.out)),
        ("lse", b.lse),
        ("lambda", b.lambda),
        ("workspace", b.workspace),
    ]);
    let steps = plan::prefix_attention(op, dims, T::DTYPE, &b)?;
    if let Some(lens) = lens {
        plan::check_context_lens(lens, dims)?;
    }
    run(&steps, &host)
}

/// The prefix part alone, `(out_p, LSE_p)`, on the CPU emulator.
pub fn prefix_only_attention<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("q", Some(b.q)),
        ("prefix_k", Some(b.prefix_k)),
        ("prefix_v", Some(b.prefix_v)),
        ("out", Some(b.out)),
        ("lse", Some(b.lse)),
    ]);
    run(&plan::prefix_only_attention(op, dims, T::DTYPE, &b)?, &host)
}

/// Two attention states merged by their LSEs into the gated output on the CPU emulator.
pub fn lse_merge<T: Element>(
    dims: &LseMergeDims,
    args: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("o_prefix", Some(b.o_prefix)),
        ("lse_prefix", Some(b.lse_prefix)),
        ("o_context", Some(b.o_context)),
        ("lse_context", Some(b.lse_context)),
        ("out", Some(b.out)),
        ("lse", b.lse),
        ("lambda", b.lambda),
    ]);
    run(&plan::lse_merge(dims, T::DTYPE, &b)?, &host)
}

/// `[P; C]` along the sequence on the CPU emulator.
pub fn kv_concat<T: Element>(
    dims: &KvConcatDims,
    args: KvConcatArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("prefix", Some(b.prefix)),
        ("src", Some(b.src)),
        ("dst", Some(b.dst)),
    ]);
    run(&plan::kv_concat(dims, T::DTYPE, &b)?, &host)
}
