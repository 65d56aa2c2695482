//! The dtype and architecture layer (kernels/common.cuh, kernels/arch.cuh) on the
//! emulator, through the kernels of kernels/selftest_mma.cu: the tensor-core GEMM against
//! an f64 loop on ragged shapes, the mma and ldmatrix fragment layouts against the PTX
//! ISA lane by lane (and wrong lane mappings caught), the 16-bit conversions and
//! arithmetic bit for bit, activations, reductions, and a GEMM missing its cp.async wait.

mod common;

use common::Rng;
use half::{bf16, f16};
use peft_kernels::selftest::mma::{self, BLayout, MmaGemm, LDMATRIX_PROBE_REGS};
use peft_kernels::{Activation, DType, Element, Error};

/// f32's unit roundoff.
const U32: f64 = f32::EPSILON as f64 / 2.0;

/// `c = a · B` in f64 (B as `layout` says) and, per element, `Σ |a_ik · b_kj|`: the scale
/// of the f32 rounding error.
fn gemm_reference<T: Element>(g: &MmaGemm, a: &[T], b: &[T]) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k) = (g.m, g.n, g.k);
    let b_at = |kk: usize, j: usize| match g.b_layout {
        BLayout::Nk => b[j * k + kk].to_f64(),
        BLayout::Kn => b[kk * n + j].to_f64(),
    };
    let mut c = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = a[i * k + kk].to_f64() * b_at(kk, j);
                c[i * n + j] += p;
                mag[i * n + j] += p.abs();
            }
        }
    }
    (c, mag)
}

/// Asserts `c` is within f32 summation error of the reference: |c − ref| ≤ 2(k + 2)·u·Σ|ab|
/// (the emulated mma sums 16 exact products in f32, then adds them to the accumulator).
fn assert_gemm_close<T: Element>(g: &MmaGemm, a: &[T], b: &[T], c: &[f32], seed: u64) {
    let (reference, mag) = gemm_reference(g, a, b);
    for (idx, ((&got, &want), &mag)) in c.iter().zip(&reference).zip(&mag).enumerate() {
        let tol = 2.0 * (g.k as f64 + 2.0) * U32 * mag;
        let err = (got as f64 - want).abs();
        assert!(
            err <= tol,
            "{} {g:?}: c[{}, {}] = {got:e}, expected {want:e} (err {err:e} > tol {tol:e}), seed {seed}",
            T::DTYPE,
            idx / g.n,
            idx % g.n
        );
    }
}

fn run_gemm<T: Element>(g: &MmaGemm, a: &[T], b: &[T]) -> Vec<f32> {
    let mut c = vec![f32::NAN; g.m * g.n];
    mma::mma_gemm(g, a, b, &mut c).unwrap_or_else(|e| panic!("{} {g:?}: {e}", T::DTYPE));
    c
}

const SIZES: [usize; 8] = [1, 7, 16, 17, 33, 64, 100, 129];
const LAYOUTS: [BLayout; 2] = [BLayout::Nk, BLayout::Kn];

#[test]
fn gemm_matches_f64_on_ragged_shapes() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    // Every (m, n, k) of SIZES; the dtype and B layout rotate so each of the four kernels
    // meets every size in every dimension.
    let mut variant = 0;
    for &m in &SIZES {
        for &n in &SIZES {
            for &k in &SIZES {
                let b_layout = LAYOUTS[variant % 2];
                let g = MmaGemm { m, n, k, b_layout };
                if (variant / 2) % 2 == 0 {
                    let a = rng.normal_vec::<f16>(m * k, 1.0);
                    let b = rng.normal_vec::<f16>(n * k, 1.0);
                    assert_gemm_close(&g, &a, &b, &run_gemm(&g, &a, &b), seed);
                } else {
                    let a = rng.normal_vec::<bf16>(m * k, 1.0);
                    let b = rng.normal_vec::<bf16>(n * k, 1.0);
                    assert_gemm_close(&g, &a, &b, &run_gemm(&g, &a, &b), seed);
                }
                variant += 1;
            }
            variant += 1; // shift the rotation between rows of the loop
        }
    }
}

