// dora.cu — DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"), as PEFT runs it:
//
//     y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b,    g[j] = m[j] / ‖W[j,:] + s·(B·A)[j,:]‖₂
//
// with the norm detached (a constant of the forward, as in PEFT). The host side is
// src/plan/dora.rs, the math src/reference/dora.rs. The forward is dora_norm (once per weight
// update) and one fused delta_linear pass with g as its epilogue's column scale
// (delta_linear.cu: y = g ⊙ (x·Wᵀ + Δ) + b, y written once).
//
// Kernels:
//   dora_norm_*   g[j] = m[j] / ‖W[j,:] + s·B[j,:]·A‖ for every output row j, in f32 (and the
//                 norm itself, which the backward divides by). One block of 128 threads per
//                 row; each thread walks columns c = tid, tid + 128, …, forms the merged
//                 element W[j,c] + s·Σ_t B[j,t]·A[t,c] in f32 (B[j,t] is the same address for
//                 every thread: a broadcast; A's rows are read coalesced), squares and sums;
//                 block_sum reduces. Cost n·k·r, the same as the W·Aᵀ of the expanded form
//                 ‖W_j‖² + 2s·B_j·(W·Aᵀ)_j + s²·B_j·(A·Aᵀ)·B_jᵀ, which would let ‖W‖² be
//                 computed once but loses digits to cancellation when s·B·A is small against W
//                 (always, for a fresh adapter). g is constant while the weights are: computed
//                 once per weight update, not per token, so its cost is not on the inference
//                 path.
//   dora_scale_*  W[i,:] ← W[i,:]·g[i] (merge) or W[i,:] / g[i] (unmerge), in place. A
//                 grid-stride loop, consecutive threads on consecutive columns.
//   dora_bwd_columns_*   the backward's pre-pass, with c = g (detached) and z = x·Wᵀ + Δ as the
//                 training forward saved it (f32):
//                     dy' = c ⊙ dy          (T, into the workspace: what delta_linear_backward reads)
//                     partial[chunk][j] = Σ_{i in chunk} dy[i,j]·z[i,j]
//                 grid (ceil(n/32), chunks), block 32×8: a warp reads 32 consecutive columns of
//                 a row (coalesced), the 8 warps stride over the chunk's rows, and the block
//                 adds its 8 partial sums in a fixed order. Why a pre-pass and not dy' scaled
//                 where the backward reads dy: the magnitude's gradient must read all of dy and
//                 z anyway, so writing dy' costs one more write of m·n elements of T on top of a
//                 pass that is needed regardless, while scaling inside the backward would touch
//                 every one of its kernels (the dz pass, the naive/SIMT/tensor-core data passes
//                 and the dW_up pass) for that one write. dy' is rounded to T once, as PyTorch's
//                 autograd rounds the gradient of g ⊙ (…) in a bf16 model.
//   dora_dmagnitude_*    dm[j] (+)= (Σ_chunk partial[chunk][j]) / ‖·‖_j, the chunks added in
//                 order: a deterministic column reduction (no float atomics). One thread per
//                 column, block 128.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Row norms: grid (n), block 128.

struct DoraNormParams {
    const void* w;          // [n, k]
    const void* w_down;     // [r, k]
    const void* w_up;     // [n, r]
    const void* magnitude;  // [n]
    float* g;               // [n], f32
    float* norm;            // [n], f32, or null
    int32_t n, k, r;
    float scale;  // s
};
PK_PARAMS_SIZE(DoraNormParams)

template <typename T>
PK_INLINE void dora_norm(const DoraNormParams& p) {
    const T* w = static_cast<const T*>(p.w);
    const T* a = static_cast<const T*>(p.w_down);
    const T* b = static_cast<const T*>(p.w_up);
    const int j = blockIdx.x;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < p.k; c += blockDim.x) {
        float ba = 0.0f;
        for (int t = 0; t < p.r; ++t)
            ba += to_float(b[int64_t(j) * p.r + t]) * to_float(a[int64_t(t) * p.k + c]);
        const float v = to_float(w[int64_t(j) * p.k + c]) + p.scale * ba;
        sq += v * v;
    }
    const float norm2 = block_sum(sq);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(norm2);
        p.g[j] = to_float(static_cast<const T*>(p.magnitude)[j]) / norm;
        if (p.norm) p.norm[j] = norm;
    }
}

// ---------------------------------------------------------------------------------------------
// Row scale (merge, unmerge): grid-stride over rows × cols, block 256.

