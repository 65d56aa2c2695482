//! DoRA (Liu et al. 2024, weight-decomposed low-rank adaptation; PEFT's `use_dora`):
//!
//! ```text
//! y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b,    g[j] = m[j] / ‖W[j,:] + s·(B·A)[j,:]‖₂
//! ```
//!
//! per output column j, with the learned magnitude m `[n]` and the norm detached (a constant
//! of the forward, as PEFT computes it). Three operations (kernels/dora.cu), each with the
//! three entry points `emulator::`, `cuda::` and `host::` over one argument struct:
//!
//! - `dora_norm` ([`DoraNormArgs`]): g = m / ‖W + s·B·A‖ per row, in f32. It depends on the
//!   weights only: compute it once per weight update, not per call.
//! - `dora_scale` ([`DoraScaleArgs`]): y ← g ⊙ y + b over the columns of y. The forward is
//!   `delta_linear` with the LoRA scale (`Composition::Scaled(s)`; `peft::LoraModule::op`
//!   with feature `peft`) **without** the bias, then `dora_scale` with g and the bias: one
//!   more pass over y than a fused epilogue would take (kernels/dora.cu says why it is a
//!   composition for now).
//! - `dora_merge` ([`DoraMergeArgs`]): W ← g ⊙ (W + s·B·A) row by row (PEFT's merge), or with
//!   `unmerge`, W ← W / g − s·B·A. Unmerging needs the g of the merge (the norm of the
//!   unmerged weight): keep it.
//!
//! The backward (m's gradient and the adapters' through the detached norm) waits for the
//! training backward of `delta_linear`.

use crate::plan::dora::{DoraMergeBufs, DoraNormBufs, DoraScaleBufs};
use crate::plan::BufSource;

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
}

/// Sizes of `dora_scale`: y [m, n] with row stride `ld_y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoraScaleDims {
    pub m: usize,
    pub n: usize,
    pub ld_y: usize,
}

impl DoraScaleDims {
    /// A contiguous y [m, n].
    pub fn new(m: usize, n: usize) -> Self {
        DoraScaleDims { m, n, ld_y: n }
    }
}

/// The tensors of `dora_scale`: `y ← g ⊙ y + bias` per column (`G` an f32 buffer read).
#[derive(Debug)]
pub struct DoraScaleArgs<R, W, G> {
    /// [m, n], row stride `ld_y`, in place.
    pub y: W,
    /// g `[n]`, f32, from `dora_norm`.
    pub g: G,
    /// The frozen layer's bias `[n]`.
    pub bias: Option<R>,
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

impl<R, G> DoraNormArgs<R, G> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs(self, s: &mut impl BufSource<R, G>) -> DoraNormBufs {
        DoraNormBufs {
            w: s.read(self.w),
            w_down: s.read(self.w_down),
            w_up: s.read(self.w_up),
            magnitude: s.read(self.magnitude),
            g: s.write(self.g),
        }
    }
}

impl<R, W, G> DoraScaleArgs<R, W, G> {
    /// The planner's view of these tensors (see [`crate::plan`]).
    pub fn bufs<S>(self, s: &mut S) -> DoraScaleBufs
    where
        S: BufSource<R, W> + BufSource<G, W>,
    {
        DoraScaleBufs {
            y: BufSource::<R, W>::write(s, self.y),
            g: BufSource::<G, W>::read(s, self.g),
            bias: self.bias.map(|b| BufSource::<R, W>::read(s, b)),
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
