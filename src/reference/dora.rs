//! DoRA in f64 (PEFT's `use_dora`, [`crate::dora`]):
//!
//! ```text
//! g[j] = m[j] / ‖W[j,:] + s·(B·A)[j,:]‖₂          the norm detached (a forward constant)
//! y    = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b              per output column j
//! ```
//!
//! W [N, K], A = `lora_A.weight` [r, K], B = `lora_B.weight` [N, r], m `[N]`, b `[N]`, x [M, K].
//! Merging gives W' = g ⊙ (W + s·B·A) row by row, whose plain forward `x·W'ᵀ + b` is y. The
//! scale s is an f32, as everywhere in the crate (widened exactly).

use super::linear::{linear, lora_merge};
use super::{check_vec, MatRef, Scalar};
use crate::Result;

/// g = m / ‖W + s·B·A‖ per row, for `W` [N, K], `w_down` [r, K], `w_up` [N, r], `m` `[N]`.
pub fn dora_norm<T: Scalar>(
    w: MatRef<T>,
    w_down: MatRef<T>,
    w_up: MatRef<T>,
    magnitude: &[T],
    s: f32,
) -> Result<Vec<f64>> {
    let merged = lora_merge(w, w_down, w_up, s)?;
    let (n, k) = (w.rows(), w.cols());
    check_vec("magnitude", Some(magnitude), "[N]", n)?;
    Ok((0..n)
        .map(|j| {
            let row = &merged[j * k..(j + 1) * k];
            magnitude[j].as_f64() / row.iter().map(|v| v * v).sum::<f64>().sqrt()
        })
        .collect())
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
    let g = dora_norm(w, w_down, w_up, magnitude, s)?;
    let s = f64::from(s);
    let (m, n, r) = (x.rows(), w.rows(), w_down.rows());
    check_vec("bias", bias, "[N]", n)?;
    let base = linear(x, w, None)?;
    let t = linear(x, w_down, None)?;
    w_up.check("w_up", "[N, r]", n, r)?;
    let b = w_up.to_f64();
    let delta = linear(MatRef::new(&t, m, r), MatRef::new(&b, n, r), None)?;
    Ok(base
        .iter()
        .zip(&delta)
        .enumerate()
        .map(|(e, (h, d))| {
            let j = e % n;
            g[j] * (h + s * d) + bias.map_or(0.0, |b| b[j].as_f64())
        })
        .collect())
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
