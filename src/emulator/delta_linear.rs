//! The delta-linear family on the emulator: host slices in, the same plans as the GPU.

use super::{run, HostBufs};
use crate::delta_linear::{
    DeltaApplyDims, DeltaLinear, DeltaLinearDims, HostDeltaApplyArgs, HostDeltaApplyBackwardArgs,
    HostDeltaApplyTrainArgs, HostDeltaLinearArgs, HostDeltaLinearBackwardArgs,
    HostDeltaLinearTrainArgs, HostLoraMergeArgs, LoraMergeDims,
};
use crate::plan::delta_linear::{self as plan, DeltaApplyBufs, DeltaLinearBufs};
use crate::plan::delta_linear_backward::{self as backward_plan, DeltaLinearBackwardBufs};
use crate::plan::Buf;
use crate::quant::{
    HostDeltaLinearQuantArgs, HostDeltaLinearQuantBackwardArgs, HostDeltaLinearQuantTrainArgs,
    HostQuantDequantizeArgs,
};
use crate::{Element, Result};

/// `y = compose(x·Wᵀ + b, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)` (see
/// [`crate::delta_linear`]) on the CPU emulator. Every argument is checked before anything
/// runs.
pub fn delta_linear<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(linear_names(&b));
    run(&plan::delta_linear(op, dims, T::DTYPE, &b)?, &host)
}

/// `delta_linear` over a quantized frozen W ([`crate::quant`]) on the CPU emulator.
pub fn delta_linear_quant<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearQuantArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(linear_names(&b.forward));
    run(&plan::delta_linear_quant(op, dims, T::DTYPE, &b)?, &host)
}

/// `quant_dequantize` ([`crate::quant::QuantDequantizeArgs`]) on the CPU emulator.
pub fn quant_dequantize<T: Element>(
    n: usize,
    k: usize,
    args: HostQuantDequantizeArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([("out", Some(b.out))]);
    run(&plan::quant_dequantize(n, k, T::DTYPE, &b)?, &host)
}

/// The backward of [`delta_linear_quant_train`]'s forward on the CPU emulator.
pub fn delta_linear_quant_backward<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearQuantBackwardArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(backward_names(&b.backward));
    run(
        &backward_plan::delta_linear_quant_backward(op, dims, T::DTYPE, &b)?,
        &host,
    )
}

/// [`delta_linear_quant`] in training mode (as [`delta_linear_train`]).
pub fn delta_linear_quant_train<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearQuantTrainArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(linear_names(&b.forward.forward));
    host.name([("saved", Some(b.saved))]);
    run(
        &plan::delta_linear_quant_train(op, dims, T::DTYPE, &b)?,
        &host,
    )
}

/// [`delta_linear`] in training mode: also saves, in `saved` (f32,
/// [`DeltaLinearDims::saved_len`]), what [`delta_linear_backward`] reads.
pub fn delta_linear_train<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearTrainArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(linear_names(&b.forward));
    host.name([("saved", Some(b.saved))]);
    run(&plan::delta_linear_train(op, dims, T::DTYPE, &b)?, &host)
}

/// The backward of [`delta_linear_train`]'s forward (see
/// [`crate::delta_linear::DeltaLinearBackwardArgs`]) on the CPU emulator.
pub fn delta_linear_backward<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: HostDeltaLinearBackwardArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(backward_names(&b));
    run(
        &backward_plan::delta_linear_backward(op, dims, T::DTYPE, &b)?,
        &host,
    )
}

/// `y = compose(h, Δh)` per head slice for a given h (the multi-head parallel adapter with
/// `heads > 1`), on the CPU emulator.
pub fn delta_apply<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: HostDeltaApplyArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(apply_names(&b));
    run(&plan::delta_apply(op, dims, T::DTYPE, &b)?, &host)
}

/// [`delta_apply`] in training mode: also saves z (f32, [`DeltaApplyDims::saved_len`]) for
/// [`delta_apply_backward`].
pub fn delta_apply_train<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: HostDeltaApplyTrainArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name(apply_names(&b.forward));
    host.name([("saved", Some(b.saved))]);
    run(&plan::delta_apply_train(op, dims, T::DTYPE, &b)?, &host)
}

/// The backward of [`delta_apply_train`]'s forward (see
/// [`crate::delta_linear::DeltaApplyBackwardArgs`]) on the CPU emulator.
pub fn delta_apply_backward<T: Element>(
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: HostDeltaApplyBackwardArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("dy", Some(b.dy)),
        ("h", b.h),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("saved", Some(b.saved)),
        ("dh", Some(b.dh)),
        ("du", b.du),
        ("dw_down", Some(b.dw_down)),
        ("db_down", b.db_down),
        ("dw_up", Some(b.dw_up)),
        ("db_up", b.db_up),
        ("dgate", b.dgate),
        ("workspace", Some(b.workspace)),
    ]);
    run(
        &backward_plan::delta_apply_backward(op, dims, T::DTYPE, &b)?,
        &host,
    )
}

/// Merges LoRA into the frozen weight in place on the CPU emulator, `W ← W + scale·B·A`
/// (B·A = W_up·W_down): `scale` = s to merge, −s to unmerge, with s the layer's LoRA scale
/// (not α): `op.composition.scale(dims.r)` of its [`DeltaLinear`]
/// ([`crate::Composition::scale`]).
pub fn lora_merge<T: Element>(
    dims: &LoraMergeDims,
    scale: f32,
    args: HostLoraMergeArgs<'_, T>,
) -> Result<()> {
    let mut host = HostBufs::default();
    let b = args.bufs(&mut host);
    host.name([
        ("w", Some(b.w)),
        ("w_down", Some(b.w_down)),
        ("w_up", Some(b.w_up)),
    ]);
    run(&[plan::lora_merge(T::DTYPE, dims, scale, &b)?], &host)
}

/// The checks' names of a forward's buffers (training mode adds `saved`).
pub(super) fn linear_names(b: &DeltaLinearBufs) -> [(&'static str, Option<Buf>); 11] {
    [
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
    ]
}

/// The checks' names of `delta_linear_backward`'s buffers.
fn backward_names(b: &DeltaLinearBackwardBufs) -> [(&'static str, Option<Buf>); 17] {
    [
        ("dy", Some(b.dy)),
        ("x", Some(b.x)),
        ("w", Some(b.w)),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("saved", Some(b.saved)),
        ("dx", Some(b.dx)),
        ("du", b.du),
        ("dw_down", Some(b.dw_down)),
        ("db_down", b.db_down),
        ("dw_up", Some(b.dw_up)),
        ("db_up", b.db_up),
        ("dgate", b.dgate),
        ("workspace", Some(b.workspace)),
    ]
}

/// The checks' names of `delta_apply`'s buffers (training mode adds `saved`).
fn apply_names(b: &DeltaApplyBufs) -> [(&'static str, Option<Buf>); 9] {
    [
        ("h", b.h),
        ("u", b.u),
        ("w_down", Some(b.w_down)),
        ("b_down", b.b_down),
        ("w_up", Some(b.w_up)),
        ("b_up", b.b_up),
        ("gate", b.gate),
        ("workspace", Some(b.workspace)),
        ("y", Some(b.y)),
    ]
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
        let op = DeltaLinear::lora(16.0);
        let args = crate::delta_linear::DeltaLinearArgs {
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
