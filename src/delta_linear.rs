//! The frozen linear layer fused with its bottleneck delta (kernels/delta_linear.cu):
//!
//! ```text
//! y = compose(h, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up),    h = x·Wᵀ + b
//! ```
//!
//! in the PyTorch `nn.Linear` layouts of UNIFIED-VIEW.md. One description, [`DeltaLinear`],
//! covers LoRA, the Houlsby adapter, the parallel and scaled parallel adapters;
//! [`DeltaApplyDims`] adds a delta to an `h` the caller computed (also per head: the
//! multi-head parallel adapter); [`LoraMergeDims`] merges LoRA into W. Every operation
//! exists on each backend over one argument struct, with the backend's buffer types:
//! `&[T]` / `&mut [T]` in `emulator` and `host` (the `Host…Args` aliases below), cudarc
//! device slices and views in `cuda` (`cuda::Device…Args`).
//!
//! # The bottleneck's weights, and LoRA's A and B
//!
//! The crate names the two weights of every bottleneck `w_down` and `w_up`, in every
//! argument struct, error message and reference. For LoRA:
//!
//! | here | shape | LoRA | PEFT state dict |
//! |---|---|---|---|
//! | `w_down` (W_down) | [r, k_u] (k_u = k, the layer's input width) | A | `lora_A.weight` |
//! | `w_up` (W_up) | [n, r] | B | `lora_B.weight` |
//!
//! so a PEFT checkpoint's tensors are passed as they are, without transposing. An adapter's
//! down- and up-projection weights (`nn.Linear` layout) are `w_down` and `w_up` too; a
//! sequential adapter's `w_down` is [r, n] (it reads h). LoRA's scale is given as α
//! (PEFT's `lora_alpha`, [`DeltaLinear::lora`], [`DeltaLinear::rslora`]) and follows the
//! dims' r; [`Composition::scale`] gives the `s` to pass to `lora_merge`.
//!
//! # Building the arguments
//!
//! Build an argument struct where its type is known: in the call, or in a `let` annotated
//! with the backend's alias ([`HostDeltaLinearArgs`] here, `cuda::DeviceDeltaLinearArgs` on
//! the GPU). Without either, `&x` of a `Vec<T>` stays a `&Vec<T>` (Rust coerces it to
//! `&[T]`, and `&` of a `CudaSlice` to the GPU API's `&dyn` buffer, only where that type is
//! expected; `Some(&b)` too) and the call does not type-check:
//!
//! ```
//! # #[cfg(feature = "emulator")] {
//! use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims, HostDeltaLinearArgs};
//!
//! let (m, n, k, r) = (4, 6, 8, 2);
//! let dims = DeltaLinearDims::new(m, n, k, r);
//! let (x, w) = (vec![0.5f32; m * k], vec![0.25f32; n * k]);
//! let (w_down, w_up) = (vec![0.1f32; r * k], vec![0.2f32; n * r]);
//! let (mut workspace, mut y) = (vec![0.0f32; dims.workspace_len()], vec![0.0f32; m * n]);
//! let args: HostDeltaLinearArgs<f32> = DeltaLinearArgs {
//!     x: &x, w: &w, bias: None, u: None,
//!     w_down: &w_down, b_down: None, w_up: &w_up, b_up: None, gate: None,
//!     workspace: &mut workspace, y: &mut y,
//! };
//! peft_kernels::emulator::delta_linear(&DeltaLinear::lora(4.0), &dims, args)?;
//! // h = 8·0.5·0.25 = 1; Δh = (8·0.5·0.1)·(2·0.2) = 0.16; s = α / r = 2.
//! assert!(y.iter().all(|&v| (v - 1.32).abs() < 1e-6));
//! # }
//! # Ok::<(), peft_kernels::Error>(())
//! ```
//!
//! # Empty batches, alignment
//!
//! `m = 0` (no rows) is a valid call that is checked like any other and launches nothing;
//! every other size must be at least 1. A backward of an empty batch therefore leaves its
//! gradients as they were, `accumulate` or not (the sum over no tokens adds nothing; clear
//! them yourself if you want them 0). The kernels take buffers of any alignment: an f16 /
//! bf16 operand whose rows are not 16-byte aligned runs on a slower path (see
//! [`KernelVariant::Auto`]), never an error.
//!
//! Precision: products accumulate in f32. The bottleneck activations `t` are stored in T
//! (the workspace), and a sequential delta reads h as it is materialised in T (in `y`,
//! between the frozen pass and the delta), as a framework's bf16 tensor h would be; a
//! parallel delta never rounds h.

