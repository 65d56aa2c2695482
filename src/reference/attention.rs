//! Attention over learned prefix vectors and a masked context, in f64.
//!
//! For query row `q` of head `h` in sequence `b`, with `g = Hq / Hkv` query heads per KV
//! head (grouped-query attention; head `h` reads KV head `h / g`):
//!
//! ```text
//! s_p,j = scale · q·P_k[b, h/g, j]        j < l          every query sees every prefix
//! s_c,j = scale · q·K[b, h/g, j]          j visible      the context is masked
//! out   = Σ softmax([s_p; s_c])_j · [P_v; V]_j
//! LSE_p = log Σ_j exp(s_p,j),   LSE_c = log Σ_visible exp(s_c,j)
//! λ     = Σ exp(s_p) / (Σ exp(s_p) + Σ exp(s_c)) = sigmoid(LSE_p − LSE_c)
//! out   = (1 − λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v)
//! ```
//!
//! Masking (the context only): sequence `b` holds `len[b]` valid keys (`context_lens`,
//! default `Lk`); key `j ≥ len[b]` is padding. With `causal`, query `i` sits at position
//! `i + len[b] − Lq` of its context (bottom-right aligned, as in flash-attention and KV-cache
//! decoding: the last query sees the whole valid context) and sees context key `j` iff
//! `j ≤ i + len[b] − Lq`.
//!
//! Empty rows, never NaN: a row that sees no context key has `LSE_c = −∞`, a context
//! attention of 0 and, when `l > 0`, `λ = 1`. A row that sees nothing at all (`l = 0` and
//! no visible context) has output 0, every LSE `−∞` and `λ = 0`.
//!
//! Layouts: every tensor is a [`Tensor4`] with explicit strides, in elements:
//! `q` [B, Hq, Lq, d]; `k` [B, Hkv, Lk, d]; `v` [B, Hkv, Lk, d_v]; `prefix_k` [B, Hkv, l, d]
//! and `prefix_v` [B, Hkv, l, d_v]. The prefix is per KV head, matching grouped-query
//! attention and PEFT's prefix tuning, whose `past_key_values` hold [B, Hkv, l, d] per
//! layer; one prefix shared by the batch is a batch stride of 0. Outputs are contiguous:
//! `out` [B, Hq, Lq, d_v], the per-row values [B, Hq, Lq].

use super::{check_vec, dot, par_row_blocks, Scalar};
use crate::{Error, Result};

/// A borrowed 4-D tensor with explicit strides: element `[i0, i1, i2, i3]` is
/// `data[Σ i_k·strides[k]]`. Strides may be 0 (broadcast) or anything else that stays
/// inside `data`.
#[derive(Clone, Copy, Debug)]
pub struct Tensor4<'a, T> {
    /// The buffer.
    pub data: &'a [T],
    /// The four dimensions.
    pub shape: [usize; 4],
    /// The step of each dimension, in elements.
    pub strides: [usize; 4],
}

impl<'a, T: Scalar> Tensor4<'a, T> {
    /// A contiguous (row-major) tensor.
    pub fn contiguous(data: &'a [T], shape: [usize; 4]) -> Self {
        let [_, s1, s2, s3] = shape;
        Tensor4 {
            data,
            shape,
            strides: [s1 * s2 * s3, s2 * s3, s3, 1],
        }
    }

    /// A tensor with explicit strides: e.g. a [B, L, H, d] buffer seen as [B, H, L, d] has
    /// strides `[L·H·d, d, H·d, 1]`.
    pub fn strided(data: &'a [T], shape: [usize; 4], strides: [usize; 4]) -> Self {
        Tensor4 {
            data,
            shape,
            strides,
        }
    }

    /// The offset of an element in `data`.
    pub fn offset(&self, index: [usize; 4]) -> usize {
        (0..4).map(|a| index[a] * self.strides[a]).sum()
    }

    /// The elements in row-major order of `shape` (to compare a strided kernel output
    /// with a contiguous reference; NaN poison is kept).
    pub fn to_contiguous(&self) -> Vec<T> {
        let [s0, s1, s2, s3] = self.shape;
        let mut out = Vec::with_capacity(s0 * s1 * s2 * s3);
        for i0 in 0..s0 {
            for i1 in 0..s1 {
                for i2 in 0..s2 {
                    for i3 in 0..s3 {
                        out.push(self.data[self.offset([i0, i1, i2, i3])]);
                    }
                }
            }
        }
        out
    }

    /// Checks the shape against the expected one (`dims` names it) and that the last
    /// element lies inside the buffer.
    fn check(&self, arg: &'static str, dims: &str, expected: [usize; 4]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::invalid(
                arg,
                format!("{dims} = {expected:?}"),
                format!("{:?}", self.shape),
            ));
        }
        if self.shape.contains(&0) {
            return Ok(());
        }
        let last = self.offset(self.shape.map(|s| s - 1));
        if last >= self.data.len() {
            return Err(Error::invalid(
                arg,
                format!(
                    "a buffer of more than {last} elements for shape {:?} with strides {:?}",
                    self.shape, self.strides
                ),
                format!("{} elements", self.data.len()),
            ));
        }
        Ok(())
    }
}

