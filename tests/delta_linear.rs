//! The delta-linear kernels on the emulator against the f64 reference: every combination of
//! the unified view's dimensions, every dtype, every kernel implementation, awkward shapes,
//! strides, poisoned outputs and bad arguments.

#[macro_use]
mod common;

use common::{poisoned, runs_wgmma, Placed, Rng};
use half::{bf16, f16};
use peft_kernels::delta_linear::{
    DeltaApplyArgs, DeltaApplyDims, DeltaLinear, DeltaLinearArgs, DeltaLinearDims,
    HostDeltaApplyArgs, HostDeltaLinearArgs, HostLoraMergeArgs, KernelVariant, LoraMergeArgs,
    LoraMergeDims,
};
use peft_kernels::host::{self, Backend};
use peft_kernels::reference::adapter::{
    multi_head_adapter, MultiHeadAdapter, MultiHeadAdapterTensors,
};
use peft_kernels::reference::linear::{self as reference, DeltaLinearTensors};
use peft_kernels::reference::MatRef;
use peft_kernels::validate::{assert_close_matrix, assert_padding_untouched, default_tolerance};
use peft_kernels::{
    Activation, Composition, Element, Error, Insertion, MatrixLayout, DEFAULT_SPLIT_TARGET,
};

const VARIANTS: [KernelVariant; 3] = [
    KernelVariant::Naive,
    KernelVariant::Simt,
    KernelVariant::Auto,
];

/// One delta-linear problem: the method, the sizes, which optional tensors exist.
#[derive(Clone, Copy, Debug)]
struct Case {
    op: DeltaLinear,
    dims: DeltaLinearDims,
    bias: bool,
    down_bias: bool,
    up_bias: bool,
    separate_u: bool,
}

/// Random inputs of a case, weights scaled by 1/sqrt(fan-in) so activations stay O(1).
struct Inputs<T> {
    x: Vec<T>,
    w: Vec<T>,
    bias: Option<Vec<T>>,
    u: Option<Vec<T>>,
    w_down: Vec<T>,
    b_down: Option<Vec<T>>,
    w_up: Vec<T>,
    b_up: Option<Vec<T>>,
    gate: Option<Vec<T>>,
}

fn scaled<T: Element>(rng: &mut Rng, n: usize, fan_in: usize) -> Vec<T> {
    let s = 1.0 / (fan_in as f64).sqrt();
    (0..n)
        .map(|_| T::from_f64(s * rng.uniform(-1.0, 1.0)))
        .collect()
}

impl<T: Element> Inputs<T> {
    fn new(rng: &mut Rng, c: &Case) -> Self {
        let d = c.dims;
        let k_u = match c.op.insertion {
            Insertion::Sequential => d.n,
            Insertion::Parallel if c.separate_u => d.k_u,
            Insertion::Parallel => d.k,
        };
        // Strided rows: the gaps hold NaN, which a kernel reading them would propagate.
        let strided = |rng: &mut Rng, rows: usize, cols: usize, ld: usize| -> Vec<T> {
            let mut v = poisoned::<T>(MatrixLayout { rows, cols, ld }.min_len());
            for i in 0..rows {
                for j in 0..cols {
                    v[i * ld + j] = T::from_f64(rng.uniform(-1.0, 1.0));
                }
            }
            v
        };
        Inputs {
            x: strided(rng, d.m, d.k, d.ld_x),
            w: scaled(rng, d.n * d.k, d.k),
            bias: c.bias.then(|| rng.uniform_vec(d.n)),
            u: c.separate_u.then(|| strided(rng, d.m, d.k_u, d.ld_u)),
            w_down: scaled(rng, d.r * k_u, k_u),
            b_down: c.down_bias.then(|| rng.uniform_vec(d.r)),
            w_up: scaled(rng, d.n * d.r, d.r),
            b_up: c.up_bias.then(|| rng.uniform_vec(d.n)),
            gate: (c.op.composition == Composition::Gated)
                .then(|| (0..d.m).map(|_| T::from_f64(rng.unit())).collect()),
        }
    }

    /// The f64 reference of the kernels' contract. A sequential delta reads h as the
    /// kernels materialise it, in T (as any framework's bf16 h is), so its reference is the
    /// exact f64 layer over that rounded h: frozen part h_T·I, delta input u = h_T.
    /// Without this, a rank-1 delta whose h·a cancels turns h's rounding into a relative
    /// error over 1e-2 of a tiny output now and then.
    fn reference(&self, c: &Case) -> Vec<f64> {
        let d = c.dims;
        let k_u = self.w_down.len() / d.r;
        let gate: Option<Vec<f64>> = self
            .gate
            .as_ref()
            .map(|g| g.iter().map(|v| v.to_f64()).collect());
        let (h, identity): (Vec<T>, Vec<T>);
        let (op, x, w, b, u) = if c.op.insertion == Insertion::Sequential {
            let x = MatRef::with_ld(&self.x, d.m, d.k, d.ld_x);
            let w = MatRef::new(&self.w, d.n, d.k);
            h = reference::linear(x, w, self.bias.as_deref())
                .expect("reference")
                .into_iter()
                .map(T::from_f64)
                .collect();
            identity = (0..d.n * d.n)
                .map(|i| T::from_f64(if i % (d.n + 1) == 0 { 1.0 } else { 0.0 }))
                .collect();
            let h_t = MatRef::new(&h, d.m, d.n);
            let parallel = DeltaLinear {
                insertion: Insertion::Parallel,
                ..c.op
            };
            (
                parallel,
                h_t,
                MatRef::new(&identity, d.n, d.n),
                None,
                Some(h_t),
            )
        } else {
            (
                c.op,
                MatRef::with_ld(&self.x, d.m, d.k, d.ld_x),
                MatRef::new(&self.w, d.n, d.k),
                self.bias.as_deref(),
                self.u
                    .as_ref()
                    .map(|u| MatRef::with_ld(u, d.m, d.k_u, d.ld_u)),
            )
        };
        let t = DeltaLinearTensors {
            x,
            w,
            b,
            u,
            w_down: MatRef::new(&self.w_down, d.r, k_u),
            b_down: self.b_down.as_deref(),
            w_up: MatRef::new(&self.w_up, d.n, d.r),
            b_up: self.b_up.as_deref(),
            gate: gate.as_deref(),
        };
        reference::delta_linear(&op, &t).expect("reference")
    }

    /// Runs the kernels into a poisoned y and workspace; returns y.
    fn run(&self, c: &Case, backend: &Backend) -> peft_kernels::Result<Vec<T>> {
        self.run_in(c, backend, c.dims.workspace_len())
    }

    /// [`Inputs::run`] with a workspace of `workspace_len` elements.
    fn run_in(
        &self,
        c: &Case,
        backend: &Backend,
        workspace_len: usize,
    ) -> peft_kernels::Result<Vec<T>> {
        let d = c.dims;
        let mut y = poisoned::<T>(
            MatrixLayout {
                rows: d.m,
                cols: d.n,
                ld: d.ld_y,
            }
            .min_len(),
        );
        // The workspace is followed by a guard of NaN, which no write past it may change
        // (the plan fits its splits to the workspace it is given). On the emulator only:
        // the GPU backend uploads the workspace's slice alone.
        const GUARD: usize = 4096;
        let mut workspace = poisoned::<T>(workspace_len.saturating_add(GUARD));
        let (workspace, guard) = workspace.split_at_mut(workspace_len);
        let args = DeltaLinearArgs {
            x: &self.x[..],
            w: &self.w[..],
            bias: self.bias.as_deref(),
            u: self.u.as_deref(),
            w_down: &self.w_down[..],
            b_down: self.b_down.as_deref(),
            w_up: &self.w_up[..],
            b_up: self.b_up.as_deref(),
            gate: self.gate.as_deref(),
            workspace,
            y: &mut y[..],
        };
        host::delta_linear(backend, &c.op, &d, args)?;
        assert!(
            guard.iter().all(|v| v.to_f64().is_nan()),
            "{c:?}: written past a workspace of {workspace_len}"
        );
        Ok(y)
    }
}

impl<T: Element> Inputs<T> {
    /// [`Inputs::run`] with every buffer one element past a 16-byte boundary (as a slice
    /// into a `Vec<T>` may start).
    fn run_misaligned(&self, c: &Case, backend: &Backend) -> peft_kernels::Result<Vec<T>> {
        let d = c.dims;
        let [x, w, w_down, w_up] =
            [&self.x, &self.w, &self.w_down, &self.w_up].map(|v| Placed::misaligned(v));
        let [bias, u, b_down, b_up, gate] =
            [&self.bias, &self.u, &self.b_down, &self.b_up, &self.gate]
                .map(|v| v.as_deref().map(Placed::misaligned));
        let y_layout = MatrixLayout {
            rows: d.m,
            cols: d.n,
            ld: d.ld_y,
        };
        let mut y = Placed::misaligned(&poisoned::<T>(y_layout.min_len()));
        let mut workspace = Placed::misaligned(&poisoned::<T>(d.workspace_len()));
        let args: HostDeltaLinearArgs<T> = DeltaLinearArgs {
            x: x.get(),
            w: w.get(),
            bias: bias.as_ref().map(Placed::get),
            u: u.as_ref().map(Placed::get),
            w_down: w_down.get(),
            b_down: b_down.as_ref().map(Placed::get),
            w_up: w_up.get(),
            b_up: b_up.as_ref().map(Placed::get),
            gate: gate.as_ref().map(Placed::get),
            workspace: workspace.get_mut(),
            y: y.get_mut(),
        };
        host::delta_linear(backend, &c.op, &d, args)?;
        Ok(y.get().to_vec())
    }
}

/// Runs a case and checks it against the reference and the padding of y.
fn check<T: Element>(rng: &mut Rng, c: &Case, backend: &Backend) {
    let inputs = Inputs::<T>::new(rng, c);
    let expected = inputs.reference(c);
    let y = inputs
        .run(c, backend)
        .unwrap_or_else(|e| panic!("{c:?} ({}, seed {}): {e}", T::DTYPE, rng.seed()));
    let d = c.dims;
    let layout = MatrixLayout {
        rows: d.m,
        cols: d.n,
        ld: d.ld_y,
    };
    let name = format!("{} {:?} (seed {})", T::DTYPE, c, rng.seed());
    assert_close_matrix(&name, &y, layout, &expected, default_tolerance(T::DTYPE));
    assert_padding_untouched(&name, &y, &poisoned::<T>(y.len()), layout);
}

