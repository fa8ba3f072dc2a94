"""The benchmark library and CLI end to end on the tiny preset: every field present and
sane, the communication figures equal to the compiled program's collectives, the peer
run on the same weights, the serving load generator against the real server, and bad
settings refused with clear errors. No timing thresholds: timings belong in the
benchmark itself."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ryzen_jax as rj
from ryzen_jax import kernels
from ryzen_jax.bench import (BenchmarkConfig, BenchmarkConfigError, DistributedInferenceBenchmark, PRESETS,
                             ShapeError, peer, serving)
from ryzen_jax.bench import offline
from ryzen_jax.bench.comm import collective_ops, collectives as bench_collectives, decode_comm, shape_bytes
from ryzen_jax.bench.offline import collectives_alone
from ryzen_jax.bench.report import offline_table, to_jsonable, write_json
from ryzen_jax.bench.shapes import check_fits, ensure_checkpoint, random_prompts
from tests.mp_helpers import launch
from tests.test_structure import collectives as structure_collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_size="tiny", seq_len=8, new_tokens=8, repeats=1, probe_megabytes=16)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-cache"))


@pytest.fixture(scope="module")
def bench(cache_dir):
    """One run of the library: batch 1 and 2 at tp=2, tp=1 for the speedup, the peer."""
    cfg = BenchmarkConfig(**TINY, batch_size=(1, 2), world_size=2, cache_dir=cache_dir)
    lines: list[str] = []
    run = DistributedInferenceBenchmark(cfg, progress=lines.append)
    run.results, run.lines = run.run_comprehensive_benchmark(), lines
    return run


@pytest.fixture(scope="module")
def results(bench):
    return bench.results


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_offline_run_reports_every_figure(bench, results):
    r = results
    stages = 8 if peer.available() else 6  # progress is shown while it runs, one line per stage
    assert bench.lines[0] == f"[1/{stages}] measuring the machine (bandwidth, matmul rate) on cpu"
    assert len(bench.lines) == stages and bench.lines[-1].startswith(f"[{stages}/{stages}] ")
    assert r.tp == 2 and r.params == sum(math.prod(s) for s in _tiny_shapes().values())
    for name in ("latency_p50", "latency_p99", "throughput", "speedup_factor"):
        assert finite_positive(getattr(r, name)), name
    assert r.latency_p50 <= r.latency_p99
    hw = r.hardware
    assert finite_positive(hw.bandwidth_gbps) and finite_positive(hw.matmul_gflops)
    assert hw.bandwidth_gbps == max(hw.bandwidth_by_method.values())
    # every way this machine streams memory counts, our decode kernel's included
    methods = {"numpy_copy", "xla_sum", "xla_gemv"} | ({"ryzen_jax_gemv", "ryzen_jax_gemv_bf16"} if kernels.register() else set())
    assert set(hw.bandwidth_by_method) == methods
    for b in r.batches:
        for run in (b.ours, b.tp1):
            lat = run.token_latency_ms
            assert lat["n"] == (TINY["new_tokens"] - 1) * TINY["repeats"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            for v in (run.ttft_ms, run.e2e_ms, run.tokens_per_s, run.decode_tokens_per_s, run.decode_step_ms,
                      run.floor.bandwidth_ms, run.floor.compute_ms, run.step_over_bandwidth_floor,
                      run.matmuls_alone_ms, run.step_over_matmuls_alone):
                assert finite_positive(v)
            assert run.e2e_ms > run.ttft_ms
            assert [len(ids) for ids in run.generated_ids] == [TINY["new_tokens"]] * b.batch
        assert b.ours.tp == 2 and b.tp1.tp == 1 and finite_positive(b.speedup_vs_tp1)
        # bytes per device: half of every split weight at tp=2, the KV cache split by kv heads
        dims = PRESETS["tiny"]
        head_dim = dims.hidden_size // dims.num_heads
        assert b.ours.cache_bytes_per_device * 2 == b.tp1.cache_bytes_per_device == (
            2 * dims.num_layers * b.batch * 16 * dims.num_kv_heads * head_dim * 4)
        assert b.tp1.params_bytes_per_device / 2 < b.ours.params_bytes_per_device < b.tp1.params_bytes_per_device
    assert set(r.targets) == {"decode_step_within_1.5x_bandwidth_floor_at_batch_1",
                              "tokens_per_s_at_least_2x_peer_at_batch_1", "tokens_per_s_at_least_2x_peer_at_batch_2"}


def _tiny_shapes():
    from ryzen_jax.demo import weight_shapes

    return weight_shapes(PRESETS["tiny"])


def test_communication_is_the_megatron_count_of_the_compiled_step(bench, results):
    """Read back from the compiled decode program with the structure tests' own parser:
    two all-reduces per layer of batch × hidden floats, one for the embedding lookup,
    one all-gather of the logits."""
    dims = PRESETS["tiny"]
    for b in results.batches:
        c = b.ours.comm
        found = structure_collectives(bench.decode_hlo[2, b.batch])
        assert found == bench_collectives(bench.decode_hlo[2, b.batch])
        kinds = [k for k, _ in found]
        assert c.megatron_count == 2 * dims.num_layers
        assert c.megatron_bytes == 2 * dims.num_layers * b.batch * dims.hidden_size * 4
        assert c.count == {"all-reduce": kinds.count("all-reduce"), "all-gather": kinds.count("all-gather")}
        assert c.count["all-reduce"] == 2 * dims.num_layers + 1 and c.count["all-gather"] == 1
        assert c.total_bytes == sum(shape_bytes(s) for _, s in found)
        assert c.extra == [f"all-reduce f32[{b.batch},1,{dims.hidden_size}]",
                           f"all-gather f32[{b.batch},1,{dims.vocab_size}]"]
        assert b.tp1.comm.total_count == 0 and b.tp1.comm.megatron_count == 0
        assert structure_collectives(bench.decode_hlo[1, b.batch]) == []


def test_the_collectives_alone_are_the_steps_own(bench, results):
    """The communication share times a program of exactly the compiled step's collectives
    (kinds, shapes, order), read back from that program's own HLO; none at tp = 1."""
    mesh = rj.TensorParallelConfig(tp_size=2).mesh
    for b in results.batches:
        hlo = bench.decode_hlo[2, b.batch]
        program, _, _ = collectives_alone(collective_ops(hlo), mesh)
        assert structure_collectives(program.as_text()) == structure_collectives(hlo)
        assert finite_positive(b.ours.collectives_alone_ms)
        assert b.ours.comm_share == pytest.approx(b.ours.collectives_alone_ms / b.ours.decode_step_ms)
        assert b.tp1.collectives_alone_ms == 0.0 and b.tp1.comm_share == 0.0


