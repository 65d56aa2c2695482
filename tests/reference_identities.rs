//! The identities of the unified view, checked on the f64 references with fresh random
//! inputs (seed printed on failure, `PEFT_SEED` to reproduce). Each identity compares two
//! independently written computations, so a wrong index in either fails it.

mod common;

use common::Rng;
use half::{bf16, f16};
use peft_kernels::reference::{
    context_attention, delta_linear, delta_linear_concat, linear, lora_merge, lse_merge,
    multi_head_adapter, prefix_attention, prefix_attention_concat, prefix_only_attention, widen,
    DeltaLinear, DeltaLinearTensors, MatRef, MultiHeadAdapter, MultiHeadAdapterTensors,
    PrefixAttention, PrefixAttentionTensors, Tensor4,
};
use peft_kernels::spec::erf;
use peft_kernels::validate::assert_close;
use peft_kernels::{Activation, Composition, Element, Error, Insertion};

/// Two f64 computations of the same value in different orders agree to this.
const EXACT: f64 = 1e-12;

/// One of `sizes`, or half the time any size in 1..=max.
fn pick_or_any(rng: &mut Rng, sizes: &[usize], max: usize) -> usize {
    if rng.chance(0.5) {
        rng.pick(sizes)
    } else {
        rng.range(1, max)
    }
}

// ---------------------------------------------------------------------------------------
// Prefix attention
// ---------------------------------------------------------------------------------------

/// One attention problem, with buffers laid out as a test asked.
struct AttnCase {
    batch: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    l: usize,
    d: usize,
    dv: usize,
    op: PrefixAttention,
    lens: Option<Vec<u32>>,
    /// Q, K, V stored [B, L, H, d] (the flash-attention layout) instead of [B, H, L, d].
    seq_major: bool,
    /// One prefix [Hkv, l, d] for the whole batch (batch stride 0).
    shared_prefix: bool,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pk: Vec<f32>,
    pv: Vec<f32>,
}

