"""BERT (encoder only) against Hugging Face transformers (PyTorch, float32 eager) on a
tiny random model: last hidden states at tp 1 and 4 for a padded batch, pooled
embeddings, Orbax conversion, the collectives of the compiled encoder, config and
input errors, and scripts/encode.py end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import ryzen_jax as rj
from ryzen_jax.config import ConfigError, ModelConfig
from ryzen_jax.demo import save_tokenizer, train_tokenizer
from tests import hf_models, mp_helpers
from tests.mp_helpers import ROOT
from tests.test_structure import collectives

# 8, 18, 45 and 3 tokens: one batch pads them to the 64-token bucket
TEXTS = ["The weather is", "Distributed computing across many machines",
         "Good systems are built from simple rules that everyone follows: write the data before you announce it.",
         "Hi"]
TOL = 1e-4


@pytest.fixture(scope="module")
def bert(hf_model_dir):
    """(dir, token ids per text, loader by tp): a tiny BertModel with a local tokenizer."""
    path = hf_model_dir("bert")
    save_tokenizer(train_tokenizer(hf_models.BERT_BASE["vocab_size"]), path)
    ids = [transformers.AutoTokenizer.from_pretrained(path)(t)["input_ids"] for t in TEXTS]
    loaded: dict[int, rj.LoadedModel] = {}

    def lm(tp: int) -> rj.LoadedModel:
        if tp not in loaded:
            loaded[tp] = rj.load_model(path, tp=tp, dtype="float32", progress=False)
        return loaded[tp]

    return path, ids, lm


@pytest.fixture(scope="module")
def hf_states(bert):
    """HF's last hidden states: each text alone (len_i, E), and the padded batch with its mask."""
    path, ids, _ = bert
    model = transformers.BertModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    longest = max(map(len, ids))
    tokens = torch.tensor([i + [0] * (longest - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
    with torch.no_grad():
        alone = [model(torch.tensor([i])).last_hidden_state[0].numpy() for i in ids]
        batch = model(tokens, attention_mask=mask).last_hidden_state.numpy()
    return alone, batch, mask.numpy()


def max_diff(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return max(float(np.abs(o - r).max()) for o, r in zip(ours, ref, strict=True))


@pytest.mark.parametrize("tp", [1, 4])
def test_hidden_states_of_a_padded_batch_match_hf_alone(tp, bert, hf_states):
    _, ids, lm = bert
    alone, _, _ = hf_states
    ours = lm(tp).encoder.hidden_states(ids)
    diff = max_diff(ours, alone)
    scale = max(float(np.abs(r).max()) for r in alone)
    print(f"bert tp={tp}: max |hidden diff| = {diff:.2e} (hidden states up to {scale:.1f})")
    assert diff < TOL * max(1.0, scale)
    if tp == 4:  # a text on its own (another batch and bucket) gets what it got in the batch
        (solo,) = lm(tp).encoder.hidden_states([ids[3]])
        np.testing.assert_allclose(solo, ours[3], atol=1e-5)


def test_pooled_embeddings_match_hf(bert, hf_states):
    """From text: mean over the real tokens and first-token (cls) pooling equal the same
    pooling of HF's padded-batch hidden states; normalize gives unit vectors."""
    _, _, lm = bert
    _, batch, mask = hf_states
    ref = {"mean": (batch * mask[..., None]).sum(1) / mask.sum(1, keepdims=True), "cls": batch[:, 0]}
    for pooling, want in ref.items():
        got = rj.embed(lm(4), TEXTS, pooling=pooling)
        assert got.shape == (len(TEXTS), 64)
        np.testing.assert_allclose(got, want, atol=TOL * max(1.0, float(np.abs(want).max())), err_msg=pooling)
    unit = rj.embed(lm(4), TEXTS, normalize=True)
    np.testing.assert_allclose(unit, ref["mean"] / np.linalg.norm(ref["mean"], axis=1, keepdims=True), atol=1e-5)


def test_orbax_conversion_equals_direct_loading(bert, tmp_path):
    path, _, lm = bert
    conv = rj.convert_hf(path, str(tmp_path / "conv"), progress=False)
    restored = rj.load_model(conv, tp=4, dtype="float32", progress=False)
    assert restored.generator is None and restored.tokenizer is not None
    direct = nnx.to_flat_state(lm(4).encoder.state)
    for (p, a), (q, b) in zip(direct, nnx.to_flat_state(restored.encoder.state), strict=True):
        assert p == q and a.get_value().sharding == b.get_value().sharding
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_encoder_is_megatron(bert):
    """The compiled encoder at tp 4: two all-reduces per layer plus the vocab-parallel
    embedding lookup's; no all-gather (hidden states are replicated over ``model``)."""
    _, _, lm = bert
    found = collectives(lm(4).encoder.encode_program(4, 64).as_text())
    kinds = [k for k, _ in found]
    assert kinds.count("all-reduce") == 2 * lm(4).config.num_layers + 1, found
    assert set(kinds) == {"all-reduce"}, found


def test_a_sentence_transformers_directory_sets_the_pooling(bert, hf_states, tmp_path):
    """modules.json (Transformer, Pooling with its config, Normalize), as
    sentence-transformers saves it: CLS pooling, normalized, by default — HF's first
    hidden state scaled to unit length; a converted checkpoint keeps it; arguments win;
    a pooling we lack is refused by name."""
    import shutil

    from ryzen_jax.checkpoint.convert import convert_hf

    path, _, _ = bert
    _, batch, _ = hf_states
    st = tmp_path / "st"
    shutil.copytree(path, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    want = batch[:, 0] / np.linalg.norm(batch[:, 0], axis=1, keepdims=True)
    for d in (st, convert_hf(str(st), str(tmp_path / "converted"), progress=False)):
        lm = rj.load_model(str(d), tp=1, progress=False)
        np.testing.assert_allclose(rj.embed(lm, TEXTS), want, atol=1e-5)
    mean = rj.embed(lm, TEXTS, pooling="mean", normalize=False)
    np.testing.assert_allclose(mean, rj.embed(bert[2](1), TEXTS, pooling="mean"), atol=1e-6)
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        rj.embed(rj.load_model(str(st), tp=1, progress=False), TEXTS)


def test_config_and_input_errors(bert):
    raw = {"model_type": "bert", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 8, "intermediate_size": 128}
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.is_encoder, cfg.hidden_act, cfg.layer_norm_eps, cfg.type_vocab_size) == (True, "gelu", 1e-12, 2)
    with pytest.raises(ConfigError, match="position_embedding_type='relative_key' is not supported"):
        ModelConfig.from_dict({**raw, "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="unknown activation 'gelu_erf'"):
        ModelConfig.from_dict({**raw, "hidden_act": "gelu_erf"})
    _, ids, lm = bert
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        rj.embed(lm(4), TEXTS, pooling="max")
    with pytest.raises(ValueError, match="input 1 has 65 tokens, past the 64 positions it may hold.*truncate=True"):
        rj.embed(lm(4), [[5, 6], list(range(65))])
    np.testing.assert_array_equal(rj.embed(lm(4), [list(range(65))], truncate=True), rj.embed(lm(4), [list(range(64))]))
    long = " ".join(TEXTS * 20)
    with pytest.raises(ValueError, match="input 0 has .* tokens, past the 64 positions it may hold"):
        rj.embed(lm(4), [long])
    cut = lm(4).tokenizer(long, truncation=True, max_length=64)["input_ids"]  # the tokenizer's own cut, [SEP] kept
    np.testing.assert_array_equal(rj.embed(lm(4), [long], truncate=True), rj.embed(lm(4), [cut]))
    with pytest.raises(ValueError, match="input 0 is empty"):
        rj.embed(lm(4), [[]])
    with pytest.raises(ValueError, match=r"token type id 2 is outside \[0, 2\)"):  # a lookup there gives NaN
        lm(4).encoder.embed([[2, 10, 3]], token_type_ids=[[0, 2, 0]])


def test_encode_cli_matches_hf(bert, hf_states, monkeypatch, capsys):
    path, _, _ = bert
    alone, _, _ = hf_states
    proc = subprocess.run([sys.executable, "scripts/encode.py", "--model", path, "--text", TEXTS[0], "--text", TEXTS[2],
                           "--tp", "2", "--json"], cwd=ROOT, capture_output=True, text=True,
                          env=mp_helpers.user_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert (out["tp"], out["pooling"], out["model_type"]) == (2, "mean", "bert")
    want = np.stack([alone[0].mean(0), alone[2].mean(0)])
    np.testing.assert_allclose(np.asarray(out["embeddings"]), want, atol=TOL * max(1.0, float(np.abs(want).max())))

    # bad input, in this process (a second interpreter start costs seconds): exit code 2 and the reason
    monkeypatch.setenv("RYZEN_JAX_COMPILE_CACHE", "off")  # and leave this process's logging alone:
    monkeypatch.setattr("ryzen_jax.runtime.setup_logging", lambda *a, **k: None)
    spec = importlib.util.spec_from_file_location("encode_cli", os.path.join(ROOT, "scripts", "encode.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--model", path, "--text", "x", "--tp", "3"]) == 2
    assert "num_attention_heads=8 is not divisible by tp=3" in capsys.readouterr().err


def test_embeddings_server_matches_hf(bert, hf_states):
    """scripts/serve.py's app for an encoder: POST /v1/embeddings on a loopback port,
    through the official openai client (base64, its default) and plain JSON floats,
    texts and token ids, gives HF's mean-pooled states; bad input is a named 400 and
    the server keeps serving."""
    import httpx
    import openai

    from ryzen_jax.serve import EmbeddingServer
    from tests.test_server import Running

    path, ids, lm = bert
    alone, _, _ = hf_states
    want = np.stack([a.mean(axis=0) for a in alone])
    tol = TOL * max(1.0, float(np.abs(want).max()))
    running = Running(EmbeddingServer(lm(4), model_name="bert", max_queue=4))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["bert"]
        r = client.embeddings.create(model="bert", input=TEXTS)
        assert [d.index for d in r.data] == list(range(len(TEXTS)))
        np.testing.assert_allclose([d.embedding for d in r.data], want, atol=tol)
        assert r.usage.prompt_tokens == sum(map(len, ids))
        many = client.embeddings.create(model="bert", input=TEXTS * 10)  # 40 inputs: two device batches
        np.testing.assert_allclose([d.embedding for d in many.data], np.tile(want, (10, 1)), atol=tol)
        body = httpx.post(f"{running.url}/v1/embeddings", timeout=60,
                          json={"input": ids[1], "encoding_format": "float"}).json()
        np.testing.assert_allclose(body["data"][0]["embedding"], want[1], atol=tol)
        for bad, param in (({"input": []}, "input"), ({"input": [""]}, "input"), ({"input": "x " * 600}, "input"),
                           ({"input": [[1, 10 ** 6]]}, "input"), ({"input": "hi", "dimensions": 3}, "dimensions"),
                           ({"input": "hi", "encoding_format": "int8"}, "encoding_format")):
            r = httpx.post(f"{running.url}/v1/embeddings", json=bad, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="hi")
        r = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert 'ryzen_jax_requests_total{outcome="ok"} 3.0' in httpx.get(f"{running.url}/metrics").text
        np.testing.assert_allclose(client.embeddings.create(model="bert", input="Hi").data[0].embedding, want[3],
                                   atol=tol)
    finally:
        running.stop()
