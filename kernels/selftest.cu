// Backend self-checks: small kernels that exercise what every real kernel relies on
// (shared-memory tiling and __syncthreads, warp shuffles of every kind, ballots, dynamic
// shared memory, atomics, LoRA dropout's Philox generator), and deliberately broken
// kernels that the emulator must report. Valid CUDA: the same file is built by nvcc for the GPU.
#include <cstdint>

#include "export.cuh"
#include "philox.cuh"

#define PK_FULL_MASK 0xFFFFFFFFu

// ---------------------------------------------------------------------------------------
// Tiled SGEMM: C (m×n) = A (m×k) · B (k×n), all row-major and contiguous. A block of
// 16×16 threads computes a 64×64 tile of C, 4×4 elements per thread (rows ty + 16i,
// columns tx + 16j), stepping through K in slices of 16 staged in shared memory.
struct SgemmParams {
  const float* a;
  const float* b;
  float* c;
  uint32_t m, n, k;
};
PK_PARAMS_SIZE(SgemmParams)

constexpr int kSgemmTile = 64;
constexpr int kSgemmTileK = 16;

// kSecondBarrier = false drops the barrier that keeps the next slice's loads from
// overwriting the one other threads still read: the broken variant the tests expect to
// be caught or to give a wrong answer.
template <bool kSecondBarrier>
__device__ void sgemm_tiled(const SgemmParams& p) {
  // A slice stored transposed (as[kk][row]) so both inner-loop reads run along a row;
  // +4 floats of padding keep the transposing stores off a single bank.
  __shared__ float as[kSgemmTileK][kSgemmTile + 4];
  __shared__ float bs[kSgemmTileK][kSgemmTile + 4];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * 16 + tx;
  const uint32_t row0 = blockIdx.y * kSgemmTile, col0 = blockIdx.x * kSgemmTile;
  float acc[4][4] = {};
  for (uint32_t k0 = 0; k0 < p.k; k0 += kSgemmTileK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + i * 256;
      const int r = e / kSgemmTileK, kk = e % kSgemmTileK;
      const uint32_t gr = row0 + r, gk = k0 + kk;
      as[kk][r] = gr < p.m && gk < p.k ? p.a[size_t(gr) * p.k + gk] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + i * 256;
      const int kk = e / kSgemmTile, c = e % kSgemmTile;
      const uint32_t gk = k0 + kk, gc = col0 + c;
      bs[kk][c] = gk < p.k && gc < p.n ? p.b[size_t(gk) * p.n + gc] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSgemmTileK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = as[kk][ty + 16 * i];
        bv[i] = bs[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    if (kSecondBarrier) __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t r = row0 + ty + 16 * i, c = col0 + tx + 16 * j;
      if (r < p.m && c < p.n) p.c[size_t(r) * p.n + c] = acc[i][j];
    }
}
PK_KERNEL_BOUNDS(selftest_sgemm_tiled_f32, sgemm_tiled<true>, SgemmParams, 256, 1)
PK_KERNEL_BOUNDS(selftest_sgemm_missing_barrier_f32, sgemm_tiled<false>, SgemmParams, 256, 1)

// ---------------------------------------------------------------------------------------
// Block reduction: each block of blockDim.x threads (a multiple of 32) reduces its
// blockDim.x elements of x to a sum (xor butterfly), a maximum (shfl_down, valid in lane
// 0 only) and a sum of squares in double (8-byte shuffles); warps combine through shared
// memory and warp 0 finishes.
struct ReduceParams {
  const float* x;
  float* block_sum;
  float* block_max;
  double* block_sum_sq;
  uint32_t n;
};
PK_PARAMS_SIZE(ReduceParams)

__device__ void block_reduce(const ReduceParams& p) {
  __shared__ float warp_sum[32];
  __shared__ float warp_max[32];
  __shared__ double warp_sq[32];
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float v = i < p.n ? p.x[i] : 0.0f;
  float sum = v;
  float mx = i < p.n ? v : -INFINITY;
  double sq = double(v) * v;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(PK_FULL_MASK, sum, offset);
    mx = fmaxf(mx, __shfl_down_sync(PK_FULL_MASK, mx, offset));
    sq += __shfl_xor_sync(PK_FULL_MASK, sq, offset);
  }
  if (lane == 0) {
    warp_sum[warp] = sum;
    warp_max[warp] = mx;
    warp_sq[warp] = sq;
  }
  __syncthreads();
  if (warp == 0) {
    const unsigned nwarps = blockDim.x / 32;
    sum = lane < nwarps ? warp_sum[lane] : 0.0f;
    mx = lane < nwarps ? warp_max[lane] : -INFINITY;
    sq = lane < nwarps ? warp_sq[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(PK_FULL_MASK, sum, offset);
      mx = fmaxf(mx, __shfl_down_sync(PK_FULL_MASK, mx, offset));
      sq += __shfl_xor_sync(PK_FULL_MASK, sq, offset);
    }
    if (lane == 0) {
      p.block_sum[blockIdx.x] = sum;
      p.block_max[blockIdx.x] = mx;
      p.block_sum_sq[blockIdx.x] = sq;
    }
  }
}
PK_KERNEL(selftest_block_reduce_f32, block_reduce, ReduceParams)

