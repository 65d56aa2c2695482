//! AdamW (`kernels/optim.cu`) against the f64 reference: several steps over lists of
//! tensors of awkward lengths, every T dtype, clipping on and off with the reported norm,
//! NaN-poisoned T copies, and the validation errors. The same suite runs on the GPU in the
//! ignored twins at the end (`cargo test --release --features cuda --test optim --
//! --ignored`).

mod common;

use common::{poisoned, random_cases, Rng};
use half::{bf16, f16};
use peft_kernels::host::{self, Backend};
use peft_kernels::optim::{AdamW, AdamwArgs, AdamwTensor};
use peft_kernels::plan::optim::{self as plan, AdamwBufs, AdamwTensorBufs, CHUNK};
use peft_kernels::plan::Buf;
use peft_kernels::reference::optim::{adamw as reference, AdamwState};
use peft_kernels::{DType, Element, Error};

/// One tensor's state on both sides: the kernel's f32 buffers and the reference's f64 ones.
struct Tensor<T> {
    param: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    param_t: Vec<T>,
    ref_param: Vec<f64>,
    ref_m: Vec<f64>,
    ref_v: Vec<f64>,
    start: Vec<f64>,
}

impl<T: Element> Tensor<T> {
    fn new(rng: &mut Rng, len: usize) -> Self {
        let param: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
        let ref_param: Vec<f64> = param.iter().map(|&p| f64::from(p)).collect();
        Tensor {
            m: vec![0.0; len],
            v: vec![0.0; len],
            param_t: poisoned(len),
            ref_m: vec![0.0; len],
            ref_v: vec![0.0; len],
            start: ref_param.clone(),
            ref_param,
            param,
        }
    }
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).powi(2))
        .sum();
    let n: f64 = want.iter().map(|w| w * w).sum();
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