/// What a prefix attention computes besides its tensors.
/// The default: scale `1 / √d`, no causal mask.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefixAttention {
    /// The softmax scale of the scores, an f32 as every scale of the crate
    /// ([`crate::Composition`]); `None` means `1 / √d`.
    pub scale: Option<f32>,
    /// Causal (bottom-right aligned) mask on the context.
    pub causal: bool,
}

impl PrefixAttention {
    /// The scale the scores are multiplied by for head dim `d`: `scale`, or `1 / √d`
    /// (computed in f64 and rounded to f32 once). The kernels and the reference both take
    /// it from here.
    pub fn scale_for(&self, d: usize) -> f32 {
        self.scale
            .unwrap_or_else(|| (1.0 / (d as f64).sqrt()) as f32)
    }
}

/// The tensors of a prefix attention, borrowed; shapes are in the module docs.
#[derive(Clone, Copy, Debug)]
pub struct PrefixAttentionTensors<'a, T> {
    /// Queries [B, Hq, Lq, d].
    pub q: Tensor4<'a, T>,
    /// Context keys [B, Hkv, Lk, d].
    pub k: Tensor4<'a, T>,
    /// Context values [B, Hkv, Lk, d_v].
    pub v: Tensor4<'a, T>,
    /// Prefix keys [B, Hkv, l, d] (batch stride 0 for a shared prefix; l may be 0).
    pub prefix_k: Tensor4<'a, T>,
    /// Prefix values [B, Hkv, l, d_v].
    pub prefix_v: Tensor4<'a, T>,
    /// Valid context keys per sequence `[B]`, each ≤ Lk; `None` means all Lk.
    pub context_lens: Option<&'a [u32]>,
}

/// An attention state: the normalised output and the log-sum-exp of the scores of each
/// query row. An empty row (no visible key) has output 0 and LSE −∞.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionState {
    /// [B, Hq, Lq, d_v], contiguous.
    pub out: Vec<f64>,
    /// [B, Hq, Lq].
    pub lse: Vec<f64>,
}

/// The fused reference's results.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixAttentionOutput {
    /// Attention over prefix and context together, [B, Hq, Lq, d_v], contiguous.
    pub out: Vec<f64>,
    /// LSE over prefix and context together, [B, Hq, Lq].
    pub lse: Vec<f64>,
    /// LSE over the prefix scores, [B, Hq, Lq] (−∞ when l = 0).
    pub lse_prefix: Vec<f64>,
    /// LSE over the visible context scores, [B, Hq, Lq] (−∞ when none is visible).
    pub lse_context: Vec<f64>,
    /// The gate λ, the prefix's share of the softmax mass, [B, Hq, Lq].
    pub lambda: Vec<f64>,
}

/// The result of [`lse_merge`].
#[derive(Clone, Debug, PartialEq)]
pub struct MergedAttention {
    /// `(1 − λ)·o_context + λ·o_prefix`, [rows, d_v].
    pub out: Vec<f64>,
    /// `logaddexp(lse_prefix, lse_context)`, `[rows]`.
    pub lse: Vec<f64>,
    /// `sigmoid(lse_prefix − lse_context)`, `[rows]`.
    pub lambda: Vec<f64>,
}

/// A validated problem with every tensor widened to contiguous f64.
struct Problem {
    batch: usize,
    hq: usize,
    group: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    l: usize,
    d: usize,
    dv: usize,
    scale: f64,
    causal: bool,
    lens: Vec<usize>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pk: Vec<f64>,
    pv: Vec<f64>,
}

fn gather<T: Scalar>(t: &Tensor4<T>) -> Vec<f64> {
    t.to_contiguous().into_iter().map(|v| v.as_f64()).collect()
}

