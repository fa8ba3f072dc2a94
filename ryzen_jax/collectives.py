"""Collectives: XLA/NCCL tuning presets, and explicit collectives over a mesh axis.

The guide's ``NCCLCommunicator`` tuned NCCL by hand and issued all-reduces itself. Here
XLA inserts the collectives of the model (the rule table decides where), so what is
left to the user is:

* **Presets** of XLA GPU flags and NCCL environment variables, applied once at start-up
  (``apply_collective_preset``; ``MultiGPUOrchestrator.initialize`` does it). XLA reads
  ``XLA_FLAGS`` and NCCL its variables when the GPU backend starts, so a preset must be
  applied before the first JAX computation. A flag or variable the user already set
  wins over the preset. On CPU the GPU flags are accepted and inert.
* **Explicit collectives** over one mesh axis (``all_reduce``, ``all_gather``,
  ``reduce_scatter``, built on ``jax.shard_map``) for users writing their own parallel
  layers; inside a ``shard_map`` body use ``jax.lax.psum`` & co directly.

The presets are starting points, not measured optima: this project's tests run on CPU
(where they only check that XLA accepts the flags). Measure on your interconnect.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, MutableMapping

import jax
from jax.sharding import Mesh, PartitionSpec as P

from ryzen_jax.sharding import MODEL

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class CollectivePreset:
    """XLA flags (appended to ``XLA_FLAGS``) and NCCL variables for one kind of workload."""

    description: str
    xla_flags: tuple[str, ...]
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


_OVERLAP = "--xla_gpu_enable_latency_hiding_scheduler=true"  # schedule collectives to overlap compute

COLLECTIVE_PRESETS: dict[str, CollectivePreset] = {
    "default": CollectivePreset(
        "Overlap collectives with compute; NCCL's own protocol and buffer choices.",
        (_OVERLAP,),
    ),
    "latency": CollectivePreset(
        "Small-batch decode: every all-reduce is a few KiB on the critical path. Collectives "
        "run on the highest-priority stream; NCCL uses only its low-latency protocols "
        "(LL, LL128), which slows large transfers (long prefills).",
        (_OVERLAP, "--xla_gpu_enable_highest_priority_async_stream=true"),
        {"NCCL_PROTO": "LL,LL128"},
    ),
    "throughput": CollectivePreset(
        "Large batches and long prefills: XLA combines collectives up to 128 MiB into one, "
        "pipelines them across loop iterations, and NCCL gets 16 MiB buffers (default 4 MiB).",
        (_OVERLAP,
         f"--xla_gpu_all_reduce_combine_threshold_bytes={128 * MiB}",
         f"--xla_gpu_all_gather_combine_threshold_bytes={128 * MiB}",
         f"--xla_gpu_reduce_scatter_combine_threshold_bytes={128 * MiB}",
         "--xla_gpu_enable_pipelined_all_gather=true",
         "--xla_gpu_enable_pipelined_reduce_scatter=true",
         "--xla_gpu_enable_pipelined_all_reduce=true"),
        {"NCCL_BUFFSIZE": str(16 * MiB)},
    ),
}


def _preset(name: str) -> CollectivePreset:
    if name not in COLLECTIVE_PRESETS:
        raise ValueError(f"unknown collective preset {name!r}; choose one of {sorted(COLLECTIVE_PRESETS)}")
    return COLLECTIVE_PRESETS[name]


def apply_collective_preset(name: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write preset ``name`` into ``environ`` (default ``os.environ``) and return the
    variables it changed. Flags and variables already present are left as the user set them.

    Must run before JAX starts its backend (the first computation or ``jax.devices()``).
    """
    preset = _preset(name)
    env = os.environ if environ is None else environ
    changed: dict[str, str] = {}
    flags = env.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0] for f in flags.split()}
    new = [f for f in preset.xla_flags if f.split("=", 1)[0] not in present]
    if new:
        changed["XLA_FLAGS"] = env["XLA_FLAGS"] = " ".join([flags, *new]).strip()
    for key, value in preset.env.items():
        if key not in env:
            changed[key] = env[key] = value
    return changed


