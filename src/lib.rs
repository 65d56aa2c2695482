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
//! [`reference`] holds the f64 CPU reference every kernel is checked against.

pub mod delta_linear;
pub mod error;
pub mod host;
pub mod kernels;
pub mod plan;
pub mod reference;
#[cfg(feature = "emulator")]
pub mod selftest;
pub mod spec;
pub mod validate;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulator")]
pub mod emulator;

pub use error::{Error, Result};
pub use spec::{Activation, Composition, DType, Element, Insertion, MatrixLayout};
