//! The emulator backend against its self-check kernels (kernels/selftest.cu): correct
//! kernels agree with plain Rust loops on ragged shapes, broken kernels are reported as
//! `Error::Emulator`, launches over the device limits are refused, and worker pools give
//! the same results as one thread.
//!
//! Inputs are random, seeded from the clock; a failure prints the seed, and `PEFT_SEED=n`
//! reproduces it.
#![cfg(feature = "emulator")]

use peft_kernels::emulator::{self, Checks};
use peft_kernels::kernels::KernelId;
use peft_kernels::plan::Launch;
use peft_kernels::selftest::{self, Broken, BrokenCheck};
use peft_kernels::Error;

/// splitmix64: small, and enough for test inputs.
struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("PEFT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        Rng { seed, state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in [lo, hi].
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi as i64 - lo as i64 + 1) as u64) as i32
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    fn ints(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        (0..n).map(|_| self.int(lo, hi)).collect()
    }
}

/// ‖out − ref‖ / ‖ref‖ (‖out‖ when ref is zero); NaN anywhere gives NaN, which fails
/// every `<` comparison.
fn rel_err(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(&o, &r)| (o as f64 - r).powi(2))
        .sum();
    let norm: f64 = reference.iter().map(|r| r * r).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

fn gemm_f64(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p] as f64;
            for j in 0..n {
                c[i * n + j] += av * b[p * n + j] as f64;
            }
        }
    }
    c
}

/// Checks an f32 GEMM element by element against the forward error bound of a k-term f32
/// dot product, |c − ref| ≤ 2(k + 2)·u·Σ|a||b| (u = 2⁻²⁴): a relative norm alone fails
/// honest results when a 1×1 output is a sum that cancels.
fn assert_gemm_within_f32_bound(
    c: &[f32],
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    ctx: &str,
) {
    let abs_a: Vec<f32> = a.iter().map(|v| v.abs()).collect();
    let abs_b: Vec<f32> = b.iter().map(|v| v.abs()).collect();
    let (reference, magnitude) = (gemm_f64(a, b, m, n, k), gemm_f64(&abs_a, &abs_b, m, n, k));
    let u = f64::from(f32::EPSILON) / 2.0;
    for (i, ((&got, &want), &mag)) in c.iter().zip(&reference).zip(&magnitude).enumerate() {
        let bound = 2.0 * (k as f64 + 2.0) * u * mag;
        assert!(
            (got as f64 - want).abs() <= bound,
            "{ctx}: element {i}: {got} vs {want} (bound {bound:e})"
        );
    }
}

fn expect_emulator_error(r: Result<(), Error>, kernel: &str, needle: &str) -> String {
    match r {
        Err(Error::Emulator { kernel: k, message }) => {
            assert_eq!(k, kernel, "error from the wrong kernel: {message}");
            assert!(
                message.contains(needle),
                "`{kernel}`: expected a message containing {needle:?}, got {message:?}"
            );
            message
        }
        other => {
            panic!("`{kernel}`: expected Error::Emulator containing {needle:?}, got {other:?}")
        }
    }
}

const SIZES: [usize; 6] = [1, 7, 16, 33, 65, 127];

#[test]
fn sgemm_tiled_matches_f64_on_ragged_shapes() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    for &m in &SIZES {
        for &n in &SIZES {
            for &k in &[1, 16, 33, 127] {
                let a = rng.f32s(m * k);
                let b = rng.f32s(k * n);
                let mut c = vec![f32::NAN; m * n];
                selftest::sgemm_tiled(&a, &b, &mut c, m, n, k).unwrap();
                let ctx = format!("m={m} n={n} k={k} (seed {seed})");
                assert_gemm_within_f32_bound(&c, &a, &b, (m, n, k), &ctx);
            }
        }
    }
}

