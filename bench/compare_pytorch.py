#!/usr/bin/python3
"""PyTorch side of the moet benchmark comparison.

Two suites of cases, selected with ``--cases layers|model|all`` (or a regex):

* layers: the same cases as the Google Benchmark program ``moet_bench_layers``
  in PyTorch eager mode with autograd (one forward + backward = one training
  step, float32, T = 1024 tokens, 2 intra-op threads), one table:

      case | moet ms | PyTorch ms | speed-up (PyTorch / moet)

  The suite includes one CALM composition layer (``calm_xattn/...``, see
  build_calm_xattn); for the cases with a GEMM FLOP count the table is
  followed by each side's GFLOP/s.

* cuda (``--device cuda``): the cases of ``moet_bench_cuda`` on the GPU, bf16,
  T = 8192 tokens (frozen linear, soft and top-2 MoLoRA, soft MoV), the same
  eager styles as the layer suite, timed with the device synchronised around
  every step.

* model: whole training steps (forward, cross-entropy, backward, gradient
  clipping and AdamW) of two decoder shapes, named like the moet cases:

      train_step/gpt2_small/{frozen,mov10,molora10,lora16,molora64_top2}
      train_step/llama_1b/{frozen,mov10,molora10,lora16,molora64_top2}

  frozen has no adapters (backward runs to the embeddings: the floor); mov10
  is MoV-10 on keys, values and ffn_hidden; molora10 soft MoLoRA-10 rank 4,
  lora16 a plain LoRA rank 16 (alpha = r) and molora64_top2 top-2 routed
  MoLoRA-64 rank 8, each on q, k, v, o, ffn_up and ffn_down.  On the CPU
  the shapes are moet_bench_model's small GPT-2 (6 layers, d_model 512, batch
  4 x 256, float32) and a Llama of the same size, and ``all`` / ``model``
  select only the three cases moet_bench_model has (gpt2_small frozen, mov10,
  molora10; a regex given to --cases reaches the others).  With ``--device
  cuda`` every case runs, in bf16 with SDPA attention, against
  ``moet_bench_cuda_model``: the real GPT-2 small (12 layers, vocab 50257,
  batch 8 x 1024) and a Llama 1B (16 layers, d_model 2048, 32 heads / 8 kv
  heads, d_ff 8192, vocab 32000, batch 4 x 2048).  One table per shape (its
  own tokens/s), each followed by the adapter variants' cost over that
  shape's frozen floor.  See "Model cases" below for the exact models.

* decode (``--device cuda``, or PyTorch alone with --tiny): greedy generation
  with a KV cache, as ``moet_bench_cuda_model``'s decode cases, one table:

      case | moet tok/s | PyTorch tok/s | speed-up (moet / PyTorch)

  decode/{gpt2_small,llama_1b}/batch{1,32}: 64 new tokens after a 16-token
  prompt per sequence, the prefill included (see "Decode cases" below).

moet's numbers come from running the moet benchmark binaries with JSON output
and taking the median aggregate of their repetitions, or from a JSON file such
a run wrote earlier (--moet-json, --moet-model-json: scripts/gpu-check.sh
already runs the binaries, and they take minutes).

Conventions shared with the C++ layer benchmark (keep them in sync):
  * inputs are reused between iterations, parameter gradients accumulate
    (never zeroed), the frozen base weight W0 has requires_grad=False, but
    x requires grad so dx is computed as well;
  * the upstream gradient dy is a fixed random tensor, the step is
    ``y.backward(dy)`` and nothing else (no optimizer);
  * exception: the CALM cross-attention case trains all its weights, has two
    inputs (anchor and augmenting states, both requiring grad) and sets every
    gradient to None before each step instead of accumulating.

Each mixture case is implemented in more than one reasonable eager style and
the fastest one is reported, so PyTorch is not penalised for one particular
way of writing the model; a footnote says which style won (and, for the
model cases, every style's time).  ``--check`` first verifies that all styles
of a case compute the same thing.  The model cases' styles:

  * frozen: eager (the functional model);
  * mov10, molora10: loop (a Python loop over per-expert parameters) and
    batched (all experts in one GEMM);
  * lora16: addmm (functional, the update fused into the addmm that adds
    it), module (the model as nn.Modules, nn.Linear layers wrapped by a small
    LoRALinear) and peft (Hugging Face PEFT's get_peft_model on the same
    modules; only where ``import peft`` works, else a footnote says so);
  * molora64_top2: batched (all 64 experts computed densely, gates zero
    outside each token's top 2: "PyTorch eager written as batched experts")
    and sparse (per-expert loop over the tokens routed to each, index_select
    / index_add_, as MoE code usually does);
  * with ``--compile`` (torch >= 2), every model case also gets "compiled":
    the batched / functional loss wrapped by torch.compile (default mode),
    compiled in an untimed first step.  It takes part in "fastest style".
  A peft or compiled style that fails (a version mismatch, a compiler error)
  is dropped with a message on stderr and a footnote instead of ending the run.

Must be run with /usr/bin/python3: Debian's python3-torch is only importable
by the system interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# The moet binary runs with the environment exactly as the user gave it.
_USER_ENV = dict(os.environ)

# Debian's torch runs elementwise ops on libgomp (OpenMP) threads but GEMMs on
# OpenBLAS's own pthread pool.  With libgomp's default spin-waiting, idle
# OpenMP workers keep burning the cores the BLAS threads need right after every
# elementwise op; on 2 cores this made training steps up to 3x slower (and very
# noisy).  Passive waiting lets them sleep.  libgomp reads this when it is
# loaded, so it has to be set before `import torch`; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (must come after the environment tweak above)
import torch.nn.functional as F  # noqa: E402

T = 1024              # tokens per step, same as the C++ benchmark
NUM_THREADS = 2       # intra-op threads, same as the C++ benchmark
DTYPE = torch.float32
DEVICE = "cpu"        # --device cuda switches T, DTYPE and DEVICE to the GPU suite's
USE_SDPA = False      # --device cuda: attention by F.scaled_dot_product_attention
WARMUP_ITERS = 2      # untimed iterations before each style is measured

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MOET_BENCH = REPO_ROOT / "build" / "bench" / "moet_bench_layers"
DEFAULT_MOET_BENCH_MODEL = REPO_ROOT / "build" / "bench" / "moet_bench_model"
DEFAULT_MOET_BENCH_CUDA = REPO_ROOT / "build" / "bench" / "moet_bench_cuda"
DEFAULT_MOET_BENCH_CUDA_MODEL = REPO_ROOT / "build" / "bench" / "moet_bench_cuda_model"


# --------------------------------------------------------------------------
# Case registry
# --------------------------------------------------------------------------

@dataclass
class Style:
    """One way of writing a case in PyTorch.

    ``step`` runs one forward + backward and returns y; ``x`` is the input leaf
    (each style owns its own copy so dx does not mix between styles).
    """
    step: Callable[[], torch.Tensor]
    x: torch.Tensor


# name -> builder; a builder creates fresh tensors (seeded, so every style of
# a case starts from identical values) and returns {style_name: Style}.
CASES: dict[str, Callable[[], dict[str, Style]]] = {}

# name -> GEMM FLOPs of one step (forward + backward), for the cases that have a count.
CASE_FLOPS: dict[str, float] = {}


def register(name: str, builder: Callable[..., dict[str, Style]], *args,
             flops: float | None = None) -> None:
    CASES[name] = lambda: builder(*args)
    if flops is not None:
        CASE_FLOPS[name] = flops


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, device=DEVICE) * scale


def _leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _make_step(forward: Callable[[], torch.Tensor], dy: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        y = forward()
        y.backward(dy)
        return y
    return step


# --- frozen linear --------------------------------------------------------

def build_frozen_linear(d_in: int, d_out: int) -> dict[str, Style]:
    torch.manual_seed(0)
    x = _leaf(_randn(T, d_in))
    w0 = _randn(d_in, d_out, scale=1 / math.sqrt(d_in))   # frozen
    dy = _randn(T, d_out)
    return {"matmul": Style(_make_step(lambda: x @ w0, dy), x)}


# --- MoLoRA (mixture of LoRA experts on a frozen linear) ------------------

def _top2_gates(logits: torch.Tensor) -> torch.Tensor:
    """Dense gate matrix keeping only each token's 2 largest probabilities,
    renormalised over those 2 (== softmax over the 2 chosen logits)."""
    vals, idx = logits.topk(2, dim=-1)
    return torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, dim=-1))


def build_molora(d_in: int, d_out: int, n_exp: int, rank: int, top2: bool) -> dict[str, Style]:
    torch.manual_seed(0)
    x0 = _randn(T, d_in)
    w0 = _randn(d_in, d_out, scale=1 / math.sqrt(d_in))     # frozen base weight
    wr0 = _randn(d_in, n_exp, scale=1 / math.sqrt(d_in))    # router, no bias
    a0 = _randn(n_exp, d_in, rank, scale=1 / math.sqrt(d_in))
    b0 = _randn(n_exp, rank, d_out, scale=0.02)  # non-zero: no "B = 0" shortcut
    dy = _randn(T, d_out)
    scale = 2.0 * rank / rank                    # alpha / R with alpha = 2R

    def gates(x: torch.Tensor, wr: torch.Tensor) -> torch.Tensor:
        logits = x @ wr
        return _top2_gates(logits) if top2 else torch.softmax(logits, dim=-1)

    styles: dict[str, Style] = {}

    # (a) loop: what most PyTorch MoLoRA repos do -- one Parameter pair per
    # expert (ModuleList style) and a Python loop accumulating every expert.
    # For top-2 this runs all experts, the unselected ones with zero gates.
    def loop_style() -> Style:
        x, wr = _leaf(x0), _leaf(wr0)
        a = [_leaf(a0[e]) for e in range(n_exp)]
        b = [_leaf(b0[e]) for e in range(n_exp)]

        def forward() -> torch.Tensor:
            g = gates(x, wr)
            y = x @ w0
            for e in range(n_exp):
                y = y + g[:, e:e + 1] * ((x @ a[e]) @ b[e]) * scale
            return y
        return Style(_make_step(forward, dy), x)

    styles["loop"] = loop_style()

    # (a') top-2 only: loop over experts but compute each expert only on the
    # tokens routed to it (index_select gather, index_add_ scatter), the way
    # sparse MoE implementations avoid the wasted dense work.
    if top2:
        def gather_style() -> Style:
            x, wr = _leaf(x0), _leaf(wr0)
            a = [_leaf(a0[e]) for e in range(n_exp)]
            b = [_leaf(b0[e]) for e in range(n_exp)]

            def forward() -> torch.Tensor:
                vals, idx = (x @ wr).topk(2, dim=-1)
                w = torch.softmax(vals, dim=-1) * scale
                y = x @ w0   # mm's backward does not need its output: in-place add is safe
                for e in range(n_exp):
                    tok, slot = (idx == e).nonzero(as_tuple=True)
                    if tok.numel() == 0:
                        continue
                    xe = x.index_select(0, tok)
                    ye = ((xe @ a[e]) * w[tok, slot].unsqueeze(1)) @ b[e]
                    y.index_add_(0, tok, ye)
                return y
            return Style(_make_step(forward, dy), x)

        styles["loop_gather"] = gather_style()

    # (b) batched: all experts' A and B concatenated into one d_in x E*R and
    # one E*R x d_out matrix, so the expert work is two GEMMs.  The gate is
    # applied to the small T x E*R intermediate per expert block (a broadcast
    # over a (T, E, R) view, equivalent to repeat_interleave without
    # materialising the repeated gates), and addmm fuses the add of x @ W0.
    def batched_style() -> Style:
        x, wr = _leaf(x0), _leaf(wr0)
        a_cat = _leaf(a0.permute(1, 0, 2).reshape(d_in, n_exp * rank))
        b_cat = _leaf(b0.reshape(n_exp * rank, d_out))

        def forward() -> torch.Tensor:
            g = gates(x, wr) * scale
            u = (x @ a_cat).view(T, n_exp, rank) * g.unsqueeze(-1)
            return torch.addmm(x @ w0, u.view(T, n_exp * rank), b_cat)
        return Style(_make_step(forward, dy), x)

    styles["batched"] = batched_style()
    return styles


# --- MoV (mixture of (IA)^3 vectors) ---------------------------------------

def build_mov(width: int, n_exp: int) -> dict[str, Style]:
    torch.manual_seed(0)
    h = _leaf(_randn(T, width))
    wr = _leaf(_randn(width, n_exp, scale=1 / math.sqrt(width)))
    l = _leaf(1.0 + _randn(n_exp, width, scale=0.01))      # ones + small noise
    dy = _randn(T, width)
    # One natural style: matmul, softmax, matmul, elementwise mul.
    forward = lambda: h * (torch.softmax(h @ wr, dim=-1) @ l)
    return {"matmul": Style(_make_step(forward, dy), h)}


# --- CALM composition layer (cross-attention from the anchor to the augmenting model) --

def build_calm_xattn(batch: int, len_b: int, len_a: int, d_b: int, d_a: int,
                     heads: int) -> dict[str, Style]:
    """One CALM composition layer (Bansal et al. 2024), tokens as rows:

        p = a Wp + bp;  q = h Wq;  k = p Wk;  v = p Wv      (heads of d_b / heads)
        y = h + softmax(q k^T / sqrt(head_dim) + cross-causal mask) v Wo

    h is the anchor's (batch*len_b, d_b) stream, a the augmenting model's
    (batch*len_a, d_a) states; anchor position t attends augmenting positions
    <= t.  Everything is trained (Wp, bp, Wq, Wk, Wv, Wo, all normal std 0.02:
    Wo is not zero, so no style can skip work), h and a require grad (moet
    computes da as well), and every gradient is set to None before each step.
    """
    torch.manual_seed(0)
    head_dim = d_b // heads
    h0 = _randn(batch * len_b, d_b)
    a0 = _randn(batch * len_a, d_a)
    wp0 = _randn(d_a, d_b, scale=0.02)
    bp0 = _randn(d_b, scale=0.02)
    wq0, wk0, wv0, wo0 = (_randn(d_b, d_b, scale=0.02) for _ in range(4))
    dy = _randn(batch * len_b, d_b)
    allowed = torch.ones(len_b, len_a, dtype=torch.bool).tril()   # [t, s]: s <= t
    additive = torch.zeros(len_b, len_a, dtype=DTYPE).masked_fill(~allowed, float("-inf"))
    additive = additive.unsqueeze(0)                             # (1, len_b, len_a)
    scale = 1 / math.sqrt(head_dim)

    def calm_style(attend: Callable[..., torch.Tensor]) -> Style:
        """A step of the layer whose attention is ``attend(q, k, v)`` on (rows, d_b) tensors."""
        h, a = _leaf(h0), _leaf(a0)
        wp, bp, wq, wk, wv, wo = (_leaf(t) for t in (wp0, bp0, wq0, wk0, wv0, wo0))
        leaves = (h, a, wp, bp, wq, wk, wv, wo)

        def step() -> torch.Tensor:
            for t in leaves:
                t.grad = None
            p = torch.addmm(bp, a, wp)
            y = h + attend(h @ wq, p @ wk, p @ wv) @ wo
            y.backward(dy)
            return y
        return Style(step, h)

    # (a) eager: 4-d heads, matmul, boolean mask filled with -inf, softmax, matmul.
    def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor, length: int) -> torch.Tensor:   # -> (batch, heads, length, hd)
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        scores = torch.matmul(split(q, len_b), split(k, len_a).transpose(-2, -1)) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        o = torch.matmul(probs, split(v, len_a))                   # (batch, heads, len_b, hd)
        return o.transpose(1, 2).reshape(batch * len_b, d_b)

    # (b) additive mask: heads flattened to (batch*heads, length, hd), and one
    # baddbmm adds the precomputed 0 / -inf mask and applies 1/sqrt(hd).
    def additive_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor, length: int) -> torch.Tensor:   # -> (batch*heads, length, hd)
            return t.view(batch, length, heads, head_dim).transpose(1, 2).reshape(
                batch * heads, length, head_dim)

        scores = torch.baddbmm(additive, split(q, len_b), split(k, len_a).transpose(1, 2),
                               alpha=scale)
        o = torch.bmm(torch.softmax(scores, dim=-1), split(v, len_a))
        return o.view(batch, heads, len_b, head_dim).transpose(1, 2).reshape(batch * len_b, d_b)

    return {"eager": calm_style(eager), "additive_mask": calm_style(additive_mask)}


def calm_xattn_flops(batch: int, len_b: int, len_a: int, d_b: int, d_a: int, heads: int) -> float:
    """GEMM FLOPs of one forward + backward of build_calm_xattn's layer.

    Forward: the projections p, q, k, v, o and the two attention products
    (q k^T and P v, counted dense: the causal mask's zeros are not subtracted).
    Backward: two GEMMs per projection (input and weight gradient) and four
    attention products (dV, dP, dQ, dK).  Flash-style recomputation of the
    scores in the backward pass (another 2*B*H*L_B*L_A*hd, which moet does) is
    not counted.
    """
    n_b, n_a, head_dim = batch * len_b, batch * len_a, d_b // heads
    linear = 2 * n_a * d_a * d_b + 2 * n_b * d_b * d_b + 2 * 2 * n_a * d_b * d_b + 2 * n_b * d_b * d_b
    attention = 2 * batch * heads * len_b * len_a * head_dim   # one of the L_B x L_A x hd products
    return float(linear + 2 * attention + 2 * linear + 4 * attention)


# The GPU suite (--device cuda): moet_bench_cuda's cases, built with T = 8192 and bf16.
CUDA_CASES: dict[str, Callable[[], dict[str, Style]]] = {
    "frozen_linear/8192/4096/4096": lambda: build_frozen_linear(4096, 4096),
    "molora_soft/8192/4096/4096/8/16": lambda: build_molora(4096, 4096, 8, 16, False),
    "molora_top2/8192/4096/4096/64/16": lambda: build_molora(4096, 4096, 64, 16, True),
    "mov_soft/8192/11008/30": lambda: build_mov(11008, 30),
}

register("frozen_linear/1024/1024", build_frozen_linear, 1024, 1024)
register("frozen_linear/1024/4096", build_frozen_linear, 1024, 4096)
register("molora_soft/1024/1024/10/4", build_molora, 1024, 1024, 10, 4, False)
register("molora_soft/1024/4096/15/4", build_molora, 1024, 4096, 15, 4, False)
register("molora_top2/1024/1024/10/4", build_molora, 1024, 1024, 10, 4, True)
register("mov_soft/2816/30", build_mov, 2816, 30)
register("mov_soft/1024/10", build_mov, 1024, 10)
register("calm_xattn/4/256/256/1024/512/16", build_calm_xattn, 4, 256, 256, 1024, 512, 16,
         flops=calm_xattn_flops(4, 256, 256, 1024, 512, 16))


# --------------------------------------------------------------------------
# Model cases: whole training steps of GPT-2- and Llama-shaped models
# (moet_bench_model on the CPU, moet_bench_cuda_model on the GPU)
# --------------------------------------------------------------------------
#
# Frozen host (random weights: normal std 0.02, norm weights 1 / biases 0,
# linear biases 0; nothing of it requires grad), pre-norm blocks:
#   a = norm1(x);  q, k, v = a Wq + bq, a Wk + bk, a Wv + bv
#   k, v *= the keys / values slots (MoV, routed on a)
#   [Llama: q, k = rotary(q), rotary(k)]
#   x1 = x + causal_attention(q, k, v) Wo + bo
#   b = norm2(x1);  h = gelu_tanh(b Wup + bup)   [Llama: silu(b Wgate) * b Wup]
#   h *= the ffn_hidden slot (MoV, routed on b);  x2 = x1 + h Wdown + bdown
# then a final norm, logits = x lm_head^T and the mean cross-entropy against
# the next token (each sequence's last position ignored).
#   GPT-2: LayerNorm, learned positions, biases, heads of d_model / heads,
#          tied embeddings (lm_head = wte).
#   Llama: RMSNorm, no positions but rotary embeddings (Hugging Face's
#          rotate-half layout, angles in float32), grouped-query attention
#          (kv_heads < heads: query head h reads kv head h // (heads / kv_heads)),
#          SwiGLU, no biases, an untied lm_head.  Slot q is the query
#          projection, ffn_up the up projection (ffn_gate, the gate projection,
#          is never adapted here), ffn_hidden the SwiGLU output.
#
# Variants (the adapter slots are the ones of moet's Decoder):
#   frozen         no adapters; the embedded input h0 is a leaf that requires
#                  grad, so backward still runs through every layer (the
#                  floor); no optimizer
#   mov10          soft-routed mixture of 10 (IA)^3 vectors on keys, values
#                  (routed on a) and ffn_hidden (routed on b), every layer
#   molora10       soft-routed mixture of 10 rank-4 LoRA experts on q, k, v, o,
#                  ffn_up and ffn_down, every layer
#   lora16         one rank-16 LoRA (alpha = r: scale 1, moet's LoRAAdapter
#                  default) on the same six slots
#   molora64_top2  64 rank-8 LoRA experts on the same six slots, top-2 routed:
#                  softmax over the 64 router logits, keep each token's two
#                  largest probabilities, divide them by their sum
# One step = embed, forward, loss, backward, clip_grad_norm_(1.0), AdamW(lr=1e-3)
# step, zero_grad(set_to_none=True).  The batch is fixed and reused.

MODEL_WARMUP_ITERS = 1   # untimed steps before each style is measured
MODEL_ITERS = 3          # timed steps per style (and Google Benchmark repetitions)
IGNORE_INDEX = -100
LORA_RANK = 16           # lora16
LORA_ALPHA = 16          # alpha = r, the default of moet's LoRA (include/moet/expert.hpp): scale 1


@dataclass(frozen=True)
class ModelShape:
    """Architecture and sizes of a benchmarked model (keep in sync with
    moet_bench_model and moet_bench_cuda_model).  ``arch`` is "gpt2" or
    "llama" (see the comment above for what differs); ``positions`` is used by
    GPT-2 only, ``rope_theta`` by Llama only."""
    arch: str = "gpt2"
    layers: int = 6
    d_model: int = 512
    heads: int = 8
    kv_heads: int = 8
    d_ff: int = 2048
    vocab: int = 8192
    positions: int = 256
    batch: int = 4
    seq: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown architecture {self.arch!r}")
        if self.d_model % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"{self}: heads must divide d_model and kv_heads must divide heads")

    @property
    def llama(self) -> bool:
        return self.arch == "llama"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def kv_width(self) -> int:
        """Width of the k and v projections' outputs (smaller than d_model with GQA)."""
        return self.kv_heads * self.head_dim

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        if self.llama:
            return (f"Llama {self.layers} layers, d_model {self.d_model}, {self.heads} heads / "
                    f"{self.kv_heads} kv heads, d_ff {self.d_ff}, vocab {self.vocab}, "
                    f"batch {self.batch}x{self.seq}")
        return (f"GPT-2 {self.layers} layers, d_model {self.d_model}, {self.heads} heads, "
                f"d_ff {self.d_ff}, vocab {self.vocab}, batch {self.batch}x{self.seq}")


# moet_bench_model's GPT-2 (the CPU suite).
GPT2_SMALL = ModelShape()
# --device cuda: the real GPT-2 small at issue 16's batch (moet_bench_cuda_model's gpt2_small).
GPT2_SMALL_GPU = ModelShape(layers=12, d_model=768, heads=12, kv_heads=12, d_ff=3072, vocab=50257,
                            positions=1024, batch=8, seq=1024)
# --tiny: a smoke-test size for checking the PyTorch code quickly.
GPT2_TINY = ModelShape(layers=2, d_model=64, heads=4, kv_heads=4, d_ff=256, vocab=512, positions=32,
                       batch=2, seq=32)
# The Llama cases on the CPU (only with an explicit --cases; moet_bench_model has no Llama):
# GPT2_SMALL's sizes with Llama's parts.
LLAMA_CPU = ModelShape(arch="llama", layers=6, d_model=512, heads=8, kv_heads=2, d_ff=1408,
                       vocab=8192, batch=4, seq=256, rope_theta=500000.0)
# --device cuda: moet_bench_cuda_model's llama_1b (a Llama-3.2-1B-like shape).
LLAMA_1B_GPU = ModelShape(arch="llama", layers=16, d_model=2048, heads=32, kv_heads=8, d_ff=8192,
                          vocab=32000, batch=4, seq=2048, rope_theta=500000.0)
LLAMA_TINY = ModelShape(arch="llama", layers=2, d_model=64, heads=4, kv_heads=2, d_ff=192, vocab=512,
                        batch=2, seq=32, rope_theta=500000.0)

# The shape part of a case name -> its shape on the CPU, on the GPU and with --tiny.
MODEL_SHAPES: dict[str, dict[str, ModelShape]] = {
    "gpt2_small": {"cpu": GPT2_SMALL, "cuda": GPT2_SMALL_GPU, "tiny": GPT2_TINY},
    "llama_1b": {"cpu": LLAMA_CPU, "cuda": LLAMA_1B_GPU, "tiny": LLAMA_TINY},
}

MOLORA_SLOTS = ("q", "k", "v", "o", "ffn_up", "ffn_down")
MOV_SLOTS = ("keys", "values", "ffn_hidden")


def linear_slot_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear slot the benchmark adapts (MOLORA_SLOTS)."""
    d, f, kv = shape.d_model, shape.d_ff, shape.kv_width
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "ffn_up": (d, f), "ffn_down": (f, d)}


def scale_slot_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(router input width, scaled width) of every activation slot of a block."""
    d, f, kv = shape.d_model, shape.d_ff, shape.kv_width
    return {"keys": (d, kv), "values": (d, kv), "ffn_hidden": (d, f)}


@dataclass
class FrozenBlock:
    """One block's frozen weights; linear weights are (d_in, d_out).  Llama has
    no biases (None) and a gate projection; GPT-2 has no gate (None)."""
    norm1_w: torch.Tensor
    norm1_b: torch.Tensor | None
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor | None
    w_up: torch.Tensor
    b_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    w_gate: torch.Tensor | None = None


@dataclass
class FrozenModel:
    """The frozen host model plus the fixed batch it is trained on."""
    shape: ModelShape
    wte: torch.Tensor              # (vocab, d) input embeddings
    wpe: torch.Tensor | None       # (positions, d), GPT-2 only
    blocks: list[FrozenBlock]
    normf_w: torch.Tensor
    normf_b: torch.Tensor | None
    lm_head: torch.Tensor          # (vocab, d): wte itself for GPT-2 (tied)
    ids: torch.Tensor              # (batch, seq) token ids
    labels: torch.Tensor           # (batch * seq,) next token, IGNORE_INDEX at each sequence's end
    causal_mask: torch.Tensor      # (1, seq, seq): 0 on and below the diagonal, -inf above
    rope_cos: torch.Tensor | None  # (seq, head_dim), Llama only
    rope_sin: torch.Tensor | None
    sdpa_gqa: bool                 # F.scaled_dot_product_attention takes enable_gqa


def _sdpa_accepts_gqa() -> bool:
    """Whether this torch's F.scaled_dot_product_attention has ``enable_gqa``
    (torch >= 2.5), found by calling it on a tiny input."""
    if not hasattr(F, "scaled_dot_product_attention"):
        return False
    q = torch.zeros(1, 2, 1, 8, dtype=DTYPE, device=DEVICE)
    kv = torch.zeros(1, 1, 1, 8, dtype=DTYPE, device=DEVICE)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def _rope_tables(shape: ModelShape, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (length, head_dim) in the rotate-half
    layout (each frequency twice: for the first and the second half of a head),
    for positions 0 .. length - 1 (default: shape.seq).  Angles are formed in
    float32, then the tables are cast to DTYPE."""
    hd = shape.head_dim
    inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=DEVICE) / hd)
    positions = shape.seq if length is None else length
    angles = torch.arange(positions, dtype=torch.float32, device=DEVICE)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(DTYPE), angles.sin().to(DTYPE)


@functools.lru_cache(maxsize=None)
def frozen_model(shape: ModelShape) -> FrozenModel:
    """The host model, seeded; built once per shape and shared by every case and
    style (it is never written to: nothing in it requires grad)."""
    torch.manual_seed(0)
    d, f, kv = shape.d_model, shape.d_ff, shape.kv_width

    def w(*dims: int) -> torch.Tensor:
        return _randn(*dims, scale=0.02)

    def bias(n: int) -> torch.Tensor | None:   # zeros for GPT-2, none for Llama
        return None if shape.llama else torch.zeros(n, dtype=DTYPE, device=DEVICE)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=DTYPE, device=DEVICE)

    wte = w(shape.vocab, d)
    wpe = None if shape.llama else w(shape.positions, d)
    blocks = [FrozenBlock(norm1_w=ones(d), norm1_b=bias(d),
                          wq=w(d, d), bq=bias(d), wk=w(d, kv), bk=bias(kv),
                          wv=w(d, kv), bv=bias(kv), wo=w(d, d), bo=bias(d),
                          norm2_w=ones(d), norm2_b=bias(d),
                          w_up=w(d, f), b_up=bias(f), w_down=w(f, d), b_down=bias(d),
                          w_gate=w(d, f) if shape.llama else None)
              for _ in range(shape.layers)]
    lm_head = w(shape.vocab, d) if shape.llama else wte
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq)).to(DEVICE)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    mask = torch.full((shape.seq, shape.seq), float("-inf"), dtype=DTYPE, device=DEVICE).triu(1).unsqueeze(0)
    cos, sin = _rope_tables(shape) if shape.llama else (None, None)
    return FrozenModel(shape, wte, wpe, blocks, ones(d), bias(d), lm_head, ids, labels.reshape(-1),
                       mask, cos, sin, USE_SDPA and shape.kv_heads < shape.heads and _sdpa_accepts_gqa())


def _affine(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None) -> torch.Tensor:
    """The frozen projection x W0 (+ b0)."""
    return x @ w0 if b0 is None else torch.addmm(b0, x, w0)


def _norm(shape: ModelShape, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """GPT-2's LayerNorm, or Llama's RMSNorm (statistics in float32, as
    Hugging Face's LlamaRMSNorm computes them; a no-op cast in float32)."""
    if not shape.llama:
        return F.layer_norm(x, (shape.d_model,), w, b, shape.norm_eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + shape.norm_eps)
    return w * xf.to(x.dtype)


def _ffn_act(shape: ModelShape, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The FFN's hidden activation: gelu_tanh(up), or Llama's silu(gate) * up."""
    return F.silu(gate) * up if shape.llama else F.gelu(up, approximate="tanh")


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of t (batch, seq, heads, head_dim), rotate-half layout:
    [t1 | t2] -> [t1 cos - t2 sin | t2 cos + t1 sin]."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos[:, None, :] + rotated * sin[:, None, :]


def _causal_attention(m: FrozenModel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head causal softmax attention of (tokens, d) q and (tokens,
    kv_width) k, v (rotary applied to q and k first for Llama); returns
    (tokens, d).  With GQA each kv head serves heads / kv_heads query heads."""
    s = m.shape
    qh = q.view(s.batch, s.seq, s.heads, s.head_dim)
    kh = k.view(s.batch, s.seq, s.kv_heads, s.head_dim)
    vh = v.view(s.batch, s.seq, s.kv_heads, s.head_dim)
    if m.rope_cos is not None:
        qh, kh = _rotate(qh, m.rope_cos, m.rope_sin), _rotate(kh, m.rope_cos, m.rope_sin)
    qh, kh, vh = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)   # (B, heads, S, hd)
    group = s.heads // s.kv_heads
    if USE_SDPA and hasattr(F, "scaled_dot_product_attention"):  # the GPU suite: torch 2's fused attention
        if m.sdpa_gqa:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        else:
            if group > 1:
                kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    else:
        if group > 1:
            kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        bh = s.batch * s.heads
        # baddbmm adds the causal mask and applies 1/sqrt(head_dim) in the same op.
        scores = torch.baddbmm(m.causal_mask, qh.reshape(bh, s.seq, s.head_dim),
                               kh.reshape(bh, s.seq, s.head_dim).transpose(1, 2),
                               alpha=1 / math.sqrt(s.head_dim))
        out = torch.bmm(torch.softmax(scores, dim=-1), vh.reshape(bh, s.seq, s.head_dim))
        out = out.view(s.batch, s.heads, s.seq, s.head_dim)
    return out.transpose(1, 2).reshape(s.tokens, s.d_model)


class Adapters:
    """The adapter slots of the model.  This base class leaves every slot as the
    frozen model computes it (the "frozen" variant); subclasses override
    ``linear`` (q, k, v, o, ffn_up, ffn_down) or ``scale`` (keys, values,
    ffn_hidden) for the slots they adapt and fall back to this class for the
    others (Llama's ffn_gate goes through ``linear`` too)."""

    def params(self) -> list[torch.Tensor]:
        """The trainable tensors."""
        return []

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor | None) -> torch.Tensor:
        """x W0 + b0, plus whatever the adapter adds."""
        return _affine(x, w0, b0)

    def scale(self, layer: int, slot: str, router_in: torch.Tensor,
              h: torch.Tensor) -> torch.Tensor:
        """The activation h, scaled by whatever the adapter computes from router_in."""
        return h


def _block(m: FrozenModel, i: int, x: torch.Tensor, ad: Adapters) -> torch.Tensor:
    """Block i of the model (pre-norm) on the (tokens, d) residual stream x."""
    p, s = m.blocks[i], m.shape
    a = _norm(s, x, p.norm1_w, p.norm1_b)
    q = ad.linear(i, "q", a, p.wq, p.bq)
    k = ad.scale(i, "keys", a, ad.linear(i, "k", a, p.wk, p.bk))
    v = ad.scale(i, "values", a, ad.linear(i, "v", a, p.wv, p.bv))
    x1 = x + ad.linear(i, "o", _causal_attention(m, q, k, v), p.wo, p.bo)
    b = _norm(s, x1, p.norm2_w, p.norm2_b)
    gate = ad.linear(i, "ffn_gate", b, p.w_gate, None) if s.llama else None
    h = _ffn_act(s, ad.linear(i, "ffn_up", b, p.w_up, p.b_up), gate)
    h = ad.scale(i, "ffn_hidden", b, h)
    return x1 + ad.linear(i, "ffn_down", h, p.w_down, p.b_down)


def _embed(m: FrozenModel) -> torch.Tensor:
    """h0 = wte[ids] (+ wpe[positions] for GPT-2), as (tokens, d)."""
    s = m.shape
    h0 = F.embedding(m.ids, m.wte)
    if m.wpe is not None:
        h0 = h0 + m.wpe[:s.seq]
    return h0.view(s.tokens, s.d_model)


def model_loss(m: FrozenModel, ad: Adapters, h0: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the model with adapters ``ad`` on input h0."""
    x = h0
    for i in range(m.shape.layers):
        x = _block(m, i, x, ad)
    x = _norm(m.shape, x, m.normf_w, m.normf_b)
    return F.cross_entropy(x @ m.lm_head.t(), m.labels, ignore_index=IGNORE_INDEX)


# --- MoLoRA and LoRA adapters ---------------------------------------------

@dataclass
class LoRAMixtureInit:
    """Initial values of one slot's MoLoRA: router (d_in, E), A (E, d_in, R), B (E, R, d_out)."""
    wr: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def molora_init(shape: ModelShape, n_exp: int, rank: int) -> dict[tuple[int, str], LoRAMixtureInit]:
    """Seeded initial values for every (layer, slot).  B is small random, not
    zero, so that no style can skip work because of it."""
    torch.manual_seed(1)
    return {(i, slot): LoRAMixtureInit(_randn(d_in, n_exp, scale=0.02),
                                       _randn(n_exp, d_in, rank, scale=0.02),
                                       _randn(n_exp, rank, d_out, scale=0.02))
            for i in range(shape.layers) for slot, (d_in, d_out) in linear_slot_dims(shape).items()}


class MoLoRABatched(Adapters):
    """All experts' A in one (d_in, E*R) matrix and all B in one (E*R, d_out):
    the gate scales each expert's R columns of U = x A, then one GEMM with B
    (addmm adds it to the frozen projection).  alpha / R = 1.  With ``top2``
    this is the "batched experts" form of a routed mixture: every expert is
    computed densely and the gates are zero outside each token's top 2."""

    def __init__(self, init: dict[tuple[int, str], LoRAMixtureInit], top2: bool = False):
        self.wr, self.a, self.b = {}, {}, {}
        for key, t in init.items():
            n_exp, d_in, rank = t.a.shape
            self.wr[key] = _leaf(t.wr)
            self.a[key] = _leaf(t.a.permute(1, 0, 2).reshape(d_in, n_exp * rank))
            self.b[key] = _leaf(t.b.reshape(n_exp * rank, -1))
        self.n_exp, self.rank, self.top2 = n_exp, rank, top2

    def params(self) -> list[torch.Tensor]:
        return [*self.wr.values(), *self.a.values(), *self.b.values()]

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor | None) -> torch.Tensor:
        key, n = (layer, slot), x.shape[0]
        if key not in self.a:
            return super().linear(layer, slot, x, w0, b0)
        logits = x @ self.wr[key]
        g = _top2_gates(logits) if self.top2 else torch.softmax(logits, dim=-1)
        u = (x @ self.a[key]).view(n, self.n_exp, self.rank) * g.unsqueeze(-1)
        return torch.addmm(_affine(x, w0, b0), u.view(n, self.n_exp * self.rank), self.b[key])


class MoLoRALoop(Adapters):
    """One (A, B) pair per expert and a Python loop adding every expert's
    gated x A_e B_e, the way most MoLoRA code is written."""

    def __init__(self, init: dict[tuple[int, str], LoRAMixtureInit]):
        self.wr = {key: _leaf(t.wr) for key, t in init.items()}
        self.a = {key: [_leaf(a) for a in t.a] for key, t in init.items()}
        self.b = {key: [_leaf(b) for b in t.b] for key, t in init.items()}

    def params(self) -> list[torch.Tensor]:
        return [*self.wr.values(), *(a for ab in self.a.values() for a in ab),
                *(b for bb in self.b.values() for b in bb)]

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor | None) -> torch.Tensor:
        key = (layer, slot)
        if key not in self.a:
            return super().linear(layer, slot, x, w0, b0)
        g = torch.softmax(x @ self.wr[key], dim=-1)
        y = _affine(x, w0, b0)
        for e, (a, b) in enumerate(zip(self.a[key], self.b[key])):
            y = y + g[:, e:e + 1] * ((x @ a) @ b)
        return y


class MoLoRATop2Sparse(MoLoRALoop):
    """Top-2 routing written as sparse MoE code usually is: one (A, B) pair per
    expert, the router's softmax in float32, each token's two largest
    probabilities renormalised by their sum, then a loop over the experts that
    computes each only on the tokens routed to it (gathered with index_select,
    added back into the frozen projection's output with index_add_).  The
    (token, choice) pairs are sorted by expert once per slot, so the loop needs
    a single host sync (the per-expert counts) instead of one per expert."""

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor | None) -> torch.Tensor:
        key = (layer, slot)
        if key not in self.a:
            return Adapters.linear(self, layer, slot, x, w0, b0)
        probs = torch.softmax(x @ self.wr[key], dim=-1, dtype=torch.float32)
        top, idx = probs.topk(2, dim=-1)
        gate = (top / top.sum(dim=-1, keepdim=True)).to(x.dtype).reshape(-1)   # (2n,), token-major
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.a[key])).tolist()
        tokens = torch.div(order, 2, rounding_mode="floor")
        gate = gate.index_select(0, order)
        y = _affine(x, w0, b0)   # mm/addmm's backward does not need its output: in-place adds are safe
        start = 0
        for a, b, count in zip(self.a[key], self.b[key], counts):
            if count:
                tok = tokens[start:start + count]
                ye = ((x.index_select(0, tok) @ a) * gate[start:start + count, None]) @ b
                y.index_add_(0, tok, ye)
            start += count
        return y


