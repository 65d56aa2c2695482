//! DoRA on the emulator: host slices in, the same plans as the GPU.

use super::delta_linear::linear_names;
use super::{run, run2, HostBufs};
use crate::delta_linear::{DeltaLinear, DeltaLinearDims};
use crate::dora::{
    DoraDims, DoraLinearArgs, DoraLinearBackwardArgs, DoraLinearTrainArgs, DoraMergeArgs,
    DoraNormArgs,
};
use crate::plan::dora as plan;
use crate::{Element, Result};

/// `g = m / ‖W + scale·B·A‖` per row ([`crate::dora`]) on the CPU emulator.
pub fn dora_norm<T: Element>(
    dims: &DoraDims,
    scale: f32,
    args: DoraNormArgs<&[T], &mut [f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("w", Some(b.w)),
        ("w_down", Some(b.w_down)),
        ("w_up", Some(b.w_up)),
        ("magnitude", Some(b.magnitude)),
        ("g", Some(b.g)),
        ("norm", b.norm),
    ]);
    run(&[plan::dora_norm(T::DTYPE, dims, scale, &b)?], &host)
}

/// The DoRA forward `y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b` ([`crate::dora`]) on the CPU emulator.
pub fn dora_linear<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearArgs<&[T], &mut [T], &[f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(linear_names(&b.forward));
    host.name([("g", Some(b.g))]);
    run(&plan::dora_linear(op, dims, T::DTYPE, &b)?, &host)
}

/// [`dora_linear`] in training mode: also saves, in `saved` (f32,
/// [`DeltaLinearDims::dora_saved_len`]), what [`dora_linear_backward`] reads.
pub fn dora_linear_train<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearTrainArgs<&[T], &mut [T], &[f32], &mut [f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(linear_names(&b.train.forward));
    host.name([("saved", Some(b.train.saved)), ("g", Some(b.g))]);
    run(&plan::dora_linear_train(op, dims, T::DTYPE, &b)?, &host)
}

/// The backward of [`dora_linear_train`]'s forward (see
/// [`crate::dora::DoraLinearBackwardArgs`]) on the CPU emulator.
pub fn dora_linear_backward<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearBackwardArgs<&[T], &[f32], &mut [T], &mut [f32]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    let bw = &b.backward;
    host.name([
        ("dy", Some(bw.dy)),
        ("x", Some(bw.x)),
        ("w", Some(bw.w)),
        ("w_down", Some(bw.w_down)),
        ("w_up", Some(bw.w_up)),
        ("saved", Some(bw.saved)),
        ("dx", Some(bw.dx)),
        ("dw_down", Some(bw.dw_down)),
        ("db_down", bw.db_down),
        ("dw_up", Some(bw.dw_up)),
        ("db_up", bw.db_up),
        ("workspace", Some(bw.workspace)),
        ("g", Some(b.g)),
        ("norm", Some(b.norm)),
        ("dmagnitude", Some(b.dmagnitude)),
    ]);
    let p = plan::dora_linear_backward(op, dims, T::DTYPE, &b)?;
    run2(&p.columns, &p.backward, &host)
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
    let b = args.bufs(&mut host);
    host.name([
        ("w", Some(b.w)),
        ("w_down", Some(b.w_down)),
        ("w_up", Some(b.w_up)),
        ("g", Some(b.g)),
    ]);
    let p = plan::dora_merge(T::DTYPE, dims, scale, unmerge, &b)?;
    if p.unmerge {
        run2(&[p.scale], &[p.merge], &host)
    } else {
        run2(&[p.merge], &[p.scale], &host)
    }
}
