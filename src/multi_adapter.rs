//! Many adapters of one linear layer in one batch (serving many fine-tunes of one base model,
//! as Punica, S-LoRA and vLLM do for LoRA), kernels/multi_delta_linear.cu:
//!
//! ```text
//! y[m] = x[m]·Wᵀ + b + s_a·f_a(x[m]·W_down,aᵀ + b_down,a)·W_up,aᵀ + s_a·b_up,a,   a = a(m)
//! ```
//!
//! # The adapter set
//!
//! An [`AdapterSet`] (host memory: the emulator and host backends) or a
//! `cuda::DeviceAdapterSet` (device memory) holds the adapters of one layer [n, k]: up to
//! `capacity` of them, each of its own method of the parallel family ([`DeltaLinear::lora`],
//! [`DeltaLinear::rslora`], [`DeltaLinear::parallel_adapter`] with any activation and scale,
//! or any parallel [`DeltaLinear`] composed by `Add`, `Scaled` or `Lora`), its own rank
//! 1..=`max_rank` (at most [`MAX_RANK`]) taken from W_down's rows, optional biases. Each
//! adapter is its own allocation, stored at its own rank (no padding to the largest); the set
//! keeps a table of entries (the weights' addresses, rank, activation, resolved scale) that
//! the kernels read. Adding an adapter fills a free slot, removing one empties its slot:
//! neither moves nor copies another adapter, and a slot's id stays valid until removed.
//! Sequential adapters (Houlsby) and gated compositions are refused with
//! [`crate::Error::Unsupported`]: their delta reads h, or a per-row gate.
//!
//! # The batch
//!
//! [`AdapterBatch::Rows`]: one i32 id per row (−1: the base layer alone), for decode.
//! [`AdapterBatch::Segments`]: rows grouped by adapter, `starts` [segments + 1] (from 0 to m,
//! never decreasing: empty segments are fine) and one id per segment, for prefill. Both give
//! the same result. On the GPU both live in device memory and the call reads nothing back:
//! a step launches without host synchronisation and can be captured in a CUDA graph (the
//! launches depend only on m, the layer, the set's capacity and `max_rank`, never on which
//! adapters the batch uses).
//!
//! Bad ids: host-visible ids (the emulator, `host::`) are checked before anything launches, an
//! `Err` naming `batch.ids` or `batch.starts`. Device ids are checked by the kernels, which
//! never read out of bounds: a row whose id is out of range, names an empty slot, or that no
//! segment covers gets the base layer alone (y = x·Wᵀ + b), and the kernel ORs a bit of
//! [`MultiStatus`] into the optional `status` word, which the caller zeroes and reads back
//! when it wants to know.
//!
//! # Precision
//!
//! Products accumulate in f32; t = s·f(z) is stored in T (as delta_linear's t). Where the
//! frozen GEMM runs on the tensor cores (f16/bf16, x and W 16-byte copyable: `Auto`,
//! `TensorCore`) the call is two launches, the shrink writing t and one pass adding each
//! row's t·W_up,aᵀ + s_a·b_up,a to x·Wᵀ + b in the same f32 accumulators, writing y once
//! (kernels/multi_delta_linear.cu). Elsewhere (f32, unaligned operands, `Simt`, `Wgmma`) the
//! delta is written to y first and the frozen GEMM adds y: one more rounding to T of the
//! delta (|Δ|·2^-8 in bf16; f32 under `Auto`). The naive kernel rounds only t.

use crate::delta_linear::{DeltaLinear, KernelVariant};
use crate::error::{Error, Result};
use crate::plan::multi_adapter::{
    adapter_entry, frozen_dims, AdapterEntry, MultiDeltaBufs, SetView,
};
use crate::plan::{Buf, BufSource};
use crate::spec::DEFAULT_SPLIT_TARGET;
use crate::Element;

/// The largest rank an adapter of a set may have.
pub const MAX_RANK: usize = 256;
/// The most slots a set may have.
pub const MAX_CAPACITY: usize = 1 << 20;

/// Bits of the `status` word that the kernels OR in for device ids they refused (the row then
/// gets the base layer alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultiStatus;

