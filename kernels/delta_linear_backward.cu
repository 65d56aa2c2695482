// delta_linear_backward.cu — the backward of the fused linear + bottleneck delta
// (delta_linear.cu), TRAINING.md's formulas in the forward's layouts (W [N, K],
// W_down [r, K_u], W_up [N, r]; row coefficients (c_h, c_d) = (1, 1) add, (1, s) scaled,
// (1 − λ_m, λ_m) gate):
//
//   dz pass      dz = f′(z) ⊙ (c_d·dy·W_up)                          [M, r], f32 (workspace)
//   data pass    out = c(m)·(A·B + E) + mask ⊙ dz·B2                  one GEMM over k1 + k2 steps
//                  parallel, u = x:   dx = [c_h·dy | dz]·[W ; W_down]  (k1 = N, k2 = r)
//                  separate u:        dx = c_h·dy·W;  du = dz·W_down
//                  sequential:        dh = c_h·dy + dz·W_down (f32, workspace); dx = dh·W
//   weight pass  out[i, c] (+)= Σ_m c(m)·A[m, i]·Q[m, c],  bias[i] (+)= Σ_m c(m)·A[m, i]
//                  dW_up = c_d·dyᵀ·f(z), db_up;   dW_down = dzᵀ·u', db_down
//                the reduction over tokens split over grid.z for a long M: each run's f32
//                sums go to the workspace and weight_reduce adds them in run order
//                (deterministic: no float atomics); `accumulate` adds to the gradient
//                (micro-batches) instead of overwriting it.
//   dgate pass   dλ_m = Σ_n dy_mn·(Δ_mn − h_mn),  Δ = f(z)·W_upᵀ + b_up  (one block a row)
//
// LoRA dropout (u' = u ⊙ mask / (1 − p)) is regenerated from the forward's seed by Philox
// (philox.cuh), never stored: the data pass masks its delta part (du, or dx's share through u
// = x, or dh's through u = h), the dW_down pass masks u as it loads it.
//
// The operands of a pass are T or f32 (a flag each: dh and dz live in the f32 workspace, the
// saved z and h are f32); every product accumulates in f32. W is read untransposed as the
// data pass's B ([K_reduction = N, cols = K], row-major): the "transposed operand" layout of
// the forward's GEMM core. The weight passes read both factors token-major, A as [m, rows]
// (dy, dz) and Q as [m, cols] (f(z), u').
//
// Kernels (the forward's numbering):
//   *_naive_*   one thread per output: the correctness baseline.
//   *_simt_*    64×64×16 shared-memory tiles, 4×4 outputs per thread (as the forward's
//               SIMT kernel), every dtype, any alignment.
//   *_mma_*     f16/bf16 tensor cores, mma.sync.m16n8k16 with f32 accumulation, cp.async
//               double buffering: the data pass (dx), ldmatrix .trans for the untransposed
//               W (128 × 128 × 32 tiles, see bwd_data_mma); the weight passes (dW_up, dW_down),
//               whose factors are both token-major ([m, ·] row-major: the transposed A and
//               the untransposed B of Aᵀ·Q), ldmatrix .trans for both (64 × 64 × 32 tiles: one
//               output dimension is the rank r; see bwd_weight_mma), their computed factor
//               (f(z), dz, u's dropout) rounded to T once in shared memory.

#include "common.cuh"
#include "philox.cuh"
#include "quant.cuh"

enum BwdCoef : int32_t { BWD_COEF_ONE = 0, BWD_COEF_H = 1, BWD_COEF_D = 2 };
enum BwdCompose : int32_t { BWD_ADD = 0, BWD_SCALED = 1, BWD_GATED = 2 };

// The parameter block of every backward kernel; twin of `DeltaBackwardParams` in
// src/plan/delta_linear_backward.rs. Leading dimensions and batch (head) strides are in
// elements; absent operands are null.
struct DeltaBackwardParams {
    const void* a;     // first factor: dy, dh (f32), or a weight gradient's left factor
    const void* b;     // second factor
    const void* e;     // data pass: the added term (dy); dgate: h
    const void* a2;    // data pass: dz (f32)
    const void* b2;    // data pass: W_down
    const float* z;    // the saved pre-activations z [M, r]
    const void* bias;  // dgate: b_up
    const void* gate;  // λ [M] (gated composition)
    void* out;
    float* out_bias;  // weight pass: the bias gradient
    float* partial;   // weight pass, split: f32 [batch][splits][rows][ldp]
    int64_t lda, ldb, lde, lda2, ldb2, ldz, ldo, ldp;
    int64_t bs_a, bs_b, bs_e, bs_a2, bs_b2, bs_z, bs_bias, bs_out, bs_out_bias;
    uint64_t drop_seed;  // LoRA dropout (see bwd_dropout)
    int32_t rows, cols, k1, k2;
    int32_t splits;  // weight pass: runs of the token reduction (grid.z = batch × splits)
    int32_t batch;
    int32_t a_f32, b_f32, e_f32, out_f32;  // operand types: 1 = f32, 0 = T
    int32_t activation;  // the bottleneck's f (Activation)
    int32_t b_activate;  // weight pass: the second factor is f(b) (a = f(z))
    int32_t compose;     // BwdCompose
    int32_t coef;        // BwdCoef: the row coefficient of the `a` term
    int32_t accumulate;  // weight pass: += into the gradient
    int32_t dropout;     // data pass: mask the delta's part; weight pass: mask Q (= u)
    float scale;
    float drop_p;
    QuantParams quant;  // data pass: the frozen W (b) quantized (delta_linear_quant_backward)
};
PK_PARAMS_SIZE(DeltaBackwardParams)

