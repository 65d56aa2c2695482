//! `delta_linear_quant`: every method of the unified view over a quantized frozen W (NF4 with
//! f32 or double-quantized absmax, FP8 E4M3 with per-row or block scales), every kernel and
//! activation dtype, awkward shapes, random configurations, poisoned outputs, against the f64
//! reference over the dequantized W (src/reference/quant.rs).

#[macro_use]
mod common;

use common::{poisoned, random_cases, runs_wgmma, Placed, Rng};
use half::{bf16, f16};
use peft_kernels::delta_linear::{
    DeltaLinear, DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs,
    KernelVariant, LoraDropout,
};
use peft_kernels::host::{self, Backend};
use peft_kernels::quant::{
    DeltaLinearQuantArgs, DeltaLinearQuantBackwardArgs, DeltaLinearQuantTrainArgs, Fp8Scaling,
    Fp8Weight, Nf4Absmax, Nf4Weight, QuantWeight, NF4_CODE,
};
use peft_kernels::reference::linear::{self as reference, DeltaLinearTensors};
use peft_kernels::reference::quant::dequantize;
use peft_kernels::reference::MatRef;
use peft_kernels::validate::{assert_close_matrix, default_tolerance};
use peft_kernels::{Activation, Composition, Element, Error, Insertion, MatrixLayout};

/// Which quantized format a case uses.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Nf4,
    Nf4Double,
    Fp8Row,
    Fp8Block(usize, usize),
}

/// A random quantized W [n, k], owning its buffers.
struct Quant {
    format: Format,
    blocksize: usize,
    data: Vec<u8>,
    code: Vec<f32>,
    absmax: Vec<f32>,
    codes: Vec<u8>,
    nested_code: Vec<f32>,
    nested_absmax: Vec<f32>,
    offset: f32,
    scale: Vec<f32>,
}

impl Quant {
    /// Values of magnitude about 1/√k (so that x·Wᵀ stays O(1)), one block or row of them
    /// zero-scaled (absmax or scale 0 over random codes: zeros, never NaN).
    fn random(rng: &mut Rng, format: Format, n: usize, k: usize) -> Quant {
        let s = 1.0 / (k as f64).sqrt();
        let count = n * k;
        let mut q = Quant {
            format,
            blocksize: 64,
            data: vec![],
            code: NF4_CODE.to_vec(),
            absmax: vec![],
            codes: vec![],
            nested_code: vec![],
            nested_absmax: vec![],
            offset: 0.0,
            scale: vec![],
        };
        match format {
            Format::Nf4 | Format::Nf4Double => {
                q.blocksize = rng.pick(&[32, 64, 64, 128]);
                q.data = (0..count.div_ceil(2))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                let blocks = count.div_ceil(q.blocksize);
                if format == Format::Nf4 {
                    q.absmax = (0..blocks)
                        .map(|_| rng.uniform(0.5, 2.0) as f32 * s as f32)
                        .collect();
                    let zero = rng.range(0, blocks - 1);
                    q.absmax[zero] = 0.0;
                } else {
                    q.codes = (0..blocks).map(|_| rng.next_u64() as u8).collect();
                    q.nested_code = (0..256).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
                    q.nested_absmax = (0..blocks.div_ceil(256))
                        .map(|_| rng.uniform(0.2, 1.0) as f32 * s as f32)
                        .collect();
                    q.offset = (1.5 * s) as f32;
                }
            }
            Format::Fp8Row | Format::Fp8Block(..) => {
                // Any byte but E4M3's NaNs (0x7f, 0xff); values up to 448.
                q.data = (0..count)
                    .map(|_| loop {
                        let b = rng.next_u64() as u8;
                        if b & 0x7f != 0x7f {
                            break b;
                        }
                    })
                    .collect();
                let scales = match format {
                    Format::Fp8Block(br, bc) => n.div_ceil(br) * k.div_ceil(bc),
                    _ => n,
                };
                q.scale = (0..scales)
                    .map(|_| rng.uniform(0.5, 2.0) as f32 * s as f32 / 100.0)
                    .collect();
                let zero = rng.range(0, scales - 1);
                q.scale[zero] = 0.0;
            }
        }
        q
    }

