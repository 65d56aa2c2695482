//! The multi-tenant prefix-attention checks (`multi_prefix_attention`), written once over a
//! `host::Backend`: the emulator (tests/multi_prefix_attention.rs) and the GPU
//! (tests/gpu_multi_prefix_attention.rs) run the same suites against the reference, which is
//! the single-prefix f64 reference sequence by sequence
//! (`reference::multi_prefix_attention`).
//!
//! Every input is NaN wherever it must not be read (the set's spare rows and row padding, the
//! context keys past `context_lens`), and every output NaN before the run.

use crate::common::{random_cases, Rng};
use peft_kernels::host::{self, Backend};
use peft_kernels::prefix_attention::{
    HeadLayout, HostMultiPrefixAttentionArgs, HostPrefixAttentionArgs, MultiPrefixAttentionArgs,
    MultiPrefixDims, PrefixAttention, PrefixAttentionArgs, HEAD_DIMS,
};
use peft_kernels::reference::{self, MultiPrefixAttentionTensors, Tensor4};
use peft_kernels::validate::{assert_close, default_tolerance};
use peft_kernels::{Element, Error, Result, DEFAULT_SPLIT_TARGET};

/// Relative tolerance of the f32 statistics (LSE, λ), as in the single-prefix suites.
pub const STAT_TOL: f64 = 1e-5;

/// The prefix lengths a set draws from (0: an empty range, the same as no prefix).
pub const PREFIX_LENS: [usize; 6] = [0, 1, 5, 16, 33, 64];

/// One multi-tenant problem.
#[derive(Clone, Debug)]
pub struct MultiCase {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub lens: Option<Vec<u32>>,
    /// The set's prefix lengths, packed in this order.
    pub prefix_lens: Vec<usize>,
    /// Each sequence's prefix id, −1 for none.
    pub ids: Vec<i32>,
    /// Unused rows at the end of the set (room to add a prefix).
    pub spare_rows: usize,
    /// The dims' `prefix_len` beyond the longest prefix (an upper bound may be loose).
    pub slack: usize,
    /// The set's rows padded by 8 elements per KV head (else contiguous `[rows, Hkv, d]`).
    pub padded_set: bool,
    /// Give the split-KV workspace the dims want.
    pub split: bool,
    pub split_target: usize,
}

impl MultiCase {
    /// A random mixture: 1–6 sequences, 1–5 prefixes of lengths from [`PREFIX_LENS`], ids
    /// with repeats and −1, sometimes every sequence on one prefix or none; decoding
    /// (q_len = 1, often over a long cache) 40% of the time, else prefill chunks; causal or
    /// not, ragged context lengths, grouped-query heads, the split-KV workspace or not.
    pub fn random(rng: &mut Rng, head_dim: usize) -> MultiCase {
        let batch = rng.range(1, 6);
        let kv_heads = rng.range(1, 2);
        let heads = kv_heads * rng.pick(&[1, 2, 4]);
        let q_len = if rng.chance(0.4) { 1 } else { rng.range(1, 80) };
        // Decoding over long caches half the time, where the split-KV workspace splits.
        let kv_len = match (q_len, rng.range(0, 9)) {
            (_, 0) => 0,
            (1, 1..=5) => rng.range(150, 700),
            _ => rng.range(1, 150),
        };
        let n = rng.range(1, 5);
        let prefix_lens: Vec<usize> = (0..n)
            .map(|_| match rng.chance(0.1) {
                true => 0,
                false => rng.pick(&PREFIX_LENS[1..]),
            })
            .collect();
        let ids: Vec<i32> = match rng.range(0, 9) {
            0 => vec![rng.range(0, n - 1) as i32; batch],
            1 => vec![-1; batch],
            _ => (0..batch)
                .map(|_| match rng.chance(0.2) {
                    true => -1,
                    false => rng.range(0, n - 1) as i32,
                })
                .collect(),
        };
        let causal = rng.chance(0.5);
        let lens = rng.chance(0.4).then(|| {
            (0..batch)
                .map(|_| match rng.range(0, 4) {
                    0 => 0,
                    1 => kv_len as u32,
                    _ => rng.range(0, kv_len) as u32,
                })
                .collect()
        });
        MultiCase {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim,
            causal,
            lens,
            prefix_lens,
            ids,
            spare_rows: rng.pick(&[0, 0, 3, 17]),
            slack: rng.pick(&[0, 0, 0, 40]),
            padded_set: rng.chance(0.3),
            split: rng.chance(0.6),
            split_target: rng.pick(&[DEFAULT_SPLIT_TARGET, DEFAULT_SPLIT_TARGET, 1024]),
        }
    }

