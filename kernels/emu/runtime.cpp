// The emulator runtime: fibers, the block scheduler, barriers, warp collectives,
// cp.async queues, launch validation and the worker pool. See emu.h for the model.
#include "emu.h"

#include "check.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// Under valgrind, every fiber stack is registered as a stack, so that switching to it is
// not mistaken for a huge stack-pointer move. The client requests cost nothing otherwise.
// Under AddressSanitizer (PEFT_KERNELS_EMU_SANITIZE, build/emulator.rs) every switch of
// stacks is announced to it (jump below), or it takes the fibers' stacks for overflows of
// the OS thread's; and fibers get larger stacks, for its redzones.
#if defined(__SANITIZE_ADDRESS__)
#include <pthread.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define EMU_REGISTER_STACK(lo, hi) VALGRIND_STACK_REGISTER(lo, hi)
#else
#define EMU_REGISTER_STACK(lo, hi) ((void)(lo), (void)(hi))
#endif

// ---------------------------------------------------------------------------------------
// The context switch (System V x86-64). emu_switch_context(save, load) pushes the
// callee-saved registers, MXCSR and the x87 control word onto the current stack, stores
// the stack pointer in *save, loads `load` and pops the same from there. MXCSR and the
// control word are loaded only when they differ beyond MXCSR's sticky exception flags
// (bits 0-5): the loads stall the pipeline, and the flags mean nothing to a kernel. A
// new fiber's stack is primed with a frame whose return address is emu_fiber_start,
// which calls r13(r12), i.e. fiber_main(fiber); that never returns.
extern "C" void emu_switch_context(void** save, void* load);
extern "C" void emu_fiber_start();

asm(R"(
  .text
  .p2align 4
  .globl emu_switch_context
  .hidden emu_switch_context
  .type emu_switch_context, @function
emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movl (%rsp), %eax
  movzwl 4(%rsp), %ecx
  movq %rsi, %rsp
  xorl (%rsp), %eax
  andl $-64, %eax
  cmpw 4(%rsp), %cx
  jne 2f
  testl %eax, %eax
  jz 1f
2:
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
1:
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_context, .-emu_switch_context

  .p2align 4
  .globl emu_fiber_start
  .hidden emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size emu_fiber_start, .-emu_fiber_start
)");

namespace emu::detail {

thread_local constinit const ThreadRegs* tl_thread = nullptr;
thread_local constinit uint3 tl_block_idx{};
thread_local constinit dim3 tl_block_dim{};
thread_local constinit dim3 tl_grid_dim{};

namespace {

// Device limits (compute capability 8.0 / 9.0).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockX = 1024, kMaxBlockY = 1024, kMaxBlockZ = 64;
constexpr uint64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;
constexpr uint32_t kMaxDynamicSmem = 232448;  // 227 KiB, sm_90's opt-in maximum

#ifdef EMU_ASAN
constexpr size_t kStackSize = 256 << 10;
#else
constexpr size_t kStackSize = 64 << 10;
#endif
constexpr size_t kSmemAlign = 128;

thread_local std::string tl_last_error;

// ---------------------------------------------------------------------------------------
// Fibers and the per-worker engine.

enum class State : uint8_t { Runnable, AtBarrier, InWarp, Exited };

struct CopyOp {
  void* dst;
  const void* src;
  unsigned bytes, src_bytes;
  uint64_t group;
  const void* pc;  // the issuing instruction, for the profile's grouping
};

// One queued wgmma.mma_async of a thread (see emu.h).
struct WgmmaOp {
  float* d;
  unsigned n;
  uint64_t desc_a, desc_b;
  bool scale_d, bf16;
  uint64_t group;
};

struct Fiber {
  ThreadRegs regs{};
  void* asan_fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
  void* sp = nullptr;
  char* stack_top = nullptr;  // 16-byte aligned end of the stack
  char* guard = nullptr;      // the PROT_NONE page below the stack
  // The warp collective this fiber is in (see warp_collective).
  const void* x_mine = nullptr;
  void* x_out = nullptr;
  int x_want = -1;
  // cp.async: queued copies, oldest first; `group` is the id of the open group.
  std::vector<CopyOp> copies;
  uint64_t group = 0;
  // wgmma: queued operations, oldest first, the id of the open group, and how many this
  // thread has issued (its index into Engine::wgmma_issued of its warpgroup).
  std::vector<WgmmaOp> wgmma;
  uint64_t wgmma_group = 0;
  uint64_t wgmma_count = 0;
};

// What every thread of a warpgroup must pass alike to its i-th wgmma.
struct WgmmaIssue {
  uint64_t desc_a, desc_b;
  unsigned n;
  bool scale_d, bf16;
  bool operator==(const WgmmaIssue&) const = default;
};

// One warp collective some lanes wait in.
struct Pending {
  unsigned mask, arrived;
  const char* what;
  unsigned size;
};

struct Warp {
  unsigned exists, exited, at_barrier;  // lane masks
  unsigned npending;
  // Each has a waiting lane and a lane waits in one at most, so 32 suffice.
  Pending pending[32];
};

struct LaunchState {
  const char* name;
  Dim3 grid, block;
  uint32_t dynamic_smem;
  Body body;
  const void* ctx;
  uint64_t nblocks;
  // The blocks to run, in order (a sampled profile), or null: all of them.
  const std::vector<uint64_t>* only = nullptr;
  unsigned nthreads;
  uint64_t fp_env;  // the launching thread's MXCSR | x87 control word << 32
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  uint64_t fail_block = UINT64_MAX;
  std::string message;

