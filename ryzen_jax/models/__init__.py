"""Model families, by Hugging Face ``model_type``."""

from __future__ import annotations

from ryzen_jax.config import ModelConfig
from ryzen_jax.models.bert import BertModel
from ryzen_jax.models.gpt2 import GPT2LMHeadModel
from ryzen_jax.models.llama import LlamaForCausalLM
from ryzen_jax.models.t5 import T5ForConditionalGeneration

MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                 "t5": T5ForConditionalGeneration, "gpt2": GPT2LMHeadModel, "bert": BertModel}


def model_class(cfg: ModelConfig):
    """The Flax module class that runs ``cfg.model_type``."""
    try:
        return MODEL_CLASSES[cfg.model_type]
    except KeyError:
        raise ValueError(f"no model for model_type {cfg.model_type!r}; known: {', '.join(MODEL_CLASSES)}") from None
