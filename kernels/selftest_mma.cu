// Self-checks of the dtype and architecture layer (common.cuh, arch.cuh): a tensor-core
// GEMM built from cp.async double buffering, ldmatrix and mma.sync; probes that pin the
// mma and ldmatrix fragment layouts lane by lane; the 16-bit conversions and arithmetic
// bit for bit; activations through 16-byte vector access; warp and block reductions.
// The host side is src/selftest/mma.rs.
// Valid CUDA: the same file is built by nvcc for the GPU.
#include "common.cuh"

// Raw bits of a 16-bit element.
template <typename T>
PK_INLINE uint16_t bits_of(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(v);
  } else {
    return __bfloat16_as_ushort(v);
  }
}
template <typename T>
PK_INLINE T from_bits(uint16_t u) {
  if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(u);
  } else {
    return __ushort_as_bfloat16(u);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core GEMM: C (m×n, f32, ldc) = A (m×k, lda) · B, with B either n×k ("nk",
// a weight as nn.Linear stores it: C = A·Bᵀ) or k×n ("kn"), row-major with ldb.
// Requirements (checked by the host): a and b 16-byte aligned, lda and ldb multiples
// of 8 elements, so every 16-byte chunk of a row is aligned; m, n, k ≥ 1.
//
// A block of 4 warps computes a 64×64 tile of C, each warp 32×32 (2×4 mma tiles),
// stepping through K in slices of 32 double-buffered in shared memory: cp.async fetches
// slice s+1 while the warps multiply slice s. Chunks past the edge of A or B are zero
// filled (cp.async src-size), so ragged m, n, k need no other special case and the
// padding of a row beyond k is never read. kWait = false drops the cp.async wait: a
// broken kernel that multiplies shared tiles before their copies land, which the
// emulator's copy-at-wait semantics must turn into a wrong answer.
struct MmaGemmParams {
  const void* a;
  const void* b;
  float* c;
  uint32_t m, n, k;
  uint32_t lda, ldb, ldc;
};
PK_PARAMS_SIZE(MmaGemmParams)

constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 32;
constexpr int kGemmThreads = 128;
// Shared-memory rows are padded by 16 bytes so that the 8 rows one ldmatrix reads fall
// in 8 different groups of 4 banks.
constexpr int kSmemPad = 8;

// Loads rows [row0, row0 + kRows) × cols [col0, col0 + kCols) of a row-major matrix
// (rows × cols, leading dimension ld) into a shared tile, zero-filling outside it.
template <typename T, int kRows, int kCols, int kSmemLd>
PK_INLINE void load_tile_async(T (*dst)[kSmemLd], const T* src, uint32_t ld, uint32_t rows,
                               uint32_t cols, uint32_t row0, uint32_t col0) {
  constexpr int kChunk = kVec16<T>;
  constexpr int kChunksPerRow = kCols / kChunk;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kGemmThreads == 0);
#pragma unroll
  for (int i = 0; i < kChunks / kGemmThreads; ++i) {
    const int chunk = int(threadIdx.x) + i * kGemmThreads;
    const int r = chunk / kChunksPerRow, c = chunk % kChunksPerRow * kChunk;
    const uint32_t gr = row0 + r, gc = col0 + c;
    const bool inside = gr < rows && gc < cols;
    const uint32_t bytes = inside ? min(cols - gc, uint32_t(kChunk)) * uint32_t(sizeof(T)) : 0;
    cp_async_16_zfill(&dst[r][c], inside ? src + size_t(gr) * ld + gc : src, bytes);
  }
}

template <typename T, bool kBKn, bool kWait = true>
__device__ void mma_gemm(const MmaGemmParams& p) {
  // B's shared tile keeps B's global orientation: [n][k] for "nk", [k][n] for "kn".
  constexpr int kBRows = kBKn ? kGemmBK : kGemmBN;
  constexpr int kBCols = kBKn ? kGemmBN : kGemmBK;
  __shared__ __align__(16) T as[2][kGemmBM][kGemmBK + kSmemPad];
  __shared__ __align__(16) T bs[2][kBRows][kBCols + kSmemPad];

  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t m0 = blockIdx.y * kGemmBM, n0 = blockIdx.x * kGemmBN;
  const int wm = warp / 2 * 32, wn = warp % 2 * 32;  // the warp's 32×32 in the tile

  auto load_slice = [&](int stage, uint32_t k0) {
    load_tile_async<T, kGemmBM, kGemmBK>(as[stage], a, p.lda, p.m, p.k, m0, k0);
    if constexpr (kBKn) {
      load_tile_async<T, kGemmBK, kGemmBN>(bs[stage], b, p.ldb, p.k, p.n, k0, n0);
    } else {
      load_tile_async<T, kGemmBN, kGemmBK>(bs[stage], b, p.ldb, p.n, p.k, n0, k0);
    }
  };

  float acc[2][4][4] = {};
  const uint32_t slices = ceil_div(p.k, uint32_t(kGemmBK));
  load_slice(0, 0);
  cp_async_commit();
  for (uint32_t s = 0; s < slices; ++s) {
    const int stage = s & 1;
    if (s + 1 < slices) load_slice(stage ^ 1, (s + 1) * kGemmBK);
    // Commit even when nothing was issued, so that "all but the newest group" is always
    // slice s.
    cp_async_commit();
    if constexpr (kWait) cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmBK; kk += 16) {
      // A fragments: x4 over 16×16, lane l → row l % 16, column 8·(l / 16).
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(af[mt], &as[stage][wm + mt * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
      // B fragments of two n-tiles per x4: matrices (n0-7, k0-7), (n0-7, k8-15),
      // (n8-15, k0-7), (n8-15, k8-15) in k order per tile.
      uint32_t bf[4][2];
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        if constexpr (kBKn) {
          ldmatrix_x4_trans(r, &bs[stage][kk + (lane & 15)][wn + np * 16 + (lane >> 4) * 8]);
        } else {
          ldmatrix_x4(r, &bs[stage][wn + np * 16 + (lane & 7) + (lane >> 4) * 8]
                             [kk + ((lane >> 3) & 1) * 8]);
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
    }
    // Every warp is done with this stage before the next iteration refills it.
    __syncthreads();
  }

  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t row = m0 + wm + mt * 16 + g + 8 * (i / 2);
        const uint32_t col = n0 + wn + nt * 8 + 2 * t + (i & 1);
        if (row < p.m && col < p.n) p.c[size_t(row) * p.ldc + col] = acc[mt][nt][i];
      }
}

PK_KERNEL_BOUNDS(selftest_mma_gemm_nk_f16, (mma_gemm<__half, false>), MmaGemmParams, kGemmThreads, 1)
PK_KERNEL_BOUNDS(selftest_mma_gemm_kn_f16, (mma_gemm<__half, true>), MmaGemmParams, kGemmThreads, 1)
PK_KERNEL_BOUNDS(selftest_mma_gemm_nk_bf16, (mma_gemm<__nv_bfloat16, false>), MmaGemmParams,
                 kGemmThreads, 1)
PK_KERNEL_BOUNDS(selftest_mma_gemm_kn_bf16, (mma_gemm<__nv_bfloat16, true>), MmaGemmParams,
                 kGemmThreads, 1)
PK_KERNEL_BOUNDS(selftest_broken_mma_gemm_no_wait_bf16, (mma_gemm<__nv_bfloat16, false, false>),
                 MmaGemmParams, kGemmThreads, 1)

// ---------------------------------------------------------------------------------------
// mma layout probe, one warp: D (16×8) = A (16×16) · B (16×8, k × n) + C, all row-major
// and contiguous, 16-bit operands as raw bits. Each lane gathers its fragments straight
// from global memory by the documented layout (arch.cuh), except that the A fragments
// are those of lane `lane ^ a_lane_xor` and the B fragments those of `lane ^ b_lane_xor`:
// a nonzero xor is a deliberately wrong lane mapping, which must change the result.
struct MmaProbeParams {
  const uint16_t* a;
  const uint16_t* b;
  const float* c;
  float* d;
  uint32_t a_lane_xor, b_lane_xor;
};
PK_PARAMS_SIZE(MmaProbeParams)

template <typename T>
__device__ void mma_probe(const MmaProbeParams& p) {
  const unsigned lane = threadIdx.x;
  const unsigned la = lane ^ p.a_lane_xor, lb = lane ^ p.b_lane_xor;
  const unsigned g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned row = la / 4 + 8 * (i & 1), col = 2 * (la % 4) + 8 * (i / 2);
    a[i] = uint32_t(p.a[row * 16 + col]) | uint32_t(p.a[row * 16 + col + 1]) << 16;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const unsigned k = 2 * (lb % 4) + 8 * i, n = lb / 4;
    b[i] = uint32_t(p.b[k * 8 + n]) | uint32_t(p.b[(k + 1) * 8 + n]) << 16;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) c[i] = p.c[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k16<T>(d, a, b, c);
#pragma unroll
  for (int i = 0; i < 4; ++i) p.d[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)] = d[i];
}

PK_KERNEL(selftest_mma_probe_f16, mma_probe<__half>, MmaProbeParams)
PK_KERNEL(selftest_mma_probe_bf16, mma_probe<__nv_bfloat16>, MmaProbeParams)

// ---------------------------------------------------------------------------------------
// ldmatrix probe, one warp: `src` is 32 rows of 8 16-bit values, copied to shared memory;
// lane l passes the address of shared row row_of_lane[l], plus `misalign` bytes, to
// every ldmatrix form (misalign ≠ 0 breaks the 16-byte alignment ldmatrix requires: the
// emulator must refuse it). Lane l writes its registers to out[14·l ..]: x1 (1), x2 (2),
// x4 (4), then the .trans forms.
struct LdmatrixProbeParams {
  const uint16_t* src;
  const uint32_t* row_of_lane;
  uint32_t* out;
  uint32_t misalign;
};
PK_PARAMS_SIZE(LdmatrixProbeParams)

__device__ void ldmatrix_probe(const LdmatrixProbeParams& p) {
  __shared__ __align__(16) uint16_t tile[32][8];
  const unsigned lane = threadIdx.x;
#pragma unroll
  for (int j = 0; j < 8; ++j) tile[lane][j] = p.src[lane * 8 + j];
  __syncwarp();
  const void* row = reinterpret_cast<const char*>(tile[p.row_of_lane[lane] % 32]) + p.misalign;
  uint32_t r[14];
  ldmatrix_x1(r, row);
  ldmatrix_x2(r + 1, row);
  ldmatrix_x4(r + 3, row);
  ldmatrix_x1_trans(r + 7, row);
  ldmatrix_x2_trans(r + 8, row);
  ldmatrix_x4_trans(r + 10, row);
#pragma unroll
  for (int j = 0; j < 14; ++j) p.out[lane * 14 + j] = r[j];
}

PK_KERNEL(selftest_ldmatrix_probe, ldmatrix_probe, LdmatrixProbeParams)

// ---------------------------------------------------------------------------------------
// Conversions, one thread per pair of elements (2i, 2i+1): bits[e] = from_float<T>(x[e])
// and back[e] its widening; pair_bits / pair_back the same through the paired forms
// (__floats2half2_rn, __half22float2 and their bf16 twins).
struct HalfConvertParams {
  const float* x;
  uint16_t* bits;
  float* back;
  uint16_t* pair_bits;
  float* pair_back;
  uint32_t n;
};
PK_PARAMS_SIZE(HalfConvertParams)

template <typename T>
__device__ void convert(const HalfConvertParams& p) {
  const uint32_t e = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= p.n) return;
  const bool has_hi = e + 1 < p.n;
  const float lo = p.x[e], hi = has_hi ? p.x[e + 1] : 0.0f;

  const T s_lo = from_float<T>(lo), s_hi = from_float<T>(hi);
  p.bits[e] = bits_of(s_lo);
  p.back[e] = to_float(s_lo);
  if (has_hi) {
    p.bits[e + 1] = bits_of(s_hi);
    p.back[e + 1] = to_float(s_hi);
  }

  float2 wide;
  uint16_t pair[2];
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    pair[0] = __half_as_ushort(h.x);
    pair[1] = __half_as_ushort(h.y);
    wide = __half22float2(h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    pair[0] = __bfloat16_as_ushort(h.x);
    pair[1] = __bfloat16_as_ushort(h.y);
    wide = __bfloat1622float2(h);
  }
  p.pair_bits[e] = pair[0];
  p.pair_back[e] = wide.x;
  if (has_hi) {
    p.pair_bits[e + 1] = pair[1];
    p.pair_back[e + 1] = wide.y;
  }
}

