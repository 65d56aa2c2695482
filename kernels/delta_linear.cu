// delta_linear.cu — the frozen linear layer and its bottleneck delta, fused.
//
// The unified view (UNIFIED-VIEW.md) writes every adapter as
//     y = compose(h, s·f(u·W_downᵀ + b_down)·W_upᵀ + b_up),   h = x·Wᵀ + b.
// Every kernel here computes one "fused linear" pass with two reduction phases:
//
//     acc  = A1[m,:] · B1[n,:]                          phase 1, K1 steps (the frozen GEMM)
//     acc  = c_main(m) · (acc + bias[n] + h_in[m,n])    at the phase switch
//     acc += A2[m,:] · B2[n,:]                          phase 2, K2 steps (the delta's up-projection)
//     out  = c_out(m) · f(acc + c_bias2(m) · bias2[n])
//   or, with a column scale g [n] (DoRA's m / ‖W + s·B·A‖, f32), the bias after it:
//     acc  = c_main(m) · (acc + h_in[m,n]);  …;  out = g[n] · c_out(m) · f(…) + bias[n]
//
// with row coefficients chosen from the composition: (c_h, c_d) = (1, 1) for add, (1, s) for
// scaled add, (1 − λ_m, λ_m) for the gate. A parallel delta is two launches of this pass (a pass
// of few blocks over a long K is two: split runs and their reduction, see split-K below):
//     down:  t = c_d(m) · f(u·W_downᵀ + b_down)              (A1 = u, B1 = W_down, c_out = c_d)
//     main:  y = c_h(m)·(x·Wᵀ + b) + t·W_upᵀ + c_d(m)·b_up    (A1 = x, B1 = W, A2 = t, B2 = W_up)
// so the delta is K2 = r more steps of the frozen GEMM's K loop (insight 1 of UNIFIED-VIEW.md)
// and y is written exactly once. On sm_90 and newer the main pass is a programmatic dependent
// launch: its blocks start while the down pass runs, stream W through phase 1, and wait for t
// only at the first phase-2 tile (grid_dependency_wait, arch.cuh), so at decode the down pass
// hides under the weight stream instead of adding its latency and a launch gap.
// A sequential delta (u = h) needs the whole row of h first:
//     h = x·Wᵀ + b → y;  t = c_d·f(y·W_downᵀ + b_down);  y = c_h·y + t·W_upᵀ + c_d·b_up (in place,
// each element read and written by the same thread). `h_in` also lets a caller add a delta to an
// h it computed itself, and the batch index (grid.z) with per-operand batch strides runs the
// multi-head parallel adapter: one bottleneck per head slice.
//
// Kernels (numbered like llm.c's dev/cuda, the simplest first):
//   fused_linear_naive_*  one thread per output, scalar loads: the correctness and speed baseline.
//   fused_linear_simt_*   64×64×16 shared-memory tiles, 4×4 outputs per thread, scalar loads
//                         with bounds checks: f32 (no TF32: the f32 contract is 1e-5) and
//                         f16/bf16 operands that are not 16-byte aligned.
//   fused_linear_mma_*    f16/bf16 tensor cores: ldmatrix + mma.sync.m16n8k16 (f32 accumulate)
//                         fed by a cp.async multi-stage pipeline. An operand whose rows are
//                         16-byte copyable (aligned base, leading dimension a multiple of 8
//                         elements) is copied in 16-byte chunks, ragged edges zero-filled by
//                         cp.async's src-size; any other operand element by element. The plan
//                         sends a pass here when its frozen GEMM's operands are copyable, so
//                         only the delta's few K steps can take the slow path: W_up [N, r] has
//                         rows of r elements, unaligned for every rank that is not a multiple
//                         of 8 (r = 4 is common), and that must not cost the frozen GEMM its
//                         tensor cores.
//   fused_linear_wgmma_*  v4, Hopper (sm_90a; the emulator runs it too): the same kernel with
//                         the k-tile product on wgmma.mma_async.m64n128k16 from shared memory
//                         (arch.cuh) instead of ldmatrix + mma.sync: mma.sync cannot reach an
//                         H100's tensor-core rate, which cuBLAS's prefill GEMMs do with wgmma.
//                         Same loads (into 128-byte swizzled tiles), phases and epilogue; no
//                         split-K. Only on request (KernelVariant::Wgmma) until it has run on
//                         a GPU and been measured.
//   fused_linear_mma_*_multi_*  the mma kernel with MULTI: phase 2 is a multi-adapter batch's
//                         per-row deltas, K2 per row tile (multi_delta_linear.cu's header).
//   lora_merge_*          W ← W + sign·s·B·A in place (zero-overhead inference), SIMT tiles.
//
// Tile configurations of the mma kernel (chosen in src/plan/delta_linear.rs):
//   large:  BM=128 BN=128 BK=32, 8 warps as 2×4 (warp tile 64×32), 4 stages, 80 KiB smem.
//           The classic Ampere/Hopper mma.sync shape: 16 mma per 6 ldmatrix.x4, enough
//           stages to cover HBM latency at 2 blocks per SM.
//   decode: BM=16 BN=32 BK=128, 4 warps splitting K (each a 16×32 tile over 32 of the 128 k
//           columns), 6 stages, 77 KiB smem; partial sums reduced through shared memory.
//           M ≤ 16 is pure weight streaming: N/32 blocks (128 for N = 4096, about one per
//           SM of an H100) each keep five stages of 8 KiB of W in flight, 40 KiB per SM. By
//           Little's law an H100 needs 3.35 TB/s × ~1 µs (its latency under load) / 132 SMs
//           ≈ 25 KiB in flight per SM: the first configuration's three stages (24 KiB) were
//           at the edge, so two more (unmeasured; 4 stages is the one to compare).
//           A down pass has only ceil(r/32) column tiles (one for r = 16: one SM streaming
//           all of W_down): it splits its K (below).
//   mid:    BM=64 BN=64 BK=64, 4 warps as 2×2 (warp tile 32×32), 4 stages, 72 KiB smem.
//           16 < M ≤ 64 is still memory-bound on W: one row tile covers every row, so W
//           is read once (16-row tiles read it ceil(M/16) times, up to 4×: the emulator's
//           profile counted 3 re-reads of every sector of W at M = 64, issue 16), and BN=64
//           gives N/64 blocks, split over K to fill the GPU (split-K below).
//   small:  BM=16 BN=64 BK=64, 4 warps as 1×4 (warp tile 16×16), 4 stages, 45 KiB smem.
//           Any M when N ≤ 64 (the down pass's r columns, a head's slice): the large tile
//           would compute mostly padding there and give the pass ceil(M/128) blocks;
//           16-row tiles give ceil(M/16), reading the small W from L2 again for each and u
//           from memory once.
//   Shared-memory rows are padded by 8 elements (pitch BK+8): the 8 row addresses of one
//   ldmatrix phase then fall into 8 distinct 4-bank groups (pitch 80, 144 or 272 B), so the
//   fragment loads are conflict-free without a swizzle.
//   hopper: BM=128 BN=128 BK=64, 8 warps = 2 warpgroups of 64 rows each (one wgmma tile of
//           64×128 per k-step), 3 stages of 32 KiB (rows of 128 bytes, swizzled, unpadded) +
//           1 KiB to align them: 97 KiB, two blocks per SM. Each k-tile's 4 wgmma are waited
//           for before the next barrier (simple, and the stage is free at once); keeping one
//           group in flight needs a fourth stage. A TMA producer warp and a persistent tile
//           loop are the next steps once measured.
//   split-K (decode, small and large tiles): a pass of few blocks (a down pass at decode; the
//           frozen GEMM at m = 128, n = 4096 has 32 large tiles, a quarter of an H100) over a
//           long K (≥ 8 k-tiles) is split by the plan into up to 32 runs of k-tiles, aiming at
//           ~128 blocks, for a single bottleneck (delta_linear's, delta_apply's with one head)
//           and a multi-adapter batch's fused pass (the runs of one row tile agree on its K2;
//           the reduction adds each row's s·b_up).
//           A run covers consecutive k-tiles of both phases and stores its f32 sum to the
//           workspace, the phase-1 part scaled by c_main (the switch is linear); then
//           fused_linear_split_reduce adds the runs, c_main·(bias + h_in), and finishes (a
//           dependent launch on sm_90 and newer, like the pass after it). Rejected: atomics
//           into y (bf16 accumulation, and a nondeterministic sum). Costs 32 + 4 f32 bytes per
//           output and run of workspace traffic, mostly in L2; unmeasured.
//   y's stores (the unsplit mma and wgmma passes): where y's rows are 8-byte aligned, each
//           quad of a fragment row finishes two fragments in registers and swaps them with
//           two shuffles, so every lane stores 4 adjacent elements (8 bytes) and a quad a
//           whole 32-byte sector; stored as the fragments hold them, a warp's store filled
//           half of each sector it touched (the emulator's profile counted 50%, issue 16).
//   x is read twice in a parallel delta's plan: by the down pass (t = x·W_downᵀ) and by the
//           main pass (x·Wᵀ). The profile counts it: at M = 4096, K = N = 4096, r = 16, bf16
//           the plan's compulsory traffic is 134.7 MB against 100.9 MB for every operand
//           once, x's 33.5 MB the difference. Kept as a trade-off: the main pass needs all of
//           t's row (all of K) before its phase 2, so computing t from the x tiles it stages
//           means a second sweep of K or a grid-wide dependency, a redesign; at decode x is
//           a few KB, and at prefill the model (src/model.rs, not measured) puts the pass on
//           the tensor cores: 278 µs of mma.sync against 45 µs of DRAM traffic at M = 4096.
//   Not yet measured on a GPU: these are starting points, to be tuned against BENCHMARKS.md.

