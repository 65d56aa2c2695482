//! PEFT checkpoints (feature `peft`): the committed fixtures of tests/fixtures/peft, written by
//! PEFT itself (scripts/peft-fixtures/generate.py, versions in VERSIONS.json), are read and
//! their layers' PEFT outputs reproduced through the emulator's kernels; broken checkpoints
//! are refused naming the file and the field or tensor.

mod common;

use half::{bf16, f16};
use peft_kernels::delta_linear::{DeltaLinearArgs, LoraMergeArgs};
use peft_kernels::dora::{DoraLinearArgs, DoraMergeArgs, DoraNormArgs};
use peft_kernels::peft::{self, Adapter, BiasMode, LoraAdapter, LoraModule, PrefixAdapter, Tensor};
use peft_kernels::prefix_attention::{HeadLayout, PrefixAttention, PrefixAttentionArgs};
use peft_kernels::reference::{self, MatRef};
use peft_kernels::validate::{assert_close, default_tolerance};
use peft_kernels::{emulator, DType, Element, Error};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(name)
}

fn io(name: &str) -> BTreeMap<String, Tensor> {
    peft::read_safetensors(fixture(name).join("io.safetensors")).unwrap()
}

fn lora(name: &str) -> LoraAdapter {
    match peft::load(fixture(name)).unwrap() {
        Adapter::Lora(a) => a,
        other => panic!("{name}: expected LoRA, got {other:?}"),
    }
}

/// The layer's bias: the checkpoint's trained one where it has one, else the model's.
fn layer_bias<T: Element>(m: &LoraModule, io: &BTreeMap<String, Tensor>) -> Option<Vec<T>> {
    match &m.bias {
        Some(trained) => Some(trained.to()),
        None => io.get(&format!("{}.bias", m.name)).map(Tensor::to),
    }
}

/// The layer's output through `emulator::delta_linear` in the dtype PEFT ran it in (the
/// adapter converted to it), with its bias.
fn run_layer<T: Element>(m: &LoraModule, io: &BTreeMap<String, Tensor>) -> Vec<T> {
    run_pass(m, io, layer_bias(m, io).as_deref())
}

/// `delta_linear` of the layer with the bias given.
fn run_pass<T: Element>(
    m: &LoraModule,
    io: &BTreeMap<String, Tensor>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let x = io[&format!("{}.x", m.name)].as_slice::<T>().unwrap();
    let stored = io[&format!("{}.weight", m.name)].as_slice::<T>().unwrap();
    let w = m.frozen_weight(stored).unwrap();
    let (a, b) = (m.w_down.to::<T>(), m.w_up.to::<T>());
    let b_up: Option<Vec<T>> = m.b_up.as_ref().map(Tensor::to);
    let dims = m.dims(x.len() / m.in_features);
    let mut ws = vec![T::default(); dims.workspace_len()];
    let mut y = common::poisoned::<T>(dims.m * dims.n);
    emulator::delta_linear(
        &m.op(),
        &dims,
        DeltaLinearArgs {
            x,
            w: &w,
            bias,
            u: None,
            w_down: &a,
            b_down: None,
            w_up: &b,
            b_up: b_up.as_deref(),
            gate: None,
            workspace: &mut ws,
            y: &mut y,
        },
    )
    .unwrap();
    y
}

/// Every layer of the fixture's io file reproduced within the dtype's tolerance; returns how
/// many were checked.
fn reproduce(name: &str) -> usize {
    let adapter = lora(name);
    let io = io(name);
    let mut checked = 0;
    for m in &adapter.modules {
        let Some(y_peft) = io.get(&format!("{}.y", m.name)) else {
            continue;
        };
        let expected: Vec<f64> = y_peft.to::<f32>().iter().map(|&v| v.into()).collect();
        let label = format!("{name}: {}", m.name);
        let tol = default_tolerance(y_peft.dtype());
        let c = match y_peft.dtype() {
            DType::F32 => assert_close(&label, &run_layer::<f32>(m, &io), &expected, tol),
            DType::F16 => assert_close(&label, &run_layer::<f16>(m, &io), &expected, tol),
            DType::BF16 => assert_close(&label, &run_layer::<bf16>(m, &io), &expected, tol),
        };
        eprintln!("{c}");
        checked += 1;
    }
    checked
}