// Element i of an operand that is f32 or T.
template <typename T>
PK_INLINE float load(const void* p, int32_t is_f32, int64_t i) {
    return is_f32 ? static_cast<const float*>(p)[i] : to_float(static_cast<const T*>(p)[i]);
}

template <typename T>
PK_INLINE const void* offset(const void* p, int32_t is_f32, int64_t elems) {
    if (!p) return nullptr;
    return is_f32 ? static_cast<const void*>(static_cast<const float*>(p) + elems)
                  : static_cast<const void*>(static_cast<const T*>(p) + elems);
}

// The row coefficient `which` of row m.
template <typename T>
PK_INLINE float bwd_coef(const DeltaBackwardParams& p, int32_t which, int m) {
    if (which == BWD_COEF_ONE) return 1.0f;
    float d = p.compose == BWD_SCALED ? p.scale : 1.0f, h = 1.0f;
    if (p.compose == BWD_GATED) {
        d = to_float(static_cast<const T*>(p.gate)[m]);
        h = 1.0f - d;
    }
    return which == BWD_COEF_H ? h : d;
}

// LoRA dropout's factor for element (m, c) of u, regenerated from (seed, row, column) as the
// forward's down pass drew it (philox.cuh): 0 or 1 / (1 − p).
PK_INLINE float bwd_dropout(const DeltaBackwardParams& p, int m, int c) {
    return pk_dropout_keep(p.drop_seed, uint32_t(m), uint32_t(c), p.drop_p) ? pk_dropout_scale(p.drop_p)
                                                                           : 0.0f;
}

// The operands of batch entry (head) bz.
struct BwdOperands {
    const void *a, *b, *e, *a2, *b2, *bias;
    const float* z;
    void* out;
    float* out_bias;
};

template <typename T>
PK_INLINE BwdOperands bwd_operands(const DeltaBackwardParams& p, int64_t bz) {
    BwdOperands o;
    o.a = offset<T>(p.a, p.a_f32, bz * p.bs_a);
    o.b = offset<T>(p.b, p.b_f32, bz * p.bs_b);
    o.e = offset<T>(p.e, p.e_f32, bz * p.bs_e);
    o.a2 = offset<T>(p.a2, 1, bz * p.bs_a2);
    o.b2 = offset<T>(p.b2, 0, bz * p.bs_b2);
    o.bias = offset<T>(p.bias, 0, bz * p.bs_bias);
    o.z = p.z ? p.z + bz * p.bs_z : nullptr;
    o.out = const_cast<void*>(offset<T>(p.out, p.out_f32, bz * p.bs_out));
    o.out_bias = p.out_bias ? p.out_bias + bz * p.bs_out_bias : nullptr;
    return o;
}

template <typename T>
PK_INLINE void store(void* p, int32_t is_f32, int64_t i, float v) {
    if (is_f32)
        static_cast<float*>(p)[i] = v;
    else
        static_cast<T*>(p)[i] = from_float<T>(v);
}

// ---------------------------------------------------------------------------------------------
// dz pass: out[m, j] = f′(z[m, j])·c(m)·Σ_{n < k1} a[m, n]·b[n, j] (b = W_up [N, r]).
// grid (ceil(r/16), ceil(M/16), batch), block 16×16. A zero dy gives 0 whatever f′ is (f′ is
// finite everywhere).

template <typename T>
PK_INLINE void bwd_dz(const DeltaBackwardParams& p) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = blockIdx.y * blockDim.y + threadIdx.y;
    if (m >= p.rows || j >= p.cols) return;
    const BwdOperands o = bwd_operands<T>(p, blockIdx.z);
    float acc = 0.0f;
    for (int n = 0; n < p.k1; ++n)
        acc += load<T>(o.a, p.a_f32, m * p.lda + n) * load<T>(o.b, p.b_f32, n * p.ldb + j);
    const float fd = activate_derivative(static_cast<Activation>(p.activation), o.z[m * p.ldz + j]);
    store<T>(o.out, p.out_f32, m * p.ldo + j, bwd_coef<T>(p, p.coef, m) * acc * fd);
}

