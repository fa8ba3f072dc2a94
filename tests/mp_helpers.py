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


class LaunchedServer:
    """``scripts/serve.py`` under ``scripts/launch.py`` — 2 processes × 2 devices, no
    restarts, on a free loopback port — with every output line kept (``lines``)."""

    def __init__(self, *serve_args: str):
        import threading

        from ryzen_jax.launcher import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "scripts/launch.py", "--nproc", "2", "--devices-per-proc", "2", "--max-restarts", "0",
             "--", sys.executable, "scripts/serve.py", *serve_args, "--port", str(self.port), "--step-timeout", "10"],
            cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    def log(self) -> str:
        return "".join(self.lines)[-3000:]

    def wait_healthy(self, timeout_s: float = 300) -> None:
        import time

        import httpx

        deadline = time.time() + timeout_s
        while True:
            assert self.proc.poll() is None and time.time() < deadline, self.log()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def kill_the_follower(self, request) -> None:
        """SIGKILL rank 1, then ``request()`` (an HTTP call): it fails (a 5xx, or the
        connection closes as the launcher takes the group down) within a minute rather
        than hanging, and the launcher reports the failed rank."""
        import signal
        import time

        import httpx

        follower = next(int(line.rsplit("pid ", 1)[1].strip(" )\n")) for line in self.lines
                        if "[rank 1]" in line and "following the leader" in line)
        os.kill(follower, signal.SIGKILL)
        t0 = time.time()
        try:
            assert request().status_code >= 500
        except httpx.TransportError:
            pass
        assert time.time() - t0 < 60
        assert self.proc.wait(timeout=60) != 0, self.log()
        assert any("rank 1" in line and "SIGKILL" in line for line in self.lines), self.log()

    def __enter__(self) -> "LaunchedServer":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