    pub fn offsets(&self) -> Vec<u32> {
        let mut o = vec![0u32];
        for &l in &self.prefix_lens {
            o.push(o.last().unwrap() + l as u32);
        }
        o
    }

    pub fn set_rows(&self) -> usize {
        self.prefix_lens.iter().sum::<usize>() + self.spare_rows
    }

    pub fn dims(&self) -> MultiPrefixDims {
        let max = self.prefix_lens.iter().copied().max().unwrap_or(0) + self.slack;
        let mut d = MultiPrefixDims::new(
            self.batch,
            self.heads,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
            self.prefix_lens.len(),
            self.set_rows(),
            max,
        );
        if self.padded_set {
            let head = self.head_dim + 8;
            let set = HeadLayout {
                batch: 0,
                head,
                seq: self.kv_heads * head,
            };
            d.attention.prefix_k = set;
            d.attention.prefix_v = set;
        }
        d.attention.split_target = self.split_target;
        d
    }

    pub fn op(&self) -> PrefixAttention {
        PrefixAttention {
            scale: None,
            causal: self.causal,
        }
    }
}

/// A case's inputs: contiguous q, k, v and the packed set.
pub struct MultiInputs<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub set_k: Vec<T>,
    pub set_v: Vec<T>,
    pub offsets: Vec<u32>,
}

impl<T: Element> MultiInputs<T> {
    pub fn new(rng: &mut Rng, c: &MultiCase) -> MultiInputs<T> {
        let d = c.dims();
        let a = &d.attention;
        let mut k = rng.normal_vec::<T>(c.batch * c.kv_heads * c.kv_len * c.head_dim, 1.0);
        let mut v = rng.normal_vec::<T>(k.len(), 1.0);
        if let Some(lens) = &c.lens {
            for (b, &len) in lens.iter().enumerate() {
                for h in 0..c.kv_heads {
                    for i in len as usize..c.kv_len {
                        let at = a.k.offset(b, h, i);
                        k[at..at + c.head_dim].fill(T::nan());
                        v[at..at + c.head_dim].fill(T::nan());
                    }
                }
            }
        }
        // The set: NaN but for the used rows' elements (spare rows and padding stay NaN).
        let len = c.set_rows() * a.prefix_k.seq + 5;
        let (mut set_k, mut set_v) = (vec![T::nan(); len], vec![T::nan(); len]);
        let used = c.offsets().last().copied().unwrap_or(0) as usize;
        for row in 0..used {
            for h in 0..c.kv_heads {
                let at = row * a.prefix_k.seq + h * a.prefix_k.head;
                for e in at..at + c.head_dim {
                    set_k[e] = T::from_f64(rng.normal());
                    set_v[e] = T::from_f64(rng.normal());
                }
            }
        }
        MultiInputs {
            q: rng.normal_vec::<T>(c.batch * c.heads * c.q_len * c.head_dim, 1.0),
            k,
            v,
            set_k,
            set_v,
            offsets: c.offsets(),
        }
    }

