"""The public tensor-parallel layers, prompt-length buckets and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ryzen_jax as rj
from ryzen_jax.engine.generate import bucket
from tests.test_structure import collectives


def test_column_then_row_parallel_is_one_all_reduce():
    """A user-built MLP from the public layers: matches numpy, and XLA ends it with one all-reduce."""
    tp = rj.create_tensor_parallel_config(4, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    class MLP(nnx.Module):
        def __init__(self):
            self.col = rj.ColumnParallelLinear(32, (64,), ("mlp",), rngs=nnx.Rngs(0))
            self.row = rj.RowParallelLinear((64,), 32, ("mlp",), use_bias=True, rngs=nnx.Rngs(1))

    graphdef, state = nnx.split(MLP())
    w1, w2 = (np.asarray(state[k]["kernel"].get_value()) for k in ("col", "row"))
    for _, var in nnx.to_flat_state(state):  # place each parameter by its logical axes
        var.set_value(jax.device_put(var.get_value(), tp.sharding(var.get_metadata()["out_sharding"])))
    assert state["col"]["kernel"].get_value().addressable_shards[0].data.shape == (16, 32)  # (out, in), out split

    def mlp(state, x):
        m = nnx.merge(graphdef, state)
        return tp.constrain(m.row(jax.nn.relu(m.col(x))), ("batch", "embed"))

    x = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    f = jax.jit(mlp)
    np.testing.assert_allclose(np.asarray(f(state, x)), np.maximum(x @ w1.T, 0) @ w2.T, rtol=1e-5, atol=1e-5)
    kinds = [k for k, _ in collectives(f.lower(state, x).compile().as_text())]
    assert kinds == ["all-reduce"]


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_prompts_in_one_bucket_share_one_prefill_program(hf_model_dir):
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=2, progress=False)
    gen = lm.generator
    gen.generate([[1, 2, 3]], 4, stop_ids=[])
    compiled = gen.compile_count
    for n in (5, 9, 16):
        gen.generate([list(range(1, n + 1))], 4, stop_ids=[])
    assert gen.compile_count == compiled  # same bucket (16), same decode shape: nothing new
    gen.generate([list(range(1, 20))], 4, stop_ids=[])
    assert gen.compile_count == compiled + 1  # bucket 32: one new prefill program


def test_bfloat16_runs_close_to_float32(hf_model_dir):
    """bfloat16 weights and cache (the GPU default): same program, logits near float32's."""
    from tests.test_parity import PROMPT, full_logits

    f32 = rj.load_model(hf_model_dir("llama_gqa"), tp=4, dtype="float32", progress=False)
    bf16 = rj.load_model(hf_model_dir("llama_gqa"), tp=4, dtype="bfloat16", progress=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.generator.state)} == {jnp.dtype("bfloat16")}
    a, b = full_logits(f32, PROMPT), full_logits(bf16, PROMPT)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    assert len(bf16.generator.generate([PROMPT], 8, stop_ids=[]).generated_ids[0]) == 8


def test_compiler_options_an_xla_refuses_are_dropped_with_a_warning(caplog):
    """Our XLA:CPU options are tuning: an XLA that does not know one still compiles the
    program (without them) and says so, and the options are not tried again."""
    from ryzen_jax.engine.compile import CPU_COMPILER_OPTIONS, compile_lowered

    lowered = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(3))
    assert np.array_equal(compile_lowered(lowered, dict(CPU_COMPILER_OPTIONS))(jnp.ones(3)), [3.0] * 3)
    options = {"xla_no_such_option": True}
    with caplog.at_level("WARNING"):
        exe = compile_lowered(lowered, options)
    assert np.array_equal(exe(jnp.ones(3)), [3.0] * 3)
    assert "xla_no_such_option" in caplog.text and options == {}
