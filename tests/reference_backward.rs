//! The reference backward (src/reference/backward.rs) against central finite differences
//! of the f64 forward references, for every form of the delta; and proof that the check
//! can fail (a perturbed gradient, a wrong activation derivative, are caught).

mod common;

use common::{random_cases, Rng};
use peft_kernels::reference::{
    delta_linear_backward, delta_linear_dropout, multi_head_adapter, multi_head_adapter_backward,
    DeltaLinear, DeltaLinearGrads, DeltaLinearTensors, MatRef, MultiHeadAdapter,
    MultiHeadAdapterTensors,
};
use peft_kernels::{Activation, Composition, Insertion};

/// Central-difference step: truncation error ~ε²·f‴, rounding ~1e-16/ε.
const EPS: f64 = 1e-5;
/// Relative error of a gradient tensor against its finite differences.
const TOL: f64 = 1e-6;
/// Rounding in a central difference: each loss carries ~ε·Σ|yᵢ·dyᵢ| of error, divided by
/// 2·EPS; a tiny gradient (GELU far in its tail) is held to this absolute floor, not to TOL.
const ROUNDING_ULPS: f64 = 16.0;

/// A delta-linear problem in f64; `u` is `Some` for a separate parallel input.
#[derive(Clone, Debug)]
struct Problem {
    op: DeltaLinear,
    m: usize,
    n: usize,
    k: usize,
    k_u: usize,
    r: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    b: Option<Vec<f64>>,
    u: Option<Vec<f64>>,
    w_down: Vec<f64>,
    b_down: Option<Vec<f64>>,
    w_up: Vec<f64>,
    b_up: Option<Vec<f64>>,
    gate: Option<Vec<f64>>,
    /// The dropout multiplier [M, K_u] (0 or 1 / (1 − p)).
    mask: Vec<f64>,
    dy: Vec<f64>,
}

impl Problem {
    fn random(rng: &mut Rng, op: DeltaLinear, separate_u: bool, biases: bool, p: f64) -> Self {
        let (m, n, k, r) = (
            rng.range(1, 4),
            rng.range(1, 6),
            rng.range(1, 6),
            rng.range(1, 4),
        );
        let k_u = match (op.insertion, separate_u) {
            (Insertion::Sequential, _) => n,
            (Insertion::Parallel, true) => rng.range(1, 6),
            (Insertion::Parallel, false) => k,
        };
        let mut bias = |len| biases.then(|| rng.uniform_f64(len));
        let (b, b_down, b_up) = (bias(n), bias(r), bias(n));
        Problem {
            op,
            m,
            n,
            k,
            k_u,
            r,
            x: rng.uniform_f64(m * k),
            w: rng.uniform_f64(n * k),
            b,
            u: separate_u.then(|| rng.uniform_f64(m * k_u)),
            w_down: rng.uniform_f64(r * k_u),
            b_down,
            w_up: rng.uniform_f64(n * r),
            b_up,
            gate: (op.composition == Composition::Gated)
                .then(|| (0..m).map(|_| rng.uniform(0.0, 1.0)).collect()),
            mask: (0..m * k_u)
                .map(|_| if rng.chance(p) { 0.0 } else { 1.0 / (1.0 - p) })
                .collect(),
            dy: rng.uniform_f64(m * n),
        }
    }

