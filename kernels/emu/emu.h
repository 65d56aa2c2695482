// The CUDA emulation header: force-included (g++ -include) before every kernels/*.cu when
// the crate is built with the `emulator` feature, so the kernels' own sources compile as
// host C++20 and run on the CPU with the GPU's grid, block, shared-memory and warp
// semantics. The runtime behind it is kernels/emu/runtime.cpp.
//
// Execution model
// - Every CUDA thread is a fiber (64 KiB stack with a guard page below it; overflowing it
//   crashes with SIGSEGV instead of corrupting memory). One OS thread runs one block at a
//   time, its fibers switched cooperatively in round-robin order of the linear thread
//   index: a fiber runs until it waits at a barrier or a warp operation, or exits (the
//   last to arrive at a barrier carries on). Blocks run in order on the launching thread
//   by default; with emu_set_workers(n) (or PEFT_KERNELS_EMU_WORKERS=n) a pool of n OS
//   threads runs them, each worker with its own fibers, shared memory and dynamic shared
//   memory.
// - `__shared__` is `thread_local`: a block-scope thread_local is static, so all fibers
//   of a block (which run on one OS thread) share it, and concurrent workers do not.
//   Static shared memory keeps its contents from the previous block (the GPU makes no
//   promise either). Dynamic shared memory (PK_DYNAMIC_SMEM) is poisoned with 0xFF bytes
//   at every block start, so reading it before writing it gives NaN floats.
// - Fibers never resume on another OS thread, so thread_local state is per block.
//
// What the emulator reports as a failed launch (emu_launch_* returns nonzero and
// emu_last_error() says why, naming the block and thread; the launch stops, no further
// block starts, and the next launch on any thread runs normally):
// - __syncthreads() (and the _count/_and/_or forms) not reached by every thread of the
//   block: a thread exited while others wait at it, or reached it while a warp mate
//   waits for it in a warp operation; threads waiting at different barrier kinds;
// - a warp operation whose mask is not exactly the set of lanes that arrive: the caller
//   not in the mask; the mask naming lanes that do not exist, have exited or wait at
//   __syncthreads; a lane of the mask exiting or reaching __syncthreads instead; two
//   groups of lanes waiting for each other in different warp operations (a lane may
//   finish an earlier operation under another mask first: lanes that diverged may
//   reconverge); __shfl reading a lane outside the mask; a `width` that is not a power
//   of two in [1, 32];
// - a deadlock: no fiber can proceed (a longer cycle of warp operations);
// - a launch over the device limits: more than 1024 threads per block, block dims over
//   (1024, 1024, 64), grid.x over 2^31 - 1, grid.y or grid.z over 65535, a zero
//   dimension, dynamic shared memory over 227 KiB (232448 bytes), more threads than the
//   kernel's PK_KERNEL_BOUNDS;
// - emu::fail() called by an emulated primitive (kernels/arch.cuh) that was misused.
// A memory fault (SIGSEGV / SIGBUS) inside a kernel, such as an out-of-bounds access or a
// fiber overflowing its stack, still kills the process, but first prints the kernel, the
// block, the thread and the address to stderr (the runtime chains to the handler that was
// installed before it, e.g. Rust's).
// Static shared memory (the GPU's 48 KiB static limit) cannot be measured on the host:
// ptxas enforces it when the kernels are built for the GPU, and CI builds every kernel
// with nvcc.
//
// The checks (opt-in; kernels/emu/check.cpp, emu::check below): memcheck, racecheck and
// initcheck run a launch on an instrumented copy of the kernels and fail it on an access
// outside the launch's buffers or shared memory, a shared-memory hazard between barriers,
// a global hazard between blocks, or a read of memory nothing wrote.
//
// What it cannot see: without racecheck, a missing __syncthreads() between a
// shared-memory write and another thread's read (the fixed round-robin order usually
// turns such a race into a wrong answer, but not always); two branches of one warp calling the same warp
// operation at different call sites (they are matched like Volta's independent thread
// scheduling would), or threads of a block reaching __syncthreads() at different call
// sites (counted as one barrier; the GPU requires one call site); threads spinning on memory
// another block or thread writes (fibers are not preempted, so such a kernel hangs); a
// missing wgmma_fence or fence_proxy_async_shared (no-ops here), or a missing
// grid_dependency_wait (launches run one after another here).
//
// Kernel code may use the names below as CUDA provides them: keywords (__global__,
// __device__, __shared__, __launch_bounds__, __align__ ...), threadIdx / blockIdx /
// blockDim / gridDim / warpSize, the vector types (float2, float4, int4, uint4 ...), the
// block and warp primitives, atomics and the math builtins.
#pragma once