#include "common.cuh"
#include "multi_adapter.cuh"
#include "philox.cuh"
#include "quant.cuh"

// Which coefficient of the row multiplies a term (see the header).
enum Coef : int32_t { COEF_ONE = 0, COEF_H = 1, COEF_D = 2 };
enum Compose : int32_t { COMPOSE_ADD = 0, COMPOSE_SCALED = 1, COMPOSE_GATED = 2 };

// The parameter block of every fused_linear_* kernel; twin of `FusedLinearParams` in
// src/plan/delta_linear.rs. Pointers may be null when the matching term is absent (bias, h_in, A2/B2 with
// k2 = 0, bias2, gate unless composing by gate). Leading dimensions and batch strides are in
// elements.
struct FusedLinearParams {
    const void* a1;
    const void* b1;
    const void* bias;
    const void* h_in;
    const void* a2;
    const void* b2;
    const void* bias2;
    const void* gate;
    void* out;
    float* partial;  // split-K partial sums, f32 [k_splits][m][ldp] (see fused_linear_mma)
    float* save;     // training mode: what the backward needs of each output (see finish)
    const float* col_scale;  // [n] f32 or null: out = col_scale ⊙ (the pass without bias) + bias
    int64_t lda1, ldb1, ldh, lda2, ldb2, ldo, ldp, ld_save;
    int64_t bs_a1, bs_b1, bs_bias, bs_h, bs_a2, bs_b2, bs_bias2, bs_out, bs_save;
    uint64_t drop_seed;  // LoRA dropout on A1 (a down pass's u): see a1_dropout
    int32_t m, n, k1, k2;
    int32_t k_splits;  // > 1: the k-tiles split over blocks (one batch entry)
    int32_t activation;  // Activation, as src/spec.rs numbers it
    int32_t compose;     // Compose
    int32_t c_main, c_bias2, c_out;  // Coef
    int32_t save_stored;  // save the stored (T-rounded) output instead of the pre-activation
    int32_t dropout;      // drop elements of A1 (naive and SIMT kernels only: the plan's choice)
    float scale;
    float drop_p;
    QuantParams quant;  // phase 1's B1 quantized (quant.cuh): the frozen W of delta_linear_quant
    MultiBatch multi;   // a multi-adapter batch's per-row deltas as phase 2 (MULTI; table null: none)
};
PK_PARAMS_SIZE(FusedLinearParams)

// The operands of one batch entry, with the batch offsets applied.
template <typename T>
struct Operands {
    const T* a1;
    const T* b1;
    const T* bias;
    const T* h_in;
    const T* a2;
    const T* b2;
    const T* bias2;
    T* out;
    float* save;
};

template <typename T>
PK_INLINE Operands<T> operands(const FusedLinearParams& p, int64_t b) {
    auto at = [b](const void* base, int64_t stride) {
        return base ? static_cast<const T*>(base) + b * stride : nullptr;
    };
    return {at(p.a1, p.bs_a1),  at(p.b1, p.bs_b1),       at(p.bias, p.bs_bias),
            at(p.h_in, p.bs_h), at(p.a2, p.bs_a2),       at(p.b2, p.bs_b2),
            at(p.bias2, p.bs_bias2), static_cast<T*>(p.out) + b * p.bs_out,
            p.save ? p.save + b * p.bs_save : nullptr};
}

// LoRA dropout of element (m, k) of A1, a down pass's u (row m, column k of u; one batch entry):
// the factor it is multiplied by, 0 or 1 / (1 − p), from Philox (philox.cuh), never stored.
PK_INLINE float a1_dropout(const FusedLinearParams& p, int m, int k) {
    return pk_dropout_keep(p.drop_seed, uint32_t(m), uint32_t(k), p.drop_p) ? pk_dropout_scale(p.drop_p)
                                                                           : 0.0f;
}

// The coefficients of one row, computed once per row (a gated row reads its λ once).
struct RowCoefs {
    float main, bias2, out;
};

template <typename T>
PK_INLINE RowCoefs row_coefs(const FusedLinearParams& p, int m) {
    float h = 1.0f, d = p.compose == COMPOSE_SCALED ? p.scale : 1.0f;
    // Only a pass that uses a coefficient has a gate (the frozen pass of a sequential delta
    // has none).
    const bool uses = p.c_main != COEF_ONE || p.c_bias2 != COEF_ONE || p.c_out != COEF_ONE;
    if (p.compose == COMPOSE_GATED && uses) {
        d = to_float(static_cast<const T*>(p.gate)[m]);
        h = 1.0f - d;
    }
    auto pick = [h, d](int32_t which) { return which == COEF_H ? h : which == COEF_D ? d : 1.0f; };
    return {pick(p.c_main), pick(p.c_bias2), pick(p.c_out)};
}

// The phase switch for element (m, n): scale the frozen part and add its bias and h_in.
template <typename T>
PK_INLINE float phase_switch(const FusedLinearParams& p, const Operands<T>& o, int m, int n,
                             const RowCoefs& c, float acc) {
    // With a column scale the bias joins after it, in the epilogue.
    if (o.bias && !p.col_scale) acc += to_float(o.bias[n]);
    if (o.h_in) acc += to_float(o.h_in[m * p.ldh + n]);
    return c.main * acc;
}

// The activation, out of line: the tensor-core epilogue is unrolled over every accumulator
// register (64 of them in the large tile), and inlining all five activations at each one
// made the kernel ~18k instructions for 32 HMMA. Only the down pass (t, M × r values) calls
// it; the frozen pass's identity never does.
__device__ __attribute__((noinline)) float activate_out_of_line(int32_t activation, float x) {
    return activate(static_cast<Activation>(activation), x);
}

