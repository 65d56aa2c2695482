// prefix_attention.cu — prefix tuning's gated attention, fused (UNIFIED-VIEW.md, "Prefix
// tuning as gating"), and the pieces a user needs to pair our prefix part with their own
// attention. The host side (validation, kernel choice, geometry) is src/plan/prefix_attention.rs;
// the math every kernel must match is src/reference/attention.rs.
//
// Per query row q of head h (KV head h / group, grouped-query attention), with l learned prefix
// vectors P_k, P_v and a masked context K_c, V_c:
//
//     out = (1 − λ)·Attn(q, K_c, V_c) + λ·Attn(q, P_k, P_v),    λ = sigmoid(LSE_p − LSE_c)
//
// The identity of UNIFIED-VIEW.md says this IS softmax attention over the concatenation [P; C],
// so one flash-style online softmax (running max m, running sum l, rescaled accumulator O) that
// visits the prefix tiles first and then the context tiles computes `out` exactly, with no
// concatenation in memory and no second pass. The gate comes for free: the state (m_p, l_p)
// right after the last prefix tile gives LSE_p, and at the end
//
//     λ = exp(LSE_p − LSE) = l_p·2^(m_p − m) / l          (m_p ≤ m: no overflow, no cancellation)
//
// which never subtracts exponentials (sigmoid(LSE_p − LSE_c) would need LSE_c on its own, and
// 1 − λ computed from two nearly equal masses loses every digit). Masking is the reference's:
// every query sees every prefix key; context key j of sequence b is visible to query i iff
// j < len[b] (context_lens, padding beyond) and, when causal, j ≤ i + len[b] − Lq (bottom-right
// aligned). A row that sees nothing has output 0, LSE −∞ and λ = 0; one that sees only the
// prefix has λ = 1 exactly. Scores are exponentiated base 2 with scale·log2(e) folded in.
//
// Kernels:
//   prefix_attention_{f16,bf16}_d{32,64,80,96,128,256}   tensor cores (mma.sync m16n8k16, f32
//       accumulate), the flash-attention-2 forward structure:
//       - a block is 4 warps × 16 query rows = 64 queries of one (batch, head) (of one KV
//         group's heads when packed, below); the grid is (query tiles, Hq / pack, B × runs),
//         query tiles in reverse so that the longest causal tiles start first;
//       - Q (64 × D) is loaded once with cp.async; for D ≤ 128 each warp keeps its A fragments
//         in registers, for D = 256 it re-reads them from shared memory by ldmatrix per tile
//         (holding them would cost 64 more registers beside the 128 of the accumulator);
//       - keys go in tiles of 64 (32 for D = 256, for shared memory: 5 tiles of 64 × 264 would
//         overflow the A100's 163 KiB), K and V double-buffered with cp.async: the copy of tile
//         t+1 is in flight while the warps compute tile t;
//       - S = Q·Kᵀ: A from Q, B fragments by ldmatrix (non-transposed) on K's rows, which are
//         B stored n × k; P·V: the S accumulator fragment, exponentiated and rounded to 16
//         bits, is re-packed in registers as the A fragment of the next mma (the C layout of
//         two adjacent n-tiles is exactly the A layout of one k-slab), and V's B fragments come
//         from ldmatrix .trans on V's rows (B stored k × n);
//       - shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses of an
//         ldmatrix phase then fall in 8 distinct groups of 4 banks, conflict-free without a
//         swizzle; the padding is never read;
//       - the output goes through the warp's own rows of the Q tile in shared memory to
//         16-byte coalesced stores.
//       Needs 16-byte aligned tensors with strides that are multiples of 8 elements.
//       Shared memory: (64 + 4·kKeys)·(D + 8)·2 bytes: 85 KiB at D = 128, two blocks per SM
//       on an H100 (where 220 registers a thread allow two as well), one on an A100 (164 KiB);
//       an FA2-style ping-pong of single K and V buffers (51 KiB) would fit two there too, at
//       half the time for each copy to land. Not yet measured on a GPU.
//   prefix_attention_f32_d{...}   CUDA cores, f32 throughout (the f32 contract is 1e-5: no
//       TF32). Same blocks of 64 queries and 128 threads, tiles of 32 keys: thread (ty, tx)
//       of a 16 × 8 grid owns query rows ty + 16r (r < 4), scores of keys tx + 8c (c < 4) and
//       output columns 2tx + 16c' (pairs). Plain synchronous loads (any alignment); rows
//       padded by 4 floats so that the 16-byte shared reads of 8 lanes hit 32 distinct banks.
//       Packing and split-KV (below) as the tensor-core kernels, from the same block geometry
//       (AttentionBlock) and the same plan; a run's state goes to the workspace in the same
//       layout, each thread writing its column pairs of its 4 rows and lane tx = 0 of a row
//       the row's statistics.
//   Prefix-only attention (out_p, LSE_p) is the same kernel with no context (Lk = 0), plain
//   attention the same kernel with l = 0.
//   Multi-tenant prefixes (serving many prefix-tuned fine-tunes in one batch) are the same
//   kernels too: with prefix_ids, each block looks up its sequence's prefix once, before the
//   tile loop (KeyTiles::select_prefix: a row range of a packed set through an offsets
//   table), and from then on everything is per block already (the prefix tile count, masks,
//   the prefix snapshot for λ, split-KV runs), so the shared and per-sequence cases keep
//   their code path at the cost of one null test per block. A sequence with no prefix
//   (id −1) is plain attention with λ = 0. Rejected: one launch per prefix (a launch per
//   tenant, and a batch's context no longer one tensor); padding every prefix to the
//   longest (wasted tiles, and λ would need a mask anyway).
//   GQA packing, every attention kernel: when a KV group's g query heads × Lq queries fit the
//   block's 64 rows (decoding: Lq = 1), one block takes the whole group, so the group's keys
//   and values are loaded and multiplied once instead of g times; row ρ is query ρ mod Lq of
//   head h + ρ / Lq, the rows one stride apart (the head stride when Lq = 1; else the plan
//   requires Lq rows per head) and the masks per query.
//   Split-KV (flash-decoding), every attention kernel: a grid of fewer than 128 blocks
//   (decoding: Lq = 1, few sequences and heads) over long keys would leave most SMs idle while
//   each block walks every key tile. With the caller's workspace the plan splits the tiles
//   into runs (grid.z = B × runs, at most 32, of at least 4 of the kernel's tiles of the
//   unmasked key count; a block whose causal or ragged mask leaves fewer tiles has shorter or
//   empty runs); a run ends with its unnormalised state (O relative to 2^m, m, l, and m_p, l_p
//   after its last prefix tile) in the workspace, and prefix_attention_split_merge_{f32,f16,
//   bf16} combines the runs of a row into what the single pass would have finished it with
//   (the same math, not the same rounding): output, LSE and λ.
//   lse_merge_{f32,f16,bf16}   two attention states (o, LSE) of the same rows merged into the
//       gated output, LSE = logaddexp and λ: one warp per row.
//   kv_concat_{f32,f16,bf16}   [P; C] along the sequence, the copy the unfused path makes (the
//       benchmarks' baseline): one warp per output row.
//
// Rejected alternatives: materialising [P; C] (a copy of K and V per layer and step, the
// baseline); two attention passes and a merge (Q read twice, two outputs written and read
// back); 128 queries per block (two m-tiles per warp: 128 accumulator registers at D = 128,
// and half the blocks for short sequences); a separate LSE_c for λ (see above); wgmma/TMA on
// Hopper for now (mma.sync serves sm_80 and sm_90 from one source; delta_linear's wgmma path
// in arch.cuh is the template once it has been run and measured on a GPU).
#include <limits>

