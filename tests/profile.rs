//! The emulator's profile mode (issue 16): its counts against independent counts of known
//! kernels, sampling against exact profiles, and its refusals.

mod common;

use common::Rng;
use peft_kernels::emulator::{self, LaunchProfile, Sampling};
use peft_kernels::selftest::{self, mma, mma::BLayout, mma::MmaGemm};
use peft_kernels::Result;

/// The profile mode counts the checked copy's accesses, which the ASan build
/// (`PEFT_KERNELS_EMU_SANITIZE`, scripts/emu-sanitize.sh) does not have: there each test says
/// it is skipped; every other build runs it.
fn skipped_without_checks() -> bool {
    let skip = !emulator::checks_available();
    if skip {
        eprintln!("skipped: this build has no checked copy (PEFT_KERNELS_EMU_SANITIZE)");
    }
    skip
}

fn one(r: Result<((), Vec<LaunchProfile>)>) -> LaunchProfile {
    let (_, mut p) = r.unwrap_or_else(|e| panic!("profile: {e}"));
    assert_eq!(p.len(), 1, "one launch profiled");
    p.pop().unwrap()
}

/// The 32-byte sectors of a buffer of `bytes` bytes (counted from its start, as if it were
/// a 256-byte aligned device allocation).
fn sectors_of(bytes: usize) -> f64 {
    bytes.div_ceil(32) as f64
}

/// The tiled SGEMM's traffic is known exactly: block (x, y) reads rows [64y, 64y + 64) of
/// A and columns [64x, 64x + 64) of B, every element once, loads guarded by the bounds, and
/// writes its tile of C once. So A is read grid.x times, B grid.y times, C written once.
fn sgemm_profile(m: usize, n: usize, k: usize, sampling: Sampling) -> LaunchProfile {
    let mut rng = Rng::from_env();
    let a = rng.uniform_vec::<f32>(m * k);
    let b = rng.uniform_vec::<f32>(k * n);
    let mut c = vec![f32::NAN; m * n];
    one(emulator::profile(sampling, || {
        selftest::sgemm_tiled(&a, &b, &mut c, m, n, k)
    }))
}

#[test]
fn sgemm_bytes_match_an_independent_count() {
    if skipped_without_checks() {
        return;
    }
    let (m, n, k) = (130, 97, 45);
    let p = sgemm_profile(m, n, k, Sampling::Exact);
    let (gx, gy) = (n.div_ceil(64) as f64, m.div_ceil(64) as f64);
    let a = p.operand("a").unwrap();
    let b = p.operand("b").unwrap();
    let c = p.operand("c").unwrap();
    assert_eq!(a.loads.bytes, gx * (m * k * 4) as f64, "{p}");
    assert_eq!(b.loads.bytes, gy * (k * n * 4) as f64, "{p}");
    assert_eq!(c.stores.bytes, (m * n * 4) as f64, "{p}");
    assert_eq!(
        a.stores.requests + b.stores.requests + c.loads.requests,
        0.0,
        "{p}"
    );
    // Every byte of each buffer is touched, so its distinct sectors are all of its sectors;
    // every block reads its rows of A, so A's sectors are re-read by grid.x − 1 other blocks
    // (about: a block's rows share boundary sectors with the next block's).
    assert_eq!(a.loads.distinct_sectors, sectors_of(m * k * 4), "{p}");
    assert_eq!(b.loads.distinct_sectors, sectors_of(k * n * 4), "{p}");
    assert_eq!(c.stores.distinct_sectors, sectors_of(m * n * 4), "{p}");
    assert!(
        a.loads.reread_sectors() >= (gx - 1.0) * a.loads.distinct_sectors,
        "{p}"
    );
    // 16 × 16 threads, barriers: two per K slice of 16 per block.
    assert_eq!(p.blocks, gx * gy);
    assert_eq!(p.threads, gx * gy * 256.0);
    assert_eq!(p.barriers, gx * gy * 2.0 * k.div_ceil(16) as f64, "{p}");
    assert_eq!(p.outside_bytes, 0.0);
    assert!(!p.sampled);
    // A warp's transposing store as[kk][r] hits rows kk = 0..15 (68 floats apart: bank
    // 4·kk + r mod 32) of two columns r: rows kk and kk + 8 share a bank, a 2-way conflict
    // the padding of 4 does not remove; bs[kk][c] stores run along a row, conflict-free.
    // The inner loop's loads broadcast.
    assert_eq!(
        p.shared_stores.wavefronts,
        1.5 * p.shared_stores.requests,
        "{p}"
    );
    assert_eq!(p.shared_stores.ideal, p.shared_stores.requests, "{p}");
    assert_eq!(p.shared_loads.conflicts(), 0.0, "{p}");
    assert_eq!(p.mma, 0.0);
}