#[test]
fn sgemm_tiled_k_zero_writes_zeros_and_validates_shapes() {
    let mut c = vec![f32::NAN; 3 * 5];
    selftest::sgemm_tiled(&[], &[], &mut c, 3, 5, 0).unwrap();
    assert!(c.iter().all(|&v| v == 0.0));

    let a = vec![0.0; 6];
    let b = vec![0.0; 6];
    let mut c = vec![0.0; 4];
    let err = selftest::sgemm_tiled(&a, &b, &mut c, 2, 2, 4).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "a", .. }),
        "{err}"
    );
    let err = selftest::sgemm_tiled(&a, &b, &mut c, 2, 3, 3).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "b", .. }),
        "{err}"
    );
    let err = selftest::sgemm_tiled(&a, &b, &mut c[..3], 2, 2, 3).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "c", .. }),
        "{err}"
    );
}

#[test]
fn missing_barrier_is_caught_or_wrong() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    for &(m, n, k) in &[(64, 64, 64), (65, 33, 127), (128, 128, 256)] {
        let a = rng.f32s(m * k);
        let b = rng.f32s(k * n);
        let reference = gemm_f64(&a, &b, m, n, k);
        let mut good = vec![f32::NAN; m * n];
        selftest::sgemm_tiled(&a, &b, &mut good, m, n, k).unwrap();
        assert!(rel_err(&good, &reference) < 1e-5, "seed {seed}");
        let mut bad = vec![f32::NAN; m * n];
        match selftest::sgemm_missing_barrier(&a, &b, &mut bad, m, n, k) {
            Err(Error::Emulator { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => {
                let err = rel_err(&bad, &reference);
                assert!(
                    err > 1e-3,
                    "m={m} n={n} k={k}: the racy kernel matched (rel err {err}, seed {seed})"
                );
            }
        }
    }
}

#[test]
fn racecheck_catches_the_missing_barrier_whatever_the_fiber_order() {
    if !emulator::checks_available() {
        eprintln!("skipped: this build has no checked copy (PEFT_KERNELS_EMU_SANITIZE)");
        return;
    }
    let mut rng = Rng::new();
    let (m, n, k) = (64, 64, 64);
    let a = rng.f32s(m * k);
    let b = rng.f32s(k * n);
    let mut c = vec![f32::NAN; m * n];
    let r = emulator::with_checks(Checks::RACECHECK, || {
        selftest::sgemm_missing_barrier(&a, &b, &mut c, m, n, k)
    });
    let message = expect_emulator_error(
        r,
        "selftest_sgemm_missing_barrier_f32",
        "racecheck in kernel `selftest_sgemm_missing_barrier_f32`: ",
    );
    // A thread of the next K slice overwrote the tile a thread of this slice reads (the
    // order the fibers ran in decides which of the two it is seen as).
    assert!(
        message.contains("-after-write hazard on static shared memory")
            || message.contains("write-after-read hazard on static shared memory"),
        "{message}"
    );
    assert!(message.starts_with("block (0,0,0), thread ("), "{message}");
    // The correct kernel passes every check.
    emulator::with_checks(Checks::ALL, || {
        selftest::sgemm_tiled(&a, &b, &mut c, m, n, k)
    })
    .unwrap();
}

#[test]
fn checks_catch_the_broken_kernels() {
    if !emulator::checks_available() {
        eprintln!("skipped: this build has no checked copy (PEFT_KERNELS_EMU_SANITIZE)");
        return;
    }
    // (kernel, message, where): each names the check, the kernel, the block, the thread
    // and the memory.
    let expected = [
        (
            BrokenCheck::ReadPastTile,
            "memcheck in kernel `selftest_broken_read_past_tile`: 4-byte read at ",
            "block (1,0,0), thread (63,0,0): ",
            "is outside every buffer of the launch: it ends 4 byte(s) past the end of `x` \
             (512 bytes at ",
        ),
        (
            BrokenCheck::MissingBarrierRead,
            "racecheck in kernel `selftest_broken_missing_barrier_read`: write-after-read \
             hazard on static shared memory",
            "block (0,0,0), thread (",
            "read it and this thread writes it with no __syncthreads()",
        ),
        (
            BrokenCheck::UninitSharedRead,
            "initcheck in kernel `selftest_broken_uninit_shared_read`: 4-byte read of static \
             shared memory",
            "block (0,0,0), thread (63,0,0): ",
            "which no thread of the block has written since the block started",
        ),
        (
            BrokenCheck::BlocksWriteOneOutput,
            "racecheck in kernel `selftest_broken_blocks_write_one_output`: global \
             write-after-write hazard on `out` at byte offset 0: block (0,0,0) of the same \
             launch writes it",
            "block (1,0,0), thread (0,0,0): ",
            "",
        ),
        (
            BrokenCheck::BlockReadsAnothersOutput,
            "racecheck in kernel `selftest_broken_block_reads_anothers_output`: global \
             write-after-read hazard on `out` at byte offset 256: block (0,0,0) of the same \
             launch read it",
            "block (1,0,0), thread (0,0,0): ",
            "",
        ),
    ];
    assert_eq!(expected.len(), BrokenCheck::ALL.len());
    for (kind, message, place, detail) in expected {
        let (_, check) = BrokenCheck::ALL
            .into_iter()
            .find(|&(k, _)| k == kind)
            .unwrap();
        // Without its check the emulator runs the broken kernel to completion.
        selftest::run_broken_check(kind, Checks::NONE).unwrap();
        let got = expect_emulator_error(
            selftest::run_broken_check(kind, check),
            kind.kernel().name(),
            message,
        );
        assert!(got.starts_with(place), "{got}");
        assert!(got.contains(detail), "{got}");
        // With every check on, some check catches it (initcheck may see the missing
        // barrier's read of an element not yet written first).
        expect_emulator_error(
            selftest::run_broken_check(kind, Checks::ALL),
            kind.kernel().name(),
            "check in kernel `",
        );
    }
}

#[test]
fn checks_parse_from_the_environment_spelling() {
    assert_eq!(Checks::parse("").unwrap(), Checks::NONE);
    assert_eq!(
        Checks::parse("memcheck, initcheck").unwrap(),
        Checks::MEMCHECK | Checks::INITCHECK
    );
    assert_eq!(Checks::parse("all").unwrap(), Checks::ALL);
    let e = Checks::parse("memcheck,racechek").unwrap_err().to_string();
    assert!(e.contains("PEFT_KERNELS_EMU_CHECK"), "{e}");
}

#[test]
fn block_reduce_matches_f64() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    for &block in &[32u32, 64, 96, 256, 1024] {
        for &len in &[1usize, 31, 33, 1000, 4097] {
            let mut x = rng.f32s(len);
            x.iter_mut().for_each(|v| *v *= 100.0);
            let r = selftest::block_reduce(&x, block).unwrap();
            let chunks: Vec<&[f32]> = x.chunks(block as usize).collect();
            assert_eq!(r.sum.len(), chunks.len());
            for (bi, chunk) in chunks.iter().enumerate() {
                let sum: f64 = chunk.iter().map(|&v| v as f64).sum();
                let abs: f64 = chunk.iter().map(|&v| v.abs() as f64).sum();
                let max = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sq: f64 = chunk.iter().map(|&v| v as f64 * v as f64).sum();
                let ctx = format!("block {block}, len {len}, block index {bi}, seed {seed}");
                assert!(
                    (r.sum[bi] as f64 - sum).abs() <= 1e-5 * abs,
                    "sum {} vs {sum}: {ctx}",
                    r.sum[bi]
                );
                assert_eq!(r.max[bi], max, "max: {ctx}");
                assert!((r.sum_sq[bi] - sq).abs() <= 1e-12 * sq, "sum_sq: {ctx}");
            }
        }
    }
    let err = selftest::block_reduce(&[1.0], 48).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { arg: "block", .. }));
}

