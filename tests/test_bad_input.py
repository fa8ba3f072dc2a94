"""Bad input fails early, with the right exception and a message that names the problem.

One test per bad input: unknown/incomplete configs, tensor-parallel sizes that do not
split the model, too few devices, pickled weights, an existing output directory,
requests that do not fit the context and invalid sampling settings, plus the two
command-line scripts' exit codes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import pytest

import ryzen_jax as rj
from ryzen_jax.checkpoint import loader as loader_mod
from ryzen_jax.checkpoint.convert import convert_hf
from ryzen_jax.checkpoint.safetensors_io import CheckpointFormatError
from ryzen_jax.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from ryzen_jax.engine.sampling import SamplingParams
from ryzen_jax.sharding import ShardingError, TensorParallelConfig, make_mesh
from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers / fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def gqa_dir(hf_model_dir):
    return hf_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def gqa_config(gqa_dir) -> dict:
    with open(os.path.join(gqa_dir, "config.json")) as f:
        return json.load(f)


@pytest.fixture
def pickle_dir(tmp_path, gqa_dir):
    """A valid config.json beside junk bytes in pytorch_model.bin (and no safetensors)."""
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(gqa_dir, "config.json"), d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04junk-not-a-real-pickle")
    return str(d)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make any attempt to unpickle fail loudly (the library must never get there)."""

    def refuse(*a, **k):
        raise AssertionError("ryzen_jax tried to unpickle a checkpoint")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", refuse)


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=120)


# -- 1-4: config.json ---------------------------------------------------------------------

@pytest.mark.parametrize("model_type,named", [("gptj", "gptj"), (None, "model_type")], ids=["unknown", "missing"])
def test_unknown_or_missing_model_type(gqa_config, model_type, named):
    raw = {k: v for k, v in gqa_config.items() if k != "model_type"}
    if model_type is not None:
        raw["model_type"] = model_type
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    msg = str(e.value)
    assert named in msg
    for t in SUPPORTED_MODEL_TYPES:
        assert t in msg


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "vocab_size"])
def test_missing_required_field(gqa_config, field):
    raw = {k: v for k, v in gqa_config.items() if k != field}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert repr(field) in str(e.value)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size"])
