// quant.cuh — quantized frozen weights read inside the fused kernels (src/quant.rs describes
// the formats; the values here are bit for bit the ones src/quant.rs `dequantize_f32` gives,
// which tests/quant.rs checks against bitsandbytes and torch).
//
//   NF4 (bitsandbytes): element i of the flattened W [n, k] is code[nibble i] · absmax[i / bs],
//       nibble 2j the high half of byte j. absmax f32, or double-quantized:
//       (nested_code[codes[b]] · nested_absmax[b / 256]) + offset, each operation rounded to
//       f32 (__fmul_rn / __fadd_rn: a contracted FMA would differ from bitsandbytes).
//   FP8 E4M3 (float8_e4m3fn): f32(byte) · scale[row] or scale[row / br][col / bc].
//
// A block of absmax 0 (or scale 0) gives 0 · code = 0: no division happens at dequantization.
// The E4M3 decode is integer arithmetic (exact; no fp8 conversion intrinsic is needed, which
// the emulator would lack): a normal number's exponent and mantissa move into f32's fields, a
// subnormal is m · 2^-9.
#pragma once

#include "common.cuh"

enum QuantFormat : int32_t { QUANT_NONE = 0, QUANT_NF4 = 1, QUANT_FP8 = 2 };

// Twin of `QuantParams` in src/plan/delta_linear.rs: where a pass's B1 (the frozen W [n, k],
// contiguous, one batch entry) is quantized. `format` QUANT_NONE: B1 is the dense `b1`.
struct QuantParams {
    const uint8_t* data;           // NF4: ceil(n·k / 2) packed bytes; FP8: n·k E4M3 bytes
    const float* code;             // NF4: [16]
    const float* absmax;           // NF4: f32 [blocks]; null under double quantization
    const uint8_t* absmax_codes;   // NF4 double quantization: [blocks]
    const float* nested_code;      // [256]
    const float* nested_absmax;    // [ceil(blocks / 256)]
    const float* scale;            // FP8: [n] or [ceil(n / br), scale_ld]
    int64_t k;                     // W's row length
    int64_t scale_ld;              // FP8 block scales per block row: ceil(k / bc)
    int32_t format;                // QuantFormat
    int32_t block_shift;           // NF4: log2(blocksize)
    int32_t block_rows, block_cols;  // FP8: 0, 0 per output row
    float offset;                  // NF4 double quantization
    int32_t pad_;
};

PK_INLINE float e4m3_to_float(uint32_t b) {
    const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 0xfu, m = b & 7u;
    if (e == 0) {
        const float v = float(m) * 0.001953125f;  // m · 2^-9
        return sign ? -v : v;
    }
    if (e == 15 && m == 7) return __int_as_float(0x7fc00000);
    return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

// The absmax of NF4 block b.
PK_INLINE float nf4_absmax(const QuantParams& q, int64_t b) {
    if (q.absmax) return q.absmax[b];
    return __fadd_rn(__fmul_rn(q.nested_code[q.absmax_codes[b]], q.nested_absmax[b >> 8]), q.offset);
}

// The scale of FP8 element (row, col).
// row < n and col < k fit 32 bits (the plan checks n, k ≤ i32::MAX): 32-bit divisions, as a
// 64-bit one is a called routine whose stack frame put the SIMT backward in local memory.
PK_INLINE float fp8_scale(const QuantParams& q, int64_t row, int64_t col) {
    if (!q.block_rows) return q.scale[row];
    const int32_t br = int32_t(row) / q.block_rows, bc = int32_t(col) / q.block_cols;
    return q.scale[int64_t(br) * q.scale_ld + bc];
}

// W[row, col] in f32, exactly as src/quant.rs `dequantize_f32`.
PK_INLINE float quant_value(const QuantParams& q, int64_t row, int64_t col) {
    const int64_t i = row * q.k + col;
    if (q.format == QUANT_NF4) {
        const uint32_t byte = q.data[i >> 1];
        const uint32_t nibble = (i & 1) ? (byte & 0xfu) : (byte >> 4);
        return __fmul_rn(q.code[nibble], nf4_absmax(q, i >> q.block_shift));
    }
    return __fmul_rn(e4m3_to_float(q.data[i]), fp8_scale(q, row, col));
}

// W[row, col] as the kernels compute with it: rounded to the activation dtype T (an f16/bf16
// pass multiplies W in T on every path, the naive and SIMT kernels included, so that all
// kernels see the same W; f32 keeps the f32 value).
template <typename T>
PK_INLINE float quant_value_t(const QuantParams& q, int64_t row, int64_t col) {
    return to_float(from_float<T>(quant_value(q, row, col)));
}

// The elements of W's row `row` from `col` that one 16-byte load of the packed bytes holds
// (NF4 32, FP8 16; col + that ≤ k) into dst as T. The caller checked that the first element's
// byte is 16-byte aligned and that the elements share one absmax block (NF4: i a multiple of
// 32 ≤ blocksize) or one scale (FP8: per row, or bc a multiple of 16 and col of 16).
template <typename T>
PK_INLINE void quant_load_run(const QuantParams& q, int64_t row, int64_t col, T* dst) {
    const int64_t i = row * q.k + col;
    if (q.format == QUANT_NF4) {
        const Vec<uint8_t, 16> packed = load_vec<uint8_t, 16>(q.data + (i >> 1));
        const float amax = nf4_absmax(q, i >> q.block_shift);
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const uint32_t byte = packed.v[e];
            dst[2 * e] = from_float<T>(__fmul_rn(q.code[byte >> 4], amax));
            dst[2 * e + 1] = from_float<T>(__fmul_rn(q.code[byte & 0xfu], amax));
        }
    } else {
        const Vec<uint8_t, 16> bytes = load_vec<uint8_t, 16>(q.data + i);
        const float s = fp8_scale(q, row, col);
#pragma unroll
        for (int e = 0; e < 16; ++e) dst[e] = from_float<T>(__fmul_rn(e4m3_to_float(bytes.v[e]), s));
    }
}

// Whether W's runs of 32 elements (aligned to 32 in a row) can go by 16-byte loads: the
// packed bytes 16-byte aligned, k a multiple of the elements one load holds, and FP8 scales
// constant over 16 columns.
PK_INLINE bool quant_runs_vectorized(const QuantParams& q) {
    const bool nf4 = q.format == QUANT_NF4;
    return reinterpret_cast<uintptr_t>(q.data) % 16 == 0 && q.k % (nf4 ? 32 : 16) == 0 &&
           (nf4 || q.block_rows == 0 || q.block_cols % 16 == 0);
}

// W[row, col .. col + 32) as T into v (col a multiple of 32), zero outside rows < rows_lim,
// cols < cols_lim: 16-byte loads (one NF4, two FP8) where `vectorized`
// (quant_runs_vectorized) and the run is whole, element by element otherwise.
template <typename T>
PK_INLINE void quant_run32(const QuantParams& q, bool vectorized, int64_t row, int64_t col,
                           int64_t rows_lim, int64_t cols_lim, T (&v)[32]) {
    if (vectorized && row < rows_lim && col + 32 <= cols_lim) {
        quant_load_run(q, row, col, v);
        if (q.format != QUANT_NF4) quant_load_run(q, row, col + 16, v + 16);
        return;
    }
#pragma unroll
    for (int e = 0; e < 32; ++e)
        v[e] = from_float<T>(row < rows_lim && col + e < cols_lim ? quant_value(q, row, col + e) : 0.0f);
}
