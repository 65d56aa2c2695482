// Device code every kernel shares, in both builds (nvcc, and the emulator's g++ with
// kernels/emu/emu.h forced in): element-type conversions, 16-byte vector access,
// the bottleneck activations, warp and block reductions. The architecture-specific
// primitives (mma.sync, ldmatrix, cp.async) are in arch.cuh, included below.
#pragma once

#include <cstdint>
#include <type_traits>

#ifndef PK_EMULATOR
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define PK_INLINE __device__ __forceinline__
#define PK_FULL_MASK 0xFFFFFFFFu

#include "arch.cuh"
#include "export.cuh"

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------
// Element types: float, __half, __nv_bfloat16. Storage only; arithmetic is in f32.

template <typename T>
inline constexpr bool kIsElement =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Exact widening.
template <typename T>
PK_INLINE float to_float(T v) {
  static_assert(kIsElement<T>, "to_float: T must be float, __half or __nv_bfloat16");
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

// Round to nearest even (overflow → ±inf, NaN → NaN).
template <typename T>
PK_INLINE T from_float(float v) {
  static_assert(kIsElement<T>, "from_float: T must be float, __half or __nv_bfloat16");
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// Two 16-bit elements in one 32-bit register, `lo` in the low half: the operand format
// of mma.sync and ldmatrix.
template <typename T>
PK_INLINE uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "pack2: T must be __half or __nv_bfloat16");
  union {
    std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162> pair;
    uint32_t bits;
  } u;
  if constexpr (std::is_same_v<T, __half>) {
    u.pair = __floats2half2_rn(lo, hi);
  } else {
    u.pair = __floats2bfloat162_rn(lo, hi);
  }
  return u.bits;
}

// ---------------------------------------------------------------------------------------
// Vector access: N elements of T in 4, 8 or 16 bytes, moved by one load or store
// instruction (ld.global.v4.u32 for 16 bytes). The address must be aligned to the size;
// the emulator fails the launch where the GPU would fault on a misaligned access.

template <typename T, int N>
union Vec {
  static constexpr int kBytes = int(sizeof(T)) * N;
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "Vec: 4, 8 or 16 bytes");
  using Raw =
      std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2, uint32_t>>;
  Raw raw;
  T v[N];
};

// Elements of T per 16-byte vector.
template <typename T>
inline constexpr int kVec16 = 16 / int(sizeof(T));

template <int kBytes>
PK_INLINE void check_vec_aligned(const void* p, const char* what) {
#ifdef PK_EMULATOR
  if (reinterpret_cast<uintptr_t>(p) % kBytes != 0)
    emu::fail("%s: %d-byte access at %p is not %d-byte aligned", what, kBytes, p, kBytes);
#else
  (void)p;
  (void)what;
#endif
}

// The emulator's checked copy reports a vector access to the profile as the one access the
// GPU issues (the host compiler may split the copy below into narrower ones, which are
// checked but not counted again): kernels/emu/profile.cpp.
#ifdef PK_EMU_CHECKED
#define PK_EMU_VECTOR_ACCESS(p, bytes, kind, access) \
  emu::check::vector_access(p, bytes, kind);        \
  emu::check::operand_begin();                      \
  access;                                           \
  emu::check::operand_end();
#else
#define PK_EMU_VECTOR_ACCESS(p, bytes, kind, access) access;
#endif

template <typename T, int N>
PK_INLINE Vec<T, N> load_vec(const T* p) {
  using V = Vec<T, N>;
  check_vec_aligned<V::kBytes>(p, "load_vec");
  V r;
  PK_EMU_VECTOR_ACCESS(p, V::kBytes, emu::check::kRead,
                       r.raw = *reinterpret_cast<const typename V::Raw*>(p))
  return r;
}

template <typename T, int N>
PK_INLINE void store_vec(T* p, const Vec<T, N>& v) {
  using V = Vec<T, N>;
  check_vec_aligned<V::kBytes>(p, "store_vec");
  PK_EMU_VECTOR_ACCESS(p, V::kBytes, emu::check::kWrite,
                       *reinterpret_cast<typename V::Raw*>(p) = v.raw)
}

// ---------------------------------------------------------------------------------------
// Activations: the bottleneck's f, in f32, defined as the reference defines them
// (src/spec.rs Activation::apply_f64); the values are Rust's `Activation` discriminants.