// ---------------------------------------------------------------------------------------
// Warp operations with a segment width: per thread, the inclusive prefix sum of x over
// its width-lane segment (shfl_up), the segment's lane 3 & (width - 1) value (shfl with
// width), the value `width - 1` lanes up within the segment (shfl_down with width,
// clamped to its own value), lane ^ 1 (xor), and the value of the mirror lane within
// its half warp, with the two halves shuffling separately under disjoint masks; per warp
// the ballot of x > 0 and any(x < 0) | all(x != 0) << 1. Threads past n contribute 0
// and write nothing.
struct WarpOpsParams {
  const int* x;
  int* scan;
  int* bcast;
  int* down;
  int* swap;
  int* half_mirror;
  unsigned* ballot;
  int* any_all;
  uint32_t n;
  int width;
};
PK_PARAMS_SIZE(WarpOpsParams)

__device__ void warp_ops(const WarpOpsParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const int x = i < p.n ? p.x[i] : 0;
  int scan = x;
  for (int d = 1; d < p.width; d *= 2) {
    const int t = __shfl_up_sync(PK_FULL_MASK, scan, d, p.width);
    if (int(lane % p.width) >= d) scan += t;
  }
  const int bcast = __shfl_sync(PK_FULL_MASK, x, 3, p.width);
  const int down = __shfl_down_sync(PK_FULL_MASK, x, p.width - 1, p.width);
  const int swap = __shfl_xor_sync(PK_FULL_MASK, x, 1);
  const int half_mirror = lane < 16 ? __shfl_sync(0x0000FFFFu, x, 15 - lane)
                                    : __shfl_sync(0xFFFF0000u, x, 47 - lane);
  const unsigned ballot = __ballot_sync(PK_FULL_MASK, x > 0);
  const int any_all = __any_sync(PK_FULL_MASK, x < 0) | __all_sync(PK_FULL_MASK, x != 0) << 1;
  if (i < p.n) {
    p.scan[i] = scan;
    p.bcast[i] = bcast;
    p.down[i] = down;
    p.swap[i] = swap;
    p.half_mirror[i] = half_mirror;
  }
  if (lane == 0 && i < p.n) {
    p.ballot[i / 32] = ballot;
    p.any_all[i / 32] = any_all;
  }
}
PK_KERNEL(selftest_warp_ops_i32, warp_ops, WarpOpsParams)

// ---------------------------------------------------------------------------------------
// Thread coordinates: the thread with global linear index g (x fastest, threads of a
// block before the next block, blocks x fastest) writes its threadIdx and blockIdx to
// coords[6g .. 6g + 6].
struct ThreadIndexParams {
  uint32_t* coords;
  uint64_t n;
};
PK_PARAMS_SIZE(ThreadIndexParams)