    /// Prefix i of the set as a `[1, Hkv, l_i, d]` tensor.
    fn prefix<'a>(&self, set: &'a [T], c: &MultiCase, i: usize) -> Tensor4<'a, T> {
        let l = c.dims().attention.prefix_k;
        let lo = self.offsets[i] as usize;
        Tensor4::strided(
            &set[lo * l.seq..],
            [1, c.kv_heads, c.prefix_lens[i], c.head_dim],
            [0, l.head, l.seq, 1],
        )
    }

    /// The reference: each sequence's single-prefix reference.
    pub fn reference(&self, c: &MultiCase) -> reference::PrefixAttentionOutput {
        let n = c.prefix_lens.len();
        let pk: Vec<_> = (0..n).map(|i| self.prefix(&self.set_k, c, i)).collect();
        let pv: Vec<_> = (0..n).map(|i| self.prefix(&self.set_v, c, i)).collect();
        let shape = |h: usize, l: usize| [c.batch, h, l, c.head_dim];
        let t = MultiPrefixAttentionTensors {
            q: Tensor4::contiguous(&self.q, shape(c.heads, c.q_len)),
            k: Tensor4::contiguous(&self.k, shape(c.kv_heads, c.kv_len)),
            v: Tensor4::contiguous(&self.v, shape(c.kv_heads, c.kv_len)),
            prefixes_k: &pk,
            prefixes_v: &pv,
            ids: &c.ids,
            context_lens: c.lens.as_deref(),
        };
        reference::multi_prefix_attention(&c.op(), &t).unwrap_or_else(|e| panic!("{c:?}: {e}"))
    }
}

/// A run's outputs.
pub struct MultiOutputs<T> {
    pub out: Vec<T>,
    pub lse: Vec<f32>,
    pub lambda: Vec<f32>,
    pub status: u32,
}

/// Runs `multi_prefix_attention` on a case's inputs (outputs NaN-poisoned, the workspace the
/// dims want when the case splits).
pub fn run_multi<T: Element>(be: &Backend, c: &MultiCase, x: &MultiInputs<T>) -> MultiOutputs<T> {
    let dims = c.dims();
    let rows = dims.rows();
    let mut o = MultiOutputs {
        out: vec![T::nan(); rows * c.head_dim],
        lse: vec![f32::NAN; rows],
        lambda: vec![f32::NAN; rows],
        status: 0,
    };
    let ws_len = if c.split {
        dims.workspace_len(T::DTYPE)
    } else {
        0
    };
    let mut workspace = vec![f32::NAN; ws_len];
    let mut status = [0u32];
    let args: HostMultiPrefixAttentionArgs<T> = MultiPrefixAttentionArgs {
        q: &x.q,
        k: &x.k,
        v: &x.v,
        prefix_k: &x.set_k,
        prefix_v: &x.set_v,
        prefix_offsets: &x.offsets,
        prefix_ids: &c.ids,
        context_lens: c.lens.as_deref(),
        out: &mut o.out,
        lse: Some(&mut o.lse),
        lambda: Some(&mut o.lambda),
        workspace: (ws_len > 0).then_some(&mut workspace[..]),
        status: Some(&mut status),
    };
    host::multi_prefix_attention(be, &c.op(), &dims, args).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    o.status = status[0];
    o
}

/// A case against the reference: output, LSE, λ, and a clear status.
pub fn check_multi<T: Element>(be: &Backend, rng: &mut Rng, c: &MultiCase) {
    let x = MultiInputs::<T>::new(rng, c);
    let o = run_multi(be, c, &x);
    let r = x.reference(c);
    let name = format!("{} {c:?} (seed {})", T::DTYPE, rng.seed());
    assert_close(
        &format!("out {name}"),
        &o.out,
        &r.out,
        default_tolerance(T::DTYPE),
    );
    assert_close(&format!("lse {name}"), &o.lse, &r.lse, STAT_TOL);
    assert_close(&format!("lambda {name}"), &o.lambda, &r.lambda, STAT_TOL);
    assert_eq!(o.status, 0, "{name}: status");
}

/// Random mixtures in one dtype, over every head dim in turn.
pub fn random_mixtures<T: Element>(be: &Backend, cases: usize) {
    let mut rng = Rng::from_env();
    for i in 0..random_cases(cases) {
        let c = MultiCase::random(&mut rng, HEAD_DIMS[i % HEAD_DIMS.len()]);
        check_multi::<T>(be, &mut rng, &c);
    }
}

