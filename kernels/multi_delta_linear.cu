// multi_delta_linear.cu — many adapters of one linear layer in one batch (serving).
//
// Each row m of the batch brings its own adapter a(m) of the layer's adapter set, or none:
//     y[m] = x[m]·Wᵀ + b + s_a·f_a(x[m]·W_down,aᵀ + b_down,a)·W_up,aᵀ + s_a·b_up,a
// (the parallel family: LoRA and rsLoRA with f = identity, parallel and scaled parallel
// adapters with any f; a(m) = −1 adds nothing). An adapter is data, not code: the set is a
// table of AdapterEntry (pointers to each adapter's own allocation, its rank 1..=256,
// activation, scale, optional biases), and the batch says which entry each row uses, either
// per row (`ids`, decode) or by segments of consecutive rows (`seg_starts` + `seg_ids`,
// prefill). Both live in device memory: a step launches without the host reading them, so
// it can be captured in a CUDA graph.
//
// Device ids are not trusted: an id outside [−1, table_len), an empty (removed) slot, or a row
// that no segment covers reads no adapter memory; the row gets the base layer alone and the
// kernel ORs a bit into `status` (MultiStatus) for the caller to read back. The host entry
// points check host-visible ids before any launch (an Err); only device ids need the flag.
// Every kernel that reads the batch checks each id itself (row_adapter, multi_adapter.cuh).
//
// Kernels:
//   multi_delta_naive_*   one thread per output: the frozen dot product, then each rank
//                         j of the row's adapter recomputes t_j = s·f(x·W_down[j] + b_down[j])
//                         (rounded to T, as the fast path stores it) and adds t_j·W_up[n, j].
//                         The correctness baseline: no workspace, one launch, O(r·K) per output.
//   multi_shrink_*        t[m, j] = s·f(x[m]·W_down[j] + b_down[j]) for j < rank(a(m)): a warp
//                         per (row, j), lanes striding over K (coalesced reads of x and of
//                         W_down's row), a shuffle reduction. grid (ceil(max_rank/8), m),
//                         8 warps a block; a block whose j are all past its row's rank exits
//                         at once, so every adapter costs its own rank (no padding in compute;
//                         the workspace rows are max_rank wide).
//   multi_expand_*        y[m, n] = t[m, :rank]·W_up[n, :rank] + s·b_up[n] (0 for a row without
//                         adapter), one thread per output, grid (ceil(N/128), m). Only for the
//                         unfused path below.
//
// The fast path is two launches, [shrink, fused]: the fused pass is delta_linear.cu's frozen
// GEMM on its tensor-core tiles (decode, small, mid, large, split-K: as the plan picks them for
// one adapter), instantiated with MULTI (fused_linear_mma_*_multi_*), whose phase 2 is the
// batch's per-row deltas. A block's row tile holds a set S of distinct adapters (at decode
// several, in a prefill segment one or two); at block start it finds S and gives each adapter
// a ∈ S columns [off_a, off_a + r_a) of a concatenated K2 = Σ round_up(r_a, 8), and phase 2
// multiplies A2[m, off_a + j] = t[m, j] (zero where row m uses another adapter) by
// B2[n, off_a + j] = W_up,a[n, j] (multi_adapter.cuh). So, as for a single adapter (insight 1
// of UNIFIED-VIEW.md): W is streamed once per tile, each adapter's W_up is read once per
// column tile at its own rank (rank-exact bytes), the delta's sum stays in f32 in the same
// accumulators as x·Wᵀ, s_a·b_up,a joins at the phase switch (or in the split-K reduction), and
// y is written once. The price: the zero blocks of A2 (rows of other adapters) are idle
// tensor-core FLOPs, |S|·BM·r per column tile instead of BM·r (at decode the pass is bound by
// W's bytes, not FLOPs), and each adapter's columns are padded to a multiple of 8 (so that a
// 16-byte chunk of a tile belongs to one adapter) and the tile's K2 to BK, not to the largest
// rank. A programmatic dependent launch on sm_90: the fused pass streams W through phase 1
// while the shrink runs and waits for t at its first phase-2 tile, as the single-adapter
// main pass waits for its down pass. An adapter whose W_up holds Inf or NaN also spoils the
// other rows of its row tile (0·Inf), as it would a merged weight.
//
// Where the frozen GEMM does not run on the mma kernels (f32, whose contract rules out TF32;
// x or W not 16-byte copyable; the Simt and Wgmma variants) the path is [shrink, expand,
// frozen]: the frozen GEMM (delta_linear.cu's pass the plan picks) adds y read in place, so y
// is written twice and the delta is rounded to T before the sum (exact enough in f32, the
// only dtype that takes this path under Auto with aligned operands).

#include "multi_adapter.cuh"

PK_PARAMS_SIZE(AdapterEntry)
PK_PARAMS_SIZE(MultiBatch)

// Twin of `MultiDeltaParams` in src/plan/multi_adapter.rs.
struct MultiDeltaParams {
  const void* x;     // [m, k], leading dimension ldx
  const void* w;     // [n, k] (naive kernel only)
  const void* bias;  // [n] or null (naive kernel only)
  MultiBatch batch;
  void* t;           // workspace [m, ldt] (shrink writes, the fused pass or expand reads)
  void* out;         // y [m, n], leading dimension ldo (naive kernel and expand)
  int64_t ldx, ldt, ldo;
  int32_t m, n, k, reserved;
};
PK_PARAMS_SIZE(MultiDeltaParams)

