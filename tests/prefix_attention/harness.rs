//! The prefix-attention checks, written once over a [`Backend`]: the emulator
//! (tests/prefix_attention.rs) and the GPU (tests/gpu_prefix_attention.rs) run the same
//! suites (at the end of this file) against the f64 reference (src/reference/attention.rs).
//!
//! Every input buffer is NaN outside the elements its shape covers (strided gaps, and the
//! context keys past `context_lens`), so a kernel that reads what it must not reads NaN;
//! every output buffer is NaN before the run, so an element the kernel forgot fails, and
//! the gaps of a strided output must still be NaN after it.

use crate::common::{random_cases, Placed, Rng};
use half::{bf16, f16};
use peft_kernels::prefix_attention::{
    HeadLayout, HostKvConcatArgs, HostLseMergeArgs, HostPrefixAttentionArgs, HostPrefixOnlyArgs,
    KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeDims, PrefixAttention, PrefixAttentionArgs,
    PrefixAttentionDims, PrefixOnlyArgs, HEAD_DIMS,
};
use peft_kernels::reference::{self, PrefixAttentionTensors, Tensor4};
use peft_kernels::validate::{assert_close, default_tolerance};
use peft_kernels::{DType, Element, Error, Result, DEFAULT_SPLIT_TARGET};

/// Relative tolerance of the f32 statistics (LSE, λ): the scores are exact products of the
/// stored inputs summed in f32 on every path.
pub const STAT_TOL: f64 = 1e-5;

/// Where the kernels run. Buffers are host slices; a GPU backend copies them in and the
/// outputs back.
pub trait Backend {
    fn attention<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixAttentionArgs<&[T], &mut [T], &[u32], &mut [f32]>,
    ) -> Result<()>;
    fn prefix_only<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
    ) -> Result<()>;
    fn merge<T: Element>(
        &self,
        dims: &LseMergeDims,
        args: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
    ) -> Result<()>;
    fn concat<T: Element>(
        &self,
        dims: &KvConcatDims,
        args: KvConcatArgs<&[T], &mut [T]>,
    ) -> Result<()>;
    /// Whether the kernels run on the host slices themselves (the emulator): then the
    /// `context_lens` values are checked against Lk.
    fn on_host(&self) -> bool;
}

/// How the tensors lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every tensor `[B, H, L, d]`, contiguous.
    Contiguous,
    /// Q, K, V and the output `[B, L, H, d]` with 8 elements of padding after every row of
    /// heads and 16 after every sequence; the prefix `[B, Hkv, l, d]` with rows padded by 8.
    Strided,
}

/// One prefix-attention problem.
#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub prefix_len: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub lens: Option<Vec<u32>>,
    pub layout: Layout,
    /// One prefix for the whole batch (batch stride 0).
    pub shared_prefix: bool,
    pub scale: Option<f32>,
    /// Give the fused kernel the split-KV workspace its dims want (the default); false runs
    /// the single pass whatever the dims.
    pub split: bool,
    /// The dims' `split_target`.
    pub split_target: usize,
    /// The split-KV workspace's length when `split`; None: what the dims want.
    pub workspace_len: Option<usize>,
}

impl Case {
    /// A contiguous, unmasked case with every length given.
    pub fn new(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        q_len: usize,
        kv_len: usize,
        prefix_len: usize,
        head_dim: usize,
    ) -> Case {
        Case {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            prefix_len,
            head_dim,
            causal: false,
            lens: None,
            layout: Layout::Contiguous,
            shared_prefix: false,
            scale: None,
            split: true,
            split_target: DEFAULT_SPLIT_TARGET,
            workspace_len: None,
        }
    }

    /// The same without the split-KV workspace: one pass over every key tile.
    pub fn single_pass(self) -> Case {
        Case {
            split: false,
            ..self
        }
    }

    pub fn causal(self, causal: bool) -> Case {
        Case { causal, ..self }
    }

    pub fn lens(self, lens: Vec<u32>) -> Case {
        Case {
            lens: Some(lens),
            ..self
        }
    }

    pub fn layout(self, layout: Layout) -> Case {
        Case { layout, ..self }
    }

    /// Random sizes around the tile edges for head dim `d`: 1–2 sequences, grouped-query
    /// heads, up to 2 query tiles, up to 3 key tiles of context and 2 of prefix (either may
    /// be empty), random masks and layouts.
    pub fn random(rng: &mut Rng, d: usize) -> Case {
        let batch = rng.range(1, 2);
        let kv_heads = rng.range(1, 2);
        let heads = kv_heads * rng.range(1, 3);
        let q_len = rng.range(1, 90);
        let kv_len = if rng.chance(0.1) {
            0
        } else {
            rng.range(1, 150)
        };
        let prefix_len = if rng.chance(0.15) {
            0
        } else {
            rng.range(1, 80)
        };
        Case::new(batch, heads, kv_heads, q_len, kv_len, prefix_len, d).random_options(rng)
    }

    /// The same with random options: causal or not, ragged context lengths, the strided
    /// layout, one prefix for the batch.
    fn random_options(self, rng: &mut Rng) -> Case {
        let mut c = self.causal(rng.chance(0.5));
        if rng.chance(0.4) {
            let lens = random_lens(rng, c.batch, c.kv_len);
            c = c.lens(lens);
        }
        if rng.chance(0.3) {
            c = c.layout(Layout::Strided);
        }
        c.shared_prefix = rng.chance(0.2);
        c
    }

    /// Random sizes over a wider range than [`Case::random`]: any head dim, up to 3
    /// sequences, query groups of up to 8 heads (packed when they fit a block), decoding
    /// (q_len = 1) a third of the time, contexts of up to ~10 key tiles and prefixes of up to
    /// ~5, either empty now and then; random masks, layouts, shared prefix, the split-KV
    /// workspace given or not, and its split target.
    pub fn random_wide(rng: &mut Rng) -> Case {
        let d = rng.pick(&HEAD_DIMS);
        let batch = rng.range(1, 3);
        let kv_heads = rng.range(1, 2);
        let heads = kv_heads * rng.pick(&[1, 2, 3, 4, 8]);
        let q_len = match rng.chance(0.35) {
            true => 1,
            false => rng.range(1, 130),
        };
        let kv_len = match rng.chance(0.1) {
            true => 0,
            false => rng.range(1, 650),
        };
        let prefix_len = match rng.chance(0.15) {
            true => 0,
            false => rng.range(1, 330),
        };
        let mut c =
            Case::new(batch, heads, kv_heads, q_len, kv_len, prefix_len, d).random_options(rng);
        c.split = rng.chance(0.7);
        c.split_target = rng.pick(&[DEFAULT_SPLIT_TARGET, DEFAULT_SPLIT_TARGET, 0, 16, 1024]);
        c
    }

    pub fn dims(&self) -> PrefixAttentionDims {
        let mut d = PrefixAttentionDims::new(
            self.batch,
            self.heads,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.prefix_len,
            self.head_dim,
        );
        if self.layout == Layout::Strided {
            let hd = self.head_dim;
            let bshd = |len: usize, heads: usize| {
                let seq = heads * hd + 8;
                HeadLayout {
                    batch: len * seq + 16,
                    head: hd,
                    seq,
                }
            };
            d.q = bshd(self.q_len, self.heads);
            d.out = bshd(self.q_len, self.heads);
            d.k = bshd(self.kv_len, self.kv_heads);
            d.v = bshd(self.kv_len, self.kv_heads);
            let prefix = HeadLayout {
                batch: self.kv_heads * self.prefix_len * (hd + 8),
                head: self.prefix_len * (hd + 8),
                seq: hd + 8,
            };
            d.prefix_k = prefix;
            d.prefix_v = prefix;
        }
        if self.shared_prefix {
            d = d.with_shared_prefix();
        }
        d.split_target = self.split_target;
        d
    }

    pub fn op(&self) -> PrefixAttention {
        PrefixAttention {
            scale: self.scale,
            causal: self.causal,
        }
    }
}

