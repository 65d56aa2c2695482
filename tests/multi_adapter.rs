//! Multi-adapter batches on the emulator against the per-row single-adapter f64 reference:
//! random mixtures of methods, ranks and activations every run, both batch descriptions,
//! every dtype and kernel variant, decode and prefill shapes, strides, poisoned outputs, bad
//! arguments, and the kernels' own refusal of bad device ids.

mod common;

use common::{poisoned, random_cases, Rng};
use half::{bf16, f16};
use peft_kernels::delta_linear::{DeltaLinear, KernelVariant};
use peft_kernels::emulator;
use peft_kernels::multi_adapter::{
    rows_of, Adapter, AdapterBatch, AdapterSet, HostMultiDeltaLinearArgs, MultiDeltaDims,
    MultiDeltaLinearArgs, MultiStatus,
};
use peft_kernels::plan::multi_adapter as plan;
use peft_kernels::plan::{Buf, BufSource};
use peft_kernels::reference::multi_adapter as reference;
use peft_kernels::reference::MatRef;
use peft_kernels::validate::{assert_close_matrix, assert_padding_untouched, default_tolerance};
use peft_kernels::{Activation, Composition, Element, Error, Insertion, MatrixLayout};

const RANKS: [usize; 7] = [1, 4, 8, 16, 33, 64, 256];
const VARIANTS: [KernelVariant; 3] = [
    KernelVariant::Naive,
    KernelVariant::Simt,
    KernelVariant::Auto,
];

fn scaled<T: Element>(rng: &mut Rng, n: usize, fan_in: usize) -> Vec<T> {
    let s = 1.0 / (fan_in as f64).sqrt();
    (0..n)
        .map(|_| T::from_f64(s * rng.uniform(-1.0, 1.0)))
        .collect()
}

/// A random method of the parallel family.
fn random_op(rng: &mut Rng) -> DeltaLinear {
    match rng.range(0, 3) {
        0 => DeltaLinear::lora(rng.uniform(0.5, 32.0) as f32),
        1 => DeltaLinear::rslora(rng.uniform(0.5, 16.0) as f32),
        2 => {
            DeltaLinear::parallel_adapter(rng.pick(&Activation::ALL), rng.uniform(0.25, 4.0) as f32)
        }
        _ => DeltaLinear::new(
            Insertion::Parallel,
            rng.pick(&Activation::ALL),
            Composition::Add,
        ),
    }
}

/// A random adapter of rank `r` for layer [n, k], biases by chance (LoRA never has them in
/// PEFT, but the kernels take them for any method).
fn random_adapter<T: Element>(rng: &mut Rng, n: usize, k: usize, r: usize) -> Adapter<Vec<T>> {
    let bias = |rng: &mut Rng, len| rng.chance(0.5).then(|| scaled(rng, len, 4));
    Adapter {
        op: random_op(rng),
        w_down: scaled(rng, r * k, k),
        b_down: bias(rng, r),
        w_up: scaled(rng, n * r, r),
        b_up: bias(rng, n),
    }
}

/// A random set of `count` adapters (ranks mixed from RANKS) with slots left empty between
/// them (removed adapters), and the ids of the filled slots.
fn random_set<T: Element>(
    rng: &mut Rng,
    n: usize,
    k: usize,
    count: usize,
) -> (AdapterSet<T>, Vec<i32>) {
    let max_rank = if rng.chance(0.5) { 256 } else { 64 };
    let mut set = AdapterSet::new(n, k, 2 * count + 1, max_rank).unwrap();
    let mut ids = Vec::new();
    for _ in 0..count {
        let r = rng.pick(&RANKS).min(max_rank);
        let id = set.insert(random_adapter(rng, n, k, r)).unwrap();
        // Every other insert is followed by one that is removed at once: holes in the table.
        if rng.chance(0.5) {
            let hole = set.insert(random_adapter(rng, n, k, 1)).unwrap();
            set.remove(hole).unwrap();
        }
        ids.push(id as i32);
    }
    (set, ids)
}

/// One of the batch patterns of the issue over the set's `ids`, as per-row ids.
fn random_rows(rng: &mut Rng, m: usize, ids: &[i32]) -> Vec<i32> {
    match rng.range(0, 3) {
        // Ids with repeats and rows without adapter.
        0 => (0..m)
            .map(|_| if rng.chance(0.2) { -1 } else { rng.pick(ids) })
            .collect(),
        // One row per adapter (in turn).
        1 => (0..m).map(|i| ids[i % ids.len()]).collect(),
        // Every row on one adapter.
        2 => vec![rng.pick(ids); m],
        // No row with an adapter.
        _ => vec![-1; m],
    }
}