#include "common.cuh"

// Every helper has internal linkage: the emulator links all kernels/*.cu into one library,
// where two files' inline functions of the same name would silently be merged.
namespace {

// Element strides of a [batch, heads, seq, dim] tensor; the last dimension is contiguous.
struct HeadStrides {
  int64_t batch, head, seq;
};

}  // namespace

// Twin of `PrefixAttentionParams` in src/plan/prefix_attention.rs.
struct PrefixAttentionParams {
  const void* q;                  // [B, Hq, Lq, D]
  const void* k;                  // [B, Hkv, Lk, D]
  const void* v;                  // [B, Hkv, Lk, D]
  const void* prefix_k;           // [B, Hkv, l, D]
  const void* prefix_v;           // [B, Hkv, l, D]
  const uint32_t* context_lens;   // [B] valid context keys (clamped to Lk), or null: all Lk
  void* out;                      // [B, Hq, Lq, D]
  float* lse;                     // [B, Hq, Lq] contiguous, or null
  float* lambda;                  // [B, Hq, Lq] contiguous, or null
  // Split-KV (kv_splits > 1): per run, the unnormalised output [kv_splits][rows][D], then the
  // row states [kv_splits][rows][4] (m, l, m_p, l_p); see prefix_attention_split_merge.
  float* partial;
  // Multi-tenant prefixes (null: the prefix tensors above, [B, Hkv, l, D]): sequence b reads
  // prefix prefix_ids[b] of a packed set, rows [offsets[id], offsets[id + 1]) of prefix_k /
  // prefix_v seen as [rows, Hkv, D] (strides spk.seq, spk.head; spk.batch unused); −1 or an
  // id out of [0, prefixes) reads no prefix (l = 0), and so does an id whose offsets are not
  // an increasing range inside the set's prefix_rows; either sets a bit of *status (if given).
  const int32_t* prefix_ids;      // [B]
  const uint32_t* prefix_offsets; // [prefixes + 1]
  uint32_t* status;               // bit 0: an id out of range; bit 1: bad offsets; or null
  int64_t rows;                   // B·Hq·Lq
  int64_t prefix_rows;            // rows of the packed set
  HeadStrides sq, sk, sv, spk, spv, so;
  int32_t heads, group;           // Hq, Hq / Hkv
  int32_t q_len, kv_len, prefix_len;
  int32_t causal;
  int32_t kv_splits, head_dim;    // runs of key tiles (1: no split); D, for the merge
  int32_t pack;                   // query heads of a GQA group sharing one block (1: none)
  int32_t prefixes;               // prefixes in the set (with prefix_ids)
  float scale_log2;               // score scale · log2(e)
};
PK_PARAMS_SIZE(PrefixAttentionParams)

// Twin of `LseMergeParams` in src/plan/prefix_attention.rs.
struct LseMergeParams {
  const void* o_prefix;      // [B, H, L, D]
  const float* lse_prefix;   // [B, H, L] contiguous
  const void* o_context;     // [B, H, L, D]
  const float* lse_context;  // [B, H, L] contiguous
  void* out;                 // [B, H, L, D]
  float* lse;                // [B, H, L] contiguous, or null
  float* lambda;             // [B, H, L] contiguous, or null
  HeadStrides sp, sc, so;
  int64_t rows;              // B·H·L
  int32_t heads, len, dim;
};
PK_PARAMS_SIZE(LseMergeParams)

// Twin of `KvConcatParams` in src/plan/prefix_attention.rs.
struct KvConcatParams {
  const void* prefix;  // [B, H, l, D]
  const void* src;     // [B, H, L, D]
  void* dst;           // [B, H, l + L, D]
  HeadStrides sp, ss, sd;
  int64_t rows;        // B·H·(l + L)
  int32_t heads, prefix_len, len, dim;
};
PK_PARAMS_SIZE(KvConcatParams)

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;  // every kernel: 4 warps
constexpr int kQueryRows = 64;  // queries per attention block
constexpr size_t kMaxSmemSm80 = 163 * 1024;  // dynamic shared memory of an A100 block

// ---------------------------------------------------------------------------------------
// What both attention kernels share: the key tiles a block visits and their masks, the
// online-softmax update of one row, and the final statistics.

