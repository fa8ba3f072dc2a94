"""GPT-2 against Hugging Face transformers (PyTorch, float32 eager) on tiny random
models: logits and greedy tokens at tp 1 and 4, batches of different lengths, Orbax
conversion, the Megatron collectives of the decode step, and config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ryzen_jax as rj
from ryzen_jax.config import ConfigError, ModelConfig
from tests import hf_models
from tests.test_parity import full_logits
from tests.test_structure import collectives

PROMPT = [1, 17, 42, 99, 3, 243, 128, 64, 5, 77, 31]  # vocab 250: padded to 252 at tp 4
NEW_TOKENS = 32
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def gpt2(hf_model_dir):
    """(dir, HF model, loader by tp) for the default tiny GPT-2; each tp is loaded once."""
    path = hf_model_dir("gpt2")
    loaded: dict[int, rj.LoadedModel] = {}

    def lm(tp: int) -> rj.LoadedModel:
        if tp not in loaded:
            loaded[tp] = rj.load_model(path, tp=tp, dtype="float32", progress=False)
        return loaded[tp]

    return path, hf_models.load(path), lm


def assert_logits_match(name: str, tp: int, lm: rj.LoadedModel, model) -> None:
    ref = hf_models.logits(model, PROMPT)
    diff = float(np.abs(full_logits(lm, PROMPT) - ref).max())
    print(f"{name} tp={tp}: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert diff < LOGIT_TOL * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("tp", [1, 4])
def test_logits_and_greedy_match_hf(tp, gpt2):
    """At tp 4 the prompt shares its batch with prompts of other lengths (right-padded):
    each row must still get the tokens HF gives it alone."""
    path, model, lm = gpt2
    assert_logits_match("gpt2", tp, lm(tp), model)
    prompts = [PROMPT] if tp == 1 else [PROMPT, PROMPT[:3], [1] + list(range(200, 220))]
    out = lm(tp).generator.generate(prompts, NEW_TOKENS, stop_ids=[])
    for p, got in zip(prompts, out.generated_ids, strict=True):
        assert got == hf_models.greedy(model, p, NEW_TOKENS)


def test_options_match_hf(hf_model_dir):
    """Attention scaled by 1 / (layer + 1), upcast scores, ReLU MLP of n_inner columns,
    untied LM head: logits equal HF's at tp 2."""
    path = hf_model_dir("gpt2_options")
    cfg = ModelConfig.from_pretrained(path)
    assert (cfg.scale_attn_by_inverse_layer_idx, cfg.hidden_act, cfg.intermediate_size, cfg.tie_word_embeddings) == \
        (True, "relu", 96, False)
    assert_logits_match("gpt2_options", 2, rj.load_model(path, tp=2, dtype="float32", progress=False),
                        hf_models.load(path))


def test_orbax_conversion_equals_direct_loading(gpt2, tmp_path):
    path, _, lm = gpt2
    conv = rj.convert_hf(path, str(tmp_path / "conv"), progress=False)
    restored = rj.load_model(conv, tp=4, dtype="float32", progress=False)
    direct = nnx.to_flat_state(lm(4).generator.state)
    for (p, a), (q, b) in zip(direct, nnx.to_flat_state(restored.generator.state), strict=True):
        assert p == q and a.get_value().sharding == b.get_value().sharding
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def test_decode_step_is_megatron(gpt2):
    """The compiled decode step at tp 4: two all-reduces per layer plus the embedding
    lookup's; no all-gather at all (the logits stay vocab-sharded)."""
    _, _, lm = gpt2
    gen = lm(4).generator

    @jax.jit
    def step(state, cache, tokens, positions):
        return nnx.merge(gen.graphdef, state).decode(tokens, positions, cache)

    model = nnx.merge(gen.graphdef, gen.state)
    cache = jax.eval_shape(lambda: model.new_cache(2, 64))
    toks = jnp.zeros((2,), jnp.int32)
    found = collectives(step.lower(gen.state, cache, toks, toks).compile().as_text())
    kinds = [k for k, _ in found]
    assert kinds.count("all-reduce") == 2 * lm(4).config.num_layers + 1, found
    assert set(kinds) == {"all-reduce"}, found


def gpt2_config(**overrides) -> dict:
    raw = {"model_type": "gpt2", "vocab_size": 250, "n_embd": 64, "n_layer": 2, "n_head": 8, "n_positions": 128}
    return {**raw, **overrides}


def test_config_defaults_and_errors():
    cfg = ModelConfig.from_dict(gpt2_config(n_inner=None))
    assert (cfg.intermediate_size, cfg.hidden_act, cfg.num_kv_heads, cfg.tie_word_embeddings) == (256, "gelu_new", 8, True)
    with pytest.raises(ConfigError, match="add_cross_attention=True is not supported"):
        ModelConfig.from_dict(gpt2_config(add_cross_attention=True))
    with pytest.raises(ConfigError, match="unknown activation 'swishy'"):
        ModelConfig.from_dict(gpt2_config(activation_function="swishy"))
    with pytest.raises(ConfigError, match="hidden size 64 is not divisible by n_head=6"):
        ModelConfig.from_dict(gpt2_config(n_head=6))
