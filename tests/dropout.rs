//! LoRA dropout's generator: Philox4x32-10 against the published known answers, the
//! emulated kernel generator (`kernels/philox.cuh`) bit for bit against the Rust one
//! (`peft_kernels::dropout`), the drop rate, the edge probabilities, and that the mask is a
//! function of (seed, row, col) alone. The GPU twin at the end is ignored without a device.

mod common;

use common::Rng;
use peft_kernels::dropout::{self, keep, philox4x32_10, scale};

/// Random123's known answers for Philox4x32-10, copied from the Random123 distribution's
/// `tests/kat_vectors` (github.com/DEShawResearch/random123), its three `philox4x32 10`
/// lines: counter[4], key[2], then the expected output[4], all hex.
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0, 0, 0, 0],
        [0, 0],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [0xffffffff; 4],
        [0xffffffff; 2],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

/// The factor the emulated kernel writes for an element: `scale(p)` if kept, else 0.
fn factor(seed: u64, row: u32, col: u32, p: f32) -> f32 {
    if keep(seed, row, col, p) {
        scale(p)
    } else {
        0.0
    }
}

#[test]
fn philox_matches_the_published_known_answers() {
    for (ctr, key, expected) in KAT {
        assert_eq!(philox4x32_10(ctr, key), expected, "Rust, counter {ctr:x?}");
    }
    let ctrs: Vec<[u32; 4]> = KAT.iter().map(|k| k.0).collect();
    let keys: Vec<[u32; 2]> = KAT.iter().map(|k| k.1).collect();
    let out = peft_kernels::selftest::philox4x32_10(&ctrs, &keys).unwrap();
    for (got, (ctr, _, expected)) in out.iter().zip(KAT) {
        assert_eq!(*got, expected, "emulated kernel, counter {ctr:x?}");
    }
}

#[test]
fn the_uniform_is_the_first_word_of_philox_of_col_row_under_the_seed() {
    // The layout of the shared decision, spelled out: with seed = row = col = 0 the
    // counter and key are the first known answer's, so u01 = 0x6627e8d5 >> 8 over 2^24.
    assert_eq!(dropout::uniform(0, 0, 0), 0x6627e8 as f32 / 16777216.0);
    let mut rng = Rng::from_env();
    for _ in 0..1000 {
        let (seed, row, col) = (rng.next_u64(), rng.next_u64() as u32, rng.next_u64() as u32);
        let word = philox4x32_10([col, row, 0, 0], [seed as u32, (seed >> 32) as u32])[0];
        let u = dropout::uniform(seed, row, col);
        assert_eq!(u, (word >> 8) as f32 / 16777216.0);
        assert!((0.0..1.0).contains(&u));
        let p = rng.unit() as f32;
        assert_eq!(keep(seed, row, col, p), u >= p);
    }
}

#[test]
fn the_emulated_mask_is_bit_identical_to_the_rust_one() {
    let mut rng = Rng::from_env();
    let edge_seeds = [0, 1, u64::MAX, 1 << 32, 0xFFFF_FFFF];
    let edge_ps = [0.0, 1.0, 1e-7, 0.5, 1.0 - 1e-7, 0.1, 0.9];
    for case in 0..24 {
        let seed = if case < edge_seeds.len() {
            edge_seeds[case]
        } else {
            rng.next_u64()
        };
        let p = if case < edge_ps.len() {
            edge_ps[case]
        } else {
            rng.unit() as f32
        };
        let (m, k) = (rng.range(1, 70), rng.range(1, 300));
        // Windows anywhere in the u32 counter space, up to its last row and column.
        let row0 = match case % 3 {
            0 => 0,
            1 => u32::MAX - (m as u32 - 1),
            _ => rng.next_u64() as u32 % (u32::MAX - m as u32),
        };
        let col0 = match case % 4 {
            0 => 0,
            1 => u32::MAX - (k as u32 - 1),
            _ => rng.next_u64() as u32 % (u32::MAX - k as u32),
        };
        let got = peft_kernels::selftest::dropout_mask(seed, p, row0, col0, m, k, [3, 2], [32, 4])
            .unwrap();
        for i in 0..m {
            for j in 0..k {
                let want = factor(seed, row0 + i as u32, col0 + j as u32, p);
                assert_eq!(
                    got[i * k + j].to_bits(),
                    want.to_bits(),
                    "seed {seed}, p {p}, row {}, col {} (PEFT_SEED={})",
                    row0 as usize + i,
                    col0 as usize + j,
                    rng.seed()
                );
            }
        }
    }
}