PK_KERNEL(selftest_convert_f16, convert<__half>, HalfConvertParams)
PK_KERNEL(selftest_convert_bf16, convert<__nv_bfloat16>, HalfConvertParams)

// ---------------------------------------------------------------------------------------
// 16-bit arithmetic, one thread per element, operands and results as raw bits:
// add = a + b, sub = a − b, mul = a · b, fma = a · b + c, each rounded once.
struct HalfArithParams {
  const uint16_t* a;
  const uint16_t* b;
  const uint16_t* c;
  uint16_t* add;
  uint16_t* sub;
  uint16_t* mul;
  uint16_t* fma;
  uint32_t n;
};
PK_PARAMS_SIZE(HalfArithParams)

template <typename T>
__device__ void arith(const HalfArithParams& p) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const T a = from_bits<T>(p.a[i]), b = from_bits<T>(p.b[i]), c = from_bits<T>(p.c[i]);
  p.add[i] = bits_of(__hadd(a, b));
  p.sub[i] = bits_of(__hsub(a, b));
  p.mul[i] = bits_of(__hmul(a, b));
  p.fma[i] = bits_of(__hfma(a, b, c));
}

PK_KERNEL(selftest_arith_f16, arith<__half>, HalfArithParams)
PK_KERNEL(selftest_arith_bf16, arith<__nv_bfloat16>, HalfArithParams)