#[test]
fn plain_lora_reproduces_peft() {
    let a = lora("llama_lora");
    let names: Vec<&str> = a.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    );
    let v = a.module("model.layers.0.self_attn.v_proj").unwrap();
    assert_eq!((v.r, v.in_features, v.out_features), (8, 64, 32));
    assert_eq!((v.alpha, v.scale), (16.0, 2.0));
    assert_eq!(v.w_down.dtype(), DType::F32);
    assert_eq!(reproduce("llama_lora"), 2);
}

#[test]
fn rslora_rank_and_alpha_patterns_reproduce_peft() {
    let a = lora("llama_rslora_patterns");
    assert!(a.config.use_rslora);
    // The regex target takes q, k, up and down projections; exclude_modules drops layer 0's
    // up_proj.
    assert_eq!(a.modules.len(), 7);
    assert!(a.module("model.layers.0.mlp.up_proj").is_none());
    let rank_scale = |n: &str| {
        let m = a.module(n).unwrap();
        (m.r, m.scale)
    };
    // rsLoRA: s = α / √r; rank_pattern "q_proj" → 4 and "layers\.1\.mlp\.down_proj" → 2,
    // alpha_pattern "k_proj" → 32; the rest r = 8, α = 8.
    let s = |alpha: f32, r: f32| alpha / r.sqrt();
    assert_eq!(
        rank_scale("model.layers.0.self_attn.q_proj"),
        (4, s(8.0, 4.0))
    );
    assert_eq!(
        rank_scale("model.layers.1.self_attn.k_proj"),
        (8, s(32.0, 8.0))
    );
    assert_eq!(rank_scale("model.layers.1.mlp.down_proj"), (2, s(8.0, 2.0)));
    assert_eq!(rank_scale("model.layers.0.mlp.down_proj"), (8, s(8.0, 8.0)));
    assert_eq!(reproduce("llama_rslora_patterns"), 4);
}

#[test]
fn layers_to_transform_lora_bias_and_modules_to_save_in_bf16_reproduce_peft() {
    let a = lora("llama_layers_bf16");
    assert!(a
        .modules
        .iter()
        .all(|m| m.name.starts_with("model.layers.1.")));
    assert_eq!(a.modules.len(), 3);
    assert!(a.config.targets("model.layers.1.self_attn.q_proj"));
    assert!(!a.config.targets("model.layers.0.self_attn.q_proj"));
    assert!(a
        .modules
        .iter()
        .all(|m| m.w_down.dtype() == DType::BF16 && m.b_up.is_some()));
    let head = &a.modules_to_save["lm_head"]["weight"];
    assert_eq!(
        (head.shape.as_slice(), head.dtype()),
        (&[128, 64][..], DType::BF16)
    );
    assert_eq!(reproduce("llama_layers_bf16"), 2);
}

#[test]
fn gpt2_conv1d_fan_in_fan_out_with_trained_biases_reproduces_peft() {
    let a = lora("gpt2_fan_in_fan_out_f16");
    assert_eq!(a.config.bias, BiasMode::All);
    let c_attn = a.module("transformer.h.0.attn.c_attn").unwrap();
    assert!(c_attn.fan_in_fan_out);
    assert_eq!((c_attn.in_features, c_attn.out_features), (64, 192));
    // PEFT keeps the adapter in f32 next to the f16 model; the trained bias is f16.
    assert_eq!(c_attn.w_down.dtype(), DType::F32);
    assert_eq!(c_attn.bias.as_ref().unwrap().dtype(), DType::F16);
    // bias = "all" saved every other bias too (layer norms, projections without LoRA).
    assert!(a.biases.contains_key("transformer.h.0.ln_1"));
    assert!(a.biases.contains_key("transformer.h.1.attn.c_proj"));
    assert!(!a.biases.contains_key("transformer.h.0.attn.c_attn"));
    assert_eq!(reproduce("gpt2_fan_in_fan_out_f16"), 2);
}

