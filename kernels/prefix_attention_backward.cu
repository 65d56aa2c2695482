// prefix_attention_backward.cu — the backward of prefix attention (kernels/prefix_attention.cu):
// gradients of the queries, the context keys and values, and the prefix keys and values (the
// trained parameters of prefix tuning), from the forward's merged output O and merged LSE L.
// The host side is src/plan/prefix_attention.rs; the math every kernel must match is
// src/reference/attention.rs `prefix_attention_backward` (TRAINING.md, "Prefix attention").
//
// Per query row q (the forward's masks: every query sees the whole prefix; context key j of
// sequence b is visible to query i iff j < len[b] and, when causal, j ≤ i + len[b] − Lq):
//
//     D    = dO·O                              one value a row (the pre-pass)
//     p_j  = exp(τ·q·k_j − L)                  recomputed from L, never stored
//     dV_j += p_j·dO           ds_j = p_j·(dO·v_j − D)
//     dK_j += τ·ds_j·q         dq   = τ·Σ_j ds_j·k_j
//
// over the prefix keys and then the visible context keys, never concatenated. Using the merged
// O and L makes each key's terms exact on its own, so the prefix and the context tiles are
// independent (FlashAttention-2's algorithm, and why the split form can train: each part's
// backward against the merged O and L). A row with L = −∞ sees nothing: p = 0, zero gradient.
//
// Kernels (f32 arithmetic on CUDA cores for every dtype, tiles widened to f32 in shared memory;
// correctness first, no tensor cores yet):
//   prefix_attention_backward_dot_{f32,f16,bf16}   the pre-pass D = rowsum(dO∘O) into the f32
//       workspace [B·Hq·Lq]: one warp per row, 4 rows per block.
//   prefix_attention_backward_dkv_{dtype}_d{32,...,256}   key-tile parallel: a block owns a
//       tile of kKeys keys of one part (prefix tiles first in grid.x, then context tiles) of
//       one (sequence, KV head), holds their dK and dV in registers and visits every query row
//       that sees them: the query heads of the KV group (the GQA sum) and, for a prefix shared
//       by the batch, every sequence (the batch sum; the blocks of sequences > 0 then have
//       nothing to do), in steps of 32 query rows whose Q, dO, L and D go through shared
//       memory. A causal context tile starts at its first seeing query. Deterministic: each
//       gradient element is written once by one thread, no atomics. Padding keys (≥ len[b])
//       and never-seen keys get 0.
//   prefix_attention_backward_dq_{dtype}_d{...}   query-tile parallel (the deterministic dq: no
//       float atomics, no [key tiles × rows × d] partials): a block of 64 query rows (32 at
//       d = 256) of one (sequence, head) walks the key tiles its rows see, as the forward does,
//       recomputing p and ds, and accumulates dq in registers. It recomputes q·k and dO·v once
//       more than a fused dq would (FlashAttention-2 accumulates dq with atomics instead).
//   lse_merge_backward_{f32,f16,bf16}   the backward of lse_merge (kernels/prefix_attention.cu)
//       for a part whose own backward takes its output's and its LSE's gradients: with
//       λ = sigmoid(LSE_p − LSE_c), do_p = λ·dO, do_c = (1 − λ)·dO, dLSE_p = λ(1 − λ)·dO·(o_p −
//       o_c) = −dLSE_c; an empty state (LSE −∞) gets zeros and its output is not read. One warp
//       per row.
//   Tiles: kKeys = 64 keys at d ≤ 64, 32 at d ≤ 128, 16 at d = 256, so that a thread of the
//   key kernel holds (kKeys / 8)·(d / 16) elements of each of dK and dV (≤ 64 registers
//   for the two) and every tile fits in shared memory; the accumulators are spread as a
//   8 × 16 thread grid over (key rows, columns c ≡ tx mod 16), so d = 80 and 96 need no tail.
//   Rows are padded by 4 floats in shared memory (16-byte reads of consecutive rows fall in
//   distinct bank groups). Gradients are stored in the input dtype, dP_k/dP_v optionally in
//   f32 (trained parameters: f32 master gradients), any strides (no alignment needed).
//
// Rejected alternatives: dq by float atomics from the key-tile blocks (FlashAttention-2's
// default; not deterministic, not bitwise reproducible across runs); dq partials per key tile
// in a workspace and a reduce kernel (key tiles × B·Hq·Lq·d floats: over 8 GiB at B = 8, H = 32,
// L = 2048, d = 128); materialising [P; C] (the unfused path the bench times). Still to come:
// tensor-core (mma.sync) versions of the key and dq kernels for f16/bf16, which the SDPA peer
// needs for a fair race; these SIMT kernels have not run on a GPU yet.
#include <limits>