impl Problem {
    fn new<T: Scalar>(op: &PrefixAttention, t: &PrefixAttentionTensors<T>) -> Result<Problem> {
        let [batch, hq, lq, d] = t.q.shape;
        t.q.check("q", "[B, Hq, Lq, d]", t.q.shape)?;
        if d == 0 {
            return Err(Error::invalid(
                "q",
                "a head dim d >= 1",
                format!("{:?}", t.q.shape),
            ));
        }
        let [_, hkv, lk, _] = t.k.shape;
        t.k.check("k", "[B, Hkv, Lk, d]", [batch, hkv, lk, d])?;
        if hkv == 0 || hq % hkv != 0 {
            return Err(Error::invalid(
                "k",
                format!("Hkv >= 1 dividing Hq = {hq} (grouped-query attention)"),
                format!("Hkv = {hkv}"),
            ));
        }
        let dv = t.v.shape[3];
        t.v.check("v", "[B, Hkv, Lk, d_v]", [batch, hkv, lk, dv])?;
        let l = t.prefix_k.shape[2];
        t.prefix_k
            .check("prefix_k", "[B, Hkv, l, d]", [batch, hkv, l, d])?;
        t.prefix_v
            .check("prefix_v", "[B, Hkv, l, d_v]", [batch, hkv, l, dv])?;
        check_vec("context_lens", t.context_lens, "[B]", batch)?;
        let lens = match t.context_lens {
            Some(lens) => {
                if let Some((b, &len)) = lens.iter().enumerate().find(|(_, &n)| n as usize > lk) {
                    return Err(Error::invalid(
                        "context_lens",
                        format!("lengths <= Lk = {lk}"),
                        format!("{len} for sequence {b}"),
                    ));
                }
                lens.iter().map(|&n| n as usize).collect()
            }
            None => vec![lk; batch],
        };
        Ok(Problem {
            batch,
            hq,
            group: hq / hkv,
            hkv,
            lq,
            lk,
            l,
            d,
            dv,
            scale: f64::from(op.scale_for(d)),
            causal: op.causal,
            lens,
            q: gather(&t.q),
            k: gather(&t.k),
            v: gather(&t.v),
            pk: gather(&t.prefix_k),
            pv: gather(&t.prefix_v),
        })
    }

    /// Number of query rows, B·Hq·Lq.
    fn rows(&self) -> usize {
        self.batch * self.hq * self.lq
    }

    /// Query row `row` = ((b·Hq) + h)·Lq + i as (b, KV head, i).
    fn split(&self, row: usize) -> (usize, usize, usize) {
        let (bh, i) = (row / self.lq, row % self.lq);
        (bh / self.hq, (bh % self.hq) / self.group, i)
    }

    fn query(&self, row: usize) -> &[f64] {
        &self.q[row * self.d..][..self.d]
    }

    /// Context key / value `j` of (b, KV head).
    fn context(&self, b: usize, kvh: usize, j: usize) -> (&[f64], &[f64]) {
        let at = (b * self.hkv + kvh) * self.lk + j;
        (
            &self.k[at * self.d..][..self.d],
            &self.v[at * self.dv..][..self.dv],
        )
    }

    /// Prefix key / value `j` of (b, KV head).
    fn prefix(&self, b: usize, kvh: usize, j: usize) -> (&[f64], &[f64]) {
        let at = (b * self.hkv + kvh) * self.l + j;
        (
            &self.pk[at * self.d..][..self.d],
            &self.pv[at * self.dv..][..self.dv],
        )
    }

    /// Whether query `i` of sequence `b` sees context key `j` (module docs, "Masking").
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let len = self.lens[b];
        j < len && (!self.causal || j + self.lq <= i + len)
    }

    /// The scores and values a row attends to, prefix first, then the visible context.
    fn keys(&self, row: usize, prefix: bool, context: bool) -> Vec<(f64, &[f64])> {
        let (b, kvh, i) = self.split(row);
        let q = self.query(row);
        let mut keys = Vec::new();
        if prefix {
            for j in 0..self.l {
                let (k, v) = self.prefix(b, kvh, j);
                keys.push((self.scale * dot(q, k), v));
            }
        }
        if context {
            for j in (0..self.lk).filter(|&j| self.visible(b, i, j)) {
                let (k, v) = self.context(b, kvh, j);
                keys.push((self.scale * dot(q, k), v));
            }
        }
        keys
    }

    /// A softmax attention over one part (prefix, context or both) of every row.
    fn state(&self, prefix: bool, context: bool) -> AttentionState {
        let dv = self.dv;
        let packed = par_row_blocks(self.rows(), dv + 1, |rows, chunk| {
            for (row, slot) in rows.zip(chunk.chunks_exact_mut(dv + 1)) {
                let (out, lse) = slot.split_at_mut(dv);
                lse[0] = attend(&self.keys(row, prefix, context), out);
            }
        });
        unpack_state(&packed, dv)
    }
}

/// `log Σ exp(s)` over `scores`, shifted by their maximum; −∞ for no score.
fn logsumexp(scores: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = scores.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + scores.map(|s| (s - m).exp()).sum::<f64>().ln()
}

