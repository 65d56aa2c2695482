//! DoRA (kernels/dora.cu, delta_linear.cu's column scale) against its f64 reference
//! (src/reference/dora.rs): the row norms, the fused forward on every kernel variant, the
//! training forward and the backward (the magnitude's, the adapter's and x's gradients, the
//! reference itself checked against finite differences in tests/reference_backward.rs),
//! merge and unmerge; every dtype, awkward shapes, outputs poisoned with NaN.

#[macro_use]
mod common;

use common::{poisoned, runs_wgmma, Rng};
use half::{bf16, f16};
use peft_kernels::delta_linear::{
    DeltaLinear, DeltaLinearArgs, DeltaLinearBackwardArgs, DeltaLinearDims, DeltaLinearTrainArgs,
    KernelVariant, LoraDropout,
};
use peft_kernels::dora::{
    DoraDims, DoraLinearArgs, DoraLinearBackwardArgs, DoraLinearTrainArgs, DoraMergeArgs,
    DoraNormArgs,
};
use peft_kernels::host::{self, Backend};
use peft_kernels::reference::{self, MatRef};
use peft_kernels::validate::{assert_close, assert_close_matrix, compare, default_tolerance};
use peft_kernels::{Activation, Composition, DType, Element, Error, Insertion, MatrixLayout};

/// Shapes (m, n, k, r): 1, primes, non-multiples of every tile (the norm's 128 threads, the
/// scale's 256, the merge's 64 × 64 tiles and 16-wide rank chunks, the forward's tiles), and
/// a decode shape whose f16/bf16 main pass splits its K (k ≥ 8 tiles of 128).
const SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1),
    (3, 5, 7, 2),
    (17, 33, 129, 4),
    (10, 64, 128, 16),
    (2, 97, 257, 17),
    (64, 130, 64, 8),
    (1, 40, 1100, 4),
];

struct Layer<T> {
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    m: Vec<T>,
    bias: Vec<T>,
    s: f32,
}

impl<T: Element> Layer<T> {
    /// Weights as a trained DoRA layer has them: B not small against W, m near ‖W + s·B·A‖.
    fn new(rng: &mut Rng, n: usize, k: usize, r: usize) -> Self {
        Layer {
            w: rng.normal_vec(n * k, 1.0 / (k as f64).sqrt()),
            a: rng.normal_vec(r * k, 1.0 / (k as f64).sqrt()),
            b: rng.normal_vec(n * r, 0.3),
            m: (0..n).map(|_| T::from_f64(rng.uniform(0.5, 1.5))).collect(),
            bias: rng.normal_vec(n, 0.5),
            s: rng.uniform(0.5, 2.5) as f32,
        }
    }

    /// |x|·|W|ᵀ + s·(|x|·|A|ᵀ)·|B|ᵀ [m, n]: the size of the terms of z = x·Wᵀ + Δ, to which
    /// its rounding errors (f32 sums, t rounded to T) are proportional.
    fn z_abs(&self, x: &[T], m: usize, n: usize, k: usize, r: usize) -> Vec<f64> {
        let abs = |v: &[T]| -> Vec<f64> { v.iter().map(|e| e.to_f64().abs()).collect() };
        let (xa, wa, aa, ba) = (abs(x), abs(&self.w), abs(&self.a), abs(&self.b));
        let ones = vec![1.0f64; n];
        reference::dora::dora_linear_detached(
            MatRef::new(&xa, m, k),
            MatRef::new(&wa, n, k),
            None,
            MatRef::new(&aa, r, k),
            MatRef::new(&ba, n, r),
            &ones,
            self.s,
            &ones,
        )
        .unwrap()
    }

    fn refs(&self, n: usize, k: usize, r: usize) -> (MatRef<'_, T>, MatRef<'_, T>, MatRef<'_, T>) {
        (
            MatRef::new(&self.w, n, k),
            MatRef::new(&self.a, r, k),
            MatRef::new(&self.b, n, r),
        )
    }
}

/// g (and the norms) from `dora_norm`.
fn g_of<T: Element>(backend: &Backend, l: &Layer<T>, d: &DoraDims) -> (Vec<f32>, Vec<f32>) {
    let mut g = poisoned::<f32>(d.n);
    let mut norm = poisoned::<f32>(d.n);
    host::dora_norm(
        backend,
        d,
        l.s,
        DoraNormArgs {
            w: &l.w[..],
            w_down: &l.a,
            w_up: &l.b,
            magnitude: &l.m,
            g: &mut g,
            norm: Some(&mut norm),
        },
    )
    .unwrap();
    (g, norm)
}

/// DoRA's LoRA: the layer's scale s as `Composition::Scaled`.
fn lora(s: f32) -> DeltaLinear {
    DeltaLinear::new(
        Insertion::Parallel,
        Activation::Identity,
        Composition::Scaled(s),
    )
}

/// Every kernel variant the backend runs for `dtype`: Hopper's wgmma kernel in the emulator
/// and on compute capability 9.0.
fn variants(backend: &Backend, dtype: DType) -> Vec<KernelVariant> {
    let mut v = vec![
        KernelVariant::Auto,
        KernelVariant::Naive,
        KernelVariant::Simt,
    ];
    if dtype != DType::F32 {
        v.push(KernelVariant::TensorCore);
        if runs_wgmma(backend) {
            v.push(KernelVariant::Wgmma);
        }
    }
    v
}