/// Valid context lengths in [0, kv_len], the ends included more often than chance would.
pub fn random_lens(rng: &mut Rng, batch: usize, kv_len: usize) -> Vec<u32> {
    (0..batch)
        .map(|_| match rng.range(0, 5) {
            0 => 0,
            1 => kv_len as u32,
            _ => rng.range(0, kv_len) as u32,
        })
        .collect()
}

/// A strided tensor of `shape`: the buffer, NaN wherever the shape does not reach.
pub struct Strided<T> {
    pub data: Vec<T>,
    pub layout: HeadLayout,
    pub shape: [usize; 4],
}

impl<T: Element> Strided<T> {
    /// NaN everywhere; `extra` more elements past the last one.
    pub fn poisoned(layout: HeadLayout, shape: [usize; 4], extra: usize) -> Strided<T> {
        let len = if shape.contains(&0) {
            0
        } else {
            layout.offset(shape[0] - 1, shape[1] - 1, shape[2] - 1) + shape[3] + extra
        };
        Strided {
            data: vec![T::nan(); len],
            layout,
            shape,
        }
    }

    /// Normal values of standard deviation `std` at every element of the shape, NaN
    /// elsewhere. With a batch stride of 0 the batch shares one tensor.
    pub fn random(rng: &mut Rng, layout: HeadLayout, shape: [usize; 4], std: f64) -> Strided<T> {
        let mut t = Strided::poisoned(layout, shape, 5);
        for at in t.offsets() {
            t.data[at] = T::from_f64(std * rng.normal());
        }
        t
    }

    /// The offset of every element, in `[b, h, i, c]` order.
    pub fn offsets(&self) -> Vec<usize> {
        let [b, h, l, d] = self.shape;
        let mut v = Vec::with_capacity(b * h * l * d);
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..l {
                    let row = self.layout.offset(bi, hi, i);
                    v.extend(row..row + d);
                }
            }
        }
        v
    }

    /// The elements in `[b, h, i, c]` order.
    pub fn gather(&self) -> Vec<T> {
        self.offsets().into_iter().map(|at| self.data[at]).collect()
    }

    pub fn tensor(&self) -> Tensor4<'_, T> {
        let l = self.layout;
        Tensor4::strided(&self.data, self.shape, [l.batch, l.head, l.seq, 1])
    }

    /// Panics unless every element outside the shape is still NaN.
    #[track_caller]
    pub fn assert_gaps_untouched(&self, name: &str) {
        let mut inside = vec![false; self.data.len()];
        for at in self.offsets() {
            inside[at] = true;
        }
        let written = (0..self.data.len())
            .filter(|&i| !inside[i] && !self.data[i].to_f64().is_nan())
            .count();
        assert_eq!(
            written, 0,
            "{name}: {written} elements outside the tensor were written"
        );
    }
}

/// The inputs of a case, generated once.
pub struct Inputs<T> {
    pub q: Strided<T>,
    pub k: Strided<T>,
    pub v: Strided<T>,
    pub prefix_k: Strided<T>,
    pub prefix_v: Strided<T>,
}

impl<T: Element> Inputs<T> {
    pub fn new(rng: &mut Rng, case: &Case) -> Inputs<T> {
        let d = case.dims();
        let (b, hq, hkv, hd) = (case.batch, case.heads, case.kv_heads, case.head_dim);
        let mut k = Strided::random(rng, d.k, [b, hkv, case.kv_len, hd], 1.0);
        let mut v = Strided::random(rng, d.v, [b, hkv, case.kv_len, hd], 1.0);
        // The padding keys of each sequence are never read: NaN them.
        if let Some(lens) = &case.lens {
            for (bi, &len) in lens.iter().enumerate() {
                for t in [&mut k, &mut v] {
                    for h in 0..hkv {
                        for i in len as usize..case.kv_len {
                            let row = t.layout.offset(bi, h, i);
                            t.data[row..row + hd].fill(T::nan());
                        }
                    }
                }
            }
        }
        // A shared prefix is one [1, Hkv, l, d] tensor read with batch stride 0.
        let pb = if case.shared_prefix { 1 } else { b };
        let prefix_k = Strided::random(rng, d.prefix_k, [pb, hkv, case.prefix_len, hd], 1.0);
        let prefix_v = Strided::random(rng, d.prefix_v, [pb, hkv, case.prefix_len, hd], 1.0);
        Inputs {
            q: Strided::random(rng, d.q, [b, hq, case.q_len, hd], 1.0),
            k,
            v,
            prefix_k: Strided {
                shape: [b, hkv, case.prefix_len, hd],
                ..prefix_k
            },
            prefix_v: Strided {
                shape: [b, hkv, case.prefix_len, hd],
                ..prefix_v
            },
        }
    }

    /// The kernel's arguments over these inputs and the case's context lengths, writing
    /// `out` and the statistics and workspace given.
    pub fn args<'a>(
        &'a self,
        case: &'a Case,
        out: &'a mut [T],
        lse: Option<&'a mut [f32]>,
        lambda: Option<&'a mut [f32]>,
        workspace: Option<&'a mut [f32]>,
    ) -> PrefixAttentionArgs<&'a [T], &'a mut [T], &'a [u32], &'a mut [f32]> {
        let context = (&self.k.data[..], &self.v.data[..]);
        PrefixAttentionArgs {
            prefix_k: &self.prefix_k.data,
            prefix_v: &self.prefix_v.data,
            workspace,
            ..self.without_prefix(context, case.lens.as_deref(), out, lse, lambda)
        }
    }

    /// The kernel's arguments over these queries, no prefix and the keys and values `kv`
    /// (the concatenation, or the context alone), with no workspace.
    pub fn without_prefix<'a>(
        &'a self,
        (k, v): (&'a [T], &'a [T]),
        context_lens: Option<&'a [u32]>,
        out: &'a mut [T],
        lse: Option<&'a mut [f32]>,
        lambda: Option<&'a mut [f32]>,
    ) -> PrefixAttentionArgs<&'a [T], &'a mut [T], &'a [u32], &'a mut [f32]> {
        PrefixAttentionArgs {
            q: &self.q.data,
            k,
            v,
            prefix_k: &[],
            prefix_v: &[],
            context_lens,
            out,
            lse,
            lambda,
            workspace: None,
        }
    }

    pub fn tensors<'a>(&'a self, case: &'a Case) -> PrefixAttentionTensors<'a, T> {
        PrefixAttentionTensors {
            q: self.q.tensor(),
            k: self.k.tensor(),
            v: self.v.tensor(),
            prefix_k: self.prefix_k.tensor(),
            prefix_v: self.prefix_v.tensor(),
            context_lens: case.lens.as_deref(),
        }
    }
}

/// A kernel's outputs: the strided output and the two statistics.
pub struct Outputs<T> {
    pub out: Strided<T>,
    pub lse: Vec<f32>,
    pub lambda: Vec<f32>,
}

impl<T: Element> Outputs<T> {
    pub fn poisoned(dims: &PrefixAttentionDims) -> Outputs<T> {
        let shape = [dims.batch, dims.heads, dims.q_len, dims.head_dim];
        Outputs {
            out: Strided::poisoned(dims.out, shape, 7),
            lse: vec![f32::NAN; dims.rows()],
            lambda: vec![f32::NAN; dims.rows()],
        }
    }
}

/// Runs the fused kernel on a case's inputs, with the split-KV workspace its dims want
/// (NaN-poisoned; `case.workspace_len` if given), so that every case that can split does,
/// unless it asks for one pass. A guard of NaN past the workspace must stay untouched: on
/// the emulator, whose kernels get exactly the workspace's slice (the GPU backend uploads
/// the slice alone, so there an overrun goes unseen but for compute-sanitizer).
pub fn run_fused<B: Backend, T: Element>(be: &B, case: &Case, x: &Inputs<T>) -> Outputs<T> {
    const GUARD: usize = 4096;
    let dims = case.dims();
    let mut o = Outputs::poisoned(&dims);
    let len = match case.split {
        true => case.workspace_len.unwrap_or(dims.workspace_len(T::DTYPE)),
        false => 0,
    };
    let mut workspace = vec![f32::NAN; len + GUARD];
    let (workspace, guard) = workspace.split_at_mut(len);
    let args = x.args(
        case,
        &mut o.out.data,
        Some(&mut o.lse),
        Some(&mut o.lambda),
        (!workspace.is_empty()).then_some(workspace),
    );
    be.attention(&case.op(), &dims, args)
        .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    assert!(
        guard.iter().all(|v| v.is_nan()),
        "{case:?}: written past a workspace of {len}"
    );
    o
}