  // Keeps the failure of the lowest block: blocks start in order, so every block below
  // a failed one has started and will finish, and the report does not depend on timing.
  void record_failure(uint64_t block, const char* msg) {
    std::lock_guard<std::mutex> g(mu);
    if (block < fail_block) {
      fail_block = block;
      message = msg;
    }
    stop.store(true, std::memory_order_relaxed);
  }
};

// What one OS thread needs to run blocks: fibers with stacks, the dynamic shared memory
// buffer and the state of the block being run. Pooled: a worker checks one out per
// launch and returns it, so stacks are mapped once per concurrently running worker.
struct Engine {
  std::vector<Fiber*> fibers;
  std::vector<State> state;  // per fiber, kept apart so that the scheduler's scan is dense
  // Dynamic shared memory: kMaxDynamicSmem bytes (rounded to pages) ending at smem_end,
  // a PROT_NONE page after it. A launch gets the last bytes, so reading or writing past
  // its size (rounded up to 128) faults as on the GPU.
  unsigned char* smem_end = nullptr;
  unsigned char* smem = nullptr;  // this launch's part, 128-byte aligned

  const LaunchState* launch = nullptr;
  unsigned nthreads = 0, nwarps = 0;
  unsigned runnable = 0, exited = 0, at_barrier = 0;
  unsigned first_exited = 0;
  Barrier bar_kind = Barrier::Sync;
  int bar_acc = 0, bar_result = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  // The OS thread's stack (the scheduler's), for AddressSanitizer.
  void* sched_fake_stack = nullptr;
  const void* sched_stack_lo = nullptr;
  size_t sched_stack_size = 0;
  bool failed = false;
  char message[1024] = {};
  Warp warps[kMaxThreadsPerBlock / 32];
  // Per warpgroup, the operands of each wgmma its first thread issued.
  std::vector<std::vector<WgmmaIssue>> wgmma_issued;
};

thread_local constinit Engine* tl_engine = nullptr;

[[noreturn]] void fatal(const char* what) {
  std::fprintf(stderr, "peft-kernels emulator: %s\n", what);
  std::abort();
}

// A fiber with a kStackSize stack and a PROT_NONE guard page below it.
Fiber* new_fiber() {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t total = kStackSize + page;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  if (mprotect(p, page, PROT_NONE) != 0) {
    munmap(p, total);
    return nullptr;
  }
  Fiber* f = new Fiber;
  f->guard = static_cast<char*>(p);
  f->stack_top = static_cast<char*>(p) + total;
  f->regs.stack_lo = f->guard + page;
  f->regs.stack_hi = f->stack_top;
  EMU_REGISTER_STACK(f->guard + page, f->stack_top);
  return f;
}

std::mutex g_engines_mu;
std::vector<Engine*> g_free_engines;

Engine* checkout_engine() {
  std::lock_guard<std::mutex> g(g_engines_mu);
  if (g_free_engines.empty()) return new Engine;
  Engine* e = g_free_engines.back();
  g_free_engines.pop_back();
  return e;
}

void checkin_engine(Engine* e) {
  std::lock_guard<std::mutex> g(g_engines_mu);
  g_free_engines.push_back(e);
}

// Grows the engine to the launch's block and sets every fiber's thread index.
bool prepare(Engine& e, const LaunchState& L) {
  while (e.fibers.size() < L.nthreads) {
    Fiber* f = new_fiber();
    if (!f) return false;
    e.fibers.push_back(f);
    e.state.push_back(State::Exited);
  }
  if (L.dynamic_smem > 0 && !e.smem_end) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t bytes = (kMaxDynamicSmem + page - 1) / page * page;
    void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) return false;
    e.smem_end = static_cast<unsigned char*>(p) + bytes;
    if (mprotect(e.smem_end, page, PROT_NONE) != 0) {
      munmap(p, bytes + page);
      e.smem_end = nullptr;
      return false;
    }
  }
  const size_t smem_bytes = (size_t(L.dynamic_smem) + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
  e.smem = smem_bytes ? e.smem_end - smem_bytes : nullptr;
  e.launch = &L;
  e.nthreads = L.nthreads;
  e.nwarps = (L.nthreads + 31) / 32;
  for (unsigned i = 0; i < L.nthreads; ++i) {
    ThreadRegs& r = e.fibers[i]->regs;
    r.thread_idx = {i % L.block.x, i / L.block.x % L.block.y, i / (L.block.x * L.block.y)};
    r.linear = i;
    r.lane = i % 32;
  }
  return true;
}

[[noreturn]] void fiber_main(Fiber* f);

// Switches from the running context to the one whose stack pointer is `load` and whose
// stack is [to_lo, to_lo + to_size), saving ours in *save. `fake` keeps AddressSanitizer's
// fake stack of the context we leave until it resumes; null when it never resumes.
inline void jump(void** save, void* load, void** fake, const void* to_lo, size_t to_size) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(fake, to_lo, to_size);
#else
  (void)fake, (void)to_lo, (void)to_size;
#endif
  emu_switch_context(save, load);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake ? *fake : nullptr, nullptr, nullptr);
#endif
}

inline void jump_to_fiber(void** save, void** fake, Fiber* to) {
  jump(save, to->sp, fake, to->regs.stack_lo, size_t(to->regs.stack_hi - to->regs.stack_lo));
}

// Lays out a frame on the fiber's stack that emu_switch_context "returns" through into
// emu_fiber_start: [fp env][r15][r14][r13 = fiber_main][r12 = f][rbx][rbp][ret].
void prime(Fiber* f, uint64_t fp_env) {
  uint64_t* sp = reinterpret_cast<uint64_t*>(f->stack_top) - 10;
  sp[0] = fp_env;
  sp[1] = 0;
  sp[2] = 0;
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[4] = reinterpret_cast<uint64_t>(f);
  sp[5] = 0;
  sp[6] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_start);
  sp[8] = 0;
  sp[9] = 0;
  f->sp = sp;