fn norms_and_forward<T: Element>(backend: &Backend, rng: &mut Rng) {
    let tol = default_tolerance(T::DTYPE);
    for (m, n, k, r) in SHAPES {
        let l = Layer::<T>::new(rng, n, k, r);
        let d = DoraDims { n, k, r };
        let label = format!("{} m={m} n={n} k={k} r={r}", T::DTYPE);
        let (wr, ar, br) = l.refs(n, k, r);
        // The norms are computed from f32 products of the stored values: f32-accurate in every
        // dtype (g is f32).
        let (g, norm) = g_of(backend, &l, &d);
        let g_ref = reference::dora::dora_norm(wr, ar, br, &l.m, l.s).unwrap();
        let norm_ref = reference::dora::dora_row_norms(wr, ar, br, l.s).unwrap();
        assert_close(&format!("g {label}"), &g, &g_ref, 1e-5);
        assert_close(&format!("norm {label}"), &norm, &norm_ref, 1e-5);
        // The fused forward on every kernel variant, y strided (ld_y = n + 3) on odd shapes.
        let ld_y = if n % 2 == 1 { n + 3 } else { n };
        let ly = MatrixLayout {
            rows: m,
            cols: n,
            ld: ld_y,
        };
        let x: Vec<T> = rng.uniform_vec(m * k);
        let y_ref = reference::dora::dora_linear(
            MatRef::new(&x, m, k),
            wr,
            Some(&l.bias),
            ar,
            br,
            &l.m,
            l.s,
        )
        .unwrap();
        for kernel in variants(backend, T::DTYPE) {
            let dims = DeltaLinearDims {
                ld_y,
                kernel,
                ..DeltaLinearDims::new(m, n, k, r)
            };
            let mut ws = poisoned::<T>(dims.workspace_len());
            let mut y = poisoned::<T>(ly.min_len());
            host::dora_linear(
                backend,
                &lora(l.s),
                &dims,
                DoraLinearArgs {
                    forward: DeltaLinearArgs {
                        x: &x,
                        w: &l.w,
                        bias: Some(&l.bias),
                        u: None,
                        w_down: &l.a,
                        b_down: None,
                        w_up: &l.b,
                        b_up: None,
                        gate: None,
                        workspace: &mut ws,
                        y: &mut y,
                    },
                    g: &g,
                },
            )
            .unwrap();
            // One rounding of y: the one-rounding tolerance over 100 or more elements (a
            // handful can cancel to nearly 0 against the bias), else per element within a few
            // roundings of the terms' size |g·z| + |b|.
            let label = format!("y {label} {kernel:?}");
            if m * n >= 100 {
                assert_close_matrix(&label, &y, ly, &y_ref, tol);
            }
            // |g|·z_abs + |b|: the size of the sums' terms.
            let z_abs = l.z_abs(&x, m, n, k, r);
            for i in 0..m {
                for j in 0..n {
                    let (got, want) = (y[i * ld_y + j].to_f64(), y_ref[i * n + j]);
                    let size = f64::from(g[j]).abs() * z_abs[i * n + j] + l.bias[j].to_f64().abs();
                    assert!(
                        (got - want).abs() <= (4.0 * eps(T::DTYPE) + 1e-5) * size,
                        "{label} ({i}, {j}): got {got}, expected {want} (seed {})",
                        rng.seed()
                    );
                }
                // The elements between rows stay poisoned.
                assert!(y[i * ld_y + n..(i * ld_y + ld_y).min(y.len())]
                    .iter()
                    .all(|v| v.to_f64().is_nan()));
            }
        }
    }
}

fn eps(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(f32::EPSILON),
        DType::F16 => f64::from(f16::EPSILON),
        DType::BF16 => f64::from(bf16::EPSILON),
    }
}

/// Backward shapes (m, n, k, r): m ∈ {1, 3, 65, 257} (one partial chunk, several; rows
/// that are not a multiple of the 8 row-strided warps), n odd, r ∈ {1, 7, 16}.
const BACKWARD_SHAPES: [(usize, usize, usize, usize); 8] = [
    (1, 5, 7, 1),
    (3, 33, 40, 7),
    (65, 17, 24, 16),
    (257, 9, 16, 7),
    (65, 67, 96, 1),
    (3, 1, 5, 16),
    (257, 33, 40, 16),
    (1, 129, 64, 7),
];

