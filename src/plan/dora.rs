//! Planning of DoRA's operations (kernels/dora.cu, and delta_linear.cu's column scale; the
//! API is [`crate::dora`]).

use super::delta_linear::{
    check_exact, check_matrix, lora_merge, plan_delta_linear, positive, scaled_saved_len,
    DeltaLinearBufs, DeltaLinearTrainBufs, FusedLinearParams, LoraMergeBufs, LoraMergeParams,
};
use super::delta_linear_backward::{
    check_disjoint, plan as plan_delta_backward, DeltaBackwardParams, DeltaLinearBackwardBufs,
};
use super::{check_len, grid_for, Buf, KernelParams, Launch};
use crate::delta_linear::{DeltaLinear, DeltaLinearDims, LoraMergeDims};
use crate::dora::DoraDims;
use crate::kernels::KernelId;
use crate::{Activation, Composition, DType, Error, Insertion, MatrixLayout, Result};

/// Twin of `DoraNormParams` in kernels/dora.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DoraNormParams {
    pub w: u64,
    pub w_down: u64,
    pub w_up: u64,
    pub magnitude: u64,
    pub g: u64,
    pub norm: u64,
    pub n: i32,
    pub k: i32,
    pub r: i32,
    pub scale: f32,
}
// SAFETY: field for field the C++ struct (sizes checked by tests/dora.rs).
unsafe impl KernelParams for DoraNormParams {}

/// Twin of `DoraScaleParams` in kernels/dora.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DoraScaleParams {
    pub x: u64,
    pub g: u64,
    pub ld: i64,
    pub rows: i32,
    pub cols: i32,
    pub invert: i32,
}
// SAFETY: as above.
unsafe impl KernelParams for DoraScaleParams {}

/// Twin of `DoraBackwardParams` in kernels/dora.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DoraBackwardParams {
    pub dy: u64,
    pub z: u64,
    pub g: u64,
    pub norm: u64,
    pub dy_scaled: u64,
    pub partial: u64,
    pub dmagnitude: u64,
    pub ld: i64,
    pub m: i32,
    pub n: i32,
    pub rows_per_chunk: i32,
    pub chunks: i32,
    pub accumulate: i32,
}
// SAFETY: as above.
unsafe impl KernelParams for DoraBackwardParams {}

/// The buffers of `dora_norm`.
#[derive(Clone, Copy, Debug)]
pub struct DoraNormBufs {
    pub w: Buf,
    pub w_down: Buf,
    pub w_up: Buf,
    pub magnitude: Buf,
    pub g: Buf,
    pub norm: Option<Buf>,
}

/// The buffers of `dora_merge`.
#[derive(Clone, Copy, Debug)]
pub struct DoraMergeBufs {
    pub w: Buf,
    pub w_down: Buf,
    pub w_up: Buf,
    pub g: Buf,
}

/// The buffers of `dora_linear`: delta_linear's (whose `col_scale` the plan sets) and g.
#[derive(Clone, Copy, Debug)]
pub struct DoraLinearBufs {
    pub forward: DeltaLinearBufs,
    pub g: Buf,
}

/// The buffers of `dora_linear_train`: delta_linear_train's and g.
#[derive(Clone, Copy, Debug)]
pub struct DoraLinearTrainBufs {
    pub train: DeltaLinearTrainBufs,
    pub g: Buf,
}

/// The buffers of `dora_linear_backward`: delta_linear_backward's (dy the DoRA layer's
/// upstream gradient, `saved` and `workspace` DoRA's), g, the norms and dmagnitude.
#[derive(Clone, Copy, Debug)]
pub struct DoraLinearBackwardBufs {
    pub backward: DeltaLinearBackwardBufs,
    pub g: Buf,
    pub norm: Buf,
    pub dmagnitude: Buf,
}

/// The two steps of `dora_merge`: a LoRA merge and a row scale, run merge then scale, or with
/// `unmerge` scale then merge.
#[derive(Clone, Copy, Debug)]
pub struct DoraMergePlan {
    pub merge: (Launch, LoraMergeParams),
    pub scale: (Launch, DoraScaleParams),
    pub unmerge: bool,
}

/// The steps of `dora_linear_backward`, run `columns` then `backward`: dy' = g ⊙ dy and the
/// magnitude's gradient (kernels/dora.cu), then delta_linear_backward on dy'.
#[derive(Clone, Debug)]
pub struct DoraBackwardPlan {
    pub columns: Vec<(Launch, DoraBackwardParams)>,
    pub backward: Vec<(Launch, DeltaBackwardParams)>,
}

/// Plans `dora_norm`: g = m / ‖W + scale·B·A‖ per row (and the norms, when asked).
pub fn dora_norm(
    dtype: DType,
    d: &DoraDims,
    scale: f32,
    b: &DoraNormBufs,
) -> Result<(Launch, DoraNormParams)> {
    plan_norm(dtype, d, scale, b).map_err(|e| e.of("dora_norm"))
}

