//! The multi-head parallel adapter (MH PA) of He et al. 2022, §3.3: "we apply parallel
//! adapters to modify head attention outputs as prefix tuning", one bottleneck per head.
//!
//! Prefix tuning modifies head i's output `h_i` (d_h wide, before the output projection
//! W_o) by `softmax(x·W_q^(i)·P_k^(i)ᵀ)·P_v^(i)`: a bottleneck whose down-projection reads
//! the head's query `q_i = x·W_q^(i)` through the head's own `P_k^(i)` [l, d_h]. MH PA
//! replaces softmax by an activation `f` and the prefix by learned per-head projections:
//!
//! ```text
//! h_i ← h_i + s·( f(u_i·W_down^(i)ᵀ + b_down^(i))·W_up^(i)ᵀ + b_up^(i) )    i = 0..H
//! ```
//!
//! - `h` [M, H·d_h]: the heads' outputs side by side, head i in columns
//!   `i·d_h .. (i+1)·d_h` (the layout attention writes before W_o);
//! - `u` [M, H·d_in]: the per-head inputs, head i reading columns `i·d_in .. (i+1)·d_in`.
//!   For the paper's MH PA `u` is the query projection `x·W_qᵀ` (d_in = d_h), which is how
//!   the variant gets per-head capacity "for free" from the frozen multi-head projections:
//!   H bottlenecks of width r cost `2·r·H·d_h` parameters, like one adapter of width r on
//!   a `H·d_h`-wide layer;
//! - `W_down` [H, r, d_in], `b_down` [H, r], `W_up` [H, d_h, r], `b_up` [H, d_h], each
//!   head's slice in `nn.Linear` layout, contiguous.
//!
//! Composition is `Add` (the paper's MH PA), `Scaled(s)` or `Lora` (s = α / r of each
//! head's rank); a gate is refused.

use super::{check_vec, dot, par_row_blocks, MatRef, Scalar};
use crate::{Activation, Composition, Error, Result};

/// What a multi-head parallel adapter computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MultiHeadAdapter {
    /// Number of heads H.
    pub heads: usize,
    /// Bottleneck width r of each head.
    pub rank: usize,
    /// The bottleneck's functional form `f`.
    pub activation: Activation,
    /// `Add`, `Scaled(s)` or `Lora`.
    pub composition: Composition,
}

/// The tensors of a multi-head parallel adapter, borrowed; shapes are in the module docs.
#[derive(Clone, Copy, Debug)]
pub struct MultiHeadAdapterTensors<'a, T> {
    /// The heads' outputs `h` [M, H·d_h].
    pub h: MatRef<'a, T>,
    /// The per-head inputs `u` [M, H·d_in].
    pub u: MatRef<'a, T>,
    /// Down-projections [H, r, d_in], contiguous.
    pub w_down: &'a [T],
    /// Down-projection biases [H, r].
    pub b_down: Option<&'a [T]>,
    /// Up-projections [H, d_h, r], contiguous.
    pub w_up: &'a [T],
    /// Up-projection biases [H, d_h].
    pub b_up: Option<&'a [T]>,
}

/// A contiguous 3-D weight's length check: `dims` names the shape.
fn check_weight<T>(arg: &'static str, w: &[T], dims: &str, shape: [usize; 3]) -> Result<()> {
    let len = shape.iter().product::<usize>();
    if w.len() != len {
        return Err(Error::invalid(
            arg,
            format!("{dims} = {shape:?}, {len} elements"),
            format!("{} elements", w.len()),
        ));
    }
    Ok(())
}

/// The reference forward of a multi-head parallel adapter: the composed heads
/// [M, H·d_h] (contiguous, f64), see the module docs.
pub fn multi_head_adapter<T: Scalar>(
    op: &MultiHeadAdapter,
    t: &MultiHeadAdapterTensors<T>,
) -> Result<Vec<f64>> {
    let (heads, r) = (op.heads, op.rank);
    if heads == 0 {
        return Err(Error::invalid("heads", "at least one head", "0"));
    }
    if op.composition == Composition::Gated {
        return Err(Error::invalid(
            "composition",
            "Add, Scaled or Lora",
            "Gated",
        ));
    }
    super::linear::check_lora_rank(op.composition, r)?;
    t.h.check_buffer("h")?;
    t.u.check_buffer("u")?;
    let m = t.h.rows();
    if t.h.cols() % heads != 0 {
        return Err(Error::invalid(
            "h",
            format!("[M, H·d_h] with H = {heads} dividing the columns"),
            format!("[{}, {}]", m, t.h.cols()),
        ));
    }
    if t.u.rows() != m || t.u.cols() % heads != 0 {
        return Err(Error::invalid(
            "u",
            format!("[M, H·d_in] with M = {m} and H = {heads} dividing the columns"),
            format!("[{}, {}]", t.u.rows(), t.u.cols()),
        ));
    }
    let (d_h, d_in) = (t.h.cols() / heads, t.u.cols() / heads);
    check_weight("w_down", t.w_down, "[H, r, d_in]", [heads, r, d_in])?;
    check_vec("b_down", t.b_down, "[H·r]", heads * r)?;
    check_weight("w_up", t.w_up, "[H, d_h, r]", [heads, d_h, r])?;
    check_vec("b_up", t.b_up, "[H·d_h]", heads * d_h)?;

    let s = f64::from(op.composition.scale(r));
    let (h, u) = (t.h.to_f64(), t.u.to_f64());
    let w_down: Vec<f64> = t.w_down.iter().map(|v| v.as_f64()).collect();
    let w_up: Vec<f64> = t.w_up.iter().map(|v| v.as_f64()).collect();
    let bias = |b: Option<&[T]>, i: usize| b.map_or(0.0, |b| b[i].as_f64());
    let width = heads * d_h;
    Ok(par_row_blocks(m, width, |rows, out| {
        let mut z = vec![0.0; r];
        for (y, row) in out.chunks_exact_mut(width).zip(rows) {
            for hd in 0..heads {
                let u_i = &u[row * heads * d_in + hd * d_in..][..d_in];
                for (j, zj) in z.iter_mut().enumerate() {
                    let w = &w_down[(hd * r + j) * d_in..][..d_in];
                    *zj = op
                        .activation
                        .apply_f64(dot(u_i, w) + bias(t.b_down, hd * r + j));
                }
                for c in 0..d_h {
                    let w = &w_up[(hd * d_h + c) * r..][..r];
                    let delta = dot(&z, w) + bias(t.b_up, hd * d_h + c);
                    let col = hd * d_h + c;
                    y[col] = h[row * width + col] + s * delta;
                }
            }
        }
    }))
}
