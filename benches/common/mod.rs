//! What the benches share (each includes it with `mod common;`): the skip where there is
//! nothing to measure, and on the GPU the setup, the operand copies that keep L2 out of
//! the timings, the two clocks, the correctness gate's comparison, the physical floor
//! measured in the same run, and the summary table with the file it goes to.

/// Whether `bench` can measure here: built with the `baseline` feature (`cuda` and the
/// cuBLAS baseline) and a CUDA device
/// present. If not, prints the one line that says why it skips (scripts/gpu-check.sh
/// reports the bench's first line with "skipped" in it).
pub fn can_run(bench: &str) -> bool {
    #[cfg(feature = "baseline")]
    if peft_kernels::cuda::is_available() {
        return true;
    }
    if cfg!(feature = "baseline") {
        println!("{bench} benches skipped: no CUDA device (or no driver) on this machine");
    } else {
        println!(
            "{bench} benches skipped: built without the `baseline` feature \
             (run `cargo bench --features baseline --bench {bench}` on a CUDA machine)"
        );
    }
    false
}

#[cfg(feature = "baseline")]
pub mod gpu {
    use std::fmt::Write as _;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use criterion::Criterion;
    use half::bf16;
    use peft_kernels::cuda;
    use peft_kernels::cuda::baseline::Baseline;
    use peft_kernels::cuda::cudarc::driver::sys::CUevent_flags;
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::validate::{compare, default_tolerance};
    use peft_kernels::{DType, MatrixLayout};

    /// The operand copies of a case together exceed this, four times H100's 50 MiB of L2.
    const ROTATION_BYTES: usize = 200 << 20;
    /// Batches of the summary's event timing; the median is reported.
    const BATCHES: usize = 11;
    /// A summary batch runs at least this long.
    const BATCH_SECONDS: f64 = 2e-3;

    /// criterion as both benches configure it.
    pub fn criterion() -> Criterion {
        Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sample_size(30)
            .configure_from_args()
    }