/// Segments for `rows`' runs of equal ids, with empty segments of random ids put between
/// them and at the end.
fn segments_of(rng: &mut Rng, rows: &[i32], ids: &[i32]) -> (Vec<i32>, Vec<i32>) {
    let (mut starts, mut seg_ids) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i <= rows.len() {
        if rng.chance(0.2) {
            starts.push(i as i32);
            seg_ids.push(rng.pick(ids));
        }
        if i == rows.len() {
            break;
        }
        let end = (i..rows.len())
            .find(|&j| rows[j] != rows[i])
            .unwrap_or(rows.len());
        starts.push(i as i32);
        seg_ids.push(rows[i]);
        i = end;
    }
    starts.push(rows.len() as i32);
    (starts, seg_ids)
}

struct Layer<T> {
    x: Vec<T>,
    w: Vec<T>,
    bias: Option<Vec<T>>,
}

/// Runs one call on the emulator with a NaN-poisoned y (row stride `ld_y`), checks the
/// padding, and returns y.
fn run<T: Element>(
    dims: &MultiDeltaDims,
    set: &AdapterSet<T>,
    layer: &Layer<T>,
    batch: AdapterBatch<&[i32]>,
) -> Vec<T> {
    let layout = MatrixLayout {
        rows: dims.m,
        cols: dims.n,
        ld: dims.ld_y,
    };
    let before = poisoned::<T>(layout.min_len() + 3);
    let mut y = before.clone();
    let mut workspace = poisoned::<T>(dims.workspace_len(set.max_rank()));
    let mut status = [0u32];
    let args: HostMultiDeltaLinearArgs<T> = MultiDeltaLinearArgs {
        x: &layer.x,
        w: &layer.w,
        bias: layer.bias.as_deref(),
        batch,
        status: Some(&mut status),
        workspace: &mut workspace,
        y: &mut y,
    };
    emulator::multi_delta_linear(dims, set, args).unwrap();
    assert_eq!(status[0], 0, "no bad id, no status bit");
    assert_padding_untouched("y", &y, &before, layout);
    y
}

fn random_mixtures<T: Element>(cases: usize) {
    let mut rng = Rng::from_env();
    let tol = default_tolerance(T::DTYPE);
    for case in 0..cases {
        let decode = case % 2 == 0;
        let m = if decode {
            rng.range(1, 16)
        } else {
            rng.range(17, 70)
        };
        let (n, k) = (rng.pick(&[1, 7, 24, 37, 64]), rng.pick(&[1, 8, 19, 40]));
        let count = rng.range(1, 6);
        let (set, ids) = random_set::<T>(&mut rng, n, k, count);
        let mut dims = MultiDeltaDims::new(m, n, k);
        dims.ld_x = k + rng.pick(&[0, 0, 3, 8]);
        dims.ld_y = n + rng.pick(&[0, 0, 5, 8]);
        let layer = Layer {
            x: scaled(&mut rng, (m - 1) * dims.ld_x + k, 1),
            w: scaled(&mut rng, n * k, k),
            bias: rng.chance(0.5).then(|| scaled(&mut rng, n, 4)),
        };
        let rows = random_rows(&mut rng, m, &ids);
        let (starts, seg_ids) = segments_of(&mut rng, &rows, &ids);
        assert_eq!(
            rows_of(
                AdapterBatch::Segments {
                    starts: &starts,
                    ids: &seg_ids
                },
                m
            )
            .unwrap(),
            rows
        );
        let x = MatRef::with_ld(&layer.x, m, k, dims.ld_x);
        let w = MatRef::new(&layer.w, n, k);
        let want = reference::multi_delta_linear(x, w, layer.bias.as_deref(), &set, &rows).unwrap();
        let layout = MatrixLayout {
            rows: m,
            cols: n,
            ld: dims.ld_y,
        };
        // The tensor-core frozen GEMM (any alignment) for f16/bf16.
        let tc = (T::DTYPE != peft_kernels::DType::F32).then_some(KernelVariant::TensorCore);
        for kernel in VARIANTS.into_iter().chain(tc) {
            dims.kernel = kernel;
            let what = format!("case {case} {kernel:?} m {m} n {n} k {k} rows {rows:?}");
            let by_rows = run(&dims, &set, &layer, AdapterBatch::Rows(&rows));
            assert_close_matrix(&format!("y by rows, {what}"), &by_rows, layout, &want, tol);
            let by_segments = run(
                &dims,
                &set,
                &layer,
                AdapterBatch::Segments {
                    starts: &starts,
                    ids: &seg_ids,
                },
            );
            // The same kernels over the same rows: the same bits.
            let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&by_rows),
                bits(&by_segments),
                "segments vs rows, {what}"
            );
        }
    }
}

