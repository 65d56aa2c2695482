//! DoRA (kernels/dora.cu) against its f64 reference (src/reference/dora.rs): the row norms,
//! the forward as `delta_linear` then `dora_scale`, merge and unmerge; every dtype, awkward
//! shapes, outputs poisoned with NaN.

mod common;

use common::{poisoned, Rng};
use half::{bf16, f16};
use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};
use peft_kernels::dora::{DoraDims, DoraMergeArgs, DoraNormArgs, DoraScaleArgs, DoraScaleDims};
use peft_kernels::host::{self, Backend};
use peft_kernels::reference::{self, MatRef};
use peft_kernels::validate::{assert_close, default_tolerance};
use peft_kernels::{Activation, Composition, DType, Element, Error, Insertion};

/// Shapes (m, n, k, r): 1, primes, non-multiples of every tile (the norm's 128 threads, the
/// scale's 256, the merge's 64 × 64 tiles and 16-wide rank chunks).
const SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 1, 1),
    (3, 5, 7, 2),
    (17, 33, 129, 4),
    (10, 64, 128, 16),
    (2, 97, 257, 17),
    (64, 130, 64, 8),
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
}

fn g_of<T: Element>(backend: &Backend, l: &Layer<T>, d: &DoraDims) -> Vec<f32> {
    let mut g = poisoned::<f32>(d.n);
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
        },
    )
    .unwrap();
    g
}

