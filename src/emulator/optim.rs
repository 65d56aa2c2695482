//! AdamW on the emulator: host slices in, the same plan as the GPU.

use super::{run, HostBufs};
use crate::optim::{AdamW, HostAdamwArgs};
use crate::plan::optim as plan;
use crate::plan::BufSource;
use crate::{Element, Result};

/// One AdamW step `step` (from 1) of `op` over every tensor of `args`, on the CPU emulator
/// (see [`crate::optim`]). Every argument is checked before anything runs.
pub fn adamw<T: Element>(op: &AdamW, step: u64, args: HostAdamwArgs<'_, T>) -> Result<()> {
    let mut host = HostBufs::default();
    let bufs = args.bufs(&mut host);
    let mut plan = plan::adamw(op, step, T::DTYPE, &bufs)?;
    // The emulator's device memory is host memory: the table is used where it is (a buffer
    // the kernels read and write, like any other of the launch's).
    let table = BufSource::<&[u64], &mut [u64]>::write(&mut host, &mut plan.table[..]);
    host.name([("table", Some(table))]);
    run(&plan.steps(table.addr), &host)
}
