//! A tour of the unified view: every method of He et al. (ICLR 2022) run through one
//! transformer block of realistic width (d = 1024, 16 heads, FFN 4096) on the best backend
//! at hand (the GPU when the crate is built with `cuda` and a device is present, else the
//! CPU emulator of the same kernels), each checked against the f64 CPU reference.
//!
//! ```text
//! cargo run --release --example tour                   # emulator
//! cargo run --release --features cuda --example tour   # GPU if present, else emulator
//! ```
//!
//! Exits non-zero if any method's error exceeds the bf16 tolerance.

use std::time::Instant;

use half::bf16;
use peft_kernels::delta_linear::{
    DeltaApplyArgs, DeltaApplyDims, DeltaLinear, DeltaLinearArgs, DeltaLinearDims,
};
use peft_kernels::host::{self, Backend};
use peft_kernels::prefix_attention::{PrefixAttention, PrefixAttentionArgs, PrefixAttentionDims};
use peft_kernels::reference::adapter::{
    multi_head_adapter, MultiHeadAdapter, MultiHeadAdapterTensors,
};
use peft_kernels::reference::attention::{self, PrefixAttentionTensors, Tensor4};
use peft_kernels::reference::linear::{self as reference, DeltaLinearTensors};
use peft_kernels::reference::MatRef;
use peft_kernels::validate::{compare, default_tolerance};
use peft_kernels::{Activation, Composition, DType, Element, Insertion, Result};

/// The block: d_model, heads, FFN width, tokens (batch 2 × sequence 32).
const D: usize = 1024;
const HEADS: usize = 16;
const DH: usize = D / HEADS;
const FFN: usize = 4 * D;
const BATCH: usize = 2;
const SEQ: usize = 32;
const M: usize = BATCH * SEQ;
/// Parameters of the frozen block: Q, K, V, O (4·d²) and the FFN (2·d·4d), biases aside.
const BLOCK_PARAMS: usize = 4 * D * D + 2 * D * FFN;

type T = bf16;

/// A tiny deterministic generator (the tour needs reproducible numbers, not statistics).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    /// `n` values uniform in ±1/sqrt(fan_in), as nn.Linear initialises.
    fn weights(&mut self, n: usize, fan_in: usize) -> Vec<T> {
        let s = 1.0 / (fan_in as f64).sqrt();
        (0..n).map(|_| T::from_f64(s * self.next())).collect()
    }
    fn activations(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f64(self.next())).collect()
    }
}

/// One row of the table.
struct Row {
    method: &'static str,
    params: usize,
    rel_err: f64,
    seconds: f64,
}

/// A delta-linear layer of the block: frozen W [n, k] with bias, input x [M, k], and a
/// bottleneck of width r; runs the kernels and the reference, returns (rel. error, seconds).
struct Layer {
    x: Vec<T>,
    w: Vec<T>,
    b: Vec<T>,
    n: usize,
    k: usize,
}

impl Layer {
    fn new(g: &mut Lcg, n: usize, k: usize) -> Self {
        Layer {
            x: g.activations(M * k),
            w: g.weights(n * k, k),
            b: g.weights(n, k),
            n,
            k,
        }
    }

    /// The layer with a delta of width r reading `u` (None: x, or h when sequential).
    fn run(
        &self,
        backend: &Backend,
        g: &mut Lcg,
        op: DeltaLinear,
        r: usize,
        u: Option<(&[T], usize)>,
    ) -> Result<(f64, f64)> {
        let k_u = match (op.insertion, u) {
            (Insertion::Sequential, _) => self.n,
            (Insertion::Parallel, Some((_, k_u))) => k_u,
            (Insertion::Parallel, None) => self.k,
        };
        let (w_down, w_up) = (g.weights(r * k_u, k_u), g.weights(self.n * r, r));
        let (b_down, b_up) = (g.weights(r, k_u), g.weights(self.n, r));
        // LoRA has no biases in its bottleneck; adapters do.
        let biased = op.activation != Activation::Identity;
        let mut dims = DeltaLinearDims::new(M, self.n, self.k, r);
        if let Some((_, k_u)) = u {
            (dims.k_u, dims.ld_u) = (k_u, k_u);
        }
        let mut y = vec![T::nan(); M * self.n];
        let mut workspace = vec![T::nan(); dims.workspace_len()];
        let start = Instant::now();
        host::delta_linear(
            backend,
            &op,
            &dims,
            DeltaLinearArgs {
                x: &self.x,
                w: &self.w,
                bias: Some(&self.b),
                u: u.map(|(u, _)| u),
                w_down: &w_down,
                b_down: biased.then_some(&b_down[..]),
                w_up: &w_up,
                b_up: biased.then_some(&b_up[..]),
                gate: None,
                workspace: &mut workspace,
                y: &mut y,
            },
        )?;
        let seconds = start.elapsed().as_secs_f64();
        let expected = reference::delta_linear(
            &op,
            &DeltaLinearTensors {
                x: MatRef::new(&self.x, M, self.k),
                w: MatRef::new(&self.w, self.n, self.k),
                b: Some(&self.b),
                u: u.map(|(u, k_u)| MatRef::new(u, M, k_u)),
                w_down: MatRef::new(&w_down, r, k_u),
                b_down: biased.then_some(&b_down[..]),
                w_up: MatRef::new(&w_up, self.n, r),
                b_up: biased.then_some(&b_up[..]),
                gate: None,
            },
        )?;
        Ok((
            compare("y", &y, &expected, default_tolerance(DType::BF16))?.rel_err,
            seconds,
        ))
    }
}

