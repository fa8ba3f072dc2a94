"""Our CPU matmul kernel (ryzen_jax.kernels): its products against NumPy in float64,
where the programs use it (a decode step on one CPU device) and where they must not
(prefill-sized inputs, tensor-parallel meshes), and the fallback to XLA's dot."""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType

import ryzen_jax as rj
from flax import nnx

from ryzen_jax import kernels
from tests import hf_models
from tests.test_parity import PROMPT

needs_kernel = pytest.mark.skipif(not kernels.load(), reason="the CPU kernel cannot be built here (see the warning)")


def mesh(n: int):
    return jax.make_mesh((1, n), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n])


def loop_params(*names: str) -> list:
    """The matmul kernel's loops as test parameters, skipped where this CPU lacks one."""
    return [pytest.param(n, marks=pytest.mark.skipif(n not in kernels.loops(), reason=f"this CPU has no {n}"))
            for n in names]


@needs_kernel
@pytest.mark.parametrize("loop", loop_params("avx2", "avx512"))
@pytest.mark.parametrize("m,out,inp", [(1, 4099, 520), (1, 7, 13), (2, 300, 1376), (3, 1, 7), (5, 33, 40),
                                       (8, 2000, 64), (8, 5, 1), (6, 2051, 517), (8, 3, 33), (11, 70, 24),
                                       (16, 1030, 129), (8, 64, 3001), (16, 40, 700), (12, 77, 1500)])
def test_products_match_numpy(m, out, inp, loop):
    """Row counts up to 16 (tiles of eight and what is left), in each of its loops, with
    input widths off its 8-, 16- and 32-wide steps, odd output counts, enough output
    rows to be split over both threads, and inputs too wide for L1 (walked in blocks,
    from 9 rows up copied block by block)."""
    rng = np.random.default_rng(m * out + inp)
    x = rng.standard_normal((m, inp), dtype=np.float32)
    w = rng.standard_normal((out, inp), dtype=np.float32)
    got = np.asarray(jax.jit(functools.partial(kernels.skinny_matmul, loop=loop))(x, w))
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(inp) * np.abs(want).max())


@needs_kernel
@pytest.mark.parametrize("loop", loop_params("avx2", "avx512", "avx512_bf16"))
@pytest.mark.parametrize("m,out,inp", [(1, 4099, 520), (3, 7, 13), (2, 33, 96), (8, 2051, 517), (16, 300, 64),
                                       (8, 50, 3001), (16, 301, 4133), (11, 45, 2100), (1, 9, 17000)])
def test_bfloat16_products_match_numpy(m, out, inp, loop):
    """bfloat16 x and w: the float64 product of the same bfloat16 values, rounded once to
    bfloat16 (within one of its steps: the sums are float32, in another order); rows of
    x up to 16 (weight rows in pairs from 9 up, an odd one left), inputs walked in
    blocks, one row of them too."""
    rng = np.random.default_rng(m + out + inp)
    x = jnp.asarray(rng.standard_normal((m, inp), dtype=np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((out, inp), dtype=np.float32), jnp.bfloat16)
    got = jax.jit(functools.partial(kernels.skinny_matmul, loop=loop))(x, w)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, out)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)  # one bfloat16 step at |want|
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= step + 1e-5 * np.sqrt(inp))
    rounded = np.asarray(jnp.asarray(want.astype(np.float32), jnp.bfloat16), np.float64)
    assert np.mean(np.asarray(got, np.float64) == rounded) > 0.95  # round to nearest, not truncation


def lowered(rows: int, m, dtype=jnp.float32) -> str:
    x, w = jnp.ones((rows, 1, 64), dtype), jnp.ones((32, 64), dtype)
    fresh = jax.jit(lambda x, w: kernels.linear(x, w))  # a trace of its own: jit's cache does not see for_mesh
    if m is None:
        return fresh.lower(x, w).as_text()
    with kernels.for_mesh(m):
        return fresh.lower(x, w).as_text()


