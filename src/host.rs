//! Every operation on host buffers, on whichever backend is at hand: the emulator runs on
//! them directly; the GPU gets copies (inputs up, outputs — poison and all — up and back
//! down) and the very same plan. For tests, examples and checks against the reference; a
//! program that keeps its tensors on the GPU calls `cuda` (feature `cuda`) with device buffers.
//!
//! Slices of any alignment are accepted on both backends (a `Vec<bf16>` promises 2 bytes):
//! the GPU's copies are fresh, aligned allocations, and the emulator copies a misaligned
//! f16/bf16 attention tensor into aligned scratch ([`crate::emulator`]). Arguments built
//! before the call take the `Host…Args` aliases (`delta_linear::HostDeltaLinearArgs`, …)
//! as their type.

use crate::delta_linear::{
    DeltaApplyDims, DeltaLinear, DeltaLinearDims, HostDeltaApplyArgs, HostDeltaApplyBackwardArgs,
    HostDeltaApplyTrainArgs, HostDeltaLinearArgs, HostDeltaLinearBackwardArgs,
    HostDeltaLinearTrainArgs, HostLoraMergeArgs, LoraMergeDims,
};
use crate::dora::{
    DoraDims, DoraLinearArgs, DoraLinearBackwardArgs, DoraLinearTrainArgs, DoraMergeArgs,
    DoraNormArgs,
};
use crate::optim::{AdamW, HostAdamwArgs};
#[cfg(feature = "cuda")]
use crate::plan::{self, Buf, BufSource, KernelParams, Launch};
use crate::prefix_attention::{
    HostKvConcatArgs, HostLseMergeArgs, HostLseMergeBackwardArgs, HostMultiPrefixAttentionArgs,
    HostPrefixAttentionArgs, HostPrefixAttentionBackwardArgs, HostPrefixOnlyArgs, KvConcatDims,
    LseMergeBackwardDims, LseMergeDims, MultiPrefixDims, PrefixAttention,
    PrefixAttentionBackwardDims, PrefixAttentionDims,
};
use crate::quant::{
    HostDeltaLinearQuantArgs, HostDeltaLinearQuantBackwardArgs, HostDeltaLinearQuantTrainArgs,
    HostQuantDequantizeArgs,
};
use crate::{Element, Error, Result};

/// Where host-buffer operations run.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU emulator, from the same kernel sources.
    #[cfg(feature = "emulator")]
    Emulator,
    /// A CUDA stream; each call copies its buffers in and out and waits for the stream.
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<cudarc::driver::CudaStream>),
}

impl Backend {
    /// The default stream of CUDA device `ordinal`.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> Result<Backend> {
        Ok(Backend::Cuda(
            crate::cuda::context(ordinal)?.default_stream(),
        ))
    }

    /// The GPU when the crate was built with `cuda` and a device is present, else the
    /// emulator; an error only when neither backend was built in or the device fails.
    pub fn best() -> Result<Backend> {
        #[cfg(feature = "cuda")]
        if crate::cuda::is_available() {
            return Backend::cuda(0);
        }
        #[cfg(feature = "emulator")]
        return Ok(Backend::Emulator);
        #[allow(unreachable_code)]
        Err(Error::NoDevice(
            "built without the emulator, and no CUDA device is present".into(),
        ))
    }

    /// A one-line description: "emulator (CPU)" or the GPU's name.
    pub fn describe(&self) -> String {
        match self {
            #[cfg(feature = "emulator")]
            Backend::Emulator => "emulator (CPU)".into(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(s) => s.context().name().unwrap_or_else(|_| "CUDA device".into()),
        }
    }
}