/// Runs `steps` AdamW steps of `op` on `backend` and the reference over tensors of `lens`,
/// with fresh gradients (of standard deviation `grad_std`) each step, and checks every
/// state, the T copies and the reported norm.
fn check<T: Element>(
    backend: &Backend,
    rng: &mut Rng,
    op: &AdamW,
    lens: &[usize],
    steps: u64,
    grad_std: f64,
    report_norm: bool,
) {
    let what = format!(
        "{:?}, lens {lens:?}, {op:?}, norm {report_norm} (PEFT_SEED={})",
        T::DTYPE,
        rng.seed()
    );
    let mut tensors: Vec<Tensor<T>> = lens.iter().map(|&n| Tensor::new(rng, n)).collect();
    for step in 1..=steps {
        let grads: Vec<Vec<f32>> = lens
            .iter()
            .map(|&n| (0..n).map(|_| (grad_std * rng.normal()) as f32).collect())
            .collect();
        let grads64: Vec<Vec<f64>> = grads
            .iter()
            .map(|g| g.iter().map(|&x| f64::from(x)).collect())
            .collect();
        let mut states: Vec<AdamwState> = tensors
            .iter_mut()
            .zip(&grads64)
            .map(|(t, g)| AdamwState {
                param: &mut t.ref_param,
                grad: g,
                m: &mut t.ref_m,
                v: &mut t.ref_v,
            })
            .collect();
        let want_norm = reference(op, step, &mut states).unwrap();
        drop(states);

        let mut norm = [f32::NAN];
        for t in tensors.iter_mut() {
            t.param_t = poisoned(t.param.len());
        }
        let args = AdamwArgs {
            tensors: tensors
                .iter_mut()
                .zip(&grads)
                .map(|(t, g)| AdamwTensor {
                    param: &mut t.param[..],
                    grad: &g[..],
                    m: &mut t.m[..],
                    v: &mut t.v[..],
                    param_t: &mut t.param_t[..],
                })
                .collect(),
            grad_norm: report_norm.then_some(&mut norm[..]),
        };
        host::adamw::<T>(backend, op, step, args).unwrap_or_else(|e| panic!("{what}: {e}"));

        if report_norm {
            let err = (f64::from(norm[0]) - want_norm).abs() / want_norm.max(1e-30);
            assert!(
                err < 1e-6,
                "{what}, step {step}: norm {} vs {want_norm}",
                norm[0]
            );
        } else {
            assert!(
                norm[0].is_nan(),
                "{what}: the norm was written without being asked for"
            );
        }
        for (i, t) in tensors.iter().enumerate() {
            let at = format!("{what}, step {step}, tensor {i}");
            // m = β1·m + (1 − β1)·g may cancel (one element of opposite signs): its error is
            // relative to the magnitudes it was computed from.
            let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let m_err = l2(&t
                .m
                .iter()
                .zip(&t.ref_m)
                .map(|(&a, b)| f64::from(a) - b)
                .collect::<Vec<_>>());
            let m_scale = l2(&t.ref_m) + l2(&grads64[i]);
            assert!(
                m_err <= 1e-5 * m_scale,
                "{at}: m error {m_err:e} of {m_scale:e}"
            );
            assert!(
                rel_err(&t.v, &t.ref_v) < 1e-5,
                "{at}: v {}",
                rel_err(&t.v, &t.ref_v)
            );
            // The parameters move by about lr a step, so a comparison of the parameters
            // alone would drown the update in their size: the error must be within 1e-4 of
            // the total update, plus what storing the f32 master rounds away (half an ulp
            // a step).
            let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
            let err = norm(
                &mut t
                    .param
                    .iter()
                    .zip(&t.ref_param)
                    .map(|(&p, r)| f64::from(p) - r),
            );
            let moved = norm(&mut t.ref_param.iter().zip(&t.start).map(|(p, s)| p - s));
            let rounding = step as f64 * 2f64.powi(-24) * norm(&mut t.ref_param.iter().copied());
            assert!(
                err <= 1e-4 * moved + rounding,
                "{at}: parameter error {err:e}, update {moved:e}, rounding {rounding:e}"
            );
            for (j, (&p, &c)) in t.param.iter().zip(&t.param_t).enumerate() {
                assert_eq!(
                    c.to_f32().to_bits(),
                    T::from_f32(p).to_f32().to_bits(),
                    "{at}: param_t[{j}] is not the rounded master"
                );
            }
        }
    }
}

/// Lengths around the chunk boundaries, primes, 1, and an empty tensor in the list.
const AWKWARD: [&[usize]; 4] = [&[1], &[17, 0, 2047, 2048, 2049, 1], &[6007, 3, 4099], &[0]];

fn suite(backend: &Backend) {
    let mut rng = Rng::from_env();
    for lens in AWKWARD {
        for clip in [None, Some(0.5), Some(1e6)] {
            let op = AdamW {
                lr: 1e-2,
                weight_decay: 0.1,
                max_grad_norm: clip,
                ..AdamW::default()
            };
            check::<f32>(backend, &mut rng, &op, lens, 4, 1.0, true);
            check::<f16>(backend, &mut rng, &op, lens, 3, 1.0, clip.is_some());
            check::<bf16>(backend, &mut rng, &op, lens, 3, 1.0, false);
        }
    }
    // Fresh hyperparameters and shapes each run.
    for _ in 0..random_cases(6) {
        let op = AdamW {
            lr: rng.uniform(1e-4, 0.1) as f32,
            beta1: rng.pick(&[0.0, 0.5, 0.9, 0.95]),
            beta2: rng.pick(&[0.9, 0.99, 0.999]),
            eps: rng.pick(&[1e-8, 1e-6, 1e-3]),
            weight_decay: rng.pick(&[0.0, 0.01, 0.3]),
            max_grad_norm: rng.chance(0.5).then(|| rng.uniform(0.1, 10.0) as f32),
        };
        let lens: Vec<usize> = (0..rng.range(1, 5)).map(|_| rng.range(0, 5000)).collect();
        let std = rng.pick(&[1e-3, 1.0, 30.0]);
        let norm = rng.chance(0.5);
        match rng.range(0, 2) {
            0 => check::<f32>(backend, &mut rng, &op, &lens, 5, std, norm),
            1 => check::<f16>(backend, &mut rng, &op, &lens, 5, std, norm),
            _ => check::<bf16>(backend, &mut rng, &op, &lens, 5, std, norm),
        }
    }
}

