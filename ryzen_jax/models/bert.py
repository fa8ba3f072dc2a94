"""BERT encoder: word + absolute position + token-type embeddings, then post-LayerNorm
blocks of bidirectional attention (padding masked) and a GELU MLP.

    x = n0(wte[t] + wpe[p] + wtt[s])                       n = LayerNorm
    h = n1(x + Wo · attn(Wq·x, Wk·x, Wv·x | padding mask))
    y = n2(h + Wdown · gelu(Wup·h))

Sharding comes from the same logical axes as the decoders: heads and MLP columns over
``model``, the vocabulary too; the position and token-type tables are replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ryzen_jax import cache as kv
from ryzen_jax.activations import activation
from ryzen_jax.config import ModelConfig
from ryzen_jax.layers import HIDDEN, MLP, Embedding, LayerNorm, MultiHeadAttention, attention, param
from ryzen_jax.sharding import TensorParallelConfig, pad_to_multiple


class Layer(nnx.Module):
    """One post-norm encoder block."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype, rngs: nnx.Rngs):
        e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.attn = MultiHeadAttention(e, h, h, d, qkv_bias=True, o_bias=True, dtype=dtype, rngs=rngs)
        self.attn_norm = LayerNorm(e, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(e, cfg.intermediate_size, activation(cfg.hidden_act), use_bias=True, dtype=dtype, rngs=rngs)
        self.mlp_norm = LayerNorm(e, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.scale = d ** -0.5
        self.tp = tp

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self.attn.qkv(x)
        q = self.tp.constrain(q, ("batch", "length", "heads", "head_dim"))
        a = self.attn.wo(attention(q, kv.heads_major(k), kv.heads_major(v), mask, self.scale, self.tp))
        x = self.tp.constrain(self.attn_norm(x + a), HIDDEN)
        return self.tp.constrain(self.mlp_norm(x + self.mlp(x)), HIDDEN)


class BertModel(nnx.Module):
    """Token ids → last hidden states (no pooler, no task head)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        tp.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
        self.cfg, self.tp = cfg, tp
        e = cfg.hidden_size
        self.embed = Embedding(pad_to_multiple(cfg.vocab_size, tp.tp_size), e, dtype=dtype, rngs=rngs)
        self.pos_embed = param(rngs, (cfg.max_position_embeddings, e), ("length", "embed"), dtype)
        self.type_embed = param(rngs, (cfg.type_vocab_size, e), (None, "embed"), dtype)
        self.embed_norm = LayerNorm(e, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, tp, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """tokens, attention_mask (1 = real token, 0 = padding), token_type_ids: (B, T),
        T ≤ max_position_embeddings. Returns the last hidden states (B, T, E), float32;
        rows at padded positions are computed but meaningless."""
        b, t = tokens.shape
        types = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
        x = self.embed(tokens) + self.pos_embed[...][None, :t] + jnp.take(self.type_embed[...], types, axis=0)
        x = self.tp.constrain(self.embed_norm(x), HIDDEN)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, t, t))
        for layer in self.layers:
            x = layer(x, mask)
        return x.astype(jnp.float32)

    hidden_states = __call__  # what the engine's Encoder calls, as on a decoder-only model
