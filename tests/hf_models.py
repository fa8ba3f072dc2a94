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
}


def build(name: str, out_dir: str, seed: int = 0) -> str:
    config_cls, model_cls, overrides = MODELS[name]
    cfg = config_cls(**{**BASE, **overrides})
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
