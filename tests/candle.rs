//! The candle layers (feature `candle`): candle's ops (the CPU path) and the emulator opt-in
//! against the f64 reference, forward and backward; gradients from candle's autograd and from
//! the custom ops' backward against each other and the reference backward; strided inputs;
//! bad input; PEFT's fixtures through the layers (with `peft`). The GPU twins (ignored: they
//! need a CUDA device and the `cuda` feature) run the fused kernels on candle's CUDA tensors
//! against the CPU path.

mod common;

use candle_core::{DType as CDType, Device, Module, Tensor, Var};
use common::Rng;
use half::{bf16, f16};
use peft_kernels::candle::{DeltaLinearLayer, PrefixAttentionLayer};
use peft_kernels::delta_linear::DeltaLinear;
use peft_kernels::reference::{self, DeltaLinearTensors, MatRef, PrefixAttentionTensors, Tensor4};
use peft_kernels::validate::default_tolerance;
use peft_kernels::{Activation, Composition, DType, Insertion};

/// Which path a layer runs: candle's ops on the CPU, the emulator, or CUDA.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Candle,
    Emulator,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Cuda,
}

impl Path {
    fn device(self) -> Device {
        match self {
            Path::Cuda => Device::new_cuda(0).expect("a CUDA device"),
            _ => Device::Cpu,
        }
    }
    fn emulator(self) -> bool {
        self == Path::Emulator
    }
}

fn candle_dtype(d: DType) -> CDType {
    match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
    }
}

/// `v` (already rounded to the dtype) as a tensor of `dtype` on `device`.
fn tensor(v: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(candle_dtype(dtype)))
        .and_then(|t| t.to_device(device))
        .expect("tensor")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(CDType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("values")
}

/// `v` rounded to `dtype` (kept in f64, exactly).
fn round_to(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => bf16::from_f64(v).to_f64(),
    }
}

/// `n` values uniform in [-scale, scale) rounded to `dtype`.
fn random(rng: &mut Rng, n: usize, dtype: DType, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| round_to(scale * rng.uniform(-1.0, 1.0), dtype))
        .collect()
}

/// Whether `path` rounds h to the dtype before the delta or gate reads it (see
/// [`reference_for`]).
fn rounds_h(p: &Problem, path: Path) -> bool {
    path != Path::Candle
        && p.dtype != DType::F32
        && (p.op.insertion == Insertion::Sequential || p.op.composition == Composition::Gated)
}

/// The reference of `p` as `path` computes it: y and the gradients in `run`'s order. The
/// kernels (emulator, CUDA) materialise h in T where a sequential delta reads it or a gate
/// composes with it (`crate::delta_linear`'s precision notes; a framework's bf16 h is the
/// same), so for a 16-bit sequential or gated delta on those paths the reference is the exact
/// layer over that rounded h_T (a parallel delta over h_T with an identity frozen weight),
/// the gradient reaching x through h = x·Wᵀ + b afterwards, as tests/delta_linear_backward.rs
/// does. Candle's ops compute in f32 and round only y: the plain reference.
fn reference_for(p: &Problem, path: Path) -> (Vec<f64>, Vec<Option<Vec<f64>>>) {
    let seq = p.op.insertion == Insertion::Sequential;
    if !rounds_h(p, path) {
        let y = reference::delta_linear(&p.op, &p.reference_tensors()).expect("reference");
        return (y, reference_grads(p));
    }
    let (m, n, k) = (p.m, p.n, p.k);
    let t = p.reference_tensors();
    let h: Vec<f64> = reference::linear(t.x, t.w, t.b)
        .expect("h")
        .into_iter()
        .map(|v| round_to(v, p.dtype))
        .collect();
    let identity: Vec<f64> = (0..n * n)
        .map(|i| f64::from(u8::from(i % (n + 1) == 0)))
        .collect();
    let hm = MatRef::new(&h, m, n);
    let op = DeltaLinear {
        insertion: Insertion::Parallel,
        ..p.op
    };
    let rt = DeltaLinearTensors {
        x: hm,
        w: MatRef::new(&identity, n, n),
        b: None,
        u: Some(if seq { hm } else { t.x }),
        ..t
    };
    let y = reference::delta_linear(&op, &rt).expect("reference over h_T");
    let g = reference::delta_linear_backward(&op, &rt, None, MatRef::new(&p.dy, m, n))
        .expect("reference backward over h_T");
    let du = g.du.expect("a separate u has a gradient");
    // dh through the composition (and, sequential, through u = h); dx = dh·W (+ du, u = x).
    let dh: Vec<f64> = if seq {
        g.dx.iter().zip(&du).map(|(a, b)| a + b).collect()
    } else {
        g.dx.clone()
    };
    let dx: Vec<f64> = (0..m * k)
        .map(|e| {
            let (i, c) = (e / k, e % k);
            let through_w: f64 = (0..n).map(|j| dh[i * n + j] * p.w[j * k + c]).sum();
            through_w + if seq { 0.0 } else { du[e] }
        })
        .collect();
    let grads = vec![
        Some(dx),
        Some(g.dw_down),
        Some(g.dw_up),
        p.b_down.as_ref().map(|_| g.db_down),
        p.b_up.as_ref().map(|_| g.db_up),
        g.dgate,
    ];
    (y, grads)
}

