//! The training-mode forward and the backward of the delta-linear family against the f64
//! reference backward (src/reference/backward.rs, itself checked against finite differences
//! in tests/reference_backward.rs): every form, every dtype, both kernel implementations,
//! awkward shapes and strides, poisoned outputs, accumulation, bad arguments. The GPU
//! twins (`on_gpu`, feature `cuda`) run the same checks on a device.

mod common;

use common::{poisoned, random_cases, Rng};
use half::{bf16, f16};
use peft_kernels::delta_linear::{
    DeltaApplyArgs, DeltaApplyBackwardArgs, DeltaApplyDims, DeltaApplyTrainArgs, DeltaLinear,
    DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs,
    HostDeltaLinearBackwardArgs, KernelVariant, LoraDropout,
};
use peft_kernels::dropout;
use peft_kernels::host::{self, Backend};
use peft_kernels::reference::{
    self, DeltaLinearTensors, MatRef, MultiHeadAdapter, MultiHeadAdapterTensors,
};
use peft_kernels::validate::{assert_close, assert_close_matrix, default_tolerance};
use peft_kernels::{Activation, Composition, Element, Error, Insertion, MatrixLayout};

/// One backward problem.
#[derive(Clone, Copy, Debug)]
struct Case {
    op: DeltaLinear,
    dims: DeltaLinearDims,
    separate_u: bool,
    biases: bool,
    accumulate: bool,
    dropout: Option<LoraDropout>,
}

fn scaled<T: Element>(rng: &mut Rng, n: usize, fan_in: usize) -> Vec<T> {
    let s = 1.0 / (fan_in as f64).sqrt();
    (0..n)
        .map(|_| T::from_f64(s * rng.uniform(-1.0, 1.0)))
        .collect()
}

fn layout(rows: usize, cols: usize, ld: usize) -> MatrixLayout {
    MatrixLayout { rows, cols, ld }
}