// ---------------------------------------------------------------------------------------------
// v1: naive. grid (ceil(N/16), ceil(M/16)), block 16×16; thread (x, y) owns y[m, n].

template <typename T>
PK_INLINE void multi_delta_naive(const MultiDeltaParams& p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y * blockDim.y + threadIdx.y;
  if (m >= p.m || n >= p.n) return;
  const T* x = static_cast<const T*>(p.x) + m * p.ldx;
  const T* w = static_cast<const T*>(p.w);
  float acc = 0.0f;
  for (int k = 0; k < p.k; ++k) acc += to_float(x[k]) * to_float(w[int64_t(n) * p.k + k]);
  if (p.bias) acc += to_float(static_cast<const T*>(p.bias)[n]);
  if (const AdapterEntry* a = row_adapter(p.batch, m)) {
    const T* w_down = static_cast<const T*>(a->w_down);
    const T* w_up = static_cast<const T*>(a->w_up);
    for (int j = 0; j < a->rank; ++j) {
      float z = 0.0f;
      for (int k = 0; k < p.k; ++k) z += to_float(x[k]) * to_float(w_down[int64_t(j) * p.k + k]);
      if (a->b_down) z += to_float(static_cast<const T*>(a->b_down)[j]);
      const float t = to_float(from_float<T>(a->scale * activate(static_cast<Activation>(a->activation), z)));
      acc += t * to_float(w_up[int64_t(n) * a->rank + j]);
    }
    if (a->b_up) acc += a->scale * to_float(static_cast<const T*>(a->b_up)[n]);
  }
  static_cast<T*>(p.out)[m * p.ldo + n] = from_float<T>(acc);
}

// ---------------------------------------------------------------------------------------------
// Fast path, step 1: the shrink. grid (ceil(max_rank/8), m), block 256; warp w of block
// (x, m) computes t[m, 8x + w].

template <typename T>
PK_INLINE void multi_shrink(const MultiDeltaParams& p) {
  allow_dependent_launch();
  const int m = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * 8 + warp;
  const AdapterEntry* a = row_adapter(p.batch, m);
  // Uniform over the warp (a over the block): the shuffles below see full warps.
  if (!a || j >= a->rank) return;
  const T* x = static_cast<const T*>(p.x) + m * p.ldx;
  const T* w_down = static_cast<const T*>(a->w_down) + int64_t(j) * p.k;
  float z = 0.0f;
  for (int k = lane; k < p.k; k += 32) z += to_float(x[k]) * to_float(w_down[k]);
  z = warp_sum(z);
  if (lane == 0) {
    if (a->b_down) z += to_float(static_cast<const T*>(a->b_down)[j]);
    const float v = a->scale * activate(static_cast<Activation>(a->activation), z);
    static_cast<T*>(p.t)[m * p.ldt + j] = from_float<T>(v);
  }
}

// Fast path, step 2: the expand. grid (ceil(N/128), m), block 128; thread x of block (bx, m)
// writes the delta y[m, 128·bx + x]. A dependent launch of the shrink: waits for t first.

template <typename T>
PK_INLINE void multi_expand(const MultiDeltaParams& p) {
  allow_dependent_launch();
  grid_dependency_wait();
  const int m = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= p.n) return;
  float acc = 0.0f;
  if (const AdapterEntry* a = row_adapter(p.batch, m)) {
    const T* t = static_cast<const T*>(p.t) + m * p.ldt;
    const T* w_up = static_cast<const T*>(a->w_up) + int64_t(n) * a->rank;
    for (int j = 0; j < a->rank; ++j) acc += to_float(t[j]) * to_float(w_up[j]);
    if (a->b_up) acc += a->scale * to_float(static_cast<const T*>(a->b_up)[n]);
  }
  static_cast<T*>(p.out)[m * p.ldo + n] = from_float<T>(acc);
}

// ---------------------------------------------------------------------------------------------
// Instantiations: one line per exported kernel.

PK_KERNEL(multi_delta_naive_f32, multi_delta_naive<float>, MultiDeltaParams)
PK_KERNEL(multi_delta_naive_f16, multi_delta_naive<__half>, MultiDeltaParams)
PK_KERNEL(multi_delta_naive_bf16, multi_delta_naive<__nv_bfloat16>, MultiDeltaParams)
PK_KERNEL_BOUNDS(multi_shrink_f32, multi_shrink<float>, MultiDeltaParams, 256, 4)
PK_KERNEL_BOUNDS(multi_shrink_f16, multi_shrink<__half>, MultiDeltaParams, 256, 4)
PK_KERNEL_BOUNDS(multi_shrink_bf16, multi_shrink<__nv_bfloat16>, MultiDeltaParams, 256, 4)
PK_KERNEL_BOUNDS(multi_expand_f32, multi_expand<float>, MultiDeltaParams, 128, 8)
PK_KERNEL_BOUNDS(multi_expand_f16, multi_expand<__half>, MultiDeltaParams, 128, 8)
PK_KERNEL_BOUNDS(multi_expand_bf16, multi_expand<__nv_bfloat16>, MultiDeltaParams, 128, 8)
