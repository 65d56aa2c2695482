// dora.cu — DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"), as PEFT runs it:
//
//     y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b,    g[j] = m[j] / ‖W[j,:] + s·(B·A)[j,:]‖₂
//
// with the norm detached (a constant of the forward, as in PEFT). The host side is
// src/plan/dora.rs, the math src/reference/dora.rs. The forward is a composition: the fused
// LoRA pass of delta_linear.cu without the bias, then dora_scale's per-output-column scale and
// bias over y (one more read and write of y; folding g into delta_linear's epilogue would
// save it, and is left for when the fused kernels are not being changed by other work).
//
// Kernels:
//   dora_norm_*   g[j] = m[j] / ‖W[j,:] + s·B[j,:]·A‖ for every output row j, in f32. One block of
//                 128 threads per row; each thread walks columns c = tid, tid + 128, …, forms the
//                 merged element W[j,c] + s·Σ_t B[j,t]·A[t,c] in f32 (B[j,t] is the same address
//                 for every thread: a broadcast; A's rows are read coalesced), squares and sums;
//                 block_sum reduces. Cost n·k·r, the same as the W·Aᵀ of the expanded form
//                 ‖W_j‖² + 2s·B_j·(W·Aᵀ)_j + s²·B_j·(A·Aᵀ)·B_jᵀ, which would let ‖W‖² be
//                 computed once but loses digits to cancellation when s·B·A is small against W
//                 (always, for a fresh adapter). g is constant while the weights are: computed
//                 once per weight update, not per token, so its cost is not on the inference
//                 path.
//   dora_scale_*  x[i,j] ← x[i,j]·v + bias[j], v = g[i·g_row + j·g_col] (or its reciprocal):
//                 with (g_row, g_col) = (0, 1) the forward's per-column scale of y, with (1, 0)
//                 merge's and unmerge's per-row scale of W. A grid-stride loop, consecutive
//                 threads on consecutive columns.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Row norms: grid (n), block 128.

struct DoraNormParams {
    const void* w;          // [n, k]
    const void* w_down;     // [r, k]
    const void* w_up;     // [n, r]
    const void* magnitude;  // [n]
    float* g;               // [n], f32
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
    if (threadIdx.x == 0) p.g[j] = to_float(static_cast<const T*>(p.magnitude)[j]) / sqrtf(norm2);
}

// ---------------------------------------------------------------------------------------------
// Scale and bias: grid-stride over rows × cols, block 256.

struct DoraScaleParams {
    void* x;             // [rows, cols], leading dimension ld
    const float* g;      // indexed i·g_row + j·g_col
    const void* bias;    // [cols] or null
    int64_t ld;
    int32_t rows, cols;
    int32_t g_row, g_col;
    int32_t invert;  // 1: divide by g (unmerge)
};
PK_PARAMS_SIZE(DoraScaleParams)

template <typename T>
PK_INLINE void dora_scale(const DoraScaleParams& p) {
    T* x = static_cast<T*>(p.x);
    const T* bias = static_cast<const T*>(p.bias);
    const int64_t total = int64_t(p.rows) * p.cols;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t i = e / p.cols, j = e % p.cols;
        const float g = p.g[i * p.g_row + j * p.g_col];
        float v = to_float(x[i * p.ld + j]);
        v = p.invert ? v / g : v * g;
        if (bias) v += to_float(bias[j]);
        x[i * p.ld + j] = from_float<T>(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Instantiations: one line per exported kernel.

PK_KERNEL_BOUNDS(dora_norm_f32, dora_norm<float>, DoraNormParams, 128, 4)
PK_KERNEL_BOUNDS(dora_norm_f16, dora_norm<__half>, DoraNormParams, 128, 4)
PK_KERNEL_BOUNDS(dora_norm_bf16, dora_norm<__nv_bfloat16>, DoraNormParams, 128, 4)
PK_KERNEL_BOUNDS(dora_scale_f32, dora_scale<float>, DoraScaleParams, 256, 1)
PK_KERNEL_BOUNDS(dora_scale_f16, dora_scale<__half>, DoraScaleParams, 256, 1)
PK_KERNEL_BOUNDS(dora_scale_bf16, dora_scale<__nv_bfloat16>, DoraScaleParams, 256, 1)