/// The training forward and the backward of case `index` of [`BACKWARD_SHAPES`]: y and every
/// gradient against the reference. Cases alternate the kernels (Auto, Naive), accumulation
/// and a strided y.
fn backward_case<T: Element>(backend: &Backend, index: usize, rng: &mut Rng) {
    let (m, n, k, r) = BACKWARD_SHAPES[index];
    let accumulate = index % 3 == 1;
    let kernel = [KernelVariant::Auto, KernelVariant::Naive][index % 2];
    let ld_y = if index % 4 == 2 { n + 5 } else { n };
    let dims = DeltaLinearDims {
        ld_y,
        kernel,
        ..DeltaLinearDims::new(m, n, k, r)
    };
    let label = format!(
        "{} m={m} n={n} k={k} r={r} {kernel:?} ld_y={ld_y} accumulate={accumulate}",
        T::DTYPE
    );
    let tol = default_tolerance(T::DTYPE);
    let l = Layer::<T>::new(rng, n, k, r);
    let (wr, ar, br) = l.refs(n, k, r);
    let op = lora(l.s);
    let d = DoraDims { n, k, r };
    let (g, norm) = g_of(backend, &l, &d);
    let ly = MatrixLayout {
        rows: m,
        cols: n,
        ld: ld_y,
    };
    let x: Vec<T> = rng.uniform_vec(m * k);
    let dy: Vec<T> = rng.uniform_vec(ly.min_len());

    let mut y = poisoned::<T>(ly.min_len());
    let mut ws = poisoned::<T>(dims.workspace_len());
    let mut saved = poisoned::<f32>(dims.dora_saved_len());
    host::dora_linear_train(
        backend,
        &op,
        &dims,
        DoraLinearTrainArgs {
            train: DeltaLinearTrainArgs {
                forward: DeltaLinearArgs {
                    x: &x,
                    w: &l.w,
                    bias: Some(&l.bias),
                    u: None,
                    w_down: &l.a,
                    b_down: None,
                    w_up: &l.b,
                    b_up: None,
                    gate: None,
                    workspace: &mut ws,
                    y: &mut y,
                },
                saved: &mut saved,
                dropout: None,
            },
            g: &g,
        },
    )
    .unwrap_or_else(|e| panic!("{label}: training forward: {e}"));
    let y_ref =
        reference::dora::dora_linear(MatRef::new(&x, m, k), wr, Some(&l.bias), ar, br, &l.m, l.s)
            .unwrap();
    if m * n >= 100 {
        assert_close_matrix(&format!("y {label}"), &y, ly, &y_ref, tol);
    }

    let start = |len: usize, rng: &mut Rng| -> Vec<f32> {
        if accumulate {
            (0..len).map(|_| rng.uniform(-1.0, 1.0) as f32).collect()
        } else {
            poisoned(len)
        }
    };
    let mut dx = poisoned::<T>(m * k);
    let mut dw_down = start(r * k, rng);
    let mut dw_up = start(n * r, rng);
    let mut dmagnitude = start(n, rng);
    let before = (dw_down.clone(), dw_up.clone(), dmagnitude.clone());
    let mut bwd_ws = poisoned::<f32>(dims.dora_backward_workspace_len(&op, T::DTYPE));
    host::dora_linear_backward(
        backend,
        &op,
        &dims,
        DoraLinearBackwardArgs {
            backward: DeltaLinearBackwardArgs {
                dy: &dy,
                x: &x,
                w: &l.w,
                u: None,
                w_down: &l.a,
                w_up: &l.b,
                b_up: None,
                gate: None,
                saved: &saved,
                dx: &mut dx,
                du: None,
                dw_down: &mut dw_down,
                db_down: None,
                dw_up: &mut dw_up,
                db_up: None,
                dgate: None,
                workspace: &mut bwd_ws,
                dropout: None,
                accumulate,
            },
            g: &g,
            norm: &norm,
            dmagnitude: &mut dmagnitude,
        },
    )
    .unwrap_or_else(|e| panic!("{label}: backward: {e}"));

    // The reference reads dy contiguous.
    let dy_c: Vec<T> = (0..m)
        .flat_map(|i| dy[i * ld_y..i * ld_y + n].to_vec())
        .collect();
    let grads = reference::dora::dora_linear_backward(
        MatRef::new(&x, m, k),
        wr,
        ar,
        br,
        &l.m,
        l.s,
        MatRef::new(&dy_c, m, n),
    )
    .unwrap();
    let expect = |held: &[f32], reference: &[f64]| -> Vec<f64> {
        match accumulate {
            true => held
                .iter()
                .zip(reference)
                .map(|(h, r)| f64::from(*h) + r)
                .collect(),
            false => reference.to_vec(),
        }
    };
    // x's and the adapter's gradients are LoRA's backward of dy' = g ⊙ dy, which the kernels
    // round to T once (the f32 product, as the pre-pass forms it): LoRA's f64 reference
    // backward of that dy' (the exact DoRA reference differs by that rounding, which a sum of
    // a few cancelling terms, dz of one token, can make far larger than T's epsilon relative
    // to the sum).
    let dy_scaled: Vec<T> = dy_c
        .iter()
        .enumerate()
        .map(|(e, d)| T::from_f64(f64::from(g[e % n] * d.to_f64() as f32)))
        .collect();
    let tensors = reference::DeltaLinearTensors {
        x: MatRef::new(&x, m, k),
        w: wr,
        b: None,
        u: None,
        w_down: ar,
        b_down: None,
        w_up: br,
        b_up: None,
        gate: None,
    };
    let lora_grads =
        reference::delta_linear_backward(&op, &tensors, None, MatRef::new(&dy_scaled, m, n))
            .unwrap();
    let small = |len: usize| if len < 8 { tol.max(1e-3) } else { tol };
    assert_close(&format!("dx {label}"), &dx, &lora_grads.dx, tol);
    assert_close(
        &format!("dw_down {label}"),
        &dw_down,
        &expect(&before.0, &lora_grads.dw_down),
        small(dw_down.len()),
    );
    assert_close(
        &format!("dw_up {label}"),
        &dw_up,
        &expect(&before.1, &lora_grads.dw_up),
        small(dw_up.len()),
    );
    // And the exact DoRA gradients where the rounding of dy' averages out over many terms.
    if m * n >= 1000 {
        assert_close(&format!("dx (exact) {label}"), &dx, &grads.dx, tol);
        let exact_up = expect(&before.1, &grads.dw_up);
        assert_close(&format!("dw_up (exact) {label}"), &dw_up, &exact_up, tol);
    }
    // The magnitude's gradient reads dy as it is and z as saved in f32, which carries the
    // rounding of the bottleneck activations t to T (as y does): each element within a few
    // roundings of T of its terms' size Σ_i |dy_ij|·z_abs_ij / ‖·‖_j (a column's few sums
    // can cancel), and the whole within the dtype's tolerance where n is not tiny.
    let dm_ref = expect(&before.2, &grads.dmagnitude);
    let z_abs = l.z_abs(&x, m, n, k, r);
    let norm_ref = reference::dora::dora_row_norms(wr, ar, br, l.s).unwrap();
    for j in 0..n {
        let size: f64 = (0..m)
            .map(|i| dy_c[i * n + j].to_f64().abs() * z_abs[i * n + j])
            .sum::<f64>()
            / norm_ref[j]
            + if accumulate {
                f64::from(before.2[j]).abs()
            } else {
                0.0
            };
        let err = (f64::from(dmagnitude[j]) - dm_ref[j]).abs();
        assert!(
            err <= (4.0 * eps(T::DTYPE) + 1e-5) * size,
            "dmagnitude {label} [{j}]: got {}, expected {}, error {err:.3e} over size {size:.3e} \
             (seed {})",
            dmagnitude[j],
            dm_ref[j],
            rng.seed()
        );
    }
    if n >= 8 {
        assert_close(&format!("dmagnitude {label}"), &dmagnitude, &dm_ref, tol);
    }
}

