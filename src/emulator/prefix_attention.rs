//! Prefix attention on the emulator: host slices in, the same plans as the GPU.
//!
//! The f16/bf16 attention kernels copy 16-byte chunks, so on the GPU each tensor's rows must
//! start 16-byte aligned (the plan refuses anything else). A host slice need not be: a
//! `Vec<bf16>` promises 2 bytes, and a slice into one starts where the caller cuts it. Here a
//! 16-bit tensor whose slice does not start 16-byte aligned is copied whole into aligned
//! scratch, and an output copied back after the launches ([`realigned`]): any alignment is
//! accepted, at the price of one copy of each such slice per call (about what the kernel's
//! own read of it costs in the emulator). Strides must still be multiples of 8 elements, as
//! on the GPU. f32 runs on kernels of any alignment and is never copied.

use super::{run, HostBufs};
use crate::plan::prefix_attention as plan;
use crate::prefix_attention::{
    HostKvConcatArgs, HostLseMergeArgs, HostLseMergeBackwardArgs, HostMultiPrefixAttentionArgs,
    HostPrefixAttentionArgs, HostPrefixAttentionBackwardArgs, HostPrefixOnlyArgs, KvConcatDims,
    LseMergeBackwardDims, LseMergeDims, MultiPrefixAttentionArgs, MultiPrefixDims, PrefixAttention,
    PrefixAttentionArgs, PrefixAttentionBackwardDims, PrefixAttentionDims, PrefixOnlyArgs,
};
use crate::{DType, Element, Result};

/// Attention over the prefix and the masked context in one pass (see
/// [`crate::prefix_attention`]) on the CPU emulator: the output and, when given buffers,
/// the LSE and the gate λ. Every argument, `context_lens` values included, is checked
/// before anything runs. Slices of any alignment (see [`crate::emulator`]: a misaligned
/// f16/bf16 slice is copied).
pub fn prefix_attention<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: HostPrefixAttentionArgs<'_, T>,
) -> Result<()> {
    let PrefixAttentionArgs {
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        context_lens,
        out,
        lse,
        lambda,
        workspace,
    } = args;
    realigned(
        [q, k, v, prefix_k, prefix_v],
        out,
        |[q, k, v, prefix_k, prefix_v], out| {
            let args = PrefixAttentionArgs {
                q,
                k,
                v,
                prefix_k,
                prefix_v,
                context_lens,
                out,
                lse,
                lambda,
                workspace,
            };
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
            if let Some(lens) = context_lens {
                plan::check_context_lens(lens, dims)?;
            }
            run(&steps, &host)
        },
    )
}

/// Multi-tenant prefix attention (see [`crate::prefix_attention::MultiPrefixDims`]) on the
/// CPU emulator: each sequence attends over its own prefix of the set, or none. Every
/// argument, the ids, offsets and `context_lens` values included, is checked before anything
/// runs. Slices of any alignment, as [`prefix_attention`].
pub fn multi_prefix_attention<T: Element>(
    op: &PrefixAttention,
    dims: &MultiPrefixDims,
    args: HostMultiPrefixAttentionArgs<'_, T>,
) -> Result<()> {
    let MultiPrefixAttentionArgs {
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_offsets,
        prefix_ids,
        context_lens,
        out,
        lse,
        lambda,
        workspace,
        status,
    } = args;
    realigned(
        [q, k, v, prefix_k, prefix_v],
        out,
        |[q, k, v, prefix_k, prefix_v], out| {
            let args = MultiPrefixAttentionArgs {
                q,
                k,
                v,
                prefix_k,
                prefix_v,
                prefix_offsets,
                prefix_ids,
                context_lens,
                out,
                lse,
                lambda,
                workspace,
                status,
            };
            let mut host = HostBufs::default();
            let b = args.bufs(&mut host);
            let a = &b.attention;
            host.name([
                ("q", Some(a.q)),
                ("k", Some(a.k)),
                ("v", Some(a.v)),
                ("prefix_k", Some(a.prefix_k)),
                ("prefix_v", Some(a.prefix_v)),
                ("prefix_offsets", Some(b.prefix_offsets)),
                ("prefix_ids", Some(b.prefix_ids)),
                ("context_lens", a.context_lens),
                ("out", Some(a.out)),
                ("lse", a.lse),
                ("lambda", a.lambda),
                ("workspace", a.workspace),
                ("status", b.status),
            ]);
            let steps = plan::multi_prefix_attention(op, dims, T::DTYPE, &b)?;
            plan::check_prefix_set(prefix_ids, prefix_offsets, dims)?;
            if let Some(lens) = context_lens {
                plan::check_context_lens(lens, &dims.attention)
                    .map_err(|e| e.of("multi_prefix_attention"))?;
            }
            run(&steps, &host)
        },
    )
}

