//! Prefix attention on the GPU against the f64 reference: the suites of
//! tests/prefix_attention/harness.rs (the emulator runs the same ones), plus shapes the
//! emulator is too slow for. Ignored without a device: run with
//! `cargo test --release --features cuda --test gpu_prefix_attention -- --ignored`.
#![cfg(feature = "cuda")]

mod common;
#[path = "prefix_attention/harness.rs"]
mod harness;

use std::sync::Arc;

use bytemuck::Pod;
use half::bf16;
use harness::{Backend, Case, Layout};
use peft_kernels::cuda::{
    self,
    cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut},
    DeviceRead, DeviceWrite,
};
use peft_kernels::prefix_attention::{
    KvConcatArgs, KvConcatDims, LseMergeArgs, LseMergeDims, PrefixAttention, PrefixAttentionArgs,
    PrefixAttentionDims, PrefixOnlyArgs,
};
use peft_kernels::{Element, Result};

/// Host slices copied to the device as bytes (16-byte aligned allocations, never empty)
/// and the outputs copied back.
struct Gpu {
    stream: Arc<CudaStream>,
}

impl Gpu {
    fn new() -> Gpu {
        let ctx = cuda::context(0).expect("a CUDA device");
        Gpu {
            stream: ctx.default_stream(),
        }
    }

    fn up<A: Pod>(&self, host: &[A]) -> CudaSlice<u8> {
        let mut bytes = bytemuck::cast_slice::<A, u8>(host).to_vec();
        bytes.resize(bytes.len().max(16), 0);
        self.stream.clone_htod(&bytes).expect("upload")
    }

    fn down<A: Pod>(&self, dev: &CudaSlice<u8>, host: &mut [A]) {
        let bytes = self.stream.clone_dtoh(dev).expect("download");
        let host = bytemuck::cast_slice_mut::<A, u8>(host);
        let n = host.len();
        host.copy_from_slice(&bytes[..n]);
    }

    /// [`Gpu::down`] for an optional output (LSE or λ) that was uploaded when asked for.
    fn down_optional(&self, dev: &Option<(CudaSlice<u8>, usize)>, host: Option<&mut [f32]>) {
        if let (Some((d, _)), Some(h)) = (dev, host) {
            self.down(d, h);
        }
    }
}

/// A device byte buffer seen as `n` elements of `A`.
fn view<A>(dev: &CudaSlice<u8>, n: usize) -> CudaView<'_, A> {
    // SAFETY: the bytes are a copy of a host `[A]` of `n` elements (A is plain data).
    unsafe { dev.transmute::<A>(n) }.expect("view within the allocation")
}

fn view_mut<A>(dev: &mut CudaSlice<u8>, n: usize) -> CudaViewMut<'_, A> {
    // SAFETY: as above.
    unsafe { dev.transmute_mut::<A>(n) }.expect("view within the allocation")
}

