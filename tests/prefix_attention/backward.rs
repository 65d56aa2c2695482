//! The prefix-attention backward checks, written once over a `host::Backend`: the emulator
//! (tests/prefix_attention_backward.rs) and the GPU (tests/gpu_prefix_attention_backward.rs)
//! run the same suites against the f64 reference backward (src/reference/attention.rs).
//!
//! The kernels and the reference get the same inputs: the forward's output and LSE are the f64
//! reference's rounded to the storage types (so that the backward is checked on its own; the
//! `forward_then_backward` suite feeds it the forward kernel's instead), the inputs are NaN
//! wherever their shape does not reach, and every gradient buffer is NaN before the run, its
//! gaps still NaN after it.

use crate::common::{random_cases, Placed, Rng};
use crate::harness::{random_lens, Case, Inputs, Layout, Strided};
use half::{bf16, f16};
use peft_kernels::host::{self, Backend};
use peft_kernels::prefix_attention::{
    HeadLayout, PrefixAttentionBackwardArgs, PrefixAttentionBackwardDims, PrefixGrad, HEAD_DIMS,
};
use peft_kernels::reference::{self, PrefixAttentionGrads, Scalar};
use peft_kernels::validate::{self, assert_close, default_tolerance};
use peft_kernels::{DType, Element, Error, Result};

/// The gradient buffers of one run (dP_k, dP_v in T or in f32).
pub struct Grads<T, P> {
    pub dq: Strided<T>,
    pub dk: Strided<T>,
    pub dv: Strided<T>,
    pub dprefix_k: Strided<P>,
    pub dprefix_v: Strided<P>,
}

impl<T: Element, P: Element> Grads<T, P> {
    fn poisoned(dims: &PrefixAttentionBackwardDims) -> Self {
        let f = &dims.forward;
        let (b, hq, hkv, hd) = (f.batch, f.heads, f.kv_heads, f.head_dim);
        let pb = if dims.shared_prefix() { 1 } else { b };
        Grads {
            dq: Strided::poisoned(dims.dq, [b, hq, f.q_len, hd], 3),
            dk: Strided::poisoned(dims.dk, [b, hkv, f.kv_len, hd], 3),
            dv: Strided::poisoned(dims.dv, [b, hkv, f.kv_len, hd], 3),
            dprefix_k: Strided::poisoned(dims.dprefix_k, [pb, hkv, f.prefix_len, hd], 3),
            dprefix_v: Strided::poisoned(dims.dprefix_v, [pb, hkv, f.prefix_len, hd], 3),
        }
    }
}

/// What the backward reads besides the inputs: O and dO (strided like the output), L.
pub struct Saved<T> {
    pub out: Strided<T>,
    pub dout: Strided<T>,
    pub lse: Vec<f32>,
}

impl<T: Element> Saved<T> {
    /// The reference forward's output and LSE rounded to T and f32, and a random dO.
    pub fn from_reference(rng: &mut Rng, case: &Case, x: &Inputs<T>) -> Saved<T> {
        let r = reference::prefix_attention(&case.op(), &x.tensors(case))
            .unwrap_or_else(|e| panic!("{case:?}: reference: {e}"));
        let dims = case.dims();
        let shape = [case.batch, case.heads, case.q_len, case.head_dim];
        let mut out = Strided::<T>::poisoned(dims.out, shape, 5);
        for (at, &v) in out.offsets().into_iter().zip(&r.out) {
            out.data[at] = T::from_f64(v);
        }
        Saved {
            out,
            dout: Strided::random(rng, dims.out, shape, 1.0),
            lse: r.lse.iter().map(|&l| l as f32).collect(),
        }
    }
}

