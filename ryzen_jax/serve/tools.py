"""Tool-call parsers: a model's own tool-call syntax, read back out of its text.

With ``tool_choice: "auto"`` the model decides whether to call a tool, and says so in
the syntax its chat template taught it. A parser (vLLM's ``--tool-call-parser``)
splits an output into its content and its calls:

* ``hermes`` (Qwen2 / Qwen2.5, Hermes, many fine-tunes): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* ``llama3_json`` (Llama 3.1 / 3.2 with JSON tool calling): the whole output is a call
  ``{"name": ..., "parameters": {...}}`` (several separated by ``;``), optionally after
  ``<|python_tag|>``;
* ``mistral`` (Mistral 7B v0.3, Mistral Nemo / Small / Large): content, then
  ``[TOOL_CALLS]`` and a JSON list ``[{"name": ..., "arguments": {...}}]`` (v3
  tokenizers) or ``name[ARGS]{...}`` per call (v11 and later). ``[TOOL_CALLS]`` is a
  special token, which the server's detokenizer drops, so an output that is only such
  a list reads as calls too;
* ``pythonic`` (Llama 3.2 / Llama 4, ToolACE): the whole output is a Python list of
  calls with keyword arguments, ``[get_weather(city="Paris"), get_time()]``, read with
  :mod:`ast` (parsed, never run), each argument a literal.

A call that does not parse stays in the content, as vLLM leaves it. While streaming,
content flows as it comes, text that may open a call is held back, and each call is
sent whole once it closes (hermes) or at the end (the others).
"""

from __future__ import annotations

import ast
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

    def streamer(self) -> "TailStream":
        return TailStream(self, starts=("{", self.TAG))


class Mistral:
    """Content, then ``[TOOL_CALLS]`` and the calls: a JSON list of ``{"name",
    "arguments"}`` objects, or ``name[ARGS]{...}`` per call, each after its own tag."""

    TAG = "[TOOL_CALLS]"
    NAMED = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*(?:\[ARGS\])?\s*(\{.*\})\s*", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        at = text.find(self.TAG)
        if at < 0:  # the tag dropped with the special tokens: only a whole-output JSON list counts
            calls = self._list(text)
            return (None, calls) if calls else (text, [])
        body = text[at + len(self.TAG):]
        calls = self._list(body) if body.lstrip().startswith("[") else self._named(body)
        if not calls:
            return text, []
        return text[:at].strip() or None, calls

    @staticmethod
    def _list(body: str) -> list[Call]:
        try:
            objs = json.loads(body)
        except json.JSONDecodeError:
            return []
        calls = [_call(o, "arguments") for o in objs] if isinstance(objs, list) else []
        return calls if calls and all(calls) else []

    def _named(self, body: str) -> list[Call]:
        calls = []
        for part in body.split(self.TAG):
            m = self.NAMED.fullmatch(part)
            if m is None:
                return []
            call = _call({"name": m.group(1), "arguments": m.group(2)}, "arguments")
            if call is None:
                return []
            calls.append(call)
        return calls

    def streamer(self) -> "TailStream":
        return TailStream(self, starts=("[",), tag=self.TAG)


class Pythonic:
    """A whole output that is a Python list of calls, ``[f(a=1), g(b="x")]``."""

    START, END = "<|python_start|>", "<|python_end|>"

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        body = text.strip().removeprefix(self.START).removesuffix(self.END).strip()
        if not body.startswith("["):
            return text, []
        try:  # parsed, never evaluated: each argument must be a literal
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for node in tree.elts:
                if (not isinstance(node, ast.Call) or node.args or not isinstance(node.func, (ast.Name, ast.Attribute))
                        or any(k.arg is None for k in node.keywords)):
                    return text, []
                args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                calls.append(_call({"name": ast.unparse(node.func), "arguments": args}, "arguments"))
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return text, []
        return None, calls

    def streamer(self) -> "TailStream":
        return TailStream(self, starts=("[", self.START))


class TailStream:
    """Incremental reading for syntaxes whose calls run to the end of the output:
    an output that begins like a call (one of ``starts``) is held whole; otherwise
    content flows until ``tag`` (where a parser has one), and from there the rest is
    held. At the end the held text is parsed: its calls, or its text as content."""

    def __init__(self, parser, starts: tuple[str, ...], tag: str | None = None):
        self.parser, self.starts, self.tag = parser, starts, tag
        self.text, self.sent, self.flowing, self.held_from = "", 0, False, None

    def push(self, text: str) -> tuple[str, list[Call]]:
        self.text += text
        if self.held_from is not None:
            return "", []
        if not self.flowing:
            head = self.text.lstrip()
            if any(s.startswith(head) for s in self.starts):  # nothing yet, or a start still forming
                return "", []
            if any(head.startswith(s) for s in self.starts):
                self.held_from = 0
                return "", []
            self.flowing = True
        new = self.text[self.sent:]
        at = new.find(self.tag) if self.tag else -1
        if at >= 0:
            self.held_from = self.sent + at
        out = new[:at] if at >= 0 else new[:len(new) - (_partial_suffix(new, self.tag) if self.tag else 0)]
        self.sent += len(out)
        return out, []

    def finish(self) -> tuple[str, list[Call]]:
        if self.held_from is None:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        content, calls = self.parser.parse(self.text[self.held_from:])
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


PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral, "pythonic": Pythonic}


def tool_parser(name: str):
    """The parser registered under ``name`` (vLLM's ``--tool-call-parser`` spelling)."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; this server has: {', '.join(PARSERS)}")
    return PARSERS[name]()
