"""Real multi-process runs on CPU (2 processes × 2 devices, gloo over loopback): the
mesh spans processes, each process reads only its own slices of the checkpoint, and
the tokens are Hugging Face's."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

import ryzen_jax as rj
from ryzen_jax.checkpoint.loader import abstract_model
from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 17, 42, 99, 3, 243, 128, 64, 5, 77, 31], [1, 17, 42, 99, 3]]  # as in tests/mp_worker.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(model_dir: str, tp: int, dp: int, nproc: int = 2, devices_per_proc: int = 2) -> list[dict]:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "tests/mp_worker.py", str(i), str(nproc), port, model_dir, str(tp),
                               str(dp), str(devices_per_proc)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture(scope="module")
def reference(hf_model_dir):
    model = hf_models.load(hf_model_dir("llama_gqa"))
    return [hf_models.greedy(model, p, 16) for p in PROMPTS]


@pytest.fixture(scope="module")
def converted(hf_model_dir, tmp_path_factory):
    return rj.convert_hf(hf_model_dir("llama_gqa"), str(tmp_path_factory.mktemp("mp") / "conv"), progress=False)


@pytest.mark.parametrize("source", ["safetensors", "orbax"])
def test_two_processes_read_only_their_slices(source, hf_model_dir, converted, reference):
    """tp = 4 over 2 processes × 2 devices: each process takes half of every sharded
    weight (plus the replicated norms) from the checkpoint, and both print HF's tokens."""
    model_dir = hf_model_dir("llama_gqa") if source == "safetensors" else converted
    results = run_group(model_dir, tp=4, dp=1)
    cfg = rj.ModelConfig.from_pretrained(model_dir)
    _, _, specs = abstract_model(cfg, rj.TensorParallelConfig(tp_size=4), "float32")
    own_half = sum(4 * math.prod(s.shape) // (2 if any(a is not None for a in s.sharding.spec) else 1)
                   for s in specs.values())
    assert [r["process"] for r in results] == [0, 1] and all(r["devices"] == 4 for r in results)
    for r in results:
        assert r["tokens"] == reference
        assert r["bytes_read"] == own_half < r["param_bytes"]


def test_data_parallel_across_processes(converted, reference):
    """dp = 2 (one replica per process) × tp = 2: batch rows split across processes."""
    for r in run_group(converted, tp=2, dp=2):
        assert r["tokens"] == reference
        assert r["bytes_read"] == r["param_bytes"]  # each process holds a whole replica