/// Each host-buffer operation: the emulator's function on the emulator; on the GPU, the
/// same plan over device copies made by [`Upload`].
macro_rules! host_op {
    ($(#[$doc:meta])* $name:ident, $plan:path, ($($arg:ident: $ty:ty),*), $args:ty) => {
        $(#[$doc])*
        pub fn $name<T: Element>(backend: &Backend, $($arg: $ty,)* args: $args) -> Result<()> {
            match backend {
                #[cfg(feature = "emulator")]
                Backend::Emulator => crate::emulator::$name($($arg,)* args),
                #[cfg(feature = "cuda")]
                Backend::Cuda(stream) => {
                    let mut up = Upload::new(stream);
                    let steps = $plan($($arg,)* T::DTYPE, &args.bufs(&mut up))?;
                    up.run(&steps)
                }
            }
        }
    };
}

host_op!(
    /// `delta_linear` ([`crate::delta_linear`]) on host buffers.
    delta_linear,
    plan::delta_linear::delta_linear,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    HostDeltaLinearArgs<'_, T>
);
host_op!(
    /// `delta_linear_train` (the forward that saves what the backward reads) on host buffers.
    delta_linear_train,
    plan::delta_linear::delta_linear_train,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    HostDeltaLinearTrainArgs<'_, T>
);
host_op!(
    /// `delta_linear_quant` (a quantized frozen W, [`crate::quant`]) on host buffers.
    delta_linear_quant,
    plan::delta_linear::delta_linear_quant,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    HostDeltaLinearQuantArgs<'_, T>
);
host_op!(
    /// `delta_linear_quant_train` on host buffers.
    delta_linear_quant_train,
    plan::delta_linear::delta_linear_quant_train,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    HostDeltaLinearQuantTrainArgs<'_, T>
);
host_op!(
    /// `delta_linear_quant_backward` on host buffers.
    delta_linear_quant_backward,
    plan::delta_linear_backward::delta_linear_quant_backward,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    HostDeltaLinearQuantBackwardArgs<'_, T>
);
host_op!(
    /// `quant_dequantize` ([`crate::quant::QuantDequantizeArgs`]) on host buffers.
    quant_dequantize,
    plan::delta_linear::quant_dequantize,
    (n: usize, k: usize),
    HostQuantDequantizeArgs<'_, T>
);
host_op!(
    /// `delta_linear_backward` on host buffers.
    delta_linear_backward,
    plan::delta_linear_backward::delta_linear_backward,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    HostDeltaLinearBackwardArgs<'_, T>
);
host_op!(
    /// `delta_apply` (a delta on a given h, per head) on host buffers.
    delta_apply,
    plan::delta_linear::delta_apply,
    (op: &DeltaLinear, dims: &DeltaApplyDims),
    HostDeltaApplyArgs<'_, T>
);
host_op!(
    /// `delta_apply_train` (the apply that saves z for the backward) on host buffers.
    delta_apply_train,
    plan::delta_linear::delta_apply_train,
    (op: &DeltaLinear, dims: &DeltaApplyDims),
    HostDeltaApplyTrainArgs<'_, T>
);
host_op!(
    /// `delta_apply_backward` on host buffers.
    delta_apply_backward,
    plan::delta_linear_backward::delta_apply_backward,
    (op: &DeltaLinear, dims: &DeltaApplyDims),
    HostDeltaApplyBackwardArgs<'_, T>
);
host_op!(
    /// `lora_merge` (`W ← W + scale·B·A`, scale = ±s, the layer's `composition.scale(r)`) on
    /// host buffers.
    lora_merge,
    lora_merge_plan,
    (dims: &LoraMergeDims, scale: f32),
    HostLoraMergeArgs<'_, T>
);
host_op!(
    /// `prefix_only_attention` ([`crate::prefix_attention`]) on host buffers.
    prefix_only_attention,
    plan::prefix_attention::prefix_only_attention,
    (op: &PrefixAttention, dims: &PrefixAttentionDims),
    HostPrefixOnlyArgs<'_, T>
);
host_op!(
    /// `lse_merge` of two attention states on host buffers.
    lse_merge,
    plan::prefix_attention::lse_merge,
    (dims: &LseMergeDims),
    HostLseMergeArgs<'_, T>
);
host_op!(
    /// `lse_merge_backward` (each state's output and LSE gradient) on host buffers.
    lse_merge_backward,
    plan::prefix_attention::lse_merge_backward,
    (dims: &LseMergeBackwardDims),
    HostLseMergeBackwardArgs<'_, T>
);
host_op!(
    /// `kv_concat` (`[P; C]` along the sequence) on host buffers.
    kv_concat,
    plan::prefix_attention::kv_concat,
    (dims: &KvConcatDims),
    HostKvConcatArgs<'_, T>
);

/// The fused `prefix_attention` ([`crate::prefix_attention`]) on host buffers; the
/// `context_lens` values are checked on both backends, since they are on the host here.
pub fn prefix_attention<T: Element>(
    backend: &Backend,
    op: &PrefixAttention,
    dims: &PrefixAttentionDims,
    args: HostPrefixAttentionArgs<'_, T>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::prefix_attention(op, dims, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            if let Some(lens) = args.context_lens {
                plan::prefix_attention::check_context_lens(lens, dims)?;
            }
            let mut up = Upload::new(stream);
            let steps =
                plan::prefix_attention::prefix_attention(op, dims, T::DTYPE, &args.bufs(&mut up))?;
            up.run(&steps)
        }
    }
}