    /// SplitMix64 uniform values in [-scale, scale): the inputs only need to be realistic
    /// (random bits keep the tensor cores' power draw honest), not fresh.
    pub fn random(n: usize, scale: f64, seed: u64) -> Vec<bf16> {
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

    /// Fills `buf` with NaN, so that the correctness gate fails on any element a path
    /// leaves unwritten instead of reading what an earlier path left there.
    pub fn poison(stream: &Arc<CudaStream>, buf: &mut CudaSlice<bf16>) {
        let nan = vec![bf16::NAN; buf.len()];
        stream.memcpy_htod(&nan, buf).expect("copy to the device");
    }

    /// `Ok` when two paths' outputs of case `case` agree (`paths`: "fused and unfused",
    /// say), else the comparison's report. Both round to bf16 on different paths: the
    /// bound is twice one bf16 kernel's tolerance on the relative error.
    pub fn agree(case: &str, paths: &str, got: &[bf16], expected: &[bf16]) -> Result<(), String> {
        let reference: Vec<f64> = expected.iter().map(|v| v.to_f64()).collect();
        let tol = 2.0 * default_tolerance(DType::BF16);
        let c = compare(case, got, &reference, tol).expect("same lengths");
        if c.passed() {
            Ok(())
        } else {
            Err(format!("{paths} outputs differ: {c}"))
        }
    }

    /// Copies of a case's operands used in turn, together over [`ROTATION_BYTES`], so that
    /// every call reads its operands from HBM as in a model whose every layer has its own.
    pub struct Rotation<T> {
        copies: Vec<T>,
        next: usize,
    }

    impl<T> Rotation<T> {
        /// Enough copies (at least two) of `make()` to exceed the L2 cache, for a call
        /// that moves `bytes`.
        pub fn new(bytes: usize, make: impl FnMut() -> T) -> Rotation<T> {
            let copies = ROTATION_BYTES.div_ceil(bytes).max(2);
            Rotation {
                copies: std::iter::repeat_with(make).take(copies).collect(),
                next: 0,
            }
        }

        /// The first copy, for the correctness gate.
        pub fn first(&mut self) -> &mut T {
            &mut self.copies[0]
        }

        /// The next copy in turn.
        pub fn next_copy(&mut self) -> &mut T {
            self.next = (self.next + 1) % self.copies.len();
            &mut self.copies[self.next]
        }
    }

    /// The device, its default stream, cuBLAS on it and whether criterion measures.
    pub struct Gpu {
        pub stream: Arc<CudaStream>,
        pub baseline: Baseline,
        device: String,
        /// Whether criterion measures (and so the summary is measured too).
        pub measuring: bool,
    }

    impl Gpu {
        pub fn new() -> Gpu {
            let ctx = cuda::context(0).expect("CUDA device 0");
            // The default stream and no other: cudarc then records no events per buffer
            // use, so the timings hold only the work itself and its launches.
            let stream = ctx.default_stream();
            let baseline = Baseline::new(stream.clone()).unwrap_or_else(|e| {
                panic!("the benchmarks need cuBLAS (baselines, floor), which failed to load: {e}")
            });
            let device = ctx
                .name()
                .unwrap_or_else(|_| "an unnamed CUDA device".into());
            // The summary is measured only when criterion measures: its rule is `--bench`
            // (which `cargo bench` passes) without `--test`, `--list` or `--profile-time`.
            let args: Vec<String> = std::env::args().collect();
            let flag = |f: &str| {
                args.iter()
                    .any(|a| a == f || a.starts_with(&format!("{f}=")))
            };
            let measuring =
                flag("--bench") && !flag("--test") && !flag("--list") && !flag("--profile-time");
            Gpu {
                stream,
                baseline,
                device,
                measuring,
            }
        }

        /// Host time of `iters` queued calls of `run`, for criterion's `iter_custom`: the
        /// stream synchronized at both ends, so launch overhead counts as a user sees it.
        pub fn timed(&self, iters: u64, mut run: impl FnMut()) -> Duration {
            self.stream.synchronize().expect("stream synchronize");
            let start = Instant::now();
            for _ in 0..iters {
                run();
            }
            self.stream.synchronize().expect("stream synchronize");
            start.elapsed()
        }

        /// Seconds per call of `run`, by CUDA events around batches of calls long enough
        /// to dwarf the events' resolution: the median of [`BATCHES`] batches.
        pub fn per_call(&self, mut run: impl FnMut()) -> f64 {
            let stream = &self.stream;
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

        /// The end of a bench: criterion's summary; when measuring, the summary tables
        /// (floor measured now), printed and written to [`summary_path`]; then exit 1 if
        /// any case failed its check (after the numbers: a GPU machine is lent too rarely
        /// to lose them).
        pub fn finish(&self, bench: &str, criterion: Criterion, tables: &[&Table]) {
            criterion.final_summary();
            if self.measuring {
                let floor = Floor::measure(self);
                let text = tables
                    .iter()
                    .map(|t| t.render(&self.device, &floor))
                    .collect::<Vec<_>>()
                    .join("\n");
                println!("\n{text}");
                let path = summary_path(bench);
                let written = path
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&path, &text));
                match written {
                    Ok(()) => println!("summary written to {}", path.display()),
                    Err(e) => panic!("cannot write the summary to {}: {e}", path.display()),
                }
            }
            let failures: Vec<&str> = tables
                .iter()
                .flat_map(|t| t.failures.iter().map(String::as_str))
                .collect();
            if !failures.is_empty() {
                eprintln!(
                    "{bench} benches: wrong or failed cases: {}",
                    failures.join(", ")
                );
                std::process::exit(1);
            }
        }
    }

    /// What the hardware can do, measured: HBM bytes per second and bf16 tensor-core
    /// flops per second.
    struct Floor {
        bandwidth: f64,
        rate: f64,
    }

    impl Floor {
        fn measure(gpu: &Gpu) -> Floor {
            let stream = &gpu.stream;
            // A device-to-device copy reads and writes every byte once.
            const COPY: usize = 1 << 30;
            let src = stream
                .alloc_zeros::<u8>(COPY)
                .expect("1 GiB device allocation");
            let mut dst = stream
                .alloc_zeros::<u8>(COPY)
                .expect("1 GiB device allocation");
            let copy = gpu.per_call(|| stream.memcpy_dtod(&src, &mut dst).expect("memcpy"));
            drop((src, dst));

            const G: usize = 8192;
            let host = random(G * G, 1.0, 4);
            let a = stream.clone_htod(&host).expect("copy to the device");
            let b = stream.clone_htod(&host).expect("copy to the device");
            let mut c = stream
                .alloc_zeros::<bf16>(G * G)
                .expect("device allocation");
            let l = MatrixLayout::contiguous(G, G);
            let gemm = gpu.per_call(|| {
                gpu.baseline
                    .matmul_nt(1.0, &a, l, &b, l, 0.0, &mut c, l)
                    .expect("cuBLAS GEMM")
            });
            Floor {
                bandwidth: 2.0 * COPY as f64 / copy,
                rate: 2.0 * (G * G * G) as f64 / gemm,
            }
        }
    }

    /// One line of the summary: the cells that name the case, then its per-call times
    /// (the fused kernel first) with its minimum traffic and FLOPs, or why it was not
    /// timed.
    struct Row {
        keys: Vec<String>,
        times: Result<Timed, String>,
    }

    struct Timed {
        seconds: Vec<f64>,
        bytes: f64,
        flops: f64,
    }

