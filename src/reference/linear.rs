//! The frozen linear layer with a bottleneck delta, in f64:
//!
//! ```text
//! h  = x·Wᵀ + b                                   frozen, [M, N]
//! Δh = f(u·W_downᵀ + b_down)·W_upᵀ + b_up         bottleneck of width r
//! y  = h + Δh | h + s·Δh | (1 − λ)·h + λ·Δh        Add | Scaled(s) or Lora | Gated
//! ```
//!
//! Layouts follow PyTorch's `nn.Linear` (so PEFT checkpoints load as they are): `x` [M, K],
//! `W` [N, K], `W_down` [r, K_u] (LoRA's `lora_A.weight`, an adapter's down-projection
//! weight), `W_up` [N, r] (`lora_B.weight`), biases `[N]` / `[r]` / `[N]`, `y` [M, N].
//!
//! Insertion decides `u`:
//! - [`Insertion::Parallel`]: `u = x`, or a separate delta input `u` [M, K_u] (an FFN's
//!   parallel adapter reads the FFN's input while `h` is the FFN's output, so `K_u ≠ K`);
//! - [`Insertion::Sequential`]: `u = h`, `K_u = N` (Houlsby's adapter after a sublayer).
//!   `h` here is the f64 value, bias included, never rounded to the storage type: the
//!   reference is the exact composition, and a kernel that keeps `h` in registers and
//!   rounds only `y` approximates exactly this.

use super::{check_vec, matmul_nt, par_row_blocks, widen, MatRef, Scalar};
use crate::{Composition, Error, Insertion, Result};

pub use crate::delta_linear::DeltaLinear;

/// The tensors of a delta-linear layer, borrowed; shapes are in the module docs.
#[derive(Clone, Copy, Debug)]
pub struct DeltaLinearTensors<'a, T> {
    /// Input `x` [M, K].
    pub x: MatRef<'a, T>,
    /// Frozen weight `W` [N, K].
    pub w: MatRef<'a, T>,
    /// Frozen bias `b` `[N]`.
    pub b: Option<&'a [T]>,
    /// A separate delta input `u` [M, K_u] for parallel insertion; `None` means `u = x`.
    /// Must be `None` for sequential insertion (`u = h`).
    pub u: Option<MatRef<'a, T>>,
    /// Down-projection `W_down` [r, K_u] (LoRA A).
    pub w_down: MatRef<'a, T>,
    /// Down-projection bias `[r]`.
    pub b_down: Option<&'a [T]>,
    /// Up-projection `W_up` [N, r] (LoRA B).
    pub w_up: MatRef<'a, T>,
    /// Up-projection bias `[N]`.
    pub b_up: Option<&'a [T]>,
    /// The per-row gate λ `[M]`, given iff the composition is [`Composition::Gated`]. In f64
    /// so that a gate of any storage type (f32 next to bf16 data, say) converts exactly.
    pub gate: Option<&'a [f64]>,
}

/// The sizes of a validated delta-linear problem.
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    r: usize,
}

/// Validates every tensor against `x`, `W` and `W_down`, which define M, K, N and r.
fn check<T: Scalar>(op: &DeltaLinear, t: &DeltaLinearTensors<T>) -> Result<Dims> {
    t.x.check_buffer("x")?;
    let (m, k) = (t.x.rows(), t.x.cols());
    let n = t.w.rows();
    t.w.check("w", "[N, K]", n, k)?;
    check_vec("b", t.b, "[N]", n)?;
    let (k_u, down_dims) = match (op.insertion, t.u) {
        (Insertion::Parallel, None) => (k, "[r, K]"),
        (Insertion::Parallel, Some(u)) => {
            u.check_buffer("u")?;
            if u.rows() != m {
                return Err(Error::invalid(
                    "u",
                    format!("[M, K_u] with M = {m}"),
                    format!("[{}, {}]", u.rows(), u.cols()),
                ));
            }
            (u.cols(), "[r, K_u]")
        }
        (Insertion::Sequential, None) => (n, "[r, N]"),
        (Insertion::Sequential, Some(u)) => {
            return Err(Error::invalid(
                "u",
                "None: with sequential insertion the delta reads h",
                format!("[{}, {}]", u.rows(), u.cols()),
            ))
        }
    };
    let r = t.w_down.rows();
    t.w_down.check("w_down", down_dims, r, k_u)?;
    check_lora_rank(op.composition, r)?;
    check_vec("b_down", t.b_down, "[r]", r)?;
    t.w_up.check("w_up", "[N, r]", n, r)?;
    check_vec("b_up", t.b_up, "[N]", n)?;
    match (op.composition, t.gate) {
        (Composition::Gated, None) => {
            return Err(Error::invalid(
                "gate",
                format!("[M] = [{m}] (the composition is Gated)"),
                "None",
            ))
        }
        (Composition::Gated, g) => check_vec("gate", g, "[M]", m)?,
        (_, Some(g)) => {
            return Err(Error::invalid(
                "gate",
                "None (the composition is not Gated)",
                format!("[{}]", g.len()),
            ))
        }
        (_, None) => {}
    }
    Ok(Dims { m, n, k, r })
}

