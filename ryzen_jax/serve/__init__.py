"""The OpenAI-compatible server: continuous batching behind FastAPI, and
``/v1/embeddings`` for models loaded for embeddings (BERT; decoders with ``task="embed"``).

    lm = ryzen_jax.load_model(path, tp=4)
    server = ryzen_jax.serve.Server(lm, max_batch=16)   # EmbeddingServer(lm) for a BERT
    server.run(host="127.0.0.1", port=8000)       # process 0; followers call server.follow()
"""

from __future__ import annotations

import logging
import os
import threading
import time

import jax

from ryzen_jax.api import LoadedModel
from ryzen_jax.engine.batcher import SlotBatcher
from ryzen_jax.engine.embed import POOLINGS
from ryzen_jax.engine.generate import DECODE_CHUNK, bucket
from ryzen_jax.serve.app import create_app
from ryzen_jax.serve.embeddings import EMBED_BATCH, create_embedding_app, follow_embeddings
from ryzen_jax.serve.metrics import ServerMetrics
from ryzen_jax.serve.scheduler import Channel, PlanChannel, Scheduler, follow
from ryzen_jax.serve.tools import tool_parser

log = logging.getLogger(__name__)


def check_limits(max_batch: int, max_queue: int, steps_per_dispatch: int) -> None:
    """Refuse serving limits out of range (before a model is loaded, from the CLI)."""
    if max_batch < 1 or max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch} and {max_queue}")
    if not 1 <= steps_per_dispatch <= DECODE_CHUNK:
        raise ValueError(f"--steps-per-dispatch must be in [1, {DECODE_CHUNK}], got {steps_per_dispatch}")


class Server:
    """A loaded model, its decode slots and the scheduler, ready to serve.

    Compiles every program a request can need before it answers (prompt buckets,
    insert, decode), so no request ever waits for a compilation.
    """

    def __init__(self, lm: LoadedModel, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
                 model_name: str | None = None, steps_per_dispatch: int = 1, step_timeout_s: float = 60.0,
                 max_body_bytes: int = 1 << 20, generation_config: str = "auto", tool_call_parser: str | None = None):
        if lm.generator is None:
            raise ValueError(f"{lm.config.model_type} is not a generative model: serve it with EmbeddingServer")
        if lm.tokenizer is None:
            raise ValueError(f"{lm.path} has no tokenizer (tokenizer.json / tokenizer_config.json): the server "
                             "needs one to read prompts and write text")
        check_limits(max_batch, max_queue, steps_per_dispatch)
        if tool_call_parser is not None:
            tool_parser(tool_call_parser)  # an unknown name, refused before the warm-up
        if generation_config not in ("auto", "none"):
            raise ValueError(f"--generation-config must be 'auto' (the model's sampling defaults) or 'none' (the "
                             f"API's), got {generation_config!r}")
        self.lm = lm
        self.model_name = model_name or os.path.basename(os.path.normpath(lm.path))
        self.batcher = SlotBatcher(lm.generator, max_batch)
        if self.batcher.slots != max_batch:
            log.info("--max-batch %d rounded up to %d slots (a power of two, a multiple of dp=%d)", max_batch,
                     self.batcher.slots, lm.tp.dp_size)
        t0 = time.perf_counter()
        self.warmup_s = self.batcher.warmup()
        # the vocabulary as llguidance reads it (about a second for a large one), off the request path
        threading.Thread(target=self._grammar_vocabulary, daemon=True, name="grammar-vocabulary").start()
        log.info("compiled the serving programs in %.1fs (%.1fs wall): %d slots, prompts up to %d tokens",
                 self.warmup_s, time.perf_counter() - t0, self.batcher.slots, lm.generator.max_seq_len)
        multi = jax.process_count() > 1
        self.leader = jax.process_index() == 0
        self.channel = PlanChannel() if multi else None
        self.scheduler = Scheduler(self.batcher, max_queue=max_queue, steps_per_dispatch=steps_per_dispatch,
                                   channel=self.channel, step_timeout_s=step_timeout_s, metrics=ServerMetrics())
        use = generation_config == "auto"
        if use and lm.config.generation_defaults:
            log.info("the model's generation_config.json sets %s for requests that leave them out "
                     "(--generation-config none: the API's defaults)",
                     ", ".join(f"{k}={v}" for k, v in lm.config.generation_defaults))
        self.app = create_app(self.scheduler, lm.tokenizer, self.model_name, api_key=api_key,
                              max_body_bytes=max_body_bytes, use_generation_config=use,
                              tool_call_parser=tool_call_parser)

    def _grammar_vocabulary(self) -> None:
        try:
            self.lm.generator.grammars.tokenizer()
        except Exception as e:  # noqa: BLE001 — said again, as a 400, by the first structured request
            log.info("structured outputs are unavailable: %s", e)

    def run(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        """Serve HTTP until interrupted (the leader); a follower applies the leader's plans."""
        if not self.leader:
            self.follow()
            return
        import uvicorn

        self.scheduler.start()
        try:
            uvicorn.run(self.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        finally:
            self.scheduler.shutdown()

    def follow(self) -> None:
        log.info("following the leader's plans (pid %d)", os.getpid())
        follow(self.batcher, self.channel)


class EmbeddingServer:
    """A model loaded for embeddings (BERT, or any with ``task="embed"``) behind
    ``POST /v1/embeddings``, on one process or several (the leader serves HTTP and
    sends each batch to the followers, which run it beside it). Compiles the encoder
    for one input and for a full batch (``EMBED_BATCH``) at every length bucket before
    it answers."""

    def __init__(self, lm: LoadedModel, *, max_queue: int = 64, api_key: str | None = None,
                 model_name: str | None = None, max_body_bytes: int = 1 << 20, step_timeout_s: float = 60.0):
        if lm.encoder is None:
            raise ValueError(f"{lm.path} was loaded to generate text: serve it with Server, or load it with "
                             "task='embed' for embeddings")
        if lm.encoder.pooling not in POOLINGS:
            raise ValueError(f"the model's sentence-transformers modules.json asks for pooling "
                             f"{lm.encoder.pooling!r}, which ryzen_jax lacks ({' or '.join(POOLINGS)})")
        check_limits(1, max_queue, 1)
        self.lm = lm
        self.model_name = model_name or os.path.basename(os.path.normpath(lm.path))
        t0, length, dp = time.perf_counter(), 16, lm.tp.dp_size
        while True:
            for rows in {dp, dp * bucket(-(-EMBED_BATCH // dp), 1)}:  # as Encoder pads a batch
                lm.encoder.encode_program(rows, min(length, lm.encoder.max_len))
            if length >= lm.encoder.max_len:
                break
            length *= 2
        log.info("compiled the encoder in %.1fs: inputs up to %d tokens (pooling %s%s)", time.perf_counter() - t0,
                 lm.encoder.max_len, lm.encoder.pooling, ", normalized" if lm.encoder.normalize else "")
        self.leader = jax.process_index() == 0
        self.channel = Channel("ryzen_jax/embed/") if jax.process_count() > 1 else None
        self.app = create_embedding_app(lm, self.model_name, api_key=api_key, max_body_bytes=max_body_bytes,
                                        max_queue=max_queue, channel=self.channel, step_timeout_s=step_timeout_s)

    def run(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        """Serve HTTP until interrupted (the leader); a follower runs the leader's batches."""
        if not self.leader:
            log.info("following the leader's batches (pid %d)", os.getpid())
            follow_embeddings(self.lm.encoder, self.channel)
            return
        import uvicorn

        try:
            uvicorn.run(self.app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        finally:
            if self.channel is not None:
                self.channel.send(None)