enum class Activation : uint32_t { Identity = 0, Relu = 1, GeluTanh = 2, GeluErf = 3, Silu = 4 };

template <Activation kAct>
PK_INLINE float activate(float x) {
  if constexpr (kAct == Activation::Identity) {
    return x;
  } else if constexpr (kAct == Activation::Relu) {
    return fmaxf(x, 0.0f);
  } else if constexpr (kAct == Activation::GeluTanh) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
  } else if constexpr (kAct == Activation::GeluErf) {
    constexpr float kInvSqrt2 = 0.7071067811865476f;
    return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  } else {
    static_assert(kAct == Activation::Silu);
    return x / (1.0f + expf(-x));
  }
}

// The same, chosen at run time (hoist the switch out of hot loops by dispatching to
// activate<kAct> where it matters). An unknown value gives NaN.
PK_INLINE float activate(Activation act, float x) {
  switch (act) {
    case Activation::Identity:
      return activate<Activation::Identity>(x);
    case Activation::Relu:
      return activate<Activation::Relu>(x);
    case Activation::GeluTanh:
      return activate<Activation::GeluTanh>(x);
    case Activation::GeluErf:
      return activate<Activation::GeluErf>(x);
    case Activation::Silu:
      return activate<Activation::Silu>(x);
  }
  return __int_as_float(0x7FFFFFFF);
}

// f′(x), the exact derivative of activate() as src/spec.rs Activation::derivative_f64 writes
// it: ReLU′(0) = 0, GELU tanh differentiated as written. An unknown value gives NaN.
PK_INLINE float activate_derivative(Activation act, float x) {
  switch (act) {
    case Activation::Identity:
      return 1.0f;
    case Activation::Relu:
      return x > 0.0f ? 1.0f : 0.0f;
    case Activation::GeluTanh: {
      constexpr float kSqrt2OverPi = 0.7978845608028654f;
      const float t = tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x));
      return 0.5f * (1.0f + t) +
             0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case Activation::GeluErf: {
      constexpr float kInvSqrt2 = 0.7071067811865476f, kInvSqrt2Pi = 0.3989422804014327f;
      return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    }
    case Activation::Silu: {
      const float s = 1.0f / (1.0f + expf(-x));
      return s * (1.0f + x * (1.0f - s));
    }
  }
  return __int_as_float(0x7FFFFFFF);
}

// ---------------------------------------------------------------------------------------
// Reductions. Warp forms take the whole warp (all 32 lanes must call them) and return the
// result in every lane. Max follows fmaxf: a NaN operand is ignored.

struct SumOp {
  PK_INLINE float operator()(float a, float b) const { return a + b; }
  static PK_INLINE float identity() { return 0.0f; }
};
struct MaxOp {
  PK_INLINE float operator()(float a, float b) const { return fmaxf(a, b); }
  static PK_INLINE float identity() { return -__int_as_float(0x7F800000); }
};

template <typename Op>
PK_INLINE float warp_reduce(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = Op()(v, __shfl_xor_sync(PK_FULL_MASK, v, offset));
  return v;
}

PK_INLINE float warp_sum(float v) { return warp_reduce<SumOp>(v); }
PK_INLINE float warp_max(float v) { return warp_reduce<MaxOp>(v); }

// Reduction over the whole block, returned to every thread. Every thread of the block
// must call it (it holds two __syncthreads) and the block must be whole warps (the
// thread count a multiple of 32). Threads are numbered x fastest, as warps are formed.
template <typename Op>
PK_INLINE float block_reduce(float v) {
  __shared__ float partial[32];
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned warps = blockDim.x * blockDim.y * blockDim.z / 32;
  v = warp_reduce<Op>(v);
  if (tid % 32 == 0) partial[tid / 32] = v;
  __syncthreads();
  // Every warp reduces the per-warp partials itself: no second broadcast round.
  v = warp_reduce<Op>(tid % 32 < warps ? partial[tid % 32] : Op::identity());
  // The next call's writes to `partial` must wait until every warp has read it.
  __syncthreads();
  return v;
}

PK_INLINE float block_sum(float v) { return block_reduce<SumOp>(v); }
PK_INLINE float block_max(float v) { return block_reduce<MaxOp>(v); }