/// LoRA's scale α / r (or α / √r) needs r ≥ 1: an error naming `w_down` (whose rows are r)
/// otherwise.
pub(super) fn check_lora_rank(composition: Composition, r: usize) -> Result<()> {
    match composition {
        Composition::Lora { .. } if r == 0 => Err(Error::invalid(
            "w_down",
            "r ≥ 1 rows (Composition::Lora scales by α / r)",
            "0 rows",
        )),
        _ => Ok(()),
    }
}

/// `a·wᵀ + bias` for contiguous f64 `a` [m, k], `w` [n, k], `bias` [n].
fn affine(a: &[f64], w: &[f64], bias: Option<&[f64]>, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = matmul_nt(a, w, m, n, k);
    if let Some(bias) = bias {
        for (e, v) in y.iter_mut().enumerate() {
            *v += bias[e % n];
        }
    }
    y
}

/// The bottleneck's hidden activations `f(u·W_downᵀ + b_down)` [M, r].
fn bottleneck<T: Scalar>(
    op: &DeltaLinear,
    t: &DeltaLinearTensors<T>,
    u: &[f64],
    d: &Dims,
) -> Vec<f64> {
    let k_u = t.w_down.cols();
    let b_down = t.b_down.map(widen);
    let mut z = affine(u, &t.w_down.to_f64(), b_down.as_deref(), d.m, d.r, k_u);
    z.iter_mut().for_each(|v| *v = op.activation.apply_f64(*v));
    z
}

/// The frozen layer alone: `h = x·Wᵀ + b` [M, N] in f64, for `x` [M, K], `W` [N, K],
/// `b` `[N]`.
pub fn linear<T: Scalar>(x: MatRef<T>, w: MatRef<T>, b: Option<&[T]>) -> Result<Vec<f64>> {
    x.check_buffer("x")?;
    let (m, k, n) = (x.rows(), x.cols(), w.rows());
    w.check("w", "[N, K]", n, k)?;
    check_vec("b", b, "[N]", n)?;
    let b = b.map(widen);
    Ok(affine(&x.to_f64(), &w.to_f64(), b.as_deref(), m, n, k))
}

/// The reference forward of a delta-linear layer: `y` [M, N] (contiguous, f64), see the
/// module docs for the formula and layouts.
pub fn delta_linear<T: Scalar>(op: &DeltaLinear, t: &DeltaLinearTensors<T>) -> Result<Vec<f64>> {
    let d = check(op, t)?;
    let x = t.x.to_f64();
    let b = t.b.map(widen);
    let h = affine(&x, &t.w.to_f64(), b.as_deref(), d.m, d.n, d.k);
    let separate_u;
    let u: &[f64] = match (op.insertion, t.u) {
        (Insertion::Sequential, _) => &h,
        (Insertion::Parallel, Some(u)) => {
            separate_u = u.to_f64();
            &separate_u
        }
        (Insertion::Parallel, None) => &x,
    };
    let z = bottleneck(op, t, u, &d);
    let b_up = t.b_up.map(widen);
    let delta = affine(&z, &t.w_up.to_f64(), b_up.as_deref(), d.m, d.n, d.r);
    let mut y = h;
    let s = f64::from(op.composition.scale(d.r));
    for (e, (y, dh)) in y.iter_mut().zip(&delta).enumerate() {
        *y = match op.composition {
            Composition::Add | Composition::Scaled(_) | Composition::Lora { .. } => *y + s * dh,
            Composition::Gated => {
                let lambda = t.gate.expect("validated")[e / d.n];
                (1.0 - lambda) * *y + lambda * dh
            }
        };
    }
    Ok(y)
}

