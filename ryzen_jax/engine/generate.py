"""The generation engine: requests in, tokens and text out, on a fixed set of
compiled programs.

Two programs run on the devices (``programs.py``), both compiled ahead of time and kept:

* ``prefill`` — one per (batch, prompt-length bucket): runs the right-padded
  prompts, creates the cache (``max_seq_len`` positions, born sharded) and picks each
  row's first token; a second variant, compiled when a request first asks for
  ``prompt_logprobs``, also scores every prompt token;
* ``decode`` — one per batch size: a ``while_loop`` of up to ``DECODE_CHUNK`` decode
  steps (the count is a traced argument), each feeding one token per row into the
  donated cache, sampling the next and applying EOS / stop ids / ``max_new_tokens``
  on the device. The host looks at the tokens once per dispatch; streaming asks for
  one step per dispatch, plain generation for a whole chunk, and a batch holding a
  structured-output request runs one step at a time (its grammar's mask of allowed
  tokens, ``structured.py``, follows each token).

Prompt lengths are bucketed to powers of two and batches to powers of two (× dp),
the cache length is fixed per engine, and every sampling setting is a traced array,
so after ``warmup`` no request inside those buckets compiles anything.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ryzen_jax import kernels
from ryzen_jax.engine.compile import compile_lowered, compiler_options
from ryzen_jax.engine.programs import DECODE_CHUNK, DecodeState, device_programs
from ryzen_jax.engine.request import Completion, GenerationResult, Request, StreamDelta, _pairs, _Row
from ryzen_jax.engine.sampling import Picked, SamplingArrays, SamplingParams
from ryzen_jax.engine.structured import Grammars, masks
from ryzen_jax.engine.text import TextTracker
from ryzen_jax.sharding import TensorParallelConfig

MIN_BUCKET = 16
#: most stop token ids per request (EOS ids included); the array is fixed-size so it never recompiles
MAX_STOP_IDS = 16


def fetch(arrays: list[jax.Array]) -> list[np.ndarray]:
    """Host copies of small per-row results (tokens), on every process: arrays that
    span other processes' devices are gathered."""
    if all(a.is_fully_addressable for a in arrays):
        return jax.device_get(arrays)
    return [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays]


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two ≥ n (and ≥ minimum)."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def resolve_max_seq_len(cfg: Any, max_seq_len: int | None) -> int:
    """The cache length: ``max_seq_len`` if it fits the model's context, else an error;
    by default the context, capped at 2048."""
    context = cfg.max_position_embeddings
    if max_seq_len is None:
        return min(context, 2048)
    if not (isinstance(max_seq_len, (int, np.integer)) and 1 < max_seq_len <= context):
        raise ValueError(f"max_seq_len must be in [2, {context}] (the model's context), got {max_seq_len}")
    return int(max_seq_len)


def check_length(cfg: Any, limit: int, n: int, new: int) -> None:
    """Refuse a prompt of n tokens and ``new`` new ones that a cache of ``limit``
    positions cannot hold (an encoder–decoder's prompt goes to the encoder)."""
    total = max(n, new + 1) if getattr(cfg, "is_encoder_decoder", False) else n + new
    if total > limit:
        raise ValueError(
            f"prompt of {n} tokens + max_new_tokens={new} exceeds the {limit} positions this engine holds "
            f"(model context {cfg.max_position_embeddings}); shorten the prompt, lower max_new_tokens or raise "
            "max_seq_len (--max-seq-len) up to the model's context")


