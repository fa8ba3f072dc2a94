"""The guide's ``DistributedInferenceBenchmark``: one offline run that measures the
machine, our engine at the configured tp (and at tp = 1 for the speedup) and the peer
on the same checkpoint, and puts every figure next to its counterpart.

    from ryzen_jax.bench import BenchmarkConfig, DistributedInferenceBenchmark
    results = DistributedInferenceBenchmark(BenchmarkConfig(model_size="small", batch_size=(1, 8))
                                            ).run_comprehensive_benchmark()
    print(results.latency_p50, results.throughput, results.speedup_factor)
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import types
from typing import Callable

import jax

from ryzen_jax.bench import hardware, peer as peer_mod
from ryzen_jax.bench.config import BenchmarkConfig, BenchmarkConfigError
from ryzen_jax.bench.hardware import Hardware
from ryzen_jax.bench.offline import EngineRun, measure_engine, with_bandwidth
from ryzen_jax.bench.peer import PeerRun
from ryzen_jax.bench.shapes import check_fits, ensure_checkpoint, random_prompts
from ryzen_jax.runtime import wait_for_all

log = logging.getLogger("ryzen_jax.bench")

#: the issue's targets: decode step within this multiple of the bandwidth floor (batch 1) ...
TARGET_STEP_OVER_FLOOR = 1.5
#: ... and at least this many times the peer's tokens/s at every batch size
TARGET_TOKENS_PER_S_OVER_PEER = 2.0
#: how long the other processes of a run wait for process 0 to write the checkpoint, and
#: to run the one-device baseline and the peer (a "7B" shape on a CPU takes many minutes)
CHECKPOINT_TIMEOUT_S = 3600.0
ALONE_TIMEOUT_S = 4 * 3600.0


@dataclasses.dataclass
class Comparison:
    """One figure for ours and the peer. ``advantage`` is how many times better ours is
    (peer ÷ ours for times, ours ÷ peer for rates): above 1, ours is better."""

    ours: float
    peer: float
    advantage: float


@dataclasses.dataclass
class BatchResult:
    batch: int
    ours: EngineRun  # at the configured tp
    tp1: EngineRun | None  # at tp = 1 (the speedup's baseline), None when not run
    peer: PeerRun | None
    speedup_vs_tp1: float | None  # tokens/s at tp ÷ at tp = 1
    same_tokens_as_peer: float | None  # share of generated tokens equal to the peer's, up to the first difference
    vs_peer: dict[str, Comparison]  # ours at the configured tp against the peer
    vs_peer_tp1: dict[str, Comparison]  # ours at tp = 1 against the peer
    # the peer's decode step (in its loop) ÷ the one-device bandwidth floor: the most
    # times the peer's tokens/s a decode step at that floor could reach, so a machine
    # whose memory, not the engine, bounds the ×HF column says so; None without a peer
    peer_step_over_bandwidth_floor: float | None = None


@dataclasses.dataclass
class BenchmarkResults:
    """Everything one run measured. The guide's headline fields: ``latency_p50`` and
    ``latency_p99`` (ms between tokens, streaming, at the smallest batch), ``throughput``
    (tokens/s end to end at the largest batch) and ``speedup_factor`` (that throughput
    ÷ the same at tp = 1; None when tp = 1 was not run)."""

    config: BenchmarkConfig
    shape: dict
    params: int
    hardware: Hardware
    tp: int
    checkpoint: str
    batches: list[BatchResult]
    latency_p50: float
    latency_p99: float
    throughput: float
    speedup_factor: float | None
    targets: dict[str, bool | None]
    wall_s: float
    peer_skipped: str | None = None  # why the peer did not run


def _compare(ours: EngineRun, peer: PeerRun) -> dict[str, Comparison]:
    times = {"ttft_ms": (ours.ttft_ms, peer.ttft_ms),
             "token_latency_p50_ms": (ours.token_latency_ms["p50"], peer.token_latency_ms["p50"]),
             "token_latency_p90_ms": (ours.token_latency_ms["p90"], peer.token_latency_ms["p90"]),
             "token_latency_p99_ms": (ours.token_latency_ms["p99"], peer.token_latency_ms["p99"]),
             "e2e_ms": (ours.e2e_ms, peer.e2e_ms),
             # both in their generation loops, host included (ours alone is for the floors)
             "decode_step_ms": (ours.loop_step_ms, peer.decode_step_ms)}
    rates = {"tokens_per_s": (ours.tokens_per_s, peer.tokens_per_s),
             "decode_tokens_per_s": (ours.decode_tokens_per_s, peer.decode_tokens_per_s)}
    out = {k: Comparison(o, p, p / o) for k, (o, p) in times.items()}
    out.update({k: Comparison(o, p, o / p) for k, (o, p) in rates.items()})
    return out


def _peer_over_floor(peer: PeerRun | None, ours: EngineRun, hw: Hardware) -> float | None:
    """The peer's step over the bandwidth floor of one device (the peer runs on one):
    ``ours``'s floor undivided by its tp where each device reads its own memory (see
    ``offline.floors``); None without a peer."""
    if peer is None:
        return None
    return peer.decode_step_ms / (ours.floor.bandwidth_ms * (1 if hw.shared_memory else ours.tp))


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Share of tokens generated identically, each row counted up to its first difference."""
    same = total = 0
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        same, total = same + n, total + max(len(a), len(b))
    return same / total if total else float("nan")