impl Backend for Gpu {
    fn attention<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixAttentionArgs<&[T], &mut [T], &[u32], &mut [f32]>,
    ) -> Result<()> {
        let PrefixAttentionArgs {
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            context_lens,
            out,
            lse,
            lambda,
            workspace,
        } = args;
        let inputs = [q, k, v, prefix_k, prefix_v].map(|t| (self.up(t), t.len()));
        let lens = context_lens.map(|l| (self.up(l), l.len()));
        let mut d_out = self.up(out);
        let mut d_lse = lse.as_deref().map(|l| (self.up(l), l.len()));
        let mut d_lambda = lambda.as_deref().map(|l| (self.up(l), l.len()));
        let mut d_workspace = workspace.map(|w| (self.up(w), w.len()));
        {
            let [vq, vk, vv, vpk, vpv] = inputs.each_ref().map(|(d, n)| view::<T>(d, *n));
            let v_lens = lens.as_ref().map(|(d, n)| view::<u32>(d, *n));
            let mut v_out = view_mut::<T>(&mut d_out, out.len());
            let mut v_lse = d_lse.as_mut().map(|(d, n)| view_mut::<f32>(d, *n));
            let mut v_lambda = d_lambda.as_mut().map(|(d, n)| view_mut::<f32>(d, *n));
            let mut v_workspace = d_workspace.as_mut().map(|(d, n)| view_mut::<f32>(d, *n));
            cuda::prefix_attention::<T>(
                &self.stream,
                op,
                dims,
                PrefixAttentionArgs {
                    q: &vq,
                    k: &vk,
                    v: &vv,
                    prefix_k: &vpk,
                    prefix_v: &vpv,
                    context_lens: v_lens.as_ref().map(|v| v as DeviceRead<u32>),
                    out: &mut v_out,
                    lse: v_lse.as_mut().map(|v| v as DeviceWrite<f32>),
                    lambda: v_lambda.as_mut().map(|v| v as DeviceWrite<f32>),
                    workspace: v_workspace.as_mut().map(|v| v as DeviceWrite<f32>),
                },
            )?;
        }
        self.down(&d_out, out);
        self.down_optional(&d_lse, lse);
        self.down_optional(&d_lambda, lambda);
        Ok(())
    }

    fn prefix_only<T: Element>(
        &self,
        op: &PrefixAttention,
        dims: &PrefixAttentionDims,
        args: PrefixOnlyArgs<&[T], &mut [T], &mut [f32]>,
    ) -> Result<()> {
        let PrefixOnlyArgs {
            q,
            prefix_k,
            prefix_v,
            out,
            lse,
        } = args;
        let inputs = [q, prefix_k, prefix_v].map(|t| (self.up(t), t.len()));
        let (mut d_out, mut d_lse) = (self.up(out), self.up(lse));
        {
            let [vq, vpk, vpv] = inputs.each_ref().map(|(d, n)| view::<T>(d, *n));
            let mut v_out = view_mut::<T>(&mut d_out, out.len());
            let mut v_lse = view_mut::<f32>(&mut d_lse, lse.len());
            cuda::prefix_only_attention::<T>(
                &self.stream,
                op,
                dims,
                PrefixOnlyArgs {
                    q: &vq,
                    prefix_k: &vpk,
                    prefix_v: &vpv,
                    out: &mut v_out,
                    lse: &mut v_lse,
                },
            )?;
        }
        self.down(&d_out, out);
        self.down(&d_lse, lse);
        Ok(())
    }

    fn merge<T: Element>(
        &self,
        dims: &LseMergeDims,
        args: LseMergeArgs<&[T], &mut [T], &[f32], &mut [f32]>,
    ) -> Result<()> {
        let LseMergeArgs {
            o_prefix,
            lse_prefix,
            o_context,
            lse_context,
            out,
            lse,
            lambda,
        } = args;
        let states = [o_prefix, o_context].map(|t| (self.up(t), t.len()));
        let lses = [lse_prefix, lse_context].map(|t| (self.up(t), t.len()));
        let mut d_out = self.up(out);
        let mut d_lse = lse.as_deref().map(|l| (self.up(l), l.len()));
        let mut d_lambda = lambda.as_deref().map(|l| (self.up(l), l.len()));
        {
            let [vp, vc] = states.each_ref().map(|(d, n)| view::<T>(d, *n));
            let [lp, lc] = lses.each_ref().map(|(d, n)| view::<f32>(d, *n));
            let mut v_out = view_mut::<T>(&mut d_out, out.len());
            let mut v_lse = d_lse.as_mut().map(|(d, n)| view_mut::<f32>(d, *n));
            let mut v_lambda = d_lambda.as_mut().map(|(d, n)| view_mut::<f32>(d, *n));
            cuda::lse_merge::<T>(
                &self.stream,
                dims,
                LseMergeArgs {
                    o_prefix: &vp,
                    lse_prefix: &lp,
                    o_context: &vc,
                    lse_context: &lc,
                    out: &mut v_out,
                    lse: v_lse.as_mut().map(|v| v as DeviceWrite<f32>),
                    lambda: v_lambda.as_mut().map(|v| v as DeviceWrite<f32>),
                },
            )?;
        }
        self.down(&d_out, out);
        self.down_optional(&d_lse, lse);
        self.down_optional(&d_lambda, lambda);
        Ok(())
    }

    fn concat<T: Element>(
        &self,
        dims: &KvConcatDims,
        args: KvConcatArgs<&[T], &mut [T]>,
    ) -> Result<()> {
        let KvConcatArgs { prefix, src, dst } = args;
        let inputs = [prefix, src].map(|t| (self.up(t), t.len()));
        let mut d_dst = self.up(dst);
        {
            let [vp, vs] = inputs.each_ref().map(|(d, n)| view::<T>(d, *n));
            let mut v_dst = view_mut::<T>(&mut d_dst, dst.len());
            cuda::kv_concat::<T>(
                &self.stream,
                dims,
                KvConcatArgs {
                    prefix: &vp,
                    src: &vs,
                    dst: &mut v_dst,
                },
            )?;
        }
        self.down(&d_dst, dst);
        Ok(())
    }

    fn on_host(&self) -> bool {
        false
    }
}