fn backward_every_dtype(backend: &Backend) {
    let mut rng = Rng::from_env();
    for i in 0..BACKWARD_SHAPES.len() {
        backward_case::<f32>(backend, i, &mut rng);
        backward_case::<f16>(backend, i, &mut rng);
        backward_case::<bf16>(backend, i, &mut rng);
    }
}

fn merge_and_unmerge<T: Element>(backend: &Backend, rng: &mut Rng) {
    let tol = default_tolerance(T::DTYPE);
    for (_, n, k, r) in SHAPES {
        let l = Layer::<T>::new(rng, n, k, r);
        let d = DoraDims { n, k, r };
        let label = format!("{} n={n} k={k} r={r}", T::DTYPE);
        let (wr, ar, br) = (
            MatRef::new(&l.w, n, k),
            MatRef::new(&l.a, r, k),
            MatRef::new(&l.b, n, r),
        );
        let s = l.s;
        let (g, _) = g_of(backend, &l, &d);
        let mut w = l.w.clone();
        host::dora_merge(
            backend,
            &d,
            l.s,
            false,
            DoraMergeArgs {
                w: &mut w,
                w_down: &l.a[..],
                w_up: &l.b,
                g: &g[..],
            },
        )
        .unwrap();
        let merged = reference::dora::dora_merge(wr, ar, br, &l.m, s).unwrap();
        // Per element: W + s·B·A can cancel, so each element is held to a few roundings of its
        // terms' size, |W| + s·|B|·|A| (times g when merged), rather than of itself.
        let zeros = vec![0.0f64; n * k];
        let abs = |m: MatRef<T>| -> Vec<f64> { m.to_f64().iter().map(|v| v.abs()).collect() };
        let (a64, b64) = (abs(ar), abs(br));
        let sba = reference::lora_merge(
            MatRef::new(&zeros, n, k),
            MatRef::new(&a64, r, k),
            MatRef::new(&b64, n, r),
            s,
        )
        .unwrap();
        let size: Vec<f64> = (0..n * k)
            .map(|e| l.w[e].to_f64().abs() + sba[e].abs())
            .collect();
        let g64: Vec<f64> = g.iter().map(|&v| v.into()).collect();
        let merged_size: Vec<f64> = size
            .iter()
            .enumerate()
            .map(|(e, v)| v * g64[e / k])
            .collect();
        within(&format!("merged {label}"), &w, &merged, &merged_size);
        if n * k >= 100 {
            assert_close(&format!("merged {label}"), &w, &merged, tol);
        }
        // The merged layer's plain forward is the DoRA forward (the reference's identity).
        let x: Vec<T> = rng.uniform_vec(3 * k);
        let bias: Vec<f64> = l.bias.iter().map(|v| v.to_f64()).collect();
        let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        let plain = reference::linear(
            MatRef::new(&x64, 3, k),
            MatRef::new(&merged, n, k),
            Some(&bias[..]),
        )
        .unwrap();
        let dora =
            reference::dora::dora_linear(MatRef::new(&x, 3, k), wr, Some(&l.bias), ar, br, &l.m, s)
                .unwrap();
        assert_close(&format!("merged forward {label}"), &plain, &dora, 1e-12);
        // Unmerge with the same g: W back.
        host::dora_merge(
            backend,
            &d,
            l.s,
            true,
            DoraMergeArgs {
                w: &mut w,
                w_down: &l.a[..],
                w_up: &l.b,
                g: &g[..],
            },
        )
        .unwrap();
        let original: Vec<f64> = l.w.iter().map(|v| v.to_f64()).collect();
        within(&format!("unmerged {label}"), &w, &original, &size);
    }
}