/// Softmax attention over `keys` (score, value) into `out`, returning the LSE; an empty
/// key set gives output 0 and LSE −∞.
fn attend(keys: &[(f64, &[f64])], out: &mut [f64]) -> f64 {
    out.fill(0.0);
    let m = keys.iter().fold(f64::NEG_INFINITY, |m, k| m.max(k.0));
    if m == f64::NEG_INFINITY {
        return m;
    }
    let mut sum = 0.0;
    for &(s, v) in keys {
        let w = (s - m).exp();
        sum += w;
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
    out.iter_mut().for_each(|o| *o /= sum);
    m + sum.ln()
}

/// Splits rows packed as `[out (dv), lse]`.
fn unpack_state(packed: &[f64], dv: usize) -> AttentionState {
    let mut state = AttentionState {
        out: Vec::with_capacity(packed.len()),
        lse: Vec::with_capacity(packed.len() / (dv + 1)),
    };
    for slot in packed.chunks_exact(dv + 1) {
        state.out.extend_from_slice(&slot[..dv]);
        state.lse.push(slot[dv]);
    }
    state
}

/// The fused reference: one softmax over the prefix and the visible context per query row,
/// with λ as the prefix's share of the softmax mass and each LSE computed on its own (so
/// that the identity `λ = sigmoid(LSE_p − LSE_c)` is checked, not assumed).
pub fn prefix_attention<T: Scalar>(
    op: &PrefixAttention,
    t: &PrefixAttentionTensors<T>,
) -> Result<PrefixAttentionOutput> {
    let p = Problem::new(op, t)?;
    let (dv, l) = (p.dv, p.l);
    // Each row is packed as [out (dv), lse, lse_prefix, lse_context, λ].
    let width = dv + 4;
    let packed = par_row_blocks(p.rows(), width, |rows, chunk| {
        for (row, slot) in rows.zip(chunk.chunks_exact_mut(width)) {
            let keys = p.keys(row, true, true);
            let (out, rest) = slot.split_at_mut(dv);
            rest[0] = attend(&keys, out);
            let (prefix, context) = keys.split_at(l);
            rest[1] = logsumexp(prefix.iter().map(|k| k.0));
            rest[2] = logsumexp(context.iter().map(|k| k.0));
            let m = keys.iter().fold(f64::NEG_INFINITY, |m, k| m.max(k.0));
            rest[3] = if m == f64::NEG_INFINITY {
                0.0
            } else {
                let mass =
                    |part: &[(f64, &[f64])]| part.iter().map(|k| (k.0 - m).exp()).sum::<f64>();
                let (sp, sc) = (mass(prefix), mass(context));
                sp / (sp + sc)
            };
        }
    });
    let rows = p.rows();
    let mut r = PrefixAttentionOutput {
        out: Vec::with_capacity(rows * dv),
        lse: Vec::with_capacity(rows),
        lse_prefix: Vec::with_capacity(rows),
        lse_context: Vec::with_capacity(rows),
        lambda: Vec::with_capacity(rows),
    };
    for slot in packed.chunks_exact(width) {
        r.out.extend_from_slice(&slot[..dv]);
        r.lse.push(slot[dv]);
        r.lse_prefix.push(slot[dv + 1]);
        r.lse_context.push(slot[dv + 2]);
        r.lambda.push(slot[dv + 3]);
    }
    Ok(r)
}

/// The tensors of a multi-tenant prefix attention: each sequence attends over its own
/// prefix of a set, or none.
#[derive(Clone, Copy, Debug)]
pub struct MultiPrefixAttentionTensors<'a, T> {
    /// Queries [B, Hq, Lq, d].
    pub q: Tensor4<'a, T>,
    /// Context keys [B, Hkv, Lk, d].
    pub k: Tensor4<'a, T>,
    /// Context values [B, Hkv, Lk, d_v].
    pub v: Tensor4<'a, T>,
    /// Prefix i's keys [1, Hkv, l_i, d], each prefix its own length.
    pub prefixes_k: &'a [Tensor4<'a, T>],
    /// Prefix i's values [1, Hkv, l_i, d_v].
    pub prefixes_v: &'a [Tensor4<'a, T>],
    /// Each sequence's prefix `[B]`, −1 for none.
    pub ids: &'a [i32],
    /// Valid context keys per sequence `[B]`, each ≤ Lk; `None` means all Lk.
    pub context_lens: Option<&'a [u32]>,
}