@needs_kernel
def test_linear_calls_the_kernel_only_where_it_serves():
    """Up to MAX_ROWS rows on one CPU device, float32 or bfloat16: the kernel. More rows
    (a prefill), a two-device mesh (the partitioner must see a dot to split it), no
    mesh, or float16: XLA's dot."""
    assert kernels.TARGET in lowered(1, mesh(1)) and kernels.TARGET in lowered(kernels.MAX_ROWS, mesh(1))
    for text in (lowered(kernels.MAX_ROWS + 1, mesh(1)), lowered(2, mesh(2)), lowered(2, None)):
        assert kernels.TARGET not in text and "dot_general" in text
    assert kernels.BF16_TARGET in lowered(2, mesh(1), jnp.bfloat16)  # bfloat16 too; float16 is XLA's
    assert "ryzen_jax" not in lowered(2, mesh(1), jnp.float16) and "dot_general" in lowered(2, mesh(1), jnp.float16)
    x, w = jnp.ones((3, 64)), jnp.ones((32, 64))
    with kernels.for_mesh(mesh(1)):
        np.testing.assert_allclose(np.asarray(jax.jit(kernels.linear)(x, w)), np.full((3, 32), 64.0), rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("tp", [1, 2])
def test_decode_step_uses_the_kernel_on_one_device(tp, hf_model_dir):
    """The decode program a Generator compiles calls the kernels at tp 1 (every product,
    every layer's attention, the greedy pick), never at tp 2; so does the prefill program's
    greedy pick, whoever traced it first. The greedy
    tokens against Hugging Face are checked with them in tests/test_generation and the
    family tests."""
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=tp, dtype="float32", progress=False)
    lm.generator.decode_inputs(2)  # traces (and compiles) the prefill program first, as the batcher may
    hlo = lm.generator.decode_program(2).as_text()
    prefill = lm.generator.prefill_program(2, 16).as_text()
    count = lambda text, target: text.count(f'custom_call_target="{target}"')  # noqa: E731
    calls, attention = count(hlo, kernels.TARGET), count(hlo, kernels.ATTENTION_TARGET)
    greedy = count(hlo, kernels.GREEDY_TARGET), count(prefill, kernels.GREEDY_TARGET)
    n_layers = lm.config.num_layers
    if tp == 1:
        assert calls >= 7 * n_layers + 1  # q, k, v, o, gate, up, down per layer, and the LM head
        assert attention == n_layers and greedy == (1, 1)
    else:
        assert calls == attention == 0 and greedy == (0, 0)


def copies_of(hlo: str, *shapes: tuple[int, ...]) -> list[str]:
    """The lines of a compiled program that make a float32 or bit (uint16) version of an
    array of one of these shapes, or copy or convert one: what XLA:CPU does to a
    bfloat16 array it has no operation for."""
    dims = [f"[{','.join(map(str, shape))}]" for shape in shapes]
    return [line for line in hlo.splitlines() for d in dims
            if f"f32{d}" in line or f"u16{d}" in line or (d in line and (" copy(" in line or " convert(" in line))]