#[test]
fn the_mask_depends_only_on_seed_row_and_col() {
    let mut rng = Rng::from_env();
    let (seed, p) = (rng.next_u64(), 0.3);
    let (m, k) = (37, 101);
    // Launch shapes that give each element to a different thread, block and loop
    // iteration, in different orders.
    let shapes = [
        ([1, 1], [1, 1]),
        ([1, 1], [32, 32]),
        ([4, 10], [32, 4]),
        ([101, 37], [1, 1]),
        ([2, 3], [7, 5]),
        ([1, 37], [128, 1]),
    ];
    let full = peft_kernels::selftest::dropout_mask(seed, p, 0, 0, m, k, [1, 1], [16, 16]).unwrap();
    for (grid, block) in shapes {
        let got = peft_kernels::selftest::dropout_mask(seed, p, 0, 0, m, k, grid, block).unwrap();
        assert_eq!(got, full, "grid {grid:?}, block {block:?}");
    }
    // A window of the matrix has the same mask as that part of the whole.
    let (r0, c0, wm, wk) = (11, 29, 13, 50);
    let window =
        peft_kernels::selftest::dropout_mask(seed, p, r0, c0, wm, wk, [2, 2], [8, 8]).unwrap();
    for i in 0..wm {
        for j in 0..wk {
            assert_eq!(
                window[i * wk + j],
                full[(r0 as usize + i) * k + c0 as usize + j]
            );
        }
    }
    // The Rust side in a random evaluation order, twice: the same mask.
    let mut order: Vec<(u32, u32)> = (0..m as u32)
        .flat_map(|i| (0..k as u32).map(move |j| (i, j)))
        .collect();
    for _ in 0..2 {
        for n in (1..order.len()).rev() {
            order.swap(n, rng.range(0, n + 1));
        }
        for &(i, j) in &order {
            assert_eq!(factor(seed, i, j, p), full[i as usize * k + j as usize]);
        }
    }
}

/// How many of `n` elements agree between two masks, against the expected count for
/// independent ones, within 5 standard deviations: catches a generator that ignores part
/// of the seed or confuses row and column.
fn assert_independent(n: usize, agree: usize, p: f64, what: &str) {
    let q = p * p + (1.0 - p) * (1.0 - p);
    let (mean, sd) = (n as f64 * q, (n as f64 * q * (1.0 - q)).sqrt());
    assert!(
        (agree as f64 - mean).abs() <= 5.0 * sd,
        "{what}: {agree} of {n} agree, expected {mean:.0} ± {sd:.0} for independent masks"
    );
}

#[test]
fn the_drop_rate_is_binomial_and_masks_of_different_inputs_are_independent() {
    let mut rng = Rng::from_env();
    let (rows, cols) = (300u32, 700u32);
    let n = (rows * cols) as f64;
    for p in [0.05f32, 0.1, 0.5, 0.9] {
        let seed = rng.next_u64();
        let mut dropped = 0usize;
        let (mut agree_seed_high, mut agree_seed_low, mut agree_transposed) = (0, 0, 0);
        for r in 0..rows {
            for c in 0..cols {
                let k = keep(seed, r, c, p);
                dropped += usize::from(!k);
                agree_seed_high += usize::from(k == keep(seed ^ (1 << 40), r, c, p));
                agree_seed_low += usize::from(k == keep(seed ^ 1, r, c, p));
                agree_transposed += usize::from(k == keep(seed, c, r, p));
            }
        }
        let (mean, sd) = (
            n * f64::from(p),
            (n * f64::from(p) * f64::from(1.0 - p)).sqrt(),
        );
        assert!(
            (dropped as f64 - mean).abs() <= 5.0 * sd,
            "p = {p}: dropped {dropped} of {n}, expected {mean:.0} ± {sd:.0} (seed {seed})"
        );
        let n = n as usize;
        assert_independent(n, agree_seed_high, p.into(), "seed vs seed ^ 2^40");
        assert_independent(n, agree_seed_low, p.into(), "seed vs seed ^ 1");
        assert_independent(n, agree_transposed, p.into(), "(row, col) vs (col, row)");
    }
}