/// Combines the rows of a method applied at several layers: worst error, total time.
fn worst(parts: &[(f64, f64)]) -> (f64, f64) {
    parts
        .iter()
        .fold((0.0, 0.0), |(e, t), &(pe, pt)| (e.max(pe), t + pt))
}

fn main() -> Result<()> {
    let backend = Backend::best()?;
    #[cfg(feature = "emulator")]
    if matches!(backend, Backend::Emulator) {
        // Blocks are independent: spread them over every core (results do not change).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        peft_kernels::emulator::set_workers(cores as u32);
    }
    println!("peft-kernels tour: one transformer block, d = {D}, {HEADS} heads, FFN {FFN}, {M} tokens, bf16");
    println!("backend: {}\n", backend.describe());

    let mut g = Lcg(0x5EED);
    let q_proj = Layer::new(&mut g, D, D);
    let v_proj = Layer::new(&mut g, D, D);
    let o_proj = Layer::new(&mut g, D, D);
    let fc2 = Layer::new(&mut g, D, FFN);
    let ffn_in = g.activations(M * D);
    let mut rows = Vec::new();

    // LoRA on W_q and W_v (Hu et al.): r = 8, α = 16.
    let r = 8;
    let lora = DeltaLinear::lora(16.0);
    let (e, t) = worst(&[
        q_proj.run(&backend, &mut g, lora, r, None)?,
        v_proj.run(&backend, &mut g, lora, r, None)?,
    ]);
    rows.push(Row {
        method: "LoRA (W_q, W_v; r=8)",
        params: 2 * r * 2 * D,
        rel_err: e,
        seconds: t,
    });

    // Houlsby adapter: sequential, ReLU, after the attention output and the FFN output.
    let r = 64;
    let houlsby = DeltaLinear::houlsby(Activation::Relu);
    let (e, t) = worst(&[
        o_proj.run(&backend, &mut g, houlsby, r, None)?,
        fc2.run(&backend, &mut g, houlsby, r, None)?,
    ]);
    rows.push(Row {
        method: "Houlsby adapter (r=64)",
        params: 2 * (2 * r * D + r + D),
        rel_err: e,
        seconds: t,
    });

    // Parallel adapter at the FFN: reads the FFN's input, adds to its output (fused into fc2).
    for (method, scale, r) in [
        ("Parallel adapter (FFN; r=64)", 1.0, 64),
        ("Scaled PA (FFN; r=512, s=4)", 4.0, 512),
    ] {
        let op = DeltaLinear::parallel_adapter(Activation::Relu, scale);
        let (e, t) = fc2.run(&backend, &mut g, op, r, Some((&ffn_in, D)))?;
        rows.push(Row {
            method,
            params: 2 * r * D + r + D,
            rel_err: e,
            seconds: t,
        });
    }

    // Multi-head PA: one bottleneck per head on the heads' outputs, reading the head's query.
    let r = 16;
    let heads_out = g.activations(M * D);
    let queries = g.activations(M * D);
    let (w_down, b_down) = (g.weights(HEADS * r * DH, DH), g.weights(HEADS * r, DH));
    let (w_up, b_up) = (g.weights(HEADS * DH * r, r), g.weights(D, r));
    let op = DeltaLinear::new(Insertion::Parallel, Activation::Relu, Composition::Add);
    let dims = DeltaApplyDims::new(M, HEADS, DH, DH, r);
    let mut y = vec![T::nan(); M * D];
    let mut workspace = vec![T::nan(); dims.workspace_len()];
    let start = Instant::now();
    host::delta_apply(
        &backend,
        &op,
        &dims,
        DeltaApplyArgs {
            h: Some(&heads_out),
            u: Some(&queries),
            w_down: &w_down,
            b_down: Some(&b_down),
            w_up: &w_up,
            b_up: Some(&b_up),
            gate: None,
            workspace: &mut workspace,
            y: &mut y,
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let expected = multi_head_adapter(
        &MultiHeadAdapter {
            heads: HEADS,
            rank: r,
            activation: Activation::Relu,
            composition: Composition::Add,
        },
        &MultiHeadAdapterTensors {
            h: MatRef::new(&heads_out, M, D),
            u: MatRef::new(&queries, M, D),
            w_down: &w_down,
            b_down: Some(&b_down),
            w_up: &w_up,
            b_up: Some(&b_up),
        },
    )?;
    let rel_err = compare("y", &y, &expected, default_tolerance(DType::BF16))?.rel_err;
    rows.push(Row {
        method: "Multi-head PA (16 heads; r=16)",
        params: HEADS * (2 * r * DH + r + DH),
        rel_err,
        seconds,
    });

    // Prefix tuning (Li & Liang): l = 30 learned key and value vectors per head, shared by
    // the batch, attended with the causal context and gated by λ = sigmoid(LSE_p − LSE_c).
    let l = 30;
    let (e, t) = prefix_tuning(&backend, &mut g, l)?;
    let prefix_params = 2 * l * D;
    rows.push(Row {
        method: "Prefix tuning (l=30)",
        params: prefix_params,
        rel_err: e,
        seconds: t,
    });

    // MAM adapter: prefix tuning at attention + scaled PA (r = 512, s = 4) at the FFN, the
    // paper's best: the two rows measured above, together.
    let scaled_pa = rows
        .iter()
        .find(|r| r.method.starts_with("Scaled PA"))
        .expect("measured above");
    rows.push(Row {
        method: "MAM (prefix l=30 + scaled PA)",
        params: prefix_params + scaled_pa.params,
        rel_err: e.max(scaled_pa.rel_err),
        seconds: t + scaled_pa.seconds,
    });

    print_table(&backend, &rows)
}

/// Causal self-attention of the block's 16 heads over its sequences, with `l` prefix
/// vectors per head; checks the output and the gate λ.
fn prefix_tuning(backend: &Backend, g: &mut Lcg, l: usize) -> Result<(f64, f64)> {
    let dims = PrefixAttentionDims::new(BATCH, HEADS, HEADS, SEQ, SEQ, l, DH).with_shared_prefix();
    let (q, k, v) = (
        g.activations(M * D),
        g.activations(M * D),
        g.activations(M * D),
    );
    let (pk, pv) = (g.activations(l * D), g.activations(l * D));
    let op = PrefixAttention {
        scale: None,
        causal: true,
    };
    let mut out = vec![T::nan(); M * D];
    let mut lambda = vec![f32::NAN; dims.rows()];
    let start = Instant::now();
    host::prefix_attention(
        backend,
        &op,
        &dims,
        PrefixAttentionArgs {
            q: &q,
            k: &k,
            v: &v,
            prefix_k: &pk,
            prefix_v: &pv,
            context_lens: None,
            out: &mut out,
            lse: None,
            lambda: Some(&mut lambda),
            workspace: None,
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let shape = [BATCH, HEADS, SEQ, DH];
    let prefix_shape = [BATCH, HEADS, l, DH];
    let prefix_strides = [0, l * DH, DH, 1];
    let expected = attention::prefix_attention(
        &op,
        &PrefixAttentionTensors {
            q: Tensor4::contiguous(&q, shape),
            k: Tensor4::contiguous(&k, shape),
            v: Tensor4::contiguous(&v, shape),
            prefix_k: Tensor4::strided(&pk, prefix_shape, prefix_strides),
            prefix_v: Tensor4::strided(&pv, prefix_shape, prefix_strides),
            context_lens: None,
        },
    )?;
    let tol = default_tolerance(DType::BF16);
    let out_err = compare("out", &out, &expected.out, tol)?.rel_err;
    let lambda_err = compare("lambda", &lambda, &expected.lambda, tol)?.rel_err;
    Ok((out_err.max(lambda_err), seconds))
}

fn print_table(backend: &Backend, rows: &[Row]) -> Result<()> {
    let tol = default_tolerance(DType::BF16);
    let name = match backend {
        #[cfg(feature = "emulator")]
        Backend::Emulator => "emulator",
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => "gpu",
    };
    println!(
        "{:<34} {:<9} {:>10} {:>12} {:>11}",
        "method", "backend", "tuned %", "rel. error", "time"
    );
    let mut failed = 0;
    for r in rows {
        let ok = r.rel_err <= tol;
        failed += usize::from(!ok);
        println!(
            "{:<34} {:<9} {:>9.3}% {:>12.2e} {:>9.1} ms{}",
            r.method,
            name,
            100.0 * r.params as f64 / BLOCK_PARAMS as f64,
            r.rel_err,
            1e3 * r.seconds,
            if ok { "" } else { "  FAILED" }
        );
    }
    println!(
        "\nrelative error ‖out − ref‖/‖ref‖ against the f64 reference; bf16 tolerance {tol:e}."
    );
    println!("time: the host call (on the GPU it includes copying the tensors in and out).");
    if failed > 0 {
        eprintln!("{failed} method(s) exceeded the tolerance");
        std::process::exit(1);
    }
    Ok(())
}
