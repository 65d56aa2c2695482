//! A downstream crate as a candle user writes it: candle-core with `cuda` and peft-kernels
//! with `cuda` in one build. `.ci/run` runs `cargo check` here, which fails if the two
//! crates' cudarc features cannot combine (cudarc's build script refuses some pairs) or if
//! their cudarc types differ: the function below hands candle's own `CudaSlice`s and stream
//! to `peft_kernels::cuda::delta_linear` and wraps the output in a candle tensor.

use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use peft_kernels::cuda::cudarc::driver::{CudaSlice, CudaView};
use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
use peft_kernels::{Activation, Composition, Insertion};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ` on candle's CUDA tensors (f32, contiguous): x [m, k],
/// W [n, k], A [r, k], B [n, r]. Reads candle's buffers in place, on candle's stream.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    alpha: f32,
) -> Result<Tensor, BoxError> {
    let Device::Cuda(device) = x.device() else {
        return Err("lora_linear: x is not on a CUDA device".into());
    };
    let (m, k) = x.dims2()?;
    let (n, r) = b.dims2()?;
    let stream = device.cuda_stream();

    let dims = DeltaLinearDims::new(m, n, k, r);
    let method = DeltaLinear::new(
        Insertion::Parallel,
        Activation::Identity,
        Composition::Scaled(alpha / r as f32),
    );
    let mut workspace = stream.alloc_zeros::<f32>(dims.workspace_len())?;
    let mut y = stream.alloc_zeros::<f32>(m * n)?;

    // Each guard holds candle's storage lock while the kernels are queued.
    let (xs, x_layout) = x.storage_and_layout();
    let (ws, w_layout) = w.storage_and_layout();
    let (as_, a_layout) = a.storage_and_layout();
    let (bs, b_layout) = b.storage_and_layout();
    for t in [x, w, a, b] {
        if t.dtype() != DType::F32 {
            return Err("lora_linear takes f32 tensors".into());
        }
    }
    let x_view = cuda_view(&xs, x_layout)?;
    let w_view = cuda_view(&ws, w_layout)?;
    let a_view = cuda_view(&as_, a_layout)?;
    let b_view = cuda_view(&bs, b_layout)?;
    peft_kernels::cuda::delta_linear(
        &stream,
        &method,
        &dims,
        DeltaLinearArgs {
            x: &x_view,
            w: &w_view,
            bias: None,
            u: None,
            w_down: &a_view,
            b_down: None,
            w_up: &b_view,
            b_up: None,
            gate: None,
            workspace: &mut workspace,
            y: &mut y,
        },
    )?;

    let storage = CudaStorage::wrap_cuda_slice(y, device.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        (m, n),
        BackpropOp::none(),
        false,
    ))
}

/// The f32 elements of a contiguous CUDA tensor, as a view into candle's own allocation.
fn cuda_view<'a>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
) -> Result<CudaView<'a, f32>, BoxError> {
    let Storage::Cuda(cuda) = storage else {
        return Err("not a CUDA tensor".into());
    };
    if !layout.is_contiguous() {
        return Err("lora_linear takes contiguous tensors".into());
    }
    let slice: &CudaSlice<f32> = cuda.as_cuda_slice::<f32>()?;
    let start = layout.start_offset();
    Ok(slice.slice(start..start + layout.shape().elem_count()))
}

/// The same LoRA layer through the crate's candle layer (`peft_kernels::candle`, features
/// `candle` and `cuda`): on CUDA tensors the fused kernels on candle's stream, differentiable
/// by candle's autograd. Here so that the layer's CUDA path type-checks.
pub fn lora_layer(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    alpha: f32,
) -> candle_core::Result<Tensor> {
    use candle_core::Module;
    let layer = peft_kernels::candle::DeltaLinearLayer::new(DeltaLinear::lora(alpha), w, None, a, b)?;
    layer.forward(x)
}