#ifndef PK_EMULATOR
#error "kernels/emu/emu.h is the emulator's header; build with -DPK_EMULATOR=1"
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---------------------------------------------------------------------------------------
// Keywords. (`__noinline__` is deliberately absent: libstdc++ spells the GCC attribute
// `__attribute__((__noinline__))`, which a macro of that name would break.)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `__restrict__` is a GCC keyword already.

// ---------------------------------------------------------------------------------------
// CUDA's built-in vector types, with the GPU's sizes and alignments.
#define EMU_VECTOR_TYPES(T, name, a2, a4)                            \
  struct name##1 { T x; };                                           \
  struct alignas(a2) name##2 { T x, y; };                            \
  struct name##3 { T x, y, z; };                                     \
  struct alignas(a4) name##4 { T x, y, z, w; };                      \
  inline name##1 make_##name##1(T x) { return {x}; }                 \
  inline name##2 make_##name##2(T x, T y) { return {x, y}; }         \
  inline name##3 make_##name##3(T x, T y, T z) { return {x, y, z}; } \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }
EMU_VECTOR_TYPES(signed char, char, 2, 4)
EMU_VECTOR_TYPES(unsigned char, uchar, 2, 4)
EMU_VECTOR_TYPES(short, short, 4, 8)
EMU_VECTOR_TYPES(unsigned short, ushort, 4, 8)
EMU_VECTOR_TYPES(int, int, 8, 16)
EMU_VECTOR_TYPES(unsigned int, uint, 8, 16)
EMU_VECTOR_TYPES(long long, longlong, 16, 16)
EMU_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
EMU_VECTOR_TYPES(float, float, 8, 16)
EMU_VECTOR_TYPES(double, double, 16, 16)
#undef EMU_VECTOR_TYPES
static_assert(sizeof(float4) == 16 && alignof(float4) == 16);
static_assert(sizeof(uint2) == 8 && alignof(uint2) == 8);

// dim3: uint3 with constructors defaulting to 1, as in CUDA.
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

#include "fp16.h"