#ifdef EMU_ASAN
  // The fiber's previous run may have left its frames' redzones poisoned.
  ASAN_UNPOISON_MEMORY_REGION(f->regs.stack_lo, size_t(f->regs.stack_hi - f->regs.stack_lo));
#endif
}

uint64_t current_fp_env() {
  uint32_t mxcsr;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(cw));
  return mxcsr | uint64_t(cw) << 32;
}

// ---------------------------------------------------------------------------------------
// Scheduling. A fiber runs until it cannot proceed, then hands over directly to the next
// runnable fiber in round-robin order; only when none is left does control return to the
// scheduler (run_block), which then finds the block finished, failed or deadlocked.

void switch_to(Engine& e, Fiber* from, Fiber* to) {
  e.cur = to;
  tl_thread = &to->regs;
  jump_to_fiber(&from->sp, &from->asan_fake_stack, to);
}

// The current fiber waits (its state is no longer Runnable) or has exited.
void park(Engine& e) {
  Fiber* self = e.cur;
  if (e.runnable == 0) {
    e.cur = nullptr;
    tl_thread = nullptr;
    jump(&self->sp, e.sched_sp, &self->asan_fake_stack, e.sched_stack_lo, e.sched_stack_size);
    return;
  }
  const unsigned n = e.nthreads;
  unsigned i = self->regs.linear;
  do {
    i = i + 1 == n ? 0 : i + 1;
  } while (e.state[i] != State::Runnable);
  switch_to(e, self, e.fibers[i]);
}

const char* barrier_name(Barrier kind) {
  switch (kind) {
    case Barrier::Sync: return "__syncthreads()";
    case Barrier::Count: return "__syncthreads_count()";
    case Barrier::And: return "__syncthreads_and()";
    case Barrier::Or: return "__syncthreads_or()";
  }
  return "?";
}

Engine& engine() {
  Engine* e = tl_engine;
  if (!e || !e->cur) fatal("a device primitive was called outside an emulated kernel");
  return *e;
}

void thread_exit(Engine& e, Fiber* f) {
  const unsigned bit = 1u << f->regs.lane;
  Warp& w = e.warps[f->regs.linear / 32];
  if (e.at_barrier > 0)
    fail("exited while %u thread(s) of the block wait at %s; every thread of the block must "
         "reach it",
         e.at_barrier, barrier_name(e.bar_kind));
  for (unsigned i = 0; i < w.npending; ++i)
    if (w.pending[i].mask & bit)
      fail("exited while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)",
           w.pending[i].arrived, w.pending[i].what, w.pending[i].mask);
  if (e.exited++ == 0) e.first_exited = f->regs.linear;
  w.exited |= bit;
  if (!f->wgmma.empty())
    fail("exited with %zu wgmma operation(s) not waited for (wgmma.wait_group)", f->wgmma.size());
  e.state[f->regs.linear] = State::Exited;
  f->copies.clear();
  --e.runnable;
  park(e);
  fatal("an exited fiber was resumed");
}

[[noreturn]] void fiber_main(Fiber* f) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);  // a new fiber's first entry
#endif
  Engine& e = *tl_engine;
  bool threw = false;
  try {
    e.launch->body(e.launch->ctx);
  } catch (...) {
    threw = true;
  }
  // Outside the handler: fail() never returns, and leaving a handler by a context switch
  // would corrupt the OS thread's exception state.
  if (threw) fail("a C++ exception escaped the kernel");
  thread_exit(e, f);
  __builtin_unreachable();
}

void format_location(const Fiber* f, char* out, size_t cap) {
  const uint3 b = tl_block_idx;
  if (f)
    std::snprintf(out, cap, "block (%u,%u,%u), thread (%u,%u,%u): ", b.x, b.y, b.z,
                  f->regs.thread_idx.x, f->regs.thread_idx.y, f->regs.thread_idx.z);
  else
    std::snprintf(out, cap, "block (%u,%u,%u): ", b.x, b.y, b.z);
}

// Names the threads of a deadlocked block by where they wait.
void describe_deadlock(Engine& e) {
  char* out = e.message;
  const size_t cap = sizeof e.message;
  format_location(nullptr, out, cap);
  size_t len = std::strlen(out);
  len += std::snprintf(out + len, cap - len, "deadlock: no thread can proceed;");
  if (e.at_barrier && len < cap)
    len += std::snprintf(out + len, cap - len, " %u thread(s) wait at %s;", e.at_barrier,
                         barrier_name(e.bar_kind));
  for (unsigned wi = 0; wi < e.nwarps && len < cap; ++wi)
    for (unsigned i = 0; i < e.warps[wi].npending && len < cap; ++i) {
      const Pending& p = e.warps[wi].pending[i];
      len += std::snprintf(out + len, cap - len,
                           " warp %u: lanes 0x%08x wait in %s for lanes 0x%08x of mask 0x%08x;",
                           wi, p.arrived, p.what, p.mask & ~p.arrived, p.mask);
    }
}

