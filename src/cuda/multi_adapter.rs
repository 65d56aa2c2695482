//! Multi-adapter batches on the GPU: a device adapter set, device batches, the same plans as
//! the emulator.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::error::{Error, Result};
use crate::multi_adapter::{Adapter, AdapterSet, MultiDeltaDims, MultiDeltaLinearArgs, Slots};
use crate::plan::multi_adapter::{self as plan, AdapterEntry, SetView};
use crate::plan::Buf;
use crate::Element;

/// [`MultiDeltaLinearArgs`] over device buffers ([`multi_delta_linear`]).
pub type DeviceMultiDeltaLinearArgs<'a, T> = MultiDeltaLinearArgs<
    DeviceRead<'a, T>,
    DeviceRead<'a, i32>,
    DeviceWrite<'a, T>,
    DeviceWrite<'a, u32>,
>;

/// The adapters of one linear layer [n, k] in device memory (see [`crate::multi_adapter`]):
/// each adapter its own allocations (`CudaSlice`s, at its own rank), a device table of
/// `capacity` entries that the kernels read. Inserting or removing an adapter writes its one
/// table entry (48 bytes, queued on the set's stream) and touches no other adapter. Every
/// call on the set must be queued on the set's stream (the kernels reach the adapters through
/// the table, outside cudarc's per-buffer stream tracking): others are refused.
pub struct DeviceAdapterSet<T: Element> {
    stream: Arc<CudaStream>,
    slots: Slots,
    adapters: Vec<Option<Adapter<CudaSlice<T>>>>,
    table: CudaSlice<u8>,
}

impl<T: Element> DeviceAdapterSet<T> {
    /// An empty set of `capacity` slots for layer [n, k] taking ranks 1..=`max_rank`.
    pub fn new(
        stream: &Arc<CudaStream>,
        n: usize,
        k: usize,
        capacity: usize,
        max_rank: usize,
    ) -> Result<Self> {
        let slots = Slots::new(n, k, capacity, max_rank)?;
        let table = stream.alloc_zeros::<u8>(capacity * size_of::<AdapterEntry>())?;
        Ok(DeviceAdapterSet {
            stream: stream.clone(),
            adapters: (0..capacity).map(|_| None).collect(),
            slots,
            table,
        })
    }

    /// Adds an adapter whose tensors are already on the device (of the set's context) and
    /// returns its id.
    pub fn insert(&mut self, a: Adapter<CudaSlice<T>>) -> Result<usize> {
        let (slot, entry) = self.slots.check(&a, |b| b.len())?;
        self.place(slot, entry, a)
    }

    /// A device copy of a host set, with the same ids.
    pub fn from_host(stream: &Arc<CudaStream>, host: &AdapterSet<T>) -> Result<Self> {
        let (n, k) = host.layer();
        let mut set = Self::new(stream, n, k, host.capacity(), host.max_rank())?;
        for slot in 0..host.capacity() {
            if let Some(a) = host.get(slot) {
                let (_, entry) = set.slots.check(a, Vec::len)?;
                let device = set.upload(a)?;
                set.place(slot, entry, device)?;
            }
        }
        Ok(set)
    }

    /// Fills the empty `slot` with `a`, whose checked entry (without addresses) is `entry`.
    fn place(
        &mut self,
        slot: usize,
        mut entry: AdapterEntry,
        a: Adapter<CudaSlice<T>>,
    ) -> Result<usize> {
        let s = &self.stream;
        if [
            Some(&a.w_down),
            a.b_down.as_ref(),
            Some(&a.w_up),
            a.b_up.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|b| b.stream().context() != s.context())
        {
            return Err(Error::invalid(
                "adapter",
                "tensors of the set's context",
                "a tensor of another context",
            )
            .of("DeviceAdapterSet::insert"));
        }
        let addr = |b: &CudaSlice<T>| b.device_ptr(s).0;
        (entry.w_down, entry.w_up) = (addr(&a.w_down), addr(&a.w_up));
        entry.b_down = a.b_down.as_ref().map_or(0, addr);
        entry.b_up = a.b_up.as_ref().map_or(0, addr);
        self.write_entry(slot, entry)?;
        self.adapters[slot] = Some(a);
        Ok(slot)
    }