/// The fused kernel against the reference: output (and the gaps of a strided one), LSE, λ.
pub fn check_fused<B: Backend, T: Element>(be: &B, rng: &mut Rng, case: &Case) {
    let x = Inputs::<T>::new(rng, case);
    let o = run_fused(be, case, &x);
    let r = reference::prefix_attention(&case.op(), &x.tensors(case))
        .unwrap_or_else(|e| panic!("{case:?}: reference: {e}"));
    let name = format!("{} {case:?} (seed {})", T::DTYPE, rng.seed());
    assert_close(
        &format!("out {name}"),
        &o.out.gather(),
        &r.out,
        default_tolerance(T::DTYPE),
    );
    o.out.assert_gaps_untouched(&name);
    assert_close(&format!("lse {name}"), &o.lse, &r.lse, STAT_TOL);
    assert_close(&format!("lambda {name}"), &o.lambda, &r.lambda, STAT_TOL);
}

/// `[prefix; src]` along the sequence by the backend's kv_concat, into a poisoned destination
/// of `dims.dst` (with `extra` elements past its end).
fn concatenated<B: Backend, T: Element>(
    be: &B,
    dims: &KvConcatDims,
    prefix: &Strided<T>,
    src: &Strided<T>,
    extra: usize,
) -> Strided<T> {
    let shape = [
        dims.batch,
        dims.heads,
        dims.prefix_len + dims.len,
        dims.head_dim,
    ];
    let mut dst = Strided::<T>::poisoned(dims.dst, shape, extra);
    be.concat(
        dims,
        KvConcatArgs {
            prefix: &prefix.data,
            src: &src.data,
            dst: &mut dst.data,
        },
    )
    .unwrap();
    dst
}

/// The identity with attention over the concatenation, at kernel level: kv_concat of the
/// prefix and the context, then the kernel with l = 0 on `[P; C]` (the unfused path), equals
/// the fused reference. The case must keep the prefix visible to every query under the
/// causal mask of the concatenation (Lq ≤ every context length + 1).
pub fn check_concat_identity<B: Backend, T: Element>(be: &B, rng: &mut Rng, case: &Case) {
    let x = Inputs::<T>::new(rng, case);
    let (b, hkv, l, hd) = (case.batch, case.kv_heads, case.prefix_len, case.head_dim);
    let lc = l + case.kv_len;
    let cat = |prefix: &Strided<T>, src: &Strided<T>| {
        let dims = KvConcatDims {
            prefix: prefix.layout,
            src: src.layout,
            ..KvConcatDims::new(b, hkv, l, case.kv_len, hd)
        };
        concatenated(be, &dims, prefix, src, 0)
    };
    let (kc, vc) = (cat(&x.prefix_k, &x.k), cat(&x.prefix_v, &x.v));
    // PEFT's unfused path: the prefix is part of every sequence's valid keys.
    let lens: Option<Vec<u32>> = case
        .lens
        .as_ref()
        .map(|lens| lens.iter().map(|&n| n + l as u32).collect());
    let dims = PrefixAttentionDims {
        q: x.q.layout,
        out: x.q.layout,
        ..PrefixAttentionDims::new(b, case.heads, hkv, case.q_len, lc, 0, hd)
    };
    let mut o = Outputs::<T>::poisoned(&dims);
    let concat = (&kc.data[..], &vc.data[..]);
    let (out, lse, lambda) = (
        &mut o.out.data,
        Some(&mut o.lse[..]),
        Some(&mut o.lambda[..]),
    );
    let args = x.without_prefix(concat, lens.as_deref(), out, lse, lambda);
    be.attention(&case.op(), &dims, args).unwrap();
    let r = reference::prefix_attention(&case.op(), &x.tensors(case)).unwrap();
    let name = format!("concat path {} {case:?} (seed {})", T::DTYPE, rng.seed());
    assert_close(
        &format!("out {name}"),
        &o.out.gather(),
        &r.out,
        default_tolerance(T::DTYPE),
    );
    assert_close(&format!("lse {name}"), &o.lse, &r.lse, STAT_TOL);
    // Without a prefix nothing is gated: λ = 0 everywhere.
    assert!(
        o.lambda.iter().all(|&v| v == 0.0),
        "{name}: λ without a prefix"
    );
}

/// The split path: the prefix-only kernel and the kernel with l = 0 (the context part) each
/// against their reference, then the LSE merge of the two against the reference merge of
/// the same states and against the fused reference (output, LSE, λ).
pub fn check_prefix_only_and_merge<B: Backend, T: Element>(be: &B, rng: &mut Rng, case: &Case) {
    let x = Inputs::<T>::new(rng, case);
    let dims = case.dims();
    let name = format!("{} {case:?} (seed {})", T::DTYPE, rng.seed());
    let tol = default_tolerance(T::DTYPE);
    let t = x.tensors(case);
    let contiguous = HeadLayout::bhsd(case.heads, case.q_len, case.head_dim);
    let shape = [case.batch, case.heads, case.q_len, case.head_dim];

    let mut out_p = Strided::<T>::poisoned(dims.out, shape, 3);
    let mut lse_p = vec![f32::NAN; dims.rows()];
    be.prefix_only(
        &case.op(),
        &dims,
        PrefixOnlyArgs {
            q: &x.q.data,
            prefix_k: &x.prefix_k.data,
            prefix_v: &x.prefix_v.data,
            out: &mut out_p.data,
            lse: &mut lse_p,
        },
    )
    .unwrap();
    let rp = reference::prefix_only_attention(&case.op(), &t).unwrap();
    assert_close(
        &format!("prefix-only out {name}"),
        &out_p.gather(),
        &rp.out,
        tol,
    );
    out_p.assert_gaps_untouched(&name);
    assert_close(
        &format!("prefix-only lse {name}"),
        &lse_p,
        &rp.lse,
        STAT_TOL,
    );
    // The same from dims that name no context (contiguous layouts), bit for bit.
    if case.layout == Layout::Contiguous {
        let (b, h, hkv, lq, l, d) = (
            case.batch,
            case.heads,
            case.kv_heads,
            case.q_len,
            case.prefix_len,
            case.head_dim,
        );
        let mut own = PrefixAttentionDims::prefix_only(b, h, hkv, lq, l, d);
        if case.shared_prefix {
            own = own.with_shared_prefix();
        }
        let mut out_own = Strided::<T>::poisoned(dims.out, shape, 3);
        let mut lse_own = vec![f32::NAN; dims.rows()];
        let args = PrefixOnlyArgs {
            q: &x.q.data[..],
            prefix_k: &x.prefix_k.data[..],
            prefix_v: &x.prefix_v.data[..],
            out: &mut out_own.data[..],
            lse: &mut lse_own[..],
        };
        be.prefix_only(&case.op(), &own, args).unwrap();
        let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&out_own.data),
            bits(&out_p.data),
            "prefix_only dims {name}"
        );
        assert_eq!(
            lse_own.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            lse_p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "prefix_only dims lse {name}"
        );
    }

    // The context part: the fused kernel with no prefix, into a contiguous output.
    let cdims = PrefixAttentionDims {
        prefix_len: 0,
        out: contiguous,
        ..dims
    };
    let mut out_c = Strided::<T>::poisoned(contiguous, shape, 0);
    let mut lse_c = vec![f32::NAN; dims.rows()];
    let context = (&x.k.data[..], &x.v.data[..]);
    let (lens, lse) = (case.lens.as_deref(), Some(&mut lse_c[..]));
    let args = x.without_prefix(context, lens, &mut out_c.data, lse, None);
    be.attention(&case.op(), &cdims, args).unwrap();
    let rc = reference::context_attention(&case.op(), &t).unwrap();
    assert_close(&format!("context out {name}"), &out_c.data, &rc.out, tol);
    assert_close(&format!("context lse {name}"), &lse_c, &rc.lse, STAT_TOL);

    // The merge, reading the strided prefix state and the contiguous context state.
    let mdims = LseMergeDims {
        o_prefix: dims.out,
        o_context: contiguous,
        out: dims.out,
        ..LseMergeDims::new(case.batch, case.heads, case.q_len, case.head_dim)
    };
    let mut merged = Strided::<T>::poisoned(dims.out, shape, 2);
    let (mut lse, mut lambda) = (vec![f32::NAN; dims.rows()], vec![f32::NAN; dims.rows()]);
    be.merge(
        &mdims,
        LseMergeArgs {
            o_prefix: &out_p.data,
            lse_prefix: &lse_p,
            o_context: &out_c.data,
            lse_context: &lse_c,
            out: &mut merged.data,
            lse: Some(&mut lse),
            lambda: Some(&mut lambda),
        },
    )
    .unwrap();
    merged.assert_gaps_untouched(&name);
    let rm =
        reference::lse_merge(case.head_dim, &out_p.gather(), &lse_p, &out_c.data, &lse_c).unwrap();
    assert_close(&format!("merge out {name}"), &merged.gather(), &rm.out, tol);
    assert_close(&format!("merge lse {name}"), &lse, &rm.lse, STAT_TOL);
    assert_close(
        &format!("merge lambda {name}"),
        &lambda,
        &rm.lambda,
        STAT_TOL,
    );
    // ... and the split path is the fused attention.
    let r = reference::prefix_attention(&case.op(), &t).unwrap();
    assert_close(
        &format!("split path out {name}"),
        &merged.gather(),
        &r.out,
        2.0 * tol,
    );
    assert_close(&format!("split path lse {name}"), &lse, &r.lse, STAT_TOL);
    assert_close(
        &format!("split path lambda {name}"),
        &lambda,
        &r.lambda,
        STAT_TOL,
    );
}