use crate::plan::delta_linear::{
    saved_len, workspace_layout, DeltaApplyBufs, DeltaApplyTrainBufs, DeltaLinearBufs,
    DeltaLinearTrainBufs, LoraMergeBufs,
};
use crate::plan::delta_linear_backward::{
    backward_workspace_layout, DeltaApplyBackwardBufs, DeltaLinearBackwardBufs,
};
use crate::plan::BufSource;
use crate::spec::{Activation, Composition, Insertion, DEFAULT_SPLIT_TARGET};

/// Which kernel implementation runs the passes. `Auto` (the default) is what a user wants;
/// the others exist for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelVariant {
    /// Tensor cores for f16/bf16 when the frozen GEMM's operands (x and W, or u and W_down)
    /// have 16-byte aligned rows, SIMT tiles otherwise. The delta's W_up [N, r] may have
    /// any rank: its rows are loaded element by element when r is not a multiple of 8.
    /// 16-byte aligned rows mean: the buffer starts 16-byte aligned (cudarc allocations
    /// do), a view into it starts a multiple of 8 elements in, and `ld_x`, `ld_u` and k are
    /// multiples of 8. A view at any other offset runs correctly but on the CUDA cores,
    /// several times slower for a large m, without a warning: keep activations' views on
    /// 8-element boundaries (`plan::delta_linear::delta_linear` returns the launches, whose
    /// kernel names say which ran).
    #[default]
    Auto,
    /// One thread per output: the correctness and speed baseline.
    Naive,
    /// Shared-memory tiles on the CUDA cores (any dtype, any alignment).
    Simt,
    /// mma.sync tensor cores on f16/bf16 of any alignment (unaligned operands are loaded
    /// element by element, slowly); an `Unsupported` error for f32.
    TensorCore,
    /// Hopper's warpgroup MMA (wgmma, 128 × 128 tiles) on f16/bf16 of any alignment: the
    /// prefill path meant to reach cuBLAS on an H100. Runs in the emulator and, on the GPU,
    /// only on compute capability 9.0 (else `Unsupported`). Not yet executed on a GPU, so
    /// `Auto` does not choose it.
    Wgmma,
}

/// One method of the unified view at a linear layer: the delta's insertion, functional form
/// and composition (the reference, [`mod@crate::reference::linear`], takes the same description).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeltaLinear {
    /// The bottleneck's `f`.
    pub activation: Activation,
    /// Where the delta reads `u`.
    pub insertion: Insertion,
    /// How Δh joins h, with its scale.
    pub composition: Composition,
}

impl DeltaLinear {
    /// LoRA: parallel, identity, `h + s·Δh` with `s = alpha / r`, r taken from the call's
    /// dims ([`Composition::Lora`]): α is PEFT's `lora_alpha`.
    pub fn lora(alpha: f32) -> Self {
        Self::new(
            Insertion::Parallel,
            Activation::Identity,
            Composition::Lora {
                alpha,
                rslora: false,
            },
        )
    }
    /// Rank-stabilised LoRA (PEFT's `use_rslora = True`): as [`DeltaLinear::lora`] with
    /// `s = alpha / √r`.
    #[doc(alias = "use_rslora")]
    pub fn rslora(alpha: f32) -> Self {
        Self::new(
            Insertion::Parallel,
            Activation::Identity,
            Composition::Lora {
                alpha,
                rslora: true,
            },
        )
    }
    /// Houlsby adapter: sequential, `h + f(h·W_downᵀ + b_down)·W_upᵀ + b_up`.
    pub fn houlsby(activation: Activation) -> Self {
        Self::new(Insertion::Sequential, activation, Composition::Add)
    }
    /// Parallel adapter (`scale = 1`) and scaled parallel adapter (the MAM adapter uses 4).
    pub fn parallel_adapter(activation: Activation, scale: f32) -> Self {
        Self::new(Insertion::Parallel, activation, Composition::Scaled(scale))
    }
    /// Any combination.
    pub fn new(insertion: Insertion, activation: Activation, composition: Composition) -> Self {
        DeltaLinear {
            activation,
            insertion,
            composition,
        }
    }
}