/// Runs the backward on `be` with the given saved tensors into poisoned gradients.
pub fn run_backward<T: Element, P: Element>(
    be: &Backend,
    case: &Case,
    x: &Inputs<T>,
    saved: &Saved<T>,
) -> Result<Grads<T, P>> {
    let dims = PrefixAttentionBackwardDims::new(case.dims());
    let mut g = Grads::<T, P>::poisoned(&dims);
    let mut workspace = vec![f32::NAN; dims.workspace_len()];
    let (dpk, dpv) = (&mut g.dprefix_k, &mut g.dprefix_v);
    let args = PrefixAttentionBackwardArgs {
        q: &x.q.data[..],
        k: &x.k.data[..],
        v: &x.v.data[..],
        prefix_k: &x.prefix_k.data[..],
        prefix_v: &x.prefix_v.data[..],
        context_lens: case.lens.as_deref(),
        out: &saved.out.data[..],
        lse: &saved.lse[..],
        dout: &saved.dout.data[..],
        dq: &mut g.dq.data[..],
        dk: &mut g.dk.data[..],
        dv: &mut g.dv.data[..],
        dprefix_k: prefix_grad(&mut dpk.data),
        dprefix_v: prefix_grad(&mut dpv.data),
        workspace: &mut workspace,
    };
    host::prefix_attention_backward(be, &case.op(), &dims, args)?;
    Ok(g)
}

/// A prefix gradient buffer as the argument: in T when P is T, else f32 (P is one of the
/// two: the casts are between identical types).
fn prefix_grad<T: Element, P: Element>(buf: &mut [P]) -> PrefixGrad<&mut [T], &mut [f32]> {
    if P::DTYPE == T::DTYPE {
        PrefixGrad::Elem(bytemuck::cast_slice_mut(buf))
    } else {
        assert_eq!(P::DTYPE, DType::F32, "dP in T or f32");
        PrefixGrad::F32(bytemuck::cast_slice_mut(buf))
    }
}

/// The reference backward on exactly what the kernels read, and the same with D = 0 (see
/// [`Expected`]).
fn reference_grads<T: Element>(case: &Case, x: &Inputs<T>, saved: &Saved<T>) -> Expected {
    Expected::new(
        case,
        x,
        &saved.out.gather(),
        &saved.lse,
        &saved.dout.gather(),
    )
}

/// The reference gradients, and beside them the gradients with D = rowsum(dO∘O) taken as 0:
/// the size of the terms whose difference ds = p·(dO·v − D) is. Where they cancel (a row that
/// sees one key only, a lone prefix key beside an empty context: p = 1 and dO·v = D, so
/// ds = 0), f32 arithmetic leaves ε of them (D and dO·v are summed in different orders),
/// which no tolerance relative to the exact ~0 can hold.
pub struct Expected {
    pub grads: PrefixAttentionGrads,
    pub uncancelled: PrefixAttentionGrads,
}

impl Expected {
    fn new<T: Element, O: Scalar, L: Scalar>(
        case: &Case,
        x: &Inputs<T>,
        out: &[O],
        lse: &[L],
        dout: &[T],
    ) -> Expected {
        let (op, t) = (case.op(), x.tensors(case));
        let failed = |e| panic!("{case:?}: reference backward: {e}");
        let zeros = vec![0.0f64; out.len()];
        Expected {
            grads: reference::prefix_attention_backward(&op, &t, out, lse, dout)
                .unwrap_or_else(failed),
            uncancelled: reference::prefix_attention_backward(&op, &t, &zeros, lse, dout)
                .unwrap_or_else(failed),
        }
    }
}

/// A gradient through ds (dq, dK, dP_k) against the reference: within `tol` of it, or, where ds
/// cancels, with an error within `tol` of the [`Expected::uncancelled`] gradient's norm (a
/// wrong or missing D is off by that norm itself, and caught).
#[track_caller]
fn assert_close_ds<E: Scalar>(
    name: &str,
    out: &[E],
    reference: &[f64],
    uncancelled: &[f64],
    tol: f64,
) {
    let c = validate::compare(name, out, reference, tol).unwrap();
    if c.passed() {
        return;
    }
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let err = norm(&mut out.iter().zip(reference).map(|(o, r)| o.as_f64() - r));
    let floor = tol * norm(&mut uncancelled.iter().copied());
    assert!(
        c.non_finite == 0 && err <= floor,
        "{c}\n  and ‖out − ref‖ = {err:.3e} > tol·‖the gradient with D = 0‖ = {floor:.3e}"
    );
}

