#!/usr/bin/env python3
"""Writes tests/fixtures/peft/: real PEFT checkpoints and PEFT's own outputs of chosen layers.

Tiny LLaMA- and GPT-2-shaped models (hidden 64, 2 layers, random weights, fixed seeds) get
adapters attached by PEFT itself (plain LoRA, rsLoRA with rank/alpha patterns and a regex
target, layers_to_transform with lora_bias and modules_to_save in bf16, GPT-2's Conv1D with
fan_in_fan_out and bias="all" in f16, DoRA, prefix tuning). lora_B (zero at init) and the other
trained tensors are randomised as training would leave them. For each adapter directory:

  adapter_config.json, adapter_model.safetensors   PEFT's save_pretrained, unchanged
  io.safetensors                                   what a test needs to reproduce PEFT:
      <module>.weight, <module>.bias   the frozen base layer as the model stores it (GPT-2's
                                       Conv1D: [in, out]); the bias as it was before training
      <module>.x, <module>.y           the layer's input [tokens, in] and PEFT's output
                                       [tokens, out] in a forward of the whole model
      (prefix tuning) layers.<i>.query / key / value / out: layer i's attention inputs as the
      attention function receives them (query [B, H, L, d] after RoPE; key and value
      [B, Hkv, l + L, d], PEFT's prefix first) and its output [B, L, H, d]

The crate's tests need only those files, not this script. Run from the repository root:
  python3 -m venv /tmp/peft-venv && /tmp/peft-venv/bin/pip install -r scripts/peft-fixtures/requirements.txt
  /tmp/peft-venv/bin/python scripts/peft-fixtures/generate.py
"""

import json
import os
import shutil
import sys

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "peft")
BATCH, SEQ = 2, 5


def llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query (MQA) so the prefix layout is per KV head
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def gpt2(dtype=torch.float32):
    cfg = transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=64, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 initialises its biases to 0; a pretrained model's are not
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype)


def randomise(model):
    """What training leaves: lora_B (zero at init) and lora_B's bias random, DoRA's magnitude
    moved off its initial ‖W‖, base-layer biases (saved with bias="all") moved."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)


def layer(model, module):
    return model.base_model.model.get_submodule(module)


def save_adapter(name, model, modules, original_biases=None, extra_io=None):
    """save_pretrained, then one forward with hooks on the chosen modules."""
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    os.remove(os.path.join(d, "README.md"))  # a model card template
    captured = {}

    def hook(mod_name):
        def f(_m, inputs, output):
            x = inputs[0]
            captured[mod_name + ".x"] = x.reshape(-1, x.shape[-1])
            captured[mod_name + ".y"] = output.reshape(-1, output.shape[-1])

        return f

    handles = [layer(model, m).register_forward_hook(hook(m)) for m in modules]
    ids = torch.randint(0, 128, (BATCH, SEQ))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    io = {}
    for m in modules:
        base = layer(model, m).get_base_layer()
        io[m + ".weight"] = base.weight
        bias = (original_biases or {}).get(m, base.bias)
        if bias is not None:
            io[m + ".bias"] = bias
        io[m + ".x"] = captured[m + ".x"]
        io[m + ".y"] = captured[m + ".y"]
    io.update(extra_io or {})
    save_file({k: v.detach().clone().contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    tidy_config(d)


def tidy_config(d):
    """The same bytes on every run: no path of the machine that wrote it, and target_modules
    (a set in PEFT, listed in hash order) sorted."""
    p = os.path.join(d, "adapter_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = None
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def lora_fixtures():
    # Plain LoRA, f32: r = 8, α = 16 on q_proj and v_proj (v_proj: 64 → 32, the KV width).
    torch.manual_seed(1)
    m = get_peft_model(llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    randomise(m)
    save_adapter("llama_lora", m, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])

    # rsLoRA (s = α/√r), a regex target, rank and alpha patterns, an excluded module.
    torch.manual_seed(2)
    cfg = LoraConfig(
        r=8,
        lora_alpha=8,
        use_rslora=True,
        target_modules=r".*\.(q_proj|k_proj|up_proj|down_proj)",
        rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={"k_proj": 32},
        exclude_modules=["model.layers.0.mlp.up_proj"],
    )
    m = get_peft_model(llama(), cfg)
    randomise(m)
    save_adapter(
        "llama_rslora_patterns",
        m,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.1.mlp.down_proj",
            "model.layers.1.mlp.up_proj",
        ],
    )

    # bf16: layers_to_transform with layers_pattern, lora_bias (lora_B has a bias),
    # modules_to_save (a full replacement lm_head).
    torch.manual_seed(3)
    cfg = LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "o_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        lora_bias=True,
        modules_to_save=["lm_head"],
    )
    # autocast_adapter_dtype=False keeps the adapter in bf16 (PEFT's default upcasts it to f32,
    # as in the f16 GPT-2 fixture below, whose file then mixes f32 LoRA and f16 biases).
    m = get_peft_model(llama(torch.bfloat16), cfg, autocast_adapter_dtype=False)
    randomise(m)
    save_adapter("llama_layers_bf16", m, ["model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.v_proj"])

    # GPT-2's Conv1D ([in, out] base weight): fan_in_fan_out, bias="all", f16.
    torch.manual_seed(4)
    base = gpt2(torch.float16)
    originals = {
        "transformer.h.0.attn.c_attn": base.transformer.h[0].attn.c_attn.bias.detach().clone(),
        "transformer.h.1.mlp.c_fc": base.transformer.h[1].mlp.c_fc.bias.detach().clone(),
    }
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all")
    m = get_peft_model(base, cfg)
    randomise(m)
    with torch.no_grad():  # bias="all" trains (and saves) every bias
        for name, p in m.named_parameters():
            if name.endswith(".bias") and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter("gpt2_fan_in_fan_out_f16", m, list(originals), original_biases=originals)

    # DoRA, f32, on attention and the MLP's down projection (in 128, out 64).
    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    m = get_peft_model(llama(), cfg)
    randomise(m)
    save_adapter("llama_dora", m, ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"])

    # DoRA on GPT-2's Conv1D: fan_in_fan_out, and a base bias, added after the magnitude's scale.
    torch.manual_seed(7)
    cfg = LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    m = get_peft_model(gpt2(), cfg)
    randomise(m)
    save_adapter("gpt2_dora", m, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"])


def prefix_fixture():
    torch.manual_seed(6)
    m = get_peft_model(llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    captured = {}
    llama_mod = transformers.models.llama.modeling_llama
    eager = llama_mod.eager_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        i = module.layer_idx
        captured.update(
            {
                f"layers.{i}.query": query,
                f"layers.{i}.key": key,
                f"layers.{i}.value": value,
                f"layers.{i}.out": out,
            }
        )
        return out, weights

    llama_mod.eager_attention_forward = recording
    d = os.path.join(OUT, "llama_prefix")
    shutil.rmtree(d, ignore_errors=True)
    m.save_pretrained(d)
    os.remove(os.path.join(d, "README.md"))
    try:
        with torch.no_grad():
            m(input_ids=torch.randint(0, 128, (BATCH, SEQ)))
    finally:
        llama_mod.eager_attention_forward = eager
    save_file({k: v.detach().clone().contiguous() for k, v in captured.items()}, os.path.join(d, "io.safetensors"))
    tidy_config(d)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    lora_fixtures()
    prefix_fixture()
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=2, sort_keys=True)
        f.write("\n")
    print(versions)


if __name__ == "__main__":
    main()