/// Runs the training forward and the backward of `c` on `backend` and checks y and every
/// gradient against the reference.
fn check_case<T: Element>(backend: &Backend, c: &Case, rng: &mut Rng) {
    let d = c.dims;
    let (m, n, k, r) = (d.m, d.n, d.k, d.r);
    let seq = c.op.insertion == Insertion::Sequential;
    let k_u = if seq {
        n
    } else if c.separate_u {
        d.k_u
    } else {
        k
    };
    let len = |l: MatrixLayout| l.min_len();
    let (lx, ly, lu) = (
        layout(m, k, d.ld_x),
        layout(m, n, d.ld_y),
        layout(m, k_u, d.ld_u),
    );
    let x: Vec<T> = rng.uniform_vec(len(lx));
    let w: Vec<T> = scaled(rng, n * k, k);
    let bias: Option<Vec<T>> = c.biases.then(|| rng.uniform_vec(n));
    let u: Option<Vec<T>> = c.separate_u.then(|| rng.uniform_vec(len(lu)));
    let w_down: Vec<T> = scaled(rng, r * k_u, k_u);
    let b_down: Option<Vec<T>> = c.biases.then(|| rng.uniform_vec(r));
    let w_up: Vec<T> = scaled(rng, n * r, r);
    let b_up: Option<Vec<T>> = c.biases.then(|| rng.uniform_vec(n));
    let gate: Option<Vec<T>> = (c.op.composition == Composition::Gated)
        .then(|| (0..m).map(|_| T::from_f64(rng.uniform(0.0, 1.0))).collect());
    let dy: Vec<T> = rng.uniform_vec(len(ly));

    // The training forward.
    let mut y = poisoned::<T>(len(ly));
    let mut workspace = poisoned::<T>(d.workspace_len());
    let mut saved = poisoned::<f32>(d.saved_len(&c.op));
    host::delta_linear_train(
        backend,
        &c.op,
        &d,
        DeltaLinearTrainArgs {
            forward: DeltaLinearArgs {
                x: &x,
                w: &w,
                bias: bias.as_deref(),
                u: u.as_deref(),
                w_down: &w_down,
                b_down: b_down.as_deref(),
                w_up: &w_up,
                b_up: b_up.as_deref(),
                gate: gate.as_deref(),
                workspace: &mut workspace,
                y: &mut y,
            },
            saved: &mut saved,
            dropout: c.dropout,
        },
    )
    .unwrap_or_else(|e| panic!("{c:?}: forward: {e}"));

    // The reference of the kernels' contract. Where the backward needs h (sequential, gated)
    // the kernels materialise it in T (a sequential delta reads it, the gate composes with
    // it, as a framework's bf16 h would be), so the reference is the exact layer over that
    // rounded h_T: a parallel delta whose frozen part is h_T·I and whose separate input is
    // h_T (sequential) or the delta's own input, the gradient reaching x through h = x·Wᵀ
    // afterwards (`through_h`). Without this, a rank-1 delta whose h·w_down cancels turns
    // h's rounding into a relative error over 1e-2 now and then, as in tests/delta_linear.rs.
    let gate64: Option<Vec<f64>> = gate
        .as_ref()
        .map(|g| g.iter().map(|v| v.to_f64()).collect());
    let x_ref = MatRef::with_ld(&x, m, k, d.ld_x);
    let u_ref = u.as_deref().map(|u| MatRef::with_ld(u, m, k_u, d.ld_u));
    let through_h = seq || c.op.composition == Composition::Gated;
    let (h_t, identity): (Vec<T>, Vec<T>) = if through_h {
        let h = reference::linear(x_ref, MatRef::new(&w, n, k), bias.as_deref()).unwrap();
        let identity = (0..n * n)
            .map(|i| T::from_f64(if i % (n + 1) == 0 { 1.0 } else { 0.0 }))
            .collect();
        (h.into_iter().map(T::from_f64).collect(), identity)
    } else {
        (Vec::new(), Vec::new())
    };
    let (op_ref, tensors) = if through_h {
        let h = MatRef::new(&h_t, m, n);
        let op = DeltaLinear {
            insertion: Insertion::Parallel,
            ..c.op
        };
        let u = if seq {
            Some(h)
        } else {
            Some(u_ref.unwrap_or(x_ref))
        };
        let t = DeltaLinearTensors {
            x: h,
            w: MatRef::new(&identity, n, n),
            b: None,
            u,
            w_down: MatRef::new(&w_down, r, k_u),
            b_down: b_down.as_deref(),
            w_up: MatRef::new(&w_up, n, r),
            b_up: b_up.as_deref(),
            gate: gate64.as_deref(),
        };
        (op, t)
    } else {
        let t = DeltaLinearTensors {
            x: x_ref,
            w: MatRef::new(&w, n, k),
            b: bias.as_deref(),
            u: u_ref,
            w_down: MatRef::new(&w_down, r, k_u),
            b_down: b_down.as_deref(),
            w_up: MatRef::new(&w_up, n, r),
            b_up: b_up.as_deref(),
            gate: gate64.as_deref(),
        };
        (c.op, t)
    };
    // The dropout multiplier of u from the generator the kernels use (1 everywhere without).
    let mask: Vec<f64> = (0..m * k_u)
        .map(|e| match c.dropout {
            None => 1.0,
            Some(dr) if dropout::keep(dr.seed, (e / k_u) as u32, (e % k_u) as u32, dr.p) => {
                f64::from(dropout::scale(dr.p))
            }
            Some(_) => 0.0,
        })
        .collect();
    let tol = default_tolerance(T::DTYPE);
    let y_ref = reference::delta_linear_dropout(&op_ref, &tensors, &mask).unwrap();
    assert_close_matrix(&format!("y of {c:?}"), &y, ly, &y_ref, tol);

    // The backward, adapter gradients poisoned or (accumulate) holding earlier sums.
    let start = |len: usize, rng: &mut Rng| -> Vec<f32> {
        if c.accumulate {
            (0..len).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
        } else {
            poisoned(len)
        }
    };
    let mut dx = poisoned::<T>(len(lx));
    let mut du = c.separate_u.then(|| poisoned::<T>(len(lu)));
    let mut dw_down = start(r * k_u, rng);
    let mut db_down = c.biases.then(|| start(r, rng));
    let mut dw_up = start(n * r, rng);
    let mut db_up = c.biases.then(|| start(n, rng));
    let mut dgate = gate.as_ref().map(|_| poisoned::<f32>(m));
    let before = (
        dw_down.clone(),
        db_down.clone(),
        dw_up.clone(),
        db_up.clone(),
    );
    let mut bwd_ws = poisoned::<f32>(d.backward_workspace_len(&c.op));
    host::delta_linear_backward(
        backend,
        &c.op,
        &d,
        DeltaLinearBackwardArgs {
            dy: &dy,
            x: &x,
            w: &w,
            u: u.as_deref(),
            w_down: &w_down,
            w_up: &w_up,
            b_up: b_up.as_deref(),
            gate: gate.as_deref(),
            saved: &saved,
            dx: &mut dx,
            du: du.as_deref_mut(),
            dw_down: &mut dw_down,
            db_down: db_down.as_deref_mut(),
            dw_up: &mut dw_up,
            db_up: db_up.as_deref_mut(),
            dgate: dgate.as_deref_mut(),
            workspace: &mut bwd_ws,
            dropout: c.dropout,
            accumulate: c.accumulate,
        },
    )
    .unwrap_or_else(|e| panic!("{c:?}: backward: {e}"));

    let mut g = reference::delta_linear_backward(
        &op_ref,
        &tensors,
        Some(&mask),
        MatRef::with_ld(&dy, m, n, d.ld_y),
    )
    .unwrap();
    if through_h {
        // g.dx is ∂L/∂h_T's frozen part, g.du the delta input's gradient.
        let mut dh = g.dx.clone();
        if seq || !c.separate_u {
            let du = g.du.take().unwrap();
            if seq {
                dh.iter_mut().zip(&du).for_each(|(h, u)| *h += u);
                g.dx = matmul(&dh, &w, m, n, k);
            } else {
                g.dx = matmul(&dh, &w, m, n, k);
                g.dx.iter_mut().zip(&du).for_each(|(x, u)| *x += u);
            }
        } else {
            g.dx = matmul(&dh, &w, m, n, k);
        }
    }
    let name = |what: &str| format!("{what} of {c:?}");
    assert_close_matrix(&name("dx"), &dx, lx, &g.dx, tol);
    if let Some(du) = &du {
        assert_close_matrix(&name("du"), du, lu, g.du.as_ref().unwrap(), tol);
    }
    // With accumulate the expected value is what the gradient held plus the reference.
    let expect = |held: &[f32], reference: &[f64]| -> Vec<f64> {
        if c.accumulate {
            held.iter()
                .zip(reference)
                .map(|(h, r)| *h as f64 + r)
                .collect()
        } else {
            reference.to_vec()
        }
    };
    let close = |what: &str, out: &[f32], reference: &[f64]| {
        assert_close(&name(what), out, reference, tol_for(out.len(), tol));
    };
    // A bias is the weight's extra column: each gradient pair is compared as one tensor, so
    // a rank-1 db_down (one sum over tokens, which cancellation can leave at a relative 1e-2
    // of right f32 arithmetic) is judged at the scale of its weight's gradient.
    let joint = |w: &[f32], b: &Option<Vec<f32>>| [w, b.as_deref().unwrap_or(&[])].concat();
    let joint_ref = |w: Vec<f64>, b: Option<Vec<f64>>| [w, b.unwrap_or_default()].concat();
    let held_b = |held: &Option<Vec<f32>>, r: &[f64]| held.as_ref().map(|h| expect(h, r));
    close(
        "dw_down and db_down",
        &joint(&dw_down, &db_down),
        &joint_ref(expect(&before.0, &g.dw_down), held_b(&before.1, &g.db_down)),
    );
    close(
        "dw_up and db_up",
        &joint(&dw_up, &db_up),
        &joint_ref(expect(&before.2, &g.dw_up), held_b(&before.3, &g.db_up)),
    );
    if let Some(dgate) = &dgate {
        close("dgate", dgate, g.dgate.as_ref().unwrap());
    }
}

