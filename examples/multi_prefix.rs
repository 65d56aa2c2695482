//! Serving prefix-tuned fine-tunes of one model in one batch (multi-tenant prefix tuning):
//! one attention layer, a set of four prefix-tuning fine-tunes with prefixes of 10, 30, 64
//! and 100 vectors packed in one tensor per keys and values, and a decode step of six
//! requests, each on its own fine-tune (two share one, one uses the base model: id −1),
//! with KV caches of different lengths. One launch attends every request over its own
//! prefix and its own context; each request's answer is then checked against the
//! single-prefix f64 reference of that request alone.
//!
//! ```text
//! cargo run --release --example multi_prefix                   # emulator
//! cargo run --release --features cuda --example multi_prefix   # GPU if present
//! ```
//!
//! Exits non-zero if a request's error exceeds the bf16 tolerance.

use half::bf16;
use peft_kernels::host::{self, Backend};
use peft_kernels::prefix_attention::{
    HostMultiPrefixAttentionArgs, MultiPrefixAttentionArgs, MultiPrefixDims, PrefixAttention,
};
use peft_kernels::reference::attention::{self, PrefixAttentionTensors, Tensor4};
use peft_kernels::validate::{compare, default_tolerance};
use peft_kernels::{DType, Result};

/// Llama-like attention geometry, grouped-query.
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const DH: usize = 128;
/// The fine-tunes' prefix lengths (PEFT's `num_virtual_tokens`).
const PREFIXES: [usize; 4] = [10, 30, 64, 100];
/// Each request's fine-tune (−1: the base model) and its KV cache's length.
const REQUESTS: [(i32, u32); 6] = [(2, 700), (0, 33), (-1, 512), (3, 1), (2, 260), (1, 999)];
/// The cache's capacity per request.
const CACHE: usize = 1024;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f64(((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
        })
        .collect()
}

/// Rows `lo..lo + l` of a packed `[rows, Hkv, d]` set as a `[1, Hkv, l, d]` prefix.
fn prefix(set: &[bf16], lo: usize, l: usize) -> Tensor4<'_, bf16> {
    let at = lo * KV_HEADS * DH;
    Tensor4::strided(&set[at..], [1, KV_HEADS, l, DH], [0, DH, KV_HEADS * DH, 1])
}

/// Sequence `b` of a contiguous `[B, heads, n, d]` tensor, as a batch of one.
fn sequence(t: &[bf16], b: usize, heads: usize, n: usize) -> Tensor4<'_, bf16> {
    let per = heads * n * DH;
    Tensor4::contiguous(&t[b * per..][..per], [1, heads, n, DH])
}

fn main() -> Result<()> {
    let backend = Backend::best()?;
    let batch = REQUESTS.len();
    // The set: prefix i is rows offsets[i]..offsets[i + 1] of [rows, Hkv, d]. Adding a
    // fine-tune appends its rows and one offset; nothing else moves.
    let mut offsets = vec![0u32];
    for l in PREFIXES {
        offsets.push(offsets[offsets.len() - 1] + l as u32);
    }
    let rows = offsets[PREFIXES.len()] as usize;
    let set_k = values(rows * KV_HEADS * DH, 1);
    let set_v = values(rows * KV_HEADS * DH, 2);
    // One decode step: a query per request, each against its own cache.
    let q = values(batch * HEADS * DH, 3);
    let k = values(batch * KV_HEADS * CACHE * DH, 4);
    let v = values(batch * KV_HEADS * CACHE * DH, 5);
    let ids: Vec<i32> = REQUESTS.iter().map(|r| r.0).collect();
    let lens: Vec<u32> = REQUESTS.iter().map(|r| r.1).collect();

    let op = PrefixAttention {
        scale: None,
        causal: true,
    };
    let longest = PREFIXES.iter().copied().max().unwrap_or(0);
    let dims = MultiPrefixDims::new(
        batch,
        HEADS,
        KV_HEADS,
        1,
        CACHE,
        DH,
        PREFIXES.len(),
        rows,
        longest,
    );
    let mut out = vec![bf16::ZERO; q.len()];
    let mut lambda = vec![0.0f32; dims.rows()];
    let mut workspace = vec![0.0f32; dims.workspace_len(DType::BF16)];
    let args: HostMultiPrefixAttentionArgs<bf16> = MultiPrefixAttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        prefix_k: &set_k,
        prefix_v: &set_v,
        prefix_offsets: &offsets,
        prefix_ids: &ids,
        context_lens: Some(&lens),
        out: &mut out,
        lse: None,
        lambda: Some(&mut lambda),
        workspace: (!workspace.is_empty()).then_some(&mut workspace[..]),
        status: None,
    };
    host::multi_prefix_attention(&backend, &op, &dims, args)?;

    println!("multi-tenant prefix tuning on {backend:?}: {batch} requests, one launch");
    let mut failed = false;
    for (b, &(id, len)) in REQUESTS.iter().enumerate() {
        // The request alone, with its own fine-tune's prefix (none for id −1).
        let (lo, l) = match usize::try_from(id) {
            Ok(i) => (offsets[i] as usize, PREFIXES[i]),
            Err(_) => (0, 0),
        };
        let r = attention::prefix_attention(
            &op,
            &PrefixAttentionTensors {
                q: sequence(&q, b, HEADS, 1),
                k: sequence(&k, b, KV_HEADS, CACHE),
                v: sequence(&v, b, KV_HEADS, CACHE),
                prefix_k: prefix(&set_k, lo, l),
                prefix_v: prefix(&set_v, lo, l),
                context_lens: Some(&lens[b..b + 1]),
            },
        )?;
        let got = &out[b * HEADS * DH..][..HEADS * DH];
        let c = compare("out", got, &r.out, default_tolerance(DType::BF16))?;
        let mean_lambda = lambda[b * HEADS..][..HEADS].iter().sum::<f32>() / HEADS as f32;
        println!(
            "  request {b}: fine-tune {id:>2} (prefix {l:>3}), cache {len:>4}: mean λ {:.3}, \
             relative error {:.2e} {}",
            mean_lambda,
            c.rel_err,
            if c.passed() { "ok" } else { "FAILED" }
        );
        failed |= !c.passed();
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
