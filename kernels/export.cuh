// Kernel export macros, one spelling for both builds.
//
//   PK_KERNEL(name, impl, Params)
//   PK_KERNEL_BOUNDS(name, impl, Params, max_threads, min_blocks)
//       CUDA: `extern "C" __global__ void name(const Params p) { impl(p); }` (with
//       __launch_bounds__(max_threads, min_blocks) for the second form).
//       Emulator: `extern "C" int emu_launch_name(emu::Dim3 grid, emu::Dim3 block,
//       uint32_t dynamic_smem, void** args)` that runs impl(*(Params*)args[0]) on every
//       emulated thread (0 = success, else see emu_last_error()); the bounds form also
//       refuses blocks of more than max_threads threads, as the driver does.
//       `impl` is called as `impl(p)`: a template instantiation with several arguments
//       goes in parentheses, `(gemm<float, 64>)`. No semicolon after the macro.
//   PK_PARAMS_SIZE(Params)
//       Emulator: exports `size_t pk_sizeof_Params(void)` so Rust can check that its
//       #[repr(C)] twin has the same size. CUDA: nothing.
//   PK_DYNAMIC_SMEM(type, name);
//       Declares `name`, the block's dynamic shared memory as an array of `type`
//       (16-byte aligned on the GPU, 128 in the emulator). On the GPU every such
//       declaration aliases the same memory; give each element type its own name, since
//       nvcc rejects one extern __shared__ name declared with two types.
#pragma once

#ifdef PK_EMULATOR

#define PK_KERNEL(name, impl, Params)                                                   \
  extern "C" int emu_launch_##name(::emu::Dim3 grid, ::emu::Dim3 block,                 \
                                   uint32_t dynamic_smem, void** args) {                \
    return ::emu::launch<Params>(#name, [](const Params& p) { impl(p); }, grid, block,  \
                                 dynamic_smem, args);                                   \
  }

#define PK_KERNEL_BOUNDS(name, impl, Params, max_threads, min_blocks)                   \
  static_assert((max_threads) > 0 && (min_blocks) > 0);                                 \
  extern "C" int emu_launch_##name(::emu::Dim3 grid, ::emu::Dim3 block,                 \
                                   uint32_t dynamic_smem, void** args) {                \
    return ::emu::launch<Params>(#name, [](const Params& p) { impl(p); }, grid, block,  \
                                 dynamic_smem, args, (max_threads));                    \
  }

#define PK_PARAMS_SIZE(Params) \
  extern "C" size_t pk_sizeof_##Params(void) { return sizeof(Params); }

#define PK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())

#else  // CUDA

#define PK_KERNEL(name, impl, Params) \
  extern "C" __global__ void name(const Params p) { impl(p); }

#define PK_KERNEL_BOUNDS(name, impl, Params, max_threads, min_blocks)                  \
  extern "C" __global__ void __launch_bounds__(max_threads, min_blocks) name(const Params p) { \
    impl(p);                                                                            \
  }

#define PK_PARAMS_SIZE(Params)

#define PK_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]

#endif
