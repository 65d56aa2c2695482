//! The delta-linear family on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::delta_linear::{
    DeltaApplyBackwardArgs, DeltaApplyDims, DeltaApplyTrainArgs, DeltaLinear,
    DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs, HostDeltaApplyArgs,
    HostDeltaLinearArgs, HostLoraMergeArgs, LoraMergeDims,
};
use crate::plan::delta_linear as plan;
use crate::plan::delta_linear_backward as backward_plan;
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

/// [`delta_linear`] in training mode: also saves, in `saved` (f32,
/// [`DeltaLinearDims::saved_len`]), what [`delta_linear_backward`] reads.
pub fn delta_linear_train<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeltaLinearTrainArgs<&[T], &mut [T], &mut [f32]>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&plan::delta_linear_train(op, dims, T::DTYPE, &bufs)?)
}

/// The backward of [`delta_linear_train`]'s forward (see
/// [`crate::delta_linear::DeltaLinearBackwardArgs`]) on the CPU emulator.
pub fn delta_linear_backward<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeltaLinearBackwardArgs<&[T], &[f32], &mut [T], &mut [f32]>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&backward_plan::delta_linear_backward(
        op,
        dims,
        T::DTYPE,
        &bufs,
    )?)
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

/// [`delta_apply`] in training mode: also saves z (f32, [`DeltaApplyDims::saved_len`]) for
/// [`delta_apply_backward`].
pub fn delta_apply_train<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeltaApplyTrainArgs<&[T], &mut [T], &mut [f32]>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&plan::delta_apply_train(op, dims, T::DTYPE, &bufs)?)
}

/// The backward of [`delta_apply_train`]'s forward (see
/// [`crate::delta_linear::DeltaApplyBackwardArgs`]) on the CPU emulator.
pub fn delta_apply_backward<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeltaApplyBackwardArgs<&[T], &[f32], &mut [T], &mut [f32]>,
) -> Result<()> {
    let bufs = args.bufs(&mut HostBufs);
    run(&backward_plan::delta_apply_backward(
        op,
        dims,
        T::DTYPE,
        &bufs,
    )?)
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
