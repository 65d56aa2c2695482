// The interface between the runtime (runtime.cpp) and the checker (check.cpp): the
// runtime tells the checker where a checked launch, its blocks, barriers and warp
// collectives begin, and asks it whether the launch running on this OS thread is checked.
// Internal to kernels/emu; kernels see emu.h's emu::check only.
#pragma once

#include "emu.h"

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
void launch_end();
// Block `b` (linear) starts, with the launch's part of the dynamic shared memory at
// `smem` and the worker's whole dynamic shared buffer [map_lo, map_hi).
void block_begin(uint64_t b, const unsigned char* smem, const unsigned char* map_lo,
                 const unsigned char* map_hi);
// Every thread of the block passed a __syncthreads.
void barrier();
// The lanes `mask` of warp `warp` met in a warp collective.
void warp_sync(unsigned warp, unsigned mask);

}  // namespace emu::check::rt