@dataclass
class LoRAInit:
    """Initial values of one slot's LoRA: A (d_in, R), B (R, d_out)."""
    a: torch.Tensor
    b: torch.Tensor


def lora_init(shape: ModelShape, rank: int) -> dict[tuple[int, str], LoRAInit]:
    """Seeded initial values for every (layer, slot); B small random, not zero."""
    torch.manual_seed(1)
    return {(i, slot): LoRAInit(_randn(d_in, rank, scale=0.02), _randn(rank, d_out, scale=0.02))
            for i in range(shape.layers) for slot, (d_in, d_out) in linear_slot_dims(shape).items()}


class LoRAFused(Adapters):
    """Plain LoRA as a functional model: y = x W0 + b0 + (alpha / R) (x A) B,
    the update added by the same addmm that multiplies by B."""

    def __init__(self, init: dict[tuple[int, str], LoRAInit], alpha: float = LORA_ALPHA):
        self.a = {key: _leaf(t.a) for key, t in init.items()}
        self.b = {key: _leaf(t.b) for key, t in init.items()}
        self.scaling = alpha / next(iter(init.values())).a.shape[1]

    def params(self) -> list[torch.Tensor]:
        return [*self.a.values(), *self.b.values()]

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor | None) -> torch.Tensor:
        key = (layer, slot)
        if key not in self.a:
            return super().linear(layer, slot, x, w0, b0)
        return torch.addmm(_affine(x, w0, b0), x @ self.a[key], self.b[key], alpha=self.scaling)


