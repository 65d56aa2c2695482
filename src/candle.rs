//! The operations as candle layers (feature `candle`): [`DeltaLinearLayer`], a frozen linear
//! layer with its delta (every form of [`DeltaLinear`]: LoRA and rsLoRA, the Houlsby and
//! parallel adapters, the gated delta, and DoRA), which implements [`candle_core::Module`], and
//! [`PrefixAttentionLayer`], prefix tuning's gated attention over learned prefix keys and
//! values.
//!
//! Where each runs, by the device of the tensors:
//! - **CUDA tensors** (features `candle` and `cuda`; candle-core's `cuda` is then on too): the
//!   fused kernels, queued on candle's own stream and reading candle's own `CudaSlice`s in
//!   place. The output is a fresh candle tensor. An activation whose layout the kernel can
//!   read (rows of one stride; attention tensors with a contiguous last dimension, and for
//!   f16/bf16 strides and offset in multiples of 8 elements) is not copied; any other is
//!   made contiguous first (candle's `contiguous`).
//! - **CPU tensors**: candle's own ops, the unfused computation (a CPU runs it well, and
//!   candle's autograd differentiates it). `with_emulator(true)` runs the crate's CPU
//!   emulator of the CUDA kernels instead: a testing backend, 10–100× slower.
//!
//! Training: on the fused paths (CUDA, or the emulator) each call is a candle custom op whose
//! backward runs the crate's training backward (`delta_linear_backward`,
//! `prefix_attention_backward`), so `loss.backward()` returns the adapter's gradients (and
//! those of the inputs: x, a gated delta's λ; q, k, v). The forward then saves what the
//! backward reads (`DeltaLinearDims::saved_len` f32 values, attention's LSE); a call none of
//! whose inputs is tracked (inference) runs the plain forward and saves nothing. The frozen
//! weight and bias get no gradient. Gradients are f32 in the kernels and given to candle in
//! the parameters' dtype.
//!
//! Candle's custom ops take at most three tensors; these ops take up to eight. Each call is
//! therefore a short chain: "stage" ops, each taking up to three of the tracked inputs (the
//! next also the previous stage's one-element token), and the fused op over the last token,
//! which reads every input itself. Its backward computes every gradient at once and hands
//! each stage its share, so nothing but one-element tokens is added to the graph.
//!
//! DoRA, `y = (m / ‖W + s·B·A‖_row) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`, is the delta (without the
//! bias) times a per-column scale computed with candle's ops, `m · (1 / ‖W + s·B·A‖)` with the
//! norm detached (as PEFT does; the norm from `dora_norm` on the fused paths), so m's gradient
//! flows through candle's autograd; then the bias.
//!
//! Errors are `candle_core::Error::Msg` carrying the crate's message (the argument and what
//! was expected).

use std::sync::{Arc, Mutex};

#[cfg(feature = "cuda")]
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType as CandleDType, Device, Layout, Module,
    Shape, Storage, Tensor, WithDType, D,
};
use half::{bf16, f16};

use crate::delta_linear::{
    DeltaLinear, DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs,
};
use crate::dora::{DoraDims, DoraNormArgs};
use crate::prefix_attention::{
    HeadLayout, PrefixAttention, PrefixAttentionArgs, PrefixAttentionBackwardArgs,
    PrefixAttentionBackwardDims, PrefixAttentionDims, PrefixGrad,
};
use crate::{Activation, Composition, DType, Element, Insertion};

type Result<T> = candle_core::Result<T>;

#[cfg(feature = "emulator")]
use crate::emulator as emu;

/// Without the `emulator` feature (a user's CUDA-only build), the emulator opt-in on CPU
/// tensors is an `Unsupported` error; these stand in for the emulator's entry points.
#[cfg(not(feature = "emulator"))]
mod emu {
    use crate::delta_linear::{
        DeltaLinear, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs,
        HostDeltaLinearArgs,
    };
    use crate::dora::{DoraDims, DoraNormArgs};
    use crate::prefix_attention::{
        HostPrefixAttentionArgs, HostPrefixAttentionBackwardArgs, PrefixAttention,
        PrefixAttentionBackwardDims, PrefixAttentionDims,
    };
    use crate::{Element, Error, Result};

    fn off() -> Error {
        Error::Unsupported(
            "with_emulator(true) on CPU tensors needs the crate's `emulator` feature".into(),
        )
    }
    pub fn delta_linear<T: Element>(
        _: &DeltaLinear,
        _: &DeltaLinearDims,
        _: HostDeltaLinearArgs<'_, T>,
    ) -> Result<()> {
        Err(off())
    }
    pub fn delta_linear_train<T: Element>(
        _: &DeltaLinear,
        _: &DeltaLinearDims,
        _: DeltaLinearTrainArgs<&[T], &mut [T], &mut [f32]>,
    ) -> Result<()> {
        Err(off())
    }
    pub fn delta_linear_backward<T: Element>(
        _: &DeltaLinear,
        _: &DeltaLinearDims,
        _: DeltaLinearBackwardArgs<&[T], &[f32], &mut [T], &mut [f32]>,
    ) -> Result<()> {
        Err(off())
    }
    pub fn dora_norm<T: Element>(
        _: &DoraDims,
        _: f32,
        _: DoraNormArgs<&[T], &mut [f32]>,
    ) -> Result<()> {
        Err(off())
    }
    pub fn prefix_attention<T: Element>(
        _: &PrefixAttention,
        _: &PrefixAttentionDims,
        _: HostPrefixAttentionArgs<'_, T>,
    ) -> Result<()> {
        Err(off())
    }
    pub fn prefix_attention_backward<T: Element>(
        _: &PrefixAttention,
        _: &PrefixAttentionBackwardDims,
        _: HostPrefixAttentionBackwardArgs<'_, T>,
    ) -> Result<()> {
        Err(off())
    }
}

/// The crate's error as candle's.
fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("peft-kernels: {e}"))
}

/// An invalid argument of `op`, as candle's error.
fn invalid(
    op: &'static str,
    arg: &'static str,
    expected: impl std::fmt::Display,
    got: impl std::fmt::Display,
) -> candle_core::Error {
    wrap(crate::Error::invalid(arg, expected, got).of(op))
}

/// The crate's dtype of a candle tensor: f32, f16 or bf16.
fn elem_dtype(op: &'static str, arg: &'static str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        CandleDType::F32 => Ok(DType::F32),
        CandleDType::F16 => Ok(DType::F16),
        CandleDType::BF16 => Ok(DType::BF16),
        other => Err(invalid(op, arg, "f32, f16 or bf16", format!("{other:?}"))),
    }
}

/// `t` has the dtype and device of the layer (named by `of`).
fn same_kind(op: &'static str, arg: &'static str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.dtype() != like.dtype() {
        return Err(invalid(
            op,
            arg,
            format!("dtype {:?} (the layer's)", like.dtype()),
            format!("{:?}", t.dtype()),
        ));
    }
    if !t.device().same_device(like.device()) {
        return Err(invalid(
            op,
            arg,
            format!(
                "a tensor on {:?} (the layer's device)",
                like.device().location()
            ),
            format!("{:?}", t.device().location()),
        ));
    }
    Ok(())
}

/// `t` has exactly `shape` (`names` spells it out for the message).
fn check_shape(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    names: &str,
    shape: &[usize],
) -> Result<()> {
    if t.dims() != shape {
        return Err(invalid(
            op,
            arg,
            format!("{names} = {shape:?}"),
            format!("{:?}", t.dims()),
        ));
    }
    Ok(())
}

/// Runs `$f::<T>(args)` for the element type of a crate dtype.
macro_rules! dispatch {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
        }
    };
}

/// An element type both crates (and, with `cuda`, candle's CUDA backend) know.
#[cfg(not(feature = "cuda"))]
trait Elem: Element + WithDType {}
#[cfg(not(feature = "cuda"))]
impl<T: Element + WithDType> Elem for T {}
#[cfg(feature = "cuda")]
trait Elem: Element + WithDType + candle_core::cuda_backend::CudaDType {}
#[cfg(feature = "cuda")]
impl<T: Element + WithDType + candle_core::cuda_backend::CudaDType> Elem for T {}

/// The rows of an activation `[..., cols]`: `(rows, row stride)` when its leading dimensions
/// flatten to one of a single stride and its last is contiguous (a layout the kernels read
/// as it is), else `None`.
fn rows_view(layout: &Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let rank = dims.len();
    let cols = *dims.last()?;
    if cols > 1 && strides[rank - 1] != 1 {
        return None;
    }
    let rows: usize = dims[..rank - 1].iter().product();
    // Innermost leading dimension first; dimensions of size 1 have no stride that matters.
    let (mut ld, mut next) = (None, 0);
    for i in (0..rank - 1).rev().filter(|&i| dims[i] > 1) {
        match ld {
            None => ld = Some(strides[i]),
            Some(_) if strides[i] != next => return None,
            Some(_) => {}
        }
        next = strides[i] * dims[i];
    }
    match ld {
        None => Some((rows, cols)),
        Some(ld) if ld >= cols => Some((rows, ld)),
        Some(_) => None,
    }
}