/// The merge on states with infinite LSEs: both empty, one empty (whose output is NaN
/// garbage, which must not be read), +∞, and ordinary rows, against the reference merge.
pub fn check_merge_infinities<B: Backend, T: Element>(be: &B, rng: &mut Rng) {
    let inf = f32::INFINITY;
    let pairs = [
        (-inf, -inf),
        (-inf, 0.5),
        (1.5, -inf),
        (inf, 2.0),
        (2.0, inf),
        (40.0, -40.0),
        (-40.0, 40.0),
        (0.25, 0.25),
        (3.0, -1.0),
    ];
    let (rows, d) = (pairs.len(), 37);
    let dims = LseMergeDims::new(1, 1, rows, d);
    let lse_p: Vec<f32> = pairs.iter().map(|p| p.0).collect();
    let lse_c: Vec<f32> = pairs.iter().map(|p| p.1).collect();
    let mut o_p: Vec<T> = rng.uniform_vec(rows * d);
    let mut o_c: Vec<T> = rng.uniform_vec(rows * d);
    for (i, &(lp, lc)) in pairs.iter().enumerate() {
        if lp == -inf {
            o_p[i * d..(i + 1) * d].fill(T::nan());
        }
        if lc == -inf {
            o_c[i * d..(i + 1) * d].fill(T::nan());
        }
    }
    let mut out = vec![T::nan(); rows * d];
    let (mut lse, mut lambda) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
    be.merge(
        &dims,
        LseMergeArgs {
            o_prefix: &o_p,
            lse_prefix: &lse_p,
            o_context: &o_c,
            lse_context: &lse_c,
            out: &mut out,
            lse: Some(&mut lse),
            lambda: Some(&mut lambda),
        },
    )
    .unwrap();
    let r = reference::lse_merge(d, &o_p, &lse_p, &o_c, &lse_c).unwrap();
    let name = format!(
        "merge with infinite LSEs {} (seed {})",
        T::DTYPE,
        rng.seed()
    );
    assert_close(
        &format!("out {name}"),
        &out,
        &r.out,
        default_tolerance(T::DTYPE),
    );
    assert_close(&format!("lse {name}"), &lse, &r.lse, STAT_TOL);
    assert_close(&format!("lambda {name}"), &lambda, &r.lambda, STAT_TOL);
    assert!(
        out.iter().all(|v| !v.to_f64().is_nan()),
        "{name}: NaN in the output"
    );
}

/// kv_concat is a copy: bit for bit, strided source and destination included.
pub fn check_concat<B: Backend, T: Element>(be: &B, rng: &mut Rng) {
    let (b, h, l, len, d) = (2, 3, rng.range(0, 40), rng.range(1, 50), 24);
    let prefix = Strided::<T>::random(rng, HeadLayout::bhsd(h, l, d), [b, h, l, d], 1.0);
    let src_layout = HeadLayout {
        batch: len * (h * d + 8) + 8,
        head: d,
        seq: h * d + 8,
    };
    let src = Strided::<T>::random(rng, src_layout, [b, h, len, d], 1.0);
    let dst_layout = HeadLayout::bshd(l + len, h, d + 8);
    let dims = KvConcatDims {
        src: src_layout,
        dst: dst_layout,
        ..KvConcatDims::new(b, h, l, len, d)
    };
    let dst = concatenated(be, &dims, &prefix, &src, 3);
    dst.assert_gaps_untouched("kv_concat");
    let (p, s, got) = (prefix.gather(), src.gather(), dst.gather());
    let row = d;
    for bh in 0..b * h {
        for j in 0..l + len {
            let want = if j < l {
                &p[(bh * l + j) * row..][..row]
            } else {
                &s[(bh * len + j - l) * row..][..row]
            };
            let at = (bh * (l + len) + j) * row;
            assert_eq!(
                bytemuck::cast_slice::<T, u8>(&got[at..at + row]),
                bytemuck::cast_slice::<T, u8>(want),
                "kv_concat row {j} of (batch·head) {bh}"
            );
        }
    }
}

#[track_caller]
fn expect_invalid(r: Result<()>, arg: &str) {
    match r {
        // Attributed to the operation, so that it says which call failed.
        Err(Error::InvalidArgument { op, arg: got, .. }) if got == arg && !op.is_empty() => {}
        other => panic!("expected an invalid `{arg}` of an operation, got {other:?}"),
    }
}

/// Changes to the buffers of `check_rejects`' case: q, k (= v), out, lse.
type Edit<'a, T> = &'a dyn Fn(&mut Vec<T>, &mut Vec<T>, &mut Vec<T>, &mut Vec<f32>);