@pytest.mark.skipif(not peer.available(), reason="torch is not installed")
def test_peer_generates_eos_like_any_token_as_ours_ignores_it(cache_dir, tmp_path):
    """Every request runs to its last token on both sides: EOS neither stops a row nor is
    forbidden (transformers' min_new_tokens would forbid it), as ours with ignore_eos.
    The checkpoint is made to call EOS the token its greedy continuation emits third."""
    dims = PRESETS["tiny"]
    path = ensure_checkpoint(dims, cache_dir)
    prompts = random_prompts(1, 8, dims.vocab_size, seed=3)
    _, _, [free] = peer.Peer(path).generate(prompts, 12)
    eos_path = str(tmp_path / "eos")
    shutil.copytree(path, eos_path)
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(eos_path, name)) as f:
            cfg = json.load(f)
        cfg["eos_token_id"] = free[2]
        with open(os.path.join(eos_path, name), "w") as f:
            json.dump(cfg, f)
    _, gaps, [theirs] = peer.Peer(eos_path).generate(prompts, 12)
    assert theirs == free and len(gaps) == 11
    ours = rj.generate(rj.load_model(eos_path, tp=1, progress=False), prompts, max_new_tokens=12, ignore_eos=True)
    assert list(ours[0].generated_ids) == theirs


