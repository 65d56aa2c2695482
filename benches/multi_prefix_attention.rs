//! Multi-tenant prefix attention on the GPU: what mixing prefix-tuned requests in one batch
//! costs. Every sequence of the batch reads its own prefix of a packed set of 8 prefixes of
//! lengths 8 to 128 (ids `b mod 9 − 1`: repeats, and some sequences with no prefix), against
//! the same batch with one prefix, all with this crate's kernels:
//!
//! - `mixed`: `multi_prefix_attention`, the ids and offsets on the device, one launch;
//! - `one id`: the same operation with every sequence on the prefix whose length is nearest
//!   the mixed batch's mean (the table lookup alone, no mixing);
//! - `shared`: `prefix_attention` with that prefix shared by the batch (today's path);
//! - `per sequence`: what a server without the mixed kernel does, one `prefix_attention`
//!   launch per sequence with its own prefix (ids on the host).
//!
//! Shapes, bf16, Hq = 32 over Hkv = 8, d = 128, causal: decode (B = 32, one query, L = 2048
//! cached keys per sequence) and prefill (B = 8, L = 512 queries and keys). Before timing,
//! `mixed` must agree with `per sequence` and `one id` with `shared`. The summary table
//! (benches/common) gives each path's time and the ratios to `mixed`, and `mixed`'s bandwidth
//! and tensor rate (bytes: Q, K, V, each sequence's prefix and the output once; FLOPs: 4·d a
//! visible (query, key) pair).
//!
//! Without the `cuda` feature or a CUDA device it prints why it skips and exits.

mod common;

fn main() {
    if common::can_run("multi_prefix_attention") {
        #[cfg(feature = "baseline")]
        gpu::main();
    }
}

#[cfg(feature = "baseline")]
mod gpu {
    use std::sync::Arc;

    use criterion::{BenchmarkId, Throughput};
    use half::bf16;
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::cuda::{self, DeviceRead, DeviceWrite};
    use peft_kernels::prefix_attention::{
        HeadLayout, MultiPrefixAttentionArgs, MultiPrefixDims, PrefixAttention,
        PrefixAttentionArgs, PrefixAttentionDims,
    };
    use peft_kernels::DType;

    use crate::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const HEADS: usize = 32;
    const KV_HEADS: usize = 8;
    const HEAD_DIM: usize = 128;
    /// The set's prefix lengths, packed in this order.
    const SET_LENS: [usize; 8] = [8, 16, 20, 30, 32, 64, 100, 128];
    const OP: PrefixAttention = PrefixAttention {
        scale: None,
        causal: true,
    };

    /// Sequence b's prefix in the mixed batch: −1 (none), then every prefix in turn.
    fn mixed_id(b: usize) -> i32 {
        (b % (SET_LENS.len() + 1)) as i32 - 1
    }

    fn offsets() -> Vec<u32> {
        let mut o = vec![0u32];
        for l in SET_LENS {
            o.push(o.last().copied().unwrap_or(0) + l as u32);
        }
        o
    }

    /// Elements of one set row: Hkv·d.
    const ROW: usize = KV_HEADS * HEAD_DIM;

    /// One copy of a case's device buffers.
    struct Buffers {
        q: CudaSlice<bf16>,
        k: CudaSlice<bf16>,
        v: CudaSlice<bf16>,
        set_k: CudaSlice<bf16>,
        set_v: CudaSlice<bf16>,
        offsets: CudaSlice<u32>,
        mixed: CudaSlice<i32>,
        one: CudaSlice<i32>,
        out: CudaSlice<bf16>,
        workspace: CudaSlice<f32>,
    }

    /// One shape.
    struct Shape {
        dims: MultiPrefixDims,
        /// The prefix of the `one id` and `shared` paths.
        one: usize,
    }

    /// A shape with its rotating buffer copies.
    struct Case {
        shape: Shape,
        copies: Rotation<Buffers>,
    }

    type Path = fn(&CudaStream, &Shape, &mut Buffers) -> peft_kernels::Result<()>;
    const PATHS: [(&str, Path); 4] = [
        ("mixed", mixed),
        ("one_id", one_id),
        ("shared", shared),
        ("per_sequence", per_sequence),
    ];

    fn multi(
        stream: &CudaStream,
        c: &Shape,
        b: &mut Buffers,
        mixed: bool,
    ) -> peft_kernels::Result<()> {
        let ids: DeviceRead<i32> = if mixed { &b.mixed } else { &b.one };
        cuda::multi_prefix_attention::<bf16>(
            stream,
            &OP,
            &c.dims,
            MultiPrefixAttentionArgs {
                q: &b.q,
                k: &b.k,
                v: &b.v,
                prefix_k: &b.set_k,
                prefix_v: &b.set_v,
                prefix_offsets: &b.offsets,
                prefix_ids: ids,
                context_lens: None,
                out: &mut b.out,
                lse: None,
                lambda: None,
                workspace: Some(&mut b.workspace as DeviceWrite<f32>),
                status: None,
            },
        )
    }