/// Calls `f` with a checker for each dtype.
fn for_each_dtype(backend: &Backend, f: impl Fn(&mut Rng, &dyn Fn(&mut Rng, &Case))) {
    let mut rng = Rng::from_env();
    f(&mut rng, &|rng, c| check::<f32>(rng, c, backend));
    f(&mut rng, &|rng, c| check::<f16>(rng, c, backend));
    f(&mut rng, &|rng, c| check::<bf16>(rng, c, backend));
}

/// A case of `insertion` on `dims` with a random activation, composition and biases.
fn random_case(rng: &mut Rng, insertion: Insertion, dims: DeltaLinearDims) -> Case {
    let composition = compositions(rng);
    Case {
        op: DeltaLinear::new(
            insertion,
            rng.pick(&Activation::ALL),
            rng.pick(&composition),
        ),
        dims,
        bias: rng.chance(0.5),
        down_bias: rng.chance(0.5),
        up_bias: rng.chance(0.5),
        separate_u: false,
    }
}

/// Every composition, with a random scale, LoRA's α (resolved against the case's r) and
/// rsLoRA or not.
fn compositions(rng: &mut Rng) -> [Composition; 4] {
    [
        Composition::Add,
        Composition::Scaled(rng.uniform(-3.0, 5.0) as f32),
        Composition::Lora {
            alpha: rng.uniform(-16.0, 64.0) as f32,
            rslora: rng.chance(0.5),
        },
        Composition::Gated,
    ]
}

/// LoRA's scale follows the dims' r, α / r or α / √r, whatever r the call has: the plan's
/// scale for each (the planner alone: nothing runs), and a NaN α is refused.
#[test]
fn lora_scale_follows_the_dims_rank() {
    use peft_kernels::plan::delta_linear::delta_linear;
    use peft_kernels::DType;

    let (m, n, k) = (3, 10, 12);
    for (op, r, s) in [
        (DeltaLinear::lora(8.0), 4, 2.0),
        (DeltaLinear::lora(8.0), 16, 0.5),
        (DeltaLinear::rslora(8.0), 16, 2.0),
        (DeltaLinear::rslora(8.0), 4, 4.0),
        (DeltaLinear::lora(-3.0), 1, -3.0),
    ] {
        let dims = DeltaLinearDims::new(m, n, k, r);
        let bufs = planner_bufs(Insertion::Parallel, m, n, k, r);
        let steps = delta_linear(&op, &dims, DType::F32, &bufs).unwrap();
        for (_, params) in &steps {
            assert_eq!(params.scale, s, "{op:?} r = {r}");
        }
        assert_eq!(op.composition.scale(r), s, "{op:?} r = {r}");
    }
    let dims = DeltaLinearDims::new(m, n, k, 4);
    let bufs = planner_bufs(Insertion::Parallel, m, n, k, 4);
    match delta_linear(&DeltaLinear::lora(f32::NAN), &dims, DType::F32, &bufs) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "composition"),
        other => panic!("a NaN α: {other:?}"),
    }
}

fn every_combination_every_dtype_every_kernel(backend: &Backend) {
    for_each_dtype(backend, |rng, check| {
        for insertion in [Insertion::Parallel, Insertion::Sequential] {
            for activation in Activation::ALL {
                for composition in compositions(rng) {
                    for kernel in VARIANTS {
                        let mut dims = DeltaLinearDims::new(5, 24, 40, 8);
                        dims.kernel = kernel;
                        let separate_u = insertion == Insertion::Parallel && rng.chance(0.5);
                        dims.k_u = 16;
                        dims.ld_u = 16;
                        let c = Case {
                            op: DeltaLinear::new(insertion, activation, composition),
                            dims,
                            bias: rng.chance(0.5),
                            down_bias: rng.chance(0.5),
                            up_bias: rng.chance(0.5),
                            separate_u,
                        };
                        check(rng, &c);
                    }
                }
            }
        }
    });
}

/// The shapes the issue names: M ∈ {1, 3, 64, 65, 257}, K and N not multiples of any tile,
/// r ∈ {1, 8, 16, 33, 64, 256}, each with a random method.
fn awkward_shapes(backend: &Backend) {
    let shapes = [
        (1, 17, 129, 1),
        (3, 129, 1000, 8),
        (64, 1000, 17, 16),
        (65, 129, 136, 33),
        (257, 129, 1000, 64),
        (65, 1000, 1000, 256),
        (257, 17, 24, 256),
    ];
    for_each_dtype(backend, |rng, check| {
        for (m, n, k, r) in shapes {
            for kernel in VARIANTS {
                // The largest shape only through the kernel users get.
                if m * n * k > 10_000_000 && kernel != KernelVariant::Auto {
                    continue;
                }
                let insertion = rng.pick(&[Insertion::Parallel, Insertion::Sequential]);
                let mut dims = DeltaLinearDims::new(m, n, k, r);
                dims.kernel = kernel;
                let c = random_case(rng, insertion, dims);
                check(rng, &c);
            }
        }
    });
}

/// Row strides on x, u and y (aligned for the tensor cores and not), the padding of y
/// untouched, a separate delta input of another width (an FFN's parallel adapter).
fn strides_and_separate_input(backend: &Backend) {
    for_each_dtype(backend, |rng, check| {
        for (ld_pad, kernel) in [
            (8, KernelVariant::Auto),
            (3, KernelVariant::Auto),
            (5, KernelVariant::Simt),
        ] {
            let mut dims = DeltaLinearDims::new(70, 40, 48, 16);
            (dims.ld_x, dims.ld_y, dims.k_u, dims.ld_u) =
                (48 + ld_pad, 40 + ld_pad, 88, 88 + ld_pad);
            dims.kernel = kernel;
            let c = Case {
                op: DeltaLinear::parallel_adapter(Activation::Relu, 4.0),
                dims,
                bias: true,
                down_bias: true,
                up_bias: true,
                separate_u: true,
            };
            check(rng, &c);
        }
    });
}

/// The tensor cores on operands that cannot be copied in 16-byte chunks, against the
/// reference: ranks that are not multiples of 8 (W_up's rows of r elements), which `Auto`
/// sends there too, and an odd K or odd row strides of x and y, which only an explicit
/// request does. f32 has no tensor-core kernel: that request is an error, not a fallback.
fn tensor_cores_on_unaligned_operands(backend: &Backend) {
    let mut rng = Rng::from_env();
    // (m, n, k, r, row padding of x and y)
    let shapes = [
        (4, 16, 17, 8, 0),
        (70, 40, 48, 4, 0),
        (3, 131, 64, 33, 3),
        (129, 72, 40, 7, 1),
        (1, 24, 1000, 1, 0),
    ];
    for (m, n, k, r, pad) in shapes {
        for insertion in [Insertion::Parallel, Insertion::Sequential] {
            for kernel in [KernelVariant::TensorCore, KernelVariant::Auto] {
                let mut dims = DeltaLinearDims::new(m, n, k, r);
                (dims.ld_x, dims.ld_y, dims.kernel) = (k + pad, n + pad, kernel);
                let c = random_case(&mut rng, insertion, dims);
                check::<f16>(&mut rng, &c, backend);
                check::<bf16>(&mut rng, &c, backend);
            }
        }
    }
    let mut dims = DeltaLinearDims::new(4, 16, 16, 8);
    dims.kernel = KernelVariant::TensorCore;
    let c = Case {
        op: DeltaLinear::lora(16.0),
        dims,
        bias: false,
        down_bias: false,
        up_bias: false,
        separate_u: false,
    };
    let inputs = Inputs::<f32>::new(&mut rng, &c);
    assert!(matches!(
        inputs.run(&c, backend),
        Err(Error::Unsupported(_))
    ));
}

/// The operands of a delta-linear call of `insertion` as the planner sees them, at a fake
/// aligned address (the planner alone touches no memory): x [m, k], W [n, k], W_down [r, k]
/// (sequential: [r, n]), W_up [n, r], the workspace and y, no bias or gate.
fn planner_bufs(
    insertion: Insertion,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
) -> peft_kernels::plan::delta_linear::DeltaLinearBufs {
    let buf = |len| peft_kernels::plan::Buf { addr: 4096, len };
    let k_u = match insertion {
        Insertion::Parallel => k,
        Insertion::Sequential => n,
    };
    peft_kernels::plan::delta_linear::DeltaLinearBufs {
        x: buf(m * k),
        w: buf(n * k),
        bias: None,
        u: None,
        w_down: buf(r * k_u),
        b_down: None,
        w_up: buf(n * r),
        b_up: None,
        gate: None,
        workspace: buf(DeltaLinearDims::new(m, n, k, r).workspace_len()),
        y: buf(m * n),
        col_scale: None,
    }
}

/// The operands of a parallel delta_apply call as the planner sees them, at a fake aligned
/// address: h read from y, u [m, heads·du], W_down [heads, r, du], W_up [heads, dh, r], the
/// workspace and y [m, heads·dh], no bias or gate.
fn apply_planner_bufs(
    m: usize,
    heads: usize,
    (dh, du): (usize, usize),
    r: usize,
) -> peft_kernels::plan::delta_linear::DeltaApplyBufs {
    let buf = |len| peft_kernels::plan::Buf { addr: 4096, len };
    peft_kernels::plan::delta_linear::DeltaApplyBufs {
        h: None,
        u: Some(buf(m * heads * du)),
        w_down: buf(heads * r * du),
        b_down: None,
        w_up: buf(heads * dh * r),
        b_up: None,
        gate: None,
        workspace: buf(DeltaApplyDims::new(m, heads, dh, du, r).workspace_len()),
        y: buf(m * heads * dh),
    }
}