impl MultiStatus {
    /// An id below −1 or past the set's capacity.
    pub const ID_OUT_OF_RANGE: u32 = 1;
    /// An id naming an empty slot (a removed adapter).
    pub const EMPTY_SLOT: u32 = 2;
    /// A row no segment covers (segment starts out of order, or not from 0 to m).
    pub const ROW_UNCOVERED: u32 = 4;
}

/// Which adapter each row of a batch uses (the buffers are i32, in the backend's memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterBatch<I> {
    /// One id per row, `[m]`; −1: no adapter.
    Rows(I),
    /// Segments of consecutive rows: `starts` [segments + 1], from 0 to m and never
    /// decreasing; `ids` `[segments]` (−1: no adapter).
    Segments { starts: I, ids: I },
}

impl<I> AdapterBatch<I> {
    /// The same description over other buffers.
    pub fn map<J>(self, mut f: impl FnMut(I) -> J) -> AdapterBatch<J> {
        match self {
            AdapterBatch::Rows(ids) => AdapterBatch::Rows(f(ids)),
            AdapterBatch::Segments { starts, ids } => AdapterBatch::Segments {
                starts: f(starts),
                ids: f(ids),
            },
        }
    }
}

/// The adapter of each row that a batch description names (for references and tests):
/// `Rows` as given; `Segments` expanded. An `Err` for segments that do not cover 0..m.
pub fn rows_of(batch: AdapterBatch<&[i32]>, m: usize) -> Result<Vec<i32>> {
    match batch {
        AdapterBatch::Rows(ids) => Ok(ids.to_vec()),
        AdapterBatch::Segments { starts, ids } => {
            let bad = || Error::invalid("batch.starts", format!("segments covering 0..{m}"), "");
            if starts.len() != ids.len() + 1 {
                return Err(bad());
            }
            let mut rows = Vec::with_capacity(m);
            for (s, &id) in ids.iter().enumerate() {
                let (a, b) = (starts[s], starts[s + 1]);
                if a as usize != rows.len() || b < a {
                    return Err(bad());
                }
                rows.extend(std::iter::repeat_n(id, (b - a) as usize));
            }
            (rows.len() == m).then_some(rows).ok_or_else(bad)
        }
    }
}

/// One adapter's method and tensors: `w_down` `[rank, k]` (LoRA A), `b_down` `[rank]`,
/// `w_up` `[n, rank]` (LoRA B), `b_up` `[n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter<B> {
    pub op: DeltaLinear,
    pub w_down: B,
    pub b_down: Option<B>,
    pub w_up: B,
    pub b_up: Option<B>,
}

/// Sizes and row strides of a multi-adapter call: x [m, k] (row stride `ld_x`), W [n, k],
/// y [m, n] (row stride `ld_y`). `m = 0` is a valid call that launches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultiDeltaDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_x: usize,
    pub ld_y: usize,
    /// `Naive`: one kernel computing everything per output (the baseline); any other: the
    /// delta passes, then the frozen GEMM on that variant (as `delta_linear` runs it).
    pub kernel: KernelVariant,
    /// As [`crate::delta_linear::DeltaLinearDims::split_target`], for the frozen GEMM.
    pub split_target: usize,
}

impl MultiDeltaDims {
    /// Contiguous x and y.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        MultiDeltaDims {
            m,
            n,
            k,
            ld_x: k,
            ld_y: n,
            kernel: KernelVariant::Auto,
            split_target: DEFAULT_SPLIT_TARGET,
        }
    }
    /// Elements of the workspace for a set whose ranks are at most `max_rank`: t [m,
    /// max_rank rounded up to 8] and the frozen GEMM's split-K room (as
    /// `DeltaLinearDims::workspace_len`). Saturates at `usize::MAX`.
    pub fn workspace_len(&self, max_rank: usize) -> usize {
        frozen_dims(self, max_rank.clamp(1, MAX_RANK)).workspace_len()
    }
    /// The least workspace a call takes: t alone (the frozen GEMM then never splits).
    pub fn min_workspace_len(&self, max_rank: usize) -> usize {
        frozen_dims(self, max_rank.clamp(1, MAX_RANK)).min_workspace_len()
    }
}