def test_required_field_null(gqa_config, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(dict(gqa_config, **{field: None}))


def test_unsupported_rope_scaling_type(gqa_config):
    raw = dict(gqa_config, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert "yarn" in str(e.value)
    assert "llama3" in str(e.value)  # lists what is supported


def test_unsupported_rope_scaling_legacy_type_key(gqa_config):
    # transformers 4.x spelling: rope_scaling {"type": ...} and no rope_parameters
    raw = {k: v for k, v in gqa_config.items() if k != "rope_parameters"}
    raw["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ConfigError, match="dynamic"):
        ModelConfig.from_dict(raw)


def test_unsupported_rope_scaling_legacy_type_key_beside_rope_parameters(gqa_config):
    # a transformers-5 file (rope_parameters: {"rope_type": "default"}) plus a 4.x rope_scaling
    raw = dict(gqa_config, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
               rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="dynamic"):
        ModelConfig.from_dict(raw)


def test_llama3_rope_missing_factor(gqa_config):
    raw = dict(gqa_config, rope_scaling={"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64})
    raw.pop("rope_parameters", None)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert "'factor'" in str(e.value)
    assert "llama3" in str(e.value)


def test_config_json_absent(tmp_path):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_pretrained(str(tmp_path))
    assert "config.json" in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_load_model_config_json_absent(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        rj.load_model(str(tmp_path), tp=1, progress=False)


def test_load_model_missing_directory(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        rj.load_model(missing, tp=1, progress=False)


# -- 5-6: tensor parallel splits and devices ----------------------------------------------

def _sharding_msg(tp: int, **sizes) -> str:
    with pytest.raises(ShardingError) as e:
        TensorParallelConfig(tp_size=tp).validate(**sizes)
    return str(e.value)


def test_heads_not_divisible_by_tp():
    msg = _sharding_msg(3, num_heads=8, num_kv_heads=8, intermediate_size=96)
    assert "num_attention_heads=8" in msg and "tp=3" in msg


def test_kv_heads_not_divisible_by_tp():
    msg = _sharding_msg(4, num_heads=12, num_kv_heads=6, intermediate_size=128)
    assert "num_key_value_heads=6" in msg and "tp=4" in msg


def test_kv_heads_fewer_than_tp_and_not_a_divisor():
    msg = _sharding_msg(4, num_heads=12, num_kv_heads=3, intermediate_size=128)
    assert "num_key_value_heads=3" in msg and "tp=4" in msg
    assert "multiple" in msg


def test_intermediate_not_divisible_by_tp():
    msg = _sharding_msg(8, num_heads=8, num_kv_heads=8, intermediate_size=100)
    assert "intermediate_size=100" in msg and "tp=8" in msg


def test_factory_validates_sizes():
    with pytest.raises(ShardingError, match="num_attention_heads=8"):
        rj.create_tensor_parallel_config(tp_size=3, num_attention_heads=8, num_key_value_heads=2,
                                         intermediate_size=96)


def test_load_model_bad_tp_fails_before_reading_weights(gqa_dir, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights were read before the tp check")

    monkeypatch.setattr(loader_mod, "SafetensorsReader", no_weights)
    monkeypatch.setattr(loader_mod, "load_hf_arrays", no_weights)
    monkeypatch.setattr(loader_mod.DistributedCheckpointLoader, "load", no_weights)
    with pytest.raises(ShardingError) as e:
        rj.load_model(gqa_dir, tp=3, progress=False)
    assert "8" in str(e.value) and "tp=3" in str(e.value)


def test_more_devices_than_exist():
    n = len(jax.devices())
    assert n == 8, "conftest sets 8 simulated devices"
    with pytest.raises(ShardingError) as e:
        make_mesh(tp=16, dp=1)
    msg = str(e.value)
    assert "tp=16" in msg and f"only {n}" in msg
    assert "XLA_FLAGS" in msg  # says how to get more simulated devices


def test_tp_times_dp_more_than_devices():
    with pytest.raises(ShardingError) as e:
        make_mesh(tp=4, dp=4)
    assert "16" in str(e.value) and "8" in str(e.value)


@pytest.mark.parametrize("tp,dp", [(0, 1), (2, 0)])
def test_non_positive_mesh_sizes(tp, dp):
    with pytest.raises(ShardingError, match=f"tp={tp}, dp={dp}"):
        make_mesh(tp=tp, dp=dp)


def test_load_model_too_many_devices(gqa_dir, monkeypatch):
    monkeypatch.setattr(loader_mod.DistributedCheckpointLoader, "load",
                        lambda *a, **k: pytest.fail("weights were read before the device check"))
    with pytest.raises(ShardingError, match="16"):
        rj.load_model(gqa_dir, tp=2, dp=8, progress=False)


# -- 7-9: checkpoint files ----------------------------------------------------------------

def test_convert_refuses_pickle(pickle_dir, tmp_path, no_unpickling):
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError) as e:
        convert_hf(pickle_dir, str(out), progress=False)
    msg = str(e.value)
    assert "safetensors" in msg and "pytorch_model.bin" in msg
    assert "save_pretrained" in msg  # what to do instead
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temp dir left


def test_load_model_refuses_pickle(pickle_dir, no_unpickling):
    with pytest.raises(CheckpointFormatError) as e:
        rj.load_model(pickle_dir, tp=1, progress=False)
    assert "safetensors" in str(e.value)


def test_refuses_other_pickle_names(pickle_dir, no_unpickling):
    os.rename(os.path.join(pickle_dir, "pytorch_model.bin"), os.path.join(pickle_dir, "consolidated.pt"))
    with pytest.raises(CheckpointFormatError, match="safetensors"):
        rj.load_model(pickle_dir, tp=1, progress=False)


def test_no_weights_at_all(tmp_path, gqa_dir):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(os.path.join(gqa_dir, "config.json"), d / "config.json")
    with pytest.raises(CheckpointFormatError, match="safetensors"):
        convert_hf(str(d), str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointFormatError, match="safetensors"):
        rj.load_model(str(d), tp=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_quantized_checkpoints_are_refused(gqa_dir, gqa_config, tmp_path):
    """A quantization_config, or integer weights without one, is refused by name:
    integer weights read as floats would load silently wrong."""
    from safetensors.numpy import load_file, save_file

    quant = tmp_path / "quant"
    shutil.copytree(gqa_dir, quant)
    with open(quant / "config.json", "w") as f:
        json.dump({**gqa_config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, f)
    with pytest.raises(ConfigError, match="quant_method 'bitsandbytes'"):
        rj.load_model(str(quant), tp=1, progress=False)
    ints = tmp_path / "ints"
    shutil.copytree(gqa_dir, ints)
    (weights,) = [f for f in os.listdir(ints) if f.endswith(".safetensors")]
    tensors = load_file(str(ints / weights))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].astype("int8")
    save_file(tensors, str(ints / weights))
    with pytest.raises(CheckpointFormatError, match=f"{name}.*int8.*floating point"):
        rj.load_model(str(ints), tp=1, progress=False)


def test_the_shard_index_decides_which_file_a_tensor_comes_from(tmp_path):
    """Stale shards of an earlier download beside the index are not read (transformers
    follows the index too); without an index, a tensor in two files is refused."""
    import torch
    import transformers

    from safetensors.numpy import load_file, save_file

    cfg = transformers.LlamaConfig(**hf_models.BASE)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "m"
    model.save_pretrained(str(d), max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").exists()
    some = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]
    stale = {k: v * 0 + 1 for k, v in load_file(str(d / some)).items()}  # same names, other values
    save_file(stale, str(d / "model-00001-of-00099.safetensors"))  # no real shard's name
    prompt = [1, 17, 42, 99, 3, 128]
    from tests.test_parity import LOGIT_TOL, full_logits

    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    got = full_logits(rj.load_model(str(d), tp=1, progress=False), prompt)
    assert abs(got - want).max() < LOGIT_TOL * max(1.0, abs(want).max())
    os.remove(d / "model.safetensors.index.json")
    with pytest.raises(CheckpointFormatError, match="is in both"):
        rj.load_model(str(d), tp=1, progress=False)


def test_convert_into_existing_dir(gqa_dir, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError) as e:
        convert_hf(gqa_dir, str(out), progress=False)
    assert str(out) in str(e.value) and "overwrite" in str(e.value)
    assert os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["existing"]  # no temp dir left beside it


def test_convert_overwrite(gqa_dir, tmp_path):
    """--overwrite replaces an old checkpoint (nothing left beside it); a file in the
    way, or the input itself as the output, is refused before any work."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_hf(gqa_dir, str(out), overwrite=True, progress=False)
    assert "stale.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    with pytest.raises(FileExistsError, match="is a file"):
        convert_hf(gqa_dir, str(a_file), overwrite=True, progress=False)
    assert a_file.read_text() == "keep"
    with pytest.raises(ValueError, match="is the input checkpoint"):
        convert_hf(gqa_dir, gqa_dir, overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "out"]


def test_convert_script_refuses_pickle(pickle_dir, tmp_path):
    out = tmp_path / "out"
    r = _run_script("scripts/convert_hf.py", pickle_dir, str(out))
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "safetensors" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


# -- 10: requests that do not fit ----------------------------------------------------------

@pytest.fixture(scope="module")
def lm(gqa_dir):
    return rj.load_model(gqa_dir, tp=2, progress=False)


def test_prompt_beyond_context(lm):
    assert lm.config.max_position_embeddings == 256
    before = lm.generator.compile_count
    with pytest.raises(ValueError) as e:
        lm.generator.generate([[5] * 250], 10)
    msg = str(e.value)
    assert "256" in msg and "250" in msg and "max_new_tokens=10" in msg
    assert lm.generator.compile_count == before


def test_one_row_beyond_context(lm):
    before = lm.generator.compile_count
    with pytest.raises(ValueError, match="256"):
        lm.generator.generate([[5, 6, 7], [5] * 256], 1)
    assert lm.generator.compile_count == before


def test_empty_prompt(lm):
    before = lm.generator.compile_count
    with pytest.raises(ValueError, match="empty prompt"):
        lm.generator.generate([[]], 4)
    assert lm.generator.compile_count == before


@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_not_positive(lm, n):
    before = lm.generator.compile_count
    with pytest.raises(ValueError) as e:
        lm.generator.generate([[5, 6, 7]], n)
    assert "max_new_tokens" in str(e.value) and str(n) in str(e.value)
    assert lm.generator.compile_count == before


# -- 11-12: sampling parameters -----------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -2.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_bad_sampling_params(kwargs, name):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert name in msg
    value = next(iter(kwargs.values()))
    assert str(value) in msg


@pytest.mark.parametrize("bias,says", [
    ({5: 101}, r"bias of token 5 must be in \[-100, 100\], got 101"),
    ({-1: 1.0}, "token id -1 must be an integer >= 0"),
    ([(5, 1.0), (5, 2.0)], "at most 300 distinct token ids"),
    ({i: 1.0 for i in range(301)}, "at most 300 distinct token ids"),
    ("5:1", "a {token id: bias} mapping"),
])
def test_bad_logit_bias(bias, says):
    with pytest.raises(ValueError, match=f"logit_bias.*{says}"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_outside_the_vocabulary(lm):
    before = lm.generator.compile_count
    with pytest.raises(ValueError, match=r"logit_bias: token id 300 is outside the vocabulary \[0, 256\)"):
        lm.generator.generate([[1, 2]], 2, SamplingParams(logit_bias={300: 1.0}))
    assert lm.generator.compile_count == before


def test_token_id_outside_vocabulary(lm):
    before = lm.generator.compile_count
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
        lm.generator.generate([[5, 300]], 4)
    assert lm.generator.compile_count == before


def test_stop_strings_without_tokenizer(lm):
    assert lm.tokenizer is None
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        lm.generator.generate([[5, 6]], 4, stop=["x"])


def test_too_many_stop_ids(lm):
    with pytest.raises(ValueError, match="at most 16 stop token ids"):
        lm.generator.generate([[5, 6]], 4, stop_ids=list(range(20)))


def test_max_seq_len_beyond_context(gqa_dir):
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[2, 256\]"):
        rj.load_model(gqa_dir, tp=2, max_seq_len=1000, progress=False)


def test_stop_ids_outside_the_vocabulary(lm):
    """Refused by the engine itself, before any device work (one past int32 failed the loop)."""
    for bad in (2**40, lm.config.vocab_size, -1):
        with pytest.raises(ValueError, match=f"stop_token_ids: {bad} is outside the vocabulary"):
            rj.generate(lm, [[5, 6, 7]], max_new_tokens=2, stop_token_ids=[bad])


def test_text_prompt_not_in_a_list(lm):
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        rj.generate(lm, [5, 6, 7])


def test_generate_script_refuses_before_loading(gqa_dir, tmp_path):
    """What the config and tokenizer alone rule out is refused before a weight loads."""
    from ryzen_jax.demo import save_tokenizer, train_tokenizer

    with_tok = tmp_path / "with_tokenizer"
    shutil.copytree(gqa_dir, with_tok)
    save_tokenizer(train_tokenizer(), str(with_tok))
    cases = [(("--model", gqa_dir, "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
             (("--model", gqa_dir, "--prompt", "hi"), "has no tokenizer"),
             (("--model", str(with_tok), "--prompt", "word " * 40, "--max-seq-len", "16"), "exceeds the 16 positions")]
    for args, why in cases:
        r = _run_script("scripts/generate.py", *args)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "loaded" not in r.stdout + r.stderr


def test_generate_script_bad_temperature(gqa_dir):
    r = _run_script("scripts/generate.py", "--temperature", "-1", "--model", gqa_dir)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "temperature" in r.stderr
    assert "Traceback" not in r.stderr