    fn mixed(stream: &CudaStream, c: &Shape, b: &mut Buffers) -> peft_kernels::Result<()> {
        multi(stream, c, b, true)
    }

    fn one_id(stream: &CudaStream, c: &Shape, b: &mut Buffers) -> peft_kernels::Result<()> {
        multi(stream, c, b, false)
    }

    /// `prefix_attention` over `batch` sequences from `first`, with prefix `id` (−1: none)
    /// shared by them, read in place from the set.
    fn single(
        stream: &CudaStream,
        c: &Shape,
        b: &mut Buffers,
        first: usize,
        batch: usize,
        id: i32,
    ) -> peft_kernels::Result<()> {
        let a = &c.dims.attention;
        let (lo, l) = match usize::try_from(id) {
            Ok(i) => (offsets()[i] as usize, SET_LENS[i]),
            Err(_) => (0, 0),
        };
        let dims = PrefixAttentionDims {
            batch,
            prefix_len: l,
            prefix_k: HeadLayout::bshd(l, KV_HEADS, HEAD_DIM).shared_by_batch(),
            prefix_v: HeadLayout::bshd(l, KV_HEADS, HEAD_DIM).shared_by_batch(),
            ..*a
        };
        let (nq, nk) = (a.q.batch, a.k.batch);
        let set = (lo * ROW)..((lo + l.max(1)) * ROW);
        let seqs = |n: usize| (first * n)..((first + batch) * n);
        cuda::prefix_attention::<bf16>(
            stream,
            &OP,
            &dims,
            PrefixAttentionArgs {
                q: &b.q.slice(seqs(nq)),
                k: &b.k.slice(seqs(nk)),
                v: &b.v.slice(seqs(nk)),
                prefix_k: &b.set_k.slice(set.clone()),
                prefix_v: &b.set_v.slice(set),
                context_lens: None,
                out: &mut b.out.slice_mut(seqs(nq)),
                lse: None,
                lambda: None,
                workspace: None,
            },
        )
    }

    fn shared(stream: &CudaStream, c: &Shape, b: &mut Buffers) -> peft_kernels::Result<()> {
        single(stream, c, b, 0, c.dims.attention.batch, c.one as i32)
    }

    fn per_sequence(stream: &CudaStream, c: &Shape, b: &mut Buffers) -> peft_kernels::Result<()> {
        (0..c.dims.attention.batch).try_for_each(|s| single(stream, c, b, s, 1, mixed_id(s)))
    }

    impl Case {
        fn new(stream: &Arc<CudaStream>, batch: usize, q_len: usize, len: usize) -> Case {
            let rows: usize = SET_LENS.iter().sum();
            let max = SET_LENS.iter().copied().max().unwrap_or(0);
            let dims = MultiPrefixDims::new(
                batch,
                HEADS,
                KV_HEADS,
                q_len,
                len,
                HEAD_DIM,
                SET_LENS.len(),
                rows,
                max,
            );
            let mean = mean_prefix(batch);
            let one = (0..SET_LENS.len())
                .min_by(|&i, &j| {
                    let d = |i: usize| (SET_LENS[i] as f64 - mean).abs();
                    d(i).total_cmp(&d(j))
                })
                .unwrap_or(0);
            let nq = batch * HEADS * q_len * HEAD_DIM;
            let nk = batch * KV_HEADS * len * HEAD_DIM;
            let [q, k, v, set_k, set_v] =
                [(nq, 1), (nk, 2), (nk, 3), (rows * ROW, 4), (rows * ROW, 5)]
                    .map(|(n, seed)| random(n, 1.0, seed));
            let mixed: Vec<i32> = (0..batch).map(mixed_id).collect();
            let ws = dims.workspace_len(DType::BF16).max(1);
            let up = |h: &[bf16]| stream.clone_htod(h).expect("copy to the device");
            let copies = Rotation::new(bytes(&dims), || Buffers {
                q: up(&q),
                k: up(&k),
                v: up(&v),
                set_k: up(&set_k),
                set_v: up(&set_v),
                offsets: stream.clone_htod(&offsets()).expect("copy to the device"),
                mixed: stream.clone_htod(&mixed).expect("copy to the device"),
                one: stream
                    .clone_htod(&vec![one as i32; batch])
                    .expect("copy to the device"),
                out: stream.alloc_zeros(nq).expect("device allocation"),
                workspace: stream.alloc_zeros(ws).expect("device allocation"),
            });
            Case {
                shape: Shape { dims, one },
                copies,
            }
        }