#[test]
fn random_mixtures_f32() {
    random_mixtures::<f32>(random_cases(6));
}

#[test]
fn random_mixtures_f16() {
    random_mixtures::<f16>(random_cases(6));
}

#[test]
fn random_mixtures_bf16() {
    random_mixtures::<bf16>(random_cases(6));
}

/// The names of the kernels a call plans: (the delta steps, the frozen GEMM's steps).
fn planned<T: Element>(
    dims: &MultiDeltaDims,
    set: &AdapterSet<T>,
    layer: &Layer<T>,
    rows: &[i32],
) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut workspace = vec![T::from_f64(0.0); dims.workspace_len(set.max_rank())];
    let mut y = vec![T::from_f64(0.0); (dims.m - 1) * dims.ld_y + dims.n];
    let b = MultiDeltaLinearArgs {
        x: layer.x.as_slice(),
        w: layer.w.as_slice(),
        bias: layer.bias.as_deref(),
        batch: AdapterBatch::Rows(rows),
        status: None::<&mut [u32]>,
        workspace: workspace.as_mut_slice(),
        y: y.as_mut_slice(),
    }
    .bufs(&mut Plain);
    let steps = plan::multi_delta_linear(dims, T::DTYPE, &set.view(), &b, None).unwrap();
    let names = |launches: &mut dyn Iterator<Item = &peft_kernels::plan::Launch>| {
        launches.map(|l| l.kernel.name()).collect()
    };
    (
        names(&mut steps.delta.iter().map(|(l, _)| l)),
        names(&mut steps.frozen.iter().map(|(l, _)| l)),
    )
}

/// The fused pass on every tensor-core tile it has (decode m ≤ 16, small n ≤ 64, mid
/// 16 < m ≤ 64, large m > 64), each with its K split over blocks and not, against the
/// per-row reference: random mixtures of ranks from RANKS (one row tile holding several),
/// both batch descriptions, strides. Checks the plan too: f16/bf16 run [shrink, the `_multi`
/// pass (+ its split-K reduction)], f32 the unfused [shrink, expand, frozen].
fn fused_tiles_and_splits<T: Element>() {
    let mut rng = Rng::from_env();
    let tol = default_tolerance(T::DTYPE);
    // (rows, n, k, the frozen GEMM split over K): a split needs ≥ 8 k-tiles of the tile's BK
    // (decode 128, mid 64, large 32) and few blocks; the mma kernels need k a multiple of 8
    // (x's and W's rows 16-byte copyable; others take the unfused SIMT path).
    let shapes = [
        ((1, 16), 71, 40, false, "decode"),
        ((1, 16), 45, 1032, true, "decode"),
        ((17, 64), 33, 24, false, "small"),
        ((17, 64), 61, 520, true, "small"),
        ((17, 64), 97, 32, false, "mid"),
        ((17, 64), 97, 520, true, "mid"),
        ((65, 140), 131, 48, false, "large"),
        ((65, 140), 70, 264, true, "large"),
    ];
    for ((lo, hi), n, k, split, tile) in shapes {
        let m = rng.range(lo, hi);
        let count = rng.range(1, 6);
        let (mut set, ids) = random_set::<T>(&mut rng, n, k, count);
        // One adapter with b_up on a random row, whatever the mixture: the fused pass adds
        // s·b_up at its phase switch, a split's reduction instead.
        let r = rng.pick(&RANKS).min(set.max_rank());
        let mut biased = random_adapter::<T>(&mut rng, n, k, r);
        biased.b_up = Some(scaled(&mut rng, n, 4));
        let biased = set.insert(biased).unwrap() as i32;
        let mut dims = MultiDeltaDims::new(m, n, k);
        dims.ld_x = k + rng.pick(&[0, 8]);
        dims.ld_y = n + rng.pick(&[0, 3]);
        let layer = Layer {
            x: scaled(&mut rng, (m - 1) * dims.ld_x + k, 1),
            w: scaled(&mut rng, n * k, k),
            bias: rng.chance(0.5).then(|| scaled(&mut rng, n, 4)),
        };
        let mut rows = random_rows(&mut rng, m, &ids);
        rows[rng.range(0, m - 1)] = biased;
        let what = format!("{tile} split {split} m {m} n {n} k {k} rows {rows:?}");
        let (delta, frozen) = planned(&dims, &set, &layer, &rows);
        if T::DTYPE == peft_kernels::DType::F32 {
            assert_eq!(delta.len(), 2, "{what}: shrink, expand");
        } else {
            assert_eq!(delta.len(), 1, "{what}: the shrink alone");
            let fused = format!("fused_linear_mma_{tile}_multi_{}", T::DTYPE);
            assert_eq!(frozen[0], fused, "{what}");
            assert_eq!(frozen.len() == 2, split, "{what}: {frozen:?}");
        }
        let want = reference::multi_delta_linear(
            MatRef::with_ld(&layer.x, m, k, dims.ld_x),
            MatRef::new(&layer.w, n, k),
            layer.bias.as_deref(),
            &set,
            &rows,
        )
        .unwrap();
        let layout = MatrixLayout {
            rows: m,
            cols: n,
            ld: dims.ld_y,
        };
        let y = run(&dims, &set, &layer, AdapterBatch::Rows(&rows));
        assert_close_matrix(&format!("y, {what}"), &y, layout, &want, tol);
        let (starts, seg_ids) = segments_of(&mut rng, &rows, &ids);
        let by_segments = run(
            &dims,
            &set,
            &layer,
            AdapterBatch::Segments {
                starts: &starts,
                ids: &seg_ids,
            },
        );
        let bits = |v: &[T]| v.iter().map(|e| e.to_f64().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y), bits(&by_segments), "segments vs rows, {what}");
    }
}