class Generator:
    """Runs a loaded model on its mesh: batched prefill, then chunks of decode steps.

    ``max_seq_len`` (prompt + generated tokens per row; default: the model's context,
    capped at 2048) fixes the cache length, so decode compiles once per batch size.
    ``tokenizer`` (optional) enables text output and stop strings.
    """

    def __init__(self, model: nnx.Module, tp: TensorParallelConfig, *, tokenizer: Any = None,
                 max_seq_len: int | None = None, seed: int | None = None):
        self.cfg = model.cfg
        self.tp = tp
        self.tokenizer = tokenizer
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.kv_heads = tp.kv_heads(self.cfg.num_kv_heads)
        self.encoder_decoder = bool(getattr(self.cfg, "is_encoder_decoder", False))
        self.max_seq_len = resolve_max_seq_len(self.cfg, max_seq_len)
        self._compiled: dict[tuple, Any] = {}
        self._options = compiler_options(tp.mesh)
        self.compile_count = 0
        self.compile_s = 0.0
        # Seeds for requests that give none: identical on every process (SPMD), fresh per run.
        if seed is None:
            seed = 0 if jax.process_count() > 1 else int.from_bytes(os.urandom(4), "little")
        self._seeds = np.random.default_rng(seed)
        self.grammars = Grammars(tokenizer, self.cfg.vocab_size, self.cfg.eos_token_ids) \
            if tokenizer is not None else None

        prefill, self._decode_fn = device_programs(self.graphdef, self.cfg, tp, self.max_seq_len)
        self._prefill = jax.jit(prefill)
        self._prefill_scored = jax.jit(functools.partial(prefill, score_prompt=True))

    # -- compiled programs ------------------------------------------------------------
    def _compile(self, key: tuple, lower: Callable[[], Any]):
        """The executable kept under ``key``, compiled (and counted, and timed) on first use."""
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            with kernels.for_mesh(self.tp.mesh):  # our CPU kernels where they serve this mesh
                lowered = lower()
            exe = compile_lowered(lowered, self._options)
            self.compile_s += time.perf_counter() - t0
            self.compile_count += 1
            self._compiled[key] = exe
        return exe

    def _get(self, name: str, fn: Callable, *args):
        """``fn`` compiled for these arguments (keyed by the shapes after the first)."""
        key = (name,) + tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[1:]))
        return self._compile(key, lambda: fn.lower(*args))

    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array of per-row values, placed with its rows split over ``data``."""
        return jax.device_put(x, self._rows(x.ndim))

    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.tp.mesh, P())

    def _rows(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.tp.mesh, P("data", *([None] * (ndim - 1))))

    def _abstract_prefill_inputs(self, batch: int, length: int):
        def rows(shape, dtype=jnp.int32):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self._rows(len(shape)))

        s = SamplingArrays.from_params([SamplingParams()] * batch, [0] * batch, self.cfg.vocab_size)
        s = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated()), s)
        return (self.state, rows((batch, length)), rows((batch,)), s, rows((batch,)), rows((batch, MAX_STOP_IDS)))

    def prefill_program(self, batch: int, length: int, score_prompt: bool = False):
        """The compiled prefill for (batch, prompt bucket) — compiled on first use.
        ``score_prompt``: the variant that also returns the prompt tokens' picks
        (``Picked`` of shape (B, length)), for requests with ``prompt_logprobs``; it runs
        the LM head over every position (``SCORE_CHUNK`` at a time), so ``warmup``
        leaves it to the first request that asks."""
        fn, name = (self._prefill_scored, "prefill-scored") if score_prompt else (self._prefill, "prefill")
        return self._get(name, fn, *self._abstract_prefill_inputs(batch, length))

    def decode_program(self, batch: int, attend: int | None = None):
        """The compiled decode chunk for this batch size, reading the first ``attend``
        cache slots (default: all; see ``attend_for``). Also for inspection: HLO text,
        memory and cost analyses."""
        attend = self.max_seq_len if attend is None else attend

        def lower():
            cache, d, s = self.decode_inputs(batch)
            # state and cache leave each chunk placed as they came in, ready for the next
            fn = jax.jit(functools.partial(self._decode_fn, attend=attend), donate_argnums=(1, 2),
                         out_shardings=(Picked(self._rows(2), self._rows(2), self._rows(3), self._rows(3)),
                                        jax.tree.map(lambda a: a.sharding, d),
                                        jax.tree.map(lambda a: a.sharding, cache)))
            return fn.lower(self.state, cache, d, s, jax.ShapeDtypeStruct((), jnp.int32))

        return self._compile(("decode", batch, attend), lower)

    def decode_inputs(self, batch: int) -> tuple:
        """Abstract (cache, decode state, sampling settings) of a batch exactly as prefill
        leaves them: shapes, dtypes and placements."""
        args = self._abstract_prefill_inputs(batch, MIN_BUCKET)
        with kernels.for_mesh(self.tp.mesh):  # jit keeps this trace for the prefill program: trace it as _compile does
            shapes = self._prefill.eval_shape(*args)
        placed = self.prefill_program(batch, MIN_BUCKET).output_shardings
        _, d, cache = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, placed)
        return cache, d, args[3]

    def attend_buckets(self) -> list[int]:
        """Cache lengths a decode program may read: powers of two from 64, then all."""
        out, b = [], 64
        while b < self.max_seq_len:
            out.append(b)
            b *= 2
        return out + [self.max_seq_len]

    def attend_for(self, bound: int) -> int:
        """The smallest attend bucket covering every position below ``bound``."""
        return next(b for b in self.attend_buckets() if b >= min(bound, self.max_seq_len))

    def batch_size(self, n: int) -> int:
        """Rows a batch of n requests runs with: a power of two, a multiple of dp."""
        dp = self.tp.dp_size
        return dp * bucket(-(-n // dp), 1)

    def prompt_bucket(self, n: int) -> int:
        """The length a prompt of n tokens is padded to: its power-of-two bucket, or the
        cache length where that is shorter (a bucket past the cache could not be written)."""
        return min(bucket(n), self.max_seq_len)

    def prompt_buckets(self) -> list[int]:
        """Every prompt-length bucket up to the cache length."""
        out, b = [], MIN_BUCKET
        while b < self.max_seq_len:
            out.append(b)
            b *= 2
        return out + [self.max_seq_len]

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_buckets: Sequence[int] | None = None,
               max_len: int | None = None) -> float:
        """Compile prefill for every (batch, prompt bucket) and decode for every batch
        and attend bucket up to ``max_len`` (default: all), so that requests inside them
        never compile. Returns the seconds spent."""
        before = self.compile_s
        for n in batch_sizes:
            b = self.batch_size(n)
            for length in prompt_buckets or self.prompt_buckets():
                self.prefill_program(b, self.prompt_bucket(length))
            for attend in self.attend_buckets():
                if max_len is None or attend <= self.attend_for(max_len):
                    self.decode_program(b, attend)
        return self.compile_s - before

    # -- requests -----------------------------------------------------------------
    def check(self, requests: Sequence[Request]) -> None:
        """Raise before any device work when a request cannot run."""
        if not requests:
            raise ValueError("no prompts given: pass at least one prompt")
        limit = self.max_seq_len
        for r in requests:
            n, new = len(r.prompt_ids), r.max_new_tokens
            if not isinstance(new, (int, np.integer)) or new < 1:
                raise ValueError(f"max_new_tokens must be an integer >= 1, got {new!r}")
            if n < 1:
                raise ValueError("empty prompt: give at least one token")
            check_length(self.cfg, limit, n, new)
            if r.sampling.min_tokens > new:
                raise ValueError(f"min_tokens={r.sampling.min_tokens} exceeds max_new_tokens={new}; lower it or "
                                 "raise max_new_tokens")
            bad = [t for t in r.prompt_ids if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            if r.sampling.prompt_logprobs is not None and self.encoder_decoder:
                raise ValueError("prompt_logprobs: an encoder-decoder model's prompt goes to its encoder, which "
                                 "predicts no tokens; ask for logprobs of the generated tokens instead")
            bad = [t for t, _ in r.sampling.logit_bias if t >= self.cfg.vocab_size]
            if bad:
                raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            bad = [t for t in r.stop_token_ids if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:  # one past int32 would fail the device loop, one past the vocabulary never match
                raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            stops = self._stop_ids(r)
            if len(stops) > MAX_STOP_IDS:
                raise ValueError(f"at most {MAX_STOP_IDS} stop token ids per request (EOS included), got {len(stops)}")
            if r.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer: the model directory has none; use stop_token_ids")
            if r.grammar is not None:
                if self.grammars is None:
                    raise ValueError("structured output needs a tokenizer: the model directory has none")
                self.grammars.check(r.grammar)

    def _stop_ids(self, r: Request) -> list[int]:
        eos = () if r.ignore_eos else self.cfg.eos_token_ids
        return sorted({int(t) for t in (*eos, *r.stop_token_ids)})

    def run(self, requests: Sequence[Request], *, steps_per_dispatch: int = DECODE_CHUNK,
            stats: GenerationResult | None = None) -> Iterator[list[StreamDelta]]:
        """Run a batch of requests to completion, yielding after every dispatch the
        deltas of the requests that produced something. ``stats`` (optional) receives
        the completions and timings."""
        self.check(requests)
        if not 1 <= steps_per_dispatch <= DECODE_CHUNK:
            raise ValueError(f"steps_per_dispatch must be in [1, {DECODE_CHUNK}], got {steps_per_dispatch}")
        n = len(requests)
        batch = self.batch_size(n)
        padded = list(requests) + [dataclasses.replace(requests[0], max_new_tokens=1)] * (batch - n)
        length = self.prompt_bucket(max(len(r.prompt_ids) for r in padded))
        rows = [self.new_row(r) for r in requests]
        constrained = any(row.matcher is not None for row in rows)
        if constrained:  # each step's mask follows the token before it: one step per dispatch
            steps_per_dispatch = 1
        args = self.prefill_inputs(padded, length, self.allowed(rows, batch))
        compile_before = self.compile_s
        prefill = self.prefill_program(batch, length, self.scores_prompt(requests))
        # the first decode step writes at `start`; a dispatch of n more steps reads below start + done + n
        start = 1 if self.encoder_decoder else max(len(r.prompt_ids) for r in requests)
        limit = start + max(r.max_new_tokens for r in requests)
        decode = {a: self.decode_program(batch, a) for a in self.attend_buckets() if a <= self.attend_for(limit)}

        t0 = time.perf_counter()
        first, d, cache, *prompt = prefill(*args)
        first = self.fetch_picked(first, rows)
        if prompt:
            self.record_prompt(rows, prompt[0])
        ttft = time.perf_counter() - t0
        yield self.take(rows, first)

        t1, decoded = time.perf_counter(), 0
        n_steps = jnp.int32(steps_per_dispatch)
        pending, dispatched = None, 0
        while not all(row.finish_reason for row in rows):
            if any(row.stop_device for row in rows):  # rows ended by a stop string: stop them on the device too
                d = self.stop_rows(d, [i for i, row in enumerate(rows) if row.stop_device])
                for row in rows:
                    row.stop_device = False
            dispatched += steps_per_dispatch
            s = self.constrain(args[3], rows, batch) if constrained else args[3]
            out, d, cache = decode[self.attend_for(min(start + dispatched, limit))](self.state, cache, d, s, n_steps)
            if not constrained:
                # run one dispatch ahead: the host reads dispatch k while the device runs k + 1,
                # so the device never waits on the host (a row the host stops meanwhile, by a
                # stop string, runs one more dispatch whose tokens are dropped)
                if pending is None:
                    pending = out
                    continue
                out, pending = pending, out
            host = self.fetch_picked(out, rows, steps_per_dispatch)
            decoded += int((host.tokens[:n] >= 0).sum())
            yield self.take(rows, host)
        if stats is not None:
            stats.completions = [Completion(list(map(int, r.request.prompt_ids)), r.generated,
                                            r.text.text if r.text else None, r.finish_reason, r.logprobs,
                                            r.top_logprobs, r.prompt_logprobs, r.prompt_top_logprobs,
                                            r.prompt_ranks) for r in rows]
            stats.compile_s = self.compile_s - compile_before
            stats.ttft_s, stats.decode_s, stats.decode_tokens = ttft, time.perf_counter() - t1, decoded

    def prefill_inputs(self, requests: Sequence[Request], length: int, allowed: np.ndarray | None = None) -> tuple:
        """The prefill program's arguments for these requests (one per row), placed:
        (state, tokens, lengths, sampling, max_new, stop_ids). A request without a
        seed gets a fresh one here; ``allowed``: the rows' first-token bitmasks
        (structured outputs; see ``allowed``)."""
        tokens = np.zeros((len(requests), length), np.int32)
        stop_ids = np.full((len(requests), MAX_STOP_IDS), -1, np.int32)
        for i, r in enumerate(requests):
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
            ids = self._stop_ids(r)
            stop_ids[i, : len(ids)] = ids
        seeds = [r.sampling.seed if r.sampling.seed is not None else int(self._seeds.integers(2**32)) for r in requests]
        # sampling settings: tiny, and replicated so that "does any row sample?" is a local question
        s = jax.tree.map(lambda a: jax.device_put(a, self._replicated()),
                         SamplingArrays.from_params([r.sampling for r in requests], seeds, self.cfg.vocab_size, allowed))
        return (self.state, self._put(tokens), self._put(np.asarray([len(r.prompt_ids) for r in requests], np.int32)),
                s, self._put(np.asarray([r.max_new_tokens for r in requests], np.int32)), self._put(stop_ids))

    def new_row(self, request: Request) -> _Row:
        """Host-side bookkeeping for a request that starts now."""
        # the text's left context is the prompt, except in an encoder–decoder, whose output starts afresh
        context = () if self.encoder_decoder else request.prompt_ids
        text = TextTracker(self.tokenizer, context, request.stop, request.sampling.min_tokens,
                           request.include_stop_str) if self.tokenizer is not None else None
        row = _Row(request, set(self._stop_ids(request)), text)
        if request.sampling.logprobs is not None:
            row.logprobs, row.top_logprobs = [], []
        if request.grammar is not None:
            row.matcher = self.grammars.matcher(request.grammar)
        return row

    def allowed(self, rows: Sequence[_Row | None], batch: int) -> np.ndarray | None:
        """The bitmask of the tokens each of ``batch`` rows may pick next (rows past
        ``rows``, empty slots and unconstrained requests: all), or None when no row
        is constrained."""
        matchers = [r.matcher if r is not None and not r.finish_reason else None for r in rows]
        if all(m is None for m in matchers):
            return None
        return masks(matchers + [None] * (batch - len(rows)), self.cfg.vocab_size)

    def constrain(self, s: SamplingArrays, rows: Sequence[_Row | None], batch: int) -> SamplingArrays:
        """Sampling settings with the rows' next bitmasks placed (all allowed when none is constrained)."""
        allowed = self.allowed(rows, batch)
        if allowed is None:
            allowed = np.full(s.allowed.shape, -1, np.int32)
        return dataclasses.replace(s, allowed=jax.device_put(allowed, s.allowed.sharding))

    @staticmethod
    def scores_prompt(requests: Sequence[Request]) -> bool:
        """Whether a prefill of these requests must score their prompts."""
        return any(r.sampling.prompt_logprobs is not None for r in requests)

    @staticmethod
    def record_prompt(rows: Sequence[_Row], scores: tuple[Picked, jax.Array]) -> None:
        """Fold a scored prefill's prompt picks and ranks (B, bucket) into the rows that
        asked: prompt token j's log-probability sits at position j - 1."""
        p, ranks = scores
        logprobs, top_ids, top_logprobs, ranks = fetch([p.logprobs, p.top_ids, p.top_logprobs, ranks])  # tokens: the prompt's
        for i, row in enumerate(rows):
            k = row.request.sampling.prompt_logprobs
            if k is None:
                continue
            n = len(row.request.prompt_ids)
            row.prompt_logprobs = [None] + [float(x) for x in logprobs[i, : n - 1]]
            row.prompt_top_logprobs = [None] + [_pairs(top_ids[i, j], top_logprobs[i, j], k) for j in range(n - 1)]
            row.prompt_ranks = [None] + [int(x) for x in ranks[i, : n - 1]]

    @staticmethod
    def fetch_picked(p: Picked, rows: Sequence[_Row | None], steps: int | None = None) -> Picked:
        """Host copies of a dispatch's picks, (B, steps) — a prefill's one step too;
        the log-probabilities only when one of ``rows`` asks for them (else None), and
        of the first ``steps`` steps only (a dispatch that ran fewer than it holds)."""
        if any(r is not None and r.logprobs is not None for r in rows):
            cut = (lambda x: x[:, :steps]) if steps is not None and p.tokens.ndim == 2 else (lambda x: x)
            host = Picked(*fetch([p.tokens, cut(p.logprobs), cut(p.top_ids), cut(p.top_logprobs)]))
        else:
            host = Picked(fetch([p.tokens])[0], None, None, None)
        if host.tokens.ndim == 1:  # a prefill's: one step
            host = jax.tree.map(lambda x: x[:, None], host)
        return host

    @staticmethod
    def stop_rows(d: DecodeState, rows: Sequence[int]) -> DecodeState:
        """Mark rows finished on the device (stop strings, cancelled requests)."""
        done = np.array(fetch([d.done])[0])  # a private copy: it becomes the device buffer
        done[list(rows)] = True
        return dataclasses.replace(d, done=jax.device_put(done, d.done.sharding))

    def take(self, rows: Sequence[_Row | None], picked: Picked) -> list[StreamDelta]:
        """Fold a dispatch's host picks (``fetch_picked``: tokens (B, steps), -1 = none)
        into the rows (None = an empty slot), token by token (a stop string may end a
        row mid-chunk); return the deltas."""
        deltas = []
        for i, row in enumerate(rows):
            if row is None:
                continue
            new, text, opening = [], "", not row.generated
            measured = row.logprobs is not None and picked.logprobs is not None
            lps, tops = ([], []) if measured else (None, None)
            for j, t in enumerate(map(int, picked.tokens[i])):
                if row.finish_reason or t < 0:
                    break
                new.append(t)
                row.generated.append(t)
                if measured:
                    k = row.request.sampling.logprobs
                    lps.append(float(picked.logprobs[i, j]))
                    tops.append(_pairs(picked.top_ids[i, j], picked.top_logprobs[i, j], k))
                stopped = t in row.stop_ids
                complete = row.matcher is not None and row.matcher.advance(t)  # the grammar holds no more
                ended = stopped or complete or len(row.generated) >= row.request.max_new_tokens
                if row.text is not None:  # a stop token's own text only where the request keeps it
                    text += row.text.push([] if stopped and not row.request.include_stop_str else [t], final=ended)
                if row.text is not None and row.text.stopped:
                    row.finish_reason, row.stop_device = "stop", True
                elif ended:
                    row.finish_reason = "stop" if stopped or complete else "length"
                    # the device ends rows at their stop ids and budget itself, not at a grammar's end
                    row.stop_device = complete and not stopped and len(row.generated) < row.request.max_new_tokens
            if new:
                if measured:
                    row.logprobs.extend(lps)
                    row.top_logprobs.extend(tops)
                delta = StreamDelta(i, new, text if row.text is not None else None, row.finish_reason, lps, tops)
                if opening:
                    delta.prompt_logprobs, delta.prompt_top_logprobs = row.prompt_logprobs, row.prompt_top_logprobs
                    delta.prompt_ranks = row.prompt_ranks
                deltas.append(delta)
        return deltas

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 stop_ids: Sequence[int] | None = None, stop: Sequence[str] = ()) -> GenerationResult:
        """Generate for a batch of token-id prompts, many decode steps per dispatch.
        ``stop_ids=None`` stops at the model's EOS ids; a list replaces them."""
        requests = self.requests(prompts, max_new_tokens, sampling, stop_token_ids=stop_ids or (), stop=stop,
                                 ignore_eos=stop_ids is not None)
        result = GenerationResult(completions=[])
        for _ in self.run(requests, stats=result):
            pass
        return result

    @staticmethod
    def requests(prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (), ignore_eos: bool = False,
                 include_stop_str: bool = False) -> list[Request]:
        """One Request per prompt, sharing the settings (or one SamplingParams each).
        A single stop string or stop id may be given bare."""
        stop = (stop,) if isinstance(stop, str) else stop
        stop_token_ids = (stop_token_ids,) if isinstance(stop_token_ids, (int, np.integer)) else stop_token_ids
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        return [Request(list(map(int, p)), max_new_tokens, sp, tuple(stop_token_ids), tuple(stop), ignore_eos,
                        include_stop_str)
                for p, sp in zip(prompts, sampling)]
