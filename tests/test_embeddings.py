"""Embeddings from decoder-only models (``load_model(..., task="embed")``, vLLM's
``--task embed``) against Hugging Face transformers' base models (``LlamaModel``,
``Qwen2Model``, ``GPT2Model``: the final norm's output): last-token and mean pooling of
a padded batch at tp 1, 2 and dp 2 × tp 2; a bare base-model checkpoint with a
sentence-transformers ``modules.json``; errors; and ``/v1/embeddings`` through the
official openai client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import ryzen_jax as rj
from tests import hf_models

# 13, 5, 9 and 1 tokens: one padded batch in the 16-token bucket
INPUTS = [[1, 17, 42, 99, 3, 243, 128, 64, 5, 77, 31, 17, 42], [9, 8, 7, 6, 5], [200, 3, 3, 3, 14, 15, 92, 65, 35],
          [4]]
TOL = 2e-5


def hf_states(path: str) -> list[np.ndarray]:
    """Each input's last hidden states alone, (len_i, E), from transformers' base model."""
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).last_hidden_state[0].numpy() for ids in INPUTS]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name,tp,dp", [("llama_gqa", 1, 1), ("llama_gqa", 2, 1), ("qwen2_bias", 2, 2),
                                        ("gpt2", 2, 1)])
def test_last_token_and_mean_pooling_match_hf(hf_model_dir, name, tp, dp):
    """vLLM's default for a decoder: the last real token's state, normalized; and mean
    pooling on request — transformers' states of each input alone, from a padded batch."""
    path = hf_model_dir(name)
    states = hf_states(path)
    lm = rj.load_model(path, tp=tp, dp=dp, progress=False, task="embed")
    assert lm.generator is None and (lm.encoder.pooling, lm.encoder.normalize) == ("last", True)
    np.testing.assert_allclose(rj.embed(lm, INPUTS), unit(np.stack([s[-1] for s in states])), atol=TOL)
    np.testing.assert_allclose(rj.embed(lm, INPUTS, pooling="mean", normalize=False),
                               np.stack([s.mean(0) for s in states]), atol=TOL)
    hidden = lm.encoder.hidden_states(INPUTS)
    assert max(float(np.abs(a - b).max()) for a, b in zip(hidden, states)) < TOL


def test_a_bare_base_model_checkpoint_with_sentence_transformers_modules(tmp_path):
    """An embedding model as published: a bare ``Qwen2Model`` (no ``model.`` prefix, no
    LM head) with modules.json asking for mean pooling and no Normalize — what the
    directory asks for is what it gets, and it never loads to generate."""
    cfg = transformers.Qwen2Config(**{**hf_models.BASE, "vocab_size": 250})
    torch.manual_seed(5)
    path = tmp_path / "bare"
    transformers.Qwen2Model(cfg).save_pretrained(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    states = hf_states(str(path))
    lm = rj.load_model(str(path), tp=2, progress=False, task="embed")
    assert (lm.encoder.pooling, lm.encoder.normalize) == ("mean", False)
    np.testing.assert_allclose(rj.embed(lm, INPUTS), np.stack([s.mean(0) for s in states]), atol=TOL)
    np.testing.assert_allclose(rj.embed(lm, INPUTS, pooling="last", normalize=True),
                               unit(np.stack([s[-1] for s in states])), atol=TOL)
    with pytest.raises(ValueError, match="use rj.embed, or load it with task='generate'"):
        rj.generate(lm, [INPUTS[0]], max_new_tokens=2)
    with pytest.raises(KeyError, match=r"lacks 1 tensor.*'lm_head.weight'.*task='embed'"):  # no head to generate with
        rj.load_model(str(path), tp=1, progress=False)


def test_a_converted_checkpoint_embeds_as_the_hf_directory(hf_model_dir, tmp_path):
    """The Orbax checkpoint of a causal LM, loaded for embeddings, restores everything
    but the LM head and gives the HF directory's vectors."""
    from ryzen_jax.checkpoint.convert import convert_hf

    path = hf_model_dir("llama_gqa")
    converted = convert_hf(path, str(tmp_path / "converted"), progress=False)
    direct = rj.embed(rj.load_model(path, tp=2, progress=False, task="embed"), INPUTS)
    lm = rj.load_model(converted, tp=2, progress=False, task="embed")
    heads = lambda state: [p for p, _ in nnx.to_flat_state(state) if p[0] == "lm_head"]  # noqa: E731
    assert heads(rj.load_model(converted, tp=2, progress=False).generator.state) and not heads(lm.encoder.state)
    np.testing.assert_array_equal(rj.embed(lm, INPUTS), direct)


def test_task_errors(hf_model_dir):
    """A task the model cannot do is refused by name before any weight is read."""
    with pytest.raises(ValueError, match="task must be one of auto, generate, embed, got 'pool'"):
        rj.load_model(hf_model_dir("llama_gqa"), tp=1, progress=False, task="pool")
    with pytest.raises(ValueError, match="encoder-decoder"):
        rj.load_model(hf_model_dir("t5_relu"), tp=1, progress=False, task="embed")
    with pytest.raises(ValueError, match="does not generate text: load it with task='embed'"):
        rj.load_model(hf_model_dir("bert"), tp=1, progress=False, task="generate")
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=1, progress=False)
    with pytest.raises(ValueError, match=r"load it with rj.load_model\(..., task='embed'\)"):
        rj.embed(lm, INPUTS)
    short = rj.load_model(hf_model_dir("llama_gqa"), tp=1, progress=False, task="embed", max_seq_len=8)
    with pytest.raises(ValueError, match="input 0 has 13 tokens, past the 8 positions it may hold"):
        rj.embed(short, INPUTS)


