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
//! criterion times each path by the host clock around many queued calls (stream
//! synchronized at both ends); every call works on the next of several copies of the
//! tensors, together larger than the L2 cache. Before timing, each case checks that the
//! fused and split outputs agree with the concat path's.
//!
//! Decoding gets a second set: one query per sequence against a long KV cache (B = 1,
//! Hq = 32 over Hkv = 8, prefix l = 30, L ∈ {4096, 32768}, causal), where 8 blocks (one per
//! KV group, its 4 query heads packed) would leave most of an H100 idle: the fused kernel
//! with its split-KV workspace against the same kernel in one pass (both checked to agree
//! first); criterion's throughput there is in bytes (K and V dominate). Its summary also
//! sweeps `PrefixAttentionDims::split_target` (16, 32, 64, 256 against the default: 2, 4, 8
//! and up to 31 runs of the 8 blocks), each checked against one pass first, to set the
//! default from measurements.
//!
//! After criterion's report, two summary tables (benches/common): per prefill case the three
//! paths' times (CUDA events, median of batches), the speedups of the fused kernel over the
//! other two, and its achieved bandwidth (bytes = Q, K, V, the prefix and the output once
//! each) and tensor rate; per decode case split-KV and one pass, one pass / split-KV and the
//! split pass's bandwidth; all against the floor measured in the same run; as markdown also
//! to `$PEFT_BENCH_OUT`, by default `peft-summary-prefix_attention.md` in criterion's folder.
//!
//! Without the `cuda` feature or a CUDA device it prints why it skips and exits.

mod common;

