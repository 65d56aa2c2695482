//! One training step of a linear layer with its delta: this crate's training forward and
//! backward (`delta_linear_train` + `delta_linear_backward`) against the unfused cuBLAS
//! sequence of Unsloth's formulation (`Baseline::lora_training_step`: x·Wᵀ, x·Aᵀ, (xAᵀ)·Bᵀ
//! added; dy·W, dy·B, (dyB)·A added, daᵀ·x, dyᵀ·t: eight GEMMs), in bf16 at K = N = 4096
//! for M ∈ {512, 4096, 16384}:
//!
//! - LoRA, r ∈ {8, 16, 64} (s = 2);
//! - the scaled parallel adapter, r = 512, s = 4, here with the identity bottleneck (the
//!   baseline has no elementwise activation kernels in its backward, so both paths compute
//!   the same LoRA-form function; a ReLU adds an elementwise pass to the baseline and
//!   nothing to the fused path's GEMMs).
//!
//! The fused path writes f32 adapter gradients, the baseline bf16 ones (as PyTorch's
//! autograd does for bf16 parameters). Before timing, each case checks that the two paths'
//! y and dx agree. Timing as benches/delta_linear.rs: criterion (host clock around queued
//! iterations) and a summary table by CUDA events, operands rotated through copies larger
//! than L2. Without the `cuda` feature or a CUDA device it prints why it skips and exits.
//!
//! The backward's data pass (dx) and weight passes (dW_up, dW_down, reduced over tokens with
//! a deterministic split) run on mma.sync tensor cores for bf16; its dz and dλ passes on the
//! CUDA cores.

mod common;

fn main() {
    if common::can_run("delta_linear_train") {
        #[cfg(feature = "baseline")]
        gpu::main();
    }
}

#[cfg(feature = "baseline")]
mod gpu {
    use std::sync::Arc;

    use criterion::BenchmarkId;
    use half::bf16;
    use peft_kernels::cuda;
    use peft_kernels::cuda::baseline::{Baseline, LoraStepArgs};
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::delta_linear::{
        DeltaLinear, DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims,
        DeltaLinearTrainArgs,
    };
    use peft_kernels::{Activation, Composition, Insertion};

    use crate::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const K: usize = 4096;
    const N: usize = 4096;
    const ROWS: [usize; 3] = [512, 4096, 16384];

    struct Method {
        name: &'static str,
        op: DeltaLinear,
        r: usize,
    }

    fn methods() -> Vec<Method> {
        let lora = |name, r| Method {
            name,
            op: DeltaLinear::new(
                Insertion::Parallel,
                Activation::Identity,
                Composition::Scaled(2.0),
            ),
            r,
        };
        vec![
            lora("lora_r8", 8),
            lora("lora_r16", 16),
            lora("lora_r64", 64),
            Method {
                name: "scaled_pa_r512",
                op: DeltaLinear::new(
                    Insertion::Parallel,
                    Activation::Identity,
                    Composition::Scaled(4.0),
                ),
                r: 512,
            },
        ]
    }

    /// One copy of a case's tensors on the device.
    struct Operands {
        x: CudaSlice<bf16>,
        w: CudaSlice<bf16>,
        w_down: CudaSlice<bf16>,
        w_up: CudaSlice<bf16>,
        dy: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
        dx: CudaSlice<bf16>,
        workspace: CudaSlice<bf16>,
        saved: CudaSlice<f32>,
        bwd_workspace: CudaSlice<f32>,
        dw_down: CudaSlice<f32>,
        dw_up: CudaSlice<f32>,
        /// The baseline's scratch and bf16 gradients.
        t: CudaSlice<bf16>,
        da: CudaSlice<bf16>,
        d_lora_a: CudaSlice<bf16>,
        d_lora_b: CudaSlice<bf16>,
    }

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
            let dy = random(m * N, 1.0, 4);
            let up = |v: &[bf16]| stream.clone_htod(v).expect("copy to the device");
            let zeros = |n| stream.alloc_zeros::<bf16>(n).expect("device allocation");
            let zeros32 = |n| stream.alloc_zeros::<f32>(n).expect("device allocation");
            let copies = Rotation::new(bytes(&dims), || Operands {
                x: up(&x),
                w: up(w),
                w_down: up(&w_down),
                w_up: up(&w_up),
                dy: up(&dy),
                y: zeros(m * N),
                dx: zeros(m * K),
                workspace: zeros(dims.workspace_len()),
                saved: zeros32(dims.saved_len(&method.op)),
                bwd_workspace: zeros32(dims.backward_workspace_len(&method.op)),
                dw_down: zeros32(r * K),
                dw_up: zeros32(N * r),
                t: zeros(m * r),
                da: zeros(m * r),
                d_lora_a: zeros(r * K),
                d_lora_b: zeros(N * r),
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
            let (op, dims) = (self.method.op, self.dims);
            fused_step(stream, &op, &dims, self.copies.next_copy()).expect("fused step");
        }

        fn unfused(&mut self, baseline: &Baseline) {
            let (op, dims) = (self.method.op, self.dims);
            unfused_step(baseline, &op, &dims, self.copies.next_copy()).expect("cuBLAS step");
        }

        /// Both paths on the first copy into poisoned y and dx: an error unless they agree.
        fn check(&mut self, stream: &Arc<CudaStream>, baseline: &Baseline) -> Result<(), String> {
            let (op, dims, name) = (self.method.op, self.dims, self.name());
            let o = self.copies.first();
            let run = |o: &mut Operands, fused: bool| -> Result<(Vec<bf16>, Vec<bf16>), String> {
                poison(stream, &mut o.y);
                poison(stream, &mut o.dx);
                if fused {
                    fused_step(stream, &op, &dims, o).map_err(|e| format!("fused: {e}"))?;
                } else {
                    unfused_step(baseline, &op, &dims, o).map_err(|e| format!("cuBLAS: {e}"))?;
                }
                let host = |b: &CudaSlice<bf16>| stream.clone_dtoh(b).expect("copy to the host");
                Ok((host(&o.y), host(&o.dx)))
            };
            let (y_u, dx_u) = run(o, false)?;
            let (y_f, dx_f) = run(o, true)?;
            agree(&name, "fused and unfused y", &y_f, &y_u)?;
            agree(&name, "fused and unfused dx", &dx_f, &dx_u)
        }
    }

