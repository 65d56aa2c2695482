// LoRA dropout's counter-based generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011), as the Random123 library
// defines it. A kernel that drops an element of the delta's input u regenerates its mask
// bit from (seed, row, column) alone, so the forward's down pass and the backward's dx pass
// agree without a mask tensor in memory, in any launch shape and evaluation order.
//
// The contract, bit-identical with the Rust twin `peft_kernels::dropout` (src/dropout.rs):
//   key     = (seed as u32, (seed >> 32) as u32)
//   counter = (col, row, 0, 0)        row: the global row (token), col: the column of u
//   u01     = (philox(counter, key)[0] >> 8) · 2^-24        exact in f32, in [0, 1)
//   keep    = u01 >= p                p <= 0 keeps all; p >= 1 (and NaN) drops all
//   scale   = 1 / (1 − p) for p < 1, 0 for p >= 1 (never inf or NaN); 1 for p <= 0
// One Philox call yields four words; only the first is used, so each (row, col) costs one
// 10-round call (about 40 integer multiply-adds): cheap beside the GEMM that loads u.
//
// Plain C++ with 32-bit integer arithmetic: nvcc builds it for the GPU, and the emulator's
// g++ runs the same lines, so the masks agree bit for bit with each other and with Rust.
#pragma once

#include <cstdint>

// Philox4x32 multipliers and Weyl (key schedule) constants, from Random123's philox.h.
constexpr uint32_t kPkPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPkPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPkPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPkPhiloxW1 = 0xBB67AE85u;

// A Philox4x32 counter or output block.
struct PkPhilox4 {
  uint32_t v[4];
};

// The 32×32 → 64-bit product's high and low words (a 64-bit multiply: one IMAD.WIDE on the
// GPU, exact in C++).
__device__ __forceinline__ void pk_mulhilo32(uint32_t a, uint32_t b, uint32_t& hi,
                                             uint32_t& lo) {
  const uint64_t prod = uint64_t(a) * uint64_t(b);
  hi = uint32_t(prod >> 32);
  lo = uint32_t(prod);
}

// Philox4x32 with 10 rounds: round r uses the key bumped r times by the Weyl constants.
__device__ __forceinline__ PkPhilox4 pk_philox4x32_10(PkPhilox4 ctr, uint32_t key0,
                                                      uint32_t key1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    pk_mulhilo32(kPkPhiloxM0, ctr.v[0], hi0, lo0);
    pk_mulhilo32(kPkPhiloxM1, ctr.v[2], hi1, lo1);
    ctr = PkPhilox4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kPkPhiloxW0;
    key1 += kPkPhiloxW1;
  }
  return ctr;
}

// The uniform in [0, 1) of element (row, col) under `seed`: the top 24 bits of the first
// output word, so the f32 conversion is exact.
__device__ __forceinline__ float pk_dropout_uniform(uint64_t seed, uint32_t row, uint32_t col) {
  const PkPhilox4 out =
      pk_philox4x32_10(PkPhilox4{{col, row, 0u, 0u}}, uint32_t(seed), uint32_t(seed >> 32));
  return float(out.v[0] >> 8) * 0x1p-24f;
}

// Whether dropout with probability p keeps element (row, col) of u under `seed`.
__device__ __forceinline__ bool pk_dropout_keep(uint64_t seed, uint32_t row, uint32_t col,
                                                float p) {
  return pk_dropout_uniform(seed, row, col) >= p;
}

// The factor a kept element is multiplied by: 1 / (1 − p) (IEEE division, as Rust's), 0 when
// p >= 1 drops everything, 1 when p <= 0 keeps everything.
__device__ __forceinline__ float pk_dropout_scale(float p) {
  if (!(p < 1.0f)) return 0.0f;
  if (p <= 0.0f) return 1.0f;
  return 1.0f / (1.0f - p);
}