impl AttnCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        batch: usize,
        (hq, hkv): (usize, usize),
        (lq, lk, l): (usize, usize, usize),
        (d, dv): (usize, usize),
        causal: bool,
        lens: Option<Vec<u32>>,
    ) -> AttnCase {
        let shared_prefix = rng.chance(0.5);
        let pb = if shared_prefix { 1 } else { batch };
        // Scores of a few units: softmax weights spread over orders of magnitude.
        let q = rng.normal_vec(batch * hq * lq * d, 1.5);
        AttnCase {
            batch,
            hq,
            hkv,
            lq,
            lk,
            l,
            d,
            dv,
            op: PrefixAttention {
                scale: if rng.chance(0.5) {
                    None
                } else {
                    Some(rng.uniform(0.05, 1.0) as f32)
                },
                causal,
            },
            lens,
            seq_major: rng.chance(0.5),
            shared_prefix,
            q,
            k: rng.normal_vec(batch * hkv * lk * d, 1.0),
            v: rng.uniform_vec(batch * hkv * lk * dv),
            pk: rng.normal_vec(pb * hkv * l * d, 1.0),
            pv: rng.uniform_vec(pb * hkv * l * dv),
        }
    }

    fn random(rng: &mut Rng) -> AttnCase {
        let hkv = rng.range(1, 3);
        let hq = hkv * rng.pick(&[1, 2, 4]);
        let batch = rng.range(1, 3);
        let lk = rng.range(0, 40);
        let lq = if rng.chance(0.3) { 1 } else { rng.range(1, 40) };
        let l = pick_or_any(rng, &[0, 1, 3], 70);
        let lens = rng
            .chance(0.5)
            .then(|| (0..batch).map(|_| rng.range(0, lk) as u32).collect());
        let (d, dv) = (rng.range(1, 48), rng.range(1, 48));
        let causal = rng.chance(0.6);
        AttnCase::new(rng, batch, (hq, hkv), (lq, lk, l), (d, dv), causal, lens)
    }

    /// Edge cases every run checks besides the random ones.
    fn edges(rng: &mut Rng) -> Vec<AttnCase> {
        vec![
            // No prefix; one sequence fully padded (rows that see nothing at all).
            AttnCase::new(rng, 2, (4, 2), (5, 9, 0), (16, 16), true, Some(vec![0, 7])),
            // A long prefix, short context, GQA 8:2.
            AttnCase::new(rng, 2, (8, 2), (6, 4, 64), (32, 24), true, None),
            // Decode: one query, padded KV cache, MQA.
            AttnCase::new(
                rng,
                3,
                (4, 1),
                (1, 33, 10),
                (64, 64),
                true,
                Some(vec![33, 1, 17]),
            ),
            // More queries than context: early rows see only the prefix (λ = 1).
            AttnCase::new(rng, 1, (2, 2), (12, 5, 3), (8, 5), true, None),
            // Empty context (Lk = 0).
            AttnCase::new(rng, 2, (3, 3), (4, 0, 7), (7, 3), false, None),
            // Head dim 1, non-causal, padding.
            AttnCase::new(rng, 2, (2, 1), (3, 6, 2), (1, 1), false, Some(vec![6, 2])),
        ]
    }

    fn qkv_tensor<'a>(
        &self,
        data: &'a [f32],
        heads: usize,
        len: usize,
        dim: usize,
    ) -> Tensor4<'a, f32> {
        let shape = [self.batch, heads, len, dim];
        if self.seq_major {
            Tensor4::strided(data, shape, [len * heads * dim, dim, heads * dim, 1])
        } else {
            Tensor4::contiguous(data, shape)
        }
    }

    fn prefix_tensor<'a>(&self, data: &'a [f32], dim: usize) -> Tensor4<'a, f32> {
        let shape = [self.batch, self.hkv, self.l, dim];
        let t = Tensor4::contiguous(data, shape);
        if self.shared_prefix {
            Tensor4::strided(data, shape, [0, t.strides[1], t.strides[2], 1])
        } else {
            t
        }
    }

    fn tensors(&self) -> PrefixAttentionTensors<'_, f32> {
        PrefixAttentionTensors {
            q: self.qkv_tensor(&self.q, self.hq, self.lq, self.d),
            k: self.qkv_tensor(&self.k, self.hkv, self.lk, self.d),
            v: self.qkv_tensor(&self.v, self.hkv, self.lk, self.dv),
            prefix_k: self.prefix_tensor(&self.pk, self.d),
            prefix_v: self.prefix_tensor(&self.pv, self.dv),
            context_lens: self.lens.as_deref(),
        }
    }

    /// Whether query row `row` sees any context key, written from the definition.
    fn sees_context(&self, row: usize) -> bool {
        let (b, i) = (row / (self.hq * self.lq), row % self.lq);
        let len = self.lens.as_ref().map_or(self.lk, |l| l[b] as usize);
        // Key 0 is the first any query can see.
        len > 0 && (!self.op.causal || i + len >= self.lq)
    }

    fn label(&self) -> String {
        format!(
            "B={} Hq={} Hkv={} Lq={} Lk={} l={} d={} dv={} causal={} lens={:?} seq_major={} shared_prefix={}",
            self.batch,
            self.hq,
            self.hkv,
            self.lq,
            self.lk,
            self.l,
            self.d,
            self.dv,
            self.op.causal,
            self.lens,
            self.seq_major,
            self.shared_prefix
        )
    }
}

fn attention_cases(rng: &mut Rng) -> Vec<AttnCase> {
    let mut cases = AttnCase::edges(rng);
    cases.extend((0..12).map(|_| AttnCase::random(rng)));
    cases
}

#[test]
fn prefix_attention_equals_attention_over_the_concatenation() {
    let mut rng = Rng::from_env();
    for case in attention_cases(&mut rng) {
        let name = case.label();
        let fused = prefix_attention(&case.op, &case.tensors()).unwrap();
        let concat = prefix_attention_concat(&case.op, &case.tensors()).unwrap();
        assert_close(&format!("out, {name}"), &fused.out, &concat.out, EXACT);
        assert_close(&format!("lse, {name}"), &fused.lse, &concat.lse, EXACT);
        // Rows that see nothing are exactly 0 with LSE -inf, never NaN.
        for (row, &lse) in fused.lse.iter().enumerate() {
            let empty = case.l == 0 && !case.sees_context(row);
            assert_eq!(lse == f64::NEG_INFINITY, empty, "row {row} of {name}");
            if empty {
                assert!(fused.out[row * case.dv..][..case.dv]
                    .iter()
                    .all(|&o| o == 0.0));
            }
        }
    }
}

