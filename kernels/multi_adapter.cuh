// multi_adapter.cuh — what a kernel needs to read a multi-adapter batch (issue 17): the adapter
// set's table entries, the batch description, the device-id checks, and the per-block view of a
// row tile's adapters that the frozen GEMM's tensor-core pass (delta_linear.cu, MULTI) uses to
// add each row's own delta as more K steps. Included by multi_delta_linear.cu (the naive kernel,
// the shrink, the unfused expand) and delta_linear.cu (the fused pass and its split-K reduce).
#pragma once

#include "common.cuh"

// One adapter of the set; twin of `AdapterEntry` in src/plan/multi_adapter.rs. rank = 0 marks
// an empty slot (never filled, or removed).
struct AdapterEntry {
  const void* w_down;  // [rank, k]
  const void* w_up;    // [n, rank]
  const void* b_down;  // [rank] or null
  const void* b_up;    // [n] or null
  int32_t rank;
  int32_t activation;  // Activation, as src/spec.rs numbers it
  float scale;         // s (LoRA's α/r or α/√r resolved by the set)
  int32_t reserved;
};

// Bits of the status word (src/multi_adapter.rs `MultiStatus`).
enum MultiStatus : uint32_t {
  STATUS_ID_OUT_OF_RANGE = 1,  // an id < −1 or ≥ table_len
  STATUS_EMPTY_SLOT = 2,       // an id naming an empty slot, or a rank past max_rank
  STATUS_ROW_UNCOVERED = 4,    // a row that no segment covers (segments out of order)
};

// The batch: which entry of the set each row uses. Twin of `MultiBatch` in
// src/plan/multi_adapter.rs. table = null: not a multi-adapter pass (delta_linear.cu's dense
// passes).
struct MultiBatch {
  const AdapterEntry* table;  // [table_len]
  const int32_t* ids;         // per-row ids [m], or null (segments)
  const int32_t* seg_starts;  // [segments + 1]
  const int32_t* seg_ids;     // [segments]
  uint32_t* status;           // MultiStatus bits, or null
  int32_t table_len, segments, max_rank, reserved;
};

PK_INLINE void multi_flag(const MultiBatch& b, uint32_t bit) {
  if (b.status) atomicOr(b.status, bit);
}

// The table entry of row m, or null for the base layer alone (id −1, or a bad id: flagged).
// A bad id reads no adapter memory.
PK_INLINE const AdapterEntry* row_adapter(const MultiBatch& b, int m) {
  int32_t id;
  if (b.ids) {
    id = b.ids[m];
  } else {
    // The last segment starting at or before m (empty segments share their start with the
    // next; the last of them is the one that holds rows). Any order of starts ends here in
    // log2(segments) steps with an index in range.
    int lo = 0, hi = b.segments;  // answer in [lo, hi)
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (b.seg_starts[mid] <= m) lo = mid; else hi = mid;
    }
    if (b.segments == 0 || b.seg_starts[lo] > m || m >= b.seg_starts[lo + 1]) {
      multi_flag(b, STATUS_ROW_UNCOVERED);
      return nullptr;
    }
    id = b.seg_ids[lo];
  }
  if (id == -1) return nullptr;
  if (id < -1 || id >= b.table_len) {
    multi_flag(b, STATUS_ID_OUT_OF_RANGE);
    return nullptr;
  }
  const AdapterEntry* a = b.table + id;
  if (a->rank <= 0 || a->rank > b.max_rank) {
    multi_flag(b, STATUS_EMPTY_SLOT);
    return nullptr;
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// The fused pass's view of one row tile (BM rows from m0): the set S of distinct adapters its
// rows use, in the order of their first row, each given columns [off, off + rank) of a
// concatenated phase 2 of K2 = Σ_{a∈S} round_up(r_a, 8) steps (the offsets multiples of 8, so
// an 8-column chunk of a tile belongs to one adapter and can be one 16-byte copy). Phase 2 is
//     A2[m, off_a + j] = t[m, j] if row m uses a, else 0;   B2[n, off_a + j] = W_up,a[n, j]
// so row m's sum over K2 is exactly its own t·W_up,aᵀ (the other adapters' columns add f32
// zeros), each adapter's W_up is read once per column tile at its own rank, and no adapter is
// padded to the largest rank: only to a multiple of 8, and the tile's last k-tile to BK, as
// the single-adapter pass pads its r.

template <int BM>
struct MultiTile {
  const AdapterEntry* entry[BM];  // slot s's adapter (slots [0, slots))
  int32_t off[BM], rank[BM];      // its phase-2 columns
  int16_t row_slot[BM];           // the slot of row m0 + i, or −1 (no adapter, a bad id, past m)
  int32_t slots, k2;
};
// Its size, which src/plan/delta_linear.rs (`multi_tile_bytes`) adds to the pass's dynamic
// shared memory.
static_assert(sizeof(MultiTile<16>) == 18 * 16 + 8 && sizeof(MultiTile<128>) == 18 * 128 + 8,
              "MultiTile's layout is 18·BM + 8 bytes");

// Fills `tile` for rows [m0, min(m0 + BM, m)); every thread of the block calls it (it has
// barriers). `scratch`: 16·BM bytes of shared memory free until it returns (the pipeline's,
// before its prologue). Each row's id is checked by row_adapter (bad ids flagged, as the
// shrink flags them); the slots are numbered in row order, so the layout, and with it every
// sum, is deterministic.
template <int BM, int THREADS>
PK_INLINE void multi_tile_setup(MultiTile<BM>& tile, const MultiBatch& b, int m0, int m,
                                unsigned char* scratch) {
  const AdapterEntry** row_a = reinterpret_cast<const AdapterEntry**>(scratch);
  int32_t* first = reinterpret_cast<int32_t*>(scratch + 8 * BM);  // first row of the same adapter
  int32_t* lead_slot = first + BM;                                // slot of a first row
  for (int i = threadIdx.x; i < BM; i += THREADS)
    row_a[i] = m0 + i < m ? row_adapter(b, m0 + i) : nullptr;
  __syncthreads();
  for (int i = threadIdx.x; i < BM; i += THREADS) {
    int j = 0;
    while (row_a[j] != row_a[i]) ++j;
    first[i] = j;
  }
  __syncthreads();
  // The offsets are a prefix sum over at most BM slots: serial in one thread (BM = 16 at
  // decode), reading only shared memory and the entries row_adapter just read.
  if (threadIdx.x == 0) {
    int slots = 0, off = 0;
    for (int i = 0; i < BM; ++i) {
      const AdapterEntry* a = row_a[i];
      if (!a || first[i] != i) continue;
      tile.entry[slots] = a;
      tile.off[slots] = off;
      tile.rank[slots] = a->rank;
      lead_slot[i] = slots++;
      off += (a->rank + 7) / 8 * 8;
    }
    tile.slots = slots;
    tile.k2 = off;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < BM; i += THREADS)
    tile.row_slot[i] = int16_t(row_a[i] ? lead_slot[first[i]] : -1);
  __syncthreads();
}

// s·b_up[n] of row m0 + i's adapter (0 without adapter or b_up): the delta's bias, added at the
// phase switch.
template <typename T, int BM>
PK_INLINE float multi_up_bias(const MultiTile<BM>& tile, int i, int n) {
  const int s = tile.row_slot[i];
  if (s < 0) return 0.0f;
  const AdapterEntry* a = tile.entry[s];
  return a->b_up ? a->scale * to_float(static_cast<const T*>(a->b_up)[n]) : 0.0f;
}

// One 8-column chunk of a phase-2 tile into shared memory at `s`: `valid` elements from `g`,
// zeros after them; a 16-byte cp.async where `vec` (g 16-byte aligned), else element by
// element (plain shared stores, visible after the pipeline's next barrier).
template <typename T>
PK_INLINE void multi_chunk(T* s, const T* g, int valid, bool vec) {
  if (vec && valid > 0) {
    cp_async_16_zfill(s, g, valid * 2);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) s[e] = e < valid ? g[e] : from_float<T>(0.0f);
  }
}