#include "common.cuh"

namespace {

// Element strides of a [batch, heads, seq, dim] tensor; the last dimension is contiguous.
struct HeadStrides {
  int64_t batch, head, seq;
};

}  // namespace

// Twin of `PrefixAttentionBackwardParams` in src/plan/prefix_attention.rs.
struct PrefixAttentionBackwardParams {
  const void* q;                 // [B, Hq, Lq, D]
  const void* k;                 // [B, Hkv, Lk, D]
  const void* v;                 // [B, Hkv, Lk, D]
  const void* prefix_k;          // [B, Hkv, l, D] (batch stride 0 when shared)
  const void* prefix_v;          // [B, Hkv, l, D]
  const uint32_t* context_lens;  // [B], or null: all Lk
  const void* out;               // O [B, Hq, Lq, D], the forward's merged output
  const void* dout;              // dO [B, Hq, Lq, D]
  const float* lse;              // L [B, Hq, Lq] contiguous, natural log
  float* delta;                  // D [B, Hq, Lq] contiguous (workspace)
  void* dq;                      // [B, Hq, Lq, D]
  void* dk;                      // [B, Hkv, Lk, D]
  void* dv;                      // [B, Hkv, Lk, D]
  void* dprefix_k;               // [Bp, Hkv, l, D], Bp = 1 when shared; T or f32
  void* dprefix_v;               // [Bp, Hkv, l, D]
  int64_t rows;                  // B·Hq·Lq
  HeadStrides sq, sk, sv, spk, spv, so, sdo, sdq, sdk, sdv, sdpk, sdpv;
  int32_t batch, heads, group;   // B, Hq, Hq / Hkv
  int32_t q_len, kv_len, prefix_len;
  int32_t causal;
  int32_t shared_prefix;         // 1: one prefix for the batch, its gradient summed over it
  int32_t dprefix_k_f32, dprefix_v_f32;  // 1: that gradient is f32, else T
  int32_t head_dim;              // D, for the pre-pass
  float scale;                   // τ
  float scale_log2;              // τ·log2(e)
};
PK_PARAMS_SIZE(PrefixAttentionBackwardParams)

// Twin of `LseMergeBackwardParams` in src/plan/prefix_attention.rs.
struct LseMergeBackwardParams {
  const void* o_prefix;       // [B, H, L, D]
  const float* lse_prefix;    // [B, H, L] contiguous
  const void* o_context;      // [B, H, L, D]
  const float* lse_context;   // [B, H, L] contiguous
  const void* dout;           // [B, H, L, D]
  void* do_prefix;            // [B, H, L, D]
  float* dlse_prefix;         // [B, H, L] contiguous
  void* do_context;           // [B, H, L, D]
  float* dlse_context;        // [B, H, L] contiguous
  HeadStrides sp, sc, sdo, sdp, sdc;
  int64_t rows;               // B·H·L
  int32_t heads, len, dim;
};
PK_PARAMS_SIZE(LseMergeBackwardParams)

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;
constexpr size_t kMaxSmemSm80 = 163 * 1024;

template <int D>
struct BwdTile {
  static_assert(D % 16 == 0 && D >= 32 && D <= 256, "head dim: a multiple of 16 in [32, 256]");
  static constexpr int kKeys = D <= 64 ? 64 : D <= 128 ? 32 : 16;
  static constexpr int kPitch = D + 4;           // Q, dO, K, V rows in shared memory, floats
  static constexpr int kKvRows = 32;             // query rows per step of the key kernel
  static constexpr int kQRows = D <= 128 ? 64 : 32;  // query rows of a dq block
  // The two kernels' shared memory, floats; src/plan/prefix_attention.rs computes the same.
  static constexpr int kSmemKv = 2 * (kKvRows + kKeys) * kPitch + 2 * kKvRows * kKeys + 2 * kKvRows;
  static constexpr int kSmemQ = 2 * (kQRows + kKeys) * kPitch + kQRows * kKeys + 2 * kQRows;
};