/// Hopper's wgmma kernel (`KernelVariant::Wgmma`) against the reference: both insertions,
/// random activations and compositions, decode and prefill rows, ragged and unaligned shapes
/// (an odd K, ranks that are not multiples of 8), f16 and bf16. Where the backend cannot run
/// it, the request must be refused, and for f32 always.
fn wgmma_kernel(backend: &Backend) {
    let mut rng = Rng::from_env();
    let runs = runs_wgmma(backend);
    // (m, n, k, r)
    let shapes = [
        (1, 24, 40, 8),
        (5, 131, 72, 4),
        (129, 136, 201, 33),
        (200, 257, 1000, 64),
    ];
    for (m, n, k, r) in shapes {
        for insertion in [Insertion::Parallel, Insertion::Sequential] {
            // One random form per case (covering them all is the other tests' job).
            let mut dims = DeltaLinearDims::new(m, n, k, r);
            dims.kernel = KernelVariant::Wgmma;
            let c = random_case(&mut rng, insertion, dims);
            if runs {
                check::<f16>(&mut rng, &c, backend);
                check::<bf16>(&mut rng, &c, backend);
            } else {
                let inputs = Inputs::<bf16>::new(&mut rng, &c);
                let refused = inputs.run(&c, backend);
                assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
            }
            let inputs = Inputs::<f32>::new(&mut rng, &c);
            assert!(matches!(
                inputs.run(&c, backend),
                Err(Error::Unsupported(_))
            ));
        }
    }
}

/// A pass with few blocks (the down pass's r columns at decode; any pass at small m·n) and
/// a long K splits its K over blocks and adds the runs in a second kernel. The plan must
/// split exactly the passes counted here (the plan is made on an aligned address, as the
/// emulator's buffers from the allocator are), runs that straddle the phase switch and runs
/// wholly in phase 2 included. The delta is scaled up, or gated (the reduction reads λ), so
/// that an error in t is not lost in h.
fn passes_split_over_k(backend: &Backend) {
    use peft_kernels::plan::delta_linear::{delta_linear, DeltaLinearBufs};
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let mut rng = Rng::from_env();
    // (m, n, k, r, split passes when parallel, when sequential (n = k)). Decode tile: the
    // main pass's 34 k-tiles in runs of 2 (run 16 straddles the switch); 8 runs; a ragged K;
    // the scaled PA's decode (runs wholly in phase 2); 16 runs over a ragged K. Small tile
    // (m = 40); large tile (m = 130): the frozen GEMM and, at r = 256, the up-projection of a
    // sequential delta.
    let shapes = [
        (1, 40, 4224, 16, 2, 1),
        (3, 24, 1000, 33, 2, 2),
        (16, 64, 1048, 1, 2, 2),
        (1, 24, 4096, 512, 2, 1),
        (2, 16, 2000, 300, 2, 2),
        (40, 72, 1000, 8, 2, 2),
        (130, 136, 1000, 24, 2, 2),
        (130, 264, 264, 256, 2, 3),
    ];
    for (m, n, k, r, parallel_splits, sequential_splits) in shapes {
        for insertion in [Insertion::Parallel, Insertion::Sequential] {
            // Both variants take the same kernels on these aligned shapes: one of them per case.
            let kernel = rng.pick(&[KernelVariant::Auto, KernelVariant::TensorCore]);
            // A sequential delta reads h: K of its down pass is n.
            let (n, splits) = match insertion {
                Insertion::Sequential => (k, sequential_splits),
                Insertion::Parallel => (n, parallel_splits),
            };
            let mut dims = DeltaLinearDims::new(m, n, k, r);
            dims.kernel = kernel;
            let composition = rng.pick(&[Composition::Scaled(-8.0), Composition::Gated]);
            let op = DeltaLinear::new(insertion, rng.pick(&Activation::ALL), composition);
            // A parallel delta's own input, as wide as x (the split is over its K).
            let separate_u = insertion == Insertion::Parallel && rng.chance(0.5);
            (dims.k_u, dims.ld_u) = (k, k);
            let bufs = DeltaLinearBufs {
                gate: (composition == Composition::Gated).then_some(Buf { addr: 4096, len: m }),
                ..planner_bufs(insertion, m, n, k, r)
            };
            let steps = delta_linear(&op, &dims, DType::BF16, &bufs).unwrap();
            let reductions = steps
                .iter()
                .filter(|(l, _)| l.kernel.name().contains("split_reduce"))
                .count();
            assert_eq!(reductions, splits, "{insertion:?} {dims:?}: split passes");
            let c = Case {
                op,
                dims,
                bias: rng.chance(0.5),
                down_bias: rng.chance(0.5),
                up_bias: rng.chance(0.5),
                separate_u,
            };
            check::<f16>(&mut rng, &c, backend);
            check::<bf16>(&mut rng, &c, backend);
        }
    }
}

/// `split_target` sets how many runs a pass with few blocks splits into, and the workspace
/// follows it: at decode (m = 2, n = 256, k = 4096, r = 16: a main pass of 8 column tiles
/// over 33 k-tiles, a down pass of one tile over 32) 0 splits nothing; the default 128 gives
/// the down pass 32 runs (the most) and the main pass 11 (128 blocks want 16 runs: 33
/// k-tiles in runs of 3); 512 gives the main pass 17 (32 runs wanted: runs of 2); each plan
/// runs right against the reference. A workspace sized for a smaller
/// target than the dims name is refused, naming it.
fn split_target_sets_the_runs(backend: &Backend) {
    use peft_kernels::plan::delta_linear::{delta_linear, DeltaLinearBufs};
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let mut rng = Rng::from_env();
    let (m, n, k, r) = (2, 256, 4096, 16);
    let op = DeltaLinear::lora(-64.0);
    let runs = |dims: &DeltaLinearDims| -> Vec<i32> {
        let bufs = DeltaLinearBufs {
            workspace: Buf {
                addr: 4096,
                len: dims.workspace_len(),
            },
            ..planner_bufs(Insertion::Parallel, m, n, k, r)
        };
        let steps = delta_linear(&op, dims, DType::BF16, &bufs).unwrap();
        steps.iter().map(|(_, p)| p.k_splits).collect()
    };
    let mut last_len = 0;
    for (target, expected) in [
        (0, vec![1, 1]),
        (DEFAULT_SPLIT_TARGET, vec![32, 32, 11, 11]),
        (512, vec![32, 32, 17, 17]),
    ] {
        let dims = DeltaLinearDims {
            split_target: target,
            ..DeltaLinearDims::new(m, n, k, r)
        };
        assert_eq!(runs(&dims), expected, "split target {target}");
        assert!(dims.workspace_len() > last_len, "split target {target}");
        last_len = dims.workspace_len();
        let c = Case {
            op,
            dims,
            bias: rng.chance(0.5),
            down_bias: false,
            up_bias: rng.chance(0.5),
            separate_u: false,
        };
        check::<bf16>(&mut rng, &c, backend);
    }
    // A workspace sized for the default target holds the main pass's 11 runs, not 17.
    let dims = DeltaLinearDims {
        split_target: 512,
        ..DeltaLinearDims::new(m, n, k, r)
    };
    let bufs = planner_bufs(Insertion::Parallel, m, n, k, r);
    let steps = delta_linear(&op, &dims, DType::BF16, &bufs).unwrap();
    let runs: Vec<i32> = steps.iter().map(|(_, p)| p.k_splits).collect();
    assert_eq!(
        runs,
        [32, 32, 11, 11],
        "target 512, the default's workspace"
    );
}

/// A workspace shorter than `workspace_len()` but holding t is accepted: the passes split
/// into as many runs as it has room for, or none, and the result is the same; one element
/// short of t is refused, naming the workspace and what it must hold. At decode (m = 3,
/// n = 200, k = 3000: a down pass of one tile over 24 k-tiles, a main pass of 7 tiles over
/// 25) and at m = 130 (large tile, 2 × 2 blocks: the frozen GEMM of a sequential delta
/// splits), both insertions.
fn a_short_workspace_splits_less(backend: &Backend) {
    use peft_kernels::plan::delta_linear::{delta_linear, DeltaLinearBufs};
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let mut rng = Rng::from_env();
    for (m, n, k, r) in [(3, 200, 3000, 16), (130, 200, 3000, 16)] {
        for insertion in [Insertion::Parallel, Insertion::Sequential] {
            let n = if insertion == Insertion::Sequential {
                k
            } else {
                n
            };
            let dims = DeltaLinearDims::new(m, n, k, r);
            let (t, full) = (dims.min_workspace_len(), dims.workspace_len());
            assert_eq!(t, m * r.next_multiple_of(8));
            let runs = |len: usize| -> Vec<i32> {
                let bufs = DeltaLinearBufs {
                    workspace: Buf { addr: 4096, len },
                    gate: Some(Buf { addr: 4096, len: m }),
                    ..planner_bufs(insertion, m, n, k, r)
                };
                let op = DeltaLinear::new(insertion, Activation::Relu, Composition::Gated);
                let steps = delta_linear(&op, &dims, DType::F16, &bufs).unwrap();
                steps.iter().map(|(_, p)| p.k_splits).collect()
            };
            let (at_full, at_half, at_t) = (runs(full), runs(t + (full - t) / 4), runs(t));
            let total = |v: &[i32]| v.iter().filter(|&&s| s > 1).sum::<i32>();
            assert!(
                total(&at_full) > total(&at_half),
                "{insertion:?} m {m}: {at_full:?} {at_half:?}"
            );
            assert!(
                at_t.iter().all(|&s| s == 1),
                "{insertion:?} m {m}: {at_t:?}"
            );
            let c = Case {
                op: DeltaLinear::new(insertion, rng.pick(&Activation::ALL), Composition::Gated),
                dims,
                bias: true,
                down_bias: rng.chance(0.5),
                up_bias: rng.chance(0.5),
                separate_u: false,
            };
            let inputs = Inputs::<f16>::new(&mut rng, &c);
            let expected = inputs.reference(&c);
            let layout = MatrixLayout::contiguous(m, n);
            for len in [t, t + (full - t) / 4] {
                let y = inputs.run_in(&c, backend, len).unwrap();
                let name = format!("{insertion:?} m {m} workspace {len} (seed {})", rng.seed());
                assert_close_matrix(&name, &y, layout, &expected, default_tolerance(DType::F16));
            }
            match inputs.run_in(&c, backend, t - 1) {
                Err(Error::InvalidArgument { arg, expected, .. }) => {
                    assert_eq!(arg, "workspace");
                    assert!(expected.contains("workspace_len()"), "{expected}");
                }
                other => panic!("a workspace one short of t: {other:?}"),
            }
        }
    }
}

