//! DoRA on the GPU: cudarc buffers in, the same plans as the emulator.

use cudarc::driver::CudaStream;

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::delta_linear::{DeltaLinear, DeltaLinearDims};
use crate::dora::{
    DoraDims, DoraLinearArgs, DoraLinearBackwardArgs, DoraLinearTrainArgs, DoraMergeArgs,
    DoraNormArgs,
};
use crate::plan::dora as plan;
use crate::{Element, Result};

/// `g = m / ‖W + scale·B·A‖` per row ([`crate::dora`]) queued on `stream`.
pub fn dora_norm<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &DoraDims,
    scale: f32,
    args: DoraNormArgs<DeviceRead<'a, T>, DeviceWrite<'a, f32>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let step = plan::dora_norm(T::DTYPE, dims, scale, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&[step]) }
}

/// The DoRA forward `y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b` ([`crate::dora`]) queued on `stream`.
pub fn dora_linear<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceRead<'a, f32>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::dora_linear(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// [`dora_linear`] in training mode, queued on `stream`: also saves, in `saved` (f32,
/// [`DeltaLinearDims::dora_saved_len`]), what [`dora_linear_backward`] reads.
pub fn dora_linear_train<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearTrainArgs<
        DeviceRead<'a, T>,
        DeviceWrite<'a, T>,
        DeviceRead<'a, f32>,
        DeviceWrite<'a, f32>,
    >,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::dora_linear_train(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// The backward of [`dora_linear_train`]'s forward (see
/// [`crate::dora::DoraLinearBackwardArgs`]), queued on `stream`.
pub fn dora_linear_backward<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearBackwardArgs<
        DeviceRead<'a, T>,
        DeviceRead<'a, f32>,
        DeviceWrite<'a, T>,
        DeviceWrite<'a, f32>,
    >,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let p = plan::dora_linear_backward(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    bufs.check_before_launch()?;
    // SAFETY: as above; `bufs` (the buffers' stream-order guards) lives until every step is
    // queued.
    unsafe {
        for (l, q) in &p.columns {
            super::launch(stream, l, q)?;
        }
        for (l, q) in &p.backward {
            super::launch(stream, l, q)?;
        }
    }
    drop(bufs);
    Ok(())
}

/// DoRA's merge, or with `unmerge` its inverse ([`crate::dora`]), queued on `stream`.
pub fn dora_merge<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &DoraDims,
    scale: f32,
    unmerge: bool,
    args: DoraMergeArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceRead<'a, f32>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let p = plan::dora_merge(T::DTYPE, dims, scale, unmerge, &args.bufs(&mut bufs))?;
    bufs.check_before_launch()?;
    // SAFETY: as above; `bufs` (the buffers' stream-order guards) lives until both are queued.
    unsafe {
        if p.unmerge {
            super::launch(stream, &p.scale.0, &p.scale.1)?;
            super::launch(stream, &p.merge.0, &p.merge.1)?;
        } else {
            super::launch(stream, &p.merge.0, &p.merge.1)?;
            super::launch(stream, &p.scale.0, &p.scale.1)?;
        }
    }
    drop(bufs);
    Ok(())
}
