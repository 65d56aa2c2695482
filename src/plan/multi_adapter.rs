//! Planning of multi-adapter batches (kernels/multi_delta_linear.cu): validation of the set,
//! the batch description and the tensors, and the launch sequence. The naive variant is one
//! launch. Where the frozen GEMM runs on the tensor-core mma kernels (f16/bf16, copyable x
//! and W, `Auto` or `TensorCore`): [shrink] (this module's kernel), then the fused pass
//! (`delta_linear::multi_pass`: the frozen GEMM as delta_linear plans it for one adapter, on
//! its `_multi` instantiation, whose phase 2 adds each row's own delta; y written once).
//! Elsewhere (f32, unaligned operands, `Simt`, `Wgmma`): [shrink, expand] then the frozen
//! GEMM with y added in place (`delta_linear::frozen_pass`).

use super::delta_linear::{
    check_exact, check_matrix, composition_code, dim_i32, frozen_pass, multi_pass, positive,
    workspace_ld, FusedLinearParams,
};
use super::{check_len, grid_for, Buf, Launch};
use crate::delta_linear::{DeltaLinear, DeltaLinearDims, KernelVariant};
use crate::error::{Error, Result};
use crate::kernels::KernelId;
use crate::multi_adapter::{AdapterBatch, MultiDeltaDims, MAX_RANK};
use crate::spec::{Composition, DType, Insertion, MatrixLayout};

/// Twin of `AdapterEntry` in kernels/multi_delta_linear.cu: one slot of an adapter set's
/// table. `rank = 0` marks an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdapterEntry {
    pub w_down: u64,
    pub w_up: u64,
    pub b_down: u64,
    pub b_up: u64,
    pub rank: i32,
    pub activation: i32,
    pub scale: f32,
    pub reserved: i32,
}
// SAFETY: #[repr(C)] of plain integers and floats with no padding (48 bytes).
unsafe impl bytemuck::Zeroable for AdapterEntry {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for AdapterEntry {}

/// Twin of `MultiBatch` in kernels/multi_adapter.cuh: which entry of a set's table each row
/// uses, as the kernels read it (`table` 0: no batch, in a dense pass's parameters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MultiBatch {
    pub table: u64,
    /// Per-row ids [m], or 0 (segments).
    pub ids: u64,
    pub seg_starts: u64,
    pub seg_ids: u64,
    pub status: u64,
    pub table_len: i32,
    pub segments: i32,
    pub max_rank: i32,
    pub reserved: i32,
}

/// Twin of `MultiDeltaParams` in kernels/multi_delta_linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MultiDeltaParams {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub batch: MultiBatch,
    pub t: u64,
    pub out: u64,
    pub ldx: i64,
    pub ldt: i64,
    pub ldo: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub reserved: i32,
}
// SAFETY: #[repr(C)], field for field the C++ struct (checked by a size test).
unsafe impl super::KernelParams for MultiDeltaParams {}

/// What the planner knows of an adapter set: its layer, its table (address; `len` in
/// entries) and the host's copy of the entries (the ranks, to check host-visible ids).
#[derive(Clone, Copy, Debug)]
pub struct SetView<'a> {
    pub n: usize,
    pub k: usize,
    pub max_rank: usize,
    pub table: Buf,
    pub entries: &'a [AdapterEntry],
}

/// The operands of a multi-adapter call.
#[derive(Clone, Copy, Debug)]
pub struct MultiDeltaBufs {
    pub x: Buf,
    pub w: Buf,
    pub bias: Option<Buf>,
    pub batch: AdapterBatch<Buf>,
    pub status: Option<Buf>,
    pub workspace: Buf,
    pub y: Buf,
}

/// The steps of a multi-adapter call: this module's kernels, then the frozen GEMM's (the
/// fused pass, or the frozen GEMM adding y where there is none; see the module docs).
#[derive(Clone, Debug, Default)]
pub struct MultiDeltaPlan {
    pub delta: Vec<(Launch, MultiDeltaParams)>,
    pub frozen: Vec<(Launch, FusedLinearParams)>,
}

