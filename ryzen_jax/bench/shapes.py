"""Model shapes the benchmark runs, and their random-weight checkpoints.

A preset is a Llama-architecture size (:class:`ryzen_jax.demo.LlamaDims`), from a
few-layer CPU size up to a "7B"-shaped one. Its checkpoint is an ordinary Hugging Face
directory (``config.json`` + ``model.safetensors``, seeded random weights in the run's
dtype, float32 or bfloat16), written once, one tensor at a time, by the demo's helpers
into a cache directory and reused: the same files feed our loader and the PyTorch
peer, so both run the very same weights.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ryzen_jax import kernels
from ryzen_jax.config import ModelConfig
from ryzen_jax.demo import CHECKPOINT_DTYPES, LlamaDims, weight_shapes, write_hf_checkpoint

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

#: host memory a run needs: HOST_MEMORY_FACTOR bytes per checkpoint byte plus
#: HOST_MEMORY_BASE. One copy of the weights is held at a time (ours, then the peer's;
#: the checkpoint is written one tensor at a time and read through a mapping whose
#: pages the kernel can drop). Measured (peak anonymous resident set, "1B" shape in
#: bfloat16, 2.2 GB, prompt 16, 8 new tokens, the peer included): 2.47 GB.
HOST_MEMORY_FACTOR = 1.15
HOST_MEMORY_BASE = 2**30


class ShapeError(ValueError):
    """A shape that cannot be built or does not fit this machine."""


def param_count(dims: LlamaDims) -> int:
    """Parameters of the checkpoint (untied LM head), from the tensors it holds."""
    return sum(math.prod(s) for s in weight_shapes(dims).values())


def model_param_count(cfg: ModelConfig) -> int:
    """Parameters of the model a config describes, as our model holds them on one device
    (its structure traced, nothing allocated): for a checkpoint of one's own."""
    import jax.numpy as jnp

    from ryzen_jax.checkpoint.loader import abstract_model
    from ryzen_jax.sharding import TensorParallelConfig

    _, _, specs = abstract_model(cfg, TensorParallelConfig(tp_size=1), jnp.float32)
    return sum(math.prod(spec.shape) for spec in specs.values())


def checkpoint_bytes(dims: LlamaDims | int, dtype: str = "float32") -> int:
    """Size of the checkpoint of ``dims`` (or of that many parameters) in ``dtype``."""
    return CHECKPOINT_DTYPES[dtype].itemsize * (dims if isinstance(dims, int) else param_count(dims))


#: what XLA:CPU's float32 copies of bfloat16 weights add, per checkpoint byte, where its
#: dot runs the products (``kernels.widens_bfloat16``: tp > 1 on CPU)
WIDENED_FACTOR = 2.0


def check_fits(dims: LlamaDims | int, dtype: str = "float32", available: int | None = None, *, tp: int = 1,
               platform: str | None = None) -> None:
    """Raise ShapeError unless this machine has the host memory to load and run ``dims``
    (a shape, or a model of that many parameters) in ``dtype`` (from a checkpoint in
    that dtype, as ``ensure_checkpoint`` writes it);
    given the ``platform`` it runs on, at ``tp`` (XLA:CPU's float32 copies of bfloat16
    weights counted where they are made)."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    size, params = checkpoint_bytes(dims, dtype), dims if isinstance(dims, int) else param_count(dims)
    smaller = (f"a smaller --model-size (one of {', '.join(PRESETS)})" if not isinstance(dims, int) else
               "a smaller model")
    widened = platform is not None and dtype == "bfloat16" and kernels.widens_bfloat16(platform, tp)
    need = int((HOST_MEMORY_FACTOR + (WIDENED_FACTOR if widened else 0.0)) * size) + HOST_MEMORY_BASE
    if need <= available:
        return
    if widened and int(HOST_MEMORY_FACTOR * size) + HOST_MEMORY_BASE <= available:
        fix = ("pass --tp 1, where our CPU kernels read bfloat16 as it lies" if tp > 1 else
               "our CPU kernels, which read bfloat16 as it lies, are unavailable here (the warning above says why); "
               f"make them available or choose {smaller}")
        raise ShapeError(
            f"a model of {params / 1e9:.2f}B parameters in bfloat16 at tp={tp} on CPU needs about "
            f"{need / 2**30:.1f} GiB of host memory ({available / 2**30:.1f} GiB are available): XLA:CPU's dot widens "
            f"each bfloat16 weight to a float32 copy and the decode loop holds them; {fix}")
    other = " (--dtype bfloat16 needs half)" if dtype == "float32" else ""
    raise ShapeError(
        f"a model of {params / 1e9:.2f}B parameters needs about {need / 2**30:.1f} GiB of host memory "
        f"to load and run in {dtype}{other}, but {available / 2**30:.1f} GiB are available; choose {smaller} "
        "or run on a machine with more memory")


def checkpoint_name(dims: LlamaDims, seed: int, dtype: str = "float32") -> str:
    """A directory name that changes whenever the shape, the seed or the dtype does."""
    fields = "-".join(str(v) for v in dataclasses.astuple(dims))
    return f"bench-llama-{fields}-s{seed}" + ("" if dtype == "float32" else f"-{dtype}")


def ensure_checkpoint(dims: LlamaDims, cache_dir: str, *, seed: int = 0, dtype: str = "float32",
                      progress: bool = False) -> str:
    """The HF checkpoint directory of ``dims`` in ``dtype`` under ``cache_dir``, written on
    first use (a bfloat16 one holds the float32 one's weights rounded to nearest, what
    loading that one in bfloat16 gives, in half the bytes and memory)."""
    path = os.path.join(cache_dir, checkpoint_name(dims, seed, dtype))
    check_fits(dims, dtype)
    if not os.path.isfile(os.path.join(path, "config.json")):
        write_hf_checkpoint(path, dims, seed=seed, dtype=dtype, progress=progress)
    return path


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``length`` seeded random token ids (ids 0 and 1, BOS and EOS, avoided);
    ours and the peer are given the very same ones."""
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab_size, size=(batch, length)).tolist()