/// Multi-tenant `multi_prefix_attention` ([`crate::prefix_attention::MultiPrefixDims`]) on
/// host buffers; the ids, offsets and `context_lens` values are checked on both backends,
/// since they are on the host here.
pub fn multi_prefix_attention<T: Element>(
    backend: &Backend,
    op: &PrefixAttention,
    dims: &MultiPrefixDims,
    args: HostMultiPrefixAttentionArgs<'_, T>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::multi_prefix_attention(op, dims, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            use plan::prefix_attention as pa;
            let mut up = Upload::new(stream);
            let (ids, offsets, lens) = (args.prefix_ids, args.prefix_offsets, args.context_lens);
            let steps = pa::multi_prefix_attention(op, dims, T::DTYPE, &args.bufs(&mut up))?;
            pa::check_prefix_set(ids, offsets, dims)?;
            if let Some(lens) = lens {
                pa::check_context_lens(lens, &dims.attention)
                    .map_err(|e| e.of("multi_prefix_attention"))?;
            }
            up.run(&steps)
        }
    }
}

/// One AdamW step ([`crate::optim`]) on host buffers.
pub fn adamw<T: Element>(
    backend: &Backend,
    op: &AdamW,
    step: u64,
    args: HostAdamwArgs<'_, T>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::adamw(op, step, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let mut up = Upload::new(stream);
            let plan = plan::optim::adamw(op, step, T::DTYPE, &args.bufs(&mut up))?;
            // The table goes up as one more input (its scratch words are not read back).
            let addr = match up.copy(bytemuck::cast_slice(&plan.table)) {
                Some((d, addr)) => {
                    up.inputs.push(d);
                    addr
                }
                None => 0,
            };
            up.run(&plan.steps(addr))
        }
    }
}

/// `prefix_attention_backward` ([`crate::prefix_attention`]) on host buffers: given the
/// forward's output and LSE and the output gradient, writes dq, dK, dV, dP_k and dP_v (the
/// `context_lens` values are checked on both backends, since they are on the host here).
pub fn prefix_attention_backward<T: Element>(
    backend: &Backend,
    op: &PrefixAttention,
    dims: &PrefixAttentionBackwardDims,
    args: HostPrefixAttentionBackwardArgs<'_, T>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::prefix_attention_backward(op, dims, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            if let Some(lens) = args.context_lens {
                plan::prefix_attention::check_backward_context_lens(lens, dims)?;
            }
            let mut up = Upload::new(stream);
            let steps = plan::prefix_attention::prefix_attention_backward(
                op,
                dims,
                T::DTYPE,
                &args.bufs(&mut up),
            )?;
            up.run(&steps)
        }
    }
}

host_op!(
    /// `dora_norm` (`g = m / ‖W + scale·B·A‖` per row, [`crate::dora`]) on host buffers.
    dora_norm,
    dora_norm_plan,
    (dims: &DoraDims, scale: f32),
    DoraNormArgs<&[T], &mut [f32]>
);
host_op!(
    /// `dora_linear` (the DoRA forward, [`crate::dora`]) on host buffers.
    dora_linear,
    plan::dora::dora_linear,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    DoraLinearArgs<&[T], &mut [T], &[f32]>
);
host_op!(
    /// `dora_linear_train` (the DoRA forward that saves what its backward reads) on host
    /// buffers.
    dora_linear_train,
    plan::dora::dora_linear_train,
    (op: &DeltaLinear, dims: &DeltaLinearDims),
    DoraLinearTrainArgs<&[T], &mut [T], &[f32], &mut [f32]>
);

/// `dora_linear_backward` (the magnitude's, the adapter's and x's gradients,
/// [`crate::dora`]) on host buffers.
pub fn dora_linear_backward<T: Element>(
    backend: &Backend,
    op: &DeltaLinear,
    dims: &DeltaLinearDims,
    args: DoraLinearBackwardArgs<&[T], &[f32], &mut [T], &mut [f32]>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::dora_linear_backward(op, dims, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let mut up = Upload::new(stream);
            let p = plan::dora::dora_linear_backward(op, dims, T::DTYPE, &args.bufs(&mut up))?;
            up.run2(&p.columns, &p.backward)
        }
    }
}

/// DoRA's merge, or with `unmerge` its inverse ([`crate::dora`]), on host buffers.
pub fn dora_merge<T: Element>(
    backend: &Backend,
    dims: &DoraDims,
    scale: f32,
    unmerge: bool,
    args: DoraMergeArgs<&[T], &mut [T], &[f32]>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::dora_merge(dims, scale, unmerge, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let mut up = Upload::new(stream);
            let p = plan::dora::dora_merge(T::DTYPE, dims, scale, unmerge, &args.bufs(&mut up))?;
            if p.unmerge {
                up.run2(&[p.scale], &[p.merge])
            } else {
                up.run2(&[p.merge], &[p.scale])
            }
        }
    }
}