/// Each gradient against the reference (dP_k, dP_v at `prefix_tol`), and the gaps of every
/// gradient buffer untouched.
fn compare<T: Element, P: Element>(name: &str, g: &Grads<T, P>, e: &Expected, prefix_tol: f64) {
    let (r, r0) = (&e.grads, &e.uncancelled);
    let tol = grad_tolerance(T::DTYPE);
    assert_close_ds(&format!("dq {name}"), &g.dq.gather(), &r.dq, &r0.dq, tol);
    assert_close_ds(&format!("dk {name}"), &g.dk.gather(), &r.dk, &r0.dk, tol);
    assert_close(&format!("dv {name}"), &g.dv.gather(), &r.dv, tol);
    let pk = &format!("dprefix_k {name}");
    let (gpk, (rpk, r0pk)) = (g.dprefix_k.gather(), (&r.dprefix_k, &r0.dprefix_k));
    assert_close_ds(pk, &gpk, rpk, r0pk, prefix_tol);
    let pv = &format!("dprefix_v {name}");
    assert_close(pv, &g.dprefix_v.gather(), &r.dprefix_v, prefix_tol);
    g.dq.assert_gaps_untouched(&format!("dq {name}"));
    g.dk.assert_gaps_untouched(&format!("dk {name}"));
    g.dv.assert_gaps_untouched(&format!("dv {name}"));
    g.dprefix_k.assert_gaps_untouched(pk);
    g.dprefix_v.assert_gaps_untouched(pv);
}

/// The gradients' tolerance: the forward's for the dtype (the gradients are rounded to it once,
/// after f32 accumulation), but 2e-5 in f32, where ds = p·(dO·v − D) subtracts two sums of d
/// products and dK, dV sum up to B·g·Lq such terms.
pub fn grad_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        d => default_tolerance(d),
    }
}

/// The kernels against the reference on one case, the prefix gradients in T.
pub fn check_backward<T: Element>(be: &Backend, rng: &mut Rng, case: &Case) {
    let x = Inputs::<T>::new(rng, case);
    let saved = Saved::from_reference(rng, case, &x);
    let g = run_backward::<T, T>(be, case, &x, &saved)
        .unwrap_or_else(|e| panic!("{} {case:?}: {e}", T::DTYPE));
    let name = format!("{} {case:?} (seed {})", T::DTYPE, rng.seed());
    compare(
        &name,
        &g,
        &reference_grads(case, &x, &saved),
        grad_tolerance(T::DTYPE),
    );
}

/// The same with f32 prefix gradients: only f32 arithmetic separates them from the reference,
/// whatever T (the f32 tolerance, not T's).
pub fn check_backward_f32_prefix<T: Element>(be: &Backend, rng: &mut Rng, case: &Case) {
    let x = Inputs::<T>::new(rng, case);
    let saved = Saved::from_reference(rng, case, &x);
    let g = run_backward::<T, f32>(be, case, &x, &saved)
        .unwrap_or_else(|e| panic!("{} {case:?}: {e}", T::DTYPE));
    let name = format!("{} with f32 dP {case:?} (seed {})", T::DTYPE, rng.seed());
    compare(
        &name,
        &g,
        &reference_grads(case, &x, &saved),
        grad_tolerance(DType::F32),
    );
}

/// A case of the grid: q_len, kv_len ∈ {1, 17, 65, 129}, l ∈ {1, 30}, batch 1–3,
/// GQA 8/2 or MQA (8/1), causal or not, ragged lengths, strided, shared prefix at random.
fn grid_case(rng: &mut Rng, d: usize) -> Case {
    let lens = [1, 17, 65, 129];
    let batch = rng.range(1, 3);
    let kv_heads = rng.pick(&[2, 1]);
    let kv_len = rng.pick(&lens);
    let mut c = Case::new(
        batch,
        8,
        kv_heads,
        rng.pick(&lens),
        kv_len,
        rng.pick(&[1, 30]),
        d,
    )
    .causal(rng.chance(0.5));
    if rng.chance(0.4) {
        c = c.lens(random_lens(rng, batch, kv_len));
    }
    if rng.chance(0.3) {
        c = c.layout(Layout::Strided);
    }
    c.shared_prefix = rng.chance(0.3);
    c
}

// ---------------------------------------------------------------------------------------
// The suites.

