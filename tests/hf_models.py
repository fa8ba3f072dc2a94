"""Tiny Hugging Face models with seeded random weights, saved as safetensors: the oracle.

Weights are drawn with a larger std than HF's default so logits are peaked enough
that greedy decoding is decided by the model, not by float rounding.
"""

from __future__ import annotations

import torch
import transformers

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.6, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: name -> (config class, model class, config overrides)
MODELS = {
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama_mqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"num_key_value_heads": 1}),
    "llama_mha_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                       {"num_key_value_heads": 8, "tie_word_embeddings": True}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    {"rope_theta": 500000.0, "max_position_embeddings": 512,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"vocab_size": 250}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 16}),
    # Qwen2's window on the layers from max_window_layers on only (here: layer 1 of 2)
    "qwen2_window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     {"vocab_size": 250, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    # a sliding_window key in a Llama config, which transformers' Llama ignores
    "llama_window_key": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"sliding_window": 6}),
}


# -- GPT-2 and BERT: their own config names, so their own base configs -------------------------

GPT2_BASE = dict(vocab_size=250, n_embd=64, n_layer=2, n_head=8, n_positions=128, initializer_range=0.3,
                 layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2)
BERT_BASE = dict(vocab_size=510, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=128,
                 max_position_embeddings=64, type_vocab_size=2, initializer_range=0.3, pad_token_id=0)
#: config class -> the base its MODELS entries override (default: the Llama-flavoured BASE)
BASES = {transformers.GPT2Config: GPT2_BASE, transformers.BertConfig: BERT_BASE}

MODELS.update({
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {}),
    # the GPT-2 options beyond the default: attention scaled by 1 / (layer + 1), upcast scores, ReLU, n_inner, untied head
    "gpt2_options": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
                     {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True,
                      "activation_function": "relu", "n_inner": 96, "tie_word_embeddings": False}),
    "bert": (transformers.BertConfig, transformers.BertModel, {}),
})


def build(name: str, out_dir: str, seed: int = 0) -> str:
    config_cls, model_cls, overrides = MODELS[name]
    cfg = config_cls(**{**BASES.get(config_cls, BASE), **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load(model_dir: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                              dtype=torch.float32)
    return model.eval()


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """HF greedy continuation (no early stop at EOS)."""
    with torch.no_grad():
        ids = torch.tensor([prompt])  # explicit mask: HF would otherwise mask every pad-id token
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logits(model, prompt: list[int]):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


# -- T5 (encoder–decoder): its own config names, so apart from the Llama-flavoured BASE --------

#: weights this many times HF's init: greedy steps decided by margins ≥ 0.09 (float32 noise
#: ~1e-4); much larger and T5's unscaled attention makes float32 itself that noisy
INIT_FACTOR_T5 = 2.0
T5_BASE = dict(vocab_size=250, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=8, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, initializer_factor=INIT_FACTOR_T5, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

BASES[transformers.T5Config] = T5_BASE


def _t5_own_lm_head(cfg: transformers.T5Config) -> transformers.T5ForConditionalGeneration:
    """A T5 with an lm_head of its own, as flan-t5 checkpoints have (transformers 5
    would keep sharing the embedding, unscaled)."""
    model = transformers.T5ForConditionalGeneration(cfg)
    head = torch.randn_like(model.lm_head.weight) * cfg.initializer_factor * cfg.d_model ** -0.5
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


#: "t5_relu": original T5 (ReLU MLP, LM head tied to the shared embedding with the
#: d_model**-0.5 rescale); "t5_gated": flan-t5 style (GeGLU, own lm_head, no rescale)
#: with d_kv * heads != d_model and more decoder than encoder layers
MODELS.update({
    "t5_relu": (transformers.T5Config, transformers.T5ForConditionalGeneration, {"feed_forward_proj": "relu"}),
    "t5_gated": (transformers.T5Config, _t5_own_lm_head,
                 {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "d_kv": 16, "num_decoder_layers": 3}),
})
#: seeds whose greedy runs do not settle on one token at once
T5_SEEDS = {"t5_relu": 0, "t5_gated": 1}


def load_t5(model_dir: str):
    model = transformers.T5ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager",
                                                                    dtype=torch.float32)
    return model.eval()


def t5_padded(prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Right-padded encoder inputs (pad id 0) and their attention mask."""
    n = max(map(len, prompts))
    return [p + [0] * (n - len(p)) for p in prompts], [[1] * len(p) + [0] * (n - len(p)) for p in prompts]


def t5_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF greedy continuations of a right-padded batch of encoder inputs (the attention
    mask keeps each row its own computation), no early stop at EOS, without the decoder
    start token."""
    # transformers 5.24 sizes the decoder's KV cache by num_layers (the encoder's): a T5
    # with more decoder layers can only generate without a cache (same tokens, slower).
    use_cache = model.config.num_decoder_layers == model.config.num_layers
    ids, mask = t5_padded(prompts)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, use_cache=use_cache)
    return out[:, 1:].tolist()


def t5_logits(model, prompts: list[list[int]], decoder_input_ids: list[list[int]]):
    """Teacher-forced decoder logits (B, T, V) for a right-padded batch of encoder inputs."""
    ids, mask = t5_padded(prompts)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(decoder_input_ids)).logits.numpy()