// Runs block `b` of the launch on this OS thread; false if it failed (message in e).
bool run_block(Engine& e, uint64_t b) {
  const LaunchState& L = *e.launch;
  tl_block_idx = {unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                  unsigned(b / (uint64_t(L.grid.x) * L.grid.y))};
  for (unsigned wi = 0; wi < e.nwarps; ++wi) {
    const unsigned lanes = std::min(32u, e.nthreads - wi * 32);
    e.warps[wi].exists = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
    e.warps[wi].exited = e.warps[wi].at_barrier = e.warps[wi].npending = 0;
  }
  for (unsigned i = 0; i < e.nthreads; ++i) {
    Fiber* f = e.fibers[i];
    e.state[i] = State::Runnable;
    f->copies.clear();
    f->group = 0;
    f->wgmma.clear();
    f->wgmma_group = 0;
    f->wgmma_count = 0;
    prime(f, L.fp_env);
  }
  e.wgmma_issued.assign((e.nthreads + 127) / 128, {});
  if (e.smem) std::memset(e.smem, 0xFF, size_t(e.smem_end - e.smem));
  if (check::rt::on()) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t map = (kMaxDynamicSmem + page - 1) / page * page;
    // The guard page after dynamic shared memory counts as shared memory, so that memcheck
    // names an access past the launch's part (an Err) before the access would fault.
    check::rt::block_begin(b, e.smem, e.smem_end ? e.smem_end - map : nullptr,
                           e.smem_end ? e.smem_end + page : nullptr);
  }
  e.runnable = e.nthreads;
  e.exited = e.at_barrier = 0;
  e.failed = false;
  e.cur = e.fibers[0];
  tl_thread = &e.fibers[0]->regs;
  jump_to_fiber(&e.sched_sp, &e.sched_fake_stack, e.fibers[0]);
  tl_thread = nullptr;
  e.cur = nullptr;
  if (!e.failed && e.exited != e.nthreads) {
    describe_deadlock(e);
    e.failed = true;
  }
  return !e.failed;
}

// ---------------------------------------------------------------------------------------
// Faults. A SIGSEGV or SIGBUS while a fiber runs (an out-of-bounds access in a kernel, or
// a fiber overflowing its stack into the guard page) is reported with the kernel, block,
// thread and address before the previous handler (or the default action) takes over, so
// the process dies as it would have, but with a message that says where.

constexpr int kFaultSignals[] = {SIGSEGV, SIGBUS};
struct sigaction g_previous[2];
size_t g_page_size;  // sysconf is not async-signal-safe: read once at installation

void on_fault(int sig, siginfo_t* info, void* uctx) {
  const int which = sig == SIGSEGV ? 0 : 1;
  const Engine* e = tl_engine;
  if (e && e->cur) {
    const Fiber* f = e->cur;
    const char* addr = static_cast<const char*>(info->si_addr);
    const bool overflow = addr >= f->guard && addr < f->guard + g_page_size;
    const uint3 b = tl_block_idx, t = f->regs.thread_idx;
    char msg[512];
    const int len = std::snprintf(
        msg, sizeof msg,
        "peft-kernels emulator: %s at address %p in kernel `%s`, block (%u,%u,%u), thread "
        "(%u,%u,%u)%s\n",
        sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr, e->launch->name, b.x, b.y, b.z,
        t.x, t.y, t.z, overflow ? ": the thread overflowed its emulator stack (64 KiB)" : "");
    if (len > 0) {
      ssize_t written = write(STDERR_FILENO, msg, std::min<size_t>(size_t(len), sizeof msg - 1));
      (void)written;  // nothing to do about a failed write while dying
    }
  }
  // Chain: the previous handler, or the default action when the access repeats.
  const struct sigaction& prev = g_previous[which];
  if (prev.sa_flags & SA_SIGINFO) {
    prev.sa_sigaction(sig, info, uctx);
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    prev.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
  }
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_page_size = size_t(sysconf(_SC_PAGESIZE));
    for (int i = 0; i < 2; ++i) {
      // Record the previous handler before installing: a fault on another thread may
      // reach on_fault as soon as it is installed, and must find what to chain to.
      sigaction(kFaultSignals[i], nullptr, &g_previous[i]);
      struct sigaction sa = {};
      sa.sa_sigaction = on_fault;
      sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
      sigemptyset(&sa.sa_mask);
      sigaction(kFaultSignals[i], &sa, nullptr);
    }
  });
}

// An alternate signal stack for every thread that runs blocks, so that a fiber's stack
// overflow can be reported too. Rust's threads have one already; for others it is mapped
// on the thread's first launch and released when the thread exits.
class SignalStack {
 public:
  void ensure() {
    if (checked_) return;
    checked_ = true;
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && !(current.ss_flags & SS_DISABLE)) return;
    void* p = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;  // faults are then reported unless they overflow a stack
    stack_t ss = {};
    ss.ss_sp = p;
    ss.ss_size = kSize;
    if (sigaltstack(&ss, nullptr) == 0)
      mem_ = p;
    else
      munmap(p, kSize);
  }
  ~SignalStack() {
    if (!mem_) return;
    stack_t ss = {};
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
    munmap(mem_, kSize);
  }

 private:
  static constexpr size_t kSize = 64 << 10;
  bool checked_ = false;
  void* mem_ = nullptr;
};
thread_local SignalStack tl_signal_stack;

// ---------------------------------------------------------------------------------------
// Running blocks.

// Runs blocks of the launch until none is left or one failed.
void run_worker(LaunchState& L) {
  tl_signal_stack.ensure();
  Engine* e = checkout_engine();
  if (!prepare(*e, L)) {
    L.record_failure(0, "the emulator could not allocate fiber stacks or shared memory");
    checkin_engine(e);
    return;
  }
#ifdef EMU_ASAN
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* lo = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &lo, &size);
    pthread_attr_destroy(&attr);
    e->sched_stack_lo = lo;
    e->sched_stack_size = size;
  }