// Keys and values of one part (the prefix or the context): the tensors' bases, the element
// offsets of one (batch, KV head) and the row strides. Pointers are formed only for tiles
// that exist, so an empty part's base (null, say) is never offset.
template <typename T>
struct KeyPart {
  const T* k;
  const T* v;
  int64_t k_off, v_off, k_ld, v_ld;
};

// The key tiles of one block (one (batch, head) or packed KV group, and 64 query rows):
// ceil(l / kKeys) prefix tiles, then the context tiles holding a key that some query of the
// block sees. Packed rows are queries 0..Lq of each head, so query 0 still has the smallest
// context limit (first_limit) and query Lq − 1 the largest.
template <typename T, int kKeys>
struct KeyTiles {
  KeyPart<T> prefix, context;
  int prefix_len;
  int prefix_tiles, tiles;
  int context_keys;  // keys [0, context_keys) of the context are loaded; the rest read as 0
  int first_limit;   // the context limit of the block's first query (the smallest)
  int len, q_len;
  bool causal;

  __device__ KeyTiles(const PrefixAttentionParams& p, int b, int h, int q0) {
    const int kvh = h / p.group;
    auto off = [&](const HeadStrides& s) { return b * s.batch + kvh * s.head; };
    prefix = {static_cast<const T*>(p.prefix_k), static_cast<const T*>(p.prefix_v),
              off(p.spk), off(p.spv), p.spk.seq, p.spv.seq};
    context = {static_cast<const T*>(p.k), static_cast<const T*>(p.v), off(p.sk), off(p.sv),
               p.sk.seq, p.sv.seq};
    prefix_len = p.prefix_len;
    if (p.prefix_ids) select_prefix(p, b, kvh);
    // A length beyond Lk cannot be checked on the host without a device read: clamp it, so
    // that a bad one never reads out of bounds.
    len = p.context_lens ? int(min(p.context_lens[b], uint32_t(p.kv_len))) : p.kv_len;
    q_len = p.q_len;
    causal = p.causal != 0;
    const int last = min(q0 + kQueryRows, q_len) - 1;
    context_keys = context_limit(last);
    first_limit = context_limit(q0);
    prefix_tiles = ceil_div(prefix_len, kKeys);
    tiles = prefix_tiles + ceil_div(context_keys, kKeys);
  }

  // Multi-tenant prefixes: this sequence's prefix from the set (see PrefixAttentionParams),
  // or none. The ids and offsets live on the device, unchecked: anything outside the set
  // reads no prefix and reports it in *status, never out of bounds.
  __device__ void select_prefix(const PrefixAttentionParams& p, int b, int kvh) {
    const int32_t id = p.prefix_ids[b];
    uint32_t bad = 0;
    prefix_len = 0;
    if (id >= 0 && id < p.prefixes) {
      const uint32_t lo = p.prefix_offsets[id], hi = p.prefix_offsets[id + 1];
      if (lo <= hi && int64_t(hi) <= p.prefix_rows) {
        prefix_len = int(hi - lo);
        prefix.k_off = int64_t(lo) * p.spk.seq + kvh * p.spk.head;
        prefix.v_off = int64_t(lo) * p.spv.seq + kvh * p.spv.head;
      } else {
        bad = 2;
      }
    } else if (id != -1) {
      bad = 1;
    }
    if (bad && p.status && threadIdx.x == 0) atomicOr(p.status, bad);
  }

  // Context keys [0, limit) are visible to query i (the module header's mask).
  PK_INLINE int context_limit(int i) const {
    if (!causal) return len;
    const int64_t lim = int64_t(i) + len - q_len + 1;
    return int(lim < 0 ? 0 : (lim > len ? len : lim));
  }

  PK_INLINE bool is_prefix(int t) const { return t < prefix_tiles; }
  // The first key of tile t within its part.
  PK_INLINE int first_key(int t) const { return (is_prefix(t) ? t : t - prefix_tiles) * kKeys; }
  // Keys of tile t that hold data (the rest are loaded as zeros).
  PK_INLINE int loaded(int t) const {
    return min((is_prefix(t) ? prefix_len : context_keys) - first_key(t), kKeys);
  }
  // Whether some (query, key) pair of tile t is masked: then every score is checked.
  PK_INLINE bool needs_mask(int t) const {
    return first_key(t) + kKeys > (is_prefix(t) ? prefix_len : first_limit);
  }
  // Tile t's first key and value rows, and their strides (selects, not branches: one load
  // path for both parts).
  struct Rows {
    const T* k;
    const T* v;
    int64_t k_ld, v_ld;
  };
  PK_INLINE Rows rows(int t) const {
    const KeyPart<T>& part = is_prefix(t) ? prefix : context;
    const int64_t j0 = first_key(t);
    return {part.k + (part.k_off + j0 * part.k_ld), part.v + (part.v_off + j0 * part.v_ld),
            part.k_ld, part.v_ld};
  }
};

// The sum or max over the `kLanes` consecutive lanes that share a row (a power of two).
template <int kLanes>
PK_INLINE float row_sum(float v) {
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) v += __shfl_xor_sync(PK_FULL_MASK, v, o);
  return v;
}
template <int kLanes>
PK_INLINE float row_max(float v) {
#pragma unroll
  for (int o = 1; o < kLanes; o <<= 1) v = fmaxf(v, __shfl_xor_sync(PK_FULL_MASK, v, o));
  return v;
}

// One query row's online-softmax state, this thread's share: m is the row's running max of
// score·scale·log2(e) (the same in every lane of the row), l this thread's part of the running
// sum of 2^(x − m); (m_p, l_p) the same right after the prefix tiles.
struct RowState {
  float m = kNegInf, l = 0.0f, m_p = kNegInf, l_p = 0.0f;

  // Starts a tile whose largest scaled score in the row is `tile_max` (already reduced over
  // the row's lanes): returns the factor the accumulator and l are rescaled by and sets
  // `base`, the exponent the tile's scores are shifted by. A row with nothing visible yet
  // keeps m = −∞ and shifts by 0, so that −∞ − −∞ never makes a NaN.
  PK_INLINE float update(float tile_max, float& base) {
    const float m_new = fmaxf(m, tile_max);
    base = m_new == kNegInf ? 0.0f : m_new;
    const float alpha = exp2f(m - base);
    m = m_new;
    l *= alpha;
    return alpha;
  }