# --- MoV adapters ---------------------------------------------------------

@dataclass
class IA3MixtureInit:
    """Initial values of one slot's MoV: router (router width, E), vectors L (E, width)."""
    wr: torch.Tensor
    l: torch.Tensor


def mov_init(shape: ModelShape, n_exp: int) -> dict[tuple[int, str], IA3MixtureInit]:
    """Seeded initial values for every (layer, slot): router normal 0.02, L ones."""
    torch.manual_seed(1)
    return {(i, slot): IA3MixtureInit(_randn(d_router, n_exp, scale=0.02),
                                      torch.ones(n_exp, width, dtype=DTYPE, device=DEVICE))
            for i in range(shape.layers) for slot, (d_router, width) in scale_slot_dims(shape).items()}


class MoVBatched(Adapters):
    """s = softmax(router_in Wr) L as one GEMM, then h * s."""

    def __init__(self, init: dict[tuple[int, str], IA3MixtureInit]):
        self.wr = {key: _leaf(t.wr) for key, t in init.items()}
        self.l = {key: _leaf(t.l) for key, t in init.items()}

    def params(self) -> list[torch.Tensor]:
        return [*self.wr.values(), *self.l.values()]

    def scale(self, layer: int, slot: str, router_in: torch.Tensor,
              h: torch.Tensor) -> torch.Tensor:
        key = (layer, slot)
        return h * (torch.softmax(router_in @ self.wr[key], dim=-1) @ self.l[key])