/// Every head dim in every dtype, one case of the grid each (random every run): 18 cases.
pub fn every_head_dim_and_dtype(be: &Backend) {
    let mut rng = Rng::from_env();
    for d in HEAD_DIMS {
        let case = grid_case(&mut rng, d);
        check_backward::<f32>(be, &mut rng, &case);
        let case = grid_case(&mut rng, d);
        check_backward::<f16>(be, &mut rng, &case);
        let case = grid_case(&mut rng, d);
        check_backward::<bf16>(be, &mut rng, &case);
    }
}

/// [`grid_case`]s at random head dims and dtypes: 6 unless `PEFT_RANDOM_CASES` says.
pub fn random_configurations(be: &Backend) {
    let mut rng = Rng::from_env();
    for i in 0..random_cases(6) {
        let d = rng.pick(&HEAD_DIMS);
        let case = grid_case(&mut rng, d);
        match i % 4 {
            0 => check_backward::<f32>(be, &mut rng, &case),
            1 => check_backward::<f16>(be, &mut rng, &case),
            2 => check_backward::<bf16>(be, &mut rng, &case),
            _ => check_backward_f32_prefix::<bf16>(be, &mut rng, &case),
        }
    }
}

/// The shapes the kernels' tiles find awkward, fixed: the largest of the grid (129 queries and
/// keys, l = 30, 3 sequences) causal with ragged lengths (one empty) and a shared prefix; a
/// strided layout; decode (q_len = 1) against 129 keys; l = 1 with one key; an explicit scale.
pub fn awkward_shapes(be: &Backend) {
    let mut rng = Rng::from_env();
    let big = Case {
        shared_prefix: true,
        ..Case::new(3, 8, 2, 129, 129, 30, 64)
            .causal(true)
            .lens(vec![129, 0, 70])
    };
    check_backward::<bf16>(be, &mut rng, &big);
    check_backward::<f32>(
        be,
        &mut rng,
        &Case {
            head_dim: 32,
            ..big
        },
    );
    let strided = Case::new(2, 8, 1, 65, 17, 30, 96)
        .causal(true)
        .layout(Layout::Strided);
    check_backward::<f16>(be, &mut rng, &strided);
    let decode = Case::new(3, 8, 2, 1, 129, 30, 128).lens(vec![129, 1, 64]);
    check_backward::<bf16>(be, &mut rng, &decode);
    check_backward::<f32>(
        be,
        &mut rng,
        &Case::new(1, 8, 1, 17, 1, 1, 256).causal(true),
    );
    // An explicit score scale (τ enters dq and dK).
    let scaled = Case {
        scale: Some(0.3),
        ..Case::new(2, 4, 2, 17, 30, 5, 32).causal(true)
    };
    check_backward::<f32>(be, &mut rng, &scaled);
}

/// Rows that see nothing (no prefix, causal with Lq > the context): zero dq, never NaN; keys
/// nobody sees and padding keys: zero dK, dV.
pub fn rows_that_see_nothing(be: &Backend) {
    let mut rng = Rng::from_env();
    let case = Case::new(2, 2, 1, 40, 17, 0, 64)
        .causal(true)
        .lens(vec![0, 10]);
    check_backward::<f32>(be, &mut rng, &case);
    let x = Inputs::<bf16>::new(&mut rng, &case);
    let saved = Saved::from_reference(&mut rng, &case, &x);
    let g = run_backward::<bf16, bf16>(be, &case, &x, &saved).unwrap();
    let (dq, dk) = (g.dq.gather(), g.dk.gather());
    assert!(dq.iter().all(|v| v.to_f64().is_finite()), "dq not finite");
    // Sequence 0 sees nothing at all.
    assert!(dq[..2 * 40 * 64].iter().all(|v| v.to_f64() == 0.0));
    assert!(dk[..17 * 64].iter().all(|v| v.to_f64() == 0.0));
    // Sequence 1: keys 10.. are padding.
    assert!(dk[(17 + 10) * 64..].iter().all(|v| v.to_f64() == 0.0));
}

/// The f32 option for the prefix gradients, per-sequence and shared prefix, f16 and bf16.
pub fn f32_prefix_gradients(be: &Backend) {
    let mut rng = Rng::from_env();
    let case = Case::new(2, 8, 2, 33, 40, 30, 64).causal(true);
    check_backward_f32_prefix::<bf16>(be, &mut rng, &case);
    let shared = Case {
        shared_prefix: true,
        ..Case::new(3, 4, 4, 17, 20, 30, 128)
    };
    check_backward_f32_prefix::<f16>(be, &mut rng, &shared);
}

