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

* model: whole training steps of a small GPT-2-shaped model, the cases of
  ``moet_bench_model`` (with ``--device cuda``: the real GPT-2 small, 12 layers,
  vocab 50257, batch 8 x 1024, in bf16 with SDPA attention, against
  ``moet_bench_cuda_model``'s ``train_step/gpt2_small/*``) (``train_step/gpt2_small/{frozen,mov10,molora10}``):
  forward, cross-entropy, backward, gradient clipping and AdamW; the table adds
  tokens/s, and the adapter variants' cost over the frozen floor is printed.
  See "Model cases" below for the exact model.

moet's numbers come from running the moet benchmark binaries with JSON output
and taking the median aggregate of their repetitions.

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
way of writing the model; a footnote says which style won.

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
# Model cases: whole training steps of a small GPT-2 (moet_bench_model)
# --------------------------------------------------------------------------
#
# Frozen host (random weights: normal std 0.02, LayerNorm weight 1 / bias 0,
# linear biases 0; nothing of it requires grad), pre-LN blocks:
#   a = LN1(x);  q, k, v = a Wq + bq, a Wk + bk, a Wv + bv
#   x1 = x + causal_attention(q, k, v) Wo + bo       (heads of 64, all tokens real)
#   b = LN2(x1); h = gelu_tanh(b Wup + bup); x2 = x1 + h Wdown + bdown
# then a final LN, logits = h wte^T (tied embeddings) and the mean
# cross-entropy against the next token (each sequence's last position ignored).
#
# Variants (the adapter slots are the ones of moet's Decoder):
#   frozen    no adapters; the embedded input h0 is a leaf that requires grad,
#             so backward still runs through every layer (the floor); no optimizer
#   mov10     soft-routed mixture of 10 (IA)^3 vectors on keys, values (routed
#             on a) and ffn_hidden (routed on b), every layer
#   molora10  soft-routed mixture of 10 rank-4 LoRA experts on q, k, v, o,
#             ffn_up and ffn_down, every layer
# One step = embed, forward, loss, backward, clip_grad_norm_(1.0), AdamW(lr=1e-3)
# step, zero_grad(set_to_none=True).  The batch is fixed and reused.

MODEL_WARMUP_ITERS = 1   # untimed steps before each style is measured
MODEL_ITERS = 3          # timed steps per style (and Google Benchmark repetitions)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class GPT2Shape:
    """Sizes of the benchmarked model (keep in sync with moet_bench_model)."""
    layers: int = 6
    d_model: int = 512
    heads: int = 8
    d_ff: int = 2048
    vocab: int = 8192
    positions: int = 256
    batch: int = 4
    seq: int = 256

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        return (f"GPT-2 {self.layers} layers, d_model {self.d_model}, {self.heads} heads, "
                f"d_ff {self.d_ff}, vocab {self.vocab}, batch {self.batch}x{self.seq}")


GPT2_SMALL = GPT2Shape()
# --device cuda: the real GPT-2 small at issue 16's batch (moet_bench_cuda_model's gpt2_small).
GPT2_SMALL_GPU = GPT2Shape(layers=12, d_model=768, heads=12, d_ff=3072, vocab=50257, positions=1024, batch=8, seq=1024)
# --tiny: a smoke-test size for checking the PyTorch code quickly.
GPT2_TINY = GPT2Shape(layers=2, d_model=64, heads=4, d_ff=256, vocab=512, positions=32, batch=2, seq=32)

MOLORA_SLOTS = ("q", "k", "v", "o", "ffn_up", "ffn_down")
MOV_SLOTS = ("keys", "values", "ffn_hidden")


def linear_slot_dims(shape: GPT2Shape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear slot of a block."""
    d, f = shape.d_model, shape.d_ff
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_up": (d, f), "ffn_down": (f, d)}


def scale_slot_dims(shape: GPT2Shape) -> dict[str, tuple[int, int]]:
    """(router input width, scaled width) of every activation slot of a block."""
    d, f = shape.d_model, shape.d_ff
    return {"keys": (d, d), "values": (d, d), "ffn_hidden": (d, f)}


@dataclass
class FrozenBlock:
    """One block's frozen weights; linear weights are (d_in, d_out)."""
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wq: torch.Tensor
    bq: torch.Tensor
    wk: torch.Tensor
    bk: torch.Tensor
    wv: torch.Tensor
    bv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w_up: torch.Tensor
    b_up: torch.Tensor
    w_down: torch.Tensor
    b_down: torch.Tensor


@dataclass
class FrozenGPT2:
    """The frozen host model plus the fixed batch it is trained on."""
    shape: GPT2Shape
    wte: torch.Tensor          # (vocab, d), also the LM head
    wpe: torch.Tensor          # (positions, d)
    blocks: list[FrozenBlock]
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    ids: torch.Tensor          # (batch, seq) token ids
    labels: torch.Tensor       # (batch * seq,) next token, IGNORE_INDEX at each sequence's end
    causal_mask: torch.Tensor  # (1, seq, seq): 0 on and below the diagonal, -inf above


@functools.lru_cache(maxsize=None)
def frozen_gpt2(shape: GPT2Shape) -> FrozenGPT2:
    """The host model, seeded; built once per shape and shared by every case and
    style (it is never written to: nothing in it requires grad)."""
    torch.manual_seed(0)
    d, f = shape.d_model, shape.d_ff

    def w(*dims: int) -> torch.Tensor:
        return _randn(*dims, scale=0.02)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=DTYPE, device=DEVICE)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=DTYPE, device=DEVICE)

    wte, wpe = w(shape.vocab, d), w(shape.positions, d)
    blocks = [FrozenBlock(ln1_w=ones(d), ln1_b=zeros(d),
                          wq=w(d, d), bq=zeros(d), wk=w(d, d), bk=zeros(d),
                          wv=w(d, d), bv=zeros(d), wo=w(d, d), bo=zeros(d),
                          ln2_w=ones(d), ln2_b=zeros(d),
                          w_up=w(d, f), b_up=zeros(f), w_down=w(f, d), b_down=zeros(d))
              for _ in range(shape.layers)]
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq)).to(DEVICE)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    mask = torch.full((shape.seq, shape.seq), float("-inf"), dtype=DTYPE, device=DEVICE).triu(1).unsqueeze(0)
    return FrozenGPT2(shape, wte, wpe, blocks, ones(d), zeros(d), ids, labels.reshape(-1), mask)