/// `x` as rows the kernels read: itself when [`rows_view`] allows, else a contiguous copy;
/// with `(rows, row stride)`.
fn as_rows(x: &Tensor) -> Result<(Tensor, usize, usize)> {
    if let Some((m, ld)) = rows_view(x.layout()) {
        return Ok((x.clone(), m, ld));
    }
    let x = x.contiguous()?;
    let (m, ld) = rows_view(x.layout()).expect("a contiguous tensor has rows");
    Ok((x, m, ld))
}

/// A [`MatrixLayout`](crate::MatrixLayout)-style length: the elements `rows` rows of `cols`
/// with stride `ld` span.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    crate::MatrixLayout { rows, cols, ld }.min_len()
}

// ---------------------------------------------------------------------------------------------
// Fused operations over any number of tensors, as a chain of candle custom ops.

/// A fused operation over several tensors (slots, some absent) with its backward.
trait Fused: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The output's storage and shape and, with `train`, what the backward reads.
    fn forward(
        &self,
        inputs: &[Option<Tensor>],
        train: bool,
    ) -> Result<(Storage, Shape, Vec<Tensor>)>;
    /// The gradient of every tracked input (by slot) from the output gradient `dout`.
    fn backward(
        &self,
        inputs: &[Option<Tensor>],
        saved: &[Tensor],
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<Vec<Option<Tensor>>>;
}

/// What the chain of one call shares: the inputs, the forward's saved tensors, the backward's
/// gradients (taken by the stages).
struct Shared<F> {
    op: F,
    inputs: Vec<Option<Tensor>>,
    train: bool,
    saved: Mutex<Vec<Tensor>>,
    grads: Mutex<Vec<Option<Tensor>>>,
}

#[cfg(feature = "cuda")]
fn cuda_err(e: cudarc::driver::DriverError) -> candle_core::Error {
    wrap(crate::Error::from(e))
}

/// A one-element zero gradient for a token.
fn token_grad(token: &Tensor) -> Result<Tensor> {
    token.zeros_like()
}

/// A link of the chain: carries up to three tracked inputs (the slots `slots`; after the
/// first, the previous token too) into the graph.
struct Stage<F> {
    shared: Arc<Shared<F>>,
    slots: Vec<usize>,
    chained: bool,
}

impl<F: Fused> Stage<F> {
    fn grads(&self, token: Option<&Tensor>) -> Result<Vec<Option<Tensor>>> {
        let mut all = self.shared.grads.lock().expect("gradients lock");
        let mut out = Vec::new();
        if let Some(t) = token {
            out.push(Some(token_grad(t)?));
        }
        for &s in &self.slots {
            out.push(all.get_mut(s).and_then(Option::take));
        }
        Ok(out)
    }
}

impl<F: Fused> CustomOp1 for Stage<F> {
    fn name(&self) -> &'static str {
        self.shared.op.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_token(s)
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        // A one-tensor stage is the first: no token before it.
        Ok(self.grads(None)?.remove(0))
    }
}

impl<F: Fused> CustomOp2 for Stage<F> {
    fn name(&self) -> &'static str {
        self.shared.op.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_token(s)
    }
    fn bwd(
        &self,
        a: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(self.chained.then_some(a))?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl<F: Fused> CustomOp3 for Stage<F> {
    fn name(&self) -> &'static str {
        self.shared.op.name()
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_token(s)
    }
    fn bwd(
        &self,
        a: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(self.chained.then_some(a))?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(feature = "cuda")]
fn cuda_token(s: &candle_core::CudaStorage) -> Result<(candle_core::CudaStorage, Shape)> {
    let slice = s
        .device
        .cuda_stream()
        .alloc_zeros::<f32>(1)
        .map_err(cuda_err)?;
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(slice, s.device.clone()),
        Shape::from(1),
    ))
}

/// The end of the chain: runs the fused forward (reading every input itself) and, backwards,
/// computes every gradient for the stages.
struct Final<F>(Arc<Shared<F>>);

impl<F: Fused> Final<F> {
    fn run(&self) -> Result<(Storage, Shape)> {
        let s = &self.0;
        let (storage, shape, saved) = s.op.forward(&s.inputs, s.train)?;
        *s.saved.lock().expect("saved lock") = saved;
        Ok((storage, shape))
    }
}

impl<F: Fused> CustomOp1 for Final<F> {
    fn name(&self) -> &'static str {
        self.0.op.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.run()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => unreachable!("CPU inputs give a CPU output"),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.run()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => unreachable!("CUDA inputs give a CUDA output"),
        }
    }
    fn bwd(&self, token: &Tensor, out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let s = &self.0;
        let saved = std::mem::take(&mut *s.saved.lock().expect("saved lock"));
        let grads = s.op.backward(&s.inputs, &saved, out, dout)?;
        *s.grads.lock().expect("gradients lock") = grads;
        Ok(Some(token_grad(token)?))
    }
}

/// Runs `op` over `inputs` (by slot; `device` is theirs). Inputs that candle tracks join the
/// graph through the stages; with none tracked, the plain forward runs and nothing is saved.
fn apply_fused<F: Fused>(op: F, inputs: Vec<Option<Tensor>>, device: &Device) -> Result<Tensor> {
    let tracked: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].as_ref().is_some_and(Tensor::track_op))
        .collect();
    let shared = Arc::new(Shared {
        op,
        inputs,
        train: !tracked.is_empty(),
        saved: Mutex::new(Vec::new()),
        grads: Mutex::new(Vec::new()),
    });
    let zero = || Tensor::zeros(1, CandleDType::F32, device);
    if tracked.is_empty() {
        return zero()?.apply_op1_no_bwd(&Final(shared));
    }
    let mut token: Option<Tensor> = None;
    let mut rest = &tracked[..];
    while !rest.is_empty() {
        let room = if token.is_some() { 2 } else { 3 };
        let (group, tail) = rest.split_at(room.min(rest.len()));
        rest = tail;
        let args: Vec<Tensor> = token
            .iter()
            .cloned()
            .chain(group.iter().map(|&i| {
                shared.inputs[i]
                    .clone()
                    .expect("a tracked slot holds a tensor")
            }))
            .collect();
        let stage = Stage {
            shared: shared.clone(),
            slots: group.to_vec(),
            chained: token.is_some(),
        };
        token = Some(match &args[..] {
            [a] => CustomOp1Apply::apply1(a, stage)?,
            [a, b] => a.apply_op2(b, stage)?,
            [a, b, c] => a.apply_op3(b, c, stage)?,
            _ => unreachable!("a stage takes one to three tensors"),
        });
    }
    token.expect("at least one stage").apply_op1(Final(shared))
}

/// `apply_op1` for a [`Stage`] (which implements all three custom-op traits).
trait CustomOp1Apply {
    fn apply1<F: Fused>(&self, stage: Stage<F>) -> Result<Tensor>;
}

impl CustomOp1Apply for Tensor {
    fn apply1<F: Fused>(&self, stage: Stage<F>) -> Result<Tensor> {
        self.apply_op1_arc(Arc::new(Box::new(stage)))
    }
}

/// The storages of a call's inputs, read-locked while the kernels are queued.
struct Held<'a> {
    guards: Vec<Option<(candle_core::StorageRef<'a>, &'a Layout)>>,
}

impl<'a> Held<'a> {
    fn new(inputs: &'a [Option<Tensor>]) -> Self {
        Held {
            guards: inputs
                .iter()
                .map(|t| t.as_ref().map(Tensor::storage_and_layout))
                .collect(),
        }
    }

    fn is_cpu(&self) -> bool {
        self.guards
            .iter()
            .flatten()
            .next()
            .is_some_and(|(s, _)| matches!(&**s, Storage::Cpu(_)))
    }

    /// Slot `i`'s `len` elements from its layout's offset, on the CPU.
    fn host<T: Elem>(&self, i: usize, len: usize) -> Result<Option<&[T]>> {
        let Some((s, l)) = &self.guards[i] else {
            return Ok(None);
        };
        let Storage::Cpu(cpu) = &**s else {
            return Err(mixed_devices());
        };
        let all = cpu.as_slice::<T>()?;
        let start = l.start_offset();
        all.get(start..start + len).map(Some).ok_or_else(|| {
            candle_core::Error::Msg(
                "peft-kernels: a tensor's storage is shorter than its layout".into(),
            )
        })
    }