// The epilogue's value of one element, stored: second bias (when there is one: `bias2`, its
// entry), activation, output coefficient, then DoRA's column scale and the frozen bias when
// there is a column scale (phase_switch left the bias out). A training-mode forward (o.save
// non-null) also keeps in f32 what the backward reads: a down pass the pre-activation
// z = u·W_downᵀ + b_down (before f and c_out: f′(z) needs it, and the gate's c_out may be 0),
// a frozen pass whose output a sequential or gated delta reads (save_stored) h as stored in
// T, as the delta saw it, and a main pass with a column scale its output before the scale
// (DoRA's x·Wᵀ + Δ, whose product with dy the magnitude's gradient sums).
template <typename T>
PK_INLINE T epilogue(const FusedLinearParams& p, const Operands<T>& o, int m, int n,
                     const RowCoefs& c, float acc, bool has_bias2, float bias2) {
    if (has_bias2) acc += c.bias2 * bias2;
    const float z = acc;
    if (p.activation != static_cast<int32_t>(Activation::Identity))
        acc = activate_out_of_line(p.activation, acc);
    float y = c.out * acc;
    if (p.col_scale) y = p.col_scale[n] * y + (o.bias ? to_float(o.bias[n]) : 0.0f);
    const T v = from_float<T>(y);
    if (o.save) o.save[m * p.ld_save + n] = p.save_stored ? to_float(v) : z;
    return v;
}

// The epilogue for element (m, n): its value, stored.
template <typename T>
PK_INLINE void finish(const FusedLinearParams& p, const Operands<T>& o, int m, int n,
                      const RowCoefs& c, float acc) {
    const float bias2 = o.bias2 ? to_float(o.bias2[n]) : 0.0f;
    o.out[m * p.ldo + n] = epilogue(p, o, m, n, c, acc, o.bias2 != nullptr, bias2);
}

// The epilogue's values of the elements (m, n) and (m, n + 1), n even (the second 0 unless
// n + 1 < p.n), without storing them: b_up's pair in one 4-byte load where it is 4-byte
// aligned.
template <typename T>
PK_INLINE Vec<T, 2> finish_values(const FusedLinearParams& p, const Operands<T>& o, int m, int n,
                                  const RowCoefs& c, float v0, float v1) {
    const bool two = n + 1 < p.n;
    float b0 = 0.0f, b1 = 0.0f;
    if (o.bias2 && two && reinterpret_cast<uintptr_t>(o.bias2) % 4 == 0) {
        const Vec<T, 2> b = load_vec<T, 2>(o.bias2 + n);
        b0 = to_float(b.v[0]);
        b1 = to_float(b.v[1]);
    } else if (o.bias2) {
        b0 = to_float(o.bias2[n]);
        if (two) b1 = to_float(o.bias2[n + 1]);
    }
    Vec<T, 2> y;
    y.v[0] = epilogue(p, o, m, n, c, v0, o.bias2 != nullptr, b0);
    y.v[1] = two ? epilogue(p, o, m, n + 1, c, v1, o.bias2 != nullptr, b1) : from_float<T>(0.0f);
    return y;
}

// finish() for the elements (m, n) and (m, n + 1), n even, with one 4-byte store: the caller
// checked that y's rows are 4-byte aligned and n + 1 < p.n.
template <typename T>
PK_INLINE void finish_pair(const FusedLinearParams& p, const Operands<T>& o, int m, int n,
                           const RowCoefs& c, float v0, float v1) {
    store_vec(o.out + m * p.ldo + n, finish_values(p, o, m, n, c, v0, v1));
}

// ---------------------------------------------------------------------------------------------
// v1: naive. grid (ceil(N/16), ceil(M/16), batch), block 16×16; thread (x, y) owns y[m, n].

template <typename T>
PK_INLINE void fused_linear_naive(const FusedLinearParams& p) {
    allow_dependent_launch();
    grid_dependency_wait();  // the baselines take no part in the overlap: wait at once
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = blockIdx.y * blockDim.y + threadIdx.y;
    if (m >= p.m || n >= p.n) return;
    const Operands<T> o = operands<T>(p, blockIdx.z);
    float acc = 0.0f;
    for (int k = 0; k < p.k1; ++k) {
        const float a = to_float(o.a1[m * p.lda1 + k]);
        const float b = p.quant.format ? quant_value_t<T>(p.quant, n, k) : to_float(o.b1[n * p.ldb1 + k]);
        acc += (p.dropout ? a * a1_dropout(p, m, k) : a) * b;
    }
    const RowCoefs c = row_coefs<T>(p, m);
    acc = phase_switch(p, o, m, n, c, acc);
    for (int k = 0; k < p.k2; ++k)
        acc += to_float(o.a2[m * p.lda2 + k]) * to_float(o.b2[n * p.ldb2 + k]);
    finish(p, o, m, n, c, acc);
}

// ---------------------------------------------------------------------------------------------
// v2: SIMT tiles. grid (ceil(N/64), ceil(M/64), batch), block 256 = 16×16 threads, each
// computing a 4×4 block of outputs strided by 16 (rows ty + 16i, cols tx + 16j), so a warp's
// shared-memory reads are broadcasts (same ty) or consecutive words (consecutive tx). Tiles are
// stored k-major (As[k][row]) and loaded with 16 consecutive threads on 16 consecutive k.

namespace simt {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;

// Load rows [r0, r0 + 64) × cols [k0, k0 + 16) of a row-major operand into dst[k][row],
// zero outside rows < rows_lim, cols < k_lim. Thread t loads k = t % 16 of rows t / 16 + 16i.
// `drop`: the tile is A1 under LoRA dropout (p.dropout), each element times a1_dropout.
template <typename T>
PK_INLINE void load_tile(float (*dst)[BM + 4], const T* src, int64_t ld, int r0, int rows_lim,
                         int k0, int k_lim, const FusedLinearParams* drop = nullptr) {
    const int k = threadIdx.x % BK;
    for (int row = threadIdx.x / BK; row < BM; row += THREADS / BK) {
        const int gr = r0 + row, gk = k0 + k;
        float v = (gr < rows_lim && gk < k_lim) ? to_float(src[gr * ld + gk]) : 0.0f;
        if (drop && gr < rows_lim && gk < k_lim) v *= a1_dropout(*drop, gr, gk);
        dst[k][row] = v;
    }
}

// load_tile for a quantized B1 (quant.cuh), dequantized to T's values.
template <typename T>
PK_INLINE void load_tile_quant(float (*dst)[BM + 4], const QuantParams& q, int r0, int rows_lim,
                               int k0, int k_lim) {
    const int k = threadIdx.x % BK;
    for (int row = threadIdx.x / BK; row < BM; row += THREADS / BK) {
        const int gr = r0 + row, gk = k0 + k;
        dst[k][row] = (gr < rows_lim && gk < k_lim) ? quant_value_t<T>(q, gr, gk) : 0.0f;
    }
}
}  // namespace simt