/// The warp-operation kernel's results computed directly from the shuffle definitions.
fn warp_ops_model(x: &[i32], width: usize) -> selftest::WarpOps {
    let n = x.len();
    let warps = n.div_ceil(32);
    let val = |i: usize| if i < n { x[i] } else { 0 };
    let mut m = selftest::WarpOps {
        scan: vec![0; n],
        bcast: vec![0; n],
        down: vec![0; n],
        swap: vec![0; n],
        half_mirror: vec![0; n],
        ballot: vec![0; warps],
        any_all: vec![0; warps],
    };
    for i in 0..n {
        let (base, lane) = (i - i % 32, i % 32);
        let seg = lane & !(width - 1);
        m.scan[i] = (seg..=lane).map(|l| val(base + l)).sum();
        m.bcast[i] = val(base + seg + (3 & (width - 1)));
        let down = lane + width - 1;
        m.down[i] = if down < seg + width {
            val(base + down)
        } else {
            val(i)
        };
        m.swap[i] = val(base + (lane ^ 1));
        m.half_mirror[i] = val(base + if lane < 16 { 15 - lane } else { 47 - lane });
    }
    for w in 0..warps {
        let lanes: Vec<i32> = (0..32).map(|l| val(w * 32 + l)).collect();
        m.ballot[w] = (0..32).filter(|&l| lanes[l] > 0).map(|l| 1u32 << l).sum();
        let any = lanes.iter().any(|&v| v < 0) as i32;
        let all = lanes.iter().all(|&v| v != 0) as i32;
        m.any_all[w] = any | all << 1;
    }
    m
}

