//! The unfused sequence a user would write without this crate, on cuBLAS: the yardstick of
//! the fused kernels in the benchmarks (benches/delta_linear.rs), public so that users can
//! compare on their own shapes and GPUs.
//!
//! For `y = h + s·(f(u·W_downᵀ + b_down)·W_upᵀ + b_up)`, `h = x·Wᵀ + b`, [`Baseline`] queues
//! on its stream one library call per operation, as PEFT's LoRA and adapter layers do in
//! PyTorch's eager mode (`base_layer(x) + lora_B(lora_A(x)) * scaling`):
//!
//! ```text
//! 1. y = x·Wᵀ                cublasGemmEx
//! 2. y = y + b               bias_activation kernel          (only with b)
//! 3. t = u·W_downᵀ           cublasGemmEx into the workspace (u = x, the given u, or h = y)
//! 4. t = f(t + b_down)       bias_activation kernel          (unless f = identity, no b_down)
//! 5. y = s·t·W_upᵀ + y       cublasGemmEx, alpha = s, beta = 1
//! 6. y = y + s·b_up          bias_activation kernel          (only with b_up)
//! ```
//!
//! so LoRA is three GEMMs and a scaled parallel adapter three GEMMs and one elementwise
//! kernel; the scale rides on step 5's alpha and the sum on its beta, which is already
//! kinder than eager PyTorch (a separate scaling and a separate addition). Every GEMM
//! accumulates in f32 (`CUBLAS_COMPUTE_32F`: tensor cores for f16/bf16, plain FP32 without
//! TF32 for f32, as the crate's f32 contract asks) and stores in the element type, so t is
//! rounded to the storage type between steps as in the fused path.
//! The gated composition needs a per-row scale cuBLAS does not have and is
//! [`Error::Unsupported`] here.
//!
//! cuBLAS is column-major, the crate row-major. A row-major `[rows, cols]` matrix with row
//! stride `ld` is, read column-major, its transpose `[cols, rows]` with leading dimension
//! `ld`. So the row-major `C[m, n] = A[m, k]·B[n, k]ᵀ` is the column-major `Cᵀ = B·Aᵀ`:
//!
//! ```text
//! cublasGemmEx(transa = T, transb = N, m = n, n = m, k = k,
//!              A = B (lda = ld_B), B = A (ldb = ld_A), C = C (ldc = ld_C))
//! ```
//!
//! [`Baseline::matmul_nt`] is that one GEMM on its own (the benchmarks measure the
//! tensor-core rate with it). The `bias_activation` kernel lives in kernels/delta_linear.cu,
//! so it is built, checked and emulated like every other kernel of the crate.

use std::sync::Arc;

use cudarc::cublas::{result as cublas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream};

use super::{Buffers, DeviceDeltaLinearArgs, DeviceDeltaLinearQuantArgs, DeviceRead, DeviceWrite};
use crate::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims, KernelVariant};
use crate::kernels::KernelId;
use crate::plan::delta_linear::workspace_ld;
use crate::plan::{Buf, KernelParams, Launch};
use crate::quant::{DeltaLinearQuantArgs, QuantDequantizeArgs};
use crate::spec::{Activation, Composition, DType, Element, Insertion, MatrixLayout};
use crate::{Error, Result};

/// Twin of `BiasActivationParams` in kernels/delta_linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct BiasActivationParams {
    x: u64,
    bias: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    activation: i32,
    bias_scale: f32,
}
// SAFETY: #[repr(C)], field for field the C++ struct (checked by a size test).
unsafe impl KernelParams for BiasActivationParams {}

/// Threads per block of the bias_activation kernel.
const ELEMENTWISE_THREADS: usize = 256;
/// Its grid cap: enough blocks to fill any GPU many times over; the kernel's grid-stride
/// loop covers larger matrices.
const ELEMENTWISE_MAX_BLOCKS: usize = 65_536;

/// The launch of `bias_activation` over a `rows × cols` matrix.
fn bias_activation_launch(dtype: DType, rows: usize, cols: usize) -> Launch {
    let kernel = match dtype {
        DType::F32 => KernelId::bias_activation_f32,
        DType::F16 => KernelId::bias_activation_f16,
        DType::BF16 => KernelId::bias_activation_bf16,
    };
    let blocks = (rows * cols)
        .div_ceil(ELEMENTWISE_THREADS)
        .clamp(1, ELEMENTWISE_MAX_BLOCKS);
    Launch {
        kernel,
        grid: [blocks as u32, 1, 1],
        block: [ELEMENTWISE_THREADS as u32, 1, 1],
        dynamic_smem: 0,
        overlap_previous: false,
    }
}

/// A row-major GEMM operand: device address and leading dimension, as cuBLAS takes it.
#[derive(Clone, Copy, Debug)]
struct Operand {
    addr: u64,
    ld: i32,
}

/// `c = alpha·a·bᵀ + beta·c` with a [m, k], b [n, k], c [m, n], row-major.
#[derive(Clone, Copy, Debug)]
struct GemmShape {
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    beta: f32,
}