// ---------------------------------------------------------------------------------------------
// Data pass: out[m, c] = coef(m)·(Σ_{i < k1} a[m, i]·b[i, c] + e[m, c]) + Σ_{j < k2} a2[m, j]·b2[j, c].

// v1: naive. grid (ceil(cols/16), ceil(M/16), batch), block 16×16.
template <typename T>
PK_INLINE void bwd_data_naive(const DeltaBackwardParams& p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = blockIdx.y * blockDim.y + threadIdx.y;
    if (m >= p.rows || c >= p.cols) return;
    const BwdOperands o = bwd_operands<T>(p, blockIdx.z);
    float acc = 0.0f, delta = 0.0f;
    for (int i = 0; i < p.k1; ++i) {
        const float b = p.quant.format ? quant_value_t<T>(p.quant, i, c)
                                       : load<T>(o.b, p.b_f32, i * p.ldb + c);
        acc += load<T>(o.a, p.a_f32, m * p.lda + i) * b;
    }
    if (o.e) acc += load<T>(o.e, p.e_f32, m * p.lde + c);
    for (int j = 0; o.a2 && j < p.k2; ++j)
        delta += static_cast<const float*>(o.a2)[m * p.lda2 + j] *
                 to_float(static_cast<const T*>(o.b2)[j * p.ldb2 + c]);
    if (p.dropout) delta *= bwd_dropout(p, m, c);
    store<T>(o.out, p.out_f32, m * p.ldo + c, bwd_coef<T>(p, p.coef, m) * acc + delta);
}

// v2: SIMT tiles, as the forward's: grid (ceil(cols/64), ceil(M/64), batch), block 256, 4×4
// outputs per thread strided by 16. Both phases' A tiles are loaded k-major (As[k][row]) with
// 16 consecutive threads on 16 consecutive k; the B tiles are [k][col] rows of the
// untransposed operand, 64 consecutive threads on 64 consecutive columns (coalesced).
namespace bwd_simt {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
}

template <typename T>
PK_INLINE void bwd_data_simt(const DeltaBackwardParams& p) {
    using namespace bwd_simt;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const BwdOperands o = bwd_operands<T>(p, blockIdx.z);
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    // The delta's k-tiles first, so that its sum can take the dropout mask before the frozen
    // part joins; the frozen part's row coefficient is applied to A as it is loaded.
    const int tiles2 = o.a2 ? ceil_div(p.k2, BK) : 0, tiles1 = ceil_div(p.k1, BK);
    auto mask = [&]() {
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
                const int m = m0 + ty + 16 * i, c = c0 + tx + 16 * j;
                if (m < p.rows && c < p.cols) acc[i][j] *= bwd_dropout(p, m, c);
            }
    };
    for (int kt = 0; kt < tiles2 + tiles1; ++kt) {
        if (kt == tiles2 && p.dropout) mask();
        const bool delta = kt < tiles2;
        const int k0 = (delta ? kt : kt - tiles2) * BK, k_lim = delta ? p.k2 : p.k1;
        const void* a = delta ? o.a2 : o.a;
        const int32_t a_f32 = delta ? 1 : p.a_f32;
        const int64_t lda = delta ? p.lda2 : p.lda;
        {
            const int k = threadIdx.x % BK;
            for (int row = threadIdx.x / BK; row < BM; row += THREADS / BK) {
                const int gm = m0 + row, gk = k0 + k;
                float v = 0.0f;
                if (gm < p.rows && gk < k_lim) {
                    v = load<T>(a, a_f32, gm * lda + gk);
                    if (!delta) v *= bwd_coef<T>(p, p.coef, gm);
                }
                As[k][row] = v;
            }
        }
        const void* b = delta ? o.b2 : o.b;
        const int32_t b_f32 = delta ? 0 : p.b_f32;
        const int64_t ldb = delta ? p.ldb2 : p.ldb;
        for (int idx = threadIdx.x; idx < BK * BN; idx += THREADS) {
            const int k = idx / BN, col = idx % BN, gk = k0 + k, gc = c0 + col;
            const bool quant = !delta && p.quant.format;
            Bs[k][col] = !(gk < k_lim && gc < p.cols) ? 0.0f
                         : quant ? quant_value_t<T>(p.quant, gk, gc)
                                 : load<T>(b, b_f32, gk * ldb + gc);
        }
        __syncthreads();
        for (int k = 0; k < BK; ++k) {
            float av[4], bv[4];
            for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
            for (int j = 0; j < 4; ++j) bv[j] = Bs[k][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    // Without frozen k-tiles the loop never reached the mask.
    if (tiles1 == 0 && p.dropout) mask();
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= p.rows) continue;
        const float cm = o.e ? bwd_coef<T>(p, p.coef, m) : 0.0f;
        for (int j = 0; j < 4; ++j) {
            const int c = c0 + tx + 16 * j;
            if (c >= p.cols) continue;
            const float e = o.e ? cm * load<T>(o.e, p.e_f32, m * p.lde + c) : 0.0f;
            store<T>(o.out, p.out_f32, m * p.ldo + c, acc[i][j] + e);
        }
    }
}

