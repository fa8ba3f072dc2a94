"""Prometheus metrics of the server (text exposition at ``GET /metrics``).

Names follow vLLM's where they mean the same thing, so existing dashboards map over:
requests by outcome, prompt and generated tokens, time to first token, inter-token
latency, end-to-end latency, queue depth and busy slots.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)


class ServerMetrics:
    """One registry per server (tests may run several in a process)."""

    def __init__(self, prefix: str = "ryzen_jax"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "Finished requests by outcome (ok, error, cancelled, rejected)",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{prefix}_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{prefix}_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{prefix}_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge(f"{prefix}_busy_slots", "Decode slots holding a request", registry=r)
        for outcome in ("ok", "error", "cancelled", "rejected"):
            self.requests.labels(outcome)  # present from the start, at 0

    def finish(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
