"""Running a model for embeddings on its mesh: hidden states and pooled vectors.

An encoder-only model (BERT), or a decoder-only one loaded for embeddings
(``load_model(..., task="embed")``: Llama / Qwen2 / Mistral / GPT-2 embedding models,
pooled at the last token as vLLM pools them by default). One program per (batch,
length) shape, compiled ahead of time and kept: a batch is padded to a power of two
rows (a multiple of dp; extra rows copy the first) and its token lists, right-padded,
to a power-of-two length bucket. The program returns the last hidden states and every
pooling (mean over real tokens, first token, last real token), so an embedding needs
only (N, E) floats from the devices.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ryzen_jax.engine.generate import bucket, fetch
from ryzen_jax.sharding import TensorParallelConfig

POOLINGS = ("mean", "cls", "last")


def model_pooling(model_dir: str, default: tuple[str, bool] = ("mean", False)) -> tuple[str, bool]:
    """(pooling, normalize) that a sentence-transformers model directory asks for
    (``modules.json``: its Pooling module's mode, and whether a Normalize module
    follows); ``default`` where it says nothing. A mode we lack comes back by its
    own name (``pooling_mode_max_tokens``), for ``Encoder.embed`` to refuse unless the
    caller chooses a pooling."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        modules = json.load(f)
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        cfg_path = os.path.join(model_dir, m.get("path", ""), "config.json")
        if str(m.get("type", "")).endswith("Pooling") and os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                modes = sorted(k for k, v in json.load(f).items() if k.startswith("pooling_mode_") and v)
            named = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_lasttoken": "last"}
            pooling = named.get(modes[0], modes[0]) if len(modes) == 1 else "+".join(modes)
    return pooling, normalize


class Encoder:
    """Runs ``model.hidden_states(tokens, attention_mask, token_type_ids) -> (B, T, E)``."""

    def __init__(self, model: nnx.Module, tp: TensorParallelConfig, *, pooling: str = "mean",
                 normalize: bool = False, max_len: int | None = None):
        """``pooling``, ``normalize``: what ``embed`` does unless told otherwise (the
        model's own, ``model_pooling``). ``max_len``: the longest input (default: the
        model's positions)."""
        self.pooling, self.normalize = pooling, normalize
        self.max_len = max_len or model.cfg.max_position_embeddings
        self.cfg = model.cfg
        self.tp = tp
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self._compiled: dict[tuple[int, int], Any] = {}
        self.compile_count = 0
        self.compile_s = 0.0
        graphdef = self.graphdef

        def encode(state, tokens, mask, types):
            hidden = nnx.merge(graphdef, state).hidden_states(tokens, mask, types)
            real = mask.astype(jnp.float32)[:, :, None]
            mean = jnp.sum(hidden * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)
            last = jnp.take_along_axis(hidden, jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)[:, None, None], axis=1)[:, 0]
            return hidden, {"mean": mean, "cls": hidden[:, 0], "last": last}

        self._encode = jax.jit(encode)

    def _rows(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.tp.mesh, P("data", *([None] * (ndim - 1))))

    def encode_program(self, batch: int, length: int):
        """The compiled program for (batch rows, length) — compiled on first use; also
        for inspection (HLO text, memory and cost analyses)."""
        key = (batch, length)
        if key not in self._compiled:
            arg = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=self._rows(2))
            t0 = time.perf_counter()
            self._compiled[key] = self._encode.lower(self.state, arg, arg, arg).compile()
            self.compile_s += time.perf_counter() - t0
            self.compile_count += 1
        return self._compiled[key]

    def check(self, token_id_lists: Sequence[Sequence[int]]) -> None:
        """Raise before any device work on input the model cannot encode."""
        limit = self.max_len
        if not token_id_lists:
            raise ValueError("no inputs given: pass at least one text or token-id list")
        for i, ids in enumerate(token_id_lists):
            if not len(ids):
                raise ValueError(f"input {i} is empty: give at least one token")
            if len(ids) > limit:
                raise ValueError(f"input {i} has {len(ids)} tokens, past the {limit} positions it may hold; shorten it "
                                 "(rj.embed(..., truncate=True), encode.py --truncate: cut it to fit)")
            bad = [t for t in ids if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def _run(self, token_id_lists: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None):
        """(hidden (B, T, E), {pooling: (B, E)}) on the devices for the padded batch."""
        self.check(token_id_lists)
        n, dp = len(token_id_lists), self.tp.dp_size
        if token_type_ids is not None and [len(t) for t in token_type_ids] != [len(t) for t in token_id_lists]:
            raise ValueError("token_type_ids must give one id per token of each input")
        bad = [t for types in token_type_ids or () for t in types if not 0 <= int(t) < self.cfg.type_vocab_size]
        if bad:  # an out-of-range lookup would give NaN (or wrap), not an error
            raise ValueError(f"token type id {bad[0]} is outside [0, {self.cfg.type_vocab_size}) "
                             "(config.json 'type_vocab_size')")
        rows = dp * bucket(-(-n // dp), 1)
        length = min(bucket(max(len(t) for t in token_id_lists)), self.max_len)
        tokens, mask, types = (np.zeros((rows, length), np.int32) for _ in range(3))
        for i in range(rows):
            src = i if i < n else 0
            ids = token_id_lists[src]
            tokens[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
            if token_type_ids is not None:
                types[i, : len(ids)] = token_type_ids[src]
        program = self.encode_program(rows, length)
        return program(self.state, *(jax.device_put(a, self._rows(2)) for a in (tokens, mask, types)))

    def hidden_states(self, token_id_lists: Sequence[Sequence[int]],
                      token_type_ids: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
        """The last hidden states of each input: one (len_i, E) float32 array per input."""
        hidden, _ = self._run(token_id_lists, token_type_ids)
        (host,) = fetch([hidden])
        return [host[i, : len(ids)] for i, ids in enumerate(token_id_lists)]

    def embed(self, token_id_lists: Sequence[Sequence[int]], pooling: str | None = None,
              normalize: bool | None = None, token_type_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """One vector per input, (N, E) float32: ``pooling="mean"`` averages the hidden
        states of the real tokens, ``"cls"`` takes the first token's, ``"last"`` the last
        real token's (a decoder's: the only one that has seen every token); ``normalize``
        scales each to unit L2 norm. None: the encoder's defaults (the model's own)."""
        if pooling is None and self.pooling not in POOLINGS:
            raise ValueError(f"the model's sentence-transformers modules.json asks for pooling {self.pooling!r}; "
                             f"ryzen_jax pools by {' or '.join(POOLINGS)}: pass pooling= (--pooling) to choose one")
        pooling = pooling or self.pooling
        normalize = self.normalize if normalize is None else normalize
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        _, pooled = self._run(token_id_lists, token_type_ids)
        (host,) = fetch([pooled[pooling]])
        out = np.asarray(host[: len(token_id_lists)], np.float32)
        if normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out
