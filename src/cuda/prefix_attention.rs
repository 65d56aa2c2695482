//! Prefix attention on the GPU: cudarc buffers in, the same plans as the emulator.

use cudarc::driver::CudaStream;

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::plan::prefix_attention as plan;
use crate::prefix_attention::{
    KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeBackwardArgs, LseMergeBackwardDims,
    LseMergeDims, MultiPrefixAttentionArgs, MultiPrefixDims, PrefixAttention, PrefixAttentionArgs,
    PrefixAttentionBackwardArgs, PrefixAttentionBackwardDims, PrefixAttentionDims, PrefixOnlyArgs,
};
use crate::{Element, Result};

/// [`PrefixAttentionArgs`] over device buffers, as [`prefix_attention`] takes them: annotate a
/// `let` with it to build the arguments before the call.
pub type DevicePrefixAttentionArgs<'a, T> = PrefixAttentionArgs<
    DeviceRead<'a, T>,
    DeviceWrite<'a, T>,
    DeviceRead<'a, u32>,
    DeviceWrite<'a, f32>,
>;
/// [`PrefixOnlyArgs`] over device buffers ([`prefix_only_attention`]).
pub type DevicePrefixOnlyArgs<'a, T> =
    PrefixOnlyArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceWrite<'a, f32>>;
/// [`LseMergeArgs`] over device buffers ([`lse_merge`]).
pub type DeviceLseMergeArgs<'a, T> =
    LseMergeArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceRead<'a, f32>, DeviceWrite<'a, f32>>;
/// [`KvConcatArgs`] over device buffers ([`kv_concat`]).
pub type DeviceKvConcatArgs<'a, T> = KvConcatArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>;

/// Attention over the prefix and the masked context in one pass (see
/// [`crate::prefix_attention`]; with a workspace, decoding splits the keys over more blocks
/// and merges the runs, a second launch), queued on `stream`: the output and, when given
/// buffers, the LSE and the gate λ. Every argument is checked before anything is queued, except the
/// `context_lens` values, which live on the device: the kernel counts a length above
/// `kv_len` as `kv_len` ([`plan::check_context_lens`] checks a host copy).
pub fn prefix_attention<'a, T: Element>(
    stream: &'a CudaStream,
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: DevicePrefixAttentionArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::prefix_attention(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// [`MultiPrefixAttentionArgs`] over device buffers, as [`multi_prefix_attention`] takes them.
pub type DeviceMultiPrefixAttentionArgs<'a, T> = MultiPrefixAttentionArgs<
    DeviceRead<'a, T>,
    DeviceWrite<'a, T>,
    DeviceRead<'a, u32>,
    DeviceRead<'a, i32>,
    DeviceWrite<'a, f32>,
    DeviceWrite<'a, u32>,
>;

/// Multi-tenant prefix attention (see [`crate::prefix_attention::MultiPrefixDims`]), queued
/// on `stream`: each sequence attends over its own prefix of the set, or none. Every
/// argument is checked before anything is queued, except the values of the ids, the offsets
/// and `context_lens`, which live on the device: an id or a prefix range outside the set runs
/// that sequence with no prefix and sets a bit of `status` (see
/// [`MultiPrefixAttentionArgs`]); [`plan::check_prefix_set`] checks host copies.
pub fn multi_prefix_attention<'a, T: Element>(
    stream: &'a CudaStream,
    op: &PrefixAttention,
    dims: &MultiPrefixDims,
    args: DeviceMultiPrefixAttentionArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::multi_prefix_attention(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan; the kernel bounds every
    // prefix read by the set's rows whatever the ids and offsets hold.
    unsafe { bufs.run(&steps) }
}

/// The prefix part alone, `(out_p, LSE_p)`, queued on `stream`.
pub fn prefix_only_attention<'a, T: Element>(
    stream: &'a CudaStream,
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: DevicePrefixOnlyArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::prefix_only_attention(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// Two attention states merged by their LSEs into the gated output, queued on `stream`.
pub fn lse_merge<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &LseMergeDims,
    args: DeviceLseMergeArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::lse_merge(dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// `[P; C]` along the sequence, queued on `stream`.
pub fn kv_concat<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &KvConcatDims,
    args: DeviceKvConcatArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::kv_concat(dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// [`PrefixAttentionBackwardArgs`] over device buffers.
pub type DevicePrefixAttentionBackwardArgs<'a, T> = PrefixAttentionBackwardArgs<
    DeviceRead<'a, T>,
    DeviceWrite<'a, T>,
    DeviceRead<'a, u32>,
    DeviceRead<'a, f32>,
    DeviceWrite<'a, f32>,
>;

/// [`LseMergeBackwardArgs`] over device buffers ([`lse_merge_backward`]).
pub type DeviceLseMergeBackwardArgs<'a, T> = LseMergeBackwardArgs<
    DeviceRead<'a, T>,
    DeviceWrite<'a, T>,
    DeviceRead<'a, f32>,
    DeviceWrite<'a, f32>,
>;

/// The backward of `prefix_attention` (dq, dK, dV, dP_k, dP_v from the forward's output and
/// LSE and the output gradient), queued on `stream`: three launches (the pre-pass, the key
/// kernel, the dq kernel). Every argument is checked before anything is queued, except the
/// `context_lens` values, which live on the device (a length above `kv_len` counts as
/// `kv_len`, as in the forward).
pub fn prefix_attention_backward<'a, T: Element>(
    stream: &'a CudaStream,
    op: &PrefixAttention,
    dims: &PrefixAttentionBackwardDims,
    args: DevicePrefixAttentionBackwardArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::prefix_attention_backward(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// The LSE merge's backward (each state's output and LSE gradient), queued on `stream`.
pub fn lse_merge_backward<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &LseMergeBackwardDims,
    args: DeviceLseMergeBackwardArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::lse_merge_backward(dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}