#[test]
fn fused_tiles_and_splits_f16() {
    fused_tiles_and_splits::<f16>();
}

#[test]
fn fused_tiles_and_splits_bf16() {
    fused_tiles_and_splits::<bf16>();
}

#[test]
fn fused_tiles_and_splits_f32() {
    fused_tiles_and_splits::<f32>();
}

/// The fused path writes y once and never reads it: over all its launches (the emulator's
/// profile counts every access), the bytes stored to y are m·n·size, its sectors all
/// distinct, and no load of y. Decode and prefill, split over K and not.
#[test]
fn y_is_written_once() {
    if !emulator::checks_available() {
        eprintln!("skipped: this build has no checked copy (PEFT_KERNELS_EMU_SANITIZE)");
        return;
    }
    let mut rng = Rng::from_env();
    for (m, n, k) in [(9, 70, 40), (9, 45, 1032), (80, 131, 48), (80, 70, 264)] {
        let (set, ids) = random_set::<bf16>(&mut rng, n, k, 4);
        let layer = Layer {
            x: scaled(&mut rng, m * k, 1),
            w: scaled(&mut rng, n * k, k),
            bias: Some(scaled(&mut rng, n, 4)),
        };
        let rows = random_rows(&mut rng, m, &ids);
        let dims = MultiDeltaDims::new(m, n, k);
        let (_, launches) = emulator::profile(emulator::Sampling::Exact, || {
            run(&dims, &set, &layer, AdapterBatch::Rows(&rows));
            Ok(())
        })
        .unwrap();
        let y: Vec<_> = launches.iter().filter_map(|l| l.operand("y")).collect();
        let stored: f64 = y.iter().map(|o| o.stores.bytes).sum();
        let loaded: f64 = y.iter().map(|o| o.loads.bytes).sum();
        let shown: Vec<String> = launches.iter().map(ToString::to_string).collect();
        let what = format!("m {m} n {n} k {k}: {}", shown.join("\n"));
        assert_eq!(stored, (m * n * 2) as f64, "{what}");
        assert_eq!(loaded, 0.0, "{what}");
    }
}

/// Removing an adapter frees its slot without moving any other; an insert reuses the slot;
/// the batch then sees the new adapter there and the others unchanged.
#[test]
fn insert_and_remove_move_no_other_adapter() {
    let mut rng = Rng::from_env();
    let (n, k) = (24, 16);
    let mut set = AdapterSet::<f32>::new(n, k, 4, 64).unwrap();
    let a = set.insert(random_adapter(&mut rng, n, k, 8)).unwrap();
    let b = set.insert(random_adapter(&mut rng, n, k, 33)).unwrap();
    let b_at = set.get(b).unwrap().w_down.as_ptr();
    set.remove(a).unwrap();
    assert_eq!(set.len(), 1);
    let c = set.insert(random_adapter(&mut rng, n, k, 4)).unwrap();
    assert_eq!(c, a, "the free slot is reused");
    assert_eq!(set.get(b).unwrap().w_down.as_ptr(), b_at, "b did not move");
    assert_eq!(set.rank(c), Some(4));
    let m = 5;
    let layer = Layer {
        x: scaled(&mut rng, m * k, 1),
        w: scaled(&mut rng, n * k, k),
        bias: None,
    };
    let rows = [c as i32, b as i32, -1, b as i32, c as i32];
    let want = reference::multi_delta_linear(
        MatRef::new(&layer.x, m, k),
        MatRef::new(&layer.w, n, k),
        None,
        &set,
        &rows,
    )
    .unwrap();
    let y = run(
        &MultiDeltaDims::new(m, n, k),
        &set,
        &layer,
        AdapterBatch::Rows(&rows),
    );
    let layout = MatrixLayout::contiguous(m, n);
    assert_close_matrix("y", &y, layout, &want, 1e-5);
}