/// The tensor-core GEMM stages A and B with cp.async (copies the runtime performs on the
/// kernel's behalf: they must be counted too), reads them with ldmatrix and multiplies with
/// mma.sync: its bytes and FLOPs are known, and its padded rows make ldmatrix
/// conflict-free.
#[test]
fn mma_gemm_counts_copies_ldmatrix_and_mma() {
    if skipped_without_checks() {
        return;
    }
    let mut rng = Rng::from_env();
    for layout in [BLayout::Nk, BLayout::Kn] {
        let (m, n, k) = (128, 192, 96);
        let gemm = MmaGemm {
            m,
            n,
            k,
            b_layout: layout,
        };
        let a: Vec<half::bf16> = rng
            .uniform_vec::<f32>(m * k)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let b: Vec<half::bf16> = rng.uniform_vec(n * k);
        let mut c = vec![f32::NAN; m * n];
        let p = one(emulator::profile(Sampling::Exact, || {
            mma::mma_gemm(&gemm, &a, &b, &mut c)
        }));
        let (gx, gy) = ((n / 64) as f64, (m / 64) as f64);
        assert_eq!(
            p.operand("a").unwrap().loads.bytes,
            gx * (m * k * 2) as f64,
            "{p}"
        );
        assert_eq!(
            p.operand("b").unwrap().loads.bytes,
            gy * (n * k * 2) as f64,
            "{p}"
        );
        assert_eq!(
            p.operand("c").unwrap().stores.bytes,
            (m * n * 4) as f64,
            "{p}"
        );
        assert_eq!(p.mma_flops, (2 * m * n * k) as f64, "{p}");
        assert_eq!(p.mma, (m * n * k / (16 * 8 * 16)) as f64, "{p}");
        assert!(p.ldmatrix > 0.0);
        assert_eq!(p.ldmatrix_wavefronts, p.ldmatrix_phases, "{layout:?}: {p}");
        // 16-byte cp.async copies of whole rows of the tiles: fully coalesced. The
        // epilogue stores one f32 of a fragment per instruction: the 4 lanes of a row
        // write every other float of 32 bytes, so half of each sector.
        for o in ["a", "b"] {
            assert_eq!(p.operand(o).unwrap().loads.coalescing(), 1.0, "{p}");
        }
        assert_eq!(p.operand("c").unwrap().stores.coalescing(), 0.5, "{p}");
    }
}