    /// Slot `i`'s `len` elements from its layout's offset, as a view into candle's CUDA
    /// allocation.
    #[cfg(feature = "cuda")]
    fn device<T: Elem>(
        &self,
        i: usize,
        len: usize,
    ) -> Result<Option<cudarc::driver::CudaView<'_, T>>> {
        let Some((s, l)) = &self.guards[i] else {
            return Ok(None);
        };
        let Storage::Cuda(cuda) = &**s else {
            return Err(mixed_devices());
        };
        let start = l.start_offset();
        let slice = cuda.as_cuda_slice::<T>()?;
        if start + len > slice.len() {
            return Err(candle_core::Error::Msg(
                "peft-kernels: a tensor's storage is shorter than its layout".into(),
            ));
        }
        Ok(Some(slice.slice(start..start + len)))
    }

    /// The candle device of the first CUDA input.
    #[cfg(feature = "cuda")]
    fn cuda_device(&self) -> Result<candle_core::CudaDevice> {
        match self.guards.iter().flatten().next().map(|(s, _)| &**s) {
            Some(Storage::Cuda(c)) => Ok(c.device.clone()),
            _ => Err(mixed_devices()),
        }
    }
}

fn mixed_devices() -> candle_core::Error {
    candle_core::Error::Msg("peft-kernels: the call's tensors are on different devices".into())
}