/// Checks one adapter of a set for layer [n, k] with ranks up to `max_rank`, given its
/// method and the lengths of its tensors (`b_down`, `b_up` when present), and returns its
/// entry without addresses. The rank is W_down's rows.
pub fn adapter_entry(
    op: &DeltaLinear,
    (n, k, max_rank): (usize, usize, usize),
    w_down: usize,
    b_down: Option<usize>,
    w_up: usize,
    b_up: Option<usize>,
) -> Result<AdapterEntry> {
    if op.insertion == Insertion::Sequential {
        return Err(Error::Unsupported(
            "a sequential adapter in an adapter set: its delta reads the whole row of h, \
             which a mixed batch computes after the deltas (parallel insertion only)"
                .into(),
        ));
    }
    if op.composition == Composition::Gated {
        return Err(Error::Unsupported(
            "a gated adapter in an adapter set (its per-row gate is not part of a batch)".into(),
        ));
    }
    let rank = w_down / k.max(1);
    if w_down == 0 || w_down % k != 0 || rank > max_rank {
        return Err(Error::invalid(
            "w_down",
            format!("[rank, k] with k = {k} and rank in 1..={max_rank}"),
            format!("{w_down} elements"),
        ));
    }
    let buf = |len| Buf { addr: 0, len };
    check_exact("w_up", Some(buf(w_up)), &[n, rank])?;
    check_exact("b_down", b_down.map(buf), &[rank])?;
    check_exact("b_up", b_up.map(buf), &[n])?;
    let (_, scale) = composition_code(op.composition, rank)?;
    Ok(AdapterEntry {
        rank: rank as i32,
        activation: op.activation as i32,
        scale,
        ..AdapterEntry::default()
    })
}

/// The workspace of a call over `m` rows: t [m, workspace_ld(max_rank)], then room for the
/// frozen GEMM's split-K partial sums as delta_linear lays them out.
pub(crate) fn frozen_dims(d: &MultiDeltaDims, max_rank: usize) -> DeltaLinearDims {
    DeltaLinearDims {
        ld_x: d.ld_x,
        ld_y: d.ld_y,
        kernel: d.kernel,
        split_target: d.split_target,
        ..DeltaLinearDims::new(d.m, d.n, d.k, max_rank)
    }
}

/// An error naming `arg` for a host-visible id that names no adapter of the set.
fn check_id(arg: &'static str, at: usize, id: i32, entries: &[AdapterEntry]) -> Result<()> {
    let expected = || format!("ids in -1..{} naming adapters of the set", entries.len());
    match usize::try_from(id) {
        _ if id == -1 => Ok(()),
        Ok(i) if i < entries.len() && entries[i].rank > 0 => Ok(()),
        Ok(i) if i < entries.len() => Err(Error::invalid(
            arg,
            expected(),
            format!("{id} at {at}: an empty slot (removed, or never filled)"),
        )),
        _ => Err(Error::invalid(arg, expected(), format!("{id} at {at}"))),
    }
}

/// Plans `multi_delta_linear`. `host`: the batch's contents where the host can see them
/// (the emulator; host buffers), checked id by id before anything launches; device batches
/// are checked by the kernels (see [`crate::multi_adapter::MultiStatus`]).
pub fn multi_delta_linear(
    d: &MultiDeltaDims,
    dtype: DType,
    set: &SetView,
    b: &MultiDeltaBufs,
    host: Option<AdapterBatch<&[i32]>>,
) -> Result<MultiDeltaPlan> {
    plan(d, dtype, set, b, host).map_err(|e| e.of("multi_delta_linear"))
}

