"""The programs that run on the devices, as pure functions over a model's state.

``device_programs`` builds the two the engine compiles (``Generator`` in
``generate.py`` owns their compilation, placement and the host's bookkeeping):

* ``prefill(state, tokens, lengths, s, max_new, stop_ids, score_prompt=False)`` runs the
  right-padded prompts, creates the cache, picks each row's first token and returns
  (its ``Picked``, the ``DecodeState``, the cache), plus the prompt tokens' ``Picked``
  when ``score_prompt``;
* ``decode(state, cache, d, s, n_steps, attend)`` is a ``while_loop`` of up to
  ``DECODE_CHUNK`` steps, each feeding one token per row into the donated cache,
  sampling the next and applying EOS / stop ids / ``max_new_tokens`` on the device.

Every sampling setting arrives as a replicated array, so whether any row samples, has a
penalty, a grammar's mask, a logit bias, ``min_tokens`` or asks for log-probabilities is
a local question that switches whole branches off for the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ryzen_jax.engine.sampling import (MAX_LOGPROBS, History, Picked, add_bias, any_biased, any_held, any_masked,
                                       any_penalized, any_sampled, hold_stops, mask_disallowed, pick, sample)
from ryzen_jax.sharding import TensorParallelConfig

#: most decode steps one dispatch runs (the non-streaming path asks for all of them)
DECODE_CHUNK = 32
#: prompt positions scored at a time (``prompt_logprobs``): the LM head's logits are held
#: for (batch, SCORE_CHUNK, vocabulary) at most, not for the whole prompt
SCORE_CHUNK = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-row generation state, kept on the device between dispatches."""

    tokens: jax.Array  # (B,) last sampled token: the input of the next step
    positions: jax.Array  # (B,) where that token is written in the cache
    index: jax.Array  # (B,) tokens generated so far (keys the next random draw)
    max_new: jax.Array  # (B,)
    done: jax.Array  # (B,) bool
    history: History  # (B, V) each: the tokens in the sequence, for the penalties
    stop_ids: jax.Array  # (B, MAX_STOP_IDS), -1 = unused


def pin(d: DecodeState, tp: TensorParallelConfig) -> DecodeState:
    """Every field split by rows over ``data``, like the batch it describes."""
    return jax.tree.map(lambda x: tp.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), d)


def advance(d: DecodeState, tok: jax.Array, penalized: jax.Array | bool = True) -> tuple[jax.Array, DecodeState]:
    """Take each live row's new token: count it (in the history only while some row has
    a penalty: ``penalized``), and finish rows that hit a stop id or their budget.
    Returns the tokens to report (-1 for finished rows)."""
    live = ~d.done
    tok = jnp.where(live, tok, d.tokens)
    index = d.index + live
    stopped = jnp.any(tok[:, None] == d.stop_ids, axis=1)
    history = jax.lax.cond(penalized, lambda: d.history.add(tok, live), lambda: d.history)
    new = dataclasses.replace(d, tokens=tok, index=index, history=history,
                              done=d.done | (live & (stopped | (index >= d.max_new))))
    return jnp.where(live, tok, -1), new