  PK_INLINE void snapshot_prefix() {
    m_p = m;
    l_p = l;
  }
};

// The end of a row: `l` and `l_p` reduced over the row's lanes. Returns 1 / l (0 for a row
// that saw nothing) and the row's LSE and λ.
struct RowStats {
  float inv, lse, lambda;
};
PK_INLINE RowStats finish_row(const RowState& s, float l, float l_p) {
  if (l == 0.0f) return {0.0f, kNegInf, 0.0f};
  const float lambda = l_p > 0.0f ? fminf(l_p * exp2f(s.m_p - s.m) / l, 1.0f) : 0.0f;
  return {1.0f / l, (s.m + log2f(l)) * kLn2, lambda};
}

PK_INLINE void store_stats(const PrefixAttentionParams& p, int64_t row_base, int i,
                           const RowStats& st) {
  if (p.lse) p.lse[row_base + i] = st.lse;
  if (p.lambda) p.lambda[row_base + i] = st.lambda;
}

// Split-KV: where a run leaves the state of its block's rows for prefix_attention_split_merge,
// [runs][B·Hq·Lq][D] unnormalised outputs (O relative to 2^m), then [runs][B·Hq·Lq][4] row
// states (m, l, m_p, l_p, with l and l_p summed over the row's lanes).
struct RunState {
  float* o;      // block row i's output at o + i·D
  float* stats;  // block row i's state at stats + 4i

  PK_INLINE void store(int i, const RowState& s, float l, float l_p) const {
    float* const st = stats + int64_t(i) * 4;
    st[0] = s.m;
    st[1] = l;
    st[2] = s.m_p;
    st[3] = l_p;
  }
};

// What one block of either attention kernel computes. The grid is (query tiles, Hq / pack,
// B × runs), query tiles in reverse so that the longest causal tiles start first. A block
// takes 64 rows of one (batch, head), or with GQA packing (p.pack > 1, small Lq) the Lq
// queries of `pack` consecutive heads of one KV group: row ρ is query ρ mod Lq of head
// h + ρ / Lq. Packed rows lie one stride apart in Q and the output (the head stride when
// Lq = 1, else the row stride, which the plan checks is Lq rows per head) and consecutively in
// the statistics and the workspace. With split-KV (p.kv_splits > 1) the block visits only its
// run of the key tiles and leaves an unnormalised state (run_state) instead of the output.
template <typename T, int kKeys>
struct AttentionBlock {
  int q0;      // the block's first row
  int pack;    // heads per block
  int splits;  // runs the key tiles are split into (1: no split)
  int b, split, h;
  KeyTiles<T, kKeys> kt;
  int rows;            // Lq · pack rows of the block's heads (q0 + 64 may pass them)
  int64_t q_ld, o_ld;  // the stride between consecutive rows in Q and in the output
  int t_begin, t_end;  // the run's key tiles
  int last_prefix;     // the run's last prefix tile, where the prefix state is taken

  __device__ explicit AttentionBlock(const PrefixAttentionParams& p)
      : q0(int(gridDim.x - 1 - blockIdx.x) * kQueryRows),
        pack(p.pack > 1 ? p.pack : 1),
        splits(p.kv_splits > 1 ? p.kv_splits : 1),
        b(splits > 1 ? int(blockIdx.z) / splits : int(blockIdx.z)),  // no division unless split
        split(int(blockIdx.z) - b * splits),
        h(int(blockIdx.y) * pack),
        kt(p, b, h, q0) {
    rows = p.q_len * pack;
    const bool by_head = pack > 1 && p.q_len == 1;
    q_ld = by_head ? p.sq.head : p.sq.seq;
    o_ld = by_head ? p.so.head : p.so.seq;
    const int per = ceil_div(kt.tiles, splits);
    t_begin = min(split * per, kt.tiles);
    t_end = min(t_begin + per, kt.tiles);
    // A run that lies wholly inside the prefix snapshots after its own last tile; one that
    // starts in the context never does (its m_p = −∞, l_p = 0 weigh nothing in the merge).
    last_prefix = min(kt.prefix_tiles, t_end) - 1;
  }

  // The query index of block row `row` (no division unless packed).
  PK_INLINE int query(int row) const { return pack > 1 ? row % kt.q_len : row; }
  // Block row 0 of Q; row i is i·q_ld further.
  PK_INLINE const T* q(const PrefixAttentionParams& p) const {
    return static_cast<const T*>(p.q) + b * p.sq.batch + h * p.sq.head + q0 * q_ld;
  }
  // Row 0 of the block's first head in the output; block row i is i·o_ld further.
  PK_INLINE T* out(const PrefixAttentionParams& p) const {
    return static_cast<T*>(p.out) + b * p.so.batch + h * p.so.head;
  }
  // The statistics index of row 0 of the block's first head; block row i is i further.
  PK_INLINE int64_t row_base(const PrefixAttentionParams& p) const {
    return (int64_t(b) * p.heads + h) * p.q_len;
  }
  template <int D>
  PK_INLINE RunState run_state(const PrefixAttentionParams& p) const {
    const int64_t base = row_base(p);
    return {p.partial + (split * p.rows + base) * D,
            p.partial + splits * p.rows * D + (split * p.rows + base) * 4};
  }
};

// ---------------------------------------------------------------------------------------
// Tensor-core attention (f16, bf16).

template <int D>
struct MmaTile {
  static_assert(D % 16 == 0 && D >= 32 && D <= 256, "head dim: a multiple of 16 in [32, 256]");
  static constexpr int kKeys = D <= 128 ? 64 : 32;  // keys per tile
  static constexpr int kPitch = D + 8;              // shared row pitch, elements
  static constexpr bool kQInRegs = D <= 128;
  // Q tile, then K and V, two stages each; src/plan/prefix_attention.rs computes the same.
  static constexpr int kSmemElems = (kQueryRows + 4 * kKeys) * kPitch;
};

