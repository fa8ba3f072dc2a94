"""Token-for-token parity with Hugging Face transformers (PyTorch, float32) on tiny
random Llama-family models, across tensor- and data-parallel meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ryzen_jax as rj
from tests import hf_models

PROMPT = [1, 17, 42, 99, 3, 250 - 7, 128, 64, 5, 77, 31]
NEW_TOKENS = 32
LOGIT_TOL = 1e-4

# (model, tp, dp): GQA at tp 1/2/4 and dp×tp 2×2; MQA (1 kv head replicated to 4);
# tied MHA; llama3 rope scaling; qwen2 qkv bias; mistral sliding window (at tp 1 through
# our CPU attention kernel, whose window the 32 new tokens pass); Qwen2's window on some
# layers only.
CASES = [
    ("llama_gqa", 1, 1), ("llama_gqa", 2, 1), ("llama_gqa", 4, 1), ("llama_gqa", 2, 2),
    ("llama_mqa", 4, 1), ("llama_mha_tied", 4, 1), ("llama3_rope", 4, 1), ("qwen2_bias", 2, 1),
    ("qwen2_bias", 4, 1), ("mistral", 2, 1),
    ("mistral", 1, 1), ("qwen2_window", 2, 1), ("qwen2_bias", 1, 1), ("llama3_rope", 1, 1),
    ("llama_mha_tied", 1, 1),
]


def full_logits(lm: rj.LoadedModel, prompt: list[int]) -> np.ndarray:
    """Our float32 logits at every prompt position (vocab padding dropped)."""
    gen = lm.generator
    batch = lm.tp.dp_size
    tokens = jnp.asarray([prompt] * batch, jnp.int32)

    @jax.jit
    def run(state, tokens):
        from flax import nnx

        model = nnx.merge(gen.graphdef, state)
        cache = model.new_cache(batch, max(64, tokens.shape[1]))
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model(tokens, pos, cache, prefill=True)[0]

    out = np.asarray(run(gen.state, tokens))
    return out[0, :, : lm.config.vocab_size]


@pytest.fixture(scope="module")
def hf_reference(hf_model_dir):
    refs = {}

    def get(name):
        if name not in refs:
            model = hf_models.load(hf_model_dir(name))
            refs[name] = (hf_models.logits(model, PROMPT), hf_models.greedy(model, PROMPT, NEW_TOKENS))
        return refs[name]

    return get


@pytest.mark.parametrize("name,tp,dp", CASES, ids=[f"{n}-tp{t}-dp{d}" for n, t, d in CASES])
def test_logits_and_greedy_match_hf(name, tp, dp, hf_model_dir, hf_reference, record_property):
    ref_logits, ref_tokens = hf_reference(name)
    lm = rj.load_model(hf_model_dir(name), tp=tp, dp=dp, dtype="float32", progress=False)
    assert (lm.tp.tp_size, lm.tp.dp_size) == (tp, dp)

    diff = float(np.abs(full_logits(lm, PROMPT) - ref_logits).max())
    record_property("max_abs_logit_diff", diff)
    print(f"{name} tp={tp} dp={dp}: max |logit diff| = {diff:.2e}")
    assert diff < LOGIT_TOL * max(1.0, float(np.abs(ref_logits).max()))

    out = lm.generator.generate([PROMPT], NEW_TOKENS, stop_ids=[])
    assert out.generated_ids[0] == ref_tokens, (out.generated_ids[0], ref_tokens)


def test_llama_ignores_a_sliding_window_key(hf_model_dir, hf_reference):
    """transformers' Llama attention has no window: a ``sliding_window`` key in a Llama
    config.json (merged or converted files carry one) changes nothing in its forward
    pass, nor in ours. (Its generate() differs: the cache it builds reads the key and
    drops old positions, so only the logits are compared.)"""
    ref_logits, _ = hf_reference("llama_window_key")
    lm = rj.load_model(hf_model_dir("llama_window_key"), tp=1, progress=False)
    assert lm.config.sliding_window is None and len(PROMPT) > 6
    assert float(np.abs(full_logits(lm, PROMPT) - ref_logits).max()) < LOGIT_TOL * max(1.0, np.abs(ref_logits).max())


def test_batch_of_different_lengths_matches_each_alone(hf_model_dir):
    """Right-padded prompts of different lengths in one batch: each row gets HF's tokens."""
    path = hf_model_dir("llama_gqa")
    model = hf_models.load(path)
    prompts = [PROMPT, PROMPT[:4], [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216]]
    lm = rj.load_model(path, tp=2, dp=1, dtype="float32", progress=False)
    out = lm.generator.generate(prompts, 16, stop_ids=[])
    for p, got in zip(prompts, out.generated_ids):
        assert got == hf_models.greedy(model, p, 16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_models_ask_xla_for_float32_products(dtype, hf_model_dir):
    """Every matrix product of a float32 model's prefill and decode programs asks XLA for
    HIGHEST precision: on NVIDIA GPUs from Ampere on, XLA's default for float32 is
    TensorFloat-32 (ten mantissa bits), which the parity above (1e-4, run on a GPU by
    scripts/gpu_check.sh) would not survive. A bfloat16 model keeps XLA's default. tp 2,
    so that every product is XLA's dot, not our CPU kernel."""
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=2, dtype=dtype, progress=False)
    for program in (lm.generator.prefill_program(2, 16), lm.generator.decode_program(2)):
        dots = [line for line in program.as_text().splitlines() if " dot(" in line]
        highest = [line for line in dots if "operand_precision={highest,highest}" in line]
        assert dots and len(highest) == (len(dots) if dtype == "float32" else 0), dots[:2]


LONG_PROMPT = np.random.default_rng(7).integers(3, 250, size=150).tolist()
LONG_CASES = [("llama_gqa", 2), ("mistral", 1), ("mistral", 2), ("gpt2", 1)]


@pytest.mark.parametrize("name,tp", LONG_CASES, ids=[f"{n}-tp{t}" for n, t in LONG_CASES])
def test_a_long_prompt_in_attention_blocks_matches_hf(name, tp, hf_model_dir):
    """A prompt past one block of query rows (``layers.PREFILL_BLOCK``): the prefill's
    attention runs block by block, each against the keys it can see (with Mistral's
    16-token window, only the window's), the last block part padding; logits at every
    position and the greedy continuation as HF's, with a cache shorter than the prompt's
    power-of-two bucket."""
    from ryzen_jax.layers import PREFILL_BLOCK

    prompt = LONG_PROMPT[:100] if name == "gpt2" else LONG_PROMPT  # GPT-2's 128 positions
    assert len(prompt) > PREFILL_BLOCK and len(prompt) % PREFILL_BLOCK
    model = hf_models.load(hf_model_dir(name))
    ref_logits = hf_models.logits(model, prompt)
    lm = rj.load_model(hf_model_dir(name), tp=tp, dtype="float32", progress=False, max_seq_len=len(prompt) + 16)
    diff = float(np.abs(full_logits(lm, prompt) - ref_logits).max())
    assert diff < LOGIT_TOL * max(1.0, float(np.abs(ref_logits).max())), diff
    out = lm.generator.generate([prompt], 16, stop_ids=[])
    assert out.generated_ids[0] == hf_models.greedy(model, prompt, 16)
    # the prompt's power-of-two bucket (256) is past this cache: the prefill is cache-long
    assert lm.generator.prompt_bucket(len(prompt)) == lm.generator.prompt_buckets()[-1] == len(prompt) + 16
