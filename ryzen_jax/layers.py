"""Building blocks shared by the model families: tensor-parallel dense layers,
vocab-parallel embedding, RMSNorm, rotary embeddings and attention.

Every parameter carries logical axis names (``sharding_names``); which mesh axis
each name lands on is decided only in ``ryzen_jax.sharding``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ryzen_jax import cache as kv
from ryzen_jax.activations import FeedForward
from ryzen_jax.config import RopeScaling
from ryzen_jax import kernels
from ryzen_jax.kernels import linear
from ryzen_jax.sharding import TensorParallelConfig

Axes = tuple[str | None, ...]
_init = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, dtype, init=_init) -> nnx.Param:
    """A parameter annotated with logical axes; placement happens at load time."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class ColumnParallelLinear(nnx.Module):
    """``y = x Wᵀ + b`` with W's output rows split over the ``model`` mesh axis.

    W is stored (out, in), as PyTorch stores it: XLA:CPU's matrix products stream a
    weight faster in this orientation (the benchmark's small shape, its matmuls alone:
    16% at batch 8, 4-6% at batch 1). ``out_features`` may be a tuple, e.g.
    ``(heads, head_dim)``, so the head split is explicit in the weight's shape. No
    communication: each device produces its own outputs.
    """

    def __init__(self, in_features: int, out_features: Sequence[int], out_axes: Axes, *, in_axis: str = "embed",
                 use_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (*out_features, in_features), (*out_axes, in_axis), dtype)
        self.bias = param(rngs, tuple(out_features), out_axes, dtype, nnx.initializers.zeros) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...]
        # one (out, in) matrix: XLA:CPU copied a 3-D kernel into (in, out) order every call
        y = linear(x, w.reshape(-1, w.shape[-1])).reshape(*x.shape[:-1], *w.shape[:-1])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RowParallelLinear(nnx.Module):
    """``y = x Wᵀ + b`` with W (out, in) split over ``model`` along its inputs: each
    device holds a partial sum and XLA ends the layer with one all-reduce. The bias is
    replicated and added once, after the reduction."""

    def __init__(self, in_features: Sequence[int], out_features: int, in_axes: Axes, *, out_axis: str = "embed",
                 use_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (out_features, *in_features), (out_axis, *in_axes), dtype)
        self.bias = param(rngs, (out_features,), ("norm",), dtype, nnx.initializers.zeros) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...]
        k = w.ndim - 1
        x = x.reshape(*x.shape[:x.ndim - k], -1)  # the input axes as one, like the kernel's below
        y = linear(x, w.reshape(w.shape[0], -1))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class MLP(nnx.Module):
    """The position-wise feed-forward block, Megatron-split: ``up`` (and ``gate``) are
    column-parallel over ``mlp``, ``down`` is row-parallel, so the block ends in one
    all-reduce. Gated (SwiGLU, GeGLU): ``down(act(gate(x)) * up(x))``; plain (GPT-2,
    BERT, T5 ReLU): ``down(act(up(x)))``."""

    def __init__(self, dim: int, hidden: int, ff: FeedForward, *, use_bias: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.gate = (ColumnParallelLinear(dim, (hidden,), ("mlp",), use_bias=use_bias, dtype=dtype, rngs=rngs)
                     if ff.gated else None)
        self.up = ColumnParallelLinear(dim, (hidden,), ("mlp",), use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.down = RowParallelLinear((hidden,), dim, ("mlp",), use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.act = ff.fn

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(h)


def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` along the first axis. XLA:CPU has no bfloat16 gather: it widens
    the table to float32 first, and in a decode loop hoists that out of the loop, a copy
    of the whole table at every dispatch. Where the CPU kernels serve, a bfloat16 table
    is read by ``kernels.take_rows``; elsewhere a 16-bit one moves as bits (XLA:CPU
    still copies it once per dispatch at tp > 1; half float32's bytes)."""
    if jnp.dtype(table.dtype).itemsize != 2:
        return jnp.take(table, ids, axis=0)
    if (rows := kernels.take_rows(table, ids)) is not None:
        return rows
    bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
    return jax.lax.bitcast_convert_type(bits, table.dtype)


class Embedding(nnx.Module):
    """Vocab-parallel embedding table ``(vocab, embed)``: each device holds a slice of
    the vocabulary; a lookup is a masked local gather plus one all-reduce, and
    ``attend`` (the tied LM head) yields vocab-sharded logits."""

    def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return gather_rows(self.embedding[...], tokens)

    def attend(self, x: jax.Array) -> jax.Array:
        return linear(x, self.embedding[...])


def vocab_logits(x: jax.Array, head: jax.Array, vocab_size: int, tp: TensorParallelConfig) -> jax.Array:
    """The LM head: hidden states (B, T, E) against a vocab-sharded ``head`` (V, E),
    V padded to a multiple of tp. Float32 logits (B, T, V), still vocab-sharded, with
    the padded entries at -inf so that no sampler ever picks one."""
    logits = linear(x, head).astype(jnp.float32)
    if logits.shape[-1] != vocab_size:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    return tp.constrain(logits, ("batch", "length", "vocab"))


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale``, normalised in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), dtype, nnx.initializers.ones)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / std * scale + bias`` over the last axis, computed in float32 as
    Hugging Face (``torch.nn.LayerNorm``) does, and cast back to the input's dtype."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), dtype, nnx.initializers.ones)
        self.bias = param(rngs, (dim,), ("norm",), dtype, nnx.initializers.zeros)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        xf = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/d)``, adjusted for linear or llama3 scaling."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.rope_type == "llama3":
        old = scaling.original_max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` (batch, length, heads, head_dim) by its positions (batch, length),
    in the rotate-half convention of Hugging Face Llama checkpoints."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              tp: TensorParallelConfig, bias: jax.Array | None = None,
              own: tuple[jax.Array, jax.Array, jax.Array | None] | None = None) -> jax.Array:
    """Grouped-query attention: q (B, T, H, D) against k, v (B, KV, S, D) (heads-major,
    as the cache holds them: :func:`ryzen_jax.cache.heads_major` turns fresh ones over).

    ``mask`` (B, T, S) is True where a query may see a key. Query head h reads KV head
    h // (H // KV), so with heads split over ``model`` each device needs only its own
    KV heads. Scores and softmax are float32. ``bias`` (B or 1, H, T, S), if given, is
    added to the scaled scores before masking (T5's relative position bias).

    ``own`` (k, v (B, KV, 1, D), bias (B or 1, H, 1, 1) or None), for one query per row:
    that query's own key and value, which ``k``, ``v`` do not hold yet — a decode step
    reads the cache as it was and writes its new slot after, so the write has one reader.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    q = q.reshape(b, t, kv, g, d)

    def scores_of(keys: jax.Array, bias: jax.Array | None) -> jax.Array:
        s = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32,
                       precision=kernels.dot_precision(q, keys)) * scale
        return s if bias is None else s + bias.astype(jnp.float32).reshape(bias.shape[0], kv, g, t, bias.shape[-1])

    scores = jnp.where(mask[:, None, None, :, :], scores_of(k, bias), jnp.finfo(jnp.float32).min)
    if own is not None:
        scores = jnp.concatenate([scores, scores_of(own[0], own[2])], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # (b, k, g, t, d) then to (b, t, k, g, d): V is the dot's right operand as it lies, uncopied
    precision = kernels.dot_precision(v)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs[..., :k.shape[2]], v, precision=precision)
    if own is not None:
        out = out + jnp.einsum("bkgts,bksd->bkgtd", probs[..., k.shape[2]:], own[1], precision=precision)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return tp.constrain(out, ("batch", "length", "heads", "head_dim"))


#: logical axes of the hidden states between layers
HIDDEN = ("batch", "length", "embed")


class MultiHeadAttention(nnx.Module):
    """The four projections of multi-head attention (grouped- and multi-query too): q, k,
    v column-parallel over heads, o row-parallel, so the block ends in one all-reduce.
    Each family adds its position encoding and mask around :meth:`qkv` and ``wo``."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 o_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        def column(n: int, axis: str) -> ColumnParallelLinear:
            return ColumnParallelLinear(dim, (n, head_dim), (axis, "head_dim"), use_bias=qkv_bias, dtype=dtype, rngs=rngs)

        self.wq, self.wk, self.wv = column(num_heads, "heads"), column(num_kv_heads, "kv_heads"), column(num_kv_heads, "kv_heads")
        self.wo = RowParallelLinear((num_heads, head_dim), dim, ("heads", "head_dim"), use_bias=o_bias, dtype=dtype,
                                    rngs=rngs)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q (B, T, H, D), k and v (B, T, KV, D)."""
        return self.wq(x), self.wk(x), self.wv(x)


#: query rows per block of a prefill's attention (``prefill_attention``), and the most
#: blocks per layer (longer prompts get longer blocks, so the program stays small)
PREFILL_BLOCK = 64
PREFILL_MAX_BLOCKS = 16


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, scale: float,
                      tp: TensorParallelConfig, window: int | None = None) -> jax.Array:
    """Causal attention among a prefill's own tokens, q (B, T, H, D) against k, v (B, KV,
    T, D), by blocks of query rows: block [i, e) attends to keys [0, e) only (in a prefill
    positions run 0..T-1 along every row, so every later key is masked for it), and with
    a sliding window only to those the window can reach. The masked part of the score
    matrix is never computed and each block's scores stay small enough for the caches:
    on the small shape, one 1,024-token prompt's attention per layer took 66-71 ms as one
    (T, T) score matrix per head and takes 8-12 ms in blocks of 64 rows (CPU)."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    block = max(PREFILL_BLOCK, -(-t // PREFILL_MAX_BLOCKS))
    n = -(-t // block)
    # each block's queries contiguous, (b, n, kv, g, block, d), and the keys turned over
    # once, (b, kv, d, t), as the score dot wants them; the barrier keeps XLA:CPU from
    # fusing that transpose back into every block's slice (a prefill 327 -> 272 ms)
    qb = jnp.pad(q, ((0, 0), (0, n * block - t), (0, 0), (0, 0))).reshape(b, n, block, kv, g, d)
    qb = qb.transpose(0, 1, 3, 4, 2, 5)
    qb, kt = jax.lax.optimization_barrier((qb, k.transpose(0, 1, 3, 2)))
    outs = []
    for j, i in enumerate(range(0, t, block)):
        e = min(t, i + block)
        first = 0 if window is None else max(0, i + 1 - window)
        q_pos, key_pos = positions[:, i:e], positions[:, first:e]
        mask = key_pos[:, None, :] <= q_pos[:, :, None]
        if window is not None:
            mask &= key_pos[:, None, :] > q_pos[:, :, None] - window
        keys, values = kt[:, :, :, first:e], v[:, :, first:e]
        s = jnp.einsum("bkgtd,bkds->bkgts", qb[:, j, :, :, : e - i], keys, preferred_element_type=jnp.float32,
                       precision=kernels.dot_precision(q, keys)) * scale
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min), axis=-1)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), values, precision=kernels.dot_precision(v)))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return tp.constrain(out, ("batch", "length", "heads", "head_dim"))


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache_k: jax.Array,
                          cache_v: jax.Array, *, prefill: bool, scale: float, tp: TensorParallelConfig,
                          window: int | None = None, bias: Callable[[jax.Array], jax.Array] | None = None,
                          attend: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention of new tokens at ``positions`` (B, T), whose keys and values are
    written into one layer's cache (B, KV, S, D) at those positions.

    ``prefill``: the tokens start their sequences, so they attend among themselves and
    the cache is not read back. Otherwise (one token per row) the token attends to the
    cache as it was and to its own key, and the write comes last. ``window``: a query sees only the last ``window``
    positions (sliding-window attention). ``bias(key_positions (B, S))`` → (B or 1, H,
    T, S): an additive score bias (T5's relative positions). ``attend`` (decode only): the
    queries' positions are all below it, so only the cache's first ``attend`` slots are
    read — a decode step costs what the sequences hold, not what the cache could.
    Returns (out (B, T, H, D), cache_k, cache_v).
    """
    q = tp.constrain(q, ("batch", "length", "heads", "head_dim"))
    start = positions[:, 0]
    k, v = kv.heads_major(k), kv.heads_major(v)
    # a decode step on our CPU kernel where it serves (ryzen_jax.kernels): it reads only
    # the cache positions each row holds; otherwise (None) XLA's attention below
    out = None if prefill or bias is not None else kernels.decode_attention(q, cache_k, cache_v, k, v, start,
                                                                             scale, window)
    if out is None and prefill and bias is None:
        out = prefill_attention(q, k, v, positions, scale, tp, window)
    if out is None:
        if prefill:
            keys, values, key_pos, own = k, v, positions, None
            mask = key_pos[:, None, :] <= positions[:, :, None]
        else:  # the cache before this step's write, then the step's own key and value
            keys, values = (cache_k, cache_v) if attend is None else (cache_k[:, :, :attend], cache_v[:, :, :attend])
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[2]), (q.shape[0], keys.shape[2]))
            own = (k, v, None if bias is None else bias(positions))
            mask = key_pos[:, None, :] < positions[:, :, None]
        if window is not None:
            mask &= key_pos[:, None, :] > positions[:, :, None] - window
        out = attention(q, keys, values, mask, scale, tp, None if bias is None else bias(key_pos), own)
    cache_k, cache_v = kv.write(cache_k, k, start), kv.write(cache_v, v, start)
    return out, cache_k, cache_v


class PreNormBlock(nnx.Module):
    """A pre-norm decoder layer (Llama, GPT-2):

        h = x + attn(attn_norm(x)),    y = h + mlp(mlp_norm(h))

    ``attn(x, positions, cache_k, cache_v, prefill, attend)`` returns (out, cache_k, cache_v)."""

    def __init__(self, attn_norm: nnx.Module, attn: nnx.Module, mlp_norm: nnx.Module, mlp: MLP,
                 tp: TensorParallelConfig):
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.tp = tp

    def __call__(self, x, positions, cache_k, cache_v, prefill: bool, attend: int | None = None):
        a, cache_k, cache_v = self.attn(self.attn_norm(x), positions, cache_k, cache_v, prefill, attend)
        x = self.tp.constrain(x + a, HIDDEN)
        x = self.tp.constrain(x + self.mlp(self.mlp_norm(x)), HIDDEN)
        return x, cache_k, cache_v
