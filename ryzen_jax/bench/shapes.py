"""Model shapes the benchmark runs, and their random-weight checkpoints.

A preset is a Llama-architecture size (:class:`ryzen_jax.demo.LlamaDims`), from a
few-layer CPU size up to a "7B"-shaped one. Its checkpoint is an ordinary Hugging Face
directory (``config.json`` + ``model.safetensors``, float32, seeded random weights),
written once by the demo's helpers into a cache directory and reused: the same files
feed our loader and the PyTorch peer, so both run the very same weights.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ryzen_jax.demo import LlamaDims, weight_shapes, write_hf_checkpoint

#: name -> shape. "small" is the issue's target shape; "1B"/"7B" follow Llama's proportions.
PRESETS: dict[str, LlamaDims] = {
    "tiny": LlamaDims(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_positions=1024),
    "small": LlamaDims(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                       num_kv_heads=4, max_positions=2048),
    "medium": LlamaDims(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16,
                        num_kv_heads=8, max_positions=2048),
    "1B": LlamaDims(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                    num_kv_heads=4, max_positions=2048),
    "7B": LlamaDims(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    num_kv_heads=32, max_positions=4096),
}

#: bytes of host memory needed per float32 checkpoint byte: the random weights while they
#: are written, our loaded copy and the peer's (one at a time), with some headroom
HOST_MEMORY_FACTOR = 2.5


class ShapeError(ValueError):
    """A shape that cannot be built or does not fit this machine."""


def param_count(dims: LlamaDims) -> int:
    """Parameters of the checkpoint (untied LM head), from the tensors it holds."""
    return sum(math.prod(s) for s in weight_shapes(dims).values())


def checkpoint_bytes(dims: LlamaDims) -> int:
    """Size of the float32 checkpoint."""
    return 4 * param_count(dims)


def check_fits(dims: LlamaDims, available: int | None = None) -> None:
    """Raise ShapeError unless this machine has the host memory to write and load ``dims``."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = int(HOST_MEMORY_FACTOR * checkpoint_bytes(dims))
    if need > available:
        raise ShapeError(
            f"a model of {param_count(dims) / 1e9:.2f}B parameters needs about {need / 2**30:.1f} GiB of host memory "
            f"to build and load in float32, but {available / 2**30:.1f} GiB are available; choose a smaller "
            f"--model-size (one of {', '.join(PRESETS)}) or run on a machine with more memory")


def checkpoint_name(dims: LlamaDims, seed: int) -> str:
    """A directory name that changes whenever the shape or the seed does."""
    fields = "-".join(str(v) for v in dataclasses.astuple(dims))
    return f"bench-llama-{fields}-s{seed}"


def ensure_checkpoint(dims: LlamaDims, cache_dir: str, *, seed: int = 0) -> str:
    """The HF checkpoint directory of ``dims`` under ``cache_dir``, written on first use."""
    path = os.path.join(cache_dir, checkpoint_name(dims, seed))
    if not os.path.isfile(os.path.join(path, "config.json")):
        check_fits(dims)
        write_hf_checkpoint(path, dims, seed=seed)
    return path


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``length`` seeded random token ids (ids 0 and 1, BOS and EOS, avoided);
    ours and the peer are given the very same ones."""
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab_size, size=(batch, length)).tolist()
