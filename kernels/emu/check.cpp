// The emulator's checks: memcheck, racecheck and initcheck over the one instrumented
// access path (emu.h, emu::check).
//
// How accesses get here. The checked copy of the kernels (build/emulator.rs) is compiled
// with g++'s -fsanitize=kernel-address and an outline threshold of 0, so every load and
// store of kernel code (arch.cuh's ldmatrix and mma twins, the atomics and the memcpy
// calls included) calls __asan_{load,store}{1,2,4,8,16,N}_noabort, defined below; the
// runtime reports what it touches on a kernel's behalf (cp.async copies at the wait that
// performs them, wgmma operands). Each access is classified once (classify): the thread's
// own stack, the parameter block and the builtin registers are the thread's own and pass;
// then the block's dynamic shared memory, its static shared memory (the OS thread's static
// TLS block, where `__shared__` arrays live, minus the runtime's own thread_locals), one of
// the launch's buffers (extents from Rust: emu_check_next_launch), or nothing the launch
// may touch. The checks then act on the classified access (check_shared, check_global).
// The profile mode (profile.cpp) takes the same classified Access at the same point, so it
// counts exactly what the checks see.
//
// The race model. Shared memory, per byte: the last write and the reads since (the
// thread, the block-barrier epoch, the thread's warp-sync clock). Two accesses of different
// threads, at least one a write, are ordered when a __syncthreads completed between them
// (the epoch advanced), or when both threads are in one warp and met in a warp collective
// (__syncwarp, a shuffle, a vote, ldmatrix, mma) after the first: the GPU's rules, not the
// fiber order in which the emulator happens to run them. Global memory, per byte and
// launch: the block that wrote it and the block(s) that read it; a write by one block
// and any access by another is a hazard, unless atomic. Plans hand data from one launch
// to the next (a programmatic dependent launch included) only at launch boundaries, so
// none of those is within a launch.
#include "check.h"

#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace emu::check::rt {

thread_local constinit State* tl_state = nullptr;

// A buffer of the launch as Rust passes it (emu_check_next_launch; src/emulator/mod.rs,
// `CheckBuffer`).
struct BufferSpec {
  uint64_t addr, bytes;
  const char* name;
  size_t name_len;
  uint32_t flags;  // kWorkspace | kWritten
};

