//! The performance model of issue 16, printed as the table BENCHMARKS.md keeps: **modeled,
//! not measured**. The emulator profiles every launch of the fused LoRA plan (bf16, K = N =
//! 4096, r = 16) at the bench's batch sizes (sampled where the grid is large, and said so),
//! and `peft_kernels::model` turns the bytes and FLOPs into an H100 and an A100 time beside
//! the unfused cuBLAS sequence (ideal traffic, 85% of the tensor peak) and the physical
//! floor. With `--features cuda` the occupancy uses ptxas's registers and static shared
//! memory of each kernel; without, registers are not counted (the table says which).
//!
//!     cargo run --release --example model [--features cuda] [-- M ...]

use half::bf16;
use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
use peft_kernels::emulator::{self, LaunchProfile, Sampling};
use peft_kernels::kernels::KernelId;
use peft_kernels::model::{self, Gpu, LaunchWork, Resources};

const N: usize = 4096;
const K: usize = 4096;
const R: usize = 16;

/// ptxas's resources of a kernel in the cubin `gpu` loads, where this build has them.
fn resources(kernel: &str, gpu: &Gpu) -> Option<Resources> {
    let id = *KernelId::ALL.iter().find(|k| k.name() == kernel)?;
    #[cfg(feature = "cuda")]
    {
        let image = if gpu.wgmma_rate.is_some() {
            peft_kernels::cuda::Image::Sm90
        } else {
            peft_kernels::cuda::Image::Sm80
        };
        peft_kernels::cuda::resources(id, image)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (id, gpu);
        None
    }
}

fn work(p: &LaunchProfile, gpu: &Gpu) -> LaunchWork {
    LaunchWork {
        blocks: p.blocks as u64,
        threads: p.block.iter().product(),
        dynamic_smem: p.dynamic_smem,
        resources: resources(p.kernel, gpu),
        dram_bytes: p.dram_bytes(),
        tensor_flops: p.tensor_flops(),
        wgmma: p.wgmma > 0.0,
        // CUDA-core FLOPs are not counted: these plans' non-tensor work is small.
        fp32_flops: 0.0,
    }
}

fn lora_profiles(m: usize) -> peft_kernels::Result<Vec<LaunchProfile>> {
    let dims = DeltaLinearDims::new(m, N, K, R);
    let fill = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
            .collect()
    };
    let (x, w, w_down, w_up) = (fill(m * K), fill(N * K), fill(R * K), fill(N * R));
    let mut y = vec![bf16::ZERO; m * N];
    let mut workspace = vec![bf16::ZERO; dims.workspace_len()];
    let args = DeltaLinearArgs {
        x: &x[..],
        w: &w[..],
        bias: None,
        u: None,
        w_down: &w_down[..],
        b_down: None,
        w_up: &w_up[..],
        b_up: None,
        gate: None,
        workspace: &mut workspace[..],
        y: &mut y[..],
    };
    // Exact up to M = 64 (seconds); sampled above, where the GEMM's grid is large.
    let sampling = if m <= 64 {
        Sampling::Exact
    } else {
        Sampling::Sampled
    };
    let (_, p) = emulator::profile(sampling, || {
        emulator::delta_linear(&DeltaLinear::lora(2.0 * R as f32), &dims, args)
    })?;
    Ok(p)
}

/// The unfused sequence a user would write with cuBLAS: y = x·Wᵀ, t = x·Aᵀ, y += s·t·Bᵀ,
/// each GEMM reading its operands and writing its output once (the third reads y too).
fn unfused(m: usize) -> Vec<(f64, f64)> {
    let (m, n, k, r) = (m as f64, N as f64, K as f64, R as f64);
    vec![
        (2.0 * (m * k + n * k + m * n), 2.0 * m * n * k),
        (2.0 * (m * k + r * k + m * r), 2.0 * m * r * k),
        (2.0 * (m * r + n * r + 2.0 * m * n), 2.0 * m * n * r),
    ]
}

/// W, the adapter, x and y once; the three products' FLOPs.
fn floor(m: usize) -> (f64, f64) {
    let (m, n, k, r) = (m as f64, N as f64, K as f64, R as f64);
    (
        2.0 * (n * k + r * k + n * r + m * k + m * n),
        2.0 * (m * n * k + m * r * k + m * n * r),
    )
}

fn main() -> peft_kernels::Result<()> {
    let ms: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ms = if ms.is_empty() {
        vec![1, 16, 64, 256, 1024, 4096]
    } else {
        ms
    };
    let gpus = [model::H100, model::A100];
    println!(
        "Fused LoRA (bf16, K = N = {K}, r = {R}): MODELED, NOT MEASURED (src/model.rs; \
         occupancy {})",
        if cfg!(feature = "cuda") {
            "with ptxas's registers and static shared memory"
        } else {
            "without registers: build with --features cuda for ptxas's report"
        }
    );
    println!();
    println!(
        "| M | launches (kernel: blocks, waves on H100) | profile | DRAM MB fused | DRAM MB floor \
         | H100 fused µs | H100 cuBLAS µs | H100 floor µs | fused / cuBLAS | A100 fused µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &m in &ms {
        let t0 = std::time::Instant::now();
        let profiles = match lora_profiles(m) {
            Ok(p) => p,
            // A sampled profile the sample cannot represent says so (no scaled guess).
            Err(e) => {
                println!("| {m} | {e} | refused | | | | | | | |");
                continue;
            }
        };
        let took = t0.elapsed().as_secs_f64();
        let mut times = [0.0f64; 2];
        for (g, gpu) in gpus.iter().enumerate() {
            for p in &profiles {
                times[g] += model::launch_time(gpu, &work(p, gpu)).unwrap_or(f64::NAN);
            }
        }
        let launches: Vec<String> = profiles
            .iter()
            .map(|p| {
                let w = work(p, &model::H100);
                let occ = model::occupancy(
                    &model::H100,
                    w.blocks,
                    w.threads,
                    w.dynamic_smem,
                    w.resources,
                );
                let waves = occ.map_or("does not fit".into(), |o| {
                    format!("{:.2} waves of {}/SM", o.waves, o.blocks_per_sm)
                });
                format!("{}: {} blocks, {waves}", p.kernel, p.blocks)
            })
            .collect();
        let sampled = profiles.iter().any(|p| p.sampled);
        let dram: f64 = profiles.iter().map(LaunchProfile::dram_bytes).sum();
        let (fb, ff) = floor(m);
        let cublas = model::ideal_time(&model::H100, &unfused(m), 0.85, true);
        let fl = model::ideal_time(&model::H100, &[(fb, ff)], 1.0, false);
        println!(
            "| {m} | {} | {} ({took:.0} s) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |",
            launches.join("; "),
            if sampled { "sampled" } else { "exact" },
            dram / 1e6,
            fb / 1e6,
            times[0] * 1e6,
            cublas * 1e6,
            fl * 1e6,
            times[0] / cublas,
            times[1] * 1e6,
        );
    }
    Ok(())
}
