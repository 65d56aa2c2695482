//! A first performance model of the kernels on an H100 and an A100 (issue 16): occupancy
//! from the launch geometry and ptxas's resource report, and a launch's time from the bytes
//! and FLOPs the emulator's profile counted ([`crate::emulator::profile`]). **Modeled, not
//! measured**: every constant below names its source or says that it is an assumption, and
//! scripts/gpu-check.sh compares the model with Nsight Compute where a GPU is available.
//!
//! A launch's time: `max(DRAM bytes / bandwidth, tensor FLOPs / tensor rate, CUDA-core
//! FLOPs / FP32 rate) / utilisation + launch latency`, where the utilisation is the wave
//! quantisation: `waves / ceil(waves)` for `waves = blocks / (blocks per SM · SMs)` of at least
//! one, and the fraction of SMs with a block, `blocks / SMs`, below one wave of one block per
//! SM (an SM is assumed to draw its 1/SMs share of the bandwidth, no more).

/// A GPU's limits and rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    pub sms: u32,
    /// 32-bit registers per SM.
    pub registers_per_sm: u32,
    /// Shared memory per SM, bytes (the configurable maximum).
    pub smem_per_sm: u32,
    /// Shared memory the runtime reserves per resident block, bytes.
    pub smem_reserved_per_block: u32,
    pub max_blocks_per_sm: u32,
    pub max_threads_per_sm: u32,
    /// Sustained DRAM bandwidth assumed, bytes/s.
    pub dram_bandwidth: f64,
    /// Dense f16/bf16 tensor rate through mma.sync (FLOP/s).
    pub mma_sync_rate: f64,
    /// Dense f16/bf16 tensor rate through wgmma (FLOP/s); `None` without wgmma.
    pub wgmma_rate: Option<f64>,
    /// FP32 CUDA-core rate (FLOP/s, an FMA counted as 2).
    pub fp32_rate: f64,
    /// Time from one launch's end to the next's start on a stream, seconds.
    pub launch_latency: f64,
}

/// NVIDIA H100 SXM5 80 GB. SMs, registers, shared memory, blocks and threads per SM: the CUDA
/// C++ Programming Guide, "Compute Capabilities" (compute capability 9.0: 228 KiB shared per
/// SM, 1 KiB reserved per block, 32 blocks, 2048 threads, 64 K registers) and the H100
/// datasheet (132 SMs on SXM5). DRAM: 3.35 TB/s peak (datasheet); 3.0 TB/s (90%) assumed
/// sustainable, issue 16's figure. Tensor: 989.4 dense bf16 TFLOPS (datasheet, wgmma);
/// mma.sync reaches far less on Hopper (Luo et al., "Benchmarking and Dissecting the Nvidia
/// Hopper GPU Architecture", arXiv:2402.13499): half the wgmma rate is an ASSUMPTION until
/// measured. FP32: 67 TFLOPS (datasheet). Launch latency: 3 µs, an ASSUMPTION (a typical
/// back-to-back kernel gap; CUDA graphs and programmatic dependent launch shorten it).
pub const H100: Gpu = Gpu {
    name: "H100 SXM5",
    sms: 132,
    registers_per_sm: 65536,
    smem_per_sm: 228 * 1024,
    smem_reserved_per_block: 1024,
    max_blocks_per_sm: 32,
    max_threads_per_sm: 2048,
    dram_bandwidth: 3.0e12,
    mma_sync_rate: 0.5 * 989.4e12,
    wgmma_rate: Some(989.4e12),
    fp32_rate: 67e12,
    launch_latency: 3e-6,
};

/// NVIDIA A100 SXM4 80 GB. Limits: the CUDA C++ Programming Guide (compute capability 8.0:
/// 164 KiB shared per SM, 1 KiB reserved per block, 32 blocks, 2048 threads, 64 K registers),
/// 108 SMs (A100 datasheet). DRAM 2.039 TB/s peak (datasheet), 90% assumed sustainable as for
/// the H100. Tensor: 312 dense bf16 TFLOPS (datasheet; mma.sync is A100's native path). FP32:
/// 19.5 TFLOPS (datasheet). Launch latency as the H100's (ASSUMPTION).
pub const A100: Gpu = Gpu {
    name: "A100 SXM4",
    sms: 108,
    registers_per_sm: 65536,
    smem_per_sm: 164 * 1024,
    smem_reserved_per_block: 1024,
    max_blocks_per_sm: 32,
    max_threads_per_sm: 2048,
    dram_bandwidth: 0.9 * 2.039e12,
    mma_sync_rate: 312e12,
    wgmma_rate: None,
    fp32_rate: 19.5e12,
    launch_latency: 3e-6,
};

