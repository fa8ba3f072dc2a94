"""HF → Orbax conversion and sharded restore: bit-identical parameters, atomic writes,
bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import ryzen_jax as rj
from ryzen_jax.checkpoint import orbax_io
from ryzen_jax.checkpoint.loader import DistributedCheckpointLoader
from ryzen_jax.sharding import TensorParallelConfig
from tests import mp_helpers


def _arrays(model) -> dict:
    from flax import nnx

    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def converted(hf_model_dir, tmp_path_factory):
    out = {}

    def get(name):
        if name not in out:
            out[name] = rj.convert_hf(hf_model_dir(name), str(tmp_path_factory.mktemp("conv") / name), progress=False)
        return out[name]

    return get


@pytest.mark.parametrize("name,tp,dp", [("llama_gqa", 2, 1), ("llama_mqa", 4, 1), ("qwen2_bias", 4, 1),
                                        ("llama_mha_tied", 2, 2)])
def test_restore_is_bit_identical_to_direct_load(name, tp, dp, hf_model_dir, converted):
    """Restoring the converted checkpoint onto a mesh gives exactly the parameters (and
    shardings) that reading the HF safetensors directly gives."""
    layout = TensorParallelConfig(tp_size=tp, dp_size=dp)
    direct = _arrays(DistributedCheckpointLoader(hf_model_dir(name), progress=False).load(layout))
    restored = _arrays(DistributedCheckpointLoader(converted(name), progress=False).load(layout))
    assert direct.keys() == restored.keys()
    for path in direct:
        a, b = direct[path], restored[path]
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_converted_dir_is_self_contained(converted, hf_model_dir):
    out = converted("llama_gqa")
    meta = json.load(open(os.path.join(out, orbax_io.MARKER)))
    assert meta["format"] == orbax_io.FORMAT and meta["tensors"][0] == "embed.embedding"
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert not [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert rj.ModelConfig.from_pretrained(out) == rj.ModelConfig.from_pretrained(hf_model_dir("llama_gqa"))


def test_prefetch_does_not_change_the_result(converted):
    layout = TensorParallelConfig(tp_size=2)
    a = _arrays(DistributedCheckpointLoader(converted("llama_gqa"), enable_prefetch=True, progress=False).load(layout))
    b = _arrays(DistributedCheckpointLoader(converted("llama_gqa"), enable_prefetch=False, progress=False).load(layout))
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]))


def test_interrupted_conversion_leaves_nothing(hf_model_dir, tmp_path, monkeypatch):
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_save(*args, **kwargs)

    real_save = orbax_io.save_tensor
    monkeypatch.setattr(orbax_io, "save_tensor", failing_save)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        rj.convert_hf(hf_model_dir("llama_gqa"), str(out), progress=False)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no half-written temporary directory either


def test_conversion_memory_is_about_the_largest_tensor(tmp_path):
    """Peak Python-heap memory while converting stays near the largest tensor, far below
    one layer, let alone the model."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    largest = 512 * 1024 * 4  # an MLP matrix
    layer = (4 * 512 * 512 + 3 * 512 * 1024) * 4
    total = layer * 4
    # in a fresh process, so that no thread left by an earlier test allocates meanwhile
    script = ("import sys, tracemalloc, ryzen_jax as rj; tracemalloc.start(); "
              "rj.convert_hf(sys.argv[1], sys.argv[2], progress=False); print(tracemalloc.get_traced_memory()[1])")
    env = mp_helpers.user_env()
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf"), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    print(f"conversion peak {peak / 1e6:.2f} MB, largest tensor {largest / 1e6:.2f} MB, "
          f"one layer {layer / 1e6:.1f} MB, model {total / 1e6:.1f} MB")
    assert peak < 3 * largest < layer


def test_streamed_safetensors_writer_reads_back_through_the_reference_library(tmp_path):
    """Our one-tensor-at-a-time writer against the safetensors library (via PyTorch, for
    bfloat16): every tensor's dtype, shape and bytes, and the metadata; a tensor that is
    not the one its spec names, or one too many, is refused."""
    import ml_dtypes
    from safetensors import safe_open

    from ryzen_jax.checkpoint.safetensors_io import write_safetensors

    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((5, 3), dtype=np.float32),
              "b": rng.standard_normal((7,), dtype=np.float32).astype(ml_dtypes.bfloat16),
              "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    specs = {k: (v.dtype, v.shape) for k, v in arrays.items()}
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, specs, iter(arrays.items()), metadata={"format": "pt"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(arrays)
        for name, want in arrays.items():
            got = f.get_tensor(name)
            if want.dtype == ml_dtypes.bfloat16:
                assert got.dtype == torch.bfloat16
                got = got.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(got if isinstance(got, np.ndarray) else got.numpy(), want)
    with pytest.raises(ValueError, match="expected 'b' bfloat16\\[7\\], got 'c.ids'"):
        write_safetensors(path, specs, [("a.weight", arrays["a.weight"]), ("c.ids", arrays["c.ids"])])
    with pytest.raises(ValueError, match="more tensors than specs"):
        write_safetensors(path, {"a.weight": specs["a.weight"]}, iter(arrays.items()))
