"""Token selection on the device: greedy, temperature, top-k and top-p, one row at a time.

Every setting is a traced array (one value per batch row), so changing it never
recompiles. Each row draws from its own key, ``fold_in(key(seed), step)``: the same
seed gives the same tokens whatever the batch or the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """SamplingParams for a batch, one entry per row, as device arrays."""

    temperature: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    top_p: jax.Array  # (B,) float32
    key: jax.Array  # (B,) typed PRNG keys

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> "SamplingArrays":
        return cls(
            temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
            top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
            key=jnp.stack([jax.random.key(p.seed) for p in params]),
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
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.key, step)
    return jax.vmap(_sample_row)(logits, s.temperature, s.top_k, s.top_p, keys)