/// A size for a random configuration: uniform in 1..=max, or next to a multiple of one of
/// the tiles (one below, on, one above), where a kernel's edge handling changes.
fn near_tiles(rng: &mut Rng, tiles: &[usize], max: usize) -> usize {
    if rng.chance(0.4) {
        return rng.range(1, max);
    }
    let tile = rng.pick(tiles);
    let multiple = tile * rng.range(1, (max / tile).max(1));
    (multiple + rng.range(0, 2)).saturating_sub(1).clamp(1, max)
}

/// A random configuration drawn over everything the fixed lists pin separately: sizes
/// around the tiles (16, 32, 64, 128 rows or columns; 32, 64, 128 deep) and past the split
/// thresholds (8 k-tiles), decode a third of the time, any split target, any rank, padded
/// row strides, a separate delta input, any method, any kernel the dtype has. The frozen
/// GEMM and the up-projection, m·n·(k + r), stay under ~6M multiply-adds (a separate input's
/// down pass, m·r·k_u, under ~54M) so a case takes the emulator well under a second.
fn random_configuration(rng: &mut Rng, tensor_cores: bool) -> Case {
    // Decode (m ≤ 16, its own tile) a third of the time.
    let m = match rng.chance(0.3) {
        true => rng.range(1, 16),
        false => near_tiles(rng, &[16, 64, 128], 300),
    };
    let k = near_tiles(rng, &[32, 64, 128, 1024], 2200);
    let r = if rng.chance(0.5) {
        rng.pick(&[1, 8, 16, 33, 64, 256])
    } else {
        rng.range(1, 256)
    };
    let insertion = rng.pick(&[Insertion::Parallel, Insertion::Sequential]);
    let budget = 6_000_000 / (m * (k + r));
    let n = match insertion {
        // A sequential delta's down pass is n deep: let n reach the split thresholds too.
        Insertion::Sequential => near_tiles(rng, &[32, 64, 128], budget.clamp(1, 1100)),
        Insertion::Parallel => near_tiles(rng, &[32, 64, 128], budget.clamp(1, 600)),
    };
    let pad = |rng: &mut Rng| {
        let any = rng.range(1, 9);
        rng.pick(&[0, 0, 8, any])
    };
    let mut dims = DeltaLinearDims::new(m, n, k, r);
    (dims.ld_x, dims.ld_y) = (k + pad(rng), n + pad(rng));
    let separate_u = insertion == Insertion::Parallel && rng.chance(0.3);
    dims.k_u = near_tiles(rng, &[32, 64], 700);
    dims.ld_u = dims.k_u + pad(rng);
    let mut kernels = vec![
        KernelVariant::Auto,
        KernelVariant::Auto,
        KernelVariant::Simt,
    ];
    if tensor_cores {
        kernels.push(KernelVariant::TensorCore);
    }
    if m * n * k < 200_000 {
        kernels.push(KernelVariant::Naive);
    }
    dims.kernel = rng.pick(&kernels);
    dims.split_target = rng.pick(&[DEFAULT_SPLIT_TARGET, DEFAULT_SPLIT_TARGET, 0, 16, 1024]);
    Case {
        separate_u,
        ..random_case(rng, insertion, dims)
    }
}

/// How many random configurations a test draws: 9 (a few seconds on the emulator) unless
/// `PEFT_RANDOM_CASES` asks for more.
fn random_cases() -> usize {
    common::random_cases(9)
}

/// Random configurations (see [`random_configuration`]), fresh every run, in turn over the
/// dtypes, [`random_cases`] of them.
fn random_configurations(backend: &Backend) {
    let mut rng = Rng::from_env();
    for i in 0..random_cases() {
        let c = random_configuration(&mut rng, i % 3 != 0);
        match i % 3 {
            0 => check::<f32>(&mut rng, &c, backend),
            1 => check::<f16>(&mut rng, &c, backend),
            _ => check::<bf16>(&mut rng, &c, backend),
        }
    }
}

/// The shape of a delta on a given h: (m, heads, head_dim, u_head_dim, r); a sequential
/// delta reads h, so its u_head_dim is head_dim.
type ApplyShape = (usize, usize, usize, usize, usize);

/// A random multi-head shape: up to 69 rows and 4 heads, small ranks.
fn random_apply_shape(rng: &mut Rng, insertion: Insertion) -> ApplyShape {
    let (dh, du) = (24, 16);
    let du = if insertion == Insertion::Sequential {
        dh
    } else {
        du
    };
    let (m, heads) = (rng.range(1, 70), rng.range(1, 5));
    (m, heads, dh, du, rng.pick(&[1, 8, 13]))
}

/// A delta on a given h by `delta_apply` against the reference's multi-head adapter.
fn multi_head_case<T: Element>(
    backend: &Backend,
    rng: &mut Rng,
    shape: ApplyShape,
    op: DeltaLinear,
    in_place: bool,
    tuning: (KernelVariant, usize),
) {
    multi_head_case_placed::<T>(backend, rng, shape, op, in_place, tuning, false)
}

/// [`multi_head_case`], with every buffer one element past a 16-byte boundary when
/// `misaligned`.
fn multi_head_case_placed<T: Element>(
    backend: &Backend,
    rng: &mut Rng,
    (m, heads, dh, du, r): ApplyShape,
    op: DeltaLinear,
    in_place: bool,
    (kernel, split_target): (KernelVariant, usize),
    misaligned: bool,
) {
    let DeltaLinear {
        insertion,
        activation,
        composition,
    } = op;
    let width = heads * dh;
    let h: Vec<T> = rng.uniform_vec(m * width);
    let u: Vec<T> = rng.uniform_vec(m * heads * du);
    let w_down: Vec<T> = scaled(rng, heads * r * du, du);
    let b_down: Vec<T> = rng.uniform_vec(heads * r);
    let w_up: Vec<T> = scaled(rng, heads * dh * r, r);
    let b_up: Vec<T> = rng.uniform_vec(width);
    let u_ref = if insertion == Insertion::Sequential {
        &h
    } else {
        &u
    };
    let expected = multi_head_adapter(
        &MultiHeadAdapter {
            heads,
            rank: r,
            activation,
            composition,
        },
        &MultiHeadAdapterTensors {
            h: MatRef::new(&h, m, width),
            u: MatRef::new(u_ref, m, heads * du),
            w_down: &w_down,
            b_down: Some(&b_down),
            w_up: &w_up,
            b_up: Some(&b_up),
        },
    )
    .expect("reference");
    let mut dims = DeltaApplyDims::new(m, heads, dh, du, r);
    (dims.kernel, dims.split_target) = (kernel, split_target);
    let y = if in_place {
        h.clone()
    } else {
        poisoned::<T>(m * width)
    };
    let place = |v: &[T]| Placed::new(v, misaligned);
    let [h, u, w_down, b_down, w_up, b_up] =
        [&h, &u, &w_down, &b_down, &w_up, &b_up].map(|v| place(v));
    let mut workspace = place(&poisoned::<T>(dims.workspace_len()));
    let mut y = place(&y);
    let args: HostDeltaApplyArgs<T> = DeltaApplyArgs {
        h: (!in_place).then_some(h.get()),
        u: (insertion == Insertion::Parallel).then_some(u.get()),
        w_down: w_down.get(),
        b_down: Some(b_down.get()),
        w_up: w_up.get(),
        b_up: Some(b_up.get()),
        gate: None,
        workspace: workspace.get_mut(),
        y: y.get_mut(),
    };
    host::delta_apply(backend, &op, &dims, args).unwrap();
    let y = y.get();
    let name = format!(
        "{} delta_apply {op:?} {dims:?} in_place={in_place} misaligned={misaligned} (seed {})",
        T::DTYPE,
        rng.seed()
    );
    assert_close_matrix(
        &name,
        y,
        MatrixLayout::contiguous(m, width),
        &expected,
        default_tolerance(T::DTYPE),
    );
}

/// The multi-head parallel adapter (one bottleneck per head slice), and a sequential
/// (Houlsby) delta on a given h, in place or not.
fn delta_apply_per_head(backend: &Backend) {
    let mut rng = Rng::from_env();
    for kernel in VARIANTS {
        for (insertion, in_place) in [
            (Insertion::Parallel, false),
            (Insertion::Parallel, true),
            (Insertion::Sequential, false),
            (Insertion::Sequential, true),
        ] {
            let mut op = || {
                let lora = Composition::Lora {
                    alpha: 6.0,
                    rslora: rng.chance(0.5),
                };
                let composition = rng.pick(&[Composition::Add, Composition::Scaled(2.5), lora]);
                DeltaLinear::new(insertion, rng.pick(&Activation::ALL), composition)
            };
            let (f32_op, f16_op, bf16_op) = (op(), op(), op());
            let tuning = (kernel, DEFAULT_SPLIT_TARGET);
            let shape = random_apply_shape(&mut rng, insertion);
            multi_head_case::<f32>(backend, &mut rng, shape, f32_op, in_place, tuning);
            let shape = random_apply_shape(&mut rng, insertion);
            multi_head_case::<f16>(backend, &mut rng, shape, f16_op, in_place, tuning);
            let shape = random_apply_shape(&mut rng, insertion);
            multi_head_case::<bf16>(backend, &mut rng, shape, bf16_op, in_place, tuning);
        }
    }
}

