//! The delta-linear family on the GPU: cudarc buffers in, the same plans as the emulator.

use cudarc::driver::CudaStream;

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::delta_linear::{
    DeltaApplyArgs, DeltaApplyDims, DeltaLinear, DeltaLinearArgs, DeltaLinearDims, LoraMergeArgs,
    LoraMergeDims,
};
use crate::plan::delta_linear as plan;
use crate::{Element, Result};

/// `y = compose(x·Wᵀ + b, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)` (see
/// [`crate::delta_linear`]) queued on `stream`. Every argument is checked before anything
/// is queued.
pub fn delta_linear<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeltaLinearArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_linear(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// `y = compose(h, Δh)` per head slice for a given h (the multi-head parallel adapter with
/// `heads > 1`), queued on `stream`.
pub fn delta_apply<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeltaApplyArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_apply(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// Merges LoRA into the frozen weight in place on `stream`, `W ← W + alpha·B·A` (alpha =
/// s to merge, −s to unmerge).
pub fn lora_merge<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &LoraMergeDims,
    alpha: f32,
    args: LoraMergeArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let step = plan::lora_merge(T::DTYPE, dims, alpha, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&[step]) }
}
