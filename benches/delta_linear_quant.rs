//! LoRA over a quantized frozen W (`cuda::delta_linear_quant`: the W tiles dequantized inside
//! the fused kernels) against Unsloth's and PEFT's QLoRA formulation — W dequantized into a
//! bf16 buffer by a dequantize kernel, then the cuBLAS sequence (`Baseline::delta_linear_quant`)
//! — and against the dense fused kernel over the same W in bf16 (`cuda::delta_linear`). bf16
//! activations, K = N = 4096, r = 16 (s = 32 / 16), M ∈ {1, 16, 512, 4096}, for NF4 (QLoRA's
//! layout: blocks of 64, double-quantized absmax) and FP8 E4M3 (128 × 128 block scales).
//!
//! Each case first checks that the three paths agree; every call works on the next of several
//! copies of the operands, together larger than L2 (benches/common). The summary table gives
//! per case the fused, dequantize-then-cuBLAS and dense-fused times (CUDA events, median of
//! batches), the speedups, and the fused kernel's bandwidth over the floor for the bytes it
//! must move: the packed W with its scales, W_down, W_up, x and y once each (at decode the
//! issue's "% of the packed-byte bandwidth floor"). Tables also go to `$PEFT_BENCH_OUT`, by
//! default `peft-summary-delta_linear_quant.md` in criterion's folder.
//!
//! Without the `baseline` feature or a CUDA device it prints why it skips and exits.

mod common;

fn main() {
    if common::can_run("delta_linear_quant") {
        #[cfg(feature = "baseline")]
        gpu::main();
    }
}

#[cfg(feature = "baseline")]
mod gpu {
    use std::sync::Arc;

    use criterion::BenchmarkId;
    use half::bf16;
    use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use peft_kernels::cuda::{self, baseline::Baseline};
    use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
    use peft_kernels::quant::{
        DeltaLinearQuantArgs, Fp8Scaling, Fp8Weight, Nf4Absmax, Nf4Weight, QuantDequantizeArgs,
        QuantWeight, NF4_CODE,
    };

    use crate::common::gpu::{agree, criterion, poison, random, Gpu, Rotation, Table};

    const K: usize = 4096;
    const N: usize = 4096;
    const R: usize = 16;
    const ROWS: [usize; 4] = [1, 16, 512, 4096];

    #[derive(Clone, Copy, PartialEq)]
    enum Format {
        Nf4,
        Fp8,
    }

    /// SplitMix64 bytes (FP8: E4M3's NaN bytes avoided).
    fn bytes(n: usize, seed: u64, fp8: bool) -> Vec<u8> {
        random(n, 1.0, seed)
            .into_iter()
            .map(|v| {
                let b = (v.to_bits() >> 3) as u8;
                if fp8 && b & 0x7f == 0x7f {
                    0x7e
                } else {
                    b
                }
            })
            .collect()
    }

    fn f32s(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
        random(n, 1.0, seed)
            .into_iter()
            .map(|v| lo + (hi - lo) * (v.to_f32() + 1.0) / 2.0)
            .collect()
    }

    /// One copy of a case's operands on the device.
    struct Operands {
        data: CudaSlice<u8>,
        codes: CudaSlice<u8>,
        code: CudaSlice<f32>,
        nested_code: CudaSlice<f32>,
        scales: CudaSlice<f32>,
        w_dense: CudaSlice<bf16>,
        x: CudaSlice<bf16>,
        w_down: CudaSlice<bf16>,
        w_up: CudaSlice<bf16>,
        workspace: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
        w_dequantized: CudaSlice<bf16>,
    }

    /// The bytes a call must move: the packed W and its scales, the adapter, x and y.
    fn min_bytes(format: Format, m: usize) -> usize {
        let w = match format {
            Format::Nf4 => N * K / 2 + N * K / 64 + 4 * (N * K / 64 / 256) + 4 * (256 + 16),
            Format::Fp8 => N * K + 4 * (N / 128) * (K / 128),
        };
        w + 2 * (R * K + N * R + m * K + m * N)
    }

    fn flops(m: usize) -> f64 {
        2.0 * (m * N * K) as f64 + 2.0 * (m * R * (K + N)) as f64
    }