/// Multi-tenant prefix attention, by definition sequence by sequence: sequence `b` is
/// [`prefix_attention`] of its own batch-1 slice with prefix `ids[b]` (with `l = 0` when
/// the id is −1: plain attention, λ = 0, LSE_p = −∞). The results are stacked over the
/// batch as [`prefix_attention`]'s.
pub fn multi_prefix_attention<T: Scalar>(
    op: &PrefixAttention,
    t: &MultiPrefixAttentionTensors<T>,
) -> Result<PrefixAttentionOutput> {
    let [batch, _, _, d] = t.q.shape;
    let [_, hkv, _, dv] = t.v.shape;
    t.q.check("q", "[B, Hq, Lq, d]", t.q.shape)?;
    t.k.check("k", "[B, Hkv, Lk, d]", t.k.shape)?;
    t.v.check("v", "[B, Hkv, Lk, d_v]", t.v.shape)?;
    check_vec("ids", Some(t.ids), "[B]", batch)?;
    check_vec("context_lens", t.context_lens, "[B]", batch)?;
    if t.prefixes_k.len() != t.prefixes_v.len() {
        return Err(Error::invalid(
            "prefixes_v",
            format!("one value tensor per key tensor ({})", t.prefixes_k.len()),
            t.prefixes_v.len(),
        ));
    }
    let mut r = PrefixAttentionOutput {
        out: Vec::new(),
        lse: Vec::new(),
        lse_prefix: Vec::new(),
        lse_context: Vec::new(),
        lambda: Vec::new(),
    };
    let (no_k, no_v) = (
        Tensor4::strided(&[][..], [1, hkv, 0, d], [0, 0, 0, 1]),
        Tensor4::strided(&[][..], [1, hkv, 0, dv], [0, 0, 0, 1]),
    );
    for b in 0..batch {
        let id = t.ids[b];
        let (prefix_k, prefix_v) = match id {
            -1 => (no_k, no_v),
            _ => match usize::try_from(id).ok().filter(|&i| i < t.prefixes_k.len()) {
                Some(i) => (t.prefixes_k[i], t.prefixes_v[i]),
                None => {
                    return Err(Error::invalid(
                        "ids",
                        format!("−1 or an id below {}", t.prefixes_k.len()),
                        format!("{id} for sequence {b}"),
                    ))
                }
            },
        };
        let s = prefix_attention(
            op,
            &PrefixAttentionTensors {
                q: sequence(&t.q, b),
                k: sequence(&t.k, b),
                v: sequence(&t.v, b),
                prefix_k,
                prefix_v,
                context_lens: t.context_lens.map(|l| &l[b..b + 1]),
            },
        )?;
        r.out.extend(s.out);
        r.lse.extend(s.lse);
        r.lse_prefix.extend(s.lse_prefix);
        r.lse_context.extend(s.lse_context);
        r.lambda.extend(s.lambda);
    }
    Ok(r)
}

/// Sequence `b` of a checked `[B, ...]` tensor, as a batch of one.
fn sequence<'a, T: Scalar>(x: &Tensor4<'a, T>, b: usize) -> Tensor4<'a, T> {
    let at = b * x.strides[0];
    Tensor4 {
        data: x.data.get(at..).unwrap_or(&[]),
        shape: [1, x.shape[1], x.shape[2], x.shape[3]],
        strides: x.strides,
    }
}

/// The unfused path a user would write: materialise `[P_k; K]` and `[P_v; V]` (l + Lk
/// keys) and run one masked attention, the mask keeping every prefix key visible and the
/// context keys masked as in the module docs (PEFT prepends ones to the attention mask).
///
/// Written apart from [`prefix_attention`] on purpose (its own indexing of the strided
/// inputs, head mapping and mask), so that the identity between the two checks both.
pub fn prefix_attention_concat<T: Scalar>(
    op: &PrefixAttention,
    t: &PrefixAttentionTensors<T>,
) -> Result<AttentionState> {
    let p = Problem::new(op, t)?; // validation, scale and lengths only
    let [batch, hq, lq, d] = t.q.shape;
    let [_, hkv, lk, dv] = t.v.shape;
    let l = t.prefix_k.shape[2];
    let lc = l + lk;
    // kc[b][kvh][j] = P_k[b, kvh, j] for j < l, else K[b, kvh, j − l]; likewise vc.
    let (mut kc, mut vc) = (Vec::new(), Vec::new());
    for b in 0..batch {
        for kvh in 0..hkv {
            for j in 0..lc {
                let (keys, values, jj) = if j < l {
                    (&t.prefix_k, &t.prefix_v, j)
                } else {
                    (&t.k, &t.v, j - l)
                };
                kc.extend((0..d).map(|c| keys.data[keys.offset([b, kvh, jj, c])].as_f64()));
                vc.extend((0..dv).map(|c| values.data[values.offset([b, kvh, jj, c])].as_f64()));
            }
        }
    }
    let packed = par_row_blocks(batch * hq * lq, dv + 1, |rows, chunk| {
        for (row, slot) in rows.zip(chunk.chunks_exact_mut(dv + 1)) {
            let (b, h, i) = (row / (hq * lq), row / lq % hq, row % lq);
            let kvh = h * hkv / hq;
            let q: Vec<f64> = (0..d)
                .map(|c| t.q.data[t.q.offset([b, h, i, c])].as_f64())
                .collect();
            let len = p.lens[b] as isize;
            // Context key j' − l is visible iff inside the valid length and, when causal,
            // at most at the query's position i + len − Lq.
            let visible = |j: usize| {
                let jc = j as isize - l as isize;
                jc < 0 || (jc < len && (!op.causal || jc <= i as isize + len - lq as isize))
            };
            let keys: Vec<(f64, &[f64])> = (0..lc)
                .filter(|&j| visible(j))
                .map(|j| {
                    let at = (b * hkv + kvh) * lc + j;
                    (p.scale * dot(&q, &kc[at * d..][..d]), &vc[at * dv..][..dv])
                })
                .collect();
            let (out, lse) = slot.split_at_mut(dv);
            lse[0] = attend(&keys, out);
        }
    });
    Ok(unpack_state(&packed, dv))
}