template <typename T>
PK_INLINE void fused_linear_simt(const FusedLinearParams& p) {
    using namespace simt;
    // +4 keeps rows 16-byte aligned while shifting banks between k rows.
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    allow_dependent_launch();
    grid_dependency_wait();  // the baselines take no part in the overlap: wait at once
    const Operands<T> o = operands<T>(p, blockIdx.z);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};

    const int tiles1 = ceil_div(p.k1, BK), tiles2 = ceil_div(p.k2, BK);
    for (int kt = 0; kt < tiles1 + tiles2; ++kt) {
        if (kt == tiles1) {
            // Phase switch: rows/cols outside the output are never stored, skip them.
            for (int i = 0; i < 4; ++i) {
                const int m = m0 + ty + 16 * i;
                if (m >= p.m) continue;
                const RowCoefs c = row_coefs<T>(p, m);
                for (int j = 0; j < 4; ++j) {
                    const int n = n0 + tx + 16 * j;
                    if (n < p.n) acc[i][j] = phase_switch(p, o, m, n, c, acc[i][j]);
                }
            }
        }
        const bool first = kt < tiles1;
        const int k0 = (first ? kt : kt - tiles1) * BK, k_lim = first ? p.k1 : p.k2;
        load_tile(As, first ? o.a1 : o.a2, first ? p.lda1 : p.lda2, m0, p.m, k0, k_lim,
                  first && p.dropout ? &p : nullptr);
        if (first && p.quant.format)
            load_tile_quant<T>(Bs, p.quant, n0, p.n, k0, k_lim);
        else
            load_tile(Bs, first ? o.b1 : o.b2, first ? p.ldb1 : p.ldb2, n0, p.n, k0, k_lim);
        __syncthreads();
        for (int k = 0; k < BK; ++k) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
            for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= p.m) continue;
        const RowCoefs c = row_coefs<T>(p, m);
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n >= p.n) continue;
            // Without a second phase the loop never reached the switch.
            const float v = tiles2 == 0 ? phase_switch(p, o, m, n, c, acc[i][j]) : acc[i][j];
            finish(p, o, m, n, c, v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// v3: tensor cores. grid (ceil(N/BN), ceil(M/BM), batch), block WARPS_M × WARPS_N × WARPS_K
// warps. With WARPS_K > 1 the warps of one output tile split each k-tile between them (warp
// wk takes k columns [wk·BK/WARPS_K, (wk + 1)·BK/WARPS_K)) and their partial accumulators are
// summed through shared memory at the end: decode's split over K, without a second pass.

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int WARPS_K_, int STAGES_,
          bool SPLIT_K_ = false, bool WGMMA_ = false>
struct MmaConfig {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
    static constexpr bool SPLIT_K = SPLIT_K_;  // honours p.k_splits (else the code is absent)
    // Hopper's warpgroup MMA instead of mma.sync: each warpgroup's 4 warps hold their 16-row
    // slices of one 64 × BN wgmma tile, the fragments laid out exactly as MI = 1, NI = BN / 8
    // mma.sync tiles (arch.cuh), so the phases and the epilogue are shared; smem tiles are
    // 128-byte swizzled rows of BK = 64 (no padding) starting 1024-byte aligned.
    static constexpr bool WGMMA = WGMMA_;
    static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, WARPS_K = WARPS_K_;
    static constexpr int WARPS_MN = WARPS_M * WARPS_N;
    static constexpr int THREADS = 32 * WARPS_MN * WARPS_K;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;              // mma tiles per warp
    static constexpr int KSLICE = BK / WARPS_K;                  // k columns per warp per tile
    static constexpr int PITCH = WGMMA ? BK : BK + 8;            // elements per smem row
    static constexpr int STAGE_ELEMS = (BM + BN) * PITCH;
    // wgmma: + 1 KiB to align the tiles to the 1024-byte swizzle atom.
    static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2 + (WGMMA ? 1024 : 0);
    static constexpr int REDUCE_BYTES = (WARPS_K - 1) * WARPS_MN * MI * NI * 4 * 32 * 4;
    static_assert(WM % 16 == 0 && WN % 16 == 0 && KSLICE % 16 == 0, "mma tile shape");
    static_assert(REDUCE_BYTES <= SMEM_BYTES, "the split-K partials reuse the pipeline's smem");
    static_assert(!WGMMA || (BK == 64 && WARPS_N == 1 && WM == 16 && BN == 128 &&
                             WARPS_M % 4 == 0 && WARPS_K == 1 && !SPLIT_K),
                  "wgmma: m64n128k16 per warpgroup over 128-byte rows");
};
using MmaLarge = MmaConfig<128, 128, 32, 2, 4, 1, 4, true>;
using MmaSmall = MmaConfig<16, 64, 64, 1, 4, 1, 4, true>;
using MmaMid = MmaConfig<64, 64, 64, 2, 2, 1, 4, true>;
using MmaDecode = MmaConfig<16, 32, 128, 1, 1, 4, 6, true>;
using MmaHopper = MmaConfig<128, 128, 64, 8, 1, 1, 3, false, true>;

// Whether the rows of an operand can be copied in 16-byte chunks: a 16-byte aligned base and a
// leading dimension that is a multiple of 8 (2-byte) elements.
template <typename T>
PK_INLINE bool rows_copyable_16(const T* base, int64_t ld) {
    static_assert(sizeof(T) == 2, "the tensor-core kernels take f16/bf16");
    return reinterpret_cast<uintptr_t>(base) % 16 == 0 && ld % 8 == 0;
}

// Load rows [r0, r0 + ROWS) × cols [k0, k0 + BK) of a row-major operand into dst (pitch
// C::PITCH), zero-filling rows ≥ rows_lim and cols ≥ k_lim. With `vec`, 16-byte cp.async
// copies that land at the pipeline's next wait; without, plain loads and shared stores of one
// element each (visible after the next barrier, which the pipeline has before any read).
template <typename C, int ROWS, typename T>
PK_INLINE void mma_load_tile(T* dst, const T* src, int64_t ld, bool vec, int r0, int rows_lim,
                             int k0, int k_lim) {
    constexpr int CHUNKS = C::BK / 8;  // 8-element (16-byte) chunks per row
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += C::THREADS) {
        const int row = i / CHUNKS, col = (i % CHUNKS) * 8;
        const int gr = r0 + row, gk = k0 + col;
        int valid = gr < rows_lim ? k_lim - gk : 0;
        valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
        const T* g = valid > 0 ? src + gr * ld + gk : src;
        // wgmma's 128-byte swizzle: chunk c of row r at chunk c ^ (r % 8) (arch.cuh).
        T* s = dst + row * C::PITCH + (C::WGMMA ? col ^ (row % 8 * 8) : col);
        if (vec) {
            cp_async_16_zfill(s, g, valid * 2);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) s[e] = e < valid ? g[e] : from_float<T>(0.0f);
        }
    }
}

// mma_load_tile for a quantized B1 (quant.cuh): rows [r0, r0 + ROWS) × cols [k0, k0 + BK) of
// W dequantized to T into dst, in runs of RUN elements (NF4 32, FP8 16: 16 bytes of packed
// weight each). A run inside W whose bytes are 16-byte aligned and that shares one absmax or
// scale is one 16-byte load (quant_load_run); any other run (the ragged edges, a k that is not
// a multiple of RUN, FP8 block columns not a multiple of 16) is dequantized element by
// element. The loads are synchronous (the values are needed to dequantize): plain shared
// stores, visible after the pipeline's next barrier, as mma_load_tile's element path.
template <typename C, int ROWS, typename T>
PK_INLINE void mma_load_tile_quant(T* dst, const QuantParams& q, int r0, int rows_lim, int k0,
                                   int k_lim) {
    constexpr int RUN = 32;  // elements per thread and step (quant_run32)
    static_assert(C::BK % RUN == 0, "runs tile BK");
    constexpr int RUNS = C::BK / RUN;
    const bool vectorized = quant_runs_vectorized(q);
    for (int i = threadIdx.x; i < ROWS * RUNS; i += C::THREADS) {
        const int row = i / RUNS, col = (i % RUNS) * RUN;
        T v[RUN];
        quant_run32(q, vectorized, r0 + row, k0 + col, rows_lim, k_lim, v);
#pragma unroll
        for (int c = 0; c < RUN; c += 8) {
            // wgmma's 128-byte swizzle, as mma_load_tile.
            T* s = dst + row * C::PITCH + (C::WGMMA ? (col + c) ^ (row % 8 * 8) : col + c);
#pragma unroll
            for (int e = 0; e < 8; ++e) s[e] = v[c + e];
        }
    }
}