fn plan(
    d: &MultiDeltaDims,
    dtype: DType,
    set: &SetView,
    b: &MultiDeltaBufs,
    host: Option<AdapterBatch<&[i32]>>,
) -> Result<MultiDeltaPlan> {
    let n = positive("dims.n", d.n)?;
    let k = positive("dims.k", d.k)?;
    let m = dim_i32("dims.m", d.m)?;
    if (set.n, set.k) != (d.n, d.k) {
        return Err(Error::invalid(
            "set",
            format!("an adapter set of the layer [n, k] = [{}, {}]", d.n, d.k),
            format!("a set of [{}, {}]", set.n, set.k),
        ));
    }
    let table_len = dim_i32("set", set.entries.len())?;
    check_matrix(
        "x",
        b.x,
        MatrixLayout {
            rows: d.m,
            cols: d.k,
            ld: d.ld_x,
        },
    )?;
    check_exact("w", Some(b.w), &[d.n, d.k])?;
    check_exact("bias", b.bias, &[d.n])?;
    check_exact("status", b.status, &[1])?;
    let (ids, seg_starts, seg_ids, segments) = match b.batch {
        AdapterBatch::Rows(ids) => {
            check_exact("batch.ids", Some(ids), &[d.m])?;
            (ids.addr, 0, 0, 0)
        }
        AdapterBatch::Segments { starts, ids } => {
            let segments = dim_i32("batch.ids", ids.len)?;
            check_exact("batch.starts", Some(starts), &[ids.len + 1])?;
            (0, starts.addr, ids.addr, segments)
        }
    };
    match host {
        Some(AdapterBatch::Rows(ids)) => {
            for (row, &id) in ids.iter().enumerate() {
                check_id("batch.ids", row, id, set.entries)?;
            }
        }
        Some(AdapterBatch::Segments { starts, ids }) => {
            check_segments(starts, d.m)?;
            for (s, &id) in ids.iter().enumerate() {
                check_id("batch.ids", s, id, set.entries)?;
            }
        }
        None => {}
    }
    let max_rank = set.max_rank.clamp(1, MAX_RANK);
    let fd = frozen_dims(d, max_rank);
    check_len(
        "workspace",
        Some(b.workspace),
        fd.min_workspace_len(),
        Some("dims.min_workspace_len(set.max_rank()): t [m, max_rank rounded up to 8]"),
    )?;
    check_matrix(
        "y",
        b.y,
        MatrixLayout {
            rows: d.m,
            cols: d.n,
            ld: d.ld_y,
        },
    )?;
    if d.m == 0 {
        return Ok(MultiDeltaPlan::default());
    }
    let p = MultiDeltaParams {
        x: b.x.addr,
        w: b.w.addr,
        bias: b.bias.map_or(0, |b| b.addr),
        batch: MultiBatch {
            table: set.table.addr,
            ids,
            seg_starts,
            seg_ids,
            status: b.status.map_or(0, |b| b.addr),
            table_len,
            segments,
            max_rank: max_rank as i32,
            reserved: 0,
        },
        t: b.workspace.addr,
        out: b.y.addr,
        ldx: d.ld_x as i64,
        ldt: workspace_ld(max_rank) as i64,
        ldo: d.ld_y as i64,
        m,
        n,
        k,
        reserved: 0,
    };
    let pick = |ids: [KernelId; 3]| match dtype {
        DType::F32 => ids[0],
        DType::F16 => ids[1],
        DType::BF16 => ids[2],
    };
    let launch = |kernel, grid, block| Launch {
        kernel,
        grid,
        block,
        dynamic_smem: 0,
        overlap_previous: false,
    };
    use KernelId::*;
    if d.kernel == KernelVariant::Naive {
        let grid = grid_for([("dims.n", d.n, 16), ("dims.m", d.m, 16), ("batch", 1, 1)])?;
        let naive = [
            multi_delta_naive_f32,
            multi_delta_naive_f16,
            multi_delta_naive_bf16,
        ];
        return Ok(MultiDeltaPlan {
            delta: vec![(launch(pick(naive), grid, [16, 16, 1]), p)],
            frozen: Vec::new(),
        });
    }
    let rows = ("dims.m", d.m, 1);
    let shrink = launch(
        pick([multi_shrink_f32, multi_shrink_f16, multi_shrink_bf16]),
        grid_for([("set.max_rank", max_rank, 8), rows, ("batch", 1, 1)])?,
        [256, 1, 1],
    );
    let operands = (b.x, b.w, b.bias);
    let t = (b.workspace.addr, workspace_ld(max_rank));
    if let Some(fused) = multi_pass(&fd, dtype, operands, b.y, b.workspace, t, p.batch)? {
        return Ok(MultiDeltaPlan {
            delta: vec![(shrink, p)],
            frozen: fused,
        });
    }
    let expand = Launch {
        overlap_previous: true,
        ..launch(
            pick([multi_expand_f32, multi_expand_f16, multi_expand_bf16]),
            grid_for([("dims.n", d.n, 128), rows, ("batch", 1, 1)])?,
            [128, 1, 1],
        )
    };
    let frozen = frozen_pass(&fd, dtype, operands, b.y, b.workspace, true)?;
    Ok(MultiDeltaPlan {
        delta: vec![(shrink, p), (expand, p)],
        frozen,
    })
}

/// Host-visible segments: `starts` [segments + 1] from 0 to m, never decreasing (a segment
/// may be empty).
fn check_segments(starts: &[i32], m: usize) -> Result<()> {
    let expected = || format!("segment starts from 0 to m = {m}, never decreasing");
    let at = |i: usize| format!("starts[{i}] = {}", starts[i]);
    if starts.first() != Some(&0) {
        return Err(Error::invalid("batch.starts", expected(), at(0)));
    }
    if let Some(i) = (1..starts.len()).find(|&i| starts[i] < starts[i - 1]) {
        return Err(Error::invalid(
            "batch.starts",
            expected(),
            format!("{} after {}", at(i), starts[i - 1]),
        ));
    }
    let last = starts.len() - 1;
    if usize::try_from(starts[last]).ok() != Some(m) {
        return Err(Error::invalid("batch.starts", expected(), at(last)));
    }
    Ok(())
}
