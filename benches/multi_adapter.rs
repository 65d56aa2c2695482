//! Multi-adapter batches (#17): `cuda::multi_delta_linear` against the Punica-style unfused
//! sequence (`Baseline::multi_delta_linear`: cuBLAS frozen GEMM, then a shrink GEMM and an
//! expand-add GEMM per adapter group) and against this crate's single-adapter fused kernel
//! (`cuda::delta_linear`, LoRA r = 16) at the same M: the cost of mixing.
//!
//! bf16, K = N = 4096, M ∈ {1, 8, 32, 64, 256, 2048} rows spread over {1, 4, 16, 64}
//! adapters (as many as there are rows at most), LoRA with ranks drawn from {8, 16, 32, 64}
//! (α = 2r), rows in contiguous groups, one group per adapter. The fused call runs with
//! per-row ids and with segments (the same rows). Operands rotate over copies larger than
//! L2 (benches/common). The summary's time columns: fused (ids), fused (segments), unfused,
//! single adapter; then each over the fused time.
//!
//! Without the `baseline` feature or a CUDA device it prints why it skips and exits.

mod common;

fn main() {
    if common::can_run("multi_adapter") {
        #[cfg(feature = "baseline")]
        gpu::main();
    }
}

#[cfg(feature = "baseline")]
mod gpu {
    use criterion::BenchmarkId;
    use half::bf16;
    use peft_kernels::cuda::cudarc::driver::CudaSlice;
    use peft_kernels::cuda::{self, DeviceAdapterSet, DeviceDeltaLinearArgs};
    use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
    use peft_kernels::multi_adapter::{
        Adapter, AdapterBatch, MultiDeltaDims, MultiDeltaLinearArgs,
    };

    use super::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const N: usize = 4096;
    const K: usize = 4096;
    const MS: [usize; 6] = [1, 8, 32, 64, 256, 2048];
    const ADAPTERS: [usize; 4] = [1, 4, 16, 64];
    const RANKS: [usize; 4] = [8, 16, 32, 64];
    /// The single-adapter comparison's rank.
    const SINGLE_RANK: usize = 16;

    /// One rotation copy: the layer's operands and the single adapter's.
    struct Operands {
        x: CudaSlice<bf16>,
        w: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
        w_down: CudaSlice<bf16>,
        w_up: CudaSlice<bf16>,
    }

    /// Adapter i's rank: the ranks drawn in turn from a fixed shuffle.
    fn rank(i: usize) -> usize {
        RANKS[(i * 7 + i / 4) % RANKS.len()]
    }

