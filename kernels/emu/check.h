// The interface between the runtime (runtime.cpp) and the checker (check.cpp): the
// runtime tells the checker where a checked launch, its blocks, barriers and warp
// collectives begin, and asks it whether the launch running on this OS thread is checked.
// Internal to kernels/emu; kernels see emu.h's emu::check only.
#pragma once

#include "emu.h"

#include <string>
#include <vector>

namespace emu::check::rt {

struct State;
// The checked launch running on this OS thread, or null (checked launches run their
// blocks on the launching thread).
extern thread_local constinit State* tl_state;

inline bool on() { return tl_state != nullptr; }

// The checks requested for the next launch on this thread (emu_check_next_launch),
// consumed; 0 = none.
unsigned take_request();
// A checked launch starts on this thread (`checks` from take_request) / ends.
void launch_begin(unsigned checks, const char* kernel, Dim3 grid, Dim3 block,
                  uint32_t dynamic_smem, const void* params, size_t params_bytes);
// Returns the profile's refusal of a sampled launch (see profile.cpp), or null.
const char* launch_end();
// The blocks a profiled, sampled launch runs, in order; null: all.
const std::vector<uint64_t>* sampled_blocks();
// Block `b` (linear) starts, with the launch's part of the dynamic shared memory at
// `smem` and the worker's whole dynamic shared buffer [map_lo, map_hi).
void block_begin(uint64_t b, const unsigned char* smem, const unsigned char* map_lo,
                 const unsigned char* map_hi);
// Every thread of the block passed a __syncthreads.
void barrier();
// The lanes `mask` of warp `warp` met in a warp collective.
void warp_sync(unsigned warp, unsigned mask);

}  // namespace emu::check::rt

// The profile mode (kernels/emu/profile.cpp): counters over the same classified accesses.
namespace emu::check::prof {

// A buffer of the launch: [lo, hi), the index of its spec in emu_check_next_launch's list.
struct Region {
  uintptr_t lo, hi;
  size_t spec;
};

// The C ABI of a launch's profile (src/emulator/profile.rs mirrors it). Counts of a
// sampled launch are scaled (see profile.cpp), hence doubles; [0] reads, [1] writes.
struct ProfileRecord {
  double blocks, blocks_run, threads;
  double barriers, mma, mma_flops, wgmma, wgmma_flops;
  double shared_requests[2], shared_wavefronts[2], shared_ideal[2];
  double ldmatrix, ldmatrix_phases, ldmatrix_wavefronts;
  double outside_bytes;
  uint32_t sampled, refused, operands, pad;
};
struct ProfileOperand {
  double requests[2], bytes[2], sectors[2], distinct[2], block_sectors[2];
};

struct Launch;
// A profiled launch starts: the buffers sorted by address (check.cpp's order), `nspecs`
// buffers named in all (empty ones included). `sampled`: run only a sample of the blocks;
// `runs` (1: none) runs of a split reduction folded into grid dimension `fold_dim`, as
// index = run · tiles + tile, or tile · runs + run when `runs_inner` (see profile.cpp).
Launch* begin(Dim3 grid, Dim3 block, bool sampled, int fold_dim, uint32_t runs, bool runs_inner,
              const Region* regions, size_t n, size_t nspecs);
// The blocks to run, in order, or null for all.
const std::vector<uint64_t>* blocks(Launch* L);
void block_begin(Launch* L, uint64_t b);
// A classified access by the block's thread `thread` at instruction `pc`: of buffer
// `buffer` (an index into `regions`), of shared memory, or outside every buffer.
void global(Launch* L, unsigned thread, const void* pc, size_t buffer, uintptr_t p,
            size_t bytes, bool write);
void shared(Launch* L, unsigned thread, const void* pc, uintptr_t p, size_t bytes, bool write);
void outside(Launch* L, size_t bytes);
void barrier(Launch* L);
// One ldmatrix of the warp: the 8·num row addresses of its lanes.
void ldmatrix(Launch* L, const void* const* rows, int num);
void tensor(Launch* L, uint64_t flops, bool wgmma);
// The launch ended: the refusal of a sampled launch that the sample cannot represent, or
// null. `names`: the buffers' names by spec. Keeps the profile for emu_profile_last.
const char* end(Launch* L, const std::vector<std::string>& names);

}  // namespace emu::check::prof