/// Every bad argument is an `Error::InvalidArgument` naming it, before anything runs.
pub fn check_rejects<B: Backend, T: Element>(be: &B) {
    let good = Case::new(2, 4, 2, 5, 7, 3, 64);
    // Buffers sized for `good`, then edited; q is passed from element `skip` on.
    let run_skip = |dims: &PrefixAttentionDims,
                    op: PrefixAttention,
                    lens: Option<&[u32]>,
                    skip: usize,
                    edit: Edit<T>|
     -> Result<()> {
        let g = good.dims();
        let mut q = vec![T::from_f64(0.5); g.q.batch * good.batch + skip];
        let mut k = vec![T::from_f64(0.5); g.k.batch * good.batch];
        let mut out = vec![T::nan(); g.out.batch * good.batch];
        let mut lse = vec![f32::NAN; g.rows()];
        edit(&mut q, &mut k, &mut out, &mut lse);
        let pk = vec![T::from_f64(0.5); g.prefix_k.batch * good.batch];
        let mut lambda = vec![f32::NAN; g.rows()];
        be.attention(
            &op,
            dims,
            PrefixAttentionArgs {
                q: &q[skip..],
                k: &k,
                v: &k,
                prefix_k: &pk,
                prefix_v: &pk,
                context_lens: lens,
                out: &mut out,
                lse: Some(&mut lse),
                lambda: Some(&mut lambda),
                workspace: None,
            },
        )
    };
    let run = |dims: &PrefixAttentionDims,
               op: PrefixAttention,
               lens: Option<&[u32]>,
               edit: Edit<T>| { run_skip(dims, op, lens, 0, edit) };
    let none = &|_: &mut Vec<T>, _: &mut Vec<T>, _: &mut Vec<T>, _: &mut Vec<f32>| {};
    let op = good.op();
    let dims = good.dims();
    run(&dims, op, None, none).expect("the unedited case runs");

    let with = |f: &dyn Fn(&mut PrefixAttentionDims)| {
        let mut d = dims;
        f(&mut d);
        d
    };
    for (arg, d) in [
        (
            "dims.head_dim",
            with(&|d| {
                d.head_dim = 48;
                d.value_dim = 48;
            }),
        ),
        (
            "dims.head_dim",
            with(&|d| {
                d.head_dim = 0;
                d.value_dim = 0;
            }),
        ),
        ("dims.value_dim", with(&|d| d.value_dim = 32)),
        ("dims.kv_heads", with(&|d| d.kv_heads = 3)),
        ("dims.kv_heads", with(&|d| d.kv_heads = 0)),
        ("dims.heads", with(&|d| d.heads = 0)),
        (
            "dims.heads",
            with(&|d| {
                d.heads = 70_000;
                d.kv_heads = 70_000;
            }),
        ),
        ("dims.batch", with(&|d| d.batch = 70_000)),
        ("dims.q_len", with(&|d| d.q_len = 1 << 31)),
        ("dims.kv_len", with(&|d| d.kv_len = 1 << 31)),
        // Shapes the buffers cannot hold.
        ("q", with(&|d| d.q_len = 6)),
        ("k", with(&|d| d.kv_len = 8)),
        ("prefix_v", with(&|d| d.prefix_v.seq = 65)),
        ("out", with(&|d| d.out.batch += 1)),
        // Two output rows on one address.
        ("out", with(&|d| d.out.seq = 32)),
    ] {
        expect_invalid(run(&d, op, None, none), arg);
    }
    let bad_scale = PrefixAttention {
        scale: Some(-1.0),
        ..op
    };
    expect_invalid(run(&dims, bad_scale, None, none), "op.scale");
    let nan_scale = PrefixAttention {
        scale: Some(f32::NAN),
        ..op
    };
    expect_invalid(run(&dims, nan_scale, None, none), "op.scale");
    // Finite and positive, but not as the kernels' normal f32 scale·log2(e): a subnormal
    // keeps few digits (and 0 makes a masked score −∞·0 = NaN), ∞ makes every score
    // infinite.
    for scale in [1e-40, f32::MAX] {
        let op = PrefixAttention {
            scale: Some(scale),
            ..op
        };
        expect_invalid(run(&dims, op, None, none), "op.scale");
    }
    expect_invalid(run(&dims, op, Some(&[7]), none), "context_lens");
    if be.on_host() {
        expect_invalid(run(&dims, op, Some(&[7, 8]), none), "context_lens");
    }
    expect_invalid(
        run(&dims, op, None, &|_, _, _, lse| {
            lse.pop();
        }),
        "lse",
    );
    expect_invalid(
        run(&dims, op, None, &|q, _, _, _| {
            q.pop();
        }),
        "q",
    );
    if T::DTYPE != peft_kernels::DType::F32 {
        // A 16-bit tensor one element off 16 bytes is accepted on the host (copied, or a
        // GPU backend's aligned copy: `misaligned_*` check the results), and refused by
        // the GPU API's planner (tests/prefix_attention.rs).
        run_skip(&dims, op, None, 1, none).expect("a misaligned host slice runs");
        // Rows 68 elements apart are not 16-byte aligned wherever the buffer starts.
        let odd = with(&|d| d.k.seq = 68);
        expect_invalid(
            run(&odd, op, None, &|_, k, _, _| {
                k.resize(4096, T::from_f64(0.0))
            }),
            "k",
        );
    }

    // The merge and the concatenation.
    let m = LseMergeDims::new(1, 2, 3, 5);
    let o = vec![T::from_f64(0.0); 30];
    let l = vec![0.0f32; 6];
    let merge = |dims: &LseMergeDims, out_len: usize, lse_len: usize| {
        let mut out = vec![T::nan(); out_len];
        let mut lse = vec![f32::NAN; lse_len];
        be.merge(
            dims,
            LseMergeArgs {
                o_prefix: &o,
                lse_prefix: &l,
                o_context: &o,
                lse_context: &l,
                out: &mut out,
                lse: Some(&mut lse),
                lambda: None,
            },
        )
    };
    merge(&m, 30, 6).expect("the unedited merge runs");
    expect_invalid(merge(&m, 29, 6), "out");
    expect_invalid(merge(&m, 30, 5), "lse");
    expect_invalid(
        merge(&LseMergeDims { head_dim: 0, ..m }, 30, 6),
        "dims.head_dim",
    );
    expect_invalid(merge(&LseMergeDims::new(1, 2, 4, 5), 40, 8), "o_prefix");
    let c = KvConcatDims::new(1, 2, 3, 4, 5);
    let mut dst = vec![T::nan(); 70];
    expect_invalid(
        be.concat(
            &c,
            KvConcatArgs {
                prefix: &o[..29],
                src: &o,
                dst: &mut dst,
            },
        ),
        "prefix",
    );
    expect_invalid(
        be.concat(
            &KvConcatDims::new(1, 0, 3, 4, 5),
            KvConcatArgs {
                prefix: &o,
                src: &o,
                dst: &mut dst,
            },
        ),
        "dims.heads",
    );

    // prefix_only_attention's errors name it (not the fused pass it is planned as).
    let mut out = vec![T::nan(); dims.out.batch * dims.batch];
    let mut lse = vec![f32::NAN; dims.rows()];
    let q = vec![T::from_f64(0.5); dims.q.batch * dims.batch];
    let err = be
        .prefix_only(
            &op,
            &with(&|d| d.head_dim = 48),
            PrefixOnlyArgs {
                q: &q,
                prefix_k: &q,
                prefix_v: &q,
                out: &mut out,
                lse: &mut lse,
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "prefix_only_attention",
                arg: "dims.head_dim",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("prefix_only_attention: invalid argument `dims.head_dim`"),
        "{err}"
    );
}

/// An empty batch (batch = 0 or q_len = 0; kv_concat: batch = 0 or no positions) is `Ok`
/// and launches nothing, for every operation: the outputs, longer than needed and
/// poisoned, keep their poison. Every other argument is still checked.
pub fn check_empty_batches<B: Backend, T: Element>(be: &B) {
    let untouched = |name: &str, out: &[T], stats: &[&[f32]]| {
        assert!(
            out.iter().all(|v| v.to_f64().is_nan()),
            "{name}: out written"
        );
        for s in stats {
            assert!(s.iter().all(|v| v.is_nan()), "{name}: statistics written");
        }
    };
    let q = vec![T::from_f64(0.5); 4096];
    let lens = [3u32; 2];
    for (batch, q_len) in [(0, 5), (2, 0), (0, 0)] {
        let name = format!("{} batch {batch}, q_len {q_len}", T::DTYPE);
        let dims = PrefixAttentionDims::new(batch, 4, 2, q_len, 7, 3, 32);
        let (mut out, mut lse, mut lambda) = (vec![T::nan(); 9], [f32::NAN; 3], [f32::NAN; 3]);
        let mut workspace = [f32::NAN; 3];
        let args: HostPrefixAttentionArgs<T> = PrefixAttentionArgs {
            q: &q,
            k: &q,
            v: &q,
            prefix_k: &q,
            prefix_v: &q,
            context_lens: Some(&lens[..batch]),
            out: &mut out,
            lse: Some(&mut lse),
            lambda: Some(&mut lambda),
            workspace: Some(&mut workspace),
        };
        be.attention(&PrefixAttention::default(), &dims, args)
            .unwrap_or_else(|e| panic!("prefix_attention, {name}: {e}"));
        untouched(&name, &out, &[&lse, &lambda, &workspace]);
        // Checked all the same: a head dim without a kernel is refused.
        let bad = PrefixAttentionDims {
            head_dim: 48,
            value_dim: 48,
            ..dims
        };
        let mut out = vec![T::nan(); 9];
        expect_invalid(
            be.attention(
                &PrefixAttention::default(),
                &bad,
                PrefixAttentionArgs {
                    q: &q,
                    k: &q,
                    v: &q,
                    prefix_k: &q,
                    prefix_v: &q,
                    context_lens: None,
                    out: &mut out,
                    lse: None,
                    lambda: None,
                    workspace: None,
                },
            ),
            "dims.head_dim",
        );

        let dims = PrefixAttentionDims::prefix_only(batch, 4, 2, q_len, 3, 32);
        let mut out = vec![T::nan(); 9];
        let args: HostPrefixOnlyArgs<T> = PrefixOnlyArgs {
            q: &q,
            prefix_k: &q,
            prefix_v: &q,
            out: &mut out,
            lse: &mut lse,
        };
        be.prefix_only(&PrefixAttention::default(), &dims, args)
            .unwrap_or_else(|e| panic!("prefix_only_attention, {name}: {e}"));
        untouched(&name, &out, &[&lse]);

        let dims = LseMergeDims::new(batch, 4, q_len, 32);
        let mut out = vec![T::nan(); 9];
        let args: HostLseMergeArgs<T> = LseMergeArgs {
            o_prefix: &q,
            lse_prefix: &[],
            o_context: &q,
            lse_context: &[],
            out: &mut out,
            lse: Some(&mut lse),
            lambda: Some(&mut lambda),
        };
        be.merge(&dims, args)
            .unwrap_or_else(|e| panic!("lse_merge, {name}: {e}"));
        untouched(&name, &out, &[&lse, &lambda]);
    }
    // kv_concat: no sequences, or no positions in them.
    for (batch, prefix_len, len) in [(0, 3, 4), (2, 0, 0), (0, 0, 0)] {
        let dims = KvConcatDims::new(batch, 4, prefix_len, len, 32);
        let mut dst = vec![T::nan(); 9];
        let args: HostKvConcatArgs<T> = KvConcatArgs {
            prefix: &q,
            src: &q,
            dst: &mut dst,
        };
        be.concat(&dims, args)
            .unwrap_or_else(|e| panic!("kv_concat, batch {batch}, {prefix_len} + {len}: {e}"));
        untouched("kv_concat", &dst, &[]);
    }
}

/// Every buffer of a call copied to one element past a 16-byte boundary (as a slice into a
/// `Vec<T>` may start), the call made on the inner backend, the outputs copied back: the
/// suites run through it check that every operation and dtype accepts host slices of any
/// alignment (against the reference, as they always do).
pub struct Misaligning<'a, B>(pub &'a B);