/// ‖got − expected‖ / ‖expected‖.
fn rel_err(got: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(got.len(), expected.len(), "lengths");
    let num: f64 = got.iter().zip(expected).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = expected.iter().map(|b| b * b).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Asserts a relative error below `tol`; below 1e-3 over fewer than 8 elements, whose
/// relative error is that of a few sums, which cancellation can leave at 1e-4 of f32
/// arithmetic that is right (as tests/delta_linear_backward.rs reasons; a wrong wiring is
/// off by far more).
#[track_caller]
fn assert_close(what: &str, got: &[f64], expected: &[f64], tol: f64, seed: u64) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite values (PEFT_SEED={seed})"
    );
    let tol = if got.len() < 8 { tol.max(1e-3) } else { tol };
    let e = rel_err(got, expected);
    assert!(
        e < tol,
        "{what}: relative error {e:.3e} >= {tol:.0e} (PEFT_SEED={seed})"
    );
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every form of the delta the layer takes (DoRA is tested on its own).
fn ops() -> Vec<(&'static str, DeltaLinear)> {
    vec![
        ("lora", DeltaLinear::lora(8.0)),
        ("rslora", DeltaLinear::rslora(4.0)),
        ("houlsby relu", DeltaLinear::houlsby(Activation::Relu)),
        (
            "sequential silu",
            DeltaLinear::new(
                Insertion::Sequential,
                Activation::Silu,
                Composition::Scaled(0.5),
            ),
        ),
        (
            "parallel adapter gelu",
            DeltaLinear::parallel_adapter(Activation::GeluTanh, 4.0),
        ),
        (
            "parallel adapter gelu erf",
            DeltaLinear::parallel_adapter(Activation::GeluErf, 1.0),
        ),
        (
            "gated",
            DeltaLinear::new(
                Insertion::Parallel,
                Activation::Identity,
                Composition::Gated,
            ),
        ),
    ]
}

/// A random delta-linear problem (values in f64, rounded to the dtype).
struct Problem {
    op: DeltaLinear,
    dtype: DType,
    /// x's leading dimensions (rows = their product).
    lead: Vec<usize>,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    w_down: Vec<f64>,
    b_down: Option<Vec<f64>>,
    w_up: Vec<f64>,
    b_up: Option<Vec<f64>>,
    gate: Option<Vec<f64>>,
    dy: Vec<f64>,
}

impl Problem {
    fn random(rng: &mut Rng, op: DeltaLinear, dtype: DType) -> Problem {
        let lead = vec![rng.pick(&[1, 2, 3]), rng.pick(&[1, 5, 7, 13])];
        let m = lead.iter().product();
        // f32 takes every awkward shape. A 16-bit layer's output and gradients are sums of
        // products rounded to 8 or 11 bits; over one output column or one input feature a
        // single cancelling sum decides the relative error (the kernels' own tests bound that
        // against a reference over the rounded h), so 16-bit draws keep n ≥ 5 and k ≥ 9.
        let (n, k) = if dtype == DType::F32 {
            (rng.pick(&[1, 5, 17, 40]), rng.pick(&[1, 9, 24, 33]))
        } else {
            (rng.pick(&[5, 17, 40]), rng.pick(&[9, 24, 33]))
        };
        let r = rng.pick(&[1, 3, 8]);
        let k_u = if op.insertion == Insertion::Sequential {
            n
        } else {
            k
        };
        let gated = op.composition == Composition::Gated;
        let mut opt = |on: bool, len: usize| on.then(|| random(rng, len, dtype, 0.5));
        let bias = opt(true, n);
        let b_down = opt(op.activation != Activation::Identity, r);
        let b_up = opt(op.activation != Activation::Identity || gated, n);
        Problem {
            op,
            dtype,
            lead,
            m,
            n,
            k,
            r,
            x: random(rng, m * k, dtype, 1.0),
            w: random(rng, n * k, dtype, 0.5),
            bias,
            w_down: random(rng, r * k_u, dtype, 0.5),
            b_down,
            w_up: random(rng, n * r, dtype, 0.5),
            b_up,
            gate: gated.then(|| {
                (0..m)
                    .map(|_| random(rng, 1, dtype, 1.0)[0].abs())
                    .collect()
            }),
            dy: random(rng, m * n, dtype, 1.0),
        }
    }

    fn k_u(&self) -> usize {
        if self.op.insertion == Insertion::Sequential {
            self.n
        } else {
            self.k
        }
    }

    fn x_shape(&self) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.push(self.k);
        s
    }

    fn reference_tensors(&self) -> DeltaLinearTensors<'_, f64> {
        DeltaLinearTensors {
            x: MatRef::new(&self.x, self.m, self.k),
            w: MatRef::new(&self.w, self.n, self.k),
            b: self.bias.as_deref(),
            u: None,
            w_down: MatRef::new(&self.w_down, self.r, self.k_u()),
            b_down: self.b_down.as_deref(),
            w_up: MatRef::new(&self.w_up, self.n, self.r),
            b_up: self.b_up.as_deref(),
            gate: self.gate.as_deref(),
        }
    }
}