// v3: tensor cores (f16/bf16): mma.sync.m16n8k16 with f32 accumulation. grid (ceil(cols/128),
// ceil(M/128), batch), block 256 = 8 warps as 2 × 4, warp tile 64 × 32 (4 × 4 mma tiles),
// BK = 32, two shared-memory stages filled by cp.async while the warps multiply the other.
// A (dy, or dh / dz from the f32 workspace) is a [BM][BK] tile as in the forward; B (W, or
// W_down) is used untransposed: its tile keeps the global orientation [BK][BN] (rows = the
// reduction index) and ldmatrix .trans hands out the col-major fragments mma wants (the
// "kn" layout of selftest_mma.cu's GEMM). Operands whose rows are 16-byte copyable (aligned
// base, leading dimension a multiple of 8) go by cp.async with zero-filled edges; others
// (f32 operands, converted to T, and unaligned views) element by element.
// Launch bounds (256, 1): at two blocks an SM (128 registers) ptxas spilled ~80 bytes (the
// generic loads' f32 conversion and the mask beside 64 accumulators); one block an SM is 8
// warps, an occupancy to tune once measured.
// The delta's k-tiles run first, so its sum can take the dropout mask before the frozen
// part joins. The plan sends here only passes with a frozen part (k1 > 0), no E term and
// a row coefficient of 1 (not the gate's 1 − λ): dx of a parallel or sequential delta.
namespace bwd_mma {
constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, PAD = 8;
}

// Rows [r0, r0 + ROWS) × cols [c0, c0 + COLS) of a row-major [rows_lim, cols_lim] operand (T, or
// f32 with src_f32) into dst, zero outside it: 8-element chunks, by cp.async with `vec`.
template <typename T, int ROWS, int COLS>
PK_INLINE void bwd_mma_load(T (*dst)[COLS + bwd_mma::PAD], const void* src, int32_t src_f32,
                            bool vec, int64_t ld, int rows_lim, int cols_lim, int r0, int c0) {
    constexpr int CHUNKS = COLS / 8;
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += bwd_mma::THREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        const int gr = r0 + r, gc = c0 + c;
        int valid = gr < rows_lim ? cols_lim - gc : 0;
        valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
        if (vec) {
            const T* base = static_cast<const T*>(src);
            cp_async_16_zfill(&dst[r][c], valid > 0 ? base + gr * ld + gc : base, valid * 2);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
                dst[r][c + e] = from_float<T>(e < valid ? load<T>(src, src_f32, gr * ld + gc + e) : 0.0f);
        }
    }
}

// bwd_mma_load of a quantized W (quant.cuh): rows [r0, r0 + ROWS) (W's rows, the reduction
// index) × cols [c0, c0 + COLS) (W's columns) into dst as T, in runs of 32 columns: a row's
// run is contiguous in the packed bytes, so W is read untransposed, 16 bytes at a time where
// quant_runs_vectorized allows. Plain shared stores, as bwd_mma_load's element path.
template <typename T, int ROWS, int COLS>
PK_INLINE void bwd_mma_load_quant(T (*dst)[COLS + bwd_mma::PAD], const QuantParams& q,
                                  int rows_lim, int cols_lim, int r0, int c0) {
    static_assert(COLS % 32 == 0, "runs of 32 columns");
    constexpr int RUNS = COLS / 32;
    const bool vectorized = quant_runs_vectorized(q);
    for (int i = threadIdx.x; i < ROWS * RUNS; i += bwd_mma::THREADS) {
        const int r = i / RUNS, c = (i % RUNS) * 32;
        T v[32];
        quant_run32(q, vectorized, r0 + r, c0 + c, rows_lim, cols_lim, v);
#pragma unroll
        for (int e = 0; e < 32; ++e) dst[r][c + e] = v[e];
    }
}

PK_INLINE bool copyable_16(const void* p, int64_t ld) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 8 == 0;
}