/// A tensor from a host vector (CPU) of shape `shape`.
fn host_tensor<T: WithDType>(v: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A tensor over a CUDA slice candle then owns.
#[cfg(feature = "cuda")]
fn device_tensor<T: candle_core::cuda_backend::CudaDType>(
    slice: cudarc::driver::CudaSlice<T>,
    device: &candle_core::CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = candle_core::CudaStorage::wrap_cuda_slice(slice, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// An f32 gradient `g` as the gradient of `like` (its shape and dtype).
fn grad_as(g: Tensor, like: &Tensor) -> Result<Tensor> {
    g.reshape(like.shape())?.to_dtype(like.dtype())
}

// ---------------------------------------------------------------------------------------------
// delta_linear.

/// Input slots of the fused delta-linear op.
const X: usize = 0;
const W: usize = 1;
const BIAS: usize = 2;
const W_DOWN: usize = 3;
const B_DOWN: usize = 4;
const W_UP: usize = 5;
const B_UP: usize = 6;
const GATE: usize = 7;

/// One fused delta-linear call.
struct LinearCall {
    op: DeltaLinear,
    dims: DeltaLinearDims,
    dtype: DType,
    /// The output's shape: x's with n last.
    shape: Shape,
}

impl Fused for LinearCall {
    fn name(&self) -> &'static str {
        "peft-kernels delta_linear"
    }
    fn forward(
        &self,
        inputs: &[Option<Tensor>],
        train: bool,
    ) -> Result<(Storage, Shape, Vec<Tensor>)> {
        dispatch!(self.dtype, linear_forward(self, inputs, train))
    }
    fn backward(
        &self,
        inputs: &[Option<Tensor>],
        saved: &[Tensor],
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        dispatch!(self.dtype, linear_backward(self, inputs, saved, dout))
    }
}

/// Element counts of the delta-linear tensors.
struct LinearLens {
    x: usize,
    w: usize,
    w_down: usize,
    k_u: usize,
}

impl LinearCall {
    fn lens(&self) -> LinearLens {
        let d = &self.dims;
        let k_u = match self.op.insertion {
            Insertion::Parallel => d.k,
            Insertion::Sequential => d.n,
        };
        LinearLens {
            x: span(d.m, d.k, d.ld_x),
            w: d.n * d.k,
            w_down: d.r * k_u,
            k_u,
        }
    }
}

fn linear_forward<T: Elem>(
    c: &LinearCall,
    inputs: &[Option<Tensor>],
    train: bool,
) -> Result<(Storage, Shape, Vec<Tensor>)> {
    let held = Held::new(inputs);
    let (d, l) = (&c.dims, c.lens());
    if held.is_cpu() {
        let get = |i, len| held.host::<T>(i, len);
        let mut workspace = vec![T::default(); d.workspace_len()];
        let mut y = vec![T::default(); d.m * d.n];
        let mut saved = vec![0.0f32; if train { d.saved_len(&c.op) } else { 0 }];
        let forward = DeltaLinearArgs {
            x: get(X, l.x)?.expect("x"),
            w: get(W, l.w)?.expect("w"),
            bias: get(BIAS, d.n)?,
            u: None,
            w_down: get(W_DOWN, l.w_down)?.expect("w_down"),
            b_down: get(B_DOWN, d.r)?,
            w_up: get(W_UP, d.n * d.r)?.expect("w_up"),
            b_up: get(B_UP, d.n)?,
            gate: get(GATE, d.m)?,
            workspace: &mut workspace[..],
            y: &mut y[..],
        };
        let result = if train {
            emu::delta_linear_train(
                &c.op,
                d,
                DeltaLinearTrainArgs {
                    forward,
                    saved: &mut saved[..],
                    dropout: None,
                },
            )
        } else {
            emu::delta_linear(&c.op, d, forward)
        };
        result.map_err(wrap)?;
        let saved = if train {
            vec![host_tensor(saved.clone(), saved.len())?]
        } else {
            Vec::new()
        };
        return Ok((
            Storage::Cpu(T::to_cpu_storage_owned(y)),
            c.shape.clone(),
            saved,
        ));
    }
    #[cfg(feature = "cuda")]
    {
        let device = held.cuda_device()?;
        let stream = device.cuda_stream();
        let get = |i, len| held.device::<T>(i, len);
        let (x, w, w_down, w_up) = (
            get(X, l.x)?.expect("x"),
            get(W, l.w)?.expect("w"),
            get(W_DOWN, l.w_down)?.expect("w_down"),
            get(W_UP, d.n * d.r)?.expect("w_up"),
        );
        let (bias, b_down, b_up, gate) = (
            get(BIAS, d.n)?,
            get(B_DOWN, d.r)?,
            get(B_UP, d.n)?,
            get(GATE, d.m)?,
        );
        let mut workspace = stream
            .alloc_zeros::<T>(d.workspace_len().max(1))
            .map_err(cuda_err)?;
        let mut y = stream
            .alloc_zeros::<T>((d.m * d.n).max(1))
            .map_err(cuda_err)?;
        let mut saved = stream
            .alloc_zeros::<f32>(if train { d.saved_len(&c.op).max(1) } else { 1 })
            .map_err(cuda_err)?;
        {
            let forward: crate::cuda::DeviceDeltaLinearArgs<T> = DeltaLinearArgs {
                x: &x,
                w: &w,
                bias: bias.as_ref().map(|b| b as _),
                u: None,
                w_down: &w_down,
                b_down: b_down.as_ref().map(|b| b as _),
                w_up: &w_up,
                b_up: b_up.as_ref().map(|b| b as _),
                gate: gate.as_ref().map(|b| b as _),
                workspace: &mut workspace,
                y: &mut y,
            };
            let result = if train {
                crate::cuda::delta_linear_train(
                    &stream,
                    &c.op,
                    d,
                    DeltaLinearTrainArgs {
                        forward,
                        saved: &mut saved,
                        dropout: None,
                    },
                )
            } else {
                crate::cuda::delta_linear(&stream, &c.op, d, forward)
            };
            result.map_err(wrap)?;
        }
        let len = saved.len();
        let saved = if train {
            vec![device_tensor(saved, &device, len)]
        } else {
            Vec::new()
        };
        // A one-element allocation stands for an empty output; candle gets exactly m·n.
        let y = if d.m * d.n == 0 {
            stream.alloc_zeros::<T>(0).map_err(cuda_err)?
        } else {
            y
        };
        Ok((
            Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(y, device)),
            c.shape.clone(),
            saved,
        ))
    }
    #[cfg(not(feature = "cuda"))]
    Err(mixed_devices())
}

fn linear_backward<T: Elem>(
    c: &LinearCall,
    inputs: &[Option<Tensor>],
    saved: &[Tensor],
    dout: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    // The backward reads x with the forward's row stride; a strided x is made contiguous here
    // (dx is then contiguous too), so dx can be given to candle in x's shape.
    let mut inputs = inputs.to_vec();
    let mut dims = c.dims;
    let x_shape = inputs[X].as_ref().expect("x").shape().clone();
    if dims.ld_x != dims.k {
        inputs[X] = Some(inputs[X].as_ref().expect("x").contiguous()?);
        dims.ld_x = dims.k;
    }
    let c = LinearCall {
        dims,
        shape: c.shape.clone(),
        ..*c
    };
    let d = &c.dims;
    let l = c.lens();
    // Slots past the forward's: the saved f32 buffer and dy (contiguous, y's stride n).
    const SAVED: usize = 8;
    const DY: usize = 9;
    inputs.push(Some(saved[0].clone()));
    inputs.push(Some(dout.contiguous()?));
    let held = Held::new(&inputs);
    let has = |i: usize| inputs[i].is_some();
    let (r_ku, n_r) = (d.r * l.k_u, d.n * d.r);
    let ws = d.backward_workspace_len(&c.op);
    // The f32 gradients [dw_down, db_down, dw_up, db_up, dgate] as candle tensors, and dx.
    let (dx, f32_grads): (Tensor, [Option<Tensor>; 5]) = if held.is_cpu() {
        let get = |i, len| held.host::<T>(i, len);
        let mut dx = vec![T::default(); d.m * d.k];
        let mut dw_down = vec![0.0f32; r_ku];
        let mut db_down = has(B_DOWN).then(|| vec![0.0f32; d.r]);
        let mut dw_up = vec![0.0f32; n_r];
        let mut db_up = has(B_UP).then(|| vec![0.0f32; d.n]);
        let mut dgate = has(GATE).then(|| vec![0.0f32; d.m]);
        let mut workspace = vec![0.0f32; ws];
        emu::delta_linear_backward(
            &c.op,
            d,
            DeltaLinearBackwardArgs {
                dy: get(DY, d.m * d.n)?.expect("dy"),
                x: get(X, l.x)?.expect("x"),
                w: get(W, l.w)?.expect("w"),
                u: None,
                w_down: get(W_DOWN, l.w_down)?.expect("w_down"),
                w_up: get(W_UP, n_r)?.expect("w_up"),
                b_up: get(B_UP, d.n)?,
                gate: get(GATE, d.m)?,
                saved: held.host::<f32>(SAVED, d.saved_len(&c.op))?.expect("saved"),
                dx: &mut dx[..],
                du: None,
                dw_down: &mut dw_down[..],
                db_down: db_down.as_deref_mut(),
                dw_up: &mut dw_up[..],
                db_up: db_up.as_deref_mut(),
                dgate: dgate.as_deref_mut(),
                workspace: &mut workspace[..],
                dropout: None,
                accumulate: false,
            },
        )
        .map_err(wrap)?;
        let t = |v: Option<Vec<f32>>| v.map(|v| host_tensor(v.clone(), v.len())).transpose();
        (
            host_tensor(dx, x_shape.clone())?,
            [
                t(Some(dw_down))?,
                t(db_down)?,
                t(Some(dw_up))?,
                t(db_up)?,
                t(dgate)?,
            ],
        )
    } else {
        #[cfg(feature = "cuda")]
        {
            let device = held.cuda_device()?;
            let stream = device.cuda_stream();
            let get = |i, len| held.device::<T>(i, len);
            let alloc = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(cuda_err);
            let (dy, x, w, w_down, w_up) = (
                get(DY, d.m * d.n)?.expect("dy"),
                get(X, l.x)?.expect("x"),
                get(W, l.w)?.expect("w"),
                get(W_DOWN, l.w_down)?.expect("w_down"),
                get(W_UP, n_r)?.expect("w_up"),
            );
            let (b_up, gate) = (get(B_UP, d.n)?, get(GATE, d.m)?);
            let saved = held
                .device::<f32>(SAVED, d.saved_len(&c.op))?
                .expect("saved");
            let mut dx = stream
                .alloc_zeros::<T>((d.m * d.k).max(1))
                .map_err(cuda_err)?;
            let mut dw_down = alloc(r_ku)?;
            let mut db_down = has(B_DOWN).then(|| alloc(d.r)).transpose()?;
            let mut dw_up = alloc(n_r)?;
            let mut db_up = has(B_UP).then(|| alloc(d.n)).transpose()?;
            let mut dgate = has(GATE).then(|| alloc(d.m)).transpose()?;
            let mut workspace = alloc(ws)?;
            crate::cuda::delta_linear_backward(
                &stream,
                &c.op,
                d,
                DeltaLinearBackwardArgs {
                    dy: &dy,
                    x: &x,
                    w: &w,
                    u: None,
                    w_down: &w_down,
                    w_up: &w_up,
                    b_up: b_up.as_ref().map(|b| b as _),
                    gate: gate.as_ref().map(|b| b as _),
                    saved: &saved,
                    dx: &mut dx,
                    du: None,
                    dw_down: &mut dw_down,
                    db_down: db_down.as_mut().map(|b| b as _),
                    dw_up: &mut dw_up,
                    db_up: db_up.as_mut().map(|b| b as _),
                    dgate: dgate.as_mut().map(|b| b as _),
                    workspace: &mut workspace,
                    dropout: None,
                    accumulate: false,
                },
            )
            .map_err(wrap)?;
            let t = |s: Option<cudarc::driver::CudaSlice<f32>>, n: usize| {
                s.map(|s| device_tensor(s, &device, n.max(1)).narrow(0, 0, n))
                    .transpose()
            };
            let dx = device_tensor(dx, &device, (d.m * d.k).max(1))
                .narrow(0, 0, d.m * d.k)?
                .reshape(x_shape.clone())?;
            (
                dx,
                [
                    t(Some(dw_down), r_ku)?,
                    t(db_down, d.r)?,
                    t(Some(dw_up), n_r)?,
                    t(db_up, d.n)?,
                    t(dgate, d.m)?,
                ],
            )
        }
        #[cfg(not(feature = "cuda"))]
        return Err(mixed_devices());
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; 8];
    grads[X] = Some(dx);
    for (slot, g) in [W_DOWN, B_DOWN, W_UP, B_UP, GATE]
        .into_iter()
        .zip(f32_grads)
    {
        if let (Some(g), Some(like)) = (g, &inputs[slot]) {
            grads[slot] = Some(grad_as(g, like)?);
        }
    }
    Ok(grads)
}

// ---------------------------------------------------------------------------------------------
// The delta-linear layer.

/// A frozen linear layer `h = x·Wᵀ + b` with its bottleneck delta (see
/// [`crate::delta_linear`]): `y = compose(h, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up)`, or DoRA.
/// Implements [`Module`] on x `[..., k]`, giving y `[..., n]`; a gated delta takes its
/// per-row λ through [`DeltaLinearLayer::forward_gated`]. Train the adapter by building the
/// layer over `candle_core::Var`s (`w_down`, `w_up`, biases, DoRA's magnitude): their
/// gradients come from `loss.backward()`.
#[derive(Clone, Debug)]
pub struct DeltaLinearLayer {
    op: DeltaLinear,
    w: Tensor,
    bias: Option<Tensor>,
    w_down: Tensor,
    b_down: Option<Tensor>,
    w_up: Tensor,
    b_up: Option<Tensor>,
    /// DoRA's magnitude m `[n]`.
    magnitude: Option<Tensor>,
    emulator: bool,
}

const LAYER: &str = "DeltaLinearLayer";

impl DeltaLinearLayer {
    /// The layer `op` over the frozen weight `w` [n, k] and bias `[n]`, with `w_down`
    /// [r, k] (LoRA A; [r, n] for a sequential delta) and `w_up` [n, r] (LoRA B), all of one
    /// dtype (f32, f16 or bf16) on one device. The frozen tensors are made contiguous once
    /// here; the adapter's are read as they are (a non-contiguous one is copied per call).
    pub fn new(
        op: DeltaLinear,
        w: &Tensor,
        bias: Option<&Tensor>,
        w_down: &Tensor,
        w_up: &Tensor,
    ) -> Result<Self> {
        elem_dtype(LAYER, "w", w)?;
        let (n, k) = w
            .dims2()
            .map_err(|_| invalid(LAYER, "w", "a matrix [n, k]", format!("{:?}", w.dims())))?;
        let r = w_up.dims().get(1).copied().unwrap_or(0);
        let k_u = match op.insertion {
            Insertion::Parallel => k,
            Insertion::Sequential => n,
        };
        check_shape(LAYER, "w_up", w_up, "[n, r]", &[n, r])?;
        check_shape(LAYER, "w_down", w_down, "[r, k_u]", &[r, k_u])?;
        if r == 0 {
            return Err(invalid(LAYER, "w_up", "a rank r >= 1", "r = 0"));
        }
        for (arg, t) in [("w_down", w_down), ("w_up", w_up)] {
            same_kind(LAYER, arg, t, w)?;
        }
        if let Some(b) = bias {
            same_kind(LAYER, "bias", b, w)?;
            check_shape(LAYER, "bias", b, "[n]", &[n])?;
        }
        Ok(DeltaLinearLayer {
            op,
            w: w.contiguous()?,
            bias: bias.map(Tensor::contiguous).transpose()?,
            w_down: w_down.clone(),
            b_down: None,
            w_up: w_up.clone(),
            b_up: None,
            magnitude: None,
            emulator: false,
        })
    }

    /// The adapter's biases: `b_down` `[r]` and `b_up` `[n]` (PEFT's `lora_bias` is b_up).
    pub fn with_adapter_biases(
        mut self,
        b_down: Option<&Tensor>,
        b_up: Option<&Tensor>,
    ) -> Result<Self> {
        let (n, r) = (self.n(), self.r());
        for (arg, t, names, len) in [("b_down", b_down, "[r]", r), ("b_up", b_up, "[n]", n)] {
            if let Some(t) = t {
                same_kind(LAYER, arg, t, &self.w)?;
                check_shape(LAYER, arg, t, names, &[len])?;
            }
        }
        self.b_down = b_down.cloned();
        self.b_up = b_up.cloned();
        Ok(self)
    }

    /// DoRA (PEFT's `use_dora`) on a LoRA layer: `op` must be parallel with the identity and
    /// a LoRA or fixed scale (`DeltaLinear::lora`, `rslora`, `Composition::Scaled`); the
    /// magnitude m is `[n]` (`lora_magnitude_vector`).
    pub fn with_dora(mut self, magnitude: &Tensor) -> Result<Self> {
        let lora_like = matches!(
            self.op.composition,
            Composition::Lora { .. } | Composition::Scaled(_)
        );
        if self.op.insertion != Insertion::Parallel
            || self.op.activation != Activation::Identity
            || !lora_like
        {
            return Err(invalid(
                LAYER,
                "op",
                "LoRA (parallel, identity, a LoRA or fixed scale) under DoRA",
                format!("{:?}", self.op),
            ));
        }
        same_kind(LAYER, "magnitude", magnitude, &self.w)?;
        check_shape(LAYER, "magnitude", magnitude, "[n]", &[self.n()])?;
        self.magnitude = Some(magnitude.clone());
        Ok(self)
    }

    /// `true`: CPU tensors run the crate's emulator of the CUDA kernels (forward and
    /// backward) instead of candle's ops: for testing the kernels, 10–100× slower.
    pub fn with_emulator(mut self, on: bool) -> Self {
        self.emulator = on;
        self
    }

    /// The layer of a PEFT checkpoint's module ([`crate::peft::LoraModule`], DoRA included)
    /// over the base layer's `weight` as the model stores it ([in, out] under
    /// `fan_in_fan_out`, GPT-2's Conv1D; else [out, in]) and its `bias`, which the
    /// checkpoint's trained bias replaces. The adapter's tensors are converted to `weight`'s
    /// dtype and device.
    #[cfg(feature = "peft")]
    pub fn from_peft(
        module: &crate::peft::LoraModule,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Self> {
        let w = if module.fan_in_fan_out {
            weight.t()?
        } else {
            weight.clone()
        };
        let like = |t: &crate::peft::Tensor| -> Result<Tensor> {
            Tensor::from_vec(t.to::<f32>(), t.shape.clone(), weight.device())?
                .to_dtype(weight.dtype())
        };
        let trained_bias = module.bias.as_ref().map(like).transpose()?;
        let layer = DeltaLinearLayer::new(
            module.op(),
            &w,
            trained_bias.as_ref().or(bias),
            &like(&module.w_down)?,
            &like(&module.w_up)?,
        )?;
        let b_up = module.b_up.as_ref().map(like).transpose()?;
        let layer = layer.with_adapter_biases(None, b_up.as_ref())?;
        match &module.magnitude {
            Some(m) => layer.with_dora(&like(m)?),
            None => Ok(layer),
        }
    }

    /// The delta's description.
    pub fn op(&self) -> DeltaLinear {
        self.op
    }

    fn n(&self) -> usize {
        self.w.dims()[0]
    }

    fn k(&self) -> usize {
        self.w.dims()[1]
    }

    fn r(&self) -> usize {
        self.w_up.dims()[1]
    }

    /// y for x `[..., k]` with a gated delta's per-row λ (`gate`, x's leading shape or
    /// `[rows]`; exactly with `Composition::Gated`).
    pub fn forward_gated(&self, x: &Tensor, gate: Option<&Tensor>) -> Result<Tensor> {
        same_kind(LAYER, "x", x, &self.w)?;
        let k = self.k();
        if x.rank() == 0 || x.dims()[x.rank() - 1] != k {
            return Err(invalid(
                LAYER,
                "x",
                format!("[..., k] with k = {k}"),
                format!("{:?}", x.dims()),
            ));
        }
        let rows = x.elem_count() / k;
        let gated = self.op.composition == Composition::Gated;
        match (gated, gate) {
            (true, None) => {
                return Err(invalid(
                    LAYER,
                    "gate",
                    "a per-row λ with Composition::Gated (forward_gated)",
                    "none",
                ))
            }
            (false, Some(_)) => {
                return Err(invalid(
                    LAYER,
                    "gate",
                    "none without Composition::Gated",
                    "a gate",
                ))
            }
            (true, Some(g)) => {
                same_kind(LAYER, "gate", g, &self.w)?;
                if g.elem_count() != rows {
                    return Err(invalid(
                        LAYER,
                        "gate",
                        format!("one λ per row of x ({rows})"),
                        format!("{:?}", g.dims()),
                    ));
                }
            }
            (false, None) => {}
        }
        let Some(magnitude) = &self.magnitude else {
            return self.delta(x, gate, self.bias.as_ref());
        };
        // DoRA: g = m / ‖W + s·B·A‖ with the norm detached, then y = g ⊙ delta + b.
        // In f32, rounded once at the end (as the kernels' dora_scale does): g and the bias
        // in a 16-bit type would round twice more, and y = g ⊙ delta + b may cancel.
        let f32 = |t: &Tensor| t.to_dtype(CandleDType::F32);
        let y = if self.candle_ops(x) {
            self.delta_candle(x, None, None, false)?
        } else {
            f32(&self.delta(x, None, None)?)?
        };
        let g = f32(magnitude)?.mul(&self.dora_inv_norm()?)?;
        let y = y.broadcast_mul(&g)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&f32(b)?)?,
            None => y,
        };
        y.to_dtype(x.dtype())
    }

    /// Whether this call runs candle's ops (CPU without the emulator).
    fn candle_ops(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && !self.emulator
    }

    /// `compose(x·Wᵀ + bias, s·Δ)` on the path the device and the opt-in choose.
    fn delta(&self, x: &Tensor, gate: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
        if self.candle_ops(x) {
            return self.delta_candle(x, gate, bias, true);
        }
        let (n, k) = (self.n(), self.k());
        let (x_rows, m, ld_x) = as_rows(x)?;
        let mut dims = DeltaLinearDims::new(m, n, k, self.r());
        dims.ld_x = ld_x;
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        let call = LinearCall {
            op: self.op,
            dims,
            dtype: elem_dtype(LAYER, "x", x)?,
            shape: Shape::from(shape),
        };
        let mut inputs = vec![None; 8];
        inputs[X] = Some(x_rows);
        inputs[W] = Some(self.w.clone());
        inputs[BIAS] = bias.cloned();
        inputs[W_DOWN] = Some(self.w_down.contiguous()?);
        inputs[B_DOWN] = self.b_down.clone();
        inputs[W_UP] = Some(self.w_up.contiguous()?);
        inputs[B_UP] = self.b_up.clone();
        inputs[GATE] = gate.map(Tensor::contiguous).transpose()?;
        apply_fused(call, inputs, x.device())
    }

    /// The unfused computation in candle's ops (the CPU path), in f32 whatever the dtype
    /// (a CPU multiplies f32 fastest; f16/bf16 inputs widen exactly and the output is rounded
    /// once, or with `round` false not at all: DoRA scales it in f32): candle's autograd
    /// differentiates it.
    fn delta_candle(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
        bias: Option<&Tensor>,
        round: bool,
    ) -> Result<Tensor> {
        let (n, k) = (self.n(), self.k());
        let m = x.elem_count() / k;
        let f = |t: &Tensor| t.to_dtype(CandleDType::F32);
        let x2 = f(&x.reshape((m, k))?)?;
        let mut h = x2.matmul(&f(&self.w)?.t()?)?;
        if let Some(b) = bias {
            h = h.broadcast_add(&f(b)?)?;
        }
        let u = match self.op.insertion {
            Insertion::Parallel => &x2,
            Insertion::Sequential => &h,
        };
        let mut z = u.matmul(&f(&self.w_down)?.t()?)?;
        if let Some(b) = &self.b_down {
            z = z.broadcast_add(&f(b)?)?;
        }
        let a = match self.op.activation {
            Activation::Identity => z,
            Activation::Relu => z.relu()?,
            Activation::GeluTanh => z.gelu()?,
            Activation::GeluErf => z.gelu_erf()?,
            Activation::Silu => z.silu()?,
        };
        let mut delta = a.matmul(&f(&self.w_up)?.t()?)?;
        if let Some(b) = &self.b_up {
            delta = delta.broadcast_add(&f(b)?)?;
        }
        let y = match (self.op.composition, gate) {
            (Composition::Gated, Some(g)) => {
                let lambda = f(&g.reshape((m, 1))?)?;
                (h.broadcast_mul(&lambda.affine(-1.0, 1.0)?)? + delta.broadcast_mul(&lambda)?)?
            }
            (c, _) => (h + delta.affine(f64::from(c.scale(self.r())), 0.0)?)?,
        };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        let y = y.reshape(shape)?;
        if round {
            y.to_dtype(x.dtype())
        } else {
            Ok(y)
        }
    }

    /// DoRA's `1 / ‖W + s·B·A‖` per row, f32 `[n]`, detached: candle's ops on the CPU path,
    /// else the crate's `dora_norm` (with m = 1).
    fn dora_inv_norm(&self) -> Result<Tensor> {
        let s = self.op.composition.scale(self.r());
        let (w_down, w_up) = (self.w_down.detach(), self.w_up.detach());
        if self.candle_ops(&self.w) {
            let f = |t: &Tensor| t.to_dtype(CandleDType::F32);
            let merged =
                (f(&self.w)? + f(&w_up)?.matmul(&f(&w_down)?)?.affine(f64::from(s), 0.0)?)?;
            return merged.sqr()?.sum(1)?.sqrt()?.recip();
        }
        let dims = DoraDims {
            n: self.n(),
            k: self.k(),
            r: self.r(),
        };
        let ones = Tensor::ones(dims.n, self.w.dtype(), self.w.device())?;
        let inputs = [
            Some(self.w.clone()),
            Some(w_down.contiguous()?),
            Some(w_up.contiguous()?),
            Some(ones),
        ];
        let dtype = elem_dtype(LAYER, "w", &self.w)?;
        dispatch!(dtype, dora_norm(&dims, s, &inputs))
    }
}