impl GemmShape {
    fn new(m: i32, n: i32, k: i32, alpha: f32, beta: f32) -> Self {
        GemmShape {
            m,
            n,
            k,
            alpha,
            beta,
        }
    }
}

fn cublas_error(what: &str) -> impl Fn(cublas::CublasError) -> Error + '_ {
    move |e| Error::Cuda(format!("cuBLAS {what}: {e}"))
}

/// A size or leading dimension as cuBLAS's `int`.
fn cublas_int(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(arg, format!("at most {} for cuBLAS", i32::MAX), v))
}

/// Whether the cuBLAS library opens. Probed here, as `cuda` probes the driver: cudarc's own
/// `is_culib_present` exists only under its `dynamic-loading`, which candle's
/// `dynamic-linking` in the same build turns off. The names are those cudarc tries first
/// (the unversioned name, then CUDA 13's and 12's).
fn cublas_library_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["cublas64_13.dll", "cublas64_12.dll"]
    } else {
        &["libcublas.so", "libcublas.so.13", "libcublas.so.12"]
    };
    names.iter().any(|name| {
        // SAFETY: loading the library runs only its initialisers, as cudarc's own loading
        // would; nothing in it is called here and it is unloaded on drop.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// The unfused cuBLAS sequence (see the module docs), on one stream.
#[derive(Debug)]
pub struct Baseline {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

impl Baseline {
    /// A cuBLAS handle whose work goes to `stream`. [`Error::Cuda`] when the cuBLAS library
    /// (libcublas of CUDA 13) cannot be loaded.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        if !cublas_library_present() {
            return Err(Error::Cuda(
                "the cuBLAS library (libcublas.so, .so.13 or .so.12) is not on the library search path".into(),
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(cublas_error("handle creation"))?;
        Ok(Baseline { stream, blas })
    }

    /// The stream every call queues its work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `c = alpha·a·bᵀ + beta·c` for row-major `a` [m, k], `b` [n, k], `c` [m, n] (the
    /// layouts of x, W and y), one cublasGemmEx with f32 accumulation, queued on the
    /// stream. Shapes, strides and lengths are checked first.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_nt<'a, T: Element>(
        &'a self,
        alpha: f32,
        a: DeviceRead<'a, T>,
        a_layout: MatrixLayout,
        b: DeviceRead<'a, T>,
        b_layout: MatrixLayout,
        beta: f32,
        c: DeviceWrite<'a, T>,
        c_layout: MatrixLayout,
    ) -> Result<()> {
        let (m, n, k) = (a_layout.rows, b_layout.rows, a_layout.cols);
        if b_layout.cols != k {
            return Err(Error::invalid(
                "b",
                format!("[n, k] with k = {k} (a's columns)"),
                b_layout.cols,
            ));
        }
        if (c_layout.rows, c_layout.cols) != (m, n) {
            return Err(Error::invalid(
                "c",
                format!("[{m}, {n}] (a's rows, b's rows)"),
                format!("[{}, {}]", c_layout.rows, c_layout.cols),
            ));
        }
        for (arg, len, l) in [
            ("a", a.len(), a_layout),
            ("b", b.len(), b_layout),
            ("c", c.len(), c_layout),
        ] {
            if l.ld < l.cols.max(1) || len < l.min_len() {
                return Err(Error::invalid(
                    arg,
                    format!(
                        "at least {} elements and ld ≥ {}",
                        l.min_len(),
                        l.cols.max(1)
                    ),
                    format!("{len} elements, ld {}", l.ld),
                ));
            }
        }
        let (m, n, k) = (
            cublas_int("m", m)?,
            cublas_int("n", n)?,
            cublas_int("k", k)?,
        );
        let shape = GemmShape::new(m, n, k, alpha, beta);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (lda, ldb, ldc) = (
            cublas_int("a", a_layout.ld)?,
            cublas_int("b", b_layout.ld)?,
            cublas_int("c", c_layout.ld)?,
        );
        let mut bufs = Buffers::new(&self.stream);
        let a = Operand {
            addr: bufs.read(a),
            ld: lda,
        };
        let b = Operand {
            addr: bufs.read(b),
            ld: ldb,
        };
        let c = Operand {
            addr: bufs.write(c),
            ld: ldc,
        };
        bufs.check_before_launch()?;
        self.stream.context().bind_to_thread()?;
        // SAFETY: the buffers hold the checked layouts and stay guarded by `bufs` until the
        // GEMM is queued.
        unsafe { self.gemm_nt::<T>(shape, a, b, c) }
    }

    /// The unfused sequence of [`crate::cuda::delta_linear`] for the same arguments, which
    /// are checked exactly as that call checks them (`dims.kernel` is ignored); the
    /// workspace holds t. Parallel and sequential insertion with the add and scaled-add
    /// compositions; [`Error::Unsupported`] for the gate.
    pub fn delta_linear<'a, T: Element>(
        &'a self,
        op: &DeltaLinear,
        dims: &DeltaLinearDims,
        args: DeviceDeltaLinearArgs<'a, T>,
    ) -> Result<()> {
        if op.composition == Composition::Gated {
            return Err(Error::Unsupported(
                "the cuBLAS baseline has no gated composition (a per-row scale of h and Δh)".into(),
            ));
        }
        let d = DeltaLinearDims {
            kernel: KernelVariant::Auto,
            ..*dims
        };
        let mut bufs = Buffers::new(&self.stream);
        let b = args.bufs(&mut bufs);
        // The fused call's validation: shapes, strides, lengths, the workspace, the scale.
        crate::plan::delta_linear::delta_linear(op, &d, T::DTYPE, &b)?;
        if d.m == 0 {
            return Ok(());
        }
        // The plan checked that m, n, k, k_u and r fit an i32.
        let (m, n, k, r) = (d.m as i32, d.n as i32, d.k as i32, d.r as i32);
        let s = op.composition.scale(d.r);
        let operand = |buf: Buf, ld| Operand { addr: buf.addr, ld };
        let x = operand(b.x, cublas_int("dims.ld_x", d.ld_x)?);
        let y = operand(b.y, cublas_int("dims.ld_y", d.ld_y)?);
        let t = operand(b.workspace, cublas_int("dims.r", workspace_ld(d.r))?);
        let (u, k_u) = match (op.insertion, b.u) {
            (Insertion::Sequential, _) => (y, n),
            (Insertion::Parallel, Some(u)) => {
                (operand(u, cublas_int("dims.ld_u", d.ld_u)?), d.k_u as i32)
            }
            (Insertion::Parallel, None) => (x, k),
        };
        let (w, w_down, w_up) = (operand(b.w, k), operand(b.w_down, k_u), operand(b.w_up, r));
        // x[rows, cols] ← f(x + bias_scale·bias) in place.
        let bias_act = |x: Operand, rows, cols, bias: Option<Buf>, bias_scale, f: Activation| {
            let p = BiasActivationParams {
                x: x.addr,
                bias: bias.map_or(0, |b| b.addr),
                ld: i64::from(x.ld),
                rows,
                cols,
                activation: f as i32,
                bias_scale,
            };
            let launch = bias_activation_launch(T::DTYPE, rows as usize, cols as usize);
            // SAFETY: x is a checked [rows, cols] matrix with row stride ld, bias a checked
            // vector of cols elements, both guarded by `bufs`.
            unsafe { super::launch(&self.stream, &launch, &p) }
        };

        bufs.check_before_launch()?;
        self.stream.context().bind_to_thread()?;
        // SAFETY (each GEMM): the plan checked every operand's buffer against these shapes
        // and strides; `bufs` keeps them stream-ordered until everything is queued.
        unsafe { self.gemm_nt::<T>(GemmShape::new(m, n, k, 1.0, 0.0), x, w, y) }?;
        if b.bias.is_some() {
            bias_act(y, m, n, b.bias, 1.0, Activation::Identity)?;
        }
        unsafe { self.gemm_nt::<T>(GemmShape::new(m, r, k_u, 1.0, 0.0), u, w_down, t) }?;
        if b.b_down.is_some() || op.activation != Activation::Identity {
            bias_act(t, m, r, b.b_down, 1.0, op.activation)?;
        }
        unsafe { self.gemm_nt::<T>(GemmShape::new(m, n, r, s, 1.0), t, w_up, y) }?;
        if b.b_up.is_some() {
            bias_act(y, m, n, b.b_up, s, Activation::Identity)?;
        }
        // The buffers record their uses now that everything is queued.
        drop(bufs);
        Ok(())
    }

    /// QLoRA as Unsloth and PEFT run it: the quantized W dequantized into `w_dequantized`
    /// ([n, k], T) by the crate's `quant_dequantize` kernel, then the cuBLAS sequence of
    /// [`Baseline::delta_linear`] over it. The yardstick of `cuda::delta_linear_quant`, which
    /// never materialises W.
    pub fn delta_linear_quant<'a, T: Element>(
        &'a self,
        op: &DeltaLinear,
        dims: &DeltaLinearDims,
        args: DeviceDeltaLinearQuantArgs<'a, T>,
        w_dequantized: &'a mut CudaSlice<T>,
    ) -> Result<()> {
        let DeltaLinearQuantArgs {
            x,
            w,
            bias,
            u,
            w_down,
            b_down,
            w_up,
            b_up,
            gate,
            workspace,
            y,
        } = args;
        let out: DeviceWrite<'_, T> = &mut *w_dequantized;
        super::quant_dequantize(&self.stream, dims.n, dims.k, QuantDequantizeArgs { w, out })?;
        let w: &'a CudaSlice<T> = w_dequantized;
        let args: DeviceDeltaLinearArgs<'a, T> = DeltaLinearArgs {
            x,
            w,
            bias,
            u,
            w_down,
            b_down,
            w_up,
            b_up,
            gate,
            workspace,
            y,
        };
        self.delta_linear(op, dims, args)
    }

    /// One cublasGemmEx for the row-major `c = alpha·a·bᵀ + beta·c` (see the module docs
    /// for the column-major mapping), f32 accumulation and f32 alpha and beta.
    ///
    /// # Safety
    /// As [`Baseline::gemm`].
    unsafe fn gemm_nt<T: Element>(
        &self,
        shape: GemmShape,
        a: Operand,
        b: Operand,
        c: Operand,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.gemm::<T>(shape, (a, false), (b, true), c) }
    }

    /// One cublasGemmEx for the row-major `c[m, n] = alpha·Σ_k a'[m, k]·b'[k, n] + beta·c`,
    /// where `a' = a` stored [m, k] or, with `a.1`, `aᵀ` for `a` stored [k, m]; and `b' = bᵀ`
    /// for `b` stored [n, k] (`b.1`, the layout of W in x·Wᵀ) or `b` stored [k, n]. Read
    /// column-major, that is `cᵀ = b'ᵀ·a'ᵀ`: cuBLAS's A is our b (transposed when stored
    /// [n, k]), its B our a (transposed when stored [k, m]). f32 accumulation, f32 alpha and
    /// beta.
    ///
    /// # Safety
    /// The addresses are device memory of the stream's context holding the matrices of
    /// `shape` with their leading dimensions (each ≥ its columns), in use only in stream
    /// order until the GEMM completes; the context is current on this thread.
    unsafe fn gemm<T: Element>(
        &self,
        shape: GemmShape,
        (a, a_transposed): (Operand, bool),
        (b, b_rows_n): (Operand, bool),
        c: Operand,
    ) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let data_type = match T::DTYPE {
            DType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
            DType::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
            DType::BF16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
        };
        let GemmShape {
            m,
            n,
            k,
            alpha,
            beta,
        } = shape;
        let op_b = if b_rows_n { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let op_a = if a_transposed {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        };
        // SAFETY: the caller's contract; alpha and beta are host f32 values (the handle's
        // default pointer mode, the scale type of CUBLAS_COMPUTE_32F), read before the call
        // returns.
        unsafe {
            cublas::gemm_ex(
                *self.blas.handle(),
                op_b,
                op_a,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                b.addr as *const _,
                data_type,
                b.ld,
                a.addr as *const _,
                data_type,
                a.ld,
                (&beta as *const f32).cast(),
                c.addr as *mut _,
                data_type,
                c.ld,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas_error("GemmEx"))
    }

    /// One training step of a LoRA-form layer (identity bottleneck, no biases, every tensor
    /// contiguous) as Unsloth writes it on cuBLAS, the yardstick of
    /// `delta_linear_train` + `delta_linear_backward` (benches/delta_linear_train.rs):
    ///
    /// ```text
    /// forward   1. y = x·Wᵀ   2. t = x·Aᵀ   3. y += s·t·Bᵀ
    /// backward  4. dx = dy·W  5. da = s·dy·B  6. dx += da·A  7. dA = daᵀ·x  8. dB = s·dyᵀ·t
    /// ```
    ///
    /// eight GEMMs with f32 accumulation, every result stored in T (the adapter gradients
    /// too, as PyTorch's autograd leaves them for bf16 parameters). A = W_down [r, k], B =
    /// W_up [n, r]; `t` and `da` are [m, r] scratch.
    pub fn lora_training_step<'a, T: Element>(
        &'a self,
        (m, n, k, r): (usize, usize, usize, usize),
        scale: f32,
        args: LoraStepArgs<'a, T>,
    ) -> Result<()> {
        let (mi, ni, ki, ri) = (
            cublas_int("m", m)?,
            cublas_int("n", n)?,
            cublas_int("k", k)?,
            cublas_int("r", r)?,
        );
        let mut bufs = Buffers::new(&self.stream);
        let operand = |arg: &'static str, addr_len: (u64, usize), rows: usize, cols| {
            let (addr, len) = addr_len;
            if len < rows * cols {
                return Err(Error::invalid(
                    arg,
                    format!("at least {rows} × {cols} elements"),
                    len,
                ));
            }
            Ok(Operand {
                addr,
                ld: cols as i32,
            })
        };
        let mut read = |b: DeviceRead<'a, T>| (bufs.read(b), b.len());
        let (x, w, a, b, dy) = (
            read(args.x),
            read(args.w),
            read(args.lora_a),
            read(args.lora_b),
            read(args.dy),
        );
        let mut write = |b: DeviceWrite<'a, T>| {
            let len = b.len();
            (bufs.write(b), len)
        };
        let (y, t, dx, da, d_a, d_b) = (
            write(args.y),
            write(args.t),
            write(args.dx),
            write(args.da),
            write(args.d_lora_a),
            write(args.d_lora_b),
        );
        let x = operand("x", x, m, k)?;
        let w = operand("w", w, n, k)?;
        let a = operand("lora_a", a, r, k)?;
        let b = operand("lora_b", b, n, r)?;
        let dy = operand("dy", dy, m, n)?;
        let y = operand("y", y, m, n)?;
        let t = operand("t", t, m, r)?;
        let dx = operand("dx", dx, m, k)?;
        let da = operand("da", da, m, r)?;
        let d_a = operand("d_lora_a", d_a, r, k)?;
        let d_b = operand("d_lora_b", d_b, n, r)?;
        if m == 0 {
            return Ok(());
        }
        bufs.check_before_launch()?;
        self.stream.context().bind_to_thread()?;
        let g = GemmShape::new;
        // SAFETY (each GEMM): every operand holds its shape (checked above, contiguous) and
        // is guarded by `bufs` until everything is queued.
        unsafe {
            self.gemm::<T>(g(mi, ni, ki, 1.0, 0.0), (x, false), (w, true), y)?;
            self.gemm::<T>(g(mi, ri, ki, 1.0, 0.0), (x, false), (a, true), t)?;
            self.gemm::<T>(g(mi, ni, ri, scale, 1.0), (t, false), (b, true), y)?;
            self.gemm::<T>(g(mi, ki, ni, 1.0, 0.0), (dy, false), (w, false), dx)?;
            self.gemm::<T>(g(mi, ri, ni, scale, 0.0), (dy, false), (b, false), da)?;
            self.gemm::<T>(g(mi, ki, ri, 1.0, 1.0), (da, false), (a, false), dx)?;
            self.gemm::<T>(g(ri, ki, mi, 1.0, 0.0), (da, true), (x, false), d_a)?;
            self.gemm::<T>(g(ni, ri, mi, scale, 0.0), (dy, true), (t, false), d_b)?;
        }
        drop(bufs);
        Ok(())
    }
}