template <typename T>
PK_INLINE void bwd_data_mma(const DeltaBackwardParams& p) {
    using namespace bwd_mma;
    __shared__ __align__(16) T as[2][BM][BK + PAD];
    __shared__ __align__(16) T bs[2][BK][BN + PAD];
    const BwdOperands o = bwd_operands<T>(p, blockIdx.z);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;
    const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
    const int tiles2 = o.a2 ? ceil_div(p.k2, BK) : 0, tiles1 = ceil_div(p.k1, BK);
    const bool a_vec = !p.a_f32 && copyable_16(o.a, p.lda);
    const bool b_vec = !p.b_f32 && copyable_16(o.b, p.ldb);
    const bool b2_vec = o.b2 && copyable_16(o.b2, p.ldb2);
    auto load = [&](int stage, int kt) {
        if (kt < tiles2) {
            const int k0 = kt * BK;
            bwd_mma_load<T, BM, BK>(as[stage], o.a2, 1, false, p.lda2, p.rows, p.k2, m0, k0);
            bwd_mma_load<T, BK, BN>(bs[stage], o.b2, 0, b2_vec, p.ldb2, p.k2, p.cols, k0, c0);
        } else {
            const int k0 = (kt - tiles2) * BK;
            bwd_mma_load<T, BM, BK>(as[stage], o.a, p.a_f32, a_vec, p.lda, p.rows, p.k1, m0, k0);
            if (p.quant.format)
                bwd_mma_load_quant<T, BK, BN>(bs[stage], p.quant, p.k1, p.cols, k0, c0);
            else
                bwd_mma_load<T, BK, BN>(bs[stage], o.b, p.b_f32, b_vec, p.ldb, p.k1, p.cols, k0, c0);
        }
    };
    float acc[4][4][4] = {};
    // fn(row, col, value) for every accumulator element inside the output.
    auto for_each = [&](auto fn) {
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = m0 + wm + mt * 16 + g + 8 * (i / 2);
                    const int col = c0 + wn + nt * 8 + 2 * t + (i & 1);
                    if (row < p.rows && col < p.cols) fn(row, col, acc[mt][nt][i]);
                }
    };
    auto mask = [&]() { for_each([&](int m, int c, float& v) { v *= bwd_dropout(p, m, c); }); };

    const int tiles = tiles2 + tiles1;
    if (tiles > 0) load(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < tiles; ++kt) {
        const int stage = kt & 1;
        if (kt + 1 < tiles) load(stage ^ 1, kt + 1);
        // Commit even when nothing was issued: "all but the newest group" is then tile kt.
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (kt == tiles2 && p.dropout) mask();  // the delta's part is complete
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldmatrix_x4(af[mt], &as[stage][wm + mt * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                // Matrices (n 0–7, k 0–7), (n 0–7, k 8–15), (n 8–15, k 0–7), (n 8–15, k 8–15).
                uint32_t r[4];
                ldmatrix_x4_trans(r, &bs[stage][kk + (lane & 15)][wn + np * 16 + (lane >> 4) * 8]);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt)
                    mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
        }
        // Every warp is done with this stage before the next iteration refills it.
        __syncthreads();
    }
    cp_async_wait_all();
    // Without frozen k-tiles the loop never reached the mask.
    if (tiles1 == 0 && p.dropout) mask();
    for_each([&](int m, int c, float& v) { store<T>(o.out, p.out_f32, m * p.ldo + c, v); });
}

// ---------------------------------------------------------------------------------------------
// Weight pass: out[i, c] = Σ_m coef(m)·a[m, i]·q(m, c), q = b[m, c] or f(b[m, c]); column
// c = cols is the bias gradient (q = 1). The tokens m < k1 split into p.splits runs
// (grid.z = batch × splits); a split pass stores its runs' sums in p.partial.

// The finished sum of output (i, c) of batch entry bz, run s: stored (or added) where it goes.
PK_INLINE void weight_store(const DeltaBackwardParams& p, const BwdOperands& o, int bz, int s,
                            int i, int c, float v) {
    if (p.splits > 1) {
        p.partial[((int64_t(bz) * p.splits + s) * p.rows + i) * p.ldp + c] = v;
        return;
    }
    float* dst = c == p.cols ? o.out_bias + i : static_cast<float*>(o.out) + i * p.ldo + c;
    *dst = p.accumulate ? *dst + v : v;
}

// v1: naive. grid (ceil((cols + 1)/16), ceil(rows/16), batch × splits), block 16×16.
template <typename T>
PK_INLINE void bwd_weight_naive(const DeltaBackwardParams& p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y * blockDim.y + threadIdx.y;
    const int bz = blockIdx.z / p.splits, s = blockIdx.z % p.splits;
    const BwdOperands o = bwd_operands<T>(p, bz);
    if (i >= p.rows || c > p.cols || (c == p.cols && !o.out_bias)) return;
    const int per = ceil_div(p.k1, p.splits);
    const int m_end = min((s + 1) * per, p.k1);
    const Activation act = static_cast<Activation>(p.activation);
    float acc = 0.0f;
    for (int m = s * per; m < m_end; ++m) {
        float q = 1.0f;
        if (c < p.cols) {
            q = load<T>(o.b, p.b_f32, m * p.ldb + c);
            if (p.b_activate) q = activate(act, q);
            if (p.dropout) q *= bwd_dropout(p, m, c);
        }
        acc += bwd_coef<T>(p, p.coef, m) * load<T>(o.a, p.a_f32, m * p.lda + i) * q;
    }
    weight_store(p, o, bz, s, i, c, acc);
}

