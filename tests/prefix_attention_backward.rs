//! Prefix attention's backward: the f64 reference (src/reference/attention.rs) against central
//! finite differences of the f64 forward reference, with mutations the check must catch; then
//! the emulator's kernels against the reference (the suites of
//! prefix_attention/backward.rs, which the GPU runs too: tests/gpu_prefix_attention_backward.rs).

#[path = "prefix_attention/backward.rs"]
mod backward;
mod common;
// The forward's harness: its cases, inputs and strided buffers (its suites are not run here).
#[allow(dead_code)]
#[path = "prefix_attention/harness.rs"]
mod harness;

use common::Rng;
use peft_kernels::host::Backend;
use peft_kernels::reference::{
    self, PrefixAttention, PrefixAttentionGrads, PrefixAttentionTensors, Tensor4,
};

/// A small problem in f64, contiguous (the prefix `[1, Hkv, l, d]` with batch stride 0 when
/// shared), with a random output gradient.
struct Small {
    op: PrefixAttention,
    shape_q: [usize; 4],
    shape_kv: [usize; 4],
    shape_p: [usize; 4],
    shared: bool,
    lens: Option<Vec<u32>>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pk: Vec<f64>,
    pv: Vec<f64>,
    dout: Vec<f64>,
}

impl Small {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        (b, hq, hkv): (usize, usize, usize),
        (lq, lk, l, d): (usize, usize, usize, usize),
        causal: bool,
        lens: Option<Vec<u32>>,
        shared: bool,
    ) -> Small {
        let pb = if shared { 1 } else { b };
        let mut normal = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f64>>();
        Small {
            op: PrefixAttention {
                scale: None,
                causal,
            },
            shape_q: [b, hq, lq, d],
            shape_kv: [b, hkv, lk, d],
            shape_p: [b, hkv, l, d],
            shared,
            lens,
            q: normal(b * hq * lq * d),
            k: normal(b * hkv * lk * d),
            v: normal(b * hkv * lk * d),
            pk: normal(pb * hkv * l * d),
            pv: normal(pb * hkv * l * d),
            dout: normal(b * hq * lq * d),
        }
    }

    fn tensors<'a>(&'a self, [q, k, v, pk, pv]: [&'a [f64]; 5]) -> PrefixAttentionTensors<'a, f64> {
        let prefix = |data: &'a [f64]| {
            let mut t = Tensor4::contiguous(data, self.shape_p);
            if self.shared {
                t.strides[0] = 0;
            }
            t
        };
        PrefixAttentionTensors {
            q: Tensor4::contiguous(q, self.shape_q),
            k: Tensor4::contiguous(k, self.shape_kv),
            v: Tensor4::contiguous(v, self.shape_kv),
            prefix_k: prefix(pk),
            prefix_v: prefix(pv),
            context_lens: self.lens.as_deref(),
        }
    }

    fn inputs(&self) -> [&[f64]; 5] {
        [&self.q, &self.k, &self.v, &self.pk, &self.pv]
    }

    /// Σ dout·out of the forward reference on these inputs.
    fn loss(&self, x: [&[f64]; 5]) -> f64 {
        let r = reference::prefix_attention(&self.op, &self.tensors(x)).unwrap();
        r.out.iter().zip(&self.dout).map(|(o, g)| o * g).sum()
    }

    /// Central differences of [`Small::loss`] for every element of every input, in the
    /// order of [`PrefixAttentionGrads`].
    fn finite_differences(&self) -> PrefixAttentionGrads {
        const H: f64 = 1e-5;
        let base = self.inputs().map(|t| t.to_vec());
        let mut grads: Vec<Vec<f64>> = Vec::new();
        for which in 0..5 {
            let mut g = vec![0.0; base[which].len()];
            for (e, ge) in g.iter_mut().enumerate() {
                let mut x = base.clone();
                x[which][e] += H;
                let plus = self.loss(x.each_ref().map(|t| &t[..]));
                x[which][e] -= 2.0 * H;
                let minus = self.loss(x.each_ref().map(|t| &t[..]));
                *ge = (plus - minus) / (2.0 * H);
            }
            grads.push(g);
        }
        let [dq, dk, dv, dprefix_k, dprefix_v] = grads.try_into().unwrap();
        PrefixAttentionGrads {
            dq,
            dk,
            dv,
            dprefix_k,
            dprefix_v,
        }
    }

    /// The reference backward given `out` and `lse` (the forward's, unless a test swaps them).
    fn backward(&self, out: &[f64], lse: &[f64]) -> PrefixAttentionGrads {
        reference::prefix_attention_backward(
            &self.op,
            &self.tensors(self.inputs()),
            out,
            lse,
            &self.dout,
        )
        .unwrap()
    }

    fn forward(&self) -> reference::PrefixAttentionOutput {
        reference::prefix_attention(&self.op, &self.tensors(self.inputs())).unwrap()
    }
}