#[test]
fn warp_ops_match_shuffle_semantics() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    for &width in &[1u32, 2, 4, 8, 16, 32] {
        for &(block, len) in &[(32u32, 1usize), (32, 32), (64, 77), (96, 300), (1024, 2049)] {
            // Mostly non-zero, so that all() is sometimes true.
            let x = rng.ints(len, -3, 50);
            let got = selftest::warp_ops(&x, block, width).unwrap();
            let want = warp_ops_model(&x, width as usize);
            assert_eq!(
                got, want,
                "width {width}, block {block}, len {len}, seed {seed}"
            );
        }
    }
    let err = selftest::warp_ops(&[1], 32, 3).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { arg: "width", .. }));
}

#[test]
fn thread_and_block_indices() {
    for &(grid, block) in &[
        ([1, 1, 1], [1, 1, 1]),
        ([3, 2, 2], [5, 3, 2]),
        ([2, 1, 1], [1024, 1, 1]),
        ([1, 3, 1], [7, 1, 9]),
        ([70, 1, 1], [32, 32, 1]),
    ] {
        let coords = selftest::thread_index(grid, block, 0).unwrap();
        let per_block = (block[0] * block[1] * block[2]) as usize;
        for (g, c) in coords.iter().enumerate() {
            let (b, t) = ((g / per_block) as u32, (g % per_block) as u32);
            let want = [
                t % block[0],
                t / block[0] % block[1],
                t / (block[0] * block[1]),
                b % grid[0],
                b / grid[0] % grid[1],
                b / (grid[0] * grid[1]),
            ];
            assert_eq!(*c, want, "grid {grid:?}, block {block:?}, thread {g}");
        }
    }
}

#[test]
fn dynamic_shared_memory_is_per_block_and_poisoned() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    for &(block, len) in &[(1u32, 5usize), (32, 100), (97, 1000), (1024, 3000)] {
        let x = rng.f32s(len);
        // The full 227 KiB is allowed.
        for smem in [4 * (block + 1), 232_448] {
            let r = selftest::reverse_dynamic_smem(&x, block, smem).unwrap();
            let b = block as usize;
            for (i, &y) in r.y.iter().enumerate() {
                let (base, t) = (i - i % b, i % b);
                let src = base + b - 1 - t;
                let want = if src < len { x[src] } else { 0.0 };
                assert_eq!(y, want, "block {block}, len {len}, i {i}, seed {seed}");
            }
            assert!(r.probe.iter().all(|&p| p == 0xFFFF_FFFF), "{:x?}", r.probe);
        }
    }
}

