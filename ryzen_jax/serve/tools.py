"""Tool-call parsers: a model's own tool-call syntax, read back out of its text.

With ``tool_choice: "auto"`` the model decides whether to call a tool, and says so in
the syntax its chat template taught it. A parser (vLLM's ``--tool-call-parser``)
splits an output into its content and its calls:

* ``hermes`` (Qwen2 / Qwen2.5, Hermes, many fine-tunes): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* ``llama3_json`` (Llama 3.1 / 3.2 with JSON tool calling): the whole output is a call
  ``{"name": ..., "parameters": {...}}`` (several separated by ``;``), optionally after
  ``<|python_tag|>``.

A call that does not parse stays in the content, as vLLM leaves it. While streaming,
content flows as it comes, text that may open a call is held back, and each call is
sent whole once it closes (hermes) or at the end (llama3_json).
"""

from __future__ import annotations

import json
import re
from typing import Any

#: a parsed call: the function's name and its arguments as a JSON text
Call = tuple[str, str]


def _call(obj: Any, arguments_key: str) -> Call | None:
    """``{"name": ..., arguments_key: {...} or a JSON text}`` as a Call, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


class Hermes:
    """``<tool_call>{...}</tool_call>`` blocks."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        calls, kept = [], []
        last = 0
        for m in self.BLOCK.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue  # left in the content
            calls.append(call)
            kept.append(text[last:m.start()])
            last = m.end()
        kept.append(text[last:])
        content = "".join(kept) if calls else text
        return (content.strip() or None) if calls else content, calls

    def streamer(self) -> "HermesStream":
        return HermesStream(self)


class HermesStream:
    """Incremental hermes: content until an opening tag, each call once it closes."""

    def __init__(self, parser: Hermes):
        self.parser, self.held, self.inside = parser, "", False

    def push(self, text: str) -> tuple[str, list[Call]]:
        """New text in; the content now certain and the calls now closed out."""
        self.held += text
        content, calls = "", []
        while True:
            if self.inside:
                end = self.held.find(Hermes.CLOSE)
                if end < 0:
                    return content, calls
                block = Hermes.OPEN + self.held[:end + len(Hermes.CLOSE)]
                _, found = self.parser.parse(block)
                if found:
                    calls += found
                else:  # not a call after all: its text is content
                    content += block
                self.held, self.inside = self.held[end + len(Hermes.CLOSE):], False
                continue
            start = self.held.find(Hermes.OPEN)
            if start >= 0:
                content += self.held[:start]
                self.held, self.inside = self.held[start + len(Hermes.OPEN):], True
                continue
            keep = _partial_suffix(self.held, Hermes.OPEN)  # what may still become an opening tag
            content += self.held[:len(self.held) - keep]
            self.held = self.held[len(self.held) - keep:]
            return content, calls

    def finish(self) -> tuple[str, list[Call]]:
        """The end of the output: what is held back is content (an unclosed call's text too)."""
        rest = (Hermes.OPEN if self.inside else "") + self.held
        self.held, self.inside = "", False
        return rest, []


class Llama3Json:
    """A whole output of ``{"name", "parameters"}`` objects separated by ``;``."""

    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder, i = json.JSONDecoder(), 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return None, calls

    def streamer(self) -> "Llama3Stream":
        return Llama3Stream(self)


class Llama3Stream:
    """Incremental llama3_json: text that starts like a call is held to the end."""

    def __init__(self, parser: Llama3Json):
        self.parser, self.text, self.flowing = parser, "", None  # flowing: None until the output shows which

    def push(self, text: str) -> tuple[str, list[Call]]:
        self.text += text
        if self.flowing is None:
            head = self.text.lstrip()
            if not head or Llama3Json.TAG.startswith(head):
                return "", []
            self.flowing = not (head.startswith("{") or head.startswith(Llama3Json.TAG))
            if self.flowing:
                return self.text, []
        return (text, []) if self.flowing else ("", [])

    def finish(self) -> tuple[str, list[Call]]:
        if self.flowing:
            return "", []
        content, calls = self.parser.parse(self.text)
        return content or "", calls


class CallListStream:
    """Incremental reading of ``tool_choice: "required"``'s output, a JSON list of
    ``{"name", "parameters"}`` objects held to the call schema: each call once its
    object closes. No content flows; at the end, an object left open (the list cut
    short by ``max_tokens``) comes back as content, so no text is lost."""

    def __init__(self):
        self.text, self.pos, self.depth, self.start = "", 0, 0, None
        self.in_string = self.escaped = False

    def push(self, text: str) -> tuple[str, list[Call]]:
        self.text += text
        calls = []
        for i in range(self.pos, len(self.text)):
            ch = self.text[i]
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.start = i
            elif ch in "]}":
                if self.depth == 2 and self.start is not None:
                    try:
                        call = _call(json.loads(self.text[self.start:i + 1]), "parameters")
                    except json.JSONDecodeError:
                        call = None
                    if call is not None:
                        calls.append(call)
                    self.start = None
                self.depth -= 1
        self.pos = len(self.text)
        return "", calls

    def finish(self) -> tuple[str, list[Call]]:
        return ("" if self.start is None else self.text[self.start:]), []


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json}


def tool_parser(name: str):
    """The parser registered under ``name`` (vLLM's ``--tool-call-parser`` spelling)."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; this server has: {', '.join(PARSERS)}")
    return PARSERS[name]()
