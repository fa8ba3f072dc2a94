"""What a request is and what it produces: the engine's data types.

``Request`` goes in (a prompt and how to continue it); ``StreamDelta`` comes out per
dispatch while it runs and ``Completion`` once it is done (``GenerationResult`` adds a
batch's timings); ``_Row`` is the host's bookkeeping of one running request, which
``Generator.take`` folds each dispatch's tokens into.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ryzen_jax.engine.sampling import SamplingParams
from ryzen_jax.engine.structured import Matcher
from ryzen_jax.engine.text import TextTracker


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to continue it.

    Generation stops at the first of: an EOS id of the model (unless ``ignore_eos``),
    one of ``stop_token_ids`` (both kept in ``generated_ids``; the text leaves out the
    stop token's, as vLLM's does), a ``stop`` string (the text is cut before it), or
    ``max_new_tokens``. ``include_stop_str`` (vLLM's ``include_stop_str_in_output``):
    the text keeps the stop string, or the stop token's text.

    ``grammar`` (structured outputs): an llguidance grammar, as
    ``StructuredOutput.compile()`` makes it from a JSON schema, a regex, choices or a
    Lark grammar; the output is held to it and ends ("stop") once it is complete.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int = 32
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    include_stop_str: bool = False
    grammar: str | None = None


@dataclasses.dataclass
class Completion:
    """What one request produced. ``finish_reason``: "stop" (EOS, stop id or stop
    string) or "length" (max_new_tokens). With ``SamplingParams.logprobs`` set,
    ``logprobs[i]`` is generated token i's log-probability and ``top_logprobs[i]`` the
    ``(token id, log-probability)`` pairs of the most likely tokens there, best first.
    With ``prompt_logprobs`` set, ``prompt_logprobs`` and ``prompt_top_logprobs`` are
    the same per prompt token (None at the first: nothing predicts it), and
    ``prompt_ranks`` each prompt token's rank in the model's distribution there (1: the
    most likely; vLLM's ``Logprob.rank``: the tokens at least as likely, itself included)."""

    prompt_ids: list[int]
    generated_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_ranks: list[int | None] | None = None


@dataclasses.dataclass
class StreamDelta:
    """New output of request ``index`` since the previous delta; ``text`` never splits
    a character, and the deltas of a request concatenate to its final text."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None = None  # set on the request's last delta
    logprobs: list[float] | None = None  # as in Completion, for these tokens
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # as in Completion, on a request's first delta only
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_ranks: list[int | None] | None = None


@dataclasses.dataclass
class GenerationResult:
    completions: list[Completion]
    compile_s: float = 0.0  # compiled during this call (0 after warm-up)
    ttft_s: float = 0.0  # prefill + first token, compile excluded
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps, over all requests

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [c.prompt_ids for c in self.completions]

    @property
    def generated_ids(self) -> list[list[int]]:
        return [c.generated_ids for c in self.completions]

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _pairs(ids: np.ndarray, logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The first ``k`` (token id, log-probability) pairs of a position's best, as Python numbers."""
    return [(int(a), float(b)) for a, b in zip(ids[:k], logprobs[:k])]


@dataclasses.dataclass
class _Row:
    """Host-side bookkeeping of one request while it runs."""

    request: Request
    stop_ids: set[int]
    text: TextTracker | None
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None  # when the request asks for them
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # when the request asks for them, after prefill
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    prompt_ranks: list[int | None] | None = None
    finish_reason: str | None = None
    stop_device: bool = False  # ended by a stop string or a complete grammar: the device still thinks it is live
    matcher: Matcher | None = None  # structured outputs: where the request is in its grammar
