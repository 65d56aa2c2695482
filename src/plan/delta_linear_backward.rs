//! Planning of the delta-linear backward (kernels/delta_linear_backward.cu): validation,
//! kernel choice and the launch sequence [dz, (dgate), dW_up, dW_down, data passes], each
//! weight-gradient pass followed by its reduction when its token reduction is split.

use super::delta_linear::{
    check_exact, check_gate, check_matrix, composition_code, dim_i32, positive, saved_len, saves_h,
    QuantParams,
};
use super::{check_len, grid_for, Buf, Launch};
use crate::delta_linear::{
    DeltaApplyDims, DeltaLinear, DeltaLinearDims, KernelVariant, LoraDropout,
};
use crate::error::{Error, Result};
use crate::kernels::KernelId;
use crate::quant::QuantWeight;
use crate::spec::{Composition, DType, Insertion, MatrixLayout};

/// Twin of `DeltaBackwardParams` in kernels/delta_linear_backward.cu (see its header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeltaBackwardParams {
    pub a: u64,
    pub b: u64,
    pub e: u64,
    pub a2: u64,
    pub b2: u64,
    pub z: u64,
    pub bias: u64,
    pub gate: u64,
    pub out: u64,
    pub out_bias: u64,
    pub partial: u64,
    pub lda: i64,
    pub ldb: i64,
    pub lde: i64,
    pub lda2: i64,
    pub ldb2: i64,
    pub ldz: i64,
    pub ldo: i64,
    pub ldp: i64,
    pub bs_a: i64,
    pub bs_b: i64,
    pub bs_e: i64,
    pub bs_a2: i64,
    pub bs_b2: i64,
    pub bs_z: i64,
    pub bs_bias: i64,
    pub bs_out: i64,
    pub bs_out_bias: i64,
    pub drop_seed: u64,
    pub rows: i32,
    pub cols: i32,
    pub k1: i32,
    pub k2: i32,
    pub splits: i32,
    pub batch: i32,
    pub a_f32: i32,
    pub b_f32: i32,
    pub e_f32: i32,
    pub out_f32: i32,
    pub activation: i32,
    pub b_activate: i32,
    pub compose: i32,
    pub coef: i32,
    pub accumulate: i32,
    pub dropout: i32,
    pub scale: f32,
    pub drop_p: f32,
    /// The data pass's frozen W quantized (`delta_linear_quant_backward`).
    pub quant: QuantParams,
}
// SAFETY: #[repr(C)], field for field the C++ struct (checked by a size test).
unsafe impl super::KernelParams for DeltaBackwardParams {}

// Row coefficients (kernels/delta_linear_backward.cu `BwdCoef`).
const COEF_ONE: i32 = 0;
const COEF_H: i32 = 1;
const COEF_D: i32 = 2;
// The gated composition (`BwdCompose`).
const GATED: i32 = 2;

/// The operands of one delta-linear backward, as addresses.
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearBackwardBufs {
    pub dy: Buf,
    pub x: Buf,
    pub w: Buf,
    pub u: Option<Buf>,
    pub w_down: Buf,
    pub w_up: Buf,
    pub b_up: Option<Buf>,
    pub gate: Option<Buf>,
    pub saved: Buf,
    pub dx: Buf,
    pub du: Option<Buf>,
    pub dw_down: Buf,
    pub db_down: Option<Buf>,
    pub dw_up: Buf,
    pub db_up: Option<Buf>,
    pub dgate: Option<Buf>,
    pub workspace: Buf,
    pub dropout: Option<LoraDropout>,
    pub accumulate: bool,
}

/// Tokens per run of a weight gradient's split reduction: a run is one block's loop over
/// tokens, so a long m spreads over more blocks (a guess until measured).
const ROWS_PER_SPLIT: usize = 512;
/// The most runs.
const MAX_SPLITS: usize = 32;

/// The runs a weight-gradient reduction over m tokens splits into.
fn weight_splits(m: usize) -> usize {
    m.div_ceil(ROWS_PER_SPLIT).clamp(1, MAX_SPLITS)
}

/// Where the backward's f32 workspace keeps what (offsets in f32 elements): dz
/// [m, heads·r] at 0, dh [m, n] (sequential only), then the weight passes' partial sums
/// [heads][splits][rows][cols + 1], sized for the larger of dW_up's (rows n, cols r) and
/// dW_down's (rows r, cols k_u); the two passes run one after the other and share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BackwardWorkspace {
    pub dh: usize,
    pub partial: usize,
    pub splits: usize,
    pub len: usize,
}