/// Each element within 4 roundings of T of `size` (its terms' magnitude).
#[track_caller]
fn within<T: Element>(label: &str, got: &[T], expected: &[f64], size: &[f64]) {
    let eps = match T::DTYPE {
        DType::F32 => f64::from(f32::EPSILON),
        DType::F16 => f64::from(f16::EPSILON),
        DType::BF16 => f64::from(bf16::EPSILON),
    };
    for (e, ((got, want), size)) in got.iter().zip(expected).zip(size).enumerate() {
        let err = (got.to_f64() - want).abs();
        assert!(
            err <= 4.0 * eps * size,
            "{label} [{e}]: got {got:?}, expected {want}, error {err:.3e} over 4·eps·{size:.3e}"
        );
    }
}

fn every_dtype(backend: &Backend) {
    let mut rng = Rng::from_env();
    norms_and_forward::<f32>(backend, &mut rng);
    norms_and_forward::<f16>(backend, &mut rng);
    norms_and_forward::<bf16>(backend, &mut rng);
}

fn merges(backend: &Backend) {
    let mut rng = Rng::from_env();
    merge_and_unmerge::<f32>(backend, &mut rng);
    merge_and_unmerge::<f16>(backend, &mut rng);
    merge_and_unmerge::<bf16>(backend, &mut rng);
}

/// Small f32 tensors for the argument checks.
struct Small {
    n: usize,
    k: usize,
    r: usize,
    m: usize,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    mag: Vec<f32>,
    x: Vec<f32>,
    g: Vec<f32>,
}

impl Small {
    fn new() -> Self {
        let (n, k, r, m) = (4, 6, 2, 3);
        Small {
            n,
            k,
            r,
            m,
            w: vec![0.5; n * k],
            a: vec![0.1; r * k],
            b: vec![0.1; n * r],
            mag: vec![1.0; n],
            x: vec![0.25; m * k],
            g: vec![1.0; n],
        }
    }
}

#[track_caller]
fn refused(err: Error, op: &str, arg: &str) {
    match &err {
        Error::InvalidArgument { op: o, arg: a, .. } if *o == op && *a == arg => {}
        _ => panic!("expected {op} to refuse `{arg}`, got {err}"),
    }
}

