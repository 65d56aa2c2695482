#!/usr/bin/env python3
"""The peers of peft-kernels' benchmarks, timed on a CUDA GPU with PyTorch.

What a user would run instead of our fused kernels, on the shapes of
benches/delta_linear.rs and benches/prefix_attention.rs, all in bf16:

  delta linear (K = N = 4096, M in {1, 16, 128, 4096}, no biases)
    LoRA r=16, alpha=32   HF PEFT's peft.tuners.lora.Linear around nn.Linear(4096, 4096)
    scaled PA r=512, s=4  plain PyTorch: y = x Wᵀ + 4·relu(x Aᵀ) Bᵀ
    frozen GEMM alone     F.linear(x, W): what a merged LoRA costs, a reference point
  prefix attention (B=8, H=32, d=128, L in {512, 2048}, prefix P in {30, 128})
    SDPA (torch.nn.functional.scaled_dot_product_attention) over the prefix keys and
    values ([B, H, P, d], as PEFT's past_key_values) concatenated in front of the
    context's, causal on the context only: with an explicit boolean mask and with torch's
    lower-right causal bias, each timed with the concatenation and on tensors
    concatenated beforehand; plain causal SDPA without a prefix as a reference point.
  training step of one layer (K = N = 4096, M in {512, 4096, 16384}, no biases;
    benches/delta_linear_train.rs): forward, then backward of the loss sum(y * dy) for a
    random dy (autograd's dy is then that tensor, as the bench's given dy), x and the
    adapter requiring gradients, W frozen
    LoRA r in {8, 16, 64}, alpha = 2r   HF PEFT's lora.Linear around nn.Linear(4096, 4096)
    scaled PA r=512, s=4  plain PyTorch, the bench's identity bottleneck:
                          y = x Wᵀ + 4·(x Aᵀ) Bᵀ
  prefix attention backward (B=8, H=32, d=128, prefix P=30, causal, L in {512, 2048, 4096};
    benches/prefix_attention_backward.rs)
    SDPA's backward (torch.autograd.grad of the forward's output, the forward run once
    outside the timing) on K/V concatenated beforehand, and through the concatenation
    (gradients of the prefix and the context separately, what prefix tuning needs).

Each peer's output is checked against a float64 reference computed from the same bf16
inputs (relative error ‖out − ref‖ / ‖ref‖, bf16 tolerance 1e-2; NaN fails; attention on
the first two batch elements; a training step: the largest of y's, dx's, dA's and dB's).

Timing follows benches/delta_linear.rs, so the numbers compare: calls queued back to back
in batches timed by CUDA events, each batch at least 2 ms, the median of 11 batches per
call; every call uses the next of several operand copies, together over 200 MiB (four
times an H100's L2), so weights come from device memory. Launch and Python overhead
count where they exceed the GPU time, as a user sees them. The card's copy bandwidth and
bf16 matrix rate are measured the same way (1 GiB device-to-device copy, 8192³ matmul).

    python3 benches/peers/peers.py [--out DIR] [--only linear|attention|train|backward]

Writes the markdown report to stdout and to DIR/peers.md (DIR: --out, else $OUT, else
the current directory). Exit status: 0 when every peer matched its reference, 1 when one
did not, 2 when torch, peft or a CUDA device is missing. PEFT_SEED=n replays the inputs.

PEFT_PEERS_DRY_RUN=1 checks the script's logic without a GPU: the training-step peers
only, on the CPU, at tiny shapes, timed by the host clock (no measurement), with the same
float64 checks and report.
"""

import argparse
import datetime
import inspect
import math
import os
import platform
import statistics
import subprocess
import sys
import time