__host__ __device__ constexpr int next_pow2(int n) { return n <= 1 ? 1 : 2 * next_pow2((n + 1) / 2); }

// Copies rows [0, loaded) of a kRows × D tile (row stride ld) into shared memory (pitch D + 8)
// with cp.async, zero-filling rows [loaded, kRows). The block works as kColThreads (D / 8
// rounded up to a power of two; the extra threads idle at D = 80, 96) × kRowStep threads, so
// that a thread's 16-byte chunks are one column a fixed row step apart: one address and a
// stride per thread, not an address per chunk (which cost 40 registers at D = 128).
template <typename T, int kRows, int D>
PK_INLINE void load_tile_async(T* dst, const T* src, int64_t ld, int loaded) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kColThreads = next_pow2(kChunksPerRow);
  constexpr int kRowStep = kThreads / kColThreads;
  static_assert(kRows % kRowStep == 0, "tile rows must spread evenly over the block");
  const int col = threadIdx.x % kColThreads, row = threadIdx.x / kColThreads;
  if (col >= kChunksPerRow) return;
  const T* g = src + row * ld + col * 8;
  T* s = dst + row * (D + 8) + col * 8;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const bool inside = row + i * kRowStep < loaded;
    cp_async_16_zfill(s + i * kRowStep * (D + 8), inside ? g + i * kRowStep * ld : src,
                      inside ? 16 : 0);
  }
}

template <typename T, int D>
__device__ void prefix_attention_mma(const PrefixAttentionParams& p) {
  using Tile = MmaTile<D>;
  constexpr int N = Tile::kKeys, P = Tile::kPitch;
  static_assert(Tile::kSmemElems * sizeof(T) <= kMaxSmemSm80, "tiles overflow sm_80's shared memory");
  PK_DYNAMIC_SMEM(uint8_t, smem_bytes);
  T* const sq = reinterpret_cast<T*>(smem_bytes);
  T* const sk = sq + kQueryRows * P;  // [2][N][P]
  T* const sv = sk + 2 * N * P;       // [2][N][P]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t4 = lane % 4;
  const AttentionBlock<T, N> blk(p);
  const KeyTiles<T, N>& kt = blk.kt;
  const int q0 = blk.q0, t_begin = blk.t_begin, t_end = blk.t_end;

  auto load_keys = [&](int t) {
    const auto src = kt.rows(t);
    const int stage = t & 1, n = kt.loaded(t);
    load_tile_async<T, N, D>(sk + stage * N * P, src.k, src.k_ld, n);
    load_tile_async<T, N, D>(sv + stage * N * P, src.v, src.v_ld, n);
  };

  load_tile_async<T, kQueryRows, D>(sq, blk.q(p), blk.q_ld, min(kQueryRows, blk.rows - q0));
  if (t_begin < t_end) load_keys(t_begin);
  cp_async_commit();

  // This warp's rows g and g + 8 of its 16: query index, context limit.
  const int row0 = q0 + warp * 16 + g;
  const int ctx_limit[2] = {kt.context_limit(blk.query(row0)),
                            kt.context_limit(blk.query(row0 + 8))};
  const bool warp_active = q0 + warp * 16 < blk.rows;
  const float c = p.scale_log2;

  float o[D / 8][4] = {};  // the warp's 16 × D output, C-fragment layout per 8 columns
  RowState rs[2];
  uint32_t qf[Tile::kQInRegs ? D / 16 : 1][4];
  const T* q_row = sq + (warp * 16 + (lane & 15)) * P + (lane >> 4) * 8;  // ldmatrix A rows

  for (int t = t_begin; t < t_end; ++t) {
    if (t + 1 < t_end) load_keys(t + 1);
    // Committed even when empty, so that "all but the newest group" is always tile t.
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_s = sk + (t & 1) * N * P;
    const T* v_s = sv + (t & 1) * N * P;
    if constexpr (Tile::kQInRegs) {
      if (t == t_begin) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], q_row + kk * 16);
      }
    }
    if (warp_active) {
      // S = Q·Kᵀ, 16 × N per warp: B fragments of two key n-tiles per ldmatrix.x4, the
      // matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15).
      float s[N / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        if constexpr (Tile::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = qf[kk][i];
        } else {
          ldmatrix_x4(a, q_row + kk * 16);
        }
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
          uint32_t r[4];
          ldmatrix_x4(r, k_s + (np * 16 + (lane & 7) + (lane >> 4) * 8) * P + kk * 16 +
                             ((lane >> 3) & 1) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma_m16n8k16<T>(s[2 * np], a, b0, s[2 * np]);
          mma_m16n8k16<T>(s[2 * np + 1], a, b1, s[2 * np + 1]);
        }
      }
      if (kt.needs_mask(t)) {
        const int j0 = kt.first_key(t);
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int j = j0 + nt * 8 + 2 * t4 + (i & 1);
            const int limit = kt.is_prefix(t) ? kt.prefix_len : ctx_limit[i / 2];
            if (j >= limit) s[nt][i] = kNegInf;
          }
      }
      // Online softmax, rows g (elements 0, 1) and g + 8 (elements 2, 3); a row's 4 lanes
      // are a quad.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        float base;
        const float alpha = rs[r].update(row_max<4>(mx) * c, base);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[dt][2 * r] *= alpha;
          o[dt][2 * r + 1] *= alpha;
        }
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = exp2f(fmaf(s[nt][2 * r + e], c, -base));
            s[nt][2 * r + e] = pe;
            rs[r].l += pe;
          }
      }
      // O += P·V. The accumulators of key n-tiles 2ks and 2ks + 1 are the A fragment of key
      // slab ks: a0 = (g, 2t4..), a1 = (g + 8, 2t4..), a2 = (g, 8 + 2t4..), a3 = (g + 8, 8 + 2t4..).
      // V's B fragments: ldmatrix .trans over 16 keys × 16 columns, two d n-tiles.