/// Sizes and row strides of a delta-linear call. W, W_down, W_up, the biases and the gate
/// are contiguous and must hold exactly their shape (a longer one is a mistaken shape and
/// refused); x, u and y have row strides, and their buffers may run past the last row.
///
/// An empty batch, `m = 0`, is a valid call: its arguments are checked as any call's, and
/// it launches nothing (as every operation of the crate treats an empty batch). n, k, r
/// (and k_u when u is given) must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaLinearDims {
    /// Rows (tokens, batch × sequence).
    pub m: usize,
    /// Output features of the frozen layer.
    pub n: usize,
    /// Input features of the frozen layer.
    pub k: usize,
    /// Bottleneck width (LoRA rank, adapter size).
    pub r: usize,
    /// Row stride of x, ≥ k.
    pub ld_x: usize,
    /// Row stride of y, ≥ n.
    pub ld_y: usize,
    /// Columns of a separate parallel delta input u (ignored unless u is given: a
    /// sequential delta reads h, whose W_down is [r, n] whatever k_u says).
    pub k_u: usize,
    /// Row stride of u, ≥ k_u.
    pub ld_u: usize,
    /// Which implementation runs the passes (`Auto` unless testing or benchmarking).
    pub kernel: KernelVariant,
    /// The blocks a tensor-core pass with fewer aims at by splitting its K over runs of
    /// blocks whose f32 partial sums a second kernel adds (the down pass at decode; the frozen
    /// GEMM when m·n is small): [`DEFAULT_SPLIT_TARGET`], about one block per SM of the
    /// largest GPUs, unless tuning (benches/delta_linear.rs sweeps it); 0 never splits. The
    /// workspace grows with it (`workspace_len`).
    pub split_target: usize,
}

impl DeltaLinearDims {
    /// Contiguous x [m, k] and y [m, n]; u, if given, [m, k].
    pub fn new(m: usize, n: usize, k: usize, r: usize) -> Self {
        DeltaLinearDims {
            m,
            n,
            k,
            r,
            ld_x: k,
            ld_y: n,
            k_u: k,
            ld_u: k,
            kernel: KernelVariant::Auto,
            split_target: DEFAULT_SPLIT_TARGET,
        }
    }
    /// Elements of the `workspace` of [`DeltaLinearArgs`] with which every pass runs as the
    /// plan wants: the bottleneck activations t [m, r] (rows padded to 8 elements) and room
    /// for the f32 partial sums of passes whose K is split over blocks because they have few
    /// (the down pass at decode, up to 32 copies of t; the frozen GEMM and the up-projection
    /// when m·n is small; at most 32 MiB at the default `split_target`, more at a larger
    /// one). It depends on m, n, r and `split_target` only (not on the strides, k or the
    /// kernel variant), grows with `split_target`, and is not monotone in m (a large m needs
    /// no split). Any workspace of at least [`DeltaLinearDims::min_workspace_len`] is
    /// accepted: a shorter one than this splits into fewer runs, or none (same result,
    /// maybe slower). It need not be initialised, and may be reused by any call queued
    /// after this one completes (stream order). Saturates at `usize::MAX`.
    pub fn workspace_len(&self) -> usize {
        workspace_layout(self.m, 1, self.r, self.n, self.split_target).len
    }
    /// The least workspace a call takes: t alone, m × r rounded up to 8 (no pass splits).
    pub fn min_workspace_len(&self) -> usize {
        workspace_layout(self.m, 1, self.r, self.n, self.split_target).t
    }
    /// f32 elements of the `saved` buffer of a training-mode forward
    /// ([`DeltaLinearTrainArgs`]), which the backward reads: the bottleneck pre-activations
    /// z = u'·W_downᵀ + b_down [m, r] (f32, unrounded: f′(z) is what the gradients need), then,
    /// for a sequential or gated delta, h [m, n] as the delta saw it (stored in T, widened).
    /// Saturates at `usize::MAX`.
    pub fn saved_len(&self, op: &DeltaLinear) -> usize {
        saved_len(op, self.m, self.n, self.r)
    }
    /// f32 elements of the backward's `workspace` ([`DeltaLinearBackwardArgs`]): dz [m, r],
    /// dh [m, n] for a sequential delta, and the partial sums of the weight gradients'
    /// reduction over tokens when m is long enough to split it. Depends on m, n, r and the
    /// delta input's width (k, k_u or n, as `op` says). Saturates at `usize::MAX`.
    pub fn backward_workspace_len(&self, op: &DeltaLinear) -> usize {
        // A parallel delta reads x or u: room for the wider (the call decides which).
        let k_u = match op.insertion {
            Insertion::Sequential => self.n,
            Insertion::Parallel => self.k.max(self.k_u),
        };
        backward_workspace_layout(op, self.m, 1, self.n, self.r, k_u).len
    }
}

