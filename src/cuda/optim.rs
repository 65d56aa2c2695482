//! AdamW on the GPU: cudarc buffers in, the same plan as the emulator.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr};

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::optim::{AdamW, AdamwArgs};
use crate::plan::optim as plan;
use crate::{Element, Result};

/// [`AdamwArgs`] over device buffers ([`adamw`]).
pub type DeviceAdamwArgs<'a, T> =
    AdamwArgs<DeviceRead<'a, f32>, DeviceWrite<'a, f32>, DeviceWrite<'a, T>>;

/// One AdamW step `step` (from 1) of `op` over every tensor of `args`, queued on `stream`
/// (see [`crate::optim`]). Every argument is checked before anything is queued. The plan's
/// table (a few words a tensor and a block) is copied to a device allocation of the stream,
/// freed in stream order after the launches (hence the `Arc`, which cudarc allocates through).
pub fn adamw<'a, T: Element>(
    stream: &'a Arc<CudaStream>,
    op: &AdamW,
    step: u64,
    args: DeviceAdamwArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let plan = plan::adamw(op, step, T::DTYPE, &args.bufs(&mut bufs))?;
    bufs.check_before_launch()?;
    let table = stream.clone_htod(&plan.table)?;
    let (addr, _guard) = table.device_ptr(stream);
    // SAFETY: the steps address the table just copied and the buffers of `bufs`, checked
    // by the plan.
    unsafe { bufs.run(&plan.steps(addr)) }
}
