"""The OpenAI request bodies we accept, their validation, and OpenAI-style errors.

Field names and defaults follow the OpenAI API (``max_tokens`` 16, ``temperature``
1); a few widely used vLLM extensions are accepted too (``top_k``, ``min_p``,
``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``min_tokens``,
``include_stop_str_in_output``, ``truncate_prompt_tokens``, ``prompt_logprobs``,
``return_tokens_as_token_ids``, ``stream_options.continuous_usage_stats``).
Structured outputs come as OpenAI's ``response_format`` (``json_object``,
``json_schema``) or vLLM's ``structured_outputs`` and ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar``, one per request; chat
``tools`` are called when ``tool_choice`` names one or is "required". Unknown fields
are ignored, as vLLM does, but an OpenAI (or vLLM) field whose effect this server
lacks (``suffix``, ``functions``, ``tool_choice`` "auto", ``guided_whitespace_pattern``,
...) is refused when set, rather than silently not honoured. Anything out of range is a 400 whose
error names the field.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ryzen_jax.engine.sampling import MAX_LOGPROBS
from ryzen_jax.engine.structured import StructuredOutput, StructuredOutputError

MAX_CHOICES = 16  # n × prompts per request: each choice takes a decode slot or a queue place


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, counted: bool = False):
        """``counted``: the request's outcome is already in the metrics (not a rejection)."""
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.counted = counted

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _refuse(*names: str, unless: Any = lambda value: value in (None, False) or value == {} or value == []):
    """A validator that refuses a set value of a field this server lacks the effect of
    (``unless``: the values that ask for nothing, by default unset, false or empty)."""
    def check(cls, value, info):
        if not unless(value):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    return field_validator(*names)(classmethod(check))


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema and its name."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any
    JSON object) or ``json_schema`` (JSON that matches ``json_schema.schema``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: one of ``json``, ``regex``, ``choice``,
    ``grammar`` or ``json_object``."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


#: the request fields that ask for structured outputs, at most one per request
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")


class _Body(BaseModel):
    """A request body: unknown fields ignored; a field sent as ``null`` takes its
    default, as OpenAI's API reads it."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            return {k: v for k, v in raw.items() if v is not None or k not in cls.model_fields}
        return raw

    model: str | None = None
    user: str | None = None


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, lt=2**31)  # vLLM: -1 (or 0) = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=32)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(default=0, ge=0, lt=2**31)
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)  # vLLM's: keep the prompt's last k tokens
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>"
    # vLLM's: every prompt token's log-probability, rank and the k most likely there
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None  # {"token id": bias}; SamplingParams bounds them
    # structured outputs (OpenAI's, then vLLM's): one of them at most
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: Any = None  # vLLM's: a backend option whose effect we lack

    _not_honoured = _refuse("guided_whitespace_pattern")

    @model_validator(mode="after")
    def _one_structure(self):
        asked = [f for f in STRUCTURED_FIELDS if getattr(self, f) is not None
                 and not (f == "response_format" and self.response_format.type == "text")]
        if len(asked) > 1:
            raise ValueError(f"{asked[1]}: one structured output per request; this one also sets {asked[0]}")
        self.structured_output()  # each kind's own checks (a choice list's, one kind in structured_outputs)
        return self

    @functools.cached_property
    def compiled_structure(self) -> tuple[str, str] | None:
        """(the field that asks for a structured output, its llguidance grammar), or None:
        compiled once per request, however many choices run it; a schema that does not
        compile is a 400 naming the field."""
        asked = self.structured_output()
        if asked is None:
            return None
        try:
            return asked[0], asked[1].compile()
        except StructuredOutputError as e:
            raise APIError(400, f"{asked[0]}: {e}", param=asked[0]) from None

    def structured_output(self) -> tuple[str, StructuredOutput] | None:
        """The field that asks for a structured output and what it asks, or None."""
        try:
            if self.response_format is not None and self.response_format.type != "text":
                f = self.response_format
                spec = StructuredOutput(json_object=True) if f.type == "json_object" else \
                    StructuredOutput(json=f.json_schema.schema_)
                return "response_format", spec
            if self.structured_outputs is not None:
                o = self.structured_outputs
                return "structured_outputs", StructuredOutput(json=o.json_, json_object=bool(o.json_object),
                                                              regex=o.regex, choice=o.choice, grammar=o.grammar)
            for kind in ("json", "regex", "choice", "grammar"):
                value = getattr(self, f"guided_{kind}")
                if value is not None:
                    return f"guided_{kind}", StructuredOutput(**{kind: value})
        except StructuredOutputError as e:
            field = "response_format" if self.response_format is not None else next(
                f for f in STRUCTURED_FIELDS if getattr(self, f) is not None)
            raise StructuredOutputError(f"{field}: {e}") from None
        return None

    @model_validator(mode="after")
    def _prompt_scores_whole(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available when stream is true (as in vLLM): ask without "
                             "streaming")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, bias):
        """OpenAI's shape: token ids as decimal strings (the biases' range and count are
        SamplingParams' to check)."""
        bad = [key for key in bias or {} if not key.isdigit()]
        if bad:
            raise ValueError(f"keys are token ids (decimal strings), got {bad[0]!r}")
        return bias

    def token_biases(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    """``prompt``: a string, a list of token ids, or a list of either (one choice per
    prompt, times ``n``). ``echo``: each choice's text (and, with ``logprobs``, its
    log-probabilities) starts with its prompt's; ``max_tokens=0`` then only scores the
    prompt (what evaluation harnesses ask for a log-likelihood)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)  # 0: the chosen tokens' only
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    _no_suffix = _refuse("suffix")
    _one_best = _refuse("best_of", unless=lambda v: v in (None, 1))

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a bare string or id list is one prompt)."""
        p = self.prompt
        if isinstance(p, str) or not p or isinstance(p[0], int):
            return [p]
        return list(p)

    @model_validator(mode="after")
    def _bounded(self):
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise ValueError("max_tokens=0 generates nothing: it needs echo set to true or prompt_logprobs "
                             "(to score the prompt)")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts × n must be at most {MAX_CHOICES}, got {len(self.prompts())} × {self.n}")
        return self


class ChatMessage(BaseModel):
    """A chat turn; an assistant's ``tool_calls`` and a tool result's ``tool_call_id``
    and ``name`` go to the chat template as sent."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    @field_validator("content")
    @classmethod
    def _text(cls, content) -> str:
        """Content parts (``[{"type": "text", "text": ...}]``) are joined; an assistant's
        ``null`` content (a tool call) is empty text."""
        if content is None or isinstance(content, str):
            return content or ""
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins them


#: apply_chat_template arguments the server sets itself, which chat_template_kwargs may not
RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                            "return_dict", "return_tensors", "chat_template", "tools", "documents", "tokenizer_kwargs"}


class _ChatTemplate(_Body):
    """How chat messages are rendered (vLLM's fields): ``add_generation_prompt`` opens
    the assistant's turn; ``continue_final_message`` instead continues the last
    (assistant) message as written; ``chat_template_kwargs`` go to the template (e.g.
    ``{"enable_thinking": false}``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_kwargs(cls, kwargs):
        taken = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs or {}))
        if taken:
            raise ValueError(f"{taken[0]!r} is set by the server, not by chat_template_kwargs")
        return kwargs

    @model_validator(mode="after")
    def _one_ending(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: set add_generation_prompt to false")
        return self

    def template_options(self) -> dict[str, Any]:
        return {**(self.chat_template_kwargs or {}), "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}


class ToolFunction(BaseModel):
    """OpenAI's function definition; ``parameters`` is a JSON schema of its arguments."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: ToolFunction


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: call this function."""

    type: Literal["function"]
    function: NamedFunction


MAX_TOOLS = 128  # OpenAI's limit


class ChatCompletionRequest(_Sampling, _ChatTemplate):
    """A chat request. With ``tools``, ``tool_choice`` picks how they are called, as
    vLLM does without a tool-call parser: a named function's arguments are generated
    held to its ``parameters`` schema; ``"required"`` generates one or more calls
    (a JSON list of ``{"name", "parameters"}``, each held to its function's schema;
    one only when ``parallel_tool_calls`` is false); ``"none"`` answers in text. Under
    ``"auto"`` (OpenAI's default when tools are given) the model decides for itself,
    in its own call syntax: a server started with a tool-call parser reads the calls
    back out of its text (``tools.py``); one without refuses it."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: Any = None  # OpenAI's deprecated spelling of tools

    _no_functions = _refuse("functions")

    @model_validator(mode="after")
    def _tools_callable(self):
        choice, names = self.tool_mode(), [t.function.name for t in self.tools or []]
        if choice != "none" and not self.tools:
            raise ValueError("tool_choice: no tools are given to choose from")
        if choice == "named" and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: there is no tool named {self.tool_choice.function.name!r} (tools: "
                             f"{', '.join(names)})")
        if len(set(names)) < len(names):
            raise ValueError("tools: two tools have the same name")
        also = [f for f in STRUCTURED_FIELDS if getattr(self, f) is not None
                and not (f == "response_format" and self.response_format.type == "text")]
        if self.calls_tools() and also:
            raise ValueError(f"tool_choice: a tool call is held to its function's schema; this request also sets "
                             f"{also[0]}")
        return self

    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named"; unset: "auto" with tools, else "none" (OpenAI's)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    def calls_tools(self) -> bool:
        """Whether the output must be a tool call (held to the call schema)."""
        return self.tool_mode() in ("required", "named")

    def structured_output(self) -> tuple[str, StructuredOutput] | None:
        schema = self.tool_schema()
        return ("tool_choice", StructuredOutput(json=schema)) if schema is not None else super().structured_output()

    def tool_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output is held to when a tool must be called: the named
        function's parameters, or a list of calls of any of the tools (vLLM's)."""
        tools = {t.function.name: t.function.parameters for t in self.tools or []}
        if isinstance(self.tool_choice, NamedToolChoice):
            return tools.get(self.tool_choice.function.name)  # an unknown name: refused by _tools_callable
        if self.tool_choice != "required":
            return None
        call = {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
             "required": ["name", "parameters"], "additionalProperties": False} for name, params in tools.items()]}
        # llguidance reads its options ("x-guidance", e.g. whitespace_flexible) at the top: the
        # tools' own, where they all agree, apply to the whole list
        options = {json.dumps(p.get("x-guidance"), sort_keys=True) for p in tools.values()}
        lifted = {"x-guidance": json.loads(options.pop())} if len(options) == 1 and "null" not in options else {}
        return {"type": "array", "minItems": 1, **({} if self.parallel_tool_calls else {"maxItems": 1}),
                "items": call, **lifted}

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_ChatTemplate):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered by the
    model's chat template, to the token ids a completion or chat request would run."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt or messages: give exactly one of them")
        return self


class DetokenizeRequest(_Body):
    """vLLM's ``POST /detokenize``: token ids to text."""

    tokens: list[int]


MAX_INPUTS = 2048  # inputs per embeddings request, OpenAI's limit


class EmbeddingRequest(_Body):
    """``input``: a text, a list of token ids, or a list of either (one embedding each)."""

    input: str | list[int] | list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)

    @model_validator(mode="after")
    def _bounded(self):
        if not 1 <= len(self.inputs()) <= MAX_INPUTS:
            raise ValueError(f"input takes 1 to {MAX_INPUTS} texts or token-id lists, got {len(self.inputs())}")
        empty = [i for i, x in enumerate(self.inputs()) if not len(x)]
        if empty:
            raise ValueError(f"input {empty[0]} is empty: give at least one character or token")
        return self


def parse(model: type[BaseModel], raw: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) == 1) or None
        msg = err["msg"].removeprefix("Value error, ")
        if field is None:  # a check across fields: its message starts with the field it blames
            first = re.match(r"\w*", msg).group()
            raise APIError(400, msg, param=first if first in model.model_fields else None) from None
        raise APIError(400, f"invalid '{field}': {msg}", param=field) from None
