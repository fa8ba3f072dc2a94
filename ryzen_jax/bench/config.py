"""What a benchmark run measures: the guide's ``BenchmarkConfig``, validated up front."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

from ryzen_jax.bench.shapes import PRESETS, model_param_count, param_count
from ryzen_jax.config import ConfigError, ModelConfig
from ryzen_jax.demo import LlamaDims

DTYPES = ("float32", "bfloat16")


class BenchmarkConfigError(ValueError):
    """A benchmark setting out of its range; the message names the setting and the fix."""


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """An offline benchmark: a model, the batch sizes, prompt and new-token counts.

    The model is a shape with random weights or a checkpoint of one's own. ``model_size``
    names a preset of :data:`ryzen_jax.bench.shapes.PRESETS`; the shape fields
    (``num_layers`` ...), when given, override the preset's. ``model``, when given, is a
    model directory to measure instead (a Hugging Face one or one converted by
    ``scripts/convert_hf.py``; a decoder-only family that generates: Llama, Mistral,
    Qwen2, GPT-2): its ``config.json`` is the shape, and the peer runs on its
    safetensors (a converted directory has none, so there the peer is skipped).
    ``seq_len`` is the prompt length in tokens and ``new_tokens`` how many are generated
    after it (every request runs to ``new_tokens``: EOS is ignored, as in the peer).
    ``world_size`` is the tensor-parallel size (None: the largest the devices and the shape allow);
    ``speedup`` also runs tp = 1 to report the speedup. ``repeats`` timed runs per
    measurement (after one untimed warm-up run); ``peer`` runs Hugging Face
    transformers on the same weights when torch is installed. ``probe_megabytes``:
    the array size the memory bandwidth is measured with.
    """

    model_size: str = "small"
    model: str | None = None
    batch_size: int | Sequence[int] = (1, 8)
    seq_len: int = 128
    new_tokens: int = 128
    world_size: int | None = None
    dtype: str = "float32"
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    repeats: int = 3
    peer: bool = True
    speedup: bool = True
    seed: int = 0
    cache_dir: str | None = None
    probe_megabytes: int = 256  # array size of the bandwidth measurement: far beyond the caches

    def __post_init__(self):
        sizes = (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)
        object.__setattr__(self, "batch_size", sizes)
        if self.model_size not in PRESETS:
            raise BenchmarkConfigError(f"model_size {self.model_size!r} is not a preset; choose one of "
                                       f"{', '.join(PRESETS)}")
        if not sizes or not all(_positive_int(b) for b in sizes):
            raise BenchmarkConfigError(f"batch_size must be one or more integers >= 1, got {self.batch_size!r}")
        if len(set(sizes)) != len(sizes):
            raise BenchmarkConfigError(f"batch_size lists a size twice: {sizes}")
        object.__setattr__(self, "batch_size", tuple(sorted(sizes)))  # smallest first, as the headline fields read them
        for name in ("seq_len", "new_tokens", "repeats", "probe_megabytes"):
            if not _positive_int(getattr(self, name)):
                raise BenchmarkConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.new_tokens < 2:
            raise BenchmarkConfigError(f"new_tokens must be >= 2 (one from prefill, the rest from decode steps), "
                                       f"got {self.new_tokens}")
        if self.world_size is not None and not _positive_int(self.world_size):
            raise BenchmarkConfigError(f"world_size (tp) must be an integer >= 1 or None, got {self.world_size!r}")
        if self.dtype not in DTYPES:
            raise BenchmarkConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for f in _SHAPE_FIELDS.values():
            v = getattr(self, f)
            if v is not None and not _positive_int(v):
                raise BenchmarkConfigError(f"{f} must be an integer >= 1 (or None for the preset's), got {v!r}")
        if self.model is not None:
            self._check_model()
            return
        d = self.dims
        if d.hidden_size % d.num_heads:
            raise BenchmarkConfigError(f"hidden_size {d.hidden_size} is not a multiple of num_attention_heads "
                                       f"{d.num_heads}: change one of them")
        if d.num_heads % d.num_kv_heads:
            raise BenchmarkConfigError(f"num_attention_heads {d.num_heads} is not a multiple of num_key_value_heads "
                                       f"{d.num_kv_heads}: change one of them")
        if self.seq_len + self.new_tokens > d.max_positions:
            raise BenchmarkConfigError(
                f"seq_len {self.seq_len} + new_tokens {self.new_tokens} exceeds the {d.max_positions} positions of "
                f"the {self.model_size!r} shape; shorten the prompt or generate fewer tokens")

    def _check_model(self) -> None:
        """A checkpoint of one's own: there, decoder-only, unshaped by the preset fields,
        long enough for the run (all before anything is loaded)."""
        given = [f for f in _SHAPE_FIELDS.values() if getattr(self, f) is not None]
        if given:
            raise BenchmarkConfigError(f"{', '.join(given)} reshape a preset, but the shape of model {self.model!r} is "
                                       "its config.json: drop them, or drop the model to benchmark a preset")
        if not os.path.isdir(self.model):
            raise BenchmarkConfigError(f"model {self.model!r} is not a directory: point it at a Hugging Face model "
                                       "directory (config.json + *.safetensors) or a converted checkpoint")
        try:
            cfg = self.model_config
        except ConfigError as e:
            raise BenchmarkConfigError(f"model {self.model!r}: {e}") from None
        if cfg.is_encoder or cfg.is_encoder_decoder:
            kind = "an encoder-only" if cfg.is_encoder else "an encoder-decoder"
            raise BenchmarkConfigError(f"model {self.model!r} is {kind} {cfg.model_type}: the offline benchmark "
                                       "measures decoder-only text generation (Llama, Mistral, Qwen2, GPT-2)")
        if self.seq_len + self.new_tokens > cfg.max_position_embeddings:
            raise BenchmarkConfigError(
                f"seq_len {self.seq_len} + new_tokens {self.new_tokens} exceeds the {cfg.max_position_embeddings} "
                f"positions of model {self.model!r}; shorten the prompt or generate fewer tokens")

    @functools.cached_property
    def model_config(self) -> ModelConfig | None:
        """``model``'s config.json (None for a preset)."""
        return None if self.model is None else ModelConfig.from_pretrained(self.model)

    @functools.cached_property
    def params(self) -> int:
        """Parameters of the model under test: the preset's checkpoint, or ``model``'s."""
        return param_count(self.dims) if self.model is None else model_param_count(self.model_config)

    @property
    def shape(self) -> LlamaDims | ModelConfig:
        """The sizes the run is split by (``num_heads``, ``num_kv_heads``,
        ``intermediate_size``, ...): the preset's or the model's."""
        return self.dims if self.model is None else self.model_config

    @property
    def max_positions(self) -> int:
        return self.dims.max_positions if self.model is None else self.model_config.max_position_embeddings

    @property
    def label(self) -> str:
        """What the run measured, for a table's first line."""
        if self.model is None:
            return f"shape {self.model_size!r}"
        return f"model {self.model} ({self.model_config.model_type})"

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(self.batch_size)

    @property
    def dims(self) -> LlamaDims:
        """The model shape: the preset with the given fields overridden."""
        over = {k: getattr(self, f) for k, f in _SHAPE_FIELDS.items() if getattr(self, f) is not None}
        return dataclasses.replace(PRESETS[self.model_size], **over)

    @property
    def max_seq_len(self) -> int:
        """The engine's cache length: prompt + new tokens, rounded up to a multiple of 16.
        The decode step attends over the whole cache, so it is sized to the run."""
        return min(-(-(self.seq_len + self.new_tokens) // 16) * 16, self.max_positions)


#: LlamaDims field -> BenchmarkConfig field (the guide's / Hugging Face's names)
_SHAPE_FIELDS = {"num_layers": "num_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                 "hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size"}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1
