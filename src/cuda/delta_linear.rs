//! The delta-linear family on the GPU: cudarc buffers in, the same plans as the emulator.

use cudarc::driver::CudaStream;

use super::{Buffers, DeviceRead, DeviceWrite};
use crate::delta_linear::{
    DeltaApplyArgs, DeltaApplyBackwardArgs, DeltaApplyDims, DeltaApplyTrainArgs, DeltaLinear,
    DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs, LoraMergeArgs,
    LoraMergeDims,
};
use crate::plan::delta_linear as plan;
use crate::plan::delta_linear_backward as backward_plan;
use crate::quant::{
    DeltaLinearQuantArgs, DeltaLinearQuantBackwardArgs, DeltaLinearQuantTrainArgs,
    QuantDequantizeArgs,
};
use crate::{Element, Result};

/// [`DeltaLinearArgs`] over device buffers, as [`delta_linear`] takes them: annotate a `let`
/// with it to build the arguments before the call (`&x` of a `CudaSlice` then coerces).
pub type DeviceDeltaLinearArgs<'a, T> = DeltaLinearArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>;
/// [`DeltaApplyArgs`] over device buffers ([`delta_apply`]).
pub type DeviceDeltaApplyArgs<'a, T> = DeltaApplyArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>;
/// [`LoraMergeArgs`] over device buffers ([`lora_merge`]).
pub type DeviceLoraMergeArgs<'a, T> = LoraMergeArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>>;
/// [`DeltaLinearTrainArgs`] over device buffers ([`delta_linear_train`]).
pub type DeviceDeltaLinearTrainArgs<'a, T> =
    DeltaLinearTrainArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceWrite<'a, f32>>;
/// [`DeltaLinearBackwardArgs`] over device buffers ([`delta_linear_backward`]).
pub type DeviceDeltaLinearBackwardArgs<'a, T> = DeltaLinearBackwardArgs<
    DeviceRead<'a, T>,
    DeviceRead<'a, f32>,
    DeviceWrite<'a, T>,
    DeviceWrite<'a, f32>,
>;
/// [`DeltaApplyTrainArgs`] over device buffers ([`delta_apply_train`]).
pub type DeviceDeltaApplyTrainArgs<'a, T> =
    DeltaApplyTrainArgs<DeviceRead<'a, T>, DeviceWrite<'a, T>, DeviceWrite<'a, f32>>;
/// [`DeltaApplyBackwardArgs`] over device buffers ([`delta_apply_backward`]).
pub type DeviceDeltaApplyBackwardArgs<'a, T> = DeltaApplyBackwardArgs<
    DeviceRead<'a, T>,
    DeviceRead<'a, f32>,
    DeviceWrite<'a, T>,
    DeviceWrite<'a, f32>,
>;

