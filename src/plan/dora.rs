//! Planning of DoRA's operations (kernels/dora.cu; the API is [`crate::dora`]).

use super::delta_linear::{
    check_exact, check_matrix, lora_merge, positive, LoraMergeBufs, LoraMergeParams,
};
use super::{grid_for, Buf, KernelParams, Launch};
use crate::delta_linear::LoraMergeDims;
use crate::dora::{DoraDims, DoraScaleDims};
use crate::kernels::KernelId;
use crate::{DType, Error, MatrixLayout, Result};

/// Twin of `DoraNormParams` in kernels/dora.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DoraNormParams {
    pub w: u64,
    pub w_down: u64,
    pub w_up: u64,
    pub magnitude: u64,
    pub g: u64,
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
    pub bias: u64,
    pub ld: i64,
    pub rows: i32,
    pub cols: i32,
    pub g_row: i32,
    pub g_col: i32,
    pub invert: i32,
}
// SAFETY: as above.
unsafe impl KernelParams for DoraScaleParams {}

/// The buffers of `dora_norm`.
#[derive(Clone, Copy, Debug)]
pub struct DoraNormBufs {
    pub w: Buf,
    pub w_down: Buf,
    pub w_up: Buf,
    pub magnitude: Buf,
    pub g: Buf,
}

/// The buffers of `dora_scale`.
#[derive(Clone, Copy, Debug)]
pub struct DoraScaleBufs {
    pub y: Buf,
    pub g: Buf,
    pub bias: Option<Buf>,
}

/// The buffers of `dora_merge`.
#[derive(Clone, Copy, Debug)]
pub struct DoraMergeBufs {
    pub w: Buf,
    pub w_down: Buf,
    pub w_up: Buf,
    pub g: Buf,
}

/// The two steps of `dora_merge`: a LoRA merge and a row scale, run merge then scale, or with
/// `unmerge` scale then merge.
#[derive(Clone, Copy, Debug)]
pub struct DoraMergePlan {
    pub merge: (Launch, LoraMergeParams),
    pub scale: (Launch, DoraScaleParams),
    pub unmerge: bool,
}

/// Plans `dora_norm`: g = m / ‖W + scale·B·A‖ per row.
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
        n,
        k,
        r,
        scale,
    };
    Ok((launch, p))
}

/// What `dora_scale` multiplies each element by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ScaleBy {
    /// g of its column (the forward's y).
    Columns,
    /// g of its row (merging W).
    Rows,
    /// 1 / g of its row (unmerging W).
    RowsInverse,
}

/// A `dora_scale` launch over the matrix `x` (its dims checked by the caller to fit i32), at
/// most 4096 blocks of 256 threads striding over the elements.
fn scale_step(
    dtype: DType,
    x: Buf,
    layout: MatrixLayout,
    g: Buf,
    by: ScaleBy,
    bias: Option<Buf>,
) -> Result<(Launch, DoraScaleParams)> {
    let kernel = match dtype {
        DType::F32 => KernelId::dora_scale_f32,
        DType::F16 => KernelId::dora_scale_f16,
        DType::BF16 => KernelId::dora_scale_bf16,
    };
    let launch = Launch {
        kernel,
        grid: [
            (layout.rows * layout.cols).div_ceil(256).clamp(1, 4096) as u32,
            1,
            1,
        ],
        block: [256, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    };
    let p = DoraScaleParams {
        x: x.addr,
        g: g.addr,
        bias: bias.map_or(0, |b| b.addr),
        ld: i64::try_from(layout.ld)
            .map_err(|_| Error::invalid("dims.ld_y", "at most i64::MAX", layout.ld))?,
        rows: layout.rows as i32,
        cols: layout.cols as i32,
        g_row: i32::from(by != ScaleBy::Columns),
        g_col: i32::from(by == ScaleBy::Columns),
        invert: i32::from(by == ScaleBy::RowsInverse),
    };
    Ok((launch, p))
}

/// Plans `dora_scale`: y ← g ⊙ y + bias per column of y [m, n].
pub fn dora_scale(
    dtype: DType,
    d: &DoraScaleDims,
    b: &DoraScaleBufs,
) -> Result<(Launch, DoraScaleParams)> {
    plan_scale(dtype, d, b).map_err(|e| e.of("dora_scale"))
}

fn plan_scale(
    dtype: DType,
    d: &DoraScaleDims,
    b: &DoraScaleBufs,
) -> Result<(Launch, DoraScaleParams)> {
    let m = positive("dims.m", d.m)?;
    let n = positive("dims.n", d.n)?;
    check_matrix(
        "y",
        b.y,
        MatrixLayout {
            rows: d.m,
            cols: d.n,
            ld: d.ld_y,
        },
    )?;
    check_exact("g", Some(b.g), &[d.n])?;
    check_exact("bias", b.bias, &[d.n])?;
    let layout = MatrixLayout {
        rows: m as usize,
        cols: n as usize,
        ld: d.ld_y,
    };
    scale_step(dtype, b.y, layout, b.g, ScaleBy::Columns, b.bias)
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
    let by = if unmerge {
        ScaleBy::RowsInverse
    } else {
        ScaleBy::Rows
    };
    let scale = scale_step(
        dtype,
        b.w,
        MatrixLayout::contiguous(d.n, d.k),
        b.g,
        by,
        None,
    )?;
    Ok(DoraMergePlan {
        merge,
        scale,
        unmerge,
    })
}
