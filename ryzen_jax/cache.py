"""The KV cache: per layer, keys and values of shape (batch, kv_heads, max_len, head_dim).

Heads come before positions so that one head's keys are contiguous: attention reads
them as they lie, with no per-step transpose of the cache (on CPU that transpose cost
as much as a tenth of a decode step).

It is allocated already sharded (batch over ``data``, kv heads over ``model``) so no
device ever holds another device's heads, and the decode step donates it so XLA
updates it in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ryzen_jax import kernels
from ryzen_jax.sharding import TensorParallelConfig

CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]
    v: list[jax.Array]


def init_cache(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               tp: TensorParallelConfig, dtype=jnp.float32) -> KVCache:
    """Zeros in their target sharding. Call it inside a jitted program (prefill), so
    the cache is born sharded and never exists whole on one device."""
    shape = (batch, kv_heads, max_len, head_dim)
    z = [tp.constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2 * num_layers)]
    return KVCache(k=z[:num_layers], v=z[num_layers:])


def heads_major(x: jax.Array) -> jax.Array:
    """(B, T, KV, D) as projected → (B, KV, T, D) as the cache and attention hold it."""
    return x.swapaxes(1, 2)


def write(cache_layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new`` (B, KV, T, D) into ``cache_layer`` (B, KV, S, D) at per-row offsets
    ``start`` (B,), each at least 0 (clamped so the slots fit). A bfloat16 cache traced
    for our CPU kernels is written by one (XLA:CPU's write would convert it whole)."""
    written = kernels.write_cache(cache_layer, new, start)
    if written is not None:
        return written

    def one(c, x, s):
        return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), s, axis=1)

    return jax.vmap(one)(cache_layer, new, start)


def put_row(big: jax.Array, small: jax.Array, row: jax.Array) -> jax.Array:
    """Row 0 of ``small`` written into row ``row`` of ``big`` (the same trailing shape,
    or a smaller block of it): a prefilled request's cache (or decode state) moved into
    its slot of a server's batch. A bfloat16 array traced for our CPU kernels is written
    in place by ``kernels.put_row``; elsewhere XLA's dynamic_update_slice."""
    written = kernels.put_row(big, small, row)
    if written is not None:
        return written
    return jax.lax.dynamic_update_slice_in_dim(big, small[:1].astype(big.dtype), row, axis=0)
