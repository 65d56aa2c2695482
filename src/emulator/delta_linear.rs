//! The delta-linear family on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::delta_linear::{
    DeltaApplyArgs, DeltaApplyDims, DeltaLinear, DeltaLinearArgs, DeltaLinearDims, LoraMergeArgs,
    LoraMergeDims,
};
use crate::plan::delta_linear as plan;
use crate::{Element, Result};

/// `y = compose(x·Wᵀ + b, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)` (see
/// [`crate::delta_linear`]) on the CPU emulator. Every argument is checked before anything
/// runs.
pub fn delta_linear<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeltaLinearArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("x", Some(b.x)),
        ("w", Some(b.w)),
        ("bias", b.bias),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("b_down", b.b_down),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("workspace", Some(b.workspace)),
        ("y", Some(b.y)),
    ]);
    run(&plan::delta_linear(op, dims, T::DTYPE, &b)?, &host)
}

/// `y = compose(h, Δh)` per head slice for a given h (the multi-head parallel adapter with
/// `heads > 1`), on the CPU emulator.
pub fn delta_apply<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeltaApplyArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("h", b.h),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("b_down", b.b_down),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("workspace", Some(b.workspace)),
        ("y", Some(b.y)),
    ]);
    run(&plan::delta_apply(op, dims, T::DTYPE, &b)?, &host)
}

/// Merges LoRA into the frozen weight in place on the CPU emulator, `W ← W + scale·B·A`:
/// `scale` = s to merge, −s to unmerge, with s the LoRA scale α / r (what
/// `DeltaLinear::lora(α, r)` scales by; not α).
pub fn lora_merge<T: Element>(
    dims: &LoraMergeDims,
    scale: f32,
    args: LoraMergeArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("w", Some(b.w)),
        ("lora_a", Some(b.lora_a)),
        ("lora_b", Some(b.lora_b)),
    ]);
    run(&[plan::lora_merge(T::DTYPE, dims, scale, &b)?], &host)
}