def test_embeddings_server_for_a_decoder(tmp_path):
    """scripts/serve.py --task embed: /v1/embeddings from a Llama through the official
    openai client gives rj.embed's vectors (checked against transformers above)."""
    import openai

    from ryzen_jax.serve import EmbeddingServer
    from tests.test_server import Running, build_chat_model

    path = build_chat_model(str(tmp_path / "llama"))  # a tiny Llama with a locally trained tokenizer
    lm = rj.load_model(path, tp=2, progress=False, task="embed", max_seq_len=64)
    texts = ["The weather is", "Distributed computing across many machines", "Hi"]
    want = rj.embed(lm, texts)
    running = Running(EmbeddingServer(lm, model_name="llama-embed", max_queue=4))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.embeddings.create(model="llama-embed", input=texts)
        np.testing.assert_allclose([d.embedding for d in r.data], want, atol=1e-5)
        np.testing.assert_allclose(client.embeddings.create(model="llama-embed", input=INPUTS[:2]).data[1].embedding,
                                   rj.embed(lm, INPUTS[:2])[1], atol=1e-5)
        assert [m.max_model_len for m in client.models.list()] == [64]
    finally:
        running.stop()


def test_two_process_embeddings_server_answers_like_one(tmp_path):
    """scripts/serve.py --task embed under scripts/launch.py: 2 processes × 2 devices
    (tp 4 across them) give rj.embed's vectors in one process; killing the worker ends
    the run instead of leaving clients hanging."""
    import httpx

    from tests import mp_helpers
    from tests.test_server import build_chat_model

    path = build_chat_model(str(tmp_path / "llama"))
    texts = ["The weather is", "Distributed computing across many machines", "Hi"] * 12  # two batches of 32 and 4
    want = rj.embed(rj.load_model(path, tp=2, progress=False, task="embed", max_seq_len=64), texts)
    with mp_helpers.LaunchedServer("--model", path, "--task", "embed", "--tp", "4", "--max-model-len", "64",
                                   "--served-model-name", "llama-embed") as two_process:
        two_process.wait_healthy()
        ask = lambda: httpx.post(f"{two_process.url}/v1/embeddings",  # noqa: E731
                                 json={"model": "llama-embed", "input": texts}, timeout=60)
        r = ask()
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], want, atol=1e-5)
        two_process.kill_the_follower(ask)
