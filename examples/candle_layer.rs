//! The candle layer: a committed PEFT LoRA adapter (tests/fixtures/peft/llama_lora) loaded
//! into `DeltaLinearLayer`s, run on candle tensors against PEFT's own outputs, then a few
//! steps of training the adapter of one layer with candle's autograd.
//!
//! ```sh
//! cargo run --release --features candle,peft --example candle_layer
//! cargo run --release --features candle,peft,cuda --example candle_layer   # on a GPU
//! ```
//!
//! On CPU tensors the layer runs candle's own ops, and `with_emulator(true)` the crate's
//! emulator of the CUDA kernels; on CUDA tensors (feature `cuda`, a GPU present) the fused
//! kernels on candle's stream, the backward through the crate's training kernels.

use candle_core::{DType, Device, Module, Tensor, Var};
use peft_kernels::candle::DeltaLinearLayer;
use peft_kernels::peft::{self, Adapter};
use std::path::Path;

fn main() -> candle_core::Result<()> {
    let device = device();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/llama_lora");
    let fail = |e: peft_kernels::Error| candle_core::Error::Msg(e.to_string());
    let io = peft::read_safetensors(dir.join("io.safetensors")).map_err(fail)?;
    let Adapter::Lora(adapter) = peft::load(&dir).map_err(fail)? else {
        unreachable!("a LoRA fixture")
    };
    let tensor = |name: &str| -> candle_core::Result<Tensor> {
        let t = &io[name];
        Tensor::from_vec(t.to::<f32>(), t.shape.clone(), &device)
    };
    println!("device: {device:?}; {} LoRA layers", adapter.modules.len());
    let paths: &[(&str, bool)] = if device.is_cpu() {
        &[("candle ops", false), ("emulator", true)]
    } else {
        &[("fused CUDA kernels", false)]
    };
    for m in &adapter.modules {
        let Some(y_peft) = io.get(&format!("{}.y", m.name)) else {
            continue;
        };
        let weight = tensor(&format!("{}.weight", m.name))?;
        let bias = io
            .contains_key(&format!("{}.bias", m.name))
            .then(|| tensor(&format!("{}.bias", m.name)))
            .transpose()?;
        let x = tensor(&format!("{}.x", m.name))?;
        let expected = Tensor::from_vec(y_peft.to::<f32>(), y_peft.shape.clone(), &device)?;
        for &(path, emulator) in paths {
            let layer =
                DeltaLinearLayer::from_peft(m, &weight, bias.as_ref())?.with_emulator(emulator);
            let y = layer.forward(&x)?;
            let err = ((&y - &expected)?.sqr()?.sum_all()?.sqrt()?
                / expected.sqr()?.sum_all()?.sqrt()?)?
            .to_scalar::<f32>()?;
            println!(
                "  {:<32} r={} s={:.3} {:<18} rel err vs PEFT {err:.2e}",
                m.name, m.r, m.scale, path
            );
        }
    }

    // Training: LoRA A and B of the first layer as candle Vars, from B = 0 fitted to PEFT's
    // output by plain gradient descent; the gradients come from the layer's backward (candle's
    // autograd over its ops, or the crate's backward kernels in the custom op).
    let m = &adapter.modules[0];
    let weight = tensor(&format!("{}.weight", m.name))?;
    let x = tensor(&format!("{}.x", m.name))?;
    let a0 = Tensor::from_vec(m.w_down.to::<f32>(), m.w_down.shape.clone(), &device)?;
    let (a, b) = (
        Var::from_tensor(&a0)?,
        Var::zeros((m.out_features, m.r), DType::F32, &device)?,
    );
    let target = tensor(&format!("{}.y", m.name))?;
    for &(path, emulator) in paths {
        // Each path from the same start (PEFT's initialisation: B = 0).
        a.set(&a0)?;
        b.set(&Tensor::zeros((m.out_features, m.r), DType::F32, &device)?)?;
        let layer = DeltaLinearLayer::new(m.op(), &weight, None, &a, &b)?.with_emulator(emulator);
        let mut first = None;
        for step in 0..=30 {
            let loss = (layer.forward(&x)? - &target)?.sqr()?.mean_all()?;
            let value = loss.to_scalar::<f32>()?;
            let first = *first.get_or_insert(value);
            if step % 10 == 0 {
                println!(
                    "  training A, B by {path}: step {step:>2} loss {value:.4e} ({:.3}x of the first)",
                    value / first
                );
            }
            let grads = loss.backward()?;
            for v in [&a, &b] {
                let g = grads.get(v.as_tensor()).expect("a gradient");
                v.set(&(v.as_tensor() - (g * 0.5)?)?)?;
            }
        }
    }
    Ok(())
}

/// The first GPU when built with `cuda` and one is present, else the CPU.
fn device() -> Device {
    #[cfg(feature = "cuda")]
    if peft_kernels::cuda::is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}