    pub fn main() {
        let gpu = Gpu::new();
        let stream = &gpu.stream;
        let mut criterion = criterion();
        let mut table = Table::new(
            "Multi-adapter batches, bf16, K = N = 4096 (LoRA ranks from {8, 16, 32, 64})".into(),
            &[("M", "--:"), ("adapters", "--:")],
            &[
                "fused µs",
                "fused segments µs",
                "unfused µs",
                "single adapter µs",
            ],
            &["segments / fused", "unfused / fused", "single / fused"],
        );
        let mut set = DeviceAdapterSet::<bf16>::new(stream, N, K, 64, 64).expect("adapter set");
        for i in 0..64 {
            let r = rank(i);
            let up = |v: Vec<bf16>| stream.clone_htod(&v).expect("copy to the device");
            set.insert(Adapter {
                op: DeltaLinear::lora(2.0 * r as f32),
                w_down: up(random(r * K, 1.0 / (K as f64).sqrt(), 10 + i as u64)),
                b_down: None,
                w_up: up(random(N * r, 1.0 / (r as f64).sqrt(), 100 + i as u64)),
                b_up: None,
            })
            .expect("insert");
        }
        let mut group = criterion.benchmark_group("multi_adapter");
        for m in MS {
            let bytes_of = |len: usize| len * 2;
            let mut ops = Rotation::new(bytes_of(N * K + 2 * m * K), || Operands {
                x: stream.clone_htod(&random(m * K, 1.0, 1)).expect("copy"),
                w: stream
                    .clone_htod(&random(N * K, 1.0 / 64.0, 2))
                    .expect("copy"),
                y: stream.alloc_zeros(m * N).expect("alloc"),
                w_down: stream
                    .clone_htod(&random(SINGLE_RANK * K, 1.0 / 64.0, 3))
                    .expect("copy"),
                w_up: stream
                    .clone_htod(&random(N * SINGLE_RANK, 0.25, 4))
                    .expect("copy"),
            });
            let dims = MultiDeltaDims::new(m, N, K);
            let mut ws = stream
                .alloc_zeros::<bf16>(dims.workspace_len(64))
                .expect("alloc");
            let single = DeltaLinearDims::new(m, N, K, SINGLE_RANK);
            let mut single_ws = stream
                .alloc_zeros::<bf16>(single.workspace_len())
                .expect("alloc");
            for a in ADAPTERS.into_iter().filter(|&a| a <= m) {
                let case = format!("m{m}_a{a}");
                // Contiguous groups of near-equal size, adapter g for group g.
                let starts: Vec<i32> = (0..=a).map(|g| (g * m / a) as i32).collect();
                let seg_ids: Vec<i32> = (0..a as i32).collect();
                let rows: Vec<i32> = (0..m)
                    .map(|i| seg_ids[starts.partition_point(|&s| s as usize <= i) - 1])
                    .collect();
                let d_rows = stream.clone_htod(&rows).expect("copy");
                let d_starts = stream.clone_htod(&starts).expect("copy");
                let d_ids = stream.clone_htod(&seg_ids).expect("copy");
                let fused = |o: &mut Operands, ws: &mut CudaSlice<bf16>, segments: bool| {
                    let batch = if segments {
                        AdapterBatch::Segments {
                            starts: &d_starts as _,
                            ids: &d_ids as _,
                        }
                    } else {
                        AdapterBatch::Rows(&d_rows as _)
                    };
                    cuda::multi_delta_linear(
                        stream,
                        &dims,
                        &set,
                        MultiDeltaLinearArgs {
                            x: &o.x,
                            w: &o.w,
                            bias: None,
                            batch,
                            status: None,
                            workspace: ws,
                            y: &mut o.y,
                        },
                    )
                    .expect("fused call")
                };
                let unfused = |o: &mut Operands, ws: &mut CudaSlice<bf16>| {
                    gpu.baseline
                        .multi_delta_linear(
                            &dims,
                            &set,
                            (&starts, &seg_ids),
                            MultiDeltaLinearArgs {
                                x: &o.x,
                                w: &o.w,
                                bias: None,
                                batch: AdapterBatch::Segments {
                                    starts: &d_starts,
                                    ids: &d_ids,
                                },
                                status: None,
                                workspace: ws,
                                y: &mut o.y,
                            },
                        )
                        .expect("unfused call")
                };
                let single_call = |o: &mut Operands, ws: &mut CudaSlice<bf16>| {
                    let args: DeviceDeltaLinearArgs<bf16> = DeltaLinearArgs {
                        x: &o.x,
                        w: &o.w,
                        bias: None,
                        u: None,
                        w_down: &o.w_down,
                        b_down: None,
                        w_up: &o.w_up,
                        b_up: None,
                        gate: None,
                        workspace: ws,
                        y: &mut o.y,
                    };
                    cuda::delta_linear(stream, &DeltaLinear::lora(32.0), &single, args)
                        .expect("single-adapter call")
                };
                // The gate: ids, segments and the unfused sequence agree.
                let o = ops.first();
                let mut outputs = Vec::new();
                for path in 0..3 {
                    poison(stream, &mut o.y);
                    match path {
                        0 => fused(o, &mut ws, false),
                        1 => fused(o, &mut ws, true),
                        _ => unfused(o, &mut ws),
                    }
                    outputs.push(stream.clone_dtoh(&o.y).expect("copy back"));
                }
                let checked = agree(&case, "fused and unfused", &outputs[0], &outputs[2])
                    .and_then(|()| agree(&case, "ids and segments", &outputs[0], &outputs[1]));
                let keys = vec![m.to_string(), a.to_string()];
                if let Err(e) = checked {
                    table.failed(case, keys, e);
                    continue;
                }
                group.bench_function(BenchmarkId::new("fused", &case), |b| {
                    b.iter_custom(|iters| {
                        gpu.timed(iters, || fused(ops.next_copy(), &mut ws, false))
                    })
                });
                group.bench_function(BenchmarkId::new("unfused_punica_style", &case), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || unfused(ops.next_copy(), &mut ws)))
                });
                if gpu.measuring {
                    let times = vec![
                        gpu.per_call(|| fused(ops.next_copy(), &mut ws, false)),
                        gpu.per_call(|| fused(ops.next_copy(), &mut ws, true)),
                        gpu.per_call(|| unfused(ops.next_copy(), &mut ws)),
                        gpu.per_call(|| single_call(ops.next_copy(), &mut single_ws)),
                    ];
                    let used: usize = (0..a).map(rank).sum();
                    let bytes = bytes_of(N * K + m * (K + N) + used * (K + N)) as f64;
                    let flops = (2 * m * N * K) as f64
                        + (0..a)
                            .map(|g| {
                                2.0 * ((starts[g + 1] - starts[g]) as usize * rank(g) * (K + N))
                                    as f64
                            })
                            .sum::<f64>();
                    table.timed(keys, times, bytes, flops);
                }
            }
        }
        group.finish();
        gpu.finish("multi_adapter", criterion, &[&table]);
    }
}