/// `sigmoid(a − b)` written from the definition, for LSEs that may be −∞.
fn sigmoid_of_difference(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY && b == f64::NEG_INFINITY {
        0.0 // nothing visible: no gate (the documented convention)
    } else {
        1.0 / (1.0 + (b - a).exp())
    }
}

#[test]
fn lambda_is_the_sigmoid_of_the_lse_difference() {
    let mut rng = Rng::from_env();
    for case in attention_cases(&mut rng) {
        let name = case.label();
        let r = prefix_attention(&case.op, &case.tensors()).unwrap();
        let expected: Vec<f64> = r
            .lse_prefix
            .iter()
            .zip(&r.lse_context)
            .map(|(&p, &c)| sigmoid_of_difference(p, c))
            .collect();
        assert_close(&format!("lambda, {name}"), &r.lambda, &expected, EXACT);
        for (row, &lambda) in r.lambda.iter().enumerate() {
            assert!(
                (0.0..=1.0).contains(&lambda),
                "λ = {lambda} in row {row} of {name}"
            );
            if case.l == 0 {
                assert_eq!(lambda, 0.0, "no prefix, row {row} of {name}");
            } else if !case.sees_context(row) {
                assert_eq!(lambda, 1.0, "no visible context, row {row} of {name}");
            }
        }
    }
}

#[test]
fn lse_merge_of_prefix_and_context_states_equals_the_fused_reference() {
    let mut rng = Rng::from_env();
    for case in attention_cases(&mut rng) {
        let name = case.label();
        let fused = prefix_attention(&case.op, &case.tensors()).unwrap();
        let p = prefix_only_attention(&case.op, &case.tensors()).unwrap();
        let c = context_attention(&case.op, &case.tensors()).unwrap();
        assert_close(
            &format!("lse_prefix, {name}"),
            &p.lse,
            &fused.lse_prefix,
            EXACT,
        );
        assert_close(
            &format!("lse_context, {name}"),
            &c.lse,
            &fused.lse_context,
            EXACT,
        );
        let merged = lse_merge(case.dv, &p.out, &p.lse, &c.out, &c.lse).unwrap();
        assert_close(
            &format!("merged out, {name}"),
            &merged.out,
            &fused.out,
            EXACT,
        );
        assert_close(
            &format!("merged lse, {name}"),
            &merged.lse,
            &fused.lse,
            EXACT,
        );
        assert_close(
            &format!("merged λ, {name}"),
            &merged.lambda,
            &fused.lambda,
            EXACT,
        );
    }
}

#[test]
fn lse_merge_handles_empty_and_lopsided_states() {
    let mut rng = Rng::from_env();
    let inf = f64::INFINITY;
    let o_p = rng.uniform_f64(2);
    let o_c = rng.uniform_f64(2);
    let nan = [f64::NAN; 2];
    // (lse_p, lse_c, expected λ, expected lse)
    let cases = [
        (-inf, -inf, 0.0, -inf),
        (-inf, 0.3, 0.0, 0.3),
        (1.7, -inf, 1.0, 1.7),
        (800.0, 0.0, 1.0, 800.0),
        (0.0, 800.0, 0.0, 800.0),
        (2.0, 2.0, 0.5, 2.0 + 2f64.ln()),
    ];
    for (lp, lc, lambda, lse) in cases {
        let m = lse_merge(2, &o_p, &[lp], &o_c, &[lc]).unwrap();
        assert_eq!(
            (m.lambda[0], m.lse[0]),
            (lambda, lse),
            "lse_p {lp}, lse_c {lc}"
        );
        let expected: Vec<f64> = if lp == -inf && lc == -inf {
            vec![0.0; 2]
        } else {
            o_p.iter()
                .zip(&o_c)
                .map(|(p, c)| lambda * p + (1.0 - lambda) * c)
                .collect()
        };
        assert_close("merged out", &m.out, &expected, EXACT);
        // An empty state's output is never read: garbage there changes nothing.
        let gp: &[f64] = if lp == -inf { &nan } else { &o_p };
        let gc: &[f64] = if lc == -inf { &nan } else { &o_c };
        let g = lse_merge(2, gp, &[lp], gc, &[lc]).unwrap();
        assert_close(
            "merged out with garbage in empty states",
            &g.out,
            &expected,
            EXACT,
        );
    }
    // The merge reads any element type: f16 outputs with f32 LSEs.
    let (hp, hc) = ([f16::from_f64(0.25)], [f16::from_f64(-0.5)]);
    let m = lse_merge(1, &hp, &[0.0f32], &hc, &[0.0f32]).unwrap();
    assert_eq!(m.out, vec![-0.125]);
    // Two +∞ LSEs are no attention states: NaN, not a silent number.
    assert!(lse_merge(1, &[0.0], &[inf], &[0.0], &[inf]).unwrap().lambda[0].is_nan());
}

