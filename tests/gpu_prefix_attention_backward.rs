//! Prefix attention's backward on the GPU against the f64 reference: the suites of
//! tests/prefix_attention/backward.rs (the emulator runs the same ones), through
//! `host::prefix_attention_backward` on a CUDA backend, plus a long-sequence shape the emulator
//! is too slow for. Ignored without a device: run with
//! `cargo test --release --features cuda --test gpu_prefix_attention_backward -- --ignored`.
#![cfg(feature = "cuda")]

#[path = "prefix_attention/backward.rs"]
mod backward;
mod common;
// The forward's harness: its cases, inputs and strided buffers.
#[allow(dead_code)]
#[path = "prefix_attention/harness.rs"]
mod harness;

use half::bf16;
use harness::Case;
use peft_kernels::host::Backend;

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA device")
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_head_dim_and_dtype() {
    backward::every_head_dim_and_dtype(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_configurations() {
    backward::random_configurations(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn awkward_shapes() {
    backward::awkward_shapes(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn rows_that_see_nothing() {
    backward::rows_that_see_nothing(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn f32_prefix_gradients() {
    backward::f32_prefix_gradients(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_then_backward() {
    backward::forward_then_backward(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn split_form_trains() {
    backward::split_form_trains(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn lse_merge_backward() {
    backward::merge_backward(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn misaligned_buffers() {
    backward::misaligned_buffers(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_arguments_are_errors() {
    backward::bad_arguments_are_errors(&gpu());
}

/// Many query and key tiles: 2 sequences of 700 queries and keys, causal and ragged, l = 30,
/// GQA 8/2, a shared prefix summed over the batch.
#[test]
#[ignore = "needs a CUDA device"]
fn long_sequences() {
    let mut rng = common::Rng::from_env();
    let case = Case {
        shared_prefix: true,
        ..Case::new(2, 8, 2, 700, 700, 30, 128)
            .causal(true)
            .lens(vec![700, 333])
    };
    backward::check_backward::<bf16>(&gpu(), &mut rng, &case);
}
