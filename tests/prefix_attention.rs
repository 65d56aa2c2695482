//! Prefix attention on the emulator against the f64 reference (src/reference/attention.rs):
//! every dtype and head dim, the identity with attention over the concatenation, masks
//! (causal, ragged lengths, rows that see nothing), long prefixes, grouped-query heads,
//! decoding, strided layouts, the prefix-only + merge path, and the argument checks. The
//! checks themselves are in prefix_attention/harness.rs, shared with the GPU tests.

mod common;
#[path = "prefix_attention/harness.rs"]
mod harness;

use half::{bf16, f16};
use harness::Backend;
use peft_kernels::plan::prefix_attention::{
    self as plan, PrefixAttentionBufs, PrefixAttentionParams,
};
use peft_kernels::plan::{Buf, Launch};
use peft_kernels::prefix_attention::{
    KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeDims, PrefixAttention, PrefixAttentionArgs,
    PrefixAttentionDims, PrefixOnlyArgs,
};
use peft_kernels::{emulator, host};
use peft_kernels::{DType, Element, Result};

struct Emulator;

impl Backend for Emulator {
    fn attention<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixAttentionArgs<&[T], &mut [T], &[u32], &mut [f32]>,
    ) -> Result<()> {
        emulator::prefix_attention(op, dims, args)
    }
    fn prefix_only<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
    ) -> Result<()> {
        emulator::prefix_only_attention(op, dims, args)
    }
    fn merge<T: Element>(
        &self,
        dims: &LseMergeDims,
        args: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
    ) -> Result<()> {
        emulator::lse_merge(dims, args)
    }
    fn concat<T: Element>(
        &self,
        dims: &KvConcatDims,
        args: KvConcatArgs<&[T], &mut [T]>,
    ) -> Result<()> {
        emulator::kv_concat(dims, args)
    }
    fn on_host(&self) -> bool {
        true
    }
}

#[test]
fn fused_f32_every_head_dim() {
    harness::every_head_dim::<_, f32>(&Emulator, 2);
}

#[test]
fn fused_f16_every_head_dim() {
    harness::every_head_dim::<_, f16>(&Emulator, 2);
}

#[test]
fn fused_bf16_every_head_dim() {
    harness::every_head_dim::<_, bf16>(&Emulator, 2);
}

#[test]
fn random_configurations() {
    harness::random_configurations(&Emulator);
}

#[test]
fn many_tiles() {
    harness::many_tiles(&Emulator);
}

#[test]
fn explicit_scale() {
    harness::explicit_scale(&Emulator);
}

#[test]
fn identity_with_attention_over_the_concatenation() {
    harness::identity_with_concatenation(&Emulator);
}

#[test]
fn rows_that_see_nothing_are_defined() {
    harness::rows_that_see_nothing(&Emulator);
}

#[test]
fn long_prefix() {
    harness::long_prefix(&Emulator);
}

#[test]
fn ragged_context_lengths() {
    harness::ragged_context_lengths(&Emulator);
}

#[test]
fn grouped_and_multi_query_heads() {
    harness::grouped_and_multi_query_heads(&Emulator);
}

#[test]
fn decode_single_query() {
    harness::decode_single_query(&Emulator);
}

#[test]
fn split_kv_decode() {
    harness::split_kv_decode(&Emulator);
}

#[test]
fn split_target_sets_the_runs() {
    harness::split_target_sets_the_runs(&Emulator);
}

#[test]
fn grouped_heads_share_a_block() {
    harness::grouped_heads_share_a_block(&Emulator);
}

#[test]
fn strided_layouts_and_a_shared_prefix() {
    harness::strided_layouts_and_a_shared_prefix(&Emulator);
}

#[test]
fn statistics_are_optional() {
    harness::statistics_are_optional(&Emulator);
}

#[test]
fn prefix_only_and_merge() {
    harness::prefix_only_and_merge(&Emulator);
}

#[test]
fn merge_with_infinite_lses() {
    harness::merge_with_infinite_lses(&Emulator);
}

#[test]
fn kv_concat_is_a_copy() {
    harness::kv_concat_is_a_copy(&Emulator);
}