namespace {

// A zero-filled array of n T from anonymous pages: only the pages a launch touches cost
// memory or time, which matters for shadows of large buffers.
template <class T>
class ZeroArray {
 public:
  ZeroArray() = default;
  explicit ZeroArray(size_t n) : n_(n) {
    if (n == 0) return;
    void* p = mmap(nullptr, n * sizeof(T), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "peft-kernels emulator: no memory for a check's shadow\n");
      std::abort();
    }
    p_ = static_cast<T*>(p);
  }
  ZeroArray(ZeroArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  ZeroArray& operator=(ZeroArray&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~ZeroArray() {
    if (p_) munmap(p_, n_ * sizeof(T));
  }
  T& operator[](size_t i) { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// kProfile: count (profile.cpp); kSampled: profile a sample of the blocks only.
enum Check : unsigned {
  kMemcheck = 1,
  kRacecheck = 2,
  kInitcheck = 4,
  kProfile = 8,
  kSampled = 16,
};
constexpr uint32_t kWorkspace = 1, kWritten = 2;

struct Buffer {
  uintptr_t lo, hi;
  size_t spec;  // its index in the request
  std::string name;
  bool workspace, written_by_launch;
  // Racecheck, per byte: 1 + the linear block that last wrote it / read it (kMany: more
  // than one block read it), 0 = none in this launch.
  ZeroArray<uint32_t> writer, reader;
  // Initcheck of a workspace: per byte, whether a launch of the plan has written it.
  ZeroArray<uint8_t>* written = nullptr;
};
constexpr uint32_t kMany = 0xFFFFFFFFu;

// Racecheck and initcheck state of one shared byte (see the race model above). Epochs
// count barriers and block starts over the launch, so a record from an earlier block is
// older than the block's start and needs no clearing.
struct Shadow {
  uint32_t w_epoch, w_clock;
  uint32_t r_epoch, r_clock;
  uint32_t r_warps;  // the warps that read it in r_epoch
  uint16_t w_thread, r_thread;
};

enum class Space : uint8_t { Own, DynamicShared, StaticShared, Global, Outside };

struct Access {
  uintptr_t p;
  size_t bytes;
  unsigned kind;
  Space space;
  size_t index;   // Global: the buffer
  size_t offset;  // from the start of the buffer or of the shared region
};

// The static TLS block of the executable on the calling thread (x86-64 variant II: it
// ends at the thread pointer), [lo, hi).
struct TlsBlock {
  size_t size = 0;
};
int find_tls(dl_phdr_info* info, size_t, void* out) {
  if (info->dlpi_tls_modid != 1) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_TLS) {
      const size_t align = ph.p_align ? ph.p_align : 1;
      static_cast<TlsBlock*>(out)->size = (ph.p_memsz + align - 1) / align * align;
      return 1;
    }
  }
  return 0;
}

// Pending request for the next launch of this thread.
struct Request {
  unsigned checks = 0;
  bool known = false;  // whether `buffers` are all the launch may touch
  std::vector<BufferSpec> buffers;
  std::vector<std::string> names;
  // The profile's runs of a split folded into a grid dimension (emu_profile_next_runs).
  int fold_dim = 0;
  uint32_t runs = 1;
  bool runs_inner = false;
};
thread_local Request tl_request;

// The workspace bytes written by the launches of the current plan, by buffer address.
struct Plan {
  bool open = false;
  std::map<std::pair<uintptr_t, uintptr_t>, ZeroArray<uint8_t>> written;
};
thread_local Plan tl_plan;

}  // namespace

struct State {
  unsigned checks;
  const char* kernel;
  Dim3 grid, block;
  uint32_t dynamic_smem;
  uintptr_t params_lo, params_hi;
  std::vector<Buffer> buffers;  // sorted by address
  bool buffers_known;
  // Shared memory of the running block.
  uintptr_t smem_lo = 0, smem_hi = 0, smem_map_lo = 0, smem_map_hi = 0;
  uintptr_t tls_lo = 0, tls_hi = 0;
  std::vector<Shadow> smem_shadow, tls_shadow;
  uint32_t epoch = 0, block_start = 0;
  uint32_t block_id = 0;  // 1 + the linear block
  unsigned nthreads = 0;
  std::vector<uint32_t> clock;   // per thread: warp collectives it took part in
  std::vector<uint32_t> common;  // per warp, [a][b]: a's clock at a's last collective with b
  bool in_atomic = false;
  bool in_operand = false;             // operand reads of an instruction the profile counts
  prof::Launch* profile = nullptr;     // with kProfile
  std::vector<std::string> names;      // the buffers' names by spec, for the profile
};

namespace {

// The runtime's thread_locals that kernel code reads (the builtin variables): not shared.
bool runtime_tls(uintptr_t p) {
  const auto in = [p](const auto& v) {
    const auto a = reinterpret_cast<uintptr_t>(&v);
    return p >= a && p < a + sizeof v;
  };
  return in(detail::tl_thread) || in(detail::tl_block_idx) || in(detail::tl_block_dim) ||
         in(detail::tl_grid_dim);
}

const char* kind_name(unsigned kind) {
  if (kind & kAtomic) return "atomic";
  return kind & kWrite ? "write" : "read";
}

[[noreturn]] void report(const State& s, const char* check, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
[[noreturn]] void report(const State& s, const char* check, const char* fmt, ...) {
  char msg[600];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  emu::fail("%s in kernel `%s`: %s", check, s.kernel, msg);
}

void format_thread(const State& s, unsigned t, char* out, size_t cap) {
  std::snprintf(out, cap, "thread (%u,%u,%u)", t % s.block.x, t / s.block.x % s.block.y,
                t / (s.block.x * s.block.y));
}

void format_block(const State& s, uint32_t id, char* out, size_t cap) {
  const uint64_t b = id - 1;
  std::snprintf(out, cap, "block (%u,%u,%u)", unsigned(b % s.grid.x),
                unsigned(b / s.grid.x % s.grid.y), unsigned(b / (uint64_t(s.grid.x) * s.grid.y)));
}

Access classify(const State& s, uintptr_t p, size_t n, unsigned kind) {
  Access a{p, n, kind, Space::Outside, 0, 0};
  const ThreadRegs* regs = detail::tl_thread;
  const auto* c = reinterpret_cast<const char*>(p);
  if ((c >= regs->stack_lo && c < regs->stack_hi) ||
      (p >= uintptr_t(regs) && p < uintptr_t(regs + 1)) ||
      (p >= s.params_lo && p < s.params_hi)) {
    a.space = Space::Own;
  } else if (p >= s.smem_map_lo && p < s.smem_map_hi) {
    a.space = Space::DynamicShared;
    a.offset = p - s.smem_lo;  // wraps below the launch's part: caught as out of range
  } else if (p >= s.tls_lo && p < s.tls_hi) {
    a.space = runtime_tls(p) ? Space::Own : Space::StaticShared;
    a.offset = p - s.tls_lo;
  } else {
    // The last buffer starting at or below p.
    size_t lo = 0, hi = s.buffers.size();
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (s.buffers[mid].lo <= p)
        lo = mid + 1;
      else
        hi = mid;
    }
    if (lo > 0 && p + n <= s.buffers[lo - 1].hi) {
      a.space = Space::Global;
      a.index = lo - 1;
      a.offset = p - s.buffers[lo - 1].lo;
    }
  }
  return a;
}

// memcheck's report of an access outside every buffer: the nearest buffer and how far
// past its end (or before its start) the access is.
[[noreturn]] void outside(const State& s, const Access& a) {
  const Buffer* best = nullptr;
  uintptr_t best_d = UINTPTR_MAX;
  for (const Buffer& b : s.buffers) {
    const uintptr_t d = a.p >= b.lo ? (a.p + a.bytes > b.hi ? a.p + a.bytes - b.hi : 0)
                                    : b.lo - a.p;
    if (d < best_d) best_d = d, best = &b;
  }
  if (!best)
    report(s, "memcheck", "%zu-byte %s at %p: the launch has no buffers", a.bytes,
           kind_name(a.kind), reinterpret_cast<void*>(a.p));
  if (a.p >= best->lo)
    report(s, "memcheck",
           "%zu-byte %s at %p is outside every buffer of the launch: it ends %zu byte(s) past "
           "the end of `%s` (%zu bytes at %p), at byte offset %zu of it",
           a.bytes, kind_name(a.kind), reinterpret_cast<void*>(a.p),
           size_t(a.p + a.bytes - best->hi), best->name.c_str(), size_t(best->hi - best->lo),
           reinterpret_cast<void*>(best->lo), size_t(a.p - best->lo));
  report(s, "memcheck",
         "%zu-byte %s at %p is outside every buffer of the launch: %zu byte(s) before the "
         "start of `%s` (%zu bytes at %p)",
         a.bytes, kind_name(a.kind), reinterpret_cast<void*>(a.p), size_t(best->lo - a.p),
         best->name.c_str(), size_t(best->hi - best->lo), reinterpret_cast<void*>(best->lo));
}

// Shared memory is shadowed per 2-byte granule (the narrowest type kernels store there);
// a 1-byte access stands for its granule.
constexpr size_t kGranule = 2;

[[noreturn]] void shared_hazard(const State& s, const char* what, const char* where,
                                size_t offset, const char* other, bool write) {
  report(s, "racecheck",
         "%s hazard on %s shared memory at byte offset %zu: %s %s it and this thread %s it "
         "with no __syncthreads() (or, within a warp, __syncwarp()) between",
         what, where, offset, other, std::strncmp(what, "write-after-read", 16) ? "wrote" : "read",
         write ? "writes" : "reads");
}

void check_shared(State& s, const Access& a, Shadow* shadow, const char* where) {
  const unsigned t = detail::tl_thread->linear, warp = t / 32, lane = t % 32;
  const bool write = a.kind & kWrite, atomic = a.kind & kAtomic;
  const bool init = (s.checks & kInitcheck) && !write;
  const bool race = (s.checks & kRacecheck) && !atomic;
  const uint32_t epoch = s.epoch, start = s.block_start, clock = s.clock[t];
  // common[l * 32 + lane]: lane l's clock at its last warp collective with this lane.
  const uint32_t* common = &s.common[size_t(warp) * 32 * 32];
  // Whether an access (thread, epoch, clock) of this epoch by another thread is ordered
  // before this one: only a warp collective of the two since can order it.
  const auto ordered = [&](unsigned rec, uint32_t rec_clock) {
    return rec / 32 == warp && common[(rec % 32) * 32 + lane] > rec_clock;
  };
  char other[64];
  const size_t first = a.offset / kGranule, last = (a.offset + a.bytes - 1) / kGranule;
  for (size_t g = first; g <= last; ++g) {
    Shadow& sh = shadow[g];
    const size_t byte = std::max(a.offset, g * kGranule);
    // Epochs start at 1, so a never-written granule (0) reads as older than the block.
    const bool written = sh.w_epoch >= start;
    if (init && !written)
      report(s, "initcheck",
             "%zu-byte read of %s shared memory at byte offset %zu, which no thread of the "
             "block has written since the block started",
             a.bytes, where, byte);
    if (race) {
      if (sh.w_epoch == epoch && sh.w_thread != t && !ordered(sh.w_thread, sh.w_clock)) {
        format_thread(s, sh.w_thread, other, sizeof other);
        shared_hazard(s, write ? "write-after-write" : "read-after-write", where, byte, other,
                      write);
      }
      if (write && sh.r_epoch == epoch) {
        const unsigned other_warps = sh.r_warps & ~(1u << warp);
        if (other_warps) {
          std::snprintf(other, sizeof other, "a thread of warp %u",
                        unsigned(std::countr_zero(other_warps)));
          shared_hazard(s, "write-after-read", where, byte, other, true);
        }
        if (sh.r_thread != t && !ordered(sh.r_thread, sh.r_clock)) {
          format_thread(s, sh.r_thread, other, sizeof other);
          shared_hazard(s, "write-after-read", where, byte, other, true);
        }
      }
    }
    if (write) {
      sh.w_epoch = epoch;
      sh.w_clock = clock;
      sh.w_thread = uint16_t(t);
    }
    if (!write || atomic) {
      sh.r_warps = (sh.r_epoch == epoch ? sh.r_warps : 0) | 1u << warp;
      sh.r_epoch = epoch;
      sh.r_clock = clock;
      sh.r_thread = uint16_t(t);
    }
  }
}

void check_global(State& s, const Access& a) {
  Buffer& b = s.buffers[a.index];
  const bool write = a.kind & kWrite;
  if (!b.written_by_launch) {
    if (write && (s.checks & kMemcheck))
      report(s, "memcheck", "%zu-byte %s of `%s` at byte offset %zu: the launch only reads it",
             a.bytes, kind_name(a.kind), b.name.c_str(), a.offset);
    return;
  }
  if ((s.checks & kInitcheck) && b.written) {
    ZeroArray<uint8_t>& w = *b.written;
    for (size_t i = 0; i < a.bytes; ++i) {
      if (write) {
        w[a.offset + i] = 1;
      } else if (!w[a.offset + i]) {
        report(s, "initcheck",
               "%zu-byte read of `%s` at byte offset %zu, which no launch of the plan has "
               "written",
               a.bytes, b.name.c_str(), a.offset + i);
      }
    }
  }
  if (!(s.checks & kRacecheck) || (a.kind & kAtomic)) return;
  char other[64];
  for (size_t i = 0; i < a.bytes; ++i) {
    uint32_t& wr = b.writer[a.offset + i];
    uint32_t& rd = b.reader[a.offset + i];
    if (wr && wr != s.block_id) {
      format_block(s, wr, other, sizeof other);
      report(s, "racecheck",
             "global %s-after-write hazard on `%s` at byte offset %zu: %s of the same launch "
             "writes it",
             write ? "write" : "read", b.name.c_str(), a.offset + i, other);
    }
    if (write) {
      if (rd && rd != s.block_id) {
        if (rd == kMany)
          std::snprintf(other, sizeof other, "other blocks");
        else
          format_block(s, rd, other, sizeof other);
        report(s, "racecheck",
               "global write-after-read hazard on `%s` at byte offset %zu: %s of the same "
               "launch read it",
               b.name.c_str(), a.offset + i, other);
      }
      wr = s.block_id;
    } else {
      rd = rd == 0 || rd == s.block_id ? s.block_id : kMany;
    }
  }
}

}  // namespace

unsigned take_request() {
  const unsigned c = tl_request.checks;
  tl_request.checks = 0;
  return c;
}

void launch_begin(unsigned checks, const char* kernel, Dim3 grid, Dim3 block,
                  uint32_t dynamic_smem, const void* params, size_t params_bytes) {
  static thread_local State* cached = nullptr;
  if (!cached) cached = new State;
  State& s = *cached;
  s.checks = checks;
  s.kernel = kernel;
  s.grid = grid;
  s.block = block;
  s.dynamic_smem = dynamic_smem;
  s.params_lo = reinterpret_cast<uintptr_t>(params);
  s.params_hi = s.params_lo + params_bytes;
  s.buffers.clear();
  s.buffers_known = tl_request.known;
  for (size_t i = 0; i < tl_request.buffers.size(); ++i) {
    const BufferSpec& spec = tl_request.buffers[i];
    if (spec.bytes == 0) continue;
    Buffer b;
    b.spec = i;
    b.lo = uintptr_t(spec.addr);
    b.hi = b.lo + spec.bytes;
    b.name = tl_request.names[i];
    b.workspace = spec.flags & kWorkspace;
    b.written_by_launch = spec.flags & kWritten;
    // Only what the launch writes can race (a write anywhere else is a memcheck finding).
    if ((checks & kRacecheck) && b.written_by_launch) {
      b.writer = ZeroArray<uint32_t>(spec.bytes);
      b.reader = ZeroArray<uint32_t>(spec.bytes);
    }
    if ((checks & kInitcheck) && b.workspace) {
      auto [it, fresh] = tl_plan.written.try_emplace({b.lo, b.hi});
      if (fresh) it->second = ZeroArray<uint8_t>(spec.bytes);
      b.written = &it->second;
    }
    s.buffers.push_back(std::move(b));
  }
  std::sort(s.buffers.begin(), s.buffers.end(),
            [](const Buffer& x, const Buffer& y) { return x.lo < y.lo; });
  // The written vectors of a plan live until it ends; a launch outside a plan forgets them.
  if (s.tls_hi == 0) {
    TlsBlock tls;
    dl_iterate_phdr(find_tls, &tls);
    s.tls_hi = reinterpret_cast<uintptr_t>(__builtin_thread_pointer());
    s.tls_lo = s.tls_hi - tls.size;
    s.tls_shadow.assign(tls.size / kGranule + 1, Shadow{});
  }
  s.smem_shadow.assign(dynamic_smem / kGranule + 1, Shadow{});
  s.nthreads = block.x * block.y * block.z;
  s.clock.assign(s.nthreads, 0);
  s.common.assign(size_t((s.nthreads + 31) / 32) * 32 * 32, 0);
  // Records of an earlier launch in the static shared shadow are older than any epoch of
  // this one (epochs only grow), so they read as "not written in this block".
  s.in_atomic = false;
  s.in_operand = false;
  s.profile = nullptr;
  if (checks & kProfile) {
    std::vector<prof::Region> regions;
    for (const Buffer& b : s.buffers) regions.push_back(prof::Region{b.lo, b.hi, b.spec});
    s.names = tl_request.names;
    s.profile = prof::begin(grid, block, checks & kSampled, tl_request.fold_dim, tl_request.runs,
                            tl_request.runs_inner, regions.data(), regions.size(),
                            tl_request.buffers.size());
  }
  tl_request.runs = 1;
  tl_state = &s;
}

const std::vector<uint64_t>* sampled_blocks() {
  return tl_state && tl_state->profile ? prof::blocks(tl_state->profile) : nullptr;
}

const char* launch_end() {
  State& s = *tl_state;
  tl_state = nullptr;
  if (!tl_plan.open) tl_plan.written.clear();
  if (!s.profile) return nullptr;
  const char* refusal = prof::end(s.profile, s.names);
  s.profile = nullptr;
  return refusal;
}

void block_begin(uint64_t b, const unsigned char* smem, const unsigned char* map_lo,
                 const unsigned char* map_hi) {
  State& s = *tl_state;
  s.block_id = uint32_t(b + 1);
  s.smem_lo = reinterpret_cast<uintptr_t>(smem);
  s.smem_map_lo = reinterpret_cast<uintptr_t>(map_lo);
  s.smem_map_hi = reinterpret_cast<uintptr_t>(map_hi);
  s.block_start = ++s.epoch;
  std::fill(s.clock.begin(), s.clock.end(), 0);
  std::fill(s.common.begin(), s.common.end(), 0);
  s.in_atomic = false;
  s.in_operand = false;
  if (s.profile) prof::block_begin(s.profile, b);
}

void barrier() {
  ++tl_state->epoch;
  if (tl_state->profile) prof::barrier(tl_state->profile);
}

void warp_sync(unsigned warp, unsigned mask) {
  State& s = *tl_state;
  // Only racecheck orders accesses by the clocks (a profile alone skips the bookkeeping).
  if (!(s.checks & kRacecheck)) return;
  uint32_t* common = &s.common[size_t(warp) * 32 * 32];
  for (unsigned m = mask; m; m &= m - 1) {
    const unsigned a = unsigned(std::countr_zero(m));
    const uint32_t c = ++s.clock[warp * 32 + a];
    for (unsigned n = mask; n; n &= n - 1) common[a * 32 + unsigned(std::countr_zero(n))] = c;
  }
}

}  // namespace emu::check::rt

