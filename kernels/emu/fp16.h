// Emulated CUDA half-precision types for the CPU emulator: what <cuda_fp16.h> and
// <cuda_bf16.h> give device code, under the same names, with the GPU's rounding.
//
// - __half / __nv_bfloat16 are 2-byte PODs (alignment 2), __half2 / __nv_bfloat162
//   4-byte pairs (alignment 4, .x the low half), like CUDA's, so the same structs and
//   vector loads work in both modes.
// - Every conversion to a 16-bit type rounds to nearest even, subnormals included;
//   overflow gives ±inf (65520 → inf for f16), NaN gives the canonical NaN 0x7FFF as
//   cvt.rn.f16.f32 / cvt.rn.bf16.f32 do. Widening is exact.
// - __hadd / __hsub / __hmul / __hfma round once, like add.rn / mul.rn / fma.rn on f16
//   and bf16: the exact result is formed in double (a product of two 16-bit floats is
//   exact there) and a sum is rounded to odd before the final rounding, so the only
//   rounding that counts is the last one.
// - The conversions between the 16-bit types and float are `explicit` here (implicit in
//   CUDA): anything that compiles against this header means the same on the GPU, and
//   `h1 + h2` cannot silently turn into float arithmetic in the emulator only.
//
// Included by emu.h; needs float2 declared before it (emu.h's vector types).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace emu::fp16 {

// Round a double to the binary format with EXP exponent bits and MAN stored mantissa
// bits (f16: 5/10, bf16: 8/7), to nearest even; returns the 16 bits.
template <int EXP, int MAN>
constexpr uint16_t round_from_double(double v) {
  constexpr int kBias = (1 << (EXP - 1)) - 1;
  constexpr uint16_t kInf = uint16_t(((1u << EXP) - 1u) << MAN);
  constexpr uint16_t kCanonicalNan = 0x7FFF;  // the same bits for f16 and bf16
  const uint64_t bits = std::bit_cast<uint64_t>(v);
  const uint16_t sign = uint16_t((bits >> 63) << (EXP + MAN));
  const uint64_t mag = bits & 0x7FFF'FFFF'FFFF'FFFFull;
  if (mag > 0x7FF0'0000'0000'0000ull) return kCanonicalNan;
  const int e = int(mag >> 52) - 1023;  // double subnormals: far below both formats
  if (e > kBias) return sign | kInf;    // also catches inf
  const uint64_t sig = (mag & 0x000F'FFFF'FFFF'FFFFull) | (1ull << 52);
  // The result's exponent: e for normals, the minimum normal exponent for subnormals.
  const int out_e = e < 1 - kBias ? 1 - kBias : e;
  const int shift = 52 - MAN + (out_e - e);  // mantissa bits dropped, at least 45
  if (shift > 53) return sign;  // below half the smallest subnormal: ±0
  uint64_t q = sig >> shift;
  const uint64_t rem = sig & ((1ull << shift) - 1);
  const uint64_t half = 1ull << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;
  // q includes the implicit bit for normals, so adding it to the biased exponent minus
  // one gives the field; a carry out of the mantissa bumps the exponent, up to inf.
  return sign | uint16_t((uint64_t(out_e + kBias - 1) << MAN) + q);
}

// `p + c` rounded to odd in double (the exact sum when it is representable; otherwise
// the neighbour with an odd last bit). Rounding that to a format of 51 bits or fewer is
// the correctly rounded sum, without the double-rounding error of `p + c` in double.
inline double sum_round_to_odd(double p, double c) {
  const double s = p + c;
  if (!std::isfinite(s)) return s;
  const double pv = s - c;  // Knuth's TwoSum: err = (p + c) - s exactly
  const double err = (p - pv) + (c - (s - pv));
  uint64_t bits = std::bit_cast<uint64_t>(s);
  if (err != 0.0 && (bits & 1) == 0) bits += (err > 0.0) == (s > 0.0) ? 1 : uint64_t(-1);
  return std::bit_cast<double>(bits);
}

inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return std::bit_cast<float>(m ? 0x7FFF'FFFFu : sign | 0x7F80'0000u);
  if (e == 0) {  // zero or subnormal: m · 2^-24, exact in float
    const float v = float(m) * 0x1p-24f;
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

inline float bf16_bits_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }

}  // namespace emu::fp16

struct alignas(2) __half {
  __half() = default;
  explicit __half(float f) : __x(emu::fp16::round_from_double<5, 10>(f)) {}
  explicit operator float() const { return emu::fp16::f16_bits_to_float(__x); }

 protected:
  unsigned short __x;
};

struct alignas(2) __nv_bfloat16 {
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) : __x(emu::fp16::round_from_double<8, 7>(f)) {}
  explicit operator float() const { return emu::fp16::bf16_bits_to_float(__x); }

 protected:
  unsigned short __x;
};

struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half lo, __half hi) : x(lo), y(hi) {}
};

struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  __nv_bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) : x(lo), y(hi) {}
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2);
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2);
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4);
static_assert(sizeof(__nv_bfloat162) == 4 && alignof(__nv_bfloat162) == 4);
static_assert(std::is_trivial_v<__half> && std::is_standard_layout_v<__half>);
static_assert(std::is_trivial_v<__nv_bfloat16> && std::is_standard_layout_v<__nv_bfloat16>);

// Raw bits.
inline unsigned short __half_as_ushort(__half h) { return std::bit_cast<unsigned short>(h); }
inline __half __ushort_as_half(unsigned short u) { return std::bit_cast<__half>(u); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) {
  return std::bit_cast<unsigned short>(h);
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  return std::bit_cast<__nv_bfloat16>(u);
}

// Scalar conversions (round to nearest even; the unsuffixed forms round the same way).
inline __half __float2half_rn(float f) {
  return __ushort_as_half(emu::fp16::round_from_double<5, 10>(f));
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return emu::fp16::f16_bits_to_float(__half_as_ushort(h)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __ushort_as_bfloat16(emu::fp16::round_from_double<8, 7>(f));
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
  return emu::fp16::bf16_bits_to_float(__bfloat16_as_ushort(h));
}

// Pairs: the first argument / .x is the low 16 bits.
inline __half2 __halves2half2(__half lo, __half hi) { return __half2(lo, hi); }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2(__float2half_rn(lo), __float2half_rn(hi));
}
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }

inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return __nv_bfloat162(lo, hi);
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return float2{__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// Arithmetic, rounded once (add.rn / mul.rn / fma.rn).
inline __half __hadd(__half a, __half b) {
  return __ushort_as_half(emu::fp16::round_from_double<5, 10>(
      emu::fp16::sum_round_to_odd(__half2float(a), __half2float(b))));
}
inline __half __hsub(__half a, __half b) {
  return __ushort_as_half(emu::fp16::round_from_double<5, 10>(
      emu::fp16::sum_round_to_odd(__half2float(a), -double(__half2float(b)))));
}
inline __half __hmul(__half a, __half b) {
  return __ushort_as_half(
      emu::fp16::round_from_double<5, 10>(double(__half2float(a)) * __half2float(b)));
}
inline __half __hfma(__half a, __half b, __half c) {
  return __ushort_as_half(emu::fp16::round_from_double<5, 10>(emu::fp16::sum_round_to_odd(
      double(__half2float(a)) * __half2float(b), __half2float(c))));
}

inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __ushort_as_bfloat16(emu::fp16::round_from_double<8, 7>(
      emu::fp16::sum_round_to_odd(__bfloat162float(a), __bfloat162float(b))));
}
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __ushort_as_bfloat16(emu::fp16::round_from_double<8, 7>(
      emu::fp16::sum_round_to_odd(__bfloat162float(a), -double(__bfloat162float(b)))));
}
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __ushort_as_bfloat16(emu::fp16::round_from_double<8, 7>(
      double(__bfloat162float(a)) * __bfloat162float(b)));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __ushort_as_bfloat16(emu::fp16::round_from_double<8, 7>(emu::fp16::sum_round_to_odd(
      double(__bfloat162float(a)) * __bfloat162float(b), __bfloat162float(c))));
}
