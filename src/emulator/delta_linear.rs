//! The delta-linear family on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::delta_linear::{
    DeltaApplyArgs, DeltaApplyDims, DeltaLinear, DeltaLinearArgs, DeltaLinearDims, LoraMergeArgs,
    LoraMergeDims,
};
use crate::plan::delta_linear as plan;
use crate::{Element, Result};

/// `y = compose(x·Wᵀ + b, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)` (see
/// [`crate::delta_linear`]) on the CPU emulator. Every argument is checked before anything
/// runs.
pub fn delta_linear<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeltaLinearArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("x", Some(b.x)),
        ("w", Some(b.w)),
        ("bias", b.bias),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("b_down", b.b_down),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("workspace", Some(b.workspace)),
        ("y", Some(b.y)),
    ]);
    run(&plan::delta_linear(op, dims, T::DTYPE, &b)?, &host)
}

/// `y = compose(h, Δh)` per head slice for a given h (the multi-head parallel adapter with
/// `heads > 1`), on the CPU emulator.
pub fn delta_apply<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeltaApplyArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("h", b.h),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("b_down", b.b_down),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("workspace", Some(b.workspace)),
        ("y", Some(b.y)),
    ]);
    run(&plan::delta_apply(op, dims, T::DTYPE, &b)?, &host)
}

/// Merges LoRA into the frozen weight in place on the CPU emulator, `W ← W + scale·B·A`:
/// `scale` = s to merge, −s to unmerge, with s the LoRA scale α / r (what
/// `DeltaLinear::lora(α, r)` scales by; not α).
pub fn lora_merge<T: Element>(
    dims: &LoraMergeDims,
    scale: f32,
    args: LoraMergeArgs<&[T], &mut [T]>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("w", Some(b.w)),
        ("lora_a", Some(b.lora_a)),
        ("lora_b", Some(b.lora_b)),
    ]);
    run(&[plan::lora_merge(T::DTYPE, dims, scale, &b)?], &host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::{checks_available, with_checks, Checks};
    use crate::Error;

    /// initcheck follows the workspace over a plan: the split-K reduce alone, without the
    /// passes that write the partial sums it adds, reads workspace no launch wrote.
    #[test]
    fn initcheck_catches_a_read_of_unwritten_workspace() {
        if !checks_available() {
            return;
        }
        // A decode shape whose main pass splits over K (tests/delta_linear.rs,
        // passes_split_over_k).
        let dims = DeltaLinearDims::new(1, 40, 4224, 16);
        let (m, n, k, r) = (dims.m, dims.n, dims.k, dims.r);
        let x = vec![half::bf16::from_f32(0.5); m * k];
        let w = vec![half::bf16::from_f32(0.25); n * k];
        let w_down = vec![half::bf16::from_f32(0.125); r * k];
        let w_up = vec![half::bf16::from_f32(1.0); n * r];
        let mut workspace = vec![half::bf16::ZERO; dims.workspace_len()];
        let mut y = vec![half::bf16::NAN; m * n];
        let op = DeltaLinear::lora(16.0, r);
        let args = DeltaLinearArgs {
            x: &x[..],
            w: &w,
            bias: None,
            u: None,
            w_down: &w_down,
            b_down: None,
            w_up: &w_up,
            b_up: None,
            gate: None,
            workspace: &mut workspace[..],
            y: &mut y[..],
        };
        let mut host = HostBufs::default();
        let b = args.bufs(&mut host);
        host.name([("workspace", Some(b.workspace)), ("y", Some(b.y))]);
        let steps = plan::delta_linear(&op, &dims, crate::DType::BF16, &b).unwrap();
        assert!(steps.len() >= 2, "the shape no longer splits");
        // The whole plan passes every check.
        with_checks(Checks::ALL, || super::super::run(&steps, &host)).unwrap();
        // The last step (the reduce) alone reads partial sums no launch of its plan wrote.
        let last = &steps[steps.len() - 1..];
        match with_checks(Checks::INITCHECK, || super::super::run(last, &host)) {
            Err(Error::Emulator { message, .. }) => assert!(
                message.contains("initcheck in kernel `")
                    && message.contains("read of `workspace` at byte offset")
                    && message.contains("which no launch of the plan has written"),
                "{message}"
            ),
            other => panic!("expected an initcheck finding, got {other:?}"),
        }
        // The checks see the real kernels' accesses: with w's extent withheld, memcheck
        // refuses the first read of it (the frozen weight, read through cp.async).
        host.buffers.retain(|b| b.addr != w.as_ptr() as u64);
        match with_checks(Checks::MEMCHECK, || super::super::run(&steps, &host)) {
            Err(Error::Emulator { message, .. }) => assert!(
                message.contains("memcheck in kernel `fused_linear_")
                    && message.contains("is outside every buffer of the launch"),
                "{message}"
            ),
            other => panic!("expected a memcheck finding, got {other:?}"),
        }
    }
}