class MoVLoop(Adapters):
    """One vector per expert and a Python loop summing the gated vectors."""

    def __init__(self, init: dict[tuple[int, str], IA3MixtureInit]):
        self.wr = {key: _leaf(t.wr) for key, t in init.items()}
        self.l = {key: [_leaf(l) for l in t.l] for key, t in init.items()}

    def params(self) -> list[torch.Tensor]:
        return [*self.wr.values(), *(l for ls in self.l.values() for l in ls)]

    def scale(self, layer: int, slot: str, router_in: torch.Tensor,
              h: torch.Tensor) -> torch.Tensor:
        key = (layer, slot)
        g = torch.softmax(router_in @ self.wr[key], dim=-1)
        s = g[:, 0:1] * self.l[key][0]
        for e in range(1, len(self.l[key])):
            s = s + g[:, e:e + 1] * self.l[key][e]
        return h * s


# --- the model as nn.Modules (the "module" and "peft" styles of lora16) -----
#
# The same frozen model as nn.Linear layers (Hugging Face's module names:
# q_proj, k_proj, v_proj, o_proj, up_proj, down_proj, gate_proj), so that LoRA
# can be applied the way module-level code and PEFT apply it: by wrapping
# the targeted nn.Linear layers.  The weights are FrozenModel's tensors
# themselves (nn.Linear's (d_out, d_in) weight is the transposed view of the
# (d_in, d_out) matrix), with requires_grad False.

