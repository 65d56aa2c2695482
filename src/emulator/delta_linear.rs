//! The delta-linear family on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::delta_linear::{
    DeltaApplyDims, DeltaLinear, DeltaLinearDims, HostDeltaApplyArgs, HostDeltaLinearArgs,
    HostLoraMergeArgs, LoraMergeDims,
};
use crate::plan::delta_linear as plan;
use crate::{Element, Result};

/// `y = compose(x·Wᵀ + b, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)` (see
/// [`crate::delta_linear`]) on the CPU emulator. Every argument is checked before anything
/// runs.
pub fn delta_linear<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearArgs<'_, T>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&plan::delta_linear(op, dims, T::DTYPE, &bufs)?)
}

/// `y = compose(h, Δh)` per head slice for a given h (the multi-head parallel adapter with
/// `heads > 1`), on the CPU emulator.
pub fn delta_apply<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: HostDeltaApplyArgs<'_, T>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&plan::delta_apply(op, dims, T::DTYPE, &bufs)?)
}

/// Merges LoRA into the frozen weight in place on the CPU emulator, `W ← W + scale·B·A`
/// (B·A = W_up·W_down): `scale` = s to merge, −s to unmerge, with s the layer's LoRA scale
/// (not α): `op.composition.scale(dims.r)` of its [`DeltaLinear`]
/// ([`crate::Composition::scale`]).
pub fn lora_merge<T: Element>(
    dims: &LoraMergeDims,
    scale: f32,
    args: HostLoraMergeArgs<'_, T>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&[plan::lora_merge(T::DTYPE, dims, scale, &bufs)?])
}