def device_programs(graphdef: nnx.GraphDef, cfg: Any, tp: TensorParallelConfig, max_len: int):
    """(prefill, decode) for a model split into ``graphdef`` and its state, with a cache
    of ``max_len`` positions on ``tp``'s mesh."""
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    start_token = getattr(cfg, "decoder_start_token_id", None) or 0
    n_top = min(MAX_LOGPROBS, cfg.vocab_size)  # alternatives reported per token, at most

    rows, wide = P("data"), P("data", None)
    # `pick` on each device's own rows, computing only where one of them is wanted: XLA's
    # partitioner would run a batch-split top-k on all rows (an all-gather of the logits
    # over data); the branches hold no collectives
    pick_rows = jax.shard_map(functools.partial(pick, k=n_top), mesh=tp.mesh, in_specs=(wide, rows, rows),
                              out_specs=Picked(rows, rows, wide, wide), check_vma=False)

    def picked(logits, tokens, s, live):
        # the step's picks; log-probabilities for the live rows that ask
        return pick_rows(logits, tokens, (s.logprobs >= 0) & live)

    def steering(s):
        # once per dispatch, from replicated settings: some row is constrained (structured
        # outputs), has a logit bias, has min_tokens
        return any_masked(s), any_biased(s), any_held(s)

    def steered(logits, s, d, flags):
        # the logits as the rows' settings bend them before sampling, each step only where
        # some row asks (`flags`): the tokens a row's grammar disallows at -inf; the logit
        # bias added; the stop ids of rows short of their min_tokens held back. Per device
        # rows, as in `picked`
        mask_on, bias_on, hold_on = flags
        local = lambda f, specs: jax.shard_map(f, mesh=tp.mesh, in_specs=specs, out_specs=wide,  # noqa: E731
                                               check_vma=False)
        mask, add, hold = (local(mask_disallowed, (wide, wide)), local(add_bias, (wide, wide, wide)),
                           local(hold_stops, (wide, wide, rows)))
        logits = jax.lax.cond(mask_on, lambda: mask(logits, s.allowed), lambda: logits)
        logits = jax.lax.cond(bias_on, lambda: add(logits, s.bias_ids, s.bias), lambda: logits)
        return jax.lax.cond(hold_on, lambda: hold(logits, d.stop_ids, d.index < s.min_tokens), lambda: logits)

    def scored(hidden, tokens, head):
        # each prompt position's logits score the token after it (the last one's, a
        # padding position's: ignored), SCORE_CHUNK positions at a time: `head` turns a
        # chunk's states into whole logit rows, each position a row for `pick_rows`; with
        # each scored token's rank beside its picks
        b, t, e = hidden.shape
        chunk = min(t, SCORE_CHUNK)
        n = -(-t // chunk)

        def one(c):
            logits = head(c[0]).reshape(b * chunk, -1)
            p = pick_rows(logits, c[1].reshape(-1), jnp.ones((b * chunk,), bool))
            # each token's rank (vLLM's): how many tokens are at least as likely, itself included
            chosen = jnp.take_along_axis(logits, c[1].reshape(-1, 1), axis=-1)
            ranks = jnp.sum(logits >= chosen, axis=-1, dtype=jnp.int32)
            return jax.tree.map(lambda x: x.reshape((b, chunk) + x.shape[1:]), (p, ranks))

        nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, n * chunk - t + 1)))
        hs = jnp.pad(hidden, ((0, 0), (0, n * chunk - t), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
        out = jax.lax.map(one, (hs, nxt.reshape(b, n, chunk).swapaxes(0, 1)))
        return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((b, n * chunk) + x.shape[3:])[:, :t], out)

    def gathered(logits):
        # The LM head's one all-gather: vocab-sharded logits → whole rows, so that
        # sampling (sort, cumsum, argmax) runs locally instead of as many collectives.
        return tp.constrain(logits, ("batch",) + (None,) * (logits.ndim - 1))

    def prefill(state, tokens, lengths, s, max_new, stop_ids, score_prompt=False):
        model = nnx.merge(graphdef, state)
        if score_prompt:  # the final norm's states everywhere: the last prompt token's logits pick the first
            # token, the others' are scored a chunk at a time (never (B, T, vocabulary) at once)
            hidden, cache, positions = model.prefill(tokens, lengths, max_len, every_position=True)
            table = model.head_table()
            head = lambda h: gathered(model.logits_of(h, table))  # noqa: E731
            logits = head(jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1))[:, 0]
        else:
            logits, cache, positions = model.prefill(tokens, lengths, max_len)
            logits = gathered(logits)
        b, v = logits.shape
        if enc_dec:  # the decoder's sequence so far is its start token
            prompt = jnp.arange(v)[None, :] == start_token
        else:
            valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
            prompt = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], jnp.where(valid, tokens, v)].set(
                True, mode="drop")
        history = History(prompt=tp.constrain(jnp.broadcast_to(prompt, (b, v)), ("batch", None)),
                          counts=tp.constrain(jnp.zeros((b, v), jnp.int32), ("batch", None)))
        d = DecodeState(tokens=jnp.zeros((b,), jnp.int32), positions=positions, index=jnp.zeros((b,), jnp.int32),
                        max_new=max_new, done=jnp.zeros((b,), bool), history=history, stop_ids=stop_ids)
        d = pin(d, tp)
        first, d = advance(d, sample(steered(logits, s, d, steering(s)), s, history, d.index))
        out = picked(logits, first, s, jnp.ones((b,), bool)), pin(d, tp), cache
        return out + (scored(hidden, tokens, head),) if score_prompt else out

    def decode(state, cache, d, s, n_steps, attend):
        model = nnx.merge(graphdef, state)
        # once per dispatch, from replicated settings
        sampled, penalized, flags = any_sampled(s), any_penalized(s), steering(s)
        b = d.tokens.shape[0]
        out = Picked(tokens=jnp.full((b, DECODE_CHUNK), -1, jnp.int32), logprobs=jnp.zeros((b, DECODE_CHUNK)),
                     top_ids=jnp.zeros((b, DECODE_CHUNK, n_top), jnp.int32),
                     top_logprobs=jnp.zeros((b, DECODE_CHUNK, n_top)))

        def cond(carry):
            i, d, _, _ = carry
            return (i < n_steps) & ~jnp.all(d.done)

        def body(carry):
            i, d, cache, out = carry
            logits, cache = model.decode(d.tokens, d.positions, cache, attend)
            # finished rows stay put (they rewrite their last slot, harmlessly)
            d = dataclasses.replace(d, positions=d.positions + ~d.done)
            logits, live = gathered(logits), ~d.done
            tok, d = advance(d, sample(steered(logits, s, d, flags), s, d.history, d.index, sampled, penalized),
                              penalized)
            return i + 1, pin(d, tp), cache, jax.tree.map(lambda o, x: o.at[:, i].set(x), out,
                                                            picked(logits, tok, s, live))

        _, d, cache, out = jax.lax.while_loop(cond, body, (jnp.int32(0), d, cache, out))
        return out, d, cache

    return prefill, decode