/// The training contract: the forward kernel's own output and LSE, fed to the backward kernel,
/// give the reference backward's gradients (computed from the reference forward's O and L),
/// so the forward returns L in the form the backward needs (natural log, scaled scores, f32).
pub fn forward_then_backward(be: &Backend) {
    let mut rng = Rng::from_env();
    for case in [
        Case::new(2, 4, 2, 37, 50, 30, 64)
            .causal(true)
            .lens(vec![50, 20]),
        Case::new(1, 8, 1, 1, 90, 30, 128),
    ] {
        let x = Inputs::<f32>::new(&mut rng, &case);
        let dims = case.dims();
        let shape = [case.batch, case.heads, case.q_len, case.head_dim];
        let mut out = Strided::<f32>::poisoned(dims.out, shape, 5);
        let mut lse = vec![f32::NAN; dims.rows()];
        let args = x.args(&case, &mut out.data, Some(&mut lse), None, None);
        host::prefix_attention(be, &case.op(), &dims, args).unwrap();
        let saved = Saved {
            out,
            dout: Strided::random(&mut rng, dims.out, shape, 1.0),
            lse,
        };
        let g = run_backward::<f32, f32>(be, &case, &x, &saved).unwrap();
        let r = reference::prefix_attention(&case.op(), &x.tensors(&case)).unwrap();
        let want = Expected::new(&case, &x, &r.out, &r.lse, &saved.dout.gather());
        let name = format!("forward then backward {case:?} (seed {})", rng.seed());
        compare(&name, &g, &want, 1e-4);
    }
}

/// Host slices of any alignment (a `Vec<bf16>` promises 2 bytes): every tensor, gradient and
/// the workspace one element past a 16-byte boundary give the aligned run's gradients bit for
/// bit, in every dtype.
pub fn misaligned_buffers(be: &Backend) {
    fn each<T: Element + Default>(be: &Backend, rng: &mut Rng) {
        let d = rng.pick(&[32, 64, 96]);
        let case = grid_case(rng, d);
        let x = Inputs::<T>::new(rng, &case);
        let saved = Saved::from_reference(rng, &case, &x);
        let want = run_backward::<T, T>(be, &case, &x, &saved)
            .unwrap_or_else(|e| panic!("{} {case:?}: {e}", T::DTYPE));
        let dims = PrefixAttentionBackwardDims::new(case.dims());
        let mut g = Grads::<T, T>::poisoned(&dims);
        let read = |s: &Strided<T>| Placed::misaligned(&s.data);
        let (q, k, v) = (read(&x.q), read(&x.k), read(&x.v));
        let (pk, pv) = (read(&x.prefix_k), read(&x.prefix_v));
        let (out, dout) = (read(&saved.out), read(&saved.dout));
        let lse = Placed::misaligned(&saved.lse);
        let (mut dq, mut dk, mut dv) = (read(&g.dq), read(&g.dk), read(&g.dv));
        let (mut dpk, mut dpv) = (read(&g.dprefix_k), read(&g.dprefix_v));
        let mut workspace = Placed::misaligned(&vec![f32::NAN; dims.workspace_len()]);
        let args = PrefixAttentionBackwardArgs {
            q: q.get(),
            k: k.get(),
            v: v.get(),
            prefix_k: pk.get(),
            prefix_v: pv.get(),
            context_lens: case.lens.as_deref(),
            out: out.get(),
            lse: lse.get(),
            dout: dout.get(),
            dq: dq.get_mut(),
            dk: dk.get_mut(),
            dv: dv.get_mut(),
            dprefix_k: PrefixGrad::Elem(dpk.get_mut()),
            dprefix_v: PrefixGrad::Elem(dpv.get_mut()),
            workspace: workspace.get_mut(),
        };
        host::prefix_attention_backward(be, &case.op(), &dims, args)
            .unwrap_or_else(|e| panic!("misaligned {} {case:?}: {e}", T::DTYPE));
        dq.copy_to(&mut g.dq.data);
        dk.copy_to(&mut g.dk.data);
        dv.copy_to(&mut g.dv.data);
        dpk.copy_to(&mut g.dprefix_k.data);
        dpv.copy_to(&mut g.dprefix_v.data);
        for (name, got, want) in [
            ("dq", &g.dq, &want.dq),
            ("dk", &g.dk, &want.dk),
            ("dv", &g.dv, &want.dv),
            ("dprefix_k", &g.dprefix_k, &want.dprefix_k),
            ("dprefix_v", &g.dprefix_v, &want.dprefix_v),
        ] {
            let bits = |s: &Strided<T>| bytemuck::cast_slice::<T, u8>(&s.data).to_vec();
            assert!(
                bits(got) == bits(want),
                "{name} of misaligned {} {case:?} (seed {}) differs from the aligned run",
                T::DTYPE,
                rng.seed()
            );
        }
    }
    let mut rng = Rng::from_env();
    each::<f32>(be, &mut rng);
    each::<f16>(be, &mut rng);
    each::<bf16>(be, &mut rng);
}