    fn upload<T: cuda::cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
        s.clone_htod(v).expect("copy to the device")
    }

    fn make(gpu: &Gpu, format: Format, m: usize, dims: &DeltaLinearDims) -> Operands {
        let s = &gpu.stream;
        let blocks = N * K / 64;
        let (data, codes, scales) = match format {
            Format::Nf4 => (
                bytes(N * K / 2, 1, false),
                bytes(blocks, 2, false),
                f32s(blocks.div_ceil(256), 0.01, 0.02, 3),
            ),
            Format::Fp8 => (
                bytes(N * K, 1, true),
                vec![0u8; 1],
                f32s((N / 128) * (K / 128), 1e-4, 2e-4, 3),
            ),
        };
        let mut ops = Operands {
            data: upload(s, &data),
            codes: upload(s, &codes),
            code: upload(s, &NF4_CODE),
            nested_code: upload(s, &f32s(256, 0.0, 1.0, 4)),
            scales: upload(s, &scales),
            w_dense: s.alloc_zeros(N * K).expect("device allocation"),
            x: upload(s, &random(m * K, 1.0, 5)),
            w_down: upload(s, &random(R * K, 1.0 / 64.0, 6)),
            w_up: upload(s, &random(N * R, 0.25, 7)),
            workspace: s
                .alloc_zeros(dims.workspace_len())
                .expect("device allocation"),
            y: s.alloc_zeros(m * N).expect("device allocation"),
            w_dequantized: s.alloc_zeros(N * K).expect("device allocation"),
        };
        // The dense path's W: the quantized W's values in bf16.
        let Operands {
            data,
            codes,
            code,
            nested_code,
            scales,
            w_dense,
            ..
        } = &mut ops;
        let w = Operands::weight_of(format, data, codes, code, nested_code, scales);
        let args: QuantDequantizeArgs<cuda::DeviceWrite<bf16>, _, _> =
            QuantDequantizeArgs { w, out: w_dense };
        cuda::quant_dequantize(s, N, K, args).expect("dequantize");
        ops
    }

    impl Operands {
        fn weight_of<'a>(
            format: Format,
            data: &'a CudaSlice<u8>,
            codes: &'a CudaSlice<u8>,
            code: &'a CudaSlice<f32>,
            nested_code: &'a CudaSlice<f32>,
            scales: &'a CudaSlice<f32>,
        ) -> QuantWeight<cuda::DeviceRead<'a, u8>, cuda::DeviceRead<'a, f32>> {
            match format {
                Format::Nf4 => QuantWeight::Nf4(Nf4Weight {
                    packed: data,
                    code,
                    blocksize: 64,
                    absmax: Nf4Absmax::Double {
                        codes,
                        code: nested_code,
                        scales,
                        offset: 0.01,
                    },
                }),
                Format::Fp8 => QuantWeight::Fp8(Fp8Weight {
                    weight: data,
                    scale: scales,
                    scaling: Fp8Scaling::Block {
                        rows: 128,
                        cols: 128,
                    },
                }),
            }
        }
    }

    fn op() -> DeltaLinear {
        DeltaLinear::lora(32.0)
    }

    fn fused(s: &CudaStream, format: Format, dims: &DeltaLinearDims, o: &mut Operands) {
        let Operands {
            data,
            codes,
            code,
            nested_code,
            scales,
            x,
            w_down,
            w_up,
            workspace,
            y,
            ..
        } = o;
        let w = Operands::weight_of(format, data, codes, code, nested_code, scales);
        let args: cuda::DeviceDeltaLinearQuantArgs<bf16> = DeltaLinearQuantArgs {
            x: &*x,
            w,
            bias: None,
            u: None,
            w_down: &*w_down,
            b_down: None,
            w_up: &*w_up,
            b_up: None,
            gate: None,
            workspace,
            y,
        };
        cuda::delta_linear_quant(s, &op(), dims, args).expect("fused quantized");
    }

    fn unfused(b: &Baseline, format: Format, dims: &DeltaLinearDims, o: &mut Operands) {
        let Operands {
            data,
            codes,
            code,
            nested_code,
            scales,
            x,
            w_down,
            w_up,
            workspace,
            y,
            w_dequantized,
            ..
        } = o;
        let w = Operands::weight_of(format, data, codes, code, nested_code, scales);
        let args: cuda::DeviceDeltaLinearQuantArgs<bf16> = DeltaLinearQuantArgs {
            x: &*x,
            w,
            bias: None,
            u: None,
            w_down: &*w_down,
            b_down: None,
            w_up: &*w_up,
            b_up: None,
            gate: None,
            workspace,
            y,
        };
        b.delta_linear_quant(&op(), dims, args, w_dequantized)
            .expect("dequantize + cuBLAS");
    }

    fn dense(s: &CudaStream, dims: &DeltaLinearDims, o: &mut Operands) {
        let args: cuda::DeviceDeltaLinearArgs<bf16> = DeltaLinearArgs {
            x: &o.x,
            w: &o.w_dense,
            bias: None,
            u: None,
            w_down: &o.w_down,
            b_down: None,
            w_up: &o.w_up,
            b_up: None,
            gate: None,
            workspace: &mut o.workspace,
            y: &mut o.y,
        };
        cuda::delta_linear(s, &op(), dims, args).expect("dense fused");
    }

    /// The three paths' outputs on the first copy agree (each poisoned first).
    fn check(
        gpu: &Gpu,
        format: Format,
        dims: &DeltaLinearDims,
        o: &mut Operands,
        case: &str,
    ) -> Result<(), String> {
        let s = &gpu.stream;
        let mut out = |run: &mut dyn FnMut(&mut Operands)| {
            poison(s, &mut o.y);
            run(&mut *o);
            s.clone_dtoh(&o.y).expect("copy to the host")
        };
        let f = out(&mut |o| fused(s, format, dims, o));
        let u = out(&mut |o| unfused(&gpu.baseline, format, dims, o));
        let d = out(&mut |o| dense(s, dims, o));
        agree(case, "fused and dequantize-then-cuBLAS", &f, &u)?;
        agree(case, "fused quantized and dense fused", &f, &d)
    }

    pub fn main() {
        let gpu = Gpu::new();
        let stream = gpu.stream.clone();
        let mut criterion = criterion();
        let mut table = Table::new(
            format!("LoRA over a quantized W, bf16, K = N = {K}, r = {R}"),
            &[("format", "---"), ("M", "--:")],
            &["fused (µs)", "dequantize + cuBLAS (µs)", "dense fused (µs)"],
            &["vs dequantize + cuBLAS", "dense / quantized fused"],
        );
        for (name, format) in [("nf4", Format::Nf4), ("fp8", Format::Fp8)] {
            let mut group = criterion.benchmark_group(format!("delta_linear_quant/{name}"));
            for m in ROWS {
                let dims = DeltaLinearDims::new(m, N, K, R);
                let keys = vec![name.to_string(), m.to_string()];
                let case = format!("{name} M = {m}");
                // The dense and dequantized W copies count against L2 too.
                let copy_bytes = min_bytes(format, m) + 4 * N * K;
                let mut copies = Rotation::new(copy_bytes, || make(&gpu, format, m, &dims));
                if let Err(e) = check(&gpu, format, &dims, copies.first(), &case) {
                    table.failed(case, keys, e);
                    continue;
                }
                group.bench_function(BenchmarkId::new("fused", m), |b| {
                    b.iter_custom(|iters| {
                        gpu.timed(iters, || fused(&stream, format, &dims, copies.next_copy()))
                    })
                });
                group.bench_function(BenchmarkId::new("dequantize_cublas", m), |b| {
                    b.iter_custom(|iters| {
                        gpu.timed(iters, || {
                            unfused(&gpu.baseline, format, &dims, copies.next_copy())
                        })
                    })
                });
                if gpu.measuring {
                    let f = gpu.per_call(|| fused(&stream, format, &dims, copies.next_copy()));
                    let u =
                        gpu.per_call(|| unfused(&gpu.baseline, format, &dims, copies.next_copy()));
                    let d = gpu.per_call(|| dense(&stream, &dims, copies.next_copy()));
                    table.timed(keys, vec![f, u, d], min_bytes(format, m) as f64, flops(m));
                }
            }
            group.finish();
        }
        gpu.finish("delta_linear_quant", criterion, &[&table]);
    }
}