/// The layer's tensors as candle `Var`s (x too), to read their gradients.
struct Vars {
    x: Var,
    w_down: Var,
    w_up: Var,
    b_down: Option<Var>,
    b_up: Option<Var>,
    gate: Option<Var>,
}

fn var(v: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Var {
    Var::from_tensor(&tensor(v, shape, dtype, device)).expect("var")
}

fn layer_for(p: &Problem, path: Path) -> (DeltaLinearLayer, Vars) {
    let device = path.device();
    let dt = p.dtype;
    let vars = Vars {
        x: var(&p.x, &p.x_shape(), dt, &device),
        w_down: var(&p.w_down, &[p.r, p.k_u()], dt, &device),
        w_up: var(&p.w_up, &[p.n, p.r], dt, &device),
        b_down: p.b_down.as_ref().map(|b| var(b, &[p.r], dt, &device)),
        b_up: p.b_up.as_ref().map(|b| var(b, &[p.n], dt, &device)),
        gate: p.gate.as_ref().map(|g| var(g, &p.lead, dt, &device)),
    };
    let bias = p.bias.as_ref().map(|b| tensor(b, &[p.n], dt, &device));
    let layer = DeltaLinearLayer::new(
        p.op,
        &tensor(&p.w, &[p.n, p.k], dt, &device),
        bias.as_ref(),
        &vars.w_down,
        &vars.w_up,
    )
    .and_then(|l| {
        l.with_adapter_biases(
            vars.b_down.as_ref().map(|v| v.as_tensor()),
            vars.b_up.as_ref().map(|v| v.as_tensor()),
        )
    })
    .expect("layer")
    .with_emulator(path.emulator());
    (layer, vars)
}

/// y and the gradients [dx, dw_down, dw_up, db_down, db_up, dgate] of Σ y·dy on `path`.
fn run(p: &Problem, path: Path) -> (Vec<f64>, Vec<Option<Vec<f64>>>) {
    let (layer, v) = layer_for(p, path);
    let y = layer
        .forward_gated(&v.x, v.gate.as_ref().map(|g| g.as_tensor()))
        .expect("forward");
    let mut out_shape = p.lead.clone();
    out_shape.push(p.n);
    assert_eq!(y.dims(), &out_shape[..], "y's shape");
    let dy = tensor(&p.dy, &out_shape, p.dtype, &path.device());
    let loss = y
        .to_dtype(CDType::F32)
        .and_then(|y| y.mul(&dy.to_dtype(CDType::F32)?))
        .and_then(|t| t.sum_all())
        .expect("loss");
    let grads = loss.backward().expect("backward");
    let g = |t: Option<&Var>| t.map(|t| values(grads.get(t.as_tensor()).expect("a gradient")));
    (
        values(&y),
        vec![
            g(Some(&v.x)),
            g(Some(&v.w_down)),
            g(Some(&v.w_up)),
            g(v.b_down.as_ref()),
            g(v.b_up.as_ref()),
            g(v.gate.as_ref()),
        ],
    )
}

/// The reference backward's gradients in `run`'s order.
fn reference_grads(p: &Problem) -> Vec<Option<Vec<f64>>> {
    let g = reference::delta_linear_backward(
        &p.op,
        &p.reference_tensors(),
        None,
        MatRef::new(&p.dy, p.m, p.n),
    )
    .expect("reference backward");
    vec![
        Some(g.dx),
        Some(g.dw_down),
        Some(g.dw_up),
        p.b_down.as_ref().map(|_| g.db_down),
        p.b_up.as_ref().map(|_| g.db_up),
        g.dgate,
    ]
}

const GRAD_NAMES: [&str; 6] = ["dx", "dw_down", "dw_up", "db_down", "db_up", "dgate"];

/// Gradient tolerance against the f64 reference. f32: the forward's 1e-5 for the kernels
/// (the emulator); 1e-4 for candle's ops, whose GELU (tanh and erf forms) and their
/// derivatives are its own f32 approximations (measured up to 6e-5 relative on a bias
/// gradient). 16-bit: here the gradients check the layer's wiring (a gradient in the wrong
/// slot, of the wrong input or scale is off by O(1)); their precision is
/// tests/delta_linear_backward.rs's, against a reference over the h the kernels round to T
/// (a ReLU whose input sits at its kink on the rounded h flips a whole term).
fn grad_tolerance(dtype: DType, path: Path) -> f64 {
    match (dtype, path) {
        (DType::F32, Path::Candle) => 1e-4,
        (DType::F32, _) => 1e-5,
        (DType::F16, _) => 1e-2,
        (DType::BF16, _) => 6e-2,
    }
}

fn check_paths(paths: &[Path], cases: usize) {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    for dtype in DTYPES {
        for (name, op) in ops() {
            for _ in 0..cases {
                let p = Problem::random(&mut rng, op, dtype);
                let what = |path: Path| {
                    format!(
                        "{name} {dtype} {path:?} m={} n={} k={} r={}",
                        p.m, p.n, p.k, p.r
                    )
                };
                let mut outs = Vec::new();
                for &path in paths {
                    let (y_ref, g_ref) = reference_for(&p, path);
                    let (y, grads) = run(&p, path);
                    assert_close(
                        &format!("{} y", what(path)),
                        &y,
                        &y_ref,
                        default_tolerance(dtype),
                        seed,
                    );
                    // With n = 1 or k = 1 every element of dW_down or dW_up is one sum over the
                    // rows whose cancellation decides its error (measured 1.1e-5 in f32 for a
                    // right result): 1e-4 there.
                    let thin = if p.n == 1 || p.k == 1 { 1e-4 } else { 0.0 };
                    for ((g, r), gname) in grads.iter().zip(&g_ref).zip(GRAD_NAMES) {
                        match (g, r) {
                            (Some(g), Some(r)) => assert_close(
                                &format!("{} {gname}", what(path)),
                                g,
                                r,
                                grad_tolerance(dtype, path).max(thin),
                                seed,
                            ),
                            (None, None) => {}
                            _ => panic!("{}: {gname} given on one side only", what(path)),
                        }
                    }
                    outs.push((path, y, grads));
                }
                // The paths against each other (the emulator against candle's ops) where they
                // compute the same thing (not where one rounds h).
                if let [(p0, y0, g0), (p1, y1, g1), ..] = &outs[..] {
                    if rounds_h(&p, *p0) != rounds_h(&p, *p1) {
                        continue;
                    }
                    assert_close(
                        &format!("{} y vs the first path", what(*p1)),
                        y1,
                        y0,
                        2.0 * default_tolerance(dtype),
                        seed,
                    );
                    for ((a, b), gname) in g1.iter().zip(g0).zip(GRAD_NAMES) {
                        if let (Some(a), Some(b)) = (a, b) {
                            assert_close(
                                &format!("{} {gname} vs the first path", what(*p1)),
                                a,
                                b,
                                2.0 * grad_tolerance(dtype, Path::Candle),
                                seed,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every form of the delta, every dtype: candle's ops and the emulator's custom op, forward
/// and the gradients of Σ y·dy (candle's autograd, and the crate's backward through the op's
/// `bwd`), against the f64 reference and each other.
#[test]
fn delta_linear_layer_matches_the_reference_forward_and_backward() {
    check_paths(&[Path::Candle, Path::Emulator], common::random_cases(2));
}

/// DoRA: y = (m / ‖W + s·B·A‖) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, and m's gradient
/// Σ_rows dy ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) / ‖W + s·B·A‖ (the norm detached), on both paths.
#[test]
fn dora_layer_matches_the_reference() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    for dtype in DTYPES {
        for _ in 0..common::random_cases(2) {
            // k ≥ 9: a one-element row's norm |w + s·(B·A)| cancels without bound in f32;
            // n ≥ 5: with n = r = 1, dW_up is one sum over the rows, whose cancellation alone
            // decides the relative error.
            let alpha = 16.0;
            let mut p = Problem::random(&mut rng, DeltaLinear::lora(alpha), dtype);
            while p.k < 9 || p.n < 5 {
                p = Problem::random(&mut rng, DeltaLinear::lora(alpha), dtype);
            }
            p.b_up = None;
            let s = p.op.composition.scale(p.r);
            let magnitude = random(&mut rng, p.n, dtype, 2.0);
            let t = p.reference_tensors();
            let y_ref =
                reference::dora::dora_linear(t.x, t.w, t.b, t.w_down, t.w_up, &magnitude, s)
                    .expect("reference");
            // m's gradient from the undecorated LoRA output and the norm.
            let ones = vec![1.0; p.n];
            let inv_norm =
                reference::dora::dora_norm(t.w, t.w_down, t.w_up, &ones, s).expect("norm");
            let mut lora = p.reference_tensors();
            lora.b = None;
            let y0 = reference::delta_linear(
                &DeltaLinear::new(
                    Insertion::Parallel,
                    Activation::Identity,
                    Composition::Scaled(s),
                ),
                &lora,
            )
            .expect("lora");
            let dm_ref: Vec<f64> = (0..p.n)
                .map(|j| {
                    (0..p.m)
                        .map(|i| p.dy[i * p.n + j] * y0[i * p.n + j])
                        .sum::<f64>()
                        * inv_norm[j]
                })
                .collect();
            let mut dms = Vec::new();
            for path in [Path::Candle, Path::Emulator] {
                let (layer, v) = layer_for(&p, path);
                let m = var(&magnitude, &[p.n], dtype, &path.device());
                let layer = layer.with_dora(&m).expect("dora");
                let y = layer.forward(&v.x).expect("forward");
                let what = format!(
                    "dora {dtype} {path:?} m={} n={} k={} r={}",
                    p.m, p.n, p.k, p.r
                );
                assert_close(
                    &format!("{what} y"),
                    &values(&y),
                    &y_ref,
                    default_tolerance(dtype),
                    seed,
                );
                let dy = tensor(&p.dy, y.dims(), dtype, &path.device());
                let loss = (y.to_dtype(CDType::F32).unwrap() * dy.to_dtype(CDType::F32).unwrap())
                    .and_then(|t| t.sum_all())
                    .expect("loss");
                let grads = loss.backward().expect("backward");
                let dm = values(grads.get(m.as_tensor()).expect("dm"));
                assert_close(
                    &format!("{what} dmagnitude"),
                    &dm,
                    &dm_ref,
                    grad_tolerance(dtype, path),
                    seed,
                );
                for t in [&v.x, &v.w_down, &v.w_up] {
                    assert!(
                        grads.get(t.as_tensor()).is_some(),
                        "{what}: a gradient is missing"
                    );
                }
                dms.push(values(grads.get(v.w_up.as_tensor()).unwrap()));
            }
            assert_close(
                &format!(
                    "dora {dtype} m={} n={} k={} r={} dw_up, emulator vs candle",
                    p.m, p.n, p.k, p.r
                ),
                &dms[1],
                &dms[0],
                2.0 * grad_tolerance(dtype, Path::Candle),
                seed,
            );
        }
    }
}

/// A strided x (rows of a wider buffer: read in place) and a transposed one (copied) give
/// the contiguous x's output, on the emulator path; the gradient of the strided x too.
#[test]
fn strided_inputs() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    for dtype in DTYPES {
        // At least two rows of two columns, so that the views below are not contiguous.
        let mut p = Problem::random(&mut rng, DeltaLinear::lora(2.0), dtype);
        while p.m < 2 || p.k < 2 {
            p = Problem::random(&mut rng, DeltaLinear::lora(2.0), dtype);
        }
        p.lead = vec![p.m];
        let y_ref = reference::delta_linear(&p.op, &p.reference_tensors()).unwrap();
        let tol = default_tolerance(dtype);
        let (layer, _) = layer_for(&p, Path::Emulator);
        let device = Device::Cpu;
        let x = tensor(&p.x, &[p.m, p.k], dtype, &device);
        let y = values(&layer.forward(&x).unwrap());
        assert_close(&format!("{dtype} contiguous"), &y, &y_ref, tol, seed);
        // Rows of stride k + 3.
        let pad = tensor(
            &random(&mut rng, p.m * 3, dtype, 1.0),
            &[p.m, 3],
            dtype,
            &device,
        );
        let wide = Var::from_tensor(&Tensor::cat(&[&x, &pad], 1).unwrap()).unwrap();
        let strided = wide.narrow(1, 0, p.k).unwrap();
        assert!(!strided.is_contiguous());
        let ys = layer.forward(&strided).unwrap();
        // A 16-bit x whose rows are not 16-byte aligned runs on the SIMT tiles: another
        // summation order than the contiguous x's tensor cores.
        assert_close(
            &format!("{dtype} strided rows"),
            &values(&ys),
            &y_ref,
            tol,
            seed,
        );
        let dx = ys
            .to_dtype(CDType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dwide = values(dx.get(wide.as_tensor()).unwrap());
        assert_eq!(dwide.len(), p.m * (p.k + 3));
        assert!(
            dwide
                .chunks(p.k + 3)
                .all(|row| row[p.k..].iter().all(|&v| v == 0.0)),
            "padding gets no gradient"
        );
        // A transposed x: [k, m]ᵀ, columns of stride m, copied.
        let xt = tensor(&p.x, &[p.m, p.k], dtype, &device)
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .t()
            .unwrap();
        assert!(!xt.is_contiguous());
        assert_close(
            &format!("{dtype} transposed"),
            &values(&layer.forward(&xt).unwrap()),
            &y,
            1e-12,
            seed,
        );
    }
}

/// Bad input is a candle error naming the argument.
#[test]
fn bad_input_is_an_error() {
    let d = Device::Cpu;
    let z = |shape: &[usize], dt: CDType| Tensor::zeros(shape, dt, &d).unwrap();
    let lora = DeltaLinear::lora(8.0);
    let msg = |r: candle_core::Result<DeltaLinearLayer>| r.map(|_| ()).unwrap_err().to_string();
    let f = CDType::F32;
    assert!(msg(DeltaLinearLayer::new(
        lora,
        &z(&[4, 6], f),
        None,
        &z(&[2, 5], f),
        &z(&[4, 2], f)
    ))
    .contains("w_down"));
    assert!(msg(DeltaLinearLayer::new(
        lora,
        &z(&[4, 6], f),
        None,
        &z(&[2, 6], f),
        &z(&[4, 2], CDType::F16)
    ))
    .contains("w_up"));
    assert!(msg(DeltaLinearLayer::new(
        lora,
        &z(&[4, 6], CDType::U8),
        None,
        &z(&[2, 6], f),
        &z(&[4, 2], f)
    ))
    .contains("f32, f16 or bf16"));
    assert!(msg(DeltaLinearLayer::new(
        lora,
        &z(&[4, 6], f),
        Some(&z(&[5], f)),
        &z(&[2, 6], f),
        &z(&[4, 2], f)
    ))
    .contains("bias"));
    let layer =
        DeltaLinearLayer::new(lora, &z(&[4, 6], f), None, &z(&[2, 6], f), &z(&[4, 2], f)).unwrap();
    for emulator in [false, true] {
        let l = layer.clone().with_emulator(emulator);
        let e = l.forward(&z(&[3, 5], f)).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("k = 6"), "{e}");
        let e = l
            .forward(&z(&[3, 6], CDType::BF16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`x`") && e.contains("dtype"), "{e}");
        let e = l
            .forward_gated(&z(&[3, 6], f), Some(&z(&[3], f)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`gate`"), "{e}");
    }
    let gated = DeltaLinear::new(
        Insertion::Parallel,
        Activation::Identity,
        Composition::Gated,
    );
    let g =
        DeltaLinearLayer::new(gated, &z(&[4, 6], f), None, &z(&[2, 6], f), &z(&[4, 2], f)).unwrap();
    assert!(g
        .forward(&z(&[3, 6], f))
        .unwrap_err()
        .to_string()
        .contains("`gate`"));
    assert!(g
        .forward_gated(&z(&[3, 6], f), Some(&z(&[2], f)))
        .unwrap_err()
        .to_string()
        .contains("`gate`"));
    assert!(msg(layer.clone().with_dora(&z(&[3], f))).contains("magnitude"));
    let houlsby = DeltaLinearLayer::new(
        DeltaLinear::houlsby(Activation::Relu),
        &z(&[4, 6], f),
        None,
        &z(&[2, 4], f),
        &z(&[4, 2], f),
    )
    .unwrap();
    assert!(msg(houlsby.with_dora(&z(&[4], f))).contains("`op`"));
    // The kernels' own checks surface too: the attention kernels take head dims of HEAD_DIMS.
    let p = PrefixAttentionLayer::new(Default::default(), &z(&[1, 2, 12], f), &z(&[1, 2, 12], f))
        .unwrap()
        .with_emulator(true);
    let e = p
        .forward(
            &z(&[1, 1, 3, 12], f),
            &z(&[1, 1, 4, 12], f),
            &z(&[1, 1, 4, 12], f),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("head"), "{e}");
    let e = p
        .forward(
            &z(&[1, 1, 3, 16], f),
            &z(&[1, 1, 4, 16], f),
            &z(&[1, 1, 4, 16], f),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("prefix_k"), "{e}");
    let e = p
        .forward(
            &z(&[1, 1, 3, 12], f),
            &z(&[1, 1, 4, 12], f),
            &z(&[1, 1, 4, 12], f),
            Some(&[5]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("context_lens"), "{e}");
    assert!(
        PrefixAttentionLayer::new(Default::default(), &z(&[2, 12], f), &z(&[2, 12], f)).is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// Prefix attention.

struct AttnProblem {
    op: peft_kernels::prefix_attention::PrefixAttention,
    dtype: DType,
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    l: usize,
    d: usize,
    /// The prefix [Hkv, l, d] shared by the batch, or [B, Hkv, l, d].
    shared: bool,
    lens: Option<Vec<u32>>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pk: Vec<f64>,
    pv: Vec<f64>,
    dout: Vec<f64>,
}

impl AttnProblem {
    fn random(rng: &mut Rng, dtype: DType) -> AttnProblem {
        let (b, hkv) = (rng.pick(&[1, 2, 3]), rng.pick(&[1, 2]));
        let hq = hkv * rng.pick(&[1, 2, 3]);
        let (lq, lk, l, d) = (
            rng.pick(&[1, 3, 7]),
            rng.pick(&[0, 5, 11]),
            rng.pick(&[1, 4, 9]),
            rng.pick(&[32, 64]),
        );
        let shared = rng.chance(0.5);
        let pb = if shared { 1 } else { b };
        let lens =
            (lk > 0 && rng.chance(0.5)).then(|| (0..b).map(|_| rng.range(0, lk) as u32).collect());
        AttnProblem {
            op: peft_kernels::prefix_attention::PrefixAttention {
                scale: None,
                causal: rng.chance(0.5),
            },
            dtype,
            b,
            hq,
            hkv,
            lq,
            lk,
            l,
            d,
            shared,
            lens,
            q: random(rng, b * hq * lq * d, dtype, 1.0),
            k: random(rng, b * hkv * lk * d, dtype, 1.0),
            v: random(rng, b * hkv * lk * d, dtype, 1.0),
            pk: random(rng, pb * hkv * l * d, dtype, 1.0),
            pv: random(rng, pb * hkv * l * d, dtype, 1.0),
            dout: random(rng, b * hq * lq * d, dtype, 1.0),
        }
    }

    fn prefix_shape(&self) -> Vec<usize> {
        if self.shared {
            vec![self.hkv, self.l, self.d]
        } else {
            vec![self.b, self.hkv, self.l, self.d]
        }
    }

    fn reference(&self) -> (Vec<f64>, Vec<Vec<f64>>) {
        let pstrides = if self.shared {
            [0, self.l * self.d, self.d, 1]
        } else {
            [self.hkv * self.l * self.d, self.l * self.d, self.d, 1]
        };
        let ps = [self.b, self.hkv, self.l, self.d];
        let t = PrefixAttentionTensors {
            q: Tensor4::contiguous(&self.q, [self.b, self.hq, self.lq, self.d]),
            k: Tensor4::contiguous(&self.k, [self.b, self.hkv, self.lk, self.d]),
            v: Tensor4::contiguous(&self.v, [self.b, self.hkv, self.lk, self.d]),
            prefix_k: Tensor4::strided(&self.pk, ps, pstrides),
            prefix_v: Tensor4::strided(&self.pv, ps, pstrides),
            context_lens: self.lens.as_deref(),
        };
        let f = reference::prefix_attention(&self.op, &t).expect("reference");
        let g = reference::prefix_attention_backward(&self.op, &t, &f.out, &f.lse, &self.dout)
            .expect("reference backward");
        (f.out, vec![g.dq, g.dk, g.dv, g.dprefix_k, g.dprefix_v])
    }
}

fn run_attention(p: &AttnProblem, path: Path) -> (Vec<f64>, Vec<Vec<f64>>) {
    let device = path.device();
    let dt = p.dtype;
    let q = var(&p.q, &[p.b, p.hq, p.lq, p.d], dt, &device);
    let k = var(&p.k, &[p.b, p.hkv, p.lk, p.d], dt, &device);
    let v = var(&p.v, &[p.b, p.hkv, p.lk, p.d], dt, &device);
    let pk = var(&p.pk, &p.prefix_shape(), dt, &device);
    let pv = var(&p.pv, &p.prefix_shape(), dt, &device);
    let layer = PrefixAttentionLayer::new(p.op, &pk, &pv)
        .expect("layer")
        .with_emulator(path.emulator());
    let out = layer
        .forward(&q, &k, &v, p.lens.as_deref())
        .expect("forward");
    let dout = tensor(&p.dout, out.dims(), dt, &device);
    let loss = (out.to_dtype(CDType::F32).unwrap() * dout.to_dtype(CDType::F32).unwrap())
        .and_then(|t| t.sum_all())
        .unwrap();
    let grads = loss.backward().expect("backward");
    let g = |t: &Var| {
        grads
            .get(t.as_tensor())
            .map_or_else(|| vec![0.0; t.elem_count()], values)
    };
    (values(&out), vec![g(&q), g(&k), g(&v), g(&pk), g(&pv)])
}

const ATTN_GRADS: [&str; 5] = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"];

fn check_attention(paths: &[Path], cases: usize) {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    for dtype in DTYPES {
        for _ in 0..cases {
            let p = AttnProblem::random(&mut rng, dtype);
            let (out_ref, g_ref) = p.reference();
            let mut outs = Vec::new();
            for &path in paths {
                let what = format!(
                    "{dtype} {path:?} B={} Hq={} Hkv={} Lq={} Lk={} l={} d={} shared={} causal={} lens={:?}",
                    p.b, p.hq, p.hkv, p.lq, p.lk, p.l, p.d, p.shared, p.op.causal, p.lens
                );
                let (out, grads) = run_attention(&p, path);
                assert_close(
                    &format!("{what} out"),
                    &out,
                    &out_ref,
                    default_tolerance(dtype),
                    seed,
                );
                for ((g, r), name) in grads.iter().zip(&g_ref).zip(ATTN_GRADS) {
                    // A gradient that is zero (no context key visible; dq of a row that sees
                    // one key) must be small against the output gradient that produced it.
                    if r.iter().all(|&v| v == 0.0) {
                        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                        let (gn, dn) = (norm(g), norm(&p.dout));
                        assert!(
                            gn <= grad_tolerance(dtype, path) * dn,
                            "{what} {name}: expected zeros, got norm {gn:.2e} (dout {dn:.2e})"
                        );
                    } else {
                        assert_close(
                            &format!("{what} {name}"),
                            g,
                            r,
                            grad_tolerance(dtype, path),
                            seed,
                        );
                    }
                }
                outs.push(out);
            }
            if let [a, b, ..] = &outs[..] {
                assert_close(
                    &format!("{dtype} attention paths"),
                    b,
                    a,
                    2.0 * default_tolerance(dtype),
                    seed,
                );
            }
        }
    }
}

/// Prefix attention, every dtype, shared and per-sequence prefixes, GQA, causal and padded
/// contexts: candle's ops and the emulator's custom op against the f64 reference, forward and
/// the gradients of q, k, v and the prefix.
#[test]
fn prefix_attention_layer_matches_the_reference_forward_and_backward() {
    check_attention(&[Path::Candle, Path::Emulator], common::random_cases(3));
}

/// Strided attention inputs: q as [B, Lq, H, d] transposed to [B, H, Lq, d] (read in place)
/// gives the contiguous q's output.
#[test]
fn strided_attention_inputs() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    for dtype in DTYPES {
        let p = AttnProblem::random(&mut rng, dtype);
        let (out_ref, _) = p.reference();
        let pk = tensor(&p.pk, &p.prefix_shape(), dtype, &Device::Cpu);
        let pv = tensor(&p.pv, &p.prefix_shape(), dtype, &Device::Cpu);
        let layer = PrefixAttentionLayer::new(p.op, &pk, &pv)
            .unwrap()
            .with_emulator(true);
        let q = tensor(&p.q, &[p.b, p.hq, p.lq, p.d], dtype, &Device::Cpu);
        let q_bshd = q
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!q_bshd.is_contiguous() || p.hq == 1 || p.lq == 1);
        let k = tensor(&p.k, &[p.b, p.hkv, p.lk, p.d], dtype, &Device::Cpu);
        let v = tensor(&p.v, &[p.b, p.hkv, p.lk, p.d], dtype, &Device::Cpu);
        let out = layer.forward(&q_bshd, &k, &v, p.lens.as_deref()).unwrap();
        assert_close(
            &format!("{dtype} strided q"),
            &values(&out),
            &out_ref,
            default_tolerance(dtype),
            seed,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PEFT's fixtures through the layers.

#[cfg(feature = "peft")]
mod fixtures {
    use super::*;
    use peft_kernels::peft::{self, Adapter};
    use std::path::Path as FsPath;

    fn io_tensor(t: &peft::Tensor, dtype: CDType) -> Tensor {
        Tensor::from_vec(t.to::<f32>(), t.shape.clone(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn cdt(d: DType) -> CDType {
        candle_dtype(d)
    }

    /// Each LoRA / DoRA fixture's layers through `DeltaLinearLayer::from_peft`, on candle's
    /// ops and on the emulator, against PEFT's stored outputs.
    #[test]
    fn peft_fixtures_through_the_layer() {
        let root = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
        let mut checked = 0;
        for name in [
            "llama_lora",
            "llama_rslora_patterns",
            "llama_dora",
            "gpt2_dora",
            "gpt2_fan_in_fan_out_f16",
            "llama_layers_bf16",
        ] {
            let dir = root.join(name);
            let io = peft::read_safetensors(dir.join("io.safetensors")).unwrap();
            let Adapter::Lora(adapter) = peft::load(&dir).unwrap() else {
                panic!("{name}: a LoRA fixture");
            };
            for m in &adapter.modules {
                let Some(y) = io.get(&format!("{}.y", m.name)) else {
                    continue;
                };
                let dtype = y.dtype();
                let weight = io_tensor(&io[&format!("{}.weight", m.name)], cdt(dtype));
                let bias = io
                    .get(&format!("{}.bias", m.name))
                    .map(|b| io_tensor(b, cdt(dtype)));
                let x = io_tensor(&io[&format!("{}.x", m.name)], cdt(dtype));
                let expected: Vec<f64> = y.to::<f32>().iter().map(|&v| v.into()).collect();
                for emulator in [false, true] {
                    let layer = DeltaLinearLayer::from_peft(m, &weight, bias.as_ref())
                        .unwrap()
                        .with_emulator(emulator);
                    let got = values(&layer.forward(&x).unwrap());
                    let e = rel_err(&got, &expected);
                    assert!(
                        e < default_tolerance(dtype),
                        "{name} {} emulator={emulator}: rel err {e:.2e}",
                        m.name
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 12, "only {checked} layers checked");
    }

    /// The prefix-tuning fixture's layers through `PrefixAttentionLayer::from_peft` against
    /// PEFT's attention outputs.
    #[test]
    fn peft_prefix_fixture_through_the_layer() {
        let dir = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/llama_prefix");
        let io = peft::read_safetensors(dir.join("io.safetensors")).unwrap();
        let Adapter::PrefixTuning(p) = peft::load(&dir).unwrap() else {
            panic!("a prefix fixture")
        };
        let op = peft_kernels::prefix_attention::PrefixAttention {
            scale: None,
            causal: true,
        };
        for i in 0..p.layers.len() {
            let t = |n: &str| io_tensor(&io[&format!("layers.{i}.{n}")], CDType::F32);
            let (q, key, value, out) = (t("query"), t("key"), t("value"), t("out"));
            let l = p.num_virtual_tokens;
            let total = key.dims()[2];
            // PEFT's keys and values have the prefix in front.
            let (k, v) = (
                key.narrow(2, l, total - l).unwrap(),
                value.narrow(2, l, total - l).unwrap(),
            );
            // PEFT's attention output is [B, L, H, d].
            let expected = values(&out.transpose(1, 2).unwrap().contiguous().unwrap());
            for emulator in [false, true] {
                let layer = PrefixAttentionLayer::from_peft(&p, i, op, CDType::F32, &Device::Cpu)
                    .unwrap()
                    .with_emulator(emulator);
                let got = values(&layer.forward(&q, &k, &v, None).unwrap());
                let e = rel_err(&got, &expected);
                assert!(e < 1e-5, "layer {i} emulator={emulator}: rel err {e:.2e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GPU twins: the fused kernels on candle's CUDA tensors.

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;

    /// Every form of the delta on CUDA tensors (fused kernels, the crate's backward in the
    /// custom op) against the reference, and against candle's ops on the CPU.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_delta_linear_layer() {
        check_paths(&[Path::Candle, Path::Cuda], common::random_cases(2));
    }

    /// Prefix attention on CUDA tensors against the reference and candle's ops.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_prefix_attention_layer() {
        check_attention(&[Path::Candle, Path::Cuda], common::random_cases(3));
    }
}
