"""Our engine, measured offline: time to first token, per-token latency, end-to-end
latency and tokens/s at one batch size, the decode step alone against its floors,
the communication of the compiled step and the bytes each device holds.

Per-token latencies come from the streaming path (one decode step per dispatch, the
host sees every token as a user would); throughput and end-to-end latency from the
plain path (up to 32 steps per dispatch); the decode step from the compiled decode
program run by itself, with nothing else on the host.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ryzen_jax import kernels
from ryzen_jax.bench.comm import HLO_DTYPES, Collective, CommReport, collective_ops, decode_comm
from ryzen_jax.bench.hardware import Hardware
from ryzen_jax.bench.stats import median, summary_ms
from ryzen_jax.engine.compile import compile_lowered, compiler_options
from ryzen_jax.engine.generate import DECODE_CHUNK, Generator
from ryzen_jax.engine.request import GenerationResult, Request
from ryzen_jax.sharding import MODEL


@dataclasses.dataclass
class Floors:
    """The least one decode step (all rows) can cost on this machine.

    ``weight_bytes``: every weight the step reads (the embedding table only through the
    few rows it gathers, so it is left out unless it is also the LM head);
    ``kv_bytes``: the cache positions that hold tokens, averaged over the decode steps
    (prompt + new/2). On a machine whose devices share one memory (CPU) every device's
    reads go through it; on accelerators each device reads 1/tp of the bytes at its own
    bandwidth. ``flops``: multiply-adds × 2 of the matmuls and attention.
    """

    weight_bytes: int
    kv_bytes: int
    bandwidth_ms: float
    flops: float
    compute_ms: float


@dataclasses.dataclass
class EngineRun:
    """Our engine at one (tp, batch). Times in ms, rates per second."""

    tp: int
    batch: int
    ttft_ms: float  # from the call to the first token on the host (preparation and prefill), median of the plain runs
    token_latency_ms: dict[str, float]  # streaming: time between successive tokens (P50/P90/P99/mean)
    e2e_ms: float  # plain path: request in to last token out
    tokens_per_s: float  # batch × new tokens / e2e
    decode_tokens_per_s: float  # tokens from decode steps / decode time
    decode_step_ms: float  # the compiled decode program alone, per step (what the floors compare)
    loop_step_ms: float  # a decode step in the plain path, host included: batch ÷ decode tokens/s (what HF's compares)
    floor: Floors
    step_over_bandwidth_floor: float
    step_over_roofline: float  # against max(bandwidth floor, compute floor)
    matmuls_alone_ms: float  # the step's matrix products alone on this backend (see time_matmuls_alone)
    matmul_kernel: str  # what computes the step's products: our CPU kernel or XLA's dot
    step_over_matmuls_alone: float
    comm: CommReport
    collectives_alone_ms: float  # the step's collectives alone, same shapes and mesh (see time_collectives_alone)
    comm_share: float  # collectives_alone_ms ÷ decode_step_ms: the guide's "communication overhead"
    params_bytes_per_device: int
    cache_bytes_per_device: int
    xla_temp_bytes_per_device: int
    token_latency_samples_ms: list[float]
    generated_ids: list[list[int]]  # of the last plain run


def requests(g: Generator, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[Request]:
    """Greedy requests that run to ``new_tokens`` whatever they produce (EOS ignored)."""
    return g.requests(prompts, new_tokens, ignore_eos=True)


def floors(g: Generator, batch: int, prompt_len: int, new_tokens: int, hw: Hardware) -> Floors:
    """The bandwidth and compute floors of one decode step (see :class:`Floors`)."""
    cfg, tp = g.cfg, g.tp.tp_size
    size = jnp.dtype(g.dtype).itemsize
    e, d = cfg.hidden_size, cfg.head_dim
    # counted from the shape, not from our layout (no vocab padding, no replicated KV heads);
    # biases left out (under 2% of a tiny GPT-2's weights, far less of a real one's)
    mlp_matrices = 3 if gated_mlp(g) else 2  # gate, up, down (SwiGLU) or up, down (GPT-2)
    layer = e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + mlp_matrices * e * cfg.intermediate_size
    matmul_params = cfg.num_layers * layer + cfg.vocab_size * e  # the LM head (tied or not) is read whole
    norm_params = (2 * cfg.num_layers + 1) * e
    context = prompt_len + new_tokens / 2
    # the positions each layer attends to: all of them, or its sliding window's
    attended = sum(min(context, w or context) for w in map(cfg.window_of, range(cfg.num_layers)))
    kv_bytes = int(batch * attended * 2 * cfg.num_kv_heads * d * size)
    weight_bytes = (matmul_params + norm_params) * size
    flops = 2.0 * batch * (matmul_params + attended * cfg.num_heads * d * 2)
    devices_per_memory = 1 if hw.shared_memory else tp
    bandwidth_ms = (weight_bytes + kv_bytes) / (hw.bandwidth_gbps * 1e9 * devices_per_memory) * 1e3
    compute_ms = flops / (hw.matmul_gflops * 1e9 * devices_per_memory) * 1e3
    return Floors(weight_bytes=weight_bytes, kv_bytes=kv_bytes, bandwidth_ms=bandwidth_ms, flops=flops,
                  compute_ms=compute_ms)


def with_bandwidth(run: EngineRun, old_gbps: float, new_gbps: float) -> EngineRun:
    """``run`` with its bandwidth floor (and the ratios over it) at ``new_gbps`` in place
    of ``old_gbps``: the machine's bandwidth measured again later in the same run."""
    fl = dataclasses.replace(run.floor, bandwidth_ms=run.floor.bandwidth_ms * old_gbps / new_gbps)
    return dataclasses.replace(run, floor=fl, step_over_bandwidth_floor=run.decode_step_ms / fl.bandwidth_ms,
                               step_over_roofline=run.decode_step_ms / max(fl.bandwidth_ms, fl.compute_ms))


