"""Prefill and decode on the mesh, and the generation loop over them.

Two compiled programs run on the devices:

* ``prefill`` — one per power-of-two prompt-length bucket: runs the padded prompts,
  fills a fresh KV cache and picks each row's first new token;
* ``decode`` — one per (batch, cache length): feeds one token per row, updates the
  donated cache in place and picks the next token.

Both are compiled ahead of time (``jit(...).lower(...).compile()``) and kept, so the
compile time is measured apart from run time and never paid twice for one shape.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ryzen_jax.engine.sampling import SamplingArrays, SamplingParams, sample
from ryzen_jax.sharding import TensorParallelConfig

MIN_BUCKET = 16
#: decode steps dispatched between two looks at the tokens (for stop ids): the host
#: fetches the tokens of these steps in one transfer instead of one round trip per token
SYNC_EVERY = 8


def fetch(arrays: list[jax.Array]) -> list[np.ndarray]:
    """Host copies of small per-row results (tokens), on every process: arrays that
    span other processes' devices are gathered."""
    if all(a.is_fully_addressable for a in arrays):
        return jax.device_get(arrays)
    return [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays]


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two ≥ n (and ≥ minimum)."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    compile_s: float = 0.0
    ttft_s: float = 0.0  # prefill + first token, compile excluded
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class Generator:
    """Runs a loaded model on its mesh: batched prefill, then token-by-token decode."""

    def __init__(self, model: nnx.Module, tp: TensorParallelConfig):
        self.cfg = model.cfg
        self.tp = tp
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.kv_heads = tp.kv_heads(self.cfg.num_kv_heads)
        self._compiled: dict[tuple, Any] = {}
        self.compile_count = 0
        self.compile_s = 0.0

        graphdef = self.graphdef

        def gathered(logits):
            # The LM head's one all-gather: vocab-sharded logits → whole rows, so that
            # sampling (sort, cumsum, argmax) runs locally instead of as many collectives.
            return tp.constrain(logits, ("batch", None))

        def prefill(state, tokens, lengths, sampling, max_len):
            model = nnx.merge(graphdef, state)
            logits, cache, positions = model.prefill(tokens, lengths, max_len)
            return sample(gathered(logits), sampling, jnp.int32(0)), cache, positions

        def decode(state, cache, tokens, positions, sampling, step):
            model = nnx.merge(graphdef, state)
            logits, cache = model.decode(tokens, positions, cache)
            return sample(gathered(logits), sampling, step), cache, positions + 1

        self._prefill = jax.jit(prefill, static_argnums=(4,))
        self._decode = jax.jit(decode, donate_argnums=(1,))

    # -- compiled programs ------------------------------------------------------------
    def _get(self, name: str, fn: Callable, *args):
        key = (name,) + tuple((a.shape, str(a.dtype)) if hasattr(a, "shape") else a for a in jax.tree.leaves(args[1:]))
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
            self.compile_count += 1
            self._compiled[key] = exe
        return exe

    def _batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.tp.mesh, P("data", *([None] * (ndim - 1))))

    def _abstract_cache(self, batch: int, max_len: int):
        """The cache prefill would create for this shape (shapes and shardings only)."""
        toks = jax.ShapeDtypeStruct((batch, MIN_BUCKET), jnp.int32)
        lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
        s = SamplingArrays.from_params([SamplingParams()] * batch)
        return self._prefill.eval_shape(self.state, toks, lens, s, max_len)[1]

    def decode_program(self, batch: int, max_len: int):
        """The compiled decode step for this shape (for inspection: HLO, memory, FLOPs)."""
        cache = self._abstract_cache(batch, max_len)
        toks = jnp.zeros((batch,), jnp.int32)
        s = SamplingArrays.from_params([SamplingParams()] * batch)
        return self._get("decode", self._decode, self.state, cache, toks, toks, s, jnp.int32(1))

    # -- generation -------------------------------------------------------------------
    def check_fits(self, prompt_lens: Sequence[int], max_new_tokens: int) -> None:
        """Raise before any device work when a request cannot fit the model's context."""
        limit = self.cfg.max_position_embeddings
        if not prompt_lens:
            raise ValueError("no prompts given: pass at least one prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for n in prompt_lens:
            if n < 1:
                raise ValueError("empty prompt: give at least one token")
            if n + max_new_tokens > limit:
                raise ValueError(
                    f"prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
                    f"{limit} positions; shorten the prompt or lower max_new_tokens"
                )

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 stop_ids: Sequence[int] | None = None) -> GenerationResult:
        """Generate for a batch of token-id prompts; a row stops at a stop id (kept) or
        after ``max_new_tokens``."""
        prompts = [list(map(int, p)) for p in prompts]
        self.check_fits([len(p) for p in prompts], max_new_tokens)
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        stop = set(self.cfg.eos_token_ids if stop_ids is None else stop_ids)

        n = len(prompts)
        dp = self.tp.dp_size
        batch = -(-n // dp) * dp  # pad the batch to a multiple of dp with copies of row 0
        rows = prompts + [prompts[0]] * (batch - n)
        params = params + [params[0]] * (batch - n)
        t_len = bucket(max(len(p) for p in rows))
        max_len = min(bucket(t_len + max_new_tokens, 64), max(self.cfg.max_position_embeddings, t_len))

        tokens = np.zeros((batch, t_len), np.int32)
        for i, p in enumerate(rows):
            tokens[i, : len(p)] = p
        lengths = np.array([len(p) for p in rows], np.int32)
        put = lambda x: jax.device_put(x, self._batch_sharding(x.ndim))
        tokens, lengths_d = put(tokens), put(lengths)
        s = jax.device_put(SamplingArrays.from_params(params), self._batch_sharding(1))
        compile_before = self.compile_s

        prefill = self._get("prefill", self._prefill, self.state, tokens, lengths_d, s, max_len)
        decode = self._get("decode", self._decode, self.state, self._abstract_cache(batch, max_len),
                           lengths_d, lengths_d, s, jnp.int32(1))

        t0 = time.perf_counter()
        nxt, cache, positions = prefill(self.state, tokens, lengths_d, s)
        (first,) = fetch([nxt])
        ttft = time.perf_counter() - t0

        out = [[int(t)] for t in first]
        done = np.array([t in stop for t in first])
        t1 = time.perf_counter()
        steps, pending = 0, []
        for step in range(1, max_new_tokens):
            if done.all():
                break
            nxt, cache, positions = decode(self.state, cache, nxt, positions, s, jnp.int32(step))
            steps += 1
            pending.append(nxt)
            if len(pending) == SYNC_EVERY or step == max_new_tokens - 1:
                for host in fetch(pending):
                    for i, t in enumerate(host):
                        if not done[i]:
                            out[i].append(int(t))
                            done[i] = int(t) in stop
                pending = []
        decode_s = time.perf_counter() - t1
        return GenerationResult(
            prompt_ids=prompts, generated_ids=out[:n], compile_s=self.compile_s - compile_before,
            ttft_s=ttft, decode_s=decode_s, decode_tokens=steps * n,
        )