class Adapters:
    """The adapter slots of the model.  This base class leaves every slot as the
    frozen model computes it (the "frozen" variant); subclasses override
    ``linear`` (q, k, v, o, ffn_up, ffn_down) or ``scale`` (keys, values,
    ffn_hidden) for the slots they adapt."""

    def params(self) -> list[torch.Tensor]:
        """The trainable tensors."""
        return []

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor) -> torch.Tensor:
        """x W0 + b0, plus whatever the adapter adds."""
        return torch.addmm(b0, x, w0)

    def scale(self, layer: int, slot: str, router_in: torch.Tensor,
              h: torch.Tensor) -> torch.Tensor:
        """The activation h, scaled by whatever the adapter computes from router_in."""
        return h


def _causal_attention(m: FrozenGPT2, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head causal softmax attention of (tokens, d) q, k, v; returns (tokens, d)."""
    s = m.shape

    def heads(t: torch.Tensor) -> torch.Tensor:   # (B*S, d) -> (B*H, S, hd)
        return t.view(s.batch, s.seq, s.heads, s.head_dim).transpose(1, 2).reshape(
            s.batch * s.heads, s.seq, s.head_dim)

    qh, kh, vh = heads(q), heads(k), heads(v)
    if USE_SDPA and hasattr(F, "scaled_dot_product_attention"):  # the GPU suite: torch 2's fused attention
        out = F.scaled_dot_product_attention(qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0), is_causal=True)[0]
        return out.view(s.batch, s.heads, s.seq, s.head_dim).transpose(1, 2).reshape(s.tokens, s.d_model)
    # baddbmm adds the causal mask and applies 1/sqrt(head_dim) in the same op.
    scores = torch.baddbmm(m.causal_mask, qh, kh.transpose(1, 2), alpha=1 / math.sqrt(s.head_dim))
    out = torch.bmm(torch.softmax(scores, dim=-1), vh)          # (B*H, S, hd)
    return out.view(s.batch, s.heads, s.seq, s.head_dim).transpose(1, 2).reshape(s.tokens, s.d_model)


def _block(m: FrozenGPT2, i: int, x: torch.Tensor, ad: Adapters) -> torch.Tensor:
    """Block i of the model (pre-LN) on the (tokens, d) residual stream x."""
    p, d = m.blocks[i], (m.shape.d_model,)
    a = F.layer_norm(x, d, p.ln1_w, p.ln1_b)
    q = ad.linear(i, "q", a, p.wq, p.bq)
    k = ad.scale(i, "keys", a, ad.linear(i, "k", a, p.wk, p.bk))
    v = ad.scale(i, "values", a, ad.linear(i, "v", a, p.wv, p.bv))
    x1 = x + ad.linear(i, "o", _causal_attention(m, q, k, v), p.wo, p.bo)
    b = F.layer_norm(x1, d, p.ln2_w, p.ln2_b)
    h = F.gelu(ad.linear(i, "ffn_up", b, p.w_up, p.b_up), approximate="tanh")
    h = ad.scale(i, "ffn_hidden", b, h)
    return x1 + ad.linear(i, "ffn_down", h, p.w_down, p.b_down)


def _embed(m: FrozenGPT2) -> torch.Tensor:
    """h0 = wte[ids] + wpe[positions], as (tokens, d)."""
    s = m.shape
    return (F.embedding(m.ids, m.wte) + m.wpe[:s.seq]).view(s.tokens, s.d_model)


def gpt2_loss(m: FrozenGPT2, ad: Adapters, h0: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the model with adapters ``ad`` on input h0."""
    x = h0
    for i in range(m.shape.layers):
        x = _block(m, i, x, ad)
    x = F.layer_norm(x, (m.shape.d_model,), m.lnf_w, m.lnf_b)
    return F.cross_entropy(x @ m.wte.t(), m.labels, ignore_index=IGNORE_INDEX)


# --- MoLoRA adapters ------------------------------------------------------

@dataclass
class LoRAMixtureInit:
    """Initial values of one slot's MoLoRA: router (d_in, E), A (E, d_in, R), B (E, R, d_out)."""
    wr: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def molora_init(shape: GPT2Shape, n_exp: int, rank: int) -> dict[tuple[int, str], LoRAMixtureInit]:
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
    (addmm adds it to the frozen projection).  alpha / R = 1."""

    def __init__(self, init: dict[tuple[int, str], LoRAMixtureInit]):
        self.wr, self.a, self.b = {}, {}, {}
        for key, t in init.items():
            n_exp, d_in, rank = t.a.shape
            self.wr[key] = _leaf(t.wr)
            self.a[key] = _leaf(t.a.permute(1, 0, 2).reshape(d_in, n_exp * rank))
            self.b[key] = _leaf(t.b.reshape(n_exp * rank, -1))
        self.n_exp, self.rank = n_exp, rank

    def params(self) -> list[torch.Tensor]:
        return [*self.wr.values(), *self.a.values(), *self.b.values()]

    def linear(self, layer: int, slot: str, x: torch.Tensor, w0: torch.Tensor,
               b0: torch.Tensor) -> torch.Tensor:
        key, n = (layer, slot), x.shape[0]
        g = torch.softmax(x @ self.wr[key], dim=-1)
        u = (x @ self.a[key]).view(n, self.n_exp, self.rank) * g.unsqueeze(-1)
        return torch.addmm(torch.addmm(b0, x, w0), u.view(n, self.n_exp * self.rank), self.b[key])


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
               b0: torch.Tensor) -> torch.Tensor:
        key = (layer, slot)
        g = torch.softmax(x @ self.wr[key], dim=-1)
        y = torch.addmm(b0, x, w0)
        for e, (a, b) in enumerate(zip(self.a[key], self.b[key])):
            y = y + g[:, e:e + 1] * ((x @ a) @ b)
        return y


# --- MoV adapters ---------------------------------------------------------

@dataclass
class IA3MixtureInit:
    """Initial values of one slot's MoV: router (router width, E), vectors L (E, width)."""
    wr: torch.Tensor
    l: torch.Tensor


def mov_init(shape: GPT2Shape, n_exp: int) -> dict[tuple[int, str], IA3MixtureInit]:
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


# --- training step and registry -------------------------------------------

@dataclass
class ModelStyle:
    """One way of writing a model case in PyTorch.

    ``step`` runs one training step and returns (loss, gradient norm before
    clipping, or None when nothing is trained); ``n_params`` counts the
    trainable scalars.
    """
    step: Callable[[], tuple[float, float | None]]
    n_params: int


def make_model_style(m: FrozenGPT2, ad: Adapters) -> ModelStyle:
    """A training step of model m with adapters ad.  Without trainable
    parameters (the frozen variant) h0 requires grad instead, so that backward
    still runs through every layer, and there is no optimizer."""
    params = ad.params()
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None

    def step() -> tuple[float, float | None]:
        h0 = _embed(m)
        if opt is None:
            h0.requires_grad_()
        loss = gpt2_loss(m, ad, h0)
        loss.backward()
        if opt is None:
            return loss.item(), None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), grad_norm.item()

    return ModelStyle(step, sum(p.numel() for p in params))


