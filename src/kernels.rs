//! The kernel id table: every kernel the crate launches, by its exported `extern "C"`
//! name, and the module (the `kernels/<module>.cu` file) that holds it. The CUDA backend
//! loads a module on the first launch of any of its kernels; the emulator backend calls
//! the kernel's `emu_launch_<name>` entry, stamped by the same instantiation macro.

/// One `kernels/*.cu` file: a PTX/cubin module on the GPU, an object in the emulator. The
/// self-test modules exist only with the `selftest` feature (the crate's own tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    /// Backend self-checks (`kernels/selftest.cu`): tiled SGEMM, warp reductions, an
    /// ldmatrix + mma GEMM, LoRA dropout's Philox generator, and deliberately broken
    /// kernels the emulator must catch.
    #[cfg(feature = "selftest")]
    Selftest,
    /// Self-checks of the dtype and architecture layer (`kernels/selftest_mma.cu`): an
    /// ldmatrix + mma.sync + cp.async GEMM, fragment-layout probes, 16-bit conversions
    /// and arithmetic, activations, reductions.
    #[cfg(feature = "selftest")]
    SelftestMma,
    /// The frozen linear layer fused with its bottleneck delta (`kernels/delta_linear.cu`).
    DeltaLinear,
    /// Its backward (`kernels/delta_linear_backward.cu`).
    DeltaLinearBackward,
    /// Prefix tuning's gated attention, the LSE merge and the KV concatenation
    /// (`kernels/prefix_attention.cu`).
    PrefixAttention,
    /// AdamW over a list of adapter tensors, with the gradient-norm passes
    /// (`kernels/optim.cu`).
    Optim,
    /// The backward of prefix attention (`kernels/prefix_attention_backward.cu`).
    PrefixAttentionBackward,
    /// DoRA's row norms, merge's row scale and backward (`kernels/dora.cu`).
    Dora,
    /// Many adapters of one linear layer in one batch (`kernels/multi_delta_linear.cu`).
    MultiDeltaLinear,
}

impl Module {
    /// Every module, in build order.
    pub const ALL: &'static [Module] = &[
        #[cfg(feature = "selftest")]
        Module::Selftest,
        #[cfg(feature = "selftest")]
        Module::SelftestMma,
        Module::DeltaLinear,
        Module::DeltaLinearBackward,
        Module::PrefixAttention,
        Module::Optim,
        Module::PrefixAttentionBackward,
        Module::Dora,
        Module::MultiDeltaLinear,
    ];

    /// The file stem under `kernels/` (and of the embedded PTX and cubins).
    pub const fn stem(self) -> &'static str {
        match self {
            #[cfg(feature = "selftest")]
            Module::Selftest => "selftest",
            #[cfg(feature = "selftest")]
            Module::SelftestMma => "selftest_mma",
            Module::DeltaLinear => "delta_linear",
            Module::DeltaLinearBackward => "delta_linear_backward",
            Module::PrefixAttention => "prefix_attention",
            Module::Optim => "optim",
            Module::PrefixAttentionBackward => "prefix_attention_backward",
            Module::Dora => "dora",
            Module::MultiDeltaLinear => "multi_delta_linear",
        }
    }
}