/// Without the trained bias (the model's original one) the GPT-2 layers are off: the
/// reproduction above depends on reading `base_layer.bias`.
#[test]
fn gpt2_without_the_trained_bias_is_off() {
    let a = lora("gpt2_fan_in_fan_out_f16");
    let io = io("gpt2_fan_in_fan_out_f16");
    let mut m = a.module("transformer.h.0.attn.c_attn").unwrap().clone();
    m.bias = None;
    let y = run_layer::<f16>(&m, &io);
    let expected: Vec<f64> = io["transformer.h.0.attn.c_attn.y"]
        .to::<f32>()
        .iter()
        .map(|&v| v.into())
        .collect();
    let c = peft_kernels::validate::compare("no trained bias", &y, &expected, 2e-3).unwrap();
    assert!(!c.passed(), "{c}");
}

/// `frozen_weight` transposes a Conv1D weight: a transposition mistake (reading the stored
/// [in, out] weight as [out, in]) is caught by the reproduction.
#[test]
fn conv1d_weight_read_untransposed_is_off() {
    let a = lora("gpt2_fan_in_fan_out_f16");
    let io = io("gpt2_fan_in_fan_out_f16");
    let mut m = a.module("transformer.h.1.mlp.c_fc").unwrap().clone();
    m.fan_in_fan_out = false;
    let y = run_layer::<f16>(&m, &io);
    let expected: Vec<f64> = io["transformer.h.1.mlp.c_fc.y"]
        .to::<f32>()
        .iter()
        .map(|&v| v.into())
        .collect();
    let c = peft_kernels::validate::compare("untransposed", &y, &expected, 2e-3).unwrap();
    assert!(!c.passed(), "{c}");
}

fn prefix_adapter() -> PrefixAdapter {
    match peft::load(fixture("llama_prefix")).unwrap() {
        Adapter::PrefixTuning(p) => p,
        other => panic!("expected prefix tuning, got {other:?}"),
    }
}