// Context keys [0, limit) are visible to query i of a sequence with `len` valid keys.
PK_INLINE int context_limit(int i, int len, int q_len, bool causal) {
  if (!causal) return len;
  const int64_t lim = int64_t(i) + len - q_len + 1;
  return int(lim < 0 ? 0 : (lim > len ? len : lim));
}

// The valid context keys of sequence b (a length beyond Lk counts as Lk, as in the forward).
PK_INLINE int context_len(const PrefixAttentionBackwardParams& p, int b) {
  return p.context_lens ? int(min(p.context_lens[b], uint32_t(p.kv_len))) : p.kv_len;
}

// Rows [0, loaded) of a kRows × D tile (row stride ld) into shared memory as f32 (pitch D + 4),
// rows [loaded, kRows) as zeros. Consecutive threads take consecutive elements.
template <typename T, int kRows, int D>
PK_INLINE void load_rows(float* dst, const T* src, int64_t ld, int loaded) {
  for (int e = int(threadIdx.x); e < kRows * D; e += kThreads) {
    const int r = e / D, c = e % D;
    dst[r * (D + 4) + c] = r < loaded ? to_float(src[r * ld + c]) : 0.0f;
  }
}

// The score gradients of a kRows × kKeys tile: for every (row i, key j) of the tile,
// p = exp(τ·q_i·k_j − L_i) and ds = p·(dO_i·v_j − D_i), 0 where `visible(i, j)` is false or
// the row saw nothing (L = −∞). q, dO rows from sq, sdo; k, v rows from sk, sv (pitch D + 4);
// s_lse2 holds L·log2(e) and s_delta D per row. p goes to sp (when not null), ds to sds, both
// [kRows][kKeys]. Thread t takes key t mod kKeys of rows t / kKeys + (128 / kKeys)·r.
template <int D, int kRows, int kKeys, typename Visible>
PK_INLINE void score_grads(const float* sq, const float* sdo, const float* sk, const float* sv,
                           const float* s_lse2, const float* s_delta, float scale_log2,
                           Visible visible, float* sp, float* sds) {
  constexpr int P = D + 4;
  constexpr int kStep = kThreads / kKeys;
  constexpr int kPer = kRows / kStep;
  static_assert(kRows % kStep == 0, "rows must spread evenly over the threads");
  const int j = int(threadIdx.x) % kKeys, i0 = int(threadIdx.x) / kKeys;
  float s[kPer] = {}, dp[kPer] = {};
#pragma unroll 4
  for (int c = 0; c < D; c += 4) {
    const float4 kv = *reinterpret_cast<const float4*>(sk + j * P + c);
    const float4 vv = *reinterpret_cast<const float4*>(sv + j * P + c);
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int i = i0 + kStep * r;
      const float4 qv = *reinterpret_cast<const float4*>(sq + i * P + c);
      const float4 ov = *reinterpret_cast<const float4*>(sdo + i * P + c);
      s[r] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, s[r]))));
      dp[r] = fmaf(ov.x, vv.x, fmaf(ov.y, vv.y, fmaf(ov.z, vv.z, fmaf(ov.w, vv.w, dp[r]))));
    }
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int i = i0 + kStep * r;
    const float l2 = s_lse2[i];
    float pe = 0.0f;
    if (l2 != kNegInf && visible(i, j)) pe = exp2f(fmaf(s[r], scale_log2, -l2));
    if (sp) sp[i * kKeys + j] = pe;
    sds[i * kKeys + j] = pe * (dp[r] - s_delta[i]);
  }
}