def time_stream(g: Generator, reqs: list[Request]) -> tuple[float, list[float]]:
    """One streaming run (a dispatch per token): (time to first token, gaps between
    successive tokens), in seconds."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in g.run(reqs, steps_per_dispatch=1)]
    return stamps[0] - t0, list(np.diff(stamps))


def time_plain(g: Generator, reqs: list[Request]) -> tuple[float, float, GenerationResult]:
    """One plain run (many steps per dispatch): (end-to-end seconds, seconds to the first
    token from the call — the host's preparation included, as the peer's clock includes
    its own —, the engine's stats)."""
    res = GenerationResult(completions=[])
    t0 = time.perf_counter()
    first = None
    for _ in g.run(reqs, stats=res):
        first = first or time.perf_counter()
    return time.perf_counter() - t0, first - t0, res


def time_decode_step(g: Generator, reqs: list[Request], repeats: int) -> float:
    """Seconds per decode step of the compiled decode programs alone: prefill once per
    repeat, then run every remaining step in chunks, each with the program that reads
    the cache prefix it needs (as ``Generator.run`` picks it), timing only the decode
    dispatches."""
    batch, length = g.batch_size(len(reqs)), g.prompt_bucket(max(len(r.prompt_ids) for r in reqs))
    prefill = g.prefill_program(batch, length)
    args = g.prefill_inputs(reqs, length)
    start = max(len(r.prompt_ids) for r in reqs)
    steps = min(r.max_new_tokens for r in reqs) - 1
    limit = start + steps + 1
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        _, d, cache = prefill(*args)
        jax.block_until_ready(cache)
        t0, done = time.perf_counter(), 0
        while done < steps:
            n = min(DECODE_CHUNK, steps - done)
            decode = g.decode_program(batch, g.attend_for(min(start + done + n, limit)))
            out, d, cache = decode(g.state, cache, d, args[3], jnp.int32(n))
            done += n
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / steps)
    return median(times[1:])


def time_matmuls_alone(g: Generator, batch: int, repeats: int, calls: int = 16) -> float:
    """Seconds for the decode step's matrix products and nothing else: every projection
    of every layer (q, k, v, o, gate, up, down; GPT-2 has no gate) and the LM head, at
    this batch, chained as a step chains them, on the model's own weights, every
    device multiplying by its own shard at once as in the step (so the chain reads
    what the floor counts). No attention over the cache, no norms, no sampling, no
    loop, no collectives, and no second copy of the weights in memory (a "7B" run has
    room for one).

    Each product is computed as the step computes it (``kernels.linear``: our CPU kernel
    where it serves the mesh, else XLA's dot), compiled with the same options. This is
    what those kernels make of the step's weight reads: a step cannot beat it, and the
    step's time over it is what the rest of the program costs. The median over
    ``repeats`` of ``calls`` chained calls."""
    layers, head = step_weights(g)
    mesh = g.tp.mesh
    x = jax.device_put(0.02 * jax.random.normal(jax.random.key(0), (batch, g.cfg.hidden_size), g.dtype),
                       NamedSharding(mesh, P()))

    mm = kernels.linear

    def chain(x, layers, head):
        for m in layers:
            m = {k: w.reshape(w.shape[0], -1) if k == "o" else w.reshape(-1, w.shape[-1]) for k, w in m.items()}
            x = x + mm(mm(x, m["q"]), m["o"]) + mm(x, m["k"])[:, :1] + mm(x, m["v"])[:, :1]  # k, v live, cheaply
            h = mm(x, m["up"])
            x = x + mm(jax.nn.silu(mm(x, m["gate"])) * h if "gate" in m else jax.nn.gelu(h), m["down"])
        return x + mm(x, head)[:, :1]

    fn = chain
    if mesh.devices.size > 1:  # each device its own shards (the partial sums are never added: timing only)
        specs = jax.tree.map(lambda w: w.sharding.spec, (layers, head))
        fn = jax.shard_map(chain, mesh=mesh, in_specs=(P(), *specs), out_specs=P(), check_vma=False)
    with kernels.for_mesh(mesh):
        lowered = jax.jit(fn).lower(x, layers, head)
    return chained_seconds(compile_lowered(lowered, compiler_options(mesh)), x, (layers, head), repeats, calls)


