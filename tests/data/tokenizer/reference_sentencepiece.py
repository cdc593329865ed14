#!/usr/bin/python3
"""Writes expected_sentencepiece.json: the ids SentencePiece's own library (Debian's
python3-sentencepiece, which wraps libsentencepiece) gives each test string with each committed
tokenizer.model, plain encode (no BOS), and its decode of those ids.

    /usr/bin/python3 tests/data/tokenizer/reference_sentencepiece.py > tests/data/tokenizer/expected_sentencepiece.json

The strings: the 43 of strings.json, then 300 random ones (seeded, so the file is reproducible)
mixing ASCII, white-space runs (spaces, tabs, newlines, U+3000), digits, accented and combining
characters, CJK, Hangul, emoji, and the small model's user-defined symbols <sep> and [MASK]."""
import json
import os
import random
import sys

import sentencepiece as spm

here = os.path.dirname(os.path.abspath(__file__))
data = os.path.dirname(here)
models = {"llama2": "llama2/tokenizer.model", "small": "sentencepiece/small.model"}
processors = {name: spm.SentencePieceProcessor(model_file=os.path.join(data, path)) for name, path in models.items()}

with open(os.path.join(here, "strings.json"), encoding="utf-8") as f:
    strings = json.load(f)

rng = random.Random(17)
blocks = [(0x20, 0x7E), (0x20, 0x20), (0x09, 0x0D), (0x30, 0x39), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF),
          (0x400, 0x4FF), (0x3000, 0x3000), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAFFF), (0x1F300, 0x1F6FF)]
words = ["<sep>", "[MASK]", "<s>", "</s>", "<unk>", "the", " the ", "ing", "  ", "\n"]
for _ in range(300):
    text = ""
    for _ in range(rng.randrange(0, 30)):
        if rng.random() < 0.15:
            text += rng.choice(words)
        else:
            lo, hi = rng.choice(blocks)
            text += chr(rng.randint(lo, hi))
    strings.append(text)

cases = []
for text in strings:
    case = {"text": text}
    for name, sp in processors.items():
        ids = sp.encode(text)
        case[name] = ids
        case[name + "_decoded"] = sp.decode(ids)
    cases.append(case)

# one case per line
sys.stdout.write('{"models": ' + json.dumps(models) + ',\n "cases": [\n')
sys.stdout.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
sys.stdout.write("\n]}\n")