    fn weight<'a>(&'a self, data: &'a [u8]) -> QuantWeight<&'a [u8], &'a [f32]> {
        match self.format {
            Format::Nf4 | Format::Nf4Double => QuantWeight::Nf4(Nf4Weight {
                packed: data,
                code: &self.code,
                blocksize: self.blocksize,
                absmax: if self.format == Format::Nf4 {
                    Nf4Absmax::F32(&self.absmax)
                } else {
                    Nf4Absmax::Double {
                        codes: &self.codes,
                        code: &self.nested_code,
                        scales: &self.nested_absmax,
                        offset: self.offset,
                    }
                },
            }),
            Format::Fp8Row | Format::Fp8Block(..) => QuantWeight::Fp8(Fp8Weight {
                weight: data,
                scale: &self.scale,
                scaling: match self.format {
                    Format::Fp8Block(rows, cols) => Fp8Scaling::Block { rows, cols },
                    _ => Fp8Scaling::PerRow,
                },
            }),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    op: DeltaLinear,
    dims: DeltaLinearDims,
    format: Format,
    bias: bool,
    biases: bool,
    /// The packed bytes one byte past a 16-byte boundary (the element-by-element loads).
    misaligned: bool,
}

struct Inputs<T> {
    x: Vec<T>,
    w: Quant,
    bias: Option<Vec<T>>,
    w_down: Vec<T>,
    b_down: Option<Vec<T>>,
    w_up: Vec<T>,
    b_up: Option<Vec<T>>,
    gate: Option<Vec<T>>,
}

fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

impl<T: Element> Inputs<T> {
    fn new(rng: &mut Rng, c: &Case) -> Self {
        let d = c.dims;
        let k_u = if c.op.insertion == Insertion::Sequential {
            d.n
        } else {
            d.k
        };
        let scaled = |rng: &mut Rng, len: usize, fan_in: usize| -> Vec<T> {
            let s = 1.0 / (fan_in as f64).sqrt();
            (0..len)
                .map(|_| T::from_f64(s * rng.uniform(-1.0, 1.0)))
                .collect()
        };
        Inputs {
            x: rng.uniform_vec(d.m * d.k),
            w: Quant::random(rng, c.format, d.n, d.k),
            bias: c.bias.then(|| rng.uniform_vec(d.n)),
            w_down: scaled(rng, d.r * k_u, k_u),
            b_down: c.biases.then(|| rng.uniform_vec(d.r)),
            w_up: scaled(rng, d.n * d.r, d.r),
            b_up: c.biases.then(|| rng.uniform_vec(d.n)),
            gate: (c.op.composition == Composition::Gated)
                .then(|| (0..d.m).map(|_| T::from_f64(rng.unit())).collect()),
        }
    }

