"""What the engine asks of a generative model: two functions over a cache pytree.

    prefill(tokens (B, T), lengths (B,), max_len) -> logits (B, V), cache, positions (B,)
    decode(tokens (B,), positions (B,), cache)    -> logits (B, V), cache

A decoder-only model's ``prefill(..., every_position=True)`` returns the final norm's
states at every prompt position instead, (B, T, E), which ``logits_of(h, head_table())``
turns into logits a chunk of positions at a time, for scoring the prompt itself; and
its ``hidden_states`` the same states, for embeddings (the engine's ``Encoder``).

``prefill`` starts every row (right-padded prompts of true ``lengths``), creates the
model's cache for ``max_len`` positions inside the program (so it is born sharded)
and returns the logits that pick each row's first new token, plus the position the
next token is written at. ``decode`` feeds one token per row. Logits are float32,
vocab-sharded, with padded vocabulary entries at -inf. Every leaf of the cache has
the batch as its first dimension, so a row can be copied into a serving slot.

Decoder-only families (Llama, GPT-2) get both from :class:`DecoderOnlyLM`; an
encoder–decoder (T5) runs its encoder in ``prefill`` and keeps the cross-attention
keys and values in its cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ryzen_jax import cache as kv
from ryzen_jax.layers import vocab_logits


class DecoderOnlyLM:
    """prefill/decode for a model whose ``__call__(tokens, positions, cache, *, prefill,
    logits_at)`` returns (logits (B, T, V), KVCache). Needs ``self.cfg``, ``self.tp`` and
    ``self.embed`` (an ``Embedding``)."""

    def cache_shape(self) -> tuple[int, int, int, jnp.dtype]:
        """(layers, KV heads held (replicated up to tp), head_dim, dtype) of the KV cache."""
        return self.cfg.num_layers, self.tp.kv_heads(self.cfg.num_kv_heads), self.cfg.head_dim, self.embed.embedding.dtype

    def new_cache(self, batch: int, max_len: int) -> kv.KVCache:
        layers, kv_heads, head_dim, dtype = self.cache_shape()
        return kv.init_cache(layers, batch, max_len, kv_heads, head_dim, self.tp, dtype)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int, every_position: bool = False):
        cache = self.new_cache(tokens.shape[0], max_len)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if every_position:
            hidden, cache = self(tokens, positions, cache, prefill=True, head=False)
            return hidden, cache, lengths
        logits, cache = self(tokens, positions, cache, prefill=True, logits_at=lengths - 1)
        return logits[:, 0], cache, lengths

    def head_table(self) -> jax.Array:
        """The LM head's (V, E) table, vocab-sharded: the embedding's when tied."""
        return self.embed.embedding[...] if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits_of(self, hidden: jax.Array, table: jax.Array) -> jax.Array:
        """The LM head on final-norm states (B, T, E) with ``table`` (``head_table()``):
        float32 vocab-sharded logits, padded entries at -inf."""
        return vocab_logits(hidden, table, self.cfg.vocab_size, self.tp)

    def hidden_states(self, tokens: jax.Array, attention_mask: jax.Array | None = None,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """The final norm's output at every position, (B, T, E) float32, for right-padded
        rows: attention is causal, so padding never reaches a real token and needs no
        mask (the arguments after ``tokens`` keep an encoder's signature)."""
        hidden, _, _ = self.prefill(tokens, None, tokens.shape[1], every_position=True)
        return hidden.astype(jnp.float32)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: kv.KVCache, attend: int | None = None):
        logits, cache = self(tokens[:, None], positions[:, None], cache, prefill=False, attend=attend)
        return logits[:, 0], cache

    def decoder_stack(self, x: jax.Array, positions: jax.Array, cache: kv.KVCache, *, prefill: bool,
                      logits_at: jax.Array | None, attend: int | None = None,
                      head: bool = True) -> tuple[jax.Array, kv.KVCache]:
        """What every decoder-only family does after its embedding: the layers, each
        reading and writing its cache slice; the final norm; the LM head (tied: the
        embedding table), at ``logits_at`` only when given. Needs ``self.layers``,
        ``self.norm``, ``self.embed`` and, untied, ``self.lm_head`` (vocab, embed).
        Returns float32 vocab-sharded logits with padded vocabulary entries at -inf
        (``head=False``: the normed hidden states instead)."""
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, ck, cv = layer(x, positions, cache.k[i], cache.v[i], prefill, attend)
            new_k.append(ck)
            new_v.append(cv)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        cache = kv.KVCache(k=new_k, v=new_v)
        return (self.logits_of(self.norm(x), self.head_table()) if head else self.norm(x)), cache