// ---------------------------------------------------------------------------------------
// Delta linear
// ---------------------------------------------------------------------------------------

/// PyTorch's `nn.Linear`, literally: `y = x·weightᵀ + bias`, weight [out, in].
struct Linear {
    in_features: usize,
    out_features: usize,
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
}

impl Linear {
    fn new<T: Element>(
        weight: &[T],
        bias: Option<&[T]>,
        out_features: usize,
        in_features: usize,
    ) -> Linear {
        assert_eq!(weight.len(), out_features * in_features);
        Linear {
            in_features,
            out_features,
            weight: widen(weight),
            bias: bias.map(widen),
        }
    }

    /// `x` [rows, in_features] → [rows, out_features], a plain triple loop.
    fn forward(&self, x: &[f64]) -> Vec<f64> {
        let rows = x.len() / self.in_features.max(1);
        let mut y = vec![0.0; rows * self.out_features];
        for i in 0..rows {
            for o in 0..self.out_features {
                let mut acc = self.bias.as_ref().map_or(0.0, |b| b[o]);
                for c in 0..self.in_features {
                    acc += x[i * self.in_features + c] * self.weight[o * self.in_features + c];
                }
                y[i * self.out_features + o] = acc;
            }
        }
        y
    }
}

fn act(f: Activation, v: Vec<f64>) -> Vec<f64> {
    v.into_iter().map(|x| f.apply_f64(x)).collect()
}

/// Random weights of one delta-linear layer, in the storage type `T`.
struct Layer<T> {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    k_u: usize,
    /// x stored with this row stride (≥ k).
    ldx: usize,
    x: Vec<T>,
    u: Option<Vec<T>>,
    w: Vec<T>,
    b: Option<Vec<T>>,
    w_down: Vec<T>,
    b_down: Option<Vec<T>>,
    w_up: Vec<T>,
    b_up: Option<Vec<T>>,
}

impl<T: Element> Layer<T> {
    /// Awkward sizes: 1, primes, odd strides. `separate_u`: a delta input of its own width.
    fn random(rng: &mut Rng, separate_u: bool, sequential: bool) -> Layer<T> {
        let m = pick_or_any(rng, &[1, 2, 7, 31], 70);
        let k = pick_or_any(rng, &[1, 13, 64], 100);
        let n = pick_or_any(rng, &[1, 17, 48], 100);
        let r = pick_or_any(rng, &[1, 4, 8], 24);
        let k_u = match (sequential, separate_u) {
            (true, _) => n,
            (false, true) => rng.range(1, 90),
            (false, false) => k,
        };
        let ldx = k + rng.pick(&[0, 0, 3]);
        let opt = |rng: &mut Rng, len: usize| rng.chance(0.6).then(|| rng.uniform_vec(len));
        Layer {
            m,
            k,
            n,
            r,
            k_u,
            ldx,
            x: rng.uniform_vec((m - 1) * ldx + k),
            u: separate_u.then(|| rng.uniform_vec(m * k_u)),
            w: rng.normal_vec(n * k, 1.0 / (k as f64).sqrt()),
            b: opt(rng, n),
            w_down: rng.normal_vec(r * k_u, 1.0 / (k_u as f64).sqrt()),
            b_down: opt(rng, r),
            w_up: rng.normal_vec(n * r, 1.0 / (r as f64).sqrt()),
            b_up: opt(rng, n),
        }
    }

    fn tensors<'a>(&'a self, gate: Option<&'a [f64]>) -> DeltaLinearTensors<'a, T> {
        DeltaLinearTensors {
            x: MatRef::with_ld(&self.x, self.m, self.k, self.ldx),
            w: MatRef::new(&self.w, self.n, self.k),
            b: self.b.as_deref(),
            u: self.u.as_ref().map(|u| MatRef::new(u, self.m, self.k_u)),
            w_down: MatRef::new(&self.w_down, self.r, self.k_u),
            b_down: self.b_down.as_deref(),
            w_up: MatRef::new(&self.w_up, self.n, self.r),
            b_up: self.b_up.as_deref(),
            gate,
        }
    }

