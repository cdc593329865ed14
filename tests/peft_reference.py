#!/usr/bin/python3
"""An independent reference for moet's PEFT files: reads a Hugging Face checkpoint folder
(config.json + model.safetensors, GPT-2 or Llama) and a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors), applies the adapters as PEFT's specification defines them, runs the
model on the given token ids and prints the logits (one row per token) as JSON.

Written from the formats' specifications with numpy only (no transformers, no peft): safetensors is
an 8-byte little-endian header length, a JSON header and the raw tensors; PEFT's LoRA adds
scaling * (x lora_A^T) lora_B^T to a module's output, scaling = lora_alpha / r (alpha_pattern and
rank_pattern per module, lora_alpha / sqrt(r) with use_rslora); (IA)^3 multiplies a module's output
by ia3_l, or a feed-forward module's input.

    tests/peft_reference.py BASE_DIR ADAPTER_DIR 3,1,4,1,5      (ADAPTER_DIR "-": the base alone)

ADAPTER_DIR may also be a llama.cpp LoRA file (*.gguf), read from the GGUF specification: the
header ("GGUF", version, tensor and metadata counts), typed metadata (general.type "adapter",
adapter.type "lora", adapter.lora.alpha), tensor infos (name, dims fastest first, ggml type,
offset) and the data after padding to general.alignment (32). Its blk.<i>.<name>.weight.lora_a /
.lora_b pairs become PEFT's lora_A / lora_B of the matching Hugging Face module, with the rows of
q's and k's lora_b put back from llama.cpp's interleaved rotary layout to Hugging Face's.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            raw = np.frombuffer(body[begin:end], dtype=np.uint16).astype(np.uint32) << 16
            values = raw.view(np.float32)
        else:
            values = np.frombuffer(body[begin:end], dtype=DTYPES[info["dtype"]])
        out[name] = values.astype(np.float64).reshape(info["shape"])
    return out


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def read_gguf(path: Path, model_config: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """A llama.cpp LoRA file as a PEFT config and PEFT-named tensors."""
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            inner, n = take("I"), take("Q")
            return [value(inner) for _ in range(n)]
        return take(scalars[kind])

    if data[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    assert version == 3, version
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    if (meta.get("general.type"), meta.get("adapter.type"), meta.get("general.architecture")) != ("adapter", "lora", "llama"):
        raise SystemExit(f"{path}: not a llama LoRA adapter: {meta}")
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    alignment = meta.get("general.alignment", 32)
    start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        dtype = {0: np.float32, 1: np.float16}[kind]
        count = int(np.prod(dims))
        values = np.frombuffer(data, dtype=dtype, count=count, offset=start + offset).astype(np.float64)
        m = values.reshape(list(reversed(dims)))
        _, layer, short, _, ab = name.split(".")
        if short in ("attn_q", "attn_k") and ab == "lora_b":  # llama.cpp's interleaved halves back to HF's layout
            heads = model_config["num_attention_heads"] if short == "attn_q" else model_config["num_key_value_heads"]
            hd = m.shape[0] // heads
            m = m.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(m.shape)
        module = f"base_model.model.model.layers.{layer}.{GGUF_NAMES[short]}"
        tensors[module + (".lora_A.weight" if ab == "lora_a" else ".lora_B.weight")] = m
    return {"peft_type": "LORA", "lora_alpha": float(meta["adapter.lora.alpha"])}, tensors


class Peft:
    """The adapters of one PEFT folder (or llama.cpp LoRA file), applied by module name."""

    def __init__(self, folder: Path | None, model_config: dict | None = None):
        if folder is not None and folder.suffix == ".gguf":
            self.config, self.tensors = read_gguf(folder, model_config)
        else:
            self.config = json.loads((folder / "adapter_config.json").read_text()) if folder else {"peft_type": "NONE"}
            self.tensors = read_safetensors(folder / "adapter_model.safetensors") if folder else {}
        self.kind = self.config["peft_type"]
        self.used: set[str] = set()

    def _pattern(self, patterns: dict, module: str):
        for key, value in (patterns or {}).items():
            if re.fullmatch(r"(.*\.)?" + key, module):
                return value
        return None

    def linear(self, module: str, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """x W^T (+ b) for a weight stored (out, in), with the module's adapter applied."""
        key = "base_model.model." + module
        if self.kind == "IA3" and key + ".ia3_l" in self.tensors:
            self.used.add(key + ".ia3_l")
            l = self.tensors[key + ".ia3_l"].reshape(-1)
            ff = module in (self.config.get("feedforward_modules") or []) or \
                module.split(".")[-1] in (self.config.get("feedforward_modules") or [])
            if ff:
                x = x * l
            y = x @ weight.T + (0 if bias is None else bias)
            return y if ff else y * l
        y = x @ weight.T + (0 if bias is None else bias)
        if self.kind == "LORA" and key + ".lora_A.weight" in self.tensors:
            a, b = self.tensors[key + ".lora_A.weight"], self.tensors[key + ".lora_B.weight"]
            self.used.update({key + ".lora_A.weight", key + ".lora_B.weight"})
            r = a.shape[0]
            alpha = self._pattern(self.config.get("alpha_pattern"), module) or self.config["lora_alpha"]
            scaling = alpha / (np.sqrt(r) if self.config.get("use_rslora") else r)
            y = y + scaling * ((x @ a.T) @ b.T)
        return y


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def attention(q, k, v, heads, kv_heads):
    """Causal attention of (T, heads*hd) q and (T, kv_heads*hd) k, v; query head h reads kv head h // (heads / kv_heads)."""
    t, hd = q.shape[0], q.shape[1] // heads
    out = np.zeros_like(q)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for h in range(heads):
        g = h // (heads // kv_heads)
        qs, ks, vs = q[:, h * hd:(h + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd]
        s = qs @ ks.T / np.sqrt(hd) + mask
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h * hd:(h + 1) * hd] = p @ vs
    return out