#[test]
fn atomics_accumulate_exactly() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    for &(len, nbins) in &[(1usize, 1u32), (100, 7), (5000, 64), (20_000, 3)] {
        let x = rng.ints(len, -1000, 1000);
        let r = selftest::atomics(&x, nbins).unwrap();
        let ctx = format!("len {len}, nbins {nbins}, seed {seed}");
        let mut hist = vec![0u32; nbins as usize];
        for &v in &x {
            hist[v.rem_euclid(nbins as i32) as usize] += 1;
        }
        assert_eq!(r.hist, hist, "{ctx}");
        let sum: i64 = x.iter().map(|&v| v as i64).sum();
        assert_eq!(r.isum as i64, sum, "{ctx}");
        // Integers below 2^24 in magnitude: exact in f32 whatever the order.
        assert_eq!(r.fsum as i64, sum, "{ctx}");
        assert_eq!(r.dsum, sum as f64 / 2.0, "{ctx}");
        assert_eq!(r.count, len as u64, "{ctx}");
        assert_eq!(r.imax, *x.iter().max().unwrap(), "{ctx}");
        assert_eq!(r.imin, *x.iter().min().unwrap(), "{ctx}");
        assert_eq!(r.umax, x.iter().map(|&v| v as u32).max().unwrap(), "{ctx}");
        assert_eq!(r.umin, x.iter().map(|&v| v as u32).min().unwrap(), "{ctx}");
        assert!((0..len as i32).contains(&r.last), "{ctx}");
        assert_eq!(r.cas_max, *x.iter().max().unwrap() as f32, "{ctx}");
    }
}

#[test]
fn broken_kernels_are_reported() {
    let needles = [
        (Broken::DivergentBarrier, "__syncthreads()"),
        (Broken::ShflWrongMask, "is not in mask 0x0000ffff"),
        (Broken::ShflDivergent, "mask 0xffffffff"),
        (Broken::ShflPartialWarp, "do not exist"),
        (Broken::ShflExitedLane, "exited"),
        (Broken::ShflSourceOutsideMask, "which is not in mask"),
        (Broken::MismatchedWarpOps, "each waits for the other"),
        (Broken::MismatchedVotes, "__all_sync"),
        (Broken::WarpDeadlock, "deadlock"),
        (Broken::WgmmaNotWaited, "not waited for"),
    ];
    assert_eq!(needles.len(), Broken::ALL.len());
    for (kind, needle) in needles {
        let message =
            expect_emulator_error(selftest::run_broken(kind), kind.kernel().name(), needle);
        // Every report names where it happened.
        assert!(message.starts_with("block (0,0,0)"), "{message}");
    }
}

#[test]
fn launches_over_device_limits_are_refused() {
    let kernel = "selftest_thread_index";
    let index = |grid, block| selftest::thread_index(grid, block, 0).map(drop);
    expect_emulator_error(index([1, 1, 1], [1025, 1, 1]), kernel, "1024");
    expect_emulator_error(index([1, 1, 1], [64, 32, 1]), kernel, "2048 threads");
    expect_emulator_error(
        index([1, 1, 1], [1, 1, 65]),
        kernel,
        "exceeds the device limits",
    );
    expect_emulator_error(
        index([1, 70_000, 1], [1, 1, 1]),
        kernel,
        "exceeds the device limits",
    );
    expect_emulator_error(
        index([1, 1, 65_536], [1, 1, 1]),
        kernel,
        "exceeds the device limits",
    );
    expect_emulator_error(index([0, 1, 1], [32, 1, 1]), kernel, "zero");
    expect_emulator_error(index([1, 1, 1], [32, 0, 1]), kernel, "zero");
    expect_emulator_error(
        selftest::reverse_dynamic_smem(&[1.0; 64], 32, 300 * 1024).map(drop),
        "selftest_reverse_dynamic_smem_f32",
        "dynamic shared memory",
    );
    expect_emulator_error(
        selftest::reverse_dynamic_smem(&[1.0; 64], 32, 232_449).map(drop),
        "selftest_reverse_dynamic_smem_f32",
        "232448",
    );
}

#[test]
fn a_launch_after_a_failure_runs_normally() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    let (m, n, k) = (33, 65, 70);
    for kind in Broken::ALL {
        assert!(selftest::run_broken(kind).is_err());
        let a = rng.f32s(m * k);
        let b = rng.f32s(k * n);
        let mut c = vec![f32::NAN; m * n];
        selftest::sgemm_tiled(&a, &b, &mut c, m, n, k).unwrap();
        let err = rel_err(&c, &gemm_f64(&a, &b, m, n, k));
        assert!(err < 1e-5, "after {kind:?}: rel err {err} (seed {seed})");
        let x = rng.ints(100, -5, 5);
        let ops = selftest::warp_ops(&x, 64, 8).unwrap();
        assert_eq!(ops, warp_ops_model(&x, 8), "after {kind:?} (seed {seed})");
    }
}