    fn tensors(&self) -> DeltaLinearTensors<'_, f64> {
        DeltaLinearTensors {
            x: MatRef::new(&self.x, self.m, self.k),
            w: MatRef::new(&self.w, self.n, self.k),
            b: self.b.as_deref(),
            u: self.u.as_deref().map(|u| MatRef::new(u, self.m, self.k_u)),
            w_down: MatRef::new(&self.w_down, self.r, self.k_u),
            b_down: self.b_down.as_deref(),
            w_up: MatRef::new(&self.w_up, self.n, self.r),
            b_up: self.b_up.as_deref(),
            gate: self.gate.as_deref(),
        }
    }

    /// L = Σ y ⊙ dy, whose gradient with respect to y is dy.
    fn loss(&self) -> f64 {
        let y = delta_linear_dropout(&self.op, &self.tensors(), &self.mask).unwrap();
        y.iter().zip(&self.dy).map(|(y, d)| y * d).sum()
    }

    /// Σ|yᵢ·dyᵢ|: the magnitude the loss's rounding scales with.
    fn loss_scale(&self) -> f64 {
        let y = delta_linear_dropout(&self.op, &self.tensors(), &self.mask).unwrap();
        y.iter().zip(&self.dy).map(|(y, d)| (y * d).abs()).sum()
    }

    fn grads(&self) -> DeltaLinearGrads {
        let dy = MatRef::new(&self.dy, self.m, self.n);
        delta_linear_backward(&self.op, &self.tensors(), Some(&self.mask), dy).unwrap()
    }
}

/// The tensors with a gradient: (name, accessor).
type Field = (&'static str, fn(&mut Problem) -> Option<&mut Vec<f64>>);
const FIELDS: [Field; 7] = [
    ("x", |p| Some(&mut p.x)),
    ("u", |p| p.u.as_mut()),
    ("w_down", |p| Some(&mut p.w_down)),
    ("b_down", |p| p.b_down.as_mut()),
    ("w_up", |p| Some(&mut p.w_up)),
    ("b_up", |p| p.b_up.as_mut()),
    ("gate", |p| p.gate.as_mut()),
];

fn grad_of<'a>(g: &'a DeltaLinearGrads, name: &str) -> Option<&'a [f64]> {
    match name {
        "x" => Some(&g.dx),
        "u" => g.du.as_deref(),
        "w_down" => Some(&g.dw_down),
        "b_down" => Some(&g.db_down),
        "w_up" => Some(&g.dw_up),
        "b_up" => Some(&g.db_up),
        "gate" => g.dgate.as_deref(),
        _ => unreachable!(),
    }
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// `grad` against its central differences `fd`, for a loss whose terms sum to
/// `loss_scale` in magnitude: relative to ‖fd‖, plus the differences' rounding floor per
/// element, so an all-zero gradient (every element dropped, ReLU off everywhere) must be
/// ~zero and a tiny one (GELU far in its tail) is not held below what fd can resolve.
fn fd_mismatch(grad: &[f64], fd: &[f64], loss_scale: f64) -> Option<String> {
    let rounding = ROUNDING_ULPS * f64::EPSILON * loss_scale / (2.0 * EPS);
    let diff: Vec<f64> = grad.iter().zip(fd).map(|(g, f)| g - f).collect();
    let err = norm(&diff);
    let bound = TOL * norm(fd) + rounding * (fd.len() as f64).sqrt();
    (err > bound).then(|| {
        format!(
            "|grad − fd| = {err:e} > {bound:e} (relative {:e})\n  grad {grad:?}\n  fd   {fd:?}",
            err / norm(fd).max(1e-300)
        )
    })
}

/// Central differences of the loss for every element of every tensor with a gradient,
/// compared with `g`: the first mismatch, or `None`.
fn check_against_fd(p: &Problem, g: &DeltaLinearGrads) -> Option<String> {
    let loss_scale = p.loss_scale();
    for (name, field) in FIELDS {
        let mut q = p.clone();
        let Some(len) = field(&mut q).map(|v| v.len()) else {
            if grad_of(g, name).is_some() && name != "b_down" && name != "b_up" {
                return Some(format!("{name}: a gradient for an absent tensor"));
            }
            continue;
        };
        let Some(grad) = grad_of(g, name) else {
            return Some(format!("{name}: no gradient"));
        };
        if grad.len() != len {
            return Some(format!("{name}: {} gradients for {len} values", grad.len()));
        }
        let fd: Vec<f64> = (0..len)
            .map(|i| {
                let v = field(&mut q).unwrap()[i];
                field(&mut q).unwrap()[i] = v + EPS;
                let up = q.loss();
                field(&mut q).unwrap()[i] = v - EPS;
                let down = q.loss();
                field(&mut q).unwrap()[i] = v;
                (up - down) / (2.0 * EPS)
            })
            .collect();
        if let Some(e) = fd_mismatch(grad, &fd, loss_scale) {
            return Some(format!("{name}: {e}"));
        }
    }
    None
}