@pytest.mark.skipif(not peer.available(), reason="torch is not installed")
def test_peer_runs_on_the_same_weights(results):
    assert results.peer_skipped is None
    for b in results.batches:
        p = b.peer
        assert p.batch == b.batch and p.torch_threads >= 1 and p.device == "cpu"  # ours runs on the CPU here
        assert 0 < p.token_latency_ms["p50"] <= p.token_latency_ms["p99"]
        assert finite_positive(p.tokens_per_s) and finite_positive(p.ttft_ms)
        assert b.same_tokens_as_peer == 1.0  # greedy, float32, same checkpoint: the same tokens
        assert set(b.vs_peer) == {"ttft_ms", "token_latency_p50_ms", "token_latency_p90_ms", "token_latency_p99_ms",
                                  "e2e_ms", "decode_step_ms", "tokens_per_s", "decode_tokens_per_s"}
        tps = b.vs_peer["tokens_per_s"]
        assert tps.ours == b.ours.tokens_per_s and tps.peer == p.tokens_per_s
        assert tps.advantage == pytest.approx(tps.ours / tps.peer)
        lat = b.vs_peer["e2e_ms"]
        assert lat.advantage == pytest.approx(lat.peer / lat.ours)
        # steps compared as both loops run them, host included: ours is batch ÷ its decode tokens/s
        step = b.vs_peer["decode_step_ms"]
        assert step.ours == b.ours.loop_step_ms == pytest.approx(b.batch * 1e3 / b.ours.decode_tokens_per_s)
        assert step.peer == p.decode_step_ms
        # how far the peer's step is from the floor, a one-device floor as the peer runs on one device
        assert b.peer_step_over_bandwidth_floor == pytest.approx(p.decode_step_ms / b.tp1.floor.bandwidth_ms)
    table = offline_table(results)
    assert "HF" in table and "×HF" in table
    assert table.count("HF's step = ") == len(results.batches)


def test_json_is_plain_and_complete(results):
    data = json.loads(json.dumps(to_jsonable(results)))  # no NaN, no objects
    for key in ("latency_p50", "latency_p99", "throughput", "speedup_factor", "hardware", "batches", "targets",
                "config", "shape"):
        assert key in data
    assert data["batches"][0]["ours"]["comm"]["megatron_count"] == 2 * PRESETS["tiny"].num_layers


def test_json_is_written_whole_or_not_at_all(results, tmp_path):
    """Through a temporary file: a result that cannot be written leaves the older file as
    it was and no temporary behind; a written one carries its provenance."""
    path = tmp_path / "bench.json"
    write_json(results, str(path), argv=["python", "scripts/benchmark.py", "--model-size", "tiny"])
    data = json.loads(path.read_text())
    assert data["provenance"]["command"] == "python scripts/benchmark.py --model-size tiny"
    assert data["provenance"]["versions"]["jax"] == jax.__version__ and data["provenance"]["utc"].endswith("Z")
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json(dataclasses.replace(results, shape={"bad": object()}), str(path))
    assert path.read_text() == before and os.listdir(tmp_path) == ["bench.json"]