fn expect_invalid<T>(r: Result<T, Error>, arg: &str) {
    match r {
        Err(Error::InvalidArgument { arg: a, .. }) if a == arg => {}
        Err(e) => panic!("expected an invalid `{arg}`, got {e}"),
        Ok(_) => panic!("expected an invalid `{arg}`, got Ok"),
    }
}

#[test]
fn bad_adapters_are_refused() {
    let mut rng = Rng::from_env();
    let (n, k) = (12, 8);
    let mut set = AdapterSet::<f32>::new(n, k, 2, 16).unwrap();
    let good = random_adapter::<f32>(&mut rng, n, k, 4);
    let with = |f: &dyn Fn(&mut Adapter<Vec<f32>>)| {
        let mut a = good.clone();
        f(&mut a);
        a
    };
    expect_invalid(
        set.insert(with(&|a| a.w_down.pop().map(drop).unwrap())),
        "w_down",
    );
    expect_invalid(
        set.insert(with(&|a| a.w_down = vec![0.0; 17 * k])),
        "w_down",
    );
    expect_invalid(set.insert(with(&|a| a.w_up.push(0.0))), "w_up");
    expect_invalid(
        set.insert(with(&|a| a.b_down = Some(vec![0.0; 5]))),
        "b_down",
    );
    expect_invalid(
        set.insert(with(&|a| a.b_up = Some(vec![0.0; n + 1]))),
        "b_up",
    );
    let seq = with(&|a| a.op = DeltaLinear::houlsby(Activation::Relu));
    assert!(matches!(set.insert(seq), Err(Error::Unsupported(_))));
    let gated = with(&|a| a.op.composition = Composition::Gated);
    assert!(matches!(set.insert(gated), Err(Error::Unsupported(_))));
    set.insert(good.clone()).unwrap();
    set.insert(good.clone()).unwrap();
    expect_invalid(set.insert(good), "set");
    expect_invalid(set.remove(2), "id");
    expect_invalid(AdapterSet::<f32>::new(n, k, 1, 257), "max_rank");
    expect_invalid(AdapterSet::<f32>::new(n, k, 0, 8), "capacity");
}

#[test]
fn bad_batches_are_errors_before_launch() {
    let mut rng = Rng::from_env();
    let (m, n, k) = (6, 12, 8);
    let mut set = AdapterSet::<f32>::new(n, k, 3, 16).unwrap();
    let a = set.insert(random_adapter(&mut rng, n, k, 4)).unwrap() as i32;
    let gone = set.insert(random_adapter(&mut rng, n, k, 8)).unwrap() as i32;
    set.remove(gone as usize).unwrap();
    let layer = Layer {
        x: scaled::<f32>(&mut rng, m * k, 1),
        w: scaled(&mut rng, n * k, k),
        bias: None,
    };
    let dims = MultiDeltaDims::new(m, n, k);
    let call = |set: &AdapterSet<f32>, dims: &MultiDeltaDims, batch: AdapterBatch<&[i32]>| {
        let mut y = poisoned::<f32>(m * n);
        let before = y.clone();
        let mut workspace = vec![0.0f32; dims.workspace_len(16)];
        let r = emulator::multi_delta_linear(
            dims,
            set,
            MultiDeltaLinearArgs {
                x: &layer.x,
                w: &layer.w,
                bias: None,
                batch,
                status: None,
                workspace: &mut workspace,
                y: &mut y,
            },
        );
        let untouched = y
            .iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(r.is_err() || !untouched, "an Ok call writes y");
        if r.is_err() {
            assert!(untouched, "nothing launches before an Err");
        }
        r
    };
    let rows = |ids: [i32; 6]| ids;
    expect_invalid(
        call(&set, &dims, AdapterBatch::Rows(&rows([a, a, 3, a, a, a]))),
        "batch.ids",
    );
    expect_invalid(
        call(&set, &dims, AdapterBatch::Rows(&rows([a, -2, a, a, a, a]))),
        "batch.ids",
    );
    expect_invalid(
        call(
            &set,
            &dims,
            AdapterBatch::Rows(&rows([a, a, gone, a, -1, a])),
        ),
        "batch.ids",
    );
    expect_invalid(call(&set, &dims, AdapterBatch::Rows(&[a; 5])), "batch.ids");
    let seg = |starts: &'static [i32], ids: &'static [i32]| AdapterBatch::Segments { starts, ids };
    // Out of order, past m, short of m, not from 0, a length mismatch, a removed adapter.
    let a_ids: &'static [i32] = Box::leak(vec![a, -1, a].into_boxed_slice());
    expect_invalid(call(&set, &dims, seg(&[0, 4, 2, 6], a_ids)), "batch.starts");
    expect_invalid(call(&set, &dims, seg(&[0, 2, 4, 7], a_ids)), "batch.starts");
    expect_invalid(call(&set, &dims, seg(&[0, 2, 4, 5], a_ids)), "batch.starts");
    expect_invalid(call(&set, &dims, seg(&[1, 2, 4, 6], a_ids)), "batch.starts");
    expect_invalid(call(&set, &dims, seg(&[0, 2, 6], a_ids)), "batch.starts");
    let gone_ids: &'static [i32] = Box::leak(vec![a, gone].into_boxed_slice());
    expect_invalid(call(&set, &dims, seg(&[0, 3, 6], gone_ids)), "batch.ids");
    call(&set, &dims, seg(&[0, 0, 6, 6], a_ids)).unwrap();
    // A set of another layer.
    let other = AdapterSet::<f32>::new(n + 1, k, 1, 16).unwrap();
    expect_invalid(call(&other, &dims, AdapterBatch::Rows(&[-1; 6])), "set");
    // Strides and shapes.
    let mut strided = dims;
    strided.ld_x = k - 1;
    expect_invalid(call(&set, &strided, AdapterBatch::Rows(&[-1; 6])), "x");
}

