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
    // 8 × 9 tiles: the first two and last two of each dimension.
    assert!(sampled.sampled && sampled.blocks_run == 16.0, "{sampled}");
    // C's rows (2060 bytes) are not whole sectors, so neighbouring tiles share sectors in a
    // pattern that repeats every 8 rows, and the last tile of a row shares one with the first
    // of the next: the estimate of its distinct sectors is off by 2.8% here.
    assert_sampled_matches(&exact, &sampled, 0.05);
}

/// A sampled profile against the exact one of the same launch: counts of blocks of one
/// class are the same, so the scaled ones equal the exact ones (to rounding; the sectors a
/// request touches too, where rows are whole sectors: else they vary with each row's
/// alignment); distinct sectors are estimated, within `distinct_tol`.
fn assert_sampled_matches(exact: &LaunchProfile, sampled: &LaunchProfile, distinct_tol: f64) {
    let ctx = format!("exact:\n{exact}\nsampled:\n{sampled}");
    assert_eq!(exact.kernel, sampled.kernel);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
    for (e, s) in exact.operands.iter().zip(&sampled.operands) {
        for (te, ts) in [(&e.loads, &s.loads), (&e.stores, &s.stores)] {
            for (what, x, y) in [
                ("requests", te.requests, ts.requests),
                ("bytes", te.bytes, ts.bytes),
                ("sectors", te.sectors, ts.sectors),
                ("block sectors", te.block_sectors, ts.block_sectors),
            ] {
                assert!(
                    close(x, y),
                    "`{}` {what}: exact {x}, sampled {y}\n{ctx}",
                    e.name
                );
            }
            let (x, y) = (te.distinct_sectors, ts.distinct_sectors);
            assert!(
                (x - y).abs() <= distinct_tol * x,
                "`{}` distinct sectors: exact {x}, sampled {y}\n{ctx}",
                e.name
            );
        }
    }
    for (what, x, y) in [
        ("blocks", exact.blocks, sampled.blocks),
        ("threads", exact.threads, sampled.threads),
        ("barriers", exact.barriers, sampled.barriers),
        ("mma", exact.mma, sampled.mma),
        ("mma flops", exact.mma_flops, sampled.mma_flops),
        ("ldmatrix", exact.ldmatrix, sampled.ldmatrix),
        (
            "ldmatrix wavefronts",
            exact.ldmatrix_wavefronts,
            sampled.ldmatrix_wavefronts,
        ),
        (
            "shared load wavefronts",
            exact.shared_loads.wavefronts,
            sampled.shared_loads.wavefronts,
        ),
        (
            "shared store wavefronts",
            exact.shared_stores.wavefronts,
            sampled.shared_stores.wavefronts,
        ),
    ] {
        assert!(close(x, y), "{what}: exact {x}, sampled {y}\n{ctx}");
    }
}

/// Profiles of a plan's launches, exact against sampled, launch by launch (rows of whole
/// sectors: distinct sectors within 1%).
fn assert_plan_sampled_matches(exact: &[LaunchProfile], sampled: &[LaunchProfile]) {
    assert_eq!(exact.len(), sampled.len());
    for (e, s) in exact.iter().zip(sampled) {
        assert_sampled_matches(e, s, 0.01);
    }
}

mod decode {
    use super::*;
    use half::bf16;
    use peft_kernels::delta_linear::{DeltaLinear, DeltaLinearArgs, DeltaLinearDims};

    /// The profiles of the fused LoRA plan (bf16, r = 16) at `m` rows, K = N = 4096.
    pub fn lora_plan(m: usize, sampling: Sampling) -> Vec<LaunchProfile> {
        lora_plan_of(m, 4096, 4096, sampling).unwrap_or_else(|e| panic!("m = {m}: {e}"))
    }

    /// The profiles of the fused LoRA plan (bf16, r = 16) over m × n × k.
    pub fn lora_plan_of(
        m: usize,
        n: usize,
        k: usize,
        sampling: Sampling,
    ) -> Result<Vec<LaunchProfile>> {
        lora_plan_with(DeltaLinearDims::new(m, n, k, 16), sampling)
    }

    /// The profiles of the fused LoRA plan (bf16) over `dims`.
    pub fn lora_plan_with(dims: DeltaLinearDims, sampling: Sampling) -> Result<Vec<LaunchProfile>> {
        let (m, n, k, r) = (dims.m, dims.n, dims.k, dims.r);
        let mut rng = Rng::from_env();
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
        emulator::profile(sampling, || {
            emulator::delta_linear(&DeltaLinear::lora(32.0), &dims, args)
        })
        .map(|r| r.1)
    }

    /// #16 item 2: the prefill plan at M = 256 splits both passes' K into runs of unequal
    /// length (the last is shorter), folded into grid.x: the sample runs every run of each
    /// sampled tile, and its counts equal the exact profile's, here at N = 1520 (12 column
    /// tiles, the last ragged; rows of whole sectors, as at the bench shapes; 24 tiles split
    /// into 6 runs of 6, 6, 6, 6, 6 and 3 k-tiles) and K = 1024, small enough to profile
    /// exactly.
    #[test]
    fn split_k_plans_sample_every_run() {
        if skipped_without_checks() {
            return;
        }
        let (m, n, k) = (256, 1520, 1024);
        let exact = lora_plan_of(m, n, k, Sampling::Exact).unwrap();
        let sampled = lora_plan_of(m, n, k, Sampling::Sampled).unwrap();
        let all: String = sampled.iter().map(|l| format!("{l}\n")).collect();
        // Both passes split (a pass and its reduction each), the main pass into runs of
        // unequal length, and its sample ran a strict subset of the blocks.
        let split: Vec<_> = sampled.iter().filter(|l| l.runs > 1).collect();
        assert_eq!(split.len(), 2, "{all}");
        let main = split[1];
        assert!(main.kernel.starts_with("fused_linear_mma_large"), "{all}");
        assert_eq!(main.runs, 6, "{all}");
        assert!(main.sampled && main.blocks_run < main.blocks, "{all}");
        assert!(
            format!("{main}").contains("every one of the 6 runs of the split"),
            "{main}"
        );
        assert_plan_sampled_matches(&exact, &sampled);
    }