/// The tensors of a delta-linear call, over a backend's buffer types (`R` read, `W` written).
#[derive(Debug)]
pub struct DeltaLinearArgs<R, W> {
    /// [m, k], row stride `ld_x`.
    pub x: R,
    /// The frozen weight [n, k].
    pub w: R,
    /// `[n]`.
    pub bias: Option<R>,
    /// A separate parallel delta input [m, k_u] (an FFN's parallel adapter reads the FFN's
    /// input); `None`: u = x (parallel) or u = h (sequential).
    pub u: Option<R>,
    /// W_down [r, k_u] (k_u = n for sequential insertion): LoRA A, `lora_A.weight`.
    #[doc(alias = "lora_a")]
    #[doc(alias = "lora_A")]
    pub w_down: R,
    /// `[r]`.
    pub b_down: Option<R>,
    /// W_up [n, r]: LoRA B, `lora_B.weight`.
    #[doc(alias = "lora_b")]
    #[doc(alias = "lora_B")]
    pub w_up: R,
    /// `[n]`.
    pub b_up: Option<R>,
    /// Per-row gate λ `[m]`, only with `Composition::Gated`.
    pub gate: Option<R>,
    /// Scratch of at least [`DeltaLinearDims::min_workspace_len`] elements;
    /// [`DeltaLinearDims::workspace_len`] lets every pass split as the plan wants.
    pub workspace: W,
    /// The output [m, n], row stride `ld_y`.
    pub y: W,
}

/// LoRA dropout on the delta's input u (PEFT's `lora_dropout`; the frozen path never drops):
/// element (row, col) of u is kept iff Philox4x32-10 keyed by `seed` at counter (col, row)
/// draws u01 ≥ `p`, and a kept element is scaled by 1 / (1 − p). No mask is stored: the
/// backward regenerates it from the same seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraDropout {
    /// Drop probability in [0, 1]; 1 drops everything (scale 0, never inf or NaN).
    pub p: f32,
    /// The generator's key: a fresh one each step.
    pub seed: u64,
}

/// A training-mode forward: `delta_linear`'s tensors and the f32 buffer of
/// [`DeltaLinearDims::saved_len`] elements into which it saves what the backward reads.
/// A gated parallel delta then computes h before the delta (as a sequential one does),
/// rounded to T in y, so that the h it saves is the one it composed with.
#[derive(Debug)]
pub struct DeltaLinearTrainArgs<R, W, S> {
    pub forward: DeltaLinearArgs<R, W>,
    /// f32 [`DeltaLinearDims::saved_len`]; the backward's `saved`.
    pub saved: S,
    /// LoRA dropout on the delta's input u (x, the separate u, or h); the backward must be
    /// given the same. The down pass then runs on the CUDA cores (SIMT tiles; the naive
    /// kernel with `KernelVariant::Naive`), the frozen GEMM on its usual kernel.
    pub dropout: Option<LoraDropout>,
}

impl<R, W, S> DeltaLinearTrainArgs<R, W, S> {
    /// The planner's view of these tensors (see [`DeltaLinearArgs::bufs`]).
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaLinearTrainBufs
    where
        Src: BufSource<R, W> + BufSource<R, S>,
    {
        let saved = BufSource::<R, S>::write(s, self.saved);
        DeltaLinearTrainBufs {
            forward: self.forward.bufs(s),
            saved,
            dropout: self.dropout,
        }
    }
}