/// The largest relative error ‖a − b‖ / ‖b‖ over the five gradients (a gradient that is all
/// zero must be matched to 1e-12 absolutely), and the name of the worst.
fn worst(a: &PrefixAttentionGrads, b: &PrefixAttentionGrads) -> (f64, &'static str) {
    let pairs = [
        ("dq", &a.dq, &b.dq),
        ("dk", &a.dk, &b.dk),
        ("dv", &a.dv, &b.dv),
        ("dprefix_k", &a.dprefix_k, &b.dprefix_k),
        ("dprefix_v", &a.dprefix_v, &b.dprefix_v),
    ];
    let mut worst = (0.0, "");
    for (name, x, y) in pairs {
        assert_eq!(x.len(), y.len(), "{name}: length");
        assert!(x.iter().all(|v| v.is_finite()), "{name}: not finite");
        let diff = x
            .iter()
            .zip(y.iter())
            .map(|(p, q)| (p - q).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = y.iter().map(|q| q * q).sum::<f64>().sqrt();
        let err = if norm < 1e-9 {
            diff / 1e-3
        } else {
            diff / norm
        };
        if err > worst.0 {
            worst = (err, name);
        }
    }
    worst
}

/// Finite differences are accurate to ~1e-9 here (h = 1e-5, f64, smooth in every input).
const FD_TOL: f64 = 1e-6;

fn fd_cases(rng: &mut Rng) -> Vec<(&'static str, Small)> {
    vec![
        // Causal with ragged lengths: a sequence with no context (its rows see only the
        // prefix) and rows before the context starts.
        (
            "gqa causal ragged",
            Small::new(rng, (2, 4, 2), (5, 4, 3, 4), true, Some(vec![0, 3]), false),
        ),
        // No prefix: the first rows see nothing at all (lse = −∞, zero gradients).
        (
            "all-masked rows",
            Small::new(rng, (2, 2, 1), (6, 4, 0, 3), true, Some(vec![4, 2]), false),
        ),
        // l = 1, multi-query, one prefix for the batch.
        (
            "l = 1 shared mqa",
            Small::new(rng, (3, 3, 1), (4, 5, 1, 4), false, None, true),
        ),
        // Decoding: one query per sequence, more keys than queries; a per-sequence prefix.
        (
            "decode",
            Small::new(rng, (2, 2, 2), (1, 7, 2, 5), true, Some(vec![7, 1]), false),
        ),
        // Only a prefix.
        (
            "prefix only",
            Small::new(rng, (1, 2, 1), (3, 0, 4, 4), false, None, false),
        ),
    ]
}

#[test]
fn reference_backward_matches_finite_differences() {
    let mut rng = Rng::from_env();
    for (name, s) in fd_cases(&mut rng) {
        let f = s.forward();
        let analytic = s.backward(&f.out, &f.lse);
        let (err, which) = worst(&analytic, &s.finite_differences());
        assert!(
            err < FD_TOL,
            "{name}: {which} off by {err:e} (seed {})",
            rng.seed()
        );
    }
}

/// Rows that see nothing get dq = 0 exactly, not NaN, and give no key a gradient.
#[test]
fn reference_backward_rows_that_see_nothing() {
    let mut rng = Rng::from_env();
    let s = Small::new(
        &mut rng,
        (1, 1, 1),
        (6, 4, 0, 3),
        true,
        Some(vec![2]),
        false,
    );
    let f = s.forward();
    assert!(f.lse[..4].iter().all(|&l| l == f64::NEG_INFINITY));
    let g = s.backward(&f.out, &f.lse);
    assert!(g.dq[..4 * 3].iter().all(|&v| v == 0.0));
    assert!(g.dq[4 * 3..].iter().any(|&v| v != 0.0));
    // Keys 2 and 3 are padding: no gradient.
    assert!(g.dk[2 * 3..]
        .iter()
        .chain(&g.dv[2 * 3..])
        .all(|&v| v == 0.0));
}

/// The check has teeth: the mistakes a backward makes are caught by the finite differences.
/// Using the context part's own LSE instead of the merged one (TRAINING.md's warning), an
/// output from slightly different inputs (D = dO·O off), or one gradient element off by 1e-4
/// of the gradient's norm.
#[test]
fn reference_backward_mutations_are_caught() {
    let mut rng = Rng::from_env();
    let s = Small::new(
        &mut rng,
        (2, 4, 2),
        (5, 6, 3, 4),
        true,
        Some(vec![6, 3]),
        false,
    );
    let f = s.forward();
    let fd = s.finite_differences();
    let (err, _) = worst(&s.backward(&f.out, &f.lse), &fd);
    assert!(err < FD_TOL, "the unmutated backward: {err:e}");

    let context_lse: Vec<f64> = f
        .lse_context
        .iter()
        .zip(&f.lse)
        .map(|(&c, &m)| if c == f64::NEG_INFINITY { m } else { c })
        .collect();
    let (err, _) = worst(&s.backward(&f.out, &context_lse), &fd);
    assert!(err > 1e-2, "the part's own LSE went unnoticed: {err:e}");

    let off: Vec<f64> = f.out.iter().map(|o| o * (1.0 + 1e-3)).collect();
    let (err, _) = worst(&s.backward(&off, &f.lse), &fd);
    assert!(err > 10.0 * FD_TOL, "a wrong D went unnoticed: {err:e}");

    let mut g = s.backward(&f.out, &f.lse);
    let norm = g.dprefix_v.iter().map(|v| v * v).sum::<f64>().sqrt();
    g.dprefix_v[1] += 1e-4 * norm;
    let (err, which) = worst(&g, &fd);
    assert!(
        err > 10.0 * FD_TOL && which == "dprefix_v",
        "a wrong element: {err:e} {which}"
    );
}

/// The LSE merge's backward against central differences of the merge: mixed rows, a row whose
/// prefix state is empty, one whose context state is empty, both empty, a far-apart pair.
#[test]
fn lse_merge_backward_matches_finite_differences() {
    let mut rng = Rng::from_env();
    let inf = f64::NEG_INFINITY;
    let lses = [
        (0.3, -0.2),
        (inf, 1.0),
        (2.0, inf),
        (inf, inf),
        (1.5, 1.5),
        (9.0, -9.0),
    ];
    let (rows, dv) = (lses.len(), 5);
    let lp: Vec<f64> = lses.iter().map(|l| l.0).collect();
    let lc: Vec<f64> = lses.iter().map(|l| l.1).collect();
    let op = rng.uniform_f64(rows * dv);
    let oc = rng.uniform_f64(rows * dv);
    let dout = rng.uniform_f64(rows * dv);
    let loss = |op: &[f64], lp: &[f64], oc: &[f64], lc: &[f64]| -> f64 {
        let m = reference::lse_merge(dv, op, lp, oc, lc).unwrap();
        m.out.iter().zip(&dout).map(|(o, g)| o * g).sum()
    };
    let g = reference::lse_merge_backward(dv, &op, &lp, &oc, &lc, &dout).unwrap();
    const H: f64 = 1e-6;
    let fd = |x: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
        (0..x.len())
            .map(|e| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[e] += H;
                b[e] -= H;
                (f(&a) - f(&b)) / (2.0 * H)
            })
            .collect()
    };
    let checks = [
        (
            "do_prefix",
            &g.do_prefix,
            fd(&op, &|x| loss(x, &lp, &oc, &lc)),
        ),
        (
            "dlse_prefix",
            &g.dlse_prefix,
            fd(&lp, &|x| loss(&op, x, &oc, &lc)),
        ),
        (
            "do_context",
            &g.do_context,
            fd(&oc, &|x| loss(&op, &lp, x, &lc)),
        ),
        (
            "dlse_context",
            &g.dlse_context,
            fd(&lc, &|x| loss(&op, &lp, &oc, x)),
        ),
    ];
    for (name, got, want) in checks {
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-7, "{name}[{i}]: {a} vs {b}");
        }
    }
    // The far-apart row still mixes: its gate gradient is tiny but not dropped.
    assert!(g.dlse_prefix[5] != 0.0);
}