@needs_kernel
def test_bfloat16_decode_on_the_kernels_tracks_hf(hf_model_dir):
    """A bfloat16 model at tp 1 decodes on the kernels (bfloat16 products, attention over
    its bfloat16 cache, written in place, the greedy pick), and, fed Hugging Face's float32 greedy
    tokens one decode step at a time, strays from HF's float32 logits about as far as
    HF's own bfloat16 run does (measured: at worst 2.96 against HF's 1.53, on average
    0.98 against 0.82, for logits up to 17)."""
    model_dir = hf_model_dir("llama_gqa")
    hf = hf_models.load(model_dir)
    n = 8
    ref_tokens = hf_models.greedy(hf, PROMPT, n)
    want = hf_models.logits(hf, PROMPT + ref_tokens)[len(PROMPT) - 1: len(PROMPT) - 1 + n]
    lm = rj.load_model(model_dir, tp=1, dtype="bfloat16", progress=False)
    gen = lm.generator
    hlo = gen.decode_program(1).as_text()
    for target in (kernels.BF16_TARGET, kernels.ATTENTION_TARGET, kernels.GREEDY_TARGET, kernels.TAKE_ROWS_TARGET,
                   kernels.WRITE_CACHE_TARGET):
        assert f'custom_call_target="{target}"' in hlo, target
    # the embedding and the cache are read where they lie: no float32 or bit copy of either per dispatch
    table = gen.state["embed"]["embedding"].get_value().shape
    layers, heads, head_dim, _ = nnx.merge(gen.graphdef, gen.state).cache_shape()
    copies = copies_of(hlo, table, (1, heads, gen.max_seq_len, head_dim))  # decode_program(1): batch 1
    assert not copies, copies[:3]

    def prefill(state, tokens, lengths):
        return nnx.merge(gen.graphdef, state).prefill(tokens, lengths, 64)

    def decode(state, cache, token, position):
        return nnx.merge(gen.graphdef, state).decode(token, position, cache)

    with kernels.for_mesh(lm.tp.mesh):
        logits, cache, _ = jax.jit(prefill)(gen.state, jnp.asarray([PROMPT]), jnp.asarray([len(PROMPT)]))
        got, step = [logits[0]], jax.jit(decode)
        for i, token in enumerate(ref_tokens[:-1]):
            logits, cache = step(gen.state, cache, jnp.asarray([token]), jnp.asarray([len(PROMPT) + i]))
            got.append(logits[0])
    assert {leaf.dtype for leaf in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
    got = np.asarray(jnp.stack(got), np.float32)[:, : want.shape[-1]]
    # HF's own bfloat16 run of the same tokens: how far bfloat16 alone strays from float32
    with torch.no_grad():
        hf16 = hf.to(torch.bfloat16)(torch.tensor([PROMPT + ref_tokens])).logits[0].float().numpy()
    theirs = np.abs(hf16[len(PROMPT) - 1: len(PROMPT) - 1 + n] - want).max(axis=-1)
    ours = np.abs(got - want).max(axis=-1)
    assert ours.max() <= 2.5 * theirs.max() and ours.mean() <= 2 * theirs.mean(), (ours, theirs)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


@needs_kernel
def test_bfloat16_server_slots_take_their_cache_in_place(hf_model_dir):
    """A server's decode slots over a bfloat16 model at tp 1: a prefilled request's
    cache moves into its slot by the put_row kernel, in place (the insert program holds
    no copy or float32 version of the slots' cache, as XLA's write would), and requests
    admitted at different steps into 2 slots (one reused) each get the tokens the
    engine gives that request alone."""
    from ryzen_jax.engine.batcher import SlotBatcher
    from tests.slots import three_requests_in_two_slots

    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=1, dtype="bfloat16", max_seq_len=64, progress=False)
    prompts, new = [PROMPT, PROMPT[:5], PROMPT[3:] + PROMPT[:2]], 6
    alone = [lm.generator.generate([p], new, stop_ids=[]).generated_ids[0] for p in prompts]
    batcher = SlotBatcher(lm.generator, 2)
    hlo = batcher._insert_program(16).as_text()
    assert f'custom_call_target="{kernels.PUT_ROW_TARGET}"' in hlo
    copies = copies_of(hlo, batcher.cache.k[0].shape)
    assert not copies, copies[:3]
    requests = [rj.Request(p, new, ignore_eos=True) for p in prompts]
    finished = three_requests_in_two_slots(batcher, requests, steps=(2, 1, 2))
    assert sorted(finished) == sorted(alone)


@needs_kernel
def test_bfloat16_split_over_cpu_devices_warns_of_the_widened_weights(hf_model_dir, caplog):
    """Split over two CPU devices, a bfloat16 model's products are XLA:CPU's dot, whose
    decode program holds float32 copies of the weights (temporaries of at least twice
    the weights' bytes): loading it says so and names the fix; on one device, our
    kernels, no copies and no warning."""
    path = hf_model_dir("llama_gqa")
    with caplog.at_level(logging.WARNING, logger="ryzen_jax.api"):
        split = rj.load_model(path, tp=2, dtype="bfloat16", progress=False)
    assert "widens every weight to float32" in caplog.text and "tp=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ryzen_jax.api"):
        one = rj.load_model(path, tp=1, dtype="bfloat16", progress=False)
    assert "widens" not in caplog.text

    def weights_and_temporaries(lm):
        weights = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(lm.generator.state))
        return weights, lm.generator.decode_program(1).memory_analysis().temp_size_in_bytes

    weights, temporaries = weights_and_temporaries(split)
    assert temporaries >= 1.5 * weights, (weights, temporaries)
    weights, temporaries = weights_and_temporaries(one)
    assert temporaries < 0.5 * weights, (weights, temporaries)


