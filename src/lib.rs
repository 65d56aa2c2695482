//! # peft-kernels
//!
//! Fused CUDA kernels for parameter-efficient fine-tuning, after He et al., "Towards a
//! Unified View of Parameter-Efficient Transfer Learning" (ICLR 2022). Adapters, LoRA,
//! prefix tuning and their hybrids are one operation: a frozen layer's output `h` plus a
//! small bottleneck delta,
//!
//! ```text
//! Δh = f(u · W_downᵀ + b_down) · W_upᵀ + b_up        (a bottleneck of width r)
//! h  ← compose(h, s·Δh)                              add, scaled add or gate
//! ```
//!
//! inserted in parallel (`u` = the frozen layer's input) or in sequence (`u = h`).
//! Prefix tuning is attention over learned prefix vectors gated against the context by
//! `λ = sigmoid(LSE_prefix − LSE_context)`.
//!
//! Every kernel lives once, in `kernels/*.cu`, and runs on two backends:
//! - `cuda` (feature `cuda`): nvcc-built PTX and cubins launched through cudarc;
//! - `emulator` (feature `emulator`, default): the same sources compiled as C++ and run
//!   on the CPU thread by thread, with the GPU's grid, block, shared memory and warp
//!   semantics, so kernels are tested on machines without a GPU.
//!
//! [`mod@reference`] holds the f64 CPU reference every kernel is checked against, and
//! [`validate`] compares with it. [`host`] runs any operation on host buffers on the best
//! backend at hand. [`dora`] adds DoRA's learned magnitude to a LoRA layer; the `peft` module
//! (feature `peft`) reads PEFT's adapter checkpoints into the operations' arguments.
//!
//! The operations are in [`mod@delta_linear`] (whose docs have the names of LoRA's A and B
//! here, `w_down` and `w_up`, and how to build arguments before a call) and
//! [`mod@prefix_attention`]. Every operation takes an empty batch (no rows) as a valid call
//! that launches nothing, and host slices of any alignment.
//!
//! ```
//! # #[cfg(feature = "emulator")] {
//! use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
//! use peft_kernels::emulator;
//!
//! // A LoRA layer (r = 2, α = 4) on 3 tokens of width 8, 5 outputs, on the CPU emulator.
//! // LoRA's A is `w_down`, B is `w_up` (the names: `delta_linear`'s module docs).
//! let (m, n, k, r) = (3, 5, 8, 2);
//! let x = vec![0.5f32; m * k];
//! let w = vec![0.25f32; n * k];
//! let (w_down, w_up) = (vec![0.1f32; r * k], vec![0.2f32; n * r]);
//! let mut y = vec![0.0f32; m * n];
//! let dims = DeltaLinearDims::new(m, n, k, r);
//! let mut workspace = vec![0.0f32; dims.workspace_len()];
//! emulator::delta_linear(
//!     &DeltaLinear::lora(4.0), // s = α / r, r from the dims
//!     &dims,
//!     DeltaLinearArgs {
//!         x: &x, w: &w, bias: None, u: None,
//!         w_down: &w_down, b_down: None, w_up: &w_up, b_up: None, gate: None,
//!         workspace: &mut workspace, y: &mut y,
//!     },
//! )?;
//! // h = 8·0.5·0.25 = 1; Δh = s·(8·0.5·0.1)·(2·0.2) = 2·0.4·0.4 = 0.32.
//! assert!(y.iter().all(|&v| (v - 1.32).abs() < 1e-6));
//! # }
//! # Ok::<(), peft_kernels::Error>(())
//! ```

#[cfg(feature = "candle")]
pub mod candle;
pub mod delta_linear;
pub mod dora;
pub mod dropout;
pub mod error;
// Runs an operation on the best backend: there is none without `emulator` or `cuda`.
#[cfg(any(feature = "emulator", feature = "cuda"))]
pub mod host;
pub mod kernels;
pub mod model;
pub mod multi_adapter;
pub mod optim;
#[cfg(feature = "peft")]
pub mod peft;
pub mod plan;
pub mod prefix_attention;
pub mod quant;
pub mod reference;
// The emulator's own checks (the crate's tests run them, feature `selftest`); not part of
// the API.
#[cfg(all(feature = "emulator", feature = "selftest"))]
#[doc(hidden)]
pub mod selftest;
pub mod spec;
pub mod validate;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulator")]
pub mod emulator;

pub use error::{Error, Result};
pub use spec::{
    Activation, Composition, DType, Element, Insertion, MatrixLayout, DEFAULT_SPLIT_TARGET,
};