/// Sampling: blocks of one class do the same work in the SGEMM (interior tiles are full,
/// the last row and column of tiles ragged), so the scaled counts equal the exact ones.
#[test]
fn sampled_profiles_match_exact_ones_on_homogeneous_grids() {
    if skipped_without_checks() {
        return;
    }
    let (m, n, k) = (64 * 7 + 5, 64 * 8 + 3, 40);
    let exact = sgemm_profile(m, n, k, Sampling::Exact);
    let sampled = sgemm_profile(m, n, k, Sampling::Sampled);
    assert!(sampled.sampled && sampled.blocks_run == 25.0, "{sampled}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
    for (e, s) in exact.operands.iter().zip(&sampled.operands) {
        for (te, ts) in [(&e.loads, &s.loads), (&e.stores, &s.stores)] {
            for (x, y) in [
                (te.requests, ts.requests),
                (te.bytes, ts.bytes),
                (te.sectors, ts.sectors),
                (te.block_sectors, ts.block_sectors),
            ] {
                assert!(
                    close(x, y),
                    "{}: exact {x}, sampled {y}\n{exact}\n{sampled}",
                    e.name
                );
            }
            // Distinct sectors are estimated: rows of A shared along x, partitioned along y.
            let (x, y) = (te.distinct_sectors, ts.distinct_sectors);
            assert!(
                (x - y).abs() <= 0.02 * x,
                "{}: exact {x}, sampled {y}",
                e.name
            );
        }
    }
    assert!(close(exact.barriers, sampled.barriers));
    assert!(close(
        exact.shared_loads.wavefronts,
        sampled.shared_loads.wavefronts
    ));
}

mod decode {
    use super::*;
    use half::bf16;
    use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};

    /// The profiles of the fused LoRA plan (bf16, r = 16) at `m` rows, K = N = 4096.
    pub fn lora_plan(m: usize, sampling: Sampling) -> Vec<LaunchProfile> {
        let (n, k, r) = (4096, 4096, 16);
        let mut rng = Rng::from_env();
        let dims = DeltaLinearDims::new(m, n, k, r);
        let x: Vec<bf16> = rng.uniform_vec(m * k);
        let w: Vec<bf16> = rng.uniform_vec(n * k);
        let w_down: Vec<bf16> = rng.uniform_vec(r * k);
        let w_up: Vec<bf16> = rng.uniform_vec(n * r);
        let mut y = vec![bf16::NAN; m * n];
        let mut workspace = vec![bf16::NAN; dims.workspace_len()];
        let args = DeltaLinearArgs {
            x: &x[..],
            w: &w[..],
            bias: None,
            u: None,
            w_down: &w_down[..],
            b_down: None,
            w_up: &w_up[..],
            b_up: None,
            gate: None,
            workspace: &mut workspace[..],
            y: &mut y[..],
        };
        let (_, p) = emulator::profile(sampling, || {
            emulator::delta_linear(&DeltaLinear::lora(32.0), &dims, args)
        })
        .unwrap_or_else(|e| panic!("m = {m}: {e}"));
        p
    }

    /// Bytes a fused plan must move at least: W, the adapter, x and y once each.
    fn ideal_bytes(m: usize) -> f64 {
        let (n, k, r) = (4096, 4096, 16);
        (2 * (n * k + r * k + n * r + m * k + m * n)) as f64
    }

    /// #16 item 5: at decode the fused plan's compulsory traffic is within 5% of the ideal
    /// bytes, its W loads at least 95% coalesced, and its ldmatrix phases conflict-free.
    #[test]
    fn decode_traffic_is_the_ideal() {
        if skipped_without_checks() {
            return;
        }
        for m in [1, 16] {
            let p = lora_plan(m, Sampling::Exact);
            let all: String = p.iter().map(|l| format!("{l}\n")).collect();
            let dram: f64 = p.iter().map(LaunchProfile::dram_bytes).sum();
            let ideal = ideal_bytes(m);
            assert!(
                (dram - ideal).abs() <= 0.05 * ideal,
                "m = {m}: {dram} compulsory bytes, ideal {ideal}\n{all}"
            );
            let w: Vec<_> = p.iter().filter_map(|l| l.operand("w")).collect();
            assert!(!w.is_empty(), "{all}");
            for o in w {
                assert!(
                    o.loads.coalescing() >= 0.95,
                    "m = {m}: W {:?}\n{all}",
                    o.loads
                );
                // W streamed once: no block re-reads a sector of it.
                assert_eq!(o.loads.reread_sectors(), 0.0, "m = {m}\n{all}");
            }
            for l in &p {
                assert_eq!(l.ldmatrix_wavefronts, l.ldmatrix_phases, "m = {m}\n{l}");
                // Every global access fell in a buffer the plan names: none went uncounted.
                assert_eq!(l.outside_bytes, 0.0, "m = {m}\n{l}");
            }
        }
    }

    /// Between decode and prefill (16 < M ≤ 64) the frozen GEMM still streams W from memory:
    /// one row tile covers every row, so no block re-reads a sector another read (16-row
    /// tiles read W ceil(M/16) times).
    #[test]
    fn small_batches_read_w_once() {
        if skipped_without_checks() {
            return;
        }
        for m in [17, 64] {
            let p = lora_plan(m, Sampling::Exact);
            let all: String = p.iter().map(|l| format!("{l}\n")).collect();
            for o in p.iter().filter_map(|l| l.operand("w")) {
                assert_eq!(o.loads.reread_sectors(), 0.0, "m = {m}\n{all}");
                assert!(o.loads.coalescing() >= 0.95, "m = {m}\n{all}");
            }
            // Beside the split-K partial sums (f32, written and read once), the ideal bytes.
            let partials: f64 = p
                .iter()
                .filter_map(|l| l.operand("workspace"))
                .map(|o| o.loads.dram_bytes() + o.stores.dram_bytes())
                .sum();
            let dram: f64 = p.iter().map(LaunchProfile::dram_bytes).sum::<f64>() - partials;
            let ideal = ideal_bytes(m);
            assert!(
                (dram - ideal).abs() <= 0.05 * ideal,
                "m = {m}: {dram} vs {ideal}\n{all}"
            );
            assert!(
                partials <= 2.0 * 4.0 * (4 * m * 4096) as f64,
                "m = {m}\n{all}"
            );
            // The partial sums are stored in 8-byte pairs that fill whole sectors.
            for l in &p {
                if let Some(o) = l.operand("workspace") {
                    assert!(
                        o.stores.coalescing() >= 0.95 || o.stores.bytes < 65536.0,
                        "{l}"
                    );
                }
            }
        }
    }

    #[test]
    #[ignore = "prints the profiles of the decode plans"]
    fn print() {
        if skipped_without_checks() {
            return;
        }
        for m in [1, 16, 17, 64] {
            let t = std::time::Instant::now();
            let p = lora_plan(m, Sampling::Exact);
            eprintln!("m = {m}: {:.1} s", t.elapsed().as_secs_f64());
            for l in &p {
                eprintln!("{l}");
            }
        }
    }
}