// ---------------------------------------------------------------------------------------
// The runtime API (kernels/emu/runtime.cpp).
namespace emu {

// Grid or block dimensions in the exported C ABI (emu_launch_<name>).
struct Dim3 {
  uint32_t x, y, z;
};

// The per-fiber registers the builtins read.
struct ThreadRegs {
  uint3 thread_idx;
  unsigned linear;  // x + y·blockDim.x + z·blockDim.x·blockDim.y
  unsigned lane;    // linear % 32
  // The fiber's stack, [stack_lo, stack_hi): accesses there are the thread's own.
  const char* stack_lo;
  const char* stack_hi;
};

namespace detail {
// The running fiber's registers and the running block's coordinates, per OS thread.
extern thread_local constinit const ThreadRegs* tl_thread;
extern thread_local constinit uint3 tl_block_idx;
extern thread_local constinit dim3 tl_block_dim;
extern thread_local constinit dim3 tl_grid_dim;

// Kinds of __syncthreads: the plain barrier and its reducing forms.
enum class Barrier : int { Sync, Count, And, Or };
int block_barrier(Barrier kind, int predicate);

// The warp collective behind every warp operation. Each lane in `mask` calls it with
// `size` bytes at `mine`. `want` = a lane: `out` receives that lane's value; `want` =
// -1: `out` is an array of 32 slots of `size` bytes and receives every lane of the mask
// in its own slot (the others untouched). `what` names the operation in errors, and
// lanes meeting in one collective must name the same operation.
void warp_collective(const char* what, unsigned mask, const void* mine, unsigned size,
                     int want, void* out);
// The source lane of the caller's shuffle (PTX shfl.sync semantics; fails unless `width`
// is a power of two in [1, 32]). warp_collective checks that it is in the mask.
enum class Shfl : int { Idx, Up, Down, Xor };
unsigned shfl_source(const char* what, Shfl mode, int operand, int width);
// The lanes of the caller's warp that exist, have not exited and do not wait at
// __syncthreads.
unsigned active_mask();

using Body = void (*)(const void* ctx);
// Runs `body(ctx)` on every thread of the grid; 0 on success, else the message is in
// emu_last_error(). max_threads: the kernel's launch bounds (0 = none). `name` (the
// kernel's) appears in the report of a memory fault inside the kernel. `ctx` holds
// `ctx_bytes` bytes (the parameter block, which the checks let kernels read).
int launch(const char* name, Dim3 grid, Dim3 block, uint32_t dynamic_smem,
           unsigned max_threads, Body body, const void* ctx, size_t ctx_bytes);
// Records `message` as the calling thread's last error; returns 1.
int launch_error(const char* message);
}  // namespace detail

// The one instrumented access path (kernels/emu/check.cpp). Kernels built into the checked
// copy of the library (build/emulator.rs) report every load and store here through the
// compiler's instrumentation; the runtime's own primitives that touch a kernel's memory
// outside instrumented code (cp.async copies, wgmma operands) report theirs explicitly,
// only while a checked launch runs. Plain launches never get here.
namespace check {
enum : unsigned { kRead = 1, kWrite = 2, kAtomic = 4 };
// An access of `bytes` bytes at `p` by the running thread; `pc` is the instruction's
// return address (the call site), for tools that group a warp's accesses by instruction.
void access(const void* p, size_t bytes, unsigned kind, const void* pc);
// Whether the launch running on this OS thread is checked.
bool active();
// Brackets an atomic operation: its accesses are reported as atomic (racecheck ignores
// them; memcheck still applies).
void atomic_begin();
void atomic_end();
// For the profile mode (kernels/emu/profile.cpp), from the emulated tensor-core
// instructions of the checked copy (arch.cuh): brackets the operand reads of an instruction
// counted as a whole (ldmatrix), which are checked but not counted as plain loads; one
// ldmatrix of the calling warp (its lanes' 8·num row addresses; called by one lane); one
// tensor-core instruction of `flops` (2·m·n·k; called by one lane of the warp, or thread
// of the warpgroup).
void operand_begin();
void operand_end();
void ldmatrix(const void* const* rows, int num);
// One vector access of `bytes` at `p` by the calling thread, for the profile only, at the
// instruction that calls this (its return address): the access as the GPU issues it, whose
// copy the host compiler may split (bracketed by operand_begin/end).
void vector_access(const void* p, unsigned bytes, unsigned kind);
void tensor(uint64_t flops, bool wgmma);
}  // namespace check

// The calling thread's lane (threadIdx linearised, modulo 32).
inline unsigned lane_id() { return detail::tl_thread->lane; }

// Warp-collective exchange: every lane in `mask` contributes `mine`; on return all[l]
// holds lane l's value for every l in mask (the other slots are untouched). Fails the
// launch unless `mask` is exactly the set of lanes that arrive.
template <class T>
inline void warp_exchange(const T& mine, T (&all)[32], unsigned mask) {
  static_assert(std::is_trivially_copyable_v<T>);
  detail::warp_collective("warp_exchange", mask, &mine, sizeof(T), -1, all);
}

// Asynchronous copies (cp.async): queued per thread and performed at the wait, so a
// kernel that reads the destination before waiting sees stale data on the CPU too.
// bytes ∈ {4, 8, 16}, both pointers aligned to it; src_bytes < bytes zero-fills the rest.
void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
// Closes the current group of this thread's copies.
void cp_async_commit();
// Performs every committed group but the newest `n`.
void cp_async_wait(int n);

// Warpgroup MMA (wgmma.mma_async, arch.cuh): queued per thread and computed from shared
// memory at the wait that retires its group, so a kernel that overwrites an operand tile or
// reads the accumulators before waiting sees the wrong values on the CPU too. `d` is the
// thread's accumulator fragment of an m64nNk16 tile (n = N/2 floats); the descriptors are
// the 64-bit matrix descriptors of the PTX ISA (only K-major tiles with the 128-byte
// swizzle are emulated; anything else fails the launch). Every thread of a warpgroup must
// issue the same operations with the same operands, or the launch fails. The fences
// (wgmma.fence, fence.proxy.async) are no-ops here: leaving one out passes on the CPU.
void wgmma_mma_async(float* d, unsigned n, uint64_t desc_a, uint64_t desc_b, bool scale_d,
                     bool bf16);
// Closes the current group of this thread's wgmma operations.
void wgmma_commit();
// Performs every committed group but the newest `n`.
void wgmma_wait(int n);
// The shared-window address (cvta.to.shared) of p, which must lie in the block's dynamic
// shared memory; the window starts at the dynamic shared memory here.
uint32_t shared_address(const void* p);

// Aborts the launch with a message (printf format); the block and thread are prepended.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// This block's dynamic shared memory: a per-worker buffer, 128-byte aligned, filled with
// 0xFF bytes at every block start; null when the launch asked for none. It ends at a
// guard page, so an access past the launch's size (rounded up to 128 bytes) faults.
void* dynamic_smem();

// The emulated launch behind PK_KERNEL: copies the params block args[0] and runs
// fn(params) on every thread.
template <class Params>
int launch(const char* name, void (*fn)(const Params&), Dim3 grid, Dim3 block,
           uint32_t dynamic_smem, void** args, unsigned max_threads = 0) {
  static_assert(std::is_trivially_copyable_v<Params>, "kernel params must be a plain struct");
  if (args == nullptr || args[0] == nullptr)
    return detail::launch_error("launch: args[0] (the params block) is null");
  struct Bound {
    void (*fn)(const Params&);
    Params params;
  } bound;
  bound.fn = fn;
  std::memcpy(&bound.params, args[0], sizeof(Params));
  return detail::launch(
      name, grid, block, dynamic_smem, max_threads,
      [](const void* ctx) {
        const Bound& b = *static_cast<const Bound*>(ctx);
        b.fn(b.params);
      },
      &bound, sizeof bound);
}

}  // namespace emu