/// `dora_norm` with m = 1 over [w, w_down, w_up, ones]: `1 / ‖W + s·B·A‖`, f32 `[n]`.
fn dora_norm<T: Elem>(dims: &DoraDims, s: f32, inputs: &[Option<Tensor>]) -> Result<Tensor> {
    let held = Held::new(inputs);
    let (n, k, r) = (dims.n, dims.k, dims.r);
    if held.is_cpu() {
        let get = |i, len| held.host::<T>(i, len).map(|s| s.expect("given"));
        let mut g = vec![0.0f32; n];
        emu::dora_norm(
            dims,
            s,
            DoraNormArgs {
                w: get(0, n * k)?,
                w_down: get(1, r * k)?,
                w_up: get(2, n * r)?,
                magnitude: get(3, n)?,
                g: &mut g[..],
                norm: None,
            },
        )
        .map_err(wrap)?;
        return host_tensor(g, n);
    }
    #[cfg(feature = "cuda")]
    {
        let device = held.cuda_device()?;
        let stream = device.cuda_stream();
        let get = |i, len| held.device::<T>(i, len).map(|s| s.expect("given"));
        let (w, w_down, w_up, ones) = (get(0, n * k)?, get(1, r * k)?, get(2, n * r)?, get(3, n)?);
        let mut g = stream.alloc_zeros::<f32>(n).map_err(cuda_err)?;
        crate::cuda::dora_norm(
            &stream,
            dims,
            s,
            DoraNormArgs {
                w: &w,
                w_down: &w_down,
                w_up: &w_up,
                magnitude: &ones,
                g: &mut g,
                norm: None,
            },
        )
        .map_err(wrap)?;
        Ok(device_tensor(g, &device, n))
    }
    #[cfg(not(feature = "cuda"))]
    Err(mixed_devices())
}