def run_cli(*args: str) -> int:
    spec = importlib.util.spec_from_file_location("bench_cli", os.path.join(ROOT, "scripts", "benchmark.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(list(args))


def test_cli_writes_json_plots_and_table(tmp_path, cache_dir, capsys):
    out = tmp_path / "bench.json"
    rc = run_cli("--model-size", "tiny", "--batch-size", "1", "--prompt-len", "8", "--new-tokens", "4", "--tp", "1",
                 "--repeats", "1", "--no-speedup", "--no-peer", "--probe-mb", "16", "--cache-dir", cache_dir,
                 "--json", str(out), "--plots", str(tmp_path / "plots"))
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["model_size"] == "tiny" and data["tp"] == 1 and data["speedup_factor"] is None
    assert data["provenance"]["command"].startswith("python scripts/benchmark.py --model-size tiny --batch-size 1")
    assert data["batches"][0]["ours"]["tokens_per_s"] > 0
    assert data["peer_skipped"] == "disabled" and data["batches"][0]["peer"] is None
    assert sorted(os.listdir(tmp_path / "plots")) == ["latency_distribution.png", "tokens_per_s_vs_batch.png"]
    table = capsys.readouterr().out
    assert "batch 1" in table and "tokens/s" in table and "bandwidth floor" in table


@pytest.mark.skipif(not peer.available(), reason="torch is not installed")
def test_the_cli_under_the_launcher_splits_the_model_over_every_process(cache_dir, tmp_path):
    """2 processes × 2 devices: tp = 4 across them (gloo), the tp = 1 baseline and the
    peer in process 0 alone, HF's tokens, the compiled step's Megatron collectives, the
    results written by process 0 only."""
    out = tmp_path / "bench.json"
    run = launch(2, 2, "scripts/benchmark.py", "--model-size", "tiny", "--batch-size", "2", "--prompt-len", "8",
                 "--new-tokens", "8", "--repeats", "1", "--probe-mb", "16", "--cache-dir", cache_dir,
                 "--json", str(out), env={"RYZEN_JAX_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    data, dims = json.loads(out.read_text()), PRESETS["tiny"]
    assert data["tp"] == 4 and data["hardware"]["processes"] == 2 and data["hardware"]["devices"] == 4
    for b in data["batches"]:
        assert b["same_tokens_as_peer"] == 1.0
        assert b["tp1"]["generated_ids"] == b["ours"]["generated_ids"]
        comm = b["ours"]["comm"]
        assert comm["count"] == {"all-reduce": 2 * dims.num_layers + 1, "all-gather": 1}
        assert comm["megatron_bytes"] == 2 * dims.num_layers * b["batch"] * dims.hidden_size * 4
    assert finite_positive(data["speedup_factor"])
    table = [line for line in run.stdout.splitlines() if "tokens/s" in line or "machine:" in line]
    assert table and all(line.startswith("[rank 0] ") for line in table)
    assert "4 devices in 2 processes" in run.stdout
    for rank in (0, 1):  # both processes log their progress, each line tagged
        assert f"[rank {rank}] " in run.stderr and "ours: tp=4, batch 2" in run.stderr


def test_under_the_launcher_a_tp_short_of_every_process_and_serving_mode_are_refused(cache_dir):
    run = launch(2, 2, "scripts/benchmark.py", "--model-size", "tiny", "--tp", "2", "--cache-dir", cache_dir)
    assert run.returncode == 2
    for rank in (0, 1):
        assert (f"[rank {rank}] error: world_size (--tp) 2: a run of 2 processes measures the model split over all "
                "4 of their devices; pass 4") in run.stderr
    run = launch(2, 1, "scripts/benchmark.py", "--mode", "serving")
    assert run.returncode == 2 and "serving mode is a client of a running server: run it as one process" in run.stderr


@pytest.mark.parametrize("overrides,match", [
    (dict(model_size="huge"), "model_size 'huge' is not a preset; choose one of tiny, small"),
    (dict(batch_size=0), "batch_size must be one or more integers >= 1"),
    (dict(batch_size=(2, 2)), "batch_size lists a size twice"),
    (dict(seq_len=0), "seq_len must be an integer >= 1"),
    (dict(new_tokens=1), "new_tokens must be >= 2"),
    (dict(seq_len=1000, new_tokens=100), "exceeds the 1024 positions"),
    (dict(dtype="float16"), "dtype must be one of float32, bfloat16"),
    (dict(hidden_size=130), "hidden_size 130 is not a multiple of num_attention_heads 4"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(world_size=0), "world_size"),
])
def test_bad_config_values_are_refused(overrides, match):
    with pytest.raises(BenchmarkConfigError, match=match):
        BenchmarkConfig(**{**TINY, **overrides})


def test_bad_tp_and_too_large_a_shape_are_refused(capsys):
    with pytest.raises(BenchmarkConfigError, match="num_attention_heads=4 is not divisible by tp=3"):
        DistributedInferenceBenchmark(BenchmarkConfig(**TINY, world_size=3)).run_comprehensive_benchmark()
    n = len(jax.devices())
    with pytest.raises(BenchmarkConfigError, match=f"needs {4 * n} devices but {n} are visible"):
        DistributedInferenceBenchmark(BenchmarkConfig(**TINY, world_size=4 * n)).run_comprehensive_benchmark()
    with pytest.raises(ShapeError, match="GiB of host memory .* choose a smaller --model-size"):
        check_fits(PRESETS["7B"], available=2**30)
    assert run_cli("--model-size", "tiny", "--new-tokens", "1") == 2
    assert "error: new_tokens must be >= 2" in capsys.readouterr().err


@pytest.mark.skipif(not peer.available(), reason="torch is not installed")
def test_a_checkpoint_of_ones_own_is_measured_against_hf_on_its_safetensors(hf_model_dir, tmp_path, capsys):
    """--model: a GPT-2 from transformers (no gate, a tied head, learned positions) in
    place of a preset: its parameters as transformers counts them, a floor of the
    weights a decode step reads (every matrix and norm scale; the position table only
    through the row it gathers; biases left out), transformers' own greedy tokens."""
    from tests import hf_models

    path, out = hf_model_dir("gpt2"), tmp_path / "bench.json"
    assert run_cli("--model", path, "--batch-size", "1", "--prompt-len", "8", "--new-tokens", "8", "--tp", "1",
                   "--repeats", "1", "--no-speedup", "--probe-mb", "16", "--json", str(out)) == 0
    data, hf = json.loads(out.read_text()), hf_models.load(path)
    assert data["config"]["model"] == path == data["checkpoint"] and data["shape"]["model_type"] == "gpt2"
    assert data["params"] == hf.num_parameters()
    (b,) = data["batches"]
    read = sum(p.numel() for n, p in hf.named_parameters() if not n.endswith(".bias") and "wpe" not in n)
    assert b["ours"]["floor"]["weight_bytes"] == 4 * read
    prompt = random_prompts(1, 8, hf.config.vocab_size, seed=1)[0]  # the run's prompt at batch 1 (seed 0 + 1)
    assert b["ours"]["generated_ids"] == [hf_models.greedy(hf, prompt, 8)]
    assert b["same_tokens_as_peer"] == 1.0 and data["peer_skipped"] is None
    assert f"model {path} (gpt2): 0.1M parameters" in capsys.readouterr().out


def test_a_converted_checkpoint_is_measured_without_the_peer(hf_model_dir, tmp_path):
    """--model on a converted Orbax checkpoint of a Qwen2 whose second layer has a sliding
    window, split over 2 devices: transformers' greedy tokens; the peer skipped, with
    why; the cache the floor counts bounded by each layer's window."""
    from tests import hf_models

    src = hf_model_dir("qwen2_window")
    path = rj.convert_hf(src, str(tmp_path / "converted"), progress=False)
    cfg = BenchmarkConfig(model=path, batch_size=(1, 2), seq_len=8, new_tokens=8, world_size=2, repeats=1,
                          speedup=False, probe_megabytes=16)
    r = DistributedInferenceBenchmark(cfg, progress=lambda _: None).run_comprehensive_benchmark()
    assert r.peer_skipped.startswith("a converted checkpoint") and r.tp == 2
    hf = hf_models.load(src)
    context = 8 + 8 / 2  # prompt + half the new tokens: the average over the decode steps
    windows = [hf.config.sliding_window if t == "sliding_attention" else None for t in hf.config.layer_types]
    assert windows == [None, 6]
    d = hf.config.hidden_size // hf.config.num_attention_heads
    for b in r.batches:
        prompts = random_prompts(b.batch, 8, hf.config.vocab_size, seed=b.batch)
        assert b.ours.generated_ids == [hf_models.greedy(hf, p, 8) for p in prompts]
        assert b.peer is None and b.same_tokens_as_peer is None and b.peer_step_over_bandwidth_floor is None
        attended = sum(min(context, w or context) for w in windows)
        assert b.ours.floor.kv_bytes == b.batch * attended * 2 * hf.config.num_key_value_heads * d * 4
    assert r.params == hf.num_parameters()
    assert offline_table(r).startswith(f"model {path} (qwen2): ")


def test_a_model_that_cannot_be_measured_is_refused_before_loading(hf_model_dir, tmp_path, capsys):
    import transformers

    llama, bert, t5 = hf_model_dir("llama_gqa"), hf_model_dir("bert"), str(tmp_path / "t5")
    transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).save_pretrained(t5)
    run = dict(seq_len=8, new_tokens=8)
    for overrides, match in [
        (dict(model=llama, num_layers=4), "num_layers reshape a preset, but the shape of model .* is its config.json"),
        (dict(model=str(tmp_path / "absent")), "is not a directory: point it at a Hugging Face model directory"),
        (dict(model=bert), "is an encoder-only bert: the offline benchmark measures decoder-only text generation"),
        (dict(model=t5), "is an encoder-decoder t5: the offline benchmark measures decoder-only"),
        (dict(model=llama, seq_len=200, new_tokens=100), "exceeds the 256 positions of model"),
    ]:
        with pytest.raises(BenchmarkConfigError, match=match):
            BenchmarkConfig(**{**run, **overrides})
    with pytest.raises(ShapeError, match="7.00B parameters needs about .* choose a smaller model or run"):
        check_fits(7 * 10**9, available=2**30)
    assert run_cli("--model", bert, "--batch-size", "1") == 2
    assert "error: model " in capsys.readouterr().err


def test_hlo_shape_bytes():
    assert shape_bytes("f32[8,1,512]{2,1,0}") == 8 * 512 * 4
    assert shape_bytes("pred[]") == 1
    assert shape_bytes("(bf16[2,3]{1,0}, s32[4]{0})") == 2 * 6 + 16
    # an accelerator's asynchronous all-gather: the start's result is (operand, result)
    (start,) = collective_ops("  %ag = (f32[1,128]{1,0}, f32[1,512]{1,0}) all-gather-start(f32[1,128]{1,0} %x), "
                              "channel_id=1, replica_groups={{0,1,2,3}}, dimensions={1}, use_global_device_ids=true")
    assert (start.kind, start.dimension, start.start, start.results()) == ("all-gather", 1, True, [("f32", (1, 512))])


def test_the_megatron_all_reduces_are_the_layers_whatever_type_they_travel_in():
    """A bfloat16 step on CPU: the embedding lookup's all-reduce moves 16-bit words (u16)
    before the first layer, the layers' all-reduces are summed in float32: the floor is
    the layers' (by element count, the last 2 × layers), the rest is listed beyond it."""
    line = "  %{n} = {t}[1,1,128]{{2,1,0}} all-reduce({t}[1,1,128]{{2,1,0}} %x), channel_id={n}, " \
           "replica_groups={{{{0,1}}}}, to_apply=%sum"
    hlo = "\n".join([line.format(n=1, t="u16")] + [line.format(n=i, t="f32") for i in range(2, 6)]
                    + ["  %g = f32[1,1,512]{2,1,0} all-gather(f32[1,1,256]{2,1,0} %y), channel_id=6, "
                       "replica_groups={{0,1}}, dimensions={2}, use_global_device_ids=true"])
    c = decode_comm(hlo, tp=2, batch=1, layers=2, hidden=128, dtype_bytes=2)
    assert c.total_count == 6 and c.megatron_count == 4
    assert c.extra == ["all-reduce u16[1,1,128]", "all-gather f32[1,1,512]"]
    assert offline.collectives_alone(collective_ops(hlo), rj.TensorParallelConfig(tp_size=2).mesh, 4)  # u16 too


def test_batch_sizes_are_run_smallest_first():
    assert BenchmarkConfig(**TINY, batch_size=(4, 1, 2)).batch_size == (1, 2, 4)


def test_the_collectives_alone_reproduce_a_compiled_programs_collectives():
    """Each kind the alone-program times, at tp = 4, as XLA compiled them: the
    alone-program's HLO lists the same collectives."""
    from jax.sharding import PartitionSpec as P

    from ryzen_jax.sharding import MODEL

    mesh = rj.TensorParallelConfig(tp_size=4).mesh

    def f(x):
        y = jax.lax.psum_scatter(x, MODEL, scatter_dimension=1, tiled=True)
        z = jax.lax.all_gather(jnp.sin(y), MODEL, axis=1, tiled=True)
        return z + jax.lax.psum(jnp.cos(x).astype(jnp.bfloat16), MODEL).astype(x.dtype)

    step = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(MODEL), out_specs=P(MODEL), check_vma=False))
    hlo = step.lower(jnp.zeros((8, 16, 3), jnp.float32)).compile().as_text()
    found = structure_collectives(hlo)
    assert {k for k, _ in found} == {"reduce-scatter", "all-gather", "all-reduce"}
    program, _, _ = collectives_alone(collective_ops(hlo), mesh)
    assert structure_collectives(program.as_text()) == found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ryzen_jax.demo import write_demo_hf_checkpoint
    from ryzen_jax.serve import Server
    from tests.test_server import Running

    path = write_demo_hf_checkpoint(str(tmp_path_factory.mktemp("serve") / "demo"))
    lm = rj.load_model(path, tp=1, max_seq_len=16, progress=False)
    running = Running(Server(lm, max_batch=2, max_queue=16, model_name="demo"))
    yield running
    running.stop()


def test_serving_load_against_the_real_server(server):
    lines: list[str] = []
    cfg = serving.ServingConfig(base_url=server.url, num_prompts=6, request_rate=40.0, max_concurrency=2,
                                input_words=2, max_tokens=5)
    r = serving.run(cfg, progress=lines.append)
    assert r.model == "demo" and r.completed == 6 and r.failed == 0 and not r.errors
    assert r.total_output_tokens == 6 * 5 and r.total_input_tokens >= 6 * 2  # usage from the server
    for s in (r.ttft_ms, r.tpot_ms, r.itl_ms, r.e2e_ms):
        assert 0 < s["p50"] <= s["p99"]
    assert r.ttft_ms["p50"] < r.e2e_ms["p99"] and len(r.itl_samples_ms) >= 6
    for v in (r.request_throughput, r.output_throughput, r.total_token_throughput):
        assert finite_positive(v)
    assert lines[-1] == "6/6 requests done"


def test_goodput_counts_the_requests_that_met_every_objective(server):
    """Against the real server: objectives no request can miss give the request rate,
    one no request can meet gives 0; the figures it is judged on are the reported ones."""
    base = dict(base_url=server.url, num_prompts=4, max_concurrency=2, input_words=2, max_tokens=4)
    loose = serving.run(serving.ServingConfig(**base, goodput=(("ttft", 1e7), ("tpot", 1e7), ("e2el", 1e7))))
    assert loose.completed == 4 and loose.request_goodput == pytest.approx(loose.request_throughput)
    strict = serving.run(serving.ServingConfig(**base, goodput=(("e2el", 1e-3),)))
    assert strict.completed == 4 and strict.request_goodput == 0.0 and strict.goodput == {"e2el": 1e-3}
    assert serving.run(serving.ServingConfig(**base)).request_goodput is None
    # the objective halfway through the measured TTFTs splits the requests by them
    cut = sorted(loose.ttft_samples_ms)[1]
    split = serving.summarise(serving.ServingConfig(**base, goodput=(("ttft", cut),)), "demo",
                              loose_outcomes(loose), loose.duration_s)
    assert split.request_goodput * loose.duration_s == pytest.approx(2)


def loose_outcomes(r: serving.ServingResults) -> list[serving.RequestOutcome]:
    """Outcomes that carry a run's own TTFTs and latencies, to judge them again."""
    return [serving.RequestOutcome(ok=True, ttft=t / 1e3, latency=e / 1e3, output_tokens=4)
            for t, e in zip(r.ttft_samples_ms, r.e2e_samples_ms)]


def test_arrivals_are_poisson_or_gamma_of_the_same_mean():
    rate, n = 5.0, 20000
    for burstiness in (1.0, 0.25, 4.0):
        gaps = np.asarray(serving.arrival_gaps(n, rate, seed=3, burstiness=burstiness))
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert serving.arrival_gaps(3, math.inf, seed=0, burstiness=0.5) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("overrides,match", [
    (dict(burstiness=0), "burstiness must be a finite number > 0"),
    (dict(goodput=(("latency", 5.0),)), "goodput metric 'latency': choose one of ttft, tpot, e2el"),
    (dict(goodput=(("ttft", -1.0),)), "goodput ttft: the objective must be > 0 ms"),
])
def test_bad_serving_settings_are_refused(overrides, match):
    with pytest.raises(serving.ServingConfigError, match=match):
        serving.ServingConfig(**overrides)


def test_serving_cli(server, tmp_path, capsys):
    out = tmp_path / "serving.json"
    assert run_cli("--mode", "serving", "--base-url", server.url, "--num-prompts", "2", "--input-words", "2",
                   "--max-tokens", "3", "--request-rate", "20", "--json", str(out), "--plots", str(tmp_path)) == 0
    data = json.loads(out.read_text())
    assert data["completed"] == 2 and data["failed"] == 0 and data["total_output_tokens"] == 6
    assert (tmp_path / "serving_latency_distribution.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "2 completed, 0 failed" in table and "TTFT" in table and "ITL" in table
    assert run_cli("--mode", "serving", "--base-url", server.url, "--num-prompts", "2", "--input-words", "2",
                   "--max-tokens", "3", "--burstiness", "0.5", "--goodput", "ttft:60000", "e2el:60000") == 0
    assert "request goodput (ttft <= 60000 ms, e2el <= 60000 ms): " in capsys.readouterr().out
    assert run_cli("--mode", "serving", "--base-url", server.url, "--goodput", "ttft=500") == 2
    assert "error: --goodput 'ttft=500': expected METRIC:MS, e.g. ttft:500" in capsys.readouterr().err


def test_serving_prompts_from_a_file(server, tmp_path, capsys):
    """--dataset: a JSONL of prompts (each its own max_tokens, else --max-tokens), sampled
    and repeated to --num-prompts; a ShareGPT JSON's first human turns; a malformed file
    refused with its line before any request."""
    rows = [{"prompt": "the river", "max_tokens": 2}, {"prompt": "a window", "max_tokens": 5},
            {"prompt": "light"}]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = serving.ServingConfig(base_url=server.url, num_prompts=6, max_tokens=3, max_concurrency=3,
                                dataset=str(jsonl))
    assert sorted(serving.request_prompts(cfg)) == sorted([(r["prompt"], r.get("max_tokens", 3)) for r in rows] * 2)
    r = serving.run(cfg)
    assert not r.errors, r.errors
    assert r.completed == 6 and r.failed == 0 and r.total_output_tokens == 2 * (2 + 5 + 3) and r.dataset == str(jsonl)
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "the morning market"}, {"from": "gpt", "value": "is busy"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn: left out"}]},
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "one stone"}]}]))
    assert serving.read_dataset(str(sharegpt), 4) == [("the morning market", 4), ("one stone", 4)]
    assert run_cli("--mode", "serving", "--base-url", server.url, "--num-prompts", "2", "--max-tokens", "2",
                   "--dataset", str(sharegpt)) == 0
    assert "2 completed, 0 failed of 2" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    for text, match in [('{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2: needs a non-empty string 'prompt'"),
                        ('{"prompt": "ok", "max_tokens": 0}\n', "line 1: max_tokens must be an integer >= 1"),
                        ("not json\n", "line 1: not JSON"), ("\n", "holds no prompt")]:
        bad.write_text(text)
        with pytest.raises(serving.ServingConfigError, match=match):
            serving.run(serving.ServingConfig(base_url="http://127.0.0.1:9", dataset=str(bad)))  # no server needed
    assert run_cli("--mode", "serving", "--dataset", str(tmp_path / "absent.jsonl")) == 2
    assert "is not a file" in capsys.readouterr().err


def test_serving_counts_failures_and_names_an_absent_server(server):
    r = serving.run(serving.ServingConfig(base_url=server.url, num_prompts=3, max_tokens=10_000, input_words=2))
    assert r.completed == 0 and r.failed == 3 and all(e.startswith("HTTP 400") for e in r.errors)
    with pytest.raises(ConnectionError, match="no server answers at http://127.0.0.1:9"):
        serving.run(serving.ServingConfig(base_url="http://127.0.0.1:9", num_prompts=1))
    with pytest.raises(serving.ServingConfigError, match="request_rate must be > 0"):
        serving.ServingConfig(request_rate=0)


@pytest.mark.skipif(not peer.available(), reason="torch is not installed")
def test_a_bfloat16_run_reads_a_bfloat16_checkpoint_of_the_same_weights(cache_dir):
    """A bfloat16 benchmark gets its own checkpoint, in half the bytes: what transformers
    loads from it equals the float32 checkpoint's weights rounded to bfloat16 by PyTorch,
    tensor by tensor; and its memory check asks half as much (a "7B" shape fits 20 GiB
    in bfloat16, not in float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    dims = PRESETS["tiny"]
    f32, bf16 = ensure_checkpoint(dims, cache_dir), ensure_checkpoint(dims, cache_dir, dtype="bfloat16")
    assert f32 != bf16
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))  # noqa: E731
    assert abs(size(bf16) - size(f32) / 2) < 4096
    a = AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(bf16).state_dict()  # the dtype its config names
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].dtype == torch.bfloat16 and torch.equal(a[name].to(torch.bfloat16), b[name]), name
    check_fits(PRESETS["7B"], "bfloat16", available=20 * 2**30)
    with pytest.raises(ShapeError, match="in float32 \\(--dtype bfloat16 needs half\\)"):
        check_fits(PRESETS["7B"], "float32", available=20 * 2**30)
    # split over CPU devices, XLA:CPU's dot holds float32 copies of the bfloat16 weights:
    # refused with the fix named, before anything is loaded; on a GPU, no such copies
    with pytest.raises(ShapeError, match="at tp=4 on CPU .* float32 copy .* pass --tp 1"):
        check_fits(PRESETS["7B"], "bfloat16", available=20 * 2**30, tp=4, platform="cpu")
    check_fits(PRESETS["7B"], "bfloat16", available=20 * 2**30, tp=4, platform="gpu")


def test_a_later_higher_bandwidth_lowers_the_floors(results):
    """The floors are rescaled when the bandwidth measured after our runs is higher:
    twice the bandwidth, half the floor, twice the step's ratio over it."""
    from ryzen_jax.bench.offline import with_bandwidth

    run = results.batches[0].ours
    faster = with_bandwidth(run, 10.0, 20.0)
    assert faster.floor.bandwidth_ms == pytest.approx(run.floor.bandwidth_ms / 2)
    assert faster.step_over_bandwidth_floor == pytest.approx(2 * run.step_over_bandwidth_floor)
    assert faster.decode_step_ms == run.decode_step_ms and faster.floor.weight_bytes == run.floor.weight_bytes
