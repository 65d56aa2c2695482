//! DoRA in f64 (PEFT's `use_dora`, [`crate::dora`]):
//!
//! ```text
//! g[j] = m[j] / ‖W[j,:] + s·(B·A)[j,:]‖₂          the norm detached (a forward constant)
//! y    = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b              per output column j
//! ```
//!
//! W [N, K], A = `lora_A.weight` [r, K], B = `lora_B.weight` [N, r], m `[N]`, b `[N]`, x [M, K].
//! Merging gives W' = g ⊙ (W + s·B·A) row by row, whose plain forward `x·W'ᵀ + b` is y. The
//! scale s is an f32, as everywhere in the crate (widened exactly). The backward
//! ([`dora_linear_backward`]) treats the norm as a constant, as PEFT does (it detaches it).

use super::backward::delta_linear_backward;
use super::linear::{linear, lora_merge, DeltaLinear, DeltaLinearTensors};
use super::{check_vec, MatRef, Scalar};
use crate::{Activation, Composition, Insertion, Result};

/// The row norms ‖W + s·B·A‖ [N] for `W` [N, K], `w_down` [r, K], `w_up` [N, r].
pub fn dora_row_norms<T: Scalar>(
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    s: f32,
) -> Result<Vec<f64>> {
    let merged = lora_merge(w, w_down, w_up, s)?;
    let k = w.cols();
    Ok(merged
        .chunks(k)
        .map(|row| row.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect())
}

/// g = m / ‖W + s·B·A‖ per row, for `W` [N, K], `w_down` [r, K], `w_up` [N, r], `m` `[N]`.
pub fn dora_norm<T: Scalar>(
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    magnitude: &[T],
    s: f32,
) -> Result<Vec<f64>> {
    let norms = dora_row_norms(w, w_down, w_up, s)?;
    check_vec("magnitude", Some(magnitude), "[N]", norms.len())?;
    Ok(norms
        .iter()
        .zip(magnitude)
        .map(|(norm, m)| m.as_f64() / norm)
        .collect())
}

/// z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ [M, N], DoRA's output before its scale.
fn unscaled<T: Scalar>(
    x: MatRef<T>,
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    s: f32,
) -> Result<Vec<f64>> {
    let (m, n, r) = (x.rows(), w.rows(), w_down.rows());
    let base = linear(x, w, None)?;
    let t = linear(x, w_down, None)?;
    w_up.check("w_up", "[N, r]", n, r)?;
    let b = w_up.to_f64();
    let delta = linear(MatRef::new(&t, m, r), MatRef::new(&b, n, r), None)?;
    let s = f64::from(s);
    Ok(base.iter().zip(&delta).map(|(h, d)| h + s * d).collect())
}

/// The DoRA forward y [M, N] for x [M, K] (see the module docs): LoRA with scale s and no
/// bias, each column times g, plus the bias.
pub fn dora_linear<T: Scalar>(
    x: MatRef<T>,
    w: MatRef<T>,
    bias: Option<&[T]>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    magnitude: &[T],
    s: f32,
) -> Result<Vec<f64>> {
    let norms = dora_row_norms(w, w_down, w_up, s)?;
    dora_linear_detached(x, w, bias, w_down, w_up, magnitude, s, &norms)
}

/// [`dora_linear`] with the row norms given (`norm` `[N]`): g = m / `norm`. With the norms of
/// the unperturbed weights it is the function whose derivatives DoRA's backward gives (the
/// norm detached, a constant to the gradient, as in PEFT): perturbing A or B changes z, not
/// the norm.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear_detached<T: Scalar>(
    x: MatRef<T>,
    w: MatRef<T>,
    bias: Option<&[T]>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    magnitude: &[T],
    s: f32,
    norm: &[f64],
) -> Result<Vec<f64>> {
    let n = w.rows();
    check_vec("bias", bias, "[N]", n)?;
    check_vec("magnitude", Some(magnitude), "[N]", n)?;
    check_vec("norm", Some(norm), "[N]", n)?;
    let z = unscaled(x, w, w_down, w_up, s)?;
    Ok(z.iter()
        .enumerate()
        .map(|(e, z)| {
            let j = e % n;
            magnitude[j].as_f64() / norm[j] * z + bias.map_or(0.0, |b| b[j].as_f64())
        })
        .collect())
}