macro_rules! gpu_tests {
    ($($name:ident => $body:expr;)*) => {$(
        #[test]
        #[ignore = "needs a CUDA device"]
        fn $name() {
            let gpu = Gpu::new();
            $body(&gpu);
        }
    )*};
}

gpu_tests! {
    fused_f32_every_head_dim => |g: &Gpu| harness::every_head_dim::<_, f32>(g, 4);
    fused_f16_every_head_dim => |g: &Gpu| harness::every_head_dim::<_, half::f16>(g, 4);
    fused_bf16_every_head_dim => |g: &Gpu| harness::every_head_dim::<_, bf16>(g, 4);
    random_configurations => |g: &Gpu| harness::random_configurations(g);
    many_tiles => |g: &Gpu| harness::many_tiles(g);
    explicit_scale => |g: &Gpu| harness::explicit_scale(g);
    identity_with_attention_over_the_concatenation => |g: &Gpu| harness::identity_with_concatenation(g);
    rows_that_see_nothing_are_defined => |g: &Gpu| harness::rows_that_see_nothing(g);
    long_prefix => |g: &Gpu| harness::long_prefix(g);
    ragged_context_lengths => |g: &Gpu| harness::ragged_context_lengths(g);
    grouped_and_multi_query_heads => |g: &Gpu| harness::grouped_and_multi_query_heads(g);
    decode_single_query => |g: &Gpu| harness::decode_single_query(g);
    split_kv_decode => |g: &Gpu| harness::split_kv_decode(g);
    split_target_sets_the_runs => |g: &Gpu| harness::split_target_sets_the_runs(g);
    grouped_heads_share_a_block => |g: &Gpu| harness::grouped_heads_share_a_block(g);
    strided_layouts_and_a_shared_prefix => |g: &Gpu| harness::strided_layouts_and_a_shared_prefix(g);
    statistics_are_optional => |g: &Gpu| harness::statistics_are_optional(g);
    prefix_only_and_merge => |g: &Gpu| harness::prefix_only_and_merge(g);
    merge_with_infinite_lses => |g: &Gpu| harness::merge_with_infinite_lses(g);
    kv_concat_is_a_copy => |g: &Gpu| harness::kv_concat_is_a_copy(g);
    bad_arguments_are_errors => |g: &Gpu| harness::bad_arguments_are_errors(g);
    empty_batches_launch_nothing => |g: &Gpu| harness::empty_batches(g);
    misaligned_buffers => |g: &Gpu| harness::misaligned_buffers(g);
}

/// Prefill at a realistic size: two sequences of 1000 tokens, 8 heads over 2 KV heads,
/// the MAM adapter's 30 prefix vectors, causal and padded.
#[test]
#[ignore = "needs a CUDA device"]
fn prefill_at_scale() {
    let gpu = Gpu::new();
    let mut rng = common::Rng::from_env();
    let case = Case::new(2, 8, 2, 1000, 1000, 30, 128)
        .causal(true)
        .lens(vec![1000, 777]);
    harness::check_fused::<_, bf16>(&gpu, &mut rng, &case);
    harness::check_fused::<_, half::f16>(
        &gpu,
        &mut rng,
        &Case {
            head_dim: 64,
            ..case.clone()
        },
    );
    harness::check_fused::<_, f32>(&gpu, &mut rng, &case.layout(Layout::Strided));
}