// One k-tile of the block's product on mma.sync: warp (wk, wm0, wn0) adds its WM × WN tile
// over its KSLICE columns of the stage (sa: BM rows of A, sb: BN rows of B, pitch PITCH).
template <typename T, typename C>
PK_INLINE void mma_sync_tile(float (&acc)[C::MI][C::NI][4], const T* sa, const T* sb, int wk,
                             int wm0, int wn0, int lane) {
#pragma unroll
    for (int kk = wk * C::KSLICE; kk < (wk + 1) * C::KSLICE; kk += 16) {
        uint32_t af[C::MI][4], bf[C::NI][2];
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
            ldmatrix_x4(af[mi], sa + (wm0 + mi * 16 + lane % 16) * C::PITCH + kk + (lane / 16) * 8);
#pragma unroll
        for (int ni = 0; ni < C::NI; ni += 2) {
            // Matrices (ni, k 0–7), (ni, k 8–15), (ni + 1, k 0–7), (ni + 1, k 8–15).
            uint32_t r[4];
            ldmatrix_x4(r, sb + (wn0 + ni * 8 + (lane / 16) * 8 + lane % 8) * C::PITCH + kk +
                               ((lane / 8) % 2) * 8);
            bf[ni][0] = r[0];
            bf[ni][1] = r[1];
            bf[ni + 1][0] = r[2];
            bf[ni + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < C::NI; ++ni) mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    }
}

// The accumulators as the 64 × BN wgmma fragment they are laid out as (see MmaConfig).
template <typename C>
PK_INLINE float (&wgmma_fragment(float (&acc)[C::MI][C::NI][4]))[C::NI * 4] {
    return reinterpret_cast<float(&)[C::NI * 4]>(acc);
}

// Issues one k-tile on Hopper's warpgroup MMA: the warpgroup of `warp` adds its 64 rows of A
// times all BN rows of B in BK / 16 k-steps, one commit group; the caller waits for it.
template <typename T, typename C>
PK_INLINE void wgmma_tile(float (&acc)[C::MI][C::NI][4], const T* sa, const T* sb, int warp) {
    auto& frag = wgmma_fragment<C>(acc);
    const uint64_t da = wgmma_descriptor(sa + warp / 4 * 64 * C::PITCH);
    const uint64_t db = wgmma_descriptor(sb);
    wgmma_fence(frag);
#pragma unroll
    for (int s = 0; s < C::BK / 16; ++s) wgmma_m64n128k16<T>(frag, da + 2 * s, db + 2 * s, true);
    wgmma_commit();
}

// QUANT: phase 1's B1 is the quantized W (p.quant, mma_load_tile_quant). A separate
// instantiation: the quantized loader's registers beside the dense path's made the large and
// small tiles spill (ptxas: 348 and 32 bytes), so the dense kernels do not carry it.
// MULTI: phase 2 is a multi-adapter batch's per-row deltas (p.multi, multi_adapter.cuh): A2 = t
// and each row tile's adapters' W_up concatenated, K2 per block; s·b_up per row at the switch.
// A separate instantiation, so the dense kernels carry none of it.
template <typename T, typename C, bool QUANT = false, bool MULTI = false>
PK_INLINE void fused_linear_mma(const FusedLinearParams& p) {
    PK_DYNAMIC_SMEM(unsigned char, smem_raw);
    allow_dependent_launch();
    T* smem = reinterpret_cast<T*>(smem_raw);
    if constexpr (C::WGMMA) {
        const uint32_t misaligned = shared_window_address(smem_raw) % 1024;
        smem = reinterpret_cast<T*>(smem_raw + (misaligned ? 1024 - misaligned : 0));
    }
    const Operands<T> o = operands<T>(p, blockIdx.z);
    // The pass's k-tiles: phase 1's, then phase 2's. Split-K over blocks (p.k_splits > 1, one
    // batch entry): block x computes column tile x mod n_tiles over run x / n_tiles of them
    // and stores its f32 sum in p.partial, the phase-1 part scaled by the row's c_main (the
    // phase switch is linear); fused_linear_split_reduce adds the runs and the switch's bias
    // and h_in, and finishes.
    const bool split = C::SPLIT_K && p.k_splits > 1;
    const int n_tiles = ceil_div(p.n, C::BN);
    const int tiles1 = ceil_div(p.k1, C::BK);
    int tiles2 = ceil_div(p.k2, C::BK);
    MultiTile<C::BM>* mt = nullptr;  // MULTI: the row tile's adapters (its K2)
    if constexpr (MULTI) {
        // Past the pipeline's dynamic shared memory (the plan adds its bytes), not a static
        // __shared__: the emulator's checks see every access of dynamic shared memory, but
        // none of a static one at a constant offset (g++'s address sanitizer leaves a
        // statically in-bounds thread_local access uninstrumented), so initcheck saw the
        // reads of `slots` and not thread 0's write.
        mt = reinterpret_cast<MultiTile<C::BM>*>(smem_raw + C::SMEM_BYTES);
        multi_tile_setup<C::BM, C::THREADS>(*mt, p.multi, blockIdx.y * C::BM, p.m, smem_raw);
        tiles2 = ceil_div(mt->k2, C::BK);
    }
    int n_tile = blockIdx.x, kt_begin = 0, kt_end = tiles1 + tiles2;
    if (split) {
        const int per = ceil_div(kt_end, p.k_splits);
        n_tile = blockIdx.x % n_tiles;
        kt_begin = min(int(blockIdx.x / n_tiles) * per, kt_end);
        kt_end = min(kt_begin + per, kt_end);
    }
    const int m0 = blockIdx.y * C::BM, n0 = n_tile * C::BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wk = warp / C::WARPS_MN, wmn = warp % C::WARPS_MN;
    const int wm0 = (wmn / C::WARPS_N) * C::WM, wn0 = (wmn % C::WARPS_N) * C::WN;
    const int g = lane / 4, t = lane % 4;  // mma fragment coordinates

    float acc[C::MI][C::NI][4] = {};

    auto load = [&](int kt) {
        T* sa = smem + (kt % C::STAGES) * C::STAGE_ELEMS;
        T* sb = sa + C::BM * C::PITCH;
        const bool first = kt < tiles1;
        const int k0 = (first ? kt : kt - tiles1) * C::BK;
        const int k_lim = first ? p.k1 : p.k2;
        const T* a = first ? o.a1 : o.a2;
        const T* b = first ? o.b1 : o.b2;
        const int64_t lda = first ? p.lda1 : p.lda2, ldb = first ? p.ldb1 : p.ldb2;
        // Phase 2 reads t, which the previous launch (the down pass) writes: wait before the
        // run's first phase-2 tile.
        if (kt == max(tiles1, kt_begin)) grid_dependency_wait();
        if constexpr (MULTI) {
            if (!first) {
                multi_load_phase2<C>(sa, sb, *mt, a, lda, m0, n0, p.n, k0);
                return;
            }
        }
        // Checked per tile, not kept in registers: the large tile has none to spare.
        mma_load_tile<C, C::BM>(sa, a, lda, rows_copyable_16(a, lda), m0, p.m, k0, k_lim);
        if (QUANT && first)
            mma_load_tile_quant<C, C::BN>(sb, p.quant, n0, p.n, k0, k_lim);
        else
            mma_load_tile<C, C::BN>(sb, b, ldb, rows_copyable_16(b, ldb), n0, p.n, k0, k_lim);
    };
    // Apply `fn(m, n, row coefficients, v0, v1)` to every pair of accumulator elements that
    // starts inside the output: elements 2·half and 2·half + 1 of fragment (mi, ni) are row
    // g (+8 for half 1), columns n = 2t and n + 1 (which may be past the output's last).
    auto for_each_pair = [&](auto fn) {
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int m = m0 + wm0 + mi * 16 + g + 8 * half;
                if (m >= p.m) continue;
                const RowCoefs c = row_coefs<T>(p, m);
#pragma unroll
                for (int ni = 0; ni < C::NI; ++ni) {
                    const int n = n0 + wn0 + ni * 8 + 2 * t;
                    float* v = &acc[mi][ni][2 * half];
                    if (n < p.n) fn(m, n, c, v[0], v[1]);
                }
            }
    };
    // The phase switch is linear: every k-split (warps, runs) scales its partial sum, one
    // adds the terms (warp 0 of an unsplit pass; else the reduction).
    auto switch_phase = [&]() {
        const bool adds = wk == 0 && !split;
        for_each_pair([&](int m, int n, const RowCoefs& c, float& v0, float& v1) {
            v0 = adds ? phase_switch(p, o, m, n, c, v0) : c.main * v0;
            if (n + 1 < p.n) v1 = adds ? phase_switch(p, o, m, n + 1, c, v1) : c.main * v1;
            if constexpr (MULTI) {
                // The row's own s·b_up (a split's reduction adds it instead).
                if (adds) v0 += multi_up_bias<T>(*mt, m - m0, n);
                if (adds && n + 1 < p.n) v1 += multi_up_bias<T>(*mt, m - m0, n + 1);
            }
        });
    };

    // Prologue: fill STAGES − 1 stages. Every iteration commits one group (possibly empty) so
    // that wait<STAGES − 2> always means "the tile about to be used has landed".
    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (kt_begin + s < kt_end) load(kt_begin + s);
        cp_async_commit();
    }
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        cp_async_wait<C::STAGES - 2>();
        // wgmma reads shared memory through the async proxy: this thread's copies and stores
        // are fenced for it before the barrier publishes them.
        if constexpr (C::WGMMA) fence_proxy_async_shared();
        __syncthreads();  // tile kt visible to all; stage (kt − 1) free for the next load
        const T* sa = smem + (kt % C::STAGES) * C::STAGE_ELEMS;
        const T* sb = sa + C::BM * C::PITCH;
        if constexpr (C::WGMMA) {
            // The tensor cores start on tile kt before the next stage's copies are issued
            // (that stage is not kt's); both are waited for before the next barrier, which
            // frees stage kt for a load.
            if (kt == tiles1) switch_phase();
            wgmma_tile<T, C>(acc, sa, sb, warp);
            if (kt + C::STAGES - 1 < kt_end) load(kt + C::STAGES - 1);
            cp_async_commit();
            wgmma_wait<0>(wgmma_fragment<C>(acc));
        } else {
            if (kt + C::STAGES - 1 < kt_end) load(kt + C::STAGES - 1);
            cp_async_commit();
            if (kt == tiles1) switch_phase();
            mma_sync_tile<T, C>(acc, sa, sb, wk, wm0, wn0, lane);
        }
    }
    cp_async_wait_all();
    // Without a phase 2 nothing above waited; and y, written below, may be what the previous
    // launch reads (a sequential delta's down pass reads h in y). Every thread passes this
    // wait before any global write and before it exits: so a grid completes only after the
    // one before it, transitively, which the plans' chains of dependent launches rely on
    // (no return may come before it).
    grid_dependency_wait();
    // A pass or run that ended inside phase 1 has not switched yet.
    if (kt_end <= tiles1) switch_phase();
    if constexpr (C::WARPS_K > 1) {
        // Sum the k-splits: warps wk > 0 park their fragments in the (now idle) pipeline
        // memory, laid out [wk − 1][wmn][fragment element][lane] so stores are conflict-free.
        constexpr int ELEMS = C::MI * C::NI * 4;
        float* partial = reinterpret_cast<float*>(smem_raw);
        __syncthreads();  // every warp is done reading the last stage
        if (wk > 0) {
            float* mine = partial + ((wk - 1) * C::WARPS_MN + wmn) * ELEMS * 32;
#pragma unroll
            for (int i = 0; i < ELEMS; ++i) mine[i * 32 + lane] = (&acc[0][0][0])[i];
        }
        __syncthreads();
        if (wk > 0) return;
        for (int s = 0; s < C::WARPS_K - 1; ++s) {
            const float* theirs = partial + (s * C::WARPS_MN + wmn) * ELEMS * 32;
#pragma unroll
            for (int i = 0; i < ELEMS; ++i) (&acc[0][0][0])[i] += theirs[i * 32 + lane];
        }
    }
    if (split) {
        // This run's sum: the reduction adds the runs and finishes.
        // A pair (n is even) is one 8-byte store where the partial rows are 8-byte aligned:
        // the 4 lanes of a fragment row then fill a 32-byte sector (two 4-byte stores fill
        // half of one each, which the profile counted as 50% coalesced, issue 16).
        float* run = p.partial + int64_t(blockIdx.x / n_tiles) * p.m * p.ldp;
        const bool pairs = reinterpret_cast<uintptr_t>(p.partial) % 8 == 0 && p.ldp % 2 == 0;
        for_each_pair([&](int m, int n, const RowCoefs&, float& v0, float& v1) {
            if (pairs && n + 1 < p.n) {
                Vec<float, 2> v;
                v.v[0] = v0;
                v.v[1] = v1;
                store_vec(run + m * p.ldp + n, v);
            } else {
                run[m * p.ldp + n] = v0;
                if (n + 1 < p.n) run[m * p.ldp + n + 1] = v1;
            }
        });
        return;
    }
    // y's stores. A fragment row's quad holds 2 columns per lane of each 8-column fragment:
    // stored as they are, a warp's store covers 16 bytes of each of 8 rows, half of a sector
    // each (the profile counted 50%, issue 16). Where y's rows are 8-byte aligned the quad
    // finishes two fragments' values in registers and transposes them (two shuffles), so
    // that lane t holds columns 4t..4t + 3 of the 16: one 8-byte store per lane, a whole
    // 32-byte sector per quad. Every lane of the warp shuffles (rows past the output too);
    // only elements inside it are finished and stored.
    if (reinterpret_cast<uintptr_t>(o.out) % 8 == 0 && p.ldo % 4 == 0) {
        const int quad = lane & ~3;
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int m = m0 + wm0 + mi * 16 + g + 8 * half;
                const bool row = m < p.m;
                const RowCoefs c = row ? row_coefs<T>(p, m) : RowCoefs{1.0f, 1.0f, 1.0f};
#pragma unroll
                for (int ni = 0; ni < C::NI; ni += 2) {
                    // Word j of lane t: fragment ni + j's pair, columns 8j + 2t, + 1.
                    uint32_t w[2];
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int n = n0 + wn0 + (ni + j) * 8 + 2 * t;
                        const float* v = &acc[mi][ni + j][2 * half];
                        Vec<T, 2> y;
                        y.raw = 0;
                        if (row && n < p.n) y = finish_values(p, o, m, n, c, v[0], v[1]);
                        w[j] = y.raw;
                    }
                    // Lane t wants word i of its 4 columns 4t + 2i from lane 2(t % 2) + i, its
                    // fragment t / 2. In round s it reads i = s ^ (t / 2) (the 4 lanes read 4
                    // different lanes), and lane u sends the fragment that reader wants:
                    // s ^ (u % 2).
                    Vec<T, 4> mine;
#pragma unroll
                    for (int s = 0; s < 2; ++s) {
                        const int i = s ^ (t >> 1);
                        const uint32_t sent = (s ^ (t & 1)) ? w[1] : w[0];
                        const uint32_t got = __shfl_sync(0xFFFFFFFFu, sent, quad | (2 * (t & 1) + i));
                        if (i == 0)
                            mine.raw.x = got;
                        else
                            mine.raw.y = got;
                    }
                    const int n = n0 + wn0 + ni * 8 + 4 * t;
                    if (!row || n >= p.n) continue;
                    if (n + 4 <= p.n) {
                        store_vec(o.out + m * p.ldo + n, mine);
                    } else {
                        for (int e = 0; e < 4 && n + e < p.n; ++e) o.out[m * p.ldo + n + e] = mine.v[e];
                    }
                }
            }
        return;
    }
    // Unaligned y: a pair (n is even) is one 4-byte store where y's rows are 4-byte aligned.
    const bool pairs = reinterpret_cast<uintptr_t>(o.out) % 4 == 0 && p.ldo % 2 == 0;
    for_each_pair([&](int m, int n, const RowCoefs& c, float& v0, float& v1) {
        if (pairs && n + 1 < p.n) {
            finish_pair(p, o, m, n, c, v0, v1);
        } else {
            finish(p, o, m, n, c, v0);
            if (n + 1 < p.n) finish(p, o, m, n + 1, c, v1);
        }
    });
}

