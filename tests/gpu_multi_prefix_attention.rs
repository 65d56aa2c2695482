//! Multi-tenant prefix attention on the GPU against the per-sequence reference: the suites of
//! tests/multi_prefix_attention/harness.rs (the emulator runs the same ones) through
//! `host::multi_prefix_attention`, and `cuda::multi_prefix_attention` itself with ids and
//! offsets on the device that the host never checked. Ignored without a device: run with
//! `cargo test --release --features cuda --test gpu_multi_prefix_attention -- --ignored`.
#![cfg(feature = "cuda")]

mod common;
#[path = "multi_prefix_attention/harness.rs"]
mod harness;

use half::{bf16, f16};
use harness::{MultiCase, MultiInputs};
use peft_kernels::cuda::{self, DeviceWrite};
use peft_kernels::host::Backend;
use peft_kernels::prefix_attention::MultiPrefixAttentionArgs;
use peft_kernels::validate::assert_close;
use peft_kernels::DEFAULT_SPLIT_TARGET;

fn gpu() -> Backend {
    Backend::cuda(0).expect("a CUDA device")
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_mixtures_f32() {
    harness::random_mixtures::<f32>(&gpu(), 48);
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_mixtures_f16() {
    harness::random_mixtures::<f16>(&gpu(), 48);
}

#[test]
#[ignore = "needs a CUDA device"]
fn random_mixtures_bf16() {
    harness::random_mixtures::<bf16>(&gpu(), 48);
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_and_prefill() {
    harness::decode_and_prefill::<f32>(&gpu());
    harness::decode_and_prefill::<f16>(&gpu());
    harness::decode_and_prefill::<bf16>(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn split_kv_decode() {
    harness::split_kv_decode::<f32>(&gpu());
    harness::split_kv_decode::<f16>(&gpu());
    harness::split_kv_decode::<bf16>(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn same_as_shared_prefix_and_as_none() {
    harness::same_as_shared_prefix::<f32>(&gpu());
    harness::same_as_shared_prefix::<bf16>(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_input_is_an_error() {
    harness::bad_input_is_an_error(&gpu());
}

/// `cuda::multi_prefix_attention` with ids and offsets uploaded unchecked: an id out of
/// range and a prefix past the set read as no prefix, and the status word says which.
#[test]
#[ignore = "needs a CUDA device"]
fn device_ids_out_of_range_read_no_prefix_and_flag() {
    let ctx = cuda::context(0).expect("a CUDA device");
    let stream = ctx.default_stream();
    let mut rng = common::Rng::from_env();
    let mut c = MultiCase {
        batch: 5,
        heads: 4,
        kv_heads: 2,
        q_len: 1,
        kv_len: 300,
        head_dim: 128,
        causal: true,
        lens: None,
        prefix_lens: vec![5, 16, 33],
        ids: vec![0, 1, 2, -1, 0],
        spare_rows: 0,
        slack: 0,
        padded_set: false,
        split: true,
        split_target: DEFAULT_SPLIT_TARGET,
    };
    let x = MultiInputs::<bf16>::new(&mut rng, &c);
    let ids = vec![0, 9, 2, -1, -3];
    let offsets = vec![0u32, 5, 21, 400]; // prefix 2 past the set's 54 rows
    c.ids = ids.clone();
    let dims = c.dims();
    let rows = dims.rows();
    let up = |v: &[bf16]| stream.clone_htod(v).expect("upload");
    let (q, k, v, set_k, set_v) = (up(&x.q), up(&x.k), up(&x.v), up(&x.set_k), up(&x.set_v));
    let offsets_d = stream.clone_htod(&offsets).expect("upload");
    let ids_d = stream.clone_htod(&ids).expect("upload");
    let mut out = stream
        .clone_htod(&vec![bf16::NAN; rows * c.head_dim])
        .expect("upload");
    let mut lambda = stream.clone_htod(&vec![f32::NAN; rows]).expect("upload");
    let mut ws = stream
        .alloc_zeros::<f32>(dims.workspace_len(peft_kernels::DType::BF16).max(1))
        .expect("alloc");
    let mut status = stream.alloc_zeros::<u32>(1).expect("alloc");
    cuda::multi_prefix_attention::<bf16>(
        &stream,
        &c.op(),
        &dims,
        MultiPrefixAttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            prefix_k: &set_k,
            prefix_v: &set_v,
            prefix_offsets: &offsets_d,
            prefix_ids: &ids_d,
            context_lens: None,
            out: &mut out,
            lse: None,
            lambda: Some(&mut lambda as DeviceWrite<f32>),
            workspace: Some(&mut ws as DeviceWrite<f32>),
            status: Some(&mut status as DeviceWrite<u32>),
        },
    )
    .expect("launch");
    let out = stream.clone_dtoh(&out).expect("download");
    let lambda = stream.clone_dtoh(&lambda).expect("download");
    let status = stream.clone_dtoh(&status).expect("download");
    // Sequences 1 (id 9), 2 (prefix 2 leaves the set) and 4 (id −3) read no prefix.
    c.ids = vec![0, -1, -1, -1, -1];
    let r = x.reference(&c);
    assert_close("out", &out, &r.out, 2e-2);
    assert_close("lambda", &lambda, &r.lambda, 1e-5);
    assert_eq!(status[0], 3, "status");
}