/// The K-concatenation form of a parallel delta (UNIFIED-VIEW.md, fusion insight 1):
///
/// ```text
/// y = [x | s·f(u·W_downᵀ + b_down)] · [W | W_up]ᵀ + (b + s·b_up)
/// ```
///
/// one GEMM with K + r columns, computed by materialising both concatenations. It equals
/// [`delta_linear`] for parallel insertion with `Add` or `Scaled` composition, which is
/// what the identity tests check; sequential insertion or a gate is an error.
pub fn delta_linear_concat<T: Scalar>(
    op: &DeltaLinear,
    t: &DeltaLinearTensors<T>,
) -> Result<Vec<f64>> {
    let d = check(op, t)?;
    if op.insertion != Insertion::Parallel {
        return Err(Error::invalid(
            "insertion",
            "Parallel (a sequential delta reads h, it is not extra K)",
            "Sequential",
        ));
    }
    if op.composition == Composition::Gated {
        return Err(Error::invalid(
            "composition",
            "Add or Scaled (a gate is not extra K)",
            "Gated",
        ));
    }
    let s = f64::from(op.composition.scale(d.r));
    let x = t.x.to_f64();
    let u = t.u.map_or_else(|| x.clone(), |u| u.to_f64());
    let z = bottleneck(op, t, &u, &d);
    let kc = d.k + d.r;
    let mut xc = Vec::with_capacity(d.m * kc);
    for i in 0..d.m {
        xc.extend_from_slice(&x[i * d.k..(i + 1) * d.k]);
        xc.extend(z[i * d.r..(i + 1) * d.r].iter().map(|v| s * v));
    }
    let (w, w_up) = (t.w.to_f64(), t.w_up.to_f64());
    let mut wc = Vec::with_capacity(d.n * kc);
    for j in 0..d.n {
        wc.extend_from_slice(&w[j * d.k..(j + 1) * d.k]);
        wc.extend_from_slice(&w_up[j * d.r..(j + 1) * d.r]);
    }
    let bias: Vec<f64> = (0..d.n)
        .map(|j| t.b.map_or(0.0, |b| b[j].as_f64()) + s * t.b_up.map_or(0.0, |b| b[j].as_f64()))
        .collect();
    Ok(affine(&xc, &wc, Some(&bias), d.m, d.n, kc))
}

/// The LoRA merge `W' = W + scale·B·A` [N, K] in f64, for `W` [N, K], `w_down` (A,
/// `lora_A.weight`) [r, K] and `w_up` (B, `lora_B.weight`) [N, r]; PEFT merges with
/// `scale = s` (α / r, or α / √r for rsLoRA: [`Composition::scale`]) and unmerges with
/// `scale = −s`. A merged layer's plain forward `x·W'ᵀ + b` equals the unmerged LoRA
/// forward.
pub fn lora_merge<T: Scalar>(
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    scale: f32,
) -> Result<Vec<f64>> {
    let scale = f64::from(scale);
    w.check_buffer("w")?;
    let (n, k, r) = (w.rows(), w.cols(), w_down.rows());
    w_down.check("w_down", "[r, K]", r, k)?;
    w_up.check("w_up", "[N, r]", n, r)?;
    let (a, b) = (w_down.to_f64(), w_up.to_f64());
    Ok(par_row_blocks(n, k, |rows, out| {
        for (row, j) in out.chunks_exact_mut(k).zip(rows) {
            // row = (B·A)[j, :], then W[j, :] + scale·row.
            for t in 0..r {
                let coef = b[j * r + t];
                row.iter_mut()
                    .zip(&a[t * k..(t + 1) * k])
                    .for_each(|(v, a)| *v += coef * a);
            }
            for (c, v) in row.iter_mut().enumerate() {
                *v = w.at(j, c) + scale * *v;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Activation;

    /// Empty dimensions are valid problems with empty or bias-only results.
    #[test]
    fn degenerate_sizes() {
        let op = DeltaLinear {
            activation: Activation::Relu,
            insertion: Insertion::Parallel,
            composition: Composition::Scaled(2.0),
        };
        let (x, w, b_up) = ([1.0f32, 2.0], [3.0f32, 4.0], [0.5f32]);
        let none: [f32; 0] = [];
        // r = 0: the delta is b_up alone.
        let t = DeltaLinearTensors {
            x: MatRef::new(&x, 1, 2),
            w: MatRef::new(&w, 1, 2),
            b: None,
            u: None,
            w_down: MatRef::new(&none, 0, 2),
            b_down: Some(&none),
            w_up: MatRef::new(&none, 1, 0),
            b_up: Some(&b_up),
            gate: None,
        };
        assert_eq!(delta_linear(&op, &t).unwrap(), vec![11.0 + 2.0 * 0.5]);
        // N = 0 and M = 0: empty outputs.
        let t_n0 = DeltaLinearTensors {
            w: MatRef::new(&none, 0, 2),
            w_up: MatRef::new(&none, 0, 0),
            b_up: Some(&none),
            ..t
        };
        assert!(delta_linear(&op, &t_n0).unwrap().is_empty());
        let t_m0 = DeltaLinearTensors {
            x: MatRef::new(&none, 0, 2),
            ..t
        };
        assert!(delta_linear(&op, &t_m0).unwrap().is_empty());
        // K = 0: h = b.
        let b = [7.0f32];
        let h = linear(
            MatRef::new(&none, 3, 0),
            MatRef::new(&none, 1, 0),
            Some(&b[..]),
        )
        .unwrap();
        assert_eq!(h, vec![7.0; 3]);
    }
}
