#!/usr/bin/python3
"""PyTorch side of the moet benchmark comparison.

Two suites of cases, selected with ``--cases layers|model|all`` (or a regex):

* layers: the same cases as the Google Benchmark program ``moet_bench_layers``
  in PyTorch eager mode with autograd (one forward + backward = one training
  step, float32, T = 1024 tokens, 2 intra-op threads), one table:

      case | moet ms | PyTorch ms | speed-up (PyTorch / moet)

* model: whole training steps of a small GPT-2-shaped model, the cases of
  ``moet_bench_model`` (``train_step/gpt2_small/{frozen,mov10,molora10}``):
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
    ``y.backward(dy)`` and nothing else (no optimizer).

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
WARMUP_ITERS = 2      # untimed iterations before each style is measured

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MOET_BENCH = REPO_ROOT / "build" / "bench" / "moet_bench_layers"
DEFAULT_MOET_BENCH_MODEL = REPO_ROOT / "build" / "bench" / "moet_bench_model"


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


def register(name: str, builder: Callable[..., dict[str, Style]], *args) -> None:
    CASES[name] = lambda: builder(*args)


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE) * scale


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


register("frozen_linear/1024/1024", build_frozen_linear, 1024, 1024)
register("frozen_linear/1024/4096", build_frozen_linear, 1024, 4096)
register("molora_soft/1024/1024/10/4", build_molora, 1024, 1024, 10, 4, False)
register("molora_soft/1024/4096/15/4", build_molora, 1024, 4096, 15, 4, False)
register("molora_top2/1024/1024/10/4", build_molora, 1024, 1024, 10, 4, True)
register("mov_soft/2816/30", build_mov, 2816, 30)
register("mov_soft/1024/10", build_mov, 1024, 10)


# --------------------------------------------------------------------------
# PyTorch timing
# --------------------------------------------------------------------------

def time_step(step: Callable[[], torch.Tensor], repeats: int, iters: int) -> float:
    """Median (over ``repeats``) of per-iteration medians over ``iters`` steps, in ms."""
    for _ in range(WARMUP_ITERS):
        step()
    medians = []
    for _ in range(repeats):
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
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
            status = "ok" if err < 1e-4 else "MISMATCH"
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


# --------------------------------------------------------------------------
# moet numbers (Google Benchmark JSON)
# --------------------------------------------------------------------------

_UNIT_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def _case_pattern(name: str) -> str:
    # Google Benchmark appends e.g. "/min_time:0.500", "/real_time", "/manual_time",
    # "/threads:1", "_median"; a further number ("/10240") would be another case.
    return re.escape(name) + r"($|/(min_time|real_time|manual_time|process_time|threads|iterations|repeats)|_)"


def parse_moet_json(data: dict, names: list[str]) -> dict[str, float]:
    """case -> median real time in ms, from Google Benchmark JSON output."""
    out: dict[str, float] = {}
    for bm in data.get("benchmarks", []):
        is_median = bm.get("aggregate_name") == "median" or (
            bm.get("run_type") == "aggregate" and bm.get("name", "").endswith("_median"))
        if not is_median:
            continue
        bm_name = bm.get("run_name") or bm["name"]
        for name in names:
            if name not in out and re.match(_case_pattern(name), bm_name):
                out[name] = bm["real_time"] * _UNIT_TO_MS[bm.get("time_unit", "ns")]
    return out


def run_moet(binary: Path, names: list[str], repeats: int) -> dict[str, float]:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        print(f"note: moet benchmark binary not found at {binary} "
              f"(build the 'moet_bench_layers' target); moet column will be n/a",
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


def header() -> str:
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                     "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
           if k in os.environ]
    return (f"torch {torch.__version__} | BLAS {blas_summary()} | "
            f"threads {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op"
            + (f" ({' '.join(env)})" if env else "")
            + f" | T={T} float32 fwd+bwd | {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def print_table(names: list[str], moet: dict[str, float], torch_res: dict, markdown: bool) -> None:
    cols = ["case", "moet ms", "PyTorch ms", "speed-up"]
    rows = []
    for name in names:
        pt_ms = torch_res[name][0]
        m_ms = moet.get(name)
        rows.append([name,
                     f"{m_ms:.3f}" if m_ms is not None else "n/a",
                     f"{pt_ms:.3f}",
                     f"{pt_ms / m_ms:.2f}x" if m_ms else "n/a"])
    multi = [(n, torch_res[n][1]) for n in names if len(torch_res[n][2]) > 1]
    footnote = ("PyTorch time is the faster eager style; winners: "
                + ", ".join(f"{n}: {s}" for n, s in multi)) if multi else ""

    print(header())
    print()
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join(["---"] + ["---:"] * 3) + "|")
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
    if footnote:
        print()
        print(footnote)
    print("speed-up = PyTorch ms / moet ms (> 1 means moet is faster)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moet-bench", type=Path, default=DEFAULT_MOET_BENCH,
                    help="moet benchmark binary (default: %(default)s)")
    ap.add_argument("--cases", default=".", help="regex selecting cases (re.search)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed medians per style / Google Benchmark repetitions (default 5)")
    ap.add_argument("--iters", type=int, default=3,
                    help="iterations per timed median (default 3)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--check", action="store_true",
                    help="verify that all styles of a case agree on y and dx before timing")
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    args = ap.parse_args()

    if args.list:
        print("\n".join(CASES))
        return 0
    names = [n for n in CASES if re.search(args.cases, n)]
    if not names:
        print(f"no case matches {args.cases!r}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2

    torch.set_num_threads(NUM_THREADS)
    torch.set_num_interop_threads(1)

    # moet first, in its own process, so the two never compete for the cores.
    moet = run_moet(args.moet_bench, names, args.repeats)
    print(f"timing PyTorch ({len(names)} cases)...", file=sys.stderr)
    torch_res = run_pytorch(names, args.repeats, args.iters, args.check)
    print_table(names, moet, torch_res, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