extern "C" {
// The message of the last failed launch on the calling OS thread ("" if none).
const char* emu_last_error(void);
// Worker OS threads per launch; 0 restores the default (PEFT_KERNELS_EMU_WORKERS, else 1).
void emu_set_workers(uint32_t n);
}

// ---------------------------------------------------------------------------------------
// Built-in variables.
#define threadIdx (::emu::detail::tl_thread->thread_idx)
#define blockIdx (::emu::detail::tl_block_idx)
#define blockDim (::emu::detail::tl_block_dim)
#define gridDim (::emu::detail::tl_grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// Block and warp primitives.
inline void __syncthreads() { emu::detail::block_barrier(emu::detail::Barrier::Sync, 1); }
inline int __syncthreads_count(int p) {
  return emu::detail::block_barrier(emu::detail::Barrier::Count, p);
}
inline int __syncthreads_and(int p) {
  return emu::detail::block_barrier(emu::detail::Barrier::And, p);
}
inline int __syncthreads_or(int p) {
  return emu::detail::block_barrier(emu::detail::Barrier::Or, p);
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  emu::detail::warp_collective("__syncwarp", mask, nullptr, 0, -1, nullptr);
}
// The lanes of the warp that exist, have not exited and do not wait at __syncthreads
// (the emulator cannot know which lanes took the caller's branch).
inline unsigned __activemask() { return emu::detail::active_mask(); }

