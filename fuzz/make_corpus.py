#!/usr/bin/env python3
"""fuzz/make_corpus.py: writes the seed corpus of fuzz/fuzz_safetensors.c into fuzz/corpus/safetensors/.

A handful of tiny safetensors images, valid ones (every dtype, scalars, zero-size tensors, metadata,
unaligned data) and invalid ones (one per family of rejection), so that libFuzzer starts from inputs
that reach deep into the validator. The files are committed; rerun this only to change them. Standard
library only; it does not use the safetensors package, on purpose (some seeds are invalid).
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "safetensors")


def image(header, data=b"", hlen=None, pad=True):
    text = header if isinstance(header, (bytes, bytearray)) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if hlen is None else hlen) + text + data


def tensors(*specs, meta=None):
    """specs: (name, dtype, shape, nbytes); laid out back to back. Returns (header, data)."""
    h, off = {}, 0
    if meta is not None:
        h["__metadata__"] = meta
    for name, dt, shape, nbytes in specs:
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    return h, bytes((i * 37 + 11) & 0xFF for i in range(off))


SEEDS = {}
SEEDS["valid-empty"] = image({})
SEEDS["valid-f32"] = image(*tensors(("w", "F32", [2, 2], 16)))
SEEDS["valid-dtypes"] = image(*tensors(
    ("a", "F16", [3], 6), ("b", "BF16", [1, 2], 4), ("c", "F64", [], 8), ("d", "I8", [2], 2),
    ("e", "U8", [1], 1), ("f", "I16", [1], 2), ("g", "I32", [1], 4), ("h", "I64", [1], 8),
    ("i", "BOOL", [2], 2), meta={"format": "pt"}))
SEEDS["valid-zero-size"] = image(*tensors(("z", "F32", [3, 0], 0), ("s", "F32", [], 4)))
SEEDS["valid-unaligned"] = image(*tensors(("x", "BF16", [3], 6), ("y", "F32", [1, 1, 1, 1], 4)), pad=False)
SEEDS["bad-overlap"] = image({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
SEEDS["bad-gap"] = image({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                          "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, bytes(6))
SEEDS["bad-size"] = image({"q": {"dtype": "F32", "shape": [5, 4], "data_offsets": [0, 100]}}, bytes(100))
SEEDS["bad-overflow"] = image({"w": {"dtype": "I64", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})
SEEDS["bad-json"] = image(b'{"a":{"dtype":"F32","shape":[1],', pad=False)
SEEDS["bad-hlen"] = image({}, hlen=0xFFFFFFFF)
SEEDS["bad-short"] = b"\x02\x00\x00"
SEEDS["bad-meta"] = image({"__metadata__": {"k": 1}})

os.makedirs(OUT, exist_ok=True)
for name, blob in SEEDS.items():
    with open(os.path.join(OUT, name), "wb") as fp:
        fp.write(blob)
print(f"wrote {len(SEEDS)} seeds to {OUT}")