pub(crate) fn backward_workspace_layout(
    op: &DeltaLinear,
    m: usize,
    heads: usize,
    n: usize,
    r: usize,
    k_u: usize,
) -> BackwardWorkspace {
    let dz = m.saturating_mul(heads).saturating_mul(r);
    let dh_len = match op.insertion {
        Insertion::Sequential => m.saturating_mul(heads).saturating_mul(n),
        Insertion::Parallel => 0,
    };
    let splits = weight_splits(m);
    let partial_len = match splits {
        1 => 0,
        s => {
            let up = n.saturating_mul(r.saturating_add(1));
            let down = r.saturating_mul(k_u.saturating_add(1));
            s.saturating_mul(heads).saturating_mul(up.max(down))
        }
    };
    let partial = dz.saturating_add(dh_len);
    BackwardWorkspace {
        dh: dz,
        partial,
        splits,
        len: partial.saturating_add(partial_len),
    }
}

/// Whether two buffers of `size`-byte elements share a byte.
fn overlaps((a, a_size): (Buf, usize), (b, b_size): (Buf, usize)) -> bool {
    let end = |buf: Buf, size: usize| buf.addr.saturating_add((buf.len * size) as u64);
    buf_nonempty(a) && buf_nonempty(b) && a.addr < end(b, b_size) && b.addr < end(a, a_size)
}

fn buf_nonempty(b: Buf) -> bool {
    b.len > 0 && b.addr != 0
}

