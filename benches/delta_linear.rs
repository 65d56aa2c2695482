//! The fused delta-linear kernels against the unfused cuBLAS sequence a user would otherwise
//! write (`peft_kernels::cuda::baseline`) and against the GPU's physical floor, all measured in
//! the same run, in bf16 at K = N = 4096 for M ∈ {1, 16, 128, 4096}:
//!
//! - LoRA, r = 16 (`s = 32 / 16`): the frozen GEMM plus a thin delta;
//! - the MAM adapter's scaled parallel adapter, r = 512, ReLU, s = 4: a delta of r / K = 1/8
//!   of the frozen GEMM.
//!
//! criterion times both implementations of each case (host clock around many queued
//! iterations, stream synchronized at both ends, so launch overhead counts as a user sees
//! it). Every iteration works on the next of several copies of the operands, together larger
//! than the L2 cache, so the weights come from HBM as they do in a model whose every layer
//! has its own. Before timing, each case checks that the fused and unfused outputs agree.
//!
//! After criterion's report, a summary table: per case the fused and unfused time (CUDA
//! events, median of batches), the speedup, and the fused kernel's achieved bandwidth
//! (bytes = the minimum traffic: W, W_down, W_up, x and y once each) and tensor rate
//! (2·M·N·K + 2·M·r·(K + N) flops), each against the floor measured here: HBM bandwidth by
//! a device-to-device copy of 1 GiB, tensor-core rate by a cuBLAS bf16 GEMM of 8192³. The
//! floor time is max(bytes / bandwidth, flops / rate). The table also goes, as markdown, to
//! the file `$PEFT_BENCH_OUT` (scripts/gpu-check.sh collects it), by default to
//! `peft-summary-delta_linear.md` in criterion's folder (`target/criterion`).
//!
//! Without the `cuda` feature or a CUDA device it prints why it skips and exits.