namespace emu::check {

using rt::State;

namespace {
// The profile's share of a classified access (profile.cpp).
void profile(State& s, const rt::Access& a, const void* pc) {
  const unsigned t = detail::tl_thread->linear;
  const bool write = a.kind & kWrite;
  switch (a.space) {
    case rt::Space::Own: return;
    case rt::Space::DynamicShared:
    case rt::Space::StaticShared:
      prof::shared(s.profile, t, pc, a.p, a.bytes, write);
      return;
    case rt::Space::Global:
      prof::global(s.profile, t, pc, a.index, a.p, a.bytes, write);
      return;
    case rt::Space::Outside: prof::outside(s.profile, a.bytes); return;
  }
}
}  // namespace

bool active() { return rt::tl_state != nullptr; }

void atomic_begin() {
  if (State* s = rt::tl_state) s->in_atomic = true;
}
void atomic_end() {
  if (State* s = rt::tl_state) s->in_atomic = false;
}
void operand_begin() {
  if (State* s = rt::tl_state) s->in_operand = true;
}
void operand_end() {
  if (State* s = rt::tl_state) s->in_operand = false;
}
void ldmatrix(const void* const* rows, int num) {
  if (State* s = rt::tl_state; s && s->profile) prof::ldmatrix(s->profile, rows, num);
}
__attribute__((noinline)) void vector_access(const void* p, unsigned bytes, unsigned kind) {
  State* s = rt::tl_state;
  if (!s || !s->profile || !detail::tl_thread) return;
  profile(*s, rt::classify(*s, reinterpret_cast<uintptr_t>(p), bytes, kind),
          __builtin_return_address(0));
}
void tensor(uint64_t flops, bool wgmma) {
  if (State* s = rt::tl_state; s && s->profile) prof::tensor(s->profile, flops, wgmma);
}

void access(const void* ptr, size_t bytes, unsigned kind, const void* pc) {
  State* sp = rt::tl_state;
  if (!sp || bytes == 0 || !detail::tl_thread) return;
  State& s = *sp;
  if (s.in_atomic) kind |= kAtomic;
  const rt::Access a = rt::classify(s, reinterpret_cast<uintptr_t>(ptr), bytes, kind);
  if (s.profile && !s.in_operand) profile(s, a, pc);
  switch (a.space) {
    case rt::Space::Own: return;
    case rt::Space::DynamicShared:
      if (a.p < s.smem_lo || a.offset + a.bytes > s.dynamic_smem) {
        if (s.checks & rt::kMemcheck)
          rt::report(s, "memcheck",
                     "%zu-byte %s of dynamic shared memory at byte offset %lld: outside the "
                     "launch's %u bytes",
                     a.bytes, rt::kind_name(kind), (long long)(a.p - s.smem_lo), s.dynamic_smem);
        return;
      }
      if (s.checks & (rt::kRacecheck | rt::kInitcheck))
        rt::check_shared(s, a, s.smem_shadow.data(), "dynamic");
      return;
    case rt::Space::StaticShared:
      if (s.checks & (rt::kRacecheck | rt::kInitcheck))
        rt::check_shared(s, a, s.tls_shadow.data(), "static");
      return;
    case rt::Space::Global:
      rt::check_global(s, a);
      return;
    case rt::Space::Outside:
      if ((s.checks & rt::kMemcheck) && s.buffers_known) rt::outside(s, a);
      return;
  }
}

}  // namespace emu::check

