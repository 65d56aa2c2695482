//! Prefix attention's backward on the GPU: our fused backward (one pass family over the
//! prefix and the context, kernels/prefix_attention_backward.cu) against the unfused path a
//! user has, with this crate's kernels so that only the fusion differs:
//!
//! - `fused`: `prefix_attention_backward` over the l prefix keys and the L context keys
//!   (the pre-pass, the key-tile kernel, the dq kernel), writing dq, dK, dV, dP_k, dP_v;
//! - `concat`: `[P_k; K]` and `[P_v; V]` materialised by `kv_concat` (as the forward's unfused
//!   path did), then the same backward with no prefix over l + L keys (dP_k, dP_v are the
//!   first l rows of its dK, dV).
//!
//! B = 8, H = 32, d = 128, l = 30, causal, bf16, L ∈ {512, 2048, 4096} queries and context
//! keys. PyTorch's SDPA backward on the concatenated K/V is the peer (benches/peers/peers.py,
//! `prefix_attention_backward`). Throughput in FLOP/s (criterion's "elem/s"): 10·d FLOPs per
//! visible (query, key) pair (five d-long products: q·k, dO·v, p·dO, ds·q, ds·k), the same
//! count for every path, whatever a path recomputes. Before timing, each case checks that
//! the two paths' dq and dP_v agree. The saved O and L come from our forward.
//!
//! After criterion's report, a summary table (benches/common): per case both paths' times
//! (CUDA events, median of batches), concat / fused, and the fused path's bandwidth and FLOP
//! rate against the floor measured in the same run.
//!
//! Without the `baseline` feature (`cuda` and the cuBLAS baseline the bench tools use) or a
//! CUDA device it prints why it skips and exits.

mod common;