/// Ids the host cannot see (device memory) are checked by the kernels: a bad id, an empty
/// slot or a row no segment covers reads no adapter memory (memcheck), gets the base layer
/// alone, and sets its status bit. Plans the call without the host's view of the batch, as
/// the GPU backend does. f32 on the unfused kernels, bf16 on the fused pass.
#[test]
fn device_ids_out_of_range_flag_the_status() {
    device_ids::<f32>(&[KernelVariant::Naive, KernelVariant::Simt]);
    device_ids::<bf16>(&[KernelVariant::Auto]);
}

fn device_ids<T: Element>(kernels: &[KernelVariant]) {
    let mut rng = Rng::from_env();
    let (m, n, k) = (5, 20, 12);
    let mut set = AdapterSet::<T>::new(n, k, 3, 16).unwrap();
    let a = set.insert(random_adapter(&mut rng, n, k, 4)).unwrap() as i32;
    let gone = set.insert(random_adapter(&mut rng, n, k, 8)).unwrap() as i32;
    set.remove(gone as usize).unwrap();
    let layer = Layer {
        x: scaled::<T>(&mut rng, m * k, 1),
        w: scaled(&mut rng, n * k, k),
        bias: Some(scaled(&mut rng, n, 4)),
    };
    let x = MatRef::new(&layer.x, m, k);
    let w = MatRef::new(&layer.w, n, k);
    let cases: [(AdapterBatch<Vec<i32>>, Vec<i32>, u32); 4] = [
        (
            AdapterBatch::Rows(vec![a, 3, -1, 1 << 30, a]),
            vec![a, -1, -1, -1, a],
            MultiStatus::ID_OUT_OF_RANGE,
        ),
        (
            AdapterBatch::Rows(vec![gone, a, -7, a, a]),
            vec![-1, a, -1, a, a],
            MultiStatus::EMPTY_SLOT | MultiStatus::ID_OUT_OF_RANGE,
        ),
        (
            // Out of order: rows 3 and 4 land on segment [1, 2), which does not hold them.
            AdapterBatch::Segments {
                starts: vec![0, 3, 1, 2],
                ids: vec![a, -1, a],
            },
            vec![a, a, a, -1, -1],
            MultiStatus::ROW_UNCOVERED,
        ),
        (
            AdapterBatch::Segments {
                starts: vec![1, 9],
                ids: vec![a],
            },
            vec![-1, a, a, a, a],
            MultiStatus::ROW_UNCOVERED,
        ),
    ];
    for &kernel in kernels {
        for (batch, effective, bits) in &cases {
            let mut dims = MultiDeltaDims::new(m, n, k);
            dims.kernel = kernel;
            let mut y = poisoned::<T>(m * n);
            let mut workspace = poisoned::<T>(dims.workspace_len(16));
            let mut status = [0u32];
            let batch_ref = match batch {
                AdapterBatch::Rows(ids) => AdapterBatch::Rows(ids.as_slice()),
                AdapterBatch::Segments { starts, ids } => AdapterBatch::Segments {
                    starts: starts.as_slice(),
                    ids: ids.as_slice(),
                },
            };
            let mut src = Plain;
            let b = MultiDeltaLinearArgs {
                x: layer.x.as_slice(),
                w: layer.w.as_slice(),
                bias: layer.bias.as_deref(),
                batch: batch_ref,
                status: Some(status.as_mut_slice()),
                workspace: workspace.as_mut_slice(),
                y: y.as_mut_slice(),
            }
            .bufs(&mut src);
            let steps = plan::multi_delta_linear(&dims, T::DTYPE, &set.view(), &b, None).unwrap();
            for (l, p) in &steps.delta {
                // SAFETY: the plan checked every buffer, and the kernels guard the ids.
                unsafe { emulator::launch(l, p) }.unwrap();
            }
            for (l, p) in &steps.frozen {
                // SAFETY: as above.
                unsafe { emulator::launch(l, p) }.unwrap();
            }
            let want = reference::multi_delta_linear(x, w, layer.bias.as_deref(), &set, effective)
                .unwrap();
            let tol = default_tolerance(T::DTYPE);
            assert_close_matrix("y", &y, MatrixLayout::contiguous(m, n), &want, tol);
            assert_eq!(status[0], *bits, "{kernel:?} {batch:?}");
        }
    }
}