// ---------------------------------------------------------------------------------------
// The C ABI (src/emulator/mod.rs).

// The checks (bits: 1 memcheck, 2 racecheck, 4 initcheck) and the buffers of the next
// launch on this thread. `names[i]` is not NUL-terminated (Rust strings); copied.
// `known` = 0: the launch's buffers are unknown, and global accesses are not memchecked.
extern "C" void emu_check_next_launch(uint32_t checks, const emu::check::rt::BufferSpec* buffers,
                                      size_t n, int known) {
  auto& r = emu::check::rt::tl_request;
  r.checks = checks;
  r.known = known != 0;
  r.buffers.assign(buffers, buffers + n);
  r.names.clear();
  for (size_t i = 0; i < n; ++i) r.names.emplace_back(buffers[i].name, buffers[i].name_len);
}

// The next profiled launch on this thread folds `runs` runs of a split reduction into grid
// dimension `dim` (0 x, 1 y, 2 z): index = run · tiles + tile, or tile · runs + run when
// `inner`; its sample runs every run of each sampled tile (profile.cpp).
extern "C" void emu_profile_next_runs(uint32_t dim, uint32_t runs, int inner) {
  auto& r = emu::check::rt::tl_request;
  r.fold_dim = int(dim);
  r.runs = runs;
  r.runs_inner = inner != 0;
}