/// Decode (q_len = 1) and prefill shapes with every sequence on a different prefix, each
/// length of [`PREFIX_LENS`] once, the split-KV workspace given: GQA, causal and ragged.
pub fn decode_and_prefill<T: Element>(be: &Backend) {
    let mut rng = Rng::from_env();
    for q_len in [1, 37] {
        let c = MultiCase {
            batch: 7,
            heads: 4,
            kv_heads: 2,
            q_len,
            kv_len: 130,
            head_dim: 64,
            causal: true,
            lens: Some(vec![130, 0, 64, 65, 1, 129, 100]),
            prefix_lens: PREFIX_LENS.to_vec(),
            ids: vec![5, 0, 1, 2, 3, 4, -1],
            spare_rows: 0,
            slack: 0,
            padded_set: false,
            split: true,
            split_target: DEFAULT_SPLIT_TARGET,
        };
        check_multi::<T>(be, &mut rng, &c);
    }
}

/// Decoding with the split-KV workspace over long contexts (the key tiles of each block split
/// into runs and merged): the blocks' tile counts differ with their prefixes, a 200-row
/// prefix spans runs, some runs lie wholly in a prefix or wholly in the context, and a
/// sequence with an empty context or no prefix has empty runs.
pub fn split_kv_decode<T: Element>(be: &Backend) {
    let mut rng = Rng::from_env();
    for (causal, split_target) in [(true, 1024), (false, DEFAULT_SPLIT_TARGET)] {
        let c = MultiCase {
            batch: 6,
            heads: 4,
            kv_heads: 2,
            q_len: 1,
            kv_len: 600,
            head_dim: 64,
            causal,
            lens: Some(vec![600, 0, 1, 300, 599, 64]),
            prefix_lens: vec![200, 64, 33, 1, 0],
            ids: vec![0, 0, 1, 2, 3, -1],
            spare_rows: 0,
            slack: 0,
            padded_set: false,
            split: true,
            split_target,
        };
        let runs = c.dims().workspace_len(T::DTYPE) / (c.dims().rows() * (c.head_dim + 4));
        assert!(runs > 2, "{c:?}: {runs} runs, meant to split");
        check_multi::<T>(be, &mut rng, &c);
    }
}

/// Every sequence on one prefix gives exactly (bit for bit) what `prefix_attention` with that
/// prefix shared by the batch gives, and every sequence on none what it gives with l = 0:
/// the same kernel path, the prefix found through the table.
pub fn same_as_shared_prefix<T: Element>(be: &Backend) {
    let mut rng = Rng::from_env();
    for (id, q_len) in [(1, 1), (1, 20), (-1, 1), (-1, 20)] {
        let c = MultiCase {
            batch: 3,
            heads: 4,
            kv_heads: 2,
            q_len,
            kv_len: 70,
            head_dim: 64,
            causal: true,
            lens: Some(vec![70, 3, 41]),
            prefix_lens: vec![5, 33, 16],
            ids: vec![id; 3],
            spare_rows: 0,
            slack: 0,
            padded_set: false,
            split: true,
            split_target: DEFAULT_SPLIT_TARGET,
        };
        let x = MultiInputs::<T>::new(&mut rng, &c);
        let o = run_multi(be, &c, &x);
        let dims = c.dims();
        let l = if id < 0 {
            0
        } else {
            c.prefix_lens[id as usize]
        };
        let mut single = dims.attention;
        single.prefix_len = l;
        single.prefix_k = HeadLayout::bshd(l, c.kv_heads, c.head_dim).shared_by_batch();
        single.prefix_v = single.prefix_k;
        let lo = if id < 0 {
            0
        } else {
            x.offsets[id as usize] as usize
        };
        let at = lo * dims.attention.prefix_k.seq;
        let span = l * dims.attention.prefix_k.seq;
        let (pk, pv) = (&x.set_k[at..at + span], &x.set_v[at..at + span]);
        let (mut out, mut lse, mut lambda) = (
            vec![T::nan(); o.out.len()],
            vec![f32::NAN; o.lse.len()],
            vec![f32::NAN; o.lse.len()],
        );
        let mut ws = vec![f32::NAN; single.workspace_len(T::DTYPE)];
        let args: HostPrefixAttentionArgs<T> = PrefixAttentionArgs {
            q: &x.q,
            k: &x.k,
            v: &x.v,
            prefix_k: pk,
            prefix_v: pv,
            context_lens: c.lens.as_deref(),
            out: &mut out,
            lse: Some(&mut lse),
            lambda: Some(&mut lambda),
            workspace: (!ws.is_empty()).then_some(&mut ws[..]),
        };
        host::prefix_attention(be, &c.op(), &single, args).expect("prefix_attention");
        let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        let fbits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&o.out),
            bits(&out),
            "{} id {id} q_len {q_len}: out",
            T::DTYPE
        );
        assert_eq!(fbits(&o.lse), fbits(&lse), "id {id} q_len {q_len}: lse");
        assert_eq!(fbits(&o.lambda), fbits(&lambda), "id {id} q_len {q_len}: λ");
    }
}