#endif
  tl_block_dim = dim3(L.block.x, L.block.y, L.block.z);
  tl_grid_dim = dim3(L.grid.x, L.grid.y, L.grid.z);
  tl_engine = e;
  while (!L.stop.load(std::memory_order_relaxed)) {
    const uint64_t i = L.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= (L.only ? L.only->size() : L.nblocks)) break;
    const uint64_t b = L.only ? (*L.only)[i] : i;
    if (!run_block(*e, b)) L.record_failure(b, e->message);
  }
  tl_engine = nullptr;
  e->launch = nullptr;
  checkin_engine(e);
}

// ---------------------------------------------------------------------------------------
// The worker pool: persistent OS threads, grown on demand, that join the launching
// thread in running the blocks of a launch. One multi-worker launch at a time.
class Pool {
 public:
  void run(LaunchState& L, unsigned helpers) {
    std::lock_guard<std::mutex> one_at_a_time(launch_mu_);
    {
      std::lock_guard<std::mutex> g(mu_);
      while (threads_ < helpers) {
        try {
          std::thread([this, i = threads_] { loop(i); }).detach();
        } catch (const std::system_error&) {
          break;  // run with the helpers there are
        }
        ++threads_;
      }
      job_ = &L;
      wanted_ = std::min(helpers, threads_);
      done_ = 0;
      ++generation_;
    }
    work_.notify_all();
    run_worker(L);
    std::unique_lock<std::mutex> lk(mu_);
    finished_.wait(lk, [&] { return done_ == wanted_; });
    job_ = nullptr;
  }

 private:
  void loop(unsigned index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      work_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= wanted_) continue;
      LaunchState* L = job_;
      lk.unlock();
      run_worker(*L);
      lk.lock();
      if (++done_ == wanted_) finished_.notify_one();
    }
  }

  std::mutex launch_mu_, mu_;
  std::condition_variable work_, finished_;
  LaunchState* job_ = nullptr;
  uint64_t generation_ = 0;
  unsigned threads_ = 0, wanted_ = 0, done_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: its threads live as long as the process
  return *p;
}

constexpr unsigned kMaxWorkers = 256;
std::atomic<unsigned> g_workers{0};

unsigned workers() {
  if (unsigned n = g_workers.load(std::memory_order_relaxed)) return n;
  static const unsigned from_env = [] {
    const char* s = std::getenv("PEFT_KERNELS_EMU_WORKERS");
    if (!s || !*s) return 1u;
    char* end = nullptr;
    const unsigned long n = std::strtoul(s, &end, 10);
    if (*end || n == 0) {
      std::fprintf(stderr,
                   "peft-kernels emulator: ignoring PEFT_KERNELS_EMU_WORKERS=%s "
                   "(not a positive integer)\n",
                   s);
      return 1u;
    }
    return unsigned(std::min<unsigned long>(n, kMaxWorkers));
  }();
  return from_env;
}