/// The tensors of [`Baseline::lora_training_step`], contiguous.
pub struct LoraStepArgs<'a, T> {
    /// [m, k].
    pub x: DeviceRead<'a, T>,
    /// [n, k].
    pub w: DeviceRead<'a, T>,
    /// A = W_down [r, k].
    pub lora_a: DeviceRead<'a, T>,
    /// B = W_up [n, r].
    pub lora_b: DeviceRead<'a, T>,
    /// [m, n].
    pub dy: DeviceRead<'a, T>,
    /// [m, n].
    pub y: DeviceWrite<'a, T>,
    /// Scratch [m, r]: t = x·Aᵀ.
    pub t: DeviceWrite<'a, T>,
    /// [m, k].
    pub dx: DeviceWrite<'a, T>,
    /// Scratch [m, r]: da = s·dy·B.
    pub da: DeviceWrite<'a, T>,
    /// [r, k].
    pub d_lora_a: DeviceWrite<'a, T>,
    /// [n, r].
    pub d_lora_b: DeviceWrite<'a, T>,
}

impl Baseline {
    /// The unfused multi-adapter sequence of Punica-style serving for a segmented batch (the
    /// yardstick of [`crate::cuda::multi_delta_linear`], benches/multi_adapter.rs): the
    /// frozen GEMM for every row, then per segment with an adapter a shrink GEMM of its rows
    /// into t, the bias and activation, and an expand GEMM adding s·t·W_upᵀ to its rows of y
    /// (beta = 1), and s·b_up:
    ///
    /// ```text
    /// y = x·Wᵀ (+ b)                               cublasGemmEx (+ bias_activation)
    /// per segment g of adapter a, rows R_g:
    ///   t[R_g] = x[R_g]·W_down,aᵀ                  cublasGemmEx
    ///   t[R_g] = f_a(t[R_g] + b_down,a)            bias_activation (unless identity, no bias)
    ///   y[R_g] = s_a·t[R_g]·W_up,aᵀ + y[R_g]       cublasGemmEx, alpha = s_a, beta = 1
    ///   y[R_g] += s_a·b_up,a                       bias_activation (only with b_up)
    /// ```
    ///
    /// The segments are given on the host too (`host_starts`, `host_ids`: the launches of a
    /// segment depend on them, as a per-group launcher's do); the call checks them and the
    /// tensors as the fused call does, with `args.batch` its device twin (unused here).
    pub fn multi_delta_linear<'a, T: Element>(
        &'a self,
        dims: &crate::multi_adapter::MultiDeltaDims,
        set: &'a super::DeviceAdapterSet<T>,
        (host_starts, host_ids): (&[i32], &[i32]),
        args: super::DeviceMultiDeltaLinearArgs<'a, T>,
    ) -> Result<()> {
        use crate::multi_adapter::AdapterBatch;
        let d = crate::multi_adapter::MultiDeltaDims {
            kernel: KernelVariant::Auto,
            ..*dims
        };
        let mut bufs = Buffers::new(&self.stream);
        let b = args.bufs(&mut bufs);
        let host = AdapterBatch::Segments {
            starts: host_starts,
            ids: host_ids,
        };
        crate::plan::multi_adapter::multi_delta_linear(&d, T::DTYPE, &set.view(), &b, Some(host))?;
        if d.m == 0 {
            return Ok(());
        }
        let size = T::DTYPE.size() as u64;
        let (n, k) = (d.n as i32, d.k as i32);
        let ldt = workspace_ld(set.max_rank());
        let at = |buf: Buf, row: usize, ld: usize| Operand {
            addr: buf.addr + (row * ld) as u64 * size,
            ld: ld as i32,
        };
        let bias_act = |x: Operand, rows, cols, bias: u64, bias_scale, f: Activation| {
            let p = BiasActivationParams {
                x: x.addr,
                bias,
                ld: i64::from(x.ld),
                rows,
                cols,
                activation: f as i32,
                bias_scale,
            };
            let launch = bias_activation_launch(T::DTYPE, rows as usize, cols as usize);
            // SAFETY: x is a checked [rows, cols] block of a checked matrix, bias (if any) an
            // adapter's or the layer's checked vector of cols elements.
            unsafe { super::launch(&self.stream, &launch, &p) }
        };
        bufs.check_before_launch()?;
        self.stream.context().bind_to_thread()?;
        let (x, y) = (at(b.x, 0, d.ld_x), at(b.y, 0, d.ld_y));
        // SAFETY (each GEMM): the plan checked x, W, y, the workspace and every segment; the
        // set's entries hold its adapters' checked shapes; `bufs` keeps the call's buffers
        // stream-ordered until everything is queued.
        unsafe {
            self.gemm_nt::<T>(
                GemmShape::new(d.m as i32, n, k, 1.0, 0.0),
                x,
                at(b.w, 0, d.k),
                y,
            )
        }?;
        if let Some(bias) = b.bias {
            bias_act(y, d.m as i32, n, bias.addr, 1.0, Activation::Identity)?;
        }
        for (s, &id) in host_ids.iter().enumerate() {
            let (r0, r1) = (host_starts[s] as usize, host_starts[s + 1] as usize);
            let Some(e) = usize::try_from(id).ok().map(|id| set.entries()[id]) else {
                continue;
            };
            if r1 == r0 {
                continue;
            }
            let (rows, r) = ((r1 - r0) as i32, e.rank);
            let t = at(b.workspace, r0, ldt);
            let (w_down, w_up) = (
                Operand {
                    addr: e.w_down,
                    ld: k,
                },
                Operand {
                    addr: e.w_up,
                    ld: r,
                },
            );
            unsafe {
                self.gemm_nt::<T>(
                    GemmShape::new(rows, r, k, 1.0, 0.0),
                    at(b.x, r0, d.ld_x),
                    w_down,
                    t,
                )
            }?;
            let f = crate::spec::Activation::ALL[e.activation as usize];
            if e.b_down != 0 || f != Activation::Identity {
                bias_act(t, rows, r, e.b_down, 1.0, f)?;
            }
            let y_rows = at(b.y, r0, d.ld_y);
            unsafe {
                self.gemm_nt::<T>(GemmShape::new(rows, n, r, e.scale, 1.0), t, w_up, y_rows)
            }?;
            if e.b_up != 0 {
                bias_act(y_rows, rows, n, e.b_up, e.scale, Activation::Identity)?;
            }
        }
        drop(bufs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta_linear::DeltaLinearArgs;
    use crate::validate::{assert_close_matrix, assert_padding_untouched, default_tolerance};
    use half::{bf16, f16};

    /// Uniform values in [-1, 1) from SplitMix64, seeded by `PEFT_SEED` or the clock; the
    /// seed goes to stderr, which the harness shows when a test fails.
    struct Rng(u64);

    impl Rng {
        fn from_env() -> Rng {
            let seed = std::env::var("PEFT_SEED")
                .ok()
                .map(|s| {
                    s.trim()
                        .parse()
                        .expect("PEFT_SEED must be an unsigned integer")
                })
                .unwrap_or_else(|| {
                    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                    t.expect("clock before 1970").as_nanos() as u64
                });
            eprintln!("PEFT_SEED={seed}");
            Rng(seed)
        }
        fn unit(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
        }
        /// `n` values uniform in [-scale, scale), rounded to T.
        fn vec<T: Element>(&mut self, n: usize, scale: f64) -> Vec<T> {
            (0..n)
                .map(|_| T::from_f64(scale * (2.0 * self.unit() - 1.0)))
                .collect()
        }
    }

    #[cfg(feature = "emulator")]
    #[test]
    fn params_match_the_kernel() {
        unsafe extern "C" {
            fn pk_sizeof_BiasActivationParams() -> usize;
        }
        // SAFETY: returns a constant.
        let size = unsafe { pk_sizeof_BiasActivationParams() };
        assert_eq!(size, std::mem::size_of::<BiasActivationParams>());
    }

    /// One run of the elementwise kernel on the emulator against f64, on a strided matrix
    /// with NaN in the gaps between rows, which must stay untouched.
    #[cfg(feature = "emulator")]
    fn check_bias_activation<T: Element>(
        rng: &mut Rng,
        layout: MatrixLayout,
        launch: Launch,
        act: Activation,
        bias: Option<f32>,
    ) {
        let MatrixLayout { rows, cols, ld } = layout;
        let mut x: Vec<T> = rng.vec(layout.min_len() + 3, 3.0);
        for (i, v) in x.iter_mut().enumerate() {
            if i % ld >= cols || i >= rows * ld {
                *v = T::nan();
            }
        }
        let b: Vec<T> = rng.vec(cols, 1.0);
        let bias_of = |j: usize| bias.map_or(0.0, |s| f64::from(s) * b[j].to_f64());
        let reference: Vec<f64> = (0..rows * cols)
            .map(|e| act.apply_f64(x[e / cols * ld + e % cols].to_f64() + bias_of(e % cols)))
            .collect();
        let before = x.clone();
        let params = BiasActivationParams {
            x: x.as_mut_ptr() as u64,
            bias: bias.map_or(0, |_| b.as_ptr() as u64),
            ld: ld as i64,
            rows: rows as i32,
            cols: cols as i32,
            activation: act as i32,
            bias_scale: bias.unwrap_or(0.0),
        };
        // SAFETY: x holds the strided matrix, b `cols` elements.
        unsafe { crate::emulator::launch(&launch, &params) }.unwrap();
        let name = format!(
            "bias_activation {} {act:?} bias {bias:?} {rows}x{cols} ld {ld} grid {:?}",
            T::DTYPE,
            launch.grid
        );
        // Element by element: one rounding to T, plus f32 evaluation of the activation
        // (tanh near −1 costs ~1e-7 absolute, which a relative norm over few elements of
        // tiny GELU values would magnify). NaN fails.
        let tol = default_tolerance(T::DTYPE);
        for (e, want) in reference.iter().enumerate() {
            let got = x[e / cols * ld + e % cols].to_f64();
            let (i, j) = (e / cols, e % cols);
            assert!(
                (got - want).abs() <= tol * want.abs() + 2e-6,
                "{name}: [{i}, {j}] is {got:e}, expected {want:e}"
            );
        }
        assert_padding_untouched(&name, &x, &before, layout);
    }

    #[cfg(feature = "emulator")]
    fn bias_activation_on_emulator<T: Element>(rng: &mut Rng) {
        // 1 element; rows × cols not a multiple of the block; and, with the grid cut to one
        // or two blocks (any grid is valid), the grid-stride loop going round several times.
        for (rows, cols, ld) in [(1, 1, 1), (7, 45, 50), (3, 300, 301)] {
            let natural = bias_activation_launch(T::DTYPE, rows, cols);
            let small = |blocks| Launch {
                grid: [blocks, 1, 1],
                ..natural
            };
            for launch in [natural, small(1), small(2)] {
                for act in Activation::ALL {
                    for bias in [None, Some(1.5)] {
                        let layout = MatrixLayout { rows, cols, ld };
                        check_bias_activation::<T>(rng, layout, launch, act, bias);
                    }
                }
            }
        }
    }

    #[cfg(feature = "emulator")]
    #[test]
    fn bias_activation_every_dtype_on_the_emulator() {
        let mut rng = Rng::from_env();
        bias_activation_on_emulator::<f32>(&mut rng);
        bias_activation_on_emulator::<f16>(&mut rng);
        bias_activation_on_emulator::<bf16>(&mut rng);
    }

    /// The baseline on the GPU against the f64 reference: LoRA, a scaled parallel adapter
    /// with every bias, a separate delta input, a sequential adapter, strided x and y.
    fn baseline_matches_the_reference<T: Element>(rng: &mut Rng) {
        use crate::reference::linear::{self as reference, DeltaLinearTensors};
        use crate::reference::MatRef;

        let stream = super::super::context(0)
            .expect("GPU tests need a CUDA device")
            .default_stream();
        let baseline = Baseline::new(stream.clone()).unwrap();
        let (m, n, k, r) = (37, 45, 70, 5);
        let cases = [
            (DeltaLinear::lora(16.0), false, false),
            (
                DeltaLinear::parallel_adapter(Activation::Relu, 4.0),
                true,
                false,
            ),
            (
                DeltaLinear::parallel_adapter(Activation::Silu, 1.0),
                true,
                true,
            ),
            (DeltaLinear::houlsby(Activation::GeluTanh), true, false),
        ];
        for (op, biases, separate_u) in cases {
            let (ld_x, ld_y, k_u, ld_u) = (k + 3, n + 5, 23, 30);
            let k_down = match (op.insertion, separate_u) {
                (Insertion::Sequential, _) => n,
                (Insertion::Parallel, true) => k_u,
                (Insertion::Parallel, false) => k,
            };
            let x: Vec<T> = rng.vec(m * ld_x, 1.0);
            let w: Vec<T> = rng.vec(n * k, 1.0 / (k as f64).sqrt());
            let u: Vec<T> = rng.vec(m * ld_u, 1.0);
            let w_down: Vec<T> = rng.vec(r * k_down, 1.0 / (k_down as f64).sqrt());
            let w_up: Vec<T> = rng.vec(n * r, 1.0 / (r as f64).sqrt());
            let (bias, b_down, b_up): (Vec<T>, Vec<T>, Vec<T>) =
                (rng.vec(n, 0.5), rng.vec(r, 0.5), rng.vec(n, 0.5));
            let tensors = DeltaLinearTensors {
                x: MatRef::with_ld(&x, m, k, ld_x),
                w: MatRef::new(&w, n, k),
                b: biases.then_some(&bias[..]),
                u: separate_u.then(|| MatRef::with_ld(&u, m, k_u, ld_u)),
                w_down: MatRef::new(&w_down, r, k_down),
                b_down: biases.then_some(&b_down[..]),
                w_up: MatRef::new(&w_up, n, r),
                b_up: biases.then_some(&b_up[..]),
                gate: None,
            };
            let expected = reference::delta_linear(&op, &tensors).unwrap();

            let up = |v: &[T]| stream.clone_htod(v).unwrap();
            let (dx, dw, du, dw_down, dw_up) = (up(&x), up(&w), up(&u), up(&w_down), up(&w_up));
            let (dbias, db_down, db_up) = (up(&bias), up(&b_down), up(&b_up));
            let before = vec![T::nan(); m * ld_y];
            let mut dy = up(&before);
            let ws_len = DeltaLinearDims::new(m, n, k, r).workspace_len();
            let mut ws = up(&vec![T::nan(); ws_len]);
            let dims = DeltaLinearDims {
                ld_x,
                ld_y,
                k_u,
                ld_u,
                ..DeltaLinearDims::new(m, n, k, r)
            };
            let args: DeviceDeltaLinearArgs<T> = DeltaLinearArgs {
                x: &dx,
                w: &dw,
                bias: biases.then_some(&dbias as DeviceRead<T>),
                u: separate_u.then_some(&du as DeviceRead<T>),
                w_down: &dw_down,
                b_down: biases.then_some(&db_down as DeviceRead<T>),
                w_up: &dw_up,
                b_up: biases.then_some(&db_up as DeviceRead<T>),
                gate: None,
                workspace: &mut ws,
                y: &mut dy,
            };
            baseline.delta_linear(&op, &dims, args).unwrap();
            let y = stream.clone_dtoh(&dy).unwrap();
            let layout = MatrixLayout {
                rows: m,
                cols: n,
                ld: ld_y,
            };
            let name = format!("baseline {} {op:?} separate u {separate_u}", T::DTYPE);
            assert_close_matrix(&name, &y, layout, &expected, default_tolerance(T::DTYPE));
            assert_padding_untouched(&name, &y, &before, layout);
        }

        // matmul_nt alone: c = 2·a·bᵀ − c.
        let (a, b, c): (Vec<T>, Vec<T>, Vec<T>) = (
            rng.vec(m * k, 1.0),
            rng.vec(n * k, 1.0),
            rng.vec(m * n, 1.0),
        );
        let ab =
            crate::reference::linear(MatRef::new(&a, m, k), MatRef::new(&b, n, k), None).unwrap();
        let expected: Vec<f64> = ab
            .iter()
            .zip(&c)
            .map(|(ab, c)| 2.0 * ab - c.to_f64())
            .collect();
        let (da, db, mut dc) = (
            stream.clone_htod(&a).unwrap(),
            stream.clone_htod(&b).unwrap(),
            stream.clone_htod(&c).unwrap(),
        );
        let (la, lb, lc) = (
            MatrixLayout::contiguous(m, k),
            MatrixLayout::contiguous(n, k),
            MatrixLayout::contiguous(m, n),
        );
        baseline
            .matmul_nt(2.0, &da, la, &db, lb, -1.0, &mut dc, lc)
            .unwrap();
        let name = format!("matmul_nt {}", T::DTYPE);
        assert_close_matrix(
            &name,
            &stream.clone_dtoh(&dc).unwrap(),
            lc,
            &expected,
            default_tolerance(T::DTYPE),
        );
        let err = baseline
            .matmul_nt(1.0, &da, la, &da, lb, 0.0, &mut dc, lc)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { arg: "b", .. }),
            "{err}"
        );
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn baseline_every_dtype_on_the_gpu() {
        let mut rng = Rng::from_env();
        baseline_matches_the_reference::<f32>(&mut rng);
        baseline_matches_the_reference::<f16>(&mut rng);
        baseline_matches_the_reference::<bf16>(&mut rng);
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gated_composition_is_unsupported() {
        let stream = super::super::context(0)
            .expect("GPU tests need a CUDA device")
            .default_stream();
        let baseline = Baseline::new(stream.clone()).unwrap();
        let (m, n, k, r) = (4, 8, 8, 2);
        let buf = |len| stream.alloc_zeros::<f32>(len).unwrap();
        let (x, w, w_down, w_up, gate) = (buf(m * k), buf(n * k), buf(r * k), buf(n * r), buf(m));
        let ws_len = DeltaLinearDims::new(m, n, k, r).workspace_len();
        let (mut ws, mut y) = (buf(ws_len), buf(m * n));
        let op = DeltaLinear::new(Insertion::Parallel, Activation::Relu, Composition::Gated);
        let args: DeviceDeltaLinearArgs<f32> = DeltaLinearArgs {
            x: &x,
            w: &w,
            bias: None,
            u: None,
            w_down: &w_down,
            b_down: None,
            w_up: &w_up,
            b_up: None,
            gate: Some(&gate as DeviceRead<f32>),
            workspace: &mut ws,
            y: &mut y,
        };
        let err = baseline
            .delta_linear(&op, &DeltaLinearDims::new(m, n, k, r), args)
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
    }

    #[test]
    fn elementwise_grid_is_capped_and_never_empty() {
        assert_eq!(bias_activation_launch(DType::F32, 0, 5).grid, [1, 1, 1]);
        assert_eq!(bias_activation_launch(DType::BF16, 3, 257).grid, [4, 1, 1]);
        let big = bias_activation_launch(DType::F16, 1 << 20, 4096);
        assert_eq!(big.grid, [ELEMENTWISE_MAX_BLOCKS as u32, 1, 1]);
        assert_eq!(big.kernel, KernelId::bias_activation_f16);
    }
}