// Loads the per-row statistics of rows [0, n) (L·log2(e) and D) of a tile starting at
// statistics index `base`; rows past n read as L = −∞ (nothing seen) and D = 0.
template <int kRows>
PK_INLINE void load_stats(const PrefixAttentionBackwardParams& p, int64_t base, int n,
                          float* s_lse2, float* s_delta) {
  for (int i = int(threadIdx.x); i < kRows; i += kThreads) {
    s_lse2[i] = i < n ? p.lse[base + i] * kLog2e : kNegInf;
    s_delta[i] = i < n ? p.delta[base + i] : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// The pre-pass: D = rowsum(dO∘O), one warp per row.

template <typename T>
__device__ void backward_dot(const PrefixAttentionBackwardParams& p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int64_t i = row % p.q_len, bh = row / p.q_len, b = bh / p.heads, h = bh % p.heads;
  const T* o = static_cast<const T*>(p.out) + b * p.so.batch + h * p.so.head + i * p.so.seq;
  const T* g = static_cast<const T*>(p.dout) + b * p.sdo.batch + h * p.sdo.head + i * p.sdo.seq;
  float acc = 0.0f;
  for (int c = lane; c < p.head_dim; c += 32) acc = fmaf(to_float(o[c]), to_float(g[c]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// ---------------------------------------------------------------------------------------
// dK, dV (and dP_k, dP_v): one block per key tile.

// Stores a key tile's gradient rows [j0, j0 + n) of this thread (rows ky + 8w, columns
// cx + 16u) as T, or as f32 when `as_f32`.
template <typename T, int D, int kKeys>
PK_INLINE void store_key_grads(void* base, const HeadStrides& s, int64_t off, int j0, int n,
                               bool as_f32, const float (&acc)[kKeys / 8][D / 16], float mul) {
  const int ky = int(threadIdx.x) / 16, cx = int(threadIdx.x) % 16;
#pragma unroll
  for (int w = 0; w < kKeys / 8; ++w) {
    const int j = ky + 8 * w;
    if (j >= n) continue;
    const int64_t at = off + int64_t(j0 + j) * s.seq + cx;
#pragma unroll
    for (int u = 0; u < D / 16; ++u) {
      const float val = acc[w][u] * mul;
      if (as_f32) {
        static_cast<float*>(base)[at + 16 * u] = val;
      } else {
        static_cast<T*>(base)[at + 16 * u] = from_float<T>(val);
      }
    }
  }
}

template <typename T, int D>
__device__ void backward_dkv(const PrefixAttentionBackwardParams& p) {
  using Tile = BwdTile<D>;
  constexpr int N = Tile::kKeys, P = Tile::kPitch, M = Tile::kKvRows;
  static_assert(Tile::kSmemKv * sizeof(float) <= kMaxSmemSm80, "tiles overflow shared memory");
  PK_DYNAMIC_SMEM(float, smem_bwd);
  float* const sk = smem_bwd;
  float* const sv = sk + N * P;
  float* const sq = sv + N * P;
  float* const sdo = sq + M * P;
  float* const sp = sdo + M * P;   // [M][N]
  float* const sds = sp + M * N;   // [M][N]
  float* const s_lse2 = sds + M * N;
  float* const s_delta = s_lse2 + M;

  const int b = int(blockIdx.z), kvh = int(blockIdx.y);
  const int prefix_tiles = ceil_div(p.prefix_len, N);
  const bool is_prefix = int(blockIdx.x) < prefix_tiles;
  const bool shared = is_prefix && p.shared_prefix != 0;
  // A shared prefix's tile is the block of sequence 0's, which sums over the batch.
  if (shared && b > 0) return;
  const int j0 = (is_prefix ? int(blockIdx.x) : int(blockIdx.x) - prefix_tiles) * N;
  const int part_len = is_prefix ? p.prefix_len : p.kv_len;
  const int n = min(part_len - j0, N);
  const HeadStrides& ks = is_prefix ? p.spk : p.sk;
  const HeadStrides& vs = is_prefix ? p.spv : p.sv;
  const T* kbase = static_cast<const T*>(is_prefix ? p.prefix_k : p.k) +
                   (b * ks.batch + kvh * ks.head + j0 * ks.seq);
  const T* vbase = static_cast<const T*>(is_prefix ? p.prefix_v : p.v) +
                   (b * vs.batch + kvh * vs.head + j0 * vs.seq);
  // Context keys past the sequence's length are padding: never read, gradient 0.
  const int len = is_prefix ? 0 : context_len(p, b);
  const int loaded = is_prefix ? n : max(0, min(n, len - j0));
  load_rows<T, N, D>(sk, kbase, ks.seq, loaded);
  load_rows<T, N, D>(sv, vbase, vs.seq, loaded);

  float dk[N / 8][D / 16] = {}, dv[N / 8][D / 16] = {};
  const int ky = int(threadIdx.x) / 16, cx = int(threadIdx.x) % 16;
  const bool causal = p.causal != 0;
  const int b_end = shared ? p.batch : b + 1;
  for (int bb = b; bb < b_end && loaded > 0; ++bb) {
    // The first query that sees key j0 (causal context), from the start of its tile.
    int first = 0;
    if (!is_prefix && causal) first = max(0, j0 + p.q_len - len) / M * M;
    for (int hg = 0; hg < p.group; ++hg) {
      const int h = kvh * p.group + hg;
      const T* qbase = static_cast<const T*>(p.q) + (bb * p.sq.batch + h * p.sq.head);
      const T* obase = static_cast<const T*>(p.dout) + (bb * p.sdo.batch + h * p.sdo.head);
      const int64_t stat_base = (int64_t(bb) * p.heads + h) * p.q_len;
      for (int i0 = first; i0 < p.q_len; i0 += M) {
        const int rows = min(M, p.q_len - i0);
        __syncthreads();  // the previous step is done with Q, dO, P, dS
        load_rows<T, M, D>(sq, qbase + i0 * p.sq.seq, p.sq.seq, rows);
        load_rows<T, M, D>(sdo, obase + i0 * p.sdo.seq, p.sdo.seq, rows);
        load_stats<M>(p, stat_base + i0, rows, s_lse2, s_delta);
        __syncthreads();
        auto visible = [&](int i, int j) {
          if (j >= loaded) return false;
          return is_prefix || j0 + j < context_limit(i0 + i, len, p.q_len, causal);
        };
        score_grads<D, M, N>(sq, sdo, sk, sv, s_lse2, s_delta, p.scale_log2, visible, sp, sds);
        __syncthreads();
        // dV_j += Σ_i p_ij·dO_i, dK_j += Σ_i ds_ij·q_i (τ at the end).
        for (int i = 0; i < rows; ++i) {
          float qr[D / 16], gr[D / 16];
#pragma unroll
          for (int u = 0; u < D / 16; ++u) {
            qr[u] = sq[i * P + cx + 16 * u];
            gr[u] = sdo[i * P + cx + 16 * u];
          }
#pragma unroll
          for (int w = 0; w < N / 8; ++w) {
            const float pw = sp[i * N + ky + 8 * w], dsw = sds[i * N + ky + 8 * w];
#pragma unroll
            for (int u = 0; u < D / 16; ++u) {
              dv[w][u] = fmaf(pw, gr[u], dv[w][u]);
              dk[w][u] = fmaf(dsw, qr[u], dk[w][u]);
            }
          }
        }
      }
    }
  }

  if (is_prefix) {
    const int bo = shared ? 0 : b;
    store_key_grads<T, D, N>(p.dprefix_k, p.sdpk, bo * p.sdpk.batch + kvh * p.sdpk.head, j0, n,
                             p.dprefix_k_f32 != 0, dk, p.scale);
    store_key_grads<T, D, N>(p.dprefix_v, p.sdpv, bo * p.sdpv.batch + kvh * p.sdpv.head, j0, n,
                             p.dprefix_v_f32 != 0, dv, 1.0f);
  } else {
    store_key_grads<T, D, N>(p.dk, p.sdk, b * p.sdk.batch + kvh * p.sdk.head, j0, n, false, dk,
                             p.scale);
    store_key_grads<T, D, N>(p.dv, p.sdv, b * p.sdv.batch + kvh * p.sdv.head, j0, n, false, dv,
                             1.0f);
  }
}

// ---------------------------------------------------------------------------------------
// dq: one block per 64 (32 at d = 256) query rows of one (sequence, head); grid (query tiles,
// Hq, B), query tiles in reverse so that the longest causal ones start first.

template <typename T, int D>
__device__ void backward_dq(const PrefixAttentionBackwardParams& p) {
  using Tile = BwdTile<D>;
  constexpr int N = Tile::kKeys, P = Tile::kPitch, M = Tile::kQRows;
  static_assert(Tile::kSmemQ * sizeof(float) <= kMaxSmemSm80, "tiles overflow shared memory");
  PK_DYNAMIC_SMEM(float, smem_bwd);
  float* const sq = smem_bwd;
  float* const sdo = sq + M * P;
  float* const sk = sdo + M * P;
  float* const sv = sk + N * P;
  float* const sds = sv + N * P;  // [M][N]
  float* const s_lse2 = sds + M * N;
  float* const s_delta = s_lse2 + M;

  const int b = int(blockIdx.z), h = int(blockIdx.y);
  const int i0 = int(gridDim.x - 1 - blockIdx.x) * M;
  const int rows = min(M, p.q_len - i0);
  const int kvh = h / p.group;
  const T* qbase = static_cast<const T*>(p.q) + (b * p.sq.batch + h * p.sq.head + i0 * p.sq.seq);
  const T* obase =
      static_cast<const T*>(p.dout) + (b * p.sdo.batch + h * p.sdo.head + i0 * p.sdo.seq);
  load_rows<T, M, D>(sq, qbase, p.sq.seq, rows);
  load_rows<T, M, D>(sdo, obase, p.sdo.seq, rows);
  load_stats<M>(p, (int64_t(b) * p.heads + h) * p.q_len + i0, rows, s_lse2, s_delta);

  const bool causal = p.causal != 0;
  const int len = context_len(p, b);
  // Keys [0, context_keys) of the context are seen by some row of the block (its last).
  const int context_keys = context_limit(i0 + rows - 1, len, p.q_len, causal);
  const int prefix_tiles = ceil_div(p.prefix_len, N);
  const int tiles = prefix_tiles + ceil_div(context_keys, N);

  float dq[M / 8][D / 16] = {};
  const int ry = int(threadIdx.x) / 16, cx = int(threadIdx.x) % 16;
  for (int t = 0; t < tiles; ++t) {
    const bool is_prefix = t < prefix_tiles;
    const int j0 = (is_prefix ? t : t - prefix_tiles) * N;
    const int loaded = min((is_prefix ? p.prefix_len : context_keys) - j0, N);
    const HeadStrides& ks = is_prefix ? p.spk : p.sk;
    const HeadStrides& vs = is_prefix ? p.spv : p.sv;
    const T* kb = static_cast<const T*>(is_prefix ? p.prefix_k : p.k) +
                  (b * ks.batch + kvh * ks.head + j0 * ks.seq);
    const T* vb = static_cast<const T*>(is_prefix ? p.prefix_v : p.v) +
                  (b * vs.batch + kvh * vs.head + j0 * vs.seq);
    __syncthreads();  // the previous tile's K and dS (and the first time, Q's stores) are done
    load_rows<T, N, D>(sk, kb, ks.seq, loaded);
    load_rows<T, N, D>(sv, vb, vs.seq, loaded);
    __syncthreads();
    auto visible = [&](int i, int j) {
      if (j >= loaded) return false;
      return is_prefix || j0 + j < context_limit(i0 + i, len, p.q_len, causal);
    };
    score_grads<D, M, N>(sq, sdo, sk, sv, s_lse2, s_delta, p.scale_log2, visible, nullptr, sds);
    __syncthreads();
    // dq_i += Σ_j ds_ij·k_j (τ at the end).
    for (int j = 0; j < loaded; ++j) {
      float kr[D / 16];
#pragma unroll
      for (int u = 0; u < D / 16; ++u) kr[u] = sk[j * P + cx + 16 * u];
#pragma unroll
      for (int w = 0; w < M / 8; ++w) {
        const float ds = sds[(ry + 8 * w) * N + j];
#pragma unroll
        for (int u = 0; u < D / 16; ++u) dq[w][u] = fmaf(ds, kr[u], dq[w][u]);
      }
    }
  }

  T* const out = static_cast<T*>(p.dq) + (b * p.sdq.batch + h * p.sdq.head);
#pragma unroll
  for (int w = 0; w < M / 8; ++w) {
    const int i = ry + 8 * w;
    if (i >= rows) continue;
#pragma unroll
    for (int u = 0; u < D / 16; ++u)
      out[int64_t(i0 + i) * p.sdq.seq + cx + 16 * u] = from_float<T>(dq[w][u] * p.scale);
  }
}

// ---------------------------------------------------------------------------------------
// The LSE merge's backward, one warp per row (the merge's own row mapping).

PK_INLINE float sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

template <typename T>
__device__ void lse_merge_backward(const LseMergeBackwardParams& p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int64_t bh = row / p.len;
  const int64_t i = row % p.len, b = bh / p.heads, h = bh % p.heads;
  auto at = [&](const HeadStrides& s) { return b * s.batch + h * s.head + i * s.seq; };
  const float lp = p.lse_prefix[row], lc = p.lse_context[row];
  const float lambda = lp == kNegInf ? 0.0f : lc == kNegInf ? 1.0f : sigmoid(lp - lc);
  const bool both_empty = lp == kNegInf && lc == kNegInf;
  const float wp = both_empty ? 0.0f : lambda, wc = both_empty ? 0.0f : 1.0f - lambda;
  const T* g = static_cast<const T*>(p.dout) + at(p.sdo);
  T* dp = static_cast<T*>(p.do_prefix) + at(p.sdp);
  T* dc = static_cast<T*>(p.do_context) + at(p.sdc);
  // Only a mixed row reads both outputs (an empty state's output may be garbage).
  const bool mixed = lambda > 0.0f && lambda < 1.0f;
  const T* op = static_cast<const T*>(p.o_prefix) + at(p.sp);
  const T* oc = static_cast<const T*>(p.o_context) + at(p.sc);
  float diff = 0.0f;
  for (int c = lane; c < p.dim; c += 32) {
    const float gc = to_float(g[c]);
    if (mixed) diff = fmaf(gc, to_float(op[c]) - to_float(oc[c]), diff);
    dp[c] = from_float<T>(wp * gc);
    dc[c] = from_float<T>(wc * gc);
  }
  diff = warp_sum(diff);
  if (lane == 0) {
    const float dl = mixed ? lambda * (1.0f - lambda) * diff : 0.0f;
    p.dlse_prefix[row] = dl;
    p.dlse_context[row] = -dl;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The kernels, one line per instantiation.

PK_KERNEL_BOUNDS(lse_merge_backward_f32, lse_merge_backward<float>, LseMergeBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(lse_merge_backward_f16, lse_merge_backward<__half>, LseMergeBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(lse_merge_backward_bf16, lse_merge_backward<__nv_bfloat16>, LseMergeBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dot_f32, backward_dot<float>, PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dot_f16, backward_dot<__half>, PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dot_bf16, backward_dot<__nv_bfloat16>, PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f32_d32, (backward_dkv<float, 32>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f32_d64, (backward_dkv<float, 64>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f32_d80, (backward_dkv<float, 80>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f32_d96, (backward_dkv<float, 96>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f32_d128, (backward_dkv<float, 128>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f32_d256, (backward_dkv<float, 256>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f32_d32, (backward_dq<float, 32>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f32_d64, (backward_dq<float, 64>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f32_d80, (backward_dq<float, 80>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f32_d96, (backward_dq<float, 96>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f32_d128, (backward_dq<float, 128>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f32_d256, (backward_dq<float, 256>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f16_d32, (backward_dkv<__half, 32>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f16_d64, (backward_dkv<__half, 64>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f16_d80, (backward_dkv<__half, 80>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f16_d96, (backward_dkv<__half, 96>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f16_d128, (backward_dkv<__half, 128>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_f16_d256, (backward_dkv<__half, 256>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f16_d32, (backward_dq<__half, 32>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f16_d64, (backward_dq<__half, 64>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f16_d80, (backward_dq<__half, 80>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f16_d96, (backward_dq<__half, 96>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f16_d128, (backward_dq<__half, 128>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_f16_d256, (backward_dq<__half, 256>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_bf16_d32, (backward_dkv<__nv_bfloat16, 32>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_bf16_d64, (backward_dkv<__nv_bfloat16, 64>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_bf16_d80, (backward_dkv<__nv_bfloat16, 80>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_bf16_d96, (backward_dkv<__nv_bfloat16, 96>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_bf16_d128, (backward_dkv<__nv_bfloat16, 128>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dkv_bf16_d256, (backward_dkv<__nv_bfloat16, 256>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_bf16_d32, (backward_dq<__nv_bfloat16, 32>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_bf16_d64, (backward_dq<__nv_bfloat16, 64>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_bf16_d80, (backward_dq<__nv_bfloat16, 80>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_bf16_d96, (backward_dq<__nv_bfloat16, 96>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_bf16_d128, (backward_dq<__nv_bfloat16, 128>), PrefixAttentionBackwardParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_backward_dq_bf16_d256, (backward_dq<__nv_bfloat16, 256>), PrefixAttentionBackwardParams, kThreads, 1)