namespace emu::detail {
// The votes of the lanes in `mask`, one bit each. `what` is the caller's own name, so that
// lanes meeting in different vote operations (vote.any against vote.all) fail as any
// other mismatched warp operations do.
inline unsigned vote(const char* what, unsigned mask, int predicate) {
  int all[32];
  warp_collective(what, mask, &predicate, sizeof(int), -1, all);
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && all[l]) bits |= 1u << l;
  return bits;
}
}  // namespace emu::detail

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return emu::detail::vote("__ballot_sync", mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
  return emu::detail::vote("__any_sync", mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return emu::detail::vote("__all_sync", mask, predicate) == mask;
}

namespace emu::detail {
template <class T>
inline T shfl(const char* what, Shfl mode, unsigned mask, T var, int operand, int width) {
  static_assert(std::is_trivially_copyable_v<T>);
  const unsigned src = shfl_source(what, mode, operand, width);
  alignas(T) unsigned char out[sizeof(T)];
  warp_collective(what, mask, &var, sizeof(T), int(src), out);
  T result;
  std::memcpy(&result, out, sizeof(T));
  return result;
}
}  // namespace emu::detail

// Any trivially copyable T (CUDA has overloads for the 2-, 4- and 8-byte types).
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return emu::detail::shfl("__shfl_sync", emu::detail::Shfl::Idx, mask, var, src_lane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::detail::shfl("__shfl_up_sync", emu::detail::Shfl::Up, mask, var, int(delta),
                           width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::detail::shfl("__shfl_down_sync", emu::detail::Shfl::Down, mask, var, int(delta),
                           width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return emu::detail::shfl("__shfl_xor_sync", emu::detail::Shfl::Xor, mask, var, lane_mask,
                           width);
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { emu::fail("__trap() called"); }

// ---------------------------------------------------------------------------------------
// Atomics: real atomics (relaxed, as on the GPU), so concurrent workers are safe too.
namespace emu::detail {
constexpr auto kRelaxed = std::memory_order_relaxed;
template <class T>
inline std::atomic_ref<T> atomic(T* p) {
  return std::atomic_ref<T>(*p);
}
// *p = op(*p) by compare-and-swap; returns the old value.
template <class T, class Op>
inline T atomic_update(T* p, Op op) {
  auto a = atomic(p);
  T old = a.load(kRelaxed);
  while (!a.compare_exchange_weak(old, op(old), kRelaxed)) {
  }
  return old;
}
}  // namespace emu::detail

// In the checked copy every atomic is bracketed, so that its accesses count as atomic.
#ifdef PK_EMU_CHECKED
namespace emu::detail {
struct AtomicScope {
  AtomicScope() { ::emu::check::atomic_begin(); }
  ~AtomicScope() { ::emu::check::atomic_end(); }
};
}  // namespace emu::detail
#define EMU_ATOMIC_SCOPE const ::emu::detail::AtomicScope emu_atomic_scope_;
#else
#define EMU_ATOMIC_SCOPE
#endif
#define EMU_ATOMIC(name, T, method)                                            \
  inline T name(T* p, T v) {                                                   \
    EMU_ATOMIC_SCOPE                                                           \
    return emu::detail::atomic(p).method(v, emu::detail::kRelaxed);            \
  }
#define EMU_ATOMIC_UPDATE(name, T, expr)                                       \
  inline T name(T* p, T v) {                                                   \
    EMU_ATOMIC_SCOPE                                                           \
    return emu::detail::atomic_update(p, [v](T old) { return expr; });         \
  }
#define EMU_ATOMIC_INTEGER(T)                              \
  EMU_ATOMIC(atomicAdd, T, fetch_add)                      \
  EMU_ATOMIC(atomicAnd, T, fetch_and)                      \
  EMU_ATOMIC(atomicOr, T, fetch_or)                        \
  EMU_ATOMIC(atomicXor, T, fetch_xor)                      \
  EMU_ATOMIC(atomicExch, T, exchange)                      \
  EMU_ATOMIC_UPDATE(atomicMax, T, old < v ? v : old)       \
  EMU_ATOMIC_UPDATE(atomicMin, T, v < old ? v : old)       \
  inline T atomicCAS(T* p, T compare, T v) {               \
    EMU_ATOMIC_SCOPE                                       \
    emu::detail::atomic(p).compare_exchange_strong(compare, v, emu::detail::kRelaxed); \
    return compare;                                        \
  }
EMU_ATOMIC_INTEGER(int)
EMU_ATOMIC_INTEGER(unsigned)
EMU_ATOMIC_INTEGER(unsigned long long)
EMU_ATOMIC_UPDATE(atomicMax, long long, old < v ? v : old)
EMU_ATOMIC_UPDATE(atomicMin, long long, v < old ? v : old)
EMU_ATOMIC(atomicSub, int, fetch_sub)
EMU_ATOMIC(atomicSub, unsigned, fetch_sub)
EMU_ATOMIC(atomicAdd, float, fetch_add)
EMU_ATOMIC(atomicAdd, double, fetch_add)
EMU_ATOMIC(atomicExch, float, exchange)
// atomicInc / atomicDec wrap as the GPU's do: to 0 past `v`; to `v` from 0 or above v.
EMU_ATOMIC_UPDATE(atomicInc, unsigned, old >= v ? 0u : old + 1)
EMU_ATOMIC_UPDATE(atomicDec, unsigned, (old == 0 || old > v) ? v : old - 1)
#undef EMU_ATOMIC
#undef EMU_ATOMIC_UPDATE
#undef EMU_ATOMIC_INTEGER
#undef EMU_ATOMIC_SCOPE

// ---------------------------------------------------------------------------------------
// Math builtins. The float functions of <cmath> (expf, logf, sqrtf, fmaxf, tanhf, erff,
// fmaf, …) are the host's; the fast-math intrinsics below map to the accurate function
// (the GPU's are approximations, so kernels' tolerances must allow for either).
// Performance note: the host build does not assume FMA hardware, so fmaf / __fmaf_rn are
// exact but a libm call each; a hot loop written `acc += a * b` runs several times faster
// here and is the same FFMA on the GPU (nvcc contracts it by default).
// CUDA's math.h declares the classification functions in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline unsigned __float2uint_rn(float x) { return unsigned(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }

inline int __popc(unsigned v) { return std::popcount(v); }
inline int __popcll(unsigned long long v) { return std::popcount(v); }
inline int __clz(int v) { return std::countl_zero(unsigned(v)); }
inline int __clzll(long long v) { return std::countl_zero((unsigned long long)v); }
inline int __ffs(int v) { return v == 0 ? 0 : std::countr_zero(unsigned(v)) + 1; }
inline int __ffsll(long long v) {
  return v == 0 ? 0 : std::countr_zero((unsigned long long)v) + 1;
}
inline unsigned __brev(unsigned v) {
  v = (v >> 1 & 0x55555555u) | (v & 0x55555555u) << 1;
  v = (v >> 2 & 0x33333333u) | (v & 0x33333333u) << 2;
  v = (v >> 4 & 0x0F0F0F0Fu) | (v & 0x0F0F0F0Fu) << 4;
  return __builtin_bswap32(v);
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((unsigned long long)a * b >> 32);
}
inline int __mulhi(int a, int b) { return int((long long)a * b >> 32); }

// Read-only / streaming loads and stores: plain accesses on the host.
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}

// CUDA's min/max overloads (device code calls them unqualified). Mixed signed/unsigned
// int pairs compare as unsigned, like CUDA's.
#define EMU_MINMAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }     \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
#undef EMU_MINMAX
inline unsigned min(int a, unsigned b) { return min(unsigned(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, unsigned(b)); }
inline unsigned max(int a, unsigned b) { return max(unsigned(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, unsigned(b)); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
