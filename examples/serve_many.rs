//! Serving many fine-tunes of one layer at once: a set of LoRA, rsLoRA and (scaled) parallel
//! adapter fine-tunes of one 1024 × 1024 projection, in bf16, serves a decode batch (one id
//! per request, some requests on the base model) and a prefill batch (segments of prompt
//! tokens per request) in one call each, on the best backend at hand (the GPU when built with
//! `cuda` and a device is present, else the CPU emulator). Every row is checked against the
//! single-adapter f64 reference of its own adapter.
//!
//! ```text
//! cargo run --release --example serve_many
//! cargo run --release --features cuda --example serve_many
//! ```
//!
//! Exits non-zero if any row's error exceeds the bf16 tolerance.

use half::bf16;
use peft_kernels::delta_linear::DeltaLinear;
use peft_kernels::host::{self, Backend};
use peft_kernels::multi_adapter::{
    rows_of, Adapter, AdapterBatch, AdapterSet, MultiDeltaDims, MultiDeltaLinearArgs,
};
use peft_kernels::reference::{multi_adapter as reference, MatRef};
use peft_kernels::validate::{compare, default_tolerance};
use peft_kernels::{Activation, DType, Element, Result};

const N: usize = 1024;
const K: usize = 1024;

type T = bf16;

/// A tiny deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, len: usize, scale: f64) -> Vec<T> {
        (0..len).map(|_| T::from_f64(scale * self.next())).collect()
    }
}

fn main() -> Result<()> {
    let backend = Backend::best()?;
    println!("backend: {}", backend.describe());
    let mut rng = Lcg(17);
    let fan = |k: usize| 1.0 / (k as f64).sqrt();
    // The fine-tunes: (name, method, rank, biases).
    let tunes: [(&str, DeltaLinear, usize, bool); 6] = [
        ("lora r8 α16", DeltaLinear::lora(16.0), 8, false),
        ("lora r4 α8", DeltaLinear::lora(8.0), 4, false),
        ("rslora r64 α16", DeltaLinear::rslora(16.0), 64, false),
        (
            "adapter relu r16",
            DeltaLinear::parallel_adapter(Activation::Relu, 1.0),
            16,
            true,
        ),
        (
            "scaled PA gelu r33 s4",
            DeltaLinear::parallel_adapter(Activation::GeluTanh, 4.0),
            33,
            true,
        ),
        (
            "adapter silu r256 s0.5",
            DeltaLinear::parallel_adapter(Activation::Silu, 0.5),
            256,
            true,
        ),
    ];
    let mut set = AdapterSet::<T>::new(N, K, 64, 256)?;
    let mut ids = Vec::new();
    for (name, op, r, biases) in tunes {
        let mut bias = |len| biases.then(|| rng.vec(len, 0.1));
        let (b_down, b_up) = (bias(r), bias(N));
        let id = set.insert(Adapter {
            op,
            w_down: rng.vec(r * K, fan(K)),
            b_down,
            w_up: rng.vec(N * r, fan(r)),
            b_up,
        })?;
        println!("adapter {id}: {name}");
        ids.push(id as i32);
    }
    // A tenant leaves: its slot is emptied, nobody else moves.
    let gone = set.insert(Adapter {
        op: DeltaLinear::lora(2.0),
        w_down: rng.vec(K, fan(K)),
        b_down: None,
        w_up: rng.vec(N, 1.0),
        b_up: None,
    })?;
    set.remove(gone)?;

    let (w, b) = (rng.vec(N * K, fan(K)), rng.vec(N, 0.1));
    // Decode: 12 requests, one token each (−1: the base model).
    let decode: Vec<i32> = [0, 2, -1, 5, 1, 0, 3, 4, 4, -1, 2, 5]
        .iter()
        .map(|&i| if i < 0 { -1 } else { ids[i as usize] })
        .collect();
    let mut failed = serve(
        &backend,
        &set,
        (&w, &b),
        AdapterBatch::Rows(&decode),
        "decode",
        &mut rng,
    )?;
    // Prefill: 4 prompts of 9, 0, 17 and 6 tokens on adapters 3, 1, 5 and none.
    let starts = [0, 9, 9, 26, 32];
    let seg_ids = [ids[3], ids[1], ids[5], -1];
    let prefill = AdapterBatch::Segments {
        starts: &starts[..],
        ids: &seg_ids[..],
    };
    failed |= serve(&backend, &set, (&w, &b), prefill, "prefill", &mut rng)?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// One batch through the layer, each row checked against its reference; whether any failed.
fn serve(
    backend: &Backend,
    set: &AdapterSet<T>,
    (w, b): (&[T], &[T]),
    batch: AdapterBatch<&[i32]>,
    what: &str,
    rng: &mut Lcg,
) -> Result<bool> {
    let m = match batch {
        AdapterBatch::Rows(ids) => ids.len(),
        AdapterBatch::Segments { starts, .. } => *starts.last().unwrap_or(&0) as usize,
    };
    let rows = rows_of(batch, m)?;
    let dims = MultiDeltaDims::new(m, N, K);
    let x = rng.vec(m * K, 1.0);
    let mut y = vec![T::nan(); m * N];
    let mut workspace = vec![T::ZERO; dims.workspace_len(set.max_rank())];
    let started = std::time::Instant::now();
    host::multi_delta_linear(
        backend,
        &dims,
        set,
        MultiDeltaLinearArgs {
            x: &x,
            w,
            bias: Some(b),
            batch,
            status: None,
            workspace: &mut workspace,
            y: &mut y,
        },
    )?;
    println!("{what}: {m} rows in one call, {:.2?}", started.elapsed());
    let want = reference::multi_delta_linear(
        MatRef::new(&x, m, K),
        MatRef::new(w, N, K),
        Some(b),
        set,
        &rows,
    )?;
    let mut failed = false;
    for (row, &id) in rows.iter().enumerate() {
        let range = row * N..(row + 1) * N;
        let c = compare(
            "y",
            &y[range.clone()],
            &want[range],
            default_tolerance(DType::BF16),
        )?;
        let verdict = if c.passed() { "ok" } else { "MISMATCH" };
        println!(
            "  row {row:2}, adapter {id:2}: rel err {:.2e} {verdict}",
            c.rel_err
        );
        failed |= !c.passed();
    }
    Ok(failed)
}
