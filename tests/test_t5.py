"""T5 (encoder–decoder) against Hugging Face transformers (PyTorch, float32, eager):
teacher-forced logits and greedy tokens at tp 1 and 4 for the ReLU (tied, rescaled
LM head) and gated-GELU (flan-t5: untied, d_kv·heads ≠ d_model, more decoder layers
than encoder layers) variants; the Megatron pattern of the compiled decode step;
Orbax conversion; config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ryzen_jax as rj
from ryzen_jax.checkpoint.hf import hf_views
from ryzen_jax.checkpoint.loader import DistributedCheckpointLoader
from ryzen_jax.checkpoint.safetensors_io import SafetensorsReader
from ryzen_jax.config import ConfigError, ModelConfig
from ryzen_jax.models.t5 import relative_buckets
from ryzen_jax.sharding import TensorParallelConfig
from tests import hf_models, mp_helpers
from tests.test_structure import collectives

#: encoder inputs of different lengths, run as one batch: each row must get its solo tokens
PROMPTS = [[5, 17, 42, 99, 3, 243, 128, 64, 9, 77, 31], [200, 7, 1], list(range(30, 50))]
DECODER_INPUT = [0, 12, 200, 7, 7, 99, 150, 3, 44, 1, 18, 240]  # teacher forcing, from the start token
NEW_TOKENS = 32
LOGIT_TOL = 1e-4
MAX_SEQ_LEN = 64  # decoder cache (and padded cross-attention) length


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """name -> (HF dir, HF logits of the padded 2-row batch, HF greedy tokens per prompt
    of the padded batch)."""
    out = {}

    def get(name: str):
        if name not in out:
            path = hf_models.build(name, str(tmp_path_factory.mktemp(name)), seed=hf_models.T5_SEEDS[name])
            model = hf_models.load_t5(path)
            logits = hf_models.t5_logits(model, PROMPTS[:2], [DECODER_INPUT] * 2)
            out[name] = path, logits, hf_models.t5_greedy(model, PROMPTS, NEW_TOKENS)
        return out[name]

    return get


def teacher_forced(lm: rj.LoadedModel) -> np.ndarray:
    """Our float32 logits for the padded 2-row batch (vocab padding dropped)."""
    gen = lm.generator
    ids, mask = hf_models.t5_padded(PROMPTS[:2])

    @jax.jit
    def run(state, ids, mask, dec):
        return nnx.merge(gen.graphdef, state).forward(ids, mask, dec)

    out = run(gen.state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([DECODER_INPUT] * 2))
    return np.asarray(out)[..., : lm.config.vocab_size]


CASES = [("t5_relu", 1), ("t5_relu", 4), ("t5_gated", 1), ("t5_gated", 4)]


@pytest.mark.parametrize("name,tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_logits_and_greedy_match_hf(name, tp, t5, record_property):
    """Teacher-forced logits within 1e-4 of HF's scale (padding row included); greedy
    tokens equal to HF's generate for 32 steps, for a batch of prompts of different
    lengths (the encoder padding mask and the cross-attention mask at work)."""
    path, ref_logits, ref_tokens = t5(name)
    lm = rj.load_model(path, tp=tp, dtype="float32", max_seq_len=MAX_SEQ_LEN, progress=False)
    assert lm.tp.tp_size == tp and lm.config.is_encoder_decoder

    ours = teacher_forced(lm)
    diff = float(np.abs(ours - ref_logits).max())
    record_property("max_abs_logit_diff", diff)
    print(f"{name} tp={tp}: max |logit diff| = {diff:.2e} (logits up to {np.abs(ref_logits).max():.1f})")
    assert diff < LOGIT_TOL * max(1.0, float(np.abs(ref_logits).max()))

    out = lm.generator.generate(PROMPTS, NEW_TOKENS, stop_ids=[])
    assert out.generated_ids == ref_tokens


def test_decode_step_is_megatron(t5):
    """The compiled decode step: 3 all-reduces per decoder layer (self-attention,
    cross-attention, MLP) + 1 for the embedding lookup, none for the encoder (it runs
    in prefill only); the only all-gather is the logits row, never a weight."""
    path, _, _ = t5("t5_gated")
    tp = TensorParallelConfig(tp_size=4)
    cfg = ModelConfig.from_pretrained(path)
    graphdef, state = nnx.split(DistributedCheckpointLoader(path, progress=False).load(tp))
    batch = 2

    def prefill(state, tokens, lengths):
        return nnx.merge(graphdef, state).prefill(tokens, lengths, MAX_SEQ_LEN)[1]

    def decode(state, tokens, positions, cache):
        logits, cache = nnx.merge(graphdef, state).decode(tokens, positions, cache)
        return tp.constrain(logits, ("batch", None)), cache  # whole rows for sampling, as the engine does

    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    cache = jax.eval_shape(prefill, state, jax.ShapeDtypeStruct((batch, 16), jnp.int32), rows)
    found = collectives(jax.jit(decode, donate_argnums=(3,)).lower(state, rows, rows, cache).compile().as_text())
    kinds = [k for k, _ in found]
    assert kinds.count("all-reduce") == 3 * cfg.num_decoder_layers + 1, found
    vocab = -(-cfg.vocab_size // 4) * 4
    assert [shape.split("{")[0] for k, shape in found if k == "all-gather"] == [f"f32[{batch},1,{vocab}]"], found
    assert not {"reduce-scatter", "all-to-all", "collective-permute"} & set(kinds), found


def test_orbax_conversion_equals_direct_load(t5, tmp_path):
    """convert_hf then load gives exactly the parameters (and placements) of loading
    the safetensors directly, at tp = 4."""
    path, _, _ = t5("t5_gated")
    converted = rj.convert_hf(path, str(tmp_path / "conv"), progress=False)
    layout = TensorParallelConfig(tp_size=4)

    def arrays(model_dir):
        model = DistributedCheckpointLoader(model_dir, progress=False).load(layout)
        return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}

    direct, restored = arrays(path), arrays(converted)
    assert direct.keys() == restored.keys() and "lm_head" in direct and "decoder.layers.2.cross.wq.kernel" in direct
    for name in direct:
        assert direct[name].sharding.is_equivalent_to(restored[name].sharding, direct[name].ndim), name
        np.testing.assert_array_equal(np.asarray(direct[name]), np.asarray(restored[name]), err_msg=name)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(num_buckets, max_distance, bidirectional):
    """Every relative position up to ±2047, at released T5's settings (32, 128) and the
    tests' (8, 20): our host table equals transformers' buckets, boundaries included."""
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 2048
    ref = T5Attention._relative_position_bucket(torch.arange(-(n - 1), n), bidirectional, num_buckets, max_distance)
    ours = relative_buckets(n, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def _config(**overrides) -> dict:
    raw = {"model_type": "t5", "vocab_size": 250, "d_model": 64, "d_kv": 8, "d_ff": 128, "num_layers": 2,
           "num_heads": 8, "feed_forward_proj": "relu", "decoder_start_token_id": 0, "pad_token_id": 0}
    return {**raw, **overrides}


def test_unknown_feed_forward_proj_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(_config(feed_forward_proj="gated-swoosh"))
    msg = str(e.value)
    assert "feed_forward_proj" in msg and "swoosh" in msg and "relu" in msg and "gated-gelu" in msg


def test_untied_spellings_of_transformers_4_and_5_agree():
    """transformers 4 files say untied with tie_word_embeddings=false; transformers 5
    files keep tie_word_embeddings=true and say scale_decoder_outputs=false."""
    v4 = ModelConfig.from_dict(_config(tie_word_embeddings=False))
    v5 = ModelConfig.from_dict(_config(tie_word_embeddings=True, scale_decoder_outputs=False))
    assert v4 == v5 and not v4.tie_word_embeddings
    assert ModelConfig.from_dict(_config()).tie_word_embeddings  # T5's default: tied and rescaled
    assert ModelConfig.from_dict(_config(decoder_start_token_id=None, pad_token_id=3)).decoder_start_token_id == 3


def test_unscaled_checkpoint_without_lm_head_reads_the_shared_embedding(tmp_path):
    """A T5 built by transformers 5 with tie_word_embeddings=False shares the embedding
    as its (unscaled) LM head and saves no lm_head.weight: HF reads shared.weight, so do we."""
    import transformers

    cfg = transformers.T5Config(**{**hf_models.T5_BASE, "tie_word_embeddings": False})
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    reader = SafetensorsReader(str(tmp_path))
    assert "lm_head.weight" not in reader
    ours = ModelConfig.from_pretrained(str(tmp_path))
    assert not ours.tie_word_embeddings
    views = hf_views(ours, reader)
    np.testing.assert_array_equal(views["lm_head"], views["shared.embedding"])


def test_a_file_that_keeps_the_shared_table_under_an_alias(t5, tmp_path):
    """Some writers drop ``shared.weight`` as a tie and keep ``encoder.embed_tokens.weight``
    (the same table): it is read from there, with HF's greedy tokens."""
    import shutil

    from safetensors.numpy import load_file, save_file

    path, _, greedy = t5("t5_relu")
    alias = tmp_path / "alias"
    shutil.copytree(path, alias)
    tensors = load_file(str(alias / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    tensors.pop("decoder.embed_tokens.weight", None)
    save_file(tensors, str(alias / "model.safetensors"))
    lm = rj.load_model(str(alias), tp=1, max_seq_len=MAX_SEQ_LEN, progress=False)
    outs = rj.generate(lm, PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [o.generated_ids for o in outs] == greedy


def test_generate_script_on_a_t5_checkpoint(tmp_path):
    """scripts/generate.py on a T5 directory with a tokenizer: same flags and JSON as for
    Llama, and HF's greedy tokens (decoding starts from decoder_start_token_id)."""
    import json
    import os
    import subprocess
    import sys

    from ryzen_jax.demo import save_tokenizer, train_tokenizer

    import torch
    import transformers

    model_dir = str(tmp_path / "t5")
    cfg = transformers.T5Config(**{**hf_models.T5_BASE, "vocab_size": 512, "feed_forward_proj": "relu",
                                   "pad_token_id": 1, "eos_token_id": 1, "decoder_start_token_id": 0})
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(model_dir)
    save_tokenizer(train_tokenizer(), model_dir)  # byte-level BPE, 512 entries
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = mp_helpers.user_env()
    run = subprocess.run([sys.executable, "scripts/generate.py", "--json", "--model", model_dir, "--tp", "4",
                          "--max-new-tokens", "12", "--ignore-eos", "--prompt", "The weather in the mountains"],
                         cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["model_type"] == "t5" and out["tp"] == 4
    (o,) = out["outputs"]
    assert o["generated_ids"] == hf_models.t5_greedy(hf_models.load_t5(model_dir), [o["prompt_ids"]], 12)[0]
    assert isinstance(o["text"], str)


def test_continuous_batching_slots_give_hf_tokens(t5):
    """T5 in the server's decode slots: requests admitted at different steps into 2
    slots (one reused) each get HF's greedy tokens — encoder output and cross K/V travel
    with their slot."""
    from ryzen_jax.engine.batcher import SlotBatcher
    from tests.slots import three_requests_in_two_slots

    path, _, greedy = t5("t5_gated")
    lm = rj.load_model(path, tp=4, max_seq_len=64, progress=False)
    requests = [rj.Request(p, NEW_TOKENS, ignore_eos=True) for p in PROMPTS[:3]]
    finished = three_requests_in_two_slots(SlotBatcher(lm.generator, 2), requests, steps=(3, 1, 4))
    assert sorted(finished) == sorted(greedy)


def test_prompt_logprobs_are_refused_before_any_device_work(t5):
    """An encoder–decoder's prompt goes to its encoder, which predicts nothing: asking
    for its tokens' log-probabilities is an error naming the field, not a silent None."""
    lm = rj.load_model(t5("t5_relu")[0], tp=2, max_seq_len=64, progress=False)
    before = lm.generator.compile_count
    with pytest.raises(ValueError, match="prompt_logprobs: an encoder-decoder"):
        lm.generator.generate([PROMPTS[0]], 4, sampling=rj.SamplingParams(prompt_logprobs=1))
    assert lm.generator.compile_count == before


def test_text_of_a_sentencepiece_t5_matches_hf_decode(tmp_path):
    """With a SentencePiece-style tokenizer (Unigram, "▁" marks a word start), the text
    of T5's output is HF's decode of its tokens: the encoder's prompt is no left context
    for the decoder's first word (it once gained a leading space)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from ryzen_jax.demo import CORPUS

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    model_dir = str(tmp_path / "t5sp")
    cfg = transformers.T5Config(**{**hf_models.T5_BASE, "vocab_size": tok.get_vocab_size(),
                                   "feed_forward_proj": "relu", "pad_token_id": 0, "eos_token_id": 1,
                                   "decoder_start_token_id": 0})
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(model_dir)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(model_dir)
    lm = rj.load_model(model_dir, tp=1, max_seq_len=32, progress=False)
    prompts = ["The weather in the mountains", "Good systems are built from simple rules"]
    outs = rj.generate(lm, prompts, max_new_tokens=10, ignore_eos=True)
    hf = hf_models.load_t5(model_dir)
    for prompt, out in zip(prompts, outs):
        (want,) = hf_models.t5_greedy(hf, [lm.tokenizer(prompt)["input_ids"]], 10)
        assert out.generated_ids == want
        assert out.text == lm.tokenizer.decode(want, skip_special_tokens=True)
    assert any(o.text for o in outs)