fn expect_invalid(r: Result<()>, arg: &str) {
    match r {
        Err(Error::InvalidArgument { op, arg: got, .. })
            if got == arg && op == "multi_prefix_attention" => {}
        other => panic!("expected an invalid `{arg}` of multi_prefix_attention, got {other:?}"),
    }
}

/// Bad input the host can see is an error naming the argument, before anything runs (the
/// output stays NaN).
pub fn bad_input_is_an_error(be: &Backend) {
    let mut rng = Rng::from_env();
    let c = MultiCase {
        batch: 3,
        heads: 2,
        kv_heads: 1,
        q_len: 2,
        kv_len: 9,
        head_dim: 32,
        causal: false,
        lens: None,
        prefix_lens: vec![5, 16],
        ids: vec![0, 1, -1],
        spare_rows: 4,
        slack: 0,
        padded_set: false,
        split: false,
        split_target: DEFAULT_SPLIT_TARGET,
    };
    let x = MultiInputs::<f32>::new(&mut rng, &c);
    let dims = c.dims();
    let try_run = |ids: &[i32], offsets: &[u32], dims: &MultiPrefixDims, set: &[f32]| {
        let mut out = vec![f32::NAN; x.q.len()];
        let mut status = [0u32];
        let args: HostMultiPrefixAttentionArgs<f32> = MultiPrefixAttentionArgs {
            q: &x.q,
            k: &x.k,
            v: &x.v,
            prefix_k: set,
            prefix_v: set,
            prefix_offsets: offsets,
            prefix_ids: ids,
            context_lens: None,
            out: &mut out,
            lse: None,
            lambda: None,
            workspace: None,
            status: Some(&mut status),
        };
        let r = host::multi_prefix_attention(be, &c.op(), dims, args);
        if r.is_err() {
            assert!(out.iter().all(|v| v.is_nan()), "a refused call wrote");
        }
        r
    };
    let (ok_ids, ok_off) = (&c.ids[..], &x.offsets[..]);
    try_run(ok_ids, ok_off, &dims, &x.set_k).expect("the valid call");
    expect_invalid(try_run(&[0, 2, -1], ok_off, &dims, &x.set_k), "prefix_ids");
    expect_invalid(try_run(&[0, -2, -1], ok_off, &dims, &x.set_k), "prefix_ids");
    expect_invalid(try_run(&[0, 1], ok_off, &dims, &x.set_k), "prefix_ids");
    expect_invalid(
        try_run(ok_ids, &[0, 5, 4], &dims, &x.set_k),
        "prefix_offsets",
    );
    // Past the set's rows (21 + 4 spare = 25).
    expect_invalid(
        try_run(ok_ids, &[0, 5, 26], &dims, &x.set_k),
        "prefix_offsets",
    );
    // Longer than the dims' longest prefix.
    let short = MultiPrefixDims {
        attention: peft_kernels::prefix_attention::PrefixAttentionDims {
            prefix_len: 15,
            ..dims.attention
        },
        ..dims
    };
    expect_invalid(try_run(ok_ids, ok_off, &short, &x.set_k), "prefix_offsets");
    expect_invalid(try_run(ok_ids, &[0, 5], &dims, &x.set_k), "prefix_offsets");
    // The set's buffer shorter than its rows say.
    let small = &x.set_k[..x.set_k.len() - 40];
    expect_invalid(try_run(ok_ids, ok_off, &dims, small), "prefix_k");
    let big = MultiPrefixDims {
        set_rows: c.set_rows() + 1,
        ..dims
    };
    expect_invalid(try_run(ok_ids, ok_off, &big, &x.set_k), "prefix_k");
}