fn plan_norm(
    dtype: DType,
    d: &DoraDims,
    scale: f32,
    b: &DoraNormBufs,
) -> Result<(Launch, DoraNormParams)> {
    let n = positive("dims.n", d.n)?;
    let k = positive("dims.k", d.k)?;
    let r = positive("dims.r", d.r)?;
    if !scale.is_finite() {
        return Err(Error::invalid("scale", "a finite scale", scale));
    }
    check_exact("w", Some(b.w), &[d.n, d.k])?;
    check_exact("w_down", Some(b.w_down), &[d.r, d.k])?;
    check_exact("w_up", Some(b.w_up), &[d.n, d.r])?;
    check_exact("magnitude", Some(b.magnitude), &[d.n])?;
    check_exact("g", Some(b.g), &[d.n])?;
    check_exact("norm", b.norm, &[d.n])?;
    check_disjoint(
        &[("g", Some(b.g), 4), ("norm", b.norm, 4)],
        &[
            ("w", Some(b.w), dtype.size()),
            ("magnitude", Some(b.magnitude), dtype.size()),
        ],
    )?;
    let kernel = match dtype {
        DType::F32 => KernelId::dora_norm_f32,
        DType::F16 => KernelId::dora_norm_f16,
        DType::BF16 => KernelId::dora_norm_bf16,
    };
    let launch = Launch {
        kernel,
        grid: grid_for([("dims.n", d.n, 1), ("batch", 1, 1), ("batch", 1, 1)])?,
        block: [128, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let p = DoraNormParams {
        w: b.w.addr,
        w_down: b.w_down.addr,
        w_up: b.w_up.addr,
        magnitude: b.magnitude.addr,
        g: b.g.addr,
        norm: b.norm.map_or(0, |b| b.addr),
        n,
        k,
        r,
        scale,
    };
    Ok((launch, p))
}

/// Plans `dora_merge`: W ← g ⊙ (W + scale·B·A) per row, or with `unmerge` W ← W / g −
/// scale·B·A.
pub fn dora_merge(
    dtype: DType,
    d: &DoraDims,
    scale: f32,
    unmerge: bool,
    b: &DoraMergeBufs,
) -> Result<DoraMergePlan> {
    plan_merge(dtype, d, scale, unmerge, b).map_err(|e| e.of("dora_merge"))
}

fn plan_merge(
    dtype: DType,
    d: &DoraDims,
    scale: f32,
    unmerge: bool,
    b: &DoraMergeBufs,
) -> Result<DoraMergePlan> {
    let merge_dims = LoraMergeDims {
        n: d.n,
        k: d.k,
        r: d.r,
    };
    let merge_bufs = LoraMergeBufs {
        w: b.w,
        w_down: b.w_down,
        w_up: b.w_up,
    };
    let sign = if unmerge { -1.0 } else { 1.0 };
    let merge = lora_merge(dtype, &merge_dims, sign * scale, &merge_bufs)?;
    check_exact("g", Some(b.g), &[d.n])?;
    // lora_merge checked n and k (positive, within i32) and W's exact shape.
    let kernel = match dtype {
        DType::F32 => KernelId::dora_scale_f32,
        DType::F16 => KernelId::dora_scale_f16,
        DType::BF16 => KernelId::dora_scale_bf16,
    };
    // At most 4096 blocks of 256 threads striding over the elements.
    let launch = Launch {
        kernel,
        grid: [(d.n * d.k).div_ceil(256).clamp(1, 4096) as u32, 1, 1],
        block: [256, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let p = DoraScaleParams {
        x: b.w.addr,
        g: b.g.addr,
        ld: d.k as i64,
        rows: d.n as i32,
        cols: d.k as i32,
        invert: i32::from(unmerge),
    };
    Ok(DoraMergePlan {
        merge,
        scale: (launch, p),
        unmerge,
    })
}

/// What DoRA is: LoRA's delta (parallel, identity, a plain or LoRA scale), whose weight
/// W + s·B·A the norm is of.
fn check_lora_op(op: &DeltaLinear) -> Result<()> {
    if op.insertion != Insertion::Parallel {
        return Err(Error::invalid(
            "op.insertion",
            "Insertion::Parallel (DoRA decomposes W + s·B·A)",
            format!("{:?}", op.insertion),
        ));
    }
    if op.activation != Activation::Identity {
        return Err(Error::invalid(
            "op.activation",
            "Activation::Identity (DoRA decomposes W + s·B·A)",
            format!("{:?}", op.activation),
        ));
    }
    if op.composition == Composition::Gated {
        return Err(Error::invalid(
            "op.composition",
            "a LoRA, scaled or added composition (DoRA's scale s)",
            "Composition::Gated",
        ));
    }
    Ok(())
}

/// An error naming the first of `tensors` given: DoRA's delta is x·Aᵀ·Bᵀ, no bottleneck
/// biases and no separate input (W + s·B·A is the weight it normalises).
fn check_absent(tensors: &[(&'static str, Option<Buf>)]) -> Result<()> {
    match tensors.iter().find(|(_, b)| b.is_some()) {
        Some((arg, _)) => Err(Error::invalid(
            arg,
            "None (DoRA's delta is x·Aᵀ·Bᵀ: W + s·B·A is the weight it normalises)",
            "a tensor",
        )),
        None => Ok(()),
    }
}

/// [`check_lora_op`] and [`check_absent`] for a forward's tensors.
fn check_lora(op: &DeltaLinear, f: &DeltaLinearBufs) -> Result<()> {
    check_lora_op(op)?;
    check_absent(&[("u", f.u), ("b_down", f.b_down), ("b_up", f.b_up)])
}

/// Plans `dora_linear`: y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b, delta_linear's passes with g in the
/// main pass's epilogue.
pub fn dora_linear(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DoraLinearBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    check_lora(op, &b.forward)
        .and_then(|()| check_exact("g", Some(b.g), &[d.n]))
        .and_then(|()| {
            let forward = DeltaLinearBufs {
                col_scale: Some(b.g),
                ..b.forward
            };
            plan_delta_linear(op, d, dtype, &forward, None, None)
        })
        .map_err(|e| e.of("dora_linear"))
}

/// Plans `dora_linear_train`: `dora_linear` that also saves, in f32, z [m, r] and
/// x·Wᵀ + Δ [m, n] (`DeltaLinearDims::dora_saved_len`) for the backward.
pub fn dora_linear_train(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DoraLinearTrainBufs,
) -> Result<Vec<(Launch, FusedLinearParams)>> {
    let plan = || {
        check_lora(op, &b.train.forward)?;
        check_exact("g", Some(b.g), &[d.n])?;
        if b.train.dropout.is_some_and(|dr| dr.p > 0.0) {
            // PEFT's DoRA under dropout is x·Wᵀ + b + (g − 1)·x'·Wᵀ + g·s·x'·Aᵀ·Bᵀ with x' the
            // dropped x: a second frozen GEMM, on x'.
            return Err(Error::Unsupported(
                "dora_linear_train: LoRA dropout (PEFT's DoRA then multiplies a second frozen \
                 GEMM, on the dropped x, by g − 1); pass dropout: None"
                    .into(),
            ));
        }
        let forward = DeltaLinearBufs {
            col_scale: Some(b.g),
            ..b.train.forward
        };
        plan_delta_linear(op, d, dtype, &forward, Some((b.train.saved, None)), None)
    };
    plan().map_err(|e| e.of("dora_linear_train"))
}

/// Where the backward's f32 workspace keeps what: delta_linear_backward's workspace at 0, then
/// dy' [m, ld_y] in T (16-byte aligned), then the magnitude's partial column sums
/// [chunks][n]; offsets and `len` in f32 elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DoraBackwardLayout {
    pub delta: usize,
    pub dy: usize,
    pub partial: usize,
    pub rows_per_chunk: usize,
    pub chunks: usize,
    pub len: usize,
}

/// Rows each block of the magnitude's column reduction sums: at least 64, and at most 64
/// chunks (a guess until measured: enough blocks for a long m, few partial sums to add).
const MIN_ROWS_PER_CHUNK: usize = 64;
const MAX_CHUNKS: usize = 64;

pub(crate) fn dora_backward_layout(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
) -> DoraBackwardLayout {
    let delta = d.backward_workspace_len(op);
    let dy_elems = match d.m {
        0 => 0,
        m => (m - 1).saturating_mul(d.ld_y).saturating_add(d.n),
    };
    let aligned = |x: usize| x.checked_next_multiple_of(4).unwrap_or(usize::MAX);
    let dy = aligned(delta);
    let dy_f32 = dy_elems.saturating_mul(dtype.size()).div_ceil(4);
    let partial = aligned(dy.saturating_add(dy_f32));
    let rows_per_chunk = d.m.div_ceil(MAX_CHUNKS).max(MIN_ROWS_PER_CHUNK);
    let chunks = d.m.div_ceil(rows_per_chunk).max(1);
    DoraBackwardLayout {
        delta,
        dy,
        partial,
        rows_per_chunk,
        chunks,
        len: partial.saturating_add(chunks.saturating_mul(d.n)),
    }
}

/// Plans `dora_linear_backward`: with c = g (detached) and z = x·Wᵀ + Δ as the forward saved
/// it, dmagnitude_j (+)= Σ_i dy_ij·z_ij / ‖·‖_j, and delta_linear_backward on dy' = c ⊙ dy.
pub fn dora_linear_backward(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DoraLinearBackwardBufs,
) -> Result<DoraBackwardPlan> {
    plan_backward(op, d, dtype, b).map_err(|e| e.of("dora_linear_backward"))
}

fn plan_backward(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DoraLinearBackwardBufs,
) -> Result<DoraBackwardPlan> {
    let bw = &b.backward;
    check_lora_op(op)?;
    check_absent(&[("u", bw.u), ("b_up", bw.b_up)])?;
    if bw.dropout.is_some_and(|dr| dr.p > 0.0) {
        return Err(Error::Unsupported(
            "dora_linear_backward: LoRA dropout (see dora_linear_train); pass dropout: None".into(),
        ));
    }
    let n = positive("dims.n", d.n)?;
    let m = i32::try_from(d.m)
        .map_err(|_| Error::invalid("dims.m", format!("at most {}", i32::MAX), d.m))?;
    check_matrix(
        "dy",
        bw.dy,
        MatrixLayout {
            rows: d.m,
            cols: d.n,
            ld: d.ld_y,
        },
    )?;
    check_exact("g", Some(b.g), &[d.n])?;
    check_exact("norm", Some(b.norm), &[d.n])?;
    check_exact("dmagnitude", Some(b.dmagnitude), &[d.n])?;
    let saved_len = scaled_saved_len(d.m, d.n, d.r);
    check_len(
        "saved",
        Some(bw.saved),
        saved_len,
        Some("dims.dora_saved_len(), what dora_linear_train saved"),
    )?;
    let layout = dora_backward_layout(op, d, dtype);
    check_len(
        "workspace",
        Some(bw.workspace),
        layout.len,
        Some("dims.dora_backward_workspace_len(op, dtype), f32"),
    )?;
    let t = dtype.size();
    check_disjoint(
        &[
            ("dmagnitude", Some(b.dmagnitude), 4),
            ("workspace", Some(bw.workspace), 4),
            ("dx", Some(bw.dx), t),
            ("dw_down", Some(bw.dw_down), 4),
            ("db_down", bw.db_down, 4),
            ("dw_up", Some(bw.dw_up), 4),
            ("db_up", bw.db_up, 4),
        ],
        &[
            ("dy", Some(bw.dy), t),
            ("saved", Some(bw.saved), 4),
            ("g", Some(b.g), 4),
            ("norm", Some(b.norm), 4),
        ],
    )?;
    // delta_linear_backward on dy' (in the workspace), with its share of saved and workspace:
    // it checks the rest of the arguments.
    let at = |offset: usize| bw.workspace.addr + 4 * offset as u64;
    let dy_len = match d.m {
        0 => 0,
        m => (m - 1) * d.ld_y + d.n,
    };
    let delta_bufs = DeltaLinearBackwardBufs {
        dy: Buf {
            addr: at(layout.dy),
            len: dy_len,
        },
        saved: Buf {
            addr: bw.saved.addr,
            len: d.m * d.r,
        },
        workspace: Buf {
            addr: bw.workspace.addr,
            len: layout.delta,
        },
        ..*bw
    };
    let backward = plan_delta_backward(op, d, dtype, &delta_bufs, None)?;
    if d.m == 0 {
        return Ok(DoraBackwardPlan {
            columns: Vec::new(),
            backward,
        });
    }
    let p = DoraBackwardParams {
        dy: bw.dy.addr,
        z: bw.saved.addr + 4 * (d.m * d.r) as u64,
        g: b.g.addr,
        norm: b.norm.addr,
        dy_scaled: at(layout.dy),
        partial: at(layout.partial),
        dmagnitude: b.dmagnitude.addr,
        ld: d.ld_y as i64,
        m,
        n,
        rows_per_chunk: layout.rows_per_chunk as i32,
        chunks: layout.chunks as i32,
        accumulate: i32::from(bw.accumulate),
    };
    let columns = Launch {
        kernel: match dtype {
            DType::F32 => KernelId::dora_bwd_columns_f32,
            DType::F16 => KernelId::dora_bwd_columns_f16,
            DType::BF16 => KernelId::dora_bwd_columns_bf16,
        },
        grid: grid_for([
            ("dims.n", d.n, 32),
            ("dims.m", layout.chunks, 1),
            ("batch", 1, 1),
        ])?,
        block: [32, 8, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let dmagnitude = Launch {
        kernel: KernelId::dora_dmagnitude_f32,
        grid: grid_for([("dims.n", d.n, 128), ("batch", 1, 1), ("batch", 1, 1)])?,
        block: [128, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    Ok(DoraBackwardPlan {
        columns: vec![(columns, p), (dmagnitude, p)],
        backward,
    })
}