def peer_skip_reason(c: BenchmarkConfig) -> str | None:
    """Why the peer cannot run this configuration (None: it can)."""
    from ryzen_jax.checkpoint.orbax_io import is_converted

    if not c.peer:
        return "disabled"
    if not peer_mod.available():
        return "torch is not installed"
    if c.model is not None and is_converted(c.model):
        return "a converted checkpoint: transformers reads the Hugging Face directory it came from"
    return None


class DistributedInferenceBenchmark:
    """Runs a :class:`BenchmarkConfig`. ``progress`` receives one line per stage
    (default: the ``ryzen_jax.bench`` logger)."""

    def __init__(self, config: BenchmarkConfig, *, progress: Callable[[str], None] | None = None):
        self.config = config
        self.progress = progress or log.info
        #: (tp, batch) -> optimized HLO text of the compiled decode program, for inspection
        self.decode_hlo: dict[tuple[int, int], str] = {}

    def _tps(self) -> tuple[int, list[int]]:
        """(the tp under test, every tp to run: it and, for the speedup, 1)."""
        from ryzen_jax.api import choose_tp
        from ryzen_jax.sharding import ShardingError, TensorParallelConfig

        c, d = self.config, self.config.shape
        n, procs = len(jax.devices()), jax.process_count()
        split = dict(num_heads=d.num_heads, num_kv_heads=d.num_kv_heads, intermediate_size=d.intermediate_size)
        tp = choose_tp(types.SimpleNamespace(**split), n) if c.world_size is None else c.world_size
        if tp > n:
            raise BenchmarkConfigError(f"world_size {tp} needs {tp} devices but {n} are visible; lower it "
                                       "(on CPU, scripts/benchmark.py simulates 4)")
        if procs > 1 and tp != n:
            raise BenchmarkConfigError(f"world_size (--tp) {tp}: a run of {procs} processes measures the model split "
                                       f"over all {n} of their devices; pass {n} (or leave it unset), or run one "
                                       "process")
        try:
            TensorParallelConfig(tp_size=tp).validate(**split)
        except ShardingError as e:
            raise BenchmarkConfigError(f"world_size: {e}") from None
        return tp, [tp] + ([1] if c.speedup and tp > 1 else [])

    def run_comprehensive_benchmark(self) -> BenchmarkResults:
        import ryzen_jax as rj
        from ryzen_jax.runtime import cache_root

        t_start = time.perf_counter()
        c = self.config
        tp, tps = self._tps()
        params = c.params
        check_fits(c.dims if c.model is None else params, c.dtype, tp=tp,
                   platform=jax.default_backend())  # before any expensive work
        # In a run of several processes every one takes part in the split model; the
        # one-device baseline (on process 0's first device) and the peer run in process 0
        # alone while the others wait at the end.
        main = jax.process_index() == 0
        if not main:
            tps = [tp]
        peer_skipped = peer_skip_reason(c)
        run_peer = main and peer_skipped is None
        stages = 1 + 1 + len(tps) * len(c.batch_sizes) + (len(c.batch_sizes) if run_peer else 0)
        step = iter(range(1, stages + 1))
        say = lambda msg: self.progress(f"[{next(step)}/{stages}] {msg}")  # noqa: E731

        say(f"measuring the machine (bandwidth, matmul rate) on {jax.default_backend()}")
        hw = hardware.measure(c.dtype, megabytes=c.probe_megabytes)
        if c.model is not None:
            path = c.model
            say(f"{c.label}: {params / 1e6:.1f}M parameters")
        else:
            cache_dir = c.cache_dir or os.path.join(cache_root(), "bench")
            say(f"checkpoint for {c.label} ({params / 1e6:.1f}M parameters) in {cache_dir}")
            if main:
                path = ensure_checkpoint(c.dims, cache_dir, seed=c.seed, dtype=c.dtype, progress=True)
            wait_for_all("bench-checkpoint", CHECKPOINT_TIMEOUT_S)
            if not main:  # writes its own copy only where process 0's is not on a shared filesystem
                path = ensure_checkpoint(c.dims, cache_dir, seed=c.seed, dtype=c.dtype, progress=True)
        prompts = {b: random_prompts(b, c.seq_len, c.shape.vocab_size, seed=c.seed + b) for b in c.batch_sizes}

        engine: dict[int, dict[int, EngineRun]] = {}
        for t in tps:
            lm = rj.load_model(path, tp=t, dtype=c.dtype, max_seq_len=c.max_seq_len, progress=True,
                               devices=None if t == tp else jax.local_devices())
            engine[t] = {}
            for b in c.batch_sizes:
                say(f"ours: tp={t}, batch {b}, prompt {c.seq_len}, {c.new_tokens} new tokens")
                engine[t][b] = measure_engine(lm.generator, prompts[b], c.new_tokens, hw, repeats=c.repeats)
                self.decode_hlo[t, b] = lm.generator.decode_program(b).as_text()
            del lm
            gc.collect()
        # The bandwidth again, after our runs: a shared machine's varies by tens of percent
        # within minutes, and the floors take the best of both (never a floor a step beats
        # because the first reading was low).
        again = hardware.measure_bandwidth(c.probe_megabytes) if main else {}
        if max(again.values(), default=0.0) > hw.bandwidth_gbps:
            old = hw.bandwidth_gbps
            hw = dataclasses.replace(hw, bandwidth_gbps=max(again.values()), bandwidth_by_method={
                k: max(v, again.get(k, 0.0)) for k, v in hw.bandwidth_by_method.items()})
            engine = {t: {b: with_bandwidth(r, old, hw.bandwidth_gbps) for b, r in runs.items()}
                      for t, runs in engine.items()}

        peers: dict[int, PeerRun] = {}
        if run_peer:
            p = peer_mod.Peer(path, c.dtype, peer_mod.peer_device(jax.default_backend()))
            for b in c.batch_sizes:
                say(f"peer (Hugging Face transformers on {p.device}): batch {b}")
                peers[b] = p.measure(prompts[b], c.new_tokens, repeats=c.repeats)
            del p
            gc.collect()
        wait_for_all("bench-done", ALONE_TIMEOUT_S)

        batches = []
        for b in c.batch_sizes:
            ours, one, theirs = engine[tp][b], engine.get(1, {}).get(b), peers.get(b)
            batches.append(BatchResult(
                batch=b, ours=ours, tp1=one, peer=theirs,
                speedup_vs_tp1=ours.tokens_per_s / one.tokens_per_s if one else None,
                same_tokens_as_peer=_agreement(ours.generated_ids, theirs.generated_ids) if theirs else None,
                vs_peer=_compare(ours, theirs) if theirs else {},
                vs_peer_tp1=_compare(one, theirs) if theirs and one and tp != 1 else {},
                peer_step_over_bandwidth_floor=_peer_over_floor(theirs, ours, hw)))
        small, large = batches[0], batches[-1]
        targets = {
            "decode_step_within_1.5x_bandwidth_floor_at_batch_1":
                (engine[tp][1].step_over_bandwidth_floor <= TARGET_STEP_OVER_FLOOR) if 1 in engine[tp] else None,
            **{f"tokens_per_s_at_least_2x_peer_at_batch_{r.batch}":
               (r.vs_peer["tokens_per_s"].advantage >= TARGET_TOKENS_PER_S_OVER_PEER) if r.peer else None
               for r in batches},
        }
        return BenchmarkResults(
            config=c, shape=dataclasses.asdict(c.shape), params=params, hardware=hw, tp=tp, checkpoint=path,
            batches=batches, latency_p50=small.ours.token_latency_ms["p50"],
            latency_p99=small.ours.token_latency_ms["p99"], throughput=large.ours.tokens_per_s,
            speedup_factor=large.speedup_vs_tp1 if tp > 1 else (1.0 if c.speedup else None), targets=targets,
            wall_s=time.perf_counter() - t_start,
            peer_skipped=peer_skipped)

