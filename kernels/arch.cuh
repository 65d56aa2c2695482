// Architecture primitives: the only file with inline PTX. Each primitive has the GPU
// form (sm_80 and newer; the dependent launch sm_90, wgmma sm_90a only) and, under
// PK_EMULATOR, a twin that follows the PTX ISA's
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
// One lane's fragments, each 16-bit element converted to f32 (exact): a[2r + h] is half h of
// register a[r], likewise b.
struct MmaOperands {
  float a[8], b[4];
};

// The products of one lane's four outputs from the warp's exchanged fragments (the lanes'
// registers, on the thread's own stack). The checked copy leaves these reads (128 per lane
// and instruction, most of a profiled GEMM's instrumented accesses) uninstrumented: the
// instrumentation would find them the thread's own and count nothing.
#ifdef PK_EMU_CHECKED
__attribute__((no_sanitize_address, noinline))
#endif
inline void mma_products(const MmaOperands* all, unsigned lane, float sums[4]) {
  const unsigned g = lane / 4, t = lane % 4;
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + (i & 1);
    float sum = 0.0f;
    for (unsigned k = 0; k < 16; ++k) {
      // A(row, k): lane (row % 8)·4 + (k % 8)/2, register (row ≥ 8) + 2·(k ≥ 8), half k & 1.
      const float av = all[(row % 8) * 4 + (k % 8) / 2].a[2 * (row / 8 + 2 * (k / 8)) + (k & 1)];
      // B(k, col): lane col·4 + (k % 8)/2, register (k ≥ 8), half k & 1.
      const float bv = all[col * 4 + (k % 8) / 2].b[2 * (k / 8) + (k & 1)];
      sum += av * bv;
    }
    sums[i] = sum;
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: a warp collective.
// Each product of two 16-bit floats is exact in f32; the 16 products are summed in k
// order in f32 and the sum added to c (the GPU's tensor cores sum with their own
// internal precision, so results agree to f32 rounding, not bit for bit).
template <bool kBf16>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  MmaOperands mine, all[32];
  for (unsigned h = 0; h < 2; ++h) {
    for (unsigned i = 0; i < 4; ++i) mine.a[2 * i + h] = b16_to_float<kBf16>(a[i], h);
    for (unsigned i = 0; i < 2; ++i) mine.b[2 * i + h] = b16_to_float<kBf16>(b[i], h);
  }
  warp_exchange(mine, all, 0xFFFFFFFFu);
  const unsigned lane = lane_id();
#ifdef PK_EMU_CHECKED
  if (lane == 0) check::tensor(2 * 16 * 8 * 16, false);  // the profile's count
#endif
  float sums[4];
  mma_products(all, lane, sums);
  float out[4];
  for (unsigned i = 0; i < 4; ++i) out[i] = c[i] + sums[i];
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
#ifdef PK_EMU_CHECKED
  // The profile counts the instruction by its phases (one per matrix), not the reads below.
  if (lane == 0) check::ldmatrix(rows, kNum);
  check::operand_begin();
#endif
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
#ifdef PK_EMU_CHECKED
  check::operand_end();
#endif
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

// ---------------------------------------------------------------------------------------
// Warpgroup MMA (Hopper, sm_90a): wgmma.mma_async, both operands in shared memory, f32
// accumulators in registers. A warpgroup is 4 consecutive warps (128 threads, the first
// warp's index a multiple of 4); all 128 threads issue every wgmma operation together.
//
// The one operand layout used here: K-major tiles whose rows are 64 16-bit elements (128
// bytes) with the 128-byte swizzle: row r of a tile at bytes [128r, 128r + 128), its 16-byte
// chunk c stored at chunk c ^ (r % 8); every tile starts 1024-byte aligned in the shared
// window (the swizzle is applied to shared addresses). Its matrix descriptor (PTX ISA,
// "Matrix Descriptor Format"): bits 0–13 start address >> 4; 16–29 leading byte offset >> 4
// (not used by swizzled K-major tiles: 1); 32–45 stride byte offset >> 4 (1024 B between
// groups of 8 rows: 64); 49–51 base offset (0: tiles 1024-aligned); 62–63 swizzle (1: 128 B).
// The k-step of 16 elements at column 16s starts 32s bytes into the row: descriptor + 2s.
//
// Accumulator fragment of m64nNk16 (f32): thread t of the warpgroup, w = t / 32,
// g = (t % 32) / 4, q = t % 4 holds d[4j + e] = D[16w + g + 8(e / 2)][8j + 2q + e % 2]
// for j < N / 8, the m16n8 C layout of this file's header tiled over N; so 4 warps × 16 rows.
//
// Ordering (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"): shared
// memory written by ordinary stores or cp.async must be fenced for the async proxy
// (fence_proxy_async_shared, by the writing threads, before the barrier that publishes it);
// wgmma_fence before the first wgmma of a batch orders the accumulator registers; the
// results are in the registers, and the operand tiles free, only after the wgmma_wait that
// retires their group. The register pins (pin_registers) stop the compiler from moving
// accesses to the accumulators across a wait it cannot see them in.
//
// Only sm_90a has these instructions: compiled elsewhere (the sm_80 cubin, the compute_90
// PTX) they trap, and the host refuses to launch a kernel that uses them there
// (src/cuda/mod.rs).

#if defined(PK_EMULATOR) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_WGMMA_AVAILABLE 1
#endif

// The shared-window address of p (cvta.to.shared): in the emulator, its offset in the
// block's dynamic shared memory.
PK_INLINE uint32_t shared_window_address(const void* p) {
#ifdef PK_EMULATOR
  return emu::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The matrix descriptor of a K-major, 128-byte-swizzled tile starting at `tile` (see above).
PK_INLINE uint64_t wgmma_descriptor(const void* tile) {
  return uint64_t(shared_window_address(tile) >> 4 & 0x3FFF) | uint64_t(1) << 16 |
         uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}

PK_INLINE void fence_proxy_async_shared() {
#if !defined(PK_EMULATOR) && defined(PK_WGMMA_AVAILABLE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Every accumulator register "used and redefined" here, so no access to it moves across.
template <int N>
PK_INLINE void pin_registers(float (&d)[N]) {
#ifndef PK_EMULATOR
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

template <int N>
PK_INLINE void wgmma_fence(float (&d)[N]) {
  pin_registers(d);
#if !defined(PK_EMULATOR) && defined(PK_WGMMA_AVAILABLE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

PK_INLINE void wgmma_commit() {
#ifdef PK_EMULATOR
  emu::wgmma_commit();
#elif defined(PK_WGMMA_AVAILABLE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int kPending, int N>
PK_INLINE void wgmma_wait(float (&d)[N]) {
  static_assert(kPending >= 0);
#ifdef PK_EMULATOR
  emu::wgmma_wait(kPending);
#elif defined(PK_WGMMA_AVAILABLE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
  pin_registers(d);
}

// D (+)= A·B over a 64 × 128 × 16 step: A 64 rows × 16 k at desc_a, B 128 rows (n) × 16 k at
// desc_b, both K-major; `accumulate` false overwrites D.
template <typename T>
PK_INLINE void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                bool accumulate) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "wgmma: T must be __half or __nv_bfloat16");
#ifdef PK_EMULATOR
  emu::wgmma_mma_async(d, 64, desc_a, desc_b, accumulate, kBf16);
#elif defined(PK_WGMMA_AVAILABLE)
// The 64 accumulator operands and their places in the instruction, written out once.
#define PK_WGMMA_D64_PLACES \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define PK_WGMMA_D64_OPERANDS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), \
  "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), \
  "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), \
  "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
  "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), \
  "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
  if constexpr (kBf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" PK_WGMMA_D64_PLACES
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : PK_WGMMA_D64_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate))
        : "memory");
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {" PK_WGMMA_D64_PLACES
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : PK_WGMMA_D64_OPERANDS
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate))
        : "memory");
  }
#undef PK_WGMMA_D64_PLACES
#undef PK_WGMMA_D64_OPERANDS
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)accumulate;
  __trap();
#endif
}
