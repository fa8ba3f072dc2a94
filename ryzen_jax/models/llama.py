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
from ryzen_jax.layers import (MLP, ColumnParallelLinear, Embedding, RMSNorm, RowParallelLinear, apply_rope, attention,
                              param, rope_frequencies)
from ryzen_jax.models.base import DecoderOnlyLM
from ryzen_jax.sharding import TensorParallelConfig, pad_to_multiple

ACT = ("batch", "length", "embed")


def padded_vocab(cfg: ModelConfig, tp: TensorParallelConfig) -> int:
    """Vocabulary rows held by the model: the true size rounded up to a multiple of tp."""
    return pad_to_multiple(cfg.vocab_size, tp.tp_size)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype, rngs: nnx.Rngs):
        e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kvh = tp.kv_heads(cfg.num_kv_heads)
        self.wq = ColumnParallelLinear(e, (h, d), ("heads", "head_dim"), use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.wk = ColumnParallelLinear(e, (kvh, d), ("kv_heads", "head_dim"), use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.wv = ColumnParallelLinear(e, (kvh, d), ("kv_heads", "head_dim"), use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.wo = RowParallelLinear((h, d), e, ("heads", "head_dim"), use_bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.rope = (d, cfg.rope_theta, cfg.rope_scaling)
        self.scale = d ** -0.5
        self.window = cfg.sliding_window
        self.tp = tp

    def __call__(self, x, positions, cache_k, cache_v, prefill: bool):
        inv_freq = rope_frequencies(*self.rope)
        q = apply_rope(self.wq(x), positions, inv_freq)
        k = apply_rope(self.wk(x), positions, inv_freq)
        v = self.wv(x)
        q = self.tp.constrain(q, ("batch", "length", "heads", "head_dim"))
        start = positions[:, 0]
        cache_k, cache_v = kv.write(cache_k, k, start), kv.write(cache_v, v, start)
        if prefill:  # a fresh sequence attends to itself: no need to read the cache back
            keys, values, key_pos = k, v, positions
        else:
            keys, values = cache_k, cache_v
            key_pos = jnp.broadcast_to(jnp.arange(cache_k.shape[1]), (x.shape[0], cache_k.shape[1]))
        mask = key_pos[:, None, :] <= positions[:, :, None]
        if self.window is not None:
            mask &= key_pos[:, None, :] > positions[:, :, None] - self.window
        out = attention(q, keys, values, mask, self.scale, self.tp)
        return self.wo(out), cache_k, cache_v


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, tp, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, activation(cfg.hidden_act, gated=True),
                       use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.tp = tp

    def __call__(self, x, positions, cache_k, cache_v, prefill: bool):
        a, cache_k, cache_v = self.attn(self.attn_norm(x), positions, cache_k, cache_v, prefill)
        x = self.tp.constrain(x + a, ACT)
        x = self.tp.constrain(x + self.mlp(self.mlp_norm(x)), ACT)
        return x, cache_k, cache_v


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
        self.layers = nnx.List([Block(cfg, tp, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (vocab, cfg.hidden_size), ("vocab", "embed"), dtype)

    def cache_shape(self) -> tuple[int, int, int, jnp.dtype]:
        return self.cfg.num_layers, self.tp.kv_heads(self.cfg.num_kv_heads), self.cfg.head_dim, self.embed.embedding.dtype

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: kv.KVCache, *, prefill: bool,
                 logits_at: jax.Array | None = None) -> tuple[jax.Array, kv.KVCache]:
        """tokens, positions: (B, T). ``prefill``: the tokens start their sequences (attend
        among themselves). ``logits_at`` (B,): compute logits only at that index of each
        row (the last prompt token), else at every position. Logits are float32, with
        padded vocabulary entries at -inf."""
        x = self.tp.constrain(self.embed(tokens), ACT)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, ck, cv = layer(x, positions, cache.k[i], cache.v[i], prefill)
            new_k.append(ck)
            new_v.append(cv)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.norm(x)
        if self.cfg.tie_word_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("bte,ve->btv", x, self.lm_head[...])
        logits = logits.astype(jnp.float32)
        if logits.shape[-1] != self.cfg.vocab_size:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.cfg.vocab_size, logits, -jnp.inf)
        logits = self.tp.constrain(logits, ("batch", "length", "vocab"))
        return logits, kv.KVCache(k=new_k, v=new_v)