#[test]
fn adamw_matches_the_reference_on_the_emulator() {
    suite(&Backend::Emulator);
}

#[test]
fn clipping_scales_the_step_to_the_max_norm() {
    // With every gradient the same vector scaled, a clipped step equals an unclipped one
    // on the gradient rescaled to the max norm: the coefficient is max / (‖g‖ + 1e-6).
    let mut rng = Rng::from_env();
    let n = 3000;
    let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let norm = g.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let max = 0.25f32;
    let coef = (f64::from(max) / (norm + 1e-6)) as f32;
    let scaled: Vec<f32> = g.iter().map(|&x| x * coef).collect();
    let run = |op: &AdamW, grad: &[f32]| {
        let (mut p, mut m, mut v) = (vec![0.5f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        let mut p_t = poisoned::<f32>(n);
        let mut reported = [f32::NAN];
        let args = AdamwArgs {
            tensors: vec![AdamwTensor {
                param: &mut p[..],
                grad,
                m: &mut m[..],
                v: &mut v[..],
                param_t: &mut p_t[..],
            }],
            grad_norm: Some(&mut reported[..]),
        };
        peft_kernels::emulator::adamw(op, 1, args).unwrap();
        (p, m, reported[0])
    };
    let clipped = AdamW {
        max_grad_norm: Some(max),
        ..AdamW::default()
    };
    let (p1, m1, reported) = run(&clipped, &g);
    let (p2, m2, _) = run(&AdamW::default(), &scaled);
    assert!(
        (f64::from(reported) - norm).abs() < 1e-6 * norm,
        "reported {reported} vs {norm}"
    );
    assert!(rel_err(&m1, &m2.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()) < 1e-6);
    assert!(rel_err(&p1, &p2.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()) < 1e-6);
}

#[test]
fn the_step_and_the_norm_do_not_depend_on_how_blocks_are_scheduled() {
    // The norm's partials are per block and summed in a fixed order, so spreading the
    // blocks over several emulator workers (any completion order) changes no bit.
    let mut rng = Rng::from_env();
    let lens = [5000, 1, 2049, 7000];
    let grads: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| (rng.normal() * 1e3) as f32).collect())
        .collect();
    let start: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| rng.normal() as f32).collect())
        .collect();
    let op = AdamW {
        max_grad_norm: Some(1.0),
        ..AdamW::default()
    };
    let run = |workers: u32| {
        peft_kernels::emulator::set_workers(workers);
        let mut params = start.clone();
        let mut ms: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let mut vs = ms.clone();
        let mut copies: Vec<Vec<f16>> = lens.iter().map(|&n| poisoned(n)).collect();
        let mut norm = [f32::NAN];
        let tensors = params
            .iter_mut()
            .zip(&grads)
            .zip(ms.iter_mut().zip(vs.iter_mut()))
            .zip(copies.iter_mut())
            .map(|(((p, g), (m, v)), c)| AdamwTensor {
                param: &mut p[..],
                grad: &g[..],
                m: &mut m[..],
                v: &mut v[..],
                param_t: &mut c[..],
            })
            .collect();
        let args = AdamwArgs {
            tensors,
            grad_norm: Some(&mut norm[..]),
        };
        let r = peft_kernels::emulator::adamw(&op, 1, args);
        peft_kernels::emulator::set_workers(0);
        r.unwrap();
        (norm[0].to_bits(), params)
    };
    let (norm1, params1) = run(1);
    let (norm4, params4) = run(4);
    assert_eq!(norm1, norm4);
    assert_eq!(params1, params4);
}

