"""Serving benchmark: a load generator for a running OpenAI-compatible server
(``scripts/serve.py``, or any server with ``POST /v1/completions`` and SSE streaming).

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at
once), at most ``max_concurrency`` in flight; each streams its completion. Reported,
as vLLM's serving benchmark does: time to first token (TTFT), time per output token
after the first (TPOT), inter-token latency between streamed chunks (ITL) and
end-to-end latency (E2E) at P50 and P99, request and token throughput, and failures;
with service-level objectives (``goodput``), the rate of requests that met every one.
``burstiness`` below 1 makes arrivals burstier than Poisson, above 1 more even (gamma
gaps of the same mean, as vLLM's ``--burstiness``).
Prompts are random words, or come from a file (``dataset``): JSONL with one
``{"prompt": ..., "max_tokens": N}`` per line (vLLM's custom format; ``max_tokens``
optional), or a ShareGPT JSON (each conversation's first human turn), sampled with the
seed and repeated where the file has fewer than ``num_prompts``.
Token counts come from the server's ``usage`` (``stream_options.include_usage``),
else one token per streamed chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time

import numpy as np

from ryzen_jax.bench.stats import summary_ms

#: words the random prompts are drawn from (any tokenizer splits them into a few tokens)
WORDS = ("the of and to in is was for on that with as by at from it an be this are which or have one had not "
         "but what all were when we there can more if no out so said time up about into than them some could "
         "model device mesh token layer cache weight batch tensor shard river mountain window garden market "
         "letter window number system program question winter summer morning evening light stone").split()


class ServingConfigError(ValueError):
    """A serving-benchmark setting out of its range."""


#: the per-request latencies a goodput objective can bound, in ms
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """``num_prompts`` requests of ``input_words`` random words each (or drawn from the
    ``dataset`` file), asking for ``max_tokens`` new tokens (or the file's own per
    prompt; greedy; ``ignore_eos`` so every request produces them all)."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_words: int = 32
    max_tokens: int = 64
    ignore_eos: bool = True
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    burstiness: float = 1.0  # gamma shape of the arrival gaps: 1 = Poisson
    goodput: tuple[tuple[str, float], ...] = ()  # (metric in SLO_METRICS, at most this many ms)
    dataset: str | None = None  # a JSONL (vLLM's custom format) or ShareGPT JSON file of prompts

    def __post_init__(self):
        for name in ("num_prompts", "input_words", "max_tokens"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ServingConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.request_rate, (int, float)) and self.request_rate > 0):
            raise ServingConfigError(f"request_rate must be > 0 requests/s (inf: all at once), got {self.request_rate!r}")
        if self.max_concurrency is not None and not (isinstance(self.max_concurrency, int) and self.max_concurrency >= 1):
            raise ServingConfigError(f"max_concurrency must be an integer >= 1 or None, got {self.max_concurrency!r}")
        if not (isinstance(self.burstiness, (int, float)) and 0 < self.burstiness < math.inf):
            raise ServingConfigError(f"burstiness must be a finite number > 0 (1: Poisson), got {self.burstiness!r}")
        for metric, ms in self.goodput:
            if metric not in SLO_METRICS:
                raise ServingConfigError(f"goodput metric {metric!r}: choose one of {', '.join(SLO_METRICS)}")
            if not (isinstance(ms, (int, float)) and ms > 0):
                raise ServingConfigError(f"goodput {metric}: the objective must be > 0 ms, got {ms!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ServingConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.dataset is not None and not os.path.isfile(self.dataset):
            raise ServingConfigError(f"dataset {self.dataset!r} is not a file: pass a JSONL of "
                                     '{"prompt": ..., "max_tokens": N} lines or a ShareGPT JSON')


@dataclasses.dataclass
class RequestOutcome:
    """One request as the client saw it (seconds from when it was sent)."""

    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclasses.dataclass
class ServingResults:
    base_url: str
    model: str
    num_prompts: int
    request_rate: float
    max_concurrency: int | None
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    goodput: dict[str, float]  # the objectives (ms), as configured; empty: none
    request_goodput: float | None  # completed requests that met every objective / s; None without objectives
    errors: list[str]
    ttft_samples_ms: list[float]
    itl_samples_ms: list[float]
    e2e_samples_ms: list[float]
    dataset: str | None = None  # the prompt file; None: random words


def random_prompts(n: int, words: int, seed: int) -> list[str]:
    """``n`` seeded prompts of ``words`` random words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(n)]


#: the largest prompt file read (the load generator holds it whole)
MAX_DATASET_BYTES = 1 << 30


def read_dataset(path: str, max_tokens: int) -> list[tuple[str, int]]:
    """Every (prompt, max_tokens) of a prompt file: JSONL, one object with a string
    ``prompt`` and an optional integer ``max_tokens`` (default: ``max_tokens``) per line;
    or a ShareGPT JSON, a list of ``{"conversations": [{"from": "human", "value": ...},
    ...]}`` whose first human turn is the prompt. A malformed entry is refused with its
    line or index."""
    if os.path.getsize(path) > MAX_DATASET_BYTES:
        raise ServingConfigError(f"dataset {path} is over {MAX_DATASET_BYTES >> 20} MiB: take a sample of it")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    out: list[tuple[str, int]] = []
    if isinstance(whole, list):  # ShareGPT
        for i, item in enumerate(whole):
            turns = item.get("conversations") if isinstance(item, dict) else None
            human = next((t.get("value") for t in turns or () if isinstance(t, dict) and t.get("from") == "human"),
                         None)
            if isinstance(human, str) and human.strip():
                out.append((human, max_tokens))
            elif not isinstance(turns, list):
                raise ServingConfigError(f"dataset {path}, entry {i}: a ShareGPT entry needs a 'conversations' list")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ServingConfigError(f"dataset {path}, line {n}: not JSON ({e.msg})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ServingConfigError(f"dataset {path}, line {n}: needs a non-empty string 'prompt'")
            tokens = row.get("max_tokens", max_tokens)
            if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1):
                raise ServingConfigError(f"dataset {path}, line {n}: max_tokens must be an integer >= 1, "
                                         f"got {tokens!r}")
            out.append((prompt, tokens))
    if not out:
        raise ServingConfigError(f"dataset {path} holds no prompt")
    return out


def request_prompts(cfg: ServingConfig) -> list[tuple[str, int]]:
    """The run's ``num_prompts`` (prompt, max_tokens): random words, or the dataset's
    entries in a seeded order, repeated where it has fewer."""
    if cfg.dataset is None:
        return [(p, cfg.max_tokens) for p in random_prompts(cfg.num_prompts, cfg.input_words, cfg.seed)]
    rows = read_dataset(cfg.dataset, cfg.max_tokens)
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    return [rows[order[i % len(rows)]] for i in range(cfg.num_prompts)]


def arrival_gaps(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Seconds between successive request arrivals, of mean 1/rate: exponential (a
    Poisson process) at burstiness 1, else gamma with that shape (coefficient of
    variation 1/sqrt(burstiness)); all zero for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed + 1)
    if burstiness == 1.0:
        return list(rng.exponential(1.0 / rate, size=n))
    return list(rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n))


async def _one(client, url: str, body: dict, headers: dict) -> RequestOutcome:
    """Send one streaming completion and time its chunks."""
    out = RequestOutcome(ok=False)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    done = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = f"server error: {event['error'].get('message', event['error'])}"
                    return out
                if event.get("usage"):
                    out.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    out.output_tokens = event["usage"].get("completion_tokens", 0)
                if any(c.get("text") for c in event.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        out.ttft = now - t0
                    else:
                        out.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # a benchmark counts every failure, whatever its kind
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.latency = time.perf_counter() - t0
    if not done:
        out.error = "the stream ended without data: [DONE]"
        return out
    if last is None:
        out.error = "no text was streamed"
        return out
    out.output_tokens = out.output_tokens or chunks
    out.ok = True
    return out


async def _model_name(client, base_url: str, headers: dict) -> str:
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise ServingConfigError(f"{base_url}/v1/models lists no model; pass --served-model")
    return models[0]["id"]


async def run_async(cfg: ServingConfig, progress=None) -> ServingResults:
    """Run the load against the server and summarise it."""
    try:
        import httpx
    except ImportError:
        raise RuntimeError("the serving benchmark needs httpx: pip install -e '.[bench]'") from None
    base = cfg.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    prompts = request_prompts(cfg)
    gaps = arrival_gaps(cfg.num_prompts, cfg.request_rate, cfg.seed, cfg.burstiness)
    limits = httpx.Limits(max_connections=cfg.max_concurrency or cfg.num_prompts)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:
        try:
            model = cfg.model or await _model_name(client, base, headers)
        except httpx.HTTPError as e:
            raise ConnectionError(f"no server answers at {base} ({type(e).__name__}: {e}); start one with "
                                  "python scripts/serve.py --model DIR, or pass --base-url") from None
        gate = asyncio.Semaphore(cfg.max_concurrency or cfg.num_prompts)
        finished = 0

        async def limited(prompt: str, max_tokens: int) -> RequestOutcome:
            nonlocal finished
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": cfg.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
            async with gate:
                out = await _one(client, f"{base}/v1/completions", body, headers)
            finished += 1
            if progress and (finished % max(1, cfg.num_prompts // 10) == 0 or finished == cfg.num_prompts):
                progress(f"{finished}/{cfg.num_prompts} requests done")
            return out

        t0 = time.perf_counter()
        tasks, due = [], 0.0
        for (prompt, max_tokens), gap in zip(prompts, gaps):
            due += gap  # each arrival at its own time from the start: the event loop's lag never adds up
            wait = t0 + due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarise(cfg, model, outcomes, duration)


def run(cfg: ServingConfig, progress=None) -> ServingResults:
    """:func:`run_async` from synchronous code."""
    return asyncio.run(run_async(cfg, progress))


def _tpot(o: RequestOutcome) -> float:
    """Seconds per output token after the first (0 for a one-token completion)."""
    return (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0


def _latency_s(o: RequestOutcome, metric: str) -> float:
    return {"ttft": o.ttft, "tpot": _tpot(o), "e2el": o.latency}[metric]


def summarise(cfg: ServingConfig, model: str, outcomes: list[RequestOutcome], duration: float) -> ServingResults:
    """Aggregate per-request outcomes into the serving figures."""
    ok = [o for o in outcomes if o.ok]
    tpot = [_tpot(o) for o in ok if o.output_tokens > 1]
    good = [o for o in ok if all(_latency_s(o, metric) * 1e3 <= ms for metric, ms in cfg.goodput)]
    itl = [x for o in ok for x in o.itl]
    inputs, outputs = sum(o.prompt_tokens for o in ok), sum(o.output_tokens for o in ok)
    return ServingResults(
        base_url=cfg.base_url, model=model, num_prompts=cfg.num_prompts, request_rate=cfg.request_rate,
        max_concurrency=cfg.max_concurrency, completed=len(ok), failed=len(outcomes) - len(ok), duration_s=duration,
        total_input_tokens=inputs, total_output_tokens=outputs, request_throughput=len(ok) / duration,
        output_throughput=outputs / duration, total_token_throughput=(inputs + outputs) / duration,
        ttft_ms=summary_ms([o.ttft for o in ok]), tpot_ms=summary_ms(tpot), itl_ms=summary_ms(itl),
        e2e_ms=summary_ms([o.latency for o in ok]), goodput=dict(cfg.goodput),
        request_goodput=len(good) / duration if cfg.goodput else None, errors=[o.error for o in outcomes if not o.ok],
        ttft_samples_ms=[o.ttft * 1e3 for o in ok], itl_samples_ms=[x * 1e3 for x in itl],
        e2e_samples_ms=[o.latency * 1e3 for o in ok], dataset=cfg.dataset)
