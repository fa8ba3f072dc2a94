"""Memory-mapped safetensors reading without PyTorch and without copies, and writing
one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets) and the raw tensor bytes. We map each file once
and hand out numpy views into the mapping: nothing is read from disk until a slice of
a view is materialised, so a device's shard costs only its own bytes.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


_CODES = {np.dtype(t): code for code, t in _DTYPES.items()}


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


INDEX = "model.safetensors.index.json"


class SafetensorsReader:
    """Every tensor of a model directory, as a lazy read-only numpy view.

    Where ``model.safetensors.index.json`` exists, its ``weight_map`` decides which file
    each tensor comes from (as transformers reads it), so stale shards of an earlier
    download beside it are never read; without one, a tensor found in two files is refused.
    """

    def __init__(self, model_dir: str):
        self._entries: dict[str, tuple[np.memmap, int, dict]] = {}
        files = safetensors_files(model_dir)
        weight_map = _weight_map(model_dir)
        if weight_map is not None:
            present = {os.path.basename(f) for f in files}
            absent = sorted(set(weight_map.values()) - present)
            if absent:
                raise CheckpointFormatError(f"{INDEX} in {model_dir} names {len(absent)} file(s) that are not there, "
                                            f"e.g. {absent[0]}: the download is incomplete")
            files = [f for f in files if os.path.basename(f) in set(weight_map.values())]
        origin: dict[str, str] = {}
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            mapping = np.memmap(path, dtype=np.uint8, mode="r")
            base = os.path.basename(path)
            for name, meta in header.items():
                if weight_map is not None and weight_map.get(name, base) != base:
                    continue  # the index puts this tensor in another file
                if name in origin:
                    raise CheckpointFormatError(
                        f"tensor {name!r} is in both {origin[name]} and {base} in {model_dir}: a stale shard of "
                        "another revision? Remove the files that do not belong (or add the model's " + INDEX + ")")
                origin[name] = base
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


def _weight_map(model_dir: str) -> dict[str, str] | None:
    path = os.path.join(model_dir, INDEX)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{path} has no 'weight_map' object; fix or remove the index")
    return weight_map


def write_safetensors(path: str, specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from ``tensors`` as they come, in ``specs``' order and
    with the dtypes and shapes it gives (name -> (dtype, shape)): the header is known
    before any tensor is, so no more than one tensor is held at a time, and a checkpoint
    larger than memory can be written. A tensor that does not match its spec is refused."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = np.dtype(dtype).itemsize * math.prod(shape)
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as the reference writer keeps it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        given = iter(tensors)
        for name, (dtype, shape) in specs.items():
            got, array = next(given, (None, None))
            if got != name or array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
                found = "nothing" if got is None else f"{got!r} {array.dtype}{list(array.shape)}"
                raise ValueError(f"safetensors writer: expected {name!r} {np.dtype(dtype)}{list(shape)}, got {found}")
            f.write(np.ascontiguousarray(array).view(np.uint8).data)
        if next(given, None) is not None:
            raise ValueError("safetensors writer: more tensors than specs")