#[test]
fn an_empty_list_is_a_no_op_with_norm_zero() {
    let mut norm = [f32::NAN];
    let args: AdamwArgs<&[f32], &mut [f32], &mut [bf16]> = AdamwArgs {
        tensors: vec![],
        grad_norm: Some(&mut norm[..]),
    };
    let op = AdamW {
        max_grad_norm: Some(1.0),
        ..AdamW::default()
    };
    peft_kernels::emulator::adamw(&op, 1, args).unwrap();
    assert_eq!(norm[0], 0.0);
}

fn buf(addr: u64, len: usize) -> Buf {
    Buf { addr, len }
}

/// A tensor's buffers at synthetic, disjoint addresses (the plan only compares them).
fn tensor_bufs(base: u64, len: usize) -> AdamwTensorBufs {
    let stride = 4 * len as u64 + 64;
    AdamwTensorBufs {
        param: buf(base, len),
        grad: buf(base + stride, len),
        m: buf(base + 2 * stride, len),
        v: buf(base + 3 * stride, len),
        param_t: buf(base + 4 * stride, len),
    }
}

fn plan_error(op: &AdamW, step: u64, dtype: DType, b: &AdamwBufs) -> (String, String) {
    match plan::adamw(op, step, dtype, b) {
        Err(e @ Error::InvalidArgument { arg, .. }) => (arg.to_string(), e.to_string()),
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

#[test]
fn bad_hyperparameters_are_errors_naming_them() {
    let b = AdamwBufs {
        tensors: vec![tensor_bufs(0x10000, 100)],
        grad_norm: None,
    };
    let d = AdamW::default();
    let cases: Vec<(AdamW, u64, &str)> = vec![
        (AdamW { lr: -1e-3, ..d }, 1, "lr"),
        (AdamW { lr: f32::NAN, ..d }, 1, "lr"),
        (
            AdamW {
                lr: f32::INFINITY,
                ..d
            },
            1,
            "lr",
        ),
        (AdamW { beta1: 1.0, ..d }, 1, "beta1"),
        (AdamW { beta1: -0.1, ..d }, 1, "beta1"),
        (AdamW { beta2: 1.0, ..d }, 1, "beta2"),
        (
            AdamW {
                beta2: f32::NAN,
                ..d
            },
            1,
            "beta2",
        ),
        (AdamW { eps: 0.0, ..d }, 1, "eps"),
        (
            AdamW {
                eps: f32::INFINITY,
                ..d
            },
            1,
            "eps",
        ),
        (
            AdamW {
                weight_decay: -0.5,
                ..d
            },
            1,
            "weight_decay",
        ),
        (
            AdamW {
                weight_decay: f32::NAN,
                ..d
            },
            1,
            "weight_decay",
        ),
        (
            AdamW {
                max_grad_norm: Some(0.0),
                ..d
            },
            1,
            "max_grad_norm",
        ),
        (
            AdamW {
                max_grad_norm: Some(f32::NAN),
                ..d
            },
            1,
            "max_grad_norm",
        ),
        (d, 0, "step"),
    ];
    for (op, step, arg) in cases {
        let (got, msg) = plan_error(&op, step, DType::F32, &b);
        assert_eq!(got, arg, "{msg}");
        assert!(msg.starts_with("adamw: "), "{msg}");
    }
    // The reference refuses the same.
    let mut st = [AdamwState {
        param: &mut [0.0][..],
        grad: &[0.0],
        m: &mut [0.0][..],
        v: &mut [0.0][..],
    }];
    assert!(reference(&AdamW { beta2: 1.0, ..d }, 1, &mut st).is_err());
}

#[test]
fn length_mismatches_are_errors_naming_the_buffer() {
    let op = AdamW::default();
    for (field, arg) in [
        (1, "tensors.grad"),
        (2, "tensors.m"),
        (3, "tensors.v"),
        (4, "tensors.param_t"),
    ] {
        let mut t = tensor_bufs(0x10000, 100);
        let target = match field {
            1 => &mut t.grad,
            2 => &mut t.m,
            3 => &mut t.v,
            _ => &mut t.param_t,
        };
        target.len = 99;
        let b = AdamwBufs {
            tensors: vec![tensor_bufs(0x100000, 5), t],
            grad_norm: None,
        };
        let (got, msg) = plan_error(&op, 1, DType::BF16, &b);
        assert_eq!(got, arg, "{msg}");
        assert!(
            msg.contains("tensors[1]") && msg.contains("100") && msg.contains("99"),
            "{msg}"
        );
    }
    let b = AdamwBufs {
        tensors: vec![tensor_bufs(0x10000, 100)],
        grad_norm: Some(buf(0x900000, 0)),
    };
    assert_eq!(plan_error(&op, 1, DType::F32, &b).0, "grad_norm");
}

#[test]
fn overlapping_buffers_are_errors_and_disjoint_ones_are_not() {
    let op = AdamW::default();
    let ok = |b: &AdamwBufs, dtype| plan::adamw(&op, 1, dtype, b).map(|_| ());
    let base = || AdamwBufs {
        tensors: vec![tensor_bufs(0x10000, 100), tensor_bufs(0x20000, 50)],
        grad_norm: Some(buf(0x30000, 1)),
    };
    ok(&base(), DType::F32).unwrap();

    // Two tensors sharing one gradient: read only, allowed.
    let mut b = base();
    b.tensors[1].grad = buf(b.tensors[0].grad.addr, 50);
    ok(&b, DType::F32).unwrap();

    // A f16 copy ends exactly where the next buffer starts: adjacent, allowed; one element
    // more (f32-sized) would overlap.
    let mut b = base();
    b.tensors[0].param_t = buf(b.tensors[1].param.addr - 200, 100);
    ok(&b, DType::F16).unwrap();
    let (arg, msg) = plan_error(&op, 1, DType::F32, &b);
    assert_eq!(arg, "tensors");
    assert!(
        msg.contains("tensors[0].param_t overlaps tensors[1].param"),
        "{msg}"
    );

    type Mutation = fn(&mut AdamwBufs);
    let cases: [(Mutation, &str); 5] = [
        (|b| b.tensors[0].m = b.tensors[0].v, "tensors[0].m"),
        (
            |b| b.tensors[1].v = buf(b.tensors[0].param.addr + 8, 50),
            "tensors[1].v",
        ),
        (
            |b| b.tensors[0].grad = buf(b.tensors[1].m.addr + 4, 100),
            "tensors[0].grad",
        ),
        (
            |b| b.grad_norm = Some(buf(b.tensors[1].v.addr + 4 * 49, 1)),
            "grad_norm",
        ),
        (
            |b| b.tensors[1].param = buf(b.tensors[0].param.addr, 50),
            "tensors[1].param",
        ),
    ];
    for (mutate, name) in cases {
        let mut b = base();
        mutate(&mut b);
        let (arg, msg) = plan_error(&op, 1, DType::F32, &b);
        assert_eq!(arg, "tensors");
        assert!(msg.contains(name) && msg.contains("overlaps"), "{msg}");
    }
    // Empty buffers overlap nothing (a zero-length tensor's slices may share an address).
    let mut b = base();
    b.tensors.push(tensor_bufs(0x10000, 0));
    ok(&b, DType::F32).unwrap();
}

#[test]
fn the_block_map_covers_every_chunk_once() {
    let lens = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5];
    let b = AdamwBufs {
        tensors: lens
            .iter()
            .enumerate()
            .map(|(i, &n)| tensor_bufs(0x100_0000 * (i as u64 + 1), n))
            .collect(),
        grad_norm: None,
    };
    let p = plan::adamw(&AdamW::default(), 1, DType::F16, &b).unwrap();
    let t = lens.len();
    let blocks: usize = lens.iter().map(|n| n.div_ceil(CHUNK)).sum();
    assert_eq!(p.table.len(), 6 * t + 2 * blocks + 1);
    let map: Vec<(u32, u32)> = p.table[6 * t..6 * t + blocks]
        .iter()
        .map(|&w| (w as u32, (w >> 32) as u32))
        .collect();
    let mut want = Vec::new();
    for (i, &n) in lens.iter().enumerate() {
        want.extend((0..n.div_ceil(CHUNK) as u32).map(|c| (i as u32, c)));
        assert_eq!(p.table[6 * i + 5], n as u64);
    }
    assert_eq!(map, want);
    // No norm asked for and no clipping: the update alone, one block a chunk.
    let steps = p.steps(0x1000);
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].0.grid, [blocks as u32, 1, 1]);
    assert_eq!(steps[0].1.clip, 0);
}