/// `y = compose(x·Wᵀ + b, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)` (see
/// [`crate::delta_linear`]) queued on `stream`. Every argument is checked before anything
/// is queued.
///
/// ```no_run
/// use half::bf16;
/// use peft_kernels::cuda::{self, DeviceDeltaLinearArgs};
/// use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
///
/// // A LoRA layer (r = 16, α = 32) over 8 tokens of a 4096-wide projection, in bf16.
/// let (m, n, k, r) = (8, 4096, 4096, 16);
/// let stream = cuda::context(0)?.default_stream();
/// let x = stream.alloc_zeros::<bf16>(m * k)?;
/// let w = stream.alloc_zeros::<bf16>(n * k)?;
/// // LoRA's A is w_down [r, k], B is w_up [n, r] (crate::delta_linear's docs).
/// let (w_down, w_up) = (stream.alloc_zeros::<bf16>(r * k)?, stream.alloc_zeros::<bf16>(n * r)?);
/// let dims = DeltaLinearDims::new(m, n, k, r);
/// let mut workspace = stream.alloc_zeros::<bf16>(dims.workspace_len())?;
/// let mut y = stream.alloc_zeros::<bf16>(m * n)?;
/// let args: DeviceDeltaLinearArgs<bf16> = DeltaLinearArgs {
///     x: &x, w: &w, bias: None, u: None,
///     w_down: &w_down, b_down: None, w_up: &w_up, b_up: None, gate: None,
///     workspace: &mut workspace, y: &mut y,
/// };
/// cuda::delta_linear(&stream, &DeltaLinear::lora(32.0), &dims, args)?;
/// # Ok::<(), peft_kernels::Error>(())
/// ```
pub fn delta_linear<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeviceDeltaLinearArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_linear(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// [`DeltaLinearQuantArgs`] over device buffers: packed bytes as u8, scales as f32.
pub type DeviceDeltaLinearQuantArgs<'a, T> = DeltaLinearQuantArgs<
    DeviceRead<'a, T>,
    DeviceWrite<'a, T>,
    DeviceRead<'a, u8>,
    DeviceRead<'a, f32>,
>;

/// [`DeltaLinearQuantTrainArgs`] over device buffers.
pub type DeviceDeltaLinearQuantTrainArgs<'a, T> = DeltaLinearQuantTrainArgs<
    DeviceRead<'a, T>,
    DeviceWrite<'a, T>,
    DeviceWrite<'a, f32>,
    DeviceRead<'a, u8>,
    DeviceRead<'a, f32>,
>;
/// [`DeltaLinearQuantBackwardArgs`] over device buffers.
pub type DeviceDeltaLinearQuantBackwardArgs<'a, T> = DeltaLinearQuantBackwardArgs<
    DeviceRead<'a, T>,
    DeviceRead<'a, f32>,
    DeviceWrite<'a, T>,
    DeviceWrite<'a, f32>,
    DeviceRead<'a, u8>,
    DeviceRead<'a, f32>,
>;

/// `delta_linear` over a quantized frozen W ([`crate::quant`]), queued on `stream`.
pub fn delta_linear_quant<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeviceDeltaLinearQuantArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_linear_quant(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// `quant_dequantize` ([`crate::quant::QuantDequantizeArgs`]) queued on `stream`.
pub fn quant_dequantize<'a, T: Element>(
    stream: &'a CudaStream,
    n: usize,
    k: usize,
    args: QuantDequantizeArgs<DeviceWrite<'a, T>, DeviceRead<'a, u8>, DeviceRead<'a, f32>>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::quant_dequantize(n, k, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// The backward of [`delta_linear_quant_train`]'s forward, queued on `stream`.
pub fn delta_linear_quant_backward<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeviceDeltaLinearQuantBackwardArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps =
        backward_plan::delta_linear_quant_backward(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// [`delta_linear_quant`] in training mode, queued on `stream`.
pub fn delta_linear_quant_train<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeviceDeltaLinearQuantTrainArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_linear_quant_train(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// [`delta_linear`] in training mode, queued on `stream`: also saves, in `saved` (f32,
/// [`DeltaLinearDims::saved_len`]), what [`delta_linear_backward`] reads.
pub fn delta_linear_train<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeviceDeltaLinearTrainArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_linear_train(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// The backward of [`delta_linear_train`]'s forward (see
/// [`crate::delta_linear::DeltaLinearBackwardArgs`]), queued on `stream`.
pub fn delta_linear_backward<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DeviceDeltaLinearBackwardArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = backward_plan::delta_linear_backward(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// `y = compose(h, Δh)` per head slice for a given h (the multi-head parallel adapter with
/// `heads > 1`), queued on `stream`.
pub fn delta_apply<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeviceDeltaApplyArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_apply(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&steps) }
}

/// [`delta_apply`] in training mode, queued on `stream`: also saves z (f32,
/// [`DeltaApplyDims::saved_len`]) for [`delta_apply_backward`].
pub fn delta_apply_train<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeviceDeltaApplyTrainArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = plan::delta_apply_train(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// The backward of [`delta_apply_train`]'s forward (see
/// [`crate::delta_linear::DeltaApplyBackwardArgs`]), queued on `stream`.
pub fn delta_apply_backward<'a, T: Element>(
    stream: &'a CudaStream,
    op: &DeltaLinear,
    dims: &DeltaApplyDims,
    args: DeviceDeltaApplyBackwardArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let steps = backward_plan::delta_apply_backward(op, dims, T::DTYPE, &args.bufs(&mut bufs))?;
    // SAFETY: the addresses came from `bufs`, checked by the plan.
    unsafe { bufs.run(&steps) }
}

/// Merges LoRA into the frozen weight in place on `stream`, `W ← W + scale·B·A` (B·A =
/// W_up·W_down): `scale` = s to merge, −s to unmerge, with s the layer's LoRA scale (not α):
/// `op.composition.scale(dims.r)` of its [`DeltaLinear`] ([`crate::Composition::scale`]).
pub fn lora_merge<'a, T: Element>(
    stream: &'a CudaStream,
    dims: &LoraMergeDims,
    scale: f32,
    args: DeviceLoraMergeArgs<'a, T>,
) -> Result<()> {
    let mut bufs = Buffers::new(stream);
    let step = plan::lora_merge(T::DTYPE, dims, scale, &args.bufs(&mut bufs))?;
    // SAFETY: as above.
    unsafe { bufs.run(&[step]) }
}