// ---------------------------------------------------------------------------------------
// The emulator's kernels against the reference backward.

const EMU: Backend = Backend::Emulator;

#[test]
fn every_head_dim_and_dtype() {
    backward::every_head_dim_and_dtype(&EMU);
}

#[test]
fn random_configurations() {
    backward::random_configurations(&EMU);
}

#[test]
fn awkward_shapes() {
    backward::awkward_shapes(&EMU);
}

#[test]
fn rows_that_see_nothing() {
    backward::rows_that_see_nothing(&EMU);
}

#[test]
fn f32_prefix_gradients() {
    backward::f32_prefix_gradients(&EMU);
}

#[test]
fn forward_then_backward() {
    backward::forward_then_backward(&EMU);
}

#[test]
fn split_form_trains() {
    backward::split_form_trains(&EMU);
}

#[test]
fn lse_merge_backward() {
    backward::merge_backward(&EMU);
}

#[test]
fn misaligned_buffers() {
    backward::misaligned_buffers(&EMU);
}

#[test]
fn bad_arguments_are_errors() {
    backward::bad_arguments_are_errors(&EMU);
}

/// The Rust twin of the kernels' parameter block has the C++ layout.
#[test]
fn parameter_block_matches_the_kernels() {
    unsafe extern "C" {
        fn pk_sizeof_PrefixAttentionBackwardParams() -> usize;
    }
    // SAFETY: returns a constant.
    let size = unsafe { pk_sizeof_PrefixAttentionBackwardParams() };
    assert_eq!(
        size,
        std::mem::size_of::<peft_kernels::plan::prefix_attention::PrefixAttentionBackwardParams>()
    );
}