/// A single head's decode on a given h (LoRA beside the user's own frozen matmul) splits
/// its down pass's K as delta_linear does: the plan must take the split (three steps
/// instead of two) for each shape here; a multi-head delta never splits. The delta is
/// scaled up so that an error in t is not lost in h.
fn delta_apply_decode_split_over_k(backend: &Backend) {
    use peft_kernels::plan::delta_linear::{delta_apply, DeltaApplyBufs};
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let mut rng = Rng::from_env();
    // (m, head_dim, u_head_dim, r): 32 runs of one k-tile; 8 runs over a ragged K; 8 runs of
    // two k-tiles at the largest decode m.
    let shapes = [(1, 40, 4096, 16), (3, 24, 1000, 33), (16, 8, 2000, 5)];
    for (m, dh, du, r) in shapes {
        for (insertion, in_place) in [
            (Insertion::Parallel, rng.chance(0.5)),
            (Insertion::Sequential, rng.chance(0.5)),
        ] {
            // A sequential delta reads h: K of its down pass is the head's width.
            let (dh, du) = match insertion {
                Insertion::Sequential => (du, du),
                Insertion::Parallel => (dh, du),
            };
            let buf = |len| Buf { addr: 4096, len };
            // The plan's step count for `heads` heads, with the workspace the dims want or,
            // when `least`, the least they take (which splits nothing).
            let plan = |heads: usize, least: bool| {
                let dims = DeltaApplyDims::new(m, heads, dh, du, r);
                let workspace = match least {
                    true => dims.min_workspace_len(),
                    false => dims.workspace_len(),
                };
                let bufs = DeltaApplyBufs {
                    h: (!in_place).then_some(buf(m * heads * dh)),
                    u: (insertion == Insertion::Parallel).then_some(buf(m * heads * du)),
                    w_down: buf(heads * r * du),
                    b_down: None,
                    w_up: buf(heads * dh * r),
                    b_up: None,
                    gate: None,
                    workspace: buf(workspace),
                    y: buf(m * heads * dh),
                };
                let op = DeltaLinear::new(insertion, Activation::Identity, Composition::Add);
                delta_apply(&op, &dims, DType::BF16, &bufs).unwrap().len()
            };
            let shape = format!("{insertion:?} m {m} du {du} r {r}");
            assert_eq!(plan(1, false), 3, "{shape}: no split");
            assert_eq!(plan(1, true), 2, "{shape}: split in the least workspace");
            assert_eq!(plan(2, false), 2, "{shape}: two heads split");
            let op = DeltaLinear::new(
                insertion,
                rng.pick(&Activation::ALL),
                Composition::Scaled(-8.0),
            );
            let kernel = rng.pick(&[KernelVariant::Auto, KernelVariant::TensorCore]);
            let (shape, tuning) = ((m, 1, dh, du, r), (kernel, DEFAULT_SPLIT_TARGET));
            multi_head_case::<f16>(backend, &mut rng, shape, op, in_place, tuning);
            multi_head_case::<bf16>(backend, &mut rng, shape, op, in_place, tuning);
        }
    }
}

/// Random delta-on-h configurations, as [`random_configurations`] for `delta_linear`: one
/// head (whose passes may split) or several, head widths around the tiles, decode a third
/// of the time, in place or not, any method, kernel and split target; [`random_cases`] of
/// them.
fn delta_apply_random_configurations(backend: &Backend) {
    let mut rng = Rng::from_env();
    for i in 0..random_cases() {
        let insertion = rng.pick(&[Insertion::Parallel, Insertion::Sequential]);
        let m = match rng.chance(0.3) {
            true => rng.range(1, 16),
            false => near_tiles(&mut rng, &[16, 64, 128], 200),
        };
        let several = rng.range(2, 5);
        let heads = rng.pick(&[1, 1, several]);
        let du = near_tiles(&mut rng, &[32, 64, 128, 1024], 2200);
        let dh = match insertion {
            Insertion::Sequential => du,
            Insertion::Parallel => near_tiles(&mut rng, &[32, 64], 300),
        };
        let r = rng.range(1, 64);
        let shape = (m, heads, dh, du, r);
        let composition = rng.pick(&[Composition::Add, Composition::Scaled(-3.5)]);
        let op = DeltaLinear::new(insertion, rng.pick(&Activation::ALL), composition);
        let in_place = rng.chance(0.5);
        let mut kernels = vec![KernelVariant::Auto, KernelVariant::Simt];
        if i % 3 != 0 {
            kernels.push(KernelVariant::TensorCore);
        }
        let split_target = rng.pick(&[DEFAULT_SPLIT_TARGET, DEFAULT_SPLIT_TARGET, 0, 16, 1024]);
        let tuning = (rng.pick(&kernels), split_target);
        match i % 3 {
            0 => multi_head_case::<f32>(backend, &mut rng, shape, op, in_place, tuning),
            1 => multi_head_case::<f16>(backend, &mut rng, shape, op, in_place, tuning),
            _ => multi_head_case::<bf16>(backend, &mut rng, shape, op, in_place, tuning),
        }
    }
}

/// A gated delta on a given h, per head: y = (1 − λ)·h + λ·Δh with a per-row λ. The
/// reference's multi-head adapter composed by `Add` on h = 0 gives Δh.
fn gated_delta_apply_case<T: Element>(backend: &Backend, rng: &mut Rng, kernel: KernelVariant) {
    let (m, heads, dh, du, r) = (rng.range(1, 40), rng.range(1, 4), 16, 24, rng.pick(&[3, 8]));
    let width = heads * dh;
    let h: Vec<T> = rng.uniform_vec(m * width);
    let u: Vec<T> = rng.uniform_vec(m * heads * du);
    let w_down: Vec<T> = scaled(rng, heads * r * du, du);
    let w_up: Vec<T> = scaled(rng, heads * dh * r, r);
    let b_up: Vec<T> = rng.uniform_vec(width);
    let gate: Vec<T> = (0..m).map(|_| T::from_f64(rng.unit())).collect();
    let activation = rng.pick(&Activation::ALL);
    let zeros = vec![T::from_f64(0.0); m * width];
    let delta = multi_head_adapter(
        &MultiHeadAdapter {
            heads,
            rank: r,
            activation,
            composition: Composition::Add,
        },
        &MultiHeadAdapterTensors {
            h: MatRef::new(&zeros, m, width),
            u: MatRef::new(&u, m, heads * du),
            w_down: &w_down,
            b_down: None,
            w_up: &w_up,
            b_up: Some(&b_up),
        },
    )
    .expect("reference");
    let expected: Vec<f64> = (0..m * width)
        .map(|i| {
            let l = gate[i / width].to_f64();
            (1.0 - l) * h[i].to_f64() + l * delta[i]
        })
        .collect();
    let mut dims = DeltaApplyDims::new(m, heads, dh, du, r);
    dims.kernel = kernel;
    let mut workspace = poisoned::<T>(dims.workspace_len());
    let mut y = poisoned::<T>(m * width);
    let op = DeltaLinear::new(Insertion::Parallel, activation, Composition::Gated);
    let args = DeltaApplyArgs {
        h: Some(&h[..]),
        u: Some(&u[..]),
        w_down: &w_down[..],
        b_down: None,
        w_up: &w_up[..],
        b_up: Some(&b_up[..]),
        gate: Some(&gate[..]),
        workspace: &mut workspace[..],
        y: &mut y[..],
    };
    host::delta_apply(backend, &op, &dims, args).unwrap();
    let name = format!(
        "{} gated delta_apply {kernel:?} (seed {})",
        T::DTYPE,
        rng.seed()
    );
    let layout = MatrixLayout::contiguous(m, width);
    assert_close_matrix(&name, &y, layout, &expected, default_tolerance(T::DTYPE));
}

fn gated_delta_apply(backend: &Backend) {
    let mut rng = Rng::from_env();
    for kernel in VARIANTS {
        gated_delta_apply_case::<f32>(backend, &mut rng, kernel);
        gated_delta_apply_case::<f16>(backend, &mut rng, kernel);
        gated_delta_apply_case::<bf16>(backend, &mut rng, kernel);
    }
}

/// `delta_apply`'s arguments are checked like `delta_linear`'s, naming the argument.
fn delta_apply_bad_arguments(backend: &Backend) {
    let (m, heads, dh, du, r) = (4, 2, 8, 8, 4);
    let dims = DeltaApplyDims::new(m, heads, dh, du, r);
    let u = vec![0.5f32; m * heads * du];
    let w_down = vec![0.1f32; heads * r * du];
    let w_up = vec![0.1f32; heads * dh * r];
    let gate = vec![0.5f32; m];
    let mut workspace = vec![0.0f32; dims.workspace_len()];
    let mut y = vec![0.0f32; m * heads * dh];
    let mut call = |op: DeltaLinear,
                    dims: &DeltaApplyDims,
                    u: Option<&[f32]>,
                    w_down: &[f32],
                    gate: Option<&[f32]>,
                    ws_len: usize| {
        let args = DeltaApplyArgs {
            h: None,
            u,
            w_down,
            b_down: None,
            w_up: &w_up[..],
            b_up: None,
            gate,
            workspace: &mut workspace[..ws_len],
            y: &mut y[..],
        };
        match host::delta_apply(backend, &op, dims, args) {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected an invalid-argument error, got {other:?}"),
        }
    };
    let pa = DeltaLinear::parallel_adapter(Activation::Relu, 1.0);
    let full = dims.workspace_len();
    assert_eq!(call(pa, &dims, None, &w_down, None, full), "u");
    let seq = DeltaLinear::houlsby(Activation::Relu);
    assert_eq!(call(seq, &dims, Some(&u), &w_down, None, full), "u");
    assert_eq!(
        call(pa, &dims, Some(&u), &w_down[1..], None, full),
        "w_down"
    );
    assert_eq!(
        call(pa, &dims, Some(&u), &w_down, Some(&gate), full),
        "gate"
    );
    assert_eq!(
        call(pa, &dims, Some(&u), &w_down, None, full - 1),
        "workspace"
    );
    let no_heads = DeltaApplyDims { heads: 0, ..dims };
    assert_eq!(
        call(pa, &no_heads, Some(&u), &w_down, None, full),
        "dims.heads"
    );
    assert!(
        y.iter().all(|&v| v == 0.0),
        "nothing may be written on a refused call"
    );
}

fn merge_case<T: Element>(backend: &Backend, rng: &mut Rng, n: usize, k: usize, r: usize) {
    merge_case_placed::<T>(backend, rng, (n, k, r), false)
}

