//! Loads the PEFT adapters (LoRA, DoRA, prefix tuning) committed under tests/fixtures/peft and
//! prints, per layer, PEFT's own output (saved by scripts/peft-fixtures/generate.py) against
//! the crate's, run on the GPU when there is one, else on the emulator.
//!
//! ```sh
//! cargo run --release --features peft --example peft_adapter                 # every fixture
//! cargo run --release --features peft --example peft_adapter -- tests/fixtures/peft/llama_dora
//! ```

use half::{bf16, f16};
use peft_kernels::delta_linear::{DeltaLinearArgs, HostDeltaLinearArgs};
use peft_kernels::dora::{DoraLinearArgs, DoraNormArgs};
use peft_kernels::host::{self, Backend};
use peft_kernels::peft::{self, Adapter, LoraModule, PrefixAdapter, Tensor};
use peft_kernels::prefix_attention::{HeadLayout, PrefixAttention, PrefixAttentionArgs};
use peft_kernels::validate::{compare, default_tolerance};
use peft_kernels::{DType, Element, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One layer through the kernels: `delta_linear`, or for DoRA `dora_norm` then `dora_linear`
/// (one fused pass with the magnitude's scale, then the bias, in its epilogue), in the dtype
/// PEFT ran it in.
fn layer<T: Element>(
    backend: &Backend,
    m: &LoraModule,
    io: &BTreeMap<String, Tensor>,
) -> Result<Vec<T>> {
    let x = io[&format!("{}.x", m.name)].as_slice::<T>()?;
    let w = m.frozen_weight(io[&format!("{}.weight", m.name)].as_slice::<T>()?)?;
    let bias: Option<Vec<T>> = match (&m.bias, io.get(&format!("{}.bias", m.name))) {
        (Some(trained), _) => Some(trained.to()),
        (None, Some(original)) => Some(original.to()),
        (None, None) => None,
    };
    let (a, b) = (m.w_down.to::<T>(), m.w_up.to::<T>());
    let b_up: Option<Vec<T>> = m.b_up.as_ref().map(Tensor::to);
    let dims = m.dims(x.len() / m.in_features);
    let mut workspace = vec![T::default(); dims.workspace_len()];
    let mut y = vec![T::default(); dims.m * dims.n];
    let forward: HostDeltaLinearArgs<T> = DeltaLinearArgs {
        x,
        w: &w,
        bias: bias.as_deref(),
        u: None,
        w_down: &a,
        b_down: None,
        w_up: &b,
        b_up: b_up.as_deref(),
        gate: None,
        workspace: &mut workspace,
        y: &mut y,
    };
    match &m.magnitude {
        None => host::delta_linear(backend, &m.op(), &dims, forward)?,
        Some(magnitude) => {
            // g depends on the weights only: a server computes it once per adapter.
            let d = m.dora_dims();
            let mut g = vec![0.0f32; d.n];
            let magnitude = magnitude.to::<T>();
            host::dora_norm(
                backend,
                &d,
                m.scale,
                DoraNormArgs {
                    w: &w[..],
                    w_down: &a,
                    w_up: &b,
                    magnitude: &magnitude,
                    g: &mut g,
                    norm: None,
                },
            )?;
            host::dora_linear(backend, &m.op(), &dims, DoraLinearArgs { forward, g: &g })?;
        }
    }
    Ok(y)
}

/// Each layer of a prefix-tuning adapter: the fused prefix attention over the checkpoint's
/// prefix and the context keys PEFT's attention saw, against PEFT's attention output.
fn prefix(backend: &Backend, p: &PrefixAdapter, io: &BTreeMap<String, Tensor>) -> Result<()> {
    for (i, layer) in p.layers.iter().enumerate() {
        let t = |n: &str| io[&format!("layers.{i}.{n}")].to::<f32>();
        let shape = |n: &str| io[&format!("layers.{i}.{n}")].shape.clone();
        let (q, key, value, out) = (t("query"), t("key"), t("value"), t("out"));
        let ([b, h, lq, d], [_, hkv, total, _]) = (
            <[usize; 4]>::try_from(shape("query")).expect("[B, H, L, d]"),
            <[usize; 4]>::try_from(shape("key")).expect("[B, Hkv, l + L, d]"),
        );
        let l = p.num_virtual_tokens;
        // PEFT's keys and values have the prefix in front: the context is the rest.
        let context = |full: &[f32]| -> Vec<f32> {
            full.chunks(total * d)
                .flat_map(|rows| rows[l * d..].to_vec())
                .collect()
        };
        let (k, v) = (context(&key), context(&value));
        let mut dims = p.dims(b, h, lq, total - l);
        dims.out = HeadLayout::bshd(lq, h, d); // PEFT's attention output is [B, L, H, d]
        let mut o = vec![0.0f32; b * lq * h * d];
        host::prefix_attention(
            backend,
            &PrefixAttention {
                scale: None,
                causal: true,
            },
            &dims,
            PrefixAttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                prefix_k: layer.key.as_slice()?,
                prefix_v: layer.value.as_slice()?,
                context_lens: None,
                out: &mut o,
                lse: None,
                lambda: None,
                workspace: None,
            },
        )?;
        let expected: Vec<f64> = out.iter().map(|&v| v.into()).collect();
        let c = compare("attention", &o, &expected, 1e-5)?;
        println!(
            "  layer {i} attention, {l} virtual tokens over {hkv} KV head(s)  PEFT out[0..3] = {:>9.5?}  crate: rel err {:.2e} (tol 1e-5) {}",
            &expected[..3],
            c.rel_err,
            if c.passed() { "ok" } else { "MISMATCH" }
        );
    }
    Ok(())
}