impl<B: Backend> Backend for Misaligning<'_, B> {
    fn attention<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        a: PrefixAttentionArgs<&[T], &mut [T], &[u32], &mut [f32]>,
    ) -> Result<()> {
        let [q, k, v, pk, pv] = [a.q, a.k, a.v, a.prefix_k, a.prefix_v].map(Placed::misaligned);
        let lens = a.context_lens.map(Placed::misaligned);
        let mut out = Placed::misaligned(a.out);
        let mut stats =
            [&a.lse, &a.lambda, &a.workspace].map(|s| s.as_deref().map(Placed::misaligned));
        let [lse, lambda, workspace] = &mut stats;
        let result = self.0.attention(
            op,
            dims,
            PrefixAttentionArgs {
                q: q.get(),
                k: k.get(),
                v: v.get(),
                prefix_k: pk.get(),
                prefix_v: pv.get(),
                context_lens: lens.as_ref().map(|l| l.get()),
                out: out.get_mut(),
                lse: lse.as_mut().map(|s| s.get_mut()),
                lambda: lambda.as_mut().map(|s| s.get_mut()),
                workspace: workspace.as_mut().map(|s| s.get_mut()),
            },
        );
        out.copy_to(a.out);
        for (copy, dst) in stats.iter().zip([a.lse, a.lambda, a.workspace]) {
            if let (Some(copy), Some(dst)) = (copy, dst) {
                copy.copy_to(dst);
            }
        }
        result
    }
    fn prefix_only<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        a: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
    ) -> Result<()> {
        let [q, pk, pv] = [a.q, a.prefix_k, a.prefix_v].map(Placed::misaligned);
        let (mut out, mut lse) = (Placed::misaligned(a.out), Placed::misaligned(a.lse));
        let result = self.0.prefix_only(
            op,
            dims,
            PrefixOnlyArgs {
                q: q.get(),
                prefix_k: pk.get(),
                prefix_v: pv.get(),
                out: out.get_mut(),
                lse: lse.get_mut(),
            },
        );
        out.copy_to(a.out);
        lse.copy_to(a.lse);
        result
    }
    fn merge<T: Element>(
        &self,
        dims: &LseMergeDims,
        a: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
    ) -> Result<()> {
        let [o_p, o_c] = [a.o_prefix, a.o_context].map(Placed::misaligned);
        let [lse_p, lse_c] = [a.lse_prefix, a.lse_context].map(Placed::misaligned);
        let mut out = Placed::misaligned(a.out);
        let mut stats = [&a.lse, &a.lambda].map(|s| s.as_deref().map(Placed::misaligned));
        let [lse, lambda] = &mut stats;
        let result = self.0.merge(
            dims,
            LseMergeArgs {
                o_prefix: o_p.get(),
                lse_prefix: lse_p.get(),
                o_context: o_c.get(),
                lse_context: lse_c.get(),
                out: out.get_mut(),
                lse: lse.as_mut().map(|s| s.get_mut()),
                lambda: lambda.as_mut().map(|s| s.get_mut()),
            },
        );
        out.copy_to(a.out);
        for (copy, dst) in stats.iter().zip([a.lse, a.lambda]) {
            if let (Some(copy), Some(dst)) = (copy, dst) {
                copy.copy_to(dst);
            }
        }
        result
    }
    fn concat<T: Element>(
        &self,
        dims: &KvConcatDims,
        a: KvConcatArgs<&[T], &mut [T]>,
    ) -> Result<()> {
        let [prefix, src] = [a.prefix, a.src].map(Placed::misaligned);
        let mut dst = Placed::misaligned(a.dst);
        let result = self.0.concat(
            dims,
            KvConcatArgs {
                prefix: prefix.get(),
                src: src.get(),
                dst: dst.get_mut(),
            },
        );
        dst.copy_to(a.dst);
        result
    }
    fn on_host(&self) -> bool {
        self.0.on_host()
    }
}

// ---------------------------------------------------------------------------------------
// The suites, one test each on every backend.

/// Random shapes (around every tile edge) for every head dim, `per_dim` cases each.
pub fn every_head_dim<B: Backend, T: Element>(be: &B, per_dim: usize) {
    let mut rng = Rng::from_env();
    for d in HEAD_DIMS {
        for _ in 0..per_dim {
            let case = Case::random(&mut rng, d);
            check_fused::<_, T>(be, &mut rng, &case);
        }
    }
}

/// [`Case::random_wide`] cases in turn over the dtypes, fresh every run: 6 of them unless
/// `PEFT_RANDOM_CASES` asks for another count.
pub fn random_configurations<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for i in 0..random_cases(6) {
        let case = Case::random_wide(&mut rng);
        match i % 3 {
            0 => check_fused::<_, f32>(be, &mut rng, &case),
            1 => check_fused::<_, f16>(be, &mut rng, &case),
            _ => check_fused::<_, bf16>(be, &mut rng, &case),
        }
    }
}

