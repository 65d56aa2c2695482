//! DoRA on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::dora::{DoraDims, DoraMergeArgs, DoraNormArgs, DoraScaleArgs, DoraScaleDims};
use crate::plan::dora as plan;
use crate::{Element, Result};

/// `g = m / ‖W + scale·B·A‖` per row ([`crate::dora`]) on the CPU emulator.
pub fn dora_norm<T: Element>(
    dims: &DoraDims,
    scale: f32,
    args: DoraNormArgs<&[T], &mut [f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let bufs = args.bufs(&mut host);
    run(&[plan::dora_norm(T::DTYPE, dims, scale, &bufs)?], &host)
}

/// `y ← g ⊙ y + bias` per column ([`crate::dora`]) on the CPU emulator.
pub fn dora_scale<T: Element>(
    dims: &DoraScaleDims,
    args: DoraScaleArgs<&[T], &mut [T], &[f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let bufs = args.bufs(&mut host);
    run(&[plan::dora_scale(T::DTYPE, dims, &bufs)?], &host)
}

/// DoRA's merge `W ← g ⊙ (W + scale·B·A)` per row, or with `unmerge` `W ← W / g − scale·B·A`
/// ([`crate::dora`]), on the CPU emulator.
pub fn dora_merge<T: Element>(
    dims: &DoraDims,
    scale: f32,
    unmerge: bool,
    args: DoraMergeArgs<&[T], &mut [T], &[f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let bufs = args.bufs(&mut host);
    let p = plan::dora_merge(T::DTYPE, dims, scale, unmerge, &bufs)?;
    if p.unmerge {
        run(&[p.scale], &host)?;
        run(&[p.merge], &host)
    } else {
        run(&[p.merge], &host)?;
        run(&[p.scale], &host)
    }
}
