//! CPU reference implementations of every forward operation and of the delta's backward:
//! the truth each kernel is checked against.
//!
//! Obviously right before fast: every input is widened to f64 once, every sum is an f64
//! sum, nothing is rounded back to the storage type, and the results are returned in f64
//! so that tests compare a kernel against un-rounded values. The loops are only as clever
//! as needed to stay usable at test sizes (row-parallel over the machine's cores, row-dot
//! products over cache-sized blocks).
//!
//! - [`mod@linear`]: the frozen linear layer plus a bottleneck delta (LoRA, adapters,
//!   parallel / scaled / gated), the LoRA merge, and the K-concatenation form.
//! - [`adapter`]: the multi-head parallel adapter (one bottleneck per attention head).
//! - [`backward`]: the backward of both (every gradient for an upstream `dy`), checked
//!   against central finite differences of the forwards (tests/reference_backward.rs).
//! - [`attention`]: attention over learned prefix vectors and a masked context, the gate
//!   λ, the unfused concatenation path, and the LSE merge of two attention states.
//! - [`optim`]: AdamW over a list of tensors, with clipping by the global gradient norm.
//!
//! Every function validates its arguments and returns [`Error::InvalidArgument`] naming
//! the offending argument, so a test that feeds a kernel and its reference the same
//! tensors learns about a shape mistake from the reference too.

pub mod adapter;
pub mod attention;
pub mod backward;
pub mod dora;
pub mod linear;
pub mod multi_adapter;
pub mod optim;
pub mod quant;

pub use adapter::{multi_head_adapter, MultiHeadAdapter, MultiHeadAdapterTensors};
pub use attention::{
    context_attention, lse_merge, lse_merge_backward, multi_prefix_attention, prefix_attention,
    prefix_attention_backward, prefix_attention_concat, prefix_only_attention, AttentionState,
    MergeGrads, MergedAttention, MultiPrefixAttentionTensors, PrefixAttention,
    PrefixAttentionGrads, PrefixAttentionOutput, PrefixAttentionTensors, Tensor4,
};
pub use backward::{
    delta_linear_backward, multi_head_adapter_backward, DeltaLinearGrads, MultiHeadAdapterGrads,
};
pub use linear::{
    delta_linear, delta_linear_concat, delta_linear_dropout, linear, lora_merge, DeltaLinear,
    DeltaLinearTensors,
};

use crate::{Element, Error, MatrixLayout, Result};
use std::ops::Range;

/// A value the references read: every [`Element`] type, and `f64` so that the output of
/// one reference can feed another (a merged weight into [`linear()`], say).
pub trait Scalar: Copy + Send + Sync + std::fmt::Debug + bytemuck::Pod + 'static {
    /// The exact f64 value.
    fn as_f64(self) -> f64;
}

impl<T: Element> Scalar for T {
    fn as_f64(self) -> f64 {
        self.to_f64()
    }
}

impl Scalar for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

/// Widen a buffer to f64 (exact for every [`Scalar`]).
pub fn widen<T: Scalar>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.as_f64()).collect()
}

/// A borrowed row-major matrix: `data[i * layout.ld + j]` is element (i, j).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    /// The buffer; it must hold at least [`MatrixLayout::min_len`] elements.
    pub data: &'a [T],
    /// Rows, columns and row stride.
    pub layout: MatrixLayout,
}

impl<'a, T: Scalar> MatRef<'a, T> {
    /// A contiguous `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            layout: MatrixLayout::contiguous(rows, cols),
        }
    }

    /// A `rows × cols` matrix whose rows start `ld` elements apart (`ld ≥ cols`), e.g. a
    /// column slice of a wider matrix (`&data[offset..]` with the wider matrix's `ld`).
    pub fn with_ld(data: &'a [T], rows: usize, cols: usize, ld: usize) -> Self {
        MatRef {
            data,
            layout: MatrixLayout { rows, cols, ld },
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.layout.cols
    }

    /// Element (i, j) in f64. Panics when out of range.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        assert!(i < self.layout.rows && j < self.layout.cols);
        self.data[i * self.layout.ld + j].as_f64()
    }

    /// The matrix as a contiguous f64 `rows × cols` buffer.
    pub fn to_f64(&self) -> Vec<f64> {
        let l = self.layout;
        let mut out = Vec::with_capacity(l.rows * l.cols);
        for i in 0..l.rows {
            out.extend(
                self.data[i * l.ld..i * l.ld + l.cols]
                    .iter()
                    .map(|v| v.as_f64()),
            );
        }
        out
    }

    /// Checks the layout against the buffer: `ld ≥ cols` and enough elements.
    pub(crate) fn check_buffer(&self, arg: &'static str) -> Result<()> {
        let l = self.layout;
        if l.rows > 1 && l.ld < l.cols {
            return Err(Error::invalid(
                arg,
                format!("a row stride ld >= cols = {}", l.cols),
                format!("ld = {}", l.ld),
            ));
        }
        if self.data.len() < l.min_len() {
            return Err(Error::invalid(
                arg,
                format!(
                    "a buffer of at least {} elements for [{}, {}] with ld {}",
                    l.min_len(),
                    l.rows,
                    l.cols,
                    l.ld
                ),
                format!("{} elements", self.data.len()),
            ));
        }
        Ok(())
    }

    /// Checks the buffer and the shape: `dims` names the expected dimensions
    /// (e.g. `"[N, r]"`), `rows` / `cols` are their values.
    pub(crate) fn check(
        &self,
        arg: &'static str,
        dims: &str,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.check_buffer(arg)?;
        if self.rows() != rows || self.cols() != cols {
            return Err(Error::invalid(
                arg,
                format!("{dims} = [{rows}, {cols}]"),
                format!("[{}, {}]", self.rows(), self.cols()),
            ));
        }
        Ok(())
    }
}