__device__ void thread_index(const ThreadIndexParams& p) {
  const uint64_t block =
      (uint64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const uint32_t t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const uint64_t g = block * (blockDim.x * blockDim.y * blockDim.z) + t;
  if (g >= p.n) return;
  uint32_t* c = p.coords + 6 * g;
  c[0] = threadIdx.x;
  c[1] = threadIdx.y;
  c[2] = threadIdx.z;
  c[3] = blockIdx.x;
  c[4] = blockIdx.y;
  c[5] = blockIdx.z;
}
PK_KERNEL(selftest_thread_index, thread_index, ThreadIndexParams)

// ---------------------------------------------------------------------------------------
// Dynamic shared memory: each block reverses its blockDim.x elements of x through a
// dynamic buffer of blockDim.x + 1 floats. probe[block] receives the bits of the last
// float, which nobody writes (the emulator's poison, 0xFFFFFFFF, on the CPU).
struct ReverseParams {
  const float* x;
  float* y;
  uint32_t* probe;
  uint32_t n;
};
PK_PARAMS_SIZE(ReverseParams)

__device__ void reverse_dynamic_smem(const ReverseParams& p) {
  PK_DYNAMIC_SMEM(float, buf);
  const uint32_t base = blockIdx.x * blockDim.x;
  const uint32_t t = threadIdx.x;
  buf[t] = base + t < p.n ? p.x[base + t] : 0.0f;
  if (t == 0) p.probe[blockIdx.x] = __float_as_uint(buf[blockDim.x]);
  __syncthreads();
  const uint32_t src = blockDim.x - 1 - t;
  if (base + t < p.n) p.y[base + t] = buf[src];
}
PK_KERNEL(selftest_reverse_dynamic_smem_f32, reverse_dynamic_smem, ReverseParams)

// ---------------------------------------------------------------------------------------
// Atomics: a histogram and global sums, extrema and a CAS loop over x.
struct AtomicsParams {
  const int* x;
  unsigned* hist;
  int* isum;
  float* fsum;
  double* dsum;
  unsigned long long* count;
  int* imax;
  int* imin;
  unsigned* umax;
  unsigned* umin;
  int* last;
  float* cas_max;
  uint32_t n;
  uint32_t nbins;
};
PK_PARAMS_SIZE(AtomicsParams)

__device__ void atomics(const AtomicsParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const int v = p.x[i];
  const int bin = ((v % int(p.nbins)) + int(p.nbins)) % int(p.nbins);
  atomicAdd(&p.hist[bin], 1u);
  atomicAdd(p.isum, v);
  atomicAdd(p.fsum, float(v));
  atomicAdd(p.dsum, 0.5 * v);
  atomicAdd(p.count, 1ull);
  atomicMax(p.imax, v);
  atomicMin(p.imin, v);
  atomicMax(p.umax, unsigned(v));
  atomicMin(p.umin, unsigned(v));
  atomicExch(p.last, int(i));
  // Float maximum by compare-and-swap on the bits.
  const float f = float(v);
  int old = __float_as_int(*p.cas_max);
  while (__int_as_float(old) < f) {
    const int seen = atomicCAS(reinterpret_cast<int*>(p.cas_max), old, __float_as_int(f));
    if (seen == old) break;
    old = seen;
  }
}
PK_KERNEL(selftest_atomics, atomics, AtomicsParams)

// ---------------------------------------------------------------------------------------
// LoRA dropout's generator (philox.cuh), checked bit for bit against its Rust twin.
//
// Philox4x32-10 of n (counter, key) pairs: out[4i .. 4i + 4] = philox(ctr[4i ..], key[2i ..]).
struct PhiloxParams {
  const uint32_t* ctr;
  const uint32_t* key;
  uint32_t* out;
  uint32_t n;
};
PK_PARAMS_SIZE(PhiloxParams)

__device__ void philox(const PhiloxParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  PkPhilox4 c{{p.ctr[4 * i], p.ctr[4 * i + 1], p.ctr[4 * i + 2], p.ctr[4 * i + 3]}};
  c = pk_philox4x32_10(c, p.key[2 * i], p.key[2 * i + 1]);
  for (int j = 0; j < 4; ++j) p.out[4 * i + j] = c.v[j];
}
PK_KERNEL(selftest_philox4x32_10, philox, PhiloxParams)

// The dropout factor of every element of the window rows [row0, row0 + m) × columns
// [col0, col0 + k): out[i·k + j] = keep(seed, row0 + i, col0 + j, p) ? scale(p) : 0.
// Grid-stride loops over both axes (x: columns, y: rows), so any grid and block shape
// covers the window, each thread visiting its elements in its own order.
struct DropoutMaskParams {
  float* out;
  uint64_t seed;
  uint32_t row0, col0, m, k;
  float p;
};
PK_PARAMS_SIZE(DropoutMaskParams)

__device__ void dropout_mask(const DropoutMaskParams& p) {
  const float scale = pk_dropout_scale(p.p);
  for (uint32_t i = blockIdx.y * blockDim.y + threadIdx.y; i < p.m; i += gridDim.y * blockDim.y)
    for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < p.k; j += gridDim.x * blockDim.x)
      p.out[size_t(i) * p.k + j] = pk_dropout_keep(p.seed, p.row0 + i, p.col0 + j, p.p) ? scale : 0.0f;
}
PK_KERNEL(selftest_dropout_mask, dropout_mask, DropoutMaskParams)