#[test]
fn p_zero_keeps_everything_and_p_one_drops_everything_with_scale_zero() {
    let mut rng = Rng::from_env();
    assert_eq!(scale(0.0), 1.0);
    assert_eq!(scale(1.0), 0.0);
    assert_eq!(scale(0.5), 2.0);
    for _ in 0..10_000 {
        let (seed, row, col) = (rng.next_u64(), rng.next_u64() as u32, rng.next_u64() as u32);
        assert!(keep(seed, row, col, 0.0));
        assert!(!keep(seed, row, col, 1.0));
    }
    // On the emulated kernel too: factors of exactly 1 and exactly 0.
    let seed = rng.next_u64();
    let all = peft_kernels::selftest::dropout_mask(seed, 0.0, 0, 0, 40, 90, [2, 2], [32, 8]);
    assert!(all.unwrap().iter().all(|&f| f == 1.0));
    let none = peft_kernels::selftest::dropout_mask(seed, 1.0, 0, 0, 40, 90, [2, 2], [32, 8]);
    assert!(none.unwrap().iter().all(|&f| f.to_bits() == 0));
    // The reference helper: p = 1 zeroes even large values, never inf or NaN.
    let mut u = vec![1e300f64; 6];
    dropout::apply(seed, 1.0, 3, &mut u).unwrap();
    assert!(u.iter().all(|&v| v.to_bits() == 0));
}

#[test]
fn apply_scales_kept_elements_and_zeroes_dropped_ones() {
    let mut rng = Rng::from_env();
    let seed = rng.next_u64();
    let (m, k, p) = (17, 29, 0.25f32);
    let u: Vec<f64> = (0..m * k).map(|_| rng.normal()).collect();
    let mut d64 = u.clone();
    dropout::apply(seed, p, k, &mut d64).unwrap();
    let mut d32: Vec<f32> = u.iter().map(|&v| v as f32).collect();
    dropout::apply(seed, p, k, &mut d32).unwrap();
    for i in 0..m {
        for j in 0..k {
            let e = i * k + j;
            let kept = keep(seed, i as u32, j as u32, p);
            let s = f64::from(scale(p));
            assert_eq!(d64[e], if kept { u[e] * s } else { 0.0 });
            assert_eq!(d32[e], if kept { u[e] as f32 * scale(p) } else { 0.0 });
        }
    }
}

#[test]
fn bad_dropout_arguments_are_errors_naming_them() {
    let msg = |e: peft_kernels::Error| e.to_string();
    let mut u = vec![0.0f64; 12];
    for p in [-0.1f32, 1.5, f32::NAN, f32::INFINITY] {
        let e = msg(dropout::apply(1, p, 4, &mut u).unwrap_err());
        assert!(e.contains("`p`") && e.contains("[0, 1]"), "{e}");
        assert!(dropout::check_p("dropout", p).is_err());
    }
    assert!(dropout::check_p("dropout", 0.0).is_ok() && dropout::check_p("dropout", 1.0).is_ok());
    let e = msg(dropout::apply(1, 0.5, 5, &mut u).unwrap_err());
    assert!(e.contains("`u`") && e.contains("cols = 5"), "{e}");
    let e = msg(dropout::apply(1, 0.5, 0, &mut u).unwrap_err());
    assert!(e.contains("`u`"), "{e}");
    // Empty is fine whatever cols is.
    dropout::apply::<f32>(1, 0.5, 0, &mut []).unwrap();
}

