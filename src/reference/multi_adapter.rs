//! Multi-adapter batches in f64: each row is the single-adapter reference
//! ([`super::linear::delta_linear`]) of its own adapter, or the frozen layer alone
//! ([`super::linear::linear`]) for id −1.

use super::linear::{delta_linear, linear, DeltaLinearTensors};
use super::{MatRef, Scalar};
use crate::multi_adapter::AdapterSet;
use crate::{Element, Error, Result};

/// y [M, N] for `x` [M, K], `W` [N, K], `b` `[N]` and one adapter id per row (`rows`, see
/// [`crate::multi_adapter::rows_of`] for segments), row by row.
pub fn multi_delta_linear<T: Scalar + Element>(
    x: MatRef<T>,
    w: MatRef<T>,
    b: Option<&[T]>,
    set: &AdapterSet<T>,
    rows: &[i32],
) -> Result<Vec<f64>> {
    let (m, k) = (x.rows(), x.cols());
    if rows.len() != m {
        return Err(Error::invalid("rows", format!("{m} ids"), rows.len()));
    }
    let mut y = Vec::with_capacity(m * w.rows());
    for (i, &id) in rows.iter().enumerate() {
        let row = MatRef::new(&x.data[i * x.layout.ld..i * x.layout.ld + k], 1, k);
        if id == -1 {
            y.extend(linear(row, w, b)?);
            continue;
        }
        let a = usize::try_from(id)
            .ok()
            .and_then(|id| set.get(id))
            .ok_or_else(|| Error::invalid("rows", "ids of adapters in the set, or -1", id))?;
        let r = a.w_down.len() / k;
        let t = DeltaLinearTensors {
            x: row,
            w,
            b,
            u: None,
            w_down: MatRef::new(&a.w_down, r, k),
            b_down: a.b_down.as_deref(),
            w_up: MatRef::new(&a.w_up, w.rows(), r),
            b_up: a.b_up.as_deref(),
            gate: None,
        };
        y.extend(delta_linear(&a.op, &t)?);
    }
    Ok(y)
}