/// Random integers in [-r, r] as T: products and sums of them stay exact in f32.
fn small_ints<T: Element>(rng: &mut Rng, len: usize, r: usize) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f64(rng.range(0, 2 * r) as f64 - r as f64))
        .collect()
}

/// A row-major `rows × cols` matrix with a single 1 in each row, at the returned columns.
fn selection<T: Element>(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<T>, Vec<usize>) {
    let at: Vec<usize> = (0..rows).map(|_| rng.range(0, cols - 1)).collect();
    let mut s = vec![T::from_f64(0.0); rows * cols];
    for (r, &c) in at.iter().enumerate() {
        s[r * cols + c] = T::from_f64(1.0);
    }
    (s, at)
}

fn gemm_exact_cases<T: Element>(rng: &mut Rng) {
    let seed = rng.seed();
    for _ in 0..6 {
        let (m, n, k) = (rng.pick(&SIZES), rng.pick(&SIZES), rng.pick(&SIZES));
        for b_layout in LAYOUTS {
            let g = MmaGemm { m, n, k, b_layout };
            let b_at = |b: &[T], kk: usize, j: usize| match b_layout {
                BLayout::Nk => b[j * k + kk],
                BLayout::Kn => b[kk * n + j],
            };
            // Integers: every partial sum is exact, so must be the result.
            let a = small_ints::<T>(rng, m * k, 8);
            let b = small_ints::<T>(rng, n * k, 8);
            let (reference, _) = gemm_reference(&g, &a, &b);
            let c = run_gemm(&g, &a, &b);
            for (idx, (&got, &want)) in c.iter().zip(&reference).enumerate() {
                assert_eq!(
                    got as f64,
                    want,
                    "{} {g:?} integers at {idx}, seed {seed}",
                    T::DTYPE
                );
            }
            // A selects one row of B per row of C: c[i, j] = B[sel(i), j], so every output
            // element comes from one B element through one fragment position.
            let (a_sel, at) = selection::<T>(rng, m, k);
            let b = rng.normal_vec::<T>(n * k, 1.0);
            let c = run_gemm(&g, &a_sel, &b);
            for i in 0..m {
                for j in 0..n {
                    let want = b_at(&b, at[i], j).to_f32();
                    assert_eq!(
                        c[i * n + j],
                        want,
                        "{} {g:?} A-selection c[{i}, {j}], seed {seed}",
                        T::DTYPE
                    );
                }
            }
            // B selects one column of A per column of C: c[i, j] = A[i, sel(j)].
            let (sel, at) = selection::<T>(rng, n, k); // n × k: row j has its 1 at at[j]
            let b_sel = match b_layout {
                BLayout::Nk => sel,
                BLayout::Kn => {
                    let mut t = vec![T::from_f64(0.0); k * n];
                    for (j, &kk) in at.iter().enumerate() {
                        t[kk * n + j] = T::from_f64(1.0);
                    }
                    t
                }
            };
            let a = rng.normal_vec::<T>(m * k, 1.0);
            let c = run_gemm(&g, &a, &b_sel);
            for i in 0..m {
                for j in 0..n {
                    let want = a[i * k + at[j]].to_f32();
                    assert_eq!(
                        c[i * n + j],
                        want,
                        "{} {g:?} B-selection c[{i}, {j}], seed {seed}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_is_exact_on_integers_and_selections() {
    let mut rng = Rng::from_env();
    gemm_exact_cases::<f16>(&mut rng);
    gemm_exact_cases::<bf16>(&mut rng);
}

#[test]
fn gemm_with_k_zero_writes_zeros_and_empty_is_a_no_op() {
    for b_layout in LAYOUTS {
        let g = MmaGemm {
            m: 17,
            n: 9,
            k: 0,
            b_layout,
        };
        let c = run_gemm::<bf16>(&g, &[], &[]);
        assert!(c.iter().all(|&v| v == 0.0), "{c:?}");
        let g = MmaGemm {
            m: 0,
            n: 9,
            k: 5,
            b_layout,
        };
        mma::mma_gemm::<f16>(&g, &[], &[f16::ONE; 45], &mut []).unwrap();
    }
}

#[test]
fn gemm_launch_geometry() {
    let g = MmaGemm {
        m: 129,
        n: 100,
        k: 7,
        b_layout: BLayout::Kn,
    };
    let launch = mma::mma_gemm_launch(DType::BF16, &g).unwrap();
    assert_eq!(launch.grid, [2, 3, 1]);
    assert_eq!(launch.block, [128, 1, 1]);
    assert_eq!(launch.dynamic_smem, 0);
    assert_eq!(launch.kernel.name(), "selftest_mma_gemm_kn_bf16");
    let nk = MmaGemm {
        b_layout: BLayout::Nk,
        ..g
    };
    assert_eq!(
        mma::mma_gemm_launch(DType::F16, &nk).unwrap().kernel.name(),
        "selftest_mma_gemm_nk_f16"
    );
    assert!(matches!(
        mma::mma_gemm_launch(DType::F32, &g),
        Err(Error::InvalidArgument { arg: "dtype", .. })
    ));
    for (m, n, arg) in [(0, 5, "m"), (5, 0, "n"), (65535 * 64 + 1, 5, "m")] {
        let g = MmaGemm {
            m,
            n,
            k: 1,
            b_layout: BLayout::Nk,
        };
        match mma::mma_gemm_launch(DType::F16, &g) {
            Err(Error::InvalidArgument { arg: a, .. }) => assert_eq!(a, arg),
            other => panic!("{g:?}: {other:?}"),
        }
    }
}

#[test]
fn gemm_rejects_bad_arguments() {
    let g = MmaGemm {
        m: 3,
        n: 4,
        k: 5,
        b_layout: BLayout::Nk,
    };
    let (a, b) = (vec![bf16::ONE; 15], vec![bf16::ONE; 20]);
    let mut c = vec![0.0; 12];
    let arg_of = |r: peft_kernels::Result<()>| match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert_eq!(arg_of(mma::mma_gemm(&g, &a[1..], &b, &mut c)), "a");
    assert_eq!(arg_of(mma::mma_gemm(&g, &a, &b[1..], &mut c)), "b");
    assert_eq!(arg_of(mma::mma_gemm(&g, &a, &b, &mut c[1..])), "c");
    assert_eq!(
        arg_of(mma::mma_gemm(&g, &[1.0f32; 15], &[1.0f32; 20], &mut c)),
        "T"
    );
    let kn = MmaGemm {
        b_layout: BLayout::Kn,
        ..g
    };
    assert_eq!(
        arg_of(mma::broken_mma_gemm_no_wait(&kn, &a, &b, &mut c)),
        "gemm.b_layout"
    );
}

#[test]
fn gemm_without_cp_async_wait_is_caught() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    // Two blocks and three K slices: reading before the wait sees whatever the shared
    // tiles held, never this input.
    let g = MmaGemm {
        m: 64,
        n: 128,
        k: 96,
        b_layout: BLayout::Nk,
    };
    let a = rng.normal_vec::<bf16>(g.m * g.k, 1.0);
    let b = rng.normal_vec::<bf16>(g.n * g.k, 1.0);
    let mut c = vec![f32::NAN; g.m * g.n];
    match mma::broken_mma_gemm_no_wait(&g, &a, &b, &mut c) {
        Err(Error::Emulator { .. }) => {}
        Ok(()) => {
            let (reference, mag) = gemm_reference(&g, &a, &b);
            let wrong = c
                .iter()
                .zip(reference.iter().zip(&mag))
                .filter(|(&got, (&want, &mag))| {
                    // NaN counts as wrong.
                    let err = (got as f64 - want).abs();
                    err.is_nan() || err > 2.0 * (g.k as f64 + 2.0) * U32 * mag
                })
                .count();
            assert!(
                wrong > c.len() / 2,
                "only {wrong} of {} elements wrong, seed {seed}",
                c.len()
            );
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Fragment layouts

/// `a · b + c` for the probe's 16 × 16 · 16 × 8 (k × n) + 16 × 8 problem, in f64.
fn mma_reference<T: Element>(a: &[T], b: &[T], c: &[f32]) -> Vec<f64> {
    (0..128)
        .map(|idx| {
            let (i, j) = (idx / 8, idx % 8);
            c[idx] as f64
                + (0..16)
                    .map(|kk| a[i * 16 + kk].to_f64() * b[kk * 8 + j].to_f64())
                    .sum::<f64>()
        })
        .collect()
}

fn mma_probe_cases<T: Element>(rng: &mut Rng) {
    let seed = rng.seed();
    // Integers: the result is exact, whatever the summation order.
    let a = small_ints::<T>(rng, 256, 8);
    let b = small_ints::<T>(rng, 128, 8);
    let c: Vec<f32> = (0..128).map(|_| rng.range(0, 200) as f32 - 100.0).collect();
    let reference = mma_reference(&a, &b, &c);
    let d = mma::mma_probe(&a, &b, &c, 0, 0).unwrap();
    for (idx, (&got, &want)) in d.iter().zip(&reference).enumerate() {
        assert_eq!(
            got as f64,
            want,
            "{} d[{}, {}], seed {seed}",
            T::DTYPE,
            idx / 8,
            idx % 8
        );
    }
    // Every wrong lane mapping of either operand changes the result.
    for xor in 1..32 {
        for (ax, bx) in [(xor, 0), (0, xor)] {
            let d = mma::mma_probe(&a, &b, &c, ax, bx).unwrap();
            assert!(
                d.iter()
                    .zip(&reference)
                    .any(|(&got, &want)| got as f64 != want),
                "{}: A lanes ^ {ax}, B lanes ^ {bx} went unnoticed, seed {seed}",
                T::DTYPE
            );
        }
    }
}

#[test]
fn mma_layout_is_the_ptx_layout_and_wrong_lane_mappings_fail() {
    let mut rng = Rng::from_env();
    mma_probe_cases::<f16>(&mut rng);
    mma_probe_cases::<bf16>(&mut rng);
}

#[test]
fn mma_probe_rejects_bad_arguments() {
    let (a, b, c) = (vec![f16::ONE; 256], vec![f16::ONE; 128], vec![0.0f32; 128]);
    let arg_of = |r: peft_kernels::Result<Vec<f32>>| match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert_eq!(arg_of(mma::mma_probe(&a[1..], &b, &c, 0, 0)), "a");
    assert_eq!(arg_of(mma::mma_probe(&a, &b[1..], &c, 0, 0)), "b");
    assert_eq!(arg_of(mma::mma_probe(&a, &b, &c[1..], 0, 0)), "c");
    assert_eq!(arg_of(mma::mma_probe(&a, &b, &c, 32, 0)), "a_lane_xor");
    assert_eq!(arg_of(mma::mma_probe(&a, &b, &c, 0, 32)), "b_lane_xor");
    assert_eq!(
        arg_of(mma::mma_probe(&[0.0f32; 256], &[0.0f32; 128], &c, 0, 0)),
        "T"
    );
}

/// What lane `lane` receives in register `m` of an ldmatrix (PTX ISA, "Matrix Load"):
/// matrix m's row r is at shared row rows[8m + r]; without .trans, the elements
/// (lane / 4, 2(lane % 4)) and (.., 2(lane % 4) + 1); with .trans, (2(lane % 4), lane / 4)
/// and (2(lane % 4) + 1, lane / 4), the first in the low half.
fn ldmatrix_expected(src: &[u16], rows: &[u32; 32], m: usize, lane: usize, trans: bool) -> u32 {
    let at = |r: usize, col: usize| src[rows[8 * m + r] as usize * 8 + col] as u32;
    let (r, c) = (lane / 4, 2 * (lane % 4));
    if trans {
        at(c, r) | at(c + 1, r) << 16
    } else {
        at(r, c) | at(r, c + 1) << 16
    }
}

#[test]
fn ldmatrix_layout_is_the_ptx_layout() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    // Distinct values, so each register half names the one element it holds.
    let mut values: Vec<u16> = (0..=u16::MAX).collect();
    for i in 0..256 {
        let j = rng.range(i, values.len() - 1);
        values.swap(i, j);
    }
    let src = &values[..256];
    // Lanes pass shared rows in a random order: the instruction must follow the lanes'
    // addresses, not any stride.
    let mut rows: [u32; 32] = std::array::from_fn(|i| i as u32);
    for i in 0..32 {
        rows.swap(i, rng.range(i, 31));
    }
    let out = mma::ldmatrix_probe(src, &rows, 0).unwrap();
    // Register offsets of each form in a lane's output.
    let forms = [
        (1, false, 0),
        (2, false, 1),
        (4, false, 3),
        (1, true, 7),
        (2, true, 8),
        (4, true, 10),
    ];
    assert_eq!(
        forms.iter().map(|f| f.0).sum::<usize>(),
        LDMATRIX_PROBE_REGS
    );
    for (lane, regs) in out.iter().enumerate() {
        for &(num, trans, offset) in &forms {
            for m in 0..num {
                let want = ldmatrix_expected(src, &rows, m, lane, trans);
                assert_eq!(
                    regs[offset + m],
                    want,
                    "ldmatrix x{num}{} lane {lane} register {m}: got {:#010x}, expected {want:#010x}, seed {seed}",
                    if trans { ".trans" } else { "" },
                    regs[offset + m]
                );
            }
        }
    }
}

#[test]
fn ldmatrix_misaligned_row_is_refused() {
    let src = [0u16; 256];
    let rows: [u32; 32] = std::array::from_fn(|i| i as u32);
    for misalign in [2, 8] {
        match mma::ldmatrix_probe(&src, &rows, misalign) {
            Err(Error::Emulator { message, .. }) => {
                assert!(message.contains("16-byte aligned"), "{message}")
            }
            other => panic!("misalign {misalign}: expected an emulator error, got {other:?}"),
        }
    }
    let mut bad = rows;
    bad[5] = 32;
    assert!(matches!(
        mma::ldmatrix_probe(&src, &bad, 0),
        Err(Error::InvalidArgument {
            arg: "row_of_lane",
            ..
        })
    ));
    assert!(matches!(
        mma::ldmatrix_probe(&src, &rows, 16),
        Err(Error::InvalidArgument {
            arg: "misalign",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------
// Conversions and arithmetic

/// Floats that stress a 16-bit rounding: specials, both formats' edges and halfway
/// points, random bit patterns, random magnitudes over the whole f16 range and beyond,
/// and exact midpoints between random neighbours of T.
fn conversion_inputs<T: Element>(rng: &mut Rng) -> Vec<f32> {
    let mut x = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1), // smallest f32 subnormal
        1.0,
        -1.0,
        65504.0,   // f16 max
        65519.996, // just below the f16 overflow threshold
        65520.0,   // f16: halfway to 2^16, rounds to inf
        -65520.0,
        2f32.powi(-24),              // f16 smallest subnormal
        2f32.powi(-25),              // half of it: ties to 0
        2f32.powi(-25) * 1.000_001,  // just above: rounds up to 2^-24
        3.0 * 2f32.powi(-25),        // tie between 2^-24 and 2^-23: even is 2^-23
        1023.0 * 2f32.powi(-24),     // f16 largest subnormal
        2f32.powi(-14),              // f16 smallest normal
        1.0 + 2f32.powi(-11),        // f16 tie: to 1
        1.0 + 3.0 * 2f32.powi(-11),  // f16 tie: to 1 + 2^-9
        1.0 + 2f32.powi(-8),         // bf16 tie: to 1
        1.0 + 3.0 * 2f32.powi(-8),   // bf16 tie: to 1 + 2^-6
        f32::from_bits(0x7F7F_8000), // bf16: halfway to inf
        f32::from_bits(0x7F7F_7FFF), // bf16: just below it
        f32::from_bits(0x0000_8000), // f32 subnormal, a bf16 tie
        f32::from_bits(0x0001_8000), // f32 subnormal, a bf16 tie rounding up
    ];
    for _ in 0..20_000 {
        x.push(f32::from_bits(rng.next_u64() as u32));
    }
    for _ in 0..20_000 {
        let v = 2f64.powf(rng.uniform(-30.0, 20.0)) as f32;
        x.push(if rng.chance(0.5) { -v } else { v });
    }
    for _ in 0..20_000 {
        // Midpoint of a random finite T and its upper neighbour: exact in f32.
        let bits = (rng.next_u64() & 0x7FFF) as u16;
        let lo = bytemuck::cast::<u16, T>(bits).to_f64();
        let hi = bytemuck::cast::<u16, T>(bits + 1).to_f64();
        if lo.is_finite() && hi.is_finite() {
            let mid = ((lo + hi) / 2.0) as f32;
            x.push(if rng.chance(0.5) { -mid } else { mid });
        }
    }
    // An odd count: the last pair of the paired conversion is half empty.
    if x.len() % 2 == 0 {
        x.pop();
    }
    x
}

fn same_bits<T: Element>(got: T, want: T) -> bool {
    if want.to_f32().is_nan() {
        got.to_f32().is_nan()
    } else {
        bytemuck::cast::<T, u16>(got) == bytemuck::cast::<T, u16>(want)
    }
}

fn same_f32(got: f32, want: f32) -> bool {
    if want.is_nan() {
        got.is_nan()
    } else {
        got.to_bits() == want.to_bits()
    }
}

fn conversion_cases<T: Element>(rng: &mut Rng) {
    let seed = rng.seed();
    let x = conversion_inputs::<T>(rng);
    let out = mma::convert::<T>(&x).unwrap();
    for (i, &v) in x.iter().enumerate() {
        let want = T::from_f32(v);
        let ctx = || {
            format!(
                "{}: x = {v:e} ({:#010x}), seed {seed}",
                T::DTYPE,
                v.to_bits()
            )
        };
        assert!(
            same_bits(out.scalar[i], want),
            "scalar {:?} vs {want:?}, {}",
            out.scalar[i],
            ctx()
        );
        assert!(
            same_bits(out.pair[i], want),
            "pair {:?} vs {want:?}, {}",
            out.pair[i],
            ctx()
        );
        assert!(
            same_f32(out.scalar_back[i], want.to_f32()),
            "scalar back {}, {}",
            out.scalar_back[i],
            ctx()
        );
        assert!(
            same_f32(out.pair_back[i], want.to_f32()),
            "pair back {}, {}",
            out.pair_back[i],
            ctx()
        );
    }
}

#[test]
fn conversions_are_bit_exact() {
    let mut rng = Rng::from_env();
    conversion_cases::<f16>(&mut rng);
    conversion_cases::<bf16>(&mut rng);
}

#[test]
fn conversion_rejects_f32() {
    assert!(matches!(
        mma::convert::<f32>(&[1.0]),
        Err(Error::InvalidArgument { arg: "T", .. })
    ));
}

/// `x` (exact in f64) rounded to nearest even T, written independently of the crate and
/// of `half` (whose f64 conversion truncates first): the nearest of T's neighbours.
fn round_exact<T: Element>(x: f64) -> T {
    let from = |bits: u16| bytemuck::cast::<u16, T>(bits);
    if x.is_nan() {
        return T::nan();
    }
    let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
    let ax = x.abs();
    // The largest finite magnitude and the infinity of T.
    let inf = T::from_f64(f64::INFINITY);
    let inf_bits = bytemuck::cast::<T, u16>(inf);
    let max = from(inf_bits - 1).to_f64();
    let top_half_ulp = (from(inf_bits - 1).to_f64() - from(inf_bits - 2).to_f64()) / 2.0;
    if ax >= max + top_half_ulp {
        return from(inf_bits | sign);
    }
    // T::from_f64 may be off by one ulp; look around it.
    let guess = bytemuck::cast::<T, u16>(T::from_f64(ax)).min(inf_bits - 1);
    let mut best = guess;
    for cand in [
        guess.saturating_sub(1),
        guess,
        (guess + 1).min(inf_bits - 1),
    ] {
        let (dc, db) = (
            (from(cand).to_f64() - ax).abs(),
            (from(best).to_f64() - ax).abs(),
        );
        if dc < db || (dc == db && cand % 2 == 0) {
            best = cand;
        }
    }
    from(best | sign)
}

fn arith_check<T: Element>(a: &[T], b: &[T], c: &[T], seed: u64) {
    let out = mma::arith(a, b, c).unwrap();
    for i in 0..a.len() {
        let (x, y, z) = (a[i].to_f64(), b[i].to_f64(), c[i].to_f64());
        let cases = [
            ("add", out.add[i], x + y),
            ("sub", out.sub[i], x - y),
            ("mul", out.mul[i], x * y),
            ("fma", out.fma[i], x * y + z),
        ];
        for (op, got, exact) in cases {
            let want = round_exact::<T>(exact);
            assert!(
                same_bits(got, want),
                "{} {op}({a:?}, {b:?}, {c:?}) = {got:?}, expected {want:?}, seed {seed}",
                T::DTYPE,
                a = a[i],
                b = b[i],
                c = c[i]
            );
        }
    }
}

#[test]
fn half_arithmetic_rounds_once() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    // f16: any operands (NaN, inf, subnormals); sums and products of f16 are exact in
    // f64 wherever the result is finite, so f64 is the exact reference.
    let n = 100_000;
    let bits = |rng: &mut Rng| -> Vec<f16> {
        (0..n)
            .map(|_| f16::from_bits(rng.next_u64() as u16))
            .collect()
    };
    let (a, b, c) = (bits(&mut rng), bits(&mut rng), bits(&mut rng));
    arith_check(&a, &b, &c, seed);
    // bf16: exponents within ±12 of 1, so that f64 stays exact for a·b + c as well.
    let near_one = |rng: &mut Rng| -> Vec<bf16> {
        (0..n)
            .map(|_| {
                let r = rng.next_u64();
                let exp = 127 - 12 + (r >> 8) % 25;
                bf16::from_bits(((r & 1) << 15 | exp << 7 | (r >> 1) & 0x7F) as u16)
            })
            .collect()
    };
    let (a, b, c) = (near_one(&mut rng), near_one(&mut rng), near_one(&mut rng));
    arith_check(&a, &b, &c, seed);
    // Where rounding a·b + c through f64 would be wrong: a·b = (1 + 2^-4)^2 = 1 + 2^-3 +
    // 2^-8 is a bf16 tie (to 1 + 2^-3, even), which ±2^-100 must break.
    let x = bf16::from_f32(1.0 + 2f32.powi(-4));
    let tiny = bf16::from_f32(2f32.powi(-100));
    let out = mma::arith(&[x, x, x], &[x, x, x], &[tiny, -tiny, bf16::ZERO]).unwrap();
    let bits: Vec<u16> = out.fma.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, [0x3F91, 0x3F90, 0x3F90]);
    assert_eq!(out.mul[0].to_bits(), 0x3F90);
}

// ---------------------------------------------------------------------------------------
// Activations and reductions

fn activation_cases<T: Element>(rng: &mut Rng, eps: f64) {
    let seed = rng.seed();
    let acts = [
        Activation::Identity,
        Activation::Relu,
        Activation::GeluTanh,
        Activation::GeluErf,
        Activation::Silu,
    ];
    for n in [1, 7, 8, 9, 1003] {
        let mut x = rng.normal_vec::<T>(n, 4.0);
        let specials = [0.0, -0.0, 1e-3, -1e-3, 20.0, -20.0, 80.0, -80.0];
        for (xi, &s) in x.iter_mut().zip(&specials) {
            *xi = T::from_f64(s);
        }
        for act in acts {
            let y = mma::activation(&x, act).unwrap();
            assert_eq!(y.len(), n);
            for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                let want = act.apply_f64(xi.to_f64());
                let got = yi.to_f64();
                // One rounding to T, plus f32 evaluation (tanh near −1 costs ~1e-7 absolute).
                let tol = eps * want.abs() + 2e-6;
                assert!(
                    (got - want).abs() <= tol,
                    "{} {act:?}: f({:e}) = {got:e}, expected {want:e}, n {n} index {i}, seed {seed}",
                    T::DTYPE,
                    xi.to_f64()
                );
            }
        }
    }
}

#[test]
fn activations_match_the_reference() {
    let mut rng = Rng::from_env();
    activation_cases::<f32>(&mut rng, 1e-6);
    activation_cases::<f16>(&mut rng, 2f64.powi(-10));
    activation_cases::<bf16>(&mut rng, 2f64.powi(-7));
    assert!(mma::activation::<f16>(&[], Activation::Relu)
        .unwrap()
        .is_empty());
}

#[test]
fn reductions_match_f64() {
    let mut rng = Rng::from_env();
    let seed = rng.seed();
    for block in [
        [32, 1, 1],
        [16, 4, 2],
        [8, 4, 3],
        [96, 1, 1],
        [1, 32, 2],
        [1024, 1, 1],
    ] {
        let threads = block.iter().product::<u32>() as usize;
        let blocks = 3;
        let x: Vec<f32> = (0..threads * blocks).map(|_| rng.normal() as f32).collect();
        let r = mma::reductions(&x, block).unwrap();
        let check_sum = |got: f32, xs: &[f32], what: &str| {
            let want: f64 = xs.iter().map(|&v| v as f64).sum();
            let mag: f64 = xs.iter().map(|&v| (v as f64).abs()).sum();
            let tol = xs.len() as f64 * U32 * mag;
            assert!(
                (got as f64 - want).abs() <= tol,
                "{what} {block:?}: {got} vs {want}, seed {seed}"
            );
        };
        let max_of = |xs: &[f32]| xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (w, xs) in x.chunks(32).enumerate() {
            check_sum(r.warp_sum[w], xs, "warp_sum");
            assert_eq!(
                r.warp_max[w],
                max_of(xs),
                "warp_max {block:?} warp {w}, seed {seed}"
            );
        }
        for (b, xs) in x.chunks(threads).enumerate() {
            check_sum(r.block_sum[b], xs, "block_sum");
            assert_eq!(
                r.block_max[b],
                max_of(xs),
                "block_max {block:?} block {b}, seed {seed}"
            );
            assert_eq!(
                r.block_sum_twice[b],
                2.0 * r.block_sum[b],
                "back-to-back block_sum {block:?}, seed {seed}"
            );
        }
    }
}

#[test]
fn reductions_reject_bad_arguments() {
    let x = vec![1.0f32; 96];
    for block in [[48, 1, 1], [0, 1, 1], [2048, 1, 1]] {
        assert!(matches!(
            mma::reductions(&x, block),
            Err(Error::InvalidArgument { arg: "block", .. })
        ));
    }
    assert!(matches!(
        mma::reductions(&x, [64, 1, 1]),
        Err(Error::InvalidArgument { arg: "x", .. })
    ));
    assert!(matches!(
        mma::reductions(&[], [32, 1, 1]),
        Err(Error::InvalidArgument { arg: "x", .. })
    ));
}

#[test]
fn params_sizes_match_the_cxx_structs() {
    unsafe extern "C" {
        fn pk_sizeof_MmaGemmParams() -> usize;
        fn pk_sizeof_MmaProbeParams() -> usize;
        fn pk_sizeof_LdmatrixProbeParams() -> usize;
        fn pk_sizeof_HalfConvertParams() -> usize;
        fn pk_sizeof_HalfArithParams() -> usize;
        fn pk_sizeof_ActivationCheckParams() -> usize;
        fn pk_sizeof_ReductionCheckParams() -> usize;
    }
    use std::mem::size_of;
    // SAFETY: the functions return a constant.
    unsafe {
        assert_eq!(pk_sizeof_MmaGemmParams(), size_of::<mma::MmaGemmParams>());
        assert_eq!(pk_sizeof_MmaProbeParams(), size_of::<mma::MmaProbeParams>());
        assert_eq!(
            pk_sizeof_LdmatrixProbeParams(),
            size_of::<mma::LdmatrixProbeParams>()
        );
        assert_eq!(
            pk_sizeof_HalfConvertParams(),
            size_of::<mma::HalfConvertParams>()
        );
        assert_eq!(
            pk_sizeof_HalfArithParams(),
            size_of::<mma::HalfArithParams>()
        );
        assert_eq!(
            pk_sizeof_ActivationCheckParams(),
            size_of::<mma::ActivationCheckParams>()
        );
        assert_eq!(
            pk_sizeof_ReductionCheckParams(),
            size_of::<mma::ReductionCheckParams>()
        );
    }
}