#[test]
fn params_sizes_match_the_cxx_structs() {
    unsafe extern "C" {
        fn pk_sizeof_PhiloxParams() -> usize;
        fn pk_sizeof_DropoutMaskParams() -> usize;
    }
    use peft_kernels::selftest::{DropoutMaskParams, PhiloxParams};
    use std::mem::size_of;
    // SAFETY: the functions return a constant.
    unsafe {
        assert_eq!(pk_sizeof_PhiloxParams(), size_of::<PhiloxParams>());
        assert_eq!(
            pk_sizeof_DropoutMaskParams(),
            size_of::<DropoutMaskParams>()
        );
    }
}

/// The same mask from the nvcc-built generator on a GPU: bit-identical with Rust (IEEE
/// division for the scale, no fast math).
#[cfg(feature = "cuda")]
mod on_gpu {
    use super::*;
    use peft_kernels::cuda::{self, Buffers};
    use peft_kernels::kernels::KernelId;
    use peft_kernels::plan::Launch;
    use peft_kernels::selftest::{DropoutMaskParams, PhiloxParams};

    fn launch(kernel: KernelId, grid: [u32; 2], block: [u32; 2]) -> Launch {
        Launch {
            kernel,
            grid: [grid[0], grid[1], 1],
            block: [block[0], block[1], 1],
            dynamic_smem: 0,
            overlap_previous: false,
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_philox_and_mask_are_bit_identical_to_rust() {
        let stream = cuda::context(0).expect("a CUDA device").default_stream();
        let ctrs: Vec<u32> = KAT.iter().flat_map(|k| k.0).collect();
        let keys: Vec<u32> = KAT.iter().flat_map(|k| k.1).collect();
        let d_ctr = stream.clone_htod(&ctrs).unwrap();
        let d_key = stream.clone_htod(&keys).unwrap();
        let mut d_out = stream.alloc_zeros::<u32>(ctrs.len()).unwrap();
        let mut b = Buffers::new(&stream);
        let params = PhiloxParams {
            ctr: b.read(&d_ctr),
            key: b.read(&d_key),
            out: b.write(&mut d_out),
            n: KAT.len() as u32,
        };
        // SAFETY: the buffers hold 4, 2 and 4 words per counter.
        unsafe {
            b.launch(
                &launch(KernelId::selftest_philox4x32_10, [1, 1], [32, 1]),
                &params,
            )
        }
        .unwrap();
        let out = stream.clone_dtoh(&d_out).unwrap();
        let want: Vec<u32> = KAT.iter().flat_map(|k| k.2).collect();
        assert_eq!(out, want);

        let mut rng = Rng::from_env();
        for p in [0.0f32, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0, rng.unit() as f32] {
            let (seed, m, k) = (rng.next_u64(), 257usize, 1000usize);
            let row0 = rng.next_u64() as u32 % (u32::MAX - m as u32);
            let mut d_mask = stream.alloc_zeros::<f32>(m * k).unwrap();
            let mut b = Buffers::new(&stream);
            let params = DropoutMaskParams {
                out: b.write(&mut d_mask),
                seed,
                row0,
                col0: 0,
                m: m as u32,
                k: k as u32,
                p,
            };
            let l = launch(KernelId::selftest_dropout_mask, [8, 16], [32, 8]);
            // SAFETY: the buffer holds m × k floats.
            unsafe { b.launch(&l, &params) }.unwrap();
            let got = stream.clone_dtoh(&d_mask).unwrap();
            for i in 0..m {
                for j in 0..k {
                    let want = factor(seed, row0 + i as u32, j as u32, p);
                    assert_eq!(got[i * k + j].to_bits(), want.to_bits(), "p {p} ({i}, {j})");
                }
            }
        }
    }
}
