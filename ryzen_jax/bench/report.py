"""Results out: a JSON file, a plain-text table, and PNG plots (matplotlib, from the
``bench`` extra) — for an offline run (:class:`BenchmarkResults`) or a serving run
(:class:`ServingResults`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ryzen_jax.bench.offline import EngineRun
from ryzen_jax.bench.serving import ServingResults
from ryzen_jax.bench.suite import BenchmarkResults


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, dicts and lists as plain JSON values; NaN and infinities become null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_jsonable(obj.item())
    return obj


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What produced a result: the command, when (UTC), the versions of what ran it, and
    the checkout's commit where there is one."""
    import importlib.metadata
    import platform
    import subprocess
    import sys
    import time

    versions = {"python": platform.python_version()}
    for dist in ("ryzen_jax", "jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    argv = sys.argv if argv is None else argv
    return {"command": " ".join(argv), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions, "git_commit": commit}


def write_json(results: BenchmarkResults | ServingResults, path: str, *, argv: list[str] | None = None) -> str:
    """Write the results (every field, samples included) and their ``provenance`` as
    JSON, through a temporary file renamed into place (a failed write leaves no half
    file, nor loses an older one); return the path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({**to_jsonable(results), "provenance": provenance(argv)}, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _row(name: str, cells: list[str], widths: list[int]) -> str:
    return "  ".join([name.ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells, widths[1:])])


def offline_table(r: BenchmarkResults) -> str:
    """The offline figures: per batch, ours (at tp, and at tp = 1), the peer and how
    many times better ours is, then the floors and the communication."""
    hw, c = r.hardware, r.config
    load = f", load average {hw.load_average[0]:.1f}" if hw.load_average else ""
    procs = (f" in {hw.processes} processes (process 0's figures; tp=1 and HF on its first device)"
             if hw.processes > 1 else "")
    lines = [f"{c.label}: {r.params / 1e6:.1f}M parameters, {c.dtype}, prompt {c.seq_len}, "
             f"{c.new_tokens} new tokens, greedy",
             f"machine: {hw.backend}{'' if hw.backend == 'cpu' else f' ({hw.device_kind})'} "
             f"({hw.cpu_model}, {hw.cpu_count} cores{load}), {hw.devices} devices{procs}; "
             f"bandwidth {hw.bandwidth_gbps:.1f} GB/s, matmul {hw.matmul_gflops:.0f} GFLOP/s"
             + next((f"; HF on {b.peer.device} ({b.peer.torch_threads} threads)" for b in r.batches if b.peer), "")]
    peer_name = "HF" if r.peer_skipped is None else f"HF ({r.peer_skipped})"
    for b in r.batches:
        heads = [f"ours tp={r.tp}"] + (["ours tp=1"] if b.tp1 and r.tp != 1 else []) + [peer_name, "×HF"]
        if b.tp1 and r.tp != 1:
            heads.append("×HF tp=1")
        widths = [30] + [max(11, len(h)) for h in heads]
        lines += ["", _row(f"batch {b.batch}", heads, widths)]

        def add(name: str, key: str, pick, digits: int = 2):
            cells = [_fmt(pick(b.ours), digits)]
            if b.tp1 and r.tp != 1:
                cells.append(_fmt(pick(b.tp1), digits))
            cells.append(_fmt(pick(b.peer), digits) if b.peer else "-")
            cells.append(_fmt(b.vs_peer[key].advantage) + "x" if key in b.vs_peer else "-")
            if b.tp1 and r.tp != 1:
                cells.append(_fmt(b.vs_peer_tp1[key].advantage) + "x" if key in b.vs_peer_tp1 else "-")
            lines.append(_row(name, cells, widths))

        add("time to first token (ms)", "ttft_ms", lambda x: x.ttft_ms)
        for q in ("p50", "p90", "p99"):
            add(f"token latency {q.upper()} (ms)", f"token_latency_{q}_ms", lambda x, q=q: x.token_latency_ms[q])
        add("end-to-end (ms)", "e2e_ms", lambda x: x.e2e_ms, 1)
        add("tokens/s", "tokens_per_s", lambda x: x.tokens_per_s, 1)
        add("decode tokens/s", "decode_tokens_per_s", lambda x: x.decode_tokens_per_s, 1)
        add("decode step, in the loop (ms)", "decode_step_ms",
            lambda x: x.loop_step_ms if isinstance(x, EngineRun) else x.decode_step_ms)
        add("decode step, program alone (ms)", "-", lambda x: x.decode_step_ms if isinstance(x, EngineRun) else None)
        f = b.ours.floor
        lines.append(f"  floor: {(f.weight_bytes + f.kv_bytes) / 1e6:.1f} MB/step → {f.bandwidth_ms:.2f} ms "
                     f"(bandwidth), {f.flops / 1e9:.2f} GFLOP → {f.compute_ms:.2f} ms (compute); decode step = "
                     f"{b.ours.step_over_bandwidth_floor:.2f}x the bandwidth floor"
                     + (f" (tp=1: {b.tp1.step_over_bandwidth_floor:.2f}x)" if b.tp1 and r.tp != 1 else "")
                     + (f"; HF's step = {b.peer_step_over_bandwidth_floor:.2f}x it (the most ×HF a decode step at "
                        "the floor gets)" if b.peer_step_over_bandwidth_floor else ""))
        lines.append(f"  the step's matmuls alone ({b.ours.matmul_kernel}): {b.ours.matmuls_alone_ms:.2f} ms "
                     f"({b.ours.matmuls_alone_ms / f.bandwidth_ms:.2f}x the bandwidth floor); decode step = "
                     f"{b.ours.step_over_matmuls_alone:.2f}x them")
        cm = b.ours.comm
        if cm.tp > 1:
            lines.append(f"  communication per step: {cm.total_count} collectives, {cm.total_bytes / 1e3:.1f} kB "
                         f"(Megatron floor {cm.megatron_count} all-reduces, {cm.megatron_bytes / 1e3:.1f} kB; "
                         f"beyond it: {', '.join(cm.extra) or 'none'}); those collectives alone "
                         f"{b.ours.collectives_alone_ms:.2f} ms = {100 * b.ours.comm_share:.1f}% of the step "
                         "(the guide's target: under 10%)")
        lines.append(f"  per device: parameters {b.ours.params_bytes_per_device / 1e6:.1f} MB, KV cache "
                     f"{b.ours.cache_bytes_per_device / 1e6:.2f} MB, XLA temporaries "
                     f"{b.ours.xla_temp_bytes_per_device / 1e6:.2f} MB"
                     + (f"; speedup vs tp=1 {b.speedup_vs_tp1:.2f}x" if b.speedup_vs_tp1 and r.tp != 1 else "")
                     + (f"; same tokens as HF {100 * b.same_tokens_as_peer:.0f}%" if b.peer else ""))
    lines += ["", "targets: " + ", ".join(f"{k}: {'-' if v is None else ('yes' if v else 'NO')}"
                                        for k, v in r.targets.items())]
    return "\n".join(lines)


def serving_table(r: ServingResults) -> str:
    """The serving figures, as vLLM's serving benchmark lays them out."""
    lines = [f"server {r.base_url}: {r.completed} completed, {r.failed} failed of {r.num_prompts} "
             f"in {r.duration_s:.2f} s (request rate {r.request_rate}, max concurrency {r.max_concurrency}; "
             f"prompts {'from ' + r.dataset if r.dataset else 'of random words'})",
             f"request throughput {r.request_throughput:.2f} req/s, output tokens {r.output_throughput:.1f} tok/s, "
             f"total tokens {r.total_token_throughput:.1f} tok/s"]
    if r.request_goodput is not None:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in r.goodput.items())
        lines.append(f"request goodput ({slo}): {r.request_goodput:.2f} req/s")
    widths = [16, 10, 10, 10]
    lines.append(_row("(ms)", ["mean", "P50", "P99"], widths))
    for name, s in (("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms), ("ITL", r.itl_ms), ("E2E", r.e2e_ms)):
        lines.append(_row(name, [_fmt(s["mean"]), _fmt(s["p50"]), _fmt(s["p99"])], widths))
    if r.errors:
        lines.append("errors: " + "; ".join(r.errors[:5]))
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def offline_plots(r: BenchmarkResults, out_dir: str) -> list[str]:
    """Three PNGs: per-token latency distributions, tokens/s against batch size, and
    ours against the peer. Returns their paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, len(r.batches), figsize=(5 * len(r.batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], r.batches):
        series = [(f"ours tp={r.tp}", b.ours.token_latency_samples_ms)]
        if b.tp1 and r.tp != 1:
            series.append(("ours tp=1", b.tp1.token_latency_samples_ms))
        if b.peer:
            series.append(("HF transformers", b.peer.token_latency_samples_ms))
        top = max(max(s) for _, s in series if s)
        for name, s in series:
            ax.hist(s, bins=40, range=(0, top), alpha=0.6, label=name)
        ax.set(title=f"batch {b.batch}", xlabel="time between tokens (ms)", ylabel="tokens")
        ax.legend()
    paths.append(_save(fig, plt, out_dir, "latency_distribution.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sizes = [b.batch for b in r.batches]
    ax.plot(sizes, [b.ours.tokens_per_s for b in r.batches], "o-", label=f"ours tp={r.tp}")
    if all(b.tp1 for b in r.batches) and r.tp != 1:
        ax.plot(sizes, [b.tp1.tokens_per_s for b in r.batches], "s-", label="ours tp=1")
    if all(b.peer for b in r.batches):
        ax.plot(sizes, [b.peer.tokens_per_s for b in r.batches], "^-", label="HF transformers")
    ax.set(xscale="log", xlabel="batch size", ylabel="tokens/s (end to end)", xticks=sizes, xticklabels=sizes)
    ax.legend()
    paths.append(_save(fig, plt, out_dir, "tokens_per_s_vs_batch.png"))

    if all(b.peer for b in r.batches):
        keys = ["ttft_ms", "token_latency_p50_ms", "token_latency_p99_ms", "e2e_ms", "tokens_per_s"]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / len(r.batches)
        for i, b in enumerate(r.batches):
            ax.bar([k + i * width for k in range(len(keys))], [b.vs_peer[k].advantage for k in keys], width,
                   label=f"batch {b.batch}")
        ax.axhline(1, color="black", lw=0.8)
        ax.set_xticks([k + width * (len(r.batches) - 1) / 2 for k in range(len(keys))], keys, rotation=15)
        ax.set(ylabel="times better than HF (>1: ours)", title=f"ours (tp={r.tp}) vs Hugging Face transformers")
        ax.legend()
        paths.append(_save(fig, plt, out_dir, "ours_vs_peer.png"))
    return paths


def serving_plots(r: ServingResults, out_dir: str) -> list[str]:
    """One PNG: the distributions of TTFT, inter-token latency and end-to-end latency."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, samples) in zip(axes, (("TTFT", r.ttft_samples_ms), ("ITL", r.itl_samples_ms),
                                          ("E2E", r.e2e_samples_ms))):
        ax.hist(samples, bins=40)
        ax.set(title=name, xlabel="ms", ylabel="count")
    return [_save(fig, plt, out_dir, "serving_latency_distribution.png")]


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}.png")
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
