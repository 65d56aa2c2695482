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
//! events, median of batches), the speedup, the fused plan's time in plain stream order
//! (no step overlapping the one before, as on GPUs without dependent launches) over the
//! fused time, the opt-in Hopper wgmma kernel's time (`KernelVariant::Wgmma`, checked
//! against the unfused output first; NaN where it disagrees or cannot run) over the fused
//! time, and the fused kernel's achieved bandwidth
//! (bytes = the minimum traffic: W, W_down, W_up, x and y once each) and tensor rate
//! (2·M·N·K + 2·M·r·(K + N) flops), each against the floor measured here: HBM bandwidth by
//! a device-to-device copy of 1 GiB, tensor-core rate by a cuBLAS bf16 GEMM of 8192³. The
//! floor time is max(bytes / bandwidth, flops / rate).
//!
//! A second table sweeps `DeltaLinearDims::split_target` (how many blocks a pass with few
//! aims at by splitting its K) where passes split, M ∈ {1, 16, 128}: the fused time at the
//! default, then without splitting and at targets 16, 64, 256, 512 (at decode the down
//! pass's runs change below the default, the main pass's above it), each over the
//! default's (each plan checked against the unfused output first), to set the default from
//! measurements.
//!
//! The tables also go, as markdown, to
//! the file `$PEFT_BENCH_OUT` (scripts/gpu-check.sh collects it), by default to
//! `peft-summary-delta_linear.md` in criterion's folder (`target/criterion`).
//!
//! Without the `cuda` feature or a CUDA device it prints why it skips and exits.

mod common;

fn main() {
    if common::can_run("delta_linear") {
        #[cfg(feature = "baseline")]
        gpu::main();
    }
}

#[cfg(feature = "baseline")]
mod gpu {
    use std::sync::Arc;

    use criterion::{BenchmarkId, Throughput};
    use half::bf16;
    use peft_kernels::cuda::baseline::Baseline;
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::cuda::{self, DeviceRead, DeviceWrite};
    use peft_kernels::delta_linear::{
        DeltaLinear, DeltaLinearArgs, DeltaLinearDims, KernelVariant,
    };
    use peft_kernels::plan::{self, Launch};
    use peft_kernels::{Activation, DType, DEFAULT_SPLIT_TARGET};

