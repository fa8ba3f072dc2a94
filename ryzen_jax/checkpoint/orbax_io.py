"""The converted checkpoint: one Orbax (OCDBT/Zarr) checkpoint per parameter tensor.

Layout of a converted model directory::

    OUT/config.json, generation_config.json, tokenizer files   (copied from the HF dir)
    OUT/ryzen_jax.json                                          (format marker, tensor list, dtype)
    OUT/params/<path>/                                          (e.g. params/layers.3.attn.wq.kernel/)

Writing one tensor at a time bounds the converter's memory to about the largest
tensor, and restoring one at a time lets loading show progress and prefetch the
next tensor. Arrays are stored in the tp = 1 layout, chunked along the dimensions
the rule table splits, so a process restoring onto a mesh reads only the chunks of
its own slices.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from ryzen_jax.sharding import LOGICAL_RULES

FORMAT = "ryzen_jax-orbax"
FORMAT_VERSION = 3  # 3: linear kernels stored (out, in), as PyTorch stores them
LEAF = "value"  # each tensor's checkpoint holds the tree {LEAF: array}
MARKER = "ryzen_jax.json"
CHUNK_BYTES = 4 << 20


def is_converted(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MARKER))


def read_marker(model_dir: str) -> dict:
    with open(os.path.join(model_dir, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{model_dir}/{MARKER} is not a ryzen_jax v{FORMAT_VERSION} checkpoint: {meta}; convert the "
                         "Hugging Face checkpoint again with scripts/convert_hf.py (or load its safetensors directly)")
    return meta


def _split_dims(axes: Sequence[str | None]) -> tuple[int, ...]:
    """Dimensions that the rule table places on a mesh axis: chunk boundaries go there."""
    return tuple(i for i, a in enumerate(axes) if a is not None and LOGICAL_RULES.get(a) is not None)


def save_tensor(params_dir: str, path: str, array: np.ndarray, axes: Sequence[str | None]) -> None:
    """Write one tensor as its own Orbax checkpoint, chunked along its split dimensions."""
    save_args = ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=_split_dims(axes))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(params_dir, path), args=ocp.args.PyTreeSave({LEAF: array}, save_args={LEAF: save_args}))


def restore_tensor(params_dir: str, path: str, target: jax.ShapeDtypeStruct) -> jax.Array:
    """Restore one tensor straight into the target's sharding: each process reads only
    the chunks of its own slices. A target larger than the stored array is zero-padded."""
    args = ocp.ArrayRestoreArgs(sharding=target.sharding, global_shape=target.shape, dtype=target.dtype, strict=False)
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(os.path.join(params_dir, path),
                            args=ocp.args.PyTreeRestore(item={LEAF: target}, restore_args={LEAF: args}))
    return out[LEAF]
