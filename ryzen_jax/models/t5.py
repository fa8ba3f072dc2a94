"""T5 encoder–decoder (original T5 with ReLU, T5 v1.1 / flan-t5 with GeGLU).

Pre-norm blocks with T5's RMS norm n (no mean, no bias), unscaled dot-product
attention (the scale lives in the initialisation) plus a learned bias per bucket of
relative position, looked up once per stack (block 0's table) and shared by its layers:

    encoder:  h = x + Wo·attn(n(x), n(x); b_bidirectional, padding)     y = h + FF(n(h))
    decoder:  h = x + Wo·attn(n(x), n(x); b_causal, causal)
              h = h + Wo'·attn(n(h), enc; padding)                      y = h + FF(n(h))
    logits  = n(y)·E^T·d_model^-0.5 (tied, E the shared embedding)  or  n(y)·W_lm^T

For the engine, ``prefill`` runs the encoder once and keeps each decoder layer's
cross-attention keys and values in the cache; ``decode`` runs only the decoder.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ryzen_jax import cache as kv
from ryzen_jax.activations import activation
from ryzen_jax.config import ModelConfig
from ryzen_jax.layers import (HIDDEN, MLP, Embedding, MultiHeadAttention, RMSNorm, attention, causal_self_attention,
                              param, vocab_logits)
from ryzen_jax.sharding import TensorParallelConfig, pad_to_multiple


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class T5Cache:
    """The decoder's state: its self-attention KV cache, and per decoder layer the
    cross-attention keys/values of the encoder output (B, H, S, D), S padded to the
    cache length, with ``encoder_mask`` (B, S) True at real input positions."""

    self_kv: kv.KVCache
    cross_k: list[jax.Array]
    cross_v: list[jax.Array]
    encoder_mask: jax.Array


def relative_buckets(n: int, *, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """The bucket of every relative position ``key - query`` in [-(n-1), n-1] (entry
    ``rel + n - 1``), as Hugging Face's T5 assigns them: exact buckets for small
    distances, logarithmic ones up to ``max_distance``; bidirectional (encoder) gives
    half the buckets to keys after the query, causal (decoder) only sees keys before.
    Computed on the host in float32 like transformers, so the boundaries agree."""
    rel = np.arange(-(n - 1), n, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        dist = np.abs(rel)
    else:
        dist = -np.minimum(rel, 0)
    exact = num_buckets // 2
    far = np.maximum(dist, exact).astype(np.float32)  # the log form is used only from `exact` on
    log_ratio = np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    large = exact + (log_ratio * np.float32(num_buckets - exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(dist < exact, dist, large)).astype(np.int32)


class T5Block(nnx.Module):
    """One layer: self-attention, cross-attention (decoder only), feed-forward; each
    sub-layer is ``x + f(n(x))`` and ends in one all-reduce."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, cross: bool, dtype, rngs: nnx.Rngs):
        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

        def heads() -> MultiHeadAttention:
            return MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, dtype=dtype, rngs=rngs)

        self.attn_norm, self.attn = norm(), heads()
        self.cross_norm, self.cross = (norm(), heads()) if cross else (None, None)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, activation(cfg.hidden_act), dtype=dtype, rngs=rngs)
        self.tp = tp

    def _add(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.tp.constrain(x + y, HIDDEN)

    def encode(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
        """Encoder layer: bidirectional self-attention under ``mask`` (B, 1, S)."""
        q, k, v = self.attn.qkv(self.attn_norm(x))
        x = self._add(x, self.attn.wo(attention(q, kv.heads_major(k), kv.heads_major(v), mask, 1.0, self.tp, bias)))
        return self._add(x, self.mlp(self.mlp_norm(x)))

    def decode(self, x: jax.Array, positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array, bias, *,
               prefill: bool, cross_k: jax.Array, cross_v: jax.Array, cross_mask: jax.Array):
        """Decoder layer at ``positions`` (B, T): causal self-attention through its
        cache, then attention over the encoder's keys/values under ``cross_mask``."""
        q, k, v = self.attn.qkv(self.attn_norm(x))
        a, cache_k, cache_v = causal_self_attention(q, k, v, positions, cache_k, cache_v, prefill=prefill, scale=1.0,
                                                    tp=self.tp, bias=bias)
        x = self._add(x, self.attn.wo(a))
        a = attention(self.cross.wq(self.cross_norm(x)), cross_k, cross_v, cross_mask, 1.0, self.tp)
        x = self._add(x, self.cross.wo(a))
        return self._add(x, self.mlp(self.mlp_norm(x))), cache_k, cache_v


class T5Stack(nnx.Module):
    """The encoder or the decoder: its layers, its relative-position bias table
    (buckets, heads) — split over ``model`` with the heads — and its final norm."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, num_layers: int, *, decoder: bool, dtype,
                 rngs: nnx.Rngs):
        self.rel_bias = param(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads"), dtype)
        self.layers = nnx.List([T5Block(cfg, tp, cross=decoder, dtype=dtype, rngs=rngs) for _ in range(num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.bidirectional = not decoder
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance

    def position_bias(self, q_pos: jax.Array, k_pos: jax.Array, n: int) -> jax.Array:
        """Bias (B, H, T, S) for queries at ``q_pos`` (B, T) and keys at ``k_pos`` (B, S),
        every position below ``n``."""
        table = jnp.asarray(relative_buckets(n, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                             max_distance=self.max_distance))
        buckets = table[k_pos[:, None, :] - q_pos[:, :, None] + n - 1]  # (B, T, S)
        return jnp.moveaxis(self.rel_bias[...][buckets], -1, 1)


class T5ForConditionalGeneration(nnx.Module):
    """Encoder input ids → decoder next-token logits, with the engine protocol of
    :mod:`ryzen_jax.models.base` (``prefill``/``decode`` over a :class:`T5Cache`) and a
    teacher-forced :meth:`forward`."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        tp.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
        self.cfg, self.tp = cfg, tp
        vocab = pad_to_multiple(cfg.vocab_size, tp.tp_size)
        self.shared = Embedding(vocab, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, tp, cfg.num_layers, decoder=False, dtype=dtype, rngs=rngs)
        self.decoder = T5Stack(cfg, tp, cfg.num_decoder_layers, decoder=True, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (vocab, cfg.hidden_size), ("vocab", "embed"), dtype)

    # -- the two stacks ---------------------------------------------------------------
    def encode(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Encoder output (B, S, E) for input ids (B, S) with ``mask`` (B, S) True at real tokens."""
        x = self.tp.constrain(self.shared(tokens), HIDDEN)
        pos = jnp.arange(tokens.shape[1])[None]
        bias = self.encoder.position_bias(pos, pos, tokens.shape[1])
        for layer in self.encoder.layers:
            x = layer.encode(x, mask[:, None, :], bias)
        return self.encoder.norm(x)

    def new_cache(self, encoded: jax.Array, mask: jax.Array, max_len: int) -> T5Cache:
        """An empty decoder cache of ``max_len`` positions holding the cross-attention
        keys/values of ``encoded`` (B, S, E), S ≤ max_len, padded to max_len."""
        b, s, _ = encoded.shape
        if s > max_len:
            raise ValueError(f"encoder input of {s} tokens is longer than max_len={max_len}; raise max_len")
        encoded = jnp.pad(encoded, ((0, 0), (0, max_len - s), (0, 0)))
        mask = self.tp.constrain(jnp.pad(mask, ((0, 0), (0, max_len - s))), ("batch", "cache_length"))
        def heads(proj: nnx.Module) -> jax.Array:
            return self.tp.constrain(kv.heads_major(proj(encoded)), kv.CACHE_AXES)

        cross_k = [heads(layer.cross.wk) for layer in self.decoder.layers]
        cross_v = [heads(layer.cross.wv) for layer in self.decoder.layers]
        self_kv = kv.init_cache(len(self.decoder.layers), b, max_len, self.cfg.num_heads, self.cfg.head_dim, self.tp,
                                self.shared.embedding.dtype)
        return T5Cache(self_kv=self_kv, cross_k=cross_k, cross_v=cross_v, encoder_mask=mask)

    def run_decoder(self, tokens: jax.Array, positions: jax.Array, cache: T5Cache, *,
                    prefill: bool) -> tuple[jax.Array, T5Cache]:
        """Decoder logits (B, T, V) for ``tokens`` at ``positions`` (B, T), reading and
        writing the cache; ``prefill``: the tokens start their sequences at position 0.
        Float32, vocab-sharded, padded vocabulary entries at -inf."""
        x = self.tp.constrain(self.shared(tokens), HIDDEN)
        n = cache.self_kv.k[0].shape[2]

        def bias(key_pos: jax.Array) -> jax.Array:
            return self.decoder.position_bias(positions, key_pos, n)

        cross_mask = cache.encoder_mask[:, None, :]
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder.layers):
            x, ck, cv = layer.decode(x, positions, cache.self_kv.k[i], cache.self_kv.v[i], bias, prefill=prefill,
                                     cross_k=cache.cross_k[i], cross_v=cache.cross_v[i], cross_mask=cross_mask)
            new_k.append(ck)
            new_v.append(cv)
        x = self.decoder.norm(x)
        if self.cfg.tie_word_embeddings:  # the shared embedding as LM head, on a rescaled input (as HF)
            x, head = x * self.cfg.hidden_size ** -0.5, self.shared.embedding[...]
        else:
            head = self.lm_head[...]
        logits = vocab_logits(x, head, self.cfg.vocab_size, self.tp)
        return logits, dataclasses.replace(cache, self_kv=kv.KVCache(k=new_k, v=new_v))

    # -- entry points -----------------------------------------------------------------
    def forward(self, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array) -> jax.Array:
        """Teacher-forced logits (B, T, V) of ``decoder_input_ids`` (B, T) given the
        encoder input (B, S) and its mask (B, S): what HF's model(...).logits gives."""
        mask = attention_mask.astype(bool)
        t = decoder_input_ids.shape[1]
        cache = self.new_cache(self.encode(input_ids, mask), mask, max(t, input_ids.shape[1]))
        positions = jnp.broadcast_to(jnp.arange(t), decoder_input_ids.shape)
        return self.run_decoder(decoder_input_ids, positions, cache, prefill=True)[0]

    def prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int):
        """Encode right-padded inputs (B, T) of true ``lengths`` (B,), build the cache for
        ``max_len`` decoder positions, and run the decoder start token at position 0.
        Returns (logits (B, V), cache, positions = ones (B,))."""
        mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        cache = self.new_cache(self.encode(tokens, mask), mask, max_len)
        b = tokens.shape[0]
        start = jnp.full((b, 1), self.cfg.decoder_start_token_id, tokens.dtype)
        logits, cache = self.run_decoder(start, jnp.zeros((b, 1), jnp.int32), cache, prefill=True)
        return logits[:, 0], cache, jnp.ones((b,), jnp.int32)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: T5Cache,
               attend: int | None = None) -> tuple[jax.Array, T5Cache]:
        """One decoder token per row (B,) written at ``positions`` (B,) → logits (B, V).
        ``attend`` is accepted for the engine's protocol; T5 reads its whole cache."""
        logits, cache = self.run_decoder(tokens[:, None], positions[:, None], cache, prefill=False)
        return logits[:, 0], cache
