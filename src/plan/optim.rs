//! Plans AdamW over a list of tensors (`kernels/optim.cu`): validation, the device table of
//! tensors and the block → (tensor, chunk) map, and the launches.
//!
//! A backend calls [`adamw`], copies [`AdamwPlan::table`] to memory the kernels can read
//! and write (the emulator uses it where it is), and runs [`AdamwPlan::steps`] with the
//! copy's address. The table holds, in u64 words:
//!
//! ```text
//! [0, 6·T)            entries: (param, grad, m, v, param_t, len) per tensor
//! [6·T, 6·T + B)      block map: tensor (low u32), chunk (high u32) per block
//! [6·T + B, 6·T + 2B) partials: Σ g² per block (f64), written by adamw_sumsq
//! 6·T + 2B            the clipping coefficient (f32 in the low half), written by adamw_norm
//! ```

use super::{check_len, Buf, KernelParams, Launch};
use crate::kernels::KernelId;
use crate::optim::AdamW;
use crate::{DType, Error, Result};

/// Elements a block updates (`kAdamwChunk` in kernels/optim.cu).
pub const CHUNK: usize = 2048;
/// Threads of a block (`kAdamwThreads`).
const THREADS: u32 = 256;
/// Words of one table entry (`AdamwEntry`).
const ENTRY_WORDS: usize = 6;

/// Twin of `AdamwParams` in kernels/optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AdamwParams {
    pub entries: u64,
    pub block_map: u64,
    pub partials: u64,
    pub clip: u64,
    pub grad_norm: u64,
    pub blocks: u32,
    pub lr_wd_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub max_norm: f32,
}

// SAFETY: field for field `AdamwParams` (checked by tests/optim.rs).
unsafe impl KernelParams for AdamwParams {}

/// One tensor's buffers as the planner sees them.
#[derive(Clone, Copy, Debug)]
pub struct AdamwTensorBufs {
    pub param: Buf,
    pub grad: Buf,
    pub m: Buf,
    pub v: Buf,
    pub param_t: Buf,
}

/// The operands of an AdamW step.
#[derive(Clone, Debug)]
pub struct AdamwBufs {
    pub tensors: Vec<AdamwTensorBufs>,
    pub grad_norm: Option<Buf>,
}

/// A validated AdamW step: the table to upload and the launches that read it.
#[derive(Clone, Debug)]
pub struct AdamwPlan {
    /// The table (see the module's documentation), to be copied where the kernels run;
    /// its partials and coefficient words are scratch the kernels write.
    pub table: Vec<u64>,
    tensors: usize,
    params: AdamwParams,
    update: KernelId,
    norm: bool,
}

impl AdamwPlan {
    /// The launches, in order, for the table copied to `table_addr` (8-byte aligned):
    /// the norm's two passes when the norm is asked for or clipping is on, then the update
    /// (none when every tensor is empty).
    pub fn steps(&self, table_addr: u64) -> Vec<(Launch, AdamwParams)> {
        let word = |i: usize| table_addr + 8 * i as u64;
        let blocks = self.params.blocks as usize;
        let clip_word = ENTRY_WORDS * self.tensors + 2 * blocks;
        let p = AdamwParams {
            entries: word(0),
            block_map: word(ENTRY_WORDS * self.tensors),
            partials: word(ENTRY_WORDS * self.tensors + blocks),
            clip: if self.norm { word(clip_word) } else { 0 },
            ..self.params
        };
        let launch = |kernel, blocks: u32| Launch {
            kernel,
            grid: [blocks, 1, 1],
            block: [THREADS, 1, 1],
            dynamic_smem: 0,
            overlap_previous: false,
        };
        let mut steps = Vec::new();
        if self.norm {
            if blocks > 0 {
                steps.push((launch(KernelId::adamw_sumsq, p.blocks), p));
            }
            steps.push((launch(KernelId::adamw_norm, 1), p));
        }
        if blocks > 0 {
            steps.push((launch(self.update, p.blocks), p));
        }
        steps
    }
}

/// Plans AdamW step `step` (from 1) of `op` over the tensors of `b`, whose T copies are of
/// `dtype`.
pub fn adamw(op: &AdamW, step: u64, dtype: DType, b: &AdamwBufs) -> Result<AdamwPlan> {
    plan_adamw(op, step, dtype, b).map_err(|e| e.of("adamw"))
}