/// `multi_delta_linear` ([`crate::multi_adapter`]) on host buffers and a host adapter set
/// (the GPU gets a device copy of the set, with the same ids, for the call). Every id of the
/// batch is checked before anything runs.
pub fn multi_delta_linear<T: Element>(
    backend: &Backend,
    dims: &crate::multi_adapter::MultiDeltaDims,
    set: &crate::multi_adapter::AdapterSet<T>,
    args: crate::multi_adapter::HostMultiDeltaLinearArgs<'_, T>,
) -> Result<()> {
    match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => crate::emulator::multi_delta_linear(dims, set, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(stream) => {
            let device = crate::cuda::DeviceAdapterSet::from_host(stream, set)?;
            let batch = args.batch;
            let mut up = Upload::new(stream);
            let b = args.bufs(&mut up);
            let steps = plan::multi_adapter::multi_delta_linear(
                dims,
                T::DTYPE,
                &device.view(),
                &b,
                Some(batch),
            )?;
            up.run2(&steps.delta, &steps.frozen)
        }
    }
}

/// The DoRA plans as the other plans are shaped: one step in a list.
#[cfg(feature = "cuda")]
fn dora_norm_plan(
    dims: &DoraDims,
    scale: f32,
    dtype: crate::DType,
    b: &plan::dora::DoraNormBufs,
) -> Result<Vec<(Launch, plan::dora::DoraNormParams)>> {
    Ok(vec![plan::dora::dora_norm(dtype, dims, scale, b)?])
}

/// The LoRA merge plan as the other plans are shaped: one step in a list.
#[cfg(feature = "cuda")]
fn lora_merge_plan(
    dims: &LoraMergeDims,
    scale: f32,
    dtype: crate::DType,
    b: &plan::delta_linear::LoraMergeBufs,
) -> Result<Vec<(Launch, plan::delta_linear::LoraMergeParams)>> {
    Ok(vec![plan::delta_linear::lora_merge(dtype, dims, scale, b)?])
}

/// Host buffers copied to the GPU as a plan's operands, as bytes (so one upload serves the
/// element tensors, u32 lengths and f32 statistics): inputs once, outputs up (so what a
/// kernel leaves unwritten stays as it was) and back down after the launches.
#[cfg(feature = "cuda")]
pub(crate) struct Upload<'h> {
    stream: &'h std::sync::Arc<cudarc::driver::CudaStream>,
    inputs: Vec<cudarc::driver::CudaSlice<u8>>,
    outputs: Vec<(cudarc::driver::CudaSlice<u8>, &'h mut [u8])>,
    error: Option<Error>,
}

#[cfg(feature = "cuda")]
impl<'h> Upload<'h> {
    pub(crate) fn new(stream: &'h std::sync::Arc<cudarc::driver::CudaStream>) -> Self {
        Upload {
            stream,
            inputs: Vec::new(),
            outputs: Vec::new(),
            error: None,
        }
    }

    /// A device copy of `host` and its address; empty buffers are not allocated.
    fn copy(&mut self, host: &[u8]) -> Option<(cudarc::driver::CudaSlice<u8>, u64)> {
        use cudarc::driver::DevicePtr;
        if host.is_empty() || self.error.is_some() {
            return None;
        }
        match self.stream.clone_htod(host) {
            Ok(d) => {
                let addr = d.device_ptr(self.stream).0;
                Some((d, addr))
            }
            Err(e) => {
                self.error = Some(e.into());
                None
            }
        }
    }

    /// Launches the steps, copies the outputs back and waits for the stream.
    pub(crate) fn run<P: KernelParams>(self, steps: &[(Launch, P)]) -> Result<()> {
        self.run2(steps, &[] as &[(Launch, P)])
    }

    /// [`Upload::run`] for a plan of two kernel families: `first`'s steps, then `second`'s.
    pub(crate) fn run2<P: KernelParams, Q: KernelParams>(
        self,
        first: &[(Launch, P)],
        second: &[(Launch, Q)],
    ) -> Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        // SAFETY: every address in the steps is a device copy made here, of the length the
        // plan checked.
        for (l, p) in first {
            unsafe { crate::cuda::launch(self.stream, l, p) }?;
        }
        for (l, p) in second {
            unsafe { crate::cuda::launch(self.stream, l, p) }?;
        }
        for (d, host) in self.outputs {
            self.stream.memcpy_dtoh(&d, host)?;
        }
        self.stream.synchronize()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl<'r, 'h, A: bytemuck::Pod, B: bytemuck::Pod> BufSource<&'r [A], &'h mut [B]> for Upload<'h> {
    fn read(&mut self, r: &'r [A]) -> Buf {
        let addr = match self.copy(bytemuck::cast_slice(r)) {
            Some((d, addr)) => {
                self.inputs.push(d);
                addr
            }
            None => 0,
        };
        Buf { addr, len: r.len() }
    }
    fn write(&mut self, w: &'h mut [B]) -> Buf {
        let len = w.len();
        let bytes: &'h mut [u8] = bytemuck::cast_slice_mut(w);
        let addr = match self.copy(bytes) {
            Some((d, addr)) => {
                self.outputs.push((d, bytes));
                addr
            }
            None => 0,
        };
        Buf { addr, len }
    }
}