# name -> builder(shape) -> {style_name: ModelStyle}; builders are seeded, so
# every style of a case starts from identical values.
MODEL_CASES: dict[str, Callable[[GPT2Shape], dict[str, ModelStyle]]] = {
    "train_step/gpt2_small/frozen":
        lambda shape: {"eager": make_model_style(frozen_gpt2(shape), Adapters())},
    "train_step/gpt2_small/mov10":
        lambda shape: {style: make_model_style(frozen_gpt2(shape), cls(mov_init(shape, 10)))
                       for style, cls in (("loop", MoVLoop), ("batched", MoVBatched))},
    "train_step/gpt2_small/molora10":
        lambda shape: {style: make_model_style(frozen_gpt2(shape), cls(molora_init(shape, 10, 4)))
                       for style, cls in (("loop", MoLoRALoop), ("batched", MoLoRABatched))},
}
FLOOR_CASE = "train_step/gpt2_small/frozen"


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
    """(median, all samples) of ``iters`` timed training steps after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def check_model_styles(name: str, styles: dict[str, ModelStyle]) -> None:
    """All styles of a model case must agree on the first step's loss and
    gradient norm and on the second step's loss (which sees the first AdamW
    update, so it checks the gradients as well).  Two steps each."""
    ref_name, ref = None, None
    for sname, style in styles.items():
        loss1, grad_norm = style.step()
        loss2, _ = style.step()
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


def run_pytorch_model(names: list[str], shape: GPT2Shape, warmup: int, iters: int,
                      check: bool) -> dict[str, tuple[float, str, dict[str, float]]]:
    """case -> (best ms, best style, {style: ms}), like run_pytorch."""
    results = {}
    for name in names:
        styles = MODEL_CASES[name](shape)
        if check:
            check_model_styles(name, styles)
            styles = MODEL_CASES[name](shape)   # fresh values: the check trained the adapters
        per_style = {}
        for sname, style in styles.items():
            ms, samples = time_model_step(style.step, warmup, iters)
            per_style[sname] = ms
            print(f"  {name} [{sname}, {style.n_params} trainable]: median {ms:.1f} ms of "
                  + " ".join(f"{t:.1f}" for t in samples), file=sys.stderr)
        best = min(per_style, key=per_style.get)
        results[name] = (per_style[best], best, per_style)
        del styles
    return results


# --------------------------------------------------------------------------
# moet numbers (Google Benchmark JSON)
# --------------------------------------------------------------------------

_UNIT_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def _case_pattern(name: str) -> str:
    # Google Benchmark appends e.g. "/min_time:0.500", "/real_time", "/manual_time",
    # "/threads:1", "_median"; a further number ("/10240") would be another case.
    return re.escape(name) + r"($|/(min_time|real_time|manual_time|process_time|threads|iterations|repeats)|_)"


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


def winners_footnote(names: list[str], torch_res: dict) -> str:
    """Which eager style won, for the cases written in more than one."""
    multi = [(n, torch_res[n][1]) for n in names if len(torch_res[n][2]) > 1]
    return ("PyTorch time is the faster eager style; winners: "
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


def print_model_table(names: list[str], moet: dict[str, float], torch_res: dict, shape: GPT2Shape,
                      markdown: bool, moet_note: str) -> None:
    """The model cases' table, then each adapter variant's cost over the frozen floor."""
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
    footnote = winners_footnote(names, torch_res)
    if footnote:
        print(footnote)
    print(f"speed-up = PyTorch ms / moet ms (> 1 means moet is faster); "
          f"tok/s = {shape.tokens} tokens per step / step time")

    if FLOOR_CASE in names and len(names) > 1:
        pt_floor, m_floor = torch_res[FLOOR_CASE][0], moet.get(FLOOR_CASE)
        ratio_rows = []
        for name in names:
            if name == FLOOR_CASE:
                continue
            m_ms = moet.get(name)
            ratio_rows.append([name, f"{torch_res[name][0] / pt_floor:.2f}x",
                               f"{m_ms / m_floor:.2f}x" if m_ms and m_floor else "n/a"])
        print()
        print(f"cost over the frozen floor ({FLOOR_CASE}), each side against its own floor "
              f"from this run:")
        print()
        print_rows(["case", "PyTorch / frozen", "moet / frozen"], ratio_rows, markdown)


def select_cases(spec: str) -> tuple[list[str], list[str]]:
    """(layer cases, model cases) selected by --cases: 'all', 'layers', 'model'
    or a regex searched in every case name."""
    if spec == "all":
        return list(CASES), list(MODEL_CASES)
    if spec == "layers":
        return list(CASES), []
    if spec == "model":
        return [], list(MODEL_CASES)
    return ([n for n in CASES if re.search(spec, n)],
            [n for n in MODEL_CASES if re.search(spec, n)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moet-bench", type=Path, default=DEFAULT_MOET_BENCH,
                    help="moet benchmark binary of the layer cases (default: %(default)s)")
    ap.add_argument("--moet-bench-model", type=Path, default=DEFAULT_MOET_BENCH_MODEL,
                    help="moet benchmark binary of the model cases (default: %(default)s)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the GPU suite (moet_bench_cuda's cases, bf16, T=8192)")
    ap.add_argument("--cases", default="all",
                    help="'layers', 'model', 'all' (default) or a regex selecting cases (re.search)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="layer cases: timed medians per style / Google Benchmark repetitions (default 5)")
    ap.add_argument("--iters", type=int, default=3,
                    help="layer cases: iterations per timed median (default 3)")
    ap.add_argument("--model-warmup", type=int, default=MODEL_WARMUP_ITERS,
                    help=f"model cases: untimed steps per style (default {MODEL_WARMUP_ITERS})")
    ap.add_argument("--model-iters", type=int, default=MODEL_ITERS,
                    help="model cases: timed steps per style, median reported; also moet's "
                         f"Google Benchmark repetitions (default {MODEL_ITERS})")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--check", action="store_true",
                    help="verify that all styles of a case agree before timing (layers: y and dx; "
                         "model: loss, gradient norm and the loss after one AdamW step)")
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    # Debugging aid: the model cases at a tiny size, PyTorch only.
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda":
        global T, DTYPE, DEVICE, CASES, USE_SDPA
        if not torch.cuda.is_available():
            print("--device cuda: torch sees no CUDA device", file=sys.stderr)
            return 2
        T, DTYPE, DEVICE, USE_SDPA = 8192, torch.bfloat16, "cuda", True
        CASES = CUDA_CASES   # the model cases stay: GPT-2 small in bf16 with SDPA
        if args.moet_bench == DEFAULT_MOET_BENCH:
            args.moet_bench = DEFAULT_MOET_BENCH_CUDA
        if args.moet_bench_model == DEFAULT_MOET_BENCH_MODEL:
            args.moet_bench_model = DEFAULT_MOET_BENCH_CUDA_MODEL

    if args.list:
        print("\n".join([*CASES, *MODEL_CASES]))
        return 0
    names, model_names = select_cases(args.cases)
    if not names and not model_names:
        print(f"no case matches {args.cases!r}; cases: {', '.join([*CASES, *MODEL_CASES])}",
              file=sys.stderr)
        return 2
    shape = GPT2_TINY if args.tiny else (GPT2_SMALL_GPU if args.device == "cuda" else GPT2_SMALL)

    torch.set_num_threads(NUM_THREADS)
    torch.set_num_interop_threads(1)

    # moet first, in its own process, so the two never compete for the cores.
    moet = run_moet(args.moet_bench, names, args.repeats) if names else {}
    moet_model, moet_note = {}, ""
    if model_names and args.tiny:
        moet_note = "moet: not run (--tiny: the moet binary only has the full-size model)"
    elif model_names:
        moet_model = run_moet(args.moet_bench_model, model_names, args.model_iters)
        if not moet_model:
            moet_note = (f"moet: n/a, no results from {args.moet_bench_model} "
                         f"(missing or failed; see stderr)")
    if names:
        print(f"timing PyTorch ({len(names)} cases)...", file=sys.stderr)
        torch_res = run_pytorch(names, args.repeats, args.iters, args.check)
        print_table(names, moet, torch_res, args.markdown)
    if model_names:
        print(f"timing PyTorch training steps ({len(model_names)} cases, {shape.describe()})...",
              file=sys.stderr)
        torch_model = run_pytorch_model(model_names, shape, args.model_warmup, args.model_iters,
                                        args.check)
        if names:
            print()
            print()
        print_model_table(model_names, moet_model, torch_model, shape, args.markdown, moet_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
