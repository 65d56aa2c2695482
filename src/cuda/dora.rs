//! DoRA on the GPU: cudarc buffers in, the same plans as the emulator.

use cudarc::driver::CudaStream;

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::dora::{DoraDims, DoraMergeArgs, DoraNormArgs, DoraScaleArgs, DoraScaleDims};
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

/// `y ← g ⊙ y + bias` per column ([`crate::dora`]) queued on `stream`.
pub fn dora_scale<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &DoraScaleDims,
    args: DoraScaleArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceRead<'a, f32>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let step = plan::dora_scale(T::DTYPE, dims, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&[step]) }
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
