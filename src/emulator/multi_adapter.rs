//! Multi-adapter batches on the emulator: host slices and a host [`AdapterSet`] in, the same
//! plans as the GPU.

use super::{run2, HostBufs};
use crate::multi_adapter::{AdapterSet, HostMultiDeltaLinearArgs, MultiDeltaDims};
use crate::plan::multi_adapter as plan;
use crate::plan::BufSource;
use crate::{Element, Result};

/// `y = x·Wᵀ + b + (each row's own adapter delta)` over the adapters of `set` (see
/// [`crate::multi_adapter`]) on the CPU emulator. Every argument, and every id of the batch,
/// is checked before anything runs.
pub fn multi_delta_linear<T: Element>(
    dims: &MultiDeltaDims,
    set: &AdapterSet<T>,
    args: HostMultiDeltaLinearArgs<'_, T>,
) -> Result<()> {
    let batch = args.batch;
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("x", Some(b.x)),
        ("w", Some(b.w)),
        ("bias", b.bias),
        ("status", b.status),
        ("workspace", Some(b.workspace)),
        ("y", Some(b.y)),
    ]);
    let table = BufSource::<&[_], &mut [u8]>::read(&mut host, set.table());
    host.name([("adapter table", Some(table))]);
    for t in set.buffers() {
        let t = BufSource::<&[T], &mut [u8]>::read(&mut host, t);
        host.name([("adapter tensor", Some(t))]);
    }
    let steps = plan::multi_delta_linear(dims, T::DTYPE, &set.view(), &b, Some(batch))?;
    // One plan for the checks: the fused pass reads the t the shrink wrote in the workspace.
    run2(&steps.delta, &steps.frozen, &host)
}