def rotary(x, heads, theta):
    """Hugging Face's rotate-half rotary embedding of (T, heads*hd) at positions 0 .. T-1."""
    t, hd = x.shape[0], x.shape[1] // heads
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    out = np.empty_like(x)
    for h in range(heads):
        xs = x[:, h * hd:(h + 1) * hd]
        rot = np.concatenate([-xs[:, hd // 2:], xs[:, :hd // 2]], 1)
        out[:, h * hd:(h + 1) * hd] = xs * cos + rot * sin
    return out


def llama(c, w, peft, ids):
    heads, kv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = peft.linear(p + "self_attn.q_proj", x, w[p + "self_attn.q_proj.weight"], None)
        k = peft.linear(p + "self_attn.k_proj", x, w[p + "self_attn.k_proj.weight"], None)
        v = peft.linear(p + "self_attn.v_proj", x, w[p + "self_attn.v_proj.weight"], None)
        q, k = rotary(q, heads, c["rope_theta"]), rotary(k, kv, c["rope_theta"])
        h = h + peft.linear(p + "self_attn.o_proj", attention(q, k, v, heads, kv), w[p + "self_attn.o_proj.weight"], None)
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = peft.linear(p + "mlp.gate_proj", x, w[p + "mlp.gate_proj.weight"], None)
        up = peft.linear(p + "mlp.up_proj", x, w[p + "mlp.up_proj.weight"], None)
        hidden = gate / (1 + np.exp(-gate)) * up
        h = h + peft.linear(p + "mlp.down_proj", hidden, w[p + "mlp.down_proj.weight"], None)
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T


def gpt2(c, w, peft, ids):
    d, heads, eps = c["n_embd"], c["n_head"], c["layer_norm_epsilon"]
    pre = "transformer." if "transformer.wte.weight" in w else ""
    h = w[pre + "wte.weight"][ids] + w[pre + "wpe.weight"][: len(ids)]
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    for i in range(c["n_layer"]):
        p = f"{pre}h.{i}."
        m = f"transformer.h.{i}."  # PEFT's module names
        # Conv1D stores (in, out): the module computes x W + b
        x = layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = peft.linear(m + "attn.c_attn", x, w[p + "attn.c_attn.weight"].T, w[p + "attn.c_attn.bias"])
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        h = h + peft.linear(m + "attn.c_proj", attention(q, k, v, heads, heads), w[p + "attn.c_proj.weight"].T, w[p + "attn.c_proj.bias"])
        x = layer_norm(h, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        hidden = gelu(peft.linear(m + "mlp.c_fc", x, w[p + "mlp.c_fc.weight"].T, w[p + "mlp.c_fc.bias"]))
        h = h + peft.linear(m + "mlp.c_proj", hidden, w[p + "mlp.c_proj.weight"].T, w[p + "mlp.c_proj.bias"])
    h = layer_norm(h, w[pre + "ln_f.weight"], w[pre + "ln_f.bias"], eps)
    return h @ w[pre + "wte.weight"].T


def main() -> int:
    base, ids = Path(sys.argv[1]), [int(t) for t in sys.argv[3].split(",")]
    adapter = None if sys.argv[2] == "-" else Path(sys.argv[2])
    config = json.loads((base / "config.json").read_text())
    weights = read_safetensors(base / "model.safetensors")
    peft = Peft(adapter, config)
    logits = (llama if config["model_type"] == "llama" else gpt2)(config, weights, peft, np.array(ids))
    unused = set(peft.tensors) - peft.used
    if unused:
        print(f"peft_reference: tensors no module used: {sorted(unused)}", file=sys.stderr)
        return 1
    json.dump(logits.tolist(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