fn every_form() -> Vec<(DeltaLinear, bool)> {
    let mut forms = Vec::new();
    for activation in Activation::ALL {
        for composition in [
            Composition::Add,
            Composition::Scaled(0.75),
            Composition::Lora {
                alpha: 2.0,
                rslora: false,
            },
            Composition::Gated,
        ] {
            for (insertion, separate_u) in [
                (Insertion::Parallel, false),
                (Insertion::Parallel, true),
                (Insertion::Sequential, false),
            ] {
                forms.push((
                    DeltaLinear::new(insertion, activation, composition),
                    separate_u,
                ));
            }
        }
    }
    forms
}

#[test]
fn reference_backward_matches_finite_differences_for_every_form() {
    let mut rng = Rng::from_env();
    for (op, separate_u) in every_form() {
        for biases in [false, true] {
            for p in [0.0, 0.3] {
                for _ in 0..random_cases(1) {
                    let prob = Problem::random(&mut rng, op, separate_u, biases, p);
                    if let Some(e) = check_against_fd(&prob, &prob.grads()) {
                        panic!(
                            "{op:?} separate_u={separate_u} biases={biases} p={p} \
                             (m, n, k, k_u, r) = {:?} seed {}: {e}",
                            (prob.m, prob.n, prob.k, prob.k_u, prob.r),
                            rng.seed()
                        );
                    }
                }
            }
        }
    }
}

/// Every element dropped (p → 1: a zero multiplier) and a zero dy give zero gradients, not
/// NaN, wherever the delta's input is all that feeds them.
#[test]
fn dropped_rows_and_zero_dy_give_zero_not_nan() {
    let mut rng = Rng::from_env();
    let op = DeltaLinear::new(
        Insertion::Parallel,
        Activation::Silu,
        Composition::Scaled(2.0),
    );
    let mut prob = Problem::random(&mut rng, op, false, true, 0.0);
    prob.mask.iter_mut().for_each(|v| *v = 0.0);
    let g = prob.grads();
    assert!(g.dw_down.iter().all(|&v| v == 0.0), "{:?}", g.dw_down);
    prob.dy.iter_mut().for_each(|v| *v = 0.0);
    let g = prob.grads();
    for v in [&g.dx, &g.dw_down, &g.db_down, &g.dw_up, &g.db_up] {
        assert!(v.iter().all(|&v| v == 0.0), "{v:?}");
    }
}

/// The check fails on a gradient one element of which is off by 1e-4 of the tensor's
/// norm, for each tensor in turn.
#[test]
fn a_perturbed_gradient_is_caught() {
    let mut rng = Rng::from_env();
    let op = DeltaLinear::new(
        Insertion::Parallel,
        Activation::GeluTanh,
        Composition::Gated,
    );
    let prob = Problem::random(&mut rng, op, true, true, 0.3);
    let good = prob.grads();
    assert_eq!(check_against_fd(&prob, &good), None);
    let perturb: [fn(&mut DeltaLinearGrads) -> &mut Vec<f64>; 7] = [
        |g| &mut g.dx,
        |g| g.du.as_mut().unwrap(),
        |g| &mut g.dw_down,
        |g| &mut g.db_down,
        |g| &mut g.dw_up,
        |g| &mut g.db_up,
        |g| g.dgate.as_mut().unwrap(),
    ];
    for (i, f) in perturb.iter().enumerate() {
        let mut bad = good.clone();
        let v = f(&mut bad);
        let norm = v.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
        let at = rng.range(0, v.len() - 1);
        v[at] += 1e-4 * norm;
        assert!(
            check_against_fd(&prob, &bad).is_some(),
            "perturbation {i} at {at} not caught"
        );
    }
}