def test_no_compiler_falls_back_to_xla_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("RYZEN_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV_DIR, raising=False)  # not the session's built library
    if not {"avx2", "fma"} <= kernels._cpu_flags():
        pytest.skip("this CPU lacks AVX2/FMA: the compiler is never asked for")
    with pytest.raises(kernels.KernelUnavailable, match="no C.. compiler.*install g\\+\\+ or set CXX"):
        kernels.build()
    with caplog.at_level(logging.WARNING, logger="ryzen_jax.kernels"):
        assert kernels.register.__wrapped__() is False
    assert "unavailable" in caplog.text and "XLA's operations" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_a_compile_error_is_said_and_leaves_no_library(monkeypatch, tmp_path):
    """A compiler that fails: its exit status and words in the error, nothing half-built
    left in the kernel directory (a later start tries again)."""
    if not {"avx2", "fma"} <= kernels._cpu_flags():
        pytest.skip("this CPU lacks AVX2/FMA: the compiler is never asked for")
    cxx = tmp_path / "bad-cxx"
    cxx.write_text("#!/bin/sh\necho 'error: out of cheese' >&2\nexit 3\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv(kernels.ENV_DIR, str(tmp_path / "k"))
    with pytest.raises(kernels.KernelUnavailable, match="failed to compile the kernels .exit status 3: error: out of cheese"):
        kernels.build()
    assert os.listdir(tmp_path / "k") == []


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.load.__wrapped__() is False


def attention_reference(q, cache_k, cache_v, own_k, own_v, positions, scale, window):
    """Softmax attention in float64, one query per row, written out plainly."""
    b, _, h, d = q.shape
    kv = cache_k.shape[1]
    out = np.zeros((b, 1, h, d))
    for r in range(b):
        p = positions[r]
        seen = [s for s in range(min(p, cache_k.shape[2])) if not window or s > p - window]
        for head in range(h):
            j = head // (h // kv)
            keys = np.concatenate([cache_k[r, j, seen], own_k[r, j]]).astype(np.float64)
            values = np.concatenate([cache_v[r, j, seen], own_v[r, j]]).astype(np.float64)
            s = keys @ q[r, 0, head].astype(np.float64) * scale
            w = np.exp(s - s.max())
            out[r, 0, head] = w @ values / w.sum()
    return out


@needs_kernel
@pytest.mark.parametrize("dtype,cache_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("bfloat16", "float32")])
@pytest.mark.parametrize("b,h,kv,d,length,window", [(3, 8, 4, 64, 40, None), (2, 4, 1, 32, 17, None),
                                                    (4, 6, 6, 16, 50, 7), (1, 2, 2, 8, 9, None), (2, 4, 2, 40, 23, None)])
def test_decode_attention_matches_the_formula(b, h, kv, d, length, window, dtype, cache_dtype):
    """Grouped, multi-query and multi-head; rows at position 0 (own key only), mid-cache
    and at the cache's end; a sliding window; head sizes 8 to 64 (40: a part of the
    32-lane step); float32, and bfloat16 queries and own keys and values over a
    bfloat16 cache (a bfloat16 model's) or a float32 one (the formula on the same
    values, the result within a bfloat16 rounding)."""
    rng = np.random.default_rng(b * h + d)
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)  # noqa: E731  values a bf16 model holds
    q = jnp.asarray(rng.standard_normal((b, 1, h, d), dtype=np.float32), dtype)
    cache_k, cache_v = (jnp.asarray(bf16(rng.standard_normal((b, kv, length, d), dtype=np.float32)), cache_dtype)
                        for _ in range(2))
    own_k, own_v = (jnp.asarray(rng.standard_normal((b, kv, 1, d), dtype=np.float32), dtype) for _ in range(2))
    positions = np.array([0, length, length // 2, 3][:b], np.int32)
    scale = d ** -0.5

    def run(*args):
        return kernels.decode_attention(*args, positions=jnp.asarray(positions), scale=scale, window=window)

    with kernels.for_mesh(mesh(1)):
        got = jax.jit(run)(q, cache_k, cache_v, own_k, own_v)
    assert got.dtype == jnp.dtype(dtype)
    want = attention_reference(*(np.asarray(a, np.float32) for a in (q, cache_k, cache_v, own_k, own_v)),
                               positions, scale, window)
    if dtype == "float32":
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)
    else:
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2.0 ** -8, atol=1e-6)


@needs_kernel
def test_decode_attention_passes_nan_on_as_softmax_does():
    """A NaN in a row's query or its cached keys makes that row's output NaN, as XLA's
    softmax does (the kernel's vector exp once clamped NaN to a finite score); the other
    rows are untouched."""
    rng = np.random.default_rng(0)
    b, h, kv, d, length = 3, 4, 2, 16, 24
    q = rng.standard_normal((b, 1, h, d), dtype=np.float32)
    cache_k, cache_v = (rng.standard_normal((b, kv, length, d), dtype=np.float32) for _ in range(2))
    own_k, own_v = (rng.standard_normal((b, kv, 1, d), dtype=np.float32) for _ in range(2))
    q[0, 0, 0, 3] = np.nan  # row 0: a NaN query, 16 scores (two full vector blocks)
    cache_k[1, 0, 5, 0] = np.nan  # row 1: a NaN cached key
    positions = np.array([16, 16, 16], np.int32)
    with kernels.for_mesh(mesh(1)):
        got = np.asarray(jax.jit(lambda *a: kernels.decode_attention(*a, positions=jnp.asarray(positions), scale=0.25,
                                                                     window=None))(q, cache_k, cache_v, own_k, own_v))
    assert np.isnan(got[0, 0, 0]).all() and np.isnan(got[1, 0, :2]).all()
    want = attention_reference(q, cache_k, cache_v, own_k, own_v, positions, 0.25, None)
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=2e-6)


def test_decode_attention_only_where_it_serves():
    """Outside a one-device CPU mesh, or for float16, queries and own keys of different
    dtypes, cached keys and values of different dtypes or a head size off 8: None, and
    the caller uses XLA's attention."""
    q, c, o = jnp.ones((1, 1, 2, 8)), jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 1, 8))
    pos = jnp.zeros((1,), jnp.int32)
    assert kernels.decode_attention(q, c, c, o, o, pos, 1.0, None) is None
    with kernels.for_mesh(mesh(2)):
        assert kernels.decode_attention(q, c, c, o, o, pos, 1.0, None) is None
    with kernels.for_mesh(mesh(1)):
        half = [a.astype(jnp.float16) for a in (q, c, c, o, o)]
        assert kernels.decode_attention(*half, pos, 1.0, None) is None
        mixed = [q.astype(jnp.bfloat16), c, c, o, o]  # bfloat16 queries with float32 own keys
        assert kernels.decode_attention(*mixed, pos, 1.0, None) is None
        assert kernels.decode_attention(q, c.astype(jnp.bfloat16), c, o, o, pos, 1.0, None) is None
        assert kernels.decode_attention(q[..., :6], c[..., :6], c[..., :6], o[..., :6], o[..., :6], pos, 1.0,
                                        None) is None