    use crate::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const K: usize = 4096;
    const N: usize = 4096;
    const ROWS: [usize; 4] = [1, 16, 128, 4096];
    /// The split targets the sweep times besides the default (the sweep table's headers name
    /// them), and the rows it sweeps (at M = 4096 no pass has few blocks).
    const SWEPT_TARGETS: [usize; 5] = [0, 16, 64, 256, 512];
    const SWEPT_ROWS: [usize; 3] = [1, 16, 128];

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
                op: DeltaLinear::lora(32.0),
                r: 16,
            },
            Method {
                name: "scaled_pa_r512",
                op: DeltaLinear::parallel_adapter(Activation::Relu, 4.0),
                r: 512,
            },
        ]
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
        copies: Rotation<Operands>,
    }

    impl<'m> Case<'m> {
        fn new(stream: &Arc<CudaStream>, method: &'m Method, m: usize, w: &[bf16]) -> Case<'m> {
            let r = method.r;
            let dims = DeltaLinearDims::new(m, N, K, r);
            let x = random(m * K, 1.0, 1);
            let w_down = random(r * K, 1.0 / (K as f64).sqrt(), 2);
            let w_up = random(N * r, 1.0 / (r as f64).sqrt(), 3);
            let up = |v: &[bf16]| stream.clone_htod(v).expect("copy to the device");
            let zeros = |n| stream.alloc_zeros::<bf16>(n).expect("device allocation");
            // Room for the largest split target swept (the workspace grows with it).
            let largest = SWEPT_TARGETS.into_iter().max().unwrap_or(0);
            let workspace_len = DeltaLinearDims {
                split_target: largest.max(DEFAULT_SPLIT_TARGET),
                ..dims
            }
            .workspace_len();
            let copies = Rotation::new(min_bytes(&dims), || Operands {
                x: up(&x),
                w: up(w),
                w_down: up(&w_down),
                w_up: up(&w_up),
                workspace: zeros(workspace_len),
                y: zeros(m * N),
            });
            Case {
                method,
                dims,
                copies,
            }
        }

        fn name(&self) -> String {
            format!("{}/m{}", self.method.name, self.dims.m)
        }

        fn fused(&mut self, stream: &CudaStream) {
            self.fused_with(stream, self.dims);
        }

        /// The fused plan for `dims` (another kernel variant or split target than the case's).
        fn fused_with(&mut self, stream: &CudaStream, dims: DeltaLinearDims) {
            cuda::delta_linear(
                stream,
                &self.method.op,
                &dims,
                self.copies.next_copy().args(),
            )
            .expect("fused delta_linear");
        }

        /// The fused plan with every step in plain stream order (what
        /// `PEFT_KERNELS_NO_OVERLAP` does for a whole process): its time over `fused`'s is
        /// what overlapping the down pass with the frozen GEMM gains.
        fn fused_in_order(&mut self, stream: &CudaStream) {
            let (op, dims) = (self.method.op, self.dims);
            let mut bufs = cuda::Buffers::new(stream);
            let planned = self.copies.next_copy().args().bufs(&mut bufs);
            let steps = plan::delta_linear::delta_linear(&op, &dims, DType::BF16, &planned)
                .expect("fused delta_linear plan");
            for (launch, params) in &steps {
                let launch = Launch {
                    overlap_previous: false,
                    ..*launch
                };
                // SAFETY: the plan checked the addresses, which came from `bufs`, whose
                // stream-order guards are released after the launches are queued.
                unsafe { cuda::launch(stream, &launch, params) }.expect("fused delta_linear");
            }
        }

        /// The fused plan on Hopper's wgmma kernel instead of the one `Auto` picks.
        fn fused_wgmma(&mut self, stream: &CudaStream) -> peft_kernels::Result<()> {
            let dims = DeltaLinearDims {
                kernel: KernelVariant::Wgmma,
                ..self.dims
            };
            cuda::delta_linear(
                stream,
                &self.method.op,
                &dims,
                self.copies.next_copy().args(),
            )
        }

        fn unfused(&mut self, baseline: &Baseline) {
            let (op, dims) = (self.method.op, self.dims);
            baseline
                .delta_linear(&op, &dims, self.copies.next_copy().args())
                .expect("cuBLAS baseline");
        }

        /// Runs the unfused sequence and the fused plan on `kernel` on the first copy, each
        /// into a NaN-poisoned y; an error unless both succeed and their outputs agree
        /// (timing a wrong kernel is worse than not timing it).
        fn check(
            &mut self,
            stream: &Arc<CudaStream>,
            baseline: &Baseline,
            kernel: KernelVariant,
        ) -> Result<(), String> {
            let dims = DeltaLinearDims {
                kernel,
                ..self.dims
            };
            self.check_with(stream, baseline, dims)
        }

        /// [`Case::check`] for the fused plan of `fused_dims`.
        fn check_with(
            &mut self,
            stream: &Arc<CudaStream>,
            baseline: &Baseline,
            fused_dims: DeltaLinearDims,
        ) -> Result<(), String> {
            let (op, dims, name) = (self.method.op, self.dims, self.name());
            let first = self.copies.first();
            poison(stream, &mut first.y);
            baseline
                .delta_linear(&op, &dims, first.args())
                .map_err(|e| format!("the cuBLAS baseline failed: {e}"))?;
            let unfused = stream.clone_dtoh(&first.y).expect("copy to the host");
            poison(stream, &mut first.y);
            let (kernel, target) = (fused_dims.kernel, fused_dims.split_target);
            let fused_name = format!("fused ({kernel:?}, split target {target})");
            cuda::delta_linear(stream, &op, &fused_dims, first.args())
                .map_err(|e| format!("the {fused_name} failed: {e}"))?;
            let fused = stream.clone_dtoh(&first.y).expect("copy to the host");
            agree(
                &name,
                &format!("{fused_name} and unfused"),
                &fused,
                &unfused,
            )
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

    pub fn main() {
        let gpu = Gpu::new();
        let stream = &gpu.stream;
        let mut criterion = criterion();
        let mut table = Table::new(
            format!("delta_linear, bf16, K = N = {K}: fused vs unfused cuBLAS"),
            &[("case", "---"), ("M", "--:")],
            &["fused µs", "unfused µs", "in order µs", "wgmma µs"],
            &["speedup", "in order / fused", "wgmma / fused"],
        );
        let mut sweep = Table::new(
            format!(
                "delta_linear, bf16, K = N = {K}: split target (default {DEFAULT_SPLIT_TARGET}) \
                 swept"
            ),
            &[("case", "---"), ("M", "--:")],
            &[
                "default µs",
                "no split µs",
                "16 µs",
                "64 µs",
                "256 µs",
                "512 µs",
            ],
            &[
                "no split / default",
                "16 / default",
                "64 / default",
                "256 / default",
                "512 / default",
            ],
        );
        let w = random(N * K, 1.0 / (K as f64).sqrt(), 0);
        let methods = methods();
        for method in &methods {
            let mut group = criterion.benchmark_group(format!("delta_linear/{}", method.name));
            for m in ROWS {
                let mut case = Case::new(stream, method, m, &w);
                let keys = vec![method.name.to_owned(), m.to_string()];
                if let Err(e) = case.check(stream, &gpu.baseline, KernelVariant::Auto) {
                    table.failed(case.name(), keys, e);
                    continue;
                }
                group.throughput(Throughput::Bytes(min_bytes(&case.dims) as u64));
                group.bench_function(BenchmarkId::new("fused", m), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.fused(stream)))
                });
                group.bench_function(BenchmarkId::new("unfused_cublas", m), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.unfused(&gpu.baseline)))
                });
                if gpu.measuring {
                    let fused = gpu.per_call(|| case.fused(stream));
                    let unfused = gpu.per_call(|| case.unfused(&gpu.baseline));
                    let in_order = gpu.per_call(|| case.fused_in_order(stream));
                    let wgmma = match case.check(stream, &gpu.baseline, KernelVariant::Wgmma) {
                        Ok(()) => gpu.per_call(|| case.fused_wgmma(stream).expect("wgmma")),
                        Err(e) => {
                            eprintln!("{}: wgmma not timed: {e}", case.name());
                            f64::NAN
                        }
                    };
                    let (bytes, flops) = (min_bytes(&case.dims) as f64, flops(&case.dims));
                    table.timed(
                        keys.clone(),
                        vec![fused, unfused, in_order, wgmma],
                        bytes,
                        flops,
                    );
                    if SWEPT_ROWS.contains(&m) {
                        sweep_targets(&gpu, &mut case, fused, keys, &mut sweep);
                    }
                }
            }
            group.finish();
        }
        gpu.finish("delta_linear", criterion, &[&table, &sweep]);
    }

    /// The sweep's row for `case`, whose fused time at the default target is `default`.
    fn sweep_targets(
        gpu: &Gpu,
        case: &mut Case,
        default: f64,
        keys: Vec<String>,
        sweep: &mut Table,
    ) {
        let mut times = vec![default];
        for split_target in SWEPT_TARGETS {
            let dims = DeltaLinearDims {
                split_target,
                ..case.dims
            };
            if let Err(e) = case.check_with(&gpu.stream, &gpu.baseline, dims) {
                sweep.failed(case.name(), keys, e);
                return;
            }
            times.push(gpu.per_call(|| case.fused_with(&gpu.stream, dims)));
        }
        let (bytes, flops) = (min_bytes(&case.dims) as f64, flops(&case.dims));
        sweep.timed(keys, times, bytes, flops);
    }
}