mod attention {
    use super::*;
    use half::bf16;
    use peft_kernels::prefix_attention::{
        HostPrefixAttentionArgs, PrefixAttention, PrefixAttentionArgs, PrefixAttentionDims,
    };

    fn profile_attention(
        dims: &PrefixAttentionDims,
        causal: bool,
        sampling: Sampling,
    ) -> Result<Vec<LaunchProfile>> {
        let mut rng = Rng::from_env();
        let (b, h, kvh, d) = (dims.batch, dims.heads, dims.kv_heads, dims.head_dim);
        let q: Vec<bf16> = rng.uniform_vec(b * h * dims.q_len * d);
        let k: Vec<bf16> = rng.uniform_vec(b * kvh * dims.kv_len * d);
        let v: Vec<bf16> = rng.uniform_vec(b * kvh * dims.kv_len * d);
        let pk: Vec<bf16> = rng.uniform_vec(b * kvh * dims.prefix_len * d);
        let pv: Vec<bf16> = rng.uniform_vec(b * kvh * dims.prefix_len * d);
        let mut out = vec![bf16::NAN; q.len()];
        let mut workspace = vec![f32::NAN; dims.workspace_len(peft_kernels::DType::BF16)];
        let args: HostPrefixAttentionArgs<bf16> = PrefixAttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            prefix_k: &pk,
            prefix_v: &pv,
            context_lens: None,
            out: &mut out,
            lse: None,
            lambda: None,
            workspace: Some(&mut workspace),
        };
        let op = PrefixAttention {
            causal,
            ..PrefixAttention::default()
        };
        emulator::profile(sampling, || emulator::prefix_attention(&op, dims, args)).map(|r| r.1)
    }

    /// #16 item 5: a block of the prefix attention kernel reads each K/V (and prefix K/V)
    /// tile from memory once: the bytes its loads request equal the sectors it touches, and
    /// its ldmatrix phases are conflict-free.
    #[test]
    fn each_block_reads_its_kv_once() {
        if skipped_without_checks() {
            return;
        }
        let dims = PrefixAttentionDims::new(2, 4, 2, 200, 333, 30, 64);
        let p = profile_attention(&dims, false, Sampling::Exact).unwrap();
        let mut seen = 0;
        for l in &p {
            for name in ["k", "v", "prefix_k", "prefix_v"] {
                let Some(o) = l.operand(name) else { continue };
                if o.loads.requests == 0.0 {
                    continue;
                }
                seen += 1;
                let touched = 32.0 * o.loads.block_sectors;
                assert!(
                    o.loads.bytes <= 1.01 * touched,
                    "`{name}`: {} bytes requested over {touched} bytes of sectors the blocks \
                     touched: a block re-reads a tile\n{l}",
                    o.loads.bytes
                );
            }
            assert_eq!(l.ldmatrix_wavefronts, l.ldmatrix_phases, "{l}");
        }
        assert!(seen >= 4, "no launch read K and V: {p:?}");
    }

    /// A causal mask gives each query tile its own number of key tiles: sampled blocks of
    /// one class do different work, which the sampled profile refuses to scale.
    #[test]
    fn sampling_refuses_causal_attention() {
        if skipped_without_checks() {
            return;
        }
        let dims = PrefixAttentionDims::new(1, 2, 2, 1024, 1024, 30, 64);
        let err = profile_attention(&dims, true, Sampling::Sampled).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("data-dependent"), "{msg}");
        // Not causal: every query tile sees every key, and the sample stands for the grid.
        let p = profile_attention(&dims, false, Sampling::Sampled).unwrap();
        assert!(p.iter().any(|l| l.sampled), "{p:?}");
    }

    /// The bench's prefill shape (B = 8, H = 32, L = 2048, prefix 128, d = 128), sampled.
    #[test]
    #[ignore = "prints the sampled profile of the bench's attention shape"]
    fn print_bench_shape() {
        if skipped_without_checks() {
            return;
        }
        let dims = PrefixAttentionDims::new(8, 32, 32, 2048, 2048, 128, 128);
        let t = std::time::Instant::now();
        for l in profile_attention(&dims, false, Sampling::Sampled).unwrap() {
            eprintln!("{l}");
        }
        eprintln!("{:.1} s", t.elapsed().as_secs_f64());
    }
}
