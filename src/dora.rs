//! DoRA (Liu et al. 2024, weight-decomposed low-rank adaptation; PEFT's `use_dora`):
//!
//! ```text
//! y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b,    g[j] = m[j] / ‖W[j,:] + s·(B·A)[j,:]‖₂
//! ```
//!
//! per output column j, with the learned magnitude m `[n]` and the norm detached (a constant
//! of the forward, as PEFT computes it). The operations (kernels/dora.cu, and the column scale
//! of delta_linear.cu's epilogue), each with the three entry points `emulator::`, `cuda::` and
//! `host::` over one argument struct:
//!
//! - `dora_norm` ([`DoraNormArgs`]): g = m / ‖W + s·B·A‖ per row, in f32 (and the norms, which
//!   the backward needs). It depends on the weights only: compute it once per weight update
//!   (once per training step), not per call.
//! - `dora_linear` ([`DoraLinearArgs`]): the forward, one fused `delta_linear` with g in its
//!   epilogue (y written once). The [`DeltaLinear`] is the layer's LoRA
//!   ([`DeltaLinear::lora`], `rslora`, or `Composition::Scaled(s)`; `peft::LoraModule::op`
//!   with feature `peft`), with the frozen bias and no bottleneck biases, separate input or
//!   dropout.
//! - `dora_linear_train` ([`DoraLinearTrainArgs`]) and `dora_linear_backward`
//!   ([`DoraLinearBackwardArgs`]): training. With c = g (detached) and z = x·Wᵀ + Δ (saved by
//!   the training forward, f32), the backward gives `dmagnitude`_j = Σ_i dy_ij·z_ij / ‖·‖_j
//!   and the adapter's and x's gradients as `delta_linear_backward` of dy' = c ⊙ dy. A
//!   training step is: `dora_norm` (g and the norms), `dora_linear_train`,
//!   `dora_linear_backward`.
//! - `dora_merge` ([`DoraMergeArgs`]): W ← g ⊙ (W + s·B·A) row by row (PEFT's merge), or with
//!   `unmerge`, W ← W / g − s·B·A. Unmerging needs the g of the merge (the norm of the
//!   unmerged weight): keep it.
//!
//! DoRA with LoRA dropout is refused (`Unsupported`): PEFT's DoRA then computes a second
//! frozen GEMM on the dropped input.

use crate::delta_linear::{
    DeltaLinear, DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs,
};
use crate::plan::dora::{
    dora_backward_layout, DoraLinearBackwardBufs, DoraLinearBufs, DoraLinearTrainBufs,
    DoraMergeBufs, DoraNormBufs,
};
use crate::plan::BufSource;
use crate::DType;

/// Sizes of `dora_norm` and `dora_merge`: W [n, k], A [r, k], B [n, r], m and g `[n]`, all
/// contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoraDims {
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

/// The tensors of `dora_norm`: `g = m / ‖W + scale·B·A‖` per row (`R` the weights' buffers,
/// `G` an f32 buffer).
#[derive(Debug)]
pub struct DoraNormArgs<R, G> {
    /// The frozen weight [n, k].
    pub w: R,
    /// LoRA A [r, k].
    pub w_down: R,
    /// LoRA B [n, r].
    pub w_up: R,
    /// The magnitude m `[n]` (`lora_magnitude_vector`).
    pub magnitude: R,
    /// The output g `[n]`, f32.
    pub g: G,
    /// The norms ‖W + scale·B·A‖ `[n]`, f32, which `dora_linear_backward` reads; `None`
    /// skips them (inference).
    pub norm: Option<G>,
}

/// The tensors of `dora_linear`: `delta_linear`'s (`bias` the frozen layer's, added after
/// the scale; `u`, `b_down`, `b_up` and `gate` `None`) and g.
#[derive(Debug)]
pub struct DoraLinearArgs<R, W, G> {
    pub forward: DeltaLinearArgs<R, W>,
    /// g `[n]`, f32, from `dora_norm`.
    pub g: G,
}

/// The tensors of `dora_linear_train`: `delta_linear_train`'s, whose `saved` holds
/// [`DeltaLinearDims::dora_saved_len`] f32 elements and whose dropout must be `None`, and g.
#[derive(Debug)]
pub struct DoraLinearTrainArgs<R, W, G, S> {
    pub train: DeltaLinearTrainArgs<R, W, S>,
    /// g `[n]`, f32, from `dora_norm`.
    pub g: G,
}