    /// Uploads a host adapter and adds it.
    pub fn insert_host(&mut self, a: &Adapter<Vec<T>>) -> Result<usize> {
        // Checked before the upload too, so a bad adapter costs no copy.
        self.slots.check(a, Vec::len)?;
        let device = self.upload(a)?;
        self.insert(device)
    }

    fn upload(&self, a: &Adapter<Vec<T>>) -> Result<Adapter<CudaSlice<T>>> {
        let up = |v: &Vec<T>| self.stream.clone_htod(v.as_slice());
        Ok(Adapter {
            op: a.op,
            w_down: up(&a.w_down)?,
            b_down: a.b_down.as_ref().map(up).transpose()?,
            w_up: up(&a.w_up)?,
            b_up: a.b_up.as_ref().map(up).transpose()?,
        })
    }

    /// The planner's view, the table at its device address (for calls on the set's stream).
    pub(crate) fn view(&self) -> SetView<'_> {
        let table = Buf {
            addr: self.table.device_ptr(&self.stream).0,
            len: self.slots.entries.len(),
        };
        self.slots.view(table)
    }

    /// Removes adapter `id` (its entry is emptied on the stream before its memory can be
    /// reused: cudarc frees stream-ordered) and returns it.
    pub fn remove(&mut self, id: usize) -> Result<Adapter<CudaSlice<T>>> {
        self.slots.filled(id)?;
        self.write_entry(id, AdapterEntry::default())?;
        Ok(self.adapters[id]
            .take()
            .expect("a filled slot holds its adapter"))
    }

    /// The rank of adapter `id`, if its slot is filled.
    pub fn rank(&self, id: usize) -> Option<usize> {
        let e = self.slots.entries.get(id)?;
        (e.rank > 0).then_some(e.rank as usize)
    }

    /// The largest rank the set takes.
    pub fn max_rank(&self) -> usize {
        self.slots.max_rank
    }

    /// The table's entries as the host last wrote them (device addresses): for the
    /// unfused baseline, which launches per adapter group.
    #[cfg(feature = "baseline")]
    pub(crate) fn entries(&self) -> &[AdapterEntry] {
        &self.slots.entries
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.slots.entries.len()
    }

    fn write_entry(&mut self, slot: usize, entry: AdapterEntry) -> Result<()> {
        let at = slot * size_of::<AdapterEntry>();
        let bytes = bytemuck::bytes_of(&entry);
        let mut dst = self.table.slice_mut(at..at + bytes.len());
        self.stream.memcpy_htod(bytes, &mut dst)?;
        self.slots.entries[slot] = entry;
        Ok(())
    }
}

/// `y = x·Wᵀ + b + (each row's own adapter delta)` over the adapters of `set` (see
/// [`crate::multi_adapter`]), queued on `stream` (the set's). The batch and the status are
/// device buffers: nothing is read back, so the call can be captured in a CUDA graph; bad
/// device ids are handled by the kernels ([`crate::multi_adapter::MultiStatus`]).
pub fn multi_delta_linear<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &MultiDeltaDims,
    set: &'a DeviceAdapterSet<T>,
    args: DeviceMultiDeltaLinearArgs<'a, T>,
) -> Result<()> {
    if !std::ptr::eq(stream, &*set.stream) {
        return Err(
            Error::invalid("stream", "the adapter set's stream", "another stream")
                .of("multi_delta_linear"),
        );
    }
    let mut bufs = Buffers::new(stream);
    let b = args.bufs(&mut bufs);
    let table = Buf {
        addr: bufs.read(&set.table),
        len: set.slots.entries.len(),
    };
    let steps = plan::multi_delta_linear(dims, T::DTYPE, &set.slots.view(table), &b, None)?;
    bufs.check_before_launch()?;
    // SAFETY: the addresses came from `bufs` and the set, checked by the plan; the kernels
    // guard the device ids. `bufs` keeps the guards until every step is queued.
    unsafe {
        for (l, p) in &steps.delta {
            super::launch(stream, l, p)?;
        }
        for (l, p) in &steps.frozen {
            super::launch(stream, l, p)?;
        }
    }
    drop(bufs);
    Ok(())
}