#pragma unroll
      for (int ks = 0; ks < N / 16; ++ks) {
        const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]),
                               pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                               pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                               pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, v_s + (ks * 16 + (lane & 15)) * P + dp * 16 + (lane >> 4) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          mma_m16n8k16<T>(o[2 * dp], a, b0, o[2 * dp]);
          mma_m16n8k16<T>(o[2 * dp + 1], a, b1, o[2 * dp + 1]);
        }
      }
    }
    // The prefix state after the run's last prefix tile (a run inside the prefix: its last).
    if (t == blk.last_prefix) {
      rs[0].snapshot_prefix();
      rs[1].snapshot_prefix();
    }
    // Every warp is done with this stage before iteration t + 1 refills it.
    __syncthreads();
  }
  // The Q tile's copies (the only ones when there is no tile) land before its rows are
  // reused for the output.
  cp_async_wait<0>();
  __syncthreads();

  if (blk.splits > 1) {
    // The run's state: O unnormalised, as the C fragments hold it, and each row's statistics.
    const RunState run = blk.template run_state<D>(p);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = row_sum<4>(rs[r].l), l_p = row_sum<4>(rs[r].l_p);
      const int qi = row0 + 8 * r;
      if (qi >= blk.rows) continue;
      float* const o_row = run.o + int64_t(qi) * D + 2 * t4;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o_row[dt * 8] = o[dt][2 * r];
        o_row[dt * 8 + 1] = o[dt][2 * r + 1];
      }
      if (t4 == 0) run.store(qi, rs[r], l, l_p);
    }
    return;
  }

  // Normalise, stage the warp's 16 rows in its own rows of the Q tile, store 16 bytes a lane.
  T* const stage = sq + warp * 16 * P;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const RowStats st = finish_row(rs[r], row_sum<4>(rs[r].l), row_sum<4>(rs[r].l_p));
    const int row = g + 8 * r;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t pair = pack2<T>(o[dt][2 * r] * st.inv, o[dt][2 * r + 1] * st.inv);
      *reinterpret_cast<uint32_t*>(stage + row * P + dt * 8 + 2 * t4) = pair;
    }
    if (t4 == 0 && row0 + 8 * r < blk.rows) store_stats(p, blk.row_base(p), row0 + 8 * r, st);
  }
  __syncwarp();
  T* const out = blk.out(p);
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
    const int chunk = lane + 32 * i;
    const int row = chunk / kChunksPerRow, col = chunk % kChunksPerRow * 8;
    const int qi = q0 + warp * 16 + row;
    if (qi < blk.rows)
      store_vec(out + qi * blk.o_ld + col, load_vec<T, 8>(stage + row * P + col));
  }
}

// ---------------------------------------------------------------------------------------
// SIMT attention (f32; any element type would do).

template <int D>
struct SimtTile {
  static_assert(D % 16 == 0 && D >= 32 && D <= 256, "head dim: a multiple of 16 in [32, 256]");
  static constexpr int kKeys = 32;
  static constexpr int kPitch = D + 4;       // Q, K, V rows, floats
  static constexpr int kPPitch = kKeys + 4;  // P rows, floats
  // Q, K, V tiles and P; src/plan/prefix_attention.rs computes the same.
  static constexpr int kSmemFloats = (kQueryRows + 2 * kKeys) * kPitch + kQueryRows * kPPitch;
};

// Loads rows [0, loaded) of a kRows × D tile (row stride ld) into shared memory as f32,
// zero-filling rows [loaded, kRows). Consecutive threads take consecutive elements.
template <typename T, int kRows, int D>
PK_INLINE void load_tile_f32(float* dst, const T* src, int64_t ld, int loaded) {
  static_assert(kRows * D % kThreads == 0);
#pragma unroll 8
  for (int i = 0; i < kRows * D / kThreads; ++i) {
    const int e = int(threadIdx.x) + i * kThreads;
    const int r = e / D, col = e % D;
    dst[r * (D + 4) + col] = r < loaded ? to_float(src[r * ld + col]) : 0.0f;
  }
}

template <typename T, int D>
__device__ void prefix_attention_simt(const PrefixAttentionParams& p) {
  using Tile = SimtTile<D>;
  constexpr int N = Tile::kKeys, P = Tile::kPitch, PP = Tile::kPPitch;
  static_assert(Tile::kSmemFloats * sizeof(float) <= kMaxSmemSm80,
                "tiles overflow sm_80's shared memory");
  constexpr int kCols = D / 16;  // output column pairs per thread
  PK_DYNAMIC_SMEM(float, smem_f32);
  float* const sq = smem_f32;
  float* const sk = sq + kQueryRows * P;
  float* const sv = sk + N * P;
  float* const sp = sv + N * P;  // [64][PP]

  const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
  const AttentionBlock<T, N> blk(p);
  const KeyTiles<T, N>& kt = blk.kt;
  const int q0 = blk.q0;
  load_tile_f32<T, kQueryRows, D>(sq, blk.q(p), blk.q_ld, min(kQueryRows, blk.rows - q0));

  int ctx_limit[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) ctx_limit[r] = kt.context_limit(blk.query(q0 + ty + 16 * r));
  const float c = p.scale_log2;

  float o[4][kCols][2] = {};
  RowState rs[4];
  for (int t = blk.t_begin; t < blk.t_end; ++t) {
    // The previous tile's K, V (and the first time, Q's stores) are done with.
    __syncthreads();
    const auto src = kt.rows(t);
    const int j0 = kt.first_key(t), n = kt.loaded(t);
    load_tile_f32<T, N, D>(sk, src.k, src.k_ld, n);
    load_tile_f32<T, N, D>(sv, src.v, src.v_ld, n);
    __syncthreads();

    float s[4][4] = {};  // rows ty + 16r, keys tx + 8c
#pragma unroll 4
    for (int k = 0; k < D; k += 4) {
      float4 qv[4], kv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) qv[r] = *reinterpret_cast<const float4*>(sq + (ty + 16 * r) * P + k);
#pragma unroll
      for (int cc = 0; cc < 4; ++cc)
        kv[cc] = *reinterpret_cast<const float4*>(sk + (tx + 8 * cc) * P + k);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          float acc = s[r][cc];
          acc = fmaf(qv[r].x, kv[cc].x, acc);
          acc = fmaf(qv[r].y, kv[cc].y, acc);
          acc = fmaf(qv[r].z, kv[cc].z, acc);
          s[r][cc] = fmaf(qv[r].w, kv[cc].w, acc);
        }
    }
    if (kt.needs_mask(t)) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int limit = kt.is_prefix(t) ? kt.prefix_len : ctx_limit[r];
          if (j0 + tx + 8 * cc >= limit) s[r][cc] = kNegInf;
        }
    }
    // Online softmax; a row's 8 lanes are consecutive. P goes to the rows of shared memory
    // that only this warp reads.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float mx = fmaxf(fmaxf(s[r][0], s[r][1]), fmaxf(s[r][2], s[r][3]));
      float base;
      const float alpha = rs[r].update(row_max<8>(mx) * c, base);
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) {
        o[r][cc][0] *= alpha;
        o[r][cc][1] *= alpha;
      }
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const float pe = exp2f(fmaf(s[r][cc], c, -base));
        rs[r].l += pe;
        sp[(ty + 16 * r) * PP + tx + 8 * cc] = pe;
      }
    }
    __syncwarp();
    // O += P·V: per 4 keys, one 16-byte read of P per row and 8-byte reads of V.