/// [`merge_case`], with every buffer one element past a 16-byte boundary when `misaligned`.
fn merge_case_placed<T: Element>(
    backend: &Backend,
    rng: &mut Rng,
    (n, k, r): (usize, usize, usize),
    misaligned: bool,
) {
    let w: Vec<T> = rng.uniform_vec(n * k);
    let a: Vec<T> = scaled(rng, r * k, k);
    let b: Vec<T> = scaled(rng, n * r, r);
    let s = rng.uniform(0.5, 4.0) as f32;
    let expected = reference::lora_merge(
        MatRef::new(&w, n, k),
        MatRef::new(&a, r, k),
        MatRef::new(&b, n, r),
        s,
    )
    .expect("reference");
    let place = |v: &[T]| Placed::new(v, misaligned);
    let (a_placed, b_placed) = (place(&a), place(&b));
    let mut merged_placed = place(&w);
    let dims = LoraMergeDims { n, k, r };
    let args: HostLoraMergeArgs<T> = LoraMergeArgs {
        w: merged_placed.get_mut(),
        w_down: a_placed.get(),
        w_up: b_placed.get(),
    };
    host::lora_merge(backend, &dims, s, args).unwrap();
    let merged = merged_placed.get().to_vec();
    let tol = default_tolerance(T::DTYPE);
    let name = format!(
        "{} merge {n}×{k} r={r} misaligned={misaligned} (seed {})",
        T::DTYPE,
        rng.seed()
    );
    assert_close_matrix(
        &name,
        &merged,
        MatrixLayout::contiguous(n, k),
        &expected,
        tol,
    );
    // Unmerge: back to W, up to the rounding of the merged weight.
    let back_ref = reference::lora_merge(
        MatRef::new(&merged, n, k),
        MatRef::new(&a, r, k),
        MatRef::new(&b, n, r),
        -s,
    )
    .expect("reference");
    let args: HostLoraMergeArgs<T> = LoraMergeArgs {
        w: merged_placed.get_mut(),
        w_down: a_placed.get(),
        w_up: b_placed.get(),
    };
    host::lora_merge(backend, &dims, -s, args).unwrap();
    assert_close_matrix(
        &format!("un{name}"),
        merged_placed.get(),
        MatrixLayout::contiguous(n, k),
        &back_ref,
        tol,
    );
}

fn lora_merge_and_unmerge(backend: &Backend) {
    let mut rng = Rng::from_env();
    // The fixed shapes, and one drawn around the 64 × 64 tiles and the rank chunks.
    let drawn = (
        near_tiles(&mut rng, &[64], 300),
        near_tiles(&mut rng, &[64], 300),
        near_tiles(&mut rng, &[16, 32], 300),
    );
    for (n, k, r) in [(1, 1, 1), (17, 129, 8), (100, 65, 33), (64, 64, 256), drawn] {
        merge_case::<f32>(backend, &mut rng, n, k, r);
        merge_case::<f16>(backend, &mut rng, n, k, r);
        merge_case::<bf16>(backend, &mut rng, n, k, r);
    }
}

/// [`check`] with every buffer one element past a 16-byte boundary.
fn check_misaligned<T: Element>(rng: &mut Rng, c: &Case, backend: &Backend) {
    let inputs = Inputs::<T>::new(rng, c);
    let y = inputs
        .run_misaligned(c, backend)
        .unwrap_or_else(|e| panic!("{c:?} ({}, seed {}): {e}", T::DTYPE, rng.seed()));
    let d = c.dims;
    let layout = MatrixLayout {
        rows: d.m,
        cols: d.n,
        ld: d.ld_y,
    };
    let name = format!("misaligned {} {:?} (seed {})", T::DTYPE, c, rng.seed());
    assert_close_matrix(
        &name,
        &y,
        layout,
        &inputs.reference(c),
        default_tolerance(T::DTYPE),
    );
    assert_padding_untouched(&name, &y, &poisoned::<T>(y.len()), layout);
}

/// Host slices of any alignment are accepted by every operation in every dtype: every buffer
/// one element past a 16-byte boundary (as a slice into a `Vec<bf16>` may start), against
/// the reference. f16/bf16 operands that are not 16-byte aligned take the SIMT kernel under
/// `Auto` and element-by-element loads under `TensorCore`; a misaligned workspace holds no
/// f32 partial sums, so nothing splits.
fn misaligned_buffers(backend: &Backend) {
    let mut rng = Rng::from_env();
    for insertion in [Insertion::Parallel, Insertion::Sequential] {
        for kernel in [
            KernelVariant::Auto,
            KernelVariant::Simt,
            KernelVariant::Naive,
            KernelVariant::TensorCore,
        ] {
            let mut dims = DeltaLinearDims::new(rng.range(1, 40), 24, 40, rng.pick(&[1, 8, 13]));
            dims.kernel = kernel;
            let mut c = random_case(&mut rng, insertion, dims);
            if insertion == Insertion::Parallel && rng.chance(0.5) {
                (c.dims.k_u, c.dims.ld_u, c.separate_u) = (24, 24, true);
            }
            if kernel != KernelVariant::TensorCore {
                check_misaligned::<f32>(&mut rng, &c, backend);
            }
            check_misaligned::<f16>(&mut rng, &c, backend);
            check_misaligned::<bf16>(&mut rng, &c, backend);
        }
    }
    // A decode shape whose aligned call splits its passes (split_target_sets_the_runs).
    let c = Case {
        op: DeltaLinear::lora(16.0),
        dims: DeltaLinearDims::new(2, 256, 2048, 16),
        bias: true,
        down_bias: false,
        up_bias: false,
        separate_u: false,
    };
    check_misaligned::<bf16>(&mut rng, &c, backend);

    for (insertion, in_place) in [
        (Insertion::Parallel, false),
        (Insertion::Parallel, true),
        (Insertion::Sequential, false),
    ] {
        let op = DeltaLinear::new(insertion, Activation::Relu, Composition::Scaled(1.5));
        for kernel in [KernelVariant::Auto, KernelVariant::TensorCore] {
            let tuning = (kernel, DEFAULT_SPLIT_TARGET);
            if kernel == KernelVariant::Auto {
                let shape = random_apply_shape(&mut rng, insertion);
                multi_head_case_placed::<f32>(backend, &mut rng, shape, op, in_place, tuning, true);
            }
            let shape = random_apply_shape(&mut rng, insertion);
            multi_head_case_placed::<f16>(backend, &mut rng, shape, op, in_place, tuning, true);
            let shape = random_apply_shape(&mut rng, insertion);
            multi_head_case_placed::<bf16>(backend, &mut rng, shape, op, in_place, tuning, true);
        }
    }

    for shape in [(17, 129, 8), (64, 64, 13)] {
        merge_case_placed::<f32>(backend, &mut rng, shape, true);
        merge_case_placed::<f16>(backend, &mut rng, shape, true);
        merge_case_placed::<bf16>(backend, &mut rng, shape, true);
    }
}

/// An empty batch (m = 0) is `Ok` and launches nothing for delta_linear and delta_apply,
/// checked like any call; a merge has no batch. Outputs longer than needed keep their
/// poison.
fn empty_batches(backend: &Backend) {
    fn each<T: Element>(backend: &Backend) {
        let (n, k, r) = (10, 12, 4);
        let (x, w) = (vec![T::from_f64(0.5); 64], vec![T::from_f64(0.5); n * k]);
        let (w_down, w_up) = (vec![T::from_f64(0.5); r * k], vec![T::from_f64(0.5); n * r]);
        let dims = DeltaLinearDims::new(0, n, k, r);
        let (mut workspace, mut y) = (poisoned::<T>(5), poisoned::<T>(5));
        for op in [
            DeltaLinear::lora(8.0),
            DeltaLinear::houlsby(Activation::Relu),
        ] {
            let w_down = match op.insertion {
                Insertion::Parallel => &w_down[..],
                Insertion::Sequential => &w_down[..r * n],
            };
            let args: HostDeltaLinearArgs<T> = DeltaLinearArgs {
                x: &x,
                w: &w,
                bias: None,
                u: None,
                w_down,
                b_down: None,
                w_up: &w_up,
                b_up: None,
                gate: None,
                workspace: &mut workspace,
                y: &mut y,
            };
            host::delta_linear(backend, &op, &dims, args)
                .unwrap_or_else(|e| panic!("{} delta_linear m = 0: {e}", T::DTYPE));
            // Checked all the same: W_down of the wrong shape is refused.
            let args: HostDeltaLinearArgs<T> = DeltaLinearArgs {
                x: &x,
                w: &w,
                bias: None,
                u: None,
                w_down: &w_down[1..],
                b_down: None,
                w_up: &w_up,
                b_up: None,
                gate: None,
                workspace: &mut workspace,
                y: &mut y,
            };
            match host::delta_linear(backend, &op, &dims, args) {
                Err(Error::InvalidArgument { arg: "w_down", .. }) => {}
                other => panic!("{} delta_linear m = 0, short w_down: {other:?}", T::DTYPE),
            }
        }
        let dims = DeltaApplyDims::new(0, 2, 5, 6, r);
        let (w_down, w_up) = (
            vec![T::from_f64(0.5); 2 * r * 6],
            vec![T::from_f64(0.5); 2 * 5 * r],
        );
        let op = DeltaLinear::parallel_adapter(Activation::Relu, 2.0);
        let args: HostDeltaApplyArgs<T> = DeltaApplyArgs {
            h: Some(&x),
            u: Some(&x),
            w_down: &w_down,
            b_down: None,
            w_up: &w_up,
            b_up: None,
            gate: None,
            workspace: &mut workspace,
            y: &mut y,
        };
        host::delta_apply(backend, &op, &dims, args)
            .unwrap_or_else(|e| panic!("{} delta_apply m = 0: {e}", T::DTYPE));
        let untouched = |v: &[T]| v.iter().all(|v| v.to_f64().is_nan());
        assert!(
            untouched(&y) && untouched(&workspace),
            "{}: written",
            T::DTYPE
        );
    }
    each::<f32>(backend);
    each::<f16>(backend);
    each::<bf16>(backend);
}