fn bad_arguments(backend: &Backend) {
    let t = Small::new();
    let (n, k, r, m) = (t.n, t.k, t.r, t.m);
    let mut g = vec![0.0f32; n];
    let norm_args = |mag: &[f32], g: &mut [f32]| {
        host::dora_norm(
            backend,
            &DoraDims { n, k, r },
            1.0,
            DoraNormArgs {
                w: &t.w[..],
                w_down: &t.a,
                w_up: &t.b,
                magnitude: mag,
                g,
                norm: None,
            },
        )
    };
    refused(
        norm_args(&t.mag[..n - 1], &mut g).unwrap_err(),
        "dora_norm",
        "magnitude",
    );
    let err = host::dora_norm(
        backend,
        &DoraDims { n, k, r: 3 },
        1.0,
        DoraNormArgs {
            w: &t.w[..],
            w_down: &t.a,
            w_up: &t.b,
            magnitude: &t.mag,
            g: &mut g,
            norm: None,
        },
    )
    .unwrap_err();
    refused(err, "dora_norm", "w_down");
    let err = host::dora_norm(
        backend,
        &DoraDims { n, k, r },
        f32::NAN,
        DoraNormArgs {
            w: &t.w[..],
            w_down: &t.a,
            w_up: &t.b,
            magnitude: &t.mag,
            g: &mut g,
            norm: Some(&mut vec![0.0; n + 1]),
        },
    )
    .unwrap_err();
    refused(err, "dora_norm", "scale");
    let err = host::dora_norm(
        backend,
        &DoraDims { n, k, r },
        1.0,
        DoraNormArgs {
            w: &t.w[..],
            w_down: &t.a,
            w_up: &t.b,
            magnitude: &t.mag,
            g: &mut g,
            norm: Some(&mut vec![0.0; n + 1]),
        },
    )
    .unwrap_err();
    refused(err, "dora_norm", "norm");

    // The forward: g's length, and what DoRA is not.
    let dims = DeltaLinearDims::new(m, n, k, r);
    let forward = |op: DeltaLinear, g: &[f32], b_up: Option<&[f32]>| {
        let mut ws = vec![0.0f32; dims.workspace_len()];
        let mut y = vec![0.0f32; m * n];
        host::dora_linear(
            backend,
            &op,
            &dims,
            DoraLinearArgs {
                forward: DeltaLinearArgs {
                    x: &t.x,
                    w: &t.w,
                    bias: None,
                    u: None,
                    w_down: &t.a,
                    b_down: None,
                    w_up: &t.b,
                    b_up,
                    gate: None,
                    workspace: &mut ws,
                    y: &mut y,
                },
                g,
            },
        )
    };
    forward(lora(1.0), &t.g, None).unwrap();
    refused(
        forward(lora(1.0), &t.g[..n - 1], None).unwrap_err(),
        "dora_linear",
        "g",
    );
    refused(
        forward(lora(1.0), &t.g, Some(&t.g)).unwrap_err(),
        "dora_linear",
        "b_up",
    );
    let houlsby = DeltaLinear::houlsby(Activation::Identity);
    refused(
        forward(houlsby, &t.g, None).unwrap_err(),
        "dora_linear",
        "op.insertion",
    );
    let relu = DeltaLinear::parallel_adapter(Activation::Relu, 1.0);
    refused(
        forward(relu, &t.g, None).unwrap_err(),
        "dora_linear",
        "op.activation",
    );

    // The training forward: saved's length; dropout is unsupported.
    let train = |saved_len: usize, dropout: Option<LoraDropout>| {
        let mut ws = vec![0.0f32; dims.workspace_len()];
        let mut y = vec![0.0f32; m * n];
        let mut saved = vec![0.0f32; saved_len];
        host::dora_linear_train(
            backend,
            &lora(1.0),
            &dims,
            DoraLinearTrainArgs {
                train: DeltaLinearTrainArgs {
                    forward: DeltaLinearArgs {
                        x: &t.x,
                        w: &t.w,
                        bias: None,
                        u: None,
                        w_down: &t.a,
                        b_down: None,
                        w_up: &t.b,
                        b_up: None,
                        gate: None,
                        workspace: &mut ws,
                        y: &mut y,
                    },
                    saved: &mut saved,
                    dropout,
                },
                g: &t.g,
            },
        )
    };
    train(dims.dora_saved_len(), None).unwrap();
    // delta_linear's saved (z alone) is too short: DoRA also saves x·Wᵀ + Δ.
    refused(
        train(dims.saved_len(&lora(1.0)), None).unwrap_err(),
        "dora_linear_train",
        "saved",
    );
    let dropout = Some(LoraDropout { p: 0.1, seed: 7 });
    assert!(matches!(
        train(dims.dora_saved_len(), dropout).unwrap_err(),
        Error::Unsupported(_)
    ));

    // The backward: dmagnitude's and norm's lengths, the workspace, aliasing.
    let saved = vec![0.0f32; dims.dora_saved_len()];
    let dy = vec![0.5f32; m * n];
    let backward = |norm: &[f32], dmag_len: usize, ws_len: usize| {
        let mut dx = vec![0.0f32; m * k];
        let (mut dw_down, mut dw_up) = (vec![0.0f32; r * k], vec![0.0f32; n * r]);
        let mut dmagnitude = vec![0.0f32; dmag_len];
        let mut ws = vec![0.0f32; ws_len];
        host::dora_linear_backward(
            backend,
            &lora(1.0),
            &dims,
            DoraLinearBackwardArgs {
                backward: DeltaLinearBackwardArgs {
                    dy: &dy,
                    x: &t.x,
                    w: &t.w,
                    u: None,
                    w_down: &t.a,
                    w_up: &t.b,
                    b_up: None,
                    gate: None,
                    saved: &saved,
                    dx: &mut dx,
                    du: None,
                    dw_down: &mut dw_down,
                    db_down: None,
                    dw_up: &mut dw_up,
                    db_up: None,
                    dgate: None,
                    workspace: &mut ws,
                    dropout: None,
                    accumulate: false,
                },
                g: &t.g,
                norm,
                dmagnitude: &mut dmagnitude,
            },
        )
    };
    let ws_len = dims.dora_backward_workspace_len(&lora(1.0), DType::F32);
    backward(&t.g, n, ws_len).unwrap();
    refused(
        backward(&t.g, n + 1, ws_len).unwrap_err(),
        "dora_linear_backward",
        "dmagnitude",
    );
    refused(
        backward(&t.g[1..], n, ws_len).unwrap_err(),
        "dora_linear_backward",
        "norm",
    );
    refused(
        backward(&t.g, n, dims.backward_workspace_len(&lora(1.0))).unwrap_err(),
        "dora_linear_backward",
        "workspace",
    );

    let mut w2 = t.w.clone();
    let err = host::dora_merge(
        backend,
        &DoraDims { n, k, r },
        1.0,
        false,
        DoraMergeArgs {
            w: &mut w2,
            w_down: &t.a[..],
            w_up: &t.b,
            g: &t.g[..1],
        },
    )
    .unwrap_err();
    refused(err, "dora_merge", "g");
    assert_eq!(w2, t.w, "a refused merge leaves W as it was");
}

on_every_backend!(every_dtype, backward_every_dtype, merges, bad_arguments);

/// The planner refuses a dmagnitude that shares memory with the workspace.
#[test]
fn dmagnitude_apart_from_the_workspace() {
    let t = Small::new();
    let (n, k, r, m) = (t.n, t.k, t.r, t.m);
    let dims = DeltaLinearDims::new(m, n, k, r);
    let saved = vec![0.0f32; dims.dora_saved_len()];
    let dy = vec![0.5f32; m * n];
    let mut dx = vec![0.0f32; m * k];
    let (mut dw_down, mut dw_up) = (vec![0.0f32; r * k], vec![0.0f32; n * r]);
    let ws_len = dims.dora_backward_workspace_len(&lora(1.0), DType::F32);
    let mut ws = vec![0.0f32; ws_len];
    let mut dmagnitude = vec![0.0f32; n];
    let args = DoraLinearBackwardArgs {
        backward: DeltaLinearBackwardArgs {
            dy: &dy[..],
            x: &t.x,
            w: &t.w,
            u: None,
            w_down: &t.a,
            w_up: &t.b,
            b_up: None,
            gate: None,
            saved: &saved[..],
            dx: &mut dx[..],
            du: None,
            dw_down: &mut dw_down[..],
            db_down: None,
            dw_up: &mut dw_up[..],
            db_up: None,
            dgate: None,
            workspace: &mut ws[..],
            dropout: None,
            accumulate: false,
        },
        g: &t.g[..],
        norm: &t.g[..],
        dmagnitude: &mut dmagnitude[..],
    };
    let mut b = args.bufs(&mut Views);
    let plan = |b: &peft_kernels::plan::dora::DoraLinearBackwardBufs| {
        peft_kernels::plan::dora::dora_linear_backward(&lora(1.0), &dims, DType::F32, b)
    };
    plan(&b).unwrap();
    // dmagnitude at the workspace's last n elements.
    b.dmagnitude.addr = b.backward.workspace.addr + 4 * (ws_len - n) as u64;
    refused(plan(&b).unwrap_err(), "dora_linear_backward", "dmagnitude");
}