/// The prefix part alone: every query attends to the l prefix vectors of its KV head
/// (`LSE = −∞` and output 0 when l = 0). The context tensors are validated, not read.
pub fn prefix_only_attention<T: Scalar>(
    op: &PrefixAttention,
    t: &PrefixAttentionTensors<T>,
) -> Result<AttentionState> {
    Ok(Problem::new(op, t)?.state(true, false))
}

/// The context part alone: ordinary masked attention over `K`, `V` (module docs,
/// "Masking"). The prefix tensors are validated, not read.
pub fn context_attention<T: Scalar>(
    op: &PrefixAttention,
    t: &PrefixAttentionTensors<T>,
) -> Result<AttentionState> {
    Ok(Problem::new(op, t)?.state(false, true))
}

/// `1 / (1 + e^−x)` without overflow for either sign.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The LSE merge of two attention states of `rows = lse_prefix.len()` rows of `d_v`
/// values each (contiguous):
///
/// ```text
/// λ   = sigmoid(lse_p − lse_c)
/// out = (1 − λ)·o_c + λ·o_p
/// lse = logaddexp(lse_p, lse_c)
/// ```
///
/// An empty state (LSE −∞) gets weight 0 and its output is not read (so garbage there is
/// harmless); two empty states merge to output 0, LSE −∞, λ = 0. LSEs of +∞ or NaN are
/// not attention states; they propagate as NaN.
pub fn lse_merge<O: Scalar, L: Scalar>(
    dv: usize,
    o_prefix: &[O],
    lse_prefix: &[L],
    o_context: &[O],
    lse_context: &[L],
) -> Result<MergedAttention> {
    let rows = lse_prefix.len();
    check_vec("lse_context", Some(lse_context), "[rows]", rows)?;
    check_vec("o_prefix", Some(o_prefix), "[rows·d_v]", rows * dv)?;
    check_vec("o_context", Some(o_context), "[rows·d_v]", rows * dv)?;
    let mut r = MergedAttention {
        out: Vec::with_capacity(rows * dv),
        lse: Vec::with_capacity(rows),
        lambda: Vec::with_capacity(rows),
    };
    for row in 0..rows {
        let (lp, lc) = (lse_prefix[row].as_f64(), lse_context[row].as_f64());
        let (op, oc) = (&o_prefix[row * dv..][..dv], &o_context[row * dv..][..dv]);
        let both_empty = lp == f64::NEG_INFINITY && lc == f64::NEG_INFINITY;
        let (lse, lambda) = if both_empty {
            (f64::NEG_INFINITY, 0.0)
        } else {
            let diff = lp - lc;
            (lp.max(lc) + (-diff.abs()).exp().ln_1p(), sigmoid(diff))
        };
        r.lse.push(lse);
        r.lambda.push(lambda);
        r.out.extend(op.iter().zip(oc).map(|(p, c)| {
            if both_empty {
                0.0
            } else if lambda == 0.0 {
                c.as_f64()
            } else if lambda == 1.0 {
                p.as_f64()
            } else {
                (1.0 - lambda) * c.as_f64() + lambda * p.as_f64()
            }
        }));
    }
    Ok(r)
}

/// The gradients of a prefix attention ([`prefix_attention_backward`]), contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixAttentionGrads {
    /// dL/dq, [B, Hq, Lq, d].
    pub dq: Vec<f64>,
    /// dL/dK of the context, [B, Hkv, Lk, d]; 0 for padding and never-seen keys.
    pub dk: Vec<f64>,
    /// dL/dV of the context, [B, Hkv, Lk, d_v].
    pub dv: Vec<f64>,
    /// dL/dP_k, [Bp, Hkv, l, d]: Bp = 1 when `prefix_k` is shared by the batch (batch stride 0),
    /// the gradient then summed over every sequence; else Bp = B.
    pub dprefix_k: Vec<f64>,
    /// dL/dP_v, [Bp, Hkv, l, d_v], Bp as for `dprefix_k` (from `prefix_v`'s batch stride).
    pub dprefix_v: Vec<f64>,
}

