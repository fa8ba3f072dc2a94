"""Token selection on the device: logit bias, repetition penalty, presence and
frequency penalties, temperature, top-k, top-p and min-p, applied in that order
(Hugging Face's for the ones it has; vLLM's for OpenAI's two penalties), one row at a
time.

Every setting is a traced array (one value per batch row), so changing it never
recompiles and each request in a batch keeps its own settings. Each row draws from
its own key, ``fold_in(key(seed), i)`` for its i-th generated token, made on the
device: the same seed gives the same tokens whatever the batch, the slot or the mesh.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ryzen_jax import kernels


#: most alternatives a request may ask log-probabilities of per token (vLLM's default cap, OpenAI's for chat)
MAX_LOGPROBS = 20
#: most tokens a request may bias (OpenAI's limit); the arrays are fixed-size so they never recompile
MAX_LOGIT_BIAS = 300


class SamplingError(ValueError):
    """A sampling setting out of its range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token (the knobs of transformers' ``generate`` / vLLM).

    ``temperature == 0`` is greedy (argmax, after the penalties).
    ``top_k == 0``, ``top_p == 1``, ``min_p == 0``, ``repetition_penalty == 1`` and
    ``presence_penalty == frequency_penalty == 0`` switch those off. The repetition
    penalty (transformers') looks at the prompt and the generated tokens; the presence
    and frequency penalties (OpenAI's) at the generated tokens only. ``seed=None``
    draws a fresh seed per request.

    ``logprobs`` (vLLM's): ``None`` reports none; ``k`` reports each generated token's
    log-probability and the ``k`` most likely tokens' (0 to ``MAX_LOGPROBS``), from
    the model's own distribution (a log-softmax of its logits, before penalties,
    temperature and filters, as vLLM reports by default). ``prompt_logprobs`` (vLLM's)
    does the same for the prompt's tokens: each one's log-probability given those
    before it (none for the first), and the ``k`` best there; decoder-only models only.

    ``logit_bias`` (OpenAI's): ``{token id: bias}`` (or ``(id, bias)`` pairs), each bias
    in [-100, 100] added to that token's logit before anything else (transformers'
    ``sequence_bias`` of one-token sequences); -100 all but bans a token, +100 all but
    forces it. It changes the tokens picked, not the reported log-probabilities.

    ``min_tokens`` (vLLM's; transformers' ``min_new_tokens``): until a request has
    generated that many tokens, its EOS and stop ids cannot be picked and its stop
    strings do not end it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    def __post_init__(self):
        def bad(name: str, rng: str):
            raise SamplingError(f"{name} must be {rng}, got {getattr(self, name)!r}")

        real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731 — numpy's too
        integer = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
        if not (real(self.temperature) and 0 <= self.temperature < float("inf")):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not (integer(self.top_k) and 0 <= self.top_k < 2**31):
            bad("top_k", "an integer in [0, 2**31) (0 = off)")
        if not (real(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "in (0, 1] (1 = off)")
        if not (real(self.min_p) and 0 <= self.min_p <= 1):
            bad("min_p", "in [0, 1] (0 = off)")
        if not (real(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf")):
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (real(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                bad(name, "in [-2, 2] (0 = off), as in the OpenAI API")
        if not (integer(self.min_tokens) and 0 <= self.min_tokens < 2**31):
            bad("min_tokens", "an integer >= 0 (0 = off)")
        if self.seed is not None and not (integer(self.seed) and 0 <= self.seed < 2**32):
            bad("seed", "an integer in [0, 2**32) or None")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not (integer(k) and 0 <= k <= MAX_LOGPROBS):
                bad(name, f"None or an integer in [0, {MAX_LOGPROBS}] (how many alternatives to report)")
        bias = self.logit_bias
        pairs = list(bias.items() if isinstance(bias, Mapping) else bias) if isinstance(bias, (Mapping, list, tuple)) \
            else None
        if pairs is None or any(not (isinstance(p, (list, tuple)) and len(p) == 2) for p in pairs):
            bad("logit_bias", "a {token id: bias} mapping or a sequence of (token id, bias) pairs")
        for t, b in pairs:
            if not (integer(t) and 0 <= t < 2**31):
                raise SamplingError(f"logit_bias: token id {t!r} must be an integer >= 0")
            if not (real(b) and -100 <= b <= 100):
                raise SamplingError(f"logit_bias: the bias of token {t} must be in [-100, 100], got {b!r}")
        if len(pairs) > MAX_LOGIT_BIAS or len({int(t) for t, _ in pairs}) < len(pairs):
            bad("logit_bias", f"at most {MAX_LOGIT_BIAS} distinct token ids")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in pairs)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """SamplingParams for a batch, one entry per row (host arrays until placed)."""

    temperature: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    top_p: jax.Array  # (B,) float32
    min_p: jax.Array  # (B,) float32
    penalty: jax.Array  # (B,) float32: repetition
    presence: jax.Array  # (B,) float32
    frequency: jax.Array  # (B,) float32
    seed: jax.Array  # (B,) uint32
    logprobs: jax.Array  # (B,) int32: alternatives to report, -1 = no log-probabilities
    bias_ids: jax.Array  # (B, MAX_LOGIT_BIAS) int32, -1 = unused
    bias: jax.Array  # (B, MAX_LOGIT_BIAS) float32
    min_tokens: jax.Array  # (B,) int32: no stop id before this many tokens
    allowed: jax.Array  # (B, ceil(V / 32)) int32: a bitmask of the tokens a row may pick (structured outputs)

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int], vocab_size: int,
                    allowed: np.ndarray | None = None) -> "SamplingArrays":
        """``seeds``: the resolved seed of every row (``params[i].seed`` or a drawn one);
        ``allowed``: each row's bitmask of allowed tokens (default: all)."""
        f32 = lambda name: np.asarray([getattr(p, name) for p in params], np.float32)  # noqa: E731
        bias_ids = np.full((len(params), MAX_LOGIT_BIAS), -1, np.int32)
        bias = np.zeros((len(params), MAX_LOGIT_BIAS), np.float32)
        for i, p in enumerate(params):
            bias_ids[i, : len(p.logit_bias)] = [t for t, _ in p.logit_bias]
            bias[i, : len(p.logit_bias)] = [b for _, b in p.logit_bias]
        return cls(temperature=f32("temperature"), top_k=np.asarray([p.top_k for p in params], np.int32),
                   top_p=f32("top_p"), min_p=f32("min_p"), penalty=f32("repetition_penalty"),
                   presence=f32("presence_penalty"), frequency=f32("frequency_penalty"),
                   seed=np.asarray(seeds, np.uint32),
                   logprobs=np.asarray([-1 if p.logprobs is None else p.logprobs for p in params], np.int32),
                   bias_ids=bias_ids, bias=bias, min_tokens=np.asarray([p.min_tokens for p in params], np.int32),
                   allowed=np.full((len(params), (vocab_size + 31) // 32), -1, np.int32) if allowed is None
                   else np.asarray(allowed, np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class History:
    """Which tokens each row's sequence holds, for the penalties."""

    prompt: jax.Array  # (B, V) bool: in the prompt (a decoder's start token for an encoder-decoder)
    counts: jax.Array  # (B, V) int32: times generated so far

    def add(self, tok: jax.Array, live: jax.Array) -> "History":
        """Count each live row's new token."""
        hit = live[:, None] & (jnp.arange(self.counts.shape[1]) == tok[:, None])
        return dataclasses.replace(self, counts=self.counts + hit)


def add_bias(logits: jax.Array, ids: jax.Array, bias: jax.Array) -> jax.Array:
    """Each row's logit bias: ``bias[i, j]`` added to the logit of token ``ids[i, j]``
    (-1: an unused entry) of logits (B, V)."""
    v = logits.shape[-1]
    return jax.vmap(lambda row, i, b: row.at[jnp.where(i >= 0, i, v)].add(b, mode="drop"))(logits, ids, bias)


def hold_stops(logits: jax.Array, stop_ids: jax.Array, held: jax.Array) -> jax.Array:
    """Logits (B, V) with each ``held`` (B,) row's stop ids (B, S; -1 unused) at -inf,
    so that row cannot end yet (``min_tokens``)."""
    v = logits.shape[-1]
    ids = jnp.where(held[:, None] & (stop_ids >= 0), stop_ids, v)
    return jax.vmap(lambda row, i: row.at[i].set(-jnp.inf, mode="drop"))(logits, ids)


def mask_disallowed(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Logits (B, V) with every token whose bit is clear in its row's bitmask
    ``allowed`` (B, ceil(V / 32)) int32 (bit j of word i: token 32 i + j) at -inf."""
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    bits = (allowed[:, ids >> 5] >> (ids & 31)) & 1
    return jnp.where(bits == 1, logits, -jnp.inf)


def any_masked(s: SamplingArrays) -> jax.Array:
    """Whether any row's output is constrained (some token disallowed)."""
    return jnp.any(s.allowed != -1)


def any_biased(s: SamplingArrays) -> jax.Array:
    """Whether any row has a logit bias; local when the settings are replicated."""
    return jnp.any(s.bias != 0)


def any_held(s: SamplingArrays) -> jax.Array:
    """Whether any row has ``min_tokens`` (its stop ids may need holding back)."""
    return jnp.any(s.min_tokens > 0)


def penalize(logits: jax.Array, h: History, s: SamplingArrays) -> jax.Array:
    """The repetition penalty (CTRL; transformers' rule): a token already in the
    sequence, prompt included, has a positive logit divided by the penalty and a
    negative one multiplied by it. Then OpenAI's presence and frequency penalties: a
    token generated c times so far loses ``c * frequency + (c > 0) * presence``."""
    counts = h.counts.astype(jnp.float32)
    p = s.penalty[:, None]
    logits = jnp.where(h.prompt | (counts > 0), jnp.where(logits > 0, logits / p, logits * p), logits)
    return logits - counts * s.frequency[:, None] - (counts > 0) * s.presence[:, None]


def _filter_row(scaled: jax.Array, top_k, top_p, min_p) -> jax.Array:
    """Logits (already divided by the temperature) with everything outside the top-k,
    the top-p nucleus and the min-p floor set to -inf (at least one token survives)."""
    desc = jnp.sort(scaled)[::-1]
    # top-k: drop everything below the k-th largest (the same cut keeps `desc` sorted)
    kth = desc[jnp.clip(top_k - 1, 0, scaled.shape[-1] - 1)]
    cut_k = lambda x: jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)  # noqa: E731
    scaled, desc = cut_k(scaled), cut_k(desc)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p
    probs = jax.nn.softmax(desc)
    cutoff = jnp.min(jnp.where(jnp.cumsum(probs) - probs < top_p, desc, jnp.inf))
    cutoff = jnp.minimum(cutoff, desc[0])  # the top token survives a top_p that float32 rounds to 0
    cutoff = jnp.where(top_p < 1, cutoff, -jnp.inf)  # top_p = 1 is off, as in transformers (a float32
    # cumulative sum reaches 1 before the tail, which would otherwise be cut)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    # min-p: drop tokens whose probability is below min_p × the top token's
    floor = jnp.max(scaled) + jnp.log(jnp.maximum(min_p, 1e-30))
    return jnp.where((min_p > 0) & (scaled < floor), -jnp.inf, scaled)


def filtered_logits(logits: jax.Array, s: SamplingArrays, h: History) -> jax.Array:
    """The logits a sampled row draws from (penalties, temperature and filters applied);
    exposed so tests can compare the distribution with transformers' processors."""
    logits = penalize(logits, h, s)
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    return jax.vmap(_filter_row)(scaled, s.top_k, s.top_p, s.min_p)


def any_sampled(s: SamplingArrays) -> jax.Array:
    """Whether any row samples (temperature > 0); local when the settings are replicated."""
    return jnp.any(s.temperature > 0)


def any_penalized(s: SamplingArrays) -> jax.Array:
    """Whether any row has a penalty; local when the settings are replicated."""
    return jnp.any((s.penalty != 1) | (s.presence != 0) | (s.frequency != 0))


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis of (B, V) logits (the first index of the largest
    value; NaN counts as largest, as in ``jnp.argmax``). On a one-device CPU mesh our
    kernel (``kernels.greedy``) does it in one pass; otherwise plain reductions (the
    maximum, then the first index holding it or a NaN): XLA:CPU runs ``argmax``'s paired
    value-and-index reduction as a scalar loop, 0.14 ms for a 32000-entry row and 0.57 ms
    for 8 rows on the benchmark machine, against about 0.01 and 0.10 ms for these."""
    picked = kernels.greedy(logits)
    if picked is not None:
        return picked
    n = logits.shape[-1]
    iota = jnp.arange(n, dtype=jnp.int32)
    first = lambda hit: jnp.min(jnp.where(hit, iota, n), axis=-1)  # noqa: E731
    top = jnp.max(logits, axis=-1, keepdims=True)  # XLA's max may pass over a NaN: look for one apart
    nan = first(jnp.isnan(logits))
    return jnp.where(nan < n, nan, first(logits == top))


def sample(logits: jax.Array, s: SamplingArrays, h: History, index: jax.Array,
           sampled: jax.Array | None = None, penalized: jax.Array | None = None) -> jax.Array:
    """Next token per row from float32 ``logits`` (B, V). ``h``: the tokens already in
    each sequence (for the penalties); ``index`` (B,): which generated token of its
    request each row is drawing (keys the random draw).

    When no row samples (``sampled``, default ``any_sampled(s)``, is False: all greedy),
    the sort-based filters are skipped altogether; when no row has a penalty
    (``penalized``, default ``any_penalized(s)``), so are the penalties. Callers compute both
    once from replicated settings, so the tests cost no communication."""
    penalized = any_penalized(s) if penalized is None else penalized
    chosen = jax.lax.cond(penalized, lambda: penalize(logits, h, s), lambda: logits)
    greedy = greedy_tokens(chosen)

    def draw() -> jax.Array:
        keys = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(s.seed, index)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, s, h)).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    return jax.lax.cond(any_sampled(s) if sampled is None else sampled, draw, lambda: greedy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Picked:
    """The tokens a step picked per row (-1: none, the row had finished) and, when
    some row asked for them, their log-probabilities and the ``MAX_LOGPROBS`` most
    likely tokens' (zeros otherwise). Shapes (B,) and (B, MAX_LOGPROBS) for one step;
    a dispatch stacks its steps on axis 1."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def pick(logits: jax.Array, tokens: jax.Array, wanted: jax.Array, k: int = MAX_LOGPROBS) -> Picked:
    """``tokens`` with their log-probabilities under ``logits`` (B, V) float32, the
    model's own distribution, and the ``k`` best (at most the true vocabulary's size),
    computed only when some row is ``wanted`` (B,) bool: live and asking for them."""
    b = logits.shape[0]

    def measured():
        logp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, k)
        chosen = jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[:, None], axis=-1)[:, 0]
        return chosen, top_ids.astype(jnp.int32), top_lp

    def none():
        return jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

    return Picked(tokens, *jax.lax.cond(jnp.any(wanted), measured, none))
