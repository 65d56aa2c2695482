//! The backward of the delta-linear layer and of the multi-head parallel adapter, in f64
//! (TRAINING.md): given the forward's tensors and `dy` = ∂L/∂y, every gradient the layer
//! has, computed from the forward's f64 intermediates (recomputed here, not saved).
//!
//! ```text
//! dΔ      = c_d·dy                  dW_up = dΔᵀ·a,  db_up = Σ_m dΔ_m
//! da      = dΔ·W_up                 dz = da ⊙ f′(z)
//! dW_down = dzᵀ·u'                  db_down = Σ_m dz_m
//! du      = (dz·W_down) ⊙ mask      (the dropout multiplier, when there is one)
//! dh      = c_h·dy (+ du when sequential: u = h)
//! dx      = dh·W (+ du when parallel with u = x)
//! dλ_m    = Σ_n dy_mn·(Δ_mn − h_mn)  (gate only)
//! ```
//!
//! The frozen W and b get no gradient. Gradients of absent biases are still returned (the
//! gradient the bias would have at 0); a caller ignores them.

use super::adapter::{MultiHeadAdapter, MultiHeadAdapterTensors};
use super::linear::{forward, DeltaLinear, DeltaLinearTensors};
use super::{dot, MatRef, Scalar};
use crate::{Composition, Insertion, Result};

/// Every gradient of a delta-linear layer, contiguous f64.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaLinearGrads {
    /// ∂L/∂x [M, K]: through the frozen W, and through the delta when u = x (parallel) or
    /// u = h (sequential, through h).
    pub dx: Vec<f64>,
    /// ∂L/∂u [M, K_u] for a separate parallel delta input, else `None`.
    pub du: Option<Vec<f64>>,
    /// [r, K_u].
    pub dw_down: Vec<f64>,
    /// `[r]`.
    pub db_down: Vec<f64>,
    /// [N, r].
    pub dw_up: Vec<f64>,
    /// `[N]`.
    pub db_up: Vec<f64>,
    /// ∂L/∂λ `[M]` for a gated composition, else `None`.
    pub dgate: Option<Vec<f64>>,
}

/// `out[i, c] = Σ_j a[i, j]·b[j, c]` for contiguous a [rows, inner], b [inner, cols].
fn matmul_nn(a: &[f64], b: &[f64], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        let o = &mut out[i * cols..(i + 1) * cols];
        for j in 0..inner {
            let s = a[i * inner + j];
            if s != 0.0 {
                o.iter_mut()
                    .zip(&b[j * cols..(j + 1) * cols])
                    .for_each(|(o, b)| *o += s * b);
            }
        }
    }
    out
}

/// `out[i, c] = Σ_m a[m, i]·b[m, c]` for contiguous a [rows, ai], b [rows, bc]: a
/// reduction over rows (tokens), the shape of every weight gradient.
fn matmul_tn(a: &[f64], b: &[f64], rows: usize, ai: usize, bc: usize) -> Vec<f64> {
    let mut out = vec![0.0; ai * bc];
    for m in 0..rows {
        let (a, b) = (&a[m * ai..(m + 1) * ai], &b[m * bc..(m + 1) * bc]);
        for (i, &s) in a.iter().enumerate() {
            out[i * bc..(i + 1) * bc]
                .iter_mut()
                .zip(b)
                .for_each(|(o, b)| *o += s * b);
        }
    }
    out
}

/// Column sums of a contiguous [rows, cols] matrix.
fn column_sums(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; cols];
    for m in 0..rows {
        out.iter_mut()
            .zip(&a[m * cols..(m + 1) * cols])
            .for_each(|(o, v)| *o += v);
    }
    out
}

/// The reference backward of [`super::delta_linear`] (or, with `dropout`, of
/// [`super::linear::delta_linear_dropout`] with the same [M, K_u] multiplier): every
/// gradient for the upstream gradient `dy` [M, N].
pub fn delta_linear_backward<T: Scalar>(
    op: &DeltaLinear,
    t: &DeltaLinearTensors<T>,
    dropout: Option<&[f64]>,
    dy: MatRef<T>,
) -> Result<DeltaLinearGrads> {
    let f = forward(op, t, dropout)?;
    let (m, n, k, k_u, r) = (f.m, f.n, f.k, f.k_u, f.r);
    dy.check("dy", "[M, N]", m, n)?;
    let dy = dy.to_f64();
    // dΔ = c_d·dy, then the up-projection's gradients.
    let mut d_delta = dy.clone();
    for (e, v) in d_delta.iter_mut().enumerate() {
        *v *= f.coefs[e / n].1;
    }
    let dw_up = matmul_tn(&d_delta, &f.a, m, n, r);
    let db_up = column_sums(&d_delta, m, n);
    // da = dΔ·W_up, dz = da ⊙ f′(z).
    let w_up = t.w_up.to_f64();
    let mut dz = matmul_nn(&d_delta, &w_up, m, n, r);
    for (v, &z) in dz.iter_mut().zip(&f.z) {
        *v *= op.activation.derivative_f64(z);
    }
    let dw_down = matmul_tn(&dz, &f.u_dropped, m, r, k_u);
    let db_down = column_sums(&dz, m, r);
    // du = (dz·W_down) ⊙ mask.
    let mut du = matmul_nn(&dz, &t.w_down.to_f64(), m, r, k_u);
    if let Some(mask) = dropout {
        du.iter_mut().zip(mask).for_each(|(v, s)| *v *= s);
    }
    // dh = c_h·dy (+ du, sequential); dx = dh·W (+ du, parallel with u = x).
    let mut dh = dy.clone();
    for (e, v) in dh.iter_mut().enumerate() {
        *v *= f.coefs[e / n].0;
    }
    if op.insertion == Insertion::Sequential {
        dh.iter_mut().zip(&du).for_each(|(h, u)| *h += u);
    }
    let mut dx = matmul_nn(&dh, &t.w.to_f64(), m, n, k);
    let du = match (op.insertion, t.u) {
        (Insertion::Parallel, None) => {
            dx.iter_mut().zip(&du).for_each(|(x, u)| *x += u);
            None
        }
        (Insertion::Parallel, Some(_)) => Some(du),
        (Insertion::Sequential, _) => None,
    };
    let dgate = (op.composition == Composition::Gated).then(|| {
        (0..m)
            .map(|i| {
                let row = i * n..(i + 1) * n;
                let diff: Vec<f64> = f.delta[row.clone()]
                    .iter()
                    .zip(&f.h[row.clone()])
                    .map(|(d, h)| d - h)
                    .collect();
                dot(&dy[row], &diff)
            })
            .collect()
    });
    Ok(DeltaLinearGrads {
        dx,
        du,
        dw_down,
        db_down,
        dw_up,
        db_up,
        dgate,
    })
}