// Opens (1) or closes (0) a plan on this thread: initcheck remembers which workspace bytes
// its launches wrote until it closes.
extern "C" void emu_check_plan(int open) {
  auto& p = emu::check::rt::tl_plan;
  p.open = open != 0;
  if (!p.open) p.written.clear();
}

// Whether this build has the checked copy of the kernels' hooks (not under ASan).
#ifndef __SANITIZE_ADDRESS__
// The instrumentation's entry points (kasan ABI, recoverable form), called by the checked
// copy of the kernels for every access. Most are to the thread's own stack (locals the
// compiler keeps in memory, the mma twin's operand exchange): those return at once.
namespace {
inline bool own_stack(uintptr_t p) {
  const emu::ThreadRegs* r = emu::detail::tl_thread;
  return r && p - uintptr_t(r->stack_lo) < uintptr_t(r->stack_hi - r->stack_lo);
}
}  // namespace
#define EMU_ASAN_HOOKS(n)                                                               \
  extern "C" void __asan_load##n##_noabort(uintptr_t p) {                               \
    if (own_stack(p)) return;                                                           \
    emu::check::access(reinterpret_cast<const void*>(p), n, emu::check::kRead,         \
                       __builtin_return_address(0));                                    \
  }                                                                                     \
  extern "C" void __asan_store##n##_noabort(uintptr_t p) {                              \
    if (own_stack(p)) return;                                                           \
    emu::check::access(reinterpret_cast<const void*>(p), n, emu::check::kWrite,        \
                       __builtin_return_address(0));                                    \
  }
EMU_ASAN_HOOKS(1)
EMU_ASAN_HOOKS(2)
EMU_ASAN_HOOKS(4)
EMU_ASAN_HOOKS(8)
EMU_ASAN_HOOKS(16)
#undef EMU_ASAN_HOOKS
extern "C" void __asan_loadN_noabort(uintptr_t p, size_t n) {
  emu::check::access(reinterpret_cast<const void*>(p), n, emu::check::kRead,
                     __builtin_return_address(0));
}
extern "C" void __asan_storeN_noabort(uintptr_t p, size_t n) {
  emu::check::access(reinterpret_cast<const void*>(p), n, emu::check::kWrite,
                     __builtin_return_address(0));
}
// Called before a noreturn call; nothing to do.
extern "C" void __asan_handle_no_return() {}
#endif