/// The stored prefix is what PEFT puts in front of each layer's keys and values, and the
/// fused prefix attention over it and the context reproduces PEFT's attention output.
#[test]
fn prefix_tuning_reproduces_peft_attention() {
    let p = prefix_adapter();
    assert_eq!(
        (p.num_virtual_tokens, p.kv_heads, p.head_dim, p.layers.len()),
        (6, 1, 32, 2)
    );
    let io = io("llama_prefix");
    for (i, layer) in p.layers.iter().enumerate() {
        let t = |n: &str| io[&format!("layers.{i}.{n}")].clone();
        let (q, key, value, out) = (t("query"), t("key"), t("value"), t("out"));
        let [b, h, lq, d] = q.shape[..] else { panic!() };
        let [_, hkv, total, _] = key.shape[..] else {
            panic!()
        };
        let l = p.num_virtual_tokens;
        let lk = total - l;
        let (key, value) = (key.to::<f32>(), value.to::<f32>());
        // PEFT's keys are [B, Hkv, l + L, d] with the prefix first, the same for every
        // sequence: the loader's layout must be exactly that first part.
        let split = |full: &[f32]| {
            let (mut pre, mut ctx) = (Vec::new(), Vec::new());
            for bh in 0..b * hkv {
                let rows = &full[bh * total * d..(bh + 1) * total * d];
                if bh < hkv {
                    pre.extend_from_slice(&rows[..l * d]);
                }
                ctx.extend_from_slice(&rows[l * d..]);
            }
            (pre, ctx)
        };
        let (pk, k_ctx) = split(&key);
        let (pv, v_ctx) = split(&value);
        assert_eq!(
            layer.key.as_slice::<f32>().unwrap(),
            &pk[..],
            "layer {i} keys"
        );
        assert_eq!(
            layer.value.as_slice::<f32>().unwrap(),
            &pv[..],
            "layer {i} values"
        );
        let mut dims = p.dims(b, h, lq, lk);
        dims.out = HeadLayout::bshd(lq, h, d); // PEFT's attention output is [B, L, H, d]
        let mut o = common::poisoned::<f32>(b * lq * h * d);
        emulator::prefix_attention(
            &PrefixAttention {
                scale: None,
                causal: true,
            },
            &dims,
            PrefixAttentionArgs {
                q: q.as_slice::<f32>().unwrap(),
                k: &k_ctx,
                v: &v_ctx,
                prefix_k: layer.key.as_slice().unwrap(),
                prefix_v: layer.value.as_slice().unwrap(),
                context_lens: None,
                out: &mut o,
                lse: None,
                lambda: None,
                workspace: None,
            },
        )
        .unwrap();
        let expected: Vec<f64> = out.to::<f32>().iter().map(|&v| v.into()).collect();
        assert_close(&format!("layer {i} attention"), &o, &expected, 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// Broken checkpoints: each an error naming the file and the field or tensor.

/// A copy of fixture `name` in a fresh temporary directory, with its config and tensors
/// edited.
fn edited(
    name: &str,
    config: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    tensors: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "peft-kernels-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture(name);
    let text = std::fs::read_to_string(src.join(peft::CONFIG_FILE)).unwrap();
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    config(&mut json);
    std::fs::write(
        dir.join(peft::CONFIG_FILE),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(src.join(peft::WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    tensors(&mut all);
    let views: Vec<(String, safetensors::tensor::TensorView)> = all
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(peft::WEIGHTS_FILE)).unwrap();
    dir
}

fn load_err(dir: &Path) -> Error {
    let e = peft::load(dir).unwrap_err();
    std::fs::remove_dir_all(dir).ok();
    e
}

/// A checkpoint error naming `file` and `item`.
#[track_caller]
fn assert_checkpoint_err(e: Error, file: &str, item: &str) {
    match &e {
        Error::Checkpoint {
            path, item: got, ..
        } => {
            assert!(path.ends_with(file), "{e}");
            assert_eq!(got, item, "{e}");
        }
        other => panic!("expected a checkpoint error naming {file} / {item}, got {other}"),
    }
}

const Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj";

#[test]
fn malformed_json_names_the_config() {
    let dir = edited("llama_lora", |_| {}, |_| {});
    std::fs::write(dir.join(peft::CONFIG_FILE), "{\"r\": 8,").unwrap();
    let e = load_err(&dir);
    assert_checkpoint_err(e, peft::CONFIG_FILE, peft::CONFIG_FILE);
}

#[test]
fn unknown_peft_type_names_the_field() {
    let dir = edited(
        "llama_lora",
        |c| {
            c.insert("peft_type".into(), "IA3".into());
        },
        |_| {},
    );
    let e = load_err(&dir);
    assert!(e.to_string().contains("\"IA3\""), "{e}");
    assert_checkpoint_err(e, peft::CONFIG_FILE, "peft_type");
}

#[test]
fn a_field_of_the_wrong_type_is_named() {
    let dir = edited(
        "llama_lora",
        |c| {
            c.insert("use_rslora".into(), "yes".into());
        },
        |_| {},
    );
    assert_checkpoint_err(load_err(&dir), peft::CONFIG_FILE, "use_rslora");
}

#[test]
fn missing_and_extra_tensors_are_named() {
    let dir = edited(
        "llama_lora",
        |_| {},
        |t| {
            t.remove(&format!("{Q0}.lora_B.weight"));
        },
    );
    assert_checkpoint_err(
        load_err(&dir),
        peft::WEIGHTS_FILE,
        &format!("{Q0}.lora_B.weight"),
    );
    let dir = edited(
        "llama_lora",
        |_| {},
        |t| {
            let a = t[&format!("{Q0}.lora_A.weight")].clone();
            t.insert(
                "base_model.model.model.layers.0.self_attn.q_proj.scaling".into(),
                a,
            );
        },
    );
    assert_checkpoint_err(
        load_err(&dir),
        peft::WEIGHTS_FILE,
        "base_model.model.model.layers.0.self_attn.q_proj.scaling",
    );
    // A DoRA magnitude without use_dora.
    let dir = edited(
        "llama_dora",
        |c| {
            c.insert("use_dora".into(), false.into());
        },
        |_| {},
    );
    assert_checkpoint_err(
        load_err(&dir),
        peft::WEIGHTS_FILE,
        "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector",
    );
}

#[test]
fn tensors_of_an_untargeted_module_are_refused() {
    let dir = edited(
        "llama_lora",
        |c| {
            c.insert("target_modules".into(), serde_json::json!(["v_proj"]));
        },
        |_| {},
    );
    assert_checkpoint_err(load_err(&dir), peft::WEIGHTS_FILE, Q0);
    // The same through layers_to_transform.
    let dir = edited(
        "llama_lora",
        |c| {
            c.insert("layers_to_transform".into(), serde_json::json!([1]));
        },
        |_| {},
    );
    assert_checkpoint_err(load_err(&dir), peft::WEIGHTS_FILE, Q0);
}

#[test]
fn shapes_disagreeing_with_the_config_are_named() {
    // r = 4 in the config, the tensors have rank 8.
    let dir = edited(
        "llama_lora",
        |c| {
            c.insert("r".into(), 4.into());
        },
        |_| {},
    );
    let e = load_err(&dir);
    assert!(e.to_string().contains("[4, 64]"), "{e}");
    let first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert_checkpoint_err(e, peft::WEIGHTS_FILE, first);
    // A rank pattern that does not match the stored rank.
    let dir = edited(
        "llama_rslora_patterns",
        |c| {
            c.insert("rank_pattern".into(), serde_json::json!({"q_proj": 3}));
        },
        |_| {},
    );
    let e = load_err(&dir);
    assert!(e.to_string().contains("rank_pattern"), "{e}");
}

#[test]
fn a_dtype_the_kernels_do_not_take_is_named() {
    let dir = edited(
        "llama_lora",
        |_| {},
        |t| {
            let (_, shape, data) = t[&format!("{Q0}.lora_A.weight")].clone();
            let f64_data: Vec<u8> = bytemuck::cast_slice::<u8, f32>(&data)
                .iter()
                .flat_map(|&v| f64::from(v).to_le_bytes())
                .collect();
            t.insert(
                format!("{Q0}.lora_A.weight"),
                (safetensors::Dtype::F64, shape, f64_data),
            );
        },
    );
    let e = load_err(&dir);
    assert!(e.to_string().contains("F64"), "{e}");
    assert_checkpoint_err(e, peft::WEIGHTS_FILE, &format!("{Q0}.lora_A.weight"));
}

#[test]
fn what_the_crate_cannot_express_is_unsupported_naming_the_field() {
    for (field, value) in [
        ("layer_replication", serde_json::json!([[0, 2]])),
        ("use_qalora", serde_json::json!(true)),
        ("trainable_token_indices", serde_json::json!([0, 1])),
        ("a_future_field", serde_json::json!("on")),
    ] {
        let dir = edited(
            "llama_lora",
            |c| {
                c.insert(field.into(), value.clone());
            },
            |_| {},
        );
        match load_err(&dir) {
            Error::Unsupported(msg) => {
                assert!(
                    msg.contains(field) && msg.contains(peft::CONFIG_FILE),
                    "{msg}"
                )
            }
            other => panic!("{field}: expected Unsupported, got {other}"),
        }
    }
    // An encoder-decoder prefix.
    let dir = edited(
        "llama_prefix",
        |c| {
            c.insert("num_transformer_submodules".into(), 2.into());
        },
        |_| {},
    );
    match load_err(&dir) {
        Error::Unsupported(msg) => assert!(msg.contains("num_transformer_submodules"), "{msg}"),
        other => panic!("expected Unsupported, got {other}"),
    }
    // Embedding LoRA.
    let dir = edited(
        "llama_lora",
        |_| {},
        |t| {
            let a = t[&format!("{Q0}.lora_A.weight")].clone();
            t.insert(
                "base_model.model.model.embed_tokens.lora_embedding_A".into(),
                a,
            );
        },
    );
    match load_err(&dir) {
        Error::Unsupported(msg) => assert!(msg.contains("lora_embedding_A"), "{msg}"),
        other => panic!("expected Unsupported, got {other}"),
    }
}

#[test]
fn a_prefix_of_the_wrong_shape_is_named() {
    let dir = edited(
        "llama_prefix",
        |c| {
            c.insert("num_layers".into(), 3.into());
        },
        |_| {},
    );
    let e = load_err(&dir);
    assert!(e.to_string().contains("[6, 192]"), "{e}");
    assert_checkpoint_err(e, peft::WEIGHTS_FILE, "prompt_embeddings");
    let dir = edited(
        "llama_prefix",
        |_| {},
        |t| {
            t.remove("prompt_embeddings");
        },
    );
    assert_checkpoint_err(load_err(&dir), peft::WEIGHTS_FILE, "prompt_embeddings");
}

#[test]
fn a_missing_directory_names_the_file() {
    let e = peft::load(fixture("no_such_adapter")).unwrap_err();
    assert_checkpoint_err(e, peft::CONFIG_FILE, peft::CONFIG_FILE);
}

#[test]
fn tensor_views_check_their_dtype() {
    let a = lora("llama_lora");
    let m = &a.modules[0];
    assert!(m.w_down.as_slice::<f32>().is_ok());
    let e = m.w_down.as_slice::<bf16>().unwrap_err();
    assert!(e.to_string().contains("f32"), "{e}");
    // frozen_weight refuses a weight of the wrong size.
    assert!(m.frozen_weight(&[0.0f32; 3]).is_err());
}

/// The DoRA layer of `m` through the kernels: g from `dora_norm`, then `dora_linear` (one
/// fused pass, g and then the bias in its epilogue; f32, as the fixtures). Without
/// `apply_g`, plain LoRA with the bias.
fn run_dora(m: &LoraModule, io: &BTreeMap<String, Tensor>, apply_g: bool) -> Vec<f32> {
    let stored = io[&format!("{}.weight", m.name)].as_slice::<f32>().unwrap();
    let w = m.frozen_weight(stored).unwrap();
    let (a, b) = (m.w_down.to::<f32>(), m.w_up.to::<f32>());
    let magnitude = m.magnitude.as_ref().expect("a DoRA module").to::<f32>();
    let dora = m.dora_dims();
    let mut g = common::poisoned::<f32>(dora.n);
    emulator::dora_norm(
        &dora,
        m.scale,
        DoraNormArgs {
            w: &w[..],
            w_down: &a,
            w_up: &b,
            magnitude: &magnitude,
            g: &mut g,
            norm: None,
        },
    )
    .unwrap();
    if !apply_g {
        return run_layer::<f32>(m, io);
    }
    let x = io[&format!("{}.x", m.name)].as_slice::<f32>().unwrap();
    let bias = layer_bias::<f32>(m, io);
    let dims = m.dims(x.len() / m.in_features);
    let mut ws = vec![0.0f32; dims.workspace_len()];
    let mut y = common::poisoned::<f32>(dims.m * dims.n);
    emulator::dora_linear(
        &m.op(),
        &dims,
        DoraLinearArgs {
            forward: DeltaLinearArgs {
                x,
                w: &w,
                bias: bias.as_deref(),
                u: None,
                w_down: &a,
                b_down: None,
                w_up: &b,
                b_up: None,
                gate: None,
                workspace: &mut ws,
                y: &mut y,
            },
            g: &g,
        },
    )
    .unwrap();
    y
}

/// LLaMA's projections (no bias) and GPT-2's Conv1D (fan_in_fan_out, a bias added after the
/// magnitude's scale).
#[test]
fn dora_reproduces_peft() {
    for name in ["llama_dora", "gpt2_dora"] {
        assert_eq!(dora_fixture(name), 2, "{name}");
    }
}

/// Every layer of the DoRA fixture `name` with saved outputs reproduced; returns how many.
fn dora_fixture(name: &str) -> usize {
    let a = lora(name);
    assert!(a.config.use_dora);
    assert!(a.modules.iter().all(|m| m.magnitude.is_some()));
    let io = io(name);
    let mut checked = 0;
    for m in &a.modules {
        let Some(y_peft) = io.get(&format!("{}.y", m.name)) else {
            continue;
        };
        let expected: Vec<f64> = y_peft.to::<f32>().iter().map(|&v| v.into()).collect();
        let c = assert_close(
            &format!("{name}: {}", m.name),
            &run_dora(m, &io, true),
            &expected,
            1e-5,
        );
        eprintln!("{c}");
        // Without the magnitude's scale it is plain LoRA, and off.
        let plain = run_dora(m, &io, false);
        let c = peft_kernels::validate::compare("no g", &plain, &expected, 1e-5).unwrap();
        assert!(!c.passed(), "{c}");
        checked += 1;
    }
    checked
}

#[test]
fn modules_to_save_keep_nested_parameters_and_stray_biases_are_refused() {
    // A module saved whole with a submodule (a classifier head's `dense.weight`).
    let dir = edited(
        "llama_layers_bf16",
        |_| {},
        |t| {
            let head = t["base_model.model.lm_head.weight"].clone();
            t.insert("base_model.model.lm_head.dense.weight".into(), head);
        },
    );
    let a = match peft::load(&dir).unwrap() {
        Adapter::Lora(a) => a,
        other => panic!("{other:?}"),
    };
    std::fs::remove_dir_all(&dir).ok();
    let head = &a.modules_to_save["lm_head"];
    assert_eq!(head.keys().collect::<Vec<_>>(), ["dense.weight", "weight"]);
    // bias = "none": the trained biases of the GPT-2 checkpoint are unexpected.
    let dir = edited(
        "gpt2_fan_in_fan_out_f16",
        |c| {
            c.insert("bias".into(), "none".into());
        },
        |_| {},
    );
    let e = load_err(&dir);
    assert!(e.to_string().contains("bias"), "{e}");
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
}

/// Merged into the frozen weight (`lora_merge`, and DoRA's `dora_merge`), a layer's plain
/// forward `x·W'ᵀ + b` reproduces PEFT's output too.
#[test]
fn merged_layers_reproduce_peft() {
    for (name, module) in [
        ("llama_lora", "model.layers.0.self_attn.q_proj"),
        ("llama_rslora_patterns", "model.layers.1.mlp.down_proj"),
        ("llama_dora", "model.layers.1.mlp.down_proj"),
    ] {
        let a = lora(name);
        let io = io(name);
        let m = a.module(module).unwrap();
        let mut w = m
            .frozen_weight(io[&format!("{module}.weight")].as_slice::<f32>().unwrap())
            .unwrap();
        let (la, lb) = (m.w_down.to::<f32>(), m.w_up.to::<f32>());
        match &m.magnitude {
            None => emulator::lora_merge(
                &m.merge_dims(),
                m.scale,
                LoraMergeArgs {
                    w: &mut w,
                    w_down: &la,
                    w_up: &lb,
                },
            )
            .unwrap(),
            Some(magnitude) => {
                let mut g = vec![0.0f32; m.out_features];
                let magnitude = magnitude.to::<f32>();
                emulator::dora_norm(
                    &m.dora_dims(),
                    m.scale,
                    DoraNormArgs {
                        w: &w[..],
                        w_down: &la,
                        w_up: &lb,
                        magnitude: &magnitude,
                        g: &mut g,
                        norm: None,
                    },
                )
                .unwrap();
                emulator::dora_merge(
                    &m.dora_dims(),
                    m.scale,
                    false,
                    DoraMergeArgs {
                        w: &mut w,
                        w_down: &la[..],
                        w_up: &lb,
                        g: &g[..],
                    },
                )
                .unwrap();
            }
        }
        let x = io[&format!("{module}.x")].as_slice::<f32>().unwrap();
        let (n, k) = (m.out_features, m.in_features);
        let y =
            reference::linear(MatRef::new(x, x.len() / k, k), MatRef::new(&w, n, k), None).unwrap();
        let expected: Vec<f64> = io[&format!("{module}.y")]
            .to::<f32>()
            .iter()
            .map(|&v| v.into())
            .collect();
        let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        assert_close(&format!("{name} merged {module}"), &y32, &expected, 1e-5);
    }
}

#[test]
fn a_malformed_tensor_file_is_named() {
    let dir = edited("llama_lora", |_| {}, |_| {});
    std::fs::write(
        dir.join(peft::WEIGHTS_FILE),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.to_string().contains("malformed safetensors"), "{e}");
    assert_checkpoint_err(e, peft::WEIGHTS_FILE, peft::WEIGHTS_FILE);
}