/// Host slices as planner buffers (addresses and lengths only).
struct Views;
impl<'r, 'w, A, B> peft_kernels::plan::BufSource<&'r [A], &'w mut [B]> for Views {
    fn read(&mut self, r: &'r [A]) -> peft_kernels::plan::Buf {
        peft_kernels::plan::Buf {
            addr: r.as_ptr() as u64,
            len: r.len(),
        }
    }
    fn write(&mut self, w: &'w mut [B]) -> peft_kernels::plan::Buf {
        peft_kernels::plan::Buf {
            addr: w.as_ptr() as u64,
            len: w.len(),
        }
    }
}

/// A wrong result is caught: the checks above fail for the DoRA layer without its scale
/// (plain LoRA with the bias, what a dropped epilogue would give), and for a magnitude
/// gradient that forgets to divide by the norm, or reads dy' instead of dy.
#[test]
fn the_checks_catch_wrong_results() {
    let mut rng = Rng::from_env();
    let (m, n, k, r) = (17, 33, 40, 7);
    let l = Layer::<f32>::new(&mut rng, n, k, r);
    let (wr, ar, br) = l.refs(n, k, r);
    let x: Vec<f32> = rng.uniform_vec(m * k);
    let dy: Vec<f32> = rng.uniform_vec(m * n);
    let xr = MatRef::new(&x, m, k);
    let y = reference::dora::dora_linear(xr, wr, Some(&l.bias), ar, br, &l.m, l.s).unwrap();
    let tensors = reference::DeltaLinearTensors {
        x: xr,
        w: wr,
        b: Some(&l.bias),
        u: None,
        w_down: ar,
        b_down: None,
        w_up: br,
        b_up: None,
        gate: None,
    };
    let plain = reference::delta_linear(&lora(l.s), &tensors).unwrap();
    let plain32: Vec<f32> = plain.iter().map(|&v| v as f32).collect();
    assert!(!compare("no scale", &plain32, &y, 1e-2).unwrap().passed());
    let grads =
        reference::dora::dora_linear_backward(xr, wr, ar, br, &l.m, l.s, MatRef::new(&dy, m, n))
            .unwrap();
    let norm = reference::dora::dora_row_norms(wr, ar, br, l.s).unwrap();
    let undivided: Vec<f32> = grads
        .dmagnitude
        .iter()
        .zip(&norm)
        .map(|(v, nm)| (v * nm) as f32)
        .collect();
    assert!(!compare("dm·‖·‖", &undivided, &grads.dmagnitude, 1e-2)
        .unwrap()
        .passed());
    let g = reference::dora::dora_norm(wr, ar, br, &l.m, l.s).unwrap();
    let of_scaled: Vec<f32> = grads
        .dmagnitude
        .iter()
        .zip(&g)
        .map(|(v, g)| (v * g) as f32)
        .collect();
    assert!(!compare("dm of dy'", &of_scaled, &grads.dmagnitude, 1e-2)
        .unwrap()
        .passed());
}

/// The Rust twins of the kernels' parameter blocks have the C++ sizes.
#[cfg(feature = "emulator")]
#[test]
fn parameter_blocks_match_the_kernels() {
    unsafe extern "C" {
        fn pk_sizeof_DoraNormParams() -> usize;
        fn pk_sizeof_DoraScaleParams() -> usize;
        fn pk_sizeof_DoraBackwardParams() -> usize;
    }
    use peft_kernels::plan::dora::{DoraBackwardParams, DoraNormParams, DoraScaleParams};
    // SAFETY: the emulator library exports both (PK_PARAMS_SIZE in kernels/dora.cu).
    unsafe {
        assert_eq!(
            pk_sizeof_DoraNormParams(),
            std::mem::size_of::<DoraNormParams>()
        );
        assert_eq!(
            pk_sizeof_DoraScaleParams(),
            std::mem::size_of::<DoraScaleParams>()
        );
        assert_eq!(
            pk_sizeof_DoraBackwardParams(),
            std::mem::size_of::<DoraBackwardParams>()
        );
    }
}

/// One DoRA problem in f64 for the finite differences.
struct Fd {
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    bias: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    mag: Vec<f64>,
    s: f32,
    dy: Vec<f64>,
}

/// Which tensor a finite difference perturbs.
#[derive(Clone, Copy, Debug)]
enum Wrt {
    X,
    A,
    B,
    Magnitude,
}

impl Fd {
    fn random(rng: &mut Rng) -> Fd {
        let (m, n, k, r) = (
            rng.range(1, 5),
            rng.range(1, 7),
            rng.range(1, 7),
            rng.range(1, 5),
        );
        Fd {
            m,
            n,
            k,
            r,
            x: rng.uniform_f64(m * k),
            w: rng.uniform_f64(n * k),
            bias: rng.uniform_f64(n),
            a: rng.uniform_f64(r * k),
            b: rng.uniform_f64(n * r),
            mag: (0..n).map(|_| rng.uniform(0.5, 1.5)).collect(),
            s: rng.uniform(0.5, 2.0) as f32,
            dy: rng.uniform_f64(m * n),
        }
    }