/// Host slices as plan buffers, without the emulator's bookkeeping.
struct Plain;
impl<'r, 'w, A, B> BufSource<&'r [A], &'w mut [B]> for Plain {
    fn read(&mut self, r: &'r [A]) -> Buf {
        Buf {
            addr: r.as_ptr() as u64,
            len: r.len(),
        }
    }
    fn write(&mut self, w: &'w mut [B]) -> Buf {
        Buf {
            addr: w.as_ptr() as u64,
            len: w.len(),
        }
    }
}

#[test]
fn parameter_blocks_match_the_kernels() {
    unsafe extern "C" {
        fn pk_sizeof_MultiDeltaParams() -> usize;
        fn pk_sizeof_AdapterEntry() -> usize;
        fn pk_sizeof_MultiBatch() -> usize;
    }
    // SAFETY: the emulator library exports both (kernels/multi_delta_linear.cu).
    unsafe {
        assert_eq!(
            pk_sizeof_MultiDeltaParams(),
            size_of::<plan::MultiDeltaParams>()
        );
        assert_eq!(pk_sizeof_AdapterEntry(), size_of::<plan::AdapterEntry>());
        assert_eq!(pk_sizeof_MultiBatch(), size_of::<plan::MultiBatch>());
    }
}

/// An empty batch is checked and launches nothing.
#[test]
fn an_empty_batch_launches_nothing() {
    let set = AdapterSet::<bf16>::new(8, 8, 1, 8).unwrap();
    let dims = MultiDeltaDims::new(0, 8, 8);
    let (x, w) = (vec![], vec![bf16::ZERO; 64]);
    let mut y: Vec<bf16> = vec![];
    emulator::multi_delta_linear(
        &dims,
        &set,
        MultiDeltaLinearArgs {
            x: &x,
            w: &w,
            bias: None,
            batch: AdapterBatch::Segments {
                starts: &[0],
                ids: &[],
            },
            status: None,
            workspace: &mut [],
            y: &mut y,
        },
    )
    .unwrap();
}

/// The GPU twins: the same random mixtures on a device set with device batches, and device
/// ids out of range flagged by the kernels.
#[cfg(feature = "cuda")]
mod on_gpu {
    use super::*;
    use peft_kernels::cuda::{self, DeviceAdapterSet, DeviceMultiDeltaLinearArgs};

