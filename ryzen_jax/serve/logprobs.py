"""Log-probabilities in the OpenAI API's two shapes.

The engine reports, per generated token, its log-probability and the best
alternatives' as ``(token id, log-probability)`` pairs (``StreamDelta.logprobs`` /
``top_logprobs``). Completions answer them in the legacy shape (``tokens``,
``token_logprobs``, ``top_logprobs`` as one ``{token: logprob}`` map per token, the
chosen token always in it as OpenAI does, ``text_offset``); chat completions as a
``content`` list of ``{token, logprob, bytes, top_logprobs}``. An echoed prompt's
tokens lead the legacy shape. vLLM's ``prompt_logprobs`` has a third: per prompt
token, None at the first, else ``{token id: {logprob, rank, decoded_token}}`` for the
token and the k most likely there (ranks 1 to k). A token's text is the
tokenizer's decoding of that one id (a piece of a multi-byte character decodes to
U+FFFD there, as vLLM reports it); with vLLM's ``return_tokens_as_token_ids`` it is
``"token_id:<id>"`` instead, which any client can map back to the id whatever the bytes.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

from ryzen_jax.engine.request import StreamDelta


class LogprobFormatter:
    """Turns a choice's deltas into either API shape, decoding each token id once."""

    def __init__(self, tokenizer: Any):
        self._text = functools.lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))
        self.as_ids = False

    def ids_as_tokens(self) -> LogprobFormatter:
        """This formatter naming each token ``"token_id:<id>"`` (the decoding cache shared)."""
        other = copy.copy(self)
        other.as_ids = True
        return other

    def _token(self, t: int) -> str:
        return f"token_id:{t}" if self.as_ids else self._text(t)

    def completion(self, deltas: Sequence[StreamDelta], offset: int = 0, echo: Sequence[int] | None = None,
                   echo_top: int | None = None) -> tuple[dict | None, int]:
        """The legacy ``logprobs`` object of these deltas' tokens, their text offsets
        counted from ``offset``; and the offset after them (for the next chunk).
        ``echo``: the prompt's ids, whose tokens come first (scored on the first delta;
        the very first has no log-probability, as in OpenAI's echo), with the
        ``echo_top`` best alternatives each (the prompt may be scored deeper, for
        ``prompt_logprobs``)."""
        if not deltas or deltas[0].logprobs is None:
            return None, offset
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(t: int, lp: float | None, top: list[tuple[int, float]] | None):
            nonlocal offset
            text = self._token(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self._token(a): b for a, b in [(t, lp), *top]})
            out["text_offset"].append(offset)
            offset += len(text)

        if echo is not None:
            for t, lp, top in zip(echo, deltas[0].prompt_logprobs, deltas[0].prompt_top_logprobs):
                add(t, lp, None if top is None else top[:echo_top])
        for d in deltas:
            for t, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs):
                add(t, lp, top)
        return out, offset

    def chat(self, deltas: Sequence[StreamDelta]) -> dict | None:
        """The chat ``logprobs`` object of these deltas' tokens."""
        if not deltas or deltas[0].logprobs is None:
            return None
        entry = lambda t, lp: {"token": (s := self._token(t)), "logprob": lp,  # noqa: E731
                               "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for d in deltas for t, lp, top in zip(d.token_ids, d.logprobs, d.top_logprobs)]}

    def prompt(self, first: StreamDelta, prompt_ids: Sequence[int], k: int) -> list[dict | None] | None:
        """vLLM's ``prompt_logprobs`` from a choice's first delta: per prompt token, the
        token itself (its rank among the whole vocabulary) and the ``k`` most likely."""
        if first.prompt_logprobs is None:
            return None
        out: list[dict | None] = []
        for t, lp, top, rank in zip(prompt_ids, first.prompt_logprobs, first.prompt_top_logprobs, first.prompt_ranks):
            if lp is None:  # the first token: nothing predicts it
                out.append(None)
                continue
            entry = {str(t): {"logprob": lp, "rank": rank, "decoded_token": self._text(t)}}
            for r, (a, b) in enumerate(top[:k], 1):
                entry.setdefault(str(a), {"logprob": b, "rank": r, "decoded_token": self._text(a)})
            out.append(entry)
        return out
