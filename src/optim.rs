//! AdamW for the adapter parameters, PyTorch's decoupled form (`torch.optim.AdamW`), over a
//! list of tensors in one launch.
//!
//! Mixed precision as PEFT trains: each trained tensor keeps an f32 master copy with its
//! f32 gradient and f32 moments `m`, `v`; a step updates the master and writes the T copy
//! (f32, f16 or bf16) the next forward and backward read. For step `t` (from 1):
//!
//! ```text
//! g  = grad · c                       c = min(1, max_norm / (‖grad‖ + 1e-6)) when clipping
//! p ← p·(1 − lr·wd)
//! m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²
//! p ← p − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + ε)
//! ```
//!
//! `‖grad‖` is the global norm over every tensor of the list (PyTorch's
//! `clip_grad_norm_`), computed deterministically (no float atomics: the same gradients
//! give the same norm bit for bit) and reported through [`AdamwArgs::grad_norm`]. Clipping
//! scales the gradient as it is read; the gradient buffers are never written.
//!
//! Entry points: `emulator::adamw`, `cuda::adamw` (feature `cuda`) and `host::adamw`, over
//! [`AdamwArgs`]; [`crate::reference::optim::adamw`] is the f64 reference.
//!
//! ```
//! # #[cfg(feature = "emulator")] {
//! use peft_kernels::emulator;
//! use peft_kernels::optim::{AdamW, AdamwArgs, AdamwTensor};
//!
//! // One step on a 3-element tensor whose T copy is f32 too.
//! let (mut p, g) = (vec![1.0f32, -2.0, 0.5], vec![0.1f32, 0.0, -0.3]);
//! let (mut m, mut v, mut p_t) = (vec![0.0f32; 3], vec![0.0f32; 3], vec![0.0f32; 3]);
//! let mut norm = [0.0f32];
//! let opt = AdamW { lr: 0.01, weight_decay: 0.0, ..AdamW::default() };
//! emulator::adamw(
//!     &opt,
//!     1,
//!     AdamwArgs {
//!         tensors: vec![AdamwTensor {
//!             param: &mut p, grad: &g, m: &mut m, v: &mut v, param_t: &mut p_t,
//!         }],
//!         grad_norm: Some(&mut norm[..]),
//!     },
//! )?;
//! // The first step moves each parameter with a non-zero gradient by about lr against it.
//! assert!((p[0] - 0.99).abs() < 1e-5 && p[1] == -2.0 && (p[2] - 0.51).abs() < 1e-5);
//! assert_eq!(p, p_t);
//! assert!((norm[0] - 0.1f32.hypot(0.3)).abs() < 1e-6);
//! # }
//! # Ok::<(), peft_kernels::Error>(())
//! ```

use crate::plan::optim::{AdamwBufs, AdamwTensorBufs};
use crate::plan::BufSource;
use crate::{Error, Result};

/// AdamW's hyperparameters. [`Default`] is PyTorch's: lr 1e-3, betas (0.9, 0.999), eps
/// 1e-8, weight decay 1e-2, no clipping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate, finite and >= 0.
    pub lr: f32,
    /// First-moment decay, in [0, 1).
    pub beta1: f32,
    /// Second-moment decay, in [0, 1).
    pub beta2: f32,
    /// Added to the denominator, finite and > 0.
    pub eps: f32,
    /// Decoupled weight decay, finite and >= 0 (applied as `p·(1 − lr·wd)`).
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (finite, > 0), or no clipping.
    pub max_grad_norm: Option<f32>,
}

impl AdamW {
    /// `Ok` when every hyperparameter is in its range (see the fields) and `step` >= 1, else
    /// an error naming the first that is not.
    pub fn check(&self, step: u64) -> Result<()> {
        let check = |arg, ok: bool, expected: &str, got: f32| {
            if ok {
                Ok(())
            } else {
                Err(Error::invalid(arg, expected, got))
            }
        };
        check(
            "lr",
            self.lr.is_finite() && self.lr >= 0.0,
            "a finite lr >= 0",
            self.lr,
        )?;
        for (arg, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            check(arg, (0.0..1.0).contains(&beta), "a value in [0, 1)", beta)?;
        }
        let eps = self.eps;
        check("eps", eps.is_finite() && eps > 0.0, "a finite eps > 0", eps)?;
        let wd = self.weight_decay;
        check(
            "weight_decay",
            wd.is_finite() && wd >= 0.0,
            "a finite weight decay >= 0",
            wd,
        )?;
        if let Some(max) = self.max_grad_norm {
            check(
                "max_grad_norm",
                max.is_finite() && max > 0.0,
                "a finite norm > 0",
                max,
            )?;
        }
        if step == 0 {
            return Err(Error::invalid("step", "the step number, from 1", step));
        }
        Ok(())
    }
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: None,
        }
    }
}

/// One trained tensor: every buffer has the master's length.
#[derive(Debug)]
pub struct AdamwTensor<R, W, WT> {
    /// The f32 master weights, updated in place.
    pub param: W,
    /// The f32 gradient (read only, also when clipping).
    pub grad: R,
    /// The f32 first moment, updated in place (zeros before step 1).
    pub m: W,
    /// The f32 second moment, updated in place (zeros before step 1).
    pub v: W,
    /// The T copy of the updated master (f32, f16 or bf16, rounded to nearest), written.
    pub param_t: WT,
}

/// The tensors of one AdamW step. A zero-length tensor in the list is accepted and left as
/// it is; so is an empty list (the norm is then 0).
#[derive(Debug)]
pub struct AdamwArgs<R, W, WT> {
    /// The trained tensors, updated in one launch. No buffer may overlap another.
    pub tensors: Vec<AdamwTensor<R, W, WT>>,
    /// `[1]` f32: receives the global gradient norm ‖grad‖ before clipping, or `None` not to
    /// compute it (it is computed anyway when clipping).
    pub grad_norm: Option<W>,
}

/// [`AdamwArgs`] over host slices: f32 master weights, gradients and moments, the T copy.
pub type HostAdamwArgs<'a, T> = AdamwArgs<&'a [f32], &'a mut [f32], &'a mut [T]>;

impl<R, W, WT> AdamwArgs<R, W, WT> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source, as [`crate::plan::optim::adamw`] takes them.
    pub fn bufs<S: BufSource<R, W> + BufSource<R, WT>>(self, s: &mut S) -> AdamwBufs {
        let tensors = self
            .tensors
            .into_iter()
            .map(|t| AdamwTensorBufs {
                param: BufSource::<R, W>::write(s, t.param),
                grad: BufSource::<R, W>::read(s, t.grad),
                m: BufSource::<R, W>::write(s, t.m),
                v: BufSource::<R, W>::write(s, t.v),
                param_t: BufSource::<R, WT>::write(s, t.param_t),
            })
            .collect();
        AdamwBufs {
            tensors,
            grad_norm: self.grad_norm.map(|b| BufSource::<R, W>::write(s, b)),
        }
    }
}