#[test]
fn bad_arguments_are_errors() {
    harness::bad_arguments_are_errors(&Emulator);
}

#[test]
fn empty_batches_launch_nothing() {
    harness::empty_batches(&Emulator);
    harness::empty_batches(&OnHost(host::Backend::Emulator));
}

#[test]
fn misaligned_buffers() {
    harness::misaligned_buffers(&Emulator);
    harness::misaligned_buffers(&OnHost(host::Backend::Emulator));
}

/// The `host` entry points (on the emulator here): the same checks as [`Emulator`]'s.
struct OnHost(host::Backend);

impl Backend for OnHost {
    fn attention<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixAttentionArgs<&[T], &mut [T], &[u32], &mut [f32]>,
    ) -> Result<()> {
        host::prefix_attention(&self.0, op, dims, args)
    }
    fn prefix_only<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
    ) -> Result<()> {
        host::prefix_only_attention(&self.0, op, dims, args)
    }
    fn merge<T: Element>(
        &self,
        dims: &LseMergeDims,
        args: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
    ) -> Result<()> {
        host::lse_merge(&self.0, dims, args)
    }
    fn concat<T: Element>(
        &self,
        dims: &KvConcatDims,
        args: KvConcatArgs<&[T], &mut [T]>,
    ) -> Result<()> {
        host::kv_concat(&self.0, dims, args)
    }
    fn on_host(&self) -> bool {
        true
    }
}

/// The GPU API (cudarc buffers, which the planner sees as they are) keeps its rule: a 16-bit
/// tensor whose rows do not start 16-byte aligned is refused, naming it and the operation.
/// Only the host entry points copy such a slice (the planner alone here: nothing runs).
#[test]
fn the_planner_refuses_misaligned_16_bit_tensors() {
    let dims = PrefixAttentionDims::new(1, 2, 2, 3, 5, 4, 64);
    let all = Buf {
        addr: 4096,
        len: 1 << 20,
    };
    let bufs = PrefixAttentionBufs {
        q: all,
        k: all,
        v: all,
        prefix_k: all,
        prefix_v: all,
        context_lens: None,
        out: all,
        lse: None,
        lambda: None,
        workspace: None,
    };
    let op = PrefixAttention::default();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let misaligned = PrefixAttentionBufs {
            q: Buf { addr: 4098, ..all },
            ..bufs
        };
        assert!(plan::prefix_attention(&op, &dims, dtype, &bufs).is_ok());
        match plan::prefix_attention(&op, &dims, dtype, &misaligned) {
            Ok(_) if dtype == DType::F32 => {}
            Err(peft_kernels::Error::InvalidArgument {
                op: "prefix_attention",
                arg: "q",
                ..
            }) if dtype != DType::F32 => {}
            other => panic!("{dtype}: {other:?}"),
        }
    }
}

/// Host slices as the planner's buffers, from outside the crate: what a caller who runs the
/// plan's steps itself writes (`PrefixAttentionArgs::bufs` is public).
struct HostSlices;

impl<'r, 'w, A, B> peft_kernels::plan::BufSource<&'r [A], &'w mut [B]> for HostSlices {
    fn read(&mut self, r: &'r [A]) -> Buf {
        Buf {
            addr: r.as_ptr() as u64,
            len: r.len(),
        }
    }
    fn write(&mut self, w: &'w mut [B]) -> Buf {
        Buf {
            addr: w.as_mut_ptr() as u64,
            len: w.len(),
        }
    }
}