impl Module for DeltaLinearLayer {
    /// y `[..., n]` for x `[..., k]` (a gated delta needs [`DeltaLinearLayer::forward_gated`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_gated(x, None)
    }
}

// ---------------------------------------------------------------------------------------------
// Prefix attention.

/// Input slots of the fused prefix-attention op.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const PK: usize = 3;
const PV: usize = 4;

/// One fused prefix-attention call.
struct AttentionCall {
    op: PrefixAttention,
    dims: PrefixAttentionDims,
    dtype: DType,
    lens: Option<Vec<u32>>,
}

/// The elements a [B, H, L, d] tensor of `layout` spans from its first element.
fn head_span(l: &HeadLayout, [b, h, len, d]: [usize; 4]) -> usize {
    if b * h * len * d == 0 {
        return 0;
    }
    l.offset(b - 1, h - 1, len - 1) + d
}

impl AttentionCall {
    /// The element counts of q, k, v, prefix_k, prefix_v as laid out.
    fn spans(&self) -> [usize; 5] {
        let d = &self.dims;
        let (b, hd) = (d.batch, d.head_dim);
        [
            head_span(&d.q, [b, d.heads, d.q_len, hd]),
            head_span(&d.k, [b, d.kv_heads, d.kv_len, hd]),
            head_span(&d.v, [b, d.kv_heads, d.kv_len, hd]),
            head_span(&d.prefix_k, [b, d.kv_heads, d.prefix_len, hd]),
            head_span(&d.prefix_v, [b, d.kv_heads, d.prefix_len, hd]),
        ]
    }

    fn out_len(&self) -> usize {
        self.dims.rows() * self.dims.head_dim
    }

    fn shape(&self) -> Shape {
        let d = &self.dims;
        Shape::from((d.batch, d.heads, d.q_len, d.head_dim))
    }
}

impl Fused for AttentionCall {
    fn name(&self) -> &'static str {
        "peft-kernels prefix_attention"
    }
    fn forward(
        &self,
        inputs: &[Option<Tensor>],
        train: bool,
    ) -> Result<(Storage, Shape, Vec<Tensor>)> {
        dispatch!(self.dtype, attention_forward(self, inputs, train))
    }
    fn backward(
        &self,
        inputs: &[Option<Tensor>],
        saved: &[Tensor],
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        dispatch!(
            self.dtype,
            attention_backward(self, inputs, saved, out, dout)
        )
    }
}

fn attention_forward<T: Elem>(
    c: &AttentionCall,
    inputs: &[Option<Tensor>],
    train: bool,
) -> Result<(Storage, Shape, Vec<Tensor>)> {
    let held = Held::new(inputs);
    let d = &c.dims;
    let [sq, sk, sv, spk, spv] = c.spans();
    let rows = d.rows();
    if held.is_cpu() {
        let get = |i, len| held.host::<T>(i, len).map(|s| s.expect("given"));
        let mut out = vec![T::default(); c.out_len()];
        let mut lse = vec![0.0f32; if train { rows } else { 0 }];
        emu::prefix_attention(
            &c.op,
            d,
            PrefixAttentionArgs {
                q: get(Q, sq)?,
                k: get(K, sk)?,
                v: get(V, sv)?,
                prefix_k: get(PK, spk)?,
                prefix_v: get(PV, spv)?,
                context_lens: c.lens.as_deref(),
                out: &mut out[..],
                lse: train.then_some(&mut lse[..]),
                lambda: None,
                workspace: None,
            },
        )
        .map_err(wrap)?;
        let saved = if train {
            vec![host_tensor(lse, rows)?]
        } else {
            Vec::new()
        };
        return Ok((Storage::Cpu(T::to_cpu_storage_owned(out)), c.shape(), saved));
    }
    #[cfg(feature = "cuda")]
    {
        let device = held.cuda_device()?;
        let stream = device.cuda_stream();
        let get = |i, len| held.device::<T>(i, len).map(|s| s.expect("given"));
        let (q, k, v, pk, pv) = (
            get(Q, sq)?,
            get(K, sk)?,
            get(V, sv)?,
            get(PK, spk)?,
            get(PV, spv)?,
        );
        let lens = c
            .lens
            .as_ref()
            .map(|l| stream.clone_htod(l))
            .transpose()
            .map_err(cuda_err)?;
        let mut out = stream
            .alloc_zeros::<T>(c.out_len().max(1))
            .map_err(cuda_err)?;
        let mut lse = stream.alloc_zeros::<f32>(rows.max(1)).map_err(cuda_err)?;
        let ws_len = d.workspace_len(c.dtype);
        let mut workspace = stream.alloc_zeros::<f32>(ws_len.max(1)).map_err(cuda_err)?;
        crate::cuda::prefix_attention(
            &stream,
            &c.op,
            d,
            PrefixAttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                prefix_k: &pk,
                prefix_v: &pv,
                context_lens: lens.as_ref().map(|l| l as _),
                out: &mut out,
                lse: if train { Some(&mut lse) } else { None },
                lambda: None,
                workspace: (ws_len > 0).then_some(&mut workspace as _),
            },
        )
        .map_err(wrap)?;
        let saved = if train {
            vec![device_tensor(lse, &device, rows.max(1)).narrow(0, 0, rows)?]
        } else {
            Vec::new()
        };
        let out = if c.out_len() == 0 {
            stream.alloc_zeros::<T>(0).map_err(cuda_err)?
        } else {
            out
        };
        Ok((
            Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, device)),
            c.shape(),
            saved,
        ))
    }
    #[cfg(not(feature = "cuda"))]
    Err(mixed_devices())
}