    /// #16 item 2: the bench's delta_linear shapes (K = N = 4096; M = 256 splits its K)
    /// profile sampled in seconds. Measured on the 2-core shared build machine (release, the
    /// whole plan, inputs included), alone: M = 256 6 s, 1024 8 s, 4096 9 s; the budget
    /// leaves room for a loaded machine. The counts a sample gives are held to the exact ones
    /// by the tests above (the same kernels, tile classes and split runs at smaller shapes).
    #[test]
    fn bench_shapes_profile_in_seconds() {
        if skipped_without_checks() {
            return;
        }
        const BUDGET_S: f64 = 60.0;
        for m in [256, 1024, 4096] {
            let t = std::time::Instant::now();
            let p = lora_plan(m, Sampling::Sampled);
            let took = t.elapsed().as_secs_f64();
            eprintln!("m = {m}: sampled profile of the plan in {took:.1} s");
            assert!(took < BUDGET_S, "m = {m}: {took:.1} s");
            let all: String = p.iter().map(|l| format!("{l}\n")).collect();
            assert!(p.iter().any(|l| l.sampled), "{all}");
            // The frozen GEMM's FLOPs, scaled from the sample, are the product's.
            let flops: f64 = p.iter().map(LaunchProfile::tensor_flops).sum();
            let want = 2.0 * (m * 4096 * 4096) as f64;
            assert!(
                flops >= want && flops <= 1.05 * want,
                "m = {m}: {flops}\n{all}"
            );
        }
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

    /// #16 item 5: the tensor-core kernels store y in whole sectors (the quad's transposed
    /// 8-byte stores, kernels/delta_linear.cu), at least 95% of the bytes of the sectors the
    /// stores touch, for every tile configuration and the split-K reduction, at aligned
    /// shapes (K small: the epilogue is what is measured).
    #[test]
    fn y_stores_fill_whole_sectors() {
        if skipped_without_checks() {
            return;
        }
        use peft_kernels::delta_linear::KernelVariant;
        // (m, n, k, the kernel that writes y)
        let cases = [
            (16, 256, 64, "fused_linear_mma_decode_bf16"),
            (100, 64, 64, "fused_linear_mma_small_bf16"),
            (64, 256, 64, "fused_linear_mma_mid_bf16"),
            (256, 256, 64, "fused_linear_mma_large_bf16"),
            (64, 256, 1024, "fused_linear_split_reduce_bf16"),
            (200, 256, 128, "fused_linear_wgmma_bf16"),
        ];
        for (m, n, k, kernel) in cases {
            let mut dims = DeltaLinearDims::new(m, n, k, 16);
            if kernel.contains("wgmma") {
                dims.kernel = KernelVariant::Wgmma;
            }
            let p = lora_plan_with(dims, Sampling::Exact).unwrap();
            let all: String = p.iter().map(|l| format!("{l}\n")).collect();
            let writes: Vec<_> = p
                .iter()
                .filter(|l| l.operand("y").is_some_and(|o| o.stores.requests > 0.0))
                .collect();
            assert_eq!(writes.len(), 1, "{all}");
            assert_eq!(writes[0].kernel, kernel, "{all}");
            let y = writes[0].operand("y").unwrap().stores;
            assert_eq!(y.bytes, (2 * m * n) as f64, "{kernel}\n{all}");
            assert!(y.coalescing() >= 0.95, "{kernel}: {y:?}\n{all}");
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

    /// #16 item 2: sampled attention counts equal the exact ones at a shape small enough to
    /// profile exactly (7 query tiles, 6 heads, 2 sequences: every dimension sampled or
    /// whole), and the bench's prefill shape (B = 8, H = 32, L = 2048, prefix 128, d = 128)
    /// profiles sampled in seconds: 19 s measured alone on the 2-core shared build machine;
    /// the budget leaves room for a loaded one.
    #[test]
    fn sampled_attention_matches_exact_and_bench_shape_is_quick() {
        if skipped_without_checks() {
            return;
        }
        let dims = PrefixAttentionDims::new(2, 6, 6, 448, 448, 30, 128);
        let exact = profile_attention(&dims, false, Sampling::Exact).unwrap();
        let sampled = profile_attention(&dims, false, Sampling::Sampled).unwrap();
        assert!(sampled.iter().any(|l| l.sampled), "{sampled:?}");
        assert_plan_sampled_matches(&exact, &sampled);

        const BUDGET_S: f64 = 90.0;
        let dims = PrefixAttentionDims::new(8, 32, 32, 2048, 2048, 128, 128);
        let t = std::time::Instant::now();
        let p = profile_attention(&dims, false, Sampling::Sampled).unwrap();
        let took = t.elapsed().as_secs_f64();
        eprintln!("bench attention shape: sampled profile in {took:.1} s");
        assert!(took < BUDGET_S, "{took:.1} s");
        assert!(p.iter().all(|l| l.sampled), "{p:?}");
        // Q·Kᵀ and P·V over every (query, key) pair of every head: 4·B·H·L·(L + prefix)·d.
        let flops: f64 = p.iter().map(LaunchProfile::tensor_flops).sum();
        let want = 4.0 * (8 * 32 * 2048 * (2048 + 128) * 128_u64) as f64;
        assert!(flops >= want && flops <= 1.05 * want, "{flops} vs {want}");
    }
}
