"""Token selection on the device: greedy, temperature, top-k and top-p, one row at a time.

Every setting is a traced array (one value per batch row), so changing it never
recompiles. Each row draws from its own key, ``fold_in(key(seed), step)``, made on
the device: the same seed gives the same tokens whatever the batch or the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy (argmax).

    ``top_k == 0`` and ``top_p == 1`` disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """SamplingParams for a batch, one entry per row (host arrays until placed)."""

    temperature: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    top_p: jax.Array  # (B,) float32
    seed: jax.Array  # (B,) uint32

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> "SamplingArrays":
        return cls(
            temperature=np.asarray([p.temperature for p in params], np.float32),
            top_k=np.asarray([p.top_k for p in params], np.int32),
            top_p=np.asarray([p.top_p for p in params], np.float32),
            seed=np.asarray([p.seed for p in params], np.uint32),
        )


def _sample_row(logits: jax.Array, temperature, top_k, top_p, key) -> jax.Array:
    greedy = jnp.argmax(logits).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = jnp.sort(scaled)[::-1]
    # top-k: drop everything below the k-th largest (the same cut keeps `desc` sorted)
    kth = desc[jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)]
    cut_k = lambda x: jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)
    scaled, desc = cut_k(scaled), cut_k(desc)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p
    probs = jax.nn.softmax(desc)
    cutoff = jnp.min(jnp.where(jnp.cumsum(probs) - probs < top_p, desc, jnp.inf))
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def sample(logits: jax.Array, s: SamplingArrays, step: jax.Array) -> jax.Array:
    """Next token per row from float32 ``logits`` (B, V); ``step`` keys the draw."""
    keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(s.seed)
    return jax.vmap(_sample_row)(logits, s.temperature, s.top_k, s.top_p, keys)
