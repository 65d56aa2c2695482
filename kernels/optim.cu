// AdamW for the adapter parameters (PyTorch's decoupled form, ../shared/TRAINING.md), over
// a list of tensors in one launch ("multi-tensor apply", as apex and PyTorch's fused
// optimizers do): adapters are many small tensors (A and B of every layer), and a launch
// per tensor would cost more than the arithmetic.
//
// The plan (src/plan/optim.rs) uploads one table per call:
//   entries[t]     = (f32 master param, f32 grad, f32 m, f32 v, T copy, len) of tensor t
//   block_map[b]   = (tensor, chunk): block b updates elements [chunk·kChunk, +kChunk) of it
//   partials[b]    = Σ g² over block b's elements (f64), when the norm is asked for
//   clip           = the clipping coefficient the norm pass leaves for the update (f32)
// Zero-length tensors get no blocks. Three kernels, in this order:
//   adamw_sumsq     (only with a norm)    per block: Σ g² of its chunk into partials[b]
//   adamw_norm      (only with a norm)    one block: ‖g‖ = sqrt(Σ partials) in a fixed order,
//                                         reported to the caller, and the coefficient
//                                         min(1, max_norm / (‖g‖ + 1e-6)) (PyTorch's
//                                         clip_grad_norm_) or 1 without clipping
//   adamw_update_T  per block, per element:
//       g  = grad · clip
//       p ← p · (1 − lr·wd)
//       m ← m + (1 − β1)·(g − m)            (PyTorch's lerp)
//       v ← β2·v + (1 − β2)·g²
//       p ← p − step_size · m / (sqrt(v) / bc2_sqrt + ε)
//     with step_size = lr / (1 − β1^t) and bc2_sqrt = sqrt(1 − β2^t) from the host (f64,
//     rounded to f32), then writes p to the f32 master and to the T copy.
// The gradient norm is deterministic: each thread sums a fixed set of elements, blocks
// reduce by a fixed butterfly, and the partials are summed in index order by one block
// (no float atomics), so the same gradients give the same norm bit for bit on any run.
//
// Tile: 256 threads, kChunk = 2048 elements a block (8 a thread, strided by 256 so that a
// warp's loads are contiguous). Memory-bound: 5 f32 reads and 4 writes an element.
#include "common.cuh"

constexpr int kAdamwThreads = 256;
constexpr uint32_t kAdamwChunk = 2048;

// One tensor of the list; the T copy's element type is the kernel's.
struct AdamwEntry {
  float* param;
  const float* grad;
  float* m;
  float* v;
  void* param_t;
  uint64_t len;
};

struct AdamwParams {
  const AdamwEntry* entries;
  const uint32_t* block_map;  // (tensor, chunk) per block
  double* partials;           // one per block (sumsq, norm)
  float* clip;                // the clipping coefficient: written by norm, read by update
                              // (null: no norm pass, coefficient 1)
  float* grad_norm;           // the caller's [1], or null
  uint32_t blocks;
  float lr_wd_decay;          // 1 − lr·wd
  float beta1, beta2;
  float step_size;            // lr / (1 − β1^t)
  float bc2_sqrt;             // sqrt(1 − β2^t)
  float eps;
  float max_norm;             // <= 0: no clipping
};
PK_PARAMS_SIZE(AdamwParams)

// Sum over the block in f64 by a fixed butterfly (the same order on every run), returned in
// thread 0.
PK_INLINE double adamw_block_sum_f64(double v) {
  __shared__ double warp_sums[kAdamwThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(PK_FULL_MASK, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kAdamwThreads / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(PK_FULL_MASK, v, offset);
  }
  return v;
}

__device__ void adamw_sumsq_pass(const AdamwParams& p) {
  const uint32_t b = blockIdx.x;
  const AdamwEntry e = p.entries[p.block_map[2 * b]];
  const uint64_t base = uint64_t(p.block_map[2 * b + 1]) * kAdamwChunk;
  double s = 0.0;
  for (uint32_t i = threadIdx.x; i < kAdamwChunk; i += kAdamwThreads) {
    if (base + i < e.len) {
      const double g = e.grad[base + i];
      s += g * g;
    }
  }
  s = adamw_block_sum_f64(s);
  if (threadIdx.x == 0) p.partials[b] = s;
}
PK_KERNEL_BOUNDS(adamw_sumsq, adamw_sumsq_pass, AdamwParams, kAdamwThreads, 1)

__device__ void adamw_norm_pass(const AdamwParams& p) {
  double s = 0.0;
  for (uint32_t b = threadIdx.x; b < p.blocks; b += kAdamwThreads) s += p.partials[b];
  s = adamw_block_sum_f64(s);
  if (threadIdx.x == 0) {
    const double norm = sqrt(s);
    if (p.grad_norm != nullptr) *p.grad_norm = float(norm);
    // PyTorch's clip_grad_norm_: max_norm / (norm + 1e-6), clamped to 1. A non-finite norm
    // gives a NaN or zero coefficient, as there: the caller sees the norm it reported.
    float clip = 1.0f;
    if (p.max_norm > 0.0f) clip = float(fmin(double(p.max_norm) / (norm + 1e-6), 1.0));
    *p.clip = clip;
  }
}
PK_KERNEL_BOUNDS(adamw_norm, adamw_norm_pass, AdamwParams, kAdamwThreads, 1)

template <typename T>
__device__ void adamw_update_pass(const AdamwParams& p) {
  const uint32_t b = blockIdx.x;
  const AdamwEntry e = p.entries[p.block_map[2 * b]];
  const uint64_t base = uint64_t(p.block_map[2 * b + 1]) * kAdamwChunk;
  const float clip = p.clip != nullptr ? *p.clip : 1.0f;
  T* param_t = static_cast<T*>(e.param_t);
  for (uint32_t i = threadIdx.x; i < kAdamwChunk; i += kAdamwThreads) {
    const uint64_t j = base + i;
    if (j >= e.len) break;
    const float g = e.grad[j] * clip;
    float w = e.param[j] * p.lr_wd_decay;
    float m = e.m[j];
    m += (1.0f - p.beta1) * (g - m);
    const float v = p.beta2 * e.v[j] + (1.0f - p.beta2) * g * g;
    w -= p.step_size * m / (sqrtf(v) / p.bc2_sqrt + p.eps);
    e.m[j] = m;
    e.v[j] = v;
    e.param[j] = w;
    param_t[j] = from_float<T>(w);
  }
}
PK_KERNEL_BOUNDS(adamw_update_f32, adamw_update_pass<float>, AdamwParams, kAdamwThreads, 1)
PK_KERNEL_BOUNDS(adamw_update_f16, adamw_update_pass<__half>, AdamwParams, kAdamwThreads, 1)
PK_KERNEL_BOUNDS(adamw_update_bf16, adamw_update_pass<__nv_bfloat16>, AdamwParams, kAdamwThreads, 1)