/// Bad arguments: the forward's checks, the saved tensors' and the gradients' shapes, and
/// gradient buffers that alias an input or each other, each an `Err` naming the argument.
pub fn bad_arguments_are_errors(be: &Backend) {
    let case = Case::new(2, 4, 2, 5, 6, 3, 32);
    let mut rng = Rng::from_env();
    let x = Inputs::<f32>::new(&mut rng, &case);
    let saved = Saved::from_reference(&mut rng, &case, &x);
    let good = PrefixAttentionBackwardDims::new(case.dims());
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let (qn, kn, pn) = (n([2, 4, 5, 32]), n([2, 2, 6, 32]), n([2, 2, 3, 32]));
    type Edit<'e> = &'e dyn Fn(&mut PrefixAttentionBackwardDims, &mut [usize; 7]);
    // Runs with buffer lengths [dq, dk, dv, dprefix_k, dprefix_v, workspace, lse] after `edit`.
    let run = |lens_of_context: Option<&[u32]>, edit: Edit| -> Result<()> {
        let mut dims = good;
        let mut lens = [qn, kn, kn, pn, pn, 40, 40];
        edit(&mut dims, &mut lens);
        let mut bufs: Vec<Vec<f32>> = lens[..6].iter().map(|&l| vec![f32::NAN; l]).collect();
        let [dq, dk, dv, dpk, dpv, ws] = &mut bufs[..] else {
            unreachable!()
        };
        let args = PrefixAttentionBackwardArgs {
            q: &x.q.data[..],
            k: &x.k.data[..],
            v: &x.v.data[..],
            prefix_k: &x.prefix_k.data[..],
            prefix_v: &x.prefix_v.data[..],
            context_lens: lens_of_context,
            out: &saved.out.data[..],
            lse: &saved.lse[..lens[6]],
            dout: &saved.dout.data[..],
            dq: dq.as_mut_slice(),
            dk: dk.as_mut_slice(),
            dv: dv.as_mut_slice(),
            dprefix_k: PrefixGrad::Elem(dpk.as_mut_slice()),
            dprefix_v: PrefixGrad::F32(dpv.as_mut_slice()),
            workspace: ws.as_mut_slice(),
        };
        host::prefix_attention_backward(be, &case.op(), &dims, args)
    };
    run(None, &|_, _| {}).expect("the unedited case runs");
    let expect = |what: &str, r: Result<()>| match r {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, what, "{r:?}"),
        other => panic!("{what}: expected an invalid-argument error, got {other:?}"),
    };
    expect(
        "dims.head_dim",
        run(None, &|d, _| {
            d.forward.head_dim = 48;
            d.forward.value_dim = 48;
        }),
    );
    expect("dims.kv_heads", run(None, &|d, _| d.forward.kv_heads = 3));
    expect("q", run(None, &|d, _| d.forward.q_len = 6));
    expect("out", run(None, &|d, _| d.forward.out.batch += 10));
    expect("dout", run(None, &|d, _| d.dout.seq = 40));
    expect("lse", run(None, &|_, l| l[6] -= 1));
    expect("dq", run(None, &|_, l| l[0] -= 1));
    expect("dk", run(None, &|_, l| l[1] -= 1));
    expect("dprefix_v", run(None, &|_, l| l[4] -= 1));
    expect("workspace", run(None, &|_, l| l[5] = 39));
    // Two rows of a gradient on one address.
    expect("dq", run(None, &|d, _| d.dq.seq = 16));
    expect("dprefix_k", run(None, &|d, _| d.dprefix_k.head = 0));
    // A sequence length past kv_len, and a length per sequence missing.
    expect("context_lens", run(Some(&[7, 2]), &|_, _| {}));
    expect("context_lens", run(Some(&[2]), &|_, _| {}));
    // One prefix tensor shared by the batch and the other not.
    expect(
        "dims.forward.prefix_v",
        run(None, &|d, _| d.forward.prefix_k.batch = 0),
    );
    // No query rows with sequences would owe zero key gradients, which no kernel writes:
    // refused. An empty batch (no sequences, every gradient empty) is checked and launches
    // nothing, as every operation's.
    expect("dims.q_len", run(None, &|d, _| d.forward.q_len = 0));
    run(None, &|d, l| {
        d.forward.batch = 0;
        (l[5], l[6]) = (0, 0);
    })
    .expect("an empty batch is Ok");
}