/// f′ of each activation against central differences of f, on a grid that avoids ReLU's
/// kink; and GELU tanh's derivative is not GELU erf's (the 'approximated by the other form'
/// mutation is caught).
#[test]
fn activation_derivatives_match_finite_differences() {
    for f in Activation::ALL {
        for i in -60..=60 {
            let z = i as f64 / 10.0 + 0.0123;
            let fd = (f.apply_f64(z + EPS) - f.apply_f64(z - EPS)) / (2.0 * EPS);
            let d = f.derivative_f64(z);
            assert!((fd - d).abs() < 1e-8, "{f:?}'({z}) = {d}, fd {fd}");
        }
    }
    assert_eq!(Activation::Relu.derivative_f64(0.0), 0.0);
    let worst = (-60..=60)
        .map(|i| {
            let z = i as f64 / 10.0;
            (Activation::GeluTanh.derivative_f64(z) - Activation::GeluErf.derivative_f64(z)).abs()
        })
        .fold(0.0, f64::max);
    assert!(worst > 1e-4, "GELU tanh' and erf' agree to {worst}");
}

#[test]
fn multi_head_backward_matches_finite_differences() {
    let mut rng = Rng::from_env();
    for activation in Activation::ALL {
        for composition in [
            Composition::Add,
            Composition::Scaled(1.5),
            Composition::Lora {
                alpha: 3.0,
                rslora: true,
            },
        ] {
            for biases in [false, true] {
                let (m, heads, d_h, d_in, r) = (
                    rng.range(1, 3),
                    rng.range(1, 3),
                    rng.range(1, 4),
                    rng.range(1, 4),
                    rng.range(1, 3),
                );
                let op = MultiHeadAdapter {
                    heads,
                    rank: r,
                    activation,
                    composition,
                };
                let mut vals: Vec<Vec<f64>> = [
                    m * heads * d_h,
                    m * heads * d_in,
                    heads * r * d_in,
                    heads * r,
                    heads * d_h * r,
                    heads * d_h,
                ]
                .iter()
                .map(|&len| rng.uniform_f64(len))
                .collect();
                let dy = rng.uniform_f64(m * heads * d_h);
                let tensors = |v: &[Vec<f64>]| -> (Vec<f64>, Vec<Vec<f64>>) {
                    let t = MultiHeadAdapterTensors {
                        h: MatRef::new(&v[0], m, heads * d_h),
                        u: MatRef::new(&v[1], m, heads * d_in),
                        w_down: &v[2],
                        b_down: biases.then_some(&v[3][..]),
                        w_up: &v[4],
                        b_up: biases.then_some(&v[5][..]),
                    };
                    let y = multi_head_adapter(&op, &t).unwrap();
                    let g = multi_head_adapter_backward(&op, &t, MatRef::new(&dy, m, heads * d_h))
                        .unwrap();
                    (y, vec![g.dh, g.du, g.dw_down, g.db_down, g.dw_up, g.db_up])
                };
                let (y, grads) = tensors(&vals);
                let loss_scale: f64 = y.iter().zip(&dy).map(|(y, d)| (y * d).abs()).sum();
                for (t, grad) in grads.iter().enumerate() {
                    if !biases && (t == 3 || t == 5) {
                        continue;
                    }
                    let fd: Vec<f64> = (0..vals[t].len())
                        .map(|i| {
                            let v = vals[t][i];
                            let loss = |x: f64, vals: &mut Vec<Vec<f64>>| {
                                vals[t][i] = x;
                                let (y, _) = tensors(vals);
                                y.iter().zip(&dy).map(|(y, d)| y * d).sum::<f64>()
                            };
                            let up = loss(v + EPS, &mut vals);
                            let down = loss(v - EPS, &mut vals);
                            vals[t][i] = v;
                            (up - down) / (2.0 * EPS)
                        })
                        .collect();
                    if let Some(e) = fd_mismatch(grad, &fd, loss_scale) {
                        panic!("{op:?} tensor {t}: {e}, seed {}", rng.seed());
                    }
                }
            }
        }
    }
}