/// The tensors of a multi-adapter call over a backend's buffer types: `R` element buffers
/// read, `I` i32 buffers read, `W` element buffers written, `S` the u32 status written.
#[derive(Debug)]
pub struct MultiDeltaLinearArgs<R, I, W, S> {
    /// [m, k], row stride `ld_x`.
    pub x: R,
    /// The frozen weight [n, k].
    pub w: R,
    /// `[n]`.
    pub bias: Option<R>,
    /// Which adapter each row uses.
    pub batch: AdapterBatch<I>,
    /// One u32 the kernels OR [`MultiStatus`] bits into (zero it first); `None`: not reported.
    pub status: Option<S>,
    /// Scratch of at least [`MultiDeltaDims::min_workspace_len`] elements (of the set's
    /// `max_rank`).
    pub workspace: W,
    /// [m, n], row stride `ld_y`.
    pub y: W,
}

/// [`MultiDeltaLinearArgs`] over host slices (`emulator::multi_delta_linear`).
pub type HostMultiDeltaLinearArgs<'a, T> =
    MultiDeltaLinearArgs<&'a [T], &'a [i32], &'a mut [T], &'a mut [u32]>;

impl<R, I, W, S> MultiDeltaLinearArgs<R, I, W, S> {
    /// The planner's view of these tensors.
    pub fn bufs<Src>(self, s: &mut Src) -> MultiDeltaBufs
    where
        Src: BufSource<R, W> + BufSource<I, S>,
    {
        MultiDeltaBufs {
            x: BufSource::<R, W>::read(s, self.x),
            w: BufSource::<R, W>::read(s, self.w),
            bias: self.bias.map(|b| BufSource::<R, W>::read(s, b)),
            batch: self.batch.map(|b| BufSource::<I, S>::read(s, b)),
            status: self.status.map(|b| BufSource::<I, S>::write(s, b)),
            workspace: BufSource::<R, W>::write(s, self.workspace),
            y: BufSource::<R, W>::write(s, self.y),
        }
    }
}

/// The slot bookkeeping shared by the host and device sets: the layer, the limits, the
/// entries (addresses in the set's memory) and which slots are free.
#[derive(Clone, Debug)]
pub(crate) struct Slots {
    pub n: usize,
    pub k: usize,
    pub max_rank: usize,
    pub entries: Vec<AdapterEntry>,
}

impl Slots {
    pub fn new(n: usize, k: usize, capacity: usize, max_rank: usize) -> Result<Slots> {
        let n = crate::plan::delta_linear::positive("n", n)? as usize;
        let k = crate::plan::delta_linear::positive("k", k)? as usize;
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::invalid(
                "capacity",
                format!("1..={MAX_CAPACITY}"),
                capacity,
            ));
        }
        if max_rank == 0 || max_rank > MAX_RANK {
            return Err(Error::invalid(
                "max_rank",
                format!("1..={MAX_RANK}"),
                max_rank,
            ));
        }
        Ok(Slots {
            n,
            k,
            max_rank,
            entries: vec![AdapterEntry::default(); capacity],
        })
    }

    /// The entry of an adapter with these tensor lengths (addresses 0) and the free slot it
    /// goes to; an error for a bad adapter or a full set.
    pub fn check<B>(
        &self,
        a: &Adapter<B>,
        len: impl Fn(&B) -> usize,
    ) -> Result<(usize, AdapterEntry)> {
        let entry = adapter_entry(
            &a.op,
            (self.n, self.k, self.max_rank),
            len(&a.w_down),
            a.b_down.as_ref().map(&len),
            len(&a.w_up),
            a.b_up.as_ref().map(&len),
        )
        .map_err(|e| e.of("AdapterSet::insert"))?;
        let slot = self
            .entries
            .iter()
            .position(|e| e.rank == 0)
            .ok_or_else(|| {
                Error::invalid(
                    "set",
                    "a free slot (remove an adapter, or make a larger set)",
                    format!("all {} slots in use", self.entries.len()),
                )
                .of("AdapterSet::insert")
            })?;
        Ok((slot, entry))
    }

    /// An error unless `id` names a filled slot.
    pub fn filled(&self, id: usize) -> Result<()> {
        match self.entries.get(id) {
            Some(e) if e.rank > 0 => Ok(()),
            _ => Err(Error::invalid(
                "id",
                format!("a filled slot below {}", self.entries.len()),
                id,
            )
            .of("AdapterSet::remove")),
        }
    }

    pub fn view(&self, table: Buf) -> SetView<'_> {
        SetView {
            n: self.n,
            k: self.k,
            max_rank: self.max_rank,
            table,
            entries: &self.entries,
        }
    }
}

