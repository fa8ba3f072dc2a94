"""Real multi-process runs on CPU (2 processes × 2 devices, gloo over loopback, started
by scripts/launch.py): the mesh spans processes, each process reads only its own slices
of the checkpoint, and the tokens are Hugging Face's."""

from __future__ import annotations

import pytest

import ryzen_jax as rj
from tests import hf_models
from tests.mp_helpers import PROMPTS, own_slice_bytes, run_worker


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
    results, _ = run_worker(model_dir, tp=4, dp=1)
    own_half = own_slice_bytes(model_dir, tp=4, nproc=2)
    assert [r["process"] for r in results] == [0, 1] and all(r["devices"] == 4 for r in results)
    for r in results:
        assert r["tokens"] == reference
        assert r["bytes_read"] == own_half < r["param_bytes"]


def test_data_parallel_across_processes(converted, reference):
    """dp = 2 (one replica per process) × tp = 2: batch rows split across processes."""
    for r in run_worker(converted, tp=2, dp=2)[0]:
        assert r["tokens"] == reference
        assert r["bytes_read"] == r["param_bytes"]  # each process holds a whole replica
