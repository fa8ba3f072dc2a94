"""The Python API: load a model onto a mesh, then generate text.

    import ryzen_jax as rj
    lm = rj.load_model("path/to/model", tp=4)
    for out in rj.generate(lm, ["Hello"], max_new_tokens=32):
        print(out["text"])
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ryzen_jax.checkpoint.loader import DistributedCheckpointLoader
from ryzen_jax.config import ModelConfig
from ryzen_jax.engine.generate import GenerationResult, Generator
from ryzen_jax.engine.sampling import SamplingParams
from ryzen_jax.sharding import ShardingError, TensorParallelConfig

@dataclasses.dataclass
class LoadedModel:
    """A model on its mesh, with its tokenizer and the generator that runs it."""

    config: ModelConfig
    tp: TensorParallelConfig
    generator: Generator
    tokenizer: Any
    load_s: float
    path: str
    bytes_read: int  # checkpoint bytes this process read (its own slices only)


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on CPU (where bf16 matmuls are slow)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def choose_tp(cfg: ModelConfig, n_devices: int) -> int:
    """The largest tp ≤ n_devices that splits the model's heads and MLP evenly."""
    for tp in range(n_devices, 0, -1):
        try:
            TensorParallelConfig(tp_size=tp).validate(
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
        except ShardingError:
            continue
        return tp
    return 1


def load_tokenizer(path: str):
    """The model directory's Hugging Face tokenizer (None when it has none)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: str, *, tp: int | None = None, dp: int = 1, dtype: str | None = None,
               progress: bool = True) -> LoadedModel:
    """Load an HF directory or a converted checkpoint onto a (dp × tp) mesh.

    ``tp`` defaults to the largest split of the visible devices that the model allows.
    """
    tokenizer = load_tokenizer(path)  # before the clock: load_s measures the weights
    t0 = time.perf_counter()
    loader = DistributedCheckpointLoader(path, progress=progress)
    cfg = loader.config
    n = len(jax.devices())
    if tp is None:
        tp = choose_tp(cfg, max(1, n // dp))
    tp_cfg = TensorParallelConfig(tp_size=tp, dp_size=dp)
    # An unsplittable model or too few devices fails here, before the loader reads a weight.
    tp_cfg.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
    _ = tp_cfg.mesh
    model = loader.load(tp_cfg, jnp.dtype(dtype or default_dtype()))
    generator = Generator(model, tp_cfg)
    return LoadedModel(config=cfg, tp=tp_cfg, generator=generator, tokenizer=tokenizer,
                       load_s=time.perf_counter() - t0, path=path, bytes_read=loader.bytes_read)


def encode(lm: LoadedModel, text: str) -> list[int]:
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer: pass token ids instead of text")
    return list(lm.tokenizer(text)["input_ids"])


def generate(lm: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             sampling: SamplingParams = SamplingParams(), return_result: bool = False):
    """Generate for a batch of prompts (strings, or token-id lists).

    Returns one dict per prompt: ``prompt_ids``, ``generated_ids`` and ``text`` (the
    decoded continuation). With ``return_result`` also the GenerationResult (timings).
    """
    ids = [encode(lm, p) if isinstance(p, str) else list(p) for p in prompts]
    result: GenerationResult = lm.generator.generate(ids, max_new_tokens, sampling)
    outs = []
    for p, g in zip(result.prompt_ids, result.generated_ids):
        text = lm.tokenizer.decode(g, skip_special_tokens=True) if lm.tokenizer is not None else None
        outs.append({"prompt_ids": p, "generated_ids": g, "text": text})
    return (outs, result) if return_result else outs