// The launch configuration's first violation of a device limit, or null.
const char* check_limits(Dim3 grid, Dim3 block, uint32_t smem, unsigned max_threads,
                         char* buf, size_t cap) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z)
    std::snprintf(buf, cap, "launch: grid (%u,%u,%u), block (%u,%u,%u): a dimension is zero",
                  grid.x, grid.y, grid.z, block.x, block.y, block.z);
  else if (block.x > kMaxBlockX || block.y > kMaxBlockY || block.z > kMaxBlockZ)
    std::snprintf(buf, cap, "launch: block (%u,%u,%u) exceeds the device limits (%u,%u,%u)",
                  block.x, block.y, block.z, kMaxBlockX, kMaxBlockY, kMaxBlockZ);
  else if (threads > kMaxThreadsPerBlock)
    std::snprintf(buf, cap,
                  "launch: block (%u,%u,%u) has %llu threads, over the device limit of %u",
                  block.x, block.y, block.z, (unsigned long long)threads, kMaxThreadsPerBlock);
  else if (max_threads && threads > max_threads)
    std::snprintf(buf, cap,
                  "launch: block (%u,%u,%u) has %llu threads, over the kernel's "
                  "__launch_bounds__ of %u",
                  block.x, block.y, block.z, (unsigned long long)threads, max_threads);
  else if (grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
    std::snprintf(buf, cap, "launch: grid (%u,%u,%u) exceeds the device limits (%llu,%llu,%llu)",
                  grid.x, grid.y, grid.z, (unsigned long long)kMaxGridX,
                  (unsigned long long)kMaxGridYZ, (unsigned long long)kMaxGridYZ);
  else if (smem > kMaxDynamicSmem)
    std::snprintf(buf, cap,
                  "launch: %u bytes of dynamic shared memory, over the device limit of %u "
                  "(227 KiB)",
                  smem, kMaxDynamicSmem);
  else
    return nullptr;
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Block barrier.
int block_barrier(Barrier kind, int predicate) {
  Engine& e = engine();
  Fiber* f = e.cur;
  const unsigned bit = 1u << f->regs.lane;
  Warp& w = e.warps[f->regs.linear / 32];
  if (e.exited) {
    const ThreadRegs& x = e.fibers[e.first_exited]->regs;
    fail("%s is not reached by every thread of the block: %u thread(s) exited before it, "
         "the first thread (%u,%u,%u)",
         barrier_name(kind), e.exited, x.thread_idx.x, x.thread_idx.y, x.thread_idx.z);
  }
  for (unsigned i = 0; i < w.npending; ++i)
    if (w.pending[i].mask & bit)
      fail("reached %s while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)",
           barrier_name(kind), w.pending[i].arrived, w.pending[i].what, w.pending[i].mask);
  if (e.at_barrier == 0) {
    e.bar_kind = kind;
    e.bar_acc = kind == Barrier::And ? 1 : 0;
  } else if (e.bar_kind != kind) {
    fail("threads of the block wait at different barriers: %s and %s",
         barrier_name(e.bar_kind), barrier_name(kind));
  }
  const int p = predicate != 0;
  switch (kind) {
    case Barrier::Sync: break;
    case Barrier::Count: e.bar_acc += p; break;
    case Barrier::And: e.bar_acc &= p; break;
    case Barrier::Or: e.bar_acc |= p; break;
  }
  if (++e.at_barrier == e.nthreads) {
    // Everyone is here: release them all; this fiber carries on.
    std::fill_n(e.state.begin(), e.nthreads, State::Runnable);
    for (unsigned wi = 0; wi < e.nwarps; ++wi) e.warps[wi].at_barrier = 0;
    e.runnable = e.nthreads;
    e.at_barrier = 0;
    e.bar_result = e.bar_acc;
    if (check::rt::on()) check::rt::barrier();
    return e.bar_result;
  }
  e.state[f->regs.linear] = State::AtBarrier;
  w.at_barrier |= bit;
  --e.runnable;
  park(e);
  // No later barrier can complete before this thread arrives at it, so bar_result still
  // holds this barrier's result.
  return e.bar_result;
}

// ---------------------------------------------------------------------------------------
// Warp collectives.

namespace {
// memcpy with the common sizes inlined: shuffles move 4 or 8 bytes.
inline void copy_value(void* dst, const void* src, unsigned size) {
  switch (size) {
    case 4: std::memcpy(dst, src, 4); break;
    case 8: std::memcpy(dst, src, 8); break;
    default: std::memcpy(dst, src, size);
  }
}
}  // namespace

void warp_collective(const char* what, unsigned mask, const void* mine, unsigned size,
                     int want, void* out) {
  Engine& e = engine();
  Fiber* f = e.cur;
  const unsigned lane = f->regs.lane, wi = f->regs.linear / 32, bit = 1u << lane;
  Warp& w = e.warps[wi];
  if (!(mask & bit)) fail("%s: the calling lane %u is not in mask 0x%08x", what, lane, mask);
  if (mask & ~w.exists)
    fail("%s: mask 0x%08x names lanes 0x%08x that do not exist (warp %u of a %u-thread "
         "block)",
         what, mask, mask & ~w.exists, wi, e.nthreads);
  if (mask & w.exited)
    fail("%s: mask 0x%08x names lanes 0x%08x that have exited", what, mask, mask & w.exited);
  if (mask & w.at_barrier)
    fail("%s: mask 0x%08x names lanes 0x%08x that wait at %s", what, mask,
         mask & w.at_barrier, barrier_name(e.bar_kind));
  if (want >= 0 && !(mask >> want & 1u))
    fail("%s: lane %u reads lane %d, which is not in mask 0x%08x", what, lane, want, mask);

  // Join the collective these lanes started, or start one. Lanes of one mask may be
  // spread over several collectives for a while (a lane still finishing an earlier
  // operation with another mask); that is fine until two collectives wait for each other.
  Pending* p = nullptr;
  for (unsigned i = 0; i < w.npending && !p; ++i)
    if (w.pending[i].mask == mask && w.pending[i].size == size &&
        (w.pending[i].what == what || std::strcmp(w.pending[i].what, what) == 0))
      p = &w.pending[i];
  if (!p) {
    p = &w.pending[w.npending++];
    *p = Pending{mask, 0, what, size};
  }
  f->x_mine = mine;
  f->x_out = out;
  f->x_want = want;
  p->arrived |= bit;
  if (p->arrived != mask) {
    for (unsigned i = 0; i < w.npending; ++i) {
      const Pending& q = w.pending[i];
      if (&q != p && (q.arrived & mask & ~p->arrived) && (p->arrived & q.mask & ~q.arrived))
        fail("%s with mask 0x%08x, while lanes 0x%08x of that mask wait in %s with mask 0x%08x "
             "for lanes 0x%08x, which wait here: each waits for the other; the lanes of a mask "
             "must all call the same warp operation with that mask",
             what, mask, q.arrived & mask, q.what, q.mask, p->arrived & q.mask & ~q.arrived);
    }
    e.state[f->regs.linear] = State::InWarp;
    --e.runnable;
    park(e);
    return;
  }
  // The last lane is here: deliver every lane's values, release the others.
  Fiber* const* lanes = &e.fibers[wi * 32];
  for (unsigned m = mask; m; m &= m - 1) {
    const unsigned l = std::countr_zero(m);
    Fiber* d = lanes[l];
    if (size) {
      if (d->x_want >= 0) {
        copy_value(d->x_out, lanes[d->x_want]->x_mine, size);
      } else {
        for (unsigned s = mask; s; s &= s - 1) {
          const unsigned src = std::countr_zero(s);
          copy_value(static_cast<char*>(d->x_out) + size_t(src) * size, lanes[src]->x_mine, size);
        }
      }
    }
    e.state[wi * 32 + l] = State::Runnable;
  }
  e.runnable += std::popcount(mask) - 1;
  *p = w.pending[--w.npending];
  if (check::rt::on()) check::rt::warp_sync(wi, mask);
}

unsigned shfl_source(const char* what, Shfl mode, int operand, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("%s: width %d is not a power of two in [1, 32]", what, width);
  // PTX shfl.sync: c = segmask << 8 | clamp, segmask = 32 - width, clamp 0 for up, else 31.
  const int lane = int(lane_id());
  const int seg = 32 - width;
  const int clamp = mode == Shfl::Up ? 0 : 31;
  const int max_lane = (lane & seg) | (clamp & ~seg);
  const int min_lane = lane & seg;
  const int b = operand & 31;
  int j = lane;
  bool in_range = false;
  switch (mode) {
    case Shfl::Up: j = lane - b; in_range = j >= max_lane; break;
    case Shfl::Down: j = lane + b; in_range = j <= max_lane; break;
    case Shfl::Xor: j = lane ^ b; in_range = j <= max_lane; break;
    case Shfl::Idx: j = min_lane | (b & ~seg & 31); in_range = j <= max_lane; break;
  }
  return unsigned(in_range ? j : lane);
}

unsigned active_mask() {
  Engine& e = engine();
  const Warp& w = e.warps[e.cur->regs.linear / 32];
  return w.exists & ~w.exited & ~w.at_barrier;
}

// ---------------------------------------------------------------------------------------
// Launch.
int launch(const char* name, Dim3 grid, Dim3 block, uint32_t dynamic_smem,
           unsigned max_threads, Body body, const void* ctx, size_t ctx_bytes) {
  // Consumed whatever happens next, so that a refused launch does not pass its checks on.
  const unsigned checks = check::rt::take_request();
  char buf[256];
  if (const char* bad = check_limits(grid, block, dynamic_smem, max_threads, buf, sizeof buf))
    return launch_error(bad);
  if (tl_engine) return launch_error("launch: called from inside an emulated kernel");
  install_fault_handler();
  LaunchState L;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.dynamic_smem = dynamic_smem;
  L.body = body;
  L.ctx = ctx;
  L.nblocks = uint64_t(grid.x) * grid.y * grid.z;
  L.nthreads = block.x * block.y * block.z;
  L.fp_env = current_fp_env();
  // A checked launch runs its blocks in order on this thread: the checker's state is the
  // launching thread's, and its global race records assume one block at a time.
  const uint64_t n = checks ? 1 : std::min<uint64_t>(workers(), L.nblocks);
  if (checks) {
    check::rt::launch_begin(checks, name, grid, block, dynamic_smem, ctx, ctx_bytes);
    L.only = check::rt::sampled_blocks();
  }
  if (n <= 1)
    run_worker(L);
  else
    pool().run(L, unsigned(n - 1));
  const char* refusal = checks ? check::rt::launch_end() : nullptr;
  if (L.fail_block != UINT64_MAX) return launch_error(L.message.c_str());
  if (refusal) return launch_error(refusal);
  tl_last_error.clear();
  return 0;
}

int launch_error(const char* message) {
  tl_last_error = message;
  return 1;
}

}  // namespace emu::detail