@needs_kernel
@pytest.mark.parametrize("steps", [1, 5])
def test_write_cache_matches_dynamic_update_slice(steps):
    """A bfloat16 cache written by the kernel holds what XLA's per-row
    dynamic_update_slice writes: rows at the start, mid-cache, at the end and past it
    (clamped so the slots fit), one step or a prompt's several; the cache donated is
    updated where it lies; elsewhere (no mesh, float32) None."""
    rng = np.random.default_rng(steps)
    cache = jnp.asarray(rng.standard_normal((6, 3, 32, 16), dtype=np.float32), jnp.bfloat16)
    new = jnp.asarray(rng.standard_normal((6, 3, steps, 16), dtype=np.float32), jnp.bfloat16)
    start = jnp.asarray([0, 7, 31, 40, 32 - steps, -3], jnp.int32)  # -3: counted from the end, as XLA does
    want = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice_in_dim(c, x, s, axis=1))(cache, new, start)
    with kernels.for_mesh(mesh(1)):
        write = jax.jit(kernels.write_cache, donate_argnums=0)
        assert f'custom_call_target="{kernels.WRITE_CACHE_TARGET}"' in write.lower(cache, new, start).compile().as_text()
        donated = jnp.array(cache)
        where = donated.unsafe_buffer_pointer()
        got = write(donated, new, start)
        assert got.unsafe_buffer_pointer() == where  # written in place, not copied
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert kernels.write_cache(cache, new, start) is None
    with kernels.for_mesh(mesh(1)):
        assert kernels.write_cache(cache.astype(jnp.float32), new, start) is None