fn main() {
    if common::can_run("prefix_attention_backward") {
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
        KvConcatArgs, KvConcatDims, PrefixAttention, PrefixAttentionArgs,
        PrefixAttentionBackwardArgs, PrefixAttentionBackwardDims, PrefixAttentionDims, PrefixGrad,
    };

    use crate::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const BATCH: usize = 8;
    const HEADS: usize = 32;
    const HEAD_DIM: usize = 128;
    const PREFIX: usize = 30;
    const OP: PrefixAttention = PrefixAttention {
        scale: None,
        causal: true,
    };

    /// Every buffer of one call of either path.
    struct Buffers {
        q: CudaSlice<bf16>,
        k: CudaSlice<bf16>,
        v: CudaSlice<bf16>,
        prefix_k: CudaSlice<bf16>,
        prefix_v: CudaSlice<bf16>,
        out: CudaSlice<bf16>,
        lse: CudaSlice<f32>,
        dout: CudaSlice<bf16>,
        dq: CudaSlice<bf16>,
        dk: CudaSlice<bf16>,
        dv: CudaSlice<bf16>,
        dprefix_k: CudaSlice<bf16>,
        dprefix_v: CudaSlice<bf16>,
        workspace: CudaSlice<f32>,
        // The concat path's keys, values and their gradients, [B, H, l + L, d].
        cat_k: CudaSlice<bf16>,
        cat_v: CudaSlice<bf16>,
        cat_dk: CudaSlice<bf16>,
        cat_dv: CudaSlice<bf16>,
    }

    /// A path: queues one backward on the buffers.
    type Path = fn(&CudaStream, &PrefixAttentionDims, &mut Buffers) -> peft_kernels::Result<()>;

    const PATHS: [(&str, Path); 2] = [("fused", fused), ("concat", concat)];

    fn fused(
        stream: &CudaStream,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) -> peft_kernels::Result<()> {
        let args = PrefixAttentionBackwardArgs::<
            DeviceRead<bf16>,
            DeviceWrite<bf16>,
            DeviceRead<u32>,
            DeviceRead<f32>,
            DeviceWrite<f32>,
        > {
            q: &b.q,
            k: &b.k,
            v: &b.v,
            prefix_k: &b.prefix_k,
            prefix_v: &b.prefix_v,
            context_lens: None,
            out: &b.out,
            lse: &b.lse,
            dout: &b.dout,
            dq: &mut b.dq,
            dk: &mut b.dk,
            dv: &mut b.dv,
            dprefix_k: PrefixGrad::Elem(&mut b.dprefix_k),
            dprefix_v: PrefixGrad::Elem(&mut b.dprefix_v),
            workspace: &mut b.workspace,
        };
        let dims = PrefixAttentionBackwardDims::new(*dims);
        cuda::prefix_attention_backward::<bf16>(stream, &OP, &dims, args)
    }

    fn concat(
        stream: &CudaStream,
        dims: &PrefixAttentionDims,
        b: &mut Buffers,
    ) -> peft_kernels::Result<()> {
        let (l, len) = (dims.prefix_len, dims.kv_len);
        let cat = KvConcatDims::new(BATCH, HEADS, l, len, HEAD_DIM);
        for (prefix, src, dst) in [
            (&b.prefix_k, &b.k, &mut b.cat_k),
            (&b.prefix_v, &b.v, &mut b.cat_v),
        ] {
            let args = KvConcatArgs::<DeviceRead<bf16>, DeviceWrite<bf16>> { prefix, src, dst };
            cuda::kv_concat::<bf16>(stream, &cat, args)?;
        }
        // Bottom-right aligned causal masking over l + L keys: every query still sees the
        // whole prefix.
        let whole = PrefixAttentionDims::new(BATCH, HEADS, HEADS, dims.q_len, l + len, 0, HEAD_DIM);
        let empty: &CudaSlice<bf16> = &b.prefix_k;
        let (ek, ev) = (&mut b.dprefix_k, &mut b.dprefix_v);
        let args = PrefixAttentionBackwardArgs::<
            DeviceRead<bf16>,
            DeviceWrite<bf16>,
            DeviceRead<u32>,
            DeviceRead<f32>,
            DeviceWrite<f32>,
        > {
            q: &b.q,
            k: &b.cat_k,
            v: &b.cat_v,
            prefix_k: empty,
            prefix_v: empty,
            context_lens: None,
            out: &b.out,
            lse: &b.lse,
            dout: &b.dout,
            dq: &mut b.dq,
            dk: &mut b.cat_dk,
            dv: &mut b.cat_dv,
            // No prefix: not written.
            dprefix_k: PrefixGrad::Elem(ek),
            dprefix_v: PrefixGrad::Elem(ev),
            workspace: &mut b.workspace,
        };
        let dims = PrefixAttentionBackwardDims::new(whole);
        cuda::prefix_attention_backward::<bf16>(stream, &OP, &dims, args)
    }

    /// One sequence length with its rotating buffer copies (O and L from our forward).
    struct Case {
        dims: PrefixAttentionDims,
        copies: Rotation<Buffers>,
    }

    impl Case {
        fn new(stream: &Arc<CudaStream>, len: usize) -> Case {
            let l = PREFIX;
            let dims = PrefixAttentionDims::new(BATCH, HEADS, HEADS, len, len, l, HEAD_DIM);
            let n = BATCH * HEADS * len * HEAD_DIM;
            let np = BATCH * HEADS * l * HEAD_DIM;
            let nc = n + np;
            let rows = dims.rows();
            let [q, k, v, prefix_k, prefix_v, dout] =
                [(n, 1), (n, 2), (n, 3), (np, 4), (np, 5), (n, 6)]
                    .map(|(n, seed)| random(n, 1.0, seed));
            let up = |h: &[bf16]| stream.clone_htod(h).expect("copy to the device");
            let zeros = |n: usize| stream.alloc_zeros::<bf16>(n).expect("device allocation");
            let copies = Rotation::new(min_bytes(len), || {
                let mut b = Buffers {
                    q: up(&q),
                    k: up(&k),
                    v: up(&v),
                    prefix_k: up(&prefix_k),
                    prefix_v: up(&prefix_v),
                    out: zeros(n),
                    lse: stream.alloc_zeros(rows).expect("device allocation"),
                    dout: up(&dout),
                    dq: zeros(n),
                    dk: zeros(n),
                    dv: zeros(n),
                    dprefix_k: zeros(np),
                    dprefix_v: zeros(np),
                    workspace: stream.alloc_zeros(rows).expect("device allocation"),
                    cat_k: zeros(nc),
                    cat_v: zeros(nc),
                    cat_dk: zeros(nc),
                    cat_dv: zeros(nc),
                };
                let args = PrefixAttentionArgs::<
                    DeviceRead<bf16>,
                    DeviceWrite<bf16>,
                    DeviceRead<u32>,
                    DeviceWrite<f32>,
                > {
                    q: &b.q,
                    k: &b.k,
                    v: &b.v,
                    prefix_k: &b.prefix_k,
                    prefix_v: &b.prefix_v,
                    context_lens: None,
                    out: &mut b.out,
                    lse: Some(&mut b.lse),
                    lambda: None,
                    workspace: None,
                };
                cuda::prefix_attention::<bf16>(stream, &OP, &dims, args).expect("the forward");
                b
            });
            Case { dims, copies }
        }

        /// Both paths on the first copy into NaN-poisoned gradients: an error unless their dq
        /// and dP_v (the concat path's first l rows of each head's dV) agree.
        fn check(&mut self, stream: &Arc<CudaStream>) -> Result<(), String> {
            let (dims, name) = (self.dims, format!("L{}", self.dims.q_len));
            let first = self.copies.first();
            poison(stream, &mut first.dq);
            poison(stream, &mut first.dprefix_v);
            fused(stream, &dims, first).map_err(|e| format!("the fused path failed: {e}"))?;
            let dq = stream.clone_dtoh(&first.dq).expect("copy to the host");
            let dpv = stream
                .clone_dtoh(&first.dprefix_v)
                .expect("copy to the host");
            poison(stream, &mut first.dq);
            poison(stream, &mut first.cat_dv);
            concat(stream, &dims, first).map_err(|e| format!("the concat path failed: {e}"))?;
            let cat_dq = stream.clone_dtoh(&first.dq).expect("copy to the host");
            let cat_dv = stream.clone_dtoh(&first.cat_dv).expect("copy to the host");
            let (l, total) = (dims.prefix_len, dims.prefix_len + dims.kv_len);
            let cat_dpv: Vec<bf16> = cat_dv
                .chunks_exact(total * HEAD_DIM)
                .flat_map(|head| head[..l * HEAD_DIM].iter().copied())
                .collect();
            agree(&name, "fused and concat dq", &dq, &cat_dq)?;
            agree(&name, "fused and concat dP_v", &dpv, &cat_dpv)
        }

        fn run(&mut self, stream: &CudaStream, (name, path): (&str, Path)) {
            path(stream, &self.dims, self.copies.next_copy()).expect(name);
        }
    }

    /// 10·d FLOPs per visible (query, key) pair: every query sees the l prefix keys and,
    /// causal, the context keys up to its own position.
    fn flops(len: usize) -> u64 {
        let pairs = len * PREFIX + len * (len + 1) / 2;
        (10 * HEAD_DIM * BATCH * HEADS * pairs) as u64
    }

    /// The least traffic: Q, K, V, O, dO and the prefix read once, dq, dK, dV and the
    /// prefix's gradients written once.
    fn min_bytes(len: usize) -> usize {
        let elements = 9 * BATCH * HEADS * len * HEAD_DIM + 4 * BATCH * HEADS * PREFIX * HEAD_DIM;
        elements * std::mem::size_of::<bf16>()
    }

    pub fn main() {
        let gpu = Gpu::new();
        let stream = &gpu.stream;
        let mut criterion = criterion();
        let mut table = Table::new(
            format!(
                "prefix_attention_backward, bf16, B = {BATCH}, H = {HEADS}, d = {HEAD_DIM}, \
                 l = {PREFIX}, causal: fused vs kv_concat + backward, all ours (SIMT kernels)"
            ),
            &[("L", "--:")],
            &["fused µs", "concat µs"],
            &["concat / fused"],
        );
        for len in [512, 2048, 4096] {
            let mut case = Case::new(stream, len);
            let keys = vec![len.to_string()];
            if let Err(e) = case.check(stream) {
                table.failed(format!("L{len}"), keys, e);
                continue;
            }
            let name = format!(
                "prefix_attention_backward bf16 B={BATCH} H={HEADS} d={HEAD_DIM} L={len} \
                 l={PREFIX} causal (elem/s = FLOP/s)"
            );
            let mut group = criterion.benchmark_group(name);
            group.throughput(Throughput::Elements(flops(len)));
            for path in PATHS {
                group.bench_function(BenchmarkId::from_parameter(path.0), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.run(stream, path)))
                });
            }
            group.finish();
            if gpu.measuring {
                let seconds = PATHS
                    .iter()
                    .map(|&path| gpu.per_call(|| case.run(stream, path)))
                    .collect();
                table.timed(keys, seconds, min_bytes(len) as f64, flops(len) as f64);
            }
        }
        gpu.finish("prefix_attention_backward", criterion, &[&table]);
    }
}