struct DoraScaleParams {
    void* x;          // [rows, cols], leading dimension ld
    const float* g;   // [rows]
    int64_t ld;
    int32_t rows, cols;
    int32_t invert;  // 1: divide by g (unmerge)
};
PK_PARAMS_SIZE(DoraScaleParams)

template <typename T>
PK_INLINE void dora_scale(const DoraScaleParams& p) {
    T* x = static_cast<T*>(p.x);
    const int64_t total = int64_t(p.rows) * p.cols;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t i = e / p.cols, j = e % p.cols;
        const float v = to_float(x[i * p.ld + j]);
        x[i * p.ld + j] = from_float<T>(p.invert ? v / p.g[i] : v * p.g[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// The backward: dy' = g ⊙ dy and the magnitude's gradient (see the header).

struct DoraBackwardParams {
    const void* dy;      // [m, n], leading dimension ld
    const float* z;      // x·Wᵀ + Δ [m, n], contiguous (the training forward's save)
    const float* g;      // [n]
    const float* norm;   // [n]
    void* dy_scaled;     // [m, n], leading dimension ld
    float* partial;      // [chunks][n]
    float* dmagnitude;   // [n]
    int64_t ld;
    int32_t m, n;
    int32_t rows_per_chunk, chunks;
    int32_t accumulate;  // 1: dmagnitude += (gradient accumulation)
};
PK_PARAMS_SIZE(DoraBackwardParams)

// grid (ceil(n/32), chunks), block (32, 8).
template <typename T>
PK_INLINE void dora_bwd_columns(const DoraBackwardParams& p) {
    __shared__ float sums[8][33];
    const T* dy = static_cast<const T*>(p.dy);
    T* dys = static_cast<T*>(p.dy_scaled);
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int begin = blockIdx.y * p.rows_per_chunk;
    const int end = min(begin + p.rows_per_chunk, p.m);
    float acc = 0.0f;
    if (j < p.n) {
        const float g = p.g[j];
        for (int i = begin + threadIdx.y; i < end; i += 8) {
            const float d = to_float(dy[int64_t(i) * p.ld + j]);
            dys[int64_t(i) * p.ld + j] = from_float<T>(g * d);
            acc += d * p.z[int64_t(i) * p.n + j];
        }
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < p.n) {
        float total = 0.0f;
        for (int w = 0; w < 8; ++w) total += sums[w][threadIdx.x];
        p.partial[int64_t(blockIdx.y) * p.n + j] = total;
    }
}

// grid (ceil(n/128)), block 128. All f32, whatever the layer's dtype: one kernel.
PK_INLINE void dora_dmagnitude(const DoraBackwardParams& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.n) return;
    float total = 0.0f;
    for (int c = 0; c < p.chunks; ++c) total += p.partial[int64_t(c) * p.n + j];
    const float v = total / p.norm[j];
    p.dmagnitude[j] = p.accumulate ? p.dmagnitude[j] + v : v;
}

// ---------------------------------------------------------------------------------------------
// Instantiations: one line per exported kernel.

PK_KERNEL_BOUNDS(dora_norm_f32, dora_norm<float>, DoraNormParams, 128, 4)
PK_KERNEL_BOUNDS(dora_norm_f16, dora_norm<__half>, DoraNormParams, 128, 4)
PK_KERNEL_BOUNDS(dora_norm_bf16, dora_norm<__nv_bfloat16>, DoraNormParams, 128, 4)
PK_KERNEL_BOUNDS(dora_scale_f32, dora_scale<float>, DoraScaleParams, 256, 1)
PK_KERNEL_BOUNDS(dora_scale_f16, dora_scale<__half>, DoraScaleParams, 256, 1)
PK_KERNEL_BOUNDS(dora_scale_bf16, dora_scale<__nv_bfloat16>, DoraScaleParams, 256, 1)
PK_KERNEL_BOUNDS(dora_bwd_columns_f32, dora_bwd_columns<float>, DoraBackwardParams, 256, 4)
PK_KERNEL_BOUNDS(dora_bwd_columns_f16, dora_bwd_columns<__half>, DoraBackwardParams, 256, 4)
PK_KERNEL_BOUNDS(dora_bwd_columns_bf16, dora_bwd_columns<__nv_bfloat16>, DoraBackwardParams, 256, 4)
PK_KERNEL_BOUNDS(dora_dmagnitude_f32, dora_dmagnitude, DoraBackwardParams, 128, 4)