/// The tolerance of a gradient of `len` elements: f32's 1e-5 holds for a norm over many
/// sums of products; over fewer than 8 (a dλ of a few rows) the relative error is that of a
/// few sums, which cancellation can leave at 1e-4 of f32 arithmetic that is right. A wrong
/// derivative or a missed mask is off by far more (the mutations shown caught).
fn tol_for(len: usize, tol: f64) -> f64 {
    if len < 8 {
        tol.max(1e-3)
    } else {
        tol
    }
}

/// `a·b` for contiguous f64 `a` [rows, inner] and `b` [inner, cols] in T.
fn matmul<T: Element>(a: &[f64], b: &[T], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..inner {
            let s = a[i * inner + j];
            for (o, b) in out[i * cols..(i + 1) * cols].iter_mut().zip(&b[j * cols..]) {
                *o += s * b.to_f64();
            }
        }
    }
    out
}

/// The forms of the unified view: (insertion, separate u) × activation × composition.
fn every_form() -> Vec<(DeltaLinear, bool)> {
    let mut forms = Vec::new();
    for activation in Activation::ALL {
        for composition in [
            Composition::Add,
            Composition::Scaled(0.5),
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

/// A case of the given sizes with random strides (padding of 0..3 elements a row), a random
/// u width, biases and accumulation.
fn case(
    rng: &mut Rng,
    (op, separate_u): (DeltaLinear, bool),
    (m, n, k, r): (usize, usize, usize, usize),
    kernel: KernelVariant,
) -> Case {
    let mut dims = DeltaLinearDims::new(m, n, k, r);
    dims.kernel = kernel;
    dims.k_u = if separate_u { rng.range(1, 40) } else { k };
    dims.ld_x = k + rng.range(0, 3);
    dims.ld_y = n + rng.range(0, 3);
    dims.ld_u = dims.k_u + rng.range(0, 3);
    // LoRA dropout in half the cases, now and then dropping everything.
    let dropout = rng.chance(0.5).then(|| LoraDropout {
        p: rng.pick(&[0.1, 0.5, 1.0]),
        seed: rng.next_u64(),
    });
    Case {
        op,
        dims,
        separate_u,
        biases: rng.chance(0.5),
        accumulate: rng.chance(0.5),
        dropout,
    }
}

fn for_every_dtype(backend: &Backend, c: &Case, rng: &mut Rng) {
    check_case::<f32>(backend, c, rng);
    check_case::<f16>(backend, c, rng);
    check_case::<bf16>(backend, c, rng);
}

/// Every form, every dtype, every implementation (the tensor cores for f16/bf16, at any
/// alignment), on small awkward shapes.
fn every_form_on(backend: &Backend) {
    let mut rng = Rng::from_env();
    for form in every_form() {
        for kernel in [
            KernelVariant::Naive,
            KernelVariant::Simt,
            KernelVariant::TensorCore,
        ] {
            let sizes = (
                rng.pick(&[2, 3, 5]),
                rng.pick(&[7, 17, 20]),
                rng.pick(&[7, 17, 24]),
                rng.pick(&[1, 3, 8]),
            );
            let c = case(&mut rng, form, sizes, kernel);
            if kernel == KernelVariant::TensorCore {
                check_case::<f16>(backend, &c, &mut rng);
                check_case::<bf16>(backend, &c, &mut rng);
            } else {
                for_every_dtype(backend, &c, &mut rng);
            }
        }
    }
}

/// The forward tests' awkward sizes (m ∈ {1, 3, 64, 65, 257}, k, n ∈ {17, 129, 1000},
/// r ∈ {1, 8, 33, 256}), each value in at least one case, random forms and dtypes; and
/// m = 1100 on a narrow layer, which splits the weight gradients' reduction over tokens
/// into three runs (a split starts past 512 rows).
fn awkward_shapes_on(backend: &Backend) {
    let mut rng = Rng::from_env();
    let forms = every_form();
    let shapes = [
        (1, 1000, 17, 8),
        (3, 17, 1000, 33),
        (64, 129, 129, 256),
        (65, 17, 129, 1),
        (257, 129, 17, 8),
        (65, 1000, 17, 33),
        (1100, 17, 17, 8),
    ];
    for (i, &s) in shapes.iter().enumerate() {
        let form = rng.pick(&forms);
        let kernel = [
            KernelVariant::Simt,
            KernelVariant::Auto,
            KernelVariant::TensorCore,
        ][i % 3];
        let c = case(&mut rng, form, s, kernel);
        match rng.range(u8::from(kernel == KernelVariant::TensorCore).into(), 2) {
            0 => check_case::<f32>(backend, &c, &mut rng),
            1 => check_case::<f16>(backend, &c, &mut rng),
            _ => check_case::<bf16>(backend, &c, &mut rng),
        }
    }
    // The naive kernels' split of the token reduction (three runs) too.
    let form = rng.pick(&forms);
    let c = case(&mut rng, form, (1100, 9, 12, 3), KernelVariant::Naive);
    check_case::<f32>(backend, &c, &mut rng);
}

/// The weight-gradient passes on the tensor cores (`delta_bwd_weight_mma_*`): the awkward
/// sizes (m ∈ {1, 3, 64, 65, 257}, and m = 1100 whose token reduction splits into three runs,
/// ranks 1, 8, 33, 256, odd n and k), each shape in f16 with LoRA dropout and accumulation and
/// in bf16 with neither, random forms; and an aligned LoRA whose dy and x rows (16-byte
/// copyable) go by cp.async, the rest of the layer's tiles element-wise.
fn weight_mma_on(backend: &Backend) {
    let mut rng = Rng::from_env();
    let forms = every_form();
    let shapes = [
        (1, 129, 17, 1),
        (3, 17, 129, 8),
        (64, 17, 33, 256),
        (65, 129, 17, 33),
        (257, 33, 17, 8),
        (1100, 17, 19, 33),
        (1100, 9, 12, 1),
    ];
    for s in shapes {
        let form = rng.pick(&forms);
        let mut c = case(&mut rng, form, s, KernelVariant::TensorCore);
        c.dropout = Some(LoraDropout {
            p: 0.5,
            seed: rng.next_u64(),
        });
        c.accumulate = true;
        check_case::<f16>(backend, &c, &mut rng);
        (c.dropout, c.accumulate) = (None, false);
        check_case::<bf16>(backend, &c, &mut rng);
    }
    for m in [130, 1100] {
        let mut dims = DeltaLinearDims::new(m, 64, 136, 8);
        dims.kernel = KernelVariant::Auto;
        let c = Case {
            op: DeltaLinear::rslora(16.0),
            dims,
            separate_u: false,
            biases: true,
            accumulate: rng.chance(0.5),
            dropout: None,
        };
        check_case::<f16>(backend, &c, &mut rng);
        check_case::<bf16>(backend, &c, &mut rng);
    }
}

/// Fresh random configurations every run (`PEFT_RANDOM_CASES`, default 6).
fn random_configurations_on(backend: &Backend) {
    let mut rng = Rng::from_env();
    let forms = every_form();
    for _ in 0..random_cases(6) {
        // Every output of a few elements: a relative error over one or two sums is at the
        // mercy of their cancellation (m = 1 is in awkward_shapes, on wide layers).
        let sizes = (
            rng.range(2, 80),
            rng.range(5, 150),
            rng.range(4, 150),
            rng.range(1, 40),
        );
        let kernel = rng.pick(&[
            KernelVariant::Naive,
            KernelVariant::Simt,
            KernelVariant::Auto,
        ]);
        let form = rng.pick(&forms);
        let c = case(&mut rng, form, sizes, kernel);
        for_every_dtype(backend, &c, &mut rng);
    }
}

/// The training forward on the tensor-core kernels (their epilogues save z and h, the
/// decode tile's split-K reduction too), every form at aligned shapes; the backward runs
/// its SIMT tiles.
fn tensor_core_training_forward_on(backend: &Backend) {
    let mut rng = Rng::from_env();
    // (m, n, k, r): the decode tile with a split down pass (k = 1024), the small and the
    // large tiles.
    for (m, n, k, r) in [(8, 64, 1024, 16), (40, 72, 64, 8), (130, 136, 64, 8)] {
        for (op, separate_u) in every_form() {
            if separate_u || !rng.chance(0.2) {
                continue;
            }
            let mut dims = DeltaLinearDims::new(m, n, k, r);
            dims.kernel = KernelVariant::TensorCore;
            let c = Case {
                op,
                dims,
                separate_u,
                biases: rng.chance(0.5),
                accumulate: false,
                dropout: None,
            };
            check_case::<f16>(backend, &c, &mut rng);
            check_case::<bf16>(backend, &c, &mut rng);
        }
    }
}

/// A delta-apply problem: `heads` bottlenecks over head slices of a given h.
fn check_apply_case<T: Element>(
    backend: &Backend,
    op: DeltaLinear,
    dims: DeltaApplyDims,
    biases: bool,
    accumulate: bool,
    rng: &mut Rng,
) {
    let d = dims;
    let (m, heads, hd, r) = (d.m, d.heads, d.head_dim, d.r);
    let seq = op.insertion == Insertion::Sequential;
    let du_cols = if seq { hd } else { d.u_head_dim };
    let width = heads * hd;
    let (lh, ly, lu) = (
        layout(m, width, d.ld_h),
        layout(m, width, d.ld_y),
        layout(m, heads * du_cols, d.ld_u),
    );
    let h: Vec<T> = rng.uniform_vec(lh.min_len());
    let u: Option<Vec<T>> = (!seq).then(|| rng.uniform_vec(lu.min_len()));
    let w_down: Vec<T> = scaled(rng, heads * r * du_cols, du_cols);
    let b_down: Option<Vec<T>> = biases.then(|| rng.uniform_vec(heads * r));
    let w_up: Vec<T> = scaled(rng, heads * hd * r, r);
    let b_up: Option<Vec<T>> = biases.then(|| rng.uniform_vec(heads * hd));
    let gate: Option<Vec<T>> = (op.composition == Composition::Gated)
        .then(|| (0..m).map(|_| T::from_f64(rng.uniform(0.0, 1.0))).collect());
    let dy: Vec<T> = rng.uniform_vec(ly.min_len());
    let mut y = poisoned::<T>(ly.min_len());
    let mut workspace = poisoned::<T>(d.workspace_len());
    let mut saved = poisoned::<f32>(d.saved_len());
    let case = format!("{op:?} {d:?} biases={biases} accumulate={accumulate}");
    host::delta_apply_train(
        backend,
        &op,
        &d,
        DeltaApplyTrainArgs {
            forward: DeltaApplyArgs {
                h: Some(&h),
                u: u.as_deref(),
                w_down: &w_down,
                b_down: b_down.as_deref(),
                w_up: &w_up,
                b_up: b_up.as_deref(),
                gate: gate.as_deref(),
                workspace: &mut workspace,
                y: &mut y,
            },
            saved: &mut saved,
        },
    )
    .unwrap_or_else(|e| panic!("{case}: forward: {e}"));
    let start = |len: usize, rng: &mut Rng| -> Vec<f32> {
        if accumulate {
            (0..len).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
        } else {
            poisoned(len)
        }
    };
    let mut dh = poisoned::<T>(ly.min_len());
    let mut du = (!seq).then(|| poisoned::<T>(lu.min_len()));
    let mut dw_down = start(heads * r * du_cols, rng);
    let mut db_down = biases.then(|| start(heads * r, rng));
    let mut dw_up = start(heads * hd * r, rng);
    let mut db_up = biases.then(|| start(heads * hd, rng));
    let mut dgate = gate.as_ref().map(|_| poisoned::<f32>(m));
    let held = (
        dw_down.clone(),
        db_down.clone(),
        dw_up.clone(),
        db_up.clone(),
    );
    let mut bwd_ws = poisoned::<f32>(d.backward_workspace_len(&op));
    host::delta_apply_backward(
        backend,
        &op,
        &d,
        DeltaApplyBackwardArgs {
            dy: &dy,
            h: Some(&h),
            u: u.as_deref(),
            w_down: &w_down,
            w_up: &w_up,
            b_up: b_up.as_deref(),
            gate: gate.as_deref(),
            saved: &saved,
            dh: &mut dh,
            du: du.as_deref_mut(),
            dw_down: &mut dw_down,
            db_down: db_down.as_deref_mut(),
            dw_up: &mut dw_up,
            db_up: db_up.as_deref_mut(),
            dgate: dgate.as_deref_mut(),
            workspace: &mut bwd_ws,
            accumulate,
        },
    )
    .unwrap_or_else(|e| panic!("{case}: backward: {e}"));

    // The reference: the multi-head adapter's for a parallel ungated delta; else (one head)
    // the delta-linear reference with x = h and W = I, whose dx is dh.
    let tol = default_tolerance(T::DTYPE);
    let dy_ref = MatRef::with_ld(&dy, m, width, d.ld_y);
    let (y_ref, dh_ref, du_ref, dwd, dbd, dwu, dbu, dgate_ref);
    if !seq && op.composition != Composition::Gated {
        let mh = MultiHeadAdapter {
            heads,
            rank: r,
            activation: op.activation,
            composition: op.composition,
        };
        let t = MultiHeadAdapterTensors {
            h: MatRef::with_ld(&h, m, width, d.ld_h),
            u: MatRef::with_ld(u.as_deref().unwrap(), m, heads * du_cols, d.ld_u),
            w_down: &w_down,
            b_down: b_down.as_deref(),
            w_up: &w_up,
            b_up: b_up.as_deref(),
        };
        y_ref = reference::multi_head_adapter(&mh, &t).unwrap();
        let g = reference::multi_head_adapter_backward(&mh, &t, dy_ref).unwrap();
        (dh_ref, du_ref) = (g.dh, Some(g.du));
        (dwd, dbd, dwu, dbu, dgate_ref) = (g.dw_down, g.db_down, g.dw_up, g.db_up, None);
    } else {
        assert_eq!(heads, 1);
        let identity: Vec<T> = (0..hd * hd)
            .map(|i| T::from_f64(if i % (hd + 1) == 0 { 1.0 } else { 0.0 }))
            .collect();
        let gate64: Option<Vec<f64>> = gate
            .as_ref()
            .map(|g| g.iter().map(|v| v.to_f64()).collect());
        let t = DeltaLinearTensors {
            x: MatRef::with_ld(&h, m, hd, d.ld_h),
            w: MatRef::new(&identity, hd, hd),
            b: None,
            u: u.as_deref().map(|u| MatRef::with_ld(u, m, du_cols, d.ld_u)),
            w_down: MatRef::new(&w_down, r, du_cols),
            b_down: b_down.as_deref(),
            w_up: MatRef::new(&w_up, hd, r),
            b_up: b_up.as_deref(),
            gate: gate64.as_deref(),
        };
        y_ref = reference::delta_linear(&op, &t).unwrap();
        let g = reference::delta_linear_backward(&op, &t, None, dy_ref).unwrap();
        (dh_ref, du_ref) = (g.dx, g.du);
        (dwd, dbd, dwu, dbu, dgate_ref) = (g.dw_down, g.db_down, g.dw_up, g.db_up, g.dgate);
    }
    let name = |what: &str| format!("{what} of {case}");
    assert_close_matrix(&name("y"), &y, ly, &y_ref, tol);
    assert_close_matrix(&name("dh"), &dh, ly, &dh_ref, tol);
    if let Some(du) = &du {
        assert_close_matrix(&name("du"), du, lu, du_ref.as_ref().unwrap(), tol);
    }
    let expect = |held: &[f32], reference: &[f64]| -> Vec<f64> {
        if accumulate {
            held.iter()
                .zip(reference)
                .map(|(h, r)| *h as f64 + r)
                .collect()
        } else {
            reference.to_vec()
        }
    };
    let close = |what: &str, out: &[f32], reference: &[f64]| {
        assert_close(&name(what), out, reference, tol_for(out.len(), tol));
    };
    // Each bias with its weight, as in check_case.
    let joint = |w: &[f32], b: &Option<Vec<f32>>| [w, b.as_deref().unwrap_or(&[])].concat();
    let joint_ref = |w: Vec<f64>, b: Option<Vec<f64>>| [w, b.unwrap_or_default()].concat();
    let held_b = |h: &Option<Vec<f32>>, r: &[f64]| h.as_ref().map(|h| expect(h, r));
    close(
        "dw_down and db_down",
        &joint(&dw_down, &db_down),
        &joint_ref(expect(&held.0, &dwd), held_b(&held.1, &dbd)),
    );
    close(
        "dw_up and db_up",
        &joint(&dw_up, &db_up),
        &joint_ref(expect(&held.2, &dwu), held_b(&held.3, &dbu)),
    );
    if let Some(dgate) = &dgate {
        close("dgate", dgate, dgate_ref.as_ref().unwrap());
    }
}

/// The multi-head parallel adapter (heads ∈ {1, 3, 4}, Add / Scaled) and, on one head,
/// the sequential and gated forms, every activation and dtype, every implementation.
fn delta_apply_on(backend: &Backend) {
    let mut rng = Rng::from_env();
    for activation in Activation::ALL {
        for (insertion, composition, heads) in [
            (Insertion::Parallel, Composition::Add, 3),
            (Insertion::Parallel, Composition::Scaled(0.5), 4),
            (Insertion::Parallel, Composition::Scaled(2.0), 1),
            (
                Insertion::Parallel,
                Composition::Lora {
                    alpha: 3.0,
                    rslora: false,
                },
                2,
            ),
            (Insertion::Parallel, Composition::Gated, 1),
            (Insertion::Sequential, Composition::Add, 1),
            (Insertion::Sequential, Composition::Gated, 1),
        ] {
            let op = DeltaLinear::new(insertion, activation, composition);
            // TensorCore: f16/bf16 only (the forward refuses f32 there).
            for kernel in [
                KernelVariant::Naive,
                KernelVariant::Simt,
                KernelVariant::TensorCore,
            ] {
                let (m, hd, u_hd, r) = (
                    rng.pick(&[2, 9, 70]),
                    rng.pick(&[8, 17, 24]),
                    rng.pick(&[5, 16, 33]),
                    rng.pick(&[1, 4, 9]),
                );
                let mut dims = DeltaApplyDims::new(m, heads, hd, u_hd, r);
                dims.kernel = kernel;
                dims.ld_h += rng.range(0, 3);
                dims.ld_y += rng.range(0, 3);
                dims.ld_u += rng.range(0, 3);
                let (biases, accumulate) = (rng.chance(0.5), rng.chance(0.5));
                if kernel != KernelVariant::TensorCore {
                    check_apply_case::<f32>(backend, op, dims, biases, accumulate, &mut rng);
                }
                check_apply_case::<f16>(backend, op, dims, biases, accumulate, &mut rng);
                check_apply_case::<bf16>(backend, op, dims, biases, accumulate, &mut rng);
            }
        }
    }
}

mod on_emulator {
    use super::*;

    #[test]
    fn delta_apply_every_form() {
        delta_apply_on(&Backend::Emulator);
    }

    #[test]
    fn tensor_core_training_forward() {
        tensor_core_training_forward_on(&Backend::Emulator);
    }

    #[test]
    fn every_form_every_dtype() {
        every_form_on(&Backend::Emulator);
    }

    #[test]
    fn awkward_shapes() {
        awkward_shapes_on(&Backend::Emulator);
    }

    #[test]
    fn random_configurations() {
        random_configurations_on(&Backend::Emulator);
    }

    #[test]
    fn weight_mma() {
        weight_mma_on(&Backend::Emulator);
    }
}

#[cfg(feature = "cuda")]
mod on_gpu {
    use super::*;

    fn gpu() -> Backend {
        Backend::cuda(0).expect("a CUDA device")
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn every_form_every_dtype() {
        every_form_on(&gpu());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn delta_apply_every_form() {
        delta_apply_on(&gpu());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn tensor_core_training_forward() {
        tensor_core_training_forward_on(&gpu());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn awkward_shapes() {
        awkward_shapes_on(&gpu());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn random_configurations() {
        random_configurations_on(&gpu());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn weight_mma() {
        weight_mma_on(&gpu());
    }
}

/// The buffers of a small valid gated problem with a separate u (f32), for the error tests.
struct Bufs {
    dims: DeltaLinearDims,
    op: DeltaLinear,
    dy: Vec<f32>,
    x: Vec<f32>,
    w: Vec<f32>,
    u: Vec<f32>,
    w_down: Vec<f32>,
    w_up: Vec<f32>,
    b_up: Vec<f32>,
    gate: Vec<f32>,
    saved: Vec<f32>,
    dx: Vec<f32>,
    du: Option<Vec<f32>>,
    dw_down: Vec<f32>,
    db_down: Vec<f32>,
    dw_up: Vec<f32>,
    db_up: Vec<f32>,
    dgate: Option<Vec<f32>>,
    workspace: Vec<f32>,
    dropout: Option<LoraDropout>,
}

impl Bufs {
    fn new(rng: &mut Rng) -> Bufs {
        let (m, n, k, k_u, r) = (5, 6, 7, 4, 3);
        let mut dims = DeltaLinearDims::new(m, n, k, r);
        dims.k_u = k_u;
        dims.ld_u = k_u;
        let op = DeltaLinear::new(Insertion::Parallel, Activation::Silu, Composition::Gated);
        Bufs {
            dims,
            op,
            dy: rng.uniform_vec(m * n),
            x: rng.uniform_vec(m * k),
            w: rng.uniform_vec(n * k),
            u: rng.uniform_vec(m * k_u),
            w_down: rng.uniform_vec(r * k_u),
            w_up: rng.uniform_vec(n * r),
            b_up: rng.uniform_vec(n),
            gate: rng.uniform_vec(m),
            saved: rng.uniform_vec(dims.saved_len(&op)),
            dx: vec![0.0; m * k],
            du: Some(vec![0.0; m * k_u]),
            dw_down: vec![0.0; r * k_u],
            db_down: vec![0.0; r],
            dw_up: vec![0.0; n * r],
            db_up: vec![0.0; n],
            dgate: Some(vec![0.0; m]),
            workspace: vec![0.0; dims.backward_workspace_len(&op)],
            dropout: None,
        }
    }

    fn backward(&mut self, accumulate: bool) -> Result<(), Error> {
        // Built before the call: the alias types it (`&Vec` coerces to the slice).
        let args: HostDeltaLinearBackwardArgs<f32> = DeltaLinearBackwardArgs {
            dy: &self.dy,
            x: &self.x,
            w: &self.w,
            u: Some(&self.u),
            w_down: &self.w_down,
            w_up: &self.w_up,
            b_up: Some(&self.b_up),
            gate: Some(&self.gate),
            saved: &self.saved,
            dx: &mut self.dx,
            du: self.du.as_deref_mut(),
            dw_down: &mut self.dw_down,
            db_down: Some(&mut self.db_down),
            dw_up: &mut self.dw_up,
            db_up: Some(&mut self.db_up),
            dgate: self.dgate.as_deref_mut(),
            workspace: &mut self.workspace,
            dropout: self.dropout,
            accumulate,
        };
        peft_kernels::emulator::delta_linear_backward(&self.op, &self.dims, args)
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let mut rng = Rng::from_env();
    Bufs::new(&mut rng)
        .backward(true)
        .expect("the valid problem");
    type Mutation = fn(&mut Bufs);
    let cases: [(&str, Mutation); 11] = [
        ("`dw_down`", |b| b.dw_down.push(0.0)),
        ("`dw_up`", |b| {
            b.dw_up.pop();
        }),
        ("`db_up`", |b| b.db_up.push(0.0)),
        ("`db_down`", |b| {
            b.db_down.pop();
        }),
        ("`saved`", |b| {
            b.saved.pop();
        }),
        ("`du`", |b| b.du = None),
        ("`dgate`", |b| b.dgate = None),
        ("`workspace`", |b| {
            b.workspace.pop();
        }),
        ("`dy`", |b| {
            b.dy.pop();
        }),
        ("`dropout.p`", |b| {
            b.dropout = Some(LoraDropout { p: 1.5, seed: 1 })
        }),
        ("`dims.r`", |b| b.dims.r = 0),
    ];
    for (name, mutate) in cases {
        for accumulate in [false, true] {
            let mut b = Bufs::new(&mut rng);
            mutate(&mut b);
            let e = b.backward(accumulate).expect_err(name).to_string();
            assert!(
                e.contains(name) && e.contains("delta_linear_backward"),
                "{name}: {e}"
            );
        }
    }
}

/// Gradients that alias an input (possible with device buffers; host slices cannot) are
/// refused, naming the gradient.
#[test]
fn aliasing_gradients_are_refused() {
    use peft_kernels::plan::delta_linear_backward::{
        delta_linear_backward, DeltaLinearBackwardBufs,
    };
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;
    let (m, n, k, r) = (4, 8, 8, 2);
    let dims = DeltaLinearDims::new(m, n, k, r);
    let op = DeltaLinear::lora(2.0);
    // Every buffer 1 MiB apart, from a fake base address.
    let mut next = 1u64 << 20;
    let mut buf = |len: usize| {
        next += 1 << 20;
        Buf { addr: next, len }
    };
    let ok = DeltaLinearBackwardBufs {
        dy: buf(m * n),
        x: buf(m * k),
        w: buf(n * k),
        u: None,
        w_down: buf(r * k),
        w_up: buf(n * r),
        b_up: None,
        gate: None,
        saved: buf(dims.saved_len(&op)),
        dx: buf(m * k),
        du: None,
        dw_down: buf(r * k),
        db_down: Some(buf(r)),
        dw_up: buf(n * r),
        db_up: None,
        dgate: None,
        workspace: buf(dims.backward_workspace_len(&op)),
        dropout: None,
        accumulate: false,
    };
    delta_linear_backward(&op, &dims, DType::F32, &ok).expect("disjoint buffers");
    // Which kernels run: at these aligned shapes dx and the weight gradients go to the
    // tensor cores for f16/bf16 under `Auto` and `TensorCore`, to the SIMT tiles for f32
    // and under `Simt`, to the naive kernels under `Naive`.
    let kernels = |dtype, kernel| -> Vec<&'static str> {
        let dims = DeltaLinearDims { kernel, ..dims };
        let steps = delta_linear_backward(&op, &dims, dtype, &ok).unwrap();
        steps.iter().map(|(l, _)| l.kernel.name()).collect()
    };
    for kernel in [KernelVariant::Auto, KernelVariant::TensorCore] {
        assert_eq!(
            kernels(DType::BF16, kernel),
            [
                "delta_bwd_dz_bf16",
                "delta_bwd_weight_mma_bf16",
                "delta_bwd_weight_mma_bf16",
                "delta_bwd_data_mma_bf16"
            ]
        );
        assert_eq!(kernels(DType::F16, kernel)[1], "delta_bwd_weight_mma_f16");
        assert_eq!(
            kernels(DType::F32, kernel)[1..],
            [
                "delta_bwd_weight_simt_f32",
                "delta_bwd_weight_simt_f32",
                "delta_bwd_data_simt_f32"
            ]
        );
    }
    for (kernel, name) in [
        (KernelVariant::Simt, "simt"),
        (KernelVariant::Naive, "naive"),
    ] {
        for dtype in [DType::F16, DType::BF16] {
            let names = kernels(dtype, kernel);
            let weight = format!("delta_bwd_weight_{name}_{}", dtype.suffix());
            assert_eq!(names[1..3], [weight.as_str(); 2], "{kernel:?}");
        }
    }
    let cases = [
        ("`dx`", DeltaLinearBackwardBufs { dx: ok.dy, ..ok }),
        (
            "`dw_down`",
            DeltaLinearBackwardBufs {
                dw_down: Buf {
                    addr: ok.w_down.addr + 4,
                    len: r * k,
                },
                ..ok
            },
        ),
        (
            "`db_down`",
            DeltaLinearBackwardBufs {
                db_down: Some(Buf {
                    addr: ok.dw_up.addr,
                    len: r,
                }),
                ..ok
            },
        ),
        (
            "`workspace`",
            DeltaLinearBackwardBufs {
                workspace: Buf {
                    addr: ok.saved.addr,
                    len: ok.workspace.len,
                },
                ..ok
            },
        ),
    ];
    for (name, bufs) in cases {
        let e = delta_linear_backward(&op, &dims, DType::F32, &bufs)
            .expect_err(name)
            .to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
}

/// An empty batch (m = 0) is checked as any call and plans no launch, as every operation of
/// the crate treats one: a short `dw_down` is still refused.
#[test]
fn an_empty_batch_is_checked_and_launches_nothing() {
    use peft_kernels::plan::delta_linear_backward::{
        delta_linear_backward, DeltaLinearBackwardBufs,
    };
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;
    let mut rng = Rng::from_env();
    let empty = |rng: &mut Rng| {
        let mut b = Bufs::new(rng);
        b.dims.m = 0;
        b.gate.clear();
        b.dgate = Some(Vec::new());
        b.saved.truncate(b.dims.saved_len(&b.op));
        b
    };
    for accumulate in [false, true] {
        empty(&mut rng)
            .backward(accumulate)
            .expect("an empty batch is Ok");
        let mut b = empty(&mut rng);
        b.dw_down.pop();
        let e = b.backward(accumulate).expect_err("dw_down").to_string();
        assert!(e.contains("`dw_down`"), "{e}");
    }
    // The plan of an empty LoRA batch: no step.
    let (n, k, r) = (8, 8, 2);
    let dims = DeltaLinearDims::new(0, n, k, r);
    let op = DeltaLinear::lora(2.0);
    let mut next = 1u64 << 20;
    let mut buf = |len: usize| {
        next += 1 << 20;
        Buf { addr: next, len }
    };
    let bufs = DeltaLinearBackwardBufs {
        dy: buf(0),
        x: buf(0),
        w: buf(n * k),
        u: None,
        w_down: buf(r * k),
        w_up: buf(n * r),
        b_up: None,
        gate: None,
        saved: buf(0),
        dx: buf(0),
        du: None,
        dw_down: buf(r * k),
        db_down: None,
        dw_up: buf(n * r),
        db_up: None,
        dgate: None,
        workspace: buf(dims.backward_workspace_len(&op)),
        dropout: None,
        accumulate: false,
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let steps = delta_linear_backward(&op, &dims, dtype, &bufs).expect("m = 0");
        assert!(steps.is_empty(), "{dtype:?}: {} steps", steps.len());
    }
}

/// A zero dy gives zero gradients, and dropout with p = 1 (every element of u dropped) a
/// zero dW_down and du: never NaN.
#[test]
fn zero_dy_and_all_dropped_rows_give_zero_gradients() {
    let mut rng = Rng::from_env();
    for kernel in [KernelVariant::Naive, KernelVariant::Simt] {
        let mut b = Bufs::new(&mut rng);
        b.dims.kernel = kernel;
        b.dy.iter_mut().for_each(|v| *v = 0.0);
        b.backward(false).unwrap();
        for g in [&b.dx, &b.dw_down, &b.db_down, &b.dw_up, &b.db_up] {
            assert!(g.iter().all(|&v| v == 0.0), "{kernel:?}: {g:?}");
        }
        let (du, dgate) = (b.du.as_ref().unwrap(), b.dgate.as_ref().unwrap());
        assert!(du.iter().chain(dgate).all(|&v| v == 0.0));

        let mut b = Bufs::new(&mut rng);
        b.dims.kernel = kernel;
        b.dropout = Some(LoraDropout { p: 1.0, seed: 7 });
        b.backward(false).unwrap();
        assert!(b.dw_down.iter().all(|&v| v == 0.0), "{:?}", b.dw_down);
        assert!(b.du.as_ref().unwrap().iter().all(|&v| v == 0.0));
        for g in [&b.dx, &b.db_down, &b.dw_up, &b.db_up] {
            assert!(g.iter().all(|v| v.is_finite()), "{kernel:?}: {g:?}");
        }
    }
}

#[test]
fn params_match_the_kernels_struct() {
    unsafe extern "C" {
        fn pk_sizeof_DeltaBackwardParams() -> usize;
    }
    use peft_kernels::plan::delta_linear_backward::DeltaBackwardParams;
    // SAFETY: a plain function returning a constant.
    let size = unsafe { pk_sizeof_DeltaBackwardParams() };
    assert_eq!(size, std::mem::size_of::<DeltaBackwardParams>());
}