/// The tensors of a delta-linear backward (kernels/delta_linear_backward.cu), over a
/// backend's buffer types: `R` activations and weights read (T), `S` the saved f32 buffer,
/// `W` activation gradients written (T), `G` f32 buffers written (adapter gradients, dλ,
/// workspace). Strides come from the forward's [`DeltaLinearDims`]: dy has y's (`ld_y`),
/// dx has x's (`ld_x`), du has u's (`ld_u`). The frozen W and b get no gradient.
#[derive(Debug)]
pub struct DeltaLinearBackwardArgs<R, S, W, G> {
    /// ∂L/∂y [m, n], row stride `ld_y`.
    pub dy: R,
    /// The forward's x [m, k] (the delta's input when u = x), row stride `ld_x`.
    pub x: R,
    /// The frozen weight [n, k].
    pub w: R,
    /// The forward's separate delta input [m, k_u], or `None` as in the forward.
    pub u: Option<R>,
    /// [r, k_u].
    pub w_down: R,
    /// [n, r].
    pub w_up: R,
    /// `[n]`: a gated delta's dλ needs Δ, so its b_up (ignored otherwise; may be `None`).
    pub b_up: Option<R>,
    /// λ `[m]`, only with `Composition::Gated`.
    pub gate: Option<R>,
    /// What the training forward saved (f32, [`DeltaLinearDims::saved_len`]).
    pub saved: S,
    /// ∂L/∂x [m, k], row stride `ld_x`: through the frozen W and, for u = x or u = h,
    /// through the delta. Written (`=`).
    pub dx: W,
    /// ∂L/∂u [m, k_u], row stride `ld_u`: given exactly when the forward had a separate u.
    pub du: Option<W>,
    /// f32 [r, k_u].
    pub dw_down: G,
    /// f32 `[r]`; `None` skips it.
    pub db_down: Option<G>,
    /// f32 [n, r].
    pub dw_up: G,
    /// f32 `[n]`; `None` skips it.
    pub db_up: Option<G>,
    /// f32 ∂L/∂λ `[m]`, exactly with `Composition::Gated`. Written (`=`).
    pub dgate: Option<G>,
    /// f32 scratch of [`DeltaLinearDims::backward_workspace_len`] elements.
    pub workspace: G,
    /// The forward's dropout (same p and seed): the mask is regenerated, never stored.
    pub dropout: Option<LoraDropout>,
    /// `true`: the adapter gradients (dw_down, db_down, dw_up, db_up) are added to
    /// (gradient accumulation over micro-batches); `false`: overwritten.
    pub accumulate: bool,
}

impl<R, S, W, G> DeltaLinearBackwardArgs<R, S, W, G> {
    /// The planner's view of these tensors (see [`DeltaLinearArgs::bufs`]).
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaLinearBackwardBufs
    where
        Src: BufSource<R, W> + BufSource<S, G>,
    {
        let r = |s: &mut Src, b: R| BufSource::<R, W>::read(s, b);
        let g = |s: &mut Src, b: G| BufSource::<S, G>::write(s, b);
        DeltaLinearBackwardBufs {
            dy: r(s, self.dy),
            x: r(s, self.x),
            w: r(s, self.w),
            u: self.u.map(|b| r(s, b)),
            w_down: r(s, self.w_down),
            w_up: r(s, self.w_up),
            b_up: self.b_up.map(|b| r(s, b)),
            gate: self.gate.map(|b| r(s, b)),
            saved: BufSource::<S, G>::read(s, self.saved),
            dx: BufSource::<R, W>::write(s, self.dx),
            du: self.du.map(|b| BufSource::<R, W>::write(s, b)),
            dw_down: g(s, self.dw_down),
            db_down: self.db_down.map(|b| g(s, b)),
            dw_up: g(s, self.dw_up),
            db_up: self.db_up.map(|b| g(s, b)),
            dgate: self.dgate.map(|b| g(s, b)),
            workspace: g(s, self.workspace),
            dropout: self.dropout,
            accumulate: self.accumulate,
        }
    }
}

/// Sizes and strides of a delta on a given h, with one bottleneck per head slice.
///
/// An empty batch, `m = 0`, is checked as any call and launches nothing; heads, head_dim,
/// r (and u_head_dim with parallel insertion) must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaApplyDims {
    /// Rows.
    pub m: usize,
    /// Heads (1: one bottleneck over the whole row).
    pub heads: usize,
    /// Columns of h and y per head.
    pub head_dim: usize,
    /// Bottleneck width per head.
    pub r: usize,
    /// Columns of u per head (parallel insertion).
    pub u_head_dim: usize,
    /// Row stride of h, ≥ heads·head_dim.
    pub ld_h: usize,
    /// Row stride of u, ≥ heads·u_head_dim.
    pub ld_u: usize,
    /// Row stride of y, ≥ heads·head_dim.
    pub ld_y: usize,
    /// Which implementation runs the passes (`Auto` unless testing or benchmarking).
    pub kernel: KernelVariant,
    /// The blocks a tensor-core pass with fewer aims at by splitting its K over runs of
    /// blocks whose f32 partial sums a second kernel adds (the down pass at decode; the frozen
    /// GEMM when m·n is small): [`DEFAULT_SPLIT_TARGET`], about one block per SM of the
    /// largest GPUs, unless tuning (benches/delta_linear.rs sweeps it); 0 never splits. The
    /// workspace grows with it (`workspace_len`).
    pub split_target: usize,
}