def chained_seconds(fn, first: jax.Array, rest: tuple, repeats: int, calls: int) -> float:
    """Seconds per call of ``fn(y, *rest)``, each call fed the one before's result (so
    none can start early), after one warm-up: the median over ``repeats`` of ``calls``."""
    jax.block_until_ready(fn(first, *rest))
    times = []
    for _ in range(repeats):
        y, t0 = first, time.perf_counter()
        for _ in range(calls):
            y = fn(y, *rest)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t0) / calls)
    return median(times)


#: collectives the alone-timing reproduces (a decode step of ours has no others)
TIMED_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter")


def collectives_alone(ops: Sequence[Collective], mesh, steps: int = 1) -> tuple[Callable, jax.Array, tuple]:
    """A program that runs these collectives (as a compiled step lists them: kinds, result
    shapes, gather dimensions) over the mesh's model axis, one after another, each fed by
    the one before, ``steps`` times over in a loop, and nothing else; with its inputs
    (zeros, each device its own block). Returns (compiled, carry, inputs) for
    ``chained_seconds``."""
    tp = mesh.shape[MODEL]
    ops = [c for c in ops if c.kind in TIMED_COLLECTIVES]
    blocks = []  # (op, dtype, the operand one device contributes)
    for c in ops:
        for dtype, dims in c.results():
            d = list(dims)
            if c.kind == "all-gather":
                d[c.dimension] //= tp
            elif c.kind == "reduce-scatter":
                d[c.dimension] *= tp
            blocks.append((c, jnp.dtype(HLO_DTYPES[dtype]), tuple(d)))

    def step(carry, xs):
        for (c, _, _), x in zip(blocks, xs):
            x = x[0] + carry[0].astype(x.dtype)  # the chain: waits on the collective before
            if c.kind == "all-reduce":
                y = jax.lax.psum(x, MODEL)
            elif c.kind == "all-gather":
                y = jax.lax.all_gather(x, MODEL, axis=c.dimension, tiled=True)
            else:
                y = jax.lax.psum_scatter(x, MODEL, scatter_dimension=c.dimension, tiled=True)
            carry = y.reshape(-1)[:1].astype(jnp.float32)
        return carry

    def body(carry, *xs):  # as many steps as a decode dispatch runs: one dispatch's cost spread as the step's is
        return jax.lax.fori_loop(0, steps, lambda _, c: step(c, xs), carry)

    spec = P(MODEL)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * (1 + len(blocks)), out_specs=spec,
                               check_vma=False))
    inputs = tuple(jax.device_put(jnp.zeros((tp, *shape), dtype), NamedSharding(mesh, spec))
                   for _, dtype, shape in blocks)
    carry = jax.device_put(jnp.zeros((tp,), jnp.float32), NamedSharding(mesh, spec))
    lowered = fn.lower(carry, *inputs)
    return compile_lowered(lowered, compiler_options(mesh)), carry, inputs


def time_collectives_alone(hlo: str, mesh, repeats: int, calls: int = 16) -> float:
    """Seconds for the decode step's collectives and nothing else: every all-reduce,
    all-gather and reduce-scatter of the compiled step (``hlo``), at its shapes, over the
    same mesh and transport (NCCL, gloo, or in-process), chained as the step chains
    them, ``DECODE_CHUNK`` steps to a dispatch as the decode step is timed (so neither
    pays a whole dispatch per step). 0 when the step has none (tp = 1). This over the step is its communication
    share: what the step would save if communication were free (an upper bound where
    the step overlaps it with computation)."""
    ops = [c for c in collective_ops(hlo) if c.kind in TIMED_COLLECTIVES]
    if not ops:
        return 0.0
    fn, carry, inputs = collectives_alone(ops, mesh, DECODE_CHUNK)
    return chained_seconds(fn, carry, inputs, repeats, calls) / DECODE_CHUNK


def gated_mlp(g: Generator) -> bool:
    """Whether the model's MLP is gated (Llama's SwiGLU: gate, up, down) rather than
    plain (GPT-2: up, down)."""
    return "gate" in g.state["layers"][0]["mlp"]


