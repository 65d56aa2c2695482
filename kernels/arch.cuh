// Architecture primitives: the only file with inline PTX. Each primitive has the GPU
// form (sm_80 and newer) and, under PK_EMULATOR, a twin that follows the PTX ISA's
// documented semantics exactly, fragment layouts included, so a kernel that passes the
// wrong lane's data or reads an async copy before waiting fails on the CPU as well.
// Included through common.cuh.
//
// Fragment layout of mma.m16n8k16 (row.col), with g = lane / 4 and t = lane % 4; each
// 32-bit register holds two 16-bit elements, the lower index in the low half:
//   A (16×16, row-major)  a[0]: (g,   2t..2t+1)   a[1]: (g+8, 2t..2t+1)
//                         a[2]: (g,   2t+8..+9)   a[3]: (g+8, 2t+8..+9)
//   B (16×8, k × n)       b[0]: (k = 2t..2t+1, n = g)   b[1]: (k = 2t+8..+9, n = g)
//   C, D (16×8, f32)      c[0], c[1]: (g, 2t), (g, 2t+1)   c[2], c[3]: (g+8, 2t), (g+8, 2t+1)
// ldmatrix (m8n8, b16): lanes 8i..8i+7 give the addresses of the rows 0..7 of matrix i
// (16 bytes each, 16-byte aligned, in shared memory); r[i] receives from matrix i the
// elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of lane l, or with .trans the elements
// (2(l%4), l/4) and (2(l%4)+1, l/4). So x4 over a 16×16 tile whose lane l points at
// row l%16, column 8(l/16) yields an A fragment; over a B tile stored n × k (k
// contiguous) it yields B fragments, and .trans over one stored k × n does.
#pragma once

#ifndef PK_INLINE
#error "include common.cuh, which includes arch.cuh"
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "peft-kernels needs sm_80 or newer (mma.sync m16n8k16 bf16, cp.async)"
#endif

#ifdef PK_EMULATOR

namespace emu::arch {

template <bool kBf16>
inline float b16_to_float(uint32_t reg, unsigned high) {
  const uint16_t bits = uint16_t(reg >> (16 * high));
  if constexpr (kBf16) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: a warp collective.
// Each product of two 16-bit floats is exact in f32; the 16 products are summed in k
// order in f32 and the sum added to c (the GPU's tensor cores sum with their own
// internal precision, so results agree to f32 rounding, not bit for bit).
template <bool kBf16>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  struct Operands {
    uint32_t a[4], b[2];
  } mine, all[32];
  for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
  for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
  warp_exchange(mine, all, 0xFFFFFFFFu);
  const unsigned lane = lane_id(), g = lane / 4, t = lane % 4;
  float out[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + (i & 1);
    float sum = 0.0f;
    for (unsigned k = 0; k < 16; ++k) {
      // A(row, k): lane (row % 8)·4 + (k % 8)/2, register (row ≥ 8) + 2·(k ≥ 8), half k & 1.
      const float av = b16_to_float<kBf16>(
          all[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k & 1);
      // B(k, col): lane col·4 + (k % 8)/2, register (k ≥ 8), half k & 1.
      const float bv = b16_to_float<kBf16>(all[col * 4 + (k % 8) / 2].b[k / 8], k & 1);
      sum += av * bv;
    }
    out[i] = c[i] + sum;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x{kNum}{.trans}.shared.b16: a warp collective.
template <int kNum, bool kTrans>
inline void ldmatrix(uint32_t* r, const void* row_ptr) {
  const void* rows[32];
  warp_exchange(row_ptr, rows, 0xFFFFFFFFu);
  for (int i = 0; i < 8 * kNum; ++i)
    if (reinterpret_cast<uintptr_t>(rows[i]) % 16 != 0)
      fail("ldmatrix: lane %d's row address %p is not 16-byte aligned", i, rows[i]);
  const unsigned lane = lane_id();
  for (int m = 0; m < kNum; ++m) {
    const char* const* mat = reinterpret_cast<const char* const*>(rows + 8 * m);
    if constexpr (!kTrans) {
      std::memcpy(&r[m], mat[lane / 4] + 4 * (lane % 4), 4);
    } else {
      uint16_t lo, hi;
      std::memcpy(&lo, mat[2 * (lane % 4)] + 2 * (lane / 4), 2);
      std::memcpy(&hi, mat[2 * (lane % 4) + 1] + 2 * (lane / 4), 2);
      r[m] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}

}  // namespace emu::arch

#endif  // PK_EMULATOR

// ---------------------------------------------------------------------------------------
// Tensor-core matrix multiply-accumulate, f32 accumulators: D = A·B + C over a 16×8×16
// tile held by the warp (layout above). Every lane of the warp must call it together.

PK_INLINE void mma_m16n8k16_f32_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                    const float c[4]) {
#ifdef PK_EMULATOR
  emu::arch::mma_m16n8k16<false>(d, a, b, c);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

PK_INLINE void mma_m16n8k16_f32_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                     const float c[4]) {
#ifdef PK_EMULATOR
  emu::arch::mma_m16n8k16<true>(d, a, b, c);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

// The one matching the element type T (__half or __nv_bfloat16), for templated kernels.
template <typename T>
PK_INLINE void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                            const float c[4]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    mma_m16n8k16_f32_bf16(d, a, b, c);
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_m16n8k16: T must be __half or __nv_bfloat16");
    mma_m16n8k16_f32_f16(d, a, b, c);
  }
}

// ---------------------------------------------------------------------------------------
// ldmatrix: 1, 2 or 4 8×8 matrices of 16-bit elements from shared memory into r[0..N-1]
// (layout above). Every lane of the warp must call it together and pass an address (for
// x1 only lanes 0..7 are used, for x2 lanes 0..15).

#ifndef PK_EMULATOR
PK_INLINE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

PK_INLINE void ldmatrix_x1(uint32_t* r, const void* smem_row) {
#ifdef PK_EMULATOR
  emu::arch::ldmatrix<1, false>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_addr(smem_row)));
#endif
}

PK_INLINE void ldmatrix_x2(uint32_t* r, const void* smem_row) {
#ifdef PK_EMULATOR
  emu::arch::ldmatrix<2, false>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
#endif
}

PK_INLINE void ldmatrix_x4(uint32_t* r, const void* smem_row) {
#ifdef PK_EMULATOR
  emu::arch::ldmatrix<4, false>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
#endif
}

PK_INLINE void ldmatrix_x1_trans(uint32_t* r, const void* smem_row) {
#ifdef PK_EMULATOR
  emu::arch::ldmatrix<1, true>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(smem_addr(smem_row)));
#endif
}