// ---------------------------------------------------------------------------------------
// Thread-level API.
namespace emu {

using detail::Engine;
using detail::Fiber;

[[noreturn]] void fail(const char* fmt, ...) {
  Engine* e = detail::tl_engine;
  char msg[768];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (!e || !e->cur) detail::fatal(msg);
  Fiber* self = e->cur;
  detail::format_location(self, e->message, sizeof e->message);
  const size_t len = std::strlen(e->message);
  std::snprintf(e->message + len, sizeof e->message - len, "%s", msg);
  e->failed = true;
  e->cur = nullptr;
  detail::tl_thread = nullptr;
  // Never resumed: the block is abandoned, its fibers re-primed by the next block.
  detail::jump(&self->sp, e->sched_sp, nullptr, e->sched_stack_lo, e->sched_stack_size);
  __builtin_unreachable();
}

void* dynamic_smem() { return detail::engine().smem; }

void cp_async(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
  Fiber* f = detail::engine().cur;
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fail("cp_async: %u bytes; cp.async copies 4, 8 or 16", bytes);
  if (src_bytes > bytes) fail("cp_async: src_bytes %u exceeds the copy size %u", src_bytes, bytes);
  if (reinterpret_cast<uintptr_t>(dst) % bytes ||
      (src_bytes && reinterpret_cast<uintptr_t>(src) % bytes))
    fail("cp_async: %u-byte copy from %p to %p is not %u-byte aligned", bytes, src, dst, bytes);
  f->copies.push_back(
      detail::CopyOp{dst, src, bytes, src_bytes, f->group, __builtin_return_address(0)});
}

void cp_async_commit() { ++detail::engine().cur->group; }

namespace {

// The wait of an asynchronous queue (cp.async, wgmma): `queue` holds a thread's operations,
// oldest first, each tagged with its group; groups below `open` are committed, and all but
// the newest `n` of them are performed (`perform`) and dropped.
template <class Op, class Perform>
void wait_groups(const char* what, std::vector<Op>& queue, uint64_t open, int n,
                 Perform perform) {
  if (n < 0) fail("%s(%d): the group count must be non-negative", what, n);
  const uint64_t limit = open > uint64_t(n) ? open - uint64_t(n) : 0;
  size_t done = 0;
  for (; done < queue.size() && queue[done].group < limit; ++done) perform(queue[done]);
  queue.erase(queue.begin(), queue.begin() + done);
}

}  // namespace

void cp_async_wait(int n) {
  Fiber* f = detail::engine().cur;
  wait_groups("cp_async_wait", f->copies, f->group, n, [](const detail::CopyOp& c) {
    if (check::rt::on()) {
      // The copy lands now, on behalf of the issuing thread (the caller).
      check::access(c.src, c.src_bytes, check::kRead, c.pc);
      check::access(c.dst, c.bytes, check::kWrite, c.pc);
    }
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
  });
}

uint32_t shared_address(const void* p) {
  const detail::Engine& e = detail::engine();
  const auto* c = static_cast<const unsigned char*>(p);
  if (e.smem == nullptr || c < e.smem || c >= e.smem_end)
    fail("shared address of %p: not in the block's dynamic shared memory", p);
  return uint32_t(c - e.smem);
}

namespace {

// Element (row, k) of an operand of a wgmma, 16-bit, from its matrix descriptor: a K-major
// tile with the 128-byte swizzle (PTX ISA, "Matrix Descriptor Format" and "Shared Memory
// Matrix Layout"): rows of 128 bytes in groups of 8 (the stride byte offset apart), the
// 16-byte chunk of address bits 4–6 exchanged with bits 7–9 of the shared address.
float wgmma_operand(uint64_t desc, unsigned row, unsigned k, bool bf16) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t stride = uint32_t(desc >> 32 & 0x3FFF) << 4;
  const unsigned base_offset = unsigned(desc >> 49 & 7), swizzle = unsigned(desc >> 62);
  if (swizzle != 1 || base_offset != 0 || stride != 1024)
    fail("wgmma descriptor 0x%016llx: only K-major 128-byte-swizzled tiles (swizzle 1, base "
         "offset 0, stride 1024 B) are emulated",
         static_cast<unsigned long long>(desc));
  const uint32_t linear = start + row / 8 * stride + row % 8 * 128 + 2 * k;
  const uint32_t address = linear ^ ((linear >> 7 & 7) << 4);
  const detail::Engine& e = detail::engine();
  if (e.smem == nullptr || e.smem + address + 2 > e.smem_end)
    fail("wgmma operand at shared address 0x%x is outside the dynamic shared memory", address);
  if (check::rt::on()) {
    // Counted with its instruction (wgmma_mma_async), not as a plain load.
    check::operand_begin();
    check::access(e.smem + address, 2, check::kRead, nullptr);
    check::operand_end();
  }
  uint16_t bits;
  std::memcpy(&bits, e.smem + address, 2);
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
}

// D += A·B (or D = A·B without scale_d) for the calling thread's fragment: thread t of its
// warpgroup, warp w = t / 32, g = lane / 4, q = lane % 4 holds d[4j + e] =
// D[16w + g + 8(e / 2)][8j + 2q + e % 2]. Products of 16-bit values are exact in f32; the
// 16 of a k-step are summed in k order.
void wgmma_run(const detail::WgmmaOp& op) {
  const unsigned t = detail::tl_thread->linear % 128, w = t / 32, g = t % 32 / 4, q = t % 4;
  // The two rows of A and the op.n / 2 columns of B this thread's elements use.
  float a[2][16], b[64][16];
  const unsigned cols = op.n / 2;
  if (cols > 64) fail("wgmma: n = %u accumulator registers, at most 128 emulated", op.n);
  for (unsigned k = 0; k < 16; ++k) {
    for (unsigned h = 0; h < 2; ++h) a[h][k] = wgmma_operand(op.desc_a, 16 * w + g + 8 * h, k, op.bf16);
    for (unsigned c = 0; c < cols; ++c)
      b[c][k] = wgmma_operand(op.desc_b, 8 * (c / 2) + 2 * q + c % 2, k, op.bf16);
  }
  for (unsigned i = 0; i < op.n; ++i) {
    const unsigned j = i / 4, e = i % 4;
    float sum = 0.0f;
    for (unsigned k = 0; k < 16; ++k) sum += a[e / 2][k] * b[2 * j + e % 2][k];
    op.d[i] = op.scale_d ? op.d[i] + sum : sum;
  }
}

}  // namespace

