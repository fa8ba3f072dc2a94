"""Loading a model onto a mesh: from a converted Orbax checkpoint or straight from
Hugging Face safetensors. Either way each parameter is created directly in its
target NamedSharding and each process reads only the slices its devices hold; no
host ever assembles the full model.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ryzen_jax.checkpoint import orbax_io
from ryzen_jax.checkpoint.hf import fit_slice, hf_views
from ryzen_jax.checkpoint.safetensors_io import SafetensorsReader, safetensors_files
from ryzen_jax.config import ModelConfig
from ryzen_jax.models import model_class
from ryzen_jax.sharding import TensorParallelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What the model expects at one parameter path: shape, dtype, logical axes, placement."""

    shape: tuple[int, ...]
    dtype: jnp.dtype
    axes: tuple[str | None, ...]
    sharding: jax.sharding.NamedSharding

    @property
    def target(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype, sharding=self.sharding)


def _path_str(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def abstract_model(cfg: ModelConfig, tp: TensorParallelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State, dict[str, ParamSpec]]:
    """The model's structure without allocating it: graphdef, abstract state, and per path its ParamSpec."""
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, tp, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    specs: dict[str, ParamSpec] = {}
    for path, var in nnx.to_flat_state(state):
        axes = tuple(var.get_metadata()["out_sharding"])
        value = var.get_value()
        specs[_path_str(path)] = ParamSpec(tuple(value.shape), value.dtype, axes, tp.sharding(axes))
    return graphdef, state, specs


def merge(graphdef: nnx.GraphDef, state: nnx.State, arrays: dict[str, jax.Array]) -> nnx.Module:
    """Put loaded arrays into the abstract state and build the module."""
    flat = [(path, var.replace(arrays[_path_str(path)])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _read_local(view: np.ndarray, spec: ParamSpec) -> tuple[dict, int]:
    """Host copies of the slices this process's devices hold (identical slices read
    once), and the bytes of source data they took."""
    out, cache, nbytes = {}, {}, 0
    for device, index in spec.sharding.addressable_devices_indices_map(spec.shape).items():
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            piece = fit_slice(view, index, spec.shape, spec.axes)
            nbytes += piece.nbytes
            cache[key] = piece.astype(spec.dtype)
        out[device] = cache[key]
    return out, nbytes


def local_bytes(arr: jax.Array) -> int:
    """Bytes of the distinct slices of ``arr`` that this process's devices hold."""
    seen = {tuple((s.start, s.stop) for s in sh.index): sh.data.nbytes for sh in arr.addressable_shards}
    return sum(seen.values())


def _to_devices(local: dict, spec: ParamSpec) -> jax.Array:
    shards = [jax.device_put(x, d) for d, x in local.items()]
    return jax.make_array_from_single_device_arrays(spec.shape, spec.sharding, shards)


def _prefetched(items: list, read: Callable, enable: bool) -> Iterator:
    """Yield (item, read(item)) in order, reading the next item while the caller uses this one."""
    if not enable:
        for it in items:
            yield it, read(it)
        return
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read, items[0]) if items else None
        for i, it in enumerate(items):
            result = future.result()
            if i + 1 < len(items):
                future = pool.submit(read, items[i + 1])
            yield it, result


def _progress(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not show or jax.process_index() != 0, leave=False)


def load_hf_arrays(model_dir: str, cfg: ModelConfig, specs: dict[str, ParamSpec], *,
                   prefetch: bool = True, progress: bool = True) -> tuple[dict[str, jax.Array], int]:
    """Every parameter from memory-mapped safetensors, each device's slice read on its
    own; also the bytes this process read from the files."""
    views = hf_views(cfg, SafetensorsReader(model_dir))
    paths = list(specs)
    arrays, nbytes = {}, 0
    with _progress(len(paths), "loading safetensors", progress) as bar:
        for path, (local, n) in _prefetched(paths, lambda p: _read_local(views[p], specs[p]), prefetch):
            arrays[path] = _to_devices(local, specs[path])
            nbytes += n
            bar.update(1)
    return arrays, nbytes


def load_orbax_arrays(model_dir: str, specs: dict[str, ParamSpec], stored: dict[str, ParamSpec], *,
                      prefetch: bool = True, progress: bool = True) -> dict[str, jax.Array]:
    """Every parameter from a converted checkpoint, restored tensor by tensor into its sharding.

    ``stored`` are the specs of the checkpoint's own (tp = 1) layout. A padded vocabulary
    is zero-filled by Orbax; KV projections whose heads are replicated (kv heads < tp)
    are restored at their stored size, replicated, and repeated on the devices."""
    params_dir = os.path.join(model_dir, "params")

    def restore(path: str) -> jax.Array:
        spec, shape = specs[path], stored[path].shape
        if "kv_heads" not in spec.axes or shape == spec.shape:
            return orbax_io.restore_tensor(params_dir, path, spec.target)
        ax = spec.axes.index("kv_heads")
        replicated = jax.sharding.NamedSharding(spec.sharding.mesh, jax.sharding.PartitionSpec())
        small = orbax_io.restore_tensor(params_dir, path, jax.ShapeDtypeStruct(shape, spec.dtype, sharding=replicated))
        repeat = jax.jit(lambda w: jnp.repeat(w, spec.shape[ax] // shape[ax], axis=ax), out_shardings=spec.sharding)
        return repeat(small)

    arrays = {}
    with _progress(len(specs), "restoring orbax", progress) as bar:
        for path, arr in _prefetched(list(specs), restore, prefetch):
            arrays[path] = arr
            bar.update(1)
    return arrays


class DistributedCheckpointLoader:
    """The guide's distributed model loader, JAX-style.

    Every process constructs one with its ``rank`` and ``world_size`` (defaults: this
    JAX process) and calls :meth:`load`; each reads only the slices of the devices it
    owns. ``use_memory_map``: read safetensors through a memory map (the only way we
    read them: there is no eager path to turn off). ``enable_prefetch``: read the next
    tensor on a background thread while the current one goes to the devices. After
    :meth:`load`, ``bytes_read`` is what this process took from the checkpoint: the
    bytes of the safetensors slices it read, or of the Orbax slices it requested.
    """

    def __init__(self, checkpoint_dir: str, rank: int | None = None, world_size: int | None = None,
                 use_memory_map: bool = True, enable_prefetch: bool = True, progress: bool = True):
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"model directory {checkpoint_dir!r} does not exist")
        self.checkpoint_dir = checkpoint_dir
        self.rank = jax.process_index() if rank is None else rank
        self.world_size = jax.process_count() if world_size is None else world_size
        if self.rank != jax.process_index() or self.world_size != jax.process_count():
            raise ValueError(
                f"rank/world_size ({self.rank}/{self.world_size}) disagree with jax.distributed "
                f"({jax.process_index()}/{jax.process_count()}); initialise jax.distributed first"
            )
        if not use_memory_map:
            log.info("use_memory_map=False is ignored: safetensors are always memory-mapped")
        self.enable_prefetch = enable_prefetch
        self.bytes_read = 0
        self.progress = progress
        self.config = ModelConfig.from_pretrained(checkpoint_dir)
        self.is_converted = orbax_io.is_converted(checkpoint_dir)
        if not self.is_converted:
            safetensors_files(checkpoint_dir)  # refuse pickles / empty dirs before any device work

    def load(self, tp: TensorParallelConfig, dtype=jnp.float32) -> nnx.Module:
        """Build the model on ``tp``'s mesh with parameters in ``dtype``."""
        graphdef, state, specs = abstract_model(self.config, tp, dtype)
        if self.is_converted:
            orbax_io.read_marker(self.checkpoint_dir)
            _, _, stored = abstract_model(self.config, TensorParallelConfig(tp_size=1), dtype)
            arrays = load_orbax_arrays(self.checkpoint_dir, specs, stored, prefetch=self.enable_prefetch,
                                       progress=self.progress)
            self.bytes_read = sum(local_bytes(a) for a in arrays.values())
        else:
            arrays, self.bytes_read = load_hf_arrays(self.checkpoint_dir, self.config, specs,
                                                     prefetch=self.enable_prefetch, progress=self.progress)
        return merge(graphdef, state, arrays)