PK_INLINE void ldmatrix_x2_trans(uint32_t* r, const void* smem_row) {
#ifdef PK_EMULATOR
  emu::arch::ldmatrix<2, true>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
#endif
}

PK_INLINE void ldmatrix_x4_trans(uint32_t* r, const void* smem_row) {
#ifdef PK_EMULATOR
  emu::arch::ldmatrix<4, true>(r, smem_row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
#endif
}

// ---------------------------------------------------------------------------------------
// cp.async (cache-global, 16 bytes): global → shared without staging in registers. A
// thread's copies are grouped by cp_async_commit(); cp_async_wait<N>() returns once all
// but the newest N of its committed groups have landed. The data is then visible to the
// issuing thread only: __syncthreads() before other threads read it. The emulator
// performs the copies at the wait, so reading the destination earlier sees stale data.

// Copy 16 bytes; both addresses 16-byte aligned.
PK_INLINE void cp_async_16(void* smem, const void* gmem) {
#ifdef PK_EMULATOR
  emu::cp_async(smem, gmem, 16, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
#endif
}

// Copy the first `src_bytes` (0..16) bytes and zero the rest of the 16: ragged edges.
// With src_bytes = 0 nothing is read, but pass a valid address anyway (the matrix base).
PK_INLINE void cp_async_16_zfill(void* smem, const void* gmem, uint32_t src_bytes) {
#ifdef PK_EMULATOR
  emu::cp_async(smem, gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
#endif
}

PK_INLINE void cp_async_commit() {
#ifdef PK_EMULATOR
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int kPending>
PK_INLINE void cp_async_wait() {
  static_assert(kPending >= 0);
#ifdef PK_EMULATOR
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Commits the open group and waits for every copy of this thread.
PK_INLINE void cp_async_wait_all() {
#ifdef PK_EMULATOR
  emu::cp_async_commit();
  emu::cp_async_wait(0);
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90). A kernel launched with programmatic stream
// serialization (`Launch::overlap_previous`, src/cuda/mod.rs) may start while the kernel
// before it on the stream still runs. grid_dependency_wait() holds the calling thread until
// that kernel has completed and its memory operations are visible: a thread calls it before
// reading anything the previous kernel writes and before writing anything it reads.
// allow_dependent_launch() lets such a next kernel start once every block of this one has
// called it (or exited). Both are no-ops in a kernel not launched that way, and compiled out
// below sm_90 (the host launches normally there: src/cuda/mod.rs) and in the emulator, which
// runs launches one after another.

PK_INLINE void grid_dependency_wait() {
#if !defined(PK_EMULATOR) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

PK_INLINE void allow_dependent_launch() {
#if !defined(PK_EMULATOR) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