/// An error naming the first output that shares memory with an input or another output.
pub(crate) fn check_disjoint(
    outputs: &[(&'static str, Option<Buf>, usize)],
    inputs: &[(&'static str, Option<Buf>, usize)],
) -> Result<()> {
    for (i, &(name, out, size)) in outputs.iter().enumerate() {
        let Some(out) = out else { continue };
        for &(other, buf, other_size) in inputs.iter().chain(&outputs[i + 1..]) {
            if buf.is_some_and(|b| overlaps((out, size), (b, other_size))) {
                return Err(Error::invalid(
                    name,
                    format!("a buffer apart from `{other}`"),
                    "one that overlaps it",
                ));
            }
        }
    }
    Ok(())
}

/// Which implementation runs the passes the tensor cores do not take (see [`tensor_cores`]
/// and [`weight_tensor_cores`]): the naive baseline on request, the SIMT tiles otherwise.
fn tiled(variant: KernelVariant) -> bool {
    variant != KernelVariant::Naive
}

fn kernel_for(dtype: DType, ids: [KernelId; 3]) -> KernelId {
    match dtype {
        DType::F32 => ids[0],
        DType::F16 => ids[1],
        DType::BF16 => ids[2],
    }
}

fn launch(kernel: KernelId, grid: [u32; 3], block: [u32; 3]) -> Launch {
    Launch {
        kernel,
        grid,
        block,
        dynamic_smem: 0,
        overlap_previous: false,
    }
}

/// A pass with every operand absent and the composition's encoding: callers fill the rest.
fn params(composition: (i32, f32), activation: i32, gate: u64, rows: usize) -> DeltaBackwardParams {
    DeltaBackwardParams {
        compose: composition.0,
        scale: composition.1,
        activation,
        gate,
        rows: rows as i32,
        splits: 1,
        batch: 1,
        ..Default::default()
    }
}

/// The dz pass over rows × cols (batch problems).
fn dz_step(dtype: DType, p: DeltaBackwardParams) -> Result<(Launch, DeltaBackwardParams)> {
    use KernelId::*;
    let grid = grid_for([
        ("dims.r", p.cols as usize, 16),
        ("dims.m", p.rows as usize, 16),
        ("dims.heads", p.batch as usize, 1),
    ])?;
    let id = kernel_for(
        dtype,
        [delta_bwd_dz_f32, delta_bwd_dz_f16, delta_bwd_dz_bf16],
    );
    Ok((launch(id, grid, [16, 16, 1]), p))
}

/// Whether a data pass runs on the tensor cores: f16/bf16, a frozen part (k1 > 0: the dx
/// passes; the delta-only du and dh passes are r steps deep), no E term and a row
/// coefficient of 1 (not the gate's 1 − λ: the kernel applies none). `Auto` also wants the
/// frozen W's rows 16-byte copyable (else the SIMT tiles, as the forward decides); an
/// explicit `TensorCore` or `Wgmma` takes any alignment.
fn tensor_cores(variant: KernelVariant, dtype: DType, p: &DeltaBackwardParams) -> bool {
    let eligible =
        dtype != DType::F32 && p.k1 > 0 && p.e == 0 && (p.coef == COEF_ONE || p.compose != GATED);
    // A quantized W's loader picks its own loads (kernels/delta_linear_backward.cu).
    let aligned = p.quant.format != 0 || (p.b_f32 == 0 && p.b % 16 == 0 && p.ldb % 8 == 0);
    match variant {
        KernelVariant::Naive | KernelVariant::Simt => false,
        KernelVariant::Auto => eligible && aligned,
        KernelVariant::TensorCore | KernelVariant::Wgmma => eligible,
    }
}

/// A data pass over rows × cols (`cols` names the columns in errors).
fn data_step(
    variant: KernelVariant,
    dtype: DType,
    cols: &'static str,
    p: DeltaBackwardParams,
) -> Result<(Launch, DeltaBackwardParams)> {
    use KernelId::*;
    let (tile, block, ids) = if tensor_cores(variant, dtype, &p) {
        // f32 never gets here; its slot repeats the SIMT kernel.
        let ids = [
            delta_bwd_data_simt_f32,
            delta_bwd_data_mma_f16,
            delta_bwd_data_mma_bf16,
        ];
        (128, [256, 1, 1], ids)
    } else if tiled(variant) {
        let ids = [
            delta_bwd_data_simt_f32,
            delta_bwd_data_simt_f16,
            delta_bwd_data_simt_bf16,
        ];
        (64, [256, 1, 1], ids)
    } else {
        let ids = [
            delta_bwd_data_naive_f32,
            delta_bwd_data_naive_f16,
            delta_bwd_data_naive_bf16,
        ];
        (16, [16, 16, 1], ids)
    };
    let grid = grid_for([
        (cols, p.cols as usize, tile),
        ("dims.m", p.rows as usize, tile),
        ("dims.heads", p.batch as usize, 1),
    ])?;
    Ok((launch(kernel_for(dtype, ids), grid, block), p))
}

/// Whether a weight-gradient pass runs on the tensor cores: f16/bf16 under the variants that
/// send the data passes there (`Auto`, `TensorCore`, `Wgmma`; the weight passes have no
/// wgmma kernel). Any alignment: the kernel copies 16-byte rows by cp.async where it can and
/// loads the others (and every computed operand: f(z), dz, the dropout mask) element-wise.
fn weight_tensor_cores(variant: KernelVariant, dtype: DType) -> bool {
    let variant_ok = matches!(
        variant,
        KernelVariant::Auto | KernelVariant::TensorCore | KernelVariant::Wgmma
    );
    variant_ok && dtype != DType::F32
}

/// A weight-gradient pass (rows × (cols + 1), the bias column last) and, when its token
/// reduction splits, the reduction of its runs' partial sums.
fn weight_steps(
    variant: KernelVariant,
    dtype: DType,
    (rows_arg, cols_arg): (&'static str, &'static str),
    mut p: DeltaBackwardParams,
    ws: &BackwardWorkspace,
    workspace: Buf,
) -> Result<Vec<(Launch, DeltaBackwardParams)>> {
    use KernelId::*;
    let (rows, cols) = (p.rows as usize, p.cols as usize);
    p.splits = ws.splits as i32;
    if ws.splits > 1 {
        p.partial = workspace.addr + 4 * ws.partial as u64;
        p.ldp = (cols + 1) as i64;
    }
    let (tile, block, ids) = if weight_tensor_cores(variant, dtype) {
        // f32 never gets here; its slot repeats the SIMT kernel.
        let ids = [
            delta_bwd_weight_simt_f32,
            delta_bwd_weight_mma_f16,
            delta_bwd_weight_mma_bf16,
        ];
        (64, [256, 1, 1], ids)
    } else if tiled(variant) {
        let ids = [
            delta_bwd_weight_simt_f32,
            delta_bwd_weight_simt_f16,
            delta_bwd_weight_simt_bf16,
        ];
        (64, [256, 1, 1], ids)
    } else {
        let ids = [
            delta_bwd_weight_naive_f32,
            delta_bwd_weight_naive_f16,
            delta_bwd_weight_naive_bf16,
        ];
        (16, [16, 16, 1], ids)
    };
    let batch_runs = (p.batch as usize).saturating_mul(ws.splits);
    let grid = grid_for([
        (cols_arg, cols + 1, tile),
        (rows_arg, rows, tile),
        ("dims.heads", batch_runs, 1),
    ])?;
    let mut steps = vec![(launch(kernel_for(dtype, ids), grid, block), p)];
    if ws.splits > 1 {
        let grid = grid_for([
            (cols_arg, cols + 1, 128),
            (rows_arg, rows, 1),
            ("dims.heads", p.batch as usize, 1),
        ])?;
        steps.push((launch(delta_bwd_weight_reduce, grid, [128, 1, 1]), p));
    }
    Ok(steps)
}

/// Plans `delta_linear_backward` (see [`crate::delta_linear::DeltaLinearBackwardArgs`]).
pub fn delta_linear_backward(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearBackwardBufs,
) -> Result<Vec<(Launch, DeltaBackwardParams)>> {
    plan(op, d, dtype, b, None).map_err(|e| e.of("delta_linear_backward"))
}

/// The operands of a `delta_linear_quant_backward` call: the dense call's, whose `w` is the
/// quantized weight's data buffer (the kernels read W through `w`).
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearQuantBackwardBufs {
    pub backward: DeltaLinearBackwardBufs,
    pub w: QuantWeight<Buf, Buf>,
}

/// Plans `delta_linear_quant_backward`: `delta_linear_backward` whose dx pass reads the
/// quantized W (untransposed, dequantized as its tiles load: never materialised).
pub fn delta_linear_quant_backward(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearQuantBackwardBufs,
) -> Result<Vec<(Launch, DeltaBackwardParams)>> {
    plan(op, d, dtype, &b.backward, Some(&b.w)).map_err(|e| e.of("delta_linear_quant_backward"))
}

pub(crate) fn plan(
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    dtype: DType,
    b: &DeltaLinearBackwardBufs,
    quant: Option<&QuantWeight<Buf, Buf>>,
) -> Result<Vec<(Launch, DeltaBackwardParams)>> {
    if let Some(dr) = b.dropout {
        crate::dropout::check_p("dropout.p", dr.p)?;
    }
    // p = 0 keeps everything: no dropout at all, as in the forward.
    let dropout = b.dropout.filter(|dr| dr.p > 0.0);
    let drop = |p: &mut DeltaBackwardParams| {
        if let Some(dr) = dropout {
            (p.dropout, p.drop_seed, p.drop_p) = (1, dr.seed, dr.p);
        }
    };
    let n = positive("dims.n", d.n)?;
    positive("dims.k", d.k)?;
    let r = positive("dims.r", d.r)?;
    let m = dim_i32("dims.m", d.m)?;
    let composition = composition_code(op.composition, d.r)?;
    let matrix = |rows, cols, ld| MatrixLayout { rows, cols, ld };
    check_matrix("dy", b.dy, matrix(d.m, d.n, d.ld_y))?;
    check_matrix("x", b.x, matrix(d.m, d.k, d.ld_x))?;
    let quant = match quant {
        Some(w) => QuantParams::new(w, d.n, d.k)?,
        None => {
            check_exact("w", Some(b.w), &[d.n, d.k])?;
            QuantParams::default()
        }
    };
    // The frozen W's element size (a quantized W: its data buffer's bytes).
    let w_size = if quant.format == 0 { dtype.size() } else { 1 };
    let k_u = match (op.insertion, b.u) {
        (Insertion::Sequential, Some(_)) => {
            return Err(Error::invalid(
                "u",
                "None for sequential insertion (the delta reads h)",
                "a delta input",
            ))
        }
        (Insertion::Sequential, None) => d.n,
        (Insertion::Parallel, Some(u)) => {
            check_matrix("u", u, matrix(d.m, d.k_u, d.ld_u))?;
            d.k_u
        }
        (Insertion::Parallel, None) => d.k,
    };
    positive("dims.k_u", k_u)?;
    check_exact("w_down", Some(b.w_down), &[d.r, k_u])?;
    check_exact("w_up", Some(b.w_up), &[d.n, d.r])?;
    check_exact("b_up", b.b_up, &[d.n])?;
    check_gate(b.gate, op.composition, d.m)?;
    check_len(
        "saved",
        Some(b.saved),
        saved_len(op, d.m, d.n, d.r),
        Some("dims.saved_len(op), what delta_linear_train saved"),
    )?;
    check_matrix("dx", b.dx, matrix(d.m, d.k, d.ld_x))?;
    match (b.u, b.du) {
        (Some(_), Some(du)) => check_matrix("du", du, matrix(d.m, d.k_u, d.ld_u))?,
        (Some(_), None) => {
            return Err(Error::invalid(
                "du",
                "the gradient of the separate delta input u",
                "None",
            ))
        }
        (None, Some(_)) => {
            return Err(Error::invalid(
                "du",
                "None (the delta has no separate input u)",
                "a buffer",
            ))
        }
        (None, None) => {}
    }
    check_exact("dw_down", Some(b.dw_down), &[d.r, k_u])?;
    check_exact("db_down", b.db_down, &[d.r])?;
    check_exact("dw_up", Some(b.dw_up), &[d.n, d.r])?;
    check_exact("db_up", b.db_up, &[d.n])?;
    match (op.composition, b.dgate) {
        (Composition::Gated, None) => {
            return Err(Error::invalid(
                "dgate",
                format!("the gate's gradient, [{}] f32 (Composition::Gated)", d.m),
                "None",
            ))
        }
        (Composition::Gated, g) => check_exact("dgate", g, &[d.m])?,
        (_, Some(_)) => {
            return Err(Error::invalid(
                "dgate",
                "None unless composition is Composition::Gated",
                "a buffer",
            ))
        }
        (_, None) => {}
    }
    let ws = backward_workspace_layout(op, d.m, 1, d.n, d.r, k_u);
    check_len(
        "workspace",
        Some(b.workspace),
        ws.len,
        Some("dims.backward_workspace_len(op), f32"),
    )?;
    let t = dtype.size();
    check_disjoint(
        &[
            ("dx", Some(b.dx), t),
            ("du", b.du, t),
            ("dw_down", Some(b.dw_down), 4),
            ("db_down", b.db_down, 4),
            ("dw_up", Some(b.dw_up), 4),
            ("db_up", b.db_up, 4),
            ("dgate", b.dgate, 4),
            ("workspace", Some(b.workspace), 4),
        ],
        &[
            ("dy", Some(b.dy), t),
            ("x", Some(b.x), t),
            ("w", Some(b.w), w_size),
            ("u", b.u, t),
            ("w_down", Some(b.w_down), t),
            ("w_up", Some(b.w_up), t),
            ("b_up", b.b_up, t),
            ("gate", b.gate, t),
            ("saved", Some(b.saved), 4),
        ],
    )?;
    if d.m == 0 {
        return Ok(Vec::new());
    }

    let ws_addr = b.workspace.addr;
    let dz_addr = ws_addr;
    let dh_addr = ws_addr + 4 * ws.dh as u64;
    let saved_h = b.saved.addr + 4 * (d.m * d.r) as u64;
    let act = op.activation as i32;
    let gate = b.gate.map_or(0, |g| g.addr);
    let base = |rows: usize| params(composition, act, gate, rows);
    let mut steps = Vec::new();

    // dz = f′(z) ⊙ (c_d·dy·W_up) [m, r].
    let mut p = base(d.m);
    (p.a, p.lda, p.b, p.ldb, p.k1) = (b.dy.addr, d.ld_y as i64, b.w_up.addr, d.r as i64, n);
    (p.z, p.ldz, p.cols, p.coef) = (b.saved.addr, d.r as i64, r, COEF_D);
    (p.out, p.ldo, p.out_f32) = (dz_addr, d.r as i64, 1);
    steps.push(dz_step(dtype, p)?);

    // dλ = Σ_n dy·(Δ − h).
    if let Some(dgate) = b.dgate {
        debug_assert!(saves_h(op));
        let mut p = base(d.m);
        (p.a, p.lda, p.b, p.ldb, p.k1) = (b.dy.addr, d.ld_y as i64, b.w_up.addr, d.r as i64, r);
        (p.z, p.ldz, p.cols) = (b.saved.addr, d.r as i64, n);
        (p.bias, p.e, p.lde, p.e_f32) = (b.b_up.map_or(0, |b| b.addr), saved_h, d.n as i64, 1);
        (p.out, p.ldo, p.out_f32) = (dgate.addr, 1, 1);
        let id = kernel_for(
            dtype,
            [
                KernelId::delta_bwd_dgate_f32,
                KernelId::delta_bwd_dgate_f16,
                KernelId::delta_bwd_dgate_bf16,
            ],
        );
        let grid = grid_for([("dims.m", d.m, 1), ("", 1, 1), ("", 1, 1)])?;
        steps.push((launch(id, grid, [128, 1, 1]), p));
    }

    // dW_up = c_d·dyᵀ·f(z) [n, r], db_up = Σ c_d·dy.
    let mut p = base(d.n);
    (p.a, p.lda, p.coef) = (b.dy.addr, d.ld_y as i64, COEF_D);
    (p.b, p.ldb, p.b_f32, p.b_activate) = (b.saved.addr, d.r as i64, 1, 1);
    (p.cols, p.k1, p.accumulate) = (r, m, b.accumulate as i32);
    (p.out, p.ldo, p.out_f32) = (b.dw_up.addr, d.r as i64, 1);
    p.out_bias = b.db_up.map_or(0, |b| b.addr);
    let names = ("dims.n", "dims.r");
    steps.extend(weight_steps(d.kernel, dtype, names, p, &ws, b.workspace)?);

    // dW_down = dzᵀ·u' [r, k_u], db_down = Σ dz.
    let (u_addr, ld_u, u_f32) = match (op.insertion, b.u) {
        (Insertion::Sequential, _) => (saved_h, d.n, 1),
        (Insertion::Parallel, Some(u)) => (u.addr, d.ld_u, 0),
        (Insertion::Parallel, None) => (b.x.addr, d.ld_x, 0),
    };
    let mut p = base(d.r);
    (p.a, p.lda, p.a_f32, p.coef) = (dz_addr, d.r as i64, 1, COEF_ONE);
    (p.b, p.ldb, p.b_f32) = (u_addr, ld_u as i64, u_f32);
    (p.cols, p.k1, p.accumulate) = (k_u as i32, m, b.accumulate as i32);
    (p.out, p.ldo, p.out_f32) = (b.dw_down.addr, k_u as i64, 1);
    p.out_bias = b.db_down.map_or(0, |b| b.addr);
    drop(&mut p);
    let names = ("dims.r", "dims.k_u");
    steps.extend(weight_steps(d.kernel, dtype, names, p, &ws, b.workspace)?);

    // The data passes.
    let frozen = |p: &mut DeltaBackwardParams| {
        (p.ldb, p.k1, p.cols) = (d.k as i64, n, d.k as i32);
        if quant.format == 0 {
            p.b = b.w.addr;
        }
        p.quant = quant;
        (p.out, p.ldo) = (b.dx.addr, d.ld_x as i64);
    };
    let delta = |p: &mut DeltaBackwardParams| {
        (p.a2, p.lda2, p.b2, p.ldb2, p.k2) = (dz_addr, d.r as i64, b.w_down.addr, k_u as i64, r);
        drop(p);
    };
    match (op.insertion, b.du) {
        (Insertion::Parallel, None) => {
            // dx = [c_h·dy | dz]·[W ; W_down]: one pass of n + r steps.
            let mut p = base(d.m);
            (p.a, p.lda, p.coef) = (b.dy.addr, d.ld_y as i64, COEF_H);
            frozen(&mut p);
            delta(&mut p);
            steps.push(data_step(d.kernel, dtype, "dims.k", p)?);
        }
        (Insertion::Parallel, Some(du)) => {
            let mut p = base(d.m);
            (p.a, p.lda, p.coef) = (b.dy.addr, d.ld_y as i64, COEF_H);
            frozen(&mut p);
            steps.push(data_step(d.kernel, dtype, "dims.k", p)?);
            let mut p = base(d.m);
            delta(&mut p);
            (p.cols, p.out, p.ldo) = (k_u as i32, du.addr, d.ld_u as i64);
            steps.push(data_step(d.kernel, dtype, "dims.k_u", p)?);
        }
        (Insertion::Sequential, _) => {
            // dh = c_h·dy + dz·W_down (f32), then dx = dh·W.
            let mut p = base(d.m);
            (p.e, p.lde, p.coef) = (b.dy.addr, d.ld_y as i64, COEF_H);
            delta(&mut p);
            (p.cols, p.out, p.ldo, p.out_f32) = (n, dh_addr, d.n as i64, 1);
            steps.push(data_step(d.kernel, dtype, "dims.n", p)?);
            let mut p = base(d.m);
            (p.a, p.lda, p.a_f32, p.coef) = (dh_addr, d.n as i64, 1, COEF_ONE);
            frozen(&mut p);
            steps.push(data_step(d.kernel, dtype, "dims.k", p)?);
        }
    }
    Ok(steps)
}

/// The operands of one delta-apply backward, as addresses.
#[derive(Clone, Copy, Debug)]
pub struct DeltaApplyBackwardBufs {
    pub dy: Buf,
    pub h: Option<Buf>,
    pub u: Option<Buf>,
    pub w_down: Buf,
    pub w_up: Buf,
    pub b_up: Option<Buf>,
    pub gate: Option<Buf>,
    pub saved: Buf,
    pub dh: Buf,
    pub du: Option<Buf>,
    pub dw_down: Buf,
    pub db_down: Option<Buf>,
    pub dw_up: Buf,
    pub db_up: Option<Buf>,
    pub dgate: Option<Buf>,
    pub workspace: Buf,
    pub accumulate: bool,
}

/// Plans `delta_apply_backward` (see [`crate::delta_linear::DeltaApplyBackwardArgs`]): the
/// passes of `delta_linear_backward`, one problem per head (grid.z), with dh in place of dx.
pub fn delta_apply_backward(
    op: &DeltaLinear,
    d: &DeltaApplyDims,
    dtype: DType,
    b: &DeltaApplyBackwardBufs,
) -> Result<Vec<(Launch, DeltaBackwardParams)>> {
    plan_apply(op, d, dtype, b).map_err(|e| e.of("delta_apply_backward"))
}

fn plan_apply(
    op: &DeltaLinear,
    d: &DeltaApplyDims,
    dtype: DType,
    b: &DeltaApplyBackwardBufs,
) -> Result<Vec<(Launch, DeltaBackwardParams)>> {
    let heads = positive("dims.heads", d.heads)?;
    let hd = positive("dims.head_dim", d.head_dim)?;
    let r = positive("dims.r", d.r)?;
    let m = dim_i32("dims.m", d.m)?;
    let composition = composition_code(op.composition, d.r)?;
    let width = d.heads.saturating_mul(d.head_dim);
    let width32 = dim_i32("dims.heads × dims.head_dim", width)?;
    let seq = op.insertion == Insertion::Sequential;
    let matrix = |rows, cols, ld| MatrixLayout { rows, cols, ld };
    check_matrix("dy", b.dy, matrix(d.m, width, d.ld_y))?;
    if op.composition == Composition::Gated && d.heads != 1 {
        return Err(Error::invalid(
            "dims.heads",
            "1 with Composition::Gated (one λ a row over every head)",
            d.heads,
        ));
    }
    match b.h {
        Some(h) => check_matrix("h", h, matrix(d.m, width, d.ld_h))?,
        None if saves_h(op) => {
            return Err(Error::invalid(
                "h",
                "the forward's h (a sequential or gated delta's backward reads it)",
                "None",
            ))
        }
        None => {}
    }
    let du_cols = match (op.insertion, b.u) {
        (Insertion::Sequential, Some(_)) => {
            return Err(Error::invalid(
                "u",
                "None for sequential insertion (the delta reads h)",
                "a delta input",
            ))
        }
        (Insertion::Sequential, None) => d.head_dim,
        (Insertion::Parallel, None) => {
            return Err(Error::invalid(
                "u",
                "the delta input for parallel insertion",
                "None",
            ))
        }
        (Insertion::Parallel, Some(u)) => {
            positive("dims.u_head_dim", d.u_head_dim)?;
            check_matrix(
                "u",
                u,
                matrix(d.m, d.heads.saturating_mul(d.u_head_dim), d.ld_u),
            )?;
            d.u_head_dim
        }
    };
    let du32 = dim_i32("dims.u_head_dim", du_cols)?;
    check_exact("w_down", Some(b.w_down), &[d.heads, d.r, du_cols])?;
    check_exact("w_up", Some(b.w_up), &[d.heads, d.head_dim, d.r])?;
    check_exact("b_up", b.b_up, &[d.heads, d.head_dim])?;
    check_gate(b.gate, op.composition, d.m)?;
    let z_len = d.m.saturating_mul(d.heads).saturating_mul(d.r);
    check_len(
        "saved",
        Some(b.saved),
        z_len,
        Some("dims.saved_len(), what delta_apply_train saved"),
    )?;
    check_matrix("dh", b.dh, matrix(d.m, width, d.ld_y))?;
    match (op.insertion, b.du) {
        (Insertion::Parallel, Some(du)) => check_matrix(
            "du",
            du,
            matrix(d.m, d.heads.saturating_mul(du_cols), d.ld_u),
        )?,
        (Insertion::Parallel, None) => {
            return Err(Error::invalid("du", "the gradient of u", "None"))
        }
        (Insertion::Sequential, Some(_)) => {
            return Err(Error::invalid(
                "du",
                "None (a sequential delta's input is h: its gradient is in dh)",
                "a buffer",
            ))
        }
        (Insertion::Sequential, None) => {}
    }
    check_exact("dw_down", Some(b.dw_down), &[d.heads, d.r, du_cols])?;
    check_exact("db_down", b.db_down, &[d.heads, d.r])?;
    check_exact("dw_up", Some(b.dw_up), &[d.heads, d.head_dim, d.r])?;
    check_exact("db_up", b.db_up, &[d.heads, d.head_dim])?;
    match (op.composition, b.dgate) {
        (Composition::Gated, None) => {
            return Err(Error::invalid("dgate", format!("[{}] f32", d.m), "None"))
        }
        (Composition::Gated, g) => check_exact("dgate", g, &[d.m])?,
        (_, Some(_)) => {
            return Err(Error::invalid(
                "dgate",
                "None unless composition is Composition::Gated",
                "a buffer",
            ))
        }
        (_, None) => {}
    }
    let parallel = DeltaLinear {
        insertion: Insertion::Parallel,
        ..*op
    };
    let ws = backward_workspace_layout(&parallel, d.m, d.heads, d.head_dim, d.r, du_cols);
    check_len(
        "workspace",
        Some(b.workspace),
        ws.len,
        Some("dims.backward_workspace_len(op), f32"),
    )?;
    let t = dtype.size();
    check_disjoint(
        &[
            ("dh", Some(b.dh), t),
            ("du", b.du, t),
            ("dw_down", Some(b.dw_down), 4),
            ("db_down", b.db_down, 4),
            ("dw_up", Some(b.dw_up), 4),
            ("db_up", b.db_up, 4),
            ("dgate", b.dgate, 4),
            ("workspace", Some(b.workspace), 4),
        ],
        &[
            ("dy", Some(b.dy), t),
            ("h", b.h, t),
            ("u", b.u, t),
            ("w_down", Some(b.w_down), t),
            ("w_up", Some(b.w_up), t),
            ("b_up", b.b_up, t),
            ("gate", b.gate, t),
            ("saved", Some(b.saved), 4),
        ],
    )?;
    if d.m == 0 {
        return Ok(Vec::new());
    }

    let (dhd, rr) = (d.head_dim as i64, d.r as i64);
    let ldz = (d.heads * d.r) as i64;
    let dz_addr = b.workspace.addr;
    let act = op.activation as i32;
    let gate = b.gate.map_or(0, |g| g.addr);
    let base = |rows: usize| DeltaBackwardParams {
        batch: heads,
        ..params(composition, act, gate, rows)
    };
    let mut steps = Vec::new();

    // dz per head: f′(z) ⊙ (c_d·dy_h·W_up,h).
    let mut p = base(d.m);
    (p.a, p.lda, p.bs_a) = (b.dy.addr, d.ld_y as i64, dhd);
    (p.b, p.ldb, p.bs_b, p.k1) = (b.w_up.addr, rr, dhd * rr, hd);
    (p.z, p.ldz, p.bs_z, p.cols, p.coef) = (b.saved.addr, ldz, rr, r, COEF_D);
    (p.out, p.ldo, p.bs_out, p.out_f32) = (dz_addr, ldz, rr, 1);
    steps.push(dz_step(dtype, p)?);

    if let (Some(dgate), Some(h)) = (b.dgate, b.h) {
        let mut p = base(d.m);
        (p.a, p.lda, p.b, p.ldb, p.k1) = (b.dy.addr, d.ld_y as i64, b.w_up.addr, rr, r);
        (p.z, p.ldz, p.cols) = (b.saved.addr, ldz, hd);
        (p.bias, p.e, p.lde) = (b.b_up.map_or(0, |b| b.addr), h.addr, d.ld_h as i64);
        (p.out, p.ldo, p.out_f32) = (dgate.addr, 1, 1);
        let id = kernel_for(
            dtype,
            [
                KernelId::delta_bwd_dgate_f32,
                KernelId::delta_bwd_dgate_f16,
                KernelId::delta_bwd_dgate_bf16,
            ],
        );
        let grid = grid_for([("dims.m", d.m, 1), ("dims.m", 1, 1), ("dims.heads", 1, 1)])?;
        steps.push((launch(id, grid, [128, 1, 1]), p));
    }

    // dW_up,h = c_d·dy_hᵀ·f(z_h), db_up.
    let mut p = base(d.head_dim);
    (p.a, p.lda, p.bs_a, p.coef) = (b.dy.addr, d.ld_y as i64, dhd, COEF_D);
    (p.b, p.ldb, p.bs_b, p.b_f32, p.b_activate) = (b.saved.addr, ldz, rr, 1, 1);
    (p.cols, p.k1, p.accumulate) = (r, m, b.accumulate as i32);
    (p.out, p.ldo, p.bs_out, p.out_f32) = (b.dw_up.addr, rr, dhd * rr, 1);
    (p.out_bias, p.bs_out_bias) = (b.db_up.map_or(0, |b| b.addr), dhd);
    let names = ("dims.head_dim", "dims.r");
    steps.extend(weight_steps(d.kernel, dtype, names, p, &ws, b.workspace)?);

    // dW_down,h = dz_hᵀ·u_h, db_down.
    let (u_addr, ld_u) = match (op.insertion, b.u, b.h) {
        (Insertion::Parallel, Some(u), _) => (u.addr, d.ld_u),
        (_, _, Some(h)) => (h.addr, d.ld_h),
        _ => unreachable!("validated: u for parallel, h for sequential"),
    };
    let mut p = base(d.r);
    (p.a, p.lda, p.bs_a, p.a_f32, p.coef) = (dz_addr, ldz, rr, 1, COEF_ONE);
    (p.b, p.ldb, p.bs_b) = (u_addr, ld_u as i64, du_cols as i64);
    (p.cols, p.k1, p.accumulate) = (du32, m, b.accumulate as i32);
    let du64 = du_cols as i64;
    (p.out, p.ldo, p.bs_out, p.out_f32) = (b.dw_down.addr, du64, rr * du64, 1);
    (p.out_bias, p.bs_out_bias) = (b.db_down.map_or(0, |b| b.addr), rr);
    let names = ("dims.r", "dims.u_head_dim");
    steps.extend(weight_steps(d.kernel, dtype, names, p, &ws, b.workspace)?);

    // The delta's data part per head: dz_h·W_down,h.
    let delta = |p: &mut DeltaBackwardParams| {
        (p.a2, p.lda2, p.bs_a2) = (dz_addr, ldz, rr);
        (p.b2, p.ldb2, p.bs_b2, p.k2) = (b.w_down.addr, du64, rr * du64, r);
    };
    if seq {
        // dh = c_h·dy + dz·W_down, per head.
        let mut p = base(d.m);
        (p.e, p.lde, p.bs_e, p.coef) = (b.dy.addr, d.ld_y as i64, dhd, COEF_H);
        delta(&mut p);
        (p.cols, p.out, p.ldo, p.bs_out) = (hd, b.dh.addr, d.ld_y as i64, dhd);
        steps.push(data_step(d.kernel, dtype, "dims.head_dim", p)?);
    } else {
        // dh = c_h·dy over the whole row; du = dz·W_down per head.
        let mut p = params(composition, act, gate, d.m);
        (p.e, p.lde, p.coef) = (b.dy.addr, d.ld_y as i64, COEF_H);
        (p.cols, p.out, p.ldo) = (width32, b.dh.addr, d.ld_y as i64);
        steps.push(data_step(d.kernel, dtype, "dims.head_dim", p)?);
        let du = b.du.expect("validated");
        let mut p = base(d.m);
        delta(&mut p);
        (p.cols, p.out, p.ldo, p.bs_out) = (du32, du.addr, d.ld_u as i64, du64);
        steps.push(data_step(d.kernel, dtype, "dims.u_head_dim", p)?);
    }
    Ok(steps)
}