fn plan_adamw(op: &AdamW, step: u64, dtype: DType, b: &AdamwBufs) -> Result<AdamwPlan> {
    let params = hyperparameters(op, step)?;
    check_len("grad_norm", b.grad_norm, 1, Some("[1] f32"))?;
    for (i, t) in b.tensors.iter().enumerate() {
        for (arg, buf) in [
            ("tensors.grad", t.grad),
            ("tensors.m", t.m),
            ("tensors.v", t.v),
        ]
        .into_iter()
        .chain([("tensors.param_t", t.param_t)])
        {
            if buf.len != t.param.len {
                return Err(Error::invalid(
                    arg,
                    format!("tensors[{i}].param's length, {}", t.param.len),
                    format!("{} elements in tensors[{i}]", buf.len),
                ));
            }
        }
    }
    check_aliasing(b, dtype)?;

    let tensors = b.tensors.len();
    let mut table: Vec<u64> = Vec::with_capacity(ENTRY_WORDS * tensors);
    let mut block_map: Vec<u64> = Vec::new();
    for (i, t) in b.tensors.iter().enumerate() {
        table.extend([t.param, t.grad, t.m, t.v, t.param_t].map(|buf| buf.addr));
        table.push(t.param.len as u64);
        let chunks = t.param.len.div_ceil(CHUNK);
        if u32::try_from(chunks).is_err() {
            return Err(Error::invalid(
                "tensors.param",
                format!("at most {} elements a tensor", u32::MAX as usize * CHUNK),
                format!("{} elements in tensors[{i}]", t.param.len),
            ));
        }
        block_map.extend((0..chunks as u64).map(|c| i as u64 | c << 32));
    }
    let blocks = block_map.len();
    const MAX_BLOCKS: usize = (1 << 31) - 1;
    if blocks > MAX_BLOCKS {
        return Err(Error::invalid(
            "tensors",
            format!("at most {} elements in all", MAX_BLOCKS * CHUNK),
            format!("{blocks} chunks of {CHUNK}"),
        ));
    }
    table.extend(block_map);
    // Partials and the clipping coefficient: scratch, zero until the kernels write them.
    table.resize(table.len() + blocks + 1, 0);
    let update = match dtype {
        DType::F32 => KernelId::adamw_update_f32,
        DType::F16 => KernelId::adamw_update_f16,
        DType::BF16 => KernelId::adamw_update_bf16,
    };
    Ok(AdamwPlan {
        table,
        tensors,
        params: AdamwParams {
            grad_norm: b.grad_norm.map_or(0, |g| g.addr),
            blocks: blocks as u32,
            ..params
        },
        update,
        norm: b.grad_norm.is_some() || op.max_grad_norm.is_some(),
    })
}

/// The kernels' constants of `op` at `step`, after checking each hyperparameter.
fn hyperparameters(op: &AdamW, step: u64) -> Result<AdamwParams> {
    op.check(step)?;
    let wd = op.weight_decay;
    // Bias corrections in f64, as PyTorch computes them (Python floats), then rounded.
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - f64::from(op.beta1).powi(t);
    let bc2 = 1.0 - f64::from(op.beta2).powi(t);
    Ok(AdamwParams {
        lr_wd_decay: (1.0 - f64::from(op.lr) * f64::from(wd)) as f32,
        beta1: op.beta1,
        beta2: op.beta2,
        step_size: (f64::from(op.lr) / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        eps: op.eps,
        max_norm: op.max_grad_norm.unwrap_or(0.0),
        ..AdamwParams::default()
    })
}

/// An error when two buffers overlap where one of them is written (every buffer but the
/// gradients is): the kernels read and write element by element, so an overlap would
/// update an element twice or read a value already updated. Empty buffers are skipped.
fn check_aliasing(b: &AdamwBufs, dtype: DType) -> Result<()> {
    // (start, end, name, tensor index, written)
    let mut spans: Vec<(u64, u64, &'static str, usize, bool)> = Vec::new();
    for (i, t) in b.tensors.iter().enumerate() {
        let f32s = [("param", t.param, true), ("grad", t.grad, false)];
        let moments = [("m", t.m, true), ("v", t.v, true)];
        for (name, buf, written) in f32s.into_iter().chain(moments) {
            spans.push((buf.addr, buf.addr + 4 * buf.len as u64, name, i, written));
        }
        let bytes = (dtype.size() * t.param_t.len) as u64;
        spans.push((t.param_t.addr, t.param_t.addr + bytes, "param_t", i, true));
    }
    if let Some(g) = b.grad_norm {
        spans.push((g.addr, g.addr + 4, "grad_norm", usize::MAX, true));
    }
    spans.retain(|s| s.1 > s.0);
    spans.sort_by_key(|s| s.0);
    let name = |s: &(u64, u64, &str, usize, bool)| match s.3 {
        usize::MAX => s.2.to_string(),
        i => format!("tensors[{i}].{}", s.2),
    };
    // Sorted by start, a span overlaps an earlier one iff some earlier span ends after it
    // starts: keep the furthest-reaching earlier span of all, and of the written ones.
    type Span = (u64, u64, &'static str, usize, bool);
    let (mut any, mut written): (Option<&Span>, Option<&Span>) = (None, None);
    for later in &spans {
        let rival = if later.4 { any } else { written };
        if let Some(earlier) = rival.filter(|e| e.1 > later.0) {
            return Err(Error::invalid(
                "tensors",
                "buffers that do not overlap (only gradients may share memory)",
                format!("{} overlaps {}", name(earlier), name(later)),
            ));
        }
        if any.is_none_or(|b| b.1 < later.1) {
            any = Some(later);
        }
        if later.4 && written.is_none_or(|b| b.1 < later.1) {
            written = Some(later);
        }
    }
    Ok(())
}
