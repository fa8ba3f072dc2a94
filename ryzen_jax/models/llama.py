"""Llama-family decoder (Llama 2/3, Mistral, Qwen2): RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP. Reads like the equations; sharding lives in the logical axis
names of each parameter and of the few activations we pin.

    h = x + Wo · attn(RoPE(Wq·n(x)), RoPE(Wk·n(x)), Wv·n(x))      n = RMSNorm
    y = h + Wdown · (silu(Wgate·n(h)) ⊙ Wup·n(h))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ryzen_jax import cache as kv
from ryzen_jax.activations import activation
from ryzen_jax.config import ModelConfig
from ryzen_jax.layers import (HIDDEN, MLP, Embedding, MultiHeadAttention, PreNormBlock, RMSNorm, apply_rope,
                              causal_self_attention, param, rope_frequencies)
from ryzen_jax.models.base import DecoderOnlyLM
from ryzen_jax.sharding import TensorParallelConfig, pad_to_multiple


def padded_vocab(cfg: ModelConfig, tp: TensorParallelConfig) -> int:
    """Vocabulary rows held by the model: the true size rounded up to a multiple of tp."""
    return pad_to_multiple(cfg.vocab_size, tp.tp_size)


class Attention(MultiHeadAttention):
    """Grouped-query attention with rotary positions, over the KV cache."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, layer: int, dtype, rngs: nnx.Rngs):
        d = cfg.head_dim
        super().__init__(cfg.hidden_size, cfg.num_heads, tp.kv_heads(cfg.num_kv_heads), d, qkv_bias=cfg.attention_bias,
                         o_bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.rope = (d, cfg.rope_theta, cfg.rope_scaling)
        self.scale = d ** -0.5
        self.window = cfg.window_of(layer)
        self.tp = tp

    def __call__(self, x, positions, cache_k, cache_v, prefill: bool, attend: int | None = None):
        inv_freq = rope_frequencies(*self.rope)
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out, cache_k, cache_v = causal_self_attention(q, k, v, positions, cache_k, cache_v, prefill=prefill,
                                                      scale=self.scale, tp=self.tp, window=self.window, attend=attend)
        return self.wo(out), cache_k, cache_v


def block(cfg: ModelConfig, tp: TensorParallelConfig, layer: int, *, dtype, rngs: nnx.Rngs) -> PreNormBlock:
    """RMSNorm → attention, RMSNorm → SwiGLU MLP, each added to the residual."""
    return PreNormBlock(
        RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs),
        Attention(cfg, tp, layer=layer, dtype=dtype, rngs=rngs),
        RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs),
        MLP(cfg.hidden_size, cfg.intermediate_size, activation(cfg.hidden_act, gated=True), use_bias=cfg.mlp_bias,
            dtype=dtype, rngs=rngs),
        tp,
    )


class LlamaForCausalLM(DecoderOnlyLM, nnx.Module):
    """Token ids → next-token logits, reading and updating a KV cache.

    ``tp`` fixes the head replication (kv heads < tp) and vocab padding so that every
    sharded dimension divides evenly; ``tp.validate`` has rejected anything else.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        tp.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
        self.cfg, self.tp = cfg, tp
        vocab = padded_vocab(cfg, tp)
        self.embed = Embedding(vocab, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([block(cfg, tp, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (vocab, cfg.hidden_size), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: kv.KVCache, *, prefill: bool,
                 logits_at: jax.Array | None = None, attend: int | None = None,
                 head: bool = True) -> tuple[jax.Array, kv.KVCache]:
        """tokens, positions: (B, T). ``prefill``: the tokens start their sequences (attend
        among themselves). ``logits_at`` (B,): compute logits only at that index of each
        row (the last prompt token), else at every position. Logits are float32, with
        padded vocabulary entries at -inf; ``head=False`` returns the final norm's output
        instead (embeddings)."""
        x = self.tp.constrain(self.embed(tokens), HIDDEN)
        return self.decoder_stack(x, positions, cache, prefill=prefill, logits_at=logits_at, attend=attend,
                                  head=head)