fn show(backend: &Backend, dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map_or(dir.display().to_string(), |n| n.to_string_lossy().into());
    let io = peft::read_safetensors(dir.join("io.safetensors"))?;
    let adapter = match peft::load(dir)? {
        Adapter::Lora(a) => a,
        Adapter::PrefixTuning(p) => {
            println!("{name}: prefix tuning, {} layers", p.layers.len());
            return prefix(backend, &p, &io);
        }
    };
    println!(
        "{name}: {} layers with LoRA{}",
        adapter.modules.len(),
        if adapter.config.use_dora {
            " (DoRA)"
        } else {
            ""
        }
    );
    for m in &adapter.modules {
        let Some(y_peft) = io.get(&format!("{}.y", m.name)) else {
            continue;
        };
        let expected: Vec<f64> = y_peft.to::<f32>().iter().map(|&v| v.into()).collect();
        let tol = default_tolerance(y_peft.dtype());
        let c = match y_peft.dtype() {
            DType::F32 => compare(&m.name, &layer::<f32>(backend, m, &io)?, &expected, tol),
            DType::F16 => compare(&m.name, &layer::<f16>(backend, m, &io)?, &expected, tol),
            DType::BF16 => compare(&m.name, &layer::<bf16>(backend, m, &io)?, &expected, tol),
        }?;
        println!(
            "  {:<34} r={:<2} s={:<7.4} {:>4}  PEFT y[0..3] = {:>9.5?}  crate: rel err {:.2e} (tol {:.0e}) {}",
            m.name,
            m.r,
            m.scale,
            y_peft.dtype(),
            &expected[..3],
            c.rel_err,
            tol,
            if c.passed() { "ok" } else { "MISMATCH" }
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let backend = Backend::best()?;
    println!("backend: {}", backend.describe());
    let dirs: Vec<PathBuf> = match std::env::args().nth(1) {
        Some(dir) => vec![dir.into()],
        None => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
                .map_err(|e| peft_kernels::Error::Checkpoint {
                    path: root.clone(),
                    item: "fixtures".into(),
                    message: e.to_string(),
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join(peft::CONFIG_FILE).exists())
                .collect();
            dirs.sort();
            dirs
        }
    };
    for dir in dirs {
        show(&backend, &dir)?;
    }
    Ok(())
}
