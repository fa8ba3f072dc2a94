"""Token ids → text, incrementally: streaming deltas and stop strings.

Decoding a growing id list token by token is subtle: one character may span several
byte-level tokens (a partial character decodes to U+FFFD), and some tokenizers
change how a token renders depending on its left neighbour. ``Detokenizer`` keeps a
short window of already-emitted ids as left context and emits a delta only once it
ends in a whole character, so the deltas never split a character and concatenate to
the final text. ``TextTracker`` adds stop strings on top: text that could be the
start of a stop string is held back until it is known not to be one, and the final
text is cut just before the first stop string, even when it spans several tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Turns a stream of token ids into text deltas."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids)[-4:]  # left context only: never emitted
        while self.ids and self._decode(self.ids).endswith(REPLACEMENT):
            self.ids.pop()  # a context ending mid-character would swallow the bytes that complete it
        self.prefix = 0  # ids[prefix:read] have been emitted (or are context)
        self.read = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the new text that is now final (may be empty)."""
        self.ids.extend(int(t) for t in token_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still incomplete: wait for more bytes
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def pending(self) -> str:
        """Text held back so far, without its incomplete trailing character."""
        before = self._decode(self.ids[self.prefix:self.read])
        return self._decode(self.ids[self.prefix:])[len(before):].rstrip(REPLACEMENT)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (an incomplete
        character renders as U+FFFD, as a plain ``decode`` would)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class TextTracker:
    """One request's text: deltas safe to show, and stop-string detection."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = (), min_tokens: int = 0,
                 include_stop: bool = False):
        """``min_tokens``: stop strings count only in text that arrives once more tokens
        than that have come (vLLM's rule). ``include_stop``: the text ends with the stop
        string instead of just before it."""
        self.detok = Detokenizer(tokenizer, prompt_ids)
        self.include_stop = include_stop
        self.min_tokens, self.count = min_tokens, 0
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self.shown = 0  # characters of `text` already handed out as deltas
        self.stopped = False

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the delta now safe to show. Sets ``stopped`` when a stop
        string appears (the text is then cut before it and no more deltas come)."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += self.detok.push(token_ids)
        self.count += len(token_ids)
        if final:
            self.text += self.detok.flush()
        if self.stop and self.count > self.min_tokens:  # look into the held-back text too: a stop string may end mid-token
            seen = self.text + ("" if final else self.detok.pending())
            hits = [(i, -len(s)) for i, s in ((seen.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:  # the earliest stop string (the longest of those starting there)
                i, minus_len = min(hits)
                self.text = seen[:i - minus_len if self.include_stop else i]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self.shown, len(self.text) - self.hold)
        delta, self.shown = self.text[self.shown:end], end
        return delta