/// A kernel's resources from ptxas's `-v` report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub static_smem: u32,
}

/// The kernels of a ptxas `-v` report (`nvcc -Xptxas -v`; build/cuda.rs keeps one beside
/// each cubin) with their registers and static shared memory:
/// ```text
/// ptxas info    : Compiling entry function 'NAME' for 'sm_90'
/// ptxas info    : Function properties for NAME
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 40 registers, used 1 barriers, 4352 bytes smem, 392 bytes cmem[0]
/// ```
pub fn parse_ptxas(report: &str) -> Vec<(String, Resources)> {
    let mut out: Vec<(String, Resources)> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(name) = rest.split('\'').next() {
                out.push((name.to_owned(), Resources::default()));
            }
            continue;
        }
        let Some((_, r)) = out.last_mut() else {
            continue;
        };
        if !line.contains("Used ") {
            continue;
        }
        let number_before = |what: &str| -> Option<u32> {
            let head = &line[..line.find(what)?];
            head.split([' ', ',', ':'])
                .rfind(|w| !w.is_empty())?
                .parse()
                .ok()
        };
        r.registers = number_before(" registers").unwrap_or(0);
        r.static_smem = number_before(" bytes smem").unwrap_or(0);
    }
    out
}

/// What limits the blocks resident per SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Blocks,
    Threads,
    Registers,
    SharedMemory,
}

/// Resident blocks per SM and waves of a launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Occupancy {
    pub blocks_per_sm: u32,
    pub limiter: Limiter,
    /// Resident warps per SM over the maximum (64).
    pub warp_occupancy: f64,
    /// blocks / (blocks_per_sm · SMs).
    pub waves: f64,
}

/// The occupancy of `blocks` blocks of `threads` threads with `dynamic_smem` bytes each, by
/// the CUDA occupancy calculator's rules (registers allocated per warp in units of 256,
/// per thread rounded up to 8; shared memory per block plus the reserved 1 KiB). Without
/// `resources` (no ptxas report: a build without the `cuda` feature) registers are not a
/// limit and static shared memory counts as 0. `None` when one block does not fit.
pub fn occupancy(
    gpu: &Gpu,
    blocks: u64,
    threads: u32,
    dynamic_smem: u32,
    resources: Option<Resources>,
) -> Option<Occupancy> {
    let res = resources.unwrap_or_default();
    let warps = threads.div_ceil(32);
    let mut limits = vec![
        (gpu.max_blocks_per_sm, Limiter::Blocks),
        (
            gpu.max_threads_per_sm / (warps * 32).max(1),
            Limiter::Threads,
        ),
    ];
    if res.registers > 0 {
        let per_warp = (res.registers.next_multiple_of(8) * 32).next_multiple_of(256);
        limits.push((
            gpu.registers_per_sm / (per_warp * warps),
            Limiter::Registers,
        ));
    }
    let smem = res.static_smem + dynamic_smem + gpu.smem_reserved_per_block;
    limits.push((gpu.smem_per_sm / smem, Limiter::SharedMemory));
    let (blocks_per_sm, limiter) = limits.into_iter().min_by_key(|&(n, _)| n)?;
    if blocks_per_sm == 0 {
        return None;
    }
    Some(Occupancy {
        blocks_per_sm,
        limiter,
        warp_occupancy: f64::from(blocks_per_sm * warps) / f64::from(gpu.max_threads_per_sm / 32),
        waves: blocks as f64 / f64::from(blocks_per_sm * gpu.sms),
    })
}

/// The work of one launch, as the profile counts it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LaunchWork {
    pub blocks: u64,
    pub threads: u32,
    pub dynamic_smem: u32,
    pub resources: Option<Resources>,
    /// Compulsory DRAM bytes (distinct sectors, loads and stores).
    pub dram_bytes: f64,
    /// Tensor-core FLOPs, and whether they run on wgmma (else mma.sync).
    pub tensor_flops: f64,
    pub wgmma: bool,
    /// CUDA-core FLOPs.
    pub fp32_flops: f64,
}

