"""Memory-mapped safetensors reading without PyTorch and without copies.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets) and the raw tensor bytes. We map each file once
and hand out numpy views into the mapping: nothing is read from disk until a slice of
a view is materialised, so a device's shard costs only its own bytes.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointFormatError(ValueError):
    """A model directory whose weights ryzen_jax will not read, with what to do instead."""


def safetensors_files(model_dir: str) -> list[str]:
    """The *.safetensors files of an HF model directory; refuses pickled PyTorch weights."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(model_dir, f))]
    if pickles or glob.glob(os.path.join(model_dir, "*.bin")) or glob.glob(os.path.join(model_dir, "*.pt")):
        raise CheckpointFormatError(
            f"{model_dir} holds PyTorch pickle weights ({', '.join(pickles) or '*.bin'}); ryzen_jax never unpickles "
            "(it can run arbitrary code). Re-save the model as safetensors: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointFormatError(f"{model_dir} has no *.safetensors weights")


class SafetensorsReader:
    """Every tensor of a model directory, as a lazy read-only numpy view."""

    def __init__(self, model_dir: str):
        self._entries: dict[str, tuple[np.memmap, int, dict]] = {}
        for path in safetensors_files(model_dir):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            mapping = np.memmap(path, dtype=np.uint8, mode="r")
            for name, meta in header.items():
                self._entries[name] = (mapping, 8 + n, meta)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        """A view of tensor ``name``; bytes are read from disk only when used."""
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} not found in the safetensors files")
        mapping, base, meta = self._entries[name]
        if meta["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"tensor {name!r} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        return mapping[base + begin: base + end].view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])