def _block_spec(axis: str, dim: int) -> P:
    """A PartitionSpec splitting dimension ``dim`` over mesh axis ``axis``."""
    return P(*([None] * dim), axis)


@functools.cache
def _compiled(kind: str, mesh: Mesh, axis: str, dim: int, op: str) -> Callable[[jax.Array], jax.Array]:
    reducers = {"sum": jax.lax.psum, "mean": jax.lax.pmean, "max": jax.lax.pmax, "min": jax.lax.pmin}
    if op not in reducers:
        raise ValueError(f"unknown reduction {op!r}; choose one of {sorted(reducers)}")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh axis {axis!r} is not one of the mesh's axes {mesh.axis_names}")
    if kind == "all_reduce":
        body, in_spec, out_spec = (lambda b: reducers[op](b, axis)), P(axis), P()
    elif kind == "all_gather":
        body = lambda b: jax.lax.all_gather(b, axis, axis=dim, tiled=True, to="invarying")  # noqa: E731
        in_spec, out_spec = _block_spec(axis, dim), P()
    else:  # reduce_scatter
        body = lambda b: jax.lax.psum_scatter(b, axis, scatter_dimension=dim, tiled=True)  # noqa: E731
        in_spec, out_spec = P(axis), _block_spec(axis, dim)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_spec, out_specs=out_spec))


def all_reduce(x: jax.Array, mesh: Mesh, axis: str = MODEL, op: str = "sum") -> jax.Array:
    """Reduce the devices' blocks of ``x`` along mesh axis ``axis``.

    ``x``'s first dimension holds one block per device of the axis (shape ``(n·b, ...)``,
    block i on the i-th device: e.g. each device's partial sums). Returns the blockwise
    ``op`` (sum, mean, max, min) of shape ``(b, ...)``, replicated on every device.
    """
    return _compiled("all_reduce", mesh, axis, 0, op)(x)


def all_gather(x: jax.Array, mesh: Mesh, axis: str = MODEL, dim: int = 0) -> jax.Array:
    """``x`` split along dimension ``dim`` over mesh axis ``axis`` → the whole of ``x`` on every device."""
    return _compiled("all_gather", mesh, axis, dim, "sum")(x)


def reduce_scatter(x: jax.Array, mesh: Mesh, axis: str = MODEL, dim: int = 0) -> jax.Array:
    """Sum the devices' blocks of ``x`` (laid out as for ``all_reduce``) and leave each
    device with its slice of the sum along dimension ``dim`` (which the axis size must divide)."""
    return _compiled("reduce_scatter", mesh, axis, dim, "sum")(x)


class NCCLCommunicator:
    """The guide's ``NCCLCommunicator`` for JAX: the collectives above over one mesh axis,
    and the presets as its ``optimize_for_*`` methods (call those before the backend starts)."""

    def __init__(self, mesh: Mesh, axis: str = MODEL):
        self.mesh, self.axis = mesh, axis

    def all_reduce(self, x: jax.Array, op: str = "sum") -> jax.Array:
        return all_reduce(x, self.mesh, self.axis, op)

    def all_gather(self, x: jax.Array, dim: int = 0) -> jax.Array:
        return all_gather(x, self.mesh, self.axis, dim)

    def reduce_scatter(self, x: jax.Array, dim: int = 0) -> jax.Array:
        return reduce_scatter(x, self.mesh, self.axis, dim)

    @staticmethod
    def optimize_for_bandwidth() -> dict[str, str]:
        """Apply the "throughput" preset (see COLLECTIVE_PRESETS)."""
        return apply_collective_preset("throughput")

    @staticmethod
    def optimize_for_latency() -> dict[str, str]:
        """Apply the "latency" preset (see COLLECTIVE_PRESETS)."""
        return apply_collective_preset("latency")
