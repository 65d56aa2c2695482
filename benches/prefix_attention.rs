//! Prefix attention on the GPU: the fused kernel against the two paths a user writes
//! without it, all with this crate's kernels so that only the fusion differs:
//!
//! - `fused`: one pass over the prefix and the context (kernels/prefix_attention.cu);
//! - `concat`: PEFT's way, `[P_k; K]` and `[P_v; V]` materialised by `kv_concat`, then
//!   attention over `l + L` keys with no prefix;
//! - `split`: prefix-only attention, context attention, and the LSE merge (three launches,
//!   two intermediate states written and read back).
//!
//! B = 8, H = 32 (multi-head, no grouping), d = 128, L ∈ {512, 2048} queries and context
//! keys, prefix l ∈ {30, 128}, bf16, causal and not. The throughput is in FLOP/s (criterion's
//! "elem/s"): 4·d FLOPs per visible (query, key) pair, the same count for every path.
//! Timed with CUDA events around the launches. Without a device (or without the `cuda`
//! feature) it prints that it skips and exits.

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;
    use std::time::Duration;

    use criterion::{BenchmarkId, Criterion, Throughput};
    use half::bf16;
    use peft_kernels::cuda::cudarc::driver::sys::CUevent_flags;
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::cuda::{self, DeviceRead, DeviceWrite};
    use peft_kernels::prefix_attention::{
        KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeDims, PrefixAttention,
        PrefixAttentionArgs, PrefixAttentionDims, PrefixOnlyArgs,
    };

    const BATCH: usize = 8;
    const HEADS: usize = 32;
    const HEAD_DIM: usize = 128;

    /// Every buffer of one shape, for all three paths.
    struct Buffers {
        q: CudaSlice<bf16>,
        k: CudaSlice<bf16>,
        v: CudaSlice<bf16>,
        prefix_k: CudaSlice<bf16>,
        prefix_v: CudaSlice<bf16>,
        out: CudaSlice<bf16>,
        // The concatenated keys and values.
        cat_k: CudaSlice<bf16>,
        cat_v: CudaSlice<bf16>,
        // The split path's two states.
        out_p: CudaSlice<bf16>,
        out_c: CudaSlice<bf16>,
        lse_p: CudaSlice<f32>,
        lse_c: CudaSlice<f32>,
    }

    /// A deterministic pseudo-random fill in [-1, 1) (the values only need to be ordinary).
    fn random(stream: &Arc<CudaStream>, n: usize, seed: u64) -> CudaSlice<bf16> {
        let mut s = seed;
        let host: Vec<bf16> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect();
        stream.clone_htod(&host).expect("upload")
    }

    impl Buffers {
        fn new(stream: &Arc<CudaStream>, len: usize, l: usize) -> Buffers {
            let n = BATCH * HEADS * len * HEAD_DIM;
            let np = BATCH * HEADS * l * HEAD_DIM;
            let zeros = |n: usize| stream.alloc_zeros::<bf16>(n).expect("alloc");
            let rows = BATCH * HEADS * len;
            Buffers {
                q: random(stream, n, 1),
                k: random(stream, n, 2),
                v: random(stream, n, 3),
                prefix_k: random(stream, np, 4),
                prefix_v: random(stream, np, 5),
                out: zeros(n),
                cat_k: zeros(n + np),
                cat_v: zeros(n + np),
                out_p: zeros(n),
                out_c: zeros(n),
                lse_p: stream.alloc_zeros::<f32>(rows).expect("alloc"),
                lse_c: stream.alloc_zeros::<f32>(rows).expect("alloc"),
            }
        }
    }

    fn fused(
        stream: &CudaStream,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) {
        cuda::prefix_attention::<bf16>(
            stream,
            op,
            dims,
            PrefixAttentionArgs {
                q: &b.q,
                k: &b.k,
                v: &b.v,
                prefix_k: &b.prefix_k,
                prefix_v: &b.prefix_v,
                context_lens: None,
                out: &mut b.out,
                lse: None,
                lambda: None,
            },
        )
        .expect("fused");
    }

    fn concat(
        stream: &CudaStream,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) {
        let (l, len) = (dims.prefix_len, dims.kv_len);
        let cat = KvConcatDims::new(BATCH, HEADS, l, len, HEAD_DIM);
        for (prefix, src, dst) in [
            (&b.prefix_k, &b.k, &mut b.cat_k),
            (&b.prefix_v, &b.v, &mut b.cat_v),
        ] {
            let args = KvConcatArgs::<DeviceRead<bf16>, DeviceWrite<bf16>> { prefix, src, dst };
            cuda::kv_concat::<bf16>(stream, &cat, args).expect("concat");
        }
        let whole = PrefixAttentionDims::new(BATCH, HEADS, HEADS, dims.q_len, l + len, 0, HEAD_DIM);
        // No prefix: the prefix tensors are not read.
        let none: &CudaSlice<bf16> = &b.prefix_k;
        cuda::prefix_attention::<bf16>(
            stream,
            op,
            &whole,
            PrefixAttentionArgs {
                q: &b.q,
                k: &b.cat_k,
                v: &b.cat_v,
                prefix_k: none,
                prefix_v: none,
                context_lens: None,
                out: &mut b.out,
                lse: None,
                lambda: None,
            },
        )
        .expect("attention over the concatenation");
    }

    fn split(
        stream: &CudaStream,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) {
        cuda::prefix_only_attention::<bf16>(
            stream,
            op,
            dims,
            PrefixOnlyArgs {
                q: &b.q,
                prefix_k: &b.prefix_k,
                prefix_v: &b.prefix_v,
                out: &mut b.out_p,
                lse: &mut b.lse_p,
            },
        )
        .expect("prefix only");
        let context = PrefixAttentionDims {
            prefix_len: 0,
            ..*dims
        };
        cuda::prefix_attention::<bf16>(
            stream,
            op,
            &context,
            PrefixAttentionArgs {
                q: &b.q,
                k: &b.k,
                v: &b.v,
                prefix_k: &b.prefix_k,
                prefix_v: &b.prefix_v,
                context_lens: None,
                out: &mut b.out_c,
                lse: Some(&mut b.lse_c as DeviceWrite<f32>),
                lambda: None,
            },
        )
        .expect("context attention");
        cuda::lse_merge::<bf16>(
            stream,
            &LseMergeDims::new(BATCH, HEADS, dims.q_len, HEAD_DIM),
            LseMergeArgs {
                o_prefix: &b.out_p,
                lse_prefix: &b.lse_p,
                o_context: &b.out_c,
                lse_context: &b.lse_c,
                out: &mut b.out,
                lse: None,
                lambda: None,
            },
        )
        .expect("merge");
    }

    /// 4·d FLOPs (two multiply-adds for S = QKᵀ and for P·V) per visible (query, key)
    /// pair: every query sees the l prefix keys, and all L context keys or, causal, the
    /// ones up to its own position.
    fn flops(len: usize, l: usize, causal: bool) -> u64 {
        let context_pairs = if causal {
            len * (len + 1) / 2
        } else {
            len * len
        };
        (4 * HEAD_DIM * BATCH * HEADS * (len * l + context_pairs)) as u64
    }

    type Path = fn(&CudaStream, &PrefixAttention, &PrefixAttentionDims, &mut Buffers);

    pub fn run() {
        let ctx = cuda::context(0).expect("a CUDA device");
        let stream = ctx.default_stream();
        let mut c = Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args();
        let paths: [(&str, Path); 3] = [("fused", fused), ("concat", concat), ("split", split)];
        for len in [512, 2048] {
            for l in [30, 128] {
                let mut b = Buffers::new(&stream, len, l);
                let dims = PrefixAttentionDims::new(BATCH, HEADS, HEADS, len, len, l, HEAD_DIM);
                for causal in [false, true] {
                    let op = PrefixAttention {
                        scale: None,
                        causal,
                    };
                    let name = format!(
                        "prefix_attention bf16 B={BATCH} H={HEADS} d={HEAD_DIM} L={len} l={l} {} \
                         (elem/s = FLOP/s)",
                        if causal { "causal" } else { "full" }
                    );
                    let mut group = c.benchmark_group(name);
                    group.throughput(Throughput::Elements(flops(len, l, causal)));
                    for (path_name, path) in paths {
                        group.bench_function(BenchmarkId::from_parameter(path_name), |bench| {
                            bench.iter_custom(|iters| {
                                let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
                                let start = stream.record_event(timing).expect("event");
                                for _ in 0..iters {
                                    path(&stream, &op, &dims, &mut b);
                                }
                                let end = stream.record_event(timing).expect("event");
                                let ms = start.elapsed_ms(&end).expect("elapsed time");
                                Duration::from_secs_f64(f64::from(ms) / 1e3)
                            })
                        });
                    }
                    group.finish();
                }
            }
        }
        c.final_summary();
    }
}

fn main() {
    #[cfg(feature = "cuda")]
    if peft_kernels::cuda::is_available() {
        gpu::run();
        return;
    }
    println!(
        "prefix_attention benchmarks: no CUDA device (or built without the `cuda` feature): \
         skipped"
    );
}