fn attention_backward<T: Elem>(
    c: &AttentionCall,
    inputs: &[Option<Tensor>],
    saved: &[Tensor],
    out: &Tensor,
    dout: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let f = &c.dims;
    let (b, hq, hkv, lq, lk, l, hd) = (
        f.batch,
        f.heads,
        f.kv_heads,
        f.q_len,
        f.kv_len,
        f.prefix_len,
        f.head_dim,
    );
    let mut dims = PrefixAttentionBackwardDims::new(*f);
    // dO and every gradient contiguous; a prefix shared by the batch gets one summed gradient.
    dims.dout = HeadLayout::bhsd(hq, lq, hd);
    dims.dq = dims.dout;
    dims.dk = HeadLayout::bhsd(hkv, lk, hd);
    dims.dv = dims.dk;
    let shared = f.prefix_k.batch == 0 && f.prefix_v.batch == 0;
    let prefix = HeadLayout::bhsd(hkv, l, hd);
    dims.dprefix_k = if shared {
        prefix.shared_by_batch()
    } else {
        prefix
    };
    dims.dprefix_v = dims.dprefix_k;
    let dprefix_len = if shared { 1 } else { b } * hkv * l * hd;
    let [sq, sk, sv, spk, spv] = c.spans();
    let (nq, nk) = (b * hq * lq * hd, b * hkv * lk * hd);
    const OUT: usize = 5;
    const LSE: usize = 6;
    const DOUT: usize = 7;
    let mut inputs = inputs.to_vec();
    inputs.push(Some(out.clone()));
    inputs.push(Some(saved[0].clone()));
    inputs.push(Some(dout.contiguous()?));
    let held = Held::new(&inputs);
    let ws = dims.workspace_len();
    let grads: [Tensor; 5] = if held.is_cpu() {
        let get = |i, len| held.host::<T>(i, len).map(|s| s.expect("given"));
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); nq],
            vec![T::default(); nk],
            vec![T::default(); nk],
        );
        let (mut dpk, mut dpv) = (vec![0.0f32; dprefix_len], vec![0.0f32; dprefix_len]);
        let mut workspace = vec![0.0f32; ws];
        emu::prefix_attention_backward(
            &c.op,
            &dims,
            PrefixAttentionBackwardArgs {
                q: get(Q, sq)?,
                k: get(K, sk)?,
                v: get(V, sv)?,
                prefix_k: get(PK, spk)?,
                prefix_v: get(PV, spv)?,
                context_lens: c.lens.as_deref(),
                out: get(OUT, nq)?,
                lse: held.host::<f32>(LSE, b * hq * lq)?.expect("lse"),
                dout: get(DOUT, nq)?,
                dq: &mut dq[..],
                dk: &mut dk[..],
                dv: &mut dv[..],
                dprefix_k: PrefixGrad::F32(&mut dpk[..]),
                dprefix_v: PrefixGrad::F32(&mut dpv[..]),
                workspace: &mut workspace[..],
            },
        )
        .map_err(wrap)?;
        [
            host_tensor(dq, nq)?,
            host_tensor(dk, nk)?,
            host_tensor(dv, nk)?,
            host_tensor(dpk, dprefix_len)?,
            host_tensor(dpv, dprefix_len)?,
        ]
    } else {
        #[cfg(feature = "cuda")]
        {
            let device = held.cuda_device()?;
            let stream = device.cuda_stream();
            let get = |i, len| held.device::<T>(i, len).map(|s| s.expect("given"));
            let (q, k, v, pk, pv) = (
                get(Q, sq)?,
                get(K, sk)?,
                get(V, sv)?,
                get(PK, spk)?,
                get(PV, spv)?,
            );
            let (o, d_o) = (get(OUT, nq)?, get(DOUT, nq)?);
            let lse = held.device::<f32>(LSE, b * hq * lq)?.expect("lse");
            let lens = c
                .lens
                .as_ref()
                .map(|l| stream.clone_htod(l))
                .transpose()
                .map_err(cuda_err)?;
            let elems = |n: usize| stream.alloc_zeros::<T>(n.max(1)).map_err(cuda_err);
            let floats = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(cuda_err);
            let (mut dq, mut dk, mut dv) = (elems(nq)?, elems(nk)?, elems(nk)?);
            let (mut dpk, mut dpv) = (floats(dprefix_len)?, floats(dprefix_len)?);
            let mut workspace = floats(ws)?;
            crate::cuda::prefix_attention_backward(
                &stream,
                &c.op,
                &dims,
                PrefixAttentionBackwardArgs {
                    q: &q,
                    k: &k,
                    v: &v,
                    prefix_k: &pk,
                    prefix_v: &pv,
                    context_lens: lens.as_ref().map(|l| l as _),
                    out: &o,
                    lse: &lse,
                    dout: &d_o,
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                    dprefix_k: PrefixGrad::F32(&mut dpk),
                    dprefix_v: PrefixGrad::F32(&mut dpv),
                    workspace: &mut workspace,
                },
            )
            .map_err(wrap)?;
            let t = |s, n: usize| device_tensor(s, &device, n.max(1)).narrow(0, 0, n);
            let u = |s, n: usize| device_tensor(s, &device, n.max(1)).narrow(0, 0, n);
            [
                t(dq, nq)?,
                t(dk, nk)?,
                t(dv, nk)?,
                u(dpk, dprefix_len)?,
                u(dpv, dprefix_len)?,
            ]
        }
        #[cfg(not(feature = "cuda"))]
        return Err(mixed_devices());
    };
    let mut result = Vec::with_capacity(5);
    for (slot, g) in grads.into_iter().enumerate() {
        let like = inputs[slot]
            .as_ref()
            .expect("every attention input is given");
        result.push(Some(grad_as(g, like)?));
    }
    Ok(result)
}

/// Prefix tuning's attention (see [`crate::prefix_attention`]): softmax attention of q over
/// the learned prefix keys and values `[P; C]` and the masked context,
/// `out = (1 − λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v)`, `λ = sigmoid(LSE_p − LSE_c)`.
/// The prefix is `[Hkv, l, d]` (one for the batch, as PEFT's) or `[B, Hkv, l, d]`; build it
/// over `candle_core::Var`s to train it.
#[derive(Clone, Debug)]
pub struct PrefixAttentionLayer {
    op: PrefixAttention,
    prefix_k: Tensor,
    prefix_v: Tensor,
    emulator: bool,
}

const ATTENTION: &str = "PrefixAttentionLayer";

impl PrefixAttentionLayer {
    /// The layer over `prefix_k` and `prefix_v`, both `[Hkv, l, d]` or `[B, Hkv, l, d]`, of one
    /// dtype (f32, f16 or bf16) on one device. `op` has the softmax scale (default 1/√d) and
    /// whether the context is causally masked (bottom-right aligned).
    pub fn new(op: PrefixAttention, prefix_k: &Tensor, prefix_v: &Tensor) -> Result<Self> {
        elem_dtype(ATTENTION, "prefix_k", prefix_k)?;
        same_kind(ATTENTION, "prefix_v", prefix_v, prefix_k)?;
        if !(3..=4).contains(&prefix_k.rank()) {
            return Err(invalid(
                ATTENTION,
                "prefix_k",
                "[Hkv, l, d] or [B, Hkv, l, d]",
                format!("{:?}", prefix_k.dims()),
            ));
        }
        check_shape(
            ATTENTION,
            "prefix_v",
            prefix_v,
            "prefix_k's shape",
            prefix_k.dims(),
        )?;
        Ok(PrefixAttentionLayer {
            op,
            prefix_k: prefix_k.clone(),
            prefix_v: prefix_v.clone(),
            emulator: false,
        })
    }

    /// `true`: CPU tensors run the crate's emulator of the CUDA kernels (forward and
    /// backward) instead of candle's ops (testing).
    pub fn with_emulator(mut self, on: bool) -> Self {
        self.emulator = on;
        self
    }

    /// Layer `layer` of a PEFT prefix-tuning checkpoint, in `dtype` on `device`.
    #[cfg(feature = "peft")]
    pub fn from_peft(
        adapter: &crate::peft::PrefixAdapter,
        layer: usize,
        op: PrefixAttention,
        dtype: CandleDType,
        device: &Device,
    ) -> Result<Self> {
        let p = adapter.layers.get(layer).ok_or_else(|| {
            invalid(
                ATTENTION,
                "layer",
                format!("a layer below {}", adapter.layers.len()),
                layer,
            )
        })?;
        let t = |t: &crate::peft::Tensor| -> Result<Tensor> {
            Tensor::from_vec(t.to::<f32>(), t.shape.clone(), device)?.to_dtype(dtype)
        };
        PrefixAttentionLayer::new(op, &t(&p.key)?, &t(&p.value)?)
    }