/// The tensors of `dora_linear_backward`: `delta_linear_backward`'s (`dy` the DoRA layer's
/// upstream gradient; `saved` what `dora_linear_train` saved; `workspace` of
/// [`DeltaLinearDims::dora_backward_workspace_len`] f32 elements; `u`, `du`, `b_up`, `gate`,
/// `dgate` `None`), g, the norms and the magnitude's gradient. `backward.accumulate` applies
/// to `dmagnitude` too. An empty batch (m = 0) is checked and launches nothing, as
/// `delta_linear_backward` does: the gradients are left as they were.
#[derive(Debug)]
pub struct DoraLinearBackwardArgs<R, S, W, G> {
    pub backward: DeltaLinearBackwardArgs<R, S, W, G>,
    /// g `[n]`, f32: the forward's.
    pub g: S,
    /// ‖W + s·B·A‖ `[n]`, f32: `dora_norm`'s `norm` of the forward's step.
    pub norm: S,
    /// ∂L/∂m `[n]`, f32.
    pub dmagnitude: G,
}

/// The tensors of `dora_merge` (`scale` is the LoRA scale s, positive; `unmerge` picks the
/// direction).
#[derive(Debug)]
pub struct DoraMergeArgs<R, W, G> {
    /// The frozen weight [n, k], in place.
    pub w: W,
    /// LoRA A [r, k].
    pub w_down: R,
    /// LoRA B [n, r].
    pub w_up: R,
    /// g `[n]`, f32, from `dora_norm` on the unmerged weight.
    pub g: G,
}

impl DeltaLinearDims {
    /// f32 elements of `saved` of a DoRA training forward ([`DoraLinearTrainArgs`]): z
    /// [m, r], then x·Wᵀ + Δ [m, n] (the output before g, whose product with dy the
    /// magnitude's gradient sums). Saturates at `usize::MAX`.
    pub fn dora_saved_len(&self) -> usize {
        crate::plan::delta_linear::scaled_saved_len(self.m, self.n, self.r)
    }
    /// f32 elements of the `workspace` of `dora_linear_backward` for layers of `dtype`:
    /// [`DeltaLinearDims::backward_workspace_len`], dy' = g ⊙ dy [m, ld_y] in `dtype`, and
    /// the magnitude's partial column sums. Saturates at `usize::MAX`.
    pub fn dora_backward_workspace_len(&self, op: &DeltaLinear, dtype: DType) -> usize {
        dora_backward_layout(op, self, dtype).len
    }
}

impl<R, G> DoraNormArgs<R, G> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs(self, s: &mut impl BufSource<R, G>) -> DoraNormBufs {
        DoraNormBufs {
            w: s.read(self.w),
            w_down: s.read(self.w_down),
            w_up: s.read(self.w_up),
            magnitude: s.read(self.magnitude),
            g: s.write(self.g),
            norm: self.norm.map(|b| s.write(b)),
        }
    }
}

impl<R, W, G> DoraLinearArgs<R, W, G> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> DoraLinearBufs
    where
        S: BufSource<R, W> + BufSource<G, W>,
    {
        DoraLinearBufs {
            forward: self.forward.bufs(s),
            g: BufSource::<G, W>::read(s, self.g),
        }
    }
}

impl<R, W, G, F> DoraLinearTrainArgs<R, W, G, F> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> DoraLinearTrainBufs
    where
        S: BufSource<R, W> + BufSource<R, F> + BufSource<G, W>,
    {
        DoraLinearTrainBufs {
            train: self.train.bufs(s),
            g: BufSource::<G, W>::read(s, self.g),
        }
    }
}

impl<R, S, W, G> DoraLinearBackwardArgs<R, S, W, G> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs<Src>(self, s: &mut Src) -> DoraLinearBackwardBufs
    where
        Src: BufSource<R, W> + BufSource<S, G>,
    {
        DoraLinearBackwardBufs {
            backward: self.backward.bufs(s),
            g: BufSource::<S, G>::read(s, self.g),
            norm: BufSource::<S, G>::read(s, self.norm),
            dmagnitude: BufSource::<S, G>::write(s, self.dmagnitude),
        }
    }
}

impl<R, W, G> DoraMergeArgs<R, W, G> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> DoraMergeBufs
    where
        S: BufSource<R, W> + BufSource<G, W>,
    {
        DoraMergeBufs {
            w: BufSource::<R, W>::write(s, self.w),
            w_down: BufSource::<R, W>::read(s, self.w_down),
            w_up: BufSource::<R, W>::read(s, self.w_up),
            g: BufSource::<G, W>::read(s, self.g),
        }
    }
}