    fn mixtures<T: Element>(cases: usize) {
        let stream = cuda::context(0).expect("a CUDA device").default_stream();
        let mut rng = Rng::from_env();
        let tol = default_tolerance(T::DTYPE);
        for case in 0..cases {
            // Decode and prefill, with K and N past every tile.
            let m = rng.pick(&[1, 7, 16, 33, 64, 200]);
            let (n, k) = (rng.pick(&[8, 72, 520]), rng.pick(&[16, 264, 1032]));
            let count = rng.range(1, 12);
            let (host_set, ids) = random_set::<T>(&mut rng, n, k, count);
            let mut set =
                DeviceAdapterSet::<T>::new(&stream, n, k, host_set.capacity(), host_set.max_rank())
                    .unwrap();
            // The same ids as the host set: slots filled in order (the lowest free slot is
            // taken), a filler in each hole, removed at the end.
            let filler = random_adapter::<T>(&mut rng, n, k, 1);
            for slot in 0..host_set.capacity() {
                let id = set
                    .insert_host(host_set.get(slot).unwrap_or(&filler))
                    .unwrap();
                assert_eq!(id, slot);
            }
            for slot in 0..host_set.capacity() {
                if host_set.get(slot).is_none() {
                    set.remove(slot).unwrap();
                }
            }
            let dims = MultiDeltaDims::new(m, n, k);
            let x = scaled::<T>(&mut rng, m * k, 1);
            let w = scaled::<T>(&mut rng, n * k, k);
            let rows = random_rows(&mut rng, m, &ids);
            let want = reference::multi_delta_linear(
                MatRef::new(&x, m, k),
                MatRef::new(&w, n, k),
                None,
                &host_set,
                &rows,
            )
            .unwrap();
            let d = |v: &[T]| stream.clone_htod(v).unwrap();
            let (dx, dw) = (d(&x), d(&w));
            let dids = stream.clone_htod(&rows).unwrap();
            let mut dy = stream.clone_htod(&poisoned::<T>(m * n)).unwrap();
            let mut ws = stream
                .alloc_zeros::<T>(dims.workspace_len(set.max_rank()))
                .unwrap();
            let mut status = stream.alloc_zeros::<u32>(1).unwrap();
            let args: DeviceMultiDeltaLinearArgs<T> = MultiDeltaLinearArgs {
                x: &dx,
                w: &dw,
                bias: None,
                batch: AdapterBatch::Rows(&dids),
                status: Some(&mut status),
                workspace: &mut ws,
                y: &mut dy,
            };
            cuda::multi_delta_linear(&stream, &dims, &set, args).unwrap();
            let y = stream.clone_dtoh(&dy).unwrap();
            let what = format!("case {case} m {m} n {n} k {k}");
            assert_close_matrix(&what, &y, MatrixLayout::contiguous(m, n), &want, tol);
            assert_eq!(stream.clone_dtoh(&status).unwrap(), [0]);
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn random_mixtures_bf16() {
        mixtures::<bf16>(random_cases(12));
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn random_mixtures_f16_and_f32() {
        mixtures::<f16>(random_cases(6));
        mixtures::<f32>(random_cases(6));
    }

    /// f32 on the unfused path, bf16 on the fused pass.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn device_ids_out_of_range_flag_the_status() {
        device_ids::<f32>();
        device_ids::<bf16>();
    }

    fn device_ids<T: Element>() {
        let stream = cuda::context(0).expect("a CUDA device").default_stream();
        let mut rng = Rng::from_env();
        let (m, n, k) = (4, 64, 64);
        let mut set = DeviceAdapterSet::<T>::new(&stream, n, k, 2, 8).unwrap();
        // Slot 0 filled; slot 1 empty (removed); ids 2, -5 and 2^30 out of range.
        set.insert_host(&random_adapter(&mut rng, n, k, 8)).unwrap();
        let gone = set.insert_host(&random_adapter(&mut rng, n, k, 4)).unwrap();
        set.remove(gone).unwrap();
        let x = scaled::<T>(&mut rng, m * k, 1);
        let w = scaled::<T>(&mut rng, n * k, k);
        let want = peft_kernels::reference::linear::linear(
            MatRef::new(&x, m, k),
            MatRef::new(&w, n, k),
            None,
        )
        .unwrap();
        let dims = MultiDeltaDims::new(m, n, k);
        let (dx, dw) = (
            stream.clone_htod(&x).unwrap(),
            stream.clone_htod(&w).unwrap(),
        );
        let dids = stream.clone_htod(&[2, -5, 1, 1 << 30]).unwrap();
        let mut dy = stream.clone_htod(&poisoned::<T>(m * n)).unwrap();
        let mut ws = stream.alloc_zeros::<T>(dims.workspace_len(8)).unwrap();
        let mut status = stream.alloc_zeros::<u32>(1).unwrap();
        cuda::multi_delta_linear(
            &stream,
            &dims,
            &set,
            MultiDeltaLinearArgs {
                x: &dx,
                w: &dw,
                bias: None,
                batch: AdapterBatch::Rows(&dids),
                status: Some(&mut status),
                workspace: &mut ws,
                y: &mut dy,
            },
        )
        .unwrap();
        let y = stream.clone_dtoh(&dy).unwrap();
        let tol = default_tolerance(T::DTYPE);
        assert_close_matrix("y", &y, MatrixLayout::contiguous(m, n), &want, tol);
        let bits = MultiStatus::ID_OUT_OF_RANGE | MultiStatus::EMPTY_SLOT;
        assert_eq!(stream.clone_dtoh(&status).unwrap(), [bits]);
    }
}
