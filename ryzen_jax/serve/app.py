"""The OpenAI-compatible HTTP API over a Scheduler (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` (200 only when every device answers the probe), ``GET /metrics``
(Prometheus text). Handlers validate, tokenize and queue; they never touch devices.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ryzen_jax.engine.generate import Request, StreamDelta
from ryzen_jax.engine.sampling import SamplingError, SamplingParams
from ryzen_jax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from ryzen_jax.serve.scheduler import EngineFailed, Handle, QueueFull, Scheduler

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def create_app(scheduler: Scheduler, tokenizer: Any, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, health_timeout_s: float = 5.0) -> FastAPI:
    """The app for one served model. ``tokenizer`` is the model's HF tokenizer."""
    app = FastAPI(title="ryzen_jax", docs_url=None, redoc_url=None)
    gen = scheduler.batcher.gen
    metrics = scheduler.metrics
    created = int(time.time())

    def error(e: APIError) -> JSONResponse:
        if e.status != 401:
            metrics.finish("rejected")
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        """API key (routes under /v1) and the body-size bound, before anything is parsed."""
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      kind="authentication_error", code="invalid_api_key"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return error(APIError(413, f"request body of {size} bytes exceeds the limit of {max_body_bytes}"))
        return await call_next(request)

    async def body(request: HTTPRequest) -> Any:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None

    def engine_request(req, prompt_ids: list[int], max_tokens: int | None) -> Request:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = gen.max_seq_len
        if len(prompt_ids) >= limit:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context is {limit}",
                           param="prompt")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} + {len(prompt_ids)} prompt tokens exceeds this server's "
                                f"context of {limit}", param="max_tokens")
        try:
            sampling = SamplingParams(temperature=req.temperature, top_k=max(0, req.top_k), top_p=req.top_p,
                                      min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=req.seed)
            request = Request(prompt_ids, max_tokens, sampling, tuple(req.stop_token_ids or ()),
                              tuple(req.stop_strings()), req.ignore_eos)
            gen.check([request])
        except SamplingError as e:
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return request

    async def run(request: HTTPRequest, req, engine_req: Request, shape) -> Response:
        try:
            handle = scheduler.submit(engine_req, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error") from None
        except EngineFailed as e:
            raise APIError(503, str(e), kind="server_error") from None
        rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(handle, rid, shape, include_usage), media_type="text/event-stream")
        deltas = await collect(request, handle)
        if deltas is None:  # the client went away
            return Response(status_code=499)
        text = "".join(d.text or "" for d in deltas)
        reason = deltas[-1].finish_reason if deltas else "stop"
        n_out = sum(len(d.token_ids) for d in deltas)
        return JSONResponse({"id": rid, "object": shape.object, "created": int(time.time()), "model": model_name,
                             "choices": [shape.choice(text, reason)], "usage": usage(engine_req, n_out)})

    def usage(req: Request, completion: int) -> dict[str, int]:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(req.prompt_ids) + completion}

    async def next_item(handle: Handle) -> StreamDelta | None:
        item = await handle.queue.get()
        if isinstance(item, Exception):
            raise APIError(503, f"generation failed: {item}", kind="server_error")
        return item

    async def collect(request: HTTPRequest, handle: Handle) -> list[StreamDelta] | None:
        """Every delta of a request; None if the client disconnects first (cancelled)."""
        deltas: list[StreamDelta] = []
        while True:
            getter = asyncio.ensure_future(next_item(handle))
            while not getter.done():
                await asyncio.wait({getter}, timeout=0.5)
                if not getter.done() and await request.is_disconnected():
                    getter.cancel()
                    scheduler.cancel(handle)
                    return None
            item = getter.result()
            if item is None:
                return deltas
            deltas.append(item)

    async def stream(handle: Handle, rid: str, shape, include_usage: bool) -> AsyncIterator[str]:
        finished, n_out, reason = False, 0, None
        try:
            if shape.first is not None:
                yield sse(shape.chunk(rid, shape.first, None))
            while True:
                try:
                    item = await next_item(handle)
                except APIError as e:
                    yield sse(e.body())
                    break
                if item is None:
                    break
                n_out += len(item.token_ids)
                reason = item.finish_reason or reason
                if item.text:
                    yield sse(shape.chunk(rid, item.text, None))
            final = shape.chunk(rid, "" if shape.first is None else None, reason or "stop")
            yield sse(final)
            if include_usage:
                yield sse({"id": rid, "object": shape.chunk_object, "created": int(time.time()), "model": model_name,
                           "choices": [], "usage": usage(handle.request, n_out)})
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client disconnected mid-stream
                scheduler.cancel(handle)

    class _Completions:
        prefix, object, chunk_object, first = "cmpl", "text_completion", "text_completion", None

        @staticmethod
        def choice(text: str, reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        @staticmethod
        def chunk(rid: str, text: str | None, reason: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

    class _Chat:
        prefix, object, chunk_object, first = "chatcmpl", "chat.completion", "chat.completion.chunk", ""

        @staticmethod
        def choice(text: str, reason: str | None) -> dict:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason}

        @staticmethod
        def chunk(rid: str, text: str | None, reason: str | None) -> dict:
            delta = {} if text is None else ({"role": "assistant", "content": ""} if text == "" and reason is None
                                              else {"content": text})
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    @app.exception_handler(APIError)
    async def api_error(_request: HTTPRequest, e: APIError):
        return error(e)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        req = parse(CompletionRequest, await body(request))
        if isinstance(req.prompt, str):
            ids = list(tokenizer(req.prompt)["input_ids"]) if req.prompt else []
        else:
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < gen.cfg.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {gen.cfg.vocab_size})",
                               param="prompt")
        return await run(request, req, engine_request(req, ids, req.max_tokens), _Completions)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        req = parse(ChatCompletionRequest, await body(request))
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, f"model {model_name!r} has no chat template (tokenizer_config.json "
                                "'chat_template'); use /v1/completions with a plain prompt", param="messages")
        text = tokenizer.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                             tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # chat has no fixed default: whatever the context leaves
            max_tokens = max(1, gen.max_seq_len - len(ids))
        return await run(request, req, engine_request(req, ids, max_tokens), _Chat)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "ryzen_jax", "max_model_len": gen.max_seq_len}]}

    @app.get("/health")
    async def health():
        ok = await asyncio.to_thread(scheduler.health, health_timeout_s)
        if ok:
            return {"status": "ok"}
        return JSONResponse({"status": "unhealthy", "reason": scheduler.failed or "the device probe did not answer"},
                            status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