/// Checks an optional vector's length: `dims` names it (e.g. `"[N]"`).
pub(crate) fn check_vec<T>(
    arg: &'static str,
    v: Option<&[T]>,
    dims: &str,
    len: usize,
) -> Result<()> {
    match v {
        Some(v) if v.len() != len => Err(Error::invalid(
            arg,
            format!("{dims} = [{len}]"),
            format!("[{}]", v.len()),
        )),
        _ => Ok(()),
    }
}

/// `Σ a_i·b_i` in f64, four independent partial sums (so the loop pipelines).
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f64; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (a4.remainder(), b4.remainder());
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Fills a new `rows × width` f64 buffer, handing each worker thread a contiguous range of
/// rows and its slice of the buffer (`f(rows, chunk)`, `chunk.len() == rows.len() * width`).
pub(crate) fn par_row_blocks(
    rows: usize,
    width: usize,
    f: impl Fn(Range<usize>, &mut [f64]) + Sync,
) -> Vec<f64> {
    let mut out = vec![0.0; rows * width];
    if out.is_empty() {
        return out;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = rows.div_ceil(threads.min(rows));
    let f = &f;
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per_thread * width).enumerate() {
            let start = t * per_thread;
            s.spawn(move || f(start..start + chunk.len() / width, chunk));
        }
    });
    out
}

/// `C = A·Bᵀ` for contiguous f64 `A` [m, k] and `B` [n, k]: every element is a row-dot
/// product. Rows of `C` are split over threads; `B` is walked in blocks of rows that stay
/// in cache while every row of the thread's `A` passes over them.
pub(crate) fn matmul_nt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    debug_assert!(a.len() == m * k && b.len() == n * k);
    const B_ROWS: usize = 32;
    par_row_blocks(m, n, |rows, c| {
        for j0 in (0..n).step_by(B_ROWS) {
            let j1 = (j0 + B_ROWS).min(n);
            for (r, i) in rows.clone().enumerate() {
                let a_row = &a[i * k..(i + 1) * k];
                for j in j0..j1 {
                    c[r * n + j] = dot(a_row, &b[j * k..(j + 1) * k]);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn dot_handles_every_length() {
        for n in 0..13 {
            let a: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
            let b: Vec<f64> = (0..n).map(|i| 1.0 - i as f64).collect();
            assert_eq!(dot(&a, &b), naive_dot(&a, &b), "n = {n}");
        }
    }

    #[test]
    fn matmul_nt_matches_the_definition_on_odd_shapes() {
        for (m, n, k) in [
            (1, 1, 1),
            (3, 70, 5),
            (33, 2, 17),
            (5, 0, 3),
            (0, 4, 2),
            (2, 3, 0),
        ] {
            let a: Vec<f64> = (0..m * k).map(|i| (i % 7) as f64 - 3.0).collect();
            let b: Vec<f64> = (0..n * k).map(|i| (i % 5) as f64 * 0.25).collect();
            let c = matmul_nt(&a, &b, m, n, k);
            assert_eq!(c.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let e = naive_dot(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
                    assert_eq!(c[i * n + j], e, "({i}, {j}) of {m}x{n}x{k}");
                }
            }
        }
    }

    #[test]
    fn par_row_blocks_visits_every_row_once() {
        for rows in [0, 1, 2, 3, 17] {
            let v = par_row_blocks(rows, 2, |range, chunk| {
                for (r, slot) in range.zip(chunk.chunks_exact_mut(2)) {
                    slot[0] += r as f64;
                    slot[1] += 1.0;
                }
            });
            let expected: Vec<f64> = (0..rows).flat_map(|r| [r as f64, 1.0]).collect();
            assert_eq!(v, expected);
        }
        assert!(par_row_blocks(5, 0, |_, _| unreachable!()).is_empty());
    }

    #[test]
    fn matrix_views_are_checked() {
        let data = [0.0f32; 10];
        assert!(MatRef::with_ld(&data, 2, 4, 6)
            .check("x", "[M, K]", 2, 4)
            .is_ok());
        let err = MatRef::with_ld(&data, 2, 5, 6)
            .check_buffer("x")
            .unwrap_err();
        assert!(err.to_string().contains("at least 11 elements"), "{err}");
        let err = MatRef::with_ld(&data, 2, 4, 3)
            .check_buffer("x")
            .unwrap_err();
        assert!(err.to_string().contains("ld >= cols = 4"), "{err}");
        let err = MatRef::new(&data, 2, 4)
            .check("w", "[N, K]", 2, 5)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument `w`: expected [N, K] = [2, 5], got [2, 4]"
        );
        assert_eq!(MatRef::with_ld(&data, 2, 2, 7).to_f64().len(), 4);
    }
}