def step_weights(g: Generator) -> tuple[list[dict[str, jax.Array]], jax.Array]:
    """Every weight a decode step of a decoder-only model multiplies by, as the model
    holds them (sharded over the mesh; (out, in), heads split out: q, k, v (heads,
    head_dim, in), o (out, heads, head_dim)), per layer (``gate`` only in a gated MLP),
    and the LM head's."""
    state = g.state
    try:
        layers = [state["layers"][i] for i in range(g.cfg.num_layers)]
        kernel = lambda node: node["kernel"].get_value()  # noqa: E731
        names = ("gate", "up", "down") if gated_mlp(g) else ("up", "down")
        weights = [dict(q=kernel(m["attn"]["wq"]), k=kernel(m["attn"]["wk"]), v=kernel(m["attn"]["wv"]),
                        o=kernel(m["attn"]["wo"]), **{n: kernel(m["mlp"][n]) for n in names}) for m in layers]
    except (KeyError, TypeError) as err:
        raise ValueError(f"the matmuls-alone timing reads a decoder-only model's projections; this one has none at "
                         f"{err}")
    head = state["lm_head"] if "lm_head" in state else state["embed"]["embedding"]
    return weights, head.get_value()


def bytes_per_device(g: Generator, batch: int) -> tuple[int, int, int]:
    """(parameters, KV cache, XLA temporaries) bytes one device holds for the decode step."""
    params = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(g.state))
    cfg, tp = g.cfg, g.tp.tp_size
    size = jnp.dtype(g.dtype).itemsize
    cache = 2 * cfg.num_layers * batch * g.max_seq_len * (g.kv_heads // tp) * cfg.head_dim * size
    temp = g.decode_program(batch).memory_analysis().temp_size_in_bytes
    return params, cache, int(temp)


def measure_engine(g: Generator, prompts: Sequence[Sequence[int]], new_tokens: int, hw: Hardware, *,
                   repeats: int = 3) -> EngineRun:
    """Every offline figure of our engine for one batch of prompts (all of one length)."""
    batch, prompt_len = len(prompts), len(prompts[0])
    if g.batch_size(batch) != batch:
        raise ValueError(f"batch {batch} would be padded to {g.batch_size(batch)} rows by the engine; "
                         "benchmark batch sizes that are powers of two (times dp)")
    reqs = requests(g, prompts, new_tokens)
    g.warmup([batch], [prompt_len], max_len=prompt_len + new_tokens)
    time_plain(g, reqs)  # warm the host paths too
    stream = [time_stream(g, reqs) for _ in range(repeats)]
    plain = [time_plain(g, reqs) for _ in range(repeats)]
    gaps = [x for _, run in stream for x in run]
    e2e = median([wall for wall, _, _ in plain])
    decode_rate = median([r.decode_tokens_per_s for _, _, r in plain])
    step = time_decode_step(g, reqs, repeats)
    matmuls_ms = time_matmuls_alone(g, batch, repeats) * 1e3
    fl = floors(g, batch, prompt_len, new_tokens, hw)
    params, cache, temp = bytes_per_device(g, batch)
    cfg = g.cfg
    hlo = g.decode_program(batch).as_text()
    comm = decode_comm(hlo, tp=g.tp.tp_size, batch=batch // g.tp.dp_size,
                       layers=cfg.num_layers, hidden=cfg.hidden_size, dtype_bytes=jnp.dtype(g.dtype).itemsize)
    collectives_ms = time_collectives_alone(hlo, g.tp.mesh, repeats) * 1e3
    step_ms = step * 1e3
    return EngineRun(
        tp=g.tp.tp_size, batch=batch, ttft_ms=median([ttft for _, ttft, _ in plain]) * 1e3,
        token_latency_ms=summary_ms(gaps), e2e_ms=e2e * 1e3, tokens_per_s=batch * new_tokens / e2e,
        decode_tokens_per_s=decode_rate, decode_step_ms=step_ms, loop_step_ms=batch / decode_rate * 1e3, floor=fl,
        step_over_bandwidth_floor=step_ms / fl.bandwidth_ms,
        step_over_roofline=step_ms / max(fl.bandwidth_ms, fl.compute_ms), matmuls_alone_ms=matmuls_ms,
        matmul_kernel="ryzen_jax CPU kernel" if kernels.TARGET in hlo else "XLA dot",
        step_over_matmuls_alone=step_ms / matmuls_ms, comm=comm, collectives_alone_ms=collectives_ms,
        comm_share=collectives_ms / step_ms, params_bytes_per_device=params,
        cache_bytes_per_device=cache, xla_temp_bytes_per_device=temp,
        token_latency_samples_ms=[x * 1e3 for x in gaps], generated_ids=plain[-1][2].generated_ids)