@needs_kernel
def test_put_row_matches_dynamic_update_slice():
    """A slot's row of a bfloat16 batch written by the kernel holds what XLA's
    dynamic_update_slice writes (row 0 of the update; a row past the end clamped to the
    last), in place; elsewhere (no mesh, float32, another trailing shape) None."""
    rng = np.random.default_rng(7)
    big = jnp.asarray(rng.standard_normal((4, 3, 10, 8), dtype=np.float32), jnp.bfloat16)
    small = jnp.asarray(rng.standard_normal((2, 3, 10, 8), dtype=np.float32), jnp.bfloat16)
    with kernels.for_mesh(mesh(1)):
        put = jax.jit(kernels.put_row, donate_argnums=0)
        for row in (0, 2, 3, 9, -1):
            want = jax.lax.dynamic_update_slice_in_dim(big, small[:1], row, axis=0)
            donated = jnp.array(big)
            where = donated.unsafe_buffer_pointer()
            got = put(donated, small, jnp.int32(row))
            assert got.unsafe_buffer_pointer() == where  # written in place
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        assert kernels.put_row(big.astype(jnp.float32), small, jnp.int32(0)) is None
        assert kernels.put_row(big, small[:, :, :5], jnp.int32(0)) is None
    assert kernels.put_row(big, small, jnp.int32(0)) is None


def test_the_kernels_build_where_they_can():
    """Where the CPU has AVX2 and FMA and a C++ compiler is on PATH, the kernels must
    build: a compile error is a failure here, not a quiet fallback that skips every
    kernel test."""
    import shutil

    if not {"avx2", "fma"} <= kernels._cpu_flags() or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no AVX2/FMA or no C++ compiler: the kernels are not expected here")
    assert kernels.build().exists()


@needs_kernel
def test_take_rows_matches_numpy():
    """A bfloat16 lookup by the kernel where it serves: numpy's rows, ids of any shape,
    a negative id counted from the end and one outside the table a row of NaN, as jnp.take;
    elsewhere (no mesh, float32) None."""
    table = jnp.asarray(np.random.default_rng(0).standard_normal((50, 24), dtype=np.float32), jnp.bfloat16)
    ids = jnp.asarray([[3, 49, 0], [7, 50, -1], [-50, -51, 2**31 - 1]], jnp.int32)
    with kernels.for_mesh(mesh(1)):
        got = np.asarray(jax.jit(kernels.take_rows)(table, ids), np.float32)
    want = np.asarray(jnp.take(table, ids, axis=0), np.float32)  # XLA's: -1 the last row, past either end NaN
    assert got.shape == (3, 3, 24)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[1, 1]).all() and not np.isnan(got[1, 2]).any()
    assert kernels.take_rows(table, ids) is None and kernels.take_rows(table.astype(jnp.float32), ids) is None