/// The adapters of one linear layer [n, k], in host memory (the emulator's device memory);
/// see the module docs. Ids are slot indices, stable until the adapter is removed.
#[derive(Debug)]
pub struct AdapterSet<T> {
    slots: Slots,
    adapters: Vec<Option<Adapter<Vec<T>>>>,
}

impl<T: Element> AdapterSet<T> {
    /// An empty set of `capacity` slots (1..=[`MAX_CAPACITY`]) for layer [n, k], taking
    /// ranks 1..=`max_rank` (at most [`MAX_RANK`]; the workspace rows are `max_rank` wide).
    pub fn new(n: usize, k: usize, capacity: usize, max_rank: usize) -> Result<Self> {
        let slots = Slots::new(n, k, capacity, max_rank)?;
        Ok(AdapterSet {
            adapters: (0..capacity).map(|_| None).collect(),
            slots,
        })
    }

    /// Adds an adapter to a free slot and returns its id; an `Err` naming the tensor whose
    /// shape disagrees with the layer, `Unsupported` for a sequential or gated method.
    pub fn insert(&mut self, a: Adapter<Vec<T>>) -> Result<usize> {
        let (slot, mut entry) = self.slots.check(&a, Vec::len)?;
        let addr = |v: &Vec<T>| v.as_ptr() as u64;
        // The Vecs' heap buffers do not move when the Vecs move into the slot.
        (entry.w_down, entry.w_up) = (addr(&a.w_down), addr(&a.w_up));
        entry.b_down = a.b_down.as_ref().map_or(0, addr);
        entry.b_up = a.b_up.as_ref().map_or(0, addr);
        self.slots.entries[slot] = entry;
        self.adapters[slot] = Some(a);
        Ok(slot)
    }

    /// Removes adapter `id` and returns it; its slot is free for a later insert.
    pub fn remove(&mut self, id: usize) -> Result<Adapter<Vec<T>>> {
        self.slots.filled(id)?;
        self.slots.entries[id] = AdapterEntry::default();
        Ok(self.adapters[id]
            .take()
            .expect("a filled slot holds its adapter"))
    }

    /// Adapter `id`, if its slot is filled.
    pub fn get(&self, id: usize) -> Option<&Adapter<Vec<T>>> {
        self.adapters.get(id)?.as_ref()
    }

    /// The rank of adapter `id`, if its slot is filled.
    pub fn rank(&self, id: usize) -> Option<usize> {
        self.get(id).map(|a| a.w_down.len() / self.slots.k)
    }

    /// The layer's [n, k].
    pub fn layer(&self) -> (usize, usize) {
        (self.slots.n, self.slots.k)
    }

    /// The largest rank the set takes (the workspace is sized by it).
    pub fn max_rank(&self) -> usize {
        self.slots.max_rank
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.slots.entries.len()
    }

    /// Filled slots.
    pub fn len(&self) -> usize {
        self.adapters.iter().filter(|a| a.is_some()).count()
    }

    /// Whether no slot is filled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The planner's view (for running `plan::multi_adapter`'s steps yourself): the table
    /// at its host address.
    pub fn view(&self) -> SetView<'_> {
        let e = &self.slots.entries;
        self.slots.view(Buf {
            addr: e.as_ptr() as u64,
            len: e.len(),
        })
    }

    /// The table and every adapter tensor, for the emulator's memory checks.
    pub(crate) fn buffers(&self) -> impl Iterator<Item = &[T]> {
        self.adapters.iter().flatten().flat_map(|a| {
            [
                Some(&a.w_down),
                a.b_down.as_ref(),
                Some(&a.w_up),
                a.b_up.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(Vec::as_slice)
        })
    }

    pub(crate) fn table(&self) -> &[AdapterEntry] {
        &self.slots.entries
    }
}
