"""Structured outputs: generation held to a JSON schema, a regular expression, a list
of choices or a context-free grammar (vLLM's ``structured_outputs`` / guided decoding).

The grammar engine is llguidance (one of vLLM's backends). On the host, each
constrained request keeps a matcher that follows the tokens it has generated and,
before every step, writes the set of tokens allowed next as a bitmask (one bit per
vocabulary entry, 32 to an int32 word); the step's program sets every other token's
logit to -inf before the penalties and sampling (``sampling.mask_disallowed``). The
mask changes with each token, so a batch holding a constrained request runs one decode
step per dispatch. A request whose grammar is complete ends with finish reason "stop"
(the model is not asked for an EOS that a grammar may not allow).

Log-probabilities stay the model's own (before the mask), as vLLM reports them by
default, like a logit bias's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: the kinds a StructuredOutput may hold (vLLM's StructuredOutputsParams fields)
KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
    """A structured-output request that cannot run: its message names the field."""


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match: exactly one of

    * ``json``: a JSON schema (a dict, or its JSON text);
    * ``json_object``: True for any JSON object (OpenAI's ``response_format`` json_object);
    * ``regex``: a regular expression the whole output matches (Rust ``regex`` syntax);
    * ``choice``: one of these strings exactly;
    * ``grammar``: a context-free grammar in Lark syntax (or GBNF, as llama.cpp writes it).

    ``whitespace_flexible`` (JSON only): whether the JSON may hold any whitespace
    between tokens (True, vLLM's default) or the compact form only; a schema's own
    ``"x-guidance": {"whitespace_flexible": ...}`` wins.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = True

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                f"structured output: give exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise StructuredOutputError("choice: a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise StructuredOutputError("json: a JSON schema, as a dict or its JSON text")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def compile(self) -> str:
        """The llguidance grammar (a JSON text): what ``Request.grammar`` carries,
        identical on every process."""
        import llguidance

        options = {"whitespace_flexible": self.whitespace_flexible}
        if self.kind in ("json", "json_object"):
            schema = {"type": "object"} if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise StructuredOutputError(f"json: the schema is not valid JSON ({e})") from None
            if not isinstance(schema, dict):
                raise StructuredOutputError("json: the schema must be a JSON object")
            try:
                # defaults: a schema's own "x-guidance" options win
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except ValueError as e:
                raise StructuredOutputError(f"json: {e}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        try:
            return llguidance.grammar_from("grammar", self.grammar)
        except ValueError as e:
            raise StructuredOutputError(f"grammar: {e}") from None


def words(vocab_size: int) -> int:
    """int32 words of a vocabulary's bitmask."""
    return (vocab_size + 31) // 32


#: a bitmask word that allows every token (all 32 bits set)
ALL = -1
#: grammars remembered as valid (a server checks each request's when it arrives and again when it runs)
CHECKED = 64


class Grammars:
    """The host side of structured outputs for one model: its vocabulary as llguidance
    sees it (built on first use, about a second for a large vocabulary), grammar checks
    and the matchers of running requests."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]):
        self.hf_tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self._tokenizer = None
        self._valid: dict[str, None] = {}  # the last CHECKED grammars that passed, oldest first
        self._lock = threading.Lock()  # a server checks in its HTTP thread and its scheduler thread

    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            try:
                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_ids or None)
            except Exception as e:  # a slow (Python) tokenizer, or one llguidance cannot read
                raise StructuredOutputError(f"structured output needs a fast Hugging Face tokenizer that llguidance "
                                            f"reads; this model's cannot be used ({e})") from None
        return self._tokenizer

    def check(self, grammar: str) -> None:
        """Raise StructuredOutputError naming the problem (a bad regex, schema or
        grammar) before any device work."""
        import llguidance

        with self._lock:
            if grammar in self._valid:
                return
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer())
        if error:
            raise StructuredOutputError(f"structured output: not a valid grammar: {error.strip()}")
        with self._lock:
            self._valid[grammar] = None
            while len(self._valid) > CHECKED:
                self._valid.pop(next(iter(self._valid)))

    def matcher(self, grammar: str) -> "Matcher":
        return Matcher(self, grammar)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, grammars: Grammars, grammar: str):
        import llguidance

        self._m = llguidance.LLMatcher(grammars.tokenizer(), grammar, log_level=0)
        if self._m.is_error():
            raise StructuredOutputError(f"structured output: {self._m.get_error()}")

    def advance(self, token: int) -> bool:
        """Take a generated token; True once the output is complete (nothing but an EOS
        could follow) or the matcher failed (logged: the request ends there)."""
        if not self._m.consume_token(int(token)):
            log.warning("structured output: token %d was refused (%s); the request ends here", token,
                        self._m.get_error())
            return True
        return self._m.is_stopped()

    def fill(self, row: np.ndarray) -> None:
        """Write the bitmask of the tokens allowed next into ``row`` (int32, C-contiguous)."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


def masks(matchers: Sequence[Matcher | None], vocab_size: int) -> np.ndarray:
    """The (rows, words) bitmask of every row: its matcher's, or all allowed."""
    out = np.full((len(matchers), words(vocab_size)), ALL, np.int32)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill(out[i])
    return out