LINEAR_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                       "ffn_up": "up_proj", "ffn_down": "down_proj"}


def _frozen_param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


def _frozen_linear(w0: torch.Tensor, b0: torch.Tensor | None) -> torch.nn.Linear:
    """An nn.Linear computing x w0 (+ b0) on the frozen tensors (not copied;
    constructed on the meta device so that nothing is allocated or drawn)."""
    d_in, d_out = w0.shape
    lin = torch.nn.utils.skip_init(torch.nn.Linear, d_in, d_out, bias=b0 is not None, device="meta")
    lin.weight = _frozen_param(w0.t())
    if b0 is not None:
        lin.bias = _frozen_param(b0)
    return lin


class NormModule(torch.nn.Module):
    """The frozen LayerNorm (GPT-2) or RMSNorm (Llama) of _norm."""

    def __init__(self, shape: ModelShape, w: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.shape = shape
        self.weight = _frozen_param(w)
        self.bias = None if b is None else _frozen_param(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(self.shape, x, self.weight, self.bias)


class BlockModule(torch.nn.Module):
    """Block i of the frozen model as modules; the same dataflow as _block."""

    def __init__(self, m: FrozenModel, i: int):
        super().__init__()
        p = m.blocks[i]
        self.frozen = m   # a plain attribute (not a module): the shape, rotary tables and mask
        self.norm1 = NormModule(m.shape, p.norm1_w, p.norm1_b)
        self.q_proj, self.k_proj = _frozen_linear(p.wq, p.bq), _frozen_linear(p.wk, p.bk)
        self.v_proj, self.o_proj = _frozen_linear(p.wv, p.bv), _frozen_linear(p.wo, p.bo)
        self.norm2 = NormModule(m.shape, p.norm2_w, p.norm2_b)
        self.up_proj, self.down_proj = _frozen_linear(p.w_up, p.b_up), _frozen_linear(p.w_down, p.b_down)
        self.gate_proj = _frozen_linear(p.w_gate, None) if p.w_gate is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.norm1(x)
        x1 = x + self.o_proj(_causal_attention(self.frozen, self.q_proj(a), self.k_proj(a), self.v_proj(a)))
        b = self.norm2(x1)
        gate = self.gate_proj(b) if self.gate_proj is not None else None
        return x1 + self.down_proj(_ffn_act(self.frozen.shape, self.up_proj(b), gate))


class DecoderModule(torch.nn.Module):
    """The frozen model as modules: forward(h0) is model_loss without adapters."""

    def __init__(self, m: FrozenModel):
        super().__init__()
        self.frozen = m
        self.blocks = torch.nn.ModuleList(BlockModule(m, i) for i in range(m.shape.layers))
        self.norm_f = NormModule(m.shape, m.normf_w, m.normf_b)
        self.lm_head = _frozen_linear(m.lm_head.t(), None)

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        x = h0
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.lm_head(self.norm_f(x)), self.frozen.labels, ignore_index=IGNORE_INDEX)


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, in the usual module
    form of LoRA: base(x) + lora_b(lora_a(x)) * scaling, with lora_a (R, d_in)
    and lora_b (d_out, R) in nn.Linear's weight layout."""

    def __init__(self, base: torch.nn.Linear, init: LoRAInit, scaling: float):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(init.a.t().contiguous())
        self.lora_b = torch.nn.Parameter(init.b.t().contiguous())
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


def _trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_module_style(m: FrozenModel, init: dict[tuple[int, str], LoRAInit]) -> ModelStyle:
    """lora16 as modules: DecoderModule with the six slots' nn.Linear replaced by LoRALinear."""
    net = DecoderModule(m)
    for (i, slot), t in init.items():
        name = LINEAR_MODULE_NAMES[slot]
        block = net.blocks[i]
        setattr(block, name, LoRALinear(getattr(block, name), t, LORA_ALPHA / LORA_RANK))
    return make_model_style(m, net, _trainable(net))


class StyleUnavailable(Exception):
    """A style that cannot exist in this environment (not an error: the style is
    left out and a footnote says why)."""


def lora_peft_style(m: FrozenModel, init: dict[tuple[int, str], LoRAInit]) -> ModelStyle:
    """lora16 by Hugging Face PEFT: get_peft_model on DecoderModule with a
    LoraConfig targeting the six slots' modules (r = 16, lora_alpha = 16, no
    dropout).  PEFT's A and B are then put in the model's dtype (PEFT >= 0.12
    autocasts bf16 adapter weights to float32 by default; every other style
    trains in the model's dtype) and set to the other styles' initial values.
    Written from PEFT's documented API (lora_A / lora_B ModuleDicts keyed by
    the adapter name, "default"); raises StyleUnavailable without PEFT."""
    try:
        import peft
    except Exception as err:   # ImportError, or PEFT's own dependencies failing to import
        raise StyleUnavailable(f"PEFT: not importable ({type(err).__name__}: {err})") from None
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=sorted(set(LINEAR_MODULE_NAMES.values())))
    model = peft.get_peft_model(DecoderModule(m), config)
    base = model.get_base_model()
    for (i, slot), t in init.items():
        layer = getattr(base.blocks[i], LINEAR_MODULE_NAMES[slot])   # PEFT's lora.Linear now
        lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
        if layer.scaling["default"] != LORA_ALPHA / LORA_RANK:
            raise RuntimeError(f"PEFT's scaling is {layer.scaling['default']}, expected {LORA_ALPHA / LORA_RANK}")
        lora_a.to(device=DEVICE, dtype=DTYPE)
        lora_b.to(device=DEVICE, dtype=DTYPE)
        with torch.no_grad():
            lora_a.weight.copy_(t.a.t())
            lora_b.weight.copy_(t.b.t())
    params = _trainable(model)
    want = sum(t.a.numel() + t.b.numel() for t in init.values())
    if sum(p.numel() for p in params) != want:
        raise RuntimeError(f"PEFT made {sum(p.numel() for p in params)} parameters trainable, expected {want}")
    return make_model_style(m, model, params)


# --- training step and registry -------------------------------------------

@dataclass
class ModelStyle:
    """One way of writing a model case in PyTorch.

    ``step`` runs one training step and returns (loss, gradient norm before
    clipping, or None when nothing is trained); ``n_params`` counts the
    trainable scalars.  A ``guarded`` style (peft, compiled) may fail in its
    first step for reasons outside this script (a PEFT or torch.compile
    version); it is then dropped with a message instead of ending the run.
    """
    step: Callable[[], tuple[float, float | None]]
    n_params: int
    guarded: bool = False


def make_model_style(m: FrozenModel, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                     params: list[torch.Tensor]) -> ModelStyle:
    """A training step of model m whose loss is ``loss_fn(h0)``.  Without
    trainable parameters (the frozen variant) h0 requires grad instead, so that
    backward still runs through every layer, and there is no optimizer."""
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None

    def step() -> tuple[float, float | None]:
        h0 = _embed(m)
        if opt is None:
            h0.requires_grad_()
        loss = loss_fn(h0)
        loss.backward()
        if opt is None:
            return loss.item(), None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), grad_norm.item()

    return ModelStyle(step, sum(p.numel() for p in params))


def functional_style(m: FrozenModel, ad: Adapters) -> ModelStyle:
    """A step of model_loss with adapters ad."""
    return make_model_style(m, lambda h0: model_loss(m, ad, h0), ad.params())


def compiled_style(m: FrozenModel, ad: Adapters) -> ModelStyle:
    """functional_style with the loss function wrapped by torch.compile (default
    mode).  Dynamo's caches are reset first: every case compiles the same
    function with other tensors, and past its recompile limit dynamo would
    silently run it eagerly.  Compilation happens in the first step."""
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()

    def loss(h0: torch.Tensor) -> torch.Tensor:
        return model_loss(m, ad, h0)

    return make_model_style(m, torch.compile(loss), ad.params())


@dataclass(frozen=True)
class Variant:
    """An adapter configuration of the model cases: ``styles`` gives the style
    makers of a model (each makes its own seeded copy of the adapters when
    called), ``compiled`` the adapters that --compile's style runs."""
    styles: Callable[[FrozenModel], dict[str, Callable[[], ModelStyle]]]
    compiled: Callable[[FrozenModel], Adapters]


VARIANTS: dict[str, Variant] = {
    "frozen": Variant(
        lambda m: {"eager": lambda: functional_style(m, Adapters())},
        lambda m: Adapters()),
    "mov10": Variant(
        lambda m: {"loop": lambda: functional_style(m, MoVLoop(mov_init(m.shape, 10))),
                   "batched": lambda: functional_style(m, MoVBatched(mov_init(m.shape, 10)))},
        lambda m: MoVBatched(mov_init(m.shape, 10))),
    "molora10": Variant(
        lambda m: {"loop": lambda: functional_style(m, MoLoRALoop(molora_init(m.shape, 10, 4))),
                   "batched": lambda: functional_style(m, MoLoRABatched(molora_init(m.shape, 10, 4)))},
        lambda m: MoLoRABatched(molora_init(m.shape, 10, 4))),
    "lora16": Variant(
        lambda m: {"addmm": lambda: functional_style(m, LoRAFused(lora_init(m.shape, LORA_RANK))),
                   "module": lambda: lora_module_style(m, lora_init(m.shape, LORA_RANK)),
                   "peft": lambda: lora_peft_style(m, lora_init(m.shape, LORA_RANK))},
        lambda m: LoRAFused(lora_init(m.shape, LORA_RANK))),
    "molora64_top2": Variant(
        lambda m: {"batched": lambda: functional_style(m, MoLoRABatched(molora_init(m.shape, 64, 8), top2=True)),
                   "sparse": lambda: functional_style(m, MoLoRATop2Sparse(molora_init(m.shape, 64, 8)))},
        lambda m: MoLoRABatched(molora_init(m.shape, 64, 8), top2=True)),
}
GUARDED_STYLES = ("peft", "compiled")


@dataclass(frozen=True)
class ModelCase:
    """A model case: the shape part of its name (a key of MODEL_SHAPES), its
    variant (a key of VARIANTS), and whether --device cpu selects it by default
    (only the cases moet_bench_model has; the others need --cases on the CPU)."""
    family: str
    variant: str
    cpu_default: bool