// The split-K reduction: out[m, n] = finish(Σ_s partial[s][m][n] + phase_switch(0)), the runs
// added in split order (each run's phase-1 part is already scaled by c_main; phase_switch(0)
// is c_main·(bias + h_in)). grid (ceil(N/128), M), block 128. Launched right after the split
// pass, as a dependent launch on sm_90 and newer. Every thread waits before anything else,
// even one with nothing to do: the up pass after it relies on this grid completing only after
// the split pass has (a sequential delta's split pass reads h in y, which the up pass
// overwrites).
template <typename T>
PK_INLINE void fused_linear_split_reduce(const FusedLinearParams& p) {
    allow_dependent_launch();
    grid_dependency_wait();
    const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
    if (n >= p.n || m >= p.m) return;
    float acc = 0.0f;
    for (int s = 0; s < p.k_splits; ++s) acc += p.partial[(int64_t(s) * p.m + m) * p.ldp + n];
    const Operands<T> o = operands<T>(p, 0);
    const RowCoefs c = row_coefs<T>(p, m);
    // A multi-adapter pass's row: its adapter's s·b_up (the fused pass's switch adds it when
    // unsplit). row_adapter checks the id again, flagging the bits the pass flagged.
    if (p.multi.table)
        if (const AdapterEntry* a = row_adapter(p.multi, m))
            if (a->b_up) acc += a->scale * to_float(static_cast<const T*>(a->b_up)[n]);
    finish(p, o, m, n, c, acc + phase_switch(p, o, m, n, c, 0.0f));
}