// ---------------------------------------------------------------------------------------
// Broken kernels: each must make the emulator fail the launch. out[i] = i for the
// threads that get that far.
struct BrokenParams {
  float* out;
  uint32_t n;
};
PK_PARAMS_SIZE(BrokenParams)

// Only the even threads reach the barrier; the odd ones exit.
__device__ void divergent_barrier(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x % 2 == 0) __syncthreads();
  if (i < p.n) p.out[i] = float(i);
}
PK_KERNEL(selftest_broken_divergent_barrier, divergent_barrier, BrokenParams)

// Every lane shuffles, but the mask names only the low half.
__device__ void shfl_wrong_mask(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = __shfl_xor_sync(0x0000FFFFu, float(i), 1);
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_shfl_wrong_mask, shfl_wrong_mask, BrokenParams)

// A full-mask shuffle: broken when the block is not a whole number of warps (the mask
// then names lanes that do not exist).
__device__ void shfl_full_mask(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = __shfl_xor_sync(PK_FULL_MASK, float(i), 1);
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_shfl_partial_warp, shfl_full_mask, BrokenParams)

// Lane 0 returns early; the others shuffle with a mask that still names it.
__device__ void shfl_exited_lane(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x % 32 == 0) return;
  const float v = __shfl_xor_sync(PK_FULL_MASK, float(i), 1);
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_shfl_exited_lane, shfl_exited_lane, BrokenParams)

// The halves of the warp shuffle separately (valid), but read across the halves.
__device__ void shfl_source_outside_mask(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const float v = lane < 16 ? __shfl_sync(0x0000FFFFu, float(i), 31 - lane)
                            : __shfl_sync(0xFFFF0000u, float(i), 31 - lane);
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_shfl_source_outside_mask, shfl_source_outside_mask, BrokenParams)

// The halves of the warp call different warp operations with the full mask: each
// waits for the other half.
__device__ void mismatched_warp_ops(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = float(i);
  if (threadIdx.x % 32 < 16)
    v = float(__ballot_sync(PK_FULL_MASK, v > 0.0f));
  else
    v = __shfl_xor_sync(PK_FULL_MASK, v, 1);
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_mismatched_warp_ops, mismatched_warp_ops, BrokenParams)

// The halves of the warp vote with different instructions (any vs all) under the full
// mask: two collectives, each waiting for the other half.
__device__ void mismatched_votes(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool odd = i % 2 == 1;
  const int v = threadIdx.x % 32 < 16 ? __any_sync(PK_FULL_MASK, odd) : __all_sync(PK_FULL_MASK, odd);
  if (i < p.n) p.out[i] = float(v);
}
PK_KERNEL(selftest_broken_mismatched_votes, mismatched_votes, BrokenParams)

