"""The one activation registry every MLP uses.

Names follow Hugging Face configs (``hidden_act``, ``activation_function``,
T5's ``feed_forward_proj``). A ``gated-`` prefix (T5 v1.1's "gated-gelu") or a
family that always gates (Llama's SwiGLU) turns the MLP into ``act(x Wg) ⊙ x Wu``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


class UnknownActivationError(ValueError):
    """An activation name no MLP here implements."""


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": _gelu_exact,  # erf form, as torch.nn.functional.gelu
    "gelu_new": _gelu_tanh,  # tanh approximation (GPT-2)
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

#: "gated-gelu" in a T5 config means GeGLU with the tanh GELU (as transformers' T5 reads it)
_GATED_ALIASES = {"gelu": "gelu_new"}


@dataclasses.dataclass(frozen=True)
class FeedForward:
    """An MLP's activation by name, and whether it is gated (GLU: SwiGLU, GeGLU)."""

    name: str
    gated: bool = False

    @property
    def fn(self) -> Callable[[jax.Array], jax.Array]:
        return ACTIVATIONS[self.name]


def activation(name: str, *, gated: bool = False) -> FeedForward:
    """Look up ``name``; ``"gated-<act>"`` means a gated MLP with ``<act>``.

    Raises UnknownActivationError naming the activation and listing the known ones.
    """
    if name.startswith("gated-"):
        base = name[len("gated-"):]
        return activation(_GATED_ALIASES.get(base, base), gated=True)
    if name not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS)) + ", and gated-<name> (e.g. gated-gelu)"
        raise UnknownActivationError(f"unknown activation {name!r}; known activations: {known}")
    return FeedForward(name, gated)