/// The split form trains: `prefix_only_attention`'s part and a context attention of one's own,
/// merged by `lse_merge`, each backpropagated on its own against the MERGED output, LSE and
/// dO (the host composition `lse_merge_backward` documents): the prefix part is our backward
/// with no context (kv_len = 0), the context part our backward with no prefix (l = 0), and
/// their dq add up. Equal to the fused backward's reference: dP_k, dP_v, dK, dV and dq.
pub fn split_form_trains(be: &Backend) {
    let mut rng = Rng::from_env();
    for case in [
        Case::new(2, 4, 2, 33, 40, 30, 64)
            .causal(true)
            .lens(vec![40, 5]),
        Case {
            shared_prefix: true,
            ..Case::new(3, 2, 1, 1, 70, 7, 128)
        },
    ] {
        let x = Inputs::<f32>::new(&mut rng, &case);
        let saved = Saved::from_reference(&mut rng, &case, &x);
        let r = reference_grads(&case, &x, &saved).grads;
        let name = format!("split form {case:?} (seed {})", rng.seed());
        let (tol, full) = (grad_tolerance(DType::F32), case.dims());
        let part = |forward: peft_kernels::prefix_attention::PrefixAttentionDims,
                    prefix: bool|
         -> Grads<f32, f32> {
            let dims = PrefixAttentionBackwardDims::new(forward);
            let mut g = Grads::<f32, f32>::poisoned(&dims);
            let mut workspace = vec![f32::NAN; dims.workspace_len()];
            let none: &[f32] = &[];
            let args = PrefixAttentionBackwardArgs {
                q: &x.q.data[..],
                k: if prefix { none } else { &x.k.data[..] },
                v: if prefix { none } else { &x.v.data[..] },
                prefix_k: if prefix { &x.prefix_k.data[..] } else { none },
                prefix_v: if prefix { &x.prefix_v.data[..] } else { none },
                context_lens: if prefix { None } else { case.lens.as_deref() },
                out: &saved.out.data[..],
                lse: &saved.lse[..],
                dout: &saved.dout.data[..],
                dq: &mut g.dq.data[..],
                dk: &mut g.dk.data[..],
                dv: &mut g.dv.data[..],
                dprefix_k: PrefixGrad::Elem(&mut g.dprefix_k.data[..]),
                dprefix_v: PrefixGrad::Elem(&mut g.dprefix_v.data[..]),
                workspace: &mut workspace[..],
            };
            host::prefix_attention_backward(be, &case.op(), &dims, args)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            g
        };
        let gp = part(
            peft_kernels::prefix_attention::PrefixAttentionDims { kv_len: 0, ..full },
            true,
        );
        let gc = part(
            peft_kernels::prefix_attention::PrefixAttentionDims {
                prefix_len: 0,
                ..full
            },
            false,
        );
        assert_close(
            &format!("dprefix_k {name}"),
            &gp.dprefix_k.gather(),
            &r.dprefix_k,
            tol,
        );
        assert_close(
            &format!("dprefix_v {name}"),
            &gp.dprefix_v.gather(),
            &r.dprefix_v,
            tol,
        );
        assert_close(&format!("dk {name}"), &gc.dk.gather(), &r.dk, tol);
        assert_close(&format!("dv {name}"), &gc.dv.gather(), &r.dv, tol);
        let dq: Vec<f32> = gp
            .dq
            .gather()
            .iter()
            .zip(gc.dq.gather())
            .map(|(a, b)| a + b)
            .collect();
        assert_close(&format!("dq {name}"), &dq, &r.dq, tol);
    }
}