MODEL_CASES: dict[str, ModelCase] = {
    f"train_step/{family}/{variant}": ModelCase(
        family, variant, family == "gpt2_small" and variant in ("frozen", "mov10", "molora10"))
    for family in MODEL_SHAPES for variant in VARIANTS
}


def floor_case(family: str) -> str:
    """The frozen case of a shape: the floor its adapter cases are measured against."""
    return f"train_step/{family}/frozen"


# Footnotes collected while building styles (a style that is unavailable or was dropped).
STYLE_NOTES: list[str] = []


def _note(text: str) -> None:
    if text not in STYLE_NOTES:
        STYLE_NOTES.append(text)


# --------------------------------------------------------------------------
# PyTorch timing
# --------------------------------------------------------------------------

def time_step(step: Callable[[], torch.Tensor], repeats: int, iters: int) -> float:
    """Median (over ``repeats``) of per-iteration medians over ``iters`` steps, in ms."""
    on_gpu = DEVICE != "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(WARMUP_ITERS):
        step()
    medians = []
    for _ in range(repeats):
        samples = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            samples.append(time.perf_counter() - t0)
        medians.append(statistics.median(samples))
    return statistics.median(medians) * 1e3


def check_styles(name: str, styles: dict[str, Style]) -> None:
    """All styles of a case must compute the same y and dx (one step each)."""
    ref_name, ref = None, None
    for sname, style in styles.items():
        y = style.step().detach()
        dx = style.x.grad.detach().clone()
        if ref is None:
            ref_name, ref = sname, (y, dx)
            continue
        for what, got, want in (("y", y, ref[0]), ("dx", dx, ref[1])):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            status = "ok" if err < (1e-4 if DTYPE == torch.float32 else 3e-2) else "MISMATCH"
            print(f"check {name}: {what} {sname} vs {ref_name}: rel err {err:.2e} {status}",
                  file=sys.stderr)


def run_pytorch(names: list[str], repeats: int, iters: int, check: bool) -> dict[str, tuple[float, str, dict[str, float]]]:
    """case -> (best ms, best style, {style: ms})."""
    results = {}
    for name in names:
        styles = CASES[name]()
        if check:
            check_styles(name, styles)
            styles = CASES[name]()   # fresh tensors: the check left gradients behind
        per_style = {s: time_step(st.step, repeats, iters) for s, st in styles.items()}
        best = min(per_style, key=per_style.get)
        results[name] = (per_style[best], best, per_style)
        detail = ", ".join(f"{s} {ms:.2f}" for s, ms in per_style.items())
        print(f"  {name}: {detail} ms", file=sys.stderr)
        del styles
    return results


def time_model_step(step: Callable[[], tuple[float, float | None]], warmup: int,
                    iters: int) -> tuple[float, list[float]]:
    """(median, all samples) of ``iters`` timed training steps after ``warmup`` untimed ones, in ms.
    On the GPU the device is synchronised before and after every timed step."""
    sync = torch.cuda.synchronize if DEVICE != "cpu" else (lambda: None)
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def _drop_style(name: str, sname: str, err: BaseException, dropped: set[str]) -> None:
    """Reports a guarded style that failed and remembers not to build it again."""
    what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    print(f"warning: {name}: style '{sname}' failed and is dropped: {what}", file=sys.stderr)
    _note(f"{name}: style '{sname}' dropped ({what})")
    dropped.add(sname)


def build_model_styles(name: str, shape: ModelShape, compiled: bool,
                       dropped: set[str]) -> dict[str, ModelStyle]:
    """The styles of a model case (fresh, seeded values), with --compile's
    "compiled" style when ``compiled``; styles in ``dropped`` are skipped.  A
    style that is unavailable here is left out with a footnote; a guarded
    style that fails to build is dropped with a message."""
    case = MODEL_CASES[name]
    m = frozen_model(shape)
    variant = VARIANTS[case.variant]
    makers = variant.styles(m)
    if compiled:
        makers["compiled"] = lambda: compiled_style(m, variant.compiled(m))
    styles = {}
    for sname, make in makers.items():
        if sname in dropped:
            continue
        try:
            style = make()
        except StyleUnavailable as why:
            _note(str(why))
            dropped.add(sname)
            continue
        except Exception as err:
            if sname not in GUARDED_STYLES:
                raise
            _drop_style(name, sname, err, dropped)
            continue
        style.guarded = sname in GUARDED_STYLES
        styles[sname] = style
    return styles


def check_model_styles(name: str, styles: dict[str, ModelStyle], dropped: set[str]) -> None:
    """All styles of a model case must agree on the first step's loss and
    gradient norm and on the second step's loss (which sees the first AdamW
    update, so it checks the gradients as well).  Two steps each."""
    ref_name, ref = None, None
    for sname, style in styles.items():
        try:
            loss1, grad_norm = style.step()
            loss2, _ = style.step()
        except Exception as err:
            if not style.guarded:
                raise
            _drop_style(name, sname, err, dropped)
            continue
        got = {"loss": loss1, "grad norm": grad_norm, "loss after 1 step": loss2}
        print(f"check {name}: {sname}: " + ", ".join(
            f"{k} {v:.6g}" for k, v in got.items() if v is not None), file=sys.stderr)
        if ref is None:
            ref_name, ref = sname, got
            continue
        for what, want in ref.items():
            if want is None:
                continue
            err = abs(got[what] - want) / max(abs(want), 1e-30)
            status = "ok" if err < (1e-4 if DTYPE == torch.float32 else 3e-2) else "MISMATCH"
            print(f"check {name}: {what} {sname} vs {ref_name}: rel err {err:.2e} {status}",
                  file=sys.stderr)


def run_pytorch_model(names: list[str], shapes: dict[str, ModelShape], warmup: int, iters: int,
                      check: bool, compiled: bool) -> dict[str, tuple[float, str, dict[str, float]]]:
    """case -> (best ms, best style, {style: ms}), like run_pytorch; ``shapes``
    maps each case's family to the shape it runs at.  A guarded style's first
    step (where torch.compile compiles, unless --check already did) is an extra
    untimed warm-up step."""
    results = {}
    for name in names:
        shape = shapes[MODEL_CASES[name].family]
        dropped: set[str] = set()
        styles = build_model_styles(name, shape, compiled, dropped)
        if check:
            check_model_styles(name, styles, dropped)
            # Fresh values for timing (the check trained the adapters), except the
            # compiled style: it is kept, already compiled, rather than compiled again.
            kept = {s: style for s, style in styles.items() if s == "compiled" and s not in dropped}
            del styles
            styles = build_model_styles(name, shape, compiled, dropped | set(kept))
            styles.update(kept)
        per_style = {}
        for sname, style in styles.items():
            if style.guarded:
                try:
                    style.step()
                except Exception as err:
                    _drop_style(name, sname, err, dropped)
                    continue
            ms, samples = time_model_step(style.step, warmup, iters)
            per_style[sname] = ms
            print(f"  {name} [{sname}, {style.n_params} trainable]: median {ms:.1f} ms of "
                  + " ".join(f"{t:.1f}" for t in samples), file=sys.stderr)
        best = min(per_style, key=per_style.get)
        results[name] = (per_style[best], best, per_style)
        del styles
    return results


# --------------------------------------------------------------------------
# Decode cases: greedy generation with a KV cache (the frozen model)
# --------------------------------------------------------------------------
# decode/<shape>/batch{1,32}, as moet_bench_cuda_model's decode cases: the frozen
# model (frozen_model's weights) generates DECODE_NEW tokens greedily after a
# DECODE_PROMPT-token prompt per sequence, `batch` sequences at once, with a
# preallocated (batch, kv_heads, length, head_dim) key and value cache per layer:
# one prefill pass over the prompts, then one pass per new token, each reading
# the cache in place (SDPA on the GPU; no mask when one query attends to every
# cached key).  The timed call includes the prefill, as moet's generate does.
# Reported: tokens/s = batch * DECODE_NEW / time.  --check first compares the
# cached decoding's tokens with decoding that recomputes the whole sequence
# each step (no cache).
DECODE_PROMPT = 16
DECODE_NEW = 64
DECODE_CASES: dict[str, tuple[str, int]] = {
    f"decode/{family}/batch{b}": (family, b) for family in MODEL_SHAPES for b in (1, 32)}


def decode_new_tokens(shape: ModelShape) -> int:
    """DECODE_NEW, or fewer where GPT-2's learned positions end sooner (--tiny)."""
    return DECODE_NEW if shape.llama else min(DECODE_NEW, shape.positions - DECODE_PROMPT)


def decode_prompts(shape: ModelShape, batch: int) -> torch.Tensor:
    """The prompts of moet_bench_cuda_model's decode cases: token i of sequence
    b is (7 i + 3 b + 1) mod vocab."""
    i = torch.arange(DECODE_PROMPT)[None, :]
    b = torch.arange(batch)[:, None]
    return ((7 * i + 3 * b + 1) % shape.vocab).to(DEVICE)


def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, gqa: bool) -> torch.Tensor:
    """q (B, heads, L, hd) over the last L of k, v's (B, kv_heads, K, hd)
    positions, causally (L = K at the prefill, L = 1 when decoding)."""
    L, K = q.shape[2], k.shape[2]
    if USE_SDPA and hasattr(F, "scaled_dot_product_attention"):
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=True)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if L > 1:
        visible = torch.ones(L, K, dtype=torch.bool, device=q.device).tril(K - L)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@torch.no_grad()
def generate_greedy(m: FrozenModel, prompts: torch.Tensor, new_tokens: int, cached: bool = True) -> torch.Tensor:
    """(batch, new_tokens) greedy continuations of prompts (batch, P); cached=False
    recomputes every position at each step (the --check reference)."""
    s = m.shape
    B, P = prompts.shape
    total, hd, group = P + new_tokens, s.head_dim, s.heads // s.kv_heads
    if s.llama:
        cos, sin = _rope_tables(s, total)
    caches = [(torch.empty(B, s.kv_heads, total, hd, dtype=DTYPE, device=DEVICE),
               torch.empty(B, s.kv_heads, total, hd, dtype=DTYPE, device=DEVICE)) for _ in m.blocks]
    seq, ids, pos, out = prompts, prompts, 0, []
    for _ in range(new_tokens):
        L = ids.shape[1]
        x = m.wte[ids]
        if m.wpe is not None:
            x = x + m.wpe[pos:pos + L]
        for p, (k_cache, v_cache) in zip(m.blocks, caches):
            a = _norm(s, x, p.norm1_w, p.norm1_b).reshape(B * L, s.d_model)
            q = _affine(a, p.wq, p.bq).view(B, L, s.heads, hd)
            k = _affine(a, p.wk, p.bk).view(B, L, s.kv_heads, hd)
            v = _affine(a, p.wv, p.bv).view(B, L, s.kv_heads, hd)
            if s.llama:
                q, k = _rotate(q, cos[pos:pos + L], sin[pos:pos + L]), _rotate(k, cos[pos:pos + L], sin[pos:pos + L])
            k_cache[:, :, pos:pos + L] = k.transpose(1, 2)
            v_cache[:, :, pos:pos + L] = v.transpose(1, 2)
            o = _attend_cached(q.transpose(1, 2), k_cache[:, :, :pos + L], v_cache[:, :, :pos + L], group, m.sdpa_gqa)
            x = x + _affine(o.transpose(1, 2).reshape(B * L, s.d_model), p.wo, p.bo).view(B, L, s.d_model)
            b2 = _norm(s, x, p.norm2_w, p.norm2_b).reshape(B * L, s.d_model)
            gate = _affine(b2, p.w_gate, None) if p.w_gate is not None else None
            h = _ffn_act(s, _affine(b2, p.w_up, p.b_up), gate)
            x = x + _affine(h, p.w_down, p.b_down).view(B, L, s.d_model)
        last = _norm(s, x[:, -1], m.normf_w, m.normf_b)
        token = (last @ m.lm_head.t()).argmax(-1)
        out.append(token)
        seq = torch.cat((seq, token[:, None]), dim=1)
        if cached:
            ids, pos = token[:, None], pos + L
        else:
            ids = seq
    return torch.stack(out, dim=1)