    /// x as a contiguous f64 [m, k].
    fn x64(&self) -> Vec<f64> {
        MatRef::with_ld(&self.x, self.m, self.k, self.ldx).to_f64()
    }

    fn base(&self) -> Linear {
        Linear::new(&self.w, self.b.as_deref(), self.n, self.k)
    }
    fn down(&self) -> Linear {
        Linear::new(&self.w_down, self.b_down.as_deref(), self.r, self.k_u)
    }
    fn up(&self) -> Linear {
        Linear::new(&self.w_up, self.b_up.as_deref(), self.n, self.r)
    }

    fn label(&self) -> String {
        format!(
            "M={} K={} N={} r={} K_u={} ldx={} dtype={:?}",
            self.m,
            self.k,
            self.n,
            self.r,
            self.k_u,
            self.ldx,
            T::DTYPE
        )
    }
}

fn parallel_delta_equals_k_concatenation_for<T: Element>(rng: &mut Rng) {
    for trial in 0..8 {
        let layer = Layer::<T>::random(rng, trial % 2 == 1, false);
        let op = DeltaLinear {
            activation: rng.pick(&Activation::ALL),
            insertion: Insertion::Parallel,
            composition: if rng.chance(0.5) {
                Composition::Add
            } else {
                Composition::Scaled(rng.uniform(0.1, 8.0) as f32)
            },
        };
        let name = format!("{op:?}, {}", layer.label());
        let y = delta_linear(&op, &layer.tensors(None)).unwrap();
        let yc = delta_linear_concat(&op, &layer.tensors(None)).unwrap();
        assert_close(&name, &yc, &y, EXACT);
    }
}

#[test]
fn parallel_delta_equals_the_k_concatenation_form() {
    let mut rng = Rng::from_env();
    parallel_delta_equals_k_concatenation_for::<f32>(&mut rng);
    parallel_delta_equals_k_concatenation_for::<f16>(&mut rng);
    parallel_delta_equals_k_concatenation_for::<bf16>(&mut rng);
}

#[test]
fn lora_with_scaling_matches_peft() {
    let mut rng = Rng::from_env();
    for trial in 0..8 {
        let layer = Layer::<bf16>::random(&mut rng, false, false);
        // PEFT: scaling = lora_alpha / r (lora_alpha / math.sqrt(r) with use_rslora), result
        // = base(x) + lora_B(lora_A(dropout(x))) * scaling, with lora_A / lora_B bias-free
        // nn.Linear and dropout the identity in eval. The kernels take the scale as an f32:
        // PEFT's f64 scaling rounded once.
        let lora_alpha = rng.pick(&[1.0f32, 8.0, 16.0, 32.0]);
        let rslora = trial % 2 == 1;
        let r = layer.r as f64;
        let peft_scaling = f64::from(lora_alpha) / if rslora { r.sqrt() } else { r };
        let scaling = f64::from(peft_scaling as f32);
        let lora_a = Linear::new::<bf16>(&layer.w_down, None, layer.r, layer.k);
        let lora_b = Linear::new::<bf16>(&layer.w_up, None, layer.n, layer.r);
        let x = layer.x64();
        let base = layer.base().forward(&x);
        let delta = lora_b.forward(&lora_a.forward(&x));
        let expected: Vec<f64> = base
            .iter()
            .zip(&delta)
            .map(|(b, d)| b + d * scaling)
            .collect();

        // α alone: r comes from the weights (the kernels: from the dims).
        let op = match rslora {
            false => DeltaLinear::lora(lora_alpha),
            true => DeltaLinear::rslora(lora_alpha),
        };
        let t = DeltaLinearTensors {
            b_down: None,
            b_up: None,
            ..layer.tensors(None)
        };
        let y = delta_linear(&op, &t).unwrap();
        assert_close(
            &format!("LoRA alpha={lora_alpha} rslora={rslora}, {}", layer.label()),
            &y,
            &expected,
            EXACT,
        );
    }
}