#pragma unroll 2
    for (int j = 0; j < N; j += 4) {
      float4 pr[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) pr[r] = *reinterpret_cast<const float4*>(sp + (ty + 16 * r) * PP + j);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float* v_row = sv + (j + jj) * P + 2 * tx;
#pragma unroll
        for (int cc = 0; cc < kCols; ++cc) {
          const float2 vv = *reinterpret_cast<const float2*>(v_row + 16 * cc);
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float pj = jj == 0 ? pr[r].x : jj == 1 ? pr[r].y : jj == 2 ? pr[r].z : pr[r].w;
            o[r][cc][0] = fmaf(pj, vv.x, o[r][cc][0]);
            o[r][cc][1] = fmaf(pj, vv.y, o[r][cc][1]);
          }
        }
      }
    }
    // The prefix state after the run's last prefix tile (a run inside the prefix: its last).
    if (t == blk.last_prefix)
#pragma unroll
      for (int r = 0; r < 4; ++r) rs[r].snapshot_prefix();
  }

  if (blk.splits > 1) {
    // The run's state: O unnormalised, this thread's column pairs of its 4 rows, and each
    // row's statistics (l, l_p summed over the row's 8 lanes) from the row's lane tx = 0.
    const RunState run = blk.template run_state<D>(p);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float l = row_sum<8>(rs[r].l), l_p = row_sum<8>(rs[r].l_p);
      const int qi = q0 + ty + 16 * r;
      if (qi >= blk.rows) continue;
      float* const o_row = run.o + int64_t(qi) * D + 2 * tx;
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) {
        o_row[16 * cc] = o[r][cc][0];
        o_row[16 * cc + 1] = o[r][cc][1];
      }
      if (tx == 0) run.store(qi, rs[r], l, l_p);
    }
    return;
  }

  T* const out = blk.out(p);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const RowStats st = finish_row(rs[r], row_sum<8>(rs[r].l), row_sum<8>(rs[r].l_p));
    const int qi = q0 + ty + 16 * r;
    if (qi >= blk.rows) continue;
    T* const row = out + qi * blk.o_ld + 2 * tx;
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) {
      row[16 * cc] = from_float<T>(o[r][cc][0] * st.inv);
      row[16 * cc + 1] = from_float<T>(o[r][cc][1] * st.inv);
    }
    if (tx == 0) store_stats(p, blk.row_base(p), qi, st);
  }
}

// ---------------------------------------------------------------------------------------
// LSE merge: out = (1 − λ)·o_context + λ·o_prefix, λ = sigmoid(LSE_p − LSE_c),
// LSE = logaddexp(LSE_p, LSE_c), as src/reference/attention.rs `lse_merge` defines it: an
// empty state (LSE −∞) has weight 0 and its output is not read; two empty states give 0,
// −∞, 0; +∞ or NaN LSEs are not attention states and propagate. One warp per row.

PK_INLINE float sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

template <typename T>
__device__ void lse_merge(const LseMergeParams& p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int64_t bh = row / p.len;
  const int64_t i = row % p.len, bi = bh / p.heads, h = bh % p.heads;
  const float lp = p.lse_prefix[row], lc = p.lse_context[row];
  const bool both_empty = lp == kNegInf && lc == kNegInf;
  float lse = kNegInf, lambda = 0.0f;
  if (!both_empty) {
    const float diff = lp - lc;
    lse = fmaxf(lp, lc) + log1pf(expf(-fabsf(diff)));
    lambda = sigmoid(diff);
  }
  const T* op = static_cast<const T*>(p.o_prefix) + bi * p.sp.batch + h * p.sp.head + i * p.sp.seq;
  const T* oc = static_cast<const T*>(p.o_context) + bi * p.sc.batch + h * p.sc.head + i * p.sc.seq;
  T* out = static_cast<T*>(p.out) + bi * p.so.batch + h * p.so.head + i * p.so.seq;
  for (int col = lane; col < p.dim; col += 32) {
    float v;
    if (both_empty) {
      v = 0.0f;
    } else if (lambda == 0.0f) {
      v = to_float(oc[col]);
    } else if (lambda == 1.0f) {
      v = to_float(op[col]);
    } else {
      v = (1.0f - lambda) * to_float(oc[col]) + lambda * to_float(op[col]);
    }
    out[col] = from_float<T>(v);
  }
  if (lane == 0) {
    if (p.lse) p.lse[row] = lse;
    if (p.lambda) p.lambda[row] = lambda;
  }
}