fn main() {
    #[cfg(feature = "cuda")]
    if peft_kernels::cuda::is_available() {
        gpu::main();
    } else {
        println!("delta_linear benches skipped: no CUDA device (or no driver) on this machine");
    }
    #[cfg(not(feature = "cuda"))]
    println!(
        "delta_linear benches skipped: built without the `cuda` feature \
         (run `cargo bench --features cuda --bench delta_linear` on a CUDA machine)"
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::fmt::Write as _;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion, Throughput};
    use half::bf16;
    use peft_kernels::cuda::baseline::Baseline;
    use peft_kernels::cuda::cudarc::driver::sys::CUevent_flags;
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::cuda::{self, DeviceRead, DeviceWrite};
    use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
    use peft_kernels::validate::{compare, default_tolerance};
    use peft_kernels::{Activation, DType, MatrixLayout};

    const K: usize = 4096;
    const N: usize = 4096;
    const ROWS: [usize; 4] = [1, 16, 128, 4096];
    /// The operand copies of a case together exceed this, four times H100's 50 MiB of L2.
    const ROTATION_BYTES: usize = 200 << 20;
    /// Batches of the summary's event timing; the median is reported.
    const BATCHES: usize = 11;
    /// A summary batch runs at least this long.
    const BATCH_SECONDS: f64 = 2e-3;

    /// A method of the unified view at the benchmarked layer.
    struct Method {
        name: &'static str,
        op: DeltaLinear,
        r: usize,
    }

    fn methods() -> [Method; 2] {
        [
            Method {
                name: "lora_r16",
                op: DeltaLinear::lora(32.0, 16),
                r: 16,
            },
            Method {
                name: "scaled_pa_r512",
                op: DeltaLinear::parallel_adapter(Activation::Relu, 4.0),
                r: 512,
            },
        ]
    }

    /// SplitMix64 uniform values in [-scale, scale): the inputs only need to be realistic
    /// (random bits keep the tensor cores' power draw honest), not fresh.
    fn random(n: usize, scale: f64, seed: u64) -> Vec<bf16> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let unit = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
                bf16::from_f64(scale * (2.0 * unit - 1.0))
            })
            .collect()
    }

    /// One copy of a case's operands on the device.
    struct Operands {
        x: CudaSlice<bf16>,
        w: CudaSlice<bf16>,
        w_down: CudaSlice<bf16>,
        w_up: CudaSlice<bf16>,
        workspace: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
    }

    impl Operands {
        fn args(&mut self) -> DeltaLinearArgs<DeviceRead<'_, bf16>, DeviceWrite<'_, bf16>> {
            DeltaLinearArgs {
                x: &self.x,
                w: &self.w,
                bias: None,
                u: None,
                w_down: &self.w_down,
                b_down: None,
                w_up: &self.w_up,
                b_up: None,
                gate: None,
                workspace: &mut self.workspace,
                y: &mut self.y,
            }
        }
    }

    /// One benchmarked problem: a method at M rows, with its rotating operand copies.
    struct Case<'m> {
        method: &'m Method,
        dims: DeltaLinearDims,
        copies: Vec<Operands>,
        next: usize,
    }

    impl<'m> Case<'m> {
        fn new(stream: &Arc<CudaStream>, method: &'m Method, m: usize, w: &[bf16]) -> Case<'m> {
            let r = method.r;
            let dims = DeltaLinearDims::new(m, N, K, r);
            let x = random(m * K, 1.0, 1);
            let w_down = random(r * K, 1.0 / (K as f64).sqrt(), 2);
            let w_up = random(N * r, 1.0 / (r as f64).sqrt(), 3);
            let copies = ROTATION_BYTES.div_ceil(min_bytes(&dims)).max(2);
            let up = |v: &[bf16]| stream.clone_htod(v).expect("copy to the device");
            let zeros = |n| stream.alloc_zeros::<bf16>(n).expect("device allocation");
            let copies = (0..copies)
                .map(|_| Operands {
                    x: up(&x),
                    w: up(w),
                    w_down: up(&w_down),
                    w_up: up(&w_up),
                    workspace: zeros(DeltaLinear::workspace_len(m, r)),
                    y: zeros(m * N),
                })
                .collect();
            Case {
                method,
                dims,
                copies,
                next: 0,
            }
        }

        fn name(&self) -> String {
            format!("{}/m{}", self.method.name, self.dims.m)
        }

        /// The next operand copy.
        fn operands(&mut self) -> &mut Operands {
            self.next = (self.next + 1) % self.copies.len();
            &mut self.copies[self.next]
        }

        fn fused(&mut self, stream: &CudaStream) {
            let (op, dims) = (self.method.op, self.dims);
            cuda::delta_linear(stream, &op, &dims, self.operands().args())
                .expect("fused delta_linear");
        }

        fn unfused(&mut self, baseline: &Baseline) {
            let (op, dims) = (self.method.op, self.dims);
            baseline
                .delta_linear(&op, &dims, self.operands().args())
                .expect("cuBLAS baseline");
        }

        /// Runs both on the first copy; an error unless both succeed and their outputs agree
        /// (timing a wrong kernel is worse than not timing it).
        fn check(&mut self, stream: &Arc<CudaStream>, baseline: &Baseline) -> Result<(), String> {
            let (op, dims) = (self.method.op, self.dims);
            let first = &mut self.copies[0];
            let failed = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
            baseline
                .delta_linear(&op, &dims, first.args())
                .map_err(|e| failed("the cuBLAS baseline failed", &e))?;
            let unfused = stream.clone_dtoh(&first.y).expect("copy to the host");
            cuda::delta_linear(stream, &op, &dims, first.args())
                .map_err(|e| failed("the fused kernel failed", &e))?;
            let fused = stream.clone_dtoh(&first.y).expect("copy to the host");
            let reference: Vec<f64> = unfused.iter().map(|v| v.to_f64()).collect();
            // Both round t and y to bf16 on different paths: twice one kernel's tolerance.
            let tol = 2.0 * default_tolerance(DType::BF16);
            let c = compare(&self.name(), &fused, &reference, tol).expect("same lengths");
            if c.passed() {
                Ok(())
            } else {
                Err(failed("fused and unfused outputs differ", &c))
            }
        }
    }

    /// The least traffic a delta-linear call needs: every operand read and y written once.
    fn min_bytes(d: &DeltaLinearDims) -> usize {
        let elements = d.n * d.k + d.r * d.k + d.n * d.r + d.m * d.k + d.m * d.n;
        elements * std::mem::size_of::<bf16>()
    }

    /// The multiply-adds of the frozen GEMM and the two delta GEMMs, as flops.
    fn flops(d: &DeltaLinearDims) -> f64 {
        2.0 * (d.m * d.n * d.k + d.m * d.r * (d.k + d.n)) as f64
    }

    /// Seconds per call of `run`, by CUDA events around batches of calls long enough to
    /// dwarf the events' resolution: the median of [`BATCHES`] batches.
    fn per_call(stream: &Arc<CudaStream>, mut run: impl FnMut()) -> f64 {
        let ctx = stream.context();
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .expect("event")
        };
        let (start, end) = (event(), event());
        let mut batch = |calls: usize| {
            start.record(stream).expect("event record");
            for _ in 0..calls {
                run();
            }
            end.record(stream).expect("event record");
            f64::from(start.elapsed_ms(&end).expect("event timing")) * 1e-3
        };
        batch(1); // warm up: module loads, cuBLAS heuristics, clocks
        let mut calls = 1;
        while calls < 1 << 16 && batch(calls) < BATCH_SECONDS {
            calls *= 2;
        }
        let mut times: Vec<f64> = (0..BATCHES).map(|_| batch(calls) / calls as f64).collect();
        times.sort_by(f64::total_cmp);
        times[BATCHES / 2]
    }

    /// Host time of `iters` queued calls of `run`, for criterion's `iter_custom`.
    fn timed(stream: &CudaStream, iters: u64, mut run: impl FnMut()) -> Duration {
        stream.synchronize().expect("stream synchronize");
        let start = Instant::now();
        for _ in 0..iters {
            run();
        }
        stream.synchronize().expect("stream synchronize");
        start.elapsed()
    }

    /// What the hardware can do, measured: HBM bytes per second and bf16 tensor-core
    /// flops per second.
    struct Floor {
        bandwidth: f64,
        rate: f64,
    }

    impl Floor {
        fn measure(stream: &Arc<CudaStream>, baseline: &Baseline) -> Floor {
            // A device-to-device copy reads and writes every byte once.
            const COPY: usize = 1 << 30;
            let src = stream
                .alloc_zeros::<u8>(COPY)
                .expect("1 GiB device allocation");
            let mut dst = stream
                .alloc_zeros::<u8>(COPY)
                .expect("1 GiB device allocation");
            let copy = per_call(stream, || {
                stream.memcpy_dtod(&src, &mut dst).expect("memcpy")
            });
            drop((src, dst));

            const G: usize = 8192;
            let host = random(G * G, 1.0, 4);
            let a = stream.clone_htod(&host).expect("copy to the device");
            let b = stream.clone_htod(&host).expect("copy to the device");
            let mut c = stream
                .alloc_zeros::<bf16>(G * G)
                .expect("device allocation");
            let l = MatrixLayout::contiguous(G, G);
            let gemm = per_call(stream, || {
                baseline
                    .matmul_nt(1.0, &a, l, &b, l, 0.0, &mut c, l)
                    .expect("cuBLAS GEMM")
            });
            Floor {
                bandwidth: 2.0 * COPY as f64 / copy,
                rate: 2.0 * (G * G * G) as f64 / gemm,
            }
        }

        fn seconds(&self, d: &DeltaLinearDims) -> f64 {
            (min_bytes(d) as f64 / self.bandwidth).max(flops(d) / self.rate)
        }
    }

    /// One line of the summary: seconds per call of the fused and unfused implementations,
    /// or why the case was not timed.
    struct Row {
        case: String,
        dims: DeltaLinearDims,
        times: Result<(f64, f64), String>,
    }

    fn summary(device: &str, floor: &Floor, rows: &[Row]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## delta_linear, bf16, K = N = {K}: fused vs unfused cuBLAS on {device}\n\n\
             Floor measured in this run: HBM {:.0} GB/s (device-to-device copy of 1 GiB), \
             tensor cores {:.1} TFLOP/s (cuBLAS bf16 GEMM 8192³). GB/s and TFLOP/s are the \
             fused kernel's; % of floor = floor time / fused time, floor time = \
             max(bytes / HBM, flops / tensor rate).\n",
            floor.bandwidth * 1e-9,
            floor.rate * 1e-12
        );
        s.push_str(
            "| case | M | fused µs | unfused µs | speedup | GB/s | % BW | TFLOP/s | % peak \
             | floor µs | % of floor |\n",
        );
        s.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for r in rows {
            let (fused, unfused) = match &r.times {
                Ok(times) => *times,
                Err(e) => {
                    let first_line = e.lines().next().unwrap_or_default();
                    let _ = writeln!(s, "| {} | {} | not timed: {first_line} |", r.case, r.dims.m);
                    continue;
                }
            };
            let (bytes, flops) = (min_bytes(&r.dims) as f64, flops(&r.dims));
            let floor_s = floor.seconds(&r.dims);
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.2}x | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | \
                 {:.1} |",
                r.case,
                r.dims.m,
                fused * 1e6,
                unfused * 1e6,
                unfused / fused,
                bytes / fused * 1e-9,
                100.0 * bytes / fused / floor.bandwidth,
                flops / fused * 1e-12,
                100.0 * flops / fused / floor.rate,
                floor_s * 1e6,
                100.0 * floor_s / fused,
            );
        }
        s
    }

    /// `$PEFT_BENCH_OUT` (the file scripts/gpu-check.sh collects), else
    /// `peft-summary-delta_linear.md` in criterion's output folder.
    fn summary_path() -> PathBuf {
        if let Some(file) = std::env::var_os("PEFT_BENCH_OUT").filter(|v| !v.is_empty()) {
            return PathBuf::from(file);
        }
        let criterion = std::env::var_os("CRITERION_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
            })
            .unwrap_or_else(|| PathBuf::from("target/criterion"));
        criterion.join("peft-summary-delta_linear.md")
    }

    pub fn main() {
        let ctx = cuda::context(0).expect("CUDA device 0");
        // The default stream and no other: cudarc then records no events per buffer use,
        // so the timings hold only the work itself and its launches.
        let stream = ctx.default_stream();
        let baseline = Baseline::new(stream.clone()).unwrap_or_else(|e| {
            panic!("the benchmarks compare against cuBLAS, which failed to load: {e}")
        });
        let device = ctx
            .name()
            .unwrap_or_else(|_| "an unnamed CUDA device".into());
        // The summary is measured only when criterion measures: its rule is `--bench` (which
        // `cargo bench` passes) without `--test`, `--list` or `--profile-time`.
        let args: Vec<String> = std::env::args().collect();
        let flag = |f: &str| {
            args.iter()
                .any(|a| a == f || a.starts_with(&format!("{f}=")))
        };
        let measuring =
            flag("--bench") && !flag("--test") && !flag("--list") && !flag("--profile-time");

        let mut criterion = Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sample_size(30)
            .configure_from_args();
        let w = random(N * K, 1.0 / (K as f64).sqrt(), 0);
        let methods = methods();
        let (mut rows, mut failures) = (Vec::new(), Vec::new());
        for method in &methods {
            let mut group = criterion.benchmark_group(format!("delta_linear/{}", method.name));
            for m in ROWS {
                let mut case = Case::new(&stream, method, m, &w);
                if let Err(e) = case.check(&stream, &baseline) {
                    eprintln!("{}: not benchmarked: {e}", case.name());
                    failures.push(case.name());
                    let (case, dims) = (method.name.to_owned(), case.dims);
                    rows.push(Row {
                        case,
                        dims,
                        times: Err(e),
                    });
                    continue;
                }
                group.throughput(Throughput::Bytes(min_bytes(&case.dims) as u64));
                group.bench_function(BenchmarkId::new("fused", m), |b| {
                    b.iter_custom(|iters| timed(&stream, iters, || case.fused(&stream)))
                });
                group.bench_function(BenchmarkId::new("unfused_cublas", m), |b| {
                    b.iter_custom(|iters| timed(&stream, iters, || case.unfused(&baseline)))
                });
                if measuring {
                    let fused = per_call(&stream, || case.fused(&stream));
                    let unfused = per_call(&stream, || case.unfused(&baseline));
                    let (case, dims) = (method.name.to_owned(), case.dims);
                    rows.push(Row {
                        case,
                        dims,
                        times: Ok((fused, unfused)),
                    });
                }
            }
            group.finish();
        }
        criterion.final_summary();
        if measuring {
            let floor = Floor::measure(&stream, &baseline);
            let table = summary(&device, &floor, &rows);
            println!("\n{table}");
            let path = summary_path();
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&path, &table));
            match written {
                Ok(()) => println!("summary written to {}", path.display()),
                Err(e) => panic!("cannot write the summary to {}: {e}", path.display()),
            }
        }
        // After the other cases' numbers: a GPU machine is lent too rarely to lose them.
        if !failures.is_empty() {
            eprintln!(
                "delta_linear benches: wrong or failed cases: {}",
                failures.join(", ")
            );
            std::process::exit(1);
        }
    }
}