/// Runs this test binary again for test `name` only, with `PEFT_KERNELS_TEST_CHILD` set,
/// and returns the signal that killed it and its stderr.
fn run_child(name: &str) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("PEFT_KERNELS_TEST_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.signal(), stderr)
}

fn in_child() -> bool {
    std::env::var_os("PEFT_KERNELS_TEST_CHILD").is_some()
}

/// A memory fault inside a kernel kills the process as it would have, after naming the
/// kernel, block, thread and address on stderr.
#[test]
fn a_fault_in_a_kernel_is_reported_before_the_process_dies() {
    if in_child() {
        let launch = Launch {
            kernel: KernelId::selftest_thread_index,
            grid: [2, 1, 1],
            block: [32, 1, 1],
            dynamic_smem: 0,
            overlap_previous: false,
        };
        // Thread (0,0,0) of block (0,0,0) runs first and stores to address 8.
        let params = selftest::ThreadIndexParams { coords: 8, n: 64 };
        // SAFETY: none; this process exists to fault.
        let _ = unsafe { emulator::launch(&launch, &params) };
        unreachable!("the store to address 8 did not fault");
    }
    let (signal, stderr) = run_child("a_fault_in_a_kernel_is_reported_before_the_process_dies");
    assert_eq!(signal, Some(11), "not killed by SIGSEGV: {stderr}");
    let report = "SIGSEGV at address 0x8 in kernel `selftest_thread_index`, \
                  block (0,0,0), thread (0,0,0)";
    assert!(stderr.contains(report), "{stderr}");
}

/// The reversal kernel over x, y (64 floats) launched with dynamic shared memory one float
/// short: thread 0 probes buf[32], at byte 128, one past the launch's 128 bytes.
fn reverse_one_float_short(
    x: &[f32],
    y: &mut [f32],
    probe: &mut [u32],
) -> (Launch, selftest::ReverseParams) {
    let launch = Launch {
        kernel: KernelId::selftest_reverse_dynamic_smem_f32,
        grid: [2, 1, 1],
        block: [32, 1, 1],
        dynamic_smem: 128,
        overlap_previous: false,
    };
    let params = selftest::ReverseParams {
        x: x.as_ptr() as u64,
        y: y.as_mut_ptr() as u64,
        probe: probe.as_mut_ptr() as u64,
        n: 64,
    };
    (launch, params)
}

/// Dynamic shared memory ends at a guard page: a kernel reading one float past the size
/// it was launched with (a multiple of 128 bytes) faults, as on the GPU.
#[test]
fn reading_past_dynamic_shared_memory_faults() {
    if in_child() {
        let (x, mut y, mut probe) = (vec![1.0f32; 64], vec![0.0f32; 64], vec![0u32; 2]);
        let (launch, params) = reverse_one_float_short(&x, &mut y, &mut probe);
        // Unchecked whatever PEFT_KERNELS_EMU_CHECK says: memcheck refuses the read before
        // it faults (the next test).
        // SAFETY: none; this process exists to fault.
        let _ = emulator::with_checks(Checks::NONE, || unsafe {
            emulator::launch(&launch, &params)
        });
        unreachable!("the read past dynamic shared memory did not fault");
    }
    let (signal, stderr) = run_child("reading_past_dynamic_shared_memory_faults");
    assert_eq!(signal, Some(11), "not killed by SIGSEGV: {stderr}");
    let report = "in kernel `selftest_reverse_dynamic_smem_f32`, block (0,0,0), thread (0,0,0)";
    assert!(stderr.contains(report), "{stderr}");
}