    /// The attention output [B, Hq, Lq, d] for q [B, Hq, Lq, d] and the context's k, v
    /// [B, Hkv, Lk, d] (Hkv dividing Hq), with `context_lens` valid keys per sequence
    /// (`None`: all Lk).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        context_lens: Option<&[u32]>,
    ) -> Result<Tensor> {
        for (arg, t) in [("q", q), ("k", k), ("v", v)] {
            same_kind(ATTENTION, arg, t, &self.prefix_k)?;
        }
        let (b, hq, lq, d) = q
            .dims4()
            .map_err(|_| invalid(ATTENTION, "q", "[B, Hq, Lq, d]", format!("{:?}", q.dims())))?;
        let (hkv, l, pd) = match *self.prefix_k.dims() {
            [h, l, d] => (h, l, d),
            [pb, h, l, d] => {
                if pb != b {
                    return Err(invalid(
                        ATTENTION,
                        "prefix_k",
                        format!("[B, Hkv, l, d] with B = {b} (q's), or [Hkv, l, d]"),
                        format!("{:?}", self.prefix_k.dims()),
                    ));
                }
                (h, l, d)
            }
            _ => unreachable!("checked in new"),
        };
        if pd != d {
            return Err(invalid(
                ATTENTION,
                "prefix_k",
                format!("head dim d = {d} (q's)"),
                format!("{:?}", self.prefix_k.dims()),
            ));
        }
        let lk = k.dims().get(2).copied().unwrap_or(0);
        check_shape(ATTENTION, "k", k, "[B, Hkv, Lk, d]", &[b, hkv, lk, d])?;
        check_shape(ATTENTION, "v", v, "[B, Hkv, Lk, d]", &[b, hkv, lk, d])?;
        if hkv == 0 || hq % hkv != 0 {
            return Err(invalid(
                ATTENTION,
                "q",
                format!("query heads a multiple of the prefix's KV heads ({hkv})"),
                hq,
            ));
        }
        if let Some(lens) = context_lens {
            if lens.len() != b {
                return Err(invalid(
                    ATTENTION,
                    "context_lens",
                    format!("one length per sequence ({b})"),
                    lens.len(),
                ));
            }
            if let Some(&bad) = lens.iter().find(|&&n| n as usize > lk) {
                return Err(invalid(
                    ATTENTION,
                    "context_lens",
                    format!("lengths <= Lk = {lk}"),
                    bad,
                ));
            }
        }
        if q.device().is_cpu() && !self.emulator {
            return self.candle_ops(q, k, v, context_lens, hkv, l);
        }
        let dtype = elem_dtype(ATTENTION, "q", q)?;
        let (q, ql) = head_layout(q, dtype)?;
        let (k, kl) = head_layout(k, dtype)?;
        let (v, vl) = head_layout(v, dtype)?;
        let (pk, pkl) = head_layout(&self.prefix_k, dtype)?;
        let (pv, pvl) = head_layout(&self.prefix_v, dtype)?;
        let mut dims = PrefixAttentionDims::new(b, hq, hkv, lq, lk, l, d);
        (dims.q, dims.k, dims.v, dims.prefix_k, dims.prefix_v) = (ql, kl, vl, pkl, pvl);
        let call = AttentionCall {
            op: self.op,
            dims,
            dtype,
            lens: context_lens.map(<[u32]>::to_vec),
        };
        let device = q.device().clone();
        apply_fused(
            call,
            vec![Some(q), Some(k), Some(v), Some(pk), Some(pv)],
            &device,
        )
    }

    /// The unfused attention in candle's ops (f32 inside): the prefix concatenated in front
    /// of the context, one masked softmax.
    fn candle_ops(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: Option<&[u32]>,
        hkv: usize,
        l: usize,
    ) -> Result<Tensor> {
        let (b, hq, lq, d) = q.dims4()?;
        let lk = k.dims()[2];
        let g = hq / hkv;
        let f = |t: &Tensor| t.to_dtype(CandleDType::F32);
        let per_batch = |p: &Tensor| -> Result<Tensor> {
            let p = f(p)?;
            if p.rank() == 3 {
                p.unsqueeze(0)?.broadcast_as((b, hkv, l, d))
            } else {
                Ok(p)
            }
        };
        let keys = Tensor::cat(&[&per_batch(&self.prefix_k)?, &f(k)?], 2)?;
        let values = Tensor::cat(&[&per_batch(&self.prefix_v)?, &f(v)?], 2)?.contiguous()?;
        // Query head h reads KV head h / g: the g heads of a group as one run of g·Lq rows.
        let q = f(q)?.reshape((b, hkv, g * lq, d))?;
        let scale = f64::from(self.op.scale_for(d));
        let scores = q.matmul(&keys.t()?.contiguous()?)?.affine(scale, 0.0)?;
        // The prefix is always visible; context key j of sequence s iff j < len and, causal,
        // j + Lq <= i + len (bottom-right aligned).
        let total = l + lk;
        let mut mask = vec![0.0f32; b * g * lq * total];
        for s in 0..b {
            let len = lens.map_or(lk, |v| v[s] as usize);
            for row in 0..g * lq {
                let i = row % lq;
                for j in 0..lk {
                    if j >= len || (self.op.causal && j + lq > i + len) {
                        mask[((s * g * lq) + row) * total + l + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, g * lq, total), q.device())?;
        let scores = scores.broadcast_add(&mask)?;
        // A row that sees nothing has max −∞: shift by a finite value so its weights are 0
        // (not NaN) and its output 0.
        let max = scores.max_keepdim(D::Minus1)?.detach().maximum(f32::MIN)?;
        let p = scores.broadcast_sub(&max)?.exp()?;
        let denominator = p.sum_keepdim(D::Minus1)?.maximum(f32::MIN_POSITIVE)?;
        let out = p.matmul(&values)?.broadcast_div(&denominator)?;
        out.reshape((b, hq, lq, d))?.to_dtype(self.prefix_k.dtype())
    }
}

/// A [B, H, L, d] (or a shared [H, L, d]) tensor as the attention kernels read it: itself
/// when its last dimension is contiguous (and, for f16/bf16, whose tensor-core loads copy
/// 16-byte chunks, its strides and offset are multiples of 8 elements), else a contiguous
/// copy; with its [`HeadLayout`] (batch stride 0 for a shared one).
fn head_layout(t: &Tensor, dtype: DType) -> Result<(Tensor, HeadLayout)> {
    let readable = |t: &Tensor| {
        let (dims, strides) = (t.dims(), t.stride());
        let rank = dims.len();
        let last_ok = dims[rank - 1] == 1 || strides[rank - 1] == 1;
        let aligned = dtype == DType::F32
            || (t.layout().start_offset() % 8 == 0
                && strides[..rank - 1].iter().all(|s| s % 8 == 0));
        last_ok && aligned
    };
    let t = if readable(t) {
        t.clone()
    } else {
        t.contiguous()?
    };
    let s = t.stride();
    let layout = match *s {
        [head, seq, _] => HeadLayout {
            batch: 0,
            head,
            seq,
        },
        [batch, head, seq, _] => HeadLayout { batch, head, seq },
        _ => unreachable!("rank checked by the caller"),
    };
    Ok((t, layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which layouts the kernels read in place: rows of one stride, contiguous last dim.
    #[test]
    fn rows_of_a_layout() {
        let t = |dims: &[usize], strides: &[usize]| {
            rows_view(&Layout::new(Shape::from(dims), strides.to_vec(), 0))
        };
        assert_eq!(t(&[4, 6], &[6, 1]), Some((4, 6)));
        assert_eq!(t(&[4, 6], &[9, 1]), Some((4, 9)), "rows of a wider buffer");
        assert_eq!(
            t(&[2, 3, 6], &[27, 9, 1]),
            Some((6, 9)),
            "batch and sequence flatten"
        );
        assert_eq!(
            t(&[2, 3, 6], &[30, 9, 1]),
            None,
            "batch and sequence do not flatten"
        );
        assert_eq!(t(&[4, 6], &[1, 4]), None, "transposed");
        assert_eq!(t(&[4, 6], &[0, 1]), None, "broadcast rows");
        assert_eq!(
            t(&[1, 6], &[100, 1]),
            Some((1, 6)),
            "one row: its stride does not matter"
        );
        assert_eq!(t(&[6], &[1]), Some((1, 6)));
        assert_eq!(
            t(&[2, 1, 6], &[6, 99, 1]),
            Some((2, 6)),
            "a size-1 dim's stride is free"
        );
    }
}