impl DeltaApplyDims {
    /// Contiguous h, y [m, heads·head_dim] and u [m, heads·u_head_dim] (note the order:
    /// `u_head_dim` before the rank `r`; a sequential delta reads h, so pass `head_dim`).
    /// Widths past usize saturate (and are refused by the call).
    pub fn new(m: usize, heads: usize, head_dim: usize, u_head_dim: usize, r: usize) -> Self {
        let w = heads.saturating_mul(head_dim);
        DeltaApplyDims {
            m,
            heads,
            head_dim,
            r,
            u_head_dim,
            ld_h: w,
            ld_u: heads.saturating_mul(u_head_dim),
            ld_y: w,
            kernel: KernelVariant::Auto,
            split_target: DEFAULT_SPLIT_TARGET,
        }
    }
    /// Elements of the workspace with which every pass runs as the plan wants: the
    /// bottleneck activations of every head (rows padded to 8 elements) and, for a single
    /// head, room for the f32 partial sums of passes whose K is split over blocks, as
    /// [`DeltaLinearDims::workspace_len`] (whose remarks on shorter workspaces, reuse and
    /// monotonicity hold here too). Saturates at `usize::MAX`.
    pub fn workspace_len(&self) -> usize {
        workspace_layout(self.m, self.heads, self.r, self.head_dim, self.split_target).len
    }
    /// The least workspace a call takes: the activations of every head alone.
    pub fn min_workspace_len(&self) -> usize {
        workspace_layout(self.m, self.heads, self.r, self.head_dim, self.split_target).t
    }
    /// f32 elements of a training-mode apply's `saved` ([`DeltaApplyTrainArgs`]): z
    /// [m, heads·r], each head's pre-activations.
    pub fn saved_len(&self) -> usize {
        self.m.saturating_mul(self.heads).saturating_mul(self.r)
    }
    /// f32 elements of the backward's `workspace` ([`DeltaApplyBackwardArgs`]): dz
    /// [m, heads·r] and the weight gradients' partial sums when m is long enough to split
    /// their reduction over tokens. Saturates at `usize::MAX`.
    pub fn backward_workspace_len(&self, op: &DeltaLinear) -> usize {
        let k_u = match op.insertion {
            Insertion::Sequential => self.head_dim,
            Insertion::Parallel => self.u_head_dim,
        };
        let parallel = DeltaLinear {
            insertion: Insertion::Parallel,
            ..*op
        };
        backward_workspace_layout(&parallel, self.m, self.heads, self.head_dim, self.r, k_u).len
    }
}

/// A training-mode delta apply: `delta_apply`'s tensors and the f32 buffer of
/// [`DeltaApplyDims::saved_len`] elements into which it saves z. A sequential or gated
/// delta needs `h` given (its backward reads h; y is overwritten).
#[derive(Debug)]
pub struct DeltaApplyTrainArgs<R, W, S> {
    pub forward: DeltaApplyArgs<R, W>,
    pub saved: S,
}

impl<R, W, S> DeltaApplyTrainArgs<R, W, S> {
    /// The planner's view of these tensors (see [`DeltaLinearArgs::bufs`]).
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaApplyTrainBufs
    where
        Src: BufSource<R, W> + BufSource<R, S>,
    {
        let saved = BufSource::<R, S>::write(s, self.saved);
        DeltaApplyTrainBufs {
            forward: self.forward.bufs(s),
            saved,
        }
    }
}