#[test]
fn sequential_adapter_is_houlsby() {
    let mut rng = Rng::from_env();
    for _ in 0..8 {
        let layer = Layer::<f16>::random(&mut rng, false, true);
        let f = rng.pick(&Activation::ALL);
        // Houlsby: h = sublayer(x); y = h + up(f(down(h))).
        let h = layer.base().forward(&layer.x64());
        let delta = layer.up().forward(&act(f, layer.down().forward(&h)));
        let expected: Vec<f64> = h.iter().zip(&delta).map(|(h, d)| h + d).collect();

        let op = DeltaLinear {
            activation: f,
            insertion: Insertion::Sequential,
            composition: Composition::Add,
        };
        let y = delta_linear(&op, &layer.tensors(None)).unwrap();
        assert_close(&format!("{f:?}, {}", layer.label()), &y, &expected, EXACT);
    }
}

#[test]
fn gated_composition_blends_h_and_delta_per_row() {
    let mut rng = Rng::from_env();
    for trial in 0..8 {
        let sequential = trial % 3 == 2;
        let layer = Layer::<f32>::random(&mut rng, trial % 3 == 1, sequential);
        let f = rng.pick(&Activation::ALL);
        // λ in [0, 1], with the end points in the mix.
        let gate: Vec<f64> = (0..layer.m)
            .map(|_| match rng.range(0, 3) {
                0 => 0.0,
                1 => 1.0,
                _ => rng.unit(),
            })
            .collect();
        let h = layer.base().forward(&layer.x64());
        let u = match (sequential, &layer.u) {
            (true, _) => h.clone(),
            (false, Some(u)) => widen(u),
            (false, None) => layer.x64(),
        };
        let delta = layer.up().forward(&act(f, layer.down().forward(&u)));
        let n = layer.n;
        let expected: Vec<f64> = (0..layer.m * n)
            .map(|e| (1.0 - gate[e / n]) * h[e] + gate[e / n] * delta[e])
            .collect();
        let op = DeltaLinear {
            activation: f,
            insertion: if sequential {
                Insertion::Sequential
            } else {
                Insertion::Parallel
            },
            composition: Composition::Gated,
        };
        let y = delta_linear(&op, &layer.tensors(Some(&gate))).unwrap();
        assert_close(
            &format!("gated {f:?}, {}", layer.label()),
            &y,
            &expected,
            EXACT,
        );
    }
}

#[test]
fn merged_lora_equals_the_unmerged_forward_and_unmerges() {
    let mut rng = Rng::from_env();
    for _ in 0..6 {
        let layer = Layer::<f16>::random(&mut rng, false, false);
        let (n, k, r) = (layer.n, layer.k, layer.r);
        // The layer's LoRA, and the merge scale it documents: its composition's scale at r.
        let alpha = rng.pick(&[0.5f32, 2.0, 16.0 / 3.0, 32.0]);
        let op = match rng.chance(0.5) {
            true => DeltaLinear::lora(alpha),
            false => DeltaLinear::rslora(alpha),
        };
        let s = op.composition.scale(r);
        let w = MatRef::new(&layer.w, n, k);
        let (a, b) = (
            MatRef::new(&layer.w_down, r, k),
            MatRef::new(&layer.w_up, n, r),
        );
        let merged = lora_merge(w, a, b, s).unwrap();

        let x = layer.x64();
        let bias = layer.b.as_deref().map(widen);
        let y_merged = linear(
            MatRef::new(&x, layer.m, k),
            MatRef::new(&merged, n, k),
            bias.as_deref(),
        )
        .unwrap();
        let t = DeltaLinearTensors {
            b_down: None,
            b_up: None,
            ..layer.tensors(None)
        };
        let y = delta_linear(&op, &t).unwrap();
        assert_close(
            &format!("merged forward {op:?} s={s}, {}", layer.label()),
            &y_merged,
            &y,
            EXACT,
        );

        let (a64, b64) = (widen(&layer.w_down), widen(&layer.w_up));
        let unmerged = lora_merge(
            MatRef::new(&merged, n, k),
            MatRef::new(&a64, r, k),
            MatRef::new(&b64, n, r),
            -s,
        )
        .unwrap();
        assert_close(
            &format!("unmerge, {}", layer.label()),
            &unmerged,
            &widen(&layer.w),
            EXACT,
        );
    }
}