/// The modeled time of one launch on `gpu`, seconds (see the module comment); `None` when a
/// block does not fit on an SM, or the launch uses wgmma and `gpu` has none.
pub fn launch_time(gpu: &Gpu, w: &LaunchWork) -> Option<f64> {
    let occ = occupancy(gpu, w.blocks, w.threads, w.dynamic_smem, w.resources)?;
    let tensor_rate = if w.wgmma {
        gpu.wgmma_rate?
    } else {
        gpu.mma_sync_rate
    };
    let busy = (w.dram_bytes / gpu.dram_bandwidth)
        .max(w.tensor_flops / tensor_rate)
        .max(w.fp32_flops / gpu.fp32_rate);
    let utilisation = if occ.waves >= 1.0 {
        occ.waves / occ.waves.ceil()
    } else {
        (w.blocks as f64 / f64::from(gpu.sms)).min(1.0)
    };
    Some(busy / utilisation.max(f64::MIN_POSITIVE) + gpu.launch_latency)
}

/// The modeled time of a sequence of launches of ideal traffic and `efficiency` of the
/// tensor peak (wgmma where the GPU has it), each a full-GPU launch: the unfused cuBLAS
/// baseline (85%, issue 16's figure for cuBLAS's large GEMMs) and the physical floor
/// (efficiency 1, no launch latency: `latency` false).
pub fn ideal_time(gpu: &Gpu, launches: &[(f64, f64)], efficiency: f64, latency: bool) -> f64 {
    let rate = gpu.wgmma_rate.unwrap_or(gpu.mma_sync_rate) * efficiency;
    launches
        .iter()
        .map(|&(bytes, flops)| {
            (bytes / gpu.dram_bandwidth).max(flops / rate)
                + if latency { gpu.launch_latency } else { 0.0 }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_parse() {
        let report = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k1' for 'sm_90'\n\
            ptxas info    : Function properties for k1\n    \
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 168 registers, used 1 barriers, 4352 bytes smem, 392 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'k2' for 'sm_90'\n\
            ptxas info    : Used 32 registers, 380 bytes cmem[0]\n";
        let r = parse_ptxas(report);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            (
                "k1".to_owned(),
                Resources {
                    registers: 168,
                    static_smem: 4352
                }
            )
        );
        assert_eq!(r[1].1.registers, 32);
        assert_eq!(r[1].1.static_smem, 0);
    }

    #[test]
    fn occupancy_follows_the_calculator() {
        // 256 threads at 128 registers: 8 warps · 4096 registers = 32 K per block, 2 per SM.
        let r = Resources {
            registers: 128,
            static_smem: 0,
        };
        let o = occupancy(&H100, 264, 256, 0, Some(r)).unwrap();
        assert_eq!((o.blocks_per_sm, o.limiter), (2, Limiter::Registers));
        assert_eq!(o.waves, 1.0);
        // 80 KiB of dynamic shared memory: 228 / 81 = 2 on an H100, 164 / 81 = 2 on an A100;
        // 100 KiB: 2 and 1.
        let o = occupancy(&A100, 1, 128, 100 * 1024, None).unwrap();
        assert_eq!((o.blocks_per_sm, o.limiter), (1, Limiter::SharedMemory));
        assert_eq!(
            occupancy(&H100, 1, 128, 100 * 1024, None)
                .unwrap()
                .blocks_per_sm,
            2
        );
        assert!(occupancy(&A100, 1, 128, 200 * 1024, None).is_none());
        // 1024 threads: 2 per SM by threads.
        let o = occupancy(&H100, 1, 1024, 0, None).unwrap();
        assert_eq!((o.blocks_per_sm, o.limiter), (2, Limiter::Threads));
    }

    #[test]
    fn waves_quantise_the_time() {
        let w = |blocks| LaunchWork {
            blocks,
            threads: 1024,
            dynamic_smem: 0,
            resources: None,
            dram_bytes: 3.0e9,
            tensor_flops: 0.0,
            wgmma: false,
            fp32_flops: 0.0,
        };
        // 1 ms of traffic: 264 blocks fill one wave exactly, 265 start a second.
        let full = launch_time(&H100, &w(264)).unwrap() - H100.launch_latency;
        let over = launch_time(&H100, &w(265)).unwrap() - H100.launch_latency;
        assert!((full - 1e-3).abs() < 1e-12);
        assert!((over - 1e-3 * 2.0 / (265.0 / 264.0)).abs() < 1e-9);
        // 66 blocks: half the SMs, half the bandwidth.
        let half = launch_time(&H100, &w(66)).unwrap() - H100.launch_latency;
        assert!((half - 2e-3).abs() < 1e-12);
    }
}