// v2: SIMT tiles: grid (ceil((cols + 1)/64), ceil(rows/64), batch × splits), block 256, 4×4
// outputs per thread strided by 16; the token reduction in tiles of 16 rows of both factors,
// each loaded with 64 consecutive threads on 64 consecutive columns (both are row-major
// [tokens, ·]: the transposed-operand layout of dyᵀ·a, dzᵀ·u).
template <typename T>
PK_INLINE void bwd_weight_simt(const DeltaBackwardParams& p) {
    using namespace bwd_simt;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int bz = blockIdx.z / p.splits, s = blockIdx.z % p.splits;
    const BwdOperands o = bwd_operands<T>(p, bz);
    const int i0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int per = ceil_div(p.k1, p.splits);
    const int m_begin = s * per, m_end = min((s + 1) * per, p.k1);
    const Activation act = static_cast<Activation>(p.activation);
    float acc[4][4] = {};
    for (int m0 = m_begin; m0 < m_end; m0 += BK) {
        for (int idx = threadIdx.x; idx < BK * BM; idx += THREADS) {
            const int k = idx / BM, row = idx % BM, gm = m0 + k, gi = i0 + row;
            As[k][row] = (gm < m_end && gi < p.rows)
                             ? bwd_coef<T>(p, p.coef, gm) * load<T>(o.a, p.a_f32, gm * p.lda + gi)
                             : 0.0f;
        }
        for (int idx = threadIdx.x; idx < BK * BN; idx += THREADS) {
            const int k = idx / BN, col = idx % BN, gm = m0 + k, gc = c0 + col;
            float q = 0.0f;
            if (gm < m_end && gc < p.cols) {
                q = load<T>(o.b, p.b_f32, gm * p.ldb + gc);
                if (p.b_activate) q = activate(act, q);
                if (p.dropout) q *= bwd_dropout(p, gm, gc);
            } else if (gm < m_end && gc == p.cols) {
                q = 1.0f;  // the bias column
            }
            Bs[k][col] = q;
        }
        __syncthreads();
        for (int k = 0; k < BK; ++k) {
            float av[4], bv[4];
            for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
            for (int j = 0; j < 4; ++j) bv[j] = Bs[k][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int gi = i0 + ty + 16 * i;
        if (gi >= p.rows) continue;
        for (int j = 0; j < 4; ++j) {
            const int gc = c0 + tx + 16 * j;
            if (gc > p.cols || (gc == p.cols && !o.out_bias)) continue;
            weight_store(p, o, bz, s, gi, gc, acc[i][j]);
        }
    }
}

// v3: tensor cores (f16/bf16): mma.sync.m16n8k16 with f32 accumulation over the tokens.
// grid (ceil((cols + 1)/64), ceil(rows/64), batch × splits), block 256 = 8 warps as 2 × 4,
// warp tile 32 × 16 (2 × 2 mma tiles), BK = 32 tokens, two shared-memory stages filled
// while the warps multiply the other. Both factors are token-major in memory ([m, rows] and
// [m, cols] row-major: the transposed A and the untransposed B of out = Aᵀ·Q), and their
// tiles keep that orientation, [BK tokens][64]: ldmatrix .trans hands out A's row-major
// fragments from the [k][i] tile (the "transposed A" layout) and B's col-major ones from the
// [k][c] tile (the data pass's "kn" B). 64 × 64 rather than the data pass's 128 × 128: one of
// the two output dimensions is the LoRA rank r (often 8–64), so a wider tile would be mostly
// padding, and the token reduction's split (grid.z) supplies the blocks.
// Q, the column factor, is computed where it is not a plain T copy (f(z) for dW_up, the f32
// saved h, LoRA dropout's mask / (1 − p), the gate's λ_m): loaded through registers and
// rounded to T once as it is stored to shared memory (the SIMT kernel keeps it f32; one
// rounding of a value the f64 reference holds exactly, a relative 2⁻⁹ (bf16) or 2⁻¹² (f16)
// per element, random in sign, which the tests' tolerances hold). The f32 dz (dW_down's A)
// takes that one rounding too. A constant row coefficient (the scaled composition's s) is
// applied to the f32 sums, not rounded into Q; only the gate's per-token λ_m goes into Q
// (it is a T already, so the bias column λ_m·1 is exact). Plain T operands (dy; u without
// dropout) with 16-byte copyable rows go by cp.async with zero-filled edges. Launch bounds
// (256, 2): 16 accumulators a thread leave ptxas room.
namespace bwd_weight_mma_tile {
constexpr int BM = 64, BN = 64, BK = 32;
}

template <typename T>
PK_INLINE void bwd_weight_mma(const DeltaBackwardParams& p) {
    using bwd_mma::PAD;
    using bwd_mma::THREADS;
    using namespace bwd_weight_mma_tile;
    __shared__ __align__(16) T as[2][BK][BM + PAD];  // A: [tokens][rows]
    __shared__ __align__(16) T qs[2][BK][BN + PAD];  // Q: [tokens][cols]
    const int bz = blockIdx.z / p.splits, s = blockIdx.z % p.splits;
    const BwdOperands o = bwd_operands<T>(p, bz);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int i0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int wi = (warp / 4) * 32, wc = (warp % 4) * 16;
    const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
    const int per = ceil_div(p.k1, p.splits);
    const int m_begin = s * per, m_end = min((s + 1) * per, p.k1);
    const int tiles = m_end > m_begin ? ceil_div(m_end - m_begin, BK) : 0;
    const bool bias = o.out_bias != nullptr;
    const Activation act = static_cast<Activation>(p.activation);
    // The row coefficient: the gate's λ_m per token (into Q), any other a constant.
    const bool per_token = p.compose == BWD_GATED && p.coef != BWD_COEF_ONE;
    const float c_all = per_token ? 1.0f : bwd_coef<T>(p, p.coef, 0);
    const bool a_vec = !p.a_f32 && copyable_16(o.a, p.lda);
    // Q by cp.async when it is u as stored and the tile holds no bias column (its 1s).
    const bool q_vec = !p.b_f32 && !p.b_activate && !p.dropout && !per_token &&
                       copyable_16(o.b, p.ldb) && (!bias || c0 + BN <= p.cols);
    auto fill = [&](int stage, int kt) {
        const int m0 = m_begin + kt * BK;
        bwd_mma_load<T, BK, BM>(as[stage], o.a, p.a_f32, a_vec, p.lda, m_end, p.rows, m0, i0);
        if (q_vec) {
            bwd_mma_load<T, BK, BN>(qs[stage], o.b, 0, true, p.ldb, m_end, p.cols, m0, c0);
            return;
        }
        constexpr int CHUNKS = BN / 8;
        for (int idx = threadIdx.x; idx < BK * CHUNKS; idx += THREADS) {
            const int k = idx / CHUNKS, c = (idx % CHUNKS) * 8, gm = m0 + k;
            const float cm = gm < m_end && per_token ? bwd_coef<T>(p, p.coef, gm) : 1.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int gc = c0 + c + e;
                float q = 0.0f;
                if (gm < m_end && gc < p.cols) {
                    q = load<T>(o.b, p.b_f32, gm * p.ldb + gc);
                    if (p.b_activate) q = activate(act, q);
                    if (p.dropout) q *= bwd_dropout(p, gm, gc);
                    q *= cm;
                } else if (gm < m_end && gc == p.cols && bias) {
                    q = cm;  // the bias column
                }
                qs[stage][k][c + e] = from_float<T>(q);
            }
        }
    };
    float acc[2][2][4] = {};
    if (tiles > 0) fill(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < tiles; ++kt) {
        const int stage = kt & 1;
        if (kt + 1 < tiles) fill(stage ^ 1, kt + 1);
        // Commit even when nothing was issued: "all but the newest group" is then tile kt.
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[2][4], bf[2][2];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                // Matrices (i 0–7, k 0–7), (i 8–15, k 0–7), (i 0–7, k 8–15), (i 8–15, k 8–15)
                // of the row-major A fragment, each from 8 token rows of the [k][i] tile.
                ldmatrix_x4_trans(af[mt], &as[stage][kk + (lane & 7) + (lane >> 4) * 8]
                                             [wi + mt * 16 + ((lane >> 3) & 1) * 8]);
            {
                // Matrices (c 0–7, k 0–7), (c 0–7, k 8–15), (c 8–15, k 0–7), (c 8–15, k 8–15).
                uint32_t r[4];
                ldmatrix_x4_trans(r, &qs[stage][kk + (lane & 15)][wc + (lane >> 4) * 8]);
                bf[0][0] = r[0];
                bf[0][1] = r[1];
                bf[1][0] = r[2];
                bf[1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
        }
        // Every warp is done with this stage before the next iteration refills it.
        __syncthreads();
    }
    cp_async_wait_all();
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = i0 + wi + mt * 16 + g + 8 * (e / 2);
                const int c = c0 + wc + nt * 8 + 2 * t + (e & 1);
                if (i < p.rows && (c < p.cols || (c == p.cols && bias)))
                    weight_store(p, o, bz, s, i, c, c_all * acc[mt][nt][e]);
            }
}

// The split weight pass's reduction: out (+)= Σ_s partial[bz][s] in run order.
// grid (ceil((cols + 1)/128), rows, batch), block 128.
PK_INLINE void bwd_weight_reduce(const DeltaBackwardParams& p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y, bz = blockIdx.z;
    float* out_bias = p.out_bias ? p.out_bias + int64_t(bz) * p.bs_out_bias : nullptr;
    if (i >= p.rows || c > p.cols || (c == p.cols && !out_bias)) return;
    float acc = 0.0f;
    for (int s = 0; s < p.splits; ++s)
        acc += p.partial[((int64_t(bz) * p.splits + s) * p.rows + i) * p.ldp + c];
    float* dst = c == p.cols ? out_bias + i
                             : static_cast<float*>(p.out) + int64_t(bz) * p.bs_out + i * p.ldo + c;
    *dst = p.accumulate ? *dst + acc : acc;
}

// ---------------------------------------------------------------------------------------------
// dgate pass: out[m] = Σ_{n < cols} a[m, n]·(Δ[m, n] − e[m, n]), Δ[m, n] = Σ_{j < k1}
// f(z[m, j])·b[n, j] + bias[n] (b = W_up [N, r], e = h). grid (M, 1, batch), block 128.
template <typename T>
PK_INLINE void bwd_dgate(const DeltaBackwardParams& p) {
    const int m = blockIdx.x;
    const BwdOperands o = bwd_operands<T>(p, blockIdx.z);
    const Activation act = static_cast<Activation>(p.activation);
    float acc = 0.0f;
    for (int n = threadIdx.x; n < p.cols; n += blockDim.x) {
        float delta = o.bias ? to_float(static_cast<const T*>(o.bias)[n]) : 0.0f;
        for (int j = 0; j < p.k1; ++j)
            delta += activate(act, o.z[m * p.ldz + j]) * load<T>(o.b, p.b_f32, n * p.ldb + j);
        acc += load<T>(o.a, p.a_f32, m * p.lda + n) * (delta - load<T>(o.e, p.e_f32, m * p.lde + n));
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) store<T>(o.out, p.out_f32, m * p.ldo, acc);
}

// ---------------------------------------------------------------------------------------------
// Instantiations: one line per exported kernel.

PK_KERNEL(delta_bwd_dz_f32, bwd_dz<float>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_dz_f16, bwd_dz<__half>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_dz_bf16, bwd_dz<__nv_bfloat16>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_data_naive_f32, bwd_data_naive<float>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_data_naive_f16, bwd_data_naive<__half>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_data_naive_bf16, bwd_data_naive<__nv_bfloat16>, DeltaBackwardParams)
PK_KERNEL_BOUNDS(delta_bwd_data_simt_f32, bwd_data_simt<float>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_data_simt_f16, bwd_data_simt<__half>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_data_simt_bf16, bwd_data_simt<__nv_bfloat16>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_data_mma_f16, bwd_data_mma<__half>, DeltaBackwardParams, 256, 1)
PK_KERNEL_BOUNDS(delta_bwd_data_mma_bf16, bwd_data_mma<__nv_bfloat16>, DeltaBackwardParams, 256, 1)
PK_KERNEL(delta_bwd_weight_naive_f32, bwd_weight_naive<float>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_weight_naive_f16, bwd_weight_naive<__half>, DeltaBackwardParams)
PK_KERNEL(delta_bwd_weight_naive_bf16, bwd_weight_naive<__nv_bfloat16>, DeltaBackwardParams)
PK_KERNEL_BOUNDS(delta_bwd_weight_simt_f32, bwd_weight_simt<float>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_weight_simt_f16, bwd_weight_simt<__half>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_weight_simt_bf16, bwd_weight_simt<__nv_bfloat16>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_weight_mma_f16, bwd_weight_mma<__half>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_weight_mma_bf16, bwd_weight_mma<__nv_bfloat16>, DeltaBackwardParams, 256, 2)
PK_KERNEL_BOUNDS(delta_bwd_weight_reduce, bwd_weight_reduce, DeltaBackwardParams, 128, 8)
PK_KERNEL_BOUNDS(delta_bwd_dgate_f32, bwd_dgate<float>, DeltaBackwardParams, 128, 8)
PK_KERNEL_BOUNDS(delta_bwd_dgate_f16, bwd_dgate<__half>, DeltaBackwardParams, 128, 8)
PK_KERNEL_BOUNDS(delta_bwd_dgate_bf16, bwd_dgate<__nv_bfloat16>, DeltaBackwardParams, 128, 8)
