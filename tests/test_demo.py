"""The embedded demo checkpoint, checked against transformers (and PyTorch) as the oracle."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ryzen_jax.demo import VOCAB_SIZE, write_demo_hf_checkpoint

TEXT = "Hello world, héllo 世界"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_demo_hf_checkpoint(str(tmp_path_factory.mktemp("demo") / "model"))


def test_tokenizer_round_trips_with_bos(demo_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    assert len(tok) <= VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == 0
    assert 0 not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT


def test_torch_llama_loads_weights(demo_dir: str) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(demo_dir, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info.get(key))
    assert model.config.vocab_size == VOCAB_SIZE
    ids = AutoTokenizer.from_pretrained(demo_dir)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert tuple(logits.shape) == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # random but not degenerate


def test_deterministic(demo_dir: str, tmp_path) -> None:
    again = write_demo_hf_checkpoint(str(tmp_path / "again"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        with open(os.path.join(demo_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_existing_dir_is_kept(demo_dir: str) -> None:
    before = os.path.getmtime(os.path.join(demo_dir, "model.safetensors"))
    assert write_demo_hf_checkpoint(demo_dir, seed=1) == demo_dir
    assert os.path.getmtime(os.path.join(demo_dir, "model.safetensors")) == before
    leftovers = [n for n in os.listdir(os.path.dirname(demo_dir)) if n.startswith(".demo-tmp-")]
    assert not leftovers


def test_seed_changes_weights(tmp_path) -> None:
    from safetensors.numpy import load_file

    a = load_file(write_demo_hf_checkpoint(str(tmp_path / "a"), seed=0) + "/model.safetensors")
    b = load_file(write_demo_hf_checkpoint(str(tmp_path / "b"), seed=1) + "/model.safetensors")
    assert a.keys() == b.keys()
    assert all(v.dtype == np.float32 for v in a.values())
    assert not np.array_equal(a["lm_head.weight"], b["lm_head.weight"])
