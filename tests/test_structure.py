"""Structure of the compiled programs: the Megatron communication pattern and the
per-device memory that tensor parallelism promises, read from XLA's output."""

from __future__ import annotations

import re

import pytest

import ryzen_jax as rj
from ryzen_jax.engine.sampling import MAX_LOGIT_BIAS

COLLECTIVE = re.compile(r"^\s*%?[\w.-]+ = (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(kind, result shape) of every collective in an optimized HLO module."""
    return [(m.group(2), m.group(1)) for m in map(COLLECTIVE.match, hlo.splitlines()) if m]


@pytest.mark.parametrize("name,tp,dp", [("llama_gqa", 4, 1), ("llama_mqa", 4, 1), ("llama_gqa", 2, 2),
                                        ("llama_mha_tied", 4, 1)])
def test_decode_step_is_megatron(name, tp, dp, hf_model_dir):
    """Per layer exactly two all-reduces (after attention, after the MLP); one more for
    the vocab-parallel embedding lookup; the only all-gather is the LM head's logits.
    With dp > 1 the data-parallel rows also agree, by one scalar all-reduce per step,
    on whether every row has finished (the decode loop's exit test)."""
    lm = rj.load_model(hf_model_dir(name), tp=tp, dp=dp, dtype="float32", progress=False)
    batch = 2 * dp
    found = collectives(lm.generator.decode_program(batch).as_text())
    loop_exit = [(k, shape) for k, shape in found if shape == "pred[]"]
    assert loop_exit == ([("all-reduce", "pred[]")] if dp > 1 else []), found
    found = [f for f in found if f not in loop_exit]
    kinds = [k for k, _ in found]
    layers = lm.config.num_layers
    assert kinds.count("all-reduce") == 2 * layers + 1, found
    gathers = [shape.split("{")[0] for k, shape in found if k == "all-gather"]
    vocab = -(-lm.config.vocab_size // tp) * tp
    assert gathers == [f"f32[{batch // dp},1,{vocab}]"], found  # logits rows, never a weight
    assert not {"reduce-scatter", "all-to-all", "collective-permute"} & set(kinds), found


@pytest.mark.parametrize("tp", [2, 4])
def test_bytes_per_device(tp, hf_model_dir):
    """Each sharded weight holds 1/tp of its bytes per device; the compiled decode step's
    arguments per device are exactly the weight shards plus the KV-cache shard."""
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=tp, dtype="float32", progress=False)
    import jax

    per_device = 0
    for leaf in jax.tree.leaves(lm.generator.state):
        shard = leaf.addressable_shards[0].data
        sharded = any(ax is not None for ax in leaf.sharding.spec)
        expected = leaf.nbytes // tp if sharded else leaf.nbytes
        assert shard.nbytes == expected, (leaf.shape, leaf.sharding.spec)
        per_device += shard.nbytes
    assert per_device < sum(leaf.nbytes for leaf in jax.tree.leaves(lm.generator.state)) / tp * 1.1

    batch, max_len = 2, lm.generator.max_seq_len
    cfg = lm.config
    cache = 2 * cfg.num_layers * batch * max_len * lm.generator.kv_heads * cfg.head_dim * 4 // tp
    mem = lm.generator.decode_program(batch).memory_analysis()
    vocab = -(-cfg.vocab_size // tp) * tp
    # per row: the penalties' history (a prompt mask and int32 counts), 16 stop ids, the logit bias's
    # 300 (id, bias) pairs and a few scalars
    small_inputs = batch * (vocab * 5 + 16 * 4 + MAX_LOGIT_BIAS * 8 + 64) + 64
    assert per_device + cache <= mem.argument_size_in_bytes <= per_device + cache + small_inputs
    assert mem.alias_size_in_bytes >= cache  # the donated cache is updated in place


@pytest.mark.parametrize("tp,batch", [(1, 1), (1, 4), (2, 2)])
def test_decode_step_moves_no_cache(tp, batch, hf_model_dir):
    """A decode step reads each layer's cache where it lies and writes one slot in place:
    no instruction of the compiled step copies or transposes a whole cache layer (XLA:CPU
    did both, every step, before the cache was heads-major and the write came last)."""
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=tp, dtype="float32", progress=False)
    g = lm.generator
    # compiled as users compile it: the test session turns XLA:CPU's fusion emitters off (tests/conftest.py),
    # and the elemental emitters copy a cache that is updated in place
    g._options = {**g._options, "xla_cpu_use_fusion_emitters": True}
    layer = f"f32[{batch},{g.kv_heads // tp},{g.max_seq_len},{lm.config.head_dim}]"
    moves = re.compile(r"= (\S+) (copy|transpose)\(")
    hlo = g.decode_program(batch).as_text()
    moved = [line.strip()[:160] for line in hlo.splitlines()
             if (m := moves.search(line)) and m.group(1).split("{")[0] in (layer, layer.replace("[1,", "["))]
    assert not moved, moved