    /// A bench's summary table: its columns and its rows so far.
    pub struct Table {
        title: String,
        /// Header and markdown alignment (`---` or `--:`) of the cells that name a case.
        keys: &'static [(&'static str, &'static str)],
        /// Headers of the per-call times, the fused kernel's first.
        times: &'static [&'static str],
        /// Headers of the speedups: each later time over the first.
        speedups: &'static [&'static str],
        rows: Vec<Row>,
        failures: Vec<String>,
    }

    impl Table {
        /// `title` is the heading, before " on <device>".
        pub fn new(
            title: String,
            keys: &'static [(&'static str, &'static str)],
            times: &'static [&'static str],
            speedups: &'static [&'static str],
        ) -> Table {
            assert_eq!(speedups.len() + 1, times.len(), "a speedup per later time");
            Table {
                title,
                keys,
                times,
                speedups,
                rows: Vec::new(),
                failures: Vec::new(),
            }
        }

        /// A case timed: seconds per call of each path (in the order of the headers) and
        /// the least bytes and FLOPs a call needs.
        pub fn timed(&mut self, keys: Vec<String>, seconds: Vec<f64>, bytes: f64, flops: f64) {
            assert_eq!(seconds.len(), self.times.len(), "a time per path");
            let times = Ok(Timed {
                seconds,
                bytes,
                flops,
            });
            self.rows.push(Row { keys, times });
        }

        /// A case that failed its check: said now on stderr, listed in the table with the
        /// error's first line, and the bench exits 1 in the end.
        pub fn failed(&mut self, case: String, keys: Vec<String>, error: String) {
            eprintln!("{case}: not benchmarked: {error}");
            self.failures.push(case);
            self.rows.push(Row {
                keys,
                times: Err(error),
            });
        }

        fn render(&self, device: &str, floor: &Floor) -> String {
            let mut s = String::new();
            let _ = writeln!(
                s,
                "## {} on {device}\n\n\
                 Floor measured in this run: HBM {:.0} GB/s (device-to-device copy of 1 GiB), \
                 tensor cores {:.1} TFLOP/s (cuBLAS bf16 GEMM 8192³). GB/s and TFLOP/s are the \
                 fused kernel's; % of floor = floor time / fused time, floor time = \
                 max(bytes / HBM, flops / tensor rate).\n",
                self.title,
                floor.bandwidth * 1e-9,
                floor.rate * 1e-12
            );
            let floor_columns = [
                "GB/s",
                "% BW",
                "TFLOP/s",
                "% peak",
                "floor µs",
                "% of floor",
            ];
            let numeric = self.times.len() + self.speedups.len() + floor_columns.len();
            let headers = (self.keys.iter().map(|k| k.0))
                .chain(self.times.iter().copied())
                .chain(self.speedups.iter().copied())
                .chain(floor_columns);
            let aligns = (self.keys.iter().map(|k| k.1)).chain(std::iter::repeat_n("--:", numeric));
            let _ = writeln!(s, "| {} |", headers.collect::<Vec<_>>().join(" | "));
            let _ = writeln!(s, "|{}|", aligns.collect::<Vec<_>>().join("|"));
            for row in &self.rows {
                let keys = row.keys.join(" | ");
                let t = match &row.times {
                    Ok(t) => t,
                    Err(e) => {
                        let first_line = e.lines().next().unwrap_or_default();
                        let _ = writeln!(s, "| {keys} | not timed: {first_line} |");
                        continue;
                    }
                };
                let fused = t.seconds[0];
                let _ = write!(s, "| {keys} |");
                for seconds in &t.seconds {
                    let _ = write!(s, " {:.1} |", seconds * 1e6);
                }
                for seconds in &t.seconds[1..] {
                    let _ = write!(s, " {:.2}x |", seconds / fused);
                }
                let floor_s = (t.bytes / floor.bandwidth).max(t.flops / floor.rate);
                let _ = writeln!(
                    s,
                    " {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    t.bytes / fused * 1e-9,
                    100.0 * t.bytes / fused / floor.bandwidth,
                    t.flops / fused * 1e-12,
                    100.0 * t.flops / fused / floor.rate,
                    floor_s * 1e6,
                    100.0 * floor_s / fused,
                );
            }
            s
        }
    }

    /// `$PEFT_BENCH_OUT` (the file scripts/gpu-check.sh collects), else
    /// `peft-summary-<bench>.md` in criterion's output folder.
    fn summary_path(bench: &str) -> PathBuf {
        if let Some(file) = std::env::var_os("PEFT_BENCH_OUT").filter(|v| !v.is_empty()) {
            return PathBuf::from(file);
        }
        let criterion = std::env::var_os("CRITERION_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
            })
            .unwrap_or_else(|| PathBuf::from("target/criterion"));
        criterion.join(format!("peft-summary-{bench}.md"))
    }
}
