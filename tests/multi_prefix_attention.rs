//! Multi-tenant prefix attention (`multi_prefix_attention`) on the emulator against the
//! per-sequence single-prefix reference: random mixtures every run in every dtype, decode and
//! prefill, the shared-prefix and no-prefix special cases bit for bit against
//! `prefix_attention`, bad input refused on the host, and ids and offsets the host never saw
//! (on the device) read as no prefix and flagged. The suites are in
//! multi_prefix_attention/harness.rs, shared with the GPU tests.

mod common;
#[path = "multi_prefix_attention/harness.rs"]
mod harness;

use half::{bf16, f16};
use harness::{MultiCase, MultiInputs};
use peft_kernels::emulator::{self, CheckBuffer};
use peft_kernels::host::Backend;
use peft_kernels::plan::prefix_attention::{
    self as plan, MultiPrefixAttentionBufs, PrefixAttentionBufs,
};
use peft_kernels::plan::Buf;
use peft_kernels::{Element, DEFAULT_SPLIT_TARGET};

#[test]
fn random_mixtures_f32() {
    harness::random_mixtures::<f32>(&Backend::Emulator, 24);
}

#[test]
fn random_mixtures_f16() {
    harness::random_mixtures::<f16>(&Backend::Emulator, 24);
}

#[test]
fn random_mixtures_bf16() {
    harness::random_mixtures::<bf16>(&Backend::Emulator, 24);
}

#[test]
fn decode_and_prefill() {
    harness::decode_and_prefill::<f32>(&Backend::Emulator);
    harness::decode_and_prefill::<bf16>(&Backend::Emulator);
}

#[test]
fn split_kv_decode() {
    harness::split_kv_decode::<f32>(&Backend::Emulator);
    harness::split_kv_decode::<bf16>(&Backend::Emulator);
}

#[test]
fn same_as_shared_prefix_and_as_none() {
    harness::same_as_shared_prefix::<f32>(&Backend::Emulator);
    harness::same_as_shared_prefix::<f16>(&Backend::Emulator);
}

#[test]
fn bad_input_is_an_error() {
    harness::bad_input_is_an_error(&Backend::Emulator);
}

fn buf<A>(s: &[A]) -> Buf {
    Buf {
        addr: s.as_ptr() as u64,
        len: s.len(),
    }
}

fn buf_mut<A>(s: &mut [A]) -> Buf {
    Buf {
        addr: s.as_mut_ptr() as u64,
        len: s.len(),
    }
}

/// An unchecked call: ids, offsets, the sequences that must read no prefix, the status.
type Unchecked = (Vec<i32>, Vec<u32>, Vec<usize>, u32);

/// Ids and offsets the host never checked (as on the GPU, where they live on the device):
/// the kernel reads an id out of range, or a prefix whose offsets leave the set, as no prefix
/// (that sequence gets plain attention, λ = 0) and sets the status bit; the others are as
/// the reference has them. The set's buffers are exactly its rows, so a read past them is
/// caught by the emulator's checks when they are on (scripts/emu-sanitize.sh).
#[test]
fn unchecked_ids_and_offsets_read_no_prefix_and_flag() {
    let mut rng = common::Rng::from_env();
    let mut c = MultiCase {
        batch: 5,
        heads: 2,
        kv_heads: 1,
        q_len: 3,
        kv_len: 20,
        head_dim: 32,
        causal: true,
        lens: None,
        prefix_lens: vec![5, 16, 1],
        ids: vec![0, 1, 2, -1, 0],
        spare_rows: 0,
        slack: 0,
        padded_set: false,
        split: false,
        split_target: DEFAULT_SPLIT_TARGET,
    };
    let x = MultiInputs::<f32>::new(&mut rng, &c);
    // What the kernel must compute: the bad sequences with no prefix.
    let expect = |c: &MultiCase, bad: &[usize]| {
        let mut e = c.clone();
        for &b in bad {
            e.ids[b] = -1;
        }
        x.reference(&e)
    };
    // (ids, offsets, the sequences read with no prefix, the status)
    let bad_offsets = vec![0, 5, 50, 22]; // prefix 1 past the set, prefix 2 decreasing
    let cases: [Unchecked; 3] = [
        (
            vec![0, 3, 2, -1, i32::MIN],
            x.offsets.clone(),
            vec![1, 4],
            1,
        ),
        (vec![0, 1, 2, -1, 1], bad_offsets.clone(), vec![1, 2, 4], 2),
        (vec![7, 1, 0, -1, -5], bad_offsets, vec![0, 1, 4], 3),
    ];
    for (ids, offsets, bad, want_status) in cases {
        c.ids = ids.clone();
        let dims = c.dims();
        let rows = dims.rows();
        let mut out = vec![f32::NAN; rows * c.head_dim];
        let mut lse = vec![f32::NAN; rows];
        let mut lambda = vec![f32::NAN; rows];
        let mut status = [0u32];
        let set_len = c.set_rows() * dims.attention.prefix_k.seq;
        let (set_k, set_v) = (&x.set_k[..set_len], &x.set_v[..set_len]);
        assert!(plan::check_prefix_set(&ids, &offsets, &dims).is_err());
        let bufs = MultiPrefixAttentionBufs {
            attention: PrefixAttentionBufs {
                q: buf(&x.q),
                k: buf(&x.k),
                v: buf(&x.v),
                prefix_k: buf(set_k),
                prefix_v: buf(set_v),
                context_lens: None,
                out: buf_mut(&mut out),
                lse: Some(buf_mut(&mut lse)),
                lambda: Some(buf_mut(&mut lambda)),
                workspace: None,
            },
            prefix_offsets: buf(&offsets),
            prefix_ids: buf(&ids),
            status: Some(buf_mut(&mut status)),
        };
        let steps = plan::multi_prefix_attention(&c.op(), &dims, f32::DTYPE, &bufs).unwrap();
        // Named for the emulator's memcheck (PEFT_KERNELS_EMU_CHECK in a sanitize build).
        let named = [
            CheckBuffer::input("q", &x.q),
            CheckBuffer::input("k", &x.k),
            CheckBuffer::input("v", &x.v),
            CheckBuffer::input("prefix_k", set_k),
            CheckBuffer::input("prefix_v", set_v),
            CheckBuffer::input("prefix_offsets", &offsets),
            CheckBuffer::input("prefix_ids", &ids),
            CheckBuffer::output("out", &out),
            CheckBuffer::output("lse", &lse),
            CheckBuffer::output("lambda", &lambda),
            CheckBuffer::output("status", &status),
        ];
        for (launch, params) in &steps {
            // SAFETY: every address is a live slice of the length the plan checked; the
            // outputs are written only through these addresses while no reference reads them.
            unsafe { emulator::launch_with(launch, params, &named) }.expect("launch");
        }
        let r = expect(&c, &bad);
        let name = format!("ids {ids:?} offsets {offsets:?}");
        peft_kernels::validate::assert_close(&name, &out, &r.out, 1e-5);
        peft_kernels::validate::assert_close(&name, &lse, &r.lse, 1e-5);
        peft_kernels::validate::assert_close(&name, &lambda, &r.lambda, 1e-5);
        for &b in &bad {
            let per = c.heads * c.q_len;
            assert!(lambda[b * per..][..per].iter().all(|&l| l == 0.0), "{name}");
        }
        assert_eq!(status[0], want_status, "{name}");
    }
}