        /// `mixed` against `per sequence` and `one id` against `shared`, each into a
        /// NaN-poisoned output.
        fn check(&mut self, stream: &Arc<CudaStream>, name: &str) -> Result<(), String> {
            let mut outputs = Vec::new();
            for (path_name, path) in PATHS {
                let first = self.copies.first();
                poison(stream, &mut first.out);
                path(stream, &self.shape, first)
                    .map_err(|e| format!("the {path_name} path failed: {e}"))?;
                outputs.push(stream.clone_dtoh(&first.out).expect("copy to the host"));
            }
            agree(name, "mixed and per-sequence", &outputs[0], &outputs[3])?;
            agree(name, "one id and shared", &outputs[1], &outputs[2])
        }

        fn run(&mut self, stream: &CudaStream, path: Path) {
            path(stream, &self.shape, self.copies.next_copy()).expect("a timed path");
        }
    }

    /// The mixed batch's mean prefix length.
    fn mean_prefix(batch: usize) -> f64 {
        let total: usize = (0..batch)
            .filter_map(|b| usize::try_from(mixed_id(b)).ok())
            .map(|i| SET_LENS[i])
            .sum();
        total as f64 / batch as f64
    }

    /// The mixed batch's least traffic: Q, K, V, each sequence's prefix and the output once.
    fn bytes(d: &MultiPrefixDims) -> usize {
        let a = &d.attention;
        let prefix_rows = mean_prefix(a.batch) * a.batch as f64;
        let elements = 2 * a.batch * a.heads * a.q_len * a.head_dim
            + 2 * a.batch * a.kv_heads * a.kv_len * a.head_dim
            + 2 * (prefix_rows as usize) * a.kv_heads * a.head_dim;
        elements * std::mem::size_of::<bf16>()
    }

    /// 4·d FLOPs a visible (query, key) pair: every query sees its sequence's prefix and,
    /// causal, the context keys up to its position.
    fn flops(d: &MultiPrefixDims) -> f64 {
        let a = &d.attention;
        let (lq, lk) = (a.q_len as f64, a.kv_len as f64);
        let context = lq * lk - lq * (lq - 1.0) / 2.0;
        let prefix = lq * mean_prefix(a.batch);
        4.0 * (a.head_dim * a.heads * a.batch) as f64 * (context + prefix)
    }

    pub fn main() {
        let gpu = Gpu::new();
        let stream = &gpu.stream;
        let mut criterion = criterion();
        let mut table = Table::new(
            format!(
                "multi_prefix_attention, bf16, Hq = {HEADS}, Hkv = {KV_HEADS}, d = {HEAD_DIM}, \
                 causal, 8 prefixes of {SET_LENS:?} rows, ids b mod 9 − 1: mixed vs one id, one \
                 shared prefix (nearest the mean length) and one launch per sequence"
            ),
            &[
                ("shape", "---"),
                ("B", "--:"),
                ("L", "--:"),
                ("shared l", "--:"),
            ],
            &["mixed µs", "one id µs", "shared µs", "per sequence µs"],
            &["one id / mixed", "shared / mixed", "per sequence / mixed"],
        );
        for (shape, batch, q_len, len) in [("decode", 32, 1, 2048), ("prefill", 8, 512, 512)] {
            let mut case = Case::new(stream, batch, q_len, len);
            let keys = vec![
                shape.to_owned(),
                batch.to_string(),
                len.to_string(),
                SET_LENS[case.shape.one].to_string(),
            ];
            let name = format!(
                "multi_prefix_attention {shape} bf16 B={batch} Lq={q_len} L={len} \
                 Hq={HEADS} Hkv={KV_HEADS} d={HEAD_DIM}"
            );
            if let Err(e) = case.check(stream, &name) {
                table.failed(name, keys, e);
                continue;
            }
            let mut group = criterion.benchmark_group(&name);
            group.throughput(Throughput::Bytes(bytes(&case.shape.dims) as u64));
            for (path_name, path) in PATHS {
                group.bench_function(BenchmarkId::from_parameter(path_name), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.run(stream, path)))
                });
            }
            group.finish();
            if gpu.measuring {
                let seconds = PATHS
                    .iter()
                    .map(|&(_, path)| gpu.per_call(|| case.run(stream, path)))
                    .collect();
                table.timed(
                    keys,
                    seconds,
                    bytes(&case.shape.dims) as f64,
                    flops(&case.shape.dims),
                );
            }
        }
        gpu.finish("multi_prefix_attention", criterion, &[&table]);
    }
}
