"""``POST /v1/embeddings`` for a model loaded for embeddings (BERT, or a decoder-only
embedding model with ``task="embed"``): the OpenAI embeddings API.

A request's inputs (texts or token-id lists, up to ``MAX_INPUTS``) are checked and
tokenized before they queue, then embedded in one call of the model's ``Encoder``,
pooled and normalized as the model's sentence-transformers config asks (the
defaults of ``rj.embed``). One request at a time holds the devices; beyond
``max_queue`` waiting requests get 429. The inputs go to the devices in batches of at
most ``EMBED_BATCH`` (bounded memory; one input and a full batch are compiled for
every length bucket at start-up, other counts on first use). ``encoding_format`` is "float" or "base64"
(little-endian float32, which the openai client asks for by default).

Across processes (under the launcher) the leader sends each batch's token ids to the
followers through a ``Channel`` before it runs it, and every process runs the same
program (``follow_embeddings``). A batch that does not return within
``step_timeout_s`` (a dead or stuck process) fails its request with a 503 that says
so, and every later one, and ``/health`` turns 503: the launcher restarts the group.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse

from ryzen_jax.serve.app import common_routes, read_json
from ryzen_jax.serve.metrics import ServerMetrics
from ryzen_jax.serve.protocol import APIError, EmbeddingRequest, parse
from ryzen_jax.serve.scheduler import Channel

EMBED_BATCH = 32  # inputs per device call


def create_embedding_app(lm: Any, model_name: str, *, api_key: str | None = None, max_body_bytes: int = 1 << 20,
                         max_queue: int = 64, channel: Channel | None = None,
                         step_timeout_s: float = 60.0) -> FastAPI:
    """The app for one served encoder (``lm``: a LoadedModel whose ``encoder`` is set);
    ``channel``: where the leader of several processes sends the followers each batch."""
    app = FastAPI(title="ryzen_jax", docs_url=None, redoc_url=None)
    encoder, tokenizer, hidden = lm.encoder, lm.tokenizer, lm.config.hidden_size
    metrics = ServerMetrics()
    device = threading.Lock()  # one request on the devices at a time
    state: dict[str, Any] = {"waiting": 0, "failed": None}
    common_routes(app, model_name, lm.encoder.max_len, metrics, api_key=api_key,
                  max_body_bytes=max_body_bytes)

    def token_ids(req: EmbeddingRequest) -> list[list[int]]:
        out = []
        for x in req.inputs():
            if isinstance(x, str):
                if tokenizer is None:
                    raise APIError(400, f"model {model_name!r} has no tokenizer: send token ids as input",
                                   param="input")
                x = tokenizer(x)["input_ids"]
            out.append(list(x))
        try:
            encoder.check(out)
        except ValueError as e:  # too long, empty, outside the vocabulary: names the input
            raise APIError(400, f"invalid 'input': {e}", param="input") from None
        return out

    def embed(ids: list[list[int]]) -> np.ndarray:
        with device:
            out = []
            for i in range(0, len(ids), EMBED_BATCH):
                if channel is not None:  # the followers run this batch beside us
                    channel.send(json.dumps(ids[i:i + EMBED_BATCH]))
                out.append(encoder.embed(ids[i:i + EMBED_BATCH]))
            return np.concatenate(out)

    @app.post("/v1/embeddings")
    async def embeddings(request: HTTPRequest):
        t0 = time.perf_counter()
        req = parse(EmbeddingRequest, await read_json(request, max_body_bytes))
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if req.dimensions not in (None, hidden):
            raise APIError(400, f"dimensions: this model's embeddings have {hidden}; it cannot shorten them",
                           param="dimensions")
        ids = token_ids(req)
        if state["failed"]:
            raise APIError(503, state["failed"], kind="server_error")
        if state["waiting"] > max_queue:  # one on the devices, max_queue behind it
            raise APIError(429, f"the server is busy: {state['waiting']} requests are waiting; retry later",
                           kind="rate_limit_error")
        state["waiting"] += 1
        metrics.queue_depth.set(state["waiting"] - 1)
        batches = -(-len(ids) // EMBED_BATCH)
        try:
            vectors = await asyncio.wait_for(asyncio.to_thread(embed, ids), step_timeout_s * batches)
        except (asyncio.TimeoutError, TimeoutError):
            state["failed"] = (f"the devices did not return a batch within {step_timeout_s:g} s (a dead or stuck "
                               "process); the server must be restarted")
            metrics.finish("error")
            raise APIError(503, state["failed"], kind="server_error", counted=True) from None
        except Exception as e:  # noqa: BLE001 — a failed request is answered, the server stays up
            metrics.finish("error")
            raise APIError(500, f"embedding failed: {e}", kind="server_error", counted=True) from None
        finally:
            state["waiting"] -= 1
            metrics.queue_depth.set(max(0, state["waiting"] - 1))
        n = sum(map(len, ids))
        metrics.prompt_tokens.inc(n)
        metrics.e2e.observe(time.perf_counter() - t0)
        metrics.finish("ok")
        as_base64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def not_generative():
        raise APIError(400, f"model {model_name!r} is an encoder-only ({lm.config.model_type}) model: it gives "
                            "embeddings (POST /v1/embeddings), not text", param="model")

    @app.get("/health")
    async def health():
        if state["failed"]:
            return JSONResponse({"status": "unhealthy", "reason": state["failed"]}, status_code=503)
        return {"status": "ok"}

    return app


def follow_embeddings(encoder: Any, channel: Channel) -> None:
    """A follower process: run each batch the leader sends until it says stop."""
    while (text := channel.take()) is not None:
        encoder.embed(json.loads(text))
