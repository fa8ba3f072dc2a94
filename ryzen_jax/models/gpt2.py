"""GPT-2: learned absolute positions, pre-LayerNorm, multi-head attention and MLP with
biases, tanh-GELU, LM head tied to the token embedding.

    x = wte[t] + wpe[p]
    h = x + Wo · attn(Wq·n(x), Wk·n(x), Wv·n(x))      n = LayerNorm
    y = h + Wdown · gelu(Wup·n(h))

Sharding is Llama's: heads and MLP columns over ``model``, the vocabulary too; the
position table is replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ryzen_jax import cache as kv
from ryzen_jax.activations import activation
from ryzen_jax.config import ModelConfig
from ryzen_jax.layers import (HIDDEN, MLP, Embedding, LayerNorm, MultiHeadAttention, PreNormBlock,
                              causal_self_attention, param)
from ryzen_jax.models.base import DecoderOnlyLM
from ryzen_jax.sharding import TensorParallelConfig, pad_to_multiple


class Attention(MultiHeadAttention):
    """Causal multi-head attention over the KV cache; scores scaled by head_dim**-0.5
    (unless ``scale_attn_weights`` is off) and by 1 / (layer + 1) when
    ``scale_attn_by_inverse_layer_idx`` is on."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        h, d = cfg.num_heads, cfg.head_dim
        super().__init__(cfg.hidden_size, h, h, d, qkv_bias=True, o_bias=True, dtype=dtype, rngs=rngs)
        scale = d ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
        self.tp = tp

    def __call__(self, x, positions, cache_k, cache_v, prefill: bool, attend: int | None = None):
        q, k, v = self.qkv(x)
        out, cache_k, cache_v = causal_self_attention(q, k, v, positions, cache_k, cache_v, prefill=prefill,
                                                      scale=self.scale, tp=self.tp, attend=attend)
        return self.wo(out), cache_k, cache_v


def block(cfg: ModelConfig, tp: TensorParallelConfig, layer: int, *, dtype, rngs: nnx.Rngs) -> PreNormBlock:
    """LayerNorm → attention, LayerNorm → MLP, each added to the residual."""
    e = cfg.hidden_size
    return PreNormBlock(
        LayerNorm(e, cfg.layer_norm_eps, dtype=dtype, rngs=rngs),
        Attention(cfg, tp, layer, dtype=dtype, rngs=rngs),
        LayerNorm(e, cfg.layer_norm_eps, dtype=dtype, rngs=rngs),
        MLP(e, cfg.intermediate_size, activation(cfg.hidden_act), use_bias=True, dtype=dtype, rngs=rngs),
        tp,
    )


class GPT2LMHeadModel(DecoderOnlyLM, nnx.Module):
    """Token ids → next-token logits, reading and updating a KV cache (the engine's
    prefill/decode come from :class:`DecoderOnlyLM`)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        tp.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
        self.cfg, self.tp = cfg, tp
        e, vocab = cfg.hidden_size, pad_to_multiple(cfg.vocab_size, tp.tp_size)
        self.embed = Embedding(vocab, e, dtype=dtype, rngs=rngs)
        self.pos_embed = param(rngs, (cfg.max_position_embeddings, e), ("length", "embed"), dtype)
        self.layers = nnx.List([block(cfg, tp, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = LayerNorm(e, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (vocab, e), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: kv.KVCache, *, prefill: bool,
                 logits_at: jax.Array | None = None, attend: int | None = None,
                 head: bool = True) -> tuple[jax.Array, kv.KVCache]:
        """As ``LlamaForCausalLM.__call__``: tokens, positions (B, T) → float32 logits
        (padded vocabulary at -inf) and the updated cache."""
        # Clipped: a prompt bucket may pad past the table; those rows are never attended.
        pos = jnp.take(self.pos_embed[...], positions, axis=0, mode="clip")
        x = self.tp.constrain(self.embed(tokens) + pos, HIDDEN)
        return self.decoder_stack(x, positions, cache, prefill=prefill, logits_at=logits_at, attend=attend,
                                  head=head)