/// With memcheck on, the same read past dynamic shared memory is an `Error::Emulator` naming
/// the kernel, block, thread and offset, raised before the read reaches the guard page.
#[test]
fn memcheck_names_a_read_past_dynamic_shared_memory() {
    if !emulator::checks_available() {
        eprintln!("skipped: this build has no checked copy (PEFT_KERNELS_EMU_SANITIZE)");
        return;
    }
    let (x, mut y, mut probe) = (vec![1.0f32; 64], vec![0.0f32; 64], vec![0u32; 2]);
    let (launch, params) = reverse_one_float_short(&x, &mut y, &mut probe);
    // SAFETY: the buffers hold every element the kernel touches; its one access past
    // dynamic shared memory is refused by memcheck before it is made.
    let r = emulator::with_checks(Checks::MEMCHECK, || unsafe {
        emulator::launch(&launch, &params)
    });
    let message = expect_emulator_error(
        r,
        "selftest_reverse_dynamic_smem_f32",
        "memcheck in kernel `selftest_reverse_dynamic_smem_f32`: 4-byte read of dynamic \
         shared memory at byte offset 128: outside the launch's 128 bytes",
    );
    assert!(
        message.starts_with("block (0,0,0), thread (0,0,0): "),
        "{message}"
    );
}

#[test]
fn worker_pools_give_the_same_results() {
    let mut rng = Rng::new();
    let seed = rng.seed;
    let (m, n, k) = (200, 131, 97);
    let a = rng.f32s(m * k);
    let b = rng.f32s(k * n);
    let x = rng.f32s(10_000);
    let xi = rng.ints(5_000, -100, 100);
    let run = || {
        let mut c = vec![f32::NAN; m * n];
        selftest::sgemm_tiled(&a, &b, &mut c, m, n, k).unwrap();
        let reduce = selftest::block_reduce(&x, 128).unwrap();
        let ops = selftest::warp_ops(&xi, 256, 16).unwrap();
        let rev = selftest::reverse_dynamic_smem(&x, 100, 404).unwrap();
        let idx = selftest::thread_index([9, 5, 3], [8, 4, 2], 0).unwrap();
        let broken = selftest::run_broken(Broken::ShflDivergent)
            .unwrap_err()
            .to_string();
        (c, reduce, ops, rev, idx, broken)
    };
    emulator::set_workers(1);
    let one = run();
    for workers in [2, 3, 8] {
        emulator::set_workers(workers);
        let many = run();
        emulator::set_workers(0);
        assert!(
            one == many,
            "{workers} workers differ from one (seed {seed})"
        );
    }
}

#[test]
fn params_sizes_match_the_cxx_structs() {
    unsafe extern "C" {
        fn pk_sizeof_SgemmParams() -> usize;
        fn pk_sizeof_ReduceParams() -> usize;
        fn pk_sizeof_WarpOpsParams() -> usize;
        fn pk_sizeof_ThreadIndexParams() -> usize;
        fn pk_sizeof_ReverseParams() -> usize;
        fn pk_sizeof_AtomicsParams() -> usize;
        fn pk_sizeof_BrokenParams() -> usize;
        fn pk_sizeof_CheckedParams() -> usize;
    }
    use std::mem::size_of;
    // SAFETY: the functions return a constant.
    unsafe {
        assert_eq!(pk_sizeof_SgemmParams(), size_of::<selftest::SgemmParams>());
        assert_eq!(
            pk_sizeof_ReduceParams(),
            size_of::<selftest::ReduceParams>()
        );
        assert_eq!(
            pk_sizeof_WarpOpsParams(),
            size_of::<selftest::WarpOpsParams>()
        );
        assert_eq!(
            pk_sizeof_ThreadIndexParams(),
            size_of::<selftest::ThreadIndexParams>()
        );
        assert_eq!(
            pk_sizeof_ReverseParams(),
            size_of::<selftest::ReverseParams>()
        );
        assert_eq!(
            pk_sizeof_AtomicsParams(),
            size_of::<selftest::AtomicsParams>()
        );
        assert_eq!(
            pk_sizeof_BrokenParams(),
            size_of::<selftest::BrokenParams>()
        );
        assert_eq!(
            pk_sizeof_CheckedParams(),
            size_of::<selftest::CheckedParams>()
        );
    }
}