/// Several query tiles and many key tiles: the cp.async double buffer turns over.
pub fn many_tiles<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    // Few heads: every case splits its keys; once more as one long pass.
    let split = Case::new(1, 2, 1, 150, 333, 100, 128).causal(true);
    for case in [split.clone(), split.single_pass()] {
        check_fused::<_, bf16>(be, &mut rng, &case);
        check_fused::<_, f16>(
            be,
            &mut rng,
            &Case {
                head_dim: 256,
                ..case.clone()
            },
        );
        check_fused::<_, f32>(
            be,
            &mut rng,
            &Case {
                head_dim: 96,
                ..case
            },
        );
    }
}

/// The scale of the scores given explicitly rather than 1/sqrt(d).
pub fn explicit_scale<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    let case = Case {
        scale: Some(0.3),
        ..Case::new(1, 2, 1, 33, 40, 9, 64).causal(true)
    };
    check_fused::<_, bf16>(be, &mut rng, &case);
    check_fused::<_, f32>(be, &mut rng, &case);
}

pub fn identity_with_concatenation<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for causal in [false, true] {
        // Lq ≤ every context length: under the causal mask of [P; C] each query still sees
        // the whole prefix.
        let case = Case::new(2, 4, 2, 47, 93, 30, 64)
            .causal(causal)
            .lens(vec![50, 93]);
        check_concat_identity::<_, bf16>(be, &mut rng, &case);
        check_concat_identity::<_, f32>(be, &mut rng, &case);
        let strided = Case::new(1, 2, 1, 20, 70, 66, 128)
            .causal(causal)
            .layout(Layout::Strided);
        check_concat_identity::<_, f16>(be, &mut rng, &strided);
    }
}

/// Rows that see no context key (causal with Lq > the context length, empty sequences):
/// with a prefix λ = 1 and the output is the prefix attention; without one the output is 0,
/// the LSE −∞ and λ = 0. Never NaN.
pub fn rows_that_see_nothing<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for l in [0, 5] {
        let case = Case::new(3, 2, 1, 70, 40, l, 64)
            .causal(true)
            .lens(vec![0, 3, 40]);
        check_fused::<_, bf16>(be, &mut rng, &case);
        check_fused::<_, f32>(be, &mut rng, &case);
        // No context at all.
        check_fused::<_, f16>(be, &mut rng, &Case::new(1, 2, 2, 9, 0, l, 32));
    }
    // Exactly: the first 30 rows see no context key.
    let case = Case::new(1, 1, 1, 70, 40, 5, 64).causal(true);
    let x = Inputs::<bf16>::new(&mut rng, &case);
    let o = run_fused(be, &case, &x);
    for i in 0..30 {
        assert_eq!(o.lambda[i], 1.0, "row {i} sees only the prefix");
    }
    let empty = Case {
        prefix_len: 0,
        ..case
    };
    let x = Inputs::<bf16>::new(&mut rng, &empty);
    let o = run_fused(be, &empty, &x);
    for i in 0..30 {
        let stats = (o.lse[i], o.lambda[i]);
        assert_eq!(stats, (f32::NEG_INFINITY, 0.0), "row {i} sees nothing");
    }
    assert!(o.out.gather()[..30 * 64].iter().all(|v| v.to_f32() == 0.0));
}

pub fn long_prefix<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    let case = Case::new(1, 2, 1, 40, 70, 513, 128).causal(true);
    check_fused::<_, bf16>(be, &mut rng, &case);
    check_fused::<_, f32>(
        be,
        &mut rng,
        &Case {
            head_dim: 64,
            ..case
        },
    );
}

pub fn ragged_context_lengths<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for causal in [false, true] {
        let lens = random_lens(&mut rng, 4, 130);
        let case = Case::new(4, 2, 1, 65, 130, 17, 64)
            .causal(causal)
            .lens(lens);
        check_fused::<_, f16>(be, &mut rng, &case);
        check_fused::<_, f32>(be, &mut rng, &case);
    }
}

pub fn grouped_and_multi_query_heads<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for kv_heads in [1, 2, 4, 8] {
        let case = Case::new(1, 8, kv_heads, 19, 45, 7, 64).causal(kv_heads % 2 == 0);
        check_fused::<_, bf16>(be, &mut rng, &case);
    }
    check_fused::<_, f32>(be, &mut rng, &Case::new(2, 6, 2, 21, 33, 4, 32));
}

/// Decoding: one query per sequence against a long cached context.
pub fn decode_single_query<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for causal in [false, true] {
        let case = Case::new(3, 4, 2, 1, 300, 30, 128)
            .causal(causal)
            .lens(vec![300, 1, 177]);
        check_fused::<_, bf16>(be, &mut rng, &case);
        check_fused::<_, f32>(be, &mut rng, &case);
    }
}

/// Decoding with few sequences and heads: the keys split over runs of blocks (flash-decoding)
/// whose states the merge combines, checked against the reference like every fused case
/// (run_fused passes the workspace). Long and empty contexts, a long prefix, GQA, causal and
/// ragged, d = 64 and 256, every dtype; the plan must split each (else the test proves
/// nothing), and short workspaces split less (see `split_edges`).
pub fn split_kv_decode<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    let cases = [
        Case::new(1, 4, 1, 1, 2000, 30, 128),
        Case::new(2, 8, 2, 1, 1500, 7, 64)
            .causal(true)
            .lens(vec![0, 1500]),
        Case::new(1, 2, 2, 3, 300, 700, 256).causal(true),
        Case::new(1, 1, 1, 2, 1100, 0, 128).lens(vec![999]),
        // d not a multiple of 32 in the merge; a strided output.
        Case::new(1, 2, 1, 1, 1200, 30, 80),
        Case::new(1, 3, 1, 2, 900, 100, 96).layout(Layout::Strided),
        // Prefill whose first rows see nothing of the context (and no prefix).
        Case::new(1, 1, 1, 64, 1000, 0, 64)
            .causal(true)
            .lens(vec![40]),
    ];
    for case in &cases {
        check_split::<_, f32>(be, &mut rng, case);
        check_split::<_, f16>(be, &mut rng, case);
        check_split::<_, bf16>(be, &mut rng, case);
    }
    split_edges::<_, f32>(be, &mut rng, &cases[0]);
    split_edges::<_, bf16>(be, &mut rng, &cases[0]);
}

/// The dims' `split_target` sets the runs and the workspace follows it: one decode step of 4
/// query heads over one KV head (one block: the group is packed) across 33 key tiles, split
/// into 7 runs of 5 at the default target (128 blocks want 33 / 4 = 8 runs: runs of ≥ 4
/// tiles), 4 runs at a target of 4, none at 0; each against the reference.
pub fn split_target_sets_the_runs<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    let base = Case::new(1, 4, 1, 1, 2000, 30, 128);
    let mut last_len = usize::MAX;
    for (split_target, runs) in [(DEFAULT_SPLIT_TARGET, 7), (4, 4), (0, 1)] {
        let case = Case {
            split_target,
            ..base.clone()
        };
        for dtype in [DType::F16, DType::BF16] {
            let got = peft_kernels::plan::prefix_attention::kv_splits(&case.dims(), dtype);
            assert_eq!(got, runs, "split target {split_target}, {dtype}");
        }
        let len = case.dims().workspace_len(DType::BF16);
        assert!(
            len < last_len,
            "split target {split_target}: workspace {len}"
        );
        last_len = len;
        check_fused::<_, bf16>(be, &mut rng, &case);
    }
}

/// The plan splits `case` for T (else the check proves nothing), and the split pass is right.
fn check_split<B: Backend, T: Element>(be: &B, rng: &mut Rng, case: &Case) {
    let splits = peft_kernels::plan::prefix_attention::kv_splits(&case.dims(), T::DTYPE);
    assert!(splits > 1, "{case:?} does not split in {}", T::DTYPE);
    check_fused::<_, T>(be, rng, case);
}