/// `kernel_table! { [#[cfg(…)]] Module { kernel, … } … }`: the modules and their kernels; a
/// module under a `cfg` (the self-tests) exists only where it holds.
macro_rules! kernel_table {
    // Give every module its condition (`all()`, always true, where none is written), so the
    // expansion below has one shape.
    (@cfg [$($done:tt)*] #[cfg($cfg:meta)] $module:ident { $($names:tt)* } $($rest:tt)*) => {
        kernel_table!(@cfg [$($done)* [$cfg] $module { $($names)* }] $($rest)*);
    };
    (@cfg [$($done:tt)*] $module:ident { $($names:tt)* } $($rest:tt)*) => {
        kernel_table!(@cfg [$($done)* [all()] $module { $($names)* }] $($rest)*);
    };
    (@cfg [$([$meta:meta] $module:ident { $($name:ident),* $(,)? })*]) => {
        /// A kernel of this crate; the variant is the exported symbol's name.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum KernelId { $($(#[cfg($meta)] $name,)*)* }

        impl KernelId {
            /// Every kernel.
            pub const ALL: &'static [KernelId] = &[$($(#[cfg($meta)] KernelId::$name,)*)*];

            /// The exported symbol (`extern "C"`), identical on both backends.
            pub const fn name(self) -> &'static str {
                match self { $($(#[cfg($meta)] KernelId::$name => stringify!($name),)*)* }
            }

            /// The module that holds the kernel.
            pub const fn module(self) -> Module {
                match self { $($(#[cfg($meta)] KernelId::$name => Module::$module,)*)* }
            }
        }

        #[cfg(feature = "emulator")]
        pub(crate) mod emu_entry {
            use super::KernelId;

            /// `emu_launch_<name>`: mirrors cuLaunchKernel (see kernels/emu/emu.h).
            pub(crate) type Entry = unsafe extern "C" fn(
                grid: crate::emulator::Dim3,
                block: crate::emulator::Dim3,
                dynamic_smem: u32,
                args: *mut *mut std::ffi::c_void,
            ) -> i32;

            mod sym {
                unsafe extern "C" {
                    $($(
                        #[cfg($meta)]
                        #[link_name = concat!("emu_launch_", stringify!($name))]
                        pub(super) fn $name(
                            grid: crate::emulator::Dim3,
                            block: crate::emulator::Dim3,
                            dynamic_smem: u32,
                            args: *mut *mut std::ffi::c_void,
                        ) -> i32;
                    )*)*
                }
            }

            /// The emulator entry of a kernel.
            pub(crate) fn entry(id: KernelId) -> Entry {
                match id { $($(#[cfg($meta)] KernelId::$name => sym::$name as Entry,)*)* }
            }

            /// The checked copy's `pkc_emu_launch_<name>` (build/emulator.rs): the same
            /// kernels with every memory access reported to the emulator's checks.
            #[cfg(pk_emu_checked)]
            mod checked_sym {
                unsafe extern "C" {
                    $($(
                        #[cfg($meta)]
                        #[link_name = concat!("pkc_emu_launch_", stringify!($name))]
                        pub(super) fn $name(
                            grid: crate::emulator::Dim3,
                            block: crate::emulator::Dim3,
                            dynamic_smem: u32,
                            args: *mut *mut std::ffi::c_void,
                        ) -> i32;
                    )*)*
                }
            }

            /// The checked entry of a kernel, when this build has the checked copy (not
            /// under `PEFT_KERNELS_EMU_SANITIZE`).
            pub(crate) fn checked_entry(id: KernelId) -> Option<Entry> {
                #[cfg(pk_emu_checked)]
                return Some(match id {
                    $($(#[cfg($meta)] KernelId::$name => checked_sym::$name as Entry,)*)*
                });
                #[cfg(not(pk_emu_checked))]
                {
                    let _ = id;
                    None
                }
            }
        }
    };
    ($($table:tt)*) => {
        kernel_table!(@cfg [] $($table)*);
    };
}

kernel_table! {
    #[cfg(feature = "selftest")]
    Selftest {
        selftest_sgemm_tiled_f32,
        selftest_sgemm_missing_barrier_f32,
        selftest_block_reduce_f32,
        selftest_warp_ops_i32,
        selftest_thread_index,
        selftest_reverse_dynamic_smem_f32,
        selftest_atomics,
        selftest_philox4x32_10,
        selftest_dropout_mask,
        selftest_broken_divergent_barrier,
        selftest_broken_shfl_wrong_mask,
        selftest_broken_shfl_divergent,
        selftest_broken_shfl_partial_warp,
        selftest_broken_shfl_exited_lane,
        selftest_broken_shfl_source_outside_mask,
        selftest_broken_mismatched_warp_ops,
        selftest_broken_mismatched_votes,
        selftest_broken_warp_deadlock,
        selftest_broken_read_past_tile,
        selftest_broken_missing_barrier_read,
        selftest_broken_uninit_shared_read,
        selftest_broken_blocks_write_one_output,
        selftest_broken_block_reads_anothers_output,
    }
    #[cfg(feature = "selftest")]
    SelftestMma {
        selftest_mma_gemm_nk_f16,
        selftest_mma_gemm_kn_f16,
        selftest_mma_gemm_nk_bf16,
        selftest_mma_gemm_kn_bf16,
        selftest_broken_mma_gemm_no_wait_bf16,
        selftest_mma_probe_f16,
        selftest_mma_probe_bf16,
        selftest_ldmatrix_probe,
        selftest_convert_f16,
        selftest_convert_bf16,
        selftest_arith_f16,
        selftest_arith_bf16,
        selftest_activation_f32,
        selftest_activation_f16,
        selftest_activation_bf16,
        selftest_reduction_f32,
        selftest_broken_wgmma_not_waited,
    }
    DeltaLinear {
        fused_linear_naive_f32,
        fused_linear_naive_f16,
        fused_linear_naive_bf16,
        fused_linear_simt_f32,
        fused_linear_simt_f16,
        fused_linear_simt_bf16,
        fused_linear_mma_small_f16,
        fused_linear_mma_small_bf16,
        fused_linear_mma_mid_f16,
        fused_linear_mma_mid_bf16,
        fused_linear_mma_decode_f16,
        fused_linear_mma_decode_bf16,
        fused_linear_wgmma_f16,
        fused_linear_wgmma_bf16,
        fused_linear_mma_large_multi_f16,
        fused_linear_mma_large_multi_bf16,
        fused_linear_mma_small_multi_f16,
        fused_linear_mma_small_multi_bf16,
        fused_linear_mma_mid_multi_f16,
        fused_linear_mma_mid_multi_bf16,
        fused_linear_mma_decode_multi_f16,
        fused_linear_mma_decode_multi_bf16,
        fused_linear_split_reduce_f16,
        fused_linear_split_reduce_bf16,
        fused_linear_mma_large_f16,
        fused_linear_mma_large_bf16,
        lora_merge_f32,
        lora_merge_f16,
        lora_merge_bf16,
        bias_activation_f32,
        bias_activation_f16,
        bias_activation_bf16,
        fused_linear_mma_large_q_f16,
        fused_linear_mma_large_q_bf16,
        fused_linear_mma_small_q_f16,
        fused_linear_mma_small_q_bf16,
        fused_linear_mma_decode_q_f16,
        fused_linear_mma_decode_q_bf16,
        fused_linear_mma_mid_q_f16,
        fused_linear_mma_mid_q_bf16,
        fused_linear_wgmma_q_f16,
        fused_linear_wgmma_q_bf16,
        quant_dequantize_f32,
        quant_dequantize_f16,
        quant_dequantize_bf16,
    }
    DeltaLinearBackward {
        delta_bwd_dz_f32,
        delta_bwd_dz_f16,
        delta_bwd_dz_bf16,
        delta_bwd_data_naive_f32,
        delta_bwd_data_naive_f16,
        delta_bwd_data_naive_bf16,
        delta_bwd_data_simt_f32,
        delta_bwd_data_simt_f16,
        delta_bwd_data_simt_bf16,
        delta_bwd_data_mma_f16,
        delta_bwd_data_mma_bf16,
        delta_bwd_weight_naive_f32,
        delta_bwd_weight_naive_f16,
        delta_bwd_weight_naive_bf16,
        delta_bwd_weight_simt_f32,
        delta_bwd_weight_simt_f16,
        delta_bwd_weight_simt_bf16,
        delta_bwd_weight_mma_f16,
        delta_bwd_weight_mma_bf16,
        delta_bwd_weight_reduce,
        delta_bwd_dgate_f32,
        delta_bwd_dgate_f16,
        delta_bwd_dgate_bf16,
    }
    PrefixAttention {
        prefix_attention_f32_d32,
        prefix_attention_f32_d64,
        prefix_attention_f32_d80,
        prefix_attention_f32_d96,
        prefix_attention_f32_d128,
        prefix_attention_f32_d256,
        prefix_attention_f16_d32,
        prefix_attention_f16_d64,
        prefix_attention_f16_d80,
        prefix_attention_f16_d96,
        prefix_attention_f16_d128,
        prefix_attention_f16_d256,
        prefix_attention_bf16_d32,
        prefix_attention_bf16_d64,
        prefix_attention_bf16_d80,
        prefix_attention_bf16_d96,
        prefix_attention_bf16_d128,
        prefix_attention_bf16_d256,
        prefix_attention_split_merge_f32,
        prefix_attention_split_merge_f16,
        prefix_attention_split_merge_bf16,
        lse_merge_f32,
        lse_merge_f16,
        lse_merge_bf16,
        kv_concat_f32,
        kv_concat_f16,
        kv_concat_bf16,
    }
    Optim {
        adamw_sumsq,
        adamw_norm,
        adamw_update_f32,
        adamw_update_f16,
        adamw_update_bf16,
    }
    PrefixAttentionBackward {
        lse_merge_backward_f32,
        lse_merge_backward_f16,
        lse_merge_backward_bf16,
        prefix_attention_backward_dot_f32,
        prefix_attention_backward_dot_f16,
        prefix_attention_backward_dot_bf16,
        prefix_attention_backward_dkv_f32_d32,
        prefix_attention_backward_dkv_f32_d64,
        prefix_attention_backward_dkv_f32_d80,
        prefix_attention_backward_dkv_f32_d96,
        prefix_attention_backward_dkv_f32_d128,
        prefix_attention_backward_dkv_f32_d256,
        prefix_attention_backward_dkv_f16_d32,
        prefix_attention_backward_dkv_f16_d64,
        prefix_attention_backward_dkv_f16_d80,
        prefix_attention_backward_dkv_f16_d96,
        prefix_attention_backward_dkv_f16_d128,
        prefix_attention_backward_dkv_f16_d256,
        prefix_attention_backward_dkv_bf16_d32,
        prefix_attention_backward_dkv_bf16_d64,
        prefix_attention_backward_dkv_bf16_d80,
        prefix_attention_backward_dkv_bf16_d96,
        prefix_attention_backward_dkv_bf16_d128,
        prefix_attention_backward_dkv_bf16_d256,
        prefix_attention_backward_dq_f32_d32,
        prefix_attention_backward_dq_f32_d64,
        prefix_attention_backward_dq_f32_d80,
        prefix_attention_backward_dq_f32_d96,
        prefix_attention_backward_dq_f32_d128,
        prefix_attention_backward_dq_f32_d256,
        prefix_attention_backward_dq_f16_d32,
        prefix_attention_backward_dq_f16_d64,
        prefix_attention_backward_dq_f16_d80,
        prefix_attention_backward_dq_f16_d96,
        prefix_attention_backward_dq_f16_d128,
        prefix_attention_backward_dq_f16_d256,
        prefix_attention_backward_dq_bf16_d32,
        prefix_attention_backward_dq_bf16_d64,
        prefix_attention_backward_dq_bf16_d80,
        prefix_attention_backward_dq_bf16_d96,
        prefix_attention_backward_dq_bf16_d128,
        prefix_attention_backward_dq_bf16_d256,
    }
    Dora {
        dora_norm_f32,
        dora_norm_f16,
        dora_norm_bf16,
        dora_scale_f32,
        dora_scale_f16,
        dora_scale_bf16,
        dora_bwd_columns_f32,
        dora_bwd_columns_f16,
        dora_bwd_columns_bf16,
        dora_dmagnitude_f32,
    }
    MultiDeltaLinear {
        multi_delta_naive_f32,
        multi_delta_naive_f16,
        multi_delta_naive_bf16,
        multi_shrink_f32,
        multi_shrink_f16,
        multi_shrink_bf16,
        multi_expand_f32,
        multi_expand_f16,
        multi_expand_bf16,
    }
}

impl KernelId {
    /// Whether the kernel uses Hopper's arch-specific instructions (wgmma, kernels/arch.cuh):
    /// it runs only from the sm_90a cubin, on compute capability 9.0, and in the emulator.
    pub fn needs_sm90a(self) -> bool {
        matches!(
            self,
            KernelId::fused_linear_wgmma_f16 | KernelId::fused_linear_wgmma_bf16
        )
    }
}
