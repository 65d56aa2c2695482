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
//                         adapter), one thread per output, grid (ceil(N/128), m).
// The fast path is [shrink, expand, frozen]: the frozen GEMM is delta_linear.cu's own
// fused_linear pass (decode tile, split-K, tensor cores, as the plan picks them for one
// adapter) with h_in = y read in place, so W is streamed once per tile by the kernel that
// streams it for a single adapter, and the delta costs each adapter its own rank in the two
// small passes before it. A programmatic dependent launch on sm_90: the frozen pass streams
// W while the delta passes run and reads y only after waiting for them. The price of not
// putting the per-row delta into the mma kernel's epilogue: y is written twice (the delta,
// then the sum) and the delta is rounded to T before the sum (|Δ|·2^-8 in bf16), an extra
// M·N·4 bytes, small beside W's N·K·2 at decode (3% at M = 64, K = 4096). Unmeasured.

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