// ---------------------------------------------------------------------------------------------
// LoRA merge: W[n, k] ← W[n, k] + sign·s·Σ_j B[n, j]·A[j, k], in place (LoRA's A is the
// bottleneck's W_down, B its W_up).
// grid (ceil(K/64), ceil(N/64)), block 256 = 16×16, 4×4 outputs per thread strided by 16.

struct LoraMergeParams {
    void* w;             // [N, K], leading dimension ldw
    const void* w_down;  // A [r, K], leading dimension ld_down
    const void* w_up;    // B [N, r], leading dimension ld_up
    int64_t ldw, ld_down, ld_up;
    int32_t n, k, r;
    float scale;  // sign·s
};
PK_PARAMS_SIZE(LoraMergeParams)

template <typename T>
PK_INLINE void lora_merge(const LoraMergeParams& p) {
    constexpr int TILE = 64, RK = 16;
    __shared__ float Bt[RK][TILE + 4];  // B[n0 + i, j0 + jj] at Bt[jj][i]
    __shared__ float At[RK][TILE + 4];  // A[j0 + jj, k0 + i] at At[jj][i]
    const T* a = static_cast<const T*>(p.w_down);
    const T* b = static_cast<const T*>(p.w_up);
    T* w = static_cast<T*>(p.w);
    const int n0 = blockIdx.y * TILE, k0 = blockIdx.x * TILE;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    for (int j0 = 0; j0 < p.r; j0 += RK) {
        // B: 16 consecutive threads read 16 consecutive j of one row n.
        for (int i = threadIdx.x; i < TILE * RK; i += 256) {
            const int row = i / RK, jj = i % RK, n = n0 + row, j = j0 + jj;
            Bt[jj][row] = (n < p.n && j < p.r) ? to_float(b[n * p.ld_up + j]) : 0.0f;
        }
        // A: 64 consecutive threads read 64 consecutive k of one row j.
        for (int i = threadIdx.x; i < TILE * RK; i += 256) {
            const int jj = i / TILE, col = i % TILE, j = j0 + jj, k = k0 + col;
            At[jj][col] = (j < p.r && k < p.k) ? to_float(a[j * p.ld_down + k]) : 0.0f;
        }
        __syncthreads();
        for (int jj = 0; jj < RK; ++jj)
            for (int i = 0; i < 4; ++i)
                for (int q = 0; q < 4; ++q) acc[i][q] += Bt[jj][ty + 16 * i] * At[jj][tx + 16 * q];
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int q = 0; q < 4; ++q) {
            const int n = n0 + ty + 16 * i, k = k0 + tx + 16 * q;
            if (n < p.n && k < p.k) {
                T& dst = w[n * p.ldw + k];
                dst = from_float<T>(to_float(dst) + p.scale * acc[i][q]);
            }
        }
}

// ---------------------------------------------------------------------------------------------
// Instantiations: one line per exported kernel.

