"""Helpers for tests that run real process groups (gloo over loopback) through scripts/launch.py."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import ryzen_jax as rj
from ryzen_jax.checkpoint.loader import abstract_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 17, 42, 99, 3, 243, 128, 64, 5, 77, 31], [1, 17, 42, 99, 3]]  # what tests/mp_worker.py generates for
_RANK_LINE = re.compile(r"^\[rank (\d+)\] (\{.*\})$")


def user_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has: without the test session's 8 simulated
    devices (its other XLA flags kept)."""
    env = dict(os.environ)
    flags = re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "", env.pop("XLA_FLAGS", "")).strip()
    return {**env, **({"XLA_FLAGS": flags} if flags else {}), **extra}


def launch(nproc: int, devices_per_proc: int, *command: str, max_restarts: int = 0, env: dict | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/launch.py`` on ``command`` (a python script and its arguments), as a user would."""
    args = [sys.executable, "scripts/launch.py", "--nproc", str(nproc), "--devices-per-proc", str(devices_per_proc),
            "--max-restarts", str(max_restarts), "--", sys.executable, *command]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=user_env(**(env or {})), timeout=timeout)


def rank_json(stdout: str) -> list[dict]:
    """The JSON objects the processes printed, each with the launcher's rank as "rank"."""
    out = []
    for line in stdout.splitlines():
        m = _RANK_LINE.match(line)
        if m:
            out.append({**json.loads(m.group(2)), "rank": int(m.group(1))})
    return out


def run_worker(model_dir: str, tp: int, dp: int, nproc: int = 2, devices_per_proc: int = 2, *extra: str,
               max_restarts: int = 0) -> tuple[list[dict], subprocess.CompletedProcess]:
    """tests/mp_worker.py under the launcher: each process's final result (ordered by rank), and the run."""
    run = launch(nproc, devices_per_proc, "tests/mp_worker.py", model_dir, str(tp), str(dp), *extra,
                 max_restarts=max_restarts)
    assert run.returncode == 0, run.stderr[-3000:]
    results = sorted((r for r in rank_json(run.stdout) if "tokens" in r), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(nproc)), run.stdout[-3000:]
    return results, run


def own_slice_bytes(model_dir: str, tp: int, nproc: int) -> int:
    """Checkpoint bytes one of ``nproc`` processes must read for a tp-way model (float32):
    its 1/nproc of every sharded weight plus the whole of every replicated one."""
    cfg = rj.ModelConfig.from_pretrained(model_dir)
    _, _, specs = abstract_model(cfg, rj.TensorParallelConfig(tp_size=tp), "float32")
    return sum(4 * math.prod(s.shape) // (nproc if any(a is not None for a in s.sharding.spec) else 1)
               for s in specs.values())