/// The prefix part alone, `(out_p, LSE_p)`, on the CPU emulator. Slices of any alignment
/// (see [`crate::emulator`]: a misaligned f16/bf16 slice is copied).
pub fn prefix_only_attention<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: HostPrefixOnlyArgs<'_, T>,
) -> Result<()> {
    let PrefixOnlyArgs {
        q,
        prefix_k,
        prefix_v,
        out,
        lse,
    } = args;
    realigned(
        [q, prefix_k, prefix_v],
        out,
        |[q, prefix_k, prefix_v], out| {
            let args = PrefixOnlyArgs {
                q,
                prefix_k,
                prefix_v,
                out,
                lse,
            };
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
        },
    )
}

/// Two attention states merged by their LSEs into the gated output on the CPU emulator.
pub fn lse_merge<T: Element>(dims: &LseMergeDims, args: HostLseMergeArgs<'_, T>) -> Result<()> {
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
pub fn kv_concat<T: Element>(dims: &KvConcatDims, args: HostKvConcatArgs<'_, T>) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("prefix", Some(b.prefix)),
        ("src", Some(b.src)),
        ("dst", Some(b.dst)),
    ]);
    run(&plan::kv_concat(dims, T::DTYPE, &b)?, &host)
}

/// A 16-byte aligned copy of `s` (in u128s, whose alignment is 16), when `s` is a 16-bit
/// tensor that does not start 16-byte aligned; `None` when it can be used as it is.
fn aligned_copy<T: Element>(s: &[T]) -> Option<Vec<u128>> {
    if T::DTYPE == DType::F32 || s.is_empty() || (s.as_ptr() as usize) % 16 == 0 {
        return None;
    }
    let mut copy = vec![0u128; std::mem::size_of_val(s).div_ceil(16)];
    elements_mut::<T>(&mut copy)[..s.len()].copy_from_slice(s);
    Some(copy)
}

fn elements<T: Element>(v: &[u128]) -> &[T] {
    bytemuck::cast_slice(v)
}

fn elements_mut<T: Element>(v: &mut [u128]) -> &mut [T] {
    bytemuck::cast_slice_mut(v)
}

/// Runs `f` on the tensors `reads` and `out` as they are, or on 16-byte aligned copies of
/// those that need one ([`aligned_copy`]); a copied `out` is copied back afterwards,
/// whatever `f` returned (a refused call wrote nothing, so the copy changes nothing).
fn realigned<T: Element, const N: usize>(
    reads: [&[T]; N],
    out: &mut [T],
    f: impl FnOnce([&[T]; N], &mut [T]) -> Result<()>,
) -> Result<()> {
    let copies = reads.map(aligned_copy);
    let reads: [&[T]; N] = std::array::from_fn(|i| match &copies[i] {
        Some(copy) => &elements::<T>(copy)[..reads[i].len()],
        None => reads[i],
    });
    let Some(mut copy) = aligned_copy(out) else {
        return f(reads, out);
    };
    let len = out.len();
    let result = f(reads, &mut elements_mut::<T>(&mut copy)[..len]);
    out.copy_from_slice(&elements::<T>(&copy)[..len]);
    result
}

/// The backward of `prefix_attention` (dq, dK, dV, dP_k, dP_v from the forward's output and
/// LSE and the output gradient) on the CPU emulator. Every argument, `context_lens` values
/// included, is checked before anything runs.
pub fn prefix_attention_backward<T: Element>(
    op: &PrefixAttention,
    dims: &PrefixAttentionBackwardDims,
    args: HostPrefixAttentionBackwardArgs<'_, T>,
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
        ("lse", Some(b.lse)),
        ("dout", Some(b.dout)),
        ("dq", Some(b.dq)),
        ("dk", Some(b.dk)),
        ("dv", Some(b.dv)),
        ("dprefix_k", Some(b.dprefix_k.buf())),
        ("dprefix_v", Some(b.dprefix_v.buf())),
        ("workspace", Some(b.workspace)),
    ]);
    let steps = plan::prefix_attention_backward(op, dims, T::DTYPE, &b)?;
    if let Some(lens) = lens {
        plan::check_backward_context_lens(lens, dims)?;
    }
    run(&steps, &host)
}

/// The LSE merge's backward (each state's output and LSE gradient) on the CPU emulator.
pub fn lse_merge_backward<T: Element>(
    dims: &LseMergeBackwardDims,
    args: HostLseMergeBackwardArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    run(&plan::lse_merge_backward(dims, T::DTYPE, &b)?, &host)
}
