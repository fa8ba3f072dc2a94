"""The OpenAI-compatible HTTP API over a Scheduler (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), vLLM's
``POST /tokenize`` and ``POST /detokenize``, ``GET /v1/models``, ``GET /version``,
``GET /health`` (200 only when every device answers the probe), ``GET /metrics``
(Prometheus text). Handlers validate, tokenize and queue; they never touch devices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Callable

import jinja2

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import ryzen_jax
from ryzen_jax.engine.request import Request, StreamDelta
from ryzen_jax.engine.sampling import SamplingParams
from ryzen_jax.engine.structured import StructuredOutputError
from ryzen_jax.serve.logprobs import LogprobFormatter
from ryzen_jax.serve.metrics import ServerMetrics
from ryzen_jax.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      TokenizeRequest, parse)
from ryzen_jax.serve.scheduler import EngineFailed, Handle, QueueFull, Scheduler
from ryzen_jax.serve.tools import PARSERS, CallListStream, tool_parser

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def read_json(request: HTTPRequest, max_body_bytes: int) -> Any:
    """The decoded JSON body, read no further than ``max_body_bytes`` (a chunked
    upload has no Content-Length for the guard to check)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None


def create_app(scheduler: Scheduler, tokenizer: Any, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, health_timeout_s: float = 5.0,
               use_generation_config: bool = True, tool_call_parser: str | None = None) -> FastAPI:
    """The app for one served model. ``tokenizer`` is the model's HF tokenizer;
    ``use_generation_config``: requests default to the sampling settings of the model's
    generation_config.json (as vLLM's ``--generation-config auto``), else to the API's."""
    app = FastAPI(title="ryzen_jax", docs_url=None, redoc_url=None)
    gen = scheduler.batcher.gen
    metrics = scheduler.metrics
    defaults = dict(gen.cfg.generation_defaults) if use_generation_config else {}
    logprob_formatter = LogprobFormatter(tokenizer)
    parser = tool_parser(tool_call_parser) if tool_call_parser is not None else None

    common_routes(app, model_name, gen.max_seq_len, metrics, api_key=api_key, max_body_bytes=max_body_bytes)

    def check_model(req) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def engine_request(req, prompt_ids: list[int], max_tokens: int | None, choice: int = 0) -> Request:
        """The engine's request for one choice; ``choice`` j > 0 of a seeded request
        samples with ``seed + j``, so n choices differ and each is reproducible. A
        sampling field the request leaves out takes the model's default (its
        generation_config.json) where it has one, else the API's; ``max_tokens=None``
        the model's ``max_new_tokens`` (within the context), else 16 for a completion and
        the rest of the context for a chat. A completion's ``echo`` with ``logprobs``
        scores the prompt too, as ``prompt_logprobs`` does (the deeper of the two asks
        sets how many alternatives); ``max_tokens=0`` runs one token, which the answer drops."""
        given = lambda name: getattr(req, name) if name in req.model_fields_set else defaults.get(  # noqa: E731
            name, getattr(req, name))
        check_model(req)
        if req.truncate_prompt_tokens is not None:  # vLLM's: the last k tokens (left truncation)
            prompt_ids = prompt_ids[-req.truncate_prompt_tokens:]
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = gen.max_seq_len
        if len(prompt_ids) >= limit:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context is {limit}",
                           param="prompt")
        if max_tokens is None:
            rest = max(1, limit - len(prompt_ids))
            fallback = rest if isinstance(req, ChatCompletionRequest) else DEFAULT_MAX_TOKENS
            max_tokens = min(int(defaults["max_new_tokens"]), rest) if "max_new_tokens" in defaults else fallback
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} + {len(prompt_ids)} prompt tokens exceeds this server's "
                                f"context of {limit}", param="max_tokens")
        max_tokens = max_tokens or 1  # 0: scoring only (protocol refuses it otherwise); the token is dropped
        seed = None if req.seed is None else (req.seed + choice) % 2**32
        asks = [k for k in (req.logprobs if getattr(req, "echo", False) else None, req.prompt_logprobs)
                if k is not None]
        scored = max(asks) if asks else None
        structured = req.compiled_structure  # (the field, its grammar) or None
        try:
            sampling = SamplingParams(temperature=given("temperature"), top_k=max(0, int(given("top_k"))),
                                      top_p=given("top_p"), min_p=given("min_p"),
                                      repetition_penalty=given("repetition_penalty"),
                                      presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                      seed=seed, logprobs=req.logprob_count(), prompt_logprobs=scored,
                                      logit_bias=req.token_biases(), min_tokens=req.min_tokens)
            request = Request(prompt_ids, max_tokens, sampling, tuple(req.stop_token_ids or ()),
                              tuple(req.stop_strings()), req.ignore_eos, req.include_stop_str_in_output,
                              grammar=structured[1] if structured else None)
            gen.check([request])
        except StructuredOutputError as e:  # a regex or grammar llguidance refuses
            raise APIError(400, f"{structured[0]}: {e}", param=structured[0]) from None
        except ValueError as e:  # SamplingError too; a message that starts with a field's name names it
            first = re.match(r"\w+", str(e))
            raise APIError(400, str(e), param=first.group() if first and first.group() in type(req).model_fields
                           else None) from None
        return request

    async def run(request: HTTPRequest, req, engine_reqs: list[Request], shape, echo: list[str] | None = None) -> Response:
        """Queue every choice of a request (all or none), then answer with all of them.
        ``echo``: each choice's prompt text, which its answer starts with (completions)."""
        try:
            handles = scheduler.submit_all(engine_reqs, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error") from None
        except EngineFailed as e:
            raise APIError(503, str(e), kind="server_error") from None
        keep = req.max_tokens != 0  # max_tokens=0 (scoring only): the one token run is not part of the answer
        fmt = logprob_formatter.ids_as_tokens() if req.return_tokens_as_token_ids else logprob_formatter
        rid, created_at = f"{shape.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created_at, "model": model_name}
        if req.stream:
            options = req.stream_options
            include_usage = "continuous" if options and options.continuous_usage_stats and options.include_usage \
                else bool(options and options.include_usage)
            return StreamingResponse(stream(handles, head, shape, include_usage, req.n, fmt, echo, keep),
                                     media_type="text/event-stream")
        results = await collect(request, handles)
        if results is None:  # the client went away
            return Response(status_code=499)
        choices, scores, n_out = [], [], 0
        for i, deltas in enumerate(results):
            reason = deltas[-1].finish_reason if deltas else "stop"
            deltas = deltas if keep else [dropped(d) for d in deltas]
            text = "".join(d.text or "" for d in deltas)
            prompt_ids = engine_reqs[i].prompt_ids
            if echo is None:
                lp = shape.logprobs(fmt, deltas, 0)[0]
            else:
                text, lp = echo[i] + text, fmt.completion(deltas, 0, prompt_ids, req.logprobs)[0]
            choices.append(shape.choice(i, text, reason, lp))
            if req.prompt_logprobs is not None:
                scores.append(fmt.prompt(deltas[0], prompt_ids, req.prompt_logprobs) if deltas else None)
            n_out += sum(len(d.token_ids) for d in deltas)
        body = {**head, "object": shape.object, "choices": choices, "usage": usage(handles, n_out, req.n)}
        if scores:
            shape.add_prompt_scores(body, scores)
        return JSONResponse(body)

    def dropped(d: StreamDelta) -> StreamDelta:
        """A delta with its generated tokens taken out (what ``max_tokens=0`` answers)."""
        return dataclasses.replace(d, token_ids=[], text="", logprobs=None if d.logprobs is None else [],
                                   top_logprobs=None if d.top_logprobs is None else [],
                                   finish_reason=d.finish_reason and "length")

    def usage(handles: list[Handle], completion: int, n: int) -> dict[str, int]:
        """Token counts; each prompt counted once, however many of its ``n`` choices ran."""
        prompt = sum(len(h.request.prompt_ids) for h in handles[::n])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def next_item(handle: Handle) -> StreamDelta | None:
        item = await handle.queue.get()
        if isinstance(item, Exception):
            raise APIError(503, f"generation failed: {item}", kind="server_error", counted=True)  # as "error"
        return item

    async def deltas_of(handle: Handle) -> list[StreamDelta]:
        deltas = []
        while (item := await next_item(handle)) is not None:
            deltas.append(item)
        return deltas

    async def collect(request: HTTPRequest, handles: list[Handle]) -> list[list[StreamDelta]] | None:
        """Every delta of every choice; None if the client disconnects first (each is
        cancelled). The connection is checked every half second while tokens flow."""
        everything = asyncio.ensure_future(asyncio.gather(*(deltas_of(h) for h in handles)))
        try:
            while True:
                done, _ = await asyncio.wait({everything}, timeout=0.5)
                if done:
                    return everything.result()
                if await request.is_disconnected():
                    return None
        finally:
            if not everything.done() or everything.exception() is not None:
                everything.cancel()
                everything.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no asyncio error log
                for h in handles:
                    scheduler.cancel(h)

    async def stream(handles: list[Handle], head: dict, shape, include_usage: bool | str, n: int,
                     fmt: LogprobFormatter, echo: list[str] | None = None, keep: bool = True) -> AsyncIterator[str]:
        """Server-sent events: each choice's text as it comes (``index`` says whose),
        a final chunk per choice with its finish reason, the usage if asked, [DONE].
        ``include_usage="continuous"``: every chunk carries the usage so far (vLLM's
        ``continuous_usage_stats``). ``echo``: each choice's first chunk is its prompt
        (with its log-probabilities when asked); ``keep=False``: the generated tokens are
        left out."""
        def chunk(i: int, text: str | None, reason: str | None, lp: dict | None = None) -> str:
            extra = {}
            if include_usage:
                extra["usage"] = usage(handles, n_out, n) if include_usage == "continuous" else None
            return sse({**head, **shape.chunk(i, text, reason, lp), **extra})

        pending: dict[asyncio.Future, int] = {}
        reasons: list[str | None] = [None] * len(handles)
        offsets = [0] * len(handles)  # each choice's text so far, for the completions' logprobs text_offset
        echoed = [False] * len(handles)
        n_out, finished = 0, False
        try:
            if shape.first is not None:
                for i in range(len(handles)):
                    yield chunk(i, shape.first, None)
            pending = {asyncio.ensure_future(next_item(h)): i for i, h in enumerate(handles)}
            while pending:
                done, _ = await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=pending.get):
                    i = pending.pop(fut)
                    try:
                        item = fut.result()
                    except APIError as e:  # the device group failed: say so, and stop
                        yield sse(e.body())
                        yield "data: [DONE]\n\n"
                        return
                    if item is None:
                        yield chunk(i, "" if shape.first is None else None, reasons[i] or "stop")
                        continue
                    item = item if keep else dropped(item)
                    if echo is not None and not echoed[i]:  # the choice's first delta: its prompt first
                        echoed[i] = True
                        lp, offsets[i] = fmt.completion([dropped(item)], 0, handles[i].request.prompt_ids)
                        yield chunk(i, echo[i], None, lp)
                    n_out += len(item.token_ids)
                    reasons[i] = item.finish_reason or reasons[i]
                    lp, offsets[i] = shape.logprobs(fmt, [item], offsets[i])
                    if item.text or (lp is not None and item.token_ids):
                        yield chunk(i, item.text or "", None, lp)
                    pending[asyncio.ensure_future(next_item(handles[i]))] = i
            if include_usage:
                yield sse({**head, "object": shape.chunk_object, "choices": [], "usage": usage(handles, n_out, n)})
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            for fut in pending:
                fut.cancel()
            if not finished:  # the client disconnected mid-stream (or the group failed)
                for h in handles:
                    scheduler.cancel(h)

    class _Completions:
        prefix, object, chunk_object, first = "cmpl", "text_completion", "text_completion", None

        @staticmethod
        def logprobs(fmt: LogprobFormatter, deltas: list[StreamDelta], offset: int) -> tuple[dict | None, int]:
            """The choice's logprobs object and its text offset after these deltas."""
            return fmt.completion(deltas, offset)

        @staticmethod
        def choice(i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        @staticmethod
        def add_prompt_scores(body: dict, scores: list) -> None:
            for choice, s in zip(body["choices"], scores):  # each choice has its own prompt
                choice["prompt_logprobs"] = s

        @staticmethod
        def chunk(i: int, text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
            return {"object": "text_completion",
                    "choices": [{"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]}

    class _Chat:
        prefix, object, chunk_object, first = "chatcmpl", "chat.completion", "chat.completion.chunk", ""

        @staticmethod
        def logprobs(fmt: LogprobFormatter, deltas: list[StreamDelta], offset: int) -> tuple[dict | None, int]:
            return fmt.chat(deltas), offset  # chat has no text offsets

        @staticmethod
        def choice(i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": reason}

        @staticmethod
        def add_prompt_scores(body: dict, scores: list) -> None:
            body["prompt_logprobs"] = scores[0]  # vLLM's place: beside the choices, which share one prompt

        @staticmethod
        def chunk(i: int, text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
            opening = text == "" and reason is None and logprobs is None  # the first chunk: the role
            delta = {} if text is None else ({"role": "assistant", "content": ""} if opening else {"content": text})
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    class _ToolCalls(_Chat):
        """A chat answer that calls the function a ``tool_choice`` names: the output,
        held to its parameters' schema, becomes the call's arguments."""

        def __init__(self, named: str):
            self.named = named

        @staticmethod
        def call(name: str, arguments: str) -> dict:
            return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": name, "arguments": arguments}}

        def choice(self, i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            # the arguments as generated (cut short too, as OpenAI's "length")
            return {"index": i, "message": {"role": "assistant", "content": None,
                                            "tool_calls": [self.call(self.named, text)]},
                    "logprobs": logprobs, "finish_reason": reason}

        def chunk(self, i: int, text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
            """Streamed (a named function): the call's id and name first, then its arguments."""
            if text == "" and reason is None and logprobs is None:
                call = {"index": 0, **self.call(self.named, "")}
                delta = {"role": "assistant", "content": None, "tool_calls": [call]}
            else:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    class _AutoTools(_Chat):
        """A chat answer under ``tool_choice: "auto"``: the model's own tool-call syntax,
        read back out of its text by the server's parser (``tools.py``); streamed, content
        as it comes and each call whole once it closes."""

        cut_short_calls = "tool_calls"  # the finish reason when calls were sent and max_tokens ended the output

        def __init__(self):
            self.streams, self.sent = {}, {}  # per choice: its streaming parser, the calls sent so far

        @staticmethod
        def streamer():
            return parser.streamer()

        def choice(self, i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            content, calls = parser.parse(text)
            if not calls:
                return _Chat.choice(i, text, reason, logprobs)
            message = {"role": "assistant", "content": content,
                       "tool_calls": [_ToolCalls.call(name, args) for name, args in calls]}
            return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": "tool_calls"}

        def chunk(self, i: int, text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
            if text == "" and reason is None and logprobs is None:  # the opening chunk: the role
                return _Chat.chunk(i, text, reason, logprobs)
            stream = self.streams.setdefault(i, self.streamer())
            content, calls = stream.push(text or "")
            if reason is not None:  # the end: what the parser held back
                rest, more = stream.finish()
                content, calls = content + rest, calls + more
            delta: dict[str, Any] = {"content": content} if content else {}
            if calls:
                n = self.sent.get(i, 0)
                delta["tool_calls"] = [{"index": n + k, **_ToolCalls.call(name, args)}
                                       for k, (name, args) in enumerate(calls)]
                self.sent[i] = n + len(calls)
            if reason is not None and self.sent.get(i):
                reason = "tool_calls" if reason != "length" else self.cut_short_calls
            return {"object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    class _RequiredTools(_AutoTools):
        """A chat answer under ``tool_choice: "required"``: a JSON list of calls held to
        the call schema (``ChatCompletionRequest.tool_schema``). Whole, the list parsed
        into ``tool_calls`` (the text as content if ``max_tokens`` cut it short);
        streamed, each call once its object closes, and an unclosed one's text as content
        at the end, with finish reason "length"."""

        cut_short_calls = "length"

        @staticmethod
        def choice(i: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
            try:
                calls = [_ToolCalls.call(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                         for c in json.loads(text)]
            except (json.JSONDecodeError, TypeError, KeyError):  # cut short by max_tokens: the text as it is
                return _Chat.choice(i, text, reason, logprobs)
            return {"index": i, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                    "logprobs": logprobs, "finish_reason": "tool_calls"}

        @staticmethod
        def streamer():
            return CallListStream()

    def ids_of(prompt: str | list[int], param: str = "prompt") -> list[int]:
        """A prompt as token ids: text through the tokenizer, ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return list(tokenizer(prompt)["input_ids"]) if prompt else []
        bad = [t for t in prompt if not 0 <= t < gen.cfg.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} in '{param}' is outside the vocabulary [0, "
                                f"{gen.cfg.vocab_size})", param=param)
        return list(prompt)

    def chat_ids(req) -> list[int]:
        """A request's chat messages as the model's chat template renders them (with the
        request's template options), as token ids."""
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, f"model {model_name!r} has no chat template (tokenizer_config.json "
                                "'chat_template'); use /v1/completions with a plain prompt", param="messages")
        try:
            tools = req.template_tools() if isinstance(req, ChatCompletionRequest) else None
            text = tokenizer.apply_chat_template([m.for_template() for m in req.messages], tools=tools, tokenize=False,
                                                 **req.template_options())
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # e.g. "System role not supported"
            raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        req = parse(CompletionRequest, await read_json(request, max_body_bytes))
        prompts = [ids_of(p) for p in req.prompts()]
        reqs = [engine_request(req, ids, req.max_tokens, j) for ids in prompts for j in range(req.n)]
        echo = None
        if req.echo:  # a text prompt echoes as sent; token ids (or a truncated prompt) as their decoding
            sent = [p for p in req.prompts() for _ in range(req.n)]
            echo = [p if isinstance(p, str) and req.truncate_prompt_tokens is None else tokenizer.decode(r.prompt_ids)
                    for p, r in zip(sent, reqs)]
        return await run(request, req, reqs, _Completions, echo)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        req = parse(ChatCompletionRequest, await read_json(request, max_body_bytes))
        ids = chat_ids(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        shape, mode = _Chat, req.tool_mode()
        if mode == "named":
            shape = _ToolCalls(req.tool_choice.function.name)
        elif mode == "required":
            shape = _RequiredTools()
        elif mode == "auto":
            if parser is None:
                raise APIError(400, "tool_choice: 'auto' (the default when tools are given) lets the model call tools "
                                    "in its own syntax, which needs a tool-call parser: start the server with "
                                    f"--enable-auto-tool-choice --tool-call-parser {'|'.join(PARSERS)}, or name the "
                                    "function ({\"type\": \"function\", \"function\": {\"name\": ...}}), or set "
                                    "'required' or 'none'", param="tool_choice")
            shape = _AutoTools()
        return await run(request, req, [engine_request(req, ids, max_tokens, j) for j in range(req.n)], shape)

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        req = parse(TokenizeRequest, await read_json(request, max_body_bytes))
        check_model(req)
        if req.messages is not None:
            ids = chat_ids(req)
        else:
            ids = list(tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        out = {"count": len(ids), "max_model_len": gen.max_seq_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        req = parse(DetokenizeRequest, await read_json(request, max_body_bytes))
        check_model(req)
        return {"prompt": tokenizer.decode(ids_of(req.tokens, "tokens"))}

    @app.post("/v1/embeddings")
    async def no_embeddings():
        raise APIError(400, f"model {model_name!r} is served to generate text; for embeddings serve an encoder "
                            "(BERT), or this model with scripts/serve.py --task embed", param="model")

    @app.get("/health")
    async def health():
        ok = await asyncio.to_thread(scheduler.health, health_timeout_s)
        if ok:
            return {"status": "ok"}
        return JSONResponse({"status": "unhealthy", "reason": scheduler.failed or "the device probe did not answer"},
                            status_code=503)

    return app


def common_routes(app: FastAPI, model_name: str, max_model_len: int, metrics: ServerMetrics, *,
                  api_key: str | None, max_body_bytes: int) -> Callable[[APIError], JSONResponse]:
    """What every server of ours has: the guard (API key, body size), OpenAI-style
    errors (counted as rejections, except a missing key), ``GET /v1/models`` and
    ``GET /metrics``. Returns the error responder."""
    created = int(time.time())

    def error(e: APIError) -> JSONResponse:
        if e.status != 401 and not e.counted:
            metrics.finish("rejected")
        return JSONResponse(e.body(), status_code=e.status)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, refuse=error)

    @app.exception_handler(APIError)
    async def api_error(_request: HTTPRequest, e: APIError):
        return error(e)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "ryzen_jax", "max_model_len": max_model_len}]}

    @app.get("/version")
    async def version():
        return {"version": ryzen_jax.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return error


class Guard:
    """ASGI middleware: the API key (routes under /v1) and the declared body size,
    checked before anything is read or parsed. Pure ASGI rather than
    ``@app.middleware``, whose wrapper hides a client's disconnect from the handlers."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, refuse):
        self.app, self.api_key, self.max_body_bytes, self.refuse = app, api_key, max_body_bytes, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.api_key is not None and scope["path"].startswith("/v1/"):
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    answer = self.refuse(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                                  kind="authentication_error", code="invalid_api_key"))
                    return await answer(scope, receive, send)
            size = headers.get(b"content-length", b"").decode("latin-1")
            if size.isdigit() and int(size) > self.max_body_bytes:
                answer = self.refuse(APIError(413, f"request body of {size} bytes exceeds the limit of "
                                                   f"{self.max_body_bytes}"))
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