// Phase-2 tile columns [c0, c0 + BK) of A2 (BM rows from m0, from t [m, ldt]) and B2 (BN rows
// from n0 of the slots' W_up) into sa and sb (pitch C::PITCH, wgmma's swizzle where C::WGMMA),
// as mma_load_tile lays them out. t's rows are copied in 16-byte chunks where t is (offsets and
// ldt are multiples of 8), a W_up where its rank is a multiple of 8 and its base 16-byte
// aligned; every other chunk element by element.
template <typename C, typename T>
PK_INLINE void multi_load_phase2(T* sa, T* sb, const MultiTile<C::BM>& tile, const T* t,
                                 int64_t ldt, int m0, int n0, int n, int c0) {
  constexpr int CHUNKS = C::BK / 8;
  auto at = [](int row, int col) { return row * C::PITCH + (C::WGMMA ? col ^ (row % 8 * 8) : col); };
  const bool t_vec = reinterpret_cast<uintptr_t>(t) % 16 == 0 && ldt % 8 == 0;
  for (int i = threadIdx.x; i < C::BM * CHUNKS; i += C::THREADS) {
    const int row = i / CHUNKS, col = (i % CHUNKS) * 8;
    const int s = tile.row_slot[row];
    int valid = 0;
    const T* g = t;
    if (s >= 0) {
      const int j = c0 + col - tile.off[s];
      valid = j < 0 ? 0 : min(tile.rank[s] - j, 8);
      if (valid > 0) g = t + int64_t(m0 + row) * ldt + j;
    }
    multi_chunk(sa + at(row, col), g, valid, t_vec);
  }
  for (int i = threadIdx.x; i < C::BN * CHUNKS; i += C::THREADS) {
    const int row = i / CHUNKS, col = (i % CHUNKS) * 8, c = c0 + col;
    // The slot whose columns hold c: the last with off ≤ c (offsets increase with s).
    int lo = 0, hi = tile.slots;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (tile.off[mid] <= c) lo = mid; else hi = mid;
    }
    int valid = 0;
    bool vec = false;
    const T* g = nullptr;
    if (tile.slots > 0 && n0 + row < n) {
      const int j = c - tile.off[lo], r = tile.rank[lo];
      valid = min(r - j, 8);  // ≤ 0 in the slot's padding or past K2
      if (valid > 0) {
        const T* w_up = static_cast<const T*>(tile.entry[lo]->w_up);
        g = w_up + int64_t(n0 + row) * r + j;
        vec = r % 8 == 0 && reinterpret_cast<uintptr_t>(w_up) % 16 == 0;
      }
    }
    multi_chunk(sb + at(row, col), g, valid, vec);
  }
}