/// Every gradient of a multi-head parallel adapter, contiguous f64.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiHeadAdapterGrads {
    /// ∂L/∂h [M, H·d_h] (= dy: the composition is `Add` or `Scaled`).
    pub dh: Vec<f64>,
    /// ∂L/∂u [M, H·d_in].
    pub du: Vec<f64>,
    /// [H, r, d_in].
    pub dw_down: Vec<f64>,
    /// [H·r].
    pub db_down: Vec<f64>,
    /// [H, d_h, r].
    pub dw_up: Vec<f64>,
    /// [H·d_h].
    pub db_up: Vec<f64>,
}

/// The reference backward of [`super::multi_head_adapter`] for the upstream gradient `dy`
/// [M, H·d_h]: each head's bottleneck is a delta-linear backward of its column slices.
pub fn multi_head_adapter_backward<T: Scalar>(
    op: &MultiHeadAdapter,
    t: &MultiHeadAdapterTensors<T>,
    dy: MatRef<T>,
) -> Result<MultiHeadAdapterGrads> {
    // Validates every tensor (and refuses a gate).
    super::multi_head_adapter(op, t)?;
    let (heads, r) = (op.heads, op.rank);
    let m = t.h.rows();
    let (d_h, d_in) = (t.h.cols() / heads, t.u.cols() / heads);
    let width = heads * d_h;
    dy.check("dy", "[M, H·d_h]", m, width)?;
    let s = f64::from(op.composition.scale(r));
    let (dy, u) = (dy.to_f64(), t.u.to_f64());
    let mut g = MultiHeadAdapterGrads {
        dh: dy.clone(),
        du: vec![0.0; m * heads * d_in],
        dw_down: vec![0.0; heads * r * d_in],
        db_down: vec![0.0; heads * r],
        dw_up: vec![0.0; heads * d_h * r],
        db_up: vec![0.0; width],
    };
    let slice = |v: &[f64], cols: usize, stride: usize, hd: usize| -> Vec<f64> {
        (0..m)
            .flat_map(|i| v[i * stride + hd * cols..][..cols].to_vec())
            .collect()
    };
    let w_down: Vec<f64> = t.w_down.iter().map(|v| v.as_f64()).collect();
    let w_up: Vec<f64> = t.w_up.iter().map(|v| v.as_f64()).collect();
    for hd in 0..heads {
        let u_h = slice(&u, d_in, heads * d_in, hd);
        let d_delta: Vec<f64> = slice(&dy, d_h, width, hd).iter().map(|v| s * v).collect();
        let wd = &w_down[hd * r * d_in..][..r * d_in];
        let wu = &w_up[hd * d_h * r..][..d_h * r];
        // z = u_h·W_downᵀ + b_down, recomputed.
        let mut z = vec![0.0; m * r];
        for i in 0..m {
            for j in 0..r {
                let b = t.b_down.map_or(0.0, |b| b[hd * r + j].as_f64());
                z[i * r + j] = dot(&u_h[i * d_in..][..d_in], &wd[j * d_in..][..d_in]) + b;
            }
        }
        let a: Vec<f64> = z.iter().map(|&v| op.activation.apply_f64(v)).collect();
        g.dw_up[hd * d_h * r..][..d_h * r].copy_from_slice(&matmul_tn(&d_delta, &a, m, d_h, r));
        g.db_up[hd * d_h..][..d_h].copy_from_slice(&column_sums(&d_delta, m, d_h));
        let mut dz = matmul_nn(&d_delta, wu, m, d_h, r);
        for (v, &z) in dz.iter_mut().zip(&z) {
            *v *= op.activation.derivative_f64(z);
        }
        g.dw_down[hd * r * d_in..][..r * d_in].copy_from_slice(&matmul_tn(&dz, &u_h, m, r, d_in));
        g.db_down[hd * r..][..r].copy_from_slice(&column_sums(&dz, m, r));
        let du = matmul_nn(&dz, wd, m, r, d_in);
        for i in 0..m {
            g.du[i * heads * d_in + hd * d_in..][..d_in].copy_from_slice(&du[i * d_in..][..d_in]);
        }
    }
    Ok(g)
}