def run_pytorch_decode(names: list[str], shapes: dict[str, ModelShape], iters: int,
                       check: bool) -> dict[str, tuple[float, int]]:
    """case -> (median ms of one generate call: prefill + the new tokens, new tokens)."""
    on_gpu = DEVICE != "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    results = {}
    for name in names:
        family, batch = DECODE_CASES[name]
        m = frozen_model(shapes[family])
        prompts = decode_prompts(m.shape, batch)
        new_tokens = decode_new_tokens(m.shape)
        if check:
            a = generate_greedy(m, prompts, 4)
            b = generate_greedy(m, prompts, 4, cached=False)
            same = bool((a == b).all())
            print(f"  {name}: cached and recomputed greedy tokens "
                  f"{'agree' if same else 'DIFFER (bf16 near-ties?)'}", file=sys.stderr)
        generate_greedy(m, prompts, 2)   # warm-up
        samples = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            generate_greedy(m, prompts, new_tokens)
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
        results[name] = (statistics.median(samples), new_tokens)
        print(f"  {name}: median {results[name][0]:.1f} ms of " + " ".join(f"{t:.1f}" for t in samples),
              file=sys.stderr)
    return results


def print_decode_table(names: list[str], moet: dict[str, float], torch_res: dict[str, tuple[float, int]],
                       markdown: bool, moet_note: str) -> None:
    """tokens/s of each side (moet always generates DECODE_NEW tokens) and moet's speed-up."""
    print(header(f"greedy decode, {DECODE_PROMPT}-token prompts + {DECODE_NEW} new tokens (PyTorch: "
                 f"fewer where GPT-2's positions end sooner, --tiny), "
                 f"{str(DTYPE).removeprefix('torch.')}"
                 + (f" on {torch.cuda.get_device_name()}" if DEVICE != "cpu" else "")))
    print()
    rows = []
    for name in names:
        batch = DECODE_CASES[name][1]
        pt = batch * torch_res[name][1] / (torch_res[name][0] * 1e-3)
        m_ms = moet.get(name)
        mt = batch * DECODE_NEW / (m_ms * 1e-3) if m_ms else None
        rows.append([name, f"{mt:.0f}" if mt else "n/a", f"{pt:.0f}", f"{mt / pt:.2f}x" if mt else "n/a"])
    print_rows(["case", "moet tok/s", "PyTorch tok/s", "speed-up (moet / PyTorch)"], rows, markdown)
    if moet_note:
        print(moet_note)


# --------------------------------------------------------------------------
# moet numbers (Google Benchmark JSON)
# --------------------------------------------------------------------------

_UNIT_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def _case_pattern(name: str) -> str:
    # Google Benchmark appends e.g. "/min_time:0.500", "/real_time", "/manual_time",
    # "/threads:1", "_median"; a further number ("/10240") or name ("_materialized") is another case.
    return (re.escape(name)
            + r"($|/(min_time|real_time|manual_time|process_time|threads|iterations|repeats)|_(mean|median|stddev|cv)$)")


def parse_moet_json(data: dict, names: list[str]) -> dict[str, float]:
    """case -> median real time in ms, from Google Benchmark JSON output.

    Takes the "median" aggregate; a case without one (a single repetition
    produces no aggregates) gets the median of its individual runs instead."""
    out: dict[str, float] = {}
    runs: dict[str, list[float]] = {}
    for bm in data.get("benchmarks", []):
        is_median = bm.get("aggregate_name") == "median" or (
            bm.get("run_type") == "aggregate" and bm.get("name", "").endswith("_median"))
        is_run = bm.get("run_type") == "iteration"
        if not (is_median or is_run):
            continue
        bm_name = bm.get("run_name") or bm["name"]
        ms = bm["real_time"] * _UNIT_TO_MS[bm.get("time_unit", "ns")]
        for name in names:
            if re.match(_case_pattern(name), bm_name):
                if is_median and name not in out:
                    out[name] = ms
                elif is_run:
                    runs.setdefault(name, []).append(ms)
    for name, times in runs.items():
        out.setdefault(name, statistics.median(times))
    return out


def run_moet(binary: Path, names: list[str], repeats: int) -> dict[str, float]:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        print(f"note: moet benchmark binary not found at {binary} "
              f"(build the '{binary.name}' target); moet column will be n/a",
              file=sys.stderr)
        return {}
    # Google Benchmark's filter is a regex over the full benchmark name.
    bm_filter = "^(" + "|".join(re.escape(n) for n in names) + ")(/|_|$)"
    # JSON goes to a file (--benchmark_out): moet's console output, with its ratio table, goes to
    # stderr so the user sees it while this script prints only its own table on stdout.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "moet.json"
        cmd = [str(binary), f"--benchmark_out={out}", "--benchmark_out_format=json",
               f"--benchmark_repetitions={repeats}",
               "--benchmark_report_aggregates_only=true",
               f"--benchmark_filter={bm_filter}"]
        print(f"running {' '.join(cmd)}", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=sys.stderr, text=True, env=_USER_ENV)
        if proc.returncode != 0:
            print(f"warning: {binary} exited with status {proc.returncode}; moet column will be n/a",
                  file=sys.stderr)
            return {}
        text = out.read_text() if out.exists() else ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        print(f"warning: could not parse JSON from {binary}: {err}", file=sys.stderr)
        return {}
    times = parse_moet_json(data, names)
    missing = [n for n in names if n not in times]
    if missing:
        print(f"warning: no moet median for: {', '.join(missing)}", file=sys.stderr)
    return times


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def blas_summary() -> str:
    """BLAS as torch reports it, plus the BLAS libraries actually mapped into
    this process (Debian's torch says BLAS_INFO=generic and goes through the
    libblas.so.3 alternative, so the mapped library is the informative part)."""
    m = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    info = m.group(1) if m else "?"
    libs = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if re.search(r"blas|mkl|blis", os.path.basename(path), re.I):
                    libs.add(os.path.basename(os.path.realpath(path)))
    except OSError:
        pass
    return f"{info} ({', '.join(sorted(libs))})" if libs else info


def header(what: str | None = None) -> str:
    """One line describing the software, threads and ``what`` was timed."""
    if what is None:
        what = f"T={T} {str(DTYPE).removeprefix('torch.')} fwd+bwd"
        if DEVICE != "cpu":
            what += f" on {torch.cuda.get_device_name()}"
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                     "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
           if k in os.environ]
    return (f"torch {torch.__version__} | BLAS {blas_summary()} | "
            f"threads {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op"
            + (f" ({' '.join(env)})" if env else "")
            + f" | {what} | {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def print_rows(cols: list[str], rows: list[list[str]], markdown: bool) -> None:
    """A table whose first column is a left-aligned name and the rest right-aligned numbers."""
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
        for r in rows:
            print("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |")
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                  for i, (v, w) in enumerate(zip(r, widths)))
        print(fmt(cols))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print(fmt(r))


def winners_footnote(names: list[str], torch_res: dict, what: str = "faster eager style") -> str:
    """Which style won, for the cases written in more than one."""
    multi = [(n, torch_res[n][1]) for n in names if len(torch_res[n][2]) > 1]
    return (f"PyTorch time is the {what}; winners: "
            + ", ".join(f"{n}: {s}" for n, s in multi)) if multi else ""


def flops_note(name: str, moet_ms: float | None, torch_ms: float) -> str:
    """One line: the case's GEMM FLOPs per step and the rate each side reaches."""
    flops = CASE_FLOPS[name]

    def rate(ms: float | None) -> str:
        return f"{flops / (ms * 1e-3) / 1e9:.1f} GFLOP/s" if ms else "n/a"

    return (f"  {name}: {flops / 1e9:.2f} GFLOP per step; "
            f"PyTorch {rate(torch_ms)}, moet {rate(moet_ms)}")


def print_table(names: list[str], moet: dict[str, float], torch_res: dict, markdown: bool) -> None:
    """The layer cases' table."""
    cols = ["case", "moet ms", "PyTorch ms", "speed-up"]
    rows = []
    for name in names:
        pt_ms = torch_res[name][0]
        m_ms = moet.get(name)
        rows.append([name,
                     f"{m_ms:.3f}" if m_ms is not None else "n/a",
                     f"{pt_ms:.3f}",
                     f"{pt_ms / m_ms:.2f}x" if m_ms else "n/a"])
    footnote = winners_footnote(names, torch_res)

    print(header())
    print()
    print_rows(cols, rows, markdown)
    if footnote:
        print()
        print(footnote)
    print("speed-up = PyTorch ms / moet ms (> 1 means moet is faster)")
    flop_notes = [flops_note(name, moet.get(name), torch_res[name][0])
                  for name in names if name in CASE_FLOPS]
    if flop_notes:
        print()
        print("GEMM FLOPs of one step (forward + backward; attention counted dense, without the "
              "backward's recomputation of the scores):")
        for note in flop_notes:
            print(note)




def styles_footnote(names: list[str], torch_res: dict) -> str:
    """Every style's time, for the cases written in more than one."""
    multi = [n for n in names if len(torch_res[n][2]) > 1]
    return ("PyTorch ms per style: " + "; ".join(
        f"{n.rsplit('/', 1)[-1]}: " + ", ".join(f"{s} {ms:.1f}" for s, ms in torch_res[n][2].items())
        for n in multi)) if multi else ""


