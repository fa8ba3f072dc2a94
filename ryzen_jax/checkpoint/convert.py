"""Convert a Hugging Face model directory into a sharded ryzen_jax Orbax checkpoint.

Tensors are read from memory-mapped safetensors and written one at a time, so the
converter's memory is about the largest tensor, never the model. Everything
is written into a hidden temporary directory beside the destination and renamed at
the end: an interrupted conversion leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ryzen_jax.checkpoint import orbax_io
from ryzen_jax.checkpoint.hf import hf_views
from ryzen_jax.checkpoint.loader import abstract_model
from ryzen_jax.checkpoint.safetensors_io import SafetensorsReader
from ryzen_jax.config import ModelConfig
from ryzen_jax.sharding import TensorParallelConfig

#: files copied beside the weights: config, generation config, every tokenizer file, and
#: a sentence-transformers model's module configs (its pooling, in a folder of its own)
SIDE_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*_Pooling/config.json")
SKIP_FILES = ("model.safetensors.index.json", orbax_io.MARKER)


def convert_hf(hf_dir: str, out_dir: str, *, dtype: str | None = None, overwrite: bool = False,
               progress: bool = True) -> str:
    """Write ``out_dir`` from ``hf_dir``; ``dtype`` (e.g. "bfloat16") casts the stored weights."""
    cfg = ModelConfig.from_pretrained(hf_dir)  # unknown model_type / missing field: fail first
    reader = SafetensorsReader(hf_dir)  # refuses pickles before anything is written
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass --overwrite")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} is a file, not a checkpoint directory; remove it or choose another output")
    if os.path.exists(out_dir) and os.path.samefile(out_dir, hf_dir):
        raise ValueError(f"the output {out_dir} is the input checkpoint; choose another output directory")
    views = hf_views(cfg, reader)
    _, _, specs = abstract_model(cfg, TensorParallelConfig(tp_size=1), jnp.float32)
    cast = None if dtype is None else jnp.dtype(dtype)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        params_dir = os.path.join(tmp, "params")
        os.makedirs(params_dir)
        for path, view in tqdm(views.items(), desc="converting", unit="tensor", disable=not progress):
            arr = np.ascontiguousarray(view)
            orbax_io.save_tensor(params_dir, path, arr if cast is None else arr.astype(cast), specs[path].axes)
            del arr
        for pattern in SIDE_FILES:
            for path in glob.glob(os.path.join(hf_dir, pattern)):
                if os.path.basename(path) not in SKIP_FILES:
                    where = os.path.join(tmp, os.path.relpath(os.path.dirname(path), hf_dir))
                    os.makedirs(where, exist_ok=True)
                    shutil.copy2(path, where)
        marker = {"format": orbax_io.FORMAT, "version": orbax_io.FORMAT_VERSION, "model_type": cfg.model_type,
                  "tensors": list(views), "dtype": str(cast) if cast is not None else "as stored",
                  "source": os.path.abspath(hf_dir)}
        with open(os.path.join(tmp, orbax_io.MARKER), "w") as f:
            json.dump(marker, f, indent=2)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_in(tmp: str, out_dir: str) -> None:
    """Rename ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first and deleted
    only once the new one is in place, so a failure leaves one of the two whole."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f".{os.path.basename(out_dir)}.old-")
    os.rmdir(old)  # a free name beside out_dir
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)