/// Bad arguments are errors naming the argument, and nothing is written.
fn bad_arguments_name_the_argument(backend: &Backend) {
    let mut rng = Rng::from_env();
    let base = Case {
        op: DeltaLinear::lora(8.0),
        dims: DeltaLinearDims::new(6, 10, 12, 4),
        bias: true,
        down_bias: false,
        up_bias: false,
        separate_u: false,
    };
    let inputs = Inputs::<f32>::new(&mut rng, &base);
    let arg_of = |r: peft_kernels::Result<Vec<f32>>| match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected an invalid-argument error, got {other:?}"),
    };
    let with = |f: &dyn Fn(&mut Case)| {
        let mut c = base;
        f(&mut c);
        c
    };
    assert_eq!(
        arg_of(inputs.run(&with(&|c| c.dims.r = 0), backend)),
        "dims.r"
    );
    assert_eq!(
        arg_of(inputs.run(&with(&|c| c.dims.n = 0), backend)),
        "dims.n"
    );
    assert_eq!(arg_of(inputs.run(&with(&|c| c.dims.m = 7), backend)), "x");
    assert_eq!(arg_of(inputs.run(&with(&|c| c.dims.k = 13), backend)), "x");
    assert_eq!(
        arg_of(inputs.run(&with(&|c| c.dims.ld_x = 11), backend)),
        "x"
    );
    assert_eq!(
        arg_of(inputs.run(&with(&|c| c.dims.r = 5), backend)),
        "w_down"
    );
    assert_eq!(
        arg_of(inputs.run(&with(&|c| c.op.composition = Composition::Gated), backend)),
        "gate"
    );
    assert_eq!(
        arg_of(inputs.run(
            &with(&|c| c.op.composition = Composition::Scaled(f32::NAN)),
            backend
        )),
        "composition"
    );
    // A workspace one element short of the least; then a dimension past what the kernels
    // index.
    let d = base.dims;
    let mut y = vec![0.0f32; d.m * d.n];
    let mut ws = vec![0.0f32; d.min_workspace_len() - 1];
    let mut call = |dims: &DeltaLinearDims, ws: &mut [f32]| {
        host::delta_linear(
            backend,
            &base.op,
            dims,
            DeltaLinearArgs {
                x: &inputs.x,
                w: &inputs.w,
                bias: inputs.bias.as_deref(),
                u: None,
                w_down: &inputs.w_down,
                b_down: None,
                w_up: &inputs.w_up,
                b_up: None,
                gate: None,
                workspace: ws,
                y: &mut y,
            },
        )
        .unwrap_err()
    };
    let err = call(&d, &mut ws);
    let message = err.to_string();
    assert!(
        message.starts_with("delta_linear: invalid argument `workspace`"),
        "{message}"
    );
    let huge = DeltaLinearDims { m: 1 << 31, ..d };
    assert!(call(&huge, &mut ws).to_string().contains("`dims.m`"));
    assert!(
        y.iter().all(|&v| v == 0.0),
        "nothing may be written on a refused call"
    );
}

/// A tensor without a stride (weights, biases, the gate) must have its exact shape: one
/// element more is a mistaken shape, not room to spare, and is refused naming it, e.g. a
/// parallel adapter's W_down [r, k] given to a sequential one, whose W_down is [r, n].
#[test]
fn unstrided_tensors_have_their_exact_shape() {
    use peft_kernels::plan::delta_linear::{
        delta_apply, delta_linear, lora_merge, DeltaApplyBufs, DeltaLinearBufs, LoraMergeBufs,
    };
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let (m, n, k, r) = (3, 10, 12, 4);
    let buf = |len| Buf { addr: 4096, len };
    let op = DeltaLinear::new(Insertion::Parallel, Activation::Relu, Composition::Gated);
    let dims = DeltaLinearDims::new(m, n, k, r);
    let exact = DeltaLinearBufs {
        bias: Some(buf(n)),
        b_down: Some(buf(r)),
        b_up: Some(buf(n)),
        gate: Some(buf(m)),
        ..planner_bufs(Insertion::Parallel, m, n, k, r)
    };
    assert!(delta_linear(&op, &dims, DType::F16, &exact).is_ok());
    let longer = |b: Buf| Buf {
        len: b.len + 1,
        ..b
    };
    let some_longer = |b: Option<Buf>| b.map(longer);
    for (arg, bufs) in [
        (
            "w",
            DeltaLinearBufs {
                w: longer(exact.w),
                ..exact
            },
        ),
        (
            "bias",
            DeltaLinearBufs {
                bias: some_longer(exact.bias),
                ..exact
            },
        ),
        (
            "w_down",
            DeltaLinearBufs {
                w_down: longer(exact.w_down),
                ..exact
            },
        ),
        (
            "b_down",
            DeltaLinearBufs {
                b_down: some_longer(exact.b_down),
                ..exact
            },
        ),
        (
            "w_up",
            DeltaLinearBufs {
                w_up: longer(exact.w_up),
                ..exact
            },
        ),
        (
            "b_up",
            DeltaLinearBufs {
                b_up: some_longer(exact.b_up),
                ..exact
            },
        ),
        (
            "gate",
            DeltaLinearBufs {
                gate: some_longer(exact.gate),
                ..exact
            },
        ),
    ] {
        match delta_linear(&op, &dims, DType::F16, &bufs) {
            Err(Error::InvalidArgument {
                arg: got, expected, ..
            }) => {
                assert_eq!(got, arg);
                assert!(expected.contains("exactly"), "{arg}: {expected}");
            }
            other => panic!("{arg} one element long: {other:?}"),
        }
    }
    // A sequential adapter given the parallel shape of W_down.
    let houlsby = DeltaLinear::houlsby(Activation::Relu);
    let parallel_shaped = planner_bufs(Insertion::Parallel, m, n, k, r);
    match delta_linear(&houlsby, &dims, DType::F16, &parallel_shaped) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "w_down"),
        other => panic!("a sequential W_down of the parallel shape: {other:?}"),
    }
    // delta_apply's per-head weights and the merge's factors alike.
    let apply = DeltaApplyDims::new(m, 2, 8, 8, r);
    let exact = apply_planner_bufs(m, 2, (8, 8), r);
    let apply_bufs = DeltaApplyBufs {
        w_down: longer(exact.w_down),
        ..exact
    };
    let plain = DeltaLinear::new(Insertion::Parallel, Activation::Relu, Composition::Add);
    match delta_apply(&plain, &apply, DType::F16, &apply_bufs) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "w_down"),
        other => panic!("delta_apply, w_down one element long: {other:?}"),
    }
    let merge = LoraMergeBufs {
        w: buf(n * k),
        w_down: buf(r * k),
        w_up: buf(n * r + 1),
    };
    let merge_dims = LoraMergeDims { n, k, r };
    match lora_merge(DType::F16, &merge_dims, 1.0, &merge) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "w_up"),
        other => panic!("lora_merge, w_up one element long: {other:?}"),
    }
    // (And the merge's scale must be finite.)
    let merge = LoraMergeBufs {
        w_up: buf(n * r),
        ..merge
    };
    match lora_merge(DType::F16, &merge_dims, f32::NAN, &merge) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "scale"),
        other => panic!("lora_merge, a NaN scale: {other:?}"),
    }
}

/// The planner alone (no memory is touched): sizes whose element counts or tile coordinates
/// overflow are refused, naming the argument, instead of passing as small matrices.
#[test]
fn the_planner_refuses_overflowing_sizes() {
    use peft_kernels::plan::delta_linear::{delta_linear, DeltaLinearBufs};
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let (m, n, k, r) = (3, 10, 12, 4);
    let bufs = planner_bufs(Insertion::Parallel, m, n, k, r);
    let op = DeltaLinear::lora(8.0);
    let dims = DeltaLinearDims::new(m, n, k, r);
    fn refused(op: &DeltaLinear, dims: &DeltaLinearDims, bufs: &DeltaLinearBufs) -> &'static str {
        match delta_linear(op, dims, DType::F16, bufs) {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected an invalid-argument error, got {other:?}"),
        }
    }
    assert!(delta_linear(&op, &dims, DType::F16, &bufs).is_ok());
    // The workspace size saturates instead of wrapping: t's rows padded to 8 elements, t's
    // elements, t and the main pass's partial sums after it.
    let ws_len = |m, n, r| DeltaLinearDims::new(m, n, 1, r).workspace_len();
    assert_eq!(ws_len(1, 1, usize::MAX - 3), usize::MAX);
    assert_eq!(ws_len(1 << 40, 1, 1 << 30), usize::MAX);
    assert_eq!(ws_len(1, 1, usize::MAX - 7), usize::MAX);
    // A layout's length and delta_apply's widths saturate instead of wrapping (or panicking
    // in a debug build).
    let layout = MatrixLayout {
        rows: 2,
        cols: 1,
        ld: usize::MAX,
    };
    assert_eq!(layout.min_len(), usize::MAX);
    assert_eq!(DeltaApplyDims::new(1, usize::MAX, 2, 3, 1).ld_u, usize::MAX);
    // (m − 1)·ld wraps to 0 for ld = 2^63, m = 3: the kernels would read and write row 1
    // 2^63 elements away.
    let huge_ld = 1usize << (usize::BITS - 1);
    let (wide_x, wide_y) = (
        DeltaLinearDims {
            ld_x: huge_ld,
            ..dims
        },
        DeltaLinearDims {
            ld_y: huge_ld,
            ..dims
        },
    );
    assert_eq!(refused(&op, &wide_x, &bufs), "x");
    assert_eq!(refused(&op, &wide_y, &bufs), "y");
    // The last column tile would end past i32::MAX, where the kernels' int coordinates wrap.
    let wide = DeltaLinearDims {
        n: i32::MAX as usize - 1,
        ld_y: i32::MAX as usize - 1,
        ..dims
    };
    let all = Buf {
        addr: 4096,
        len: usize::MAX,
    };
    let wide_bufs = DeltaLinearBufs {
        w: Buf {
            len: wide.n * wide.k,
            ..all
        },
        w_up: Buf {
            len: wide.n * r,
            ..all
        },
        y: all,
        ..bufs
    };
    assert_eq!(refused(&op, &wide, &wide_bufs), "dims.n");
    // Reduction lengths whose tile count wraps in the kernels' ints (ceil_div(k, 128) at
    // k = 2^31 − 1): refused, not run as no tiles at all.
    let long = |k, r| DeltaLinearDims {
        k_u: k,
        ld_x: k,
        ld_u: k,
        ..DeltaLinearDims::new(m, n, k, r)
    };
    // Exact weights (they have no stride), everything else as long as can be.
    let long_bufs = |d: &DeltaLinearDims| DeltaLinearBufs {
        x: all,
        w: Buf {
            len: d.n * d.k,
            ..all
        },
        w_down: Buf {
            len: d.r * d.k,
            ..all
        },
        w_up: Buf {
            len: d.n * d.r,
            ..all
        },
        workspace: all,
        ..bufs
    };
    let (too_long, too_wide, longest) = (
        long(i32::MAX as usize, r),
        long(k, (1 << 30) + 1),
        long(1 << 30, r),
    );
    assert_eq!(refused(&op, &too_long, &long_bufs(&too_long)), "dims.k");
    assert_eq!(refused(&op, &too_wide, &long_bufs(&too_wide)), "dims.r");
    assert!(delta_linear(&op, &longest, DType::F16, &long_bufs(&longest)).is_ok());
    // More rows than grid.y has tiles for: the error names dims.m, not a grid dimension.
    let tall = DeltaLinearDims {
        m: 65_535 * 16 + 1,
        kernel: KernelVariant::Naive,
        ..dims
    };
    let tall_bufs = DeltaLinearBufs {
        x: all,
        workspace: all,
        y: all,
        ..bufs
    };
    assert_eq!(refused(&op, &tall, &tall_bufs), "dims.m");
    // The scale is checked even when there are no rows to run.
    let nan = DeltaLinear::new(
        Insertion::Parallel,
        Activation::Identity,
        Composition::Scaled(f32::NAN),
    );
    let empty = DeltaLinearDims { m: 0, ..dims };
    assert_eq!(refused(&nan, &empty, &bufs), "composition");
}