// Three groups of lanes shuffle with masks that each overlap the next group only: every
// group waits for another, and no thread of the block can proceed.
__device__ void warp_deadlock(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  float v = float(i);
  if (lane < 10)
    v = __shfl_sync(0x000FFFFFu, v, lane);  // lanes 0-19
  else if (lane < 20)
    v = __shfl_sync(0xFFFFFC00u, v, lane);  // lanes 10-31
  else
    v = __shfl_sync(0xFFF003FFu, v, lane);  // lanes 20-31 and 0-9
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_warp_deadlock, warp_deadlock, BrokenParams)

// A full-mask shuffle that only the low half of the warp executes.
__device__ void shfl_divergent(const BrokenParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = float(i);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(PK_FULL_MASK, v, 1);
  if (i < p.n) p.out[i] = v;
}
PK_KERNEL(selftest_broken_shfl_divergent, shfl_divergent, BrokenParams)

// ---------------------------------------------------------------------------------------
// Broken kernels the emulator's checks must catch (src/emulator, `Checks`): each is wrong
// on a GPU too, but runs "correctly" in the emulator without its checks. Blocks of 64
// threads over x and out of n elements.
struct CheckedParams {
  const float* x;
  float* out;
  uint32_t n;
};
PK_PARAMS_SIZE(CheckedParams)

// The block stages its tile of x in shared memory; its last thread also reads the element
// after the tile, which for the last block is one past the end of x (memcheck).
__device__ void read_past_tile(const CheckedParams& p) {
  __shared__ float tile[65];
  const uint32_t base = blockIdx.x * blockDim.x, t = threadIdx.x;
  tile[t] = base + t < p.n ? p.x[base + t] : 0.0f;
  if (t == blockDim.x - 1) tile[t + 1] = p.x[base + t + 1];
  __syncthreads();
  if (base + t < p.n) p.out[base + t] = tile[t] + tile[t + 1];
}
PK_KERNEL(selftest_broken_read_past_tile, read_past_tile, CheckedParams)

// Each thread reads the tile element another warp's thread writes, with no barrier
// between the write and the read (racecheck).
__device__ void missing_barrier_read(const CheckedParams& p) {
  __shared__ float tile[64];
  const uint32_t base = blockIdx.x * blockDim.x, t = threadIdx.x;
  tile[t] = base + t < p.n ? p.x[base + t] : 0.0f;
  const float v = tile[blockDim.x - 1 - t];
  if (base + t < p.n) p.out[base + t] = v;
}
PK_KERNEL(selftest_broken_missing_barrier_read, missing_barrier_read, CheckedParams)

// The last thread reads the shared word after the tile, which no thread writes
// (initcheck: on a GPU it holds whatever the previous block left there).
__device__ void uninit_shared_read(const CheckedParams& p) {
  __shared__ float tile[65];
  const uint32_t base = blockIdx.x * blockDim.x, t = threadIdx.x;
  tile[t] = base + t < p.n ? p.x[base + t] : 0.0f;
  __syncthreads();
  if (base + t < p.n) p.out[base + t] = tile[t] + tile[t + 1];
}
PK_KERNEL(selftest_broken_uninit_shared_read, uninit_shared_read, CheckedParams)

// Every block writes the first blockDim.x outputs: two blocks write one output
// (racecheck).
__device__ void blocks_write_one_output(const CheckedParams& p) {
  const uint32_t t = threadIdx.x;
  if (t < p.n) p.out[t] = p.x[blockIdx.x * blockDim.x + t < p.n ? blockIdx.x * blockDim.x + t : 0];
}
PK_KERNEL(selftest_broken_blocks_write_one_output, blocks_write_one_output, CheckedParams)

// Each block writes its outputs, then its first thread adds the next block's first output,
// which that block writes in the same launch: on a GPU the blocks run in any order
// (racecheck: a write after another block's read, whichever block the emulator runs first).
__device__ void block_reads_anothers_output(const CheckedParams& p) {
  const uint32_t base = blockIdx.x * blockDim.x, t = threadIdx.x;
  if (base + t < p.n) p.out[base + t] = p.x[base + t];
  __syncthreads();
  if (t == 0 && base < p.n) p.out[base] += p.out[(base + blockDim.x) % p.n];
}
PK_KERNEL(selftest_broken_block_reads_anothers_output, block_reads_anothers_output, CheckedParams)