fn main() {
    if common::can_run("prefix_attention") {
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
        KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeDims, PrefixAttention,
        PrefixAttentionArgs, PrefixAttentionDims, PrefixOnlyArgs,
    };
    use peft_kernels::{DType, DEFAULT_SPLIT_TARGET};

    use crate::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const BATCH: usize = 8;
    const HEADS: usize = 32;
    const HEAD_DIM: usize = 128;

    /// The tensors of one attention call: Q, the context's and the prefix's keys and values,
    /// the output.
    struct Tensors {
        q: CudaSlice<bf16>,
        k: CudaSlice<bf16>,
        v: CudaSlice<bf16>,
        prefix_k: CudaSlice<bf16>,
        prefix_v: CudaSlice<bf16>,
        out: CudaSlice<bf16>,
    }

    impl Tensors {
        /// Device copies of the host tensors [q, k, v, prefix_k, prefix_v] and a zeroed
        /// output of `out` elements.
        fn upload(stream: &Arc<CudaStream>, host: [&[bf16]; 5], out: usize) -> Tensors {
            let [q, k, v, prefix_k, prefix_v] =
                host.map(|h| stream.clone_htod(h).expect("copy to the device"));
            let out = stream.alloc_zeros(out).expect("device allocation");
            Tensors {
                q,
                k,
                v,
                prefix_k,
                prefix_v,
                out,
            }
        }

        /// The fused kernel's arguments over them: no lengths, no statistics, the split-KV
        /// workspace given (or none).
        fn args<'a>(
            &'a mut self,
            workspace: Option<DeviceWrite<'a, f32>>,
        ) -> PrefixAttentionArgs<
            DeviceRead<'a, bf16>,
            DeviceWrite<'a, bf16>,
            DeviceRead<'a, u32>,
            DeviceWrite<'a, f32>,
        > {
            PrefixAttentionArgs {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                prefix_k: &self.prefix_k,
                prefix_v: &self.prefix_v,
                context_lens: None,
                out: &mut self.out,
                lse: None,
                lambda: None,
                workspace,
            }
        }
    }

    /// Every buffer of one shape, for all three paths.
    struct Buffers {
        t: Tensors,
        // The concatenated keys and values.
        cat_k: CudaSlice<bf16>,
        cat_v: CudaSlice<bf16>,
        // The split path's two states.
        out_p: CudaSlice<bf16>,
        out_c: CudaSlice<bf16>,
        lse_p: CudaSlice<f32>,
        lse_c: CudaSlice<f32>,
    }

    /// A path: queues one forward pass on the buffers, writing `out`.
    type Path = fn(
        &CudaStream,
        &PrefixAttention,
        &PrefixAttentionDims,
        &mut Buffers,
    ) -> peft_kernels::Result<()>;

    const PATHS: [(&str, Path); 3] = [("fused", fused), ("concat", concat), ("split", split)];

    fn fused(
        stream: &CudaStream,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) -> peft_kernels::Result<()> {
        cuda::prefix_attention::<bf16>(stream, op, dims, b.t.args(None))
    }

    fn concat(
        stream: &CudaStream,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) -> peft_kernels::Result<()> {
        let (l, len) = (dims.prefix_len, dims.kv_len);
        let cat = KvConcatDims::new(BATCH, HEADS, l, len, HEAD_DIM);
        for (prefix, src, dst) in [
            (&b.t.prefix_k, &b.t.k, &mut b.cat_k),
            (&b.t.prefix_v, &b.t.v, &mut b.cat_v),
        ] {
            let args = KvConcatArgs::<DeviceRead<bf16>, DeviceWrite<bf16>> { prefix, src, dst };
            cuda::kv_concat::<bf16>(stream, &cat, args)?;
        }
        // Causal masking is bottom-right aligned, so over the l + L keys query i still
        // sees the whole prefix and the context up to its own position.
        let whole = PrefixAttentionDims::new(BATCH, HEADS, HEADS, dims.q_len, l + len, 0, HEAD_DIM);
        // No prefix: the prefix tensors are not read.
        let none: &CudaSlice<bf16> = &b.t.prefix_k;
        cuda::prefix_attention::<bf16>(
            stream,
            op,
            &whole,
            PrefixAttentionArgs {
                q: &b.t.q,
                k: &b.cat_k,
                v: &b.cat_v,
                prefix_k: none,
                prefix_v: none,
                context_lens: None,
                out: &mut b.t.out,
                lse: None,
                lambda: None,
                workspace: None,
            },
        )
    }

    fn split(
        stream: &CudaStream,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) -> peft_kernels::Result<()> {
        cuda::prefix_only_attention::<bf16>(
            stream,
            op,
            dims,
            PrefixOnlyArgs {
                q: &b.t.q,
                prefix_k: &b.t.prefix_k,
                prefix_v: &b.t.prefix_v,
                out: &mut b.out_p,
                lse: &mut b.lse_p,
            },
        )?;
        let context = PrefixAttentionDims {
            prefix_len: 0,
            ..*dims
        };
        cuda::prefix_attention::<bf16>(
            stream,
            op,
            &context,
            PrefixAttentionArgs {
                q: &b.t.q,
                k: &b.t.k,
                v: &b.t.v,
                prefix_k: &b.t.prefix_k,
                prefix_v: &b.t.prefix_v,
                context_lens: None,
                out: &mut b.out_c,
                lse: Some(&mut b.lse_c as DeviceWrite<f32>),
                lambda: None,
                workspace: None,
            },
        )?;
        cuda::lse_merge::<bf16>(
            stream,
            &LseMergeDims::new(BATCH, HEADS, dims.q_len, HEAD_DIM),
            LseMergeArgs {
                o_prefix: &b.out_p,
                lse_prefix: &b.lse_p,
                o_context: &b.out_c,
                lse_context: &b.lse_c,
                out: &mut b.t.out,
                lse: None,
                lambda: None,
            },
        )
    }

    /// One shape (L, l) with its rotating buffer copies; causal and full share them.
    struct Case {
        dims: PrefixAttentionDims,
        copies: Rotation<Buffers>,
    }

    impl Case {
        fn new(stream: &Arc<CudaStream>, len: usize, l: usize) -> Case {
            let dims = PrefixAttentionDims::new(BATCH, HEADS, HEADS, len, len, l, HEAD_DIM);
            let n = BATCH * HEADS * len * HEAD_DIM;
            let np = BATCH * HEADS * l * HEAD_DIM;
            let rows = dims.rows();
            // Uniform in [-1, 1): scores q·k/√d of a few tenths, an ordinary softmax.
            let [q, k, v, prefix_k, prefix_v] =
                [(n, 1), (n, 2), (n, 3), (np, 4), (np, 5)].map(|(n, seed)| random(n, 1.0, seed));
            let zeros = |n: usize| stream.alloc_zeros::<bf16>(n).expect("device allocation");
            let stats = || stream.alloc_zeros::<f32>(rows).expect("device allocation");
            let copies = Rotation::new(min_bytes(len, l), || Buffers {
                t: Tensors::upload(stream, [&q, &k, &v, &prefix_k, &prefix_v], n),
                cat_k: zeros(n + np),
                cat_v: zeros(n + np),
                out_p: zeros(n),
                out_c: zeros(n),
                lse_p: stats(),
                lse_c: stats(),
            });
            Case { dims, copies }
        }

        /// Runs every path on the first copy, each into a NaN-poisoned output; an error
        /// unless the fused and split outputs agree with the concat path's (timing a wrong
        /// kernel is worse than not timing it).
        fn check(&mut self, stream: &Arc<CudaStream>, op: &PrefixAttention) -> Result<(), String> {
            let (dims, name) = (self.dims, case_name(&self.dims, op));
            let first = self.copies.first();
            let mut output = |(path_name, path): (&str, Path)| {
                poison(stream, &mut first.t.out);
                path(stream, op, &dims, first)
                    .map_err(|e| format!("the {path_name} path failed: {e}"))?;
                Ok::<_, String>(stream.clone_dtoh(&first.t.out).expect("copy to the host"))
            };
            let [fused, concat, split] = PATHS;
            let (fused, concat, split) = (output(fused)?, output(concat)?, output(split)?);
            agree(&name, "fused and concat", &fused, &concat)?;
            agree(&name, "split and concat", &split, &concat)
        }

        fn run(&mut self, stream: &CudaStream, op: &PrefixAttention, (name, path): (&str, Path)) {
            path(stream, op, &self.dims, self.copies.next_copy()).expect(name);
        }
    }

    fn mask(op: &PrefixAttention) -> &'static str {
        if op.causal {
            "causal"
        } else {
            "full"
        }
    }

    fn case_name(dims: &PrefixAttentionDims, op: &PrefixAttention) -> String {
        format!("L{}/l{}/{}", dims.q_len, dims.prefix_len, mask(op))
    }

    /// 4·d FLOPs (two multiply-adds for S = QKᵀ and for P·V) per visible (query, key)
    /// pair: every query sees the l prefix keys, and all L context keys or, causal, the
    /// ones up to its own position (BENCHMARKS.md).
    fn flops(len: usize, l: usize, causal: bool) -> u64 {
        let context_pairs = if causal {
            len * (len + 1) / 2
        } else {
            len * len
        };
        (4 * HEAD_DIM * BATCH * HEADS * (len * l + context_pairs)) as u64
    }

    /// The least traffic of a call (BENCHMARKS.md): Q, K, V and the prefix keys and values
    /// read once, the output written once.
    fn min_bytes(len: usize, l: usize) -> usize {
        let elements = 4 * BATCH * HEADS * len * HEAD_DIM + 2 * BATCH * HEADS * l * HEAD_DIM;
        elements * std::mem::size_of::<bf16>()
    }

    /// The decode shape: B = 1, Hq over Hkv (grouped-query attention), one query, l prefix
    /// vectors.
    const DECODE_HEADS: usize = 32;
    const DECODE_KV_HEADS: usize = 8;
    const DECODE_PREFIX: usize = 30;
    /// The split targets the decode table times besides the default (its headers name them).
    const SWEPT_TARGETS: [usize; 4] = [16, 32, 64, 256];

    /// The tensors of one decode step, and the split-KV workspace.
    struct DecodeBuffers {
        t: Tensors,
        workspace: CudaSlice<f32>,
    }

    /// One decode step against `len` cached keys, with its rotating buffer copies.
    struct DecodeCase {
        dims: PrefixAttentionDims,
        copies: Rotation<DecodeBuffers>,
    }

    impl DecodeCase {
        const OP: PrefixAttention = PrefixAttention {
            scale: None,
            causal: true,
        };

        fn new(stream: &Arc<CudaStream>, len: usize) -> DecodeCase {
            let (hq, hkv, l) = (DECODE_HEADS, DECODE_KV_HEADS, DECODE_PREFIX);
            let dims = PrefixAttentionDims::new(1, hq, hkv, 1, len, l, HEAD_DIM);
            let host = |n, seed| random(n, 1.0, seed);
            let (q, out) = (host(hq * HEAD_DIM, 11), hq * HEAD_DIM);
            let [k, v] = [12, 13].map(|seed| host(hkv * len * HEAD_DIM, seed));
            let [pk, pv] = [14, 15].map(|seed| host(hkv * l * HEAD_DIM, seed));
            // Room for the largest split target swept (the workspace grows with it).
            let largest = SWEPT_TARGETS.into_iter().max().unwrap_or(0);
            let workspace = PrefixAttentionDims {
                split_target: largest.max(DEFAULT_SPLIT_TARGET),
                ..dims
            }
            .workspace_len(DType::BF16)
            .max(1);
            let copies = Rotation::new(decode_bytes(&dims), || DecodeBuffers {
                t: Tensors::upload(stream, [&q, &k, &v, &pk, &pv], out),
                workspace: stream.alloc_zeros(workspace).expect("device allocation"),
            });
            DecodeCase { dims, copies }
        }

        /// One step on `b`, with the split-KV workspace or in one pass.
        fn step(
            stream: &CudaStream,
            dims: &PrefixAttentionDims,
            b: &mut DecodeBuffers,
            split: bool,
        ) -> peft_kernels::Result<()> {
            let workspace = split.then_some(&mut b.workspace as DeviceWrite<f32>);
            cuda::prefix_attention::<bf16>(stream, &Self::OP, dims, b.t.args(workspace))
        }

        fn run(&mut self, stream: &CudaStream, split: bool) {
            self.run_with(stream, self.dims, split);
        }

        /// [`DecodeCase::run`] for `dims` (another split target than the case's).
        fn run_with(&mut self, stream: &CudaStream, dims: PrefixAttentionDims, split: bool) {
            Self::step(stream, &dims, self.copies.next_copy(), split).expect("decode step");
        }

        /// Split (for `dims`) and in one pass on the first copy, each into a NaN-poisoned
        /// output: an error unless they agree.
        fn check(
            &mut self,
            stream: &Arc<CudaStream>,
            dims: PrefixAttentionDims,
        ) -> Result<(), String> {
            let name = format!("decode L{} split target {}", dims.kv_len, dims.split_target);
            let first = self.copies.first();
            let mut output = |split| {
                poison(stream, &mut first.t.out);
                Self::step(stream, &dims, first, split)
                    .map_err(|e| format!("the fused kernel (split {split}) failed: {e}"))?;
                Ok::<_, String>(stream.clone_dtoh(&first.t.out).expect("copy to the host"))
            };
            let (split, whole) = (output(true)?, output(false)?);
            agree(&name, "split-KV and one pass", &split, &whole)
        }
    }

    /// A decode step's least traffic: q, the cached K and V, the prefix, the output once.
    fn decode_bytes(d: &PrefixAttentionDims) -> usize {
        let kv = 2 * d.kv_heads * (d.kv_len + d.prefix_len) * d.head_dim;
        (2 * d.heads * d.head_dim + kv) * std::mem::size_of::<bf16>()
    }

    /// Its FLOPs: 4·d per (query head, key) pair, every key visible to the one query.
    fn decode_flops(d: &PrefixAttentionDims) -> f64 {
        (4 * d.head_dim * d.heads * (d.kv_len + d.prefix_len)) as f64
    }

    /// The decode cases: criterion and the second summary table.
    fn decode(gpu: &Gpu, criterion: &mut criterion::Criterion) -> Table {
        let stream = &gpu.stream;
        let mut table = Table::new(
            format!(
                "prefix_attention decode, bf16, B = 1, Hq = {DECODE_HEADS}, Hkv = \
                 {DECODE_KV_HEADS}, d = {HEAD_DIM}, l = {DECODE_PREFIX}, one query, causal: \
                 split-KV (split target {DEFAULT_SPLIT_TARGET}) vs one pass and other targets"
            ),
            &[("L", "--:")],
            &[
                "split-KV µs",
                "one pass µs",
                "16 µs",
                "32 µs",
                "64 µs",
                "256 µs",
            ],
            &[
                "one pass / split-KV",
                "16 / split-KV",
                "32 / split-KV",
                "64 / split-KV",
                "256 / split-KV",
            ],
        );
        for len in [4096, 32768] {
            let mut case = DecodeCase::new(stream, len);
            let keys = vec![len.to_string()];
            let swept = SWEPT_TARGETS.map(|split_target| PrefixAttentionDims {
                split_target,
                ..case.dims
            });
            let checked = [case.dims]
                .iter()
                .chain(&swept)
                .try_for_each(|&dims| case.check(stream, dims));
            if let Err(e) = checked {
                table.failed(format!("decode L{len}"), keys, e);
                continue;
            }
            let name = format!(
                "prefix_attention decode bf16 Hq={DECODE_HEADS} Hkv={DECODE_KV_HEADS} \
                 d={HEAD_DIM} L={len} l={DECODE_PREFIX}"
            );
            let mut group = criterion.benchmark_group(name);
            group.throughput(Throughput::Bytes(decode_bytes(&case.dims) as u64));
            for (path, split) in [("split_kv", true), ("one_pass", false)] {
                group.bench_function(BenchmarkId::from_parameter(path), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.run(stream, split)))
                });
            }
            group.finish();
            if gpu.measuring {
                let mut seconds: Vec<f64> = [true, false]
                    .iter()
                    .map(|&split| gpu.per_call(|| case.run(stream, split)))
                    .collect();
                for dims in swept {
                    seconds.push(gpu.per_call(|| case.run_with(stream, dims, true)));
                }
                let (bytes, flops) = (decode_bytes(&case.dims), decode_flops(&case.dims));
                table.timed(keys, seconds, bytes as f64, flops);
            }
        }
        table
    }

    pub fn main() {
        let gpu = Gpu::new();
        let stream = &gpu.stream;
        let mut criterion = criterion();
        let mut table = Table::new(
            format!(
                "prefix_attention, bf16, B = {BATCH}, H = {HEADS}, d = {HEAD_DIM}: fused vs \
                 concat + attention and split (prefix-only + context + LSE merge), all ours"
            ),
            &[("L", "--:"), ("prefix", "--:"), ("mask", "---")],
            &["fused µs", "concat µs", "split µs"],
            &["concat / fused", "split / fused"],
        );
        for len in [512, 2048] {
            for l in [30, 128] {
                let mut case = Case::new(stream, len, l);
                for causal in [false, true] {
                    let op = PrefixAttention {
                        scale: None,
                        causal,
                    };
                    let keys = vec![len.to_string(), l.to_string(), mask(&op).to_owned()];
                    if let Err(e) = case.check(stream, &op) {
                        table.failed(case_name(&case.dims, &op), keys, e);
                        continue;
                    }
                    let name = format!(
                        "prefix_attention bf16 B={BATCH} H={HEADS} d={HEAD_DIM} L={len} l={l} {} \
                         (elem/s = FLOP/s)",
                        mask(&op)
                    );
                    let mut group = criterion.benchmark_group(name);
                    group.throughput(Throughput::Elements(flops(len, l, causal)));
                    for path in PATHS {
                        group.bench_function(BenchmarkId::from_parameter(path.0), |b| {
                            b.iter_custom(|iters| gpu.timed(iters, || case.run(stream, &op, path)))
                        });
                    }
                    group.finish();
                    if gpu.measuring {
                        let seconds = PATHS
                            .iter()
                            .map(|&path| gpu.per_call(|| case.run(stream, &op, path)))
                            .collect();
                        let (bytes, flops) = (min_bytes(len, l), flops(len, l, causal));
                        table.timed(keys, seconds, bytes as f64, flops as f64);
                    }
                }
            }
        }
        let decode = decode(&gpu, &mut criterion);
        gpu.finish("prefix_attention", criterion, &[&table, &decode]);
    }
}