/// Split-KV's exact edges for T: rows that see only the prefix (no context) have λ = 1
/// exactly, as from one pass; rows that see nothing at all (no prefix, no context) 0 output,
/// LSE −∞, λ 0; and workspaces shorter than `case`'s split into fewer runs, still right.
fn split_edges<B: Backend, T: Element>(be: &B, rng: &mut Rng, case: &Case) {
    for (prefix_len, lambda) in [(700, 1.0f32), (0, 0.0)] {
        let edge = Case::new(1, 64, 8, 1, 1200, prefix_len, 64).lens(vec![0]);
        let splits = peft_kernels::plan::prefix_attention::kv_splits(&edge.dims(), T::DTYPE);
        assert!(splits > 1, "{edge:?} does not split in {}", T::DTYPE);
        let x = Inputs::<T>::new(rng, &edge);
        let o = run_fused(be, &edge, &x);
        assert!(
            o.lambda.iter().all(|&l| l == lambda),
            "{} {edge:?}: λ {:?}",
            T::DTYPE,
            o.lambda
        );
        if prefix_len == 0 {
            assert!(
                o.lse.iter().all(|&l| l == f32::NEG_INFINITY),
                "{} {edge:?}: LSE",
                T::DTYPE
            );
            assert!(
                o.out.gather().iter().all(|v| v.to_f64() == 0.0),
                "{} {edge:?}: output",
                T::DTYPE
            );
        }
    }
    // A workspace shorter than the dims want splits into the runs it has room for (or none):
    // one short of the want, two runs' worth, one run's worth less one.
    let (want, one_run) = (case.dims().workspace_len(T::DTYPE), run_state_len(case));
    for len in [want - 1, 2 * one_run, one_run - 1] {
        let short = Case {
            workspace_len: Some(len),
            ..case.clone()
        };
        check_fused::<_, T>(be, rng, &short);
    }
}

/// f32 elements of one split-KV run's states: the output and 4 statistics per query row.
pub fn run_state_len(case: &Case) -> usize {
    case.batch * case.heads * case.q_len * (case.head_dim + 4)
}

/// Grouped-query attention with few queries: the query heads of a KV group share one
/// block's rows (the plan must pack each case here, else the test proves nothing). Causal
/// limits per query, MQA filling the 64 rows exactly, ragged lengths, decoding in the
/// `[B, L, H, d]` layout (rows a head stride apart), and with split-KV; a strided layout
/// with Lq > 1, whose heads are not Lq rows apart, is not packed and must still be right.
/// Every dtype.
pub fn grouped_heads_share_a_block<B: Backend>(be: &B) {
    use peft_kernels::plan::prefix_attention::packed_heads;
    let mut rng = Rng::from_env();
    let packed = [
        Case::new(2, 8, 2, 5, 100, 20, 64).causal(true),
        Case::new(1, 16, 1, 4, 70, 9, 128)
            .lens(vec![33])
            .causal(true),
        Case::new(3, 8, 4, 1, 50, 30, 96).layout(Layout::Strided),
        // Packed and split: per-query causal limits over runs; strided decode.
        Case::new(1, 8, 2, 1, 3000, 30, 128).causal(true),
        Case::new(1, 8, 2, 4, 2000, 30, 64).causal(true),
        Case::new(1, 8, 2, 1, 3000, 30, 128).layout(Layout::Strided),
    ];
    for (i, case) in packed.iter().enumerate() {
        assert!(packed_heads(&case.dims()) > 1, "{case:?} is not packed");
        if i < 3 {
            check_fused::<_, f32>(be, &mut rng, case);
            check_fused::<_, bf16>(be, &mut rng, case);
            check_fused::<_, f16>(be, &mut rng, case);
        } else {
            check_split::<_, f32>(be, &mut rng, case);
            check_split::<_, bf16>(be, &mut rng, case);
            check_split::<_, f16>(be, &mut rng, case);
        }
    }
    let unpacked = Case::new(1, 8, 2, 5, 100, 20, 64)
        .causal(true)
        .layout(Layout::Strided);
    assert_eq!(packed_heads(&unpacked.dims()), 1);
    check_fused::<_, bf16>(be, &mut rng, &unpacked);
    check_fused::<_, f32>(be, &mut rng, &unpacked);
}

pub fn strided_layouts_and_a_shared_prefix<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for shared_prefix in [false, true] {
        let case = Case {
            shared_prefix,
            ..Case::new(2, 4, 2, 37, 80, 21, 96)
                .causal(true)
                .layout(Layout::Strided)
        };
        check_fused::<_, bf16>(be, &mut rng, &case);
        check_fused::<_, f32>(be, &mut rng, &case);
        check_fused::<_, f16>(
            be,
            &mut rng,
            &Case {
                head_dim: 80,
                ..case
            },
        );
    }
}

/// Only the output asked for: no LSE, no λ.
pub fn statistics_are_optional<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    let case = Case::new(1, 2, 1, 10, 20, 5, 64);
    let x = Inputs::<bf16>::new(&mut rng, &case);
    let dims = case.dims();
    let mut out = vec![bf16::NAN; dims.rows() * 64];
    let args = x.args(&case, &mut out, None, None, None);
    be.attention(&case.op(), &dims, args).unwrap();
    let r = reference::prefix_attention(&case.op(), &x.tensors(&case)).unwrap();
    assert_close(
        "out without statistics",
        &out,
        &r.out,
        default_tolerance(bf16::DTYPE),
    );
}

pub fn prefix_only_and_merge<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    for d in [64, 128] {
        let case = Case::random(&mut rng, d);
        check_prefix_only_and_merge::<_, bf16>(be, &mut rng, &case);
    }
    let case = Case::new(2, 2, 1, 50, 60, 13, 64)
        .causal(true)
        .lens(vec![20, 60]);
    check_prefix_only_and_merge::<_, f32>(be, &mut rng, &case);
    let strided = Case::new(1, 2, 2, 17, 30, 0, 32).layout(Layout::Strided);
    check_prefix_only_and_merge::<_, f16>(be, &mut rng, &strided);
}

pub fn merge_with_infinite_lses<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    check_merge_infinities::<_, f32>(be, &mut rng);
    check_merge_infinities::<_, f16>(be, &mut rng);
    check_merge_infinities::<_, bf16>(be, &mut rng);
}

pub fn kv_concat_is_a_copy<B: Backend>(be: &B) {
    let mut rng = Rng::from_env();
    check_concat::<_, f32>(be, &mut rng);
    check_concat::<_, bf16>(be, &mut rng);
}

pub fn bad_arguments_are_errors<B: Backend>(be: &B) {
    check_rejects::<_, f32>(be);
    check_rejects::<_, bf16>(be);
}

pub fn empty_batches<B: Backend>(be: &B) {
    check_empty_batches::<_, f32>(be);
    check_empty_batches::<_, f16>(be);
    check_empty_batches::<_, bf16>(be);
}

/// Every operation in every dtype on host slices one element past 16-byte alignment
/// ([`Misaligning`]): the fused pass (one random case per dtype, and a split decode whose
/// workspace is misaligned too), the prefix part, the context part and their merge, the
/// merge of infinite LSEs, the concatenation.
pub fn misaligned_buffers<B: Backend>(be: &B) {
    let be = &Misaligning(be);
    let mut rng = Rng::from_env();
    misaligned_every_op::<_, f32>(be, &mut rng);
    misaligned_every_op::<_, f16>(be, &mut rng);
    misaligned_every_op::<_, bf16>(be, &mut rng);
}

fn misaligned_every_op<B: Backend, T: Element>(be: &Misaligning<B>, rng: &mut Rng) {
    let d = rng.pick(&HEAD_DIMS);
    let case = Case::random(rng, d);
    check_fused::<_, T>(be, rng, &case);
    let decode = Case::new(1, 4, 2, 1, 700, 30, 64).causal(true);
    check_split::<_, T>(be, rng, &decode);
    let d = rng.pick(&[32, 64, 96]);
    let case = Case::random(rng, d);
    check_prefix_only_and_merge::<_, T>(be, rng, &case);
    check_merge_infinities::<_, T>(be, rng);
    check_concat::<_, T>(be, rng);
}