#[test]
fn multi_head_adapter_is_one_parallel_adapter_per_head() {
    let mut rng = Rng::from_env();
    for _ in 0..8 {
        let heads = rng.range(1, 6);
        let (m, d_h, d_in, r) = (
            rng.range(1, 40),
            rng.range(1, 24),
            rng.range(1, 24),
            rng.range(1, 9),
        );
        let op = MultiHeadAdapter {
            heads,
            rank: r,
            activation: rng.pick(&Activation::ALL),
            composition: rng.pick(&[Composition::Add, Composition::Scaled(4.0)]),
        };
        let h: Vec<f32> = rng.uniform_vec(m * heads * d_h);
        let u: Vec<f32> = rng.uniform_vec(m * heads * d_in);
        let w_down: Vec<f32> = rng.uniform_vec(heads * r * d_in);
        let w_up: Vec<f32> = rng.uniform_vec(heads * d_h * r);
        let b_down: Option<Vec<f32>> = rng.chance(0.5).then(|| rng.uniform_vec(heads * r));
        let b_up: Option<Vec<f32>> = rng.chance(0.5).then(|| rng.uniform_vec(heads * d_h));
        let t = MultiHeadAdapterTensors {
            h: MatRef::new(&h, m, heads * d_h),
            u: MatRef::new(&u, m, heads * d_in),
            w_down: &w_down,
            b_down: b_down.as_deref(),
            w_up: &w_up,
            b_up: b_up.as_deref(),
        };
        let y = multi_head_adapter(&op, &t).unwrap();

        // Head i alone: a delta-linear layer whose frozen part is the identity on h_i and
        // whose delta reads u_i, both column slices seen through a row stride.
        let identity: Vec<f32> = (0..d_h * d_h)
            .map(|e| if e / d_h == e % d_h { 1.0 } else { 0.0 })
            .collect();
        let mut expected = vec![0.0; m * heads * d_h];
        for hd in 0..heads {
            let layer = DeltaLinearTensors {
                x: MatRef::with_ld(&h[hd * d_h..], m, d_h, heads * d_h),
                w: MatRef::new(&identity, d_h, d_h),
                b: None,
                u: Some(MatRef::with_ld(&u[hd * d_in..], m, d_in, heads * d_in)),
                w_down: MatRef::new(&w_down[hd * r * d_in..][..r * d_in], r, d_in),
                b_down: b_down.as_ref().map(|b| &b[hd * r..][..r]),
                w_up: MatRef::new(&w_up[hd * d_h * r..][..d_h * r], d_h, r),
                b_up: b_up.as_ref().map(|b| &b[hd * d_h..][..d_h]),
                gate: None,
            };
            let dl = DeltaLinear {
                activation: op.activation,
                insertion: Insertion::Parallel,
                composition: op.composition,
            };
            let y_head = delta_linear(&dl, &layer).unwrap();
            for i in 0..m {
                expected[i * heads * d_h + hd * d_h..][..d_h]
                    .copy_from_slice(&y_head[i * d_h..][..d_h]);
            }
        }
        let name = format!("{op:?} M={m} d_h={d_h} d_in={d_in}");
        assert_close(&name, &y, &expected, EXACT);
    }
}

// ---------------------------------------------------------------------------------------
// erf and argument errors
// ---------------------------------------------------------------------------------------

#[test]
fn erf_matches_known_values() {
    // Values from mpmath at 40 digits, rounded to f64.
    let known = [
        (0.0, 0.0),
        (1e-8, 1.1283791670955126e-8),
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (-1.5, -0.9661051464753108),
        (2.0, 0.9953222650189527),
        (2.5, 0.999593047982555),
        (3.0, 0.9999779095030014),
        (4.0, 0.9999999845827421),
        (6.0, 1.0),
        (f64::INFINITY, 1.0),
        (f64::NEG_INFINITY, -1.0),
    ];
    for (x, e) in known {
        approx::assert_abs_diff_eq!(erf(x), e, epsilon = 1e-14);
    }
    approx::assert_relative_eq!(
        erf(1e-300) / 1e-300,
        2.0 / std::f64::consts::PI.sqrt(),
        max_relative = 1e-15
    );
    assert!(erf(f64::NAN).is_nan());
    // GELU (erf form) at 0 and far out.
    assert_eq!(Activation::GeluErf.apply_f64(0.0), 0.0);
    assert_eq!(Activation::GeluErf.apply_f64(30.0), 30.0);
}