    fn fused_step(
        stream: &CudaStream,
        op: &DeltaLinear,
        dims: &DeltaLinearDims,
        o: &mut Operands,
    ) -> peft_kernels::Result<()> {
        cuda::delta_linear_train(
            stream,
            op,
            dims,
            DeltaLinearTrainArgs {
                forward: DeltaLinearArgs {
                    x: &o.x,
                    w: &o.w,
                    bias: None,
                    u: None,
                    w_down: &o.w_down,
                    b_down: None,
                    w_up: &o.w_up,
                    b_up: None,
                    gate: None,
                    workspace: &mut o.workspace,
                    y: &mut o.y,
                },
                saved: &mut o.saved,
                dropout: None,
            },
        )?;
        cuda::delta_linear_backward(
            stream,
            op,
            dims,
            DeltaLinearBackwardArgs {
                dy: &o.dy,
                x: &o.x,
                w: &o.w,
                u: None,
                w_down: &o.w_down,
                w_up: &o.w_up,
                b_up: None,
                gate: None,
                saved: &o.saved,
                dx: &mut o.dx,
                du: None,
                dw_down: &mut o.dw_down,
                db_down: None,
                dw_up: &mut o.dw_up,
                db_up: None,
                dgate: None,
                workspace: &mut o.bwd_workspace,
                dropout: None,
                accumulate: false,
            },
        )
    }

    fn unfused_step(
        baseline: &Baseline,
        op: &DeltaLinear,
        d: &DeltaLinearDims,
        o: &mut Operands,
    ) -> peft_kernels::Result<()> {
        baseline.lora_training_step(
            (d.m, d.n, d.k, d.r),
            op.composition.scale(d.r),
            LoraStepArgs {
                x: &o.x,
                w: &o.w,
                lora_a: &o.w_down,
                lora_b: &o.w_up,
                dy: &o.dy,
                y: &mut o.y,
                t: &mut o.t,
                dx: &mut o.dx,
                da: &mut o.da,
                d_lora_a: &mut o.d_lora_a,
                d_lora_b: &mut o.d_lora_b,
            },
        )
    }

    /// The least traffic of a step: x, W, A, B, dy read, y, dx, dA, dB written, once each.
    fn bytes(d: &DeltaLinearDims) -> usize {
        let elements = 2 * d.m * d.k + 2 * d.m * d.n + d.n * d.k + 2 * (d.r * d.k + d.n * d.r);
        elements * std::mem::size_of::<bf16>()
    }

    /// The step's multiply-adds as flops: the forward's three GEMMs and the backward's five.
    fn flops(d: &DeltaLinearDims) -> f64 {
        let (m, n, k, r) = (d.m as f64, d.n as f64, d.k as f64, d.r as f64);
        2.0 * (2.0 * m * n * k + 3.0 * m * r * (k + n))
    }

    pub fn main() {
        let gpu = Gpu::new();
        let stream = &gpu.stream;
        let mut criterion = criterion();
        let mut table = Table::new(
            format!("delta_linear training step (forward + backward), bf16, K = N = {K}"),
            &[("case", "---"), ("M", "--:")],
            &["fused µs", "unfused µs"],
            &["speedup"],
        );
        let w = random(N * K, 1.0 / (K as f64).sqrt(), 0);
        for method in &methods() {
            let mut group =
                criterion.benchmark_group(format!("delta_linear_train/{}", method.name));
            for m in ROWS {
                let mut case = Case::new(stream, method, m, &w);
                let keys = vec![method.name.to_owned(), m.to_string()];
                if let Err(e) = case.check(stream, &gpu.baseline) {
                    table.failed(case.name(), keys, e);
                    continue;
                }
                group.bench_function(BenchmarkId::new("fused", m), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.fused(stream)))
                });
                group.bench_function(BenchmarkId::new("unfused_cublas", m), |b| {
                    b.iter_custom(|iters| gpu.timed(iters, || case.unfused(&gpu.baseline)))
                });
                if gpu.measuring {
                    let fused = gpu.per_call(|| case.fused(stream));
                    let unfused = gpu.per_call(|| case.unfused(&gpu.baseline));
                    let d = case.dims;
                    table.timed(keys, vec![fused, unfused], bytes(&d) as f64, flops(&d));
                }
            }
            group.finish();
        }
        gpu.finish("delta_linear_train", criterion, &[&table]);
    }
}
