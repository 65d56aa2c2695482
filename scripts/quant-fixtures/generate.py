#!/usr/bin/env python3
"""Writes tests/fixtures/quant/: quantized frozen weights as the libraries store them, and the
libraries' own dequantized values, which tests/quant.rs reproduces bit for bit.

NF4 (QLoRA): bitsandbytes' own `quantize_4bit` / `dequantize_4bit` on the CPU (blocksize 64
over the flattened tensor, absmax f32 or double-quantized with `compress_statistics=True`:
uint8 codes per 256 absmax values, their f32 scale `state2.absmax`, the 256-entry
`state2.code` and the f32 `offset`). FP8 E4M3: torch's `float8_e4m3fn` conversion, the
decode of all 256 bytes, and weights quantized as DeepSeek-V3 / transformers' fine-grained
FP8 store them (`weight` E4M3 [n, k], `weight_scale_inv` f32 per 128×128 block or per
output row; W = f32(weight) · scale_inv). And one bitsandbytes Linear4bit layer's state dict
as transformers saves it, in safetensors (bnb_layer.safetensors).

Each tensor is a raw little-endian file `<case>.<tensor>.<dtype>`; cases.txt lists the
cases, one a line: `nf4 <case> <rows> <cols> <blocksize> <double 0|1> <offset f32 bits hex>`
or `fp8 <case> <rows> <cols> <block rows> <block cols>` (0 0: per output row), or
`layer <case> <rows> <cols> <tensor name prefix>`.

Run from the repository root:
  python3 -m venv /tmp/qvenv && /tmp/qvenv/bin/pip install -r scripts/quant-fixtures/requirements.txt
  /tmp/qvenv/bin/python scripts/quant-fixtures/generate.py
"""

import os
import struct

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.backends.default import ops as default_ops

OUT = "tests/fixtures/quant"


def save(case, name, t):
    suffix = {torch.uint8: "u8", torch.float32: "f32", torch.bfloat16: "bf16"}[t.dtype]
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    with open(os.path.join(OUT, f"{case}.{name}.{suffix}"), "wb") as f:
        f.write(t.numpy().tobytes())


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def dequantize_4bit(packed, qs, dtype):
    """bitsandbytes' dequantize_4bit as its default backend computes it (the CUDA kernels'
    layout: blocks over the flattened tensor). The CPU backend's C++ kernel of 0.50.2 cuts
    blocks per row instead, so it disagrees with bitsandbytes' own quantize_4bit wherever a
    row's length is not a multiple of the block size (shape [7, 96]: 471 of 672 elements);
    where the two layouts coincide they are compared here."""
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        nested = default_ops._dequantize_blockwise_compute(
            qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32
        )
        assert torch.equal(absmax, nested + qs.offset)
    out = default_ops._dequantize_4bit_compute(
        packed.reshape(-1), absmax, qs.code, qs.blocksize, qs.shape, dtype
    )
    if qs.shape[-1] % qs.blocksize == 0:
        qs.dtype = dtype
        assert torch.equal(out, bnbf.dequantize_4bit(packed, qs))
    return out


def nf4(case, rows, cols, double, lines, gen):
    w = torch.randn(rows, cols, generator=gen) * 0.05
    flat = w.reshape(-1)
    # A block of zeros (absmax 0 must dequantize to zeros) and a block with one large value.
    if flat.numel() >= 192:
        flat[64:128] = 0.0
        flat[130] = 3.0
    packed, qs = bnbf.quantize_4bit(
        w, blocksize=64, compress_statistics=double, quant_type="nf4"
    )
    assert packed.dtype == torch.uint8
    save(case, "packed", packed)
    save(case, "quant_map", qs.code.float())
    if double:
        save(case, "absmax", qs.absmax)  # uint8 codes of absmax − offset
        save(case, "nested_absmax", qs.state2.absmax)
        save(case, "nested_quant_map", qs.state2.code)
        assert qs.state2.blocksize == 256
        offset = f32_bits(qs.offset)
    else:
        save(case, "absmax", qs.absmax)
        offset = 0
    for dtype in (torch.float32, torch.bfloat16):
        save(case, "expected", dequantize_4bit(packed, qs, dtype))
    lines.append(f"nf4 {case} {rows} {cols} 64 {int(double)} {offset:08x}")


def fp8(case, rows, cols, block, lines, gen):
    w = torch.randn(rows, cols, generator=gen) * 0.02
    if block:
        br, bc = block
        nr, nc = -(-rows // br), -(-cols // bc)
        padded = torch.zeros(nr * br, nc * bc)
        padded[:rows, :cols] = w
        tiles = padded.reshape(nr, br, nc, bc)
        amax = tiles.abs().amax(dim=(1, 3))
        amax[0, 0] = 0.0  # an all-zero block: scale 0
        tiles[0, :, 0, :] = 0.0
        scale = amax / 448.0
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = (tiles * inv[:, None, :, None]).reshape(nr * br, nc * bc)[:rows, :cols]
        full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    else:
        br, bc = 0, 0
        scale = w.abs().amax(dim=1) / 448.0
        q = w / scale[:, None]
        full = scale[:, None].expand(rows, cols)
    q8 = q.to(torch.float8_e4m3fn)
    save(case, "weight", q8.view(torch.uint8))
    save(case, "weight_scale_inv", scale.float())
    save(case, "expected", q8.float() * full)
    lines.append(f"fp8 {case} {rows} {cols} {br} {bc}")


def bnb_layer(lines, gen):
    """A bitsandbytes Linear4bit layer's state dict as transformers saves a QLoRA base model
    (`Linear4bit._save_to_state_dict`: `weight` and `weight.` + the quant state's packed
    dict), in bnb_layer.safetensors under the prefix `model.layers.0.mlp.down_proj.`, with
    its dequantized values (bnb_layer.expected.f32)."""
    from safetensors.torch import save_file

    rows, cols = 48, 80
    w = (torch.randn(rows, cols, generator=gen) * 0.05).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    prefix = "model.layers.0.mlp.down_proj."
    tensors = {prefix + "weight": packed}
    for key, value in qs.as_dict(packed=True).items():
        tensors[prefix + "weight." + key] = value
    save_file(tensors, os.path.join(OUT, "bnb_layer.safetensors"))
    save("bnb_layer", "expected", dequantize_4bit(packed, qs, torch.float32))
    lines.append(f"layer bnb_layer {rows} {cols} {prefix}")


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(15)
    lines = [
        f"# torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}",
    ]
    nf4("nf4_plain", 7, 96, False, lines, gen)  # 672 = 10 blocks + 32
    nf4("nf4_odd", 5, 13, False, lines, gen)  # 65 elements: odd, a pad nibble
    nf4("nf4_double", 67, 300, True, lines, gen)  # 315 absmax: 2 nested blocks
    nf4("nf4_rows", 9, 128, True, lines, gen)  # rows of whole blocks: the CPU kernel agrees
    fp8("fp8_block", 136, 200, (128, 128), lines, gen)
    fp8("fp8_row", 7, 33, None, lines, gen)
    bnb_layer(lines, gen)
    # Every E4M3 byte's value (NaN at 0x7f and 0xff).
    save("e4m3", "decode", torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float())
    with open(os.path.join(OUT, "cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