/// The backward of [`prefix_attention`] (TRAINING.md, "Prefix attention"), given the forward's
/// merged output `out` [B, Hq, Lq, d_v] and merged LSE `lse` [B, Hq, Lq] (natural log of the
/// scaled scores, what the forward returns) and the output gradient `dout` [B, Hq, Lq, d_v],
/// all contiguous. Per query row, over the keys it sees (the prefix, then the visible
/// context):
///
/// ```text
/// D = dout·out,  p_j = exp(scale·q·k_j − lse),  ds_j = p_j·(dout·v_j − D)
/// dq = scale·Σ_j ds_j·k_j,   dK_j += scale·ds_j·q,   dV_j += p_j·dout
/// ```
///
/// summed over the query heads of a GQA group (and over the batch for a shared prefix). A row
/// that sees nothing (lse = −∞) contributes nothing and gets dq = 0, never NaN. `out` and
/// `lse` are inputs, not recomputed: the gradient is that of the forward only when they are
/// the forward's (the tests check it against finite differences of [`prefix_attention`]).
pub fn prefix_attention_backward<T: Scalar, O: Scalar, L: Scalar, G: Scalar>(
    op: &PrefixAttention,
    t: &PrefixAttentionTensors<T>,
    out: &[O],
    lse: &[L],
    dout: &[G],
) -> Result<PrefixAttentionGrads> {
    let p = Problem::new(op, t)?;
    let (d, dv, lq, lk, l, g) = (p.d, p.dv, p.lq, p.lk, p.l, p.group);
    check_vec("out", Some(out), "[B, Hq, Lq, d_v]", p.rows() * dv)?;
    check_vec("dout", Some(dout), "[B, Hq, Lq, d_v]", p.rows() * dv)?;
    check_vec("lse", Some(lse), "[B, Hq, Lq]", p.rows())?;
    // One unit of work per (sequence, KV head): its g·Lq query rows and the keys only they
    // read, packed as [dq (g·Lq·d) | dK (Lk·d) | dV (Lk·d_v) | dP_k (l·d) | dP_v (l·d_v)].
    let (nq, nk, nv, npk) = (g * lq * d, lk * d, lk * dv, l * d);
    let width = nq + nk + nv + npk + l * dv;
    let packed = par_row_blocks(p.batch * p.hkv, width, |units, chunk| {
        for (unit, slot) in units.zip(chunk.chunks_exact_mut(width)) {
            let (b, kvh) = (unit / p.hkv, unit % p.hkv);
            let (dq, rest) = slot.split_at_mut(nq);
            let (dk, rest) = rest.split_at_mut(nk);
            let (dvc, rest) = rest.split_at_mut(nv);
            let (dpk, dpv) = rest.split_at_mut(npk);
            for hg in 0..g {
                for i in 0..lq {
                    let row = (b * p.hq + kvh * g + hg) * lq + i;
                    let big_l = lse[row].as_f64();
                    if big_l == f64::NEG_INFINITY {
                        continue;
                    }
                    let q = p.query(row);
                    let (o, dorow) = (&out[row * dv..][..dv], &dout[row * dv..][..dv]);
                    let delta: f64 = o
                        .iter()
                        .zip(dorow)
                        .map(|(a, b)| a.as_f64() * b.as_f64())
                        .sum();
                    let dqr = &mut dq[(hg * lq + i) * d..][..d];
                    // One key: its score's gradient into dq, dK_j and dV_j.
                    let mut key = |k: &[f64], v: &[f64], dkj: &mut [f64], dvj: &mut [f64]| {
                        let pj = (p.scale * dot(q, k) - big_l).exp();
                        let dp: f64 = dorow.iter().zip(v).map(|(a, b)| a.as_f64() * b).sum();
                        let ds = pj * (dp - delta);
                        for c in 0..d {
                            dqr[c] += p.scale * ds * k[c];
                            dkj[c] += p.scale * ds * q[c];
                        }
                        for c in 0..dv {
                            dvj[c] += pj * dorow[c].as_f64();
                        }
                    };
                    for j in 0..l {
                        let (k, v) = p.prefix(b, kvh, j);
                        key(k, v, &mut dpk[j * d..][..d], &mut dpv[j * dv..][..dv]);
                    }
                    for j in (0..lk).filter(|&j| p.visible(b, i, j)) {
                        let (k, v) = p.context(b, kvh, j);
                        key(k, v, &mut dk[j * d..][..d], &mut dvc[j * dv..][..dv]);
                    }
                }
            }
        }
    });
    let mut r = PrefixAttentionGrads {
        dq: Vec::with_capacity(p.rows() * d),
        dk: Vec::with_capacity(p.batch * p.hkv * nk),
        dv: Vec::with_capacity(p.batch * p.hkv * nv),
        dprefix_k: vec![0.0; p.batch * p.hkv * npk],
        dprefix_v: vec![0.0; p.batch * p.hkv * l * dv],
    };
    // Units are in (b, KV head) order, and a group's query heads are consecutive: each part
    // concatenates into its contiguous tensor; a shared prefix's sum over the batch.
    let shared_k = t.prefix_k.strides[0] == 0;
    let shared_v = t.prefix_v.strides[0] == 0;
    for (unit, slot) in packed.chunks_exact(width).enumerate() {
        let (dq, rest) = slot.split_at(nq);
        let (dk, rest) = rest.split_at(nk);
        let (dvc, rest) = rest.split_at(nv);
        let (dpk, dpv) = rest.split_at(npk);
        r.dq.extend_from_slice(dq);
        r.dk.extend_from_slice(dk);
        r.dv.extend_from_slice(dvc);
        let (b, kvh) = (unit / p.hkv, unit % p.hkv);
        let at = |shared: bool, n: usize| ((if shared { 0 } else { b }) * p.hkv + kvh) * n;
        let to = at(shared_k, npk);
        r.dprefix_k[to..to + npk]
            .iter_mut()
            .zip(dpk)
            .for_each(|(a, g)| *a += g);
        let to = at(shared_v, l * dv);
        r.dprefix_v[to..to + l * dv]
            .iter_mut()
            .zip(dpv)
            .for_each(|(a, g)| *a += g);
    }
    if shared_k {
        r.dprefix_k.truncate(p.hkv * npk);
    }
    if shared_v {
        r.dprefix_v.truncate(p.hkv * l * dv);
    }
    Ok(r)
}