def print_model_table(names: list[str], moet: dict[str, float], torch_res: dict, shape: ModelShape,
                      floor: str, markdown: bool, moet_note: str) -> None:
    """One shape's model cases: the table, then each adapter variant's cost over
    that shape's frozen floor.  tok/s counts this shape's tokens per step."""
    def tok_s(ms: float | None) -> str:
        return f"{shape.tokens / (ms / 1e3):.0f}" if ms else "n/a"

    cols = ["case", "moet ms", "PyTorch ms", "speed-up", "moet tok/s", "PyTorch tok/s"]
    rows = []
    for name in names:
        pt_ms, m_ms = torch_res[name][0], moet.get(name)
        rows.append([name,
                     f"{m_ms:.1f}" if m_ms is not None else "n/a",
                     f"{pt_ms:.1f}",
                     f"{pt_ms / m_ms:.2f}x" if m_ms else "n/a",
                     tok_s(m_ms), tok_s(pt_ms)])

    print(header(f"{shape.describe()} {str(DTYPE).removeprefix('torch.')} train step (fwd+bwd+clip+AdamW)"))
    print()
    print_rows(cols, rows, markdown)
    print()
    if moet_note:
        print(moet_note)
    for footnote in (winners_footnote(names, torch_res, "fastest style"),
                     styles_footnote(names, torch_res)):
        if footnote:
            print(footnote)
    print(f"speed-up = PyTorch ms / moet ms (> 1 means moet is faster); "
          f"tok/s = {shape.tokens} tokens per step / step time")

    if floor in names and len(names) > 1:
        pt_floor, m_floor = torch_res[floor][0], moet.get(floor)
        ratio_rows = []
        for name in names:
            if name == floor:
                continue
            m_ms = moet.get(name)
            ratio_rows.append([name, f"{torch_res[name][0] / pt_floor:.2f}x",
                               f"{m_ms / m_floor:.2f}x" if m_ms and m_floor else "n/a"])
        print()
        print(f"cost over the frozen floor ({floor}), each side against its own floor "
              f"from this run:")
        print()
        print_rows(["case", "PyTorch / frozen", "moet / frozen"], ratio_rows, markdown)


def print_model_tables(names: list[str], moet: dict[str, float], torch_res: dict,
                       shapes: dict[str, ModelShape], markdown: bool, moet_note: str) -> None:
    """One table per shape (GPT-2 and Llama steps differ in tokens and floor),
    then the notes on styles that are unavailable here or were dropped."""
    families = list(dict.fromkeys(MODEL_CASES[n].family for n in names))
    for k, family in enumerate(families):
        if k:
            print()
            print()
        print_model_table([n for n in names if MODEL_CASES[n].family == family], moet, torch_res,
                          shapes[family], floor_case(family), markdown, moet_note)
    if STYLE_NOTES:
        print()
        for note in STYLE_NOTES:
            print(f"note: {note}")


def select_cases(spec: str, model_default: list[str]) -> tuple[list[str], list[str]]:
    """(layer cases, model cases) selected by --cases: 'all', 'layers', 'model'
    or a regex searched in every case name.  'all' and 'model' take the model
    cases of ``model_default``; a regex may select any model case."""
    if spec == "all":
        return list(CASES), model_default
    if spec == "layers":
        return list(CASES), []
    if spec == "model":
        return [], model_default
    return ([n for n in CASES if re.search(spec, n)],
            [n for n in MODEL_CASES if re.search(spec, n)])


def load_moet_json(path: Path, names: list[str]) -> dict[str, float]:
    """moet's times from a Google Benchmark JSON file written earlier
    (--benchmark_out), instead of running the binary again."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"warning: could not read moet results from {path}: {err}; moet column will be n/a",
              file=sys.stderr)
        return {}
    times = parse_moet_json(data, names)
    missing = [n for n in names if n not in times]
    if missing:
        print(f"warning: no moet median in {path} for: {', '.join(missing)}", file=sys.stderr)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moet-bench", type=Path, default=DEFAULT_MOET_BENCH,
                    help="moet benchmark binary of the layer cases (default: %(default)s)")
    ap.add_argument("--moet-bench-model", type=Path, default=DEFAULT_MOET_BENCH_MODEL,
                    help="moet benchmark binary of the model cases (default: %(default)s)")
    ap.add_argument("--moet-json", type=Path,
                    help="read the layer cases' moet times from this Google Benchmark JSON file "
                         "(--benchmark_out of an earlier run) instead of running --moet-bench")
    ap.add_argument("--moet-model-json", type=Path,
                    help="the same for the model cases, instead of running --moet-bench-model")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the GPU suite (moet_bench_cuda's cases, bf16, T=8192; "
                         "moet_bench_cuda_model's GPT-2 small and Llama 1B)")
    ap.add_argument("--cases", default="all",
                    help="'layers', 'model', 'all' (default) or a regex selecting cases (re.search); "
                         "on the CPU, 'all' and 'model' leave out the model cases moet_bench_model "
                         "lacks (see --list)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="layer cases: timed medians per style / Google Benchmark repetitions (default 5)")
    ap.add_argument("--iters", type=int, default=3,
                    help="layer cases: iterations per timed median (default 3)")
    ap.add_argument("--model-warmup", type=int, default=MODEL_WARMUP_ITERS,
                    help=f"model cases: untimed steps per style (default {MODEL_WARMUP_ITERS})")
    ap.add_argument("--model-iters", type=int, default=MODEL_ITERS,
                    help="model cases: timed steps per style, median reported; also moet's "
                         f"Google Benchmark repetitions (default {MODEL_ITERS})")
    ap.add_argument("--compile", action="store_true",
                    help="model cases: add a 'compiled' style, the loss function wrapped by "
                         "torch.compile (compiled in an untimed first step)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--check", action="store_true",
                    help="verify that all styles of a case agree before timing (layers: y and dx; "
                         "model: loss, gradient norm and the loss after one AdamW step)")
    ap.add_argument("--list", action="store_true",
                    help="list the case names of --device (no device needed) and exit")
    # Debugging aid: the model cases at a tiny size, PyTorch only.
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global T, DTYPE, DEVICE, CASES, USE_SDPA
    if args.device == "cuda":
        CASES = CUDA_CASES   # the model cases stay: GPT-2 small and Llama 1B in bf16 with SDPA
    # Model cases of 'all' / 'model': on the CPU only those moet_bench_model has, unless --tiny.
    model_default = [n for n, c in MODEL_CASES.items()
                     if args.device == "cuda" or args.tiny or c.cpu_default]

    if args.list:
        print("\n".join([*CASES, *MODEL_CASES, *(DECODE_CASES if args.device == "cuda" else [])]))
        extra = [n for n in MODEL_CASES if n not in model_default]
        if extra:
            print(f"(--device {args.device}: 'all' and 'model' leave out {', '.join(extra)}; "
                  f"select them with --cases)", file=sys.stderr)
        return 0
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: torch sees no CUDA device", file=sys.stderr)
            return 2
        T, DTYPE, DEVICE, USE_SDPA = 8192, torch.bfloat16, "cuda", True
        if args.moet_bench == DEFAULT_MOET_BENCH:
            args.moet_bench = DEFAULT_MOET_BENCH_CUDA
        if args.moet_bench_model == DEFAULT_MOET_BENCH_MODEL:
            args.moet_bench_model = DEFAULT_MOET_BENCH_CUDA_MODEL

    names, model_names = select_cases(args.cases, model_default)
    # Decode cases: moet has them on the GPU only (moet_bench_cuda_model); --tiny runs PyTorch's.
    decode_ok = args.device == "cuda" or args.tiny
    if args.cases in ("all", "model"):
        decode_names = list(DECODE_CASES) if decode_ok else []
    elif args.cases == "layers":
        decode_names = []
    else:
        decode_names = [n for n in DECODE_CASES if re.search(args.cases, n)] if decode_ok else []
    if not names and not model_names and not decode_names:
        print(f"no case matches {args.cases!r}; cases: {', '.join([*CASES, *MODEL_CASES, *DECODE_CASES])}",
              file=sys.stderr)
        return 2
    size = "tiny" if args.tiny else args.device
    shapes = {family: by_size[size] for family, by_size in MODEL_SHAPES.items()}
    compiled = args.compile and bool(model_names)
    if compiled and not hasattr(torch, "compile"):
        print(f"--compile: torch.compile is unavailable in this torch ({torch.__version__}); "
              f"no compiled style is added", file=sys.stderr)
        _note(f"compiled: torch.compile is unavailable in torch {torch.__version__}")
        compiled = False

    torch.set_num_threads(NUM_THREADS)
    torch.set_num_interop_threads(1)

    # moet first, in its own process, so the two never compete for the cores.
    if not names:
        moet = {}
    elif args.moet_json:
        moet = load_moet_json(args.moet_json, names)
    else:
        moet = run_moet(args.moet_bench, names, args.repeats)
    moet_model, moet_note = {}, ""
    # moet_bench_model (CPU) has only the cases selected by default there.
    moet_model_names = [n for n in model_names if args.device == "cuda" or MODEL_CASES[n].cpu_default]
    if model_names and args.tiny:
        moet_note = "moet: not run (--tiny: the moet binary only has the full-size model)"
    elif model_names and args.moet_model_json:
        moet_model = load_moet_json(args.moet_model_json, moet_model_names)
        if not moet_model:
            moet_note = f"moet: n/a, no results in {args.moet_model_json} (see stderr)"
    elif moet_model_names:
        moet_model = run_moet(args.moet_bench_model, moet_model_names, args.model_iters)
        if not moet_model:
            moet_note = (f"moet: n/a, no results from {args.moet_bench_model} "
                         f"(missing or failed; see stderr)")
    if model_names and not moet_note and len(moet_model_names) < len(model_names):
        moet_note = f"moet: n/a where {args.moet_bench_model.name} has no such case"
    if names:
        print(f"timing PyTorch ({len(names)} cases)...", file=sys.stderr)
        torch_res = run_pytorch(names, args.repeats, args.iters, args.check)
        print_table(names, moet, torch_res, args.markdown)
    if model_names:
        used = dict.fromkeys(MODEL_CASES[n].family for n in model_names)
        print(f"timing PyTorch training steps ({len(model_names)} cases, "
              + "; ".join(shapes[f].describe() for f in used) + ")...", file=sys.stderr)
        torch_model = run_pytorch_model(model_names, shapes, args.model_warmup, args.model_iters,
                                        args.check, compiled)
        if names:
            print()
            print()
        print_model_tables(model_names, moet_model, torch_model, shapes, args.markdown, moet_note)
    if decode_names:
        decode_note = ""
        if args.tiny:
            moet_decode, decode_note = {}, "moet: not run (--tiny: the moet binary only has the full-size model)"
        elif args.moet_model_json:
            moet_decode = load_moet_json(args.moet_model_json, decode_names)
        else:
            moet_decode = run_moet(args.moet_bench_model, decode_names, args.model_iters)
        if not args.tiny and not moet_decode:
            decode_note = "moet: n/a (no decode results; see stderr)"
        print(f"timing PyTorch greedy decoding ({len(decode_names)} cases)...", file=sys.stderr)
        torch_decode = run_pytorch_decode(decode_names, shapes, args.model_iters, args.check)
        if names or model_names:
            print()
            print()
        print_decode_table(decode_names, moet_decode, torch_decode, args.markdown, decode_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