// ---------------------------------------------------------------------------------------
// Split-KV merge: the runs' states of a row combined into the output, LSE and λ exactly as
// one pass would have left them (see finish_row): M = max m_s, L = Σ l_s·2^(m_s − M),
// O = Σ O_s·2^(m_s − M) / L, and the same over the runs' prefix states for λ = L_p·2^(M_p −
// M) / L. One warp per row (B·Hq·Lq rows), lane s reading run s's state (at most 32 runs).

template <typename T>
__device__ void prefix_attention_split_merge(const PrefixAttentionParams& p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int splits = p.kv_splits, d = p.head_dim;
  const float* const state = p.partial + int64_t(splits) * p.rows * d;
  float m = kNegInf, l = 0.0f, m_p = kNegInf, l_p = 0.0f;
  if (lane < splits) {
    const float* st = state + (lane * p.rows + row) * 4;
    m = st[0];
    l = st[1];
    m_p = st[2];
    l_p = st[3];
  }
  const float big_m = row_max<32>(m), big_m_p = row_max<32>(m_p);
  // A run that saw nothing (m = −∞) weighs 0, as does every run of a row that saw nothing.
  const float w = m == kNegInf ? 0.0f : exp2f(m - big_m);
  const float big_l = row_sum<32>(l * w);
  const float big_l_p = row_sum<32>(m_p == kNegInf ? 0.0f : l_p * exp2f(m_p - big_m_p));
  // The merged state, finished as one pass finishes a row (a row that sees only the prefix
  // gets λ = 1 exactly; one that sees nothing 0, LSE −∞, λ 0).
  const RowStats st = finish_row(RowState{big_m, big_l, big_m_p, big_l_p}, big_l, big_l_p);
  const int64_t qi = row % p.q_len, bh = row / p.q_len, bi = bh / p.heads, h = bh % p.heads;
  T* out = static_cast<T*>(p.out) + bi * p.so.batch + h * p.so.head + qi * p.so.seq;
  // Every lane takes every step (the shuffles name the whole warp), even where d is not a
  // multiple of 32 (d = 80, 96).
  for (int c0 = 0; c0 < d; c0 += 32) {
    const int col = c0 + lane;
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ws = __shfl_sync(PK_FULL_MASK, w, s);
      if (ws != 0.0f && col < d) v += ws * p.partial[(s * p.rows + row) * d + col];
    }
    if (col < d) out[col] = from_float<T>(v * st.inv);
  }
  if (lane == 0) store_stats(p, row, 0, st);
}

// ---------------------------------------------------------------------------------------
// [P; C] along the sequence: dst[b, h, j] = j < l ? prefix[b, h, j] : src[b, h, j − l]. One
// warp per output row.

template <typename T>
__device__ void kv_concat(const KvConcatParams& p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= p.rows) return;
  const int total = p.prefix_len + p.len;
  const int64_t bh = row / total;
  const int j = int(row % total);
  const int64_t bi = bh / p.heads, h = bh % p.heads;
  const T* from = j < p.prefix_len
                      ? static_cast<const T*>(p.prefix) + bi * p.sp.batch + h * p.sp.head +
                            j * p.sp.seq
                      : static_cast<const T*>(p.src) + bi * p.ss.batch + h * p.ss.head +
                            (j - p.prefix_len) * p.ss.seq;
  T* to = static_cast<T*>(p.dst) + bi * p.sd.batch + h * p.sd.head + j * p.sd.seq;
  for (int col = lane; col < p.dim; col += 32) to[col] = from[col];
}

// ---------------------------------------------------------------------------------------

}  // namespace

// ---------------------------------------------------------------------------------------
// The kernels, one line per instantiation.

PK_KERNEL_BOUNDS(prefix_attention_f32_d32, (prefix_attention_simt<float, 32>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f32_d64, (prefix_attention_simt<float, 64>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f32_d80, (prefix_attention_simt<float, 80>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f32_d96, (prefix_attention_simt<float, 96>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f32_d128, (prefix_attention_simt<float, 128>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f32_d256, (prefix_attention_simt<float, 256>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f16_d32, (prefix_attention_mma<__half, 32>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f16_d64, (prefix_attention_mma<__half, 64>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f16_d80, (prefix_attention_mma<__half, 80>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f16_d96, (prefix_attention_mma<__half, 96>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f16_d128, (prefix_attention_mma<__half, 128>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_f16_d256, (prefix_attention_mma<__half, 256>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_bf16_d32, (prefix_attention_mma<__nv_bfloat16, 32>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_bf16_d64, (prefix_attention_mma<__nv_bfloat16, 64>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_bf16_d80, (prefix_attention_mma<__nv_bfloat16, 80>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_bf16_d96, (prefix_attention_mma<__nv_bfloat16, 96>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_bf16_d128, (prefix_attention_mma<__nv_bfloat16, 128>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_bf16_d256, (prefix_attention_mma<__nv_bfloat16, 256>), PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_split_merge_f32, prefix_attention_split_merge<float>, PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_split_merge_f16, prefix_attention_split_merge<__half>, PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(prefix_attention_split_merge_bf16, prefix_attention_split_merge<__nv_bfloat16>, PrefixAttentionParams, kThreads, 1)
PK_KERNEL_BOUNDS(lse_merge_f32, lse_merge<float>, LseMergeParams, kThreads, 1)
PK_KERNEL_BOUNDS(lse_merge_f16, lse_merge<__half>, LseMergeParams, kThreads, 1)
PK_KERNEL_BOUNDS(lse_merge_bf16, lse_merge<__nv_bfloat16>, LseMergeParams, kThreads, 1)
PK_KERNEL_BOUNDS(kv_concat_f32, kv_concat<float>, KvConcatParams, kThreads, 1)
PK_KERNEL_BOUNDS(kv_concat_f16, kv_concat<__half>, KvConcatParams, kThreads, 1)
PK_KERNEL_BOUNDS(kv_concat_bf16, kv_concat<__nv_bfloat16>, KvConcatParams, kThreads, 1)