/// No float atomics, no order-dependent reduction: the gradients are bitwise the same when the
/// emulator spreads the blocks over several worker threads (a shared prefix, whose gradient
/// sums the batch, and GQA, which sums a group's heads).
#[test]
fn deterministic_over_workers() {
    use half::bf16;
    let mut rng = Rng::from_env();
    let case = harness::Case {
        shared_prefix: true,
        ..harness::Case::new(3, 4, 1, 40, 50, 30, 64).causal(true)
    };
    let x = harness::Inputs::<bf16>::new(&mut rng, &case);
    let saved = backward::Saved::from_reference(&mut rng, &case, &x);
    let bits = |workers: u32| {
        peft_kernels::emulator::set_workers(workers);
        let g = backward::run_backward::<bf16, f32>(&EMU, &case, &x, &saved);
        peft_kernels::emulator::set_workers(0);
        let g = g.unwrap();
        let mut v: Vec<u32> = g.dq.data.iter().map(|e| u32::from(e.to_bits())).collect();
        v.extend(
            g.dk.data
                .iter()
                .chain(&g.dv.data)
                .map(|e| u32::from(e.to_bits())),
        );
        v.extend(
            g.dprefix_k
                .data
                .iter()
                .chain(&g.dprefix_v.data)
                .map(|e| e.to_bits()),
        );
        v
    };
    assert_eq!(bits(1), bits(2), "the gradients depend on the block order");
}