/// The plan's steps run one by one from the public `bufs` give what the operation gives, bit
/// for bit (a split decode: two steps).
#[test]
fn attention_args_give_their_planner_buffers() {
    use peft_kernels::prefix_attention::HostPrefixAttentionArgs;
    let mut rng = common::Rng::from_env();
    let dims = PrefixAttentionDims::new(1, 4, 2, 1, 900, 20, 64);
    let q: Vec<bf16> = rng.uniform_vec(4 * 64);
    let (k, v): (Vec<bf16>, Vec<bf16>) =
        (rng.uniform_vec(2 * 900 * 64), rng.uniform_vec(2 * 900 * 64));
    let prefix: Vec<bf16> = rng.uniform_vec(2 * 20 * 64);
    let op = PrefixAttention::default();
    let run = |by_steps: bool| {
        let mut out = vec![bf16::NAN; q.len()];
        let mut lse = vec![f32::NAN; dims.rows()];
        let mut workspace = vec![f32::NAN; dims.workspace_len(DType::BF16)];
        let args: HostPrefixAttentionArgs<bf16> = PrefixAttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            prefix_k: &prefix,
            prefix_v: &prefix,
            context_lens: None,
            out: &mut out,
            lse: Some(&mut lse),
            lambda: None,
            workspace: Some(&mut workspace),
        };
        if by_steps {
            let steps =
                plan::prefix_attention(&op, &dims, DType::BF16, &args.bufs(&mut HostSlices))
                    .unwrap();
            assert_eq!(steps.len(), 2, "a split pass and its merge");
            for (launch, params) in &steps {
                // SAFETY: the plan checked every buffer (host slices alive for the call).
                unsafe { emulator::launch(launch, params) }.unwrap();
            }
        } else {
            emulator::prefix_attention(&op, &dims, args).unwrap();
        }
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (
            bits(&out),
            lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn params_sizes_match_the_cxx_structs() {
    use peft_kernels::plan::prefix_attention::{KvConcatParams, LseMergeParams};
    unsafe extern "C" {
        fn pk_sizeof_PrefixAttentionParams() -> usize;
        fn pk_sizeof_LseMergeParams() -> usize;
        fn pk_sizeof_KvConcatParams() -> usize;
    }
    use std::mem::size_of;
    // SAFETY: the functions return a constant.
    unsafe {
        assert_eq!(
            pk_sizeof_PrefixAttentionParams(),
            size_of::<PrefixAttentionParams>()
        );
        assert_eq!(pk_sizeof_LseMergeParams(), size_of::<LseMergeParams>());
        assert_eq!(pk_sizeof_KvConcatParams(), size_of::<KvConcatParams>());
    }
}

/// The launches `prefix_attention` plans for `dims` in `dtype`, given a workspace as long as
/// they want (the planner alone: nothing runs).
fn planned(dims: &PrefixAttentionDims, dtype: DType) -> Vec<(Launch, PrefixAttentionParams)> {
    planned_with(dims, dtype, usize::MAX)
}

/// [`planned`] with a workspace of `workspace_len` f32.
fn planned_with(
    dims: &PrefixAttentionDims,
    dtype: DType,
    workspace_len: usize,
) -> Vec<(Launch, PrefixAttentionParams)> {
    let all = Buf {
        addr: 4096,
        len: usize::MAX,
    };
    let bufs = PrefixAttentionBufs {
        q: all,
        k: all,
        v: all,
        prefix_k: all,
        prefix_v: all,
        context_lens: None,
        out: all,
        lse: None,
        lambda: None,
        workspace: Some(Buf {
            len: workspace_len,
            ..all
        }),
    };
    let op = PrefixAttention {
        scale: None,
        causal: true,
    };
    plan::prefix_attention(&op, dims, dtype, &bufs).unwrap_or_else(|e| panic!("{dims:?}: {e}"))
}

/// GQA packing needs the packed rows one stride apart in Q and in the output: with Lq > 1
/// that is Lq rows per head in both, so a layout mismatch on either side is not packed (the
/// kernels would read or write the wrong rows); at Lq = 1 any layout packs. Every dtype's
/// launch takes the same decision.
#[test]
fn packing_needs_both_q_and_out_rows_per_head() {
    use peft_kernels::prefix_attention::HeadLayout;
    let (heads, kv_heads, d) = (8, 2, 64);
    for q_len in [1, 4] {
        let dims = PrefixAttentionDims::new(1, heads, kv_heads, q_len, 100, 10, d);
        let bshd = HeadLayout::bshd(q_len, heads, d);
        let q_strided = PrefixAttentionDims { q: bshd, ..dims };
        let out_strided = PrefixAttentionDims { out: bshd, ..dims };
        let group = heads / kv_heads;
        let expected = if q_len == 1 { group } else { 1 };
        for (what, dims, pack) in [
            ("contiguous", dims, group),
            ("Q strided", q_strided, expected),
            ("out strided", out_strided, expected),
        ] {
            assert_eq!(plan::packed_heads(&dims), pack, "Lq {q_len}, {what}");
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let (launch, params) = planned(&dims, dtype)[0];
                assert_eq!(params.pack as usize, pack, "{dtype} Lq {q_len}, {what}");
                assert_eq!(
                    launch.grid[1] as usize,
                    heads / pack,
                    "{dtype} Lq {q_len}, {what}"
                );
            }
        }
    }
}

/// Split-KV is planned alike for every dtype (over each kernel's key tiles): decoding with
/// few heads over long keys runs the split pass, then the dtype's merge, over a grid of B ×
/// runs; many heads, or no workspace, one pass.
#[test]
fn split_kv_is_planned_for_every_dtype() {
    use peft_kernels::kernels::KernelId;
    let decode = PrefixAttentionDims::new(2, 4, 4, 1, 3000, 30, 128);
    let busy = PrefixAttentionDims::new(4, 32, 32, 1, 3000, 30, 128);
    for (dtype, merge) in [
        (DType::F32, KernelId::prefix_attention_split_merge_f32),
        (DType::F16, KernelId::prefix_attention_split_merge_f16),
        (DType::BF16, KernelId::prefix_attention_split_merge_bf16),
    ] {
        let splits = plan::kv_splits(&decode, dtype);
        assert!(splits > 1, "{dtype}: {splits} runs");
        let launches = planned(&decode, dtype);
        assert_eq!(launches.len(), 2, "{dtype}");
        let (attention, params) = launches[0];
        assert_eq!(params.kv_splits as usize, splits, "{dtype}");
        assert_eq!(attention.grid[2] as usize, 2 * splits, "{dtype}");
        assert_eq!(launches[1].0.kernel, merge, "{dtype}");
        assert!(decode.workspace_len(dtype) > 0, "{dtype}");
        assert_eq!(plan::kv_splits(&busy, dtype), 1, "{dtype}");
        assert_eq!(planned(&busy, dtype).len(), 1, "{dtype}");
        assert_eq!(busy.workspace_len(dtype), 0, "{dtype}");
    }
}

/// However large the split target, batch × runs stays within grid.z's 65535: 4096 single
/// decoding sequences could have 32 runs each at a target past their blocks, but get 15.
#[test]
fn split_target_keeps_the_grid() {
    let dims = PrefixAttentionDims {
        split_target: usize::MAX,
        ..PrefixAttentionDims::new(4096, 1, 1, 1, 8192, 0, 64)
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (attention, params) = planned(&dims, dtype)[0];
        assert_eq!(params.kv_splits, 15, "{dtype}");
        assert_eq!(attention.grid[2], 4096 * 15, "{dtype}");
    }
}

/// A split-KV workspace shorter than the dims want is accepted: the pass splits into the runs
/// it has room for, none below two runs' worth (decoding 2 sequences × 4 heads over 3000
/// keys: 16 runs wanted, 4 in four runs' worth, 3 in one state less, none in two less one).
#[test]
fn a_short_workspace_splits_less() {
    let dims = PrefixAttentionDims::new(2, 4, 4, 1, 3000, 30, 128);
    let one_run = 2 * 4 * (128 + 4);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let want = plan::kv_splits(&dims, dtype);
        assert!(want > 4, "{dtype}: {want} runs");
        assert_eq!(dims.workspace_len(dtype), want * one_run, "{dtype}");
        for (len, runs) in [
            (dims.workspace_len(dtype), want),
            (4 * one_run, 4),
            (4 * one_run - 1, 3),
            (2 * one_run - 1, 1),
            (0, 1),
        ] {
            let launches = planned_with(&dims, dtype, len);
            assert_eq!(
                launches[0].1.kv_splits as usize, runs,
                "{dtype}, workspace {len}"
            );
            assert_eq!(launches.len(), if runs > 1 { 2 } else { 1 }, "{dtype}");
        }
    }
}