void wgmma_mma_async(float* d, unsigned n, uint64_t desc_a, uint64_t desc_b, bool scale_d,
                     bool bf16) {
  if (detail::tl_block_dim.y != 1 || detail::tl_block_dim.z != 1 || detail::tl_block_dim.x % 128 != 0)
    fail("wgmma: the block (%u, %u, %u) is not whole warpgroups of 128 threads along x",
         detail::tl_block_dim.x, detail::tl_block_dim.y, detail::tl_block_dim.z);
  detail::Engine& e = detail::engine();
  Fiber* f = e.cur;
  // The hardware takes one set of operands per warpgroup (uniform registers): every thread
  // must pass what the first one to get here did.
  auto& issued = e.wgmma_issued[detail::tl_thread->linear / 128];
  const detail::WgmmaIssue mine{desc_a, desc_b, n, scale_d, bf16};
  const uint64_t i = f->wgmma_count++;
  if (i == issued.size()) {
    issued.push_back(mine);
    // m64nNk16: N = 2n columns.
    if (check::rt::on()) check::tensor(2ull * 64 * (2 * n) * 16, true);
  } else if (!(issued[i] == mine)) {
    fail("wgmma #%llu: this thread's operands (descriptors 0x%016llx, 0x%016llx) differ from "
         "its warpgroup's (0x%016llx, 0x%016llx); all 128 threads must issue the same wgmma",
         static_cast<unsigned long long>(i), static_cast<unsigned long long>(desc_a),
         static_cast<unsigned long long>(desc_b),
         static_cast<unsigned long long>(issued[i].desc_a),
         static_cast<unsigned long long>(issued[i].desc_b));
  }
  f->wgmma.push_back(detail::WgmmaOp{d, n, desc_a, desc_b, scale_d, bf16, f->wgmma_group});
}

void wgmma_commit() { ++detail::engine().cur->wgmma_group; }

void wgmma_wait(int n) {
  Fiber* f = detail::engine().cur;
  wait_groups("wgmma_wait", f->wgmma, f->wgmma_group, n, wgmma_run);
}

}  // namespace emu

extern "C" const char* emu_last_error(void) { return emu::detail::tl_last_error.c_str(); }

extern "C" void emu_set_workers(uint32_t n) {
  emu::detail::g_workers.store(std::min<uint32_t>(n, emu::detail::kMaxWorkers),
                               std::memory_order_relaxed);
}