/// Whatever the split target, a pass of more rows than a grid has in y is not split (the
/// reduction's grid has a row per block): 70000 rows plan and run their passes whole, at a
/// target that would split them (a regression: targets from 1024 up refused these dims).
#[test]
fn many_rows_never_split() {
    use peft_kernels::plan::delta_linear::{delta_linear, DeltaLinearBufs};
    use peft_kernels::plan::Buf;
    use peft_kernels::DType;

    let (m, n, k, r) = (70_000, 64, 1024, 128);
    for split_target in [DEFAULT_SPLIT_TARGET, 1024, usize::MAX] {
        for insertion in [Insertion::Parallel, Insertion::Sequential] {
            let dims = DeltaLinearDims {
                split_target,
                ..DeltaLinearDims::new(m, n, k, r)
            };
            let bufs = DeltaLinearBufs {
                workspace: Buf {
                    addr: 4096,
                    len: dims.workspace_len(),
                },
                ..planner_bufs(insertion, m, n, k, r)
            };
            let op = DeltaLinear::new(insertion, Activation::Relu, Composition::Add);
            let steps = delta_linear(&op, &dims, DType::BF16, &bufs)
                .unwrap_or_else(|e| panic!("split target {split_target}, {insertion:?}: {e}"));
            assert!(
                steps.iter().all(|(_, p)| p.k_splits == 1),
                "split target {split_target}, {insertion:?}: a pass splits"
            );
        }
    }
}

#[cfg(feature = "emulator")]
/// Only an up-projection pass, right after the down pass that writes its t, and the reduction
/// of a split pass may overlap the launch before them (kernels/delta_linear.cu waits for t, or
/// the partial sums, before reading them); the frozen pass and the down pass never do: they
/// read what the caller's earlier work wrote.
#[test]
fn only_up_projections_and_reductions_overlap() {
    use peft_kernels::plan::delta_linear::{delta_apply, delta_linear};
    use peft_kernels::DType;

    let overlaps = |steps: Vec<(peft_kernels::plan::Launch, _)>| -> Vec<bool> {
        steps.iter().map(|(l, _)| l.overlap_previous).collect()
    };
    let (m, n, k, r) = (5, 24, 40, 4);
    let dims = DeltaLinearDims::new(m, n, k, r);
    for kernel in [
        KernelVariant::Auto,
        KernelVariant::Naive,
        KernelVariant::Simt,
    ] {
        let dims = DeltaLinearDims { kernel, ..dims };
        for (insertion, expected) in [
            (Insertion::Parallel, vec![false, true]),
            (Insertion::Sequential, vec![false, false, true]),
        ] {
            let op = DeltaLinear::new(insertion, Activation::Relu, Composition::Add);
            let bufs = planner_bufs(insertion, m, n, k, r);
            let steps = delta_linear(&op, &dims, DType::BF16, &bufs).unwrap();
            assert_eq!(overlaps(steps), expected, "{insertion:?} {kernel:?}");
        }
    }
    // A split down pass (decode, K of 32 k-tiles): its reduction overlaps the split pass and
    // the up-projection overlaps the reduction.
    let k = 4096;
    // The parallel main pass (one column tile) splits too: its reduction overlaps it.
    for (insertion, n, expected) in [
        (Insertion::Parallel, n, vec![false, true, true, true]),
        (Insertion::Sequential, k, vec![false, false, true, true]),
    ] {
        let op = DeltaLinear::new(insertion, Activation::Relu, Composition::Add);
        let dims = DeltaLinearDims::new(m, n, k, r);
        let split_bufs = planner_bufs(insertion, m, n, k, r);
        let steps = delta_linear(&op, &dims, DType::BF16, &split_bufs).unwrap();
        assert_eq!(overlaps(steps), expected, "split {insertion:?}");
    }
    let dims = DeltaApplyDims::new(m, 3, 8, 8, r);
    let bufs = apply_planner_bufs(m, 3, (8, 8), r);
    let op = DeltaLinear::new(Insertion::Parallel, Activation::Relu, Composition::Add);
    let steps = delta_apply(&op, &dims, DType::BF16, &bufs).unwrap();
    assert_eq!(overlaps(steps), [false, true]);
}

#[test]
fn params_match_the_kernels_structs() {
    unsafe extern "C" {
        fn pk_sizeof_FusedLinearParams() -> usize;
        fn pk_sizeof_LoraMergeParams() -> usize;
    }
    use peft_kernels::plan::delta_linear::{FusedLinearParams, LoraMergeParams};
    // SAFETY: plain functions returning a constant.
    unsafe {
        assert_eq!(
            pk_sizeof_FusedLinearParams(),
            std::mem::size_of::<FusedLinearParams>()
        );
        assert_eq!(
            pk_sizeof_LoraMergeParams(),
            std::mem::size_of::<LoraMergeParams>()
        );
    }
}

on_every_backend!(
    every_combination_every_dtype_every_kernel,
    awkward_shapes,
    strides_and_separate_input,
    tensor_cores_on_unaligned_operands,
    passes_split_over_k,
    split_target_sets_the_runs,
    a_short_workspace_splits_less,
    random_configurations,
    wgmma_kernel,
    delta_apply_per_head,
    delta_apply_decode_split_over_k,
    delta_apply_random_configurations,
    gated_delta_apply,
    delta_apply_bad_arguments,
    lora_merge_and_unmerge,
    bad_arguments_name_the_argument,
    misaligned_buffers,
    empty_batches,
);

/// The public GPU API on device buffers (cudarc slices, `&x` coercing to `DeviceRead`), not
/// the host path's copies: a parallel adapter with a separate input, then a merge.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_api_on_device_buffers() {
    let backend = Backend::cuda(0).expect("GPU tests need a CUDA device");
    let Backend::Cuda(stream) = &backend else {
        unreachable!("Backend::cuda gives a CUDA backend")
    };
    let mut rng = Rng::from_env();
    let mut dims = DeltaLinearDims::new(37, 72, 64, 16);
    (dims.k_u, dims.ld_u) = (40, 40);
    let c = Case {
        op: DeltaLinear::parallel_adapter(Activation::GeluTanh, 4.0),
        dims,
        bias: true,
        down_bias: true,
        up_bias: true,
        separate_u: true,
    };
    let inputs = Inputs::<bf16>::new(&mut rng, &c);
    let up = |v: &[bf16]| stream.clone_htod(v).unwrap();
    let opt = |v: &Option<Vec<bf16>>| v.as_deref().map(up);
    let (x, w, bias, u) = (
        up(&inputs.x),
        up(&inputs.w),
        opt(&inputs.bias),
        opt(&inputs.u),
    );
    let (w_down, b_down) = (up(&inputs.w_down), opt(&inputs.b_down));
    let (w_up, b_up) = (up(&inputs.w_up), opt(&inputs.b_up));
    let mut workspace = up(&poisoned::<bf16>(dims.workspace_len()));
    let mut y = up(&poisoned::<bf16>(dims.m * dims.n));
    peft_kernels::cuda::delta_linear(
        stream,
        &c.op,
        &dims,
        DeltaLinearArgs {
            x: &x,
            w: &w,
            bias: bias.as_ref().map(|b| b as _),
            u: u.as_ref().map(|b| b as _),
            w_down: &w_down,
            b_down: b_down.as_ref().map(|b| b as _),
            w_up: &w_up,
            b_up: b_up.as_ref().map(|b| b as _),
            gate: None,
            workspace: &mut workspace,
            y: &mut y,
        },
    )
    .unwrap();
    let got = stream.clone_dtoh(&y).unwrap();
    let name = format!("cuda::delta_linear (seed {})", rng.seed());
    let layout = MatrixLayout::contiguous(dims.m, dims.n);
    assert_close_matrix(
        &name,
        &got,
        layout,
        &inputs.reference(&c),
        default_tolerance(peft_kernels::DType::BF16),
    );

    // Merge LoRA-style weights into W on the device and compare with the reference merge.
    let (n, k, r) = (dims.n, dims.k, 8);
    let a: Vec<bf16> = scaled(&mut rng, r * k, k);
    let b: Vec<bf16> = scaled(&mut rng, n * r, r);
    let (a_dev, b_dev) = (up(&a), up(&b));
    let mut w_dev = up(&inputs.w);
    let args = LoraMergeArgs {
        w: &mut w_dev as _,
        w_down: &a_dev as _,
        w_up: &b_dev as _,
    };
    peft_kernels::cuda::lora_merge(stream, &LoraMergeDims { n, k, r }, 2.0, args).unwrap();
    let merged = stream.clone_dtoh(&w_dev).unwrap();
    let expected = reference::lora_merge(
        MatRef::new(&inputs.w, n, k),
        MatRef::new(&a, r, k),
        MatRef::new(&b, n, r),
        2.0,
    )
    .unwrap();
    let layout = MatrixLayout::contiguous(n, k);
    assert_close_matrix(
        "cuda::lora_merge",
        &merged,
        layout,
        &expected,
        default_tolerance(peft_kernels::DType::BF16),
    );
}