// ---------------------------------------------------------------------------------------
// Activations: y = f(x) elementwise for T in {float, __half, __nv_bfloat16}, computed in
// f32. Each thread moves one 16-byte vector (load_vec / store_vec); the last, partial
// vector goes element by element. x and y 16-byte aligned.
struct ActivationCheckParams {
  const void* x;
  void* y;
  uint32_t n;
  Activation act;
};
PK_PARAMS_SIZE(ActivationCheckParams)

template <typename T>
__device__ void activation_check(const ActivationCheckParams& p) {
  constexpr int kN = kVec16<T>;
  const uint32_t i0 = (blockIdx.x * blockDim.x + threadIdx.x) * kN;
  if (i0 >= p.n) return;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  if (i0 + kN <= p.n) {
    Vec<T, kN> v = load_vec<T, kN>(x + i0);
#pragma unroll
    for (int j = 0; j < kN; ++j) v.v[j] = from_float<T>(activate(p.act, to_float(v.v[j])));
    store_vec(y + i0, v);
  } else {
    for (uint32_t i = i0; i < p.n; ++i) y[i] = from_float<T>(activate(p.act, to_float(x[i])));
  }
}

PK_KERNEL(selftest_activation_f32, activation_check<float>, ActivationCheckParams)
PK_KERNEL(selftest_activation_f16, activation_check<__half>, ActivationCheckParams)
PK_KERNEL(selftest_activation_bf16, activation_check<__nv_bfloat16>, ActivationCheckParams)