/// The gradients of [`lse_merge`]'s output with respect to its two states.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeGrads {
    /// dL/do_prefix = λ·dout, [rows, d_v].
    pub do_prefix: Vec<f64>,
    /// dL/dlse_prefix = λ(1 − λ)·dout·(o_prefix − o_context), `[rows]`.
    pub dlse_prefix: Vec<f64>,
    /// dL/do_context = (1 − λ)·dout, [rows, d_v].
    pub do_context: Vec<f64>,
    /// dL/dlse_context = −dlse_prefix, `[rows]`.
    pub dlse_context: Vec<f64>,
}

/// The backward of [`lse_merge`] (the merged output's gradient `dout` into each state), for a
/// part whose own backward takes the gradients of its output and of its LSE:
///
/// ```text
/// do_p = λ·dout,   do_c = (1 − λ)·dout,   dlse_p = λ(1 − λ)·dout·(o_p − o_c) = −dlse_c
/// ```
///
/// A part's attention backward fed (o_part, lse_part, do_part, dlse_part) is then exact:
/// its ds_j = p_j·(do_part·v_j − do_part·o_part) + p_j·dlse_part equals the merged form
/// p_j·(dout·v_j − dout·out) with p_j = exp(s_j − lse) of the merged LSE (TRAINING.md, "each
/// part's backward against the merged O and L", which is the other way to use it: pass the
/// merged `out`, `lse` and `dout` to each part's backward unchanged). An empty state (LSE −∞)
/// gets zero gradients and its output is not read; the merged LSE has no gradient of its own
/// (as in FlashAttention).
pub fn lse_merge_backward<O: Scalar, L: Scalar, G: Scalar>(
    dv: usize,
    o_prefix: &[O],
    lse_prefix: &[L],
    o_context: &[O],
    lse_context: &[L],
    dout: &[G],
) -> Result<MergeGrads> {
    let rows = lse_prefix.len();
    check_vec("lse_context", Some(lse_context), "[rows]", rows)?;
    check_vec("o_prefix", Some(o_prefix), "[rows·d_v]", rows * dv)?;
    check_vec("o_context", Some(o_context), "[rows·d_v]", rows * dv)?;
    check_vec("dout", Some(dout), "[rows·d_v]", rows * dv)?;
    let mut g = MergeGrads {
        do_prefix: Vec::with_capacity(rows * dv),
        dlse_prefix: Vec::with_capacity(rows),
        do_context: Vec::with_capacity(rows * dv),
        dlse_context: Vec::with_capacity(rows),
    };
    for row in 0..rows {
        let (lp, lc) = (lse_prefix[row].as_f64(), lse_context[row].as_f64());
        let (op, oc) = (&o_prefix[row * dv..][..dv], &o_context[row * dv..][..dv]);
        let dor = &dout[row * dv..][..dv];
        let lambda = if lp == f64::NEG_INFINITY {
            0.0
        } else if lc == f64::NEG_INFINITY {
            1.0
        } else {
            sigmoid(lp - lc)
        };
        let both_empty = lp == f64::NEG_INFINITY && lc == f64::NEG_INFINITY;
        // Only a mixed row reads both outputs (and has a gate gradient).
        let dlse = if lambda > 0.0 && lambda < 1.0 {
            let diff: f64 = (0..dv)
                .map(|c| dor[c].as_f64() * (op[c].as_f64() - oc[c].as_f64()))
                .sum();
            lambda * (1.0 - lambda) * diff
        } else {
            0.0
        };
        let (wp, wc) = if both_empty {
            (0.0, 0.0)
        } else {
            (lambda, 1.0 - lambda)
        };
        g.do_prefix.extend(dor.iter().map(|d| wp * d.as_f64()));
        g.do_context.extend(dor.iter().map(|d| wc * d.as_f64()));
        g.dlse_prefix.push(dlse);
        g.dlse_context.push(-dlse);
    }
    Ok(g)
}