#[test]
fn params_size_matches_the_cxx_struct() {
    unsafe extern "C" {
        fn pk_sizeof_AdamwParams() -> usize;
    }
    // SAFETY: returns a constant.
    assert_eq!(
        unsafe { pk_sizeof_AdamwParams() },
        size_of::<plan::AdamwParams>()
    );
}

#[cfg(feature = "cuda")]
mod on_gpu {
    use super::*;

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_adamw_matches_the_reference() {
        suite(&Backend::cuda(0).expect("a CUDA device"));
    }

    /// The device entry point over cudarc buffers, one step against the host one.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_cuda_adamw_matches_the_emulator() {
        use peft_kernels::cuda;
        let stream = cuda::context(0).expect("a CUDA device").default_stream();
        let mut rng = Rng::from_env();
        let n = 5000;
        let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let p0: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let op = AdamW {
            max_grad_norm: Some(1.0),
            ..AdamW::default()
        };
        let (mut p, mut m, mut v, mut pt) =
            (p0.clone(), vec![0.0; n], vec![0.0; n], poisoned::<bf16>(n));
        let mut norm = [0.0f32];
        let args = AdamwArgs {
            tensors: vec![AdamwTensor {
                param: &mut p[..],
                grad: &g[..],
                m: &mut m[..],
                v: &mut v[..],
                param_t: &mut pt[..],
            }],
            grad_norm: Some(&mut norm[..]),
        };
        peft_kernels::emulator::adamw(&op, 1, args).unwrap();