// ---------------------------------------------------------------------------------------
// Reductions: every thread of every block takes one x (block b's threads, numbered as
// warps are formed, read x[b·threads ..]); per warp w (numbered across the grid) the
// warp sum and max, per block the block sum, max, and the sum of 2x by a second
// block_sum right after the first (exactly twice the first: it checks that back-to-back
// block reductions do not trample each other's partials). Whole warps only.
struct ReductionCheckParams {
  const float* x;
  float* warp_sum;
  float* warp_max;
  float* block_sum;
  float* block_max;
  float* block_sum_twice;
};
PK_PARAMS_SIZE(ReductionCheckParams)

__device__ void reduction_check(const ReductionCheckParams& p) {
  const uint32_t threads = blockDim.x * blockDim.y * blockDim.z;
  const uint32_t tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const float v = p.x[size_t(blockIdx.x) * threads + tid];
  const float ws = warp_sum(v), wm = warp_max(v);
  if (tid % 32 == 0) {
    const size_t w = size_t(blockIdx.x) * (threads / 32) + tid / 32;
    p.warp_sum[w] = ws;
    p.warp_max[w] = wm;
  }
  const float bs = block_sum(v);
  const float bs2 = block_sum(2.0f * v);
  const float bm = block_max(v);
  if (tid == 0) {
    p.block_sum[blockIdx.x] = bs;
    p.block_sum_twice[blockIdx.x] = bs2;
    p.block_max[blockIdx.x] = bm;
  }
}

PK_KERNEL(selftest_reduction_f32, reduction_check, ReductionCheckParams)

// ---------------------------------------------------------------------------------------
// A broken kernel the emulator must fail (src/selftest/mod.rs, Broken), kept here because it
// needs arch.cuh. Same parameter block as selftest.cu's broken kernels.
struct WgmmaBrokenParams {
  float* out;
  uint32_t n;
};
PK_PARAMS_SIZE(WgmmaBrokenParams)

// A warpgroup issues a wgmma and reads its accumulators without waiting for it (an emulator
// test only: on sm_90a it would read registers the tensor cores are still writing).
__device__ void wgmma_not_waited(const WgmmaBrokenParams& p) {
  PK_DYNAMIC_SMEM(unsigned char, smem);
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  float d[64] = {};
  const uint64_t tile = wgmma_descriptor(smem);
  wgmma_fence(d);
  wgmma_m64n128k16<__nv_bfloat16>(d, tile, tile, false);
  wgmma_commit();
  if (i < p.n) p.out[i] = d[0];
}
PK_KERNEL(selftest_broken_wgmma_not_waited, wgmma_not_waited, WgmmaBrokenParams)