    /// The f64 reference over the dequantized W rounded to T, the W every kernel multiplies
    /// (kernels/quant.cuh, `quant_value_t`); a sequential delta reads h rounded to T, as the
    /// kernels materialise it (tests/delta_linear.rs `Inputs::reference`). With W unrounded
    /// here, h's reference drifts by W's rounding, which a large scale times a cancelling
    /// rank-1 h·a turns into a relative error over 1e-2 of y now and then (seed
    /// 9047699258875946281: bf16, sequential, rsLoRA α = 62, r = 1, n = 5).
    fn reference(&self, c: &Case) -> Vec<f64> {
        let d = c.dims;
        let w: Vec<f64> = dequantize(&self.w.weight(&self.w.data), d.n, d.k)
            .expect("dequantize")
            .into_iter()
            .map(|v| T::from_f64(v).to_f64())
            .collect();
        let (x, bias) = (widen(&self.x), self.bias.as_deref().map(widen));
        let (w_down, w_up) = (widen(&self.w_down), widen(&self.w_up));
        let (b_down, b_up) = (
            self.b_down.as_deref().map(widen),
            self.b_up.as_deref().map(widen),
        );
        let gate = self.gate.as_deref().map(widen);
        let k_u = w_down.len() / d.r;
        let tensors = |x, w, b, u| DeltaLinearTensors::<'_, f64> {
            x,
            w,
            b,
            u,
            w_down: MatRef::new(&w_down, d.r, k_u),
            b_down: b_down.as_deref(),
            w_up: MatRef::new(&w_up, d.n, d.r),
            b_up: b_up.as_deref(),
            gate: gate.as_deref(),
        };
        let (x, w) = (MatRef::new(&x, d.m, d.k), MatRef::new(&w, d.n, d.k));
        if c.op.insertion == Insertion::Parallel {
            return reference::delta_linear(&c.op, &tensors(x, w, bias.as_deref(), None))
                .expect("reference");
        }
        let h: Vec<f64> = reference::linear(x, w, bias.as_deref())
            .expect("reference")
            .into_iter()
            .map(|v| T::from_f64(v).to_f64())
            .collect();
        let identity: Vec<f64> = (0..d.n * d.n)
            .map(|i| if i % (d.n + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        let h = MatRef::new(&h, d.m, d.n);
        let parallel = DeltaLinear {
            insertion: Insertion::Parallel,
            ..c.op
        };
        reference::delta_linear(
            &parallel,
            &tensors(h, MatRef::new(&identity, d.n, d.n), None, Some(h)),
        )
        .expect("reference")
    }

    fn run(&self, c: &Case, backend: &Backend) -> peft_kernels::Result<Vec<T>> {
        let d = c.dims;
        let mut y = poisoned::<T>(d.m * d.n);
        let mut workspace = poisoned::<T>(d.workspace_len());
        let data = Placed::new(&self.w.data, c.misaligned);
        let args = DeltaLinearQuantArgs {
            x: &self.x[..],
            w: self.w.weight(data.get()),
            bias: self.bias.as_deref(),
            u: None,
            w_down: &self.w_down[..],
            b_down: self.b_down.as_deref(),
            w_up: &self.w_up[..],
            b_up: self.b_up.as_deref(),
            gate: self.gate.as_deref(),
            workspace: &mut workspace[..],
            y: &mut y[..],
        };
        host::delta_linear_quant(backend, &c.op, &d, args)?;
        Ok(y)
    }
}

fn check<T: Element>(rng: &mut Rng, c: &Case, backend: &Backend) {
    let inputs = Inputs::<T>::new(rng, c);
    let expected = inputs.reference(c);
    let y = inputs
        .run(c, backend)
        .unwrap_or_else(|e| panic!("{c:?} ({}, seed {}): {e}", T::DTYPE, rng.seed()));
    let name = format!("{} {:?} (seed {})", T::DTYPE, c, rng.seed());
    let layout = MatrixLayout::contiguous(c.dims.m, c.dims.n);
    assert_close_matrix(&name, &y, layout, &expected, default_tolerance(T::DTYPE));
}

fn check_every_dtype(rng: &mut Rng, c: &Case, backend: &Backend) {
    check::<f32>(rng, c, backend);
    check::<f16>(rng, c, backend);
    check::<bf16>(rng, c, backend);
}

const FORMATS: [Format; 5] = [
    Format::Nf4,
    Format::Nf4Double,
    Format::Fp8Row,
    Format::Fp8Block(128, 128),
    Format::Fp8Block(3, 16),
];

fn random_op(rng: &mut Rng) -> DeltaLinear {
    let (scale, alpha, rslora) = (
        rng.uniform(-3.0, 5.0) as f32,
        rng.uniform(-16.0, 64.0) as f32,
        rng.chance(0.5),
    );
    let composition = rng.pick(&[
        Composition::Add,
        Composition::Scaled(scale),
        Composition::Lora { alpha, rslora },
        Composition::Gated,
    ]);
    let insertion = rng.pick(&[Insertion::Parallel, Insertion::Sequential]);
    DeltaLinear::new(insertion, rng.pick(&Activation::ALL), composition)
}

/// Every format × kernel on awkward shapes: m ∈ {1, 3, 65, 257}; n odd; k not a multiple of
/// the NF4 block (blocks straddle rows), odd (n·k odd: a pad nibble), a multiple of 32 (the
/// 16-byte loads of the tensor-core loader) and long enough at decode to split over K.
fn awkward_shapes(backend: &Backend) {
    let mut rng = Rng::from_env();
    let shapes = [
        (1, 33, 1152, 16),
        (3, 7, 13, 4),
        (65, 31, 100, 8),
        (257, 17, 64, 3),
        (1, 5, 96, 1),
    ];
    let kernels = [
        KernelVariant::Naive,
        KernelVariant::Simt,
        KernelVariant::Auto,
    ];
    for (i, &(m, n, k, r)) in shapes.iter().enumerate() {
        for (j, &format) in FORMATS.iter().enumerate() {
            let mut dims = DeltaLinearDims::new(m, n, k, r);
            dims.kernel = kernels[(i + j) % kernels.len()];
            let c = Case {
                op: random_op(&mut rng),
                dims,
                format,
                bias: rng.chance(0.5),
                biases: rng.chance(0.5),
                misaligned: false,
            };
            check_every_dtype(&mut rng, &c, backend);
        }
    }
}

/// The tensor-core kernels (decode, small, mid, large tiles; wgmma where it runs) with the packed
/// bytes aligned (16-byte loads) and misaligned (element by element), f16 and bf16.
fn tensor_cores(backend: &Backend) {
    let mut rng = Rng::from_env();
    let mut kernels = vec![KernelVariant::TensorCore];
    if runs_wgmma(backend) {
        kernels.push(KernelVariant::Wgmma);
    }
    for &(m, n, k) in &[
        (1, 40, 256),
        (16, 67, 128),
        (41, 97, 192),
        (65, 130, 96),
        (129, 129, 160),
    ] {
        for &format in &FORMATS {
            for misaligned in [false, true] {
                let mut dims = DeltaLinearDims::new(m, n, k, rng.range(1, 16));
                dims.kernel = rng.pick(&kernels);
                let c = Case {
                    op: random_op(&mut rng),
                    dims,
                    format,
                    bias: true,
                    biases: true,
                    misaligned,
                };
                check::<f16>(&mut rng, &c, backend);
                check::<bf16>(&mut rng, &c, backend);
            }
        }
    }
}

/// Random configurations every run (`PEFT_RANDOM_CASES`, default 12).
fn random_configurations(backend: &Backend) {
    let mut rng = Rng::from_env();
    for _ in 0..random_cases(12) {
        let m = rng.pick(&[1, 3, 65, 257]);
        let n = rng.range(1, 70);
        let k = if rng.chance(0.5) {
            32 * rng.range(1, 8)
        } else {
            rng.range(1, 300)
        };
        let mut dims = DeltaLinearDims::new(m, n, k, rng.range(1, 20));
        dims.kernel = rng.pick(&[
            KernelVariant::Naive,
            KernelVariant::Simt,
            KernelVariant::Auto,
            KernelVariant::TensorCore,
        ]);
        let format = match rng.range(0, 3) {
            0 => Format::Nf4,
            1 => Format::Nf4Double,
            2 => Format::Fp8Row,
            _ => {
                let (rows, any) = (rng.range(1, 130), rng.range(1, 130));
                Format::Fp8Block(rows, rng.pick(&[16, 32, 128, any]))
            }
        };
        let c = Case {
            op: random_op(&mut rng),
            dims,
            format,
            bias: rng.chance(0.5),
            biases: rng.chance(0.5),
            misaligned: rng.chance(0.3),
        };
        match dims.kernel {
            KernelVariant::TensorCore => {
                check::<f16>(&mut rng, &c, backend);
                check::<bf16>(&mut rng, &c, backend);
            }
            _ => check_every_dtype(&mut rng, &c, backend),
        }
    }
}

/// A bad quantized weight is an error naming it, attributed to the operation.
fn bad_arguments(backend: &Backend) {
    let mut rng = Rng::from_env();
    let (m, n, k, r) = (2, 5, 70, 2);
    let dims = DeltaLinearDims::new(m, n, k, r);
    let c = Case {
        op: DeltaLinear::lora(8.0),
        dims,
        format: Format::Nf4,
        bias: false,
        biases: false,
        misaligned: false,
    };
    let inputs = Inputs::<f32>::new(&mut rng, &c);
    let mut y = poisoned::<f32>(m * n);
    let mut workspace = poisoned::<f32>(dims.workspace_len());
    let short = &inputs.w.data[1..];
    let args = DeltaLinearQuantArgs {
        x: &inputs.x[..],
        w: inputs.w.weight(short),
        bias: None,
        u: None,
        w_down: &inputs.w_down[..],
        b_down: None,
        w_up: &inputs.w_up[..],
        b_up: None,
        gate: None,
        workspace: &mut workspace[..],
        y: &mut y[..],
    };
    match host::delta_linear_quant(backend, &c.op, &dims, args) {
        Err(Error::InvalidArgument { op, arg, .. }) => {
            assert_eq!((op, arg), ("delta_linear_quant", "w.packed"))
        }
        other => panic!("expected w.packed refused, got {other:?}"),
    }
    assert!(y.iter().all(|v| v.is_nan()), "nothing ran");
}

/// Every buffer a training step writes: the forward's y and saved, the backward's gradients.
#[derive(Debug, PartialEq)]
struct Step<T> {
    y: Vec<T>,
    saved: Vec<f32>,
    dx: Vec<T>,
    du: Option<Vec<T>>,
    grads: Vec<Vec<f32>>,
}

/// A training step (forward, backward) over W quantized, or dense as W_T = T(dequantize_f32),
/// the values the quantized kernels multiply with.
#[allow(clippy::too_many_arguments)]
fn train_step<T: Element>(
    backend: &Backend,
    op: &DeltaLinear,
    d: &DeltaLinearDims,
    inputs: &Inputs<T>,
    quant: bool,
    u: Option<&[T]>,
    dy: &[T],
    dropout: Option<LoraDropout>,
) -> Step<T> {
    let w_t: Vec<T> = inputs
        .w
        .weight(&inputs.w.data)
        .dequantize_f32(d.n, d.k)
        .unwrap()
        .into_iter()
        .map(T::from_f32)
        .collect();
    let k_u = inputs.w_down.len() / d.r;
    let mut y = poisoned::<T>(d.m * d.n);
    let mut workspace = poisoned::<T>(d.workspace_len());
    let mut saved = poisoned::<f32>(d.saved_len(op));
    let r = if quant {
        let forward = DeltaLinearQuantArgs {
            x: &inputs.x[..],
            w: inputs.w.weight(&inputs.w.data),
            bias: inputs.bias.as_deref(),
            u,
            w_down: &inputs.w_down[..],
            b_down: inputs.b_down.as_deref(),
            w_up: &inputs.w_up[..],
            b_up: inputs.b_up.as_deref(),
            gate: inputs.gate.as_deref(),
            workspace: &mut workspace[..],
            y: &mut y[..],
        };
        host::delta_linear_quant_train(
            backend,
            op,
            d,
            DeltaLinearQuantTrainArgs {
                forward,
                saved: &mut saved[..],
                dropout,
            },
        )
    } else {
        let forward = DeltaLinearArgs {
            x: &inputs.x[..],
            w: &w_t[..],
            bias: inputs.bias.as_deref(),
            u,
            w_down: &inputs.w_down[..],
            b_down: inputs.b_down.as_deref(),
            w_up: &inputs.w_up[..],
            b_up: inputs.b_up.as_deref(),
            gate: inputs.gate.as_deref(),
            workspace: &mut workspace[..],
            y: &mut y[..],
        };
        host::delta_linear_train(
            backend,
            op,
            d,
            DeltaLinearTrainArgs {
                forward,
                saved: &mut saved[..],
                dropout,
            },
        )
    };
    r.unwrap_or_else(|e| panic!("{op:?} {d:?} forward (quantized {quant}): {e}"));
    let mut dx = poisoned::<T>(d.m * d.k);
    let mut du = u.map(|_| poisoned::<T>(d.m * k_u));
    let biased = inputs.b_up.is_some();
    let (mut dw_down, mut dw_up) = (vec![0.5f32; d.r * k_u], vec![0.25f32; d.n * d.r]);
    let (mut db_down, mut db_up) = (
        biased.then(|| vec![0.5f32; d.r]),
        biased.then(|| vec![0.5f32; d.n]),
    );
    let mut dgate = inputs.gate.as_ref().map(|_| poisoned::<f32>(d.m));
    let mut ws = poisoned::<f32>(d.backward_workspace_len(op));
    let accumulate = dropout.is_some();
    let r = if quant {
        host::delta_linear_quant_backward(
            backend,
            op,
            d,
            DeltaLinearQuantBackwardArgs {
                dy,
                x: &inputs.x[..],
                w: inputs.w.weight(&inputs.w.data),
                u,
                w_down: &inputs.w_down[..],
                w_up: &inputs.w_up[..],
                b_up: inputs.b_up.as_deref(),
                gate: inputs.gate.as_deref(),
                saved: &saved[..],
                dx: &mut dx[..],
                du: du.as_deref_mut(),
                dw_down: &mut dw_down[..],
                db_down: db_down.as_deref_mut(),
                dw_up: &mut dw_up[..],
                db_up: db_up.as_deref_mut(),
                dgate: dgate.as_deref_mut(),
                workspace: &mut ws[..],
                dropout,
                accumulate,
            },
        )
    } else {
        host::delta_linear_backward(
            backend,
            op,
            d,
            DeltaLinearBackwardArgs {
                dy,
                x: &inputs.x[..],
                w: &w_t[..],
                u,
                w_down: &inputs.w_down[..],
                w_up: &inputs.w_up[..],
                b_up: inputs.b_up.as_deref(),
                gate: inputs.gate.as_deref(),
                saved: &saved[..],
                dx: &mut dx[..],
                du: du.as_deref_mut(),
                dw_down: &mut dw_down[..],
                db_down: db_down.as_deref_mut(),
                dw_up: &mut dw_up[..],
                db_up: db_up.as_deref_mut(),
                dgate: dgate.as_deref_mut(),
                workspace: &mut ws[..],
                dropout,
                accumulate,
            },
        )
    };
    r.unwrap_or_else(|e| panic!("{op:?} {d:?} backward (quantized {quant}): {e}"));
    let grads = [Some(dw_down), db_down, Some(dw_up), db_up, dgate]
        .into_iter()
        .flatten()
        .collect();
    Step {
        y,
        saved,
        dx,
        du,
        grads,
    }
}

/// Training over a quantized W (`delta_linear_quant_train`, `delta_linear_quant_backward`)
/// against the dense training step over W_T, bit for bit: the same kernels, plans and orders
/// of summation see the same W values (the dense step is checked against the f64 reference
/// and its finite differences in tests/delta_linear_backward.rs). The training issue's forms
/// (parallel with u = x or a separate u, sequential; every composition and activation),
/// every kernel and dtype, awkward shapes, dropout and accumulation.
fn training_matches_dense(backend: &Backend) {
    fn case<T: Element>(rng: &mut Rng, backend: &Backend, kernel: KernelVariant) {
        let (m, n, k) = (
            rng.pick(&[1, 3, 65]),
            rng.range(1, 40),
            rng.pick(&[13, 64, 100, 160]),
        );
        let mut dims = DeltaLinearDims::new(m, n, k, rng.range(1, 12));
        dims.kernel = kernel;
        let op = random_op(rng);
        let separate_u = op.insertion == Insertion::Parallel && rng.chance(0.4);
        let c = Case {
            op,
            dims,
            format: rng.pick(&FORMATS),
            bias: rng.chance(0.5),
            biases: rng.chance(0.5),
            misaligned: false,
        };
        let inputs = Inputs::<T>::new(rng, &c);
        let u: Option<Vec<T>> = separate_u.then(|| rng.uniform_vec(m * k));
        let dy: Vec<T> = rng.uniform_vec(m * n);
        let dropout = rng.chance(0.3).then(|| LoraDropout {
            p: 0.25,
            seed: rng.next_u64(),
        });
        let run = |quant| {
            train_step(
                backend,
                &c.op,
                &dims,
                &inputs,
                quant,
                u.as_deref(),
                &dy,
                dropout,
            )
        };
        let (dense, quantized) = (run(false), run(true));
        let name = format!(
            "{} {c:?} separate u {separate_u} (seed {})",
            T::DTYPE,
            rng.seed()
        );
        assert!(
            dense.dx.iter().all(|v| v.to_f64().is_finite()),
            "{name}: dx written"
        );
        assert!(
            dense == quantized,
            "{name}: the quantized step differs from the dense one"
        );
    }
    let mut rng = Rng::from_env();
    for _ in 0..random_cases(12) {
        let kernel = rng.pick(&[KernelVariant::Naive, KernelVariant::Simt]);
        case::<f32>(&mut rng, backend, kernel);
        let kernels = [
            KernelVariant::Naive,
            KernelVariant::Simt,
            KernelVariant::TensorCore,
        ];
        let kernel = rng.pick(&kernels);
        case::<f16>(&mut rng, backend, kernel);
        let kernel = rng.pick(&kernels);
        case::<bf16>(&mut rng, backend, kernel);
    }
}

on_every_backend!(
    awkward_shapes,
    tensor_cores,
    random_configurations,
    bad_arguments,
    training_matches_dense,
    dequantize_kernel_every_format,
);

/// The dequantize kernel on random weights of every format, awkward shapes and every dtype:
/// bit for bit `dequantize_f32` rounded to T (fused and unfused paths multiply the same W).
fn dequantize_kernel_every_format(backend: &Backend) {
    use peft_kernels::quant::QuantDequantizeArgs;
    fn check<T: Element>(
        backend: &Backend,
        rng: &mut Rng,
        format: Format,
        n: usize,
        k: usize,
        misaligned: bool,
    ) {
        let q = Quant::random(rng, format, n, k);
        let data = Placed::new(&q.data, misaligned);
        let expected: Vec<u64> = q
            .weight(&q.data)
            .dequantize_f32(n, k)
            .unwrap()
            .into_iter()
            .map(|v| T::from_f32(v).to_f64().to_bits())
            .collect();
        let mut out = Placed::new(&poisoned::<T>(n * k), misaligned);
        let args = QuantDequantizeArgs {
            w: q.weight(data.get()),
            out: out.get_mut(),
        };
        host::quant_dequantize(backend, n, k, args).unwrap();
        let got: Vec<u64> = out.get().iter().map(|v| v.to_f64().to_bits()).collect();
        assert!(
            got == expected,
            "{} {format:?} [{n}, {k}] misaligned {misaligned} (seed {})",
            T::DTYPE,
            rng.seed()
        );
    }
    let mut rng = Rng::from_env();
    for &(n, k) in &[(1, 1), (3, 13), (7, 64), (5, 100), (33, 256), (2, 1000)] {
        for &format in &FORMATS {
            let misaligned = rng.chance(0.3);
            check::<f32>(backend, &mut rng, format, n, k, misaligned);
            check::<f16>(backend, &mut rng, format, n, k, misaligned);
            check::<bf16>(backend, &mut rng, format, n, k, misaligned);
        }
    }
}