/// The tensors of a delta-apply backward (one bottleneck per head slice), over a backend's
/// buffer types as [`DeltaLinearBackwardArgs`]. Strides from the forward's
/// [`DeltaApplyDims`]: dy and dh have y's (`ld_y`), h has `ld_h`, u and du `ld_u`.
#[derive(Debug)]
pub struct DeltaApplyBackwardArgs<R, S, W, G> {
    /// ∂L/∂y [m, heads·head_dim].
    pub dy: R,
    /// The forward's h [m, heads·head_dim]: required for a sequential or gated delta.
    pub h: Option<R>,
    /// The forward's u [m, heads·u_head_dim] (parallel insertion).
    pub u: Option<R>,
    /// [heads, r, u_head_dim] (sequential: [heads, r, head_dim]).
    pub w_down: R,
    /// [heads, head_dim, r].
    pub w_up: R,
    /// [heads, head_dim]: a gated delta's dλ needs Δ (ignored otherwise).
    pub b_up: Option<R>,
    /// λ `[m]`, only with `Composition::Gated` (and then one head).
    pub gate: Option<R>,
    /// What `delta_apply_train` saved (f32, [`DeltaApplyDims::saved_len`]).
    pub saved: S,
    /// ∂L/∂h [m, heads·head_dim], row stride `ld_y`: c_h·dy (+ du, sequential). Written.
    pub dh: W,
    /// ∂L/∂u [m, heads·u_head_dim], row stride `ld_u`, exactly with parallel insertion.
    pub du: Option<W>,
    /// f32 [heads, r, u_head_dim] (sequential: [heads, r, head_dim]).
    pub dw_down: G,
    /// f32 [heads, r]; `None` skips it.
    pub db_down: Option<G>,
    /// f32 [heads, head_dim, r].
    pub dw_up: G,
    /// f32 [heads, head_dim]; `None` skips it.
    pub db_up: Option<G>,
    /// f32 ∂L/∂λ `[m]`, exactly with `Composition::Gated`.
    pub dgate: Option<G>,
    /// f32 scratch of [`DeltaApplyDims::backward_workspace_len`] elements.
    pub workspace: G,
    /// `true`: the adapter gradients are added to; `false`: overwritten.
    pub accumulate: bool,
}

impl<R, S, W, G> DeltaApplyBackwardArgs<R, S, W, G> {
    /// The planner's view of these tensors (see [`DeltaLinearArgs::bufs`]).
    pub fn bufs<Src>(self, s: &mut Src) -> DeltaApplyBackwardBufs
    where
        Src: BufSource<R, W> + BufSource<S, G>,
    {
        let r = |s: &mut Src, b: R| BufSource::<R, W>::read(s, b);
        let g = |s: &mut Src, b: G| BufSource::<S, G>::write(s, b);
        DeltaApplyBackwardBufs {
            dy: r(s, self.dy),
            h: self.h.map(|b| r(s, b)),
            u: self.u.map(|b| r(s, b)),
            w_down: r(s, self.w_down),
            w_up: r(s, self.w_up),
            b_up: self.b_up.map(|b| r(s, b)),
            gate: self.gate.map(|b| r(s, b)),
            saved: BufSource::<S, G>::read(s, self.saved),
            dh: BufSource::<R, W>::write(s, self.dh),
            du: self.du.map(|b| BufSource::<R, W>::write(s, b)),
            dw_down: g(s, self.dw_down),
            db_down: self.db_down.map(|b| g(s, b)),
            dw_up: g(s, self.dw_up),
            db_up: self.db_up.map(|b| g(s, b)),
            dgate: self.dgate.map(|b| g(s, b)),
            workspace: g(s, self.workspace),
            accumulate: self.accumulate,
        }
    }
}

/// The tensors of a delta on a given h: `y = compose(h, Δh)` per head slice.
#[derive(Debug)]
pub struct DeltaApplyArgs<R, W> {
    /// The frozen output [m, heads·head_dim]; `None`: h is read from y, in place.
    pub h: Option<R>,
    /// The parallel delta input [m, heads·u_head_dim]; must be `None` for sequential.
    pub u: Option<R>,
    /// [heads, r, u_head_dim] (sequential: [heads, r, head_dim]).
    pub w_down: R,
    /// [heads, r].
    pub b_down: Option<R>,
    /// [heads, head_dim, r].
    pub w_up: R,
    /// [heads, head_dim].
    pub b_up: Option<R>,
    /// Per-row gate λ `[m]`, only with `Composition::Gated`.
    pub gate: Option<R>,
    /// Scratch of at least [`DeltaApplyDims::min_workspace_len`] elements;
    /// [`DeltaApplyDims::workspace_len`] lets every pass split as the plan wants.
    pub workspace: W,
    /// [m, heads·head_dim].
    pub y: W,
}

