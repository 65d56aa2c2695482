//! AdamW in f64 ([`crate::optim`]): PyTorch's `torch.optim.AdamW` step over a list of
//! tensors, with `clip_grad_norm_` over the whole list first when asked for.

use crate::optim::AdamW;
use crate::{Error, Result};

/// One tensor's state: parameters, gradient and moments of equal length.
#[derive(Debug)]
pub struct AdamwState<'a> {
    pub param: &'a mut [f64],
    pub grad: &'a [f64],
    pub m: &'a mut [f64],
    pub v: &'a mut [f64],
}

/// AdamW step `step` (from 1) of `op` over `tensors`, in f64 (the hyperparameters' f32
/// values widened); returns the global gradient norm before clipping.
pub fn adamw(op: &AdamW, step: u64, tensors: &mut [AdamwState<'_>]) -> Result<f64> {
    op.check(step).map_err(|e| e.of("reference::adamw"))?;
    for (i, t) in tensors.iter().enumerate() {
        for (arg, len) in [("tensors.grad", t.grad.len()), ("tensors.m", t.m.len())]
            .into_iter()
            .chain([("tensors.v", t.v.len())])
        {
            if len != t.param.len() {
                return Err(Error::invalid(
                    arg,
                    format!("tensors[{i}].param's length, {}", t.param.len()),
                    format!("{len} elements in tensors[{i}]"),
                ));
            }
        }
    }
    let norm = tensors
        .iter()
        .flat_map(|t| t.grad.iter())
        .map(|g| g * g)
        .sum::<f64>()
        .sqrt();
    let clip = op
        .max_grad_norm
        .map_or(1.0, |max| (f64::from(max) / (norm + 1e-6)).min(1.0));
    let (lr, wd, eps) = (
        f64::from(op.lr),
        f64::from(op.weight_decay),
        f64::from(op.eps),
    );
    let (b1, b2) = (f64::from(op.beta1), f64::from(op.beta2));
    let t = step.min(i32::MAX as u64) as i32;
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    for s in tensors.iter_mut() {
        for j in 0..s.param.len() {
            let g = s.grad[j] * clip;
            s.m[j] = b1 * s.m[j] + (1.0 - b1) * g;
            s.v[j] = b2 * s.v[j] + (1.0 - b2) * g * g;
            let p = s.param[j] * (1.0 - lr * wd);
            s.param[j] = p - lr * (s.m[j] / bc1) / ((s.v[j] / bc2).sqrt() + eps);
        }
    }
    Ok(norm)
}