    fn norms(&self) -> Vec<f64> {
        let (n, k, r) = (self.n, self.k, self.r);
        let w = MatRef::new(&self.w, n, k);
        let (a, b) = (MatRef::new(&self.a, r, k), MatRef::new(&self.b, n, r));
        reference::dora::dora_row_norms(w, a, b, self.s).unwrap()
    }

    /// L = Σ y·dy with the norms `norm`: the unperturbed weights' (detached, as the backward
    /// assumes) or, with `None`, recomputed from the perturbed weights (not detached).
    fn loss(&self, norm: Option<&[f64]>) -> f64 {
        let (m, n, k, r) = (self.m, self.n, self.k, self.r);
        let recomputed;
        let norm = match norm {
            Some(norm) => norm,
            None => {
                recomputed = self.norms();
                &recomputed
            }
        };
        let y = reference::dora::dora_linear_detached(
            MatRef::new(&self.x, m, k),
            MatRef::new(&self.w, n, k),
            Some(&self.bias),
            MatRef::new(&self.a, r, k),
            MatRef::new(&self.b, n, r),
            &self.mag,
            self.s,
            norm,
        )
        .unwrap();
        y.iter().zip(&self.dy).map(|(y, d)| y * d).sum()
    }

    /// Central differences of [`Fd::loss`] for every element of `wrt`.
    fn differences(&self, wrt: Wrt, detached: bool) -> Vec<f64> {
        const EPS: f64 = 1e-5;
        let norm0 = self.norms();
        let norm = detached.then_some(&norm0[..]);
        let mut p = self.clone_fd();
        let len = p.tensor(wrt).len();
        (0..len)
            .map(|i| {
                let v = p.tensor(wrt)[i];
                p.tensor(wrt)[i] = v + EPS;
                let up = p.loss(norm);
                p.tensor(wrt)[i] = v - EPS;
                let down = p.loss(norm);
                p.tensor(wrt)[i] = v;
                (up - down) / (2.0 * EPS)
            })
            .collect()
    }

    fn tensor(&mut self, wrt: Wrt) -> &mut Vec<f64> {
        match wrt {
            Wrt::X => &mut self.x,
            Wrt::A => &mut self.a,
            Wrt::B => &mut self.b,
            Wrt::Magnitude => &mut self.mag,
        }
    }

    fn clone_fd(&self) -> Fd {
        Fd {
            x: self.x.clone(),
            w: self.w.clone(),
            bias: self.bias.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            mag: self.mag.clone(),
            dy: self.dy.clone(),
            ..*self
        }
    }

    fn grads(&self) -> reference::dora::DoraGrads {
        let (m, n, k, r) = (self.m, self.n, self.k, self.r);
        reference::dora::dora_linear_backward(
            MatRef::new(&self.x, m, k),
            MatRef::new(&self.w, n, k),
            MatRef::new(&self.a, r, k),
            MatRef::new(&self.b, n, r),
            &self.mag,
            self.s,
            MatRef::new(&self.dy, m, n),
        )
        .unwrap()
    }
}

/// ‖got − fd‖ / ‖fd‖, with a floor for a gradient that is all but 0.
fn fd_error(got: &[f64], fd: &[f64]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(fd)
        .map(|(g, f)| (g - f).powi(2))
        .sum::<f64>()
        .sqrt();
    let size: f64 = fd.iter().map(|f| f * f).sum::<f64>().sqrt();
    diff / size.max(1e-9)
}

/// The f64 reference backward is the derivative of the f64 forward with the norm detached
/// (stop-gradient: perturbing A or B moves z, never the norm), for x, A, B and the magnitude;
/// and the finite differences tell a wrong gradient: the norm's own derivative (what a
/// backward that did not detach it would add), a magnitude gradient not divided by the norm.
#[test]
fn the_reference_backward_matches_finite_differences() {
    const TOL: f64 = 1e-6;
    let mut rng = Rng::from_env();
    for case in 0..common::random_cases(24) {
        let p = Fd::random(&mut rng);
        let g = p.grads();
        let label = |what: &str| {
            format!(
                "{what}, case {case} (m={} n={} k={} r={}, seed {})",
                p.m,
                p.n,
                p.k,
                p.r,
                rng.seed()
            )
        };
        for (wrt, got) in [
            (Wrt::X, &g.dx),
            (Wrt::A, &g.dw_down),
            (Wrt::B, &g.dw_up),
            (Wrt::Magnitude, &g.dmagnitude),
        ] {
            let fd = p.differences(wrt, true);
            let err = fd_error(got, &fd);
            assert!(err < TOL, "{}: error {err:.3e}", label(&format!("{wrt:?}")));
        }
        // Not detached, the norm's derivative joins A's and B's: far from the backward.
        let fd_b = p.differences(Wrt::B, false);
        assert!(
            fd_error(&g.dw_up, &fd_b) > 1e-3,
            "{}",
            label("B through the norm")
        );
        let norm = p.norms();
        let undivided: Vec<f64> = g
            .dmagnitude
            .iter()
            .zip(&norm)
            .map(|(v, nm)| v * nm)
            .collect();
        let fd_m = p.differences(Wrt::Magnitude, true);
        assert!(fd_error(&undivided, &fd_m) > 1e-3, "{}", label("dm·‖·‖"));
    }
}
