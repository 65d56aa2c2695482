//! The model of issue 16 against the GPU (item 6). scripts/gpu-check.sh runs `model_csv`
//! (the emulator's profile of each launch of the fused LoRA plans and its modeled H100 time:
//! CPU only, anywhere) and then `run_plans_on_gpu` under Nsight Compute, and joins the two
//! launch by launch: modeled against measured time, DRAM bytes, global sectors per request
//! and shared bank conflicts. Both walk the same plans in the same order.

use half::bf16;
use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
use peft_kernels::emulator::{self, LaunchProfile, Sampling};
use peft_kernels::model::{self, LaunchWork};
use peft_kernels::Result;

/// The plans: LoRA r = 16, bf16, K = N = 4096, at these batch sizes (exact profiles).
const MS: [usize; 4] = [1, 16, 17, 64];
const N: usize = 4096;
const K: usize = 4096;
const R: usize = 16;

struct Plan {
    dims: DeltaLinearDims,
    x: Vec<bf16>,
    w: Vec<bf16>,
    w_down: Vec<bf16>,
    w_up: Vec<bf16>,
    y: Vec<bf16>,
    workspace: Vec<bf16>,
}

impl Plan {
    fn new(m: usize) -> Plan {
        let dims = DeltaLinearDims::new(m, N, K, R);
        let fill = |n: usize| -> Vec<bf16> {
            (0..n)
                .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
                .collect()
        };
        Plan {
            dims,
            x: fill(m * K),
            w: fill(N * K),
            w_down: fill(R * K),
            w_up: fill(N * R),
            y: vec![bf16::ZERO; m * N],
            workspace: vec![bf16::ZERO; dims.workspace_len()],
        }
    }

    fn run(
        &mut self,
        f: impl FnOnce(
            &DeltaLinearDims,
            peft_kernels::delta_linear::HostDeltaLinearArgs<'_, bf16>,
        ) -> Result<()>,
    ) -> Result<()> {
        let args = DeltaLinearArgs {
            x: &self.x[..],
            w: &self.w[..],
            bias: None,
            u: None,
            w_down: &self.w_down[..],
            b_down: None,
            w_up: &self.w_up[..],
            b_up: None,
            gate: None,
            workspace: &mut self.workspace[..],
            y: &mut self.y[..],
        };
        f(&self.dims, args)
    }
}

fn op() -> DeltaLinear {
    DeltaLinear::lora(2.0 * R as f32)
}

/// Global load sectors per request (plain loads and cp.async together), as the profile
/// counts them.
fn sectors_per_request(p: &LaunchProfile) -> f64 {
    let (s, r) = p.operands.iter().fold((0.0, 0.0), |(s, r), o| {
        (s + o.loads.sectors, r + o.loads.requests)
    });
    if r == 0.0 {
        0.0
    } else {
        s / r
    }
}

#[test]
#[ignore = "writes the model's side of scripts/gpu-check.sh's comparison (PEFT_MODEL_CSV)"]
fn model_csv() {
    let mut csv = String::from(
        "m,launch,kernel,blocks,model_us,model_dram_bytes,model_sectors_per_request,model_bank_conflicts\n",
    );
    for m in MS {
        let mut plan = Plan::new(m);
        let (_, profiles) = emulator::profile(Sampling::Exact, || {
            plan.run(|dims, args| emulator::delta_linear(&op(), dims, args))
        })
        .unwrap();
        for (i, p) in profiles.iter().enumerate() {
            let w = LaunchWork {
                blocks: p.blocks as u64,
                threads: p.block.iter().product(),
                dynamic_smem: p.dynamic_smem,
                resources: None,
                dram_bytes: p.dram_bytes(),
                tensor_flops: p.tensor_flops(),
                wgmma: p.wgmma > 0.0,
                fp32_flops: 0.0,
            };
            let t = model::launch_time(&model::H100, &w).unwrap_or(f64::NAN);
            let conflicts = p.shared_loads.conflicts()
                + p.shared_stores.conflicts()
                + (p.ldmatrix_wavefronts - p.ldmatrix_phases);
            csv += &format!(
                "{m},{i},{},{},{:.3},{:.0},{:.3},{:.0}\n",
                p.kernel,
                p.blocks,
                t * 1e6,
                p.dram_bytes(),
                sectors_per_request(p),
                conflicts
            );
        }
    }
    match std::env::var_os("PEFT_MODEL_CSV") {
        Some(path) => std::fs::write(path, csv).unwrap(),
        None => print!("{csv}"),
    }
}

/// The same plans on the GPU, each once, in the same order: Nsight Compute measures them.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn run_plans_on_gpu() {
    let backend = peft_kernels::host::Backend::cuda(0).unwrap();
    for m in MS {
        let mut plan = Plan::new(m);
        plan.run(|dims, args| peft_kernels::host::delta_linear(&backend, &op(), dims, args))
            .unwrap();
    }
}