/// The gradients of DoRA's forward for the upstream gradient `dy` [M, N], contiguous f64.
#[derive(Clone, Debug, PartialEq)]
pub struct DoraGrads {
    /// ∂L/∂m `[N]`: Σ_i dy_ij·z_ij / ‖·‖_j.
    pub dmagnitude: Vec<f64>,
    /// ∂L/∂x [M, K].
    pub dx: Vec<f64>,
    /// ∂L/∂A [r, K].
    pub dw_down: Vec<f64>,
    /// ∂L/∂B [N, r].
    pub dw_up: Vec<f64>,
}

/// The backward of [`dora_linear`] with the norm detached: with c = m / ‖W + s·B·A‖ and
/// z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, dm_j = Σ_i dy_ij·z_ij / ‖·‖_j, and x's, A's and B's gradients are
/// LoRA's ([`super::delta_linear_backward`]) for dy' = c ⊙ dy. The frozen W and b get none.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear_backward<T: Scalar>(
    x: MatRef<T>,
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    magnitude: &[T],
    s: f32,
    dy: MatRef<T>,
) -> Result<DoraGrads> {
    let (m, n, k, r) = (x.rows(), w.rows(), w.cols(), w_down.rows());
    let norms = dora_row_norms(w, w_down, w_up, s)?;
    check_vec("magnitude", Some(magnitude), "[N]", n)?;
    dy.check("dy", "[M, N]", m, n)?;
    let z = unscaled(x, w, w_down, w_up, s)?;
    let dy = dy.to_f64();
    let mut dmagnitude = vec![0.0; n];
    for (e, (d, z)) in dy.iter().zip(&z).enumerate() {
        dmagnitude[e % n] += d * z;
    }
    dmagnitude
        .iter_mut()
        .zip(&norms)
        .for_each(|(v, norm)| *v /= norm);
    let dy_scaled: Vec<f64> = dy
        .iter()
        .enumerate()
        .map(|(e, d)| d * magnitude[e % n].as_f64() / norms[e % n])
        .collect();
    let (x, w, a, b) = (x.to_f64(), w.to_f64(), w_down.to_f64(), w_up.to_f64());
    let tensors = DeltaLinearTensors {
        x: MatRef::new(&x, m, k),
        w: MatRef::new(&w, n, k),
        b: None,
        u: None,
        w_down: MatRef::new(&a, r, k),
        b_down: None,
        w_up: MatRef::new(&b, n, r),
        b_up: None,
        gate: None,
    };
    let op = DeltaLinear::new(
        Insertion::Parallel,
        Activation::Identity,
        Composition::Scaled(s),
    );
    let g = delta_linear_backward(&op, &tensors, None, MatRef::new(&dy_scaled, m, n))?;
    Ok(DoraGrads {
        dmagnitude,
        dx: g.dx,
        dw_down: g.dw_down,
        dw_up: g.dw_up,
    })
}

/// DoRA's merged weight W' = g ⊙ (W + s·B·A) [N, K] with g from [`dora_norm`].
pub fn dora_merge<T: Scalar>(
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    magnitude: &[T],
    s: f32,
) -> Result<Vec<f64>> {
    let g = dora_norm(w, w_down, w_up, magnitude, s)?;
    let k = w.cols();
    let mut merged = lora_merge(w, w_down, w_up, s)?;
    for (e, v) in merged.iter_mut().enumerate() {
        *v *= g[e / k];
    }
    Ok(merged)
}
