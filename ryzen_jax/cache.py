"""The KV cache: per layer, keys and values of shape (batch, max_len, kv_heads, head_dim).

It is allocated already sharded (batch over ``data``, kv heads over ``model``) so no
device ever holds another device's heads, and the decode step donates it so XLA
updates it in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ryzen_jax.sharding import TensorParallelConfig

CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list[jax.Array]
    v: list[jax.Array]


def init_cache(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               tp: TensorParallelConfig, dtype=jnp.float32) -> KVCache:
    """Zeros in their target sharding. Call it inside a jitted program (prefill), so
    the cache is born sharded and never exists whole on one device."""
    shape = (batch, max_len, kv_heads, head_dim)
    z = [tp.constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2 * num_layers)]
    return KVCache(k=z[:num_layers], v=z[num_layers:])


def write(cache_layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new`` (B, T, KV, D) into ``cache_layer`` (B, S, KV, D) at per-row offsets ``start`` (B,)."""
    def one(c, x, s):
        return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), s, axis=0)

    return jax.vmap(one)(cache_layer, new, start)
