"""The one place that decides sharding.

Model code names the axes of every weight, activation and cache with *logical*
names (``("embed", "heads", "head_dim")``). ``LOGICAL_RULES`` maps each logical name
onto an axis of the ``(data, model)`` device mesh, or onto nothing (replicated).
XLA's SPMD partitioner then inserts the collectives. With the table below a
transformer layer is the Megatron layout: q/k/v and gate/up are column-parallel,
o and down row-parallel (one all-reduce each), embedding and LM head vocab-parallel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

#: logical axis name -> mesh axis (None: replicated); the README's sharding table lists who uses each.
LOGICAL_RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "embed": None,
    "heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": MODEL,
    "norm": None,
    "length": None,
    "cache_length": None,
}


class ShardingError(ValueError):
    """A model/mesh combination that cannot be laid out, with the numbers that clash."""


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
    """Map logical axis names to a PartitionSpec through the rule table."""
    out = []
    for name in axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rule table")
        out.append(None if name is None else rules[name])
    return P(*out)


def make_mesh(tp: int, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh of the first dp × tp ``devices`` (default: every visible
    one) with Auto axes (XLA decides the collectives)."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or dp < 1:
        raise ShardingError(f"tp and dp must be >= 1, got tp={tp}, dp={dp}")
    if tp * dp > len(devices):
        raise ShardingError(
            f"tp={tp} × dp={dp} needs {tp * dp} devices but only {len(devices)} are visible; "
            "lower --tp/--dp (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    grid = np.asarray(devices[: tp * dp]).reshape(dp, tp)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def check_holds_this_process(mesh: Mesh, visible: int) -> None:
    """Raise ShardingError unless ``mesh`` holds a device of this process: every process
    runs each program over the mesh on its own devices of it, so one with none could only
    wait for the others. (Meshes that only describe shapes need no such check.)"""
    me = jax.process_index()
    if not any(d.process_index == me for d in mesh.devices.flat):
        dp, tp = mesh.devices.shape
        raise ShardingError(
            f"tp={tp} × dp={dp} takes the first {tp * dp} of {visible} devices, none of them process {me}'s: "
            f"in a run of {jax.process_count()} processes the mesh must hold devices of every process; raise "
            f"tp × dp to {visible}, or give each process a model of its own on jax.local_devices()"
        )


@dataclasses.dataclass(frozen=True)
class TensorParallelConfig:
    """How a model is laid over devices: the guide's ``TensorParallelConfig``, JAX-style.

    There is no per-rank state: every device runs the same SPMD program, so ``tp_size``
    and ``dp_size`` (and the rule table) are the whole description. ``mesh`` is built
    from the visible devices on first use.
    """

    tp_size: int = 1
    dp_size: int = 1
    rules: tuple[tuple[str, str | None], ...] = tuple(LOGICAL_RULES.items())
    devices: tuple[Any, ...] | None = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    @property
    def mesh(self) -> Mesh:
        # Cached by hand because the dataclass is frozen.
        mesh = self.__dict__.get("_mesh")
        if mesh is None:
            mesh = make_mesh(self.tp_size, self.dp_size, self.devices)
            object.__setattr__(self, "_mesh", mesh)
        return mesh

    def spec(self, axes: Sequence[str | None]) -> P:
        return logical_to_spec(axes, dict(self.rules))

    def sharding(self, axes: Sequence[str | None]) -> NamedSharding:
        """The NamedSharding for a tensor whose dimensions carry these logical names."""
        return NamedSharding(self.mesh, self.spec(axes))

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """Pin an activation's layout inside jit (a no-op on one device)."""
        if self.world_size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(axes))

    def kv_heads(self, num_kv_heads: int) -> int:
        """KV heads the sharded model holds: replicated up to tp when there are fewer than tp."""
        return max(num_kv_heads, self.tp_size)

    def validate(self, *, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        """Raise ShardingError naming the numbers when tp cannot split the model evenly."""
        tp = self.tp_size
        if num_heads % tp:
            raise ShardingError(f"num_attention_heads={num_heads} is not divisible by tp={tp}; choose a tp that divides it")
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise ShardingError(
                f"num_key_value_heads={num_kv_heads} is not divisible by tp={tp}; choose a tp that divides it"
            )
        if num_kv_heads < tp and tp % num_kv_heads:
            raise ShardingError(
                f"num_key_value_heads={num_kv_heads} < tp={tp} can only be replicated when tp is a multiple of it"
            )
        if intermediate_size % tp:
            raise ShardingError(
                f"intermediate_size={intermediate_size} is not divisible by tp={tp}; choose a tp that divides it"
            )


def create_tensor_parallel_config(
    world_size: int | None = None,
    *,
    tp_size: int | None = None,
    dp_size: int = 1,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
) -> TensorParallelConfig:
    """The guide's factory: a validated config for ``world_size`` devices.

    ``tp_size`` defaults to ``world_size // dp_size``. The model sizes, when given, are
    checked against it so a bad split fails here rather than deep inside XLA.
    ``hidden_size`` is accepted for the guide's signature: the hidden dimension is
    replicated, so any size splits.
    """
    if tp_size is None:
        world_size = world_size or len(jax.devices())
        tp_size = world_size // dp_size
    cfg = TensorParallelConfig(tp_size=tp_size, dp_size=dp_size)
    if num_attention_heads is not None:
        cfg.validate(
            num_heads=num_attention_heads,
            num_kv_heads=num_key_value_heads or num_attention_heads,
            intermediate_size=intermediate_size or cfg.tp_size,
        )
    return cfg


def pad_to_multiple(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k``."""
    return -(-n // k) * k