        let mut dp = stream.clone_htod(&p0).unwrap();
        let dg = stream.clone_htod(&g).unwrap();
        let mut dm = stream.alloc_zeros::<f32>(n).unwrap();
        let mut dv = stream.alloc_zeros::<f32>(n).unwrap();
        let mut dpt = stream.alloc_zeros::<bf16>(n).unwrap();
        let mut dnorm = stream.alloc_zeros::<f32>(1).unwrap();
        let args = AdamwArgs {
            tensors: vec![AdamwTensor {
                param: &mut dp as cuda::DeviceWrite<f32>,
                grad: &dg as cuda::DeviceRead<f32>,
                m: &mut dm as cuda::DeviceWrite<f32>,
                v: &mut dv as cuda::DeviceWrite<f32>,
                param_t: &mut dpt as cuda::DeviceWrite<bf16>,
            }],
            grad_norm: Some(&mut dnorm as cuda::DeviceWrite<f32>),
        };
        cuda::adamw(&stream, &op, 1, args).unwrap();
        let gp = stream.clone_dtoh(&dp).unwrap();
        let gpt = stream.clone_dtoh(&dpt).unwrap();
        let gnorm = stream.clone_dtoh(&dnorm).unwrap();
        assert_eq!(gnorm[0].to_bits(), norm[0].to_bits(), "deterministic norm");
        assert!(rel_err(&gp, &p.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()) < 1e-6);
        assert!(gpt.iter().zip(&gp).all(|(&c, &w)| c == bf16::from_f32(w)));
    }
}