/// `lse_merge_backward` against the reference on rows with infinite LSEs (an empty state's
/// output is NaN garbage, never read) and ordinary ones, d = 37 (not a multiple of a warp), the
/// states and gradients `[B, L, H, d]` (strided as heads), NaN-poisoned gradients.
pub fn check_merge_backward<T: Element>(be: &Backend, rng: &mut Rng) {
    use peft_kernels::prefix_attention::{
        LseMergeBackwardArgs, LseMergeBackwardDims, LseMergeDims,
    };
    let inf = f32::INFINITY;
    let pairs = [
        (-inf, -inf),
        (-inf, 0.5),
        (1.5, -inf),
        (40.0, -40.0),
        (0.25, 0.25),
        (3.0, -1.0),
    ];
    let (b, h, len, d) = (2, 3, pairs.len(), 37);
    let rows = b * h * len;
    let layout = HeadLayout::bshd(len, h, d);
    let dims = LseMergeBackwardDims::new(LseMergeDims {
        o_prefix: layout,
        o_context: layout,
        out: layout,
        ..LseMergeDims::new(b, h, len, d)
    });
    let shape = [b, h, len, d];
    let lse_p: Vec<f32> = (0..rows).map(|r| pairs[r % len].0).collect();
    let lse_c: Vec<f32> = (0..rows).map(|r| pairs[r % len].1).collect();
    let (mut op, mut oc) = (
        Strided::<T>::random(rng, layout, shape, 1.0),
        Strided::<T>::random(rng, layout, shape, 1.0),
    );
    let dout = Strided::<T>::random(rng, layout, shape, 1.0);
    // An empty state's output: garbage.
    for (t, prefix) in [(&mut op, true), (&mut oc, false)] {
        let offsets = t.offsets();
        for (e, at) in offsets.into_iter().enumerate() {
            let (lp, lc) = pairs[e / d % len];
            if (if prefix { lp } else { lc }) == -inf {
                t.data[at] = T::nan();
            }
        }
    }
    let mut dp = Strided::<T>::poisoned(layout, shape, 2);
    let mut dc = Strided::<T>::poisoned(layout, shape, 2);
    let (mut dlp, mut dlc) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
    host::lse_merge_backward(
        be,
        &dims,
        LseMergeBackwardArgs {
            o_prefix: &op.data[..],
            lse_prefix: &lse_p[..],
            o_context: &oc.data[..],
            lse_context: &lse_c[..],
            dout: &dout.data[..],
            do_prefix: &mut dp.data[..],
            dlse_prefix: &mut dlp[..],
            do_context: &mut dc.data[..],
            dlse_context: &mut dlc[..],
        },
    )
    .unwrap();
    let r = reference::lse_merge_backward(
        d,
        &op.gather(),
        &lse_p,
        &oc.gather(),
        &lse_c,
        &dout.gather(),
    )
    .unwrap();
    let name = format!("lse_merge_backward {} (seed {})", T::DTYPE, rng.seed());
    let tol = default_tolerance(T::DTYPE);
    assert_close(
        &format!("do_prefix {name}"),
        &dp.gather(),
        &r.do_prefix,
        tol,
    );
    assert_close(
        &format!("do_context {name}"),
        &dc.gather(),
        &r.do_context,
        tol,
    );
    // The LSE gradients sum d products of rounded inputs in f32.
    assert_close(&format!("dlse_prefix {name}"), &dlp, &r.dlse_prefix, 1e-5);
    assert_close(&format!("dlse_context {name}"), &dlc, &r.dlse_context, 1e-5);
    dp.assert_gaps_untouched(&name);
    dc.assert_gaps_untouched(&name);
}

pub fn merge_backward(be: &Backend) {
    let mut rng = Rng::from_env();
    check_merge_backward::<f32>(be, &mut rng);
    check_merge_backward::<f16>(be, &mut rng);
    check_merge_backward::<bf16>(be, &mut rng);
}