/// [`DeltaLinearArgs`] over host slices, as `emulator::delta_linear` and
/// `host::delta_linear` take them: annotate a `let` with it to build the arguments before
/// the call (module docs, "Building the arguments").
pub type HostDeltaLinearArgs<'a, T> = DeltaLinearArgs<&'a [T], &'a mut [T]>;
/// [`DeltaApplyArgs`] over host slices (`emulator::delta_apply`, `host::delta_apply`).
pub type HostDeltaApplyArgs<'a, T> = DeltaApplyArgs<&'a [T], &'a mut [T]>;
/// [`LoraMergeArgs`] over host slices (`emulator::lora_merge`, `host::lora_merge`).
pub type HostLoraMergeArgs<'a, T> = LoraMergeArgs<&'a [T], &'a mut [T]>;
/// [`DeltaLinearTrainArgs`] over host slices (the saved buffer f32).
pub type HostDeltaLinearTrainArgs<'a, T> =
    DeltaLinearTrainArgs<&'a [T], &'a mut [T], &'a mut [f32]>;
/// [`DeltaLinearBackwardArgs`] over host slices (the saved buffer, the adapter gradients and
/// the workspace f32).
pub type HostDeltaLinearBackwardArgs<'a, T> =
    DeltaLinearBackwardArgs<&'a [T], &'a [f32], &'a mut [T], &'a mut [f32]>;
/// [`DeltaApplyTrainArgs`] over host slices.
pub type HostDeltaApplyTrainArgs<'a, T> = DeltaApplyTrainArgs<&'a [T], &'a mut [T], &'a mut [f32]>;
/// [`DeltaApplyBackwardArgs`] over host slices.
pub type HostDeltaApplyBackwardArgs<'a, T> =
    DeltaApplyBackwardArgs<&'a [T], &'a [f32], &'a mut [T], &'a mut [f32]>;

impl<R, W> DeltaLinearArgs<R, W> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs(self, s: &mut impl BufSource<R, W>) -> DeltaLinearBufs {
        DeltaLinearBufs {
            x: s.read(self.x),
            w: s.read(self.w),
            bias: self.bias.map(|b| s.read(b)),
            u: self.u.map(|b| s.read(b)),
            w_down: s.read(self.w_down),
            b_down: self.b_down.map(|b| s.read(b)),
            w_up: s.read(self.w_up),
            b_up: self.b_up.map(|b| s.read(b)),
            gate: self.gate.map(|b| s.read(b)),
            workspace: s.write(self.workspace),
            y: s.write(self.y),
            col_scale: None,
        }
    }
}

impl<R, W> DeltaApplyArgs<R, W> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs(self, s: &mut impl BufSource<R, W>) -> DeltaApplyBufs {
        DeltaApplyBufs {
            h: self.h.map(|b| s.read(b)),
            u: self.u.map(|b| s.read(b)),
            w_down: s.read(self.w_down),
            b_down: self.b_down.map(|b| s.read(b)),
            w_up: s.read(self.w_up),
            b_up: self.b_up.map(|b| s.read(b)),
            gate: self.gate.map(|b| s.read(b)),
            workspace: s.write(self.workspace),
            y: s.write(self.y),
        }
    }
}

/// Sizes of a LoRA merge: W [n, k], W_down (A) [r, k], W_up (B) [n, r], all contiguous. A
/// merge has no batch: n, k and r must each be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraMergeDims {
    /// Output features: rows of W and W_up.
    pub n: usize,
    /// Input features: columns of W and W_down.
    pub k: usize,
    /// The LoRA rank: rows of W_down, columns of W_up.
    pub r: usize,
}

/// The tensors of a LoRA merge `W ← W + scale·W_up·W_down` (`W + scale·B·A`; scale = ±s,
/// see the module docs for the names).
#[derive(Debug)]
pub struct LoraMergeArgs<R, W> {
    /// The frozen weight [n, k], updated in place.
    pub w: W,
    /// LoRA A (`lora_A.weight`) [r, k].
    #[doc(alias = "lora_a")]
    #[doc(alias = "lora_A")]
    pub w_down: R,
    /// LoRA B (`lora_B.weight`) [n, r].
    #[doc(alias = "lora_b")]
    #[doc(alias = "lora_B")]
    pub w_up: R,
}

impl<R, W> LoraMergeArgs<R, W> {
    /// The planner's view of these tensors: each buffer's address and length from the
    /// backend's buffer source (on the GPU a `cuda::Buffers`, feature `cuda`, which keeps
    /// cudarc's stream order), for running the plan's steps yourself ([`crate::plan`]).
    pub fn bufs(self, s: &mut impl BufSource<R, W>) -> LoraMergeBufs {
        LoraMergeBufs {
            w_down: s.read(self.w_down),
            w_up: s.read(self.w_up),
            w: s.write(self.w),
        }
    }
}