/// The argument an `Err` names, and its message.
fn arg_of<T: std::fmt::Debug>(r: Result<T, Error>) -> (&'static str, String) {
    match r {
        Err(e @ Error::InvalidArgument { arg, .. }) => (arg, e.to_string()),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn wrong_shapes_are_errors_naming_the_argument() {
    let mut rng = Rng::from_env();
    let (m, k, n, r) = (3, 16, 64, 8);
    let x: Vec<f32> = rng.uniform_vec(m * k);
    let w: Vec<f32> = rng.uniform_vec(n * k);
    let w_down: Vec<f32> = rng.uniform_vec(r * k);
    let w_up: Vec<f32> = rng.uniform_vec(n * (r + 1));
    let b: Vec<f32> = rng.uniform_vec(n);
    let ok = DeltaLinearTensors {
        x: MatRef::new(&x, m, k),
        w: MatRef::new(&w, n, k),
        b: Some(&b),
        u: None,
        w_down: MatRef::new(&w_down, r, k),
        b_down: None,
        w_up: MatRef::new(&w_up[..n * r], n, r),
        b_up: None,
        gate: None,
    };
    let op = DeltaLinear {
        activation: Activation::Relu,
        insertion: Insertion::Parallel,
        composition: Composition::Add,
    };
    assert!(delta_linear(&op, &ok).is_ok());

    let (arg, msg) = arg_of(delta_linear(
        &op,
        &DeltaLinearTensors {
            w_up: MatRef::new(&w_up, n, r + 1),
            ..ok
        },
    ));
    assert_eq!(arg, "w_up");
    assert!(
        msg.contains("[N, r] = [64, 8]") && msg.contains("[64, 9]"),
        "{msg}"
    );

    let short = DeltaLinearTensors {
        x: MatRef::with_ld(&x, m, k, k + 1),
        ..ok
    };
    assert_eq!(arg_of(delta_linear(&op, &short)).0, "x");
    assert_eq!(
        arg_of(delta_linear(
            &op,
            &DeltaLinearTensors {
                b: Some(&b[1..]),
                ..ok
            }
        ))
        .0,
        "b"
    );
    let seq = DeltaLinear {
        insertion: Insertion::Sequential,
        ..op
    };
    // Sequential: W_down must be [r, N]; and no separate u.
    assert_eq!(arg_of(delta_linear(&seq, &ok)).0, "w_down");
    let u = MatRef::new(&x, m, k);
    assert_eq!(
        arg_of(delta_linear(&seq, &DeltaLinearTensors { u: Some(u), ..ok })).0,
        "u"
    );
    let gated = DeltaLinear {
        composition: Composition::Gated,
        ..op
    };
    assert_eq!(arg_of(delta_linear(&gated, &ok)).0, "gate");
    let gate = [0.5; 3];
    assert_eq!(
        arg_of(delta_linear(
            &op,
            &DeltaLinearTensors {
                gate: Some(&gate),
                ..ok
            }
        ))
        .0,
        "gate"
    );
    assert_eq!(
        arg_of(delta_linear_concat(
            &seq,
            &DeltaLinearTensors {
                w_down: MatRef::new(&w_up[..r * n], r, n),
                ..ok
            }
        ))
        .0,
        "insertion"
    );

    // Attention: KV heads must divide the query heads; lengths must fit.
    let mut case = AttnCase::new(&mut rng, 2, (4, 3), (2, 5, 1), (8, 8), true, None);
    assert_eq!(arg_of(prefix_attention(&case.op, &case.tensors())).0, "k");
    case = AttnCase::new(
        &mut rng,
        2,
        (4, 2),
        (2, 5, 1),
        (8, 8),
        true,
        Some(vec![5, 6]),
    );
    assert_eq!(
        arg_of(prefix_attention(&case.op, &case.tensors())).0,
        "context_lens"
    );
    case = AttnCase::new(&mut rng, 2, (4, 2), (2, 5, 1), (8, 8), true, None);
    let mut t = case.tensors();
    t.prefix_v.shape[3] = 7;
    assert_eq!(arg_of(prefix_attention(&case.op, &t)).0, "prefix_v");
    let mut t = case.tensors();
    t.v.data = &t.v.data[1..];
    assert_eq!(arg_of(context_attention(&case.op, &t)).0, "v");
    assert_eq!(
        arg_of(lse_merge(2, &[0.0; 4], &[0.0; 2], &[0.0; 4], &[0.0; 3])).0,
        "lse_context"
    );
}