PK_KERNEL(fused_linear_naive_f32, fused_linear_naive<float>, FusedLinearParams)
PK_KERNEL(fused_linear_naive_f16, fused_linear_naive<__half>, FusedLinearParams)
PK_KERNEL(fused_linear_naive_bf16, fused_linear_naive<__nv_bfloat16>, FusedLinearParams)
PK_KERNEL_BOUNDS(fused_linear_simt_f32, fused_linear_simt<float>, FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_simt_f16, fused_linear_simt<__half>, FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_simt_bf16, fused_linear_simt<__nv_bfloat16>, FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_large_f16, (fused_linear_mma<__half, MmaLarge>), FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_large_bf16, (fused_linear_mma<__nv_bfloat16, MmaLarge>), FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_small_f16, (fused_linear_mma<__half, MmaSmall>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_small_bf16, (fused_linear_mma<__nv_bfloat16, MmaSmall>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_mid_f16, (fused_linear_mma<__half, MmaMid>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_mid_bf16, (fused_linear_mma<__nv_bfloat16, MmaMid>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_decode_f16, (fused_linear_mma<__half, MmaDecode>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_decode_bf16, (fused_linear_mma<__nv_bfloat16, MmaDecode>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_wgmma_f16, (fused_linear_mma<__half, MmaHopper>), FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_wgmma_bf16, (fused_linear_mma<__nv_bfloat16, MmaHopper>), FusedLinearParams, 256, 2)
// The quantized loader's 32-element runs need more registers than the dense copies: at the
// dense kernels' bounds ptxas spilled (large 328 bytes on sm_90, 480 on sm_80; wgmma 32;
// decode 8 on sm_80), so these allow twice the registers (half the resident blocks). An
// occupancy to tune once measured; a cp.async staging of the packed bytes is the next step.
PK_KERNEL_BOUNDS(fused_linear_mma_large_q_f16, (fused_linear_mma<__half, MmaLarge, true>), FusedLinearParams, 256, 1)
PK_KERNEL_BOUNDS(fused_linear_mma_large_q_bf16, (fused_linear_mma<__nv_bfloat16, MmaLarge, true>), FusedLinearParams, 256, 1)
PK_KERNEL_BOUNDS(fused_linear_mma_small_q_f16, (fused_linear_mma<__half, MmaSmall, true>), FusedLinearParams, 128, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_small_q_bf16, (fused_linear_mma<__nv_bfloat16, MmaSmall, true>), FusedLinearParams, 128, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_decode_q_f16, (fused_linear_mma<__half, MmaDecode, true>), FusedLinearParams, 128, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_decode_q_bf16, (fused_linear_mma<__nv_bfloat16, MmaDecode, true>), FusedLinearParams, 128, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_mid_q_f16, (fused_linear_mma<__half, MmaMid, true>), FusedLinearParams, 128, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_mid_q_bf16, (fused_linear_mma<__nv_bfloat16, MmaMid, true>), FusedLinearParams, 128, 2)
PK_KERNEL_BOUNDS(fused_linear_wgmma_q_f16, (fused_linear_mma<__half, MmaHopper, true>), FusedLinearParams, 256, 1)
PK_KERNEL_BOUNDS(fused_linear_wgmma_q_bf16, (fused_linear_mma<__nv_bfloat16, MmaHopper, true>), FusedLinearParams, 256, 1)
// The multi-adapter batch's fused pass (MULTI): the dense tiles and bounds.
PK_KERNEL_BOUNDS(fused_linear_mma_large_multi_f16, (fused_linear_mma<__half, MmaLarge, false, true>), FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_large_multi_bf16, (fused_linear_mma<__nv_bfloat16, MmaLarge, false, true>), FusedLinearParams, 256, 2)
PK_KERNEL_BOUNDS(fused_linear_mma_small_multi_f16, (fused_linear_mma<__half, MmaSmall, false, true>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_small_multi_bf16, (fused_linear_mma<__nv_bfloat16, MmaSmall, false, true>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_mid_multi_f16, (fused_linear_mma<__half, MmaMid, false, true>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_mid_multi_bf16, (fused_linear_mma<__nv_bfloat16, MmaMid, false, true>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_decode_multi_f16, (fused_linear_mma<__half, MmaDecode, false, true>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_mma_decode_multi_bf16, (fused_linear_mma<__nv_bfloat16, MmaDecode, false, true>), FusedLinearParams, 128, 4)
PK_KERNEL_BOUNDS(fused_linear_split_reduce_f16, fused_linear_split_reduce<__half>, FusedLinearParams, 128, 8)
PK_KERNEL_BOUNDS(fused_linear_split_reduce_bf16, fused_linear_split_reduce<__nv_bfloat16>, FusedLinearParams, 128, 8)
PK_KERNEL_BOUNDS(lora_merge_f32, lora_merge<float>, LoraMergeParams, 256, 2)
PK_KERNEL_BOUNDS(lora_merge_f16, lora_merge<__half>, LoraMergeParams, 256, 2)
PK_KERNEL_BOUNDS(lora_merge_bf16, lora_merge<__nv_bfloat16>, LoraMergeParams, 256, 2)

// ---------------------------------------------------------------------------------------------
// The elementwise step of the unfused cuBLAS baseline (src/cuda/baseline.rs); the fused kernels
// above never need it. x[m, n] ← f(x[m, n] + bias_scale·bias[n]) in place, bias optional.
// A 1-D grid-stride loop over the rows × cols elements, consecutive threads on consecutive
// columns, so narrow matrices (the bottleneck's [M, r]) keep every thread busy.

struct BiasActivationParams {
    void* x;           // [rows, cols], leading dimension ld
    const void* bias;  // [cols] or null
    int64_t ld;
    int32_t rows, cols;
    int32_t activation;  // Activation, as src/spec.rs numbers it
    float bias_scale;
};
PK_PARAMS_SIZE(BiasActivationParams)

template <typename T>
PK_INLINE void bias_activation(const BiasActivationParams& p) {
    T* x = static_cast<T*>(p.x);
    const T* bias = static_cast<const T*>(p.bias);
    const int64_t total = int64_t(p.rows) * p.cols;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int64_t m = i / p.cols, n = i % p.cols;
        float v = to_float(x[m * p.ld + n]);
        if (bias) v += p.bias_scale * to_float(bias[n]);
        x[m * p.ld + n] = from_float<T>(activate(static_cast<Activation>(p.activation), v));
    }
}

PK_KERNEL_BOUNDS(bias_activation_f32, bias_activation<float>, BiasActivationParams, 256, 1)
PK_KERNEL_BOUNDS(bias_activation_f16, bias_activation<__half>, BiasActivationParams, 256, 1)
PK_KERNEL_BOUNDS(bias_activation_bf16, bias_activation<__nv_bfloat16>, BiasActivationParams, 256, 1)

// ---------------------------------------------------------------------------------------------
// Dequantization of a quantized frozen W [n, k] to T (quant.cuh): the first step of the unfused
// path that the fused kernels above replace (Unsloth's and PEFT's QLoRA: W dequantized to a
// bf16 buffer, then cuBLAS), for the baseline (src/cuda/baseline.rs) and for users who want
// W_T. One thread per run of 32 elements of a row (quant_run32: one 16-byte load of NF4, two
// of FP8, where aligned), 16-byte stores where the output row allows; grid-stride.

struct QuantDequantizeParams {
    QuantParams q;
    void* out;  // [n, k], contiguous
    int64_t n;
};
PK_PARAMS_SIZE(QuantDequantizeParams)

template <typename T>
PK_INLINE void quant_dequantize(const QuantDequantizeParams& p) {
    T* out = static_cast<T*>(p.out);
    const int64_t runs_per_row = (p.q.k + 31) / 32, runs = p.n * runs_per_row;
    const bool vectorized = quant_runs_vectorized(p.q);
    constexpr int PER = 16 / int(sizeof(T));  // elements per 16-byte store
    const bool vec_store = reinterpret_cast<uintptr_t>(out) % 16 == 0 && p.q.k % PER == 0;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < runs; r += stride) {
        const int64_t row = r / runs_per_row, col = (r % runs_per_row) * 32;
        T v[32];
        quant_run32(p.q, vectorized, row, col, p.n, p.q.k, v);
        T* dst = out + row * p.q.k + col;
        if (vec_store && col + 32 <= p.q.k) {
#pragma unroll
            for (int c = 0; c < 32; c += PER) {
                Vec<T, PER> w;
#pragma unroll
                for (int e = 0; e < PER; ++e) w.v[e] = v[c + e];
                store_vec(dst + c, w);
            }
        } else {
            for (int e = 0; e < 32 && col + e < p.q.k; ++e) dst[e] = v[e];
        }
    }
}

PK_KERNEL_BOUNDS(quant_dequantize_f32, quant_dequantize<float>, QuantDequantizeParams, 256, 1)
PK_KERNEL_BOUNDS(quant_dequantize_f16, quant_dequantize<__half>, QuantDequantizeParams, 256, 1)
PK_KERNEL_BOUNDS(quant_dequantize_bf16, quant_dequantize<__nv_bfloat16>, QuantDequantizeParams, 256, 1)