fn norms_and_forward<T: Element>(backend: &Backend, rng: &mut Rng) {
    let tol = default_tolerance(T::DTYPE);
    for (m, n, k, r) in SHAPES {
        let l = Layer::<T>::new(rng, n, k, r);
        let x: Vec<T> = rng.uniform_vec(m * k);
        let d = DoraDims { n, k, r };
        let label = format!("{} m={m} n={n} k={k} r={r}", T::DTYPE);
        let (wr, ar, br) = (
            MatRef::new(&l.w, n, k),
            MatRef::new(&l.a, r, k),
            MatRef::new(&l.b, n, r),
        );
        let s = l.s;
        // The norms are computed from f32 products of the stored values: f32-accurate in every
        // dtype (g is f32).
        let g = g_of(backend, &l, &d);
        let g_ref = reference::dora::dora_norm(wr, ar, br, &l.m, s).unwrap();
        assert_close(&format!("g {label}"), &g, &g_ref, 1e-5);
        // The forward: LoRA without the bias, then g and the bias per column.
        let dims = DeltaLinearDims::new(m, n, k, r);
        let mut ws = vec![T::default(); dims.workspace_len()];
        let mut y = poisoned::<T>(m * n);
        host::delta_linear(
            backend,
            &DeltaLinear::new(
                Insertion::Parallel,
                Activation::Identity,
                Composition::Scaled(l.s),
            ),
            &dims,
            DeltaLinearArgs {
                x: &x,
                w: &l.w,
                bias: None,
                u: None,
                w_down: &l.a,
                b_down: None,
                w_up: &l.b,
                b_up: None,
                gate: None,
                workspace: &mut ws,
                y: &mut y,
            },
        )
        .unwrap();
        // Stage 1, the LoRA pass without the bias: delta_linear, tested in full by
        // tests/delta_linear.rs; here over enough elements that the relative error is a
        // measure (a single element can cancel to nearly 0).
        let lora = DeltaLinear::new(
            Insertion::Parallel,
            Activation::Identity,
            Composition::Scaled(l.s),
        );
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
        let lora_ref = reference::delta_linear(&lora, &tensors).unwrap();
        if m * n >= 100 {
            assert_close(&format!("lora pass {label}"), &y, &lora_ref, tol);
        }
        // Stage 2, the new kernel: g ⊙ y + b from what the kernels gave it, each element
        // within a few roundings of T of its terms' magnitude (|g·y| + |b|), so a bias that
        // cancels g·y does not turn an exact rounding into a large relative error.
        let terms: Vec<(f64, f64)> = y
            .iter()
            .enumerate()
            .map(|(e, v)| (f64::from(g[e % n]) * v.to_f64(), l.bias[e % n].to_f64()))
            .collect();
        host::dora_scale(
            backend,
            &DoraScaleDims::new(m, n),
            DoraScaleArgs {
                y: &mut y,
                g: &g[..],
                bias: Some(&l.bias[..]),
            },
        )
        .unwrap();
        let eps = match T::DTYPE {
            DType::F32 => f64::from(f32::EPSILON),
            DType::F16 => f64::from(f16::EPSILON),
            DType::BF16 => f64::from(bf16::EPSILON),
        };
        for (e, (got, (gy, b))) in y.iter().zip(&terms).enumerate() {
            let err = (got.to_f64() - (gy + b)).abs();
            assert!(
                err <= 2.0 * eps * (gy.abs() + b.abs()),
                "scale {label} [{e}]: got {got:?}, expected {} (seed {})",
                gy + b,
                rng.seed()
            );
        }
        // End to end: y was rounded to T twice (after each stage), which for a handful of
        // elements (or one, where a bias can cancel most of g·y) can exceed the one-rounding
        // tolerance; over 100 or more elements it stays within it.
        let y_ref =
            reference::dora::dora_linear(MatRef::new(&x, m, k), wr, Some(&l.bias), ar, br, &l.m, s)
                .unwrap();
        if m * n >= 100 {
            assert_close(&format!("y {label}"), &y, &y_ref, tol);
        }
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
        let g = g_of(backend, &l, &d);
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

/// y is scaled in place on a strided output, and the elements between rows stay untouched.
fn strided_scale(backend: &Backend) {
    let mut rng = Rng::from_env();
    let (m, n, ld) = (5, 7, 11);
    let y0: Vec<f32> = rng.uniform_vec(m * ld);
    let g: Vec<f32> = rng.uniform_vec(n);
    let mut y = y0.clone();
    let dims = DoraScaleDims { m, n, ld_y: ld };
    host::dora_scale::<f32>(
        backend,
        &dims,
        DoraScaleArgs {
            y: &mut y,
            g: &g[..],
            bias: None,
        },
    )
    .unwrap();
    for (e, (&got, &before)) in y.iter().zip(&y0).enumerate() {
        let (i, j) = (e / ld, e % ld);
        let want = if j < n { before * g[j] } else { before };
        assert_eq!(got, want, "({i}, {j})");
    }
}

fn bad_arguments(backend: &Backend) {
    let (n, k, r) = (4, 6, 2);
    let (w, a, b, mag) = (
        vec![0.5f32; n * k],
        vec![0.1f32; r * k],
        vec![0.1f32; n * r],
        vec![1.0f32; n],
    );
    let mut g = vec![0.0f32; n];
    let err = host::dora_norm(
        backend,
        &DoraDims { n, k, r },
        1.0,
        DoraNormArgs {
            w: &w[..],
            w_down: &a,
            w_up: &b,
            magnitude: &mag[..n - 1],
            g: &mut g,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "dora_norm",
                arg: "magnitude",
                ..
            }
        ),
        "{err}"
    );
    let err = host::dora_norm(
        backend,
        &DoraDims { n, k, r: 3 },
        1.0,
        DoraNormArgs {
            w: &w[..],
            w_down: &a,
            w_up: &b,
            magnitude: &mag,
            g: &mut g,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "w_down", .. }),
        "{err}"
    );
    let err = host::dora_norm(
        backend,
        &DoraDims { n, k, r },
        f32::NAN,
        DoraNormArgs {
            w: &w[..],
            w_down: &a,
            w_up: &b,
            magnitude: &mag,
            g: &mut g,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "scale", .. }),
        "{err}"
    );
    let mut y = vec![0.0f32; 3 * n];
    let err = host::dora_scale::<f32>(
        backend,
        &DoraScaleDims::new(3, n),
        DoraScaleArgs {
            y: &mut y,
            g: &g[..n - 1],
            bias: None,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "dora_scale",
                arg: "g",
                ..
            }
        ),
        "{err}"
    );
    let err = host::dora_scale::<f32>(
        backend,
        &DoraScaleDims::new(4, n),
        DoraScaleArgs {
            y: &mut y,
            g: &g[..],
            bias: None,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "y", .. }),
        "{err}"
    );
    let mut w2 = w.clone();
    let err = host::dora_merge(
        backend,
        &DoraDims { n, k, r },
        1.0,
        false,
        DoraMergeArgs {
            w: &mut w2,
            w_down: &a[..],
            w_up: &b,
            g: &g[..1],
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "dora_merge",
                arg: "g",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(w2, w, "a refused merge leaves W as it was");
}

/// Each test body above, once per backend: the emulator always, the GPU when asked.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "emulator")]
        mod on_emulator {
            $(#[test]
            fn $name() {
                super::$name(&super::Backend::Emulator)
            })*
        }
        #[cfg(feature = "cuda")]
        mod on_gpu {
            $(#[test]
            #[ignore = "needs a CUDA device"]
            fn $name() {
                let gpu = super::Backend::cuda(0).expect("GPU tests need a CUDA device");
                super::$name(&gpu)
            })*
        }
    };
}

on_every_backend!(every_dtype, merges, strided_scale, bad_arguments);

/// The Rust twins of the kernels' parameter blocks have the C++ sizes.
#[cfg(feature = "emulator")]
#[test]
fn parameter_blocks_match_the_kernels() {
    unsafe extern "C" {
        fn pk_sizeof_DoraNormParams() -> usize;
        fn pk_sizeof_DoraScaleParams() -> usize;
    }
    use peft_kernels::plan::dora::{DoraNormParams, DoraScaleParams};
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
    }
}