BF16_TOL = 1e-2
# A dry run (PEFT_PEERS_DRY_RUN=1): CPU, tiny shapes, no operand rotation.
DRY_RUN = os.environ.get("PEFT_PEERS_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
ROTATION_BYTES = 0 if DRY_RUN else 200 << 20
BATCHES = 11
BATCH_SECONDS = 2e-3


def missing(what, hint):
    sys.stderr.write(f"peers.py: {what}. {hint}\n")
    sys.exit(2)


try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    missing(
        f"PyTorch is not importable ({e})",
        "Run this on the GPU machine, whose python3 has torch and peft; "
        "it is not needed anywhere else.",
    )

try:
    import peft
    from peft.tuners.lora import Linear as LoraLinear
except ImportError as e:
    missing(
        f"HF PEFT is not importable ({e})",
        "Install peft (pip install peft) or carry its wheel to the GPU machine.",
    )

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # torch < 2.2: the explicit-mask variants still run
    causal_lower_right = None


# ---------------------------------------------------------------------------------------
# Timing


def per_call(calls):
    """Seconds per call, rotating over `calls` (one callable per operand copy)."""
    i = 0
    if DRY_RUN:
        def batch(n):
            nonlocal i
            t0 = time.perf_counter()
            for _ in range(n):
                calls[i % len(calls)]()
                i += 1
            return time.perf_counter() - t0
    else:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def batch(n):
            nonlocal i
            start.record()
            for _ in range(n):
                calls[i % len(calls)]()
                i += 1
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3

    batch(len(calls))  # warm-up: kernel selection, allocator, clocks
    n = 1
    while n < 1 << 16 and batch(n) < BATCH_SECONDS:
        n *= 2
    return statistics.median(batch(n) / n for _ in range(BATCHES))


def copies_for(nbytes):
    """Operand copies that together exceed ROTATION_BYTES (at least two)."""
    return max(2, -(-ROTATION_BYTES // nbytes))


def ceilings(gen):
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate."""
    n = 1 << (20 if DRY_RUN else 30)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEVICE, generator=gen)
    dst = torch.empty_like(src)
    copy_s = per_call([lambda: dst.copy_(src)])
    s = MATMUL_SIDE
    a, b = randn(gen, s, s), randn(gen, s, s)
    mm_s = per_call([lambda: a @ b.T])
    return 2 * n / copy_s, 2 * s**3 / mm_s  # bytes/s, flop/s


MATMUL_SIDE = 256 if DRY_RUN else 8192


def rel_err(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return math.nan
    return ((out - ref).norm() / ref.norm()).item()


def randn(gen, *shape, scale=1.0):
    x = torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32)
    return (x * scale).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Delta linear: y = x Wᵀ + s·f(x Aᵀ) Bᵀ

K = N = 4096


def linear_bytes(m, r):
    return 2 * (N * K + r * K + N * r + m * K + m * N)


def linear_flops(m, r):
    return 2 * m * N * K + 2 * m * r * (K + N)


def peft_lora(w, a, b, r, alpha, train=False):
    """PEFT's LoRA Linear (adapter "default", no dropout) holding the given weights; with
    `train`, in training mode with the adapter requiring gradients (W stays frozen)."""
    n, k = w.shape
    base = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
    if "config" in inspect.signature(LoraLinear.__init__).parameters:
        # PEFT 0.18 and newer read the dropout (and the rest) from the adapter's config.
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
        layer = LoraLinear(base, "default", config=config, r=r, lora_alpha=alpha)
    else:
        layer = LoraLinear(base, "default", r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer = layer.to(device=DEVICE, dtype=torch.bfloat16).eval().requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(w)
        layer.lora_A["default"].weight.copy_(a)
        # PEFT initialises B to zeros; a random B makes the delta real and checkable.
        layer.lora_B["default"].weight.copy_(b)
    if train:
        layer.train()
        layer.lora_A["default"].weight.requires_grad_(True)
        layer.lora_B["default"].weight.requires_grad_(True)
    return layer


def delta_linear(gen, rows):
    for m in (1, 16, 128, 4096):
        # The frozen GEMM alone.
        ops = [(randn(gen, m, K), randn(gen, N, K, scale=K**-0.5))
               for _ in range(copies_for(linear_bytes(m, 0)))]
        x, w = ops[0]
        err = rel_err(F.linear(x, w), x.double() @ w.double().T)
        t = per_call([lambda x=x, w=w: F.linear(x, w) for x, w in ops])
        rows.append(linear_row("frozen GEMM alone (torch F.linear)", m, 0, t, err))

        for name, r, s in (("LoRA (PEFT lora.Linear)", 16, 2.0),
                           ("scaled PA (torch)", 512, 4.0)):
            ops = [(randn(gen, m, K), randn(gen, N, K, scale=K**-0.5),
                    randn(gen, r, K, scale=K**-0.5), randn(gen, N, r, scale=r**-0.5))
                   for _ in range(copies_for(linear_bytes(m, r)))]
            if r == 16:
                calls = [lambda x=x, layer=peft_lora(w, a, b, r, s * r): layer(x)
                         for x, w, a, b in ops]
            else:
                calls = [lambda x=x, w=w, a=a, b=b, s=s:
                         F.linear(x, w) + s * F.linear(F.relu(F.linear(x, a)), b)
                         for x, w, a, b in ops]
            x, w, a, b = (v.double() for v in ops[0])
            t64 = x @ a.T
            if r != 16:
                t64 = torch.relu(t64)
            err = rel_err(calls[0](), x @ w.T + s * (t64 @ b.T))
            rows.append(linear_row(name, m, r, per_call(calls), err))


def linear_row(peer, m, r, seconds, err):
    return dict(peer=peer, M=m, r=r, us=seconds * 1e6, err=err,
                bytes_s=linear_bytes(m, r) / seconds, flop_s=linear_flops(m, r) / seconds)


# ---------------------------------------------------------------------------------------
# Training step of one layer: forward, then backward of sum(y * dy) into x and the adapter

# (K, N, M values, LoRA ranks, PA rank): benches/delta_linear_train.rs's, tiny in a dry run.
TRAIN_SHAPES = ((64, 48, (1, 17), (8, 16), 32) if DRY_RUN else
                (K, N, (512, 4096, 16384), (8, 16, 64), 512))


def train_bytes(k, n, m, r):
    """The least traffic of a step (the bench's): x, W, A, B, dy read, y, dx, dA, dB written."""
    return 2 * (2 * m * k + 2 * m * n + n * k + 2 * (r * k + n * r))


def train_flops(k, n, m, r):
    """The forward's three GEMMs and the backward's five (dx through W and A, dA, dB)."""
    return 2 * (2 * m * n * k + 3 * m * r * (k + n))


def train_step_err(grads, x, w, a, b, dy, s):
    """The largest rel. error of (y, dx, dA, dB) against float64 LoRA-form math."""
    x, w, a, b, dy = (v.detach().double() for v in (x, w, a, b, dy))
    t = x @ a.T
    y = x @ w.T + s * (t @ b.T)
    dt = s * (dy @ b)
    refs = (y, dy @ w + dt @ a, dt.T @ x, s * (dy.T @ t))
    return max(rel_err(g, ref) for g, ref in zip(grads, refs))


def train(gen, rows):
    """A training step as a PyTorch user runs it: gradients set to None (optimizer.zero_grad's
    default), the forward, and backward, which writes x.grad and the adapter's .grad."""
    k, n, ms, lora_ranks, pa_rank = TRAIN_SHAPES
    methods = [("LoRA train step (PEFT lora.Linear)", r, 2.0, True) for r in lora_ranks]
    methods.append(("scaled PA train step (torch)", pa_rank, 4.0, False))
    for m in ms:
        for name, r, s, lora in methods:
            cases = []
            for _ in range(copies_for(train_bytes(k, n, m, r))):
                x = randn(gen, m, k).requires_grad_()
                w = randn(gen, n, k, scale=k**-0.5)
                a = randn(gen, r, k, scale=k**-0.5)
                b = randn(gen, n, r, scale=r**-0.5)
                dy = randn(gen, m, n)
                if lora:
                    layer = peft_lora(w, a, b, r, s * r, train=True)
                    a = layer.lora_A["default"].weight
                    b = layer.lora_B["default"].weight
                    forward = layer
                else:
                    a, b = a.requires_grad_(), b.requires_grad_()
                    forward = (lambda x, w=w, a=a, b=b, s=s:
                               F.linear(x, w) + s * F.linear(F.linear(x, a), b))
                cases.append((forward, x, w, a, b, dy))

            def step(forward, x, w, a, b, dy):
                x.grad = a.grad = b.grad = None
                y = forward(x)
                y.backward(dy)
                return y

            forward, x, w, a, b, dy = cases[0]
            y = step(*cases[0])
            err = train_step_err((y, x.grad, a.grad, b.grad), x, w, a, b, dy, s)
            t = per_call([lambda c=c: step(*c) for c in cases])
            rows.append(dict(peer=name, M=m, r=r, us=t * 1e6, err=err,
                             bytes_s=train_bytes(k, n, m, r) / t,
                             flop_s=train_flops(k, n, m, r) / t))
            del cases, forward, x, w, a, b, dy, y
            if not DRY_RUN:
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Prefix attention: softmax over [prefix ; causal context], SDPA on the concatenation

BATCH, HEADS, D = 8, 32, 128
# Batch elements checked against float64 (each costs seconds of fp64 work at L = 2048).
CHECKED = 2


def attention_flops(ctx, p):
    # Useful work only: QKᵀ and PV (2·d flops each) over the pairs the mask allows.
    return 4 * BATCH * HEADS * D * (ctx * p + ctx * (ctx + 1) // 2)


def attention_err(out, q, k, v, pk, pv):
    """Rel. error of `out` against float64 attention over [prefix ; causal context], on the
    first CHECKED batch elements."""
    ctx, p = q.shape[2], pk.shape[2]
    allowed = torch.ones(ctx, p + ctx, dtype=torch.bool, device="cuda").tril(p)
    ref = torch.empty((CHECKED, *q.shape[1:]), dtype=torch.float64, device="cuda")
    for i in range(CHECKED):
        kb = torch.cat([pk[i].double(), k[i].double()], dim=1)
        vb = torch.cat([pv[i].double(), v[i].double()], dim=1)
        scores = (q[i].double() @ kb.transpose(-1, -2)) / math.sqrt(D)
        ref[i] = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ vb
    return rel_err(out[:CHECKED], ref)


def concat(pk, pv, k, v):
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def attention(gen, rows):
    sdpa = F.scaled_dot_product_attention
    for ctx in (512, 2048):
        qkv_bytes = 3 * 2 * BATCH * HEADS * ctx * D
        ops = [tuple(randn(gen, BATCH, HEADS, ctx, D) for _ in range(3))
               for _ in range(copies_for(qkv_bytes))]
        q, k, v = ops[0]
        empty = torch.empty(BATCH, HEADS, 0, D, dtype=torch.bfloat16, device="cuda")
        err = attention_err(sdpa(q, k, v, is_causal=True), q, k, v, empty, empty)
        t = per_call([lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True) for q, k, v in ops])
        rows.append(attention_row("SDPA is_causal, no prefix", ctx, 0, t, err))

        for p in (30, 128):
            # Per copy: q, k, v, the prefix, and k, v concatenated beforehand.
            full = [(q, k, v, pk, pv, *concat(pk, pv, k, v))
                    for (q, k, v), pk, pv in
                    ((qkv, randn(gen, BATCH, HEADS, p, D), randn(gen, BATCH, HEADS, p, D))
                     for qkv in ops)]
            # Query i sees every prefix position and context positions j <= i: a mask a
            # user builds once and caches.
            mask = torch.ones(ctx, p + ctx, dtype=torch.bool, device="cuda").tril(p)
            variants = [
                ("SDPA bool mask, with concat",
                 lambda q, k, v, pk, pv, kk, vv, mask=mask:
                 sdpa(q, *concat(pk, pv, k, v), attn_mask=mask)),
                ("SDPA bool mask, pre-concatenated",
                 lambda q, k, v, pk, pv, kk, vv, mask=mask: sdpa(q, kk, vv, attn_mask=mask)),
            ]
            if causal_lower_right is not None:
                bias = causal_lower_right(ctx, p + ctx)
                variants += [
                    ("SDPA causal_lower_right, with concat",
                     lambda q, k, v, pk, pv, kk, vv, bias=bias:
                     sdpa(q, *concat(pk, pv, k, v), attn_mask=bias)),
                    ("SDPA causal_lower_right, pre-concatenated",
                     lambda q, k, v, pk, pv, kk, vv, bias=bias: sdpa(q, kk, vv, attn_mask=bias)),
                ]
            for name, fn in variants:
                err = attention_err(fn(*full[0]), *full[0][:5])
                t = per_call([lambda c=c, fn=fn: fn(*c) for c in full])
                rows.append(attention_row(name, ctx, p, t, err))
            del full


def attention_backward_flops(ctx, p):
    # Five d-long products per allowed pair (q·k, dO·v, p·dO, ds·q, ds·k): 2.5 forwards.
    return 10 * BATCH * HEADS * D * (ctx * p + ctx * (ctx + 1) // 2)


def attention_backward_err(dq, q, kk, vv, dout, p):
    """Rel. error of dq against float64 autograd through attention over [prefix ; causal
    context] (kk, vv already concatenated), on the first batch element."""
    ctx = q.shape[2]
    allowed = torch.ones(ctx, p + ctx, dtype=torch.bool, device="cuda").tril(p)
    q64 = q[:1].detach().double().requires_grad_()
    scores = (q64 @ kk[:1].detach().double().transpose(-1, -2)) / math.sqrt(D)
    out = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ vv[:1].detach().double()
    (ref,) = torch.autograd.grad(out, q64, dout[:1].double())
    return rel_err(dq[:1], ref)


def attention_backward(gen, rows):
    """SDPA's backward on the prefix-attention shape, the forward run once outside the
    timing and its graph kept (retain_graph) so each call is the backward alone."""
    sdpa = F.scaled_dot_product_attention
    p = 30
    for ctx in (512, 2048, 4096):
        mask = (causal_lower_right(ctx, p + ctx) if causal_lower_right is not None else
                torch.ones(ctx, p + ctx, dtype=torch.bool, device="cuda").tril(p))
        nbytes = 9 * 2 * BATCH * HEADS * ctx * D
        pre, through = [], []
        for _ in range(copies_for(nbytes)):
            q = randn(gen, BATCH, HEADS, ctx, D).requires_grad_()
            k, v = (randn(gen, BATCH, HEADS, ctx, D).requires_grad_() for _ in range(2))
            pk, pv = (randn(gen, BATCH, HEADS, p, D).requires_grad_() for _ in range(2))
            dout = randn(gen, BATCH, HEADS, ctx, D)
            kk, vv = (t.detach().requires_grad_() for t in concat(pk, pv, k, v))
            pre.append((sdpa(q, kk, vv, attn_mask=mask), (q, kk, vv), dout))
            through.append((sdpa(q, *concat(pk, pv, k, v), attn_mask=mask),
                            (q, pk, pv, k, v), dout))
        q, kk, vv = pre[0][1]
        (dq, _, _) = torch.autograd.grad(*pre[0][:2], pre[0][2], retain_graph=True)
        err = attention_backward_err(dq, q, kk, vv, pre[0][2], p)
        for name, calls in (("SDPA backward, pre-concatenated K/V", pre),
                            ("SDPA backward through the concatenation", through)):
            t = per_call([lambda c=c: torch.autograd.grad(c[0], c[1], c[2], retain_graph=True)
                          for c in calls])
            rows.append(dict(peer=name, L=ctx, P=p, us=t * 1e6, err=err,
                             flop_s=attention_backward_flops(ctx, p) / t))
        del pre, through
        torch.cuda.empty_cache()


def attention_row(peer, ctx, p, seconds, err):
    return dict(peer=peer, L=ctx, P=p, us=seconds * 1e6, err=err,
                flop_s=attention_flops(ctx, p) / seconds)


# ---------------------------------------------------------------------------------------
# Report


def commit():
    if os.environ.get("PEFT_COMMIT"):
        return os.environ["PEFT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def verdict(err):
    return "ok" if err <= BF16_TOL else "FAIL"  # NaN compares false: it fails


def report(meta, bw, rate, lin, att, trn, bwd):
    out = ["## Peers (PyTorch, PEFT)", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += [f"- measured ceilings: copy {bw * 1e-9:.0f} GB/s (read + write), "
            f"bf16 matmul {MATMUL_SIDE}³ {rate * 1e-12:.0f} TFLOP/s", "",
            f"µs: {'the host clock' if DRY_RUN else 'CUDA events'} over batches of back-to-back calls, median; rel. err. "
            f"against float64, bf16 tolerance {BF16_TOL:g}.", ""]
    if lin:
        out += ["### Delta linear (K = N = 4096, bf16)", "",
                "| peer | M | r | µs | GB/s | % BW | TFLOP/s | % peak | rel. err. | |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        out += [f"| {r['peer']} | {r['M']} | {r['r']} | {r['us']:.1f} "
                f"| {r['bytes_s'] * 1e-9:.0f} | {100 * r['bytes_s'] / bw:.1f} "
                f"| {r['flop_s'] * 1e-12:.1f} | {100 * r['flop_s'] / rate:.1f} "
                f"| {r['err']:.1e} | {verdict(r['err'])} |" for r in lin]
        out.append("")
    if att:
        out += ["### Prefix attention (B = 8, H = 32, d = 128, bf16)", "",
                "| peer | L | prefix | µs | TFLOP/s | % peak | rel. err. | |",
                "|---|--:|--:|--:|--:|--:|--:|---|"]
        out += [f"| {r['peer']} | {r['L']} | {r['P']} | {r['us']:.1f} "
                f"| {r['flop_s'] * 1e-12:.1f} | {100 * r['flop_s'] / rate:.1f} "
                f"| {r['err']:.1e} | {verdict(r['err'])} |" for r in att]
        out.append("")
    if trn:
        k, n = TRAIN_SHAPES[:2]
        out += [f"### Training step of one layer (K = {k}, N = {n}, bf16)", "",
                "Forward + backward of sum(y ⊙ dy) into dx, dA, dB (W frozen); GB/s and "
                "TFLOP/s over the step's least traffic and eight GEMMs "
                "(benches/delta_linear_train.rs's); rel. err.: the largest of y, dx, dA, "
                "dB.", "",
                "| peer | M | r | µs | GB/s | % BW | TFLOP/s | % peak | rel. err. | |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        out += [f"| {r['peer']} | {r['M']} | {r['r']} | {r['us']:.1f} "
                f"| {r['bytes_s'] * 1e-9:.0f} | {100 * r['bytes_s'] / bw:.1f} "
                f"| {r['flop_s'] * 1e-12:.1f} | {100 * r['flop_s'] / rate:.1f} "
                f"| {r['err']:.1e} | {verdict(r['err'])} |" for r in trn]
        out.append("")
    if bwd:
        out += ["### Prefix attention backward (B = 8, H = 32, d = 128, causal, bf16)", "",
                "rel. err.: dq of the pre-concatenated call on the first batch element.", "",
                "| peer | L | prefix | µs | TFLOP/s | % peak | rel. err. | |",
                "|---|--:|--:|--:|--:|--:|--:|---|"]
        out += [f"| {r['peer']} | {r['L']} | {r['P']} | {r['us']:.1f} "
                f"| {r['flop_s'] * 1e-12:.1f} | {100 * r['flop_s'] / rate:.1f} "
                f"| {r['err']:.1e} | {verdict(r['err'])} |" for r in bwd]
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or ".",
                    help="folder for peers.md (default: $OUT, else .)")
    ap.add_argument("--only", choices=["linear", "attention", "train", "backward"])
    args = ap.parse_args()
    if DRY_RUN:
        args.only = "train"  # the only section with tiny shapes

    if not DRY_RUN and not torch.cuda.is_available():
        missing("no CUDA device is visible to PyTorch",
                "The peers are GPU timings; run this on the GPU machine.")
    seed = int(os.environ.get("PEFT_SEED", time.time_ns() % 2**31))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    if DRY_RUN:
        device = "CPU (PEFT_PEERS_DRY_RUN=1: tiny shapes, host clock, not a measurement)"
    else:
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name} ({props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2**30:.0f} GiB)")
    meta = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "software": f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
                    f"peft {peft.__version__}, Python {platform.python_version()}",
        "seed": f"PEFT_SEED={seed}",
    }
    lin, att, trn, bwd = [], [], [], []
    with torch.no_grad():
        bw, rate = ceilings(gen)
        if not DRY_RUN:
            torch.cuda.empty_cache()
        if args.only in (None, "linear"):
            delta_linear(gen, lin)
            torch.cuda.empty_cache()
        if args.only in (None, "attention"):
            attention(gen, att)
            torch.cuda.empty_cache()
    if args.only in (None, "train"):
        train(gen, trn)
    if args.only in (None, "backward"):
        attention_backward(gen, bwd)

    text = report(meta, bw, rate, lin, att, trn, bwd)
    print(text, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write(text + "\n")
    failed = sorted({r["peer"] for r in lin + att + trn + bwd if verdict(r["err"]) != "ok"})
    if failed:
        sys.stderr.write(f"peers.py: off the float64 reference: {', '.join(failed)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
