"""The converted checkpoint: an Orbax (OCDBT/Zarr) checkpoint per parameter group.

Layout of a converted model directory::

    OUT/config.json, generation_config.json, tokenizer files   (copied from the HF dir)
    OUT/ryzen_jax.json                                          (format marker, groups, dtype)
    OUT/params/<group>/                                         (one Orbax PyTree checkpoint each)

Groups are ``embed``, ``layers.0`` … ``layers.N-1``, ``norm`` and ``lm_head``: writing one
group at a time bounds the converter's memory to one layer, and restoring one at a
time lets loading show progress and prefetch the next group. Arrays are stored in
the tp = 1 layout, chunked along the axis that tensor parallelism splits, so a
process restoring onto a mesh reads only the chunks of its own slices.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "ryzen_jax-orbax"
FORMAT_VERSION = 1
MARKER = "ryzen_jax.json"
CHUNK_BYTES = 4 << 20


def group_of(path: str) -> str:
    """``layers.3.attn.wq.kernel`` → ``layers.3``; ``embed.embedding`` → ``embed``; ``lm_head`` → ``lm_head``."""
    parts = path.split(".")
    return ".".join(parts[: 2 if parts[0] == "layers" else 1])


def grouped(flat: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """Flat ``path -> leaf`` split into ``group -> {path -> leaf}``, in model order."""
    out: dict[str, dict[str, object]] = {}
    for path, leaf in flat.items():
        out.setdefault(group_of(path), {})[path] = leaf
    return out


def _nest(group: str, flat: Mapping[str, object]) -> dict:
    """Full paths of one group → the nested tree stored in its checkpoint (paths relative to the group)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *heads, last = (path[len(group) + 1:] or path).split(".")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = leaf
    return tree


def _flatten(group: str, tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Inverse of ``_nest``: the checkpoint's tree → full paths."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(group, v, key + "."))
        else:
            out[key if key == group else f"{group}.{key}"] = v
    return out


def is_converted(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MARKER))


def read_marker(model_dir: str) -> dict:
    with open(os.path.join(model_dir, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{model_dir}/{MARKER} is not a ryzen_jax v{FORMAT_VERSION} checkpoint: {meta}")
    return meta


def save_group(params_dir: str, group: str, arrays: Mapping[str, np.ndarray],
               axes: Mapping[str, Sequence[str | None]], sharded_axes: Sequence[str] = ("vocab", "heads", "kv_heads", "mlp")) -> None:
    """Write one group as an Orbax checkpoint, chunked along its tensor-parallel axis."""
    save_args = {
        path: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES,
                           shard_axes=tuple(i for i, a in enumerate(axes[path]) if a in sharded_axes))
        for path in arrays
    }
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(params_dir, group),
                   args=ocp.args.PyTreeSave(_nest(group, arrays), save_args=_nest(group, save_args)))


def restore_group(params_dir: str, group: str, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore one group straight into the targets' shardings (each process reads its
    own slices). A target larger than the stored array along one axis is zero-padded."""
    restore_args = {
        name: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype, strict=False)
        for name, t in targets.items()
    }
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(os.path.join(params_dir, group),
                            args=ocp.args.PyTreeRestore(item=_nest(group, targets),
                                                        restore_args=_nest(group, restore_args)))
    return _flatten(group, out)
