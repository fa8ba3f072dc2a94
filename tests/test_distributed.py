"""The orchestrator (ryzen_jax.distributed) and the collectives (ryzen_jax.collectives):
where a process group comes from, the mesh it picks, bounded start-up, health checks
against a stopped or dead peer in real 2-process gloo groups, presets, and the explicit
collectives on 8 simulated devices against numpy."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ryzen_jax import collectives, launcher, runtime
from ryzen_jax.collectives import COLLECTIVE_PRESETS, NCCLCommunicator, apply_collective_preset
from ryzen_jax.distributed import (ClusterSpec, CoordinatorUnreachableError, MultiGPUOrchestrator, detect_cluster,
                                   plan_mesh)
from ryzen_jax.sharding import make_mesh
from tests.mp_helpers import ROOT, user_env


# -- where the group comes from --------------------------------------------------------------


def test_cluster_from_launcher_torchrun_slurm_and_openmpi_variables():
    launched = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "2", launcher.ENV_DEVICES_PER_PROC: "2"}
    assert detect_cluster(launched) == ClusterSpec("torchrun", "10.0.0.1:1234", 2, 1, (2, 3))
    torchrun = {k: v for k, v in launched.items() if k != launcher.ENV_DEVICES_PER_PROC}
    assert detect_cluster(torchrun).local_device_ids == (1,)  # one GPU per process, torchrun's convention
    one_per_host = {**torchrun, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert detect_cluster(one_per_host).local_device_ids is None  # every local device
    slurm = {"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7"}
    assert detect_cluster(slurm) == ClusterSpec("slurm", None, 2, 1, None)  # jax finds the coordinator
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}).process_id == 3
    assert not detect_cluster({}).multi_process
    assert not detect_cluster({"RANK": "0", "WORLD_SIZE": "1"}).multi_process
    with pytest.raises(ValueError, match="MASTER_ADDR is not"):
        detect_cluster({"RANK": "1", "WORLD_SIZE": "2"})
    # torchrun 2.x: its agent's store holds MASTER_PORT, so JAX's coordinator takes the next port
    agent = {**torchrun, "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert detect_cluster(agent).coordinator_address == "10.0.0.1:1235"
    assert detect_cluster({**agent, "JAX_COORDINATOR_PORT": "4000"}).coordinator_address == "10.0.0.1:4000"
    assert detect_cluster({**torchrun, "JAX_LOCAL_DEVICE_IDS": "4,5"}).local_device_ids == (4, 5)


def test_explicit_set_up_needs_both_rank_and_world_size(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="needs rank and world_size"):
        MultiGPUOrchestrator(world_size=2)._resolve(None, None)  # every process would claim rank 0
    with pytest.raises(ValueError, match="needs rank and world_size"):
        MultiGPUOrchestrator(rank=1)._resolve("10.0.0.1", 29500)
    assert MultiGPUOrchestrator(world_size=1)._resolve(None, None).process_id == 0


def test_rank_before_the_group_forms_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert runtime.process_index() == 1 and not runtime.is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert runtime.is_main_process()


def test_plan_mesh_takes_the_largest_tp_and_the_rest_as_dp(caplog):
    model = types.SimpleNamespace(num_heads=4, num_kv_heads=2, intermediate_size=64)
    with caplog.at_level(logging.INFO, logger="ryzen_jax.distributed"):
        plan = plan_mesh(model, n_devices=8)
    assert (plan.tp_size, plan.dp_size) == (4, 2)
    assert "mesh: data=2 x model=4 on 8 of 8 devices" in caplog.text and "largest split of heads=4" in caplog.text
    assert (plan_mesh(model, tp=2, n_devices=8).dp_size, plan_mesh(model, dp=4, n_devices=8).tp_size) == (4, 2)
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        plan_mesh(model, tp=3, n_devices=8)


# -- one process --------------------------------------------------------------------------------


def test_single_process_orchestrator():
    """No group variables: initialize() forms nothing; health runs over the local devices."""
    orch = MultiGPUOrchestrator()
    orch.initialize()
    assert (orch.get_rank(), orch.get_world_size(), orch.is_master()) == (0, 1, True)
    assert orch.get_device() == jax.local_devices()[0]
    assert orch.check_health(timeout_s=30) and orch.attempt_recovery()
    orch.barrier()
    stats = orch.get_performance_stats()
    assert stats["failure_count"] == 0 and stats["collective_ms"]["count"] == 2 and stats["uptime_seconds"] > 0
    assert stats["communication_time"]["mean"] == pytest.approx(stats["collective_ms"]["mean"] / 1e3)
    orch.cleanup()


# -- bounded start-up ------------------------------------------------------------------------------


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout():
    port = launcher.free_port()
    t0 = time.monotonic()
    with pytest.raises(CoordinatorUnreachableError) as err:
        MultiGPUOrchestrator(rank=1, world_size=2, initialization_timeout=1.5).initialize("127.0.0.1", port)
    assert time.monotonic() - t0 < 1.5 + 3
    assert f"127.0.0.1:{port}" in str(err.value) and "within 1.5s" in str(err.value) and "Fix:" in str(err.value)
    assert not jax.distributed.is_initialized()


def test_a_group_that_never_forms_ends_the_process_within_the_timeout():
    """In a fresh process (JAX must not have started): first, Open MPI's rank variables
    without its coordinator URI are refused with the variables to set; then process 0 of
    2 alone: JAX would wait (then abort with a gRPC status); we exit with the fix."""
    code = ("import os, time\n"
            "from ryzen_jax.distributed import MultiGPUOrchestrator\n"
            "os.environ.update(OMPI_COMM_WORLD_SIZE='2', OMPI_COMM_WORLD_RANK='1')\n"
            "try:\n"
            "    MultiGPUOrchestrator(initialization_timeout=2).initialize()\n"
            "except ValueError as e:\n"
            "    print(e, flush=True)\n"
            "del os.environ['OMPI_COMM_WORLD_SIZE'], os.environ['OMPI_COMM_WORLD_RANK']\n"
            "print(time.monotonic(), flush=True)\n"
            f"MultiGPUOrchestrator(rank=0, world_size=2, initialization_timeout=2).initialize('127.0.0.1', "
            f"{launcher.free_port()})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                         timeout=120)
    elapsed = time.monotonic() - float(run.stdout.splitlines()[-1])
    assert run.stdout.startswith("cannot form the openmpi process group: ") and "Fix: set MASTER_ADDR" in run.stdout
    assert run.returncode == 1, run.stderr[-2000:]
    assert "not all 2 processes joined the coordinator at 127.0.0.1:" in run.stderr and "within 2s" in run.stderr
    assert elapsed < 2 + 10  # the timeout, with slack for a loaded machine


# -- health of a real group --------------------------------------------------------------------------

DEADLINE_S = 2.0


@pytest.mark.parametrize("mode,preset", [("stop", "throughput"), ("kill", "latency")])
def test_check_health_is_false_within_its_deadline_when_a_peer_is_stopped_or_gone(mode, preset):
    """2 processes × 1 device (gloo): the first check is True; after process 1 SIGSTOPs or
    SIGKILLs itself, process 0's check returns False within its deadline, and
    attempt_recovery() exits with the launcher's restart code. Each group runs under a
    collective preset, so XLA also proves it accepts the preset's flags."""
    cfg = launcher.LaunchConfig(nproc=2, command=("unused",), devices_per_proc=1)
    port = launcher.free_port()
    env = user_env(RYZEN_JAX_COLLECTIVE_PRESET=preset)
    procs = [subprocess.Popen([sys.executable, "tests/health_worker.py", mode, str(DEADLINE_S)], cwd=ROOT,
                              env=launcher.child_env(cfg, r, port, 0, None, base=env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=180)
    finally:
        procs[1].kill()
        procs[1].communicate()
    events = {e["event"]: e for e in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    assert events["first_check"]["ok"] is True, err[-3000:]
    second = events["second_check"]
    assert second["ok"] is False and second["elapsed_s"] < DEADLINE_S + 1.5
    assert second["stats"]["failure_count"] == 1 and second["stats"]["collective_ms"]["count"] == 1
    assert procs[0].returncode == launcher.RESTART_EXIT_CODE and "recovered" not in events
    assert all(f in events["first_check"]["xla_flags"] for f in COLLECTIVE_PRESETS[preset].xla_flags)
    assert events["first_check"]["nccl"] == dict(COLLECTIVE_PRESETS[preset].env)
    print(f"\n{mode}: health check False after {second['elapsed_s']:.3f}s (deadline {DEADLINE_S}s)")


# -- presets and collectives -------------------------------------------------------------------------


def test_presets_set_xla_flags_and_nccl_variables_without_overriding_the_user():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_gpu_enable_latency_hiding_scheduler=false",
           "NCCL_BUFFSIZE": "1024"}
    changed = apply_collective_preset("throughput", env)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 "
                                       "--xla_gpu_enable_latency_hiding_scheduler=false ")  # the user's value stays
    assert env["XLA_FLAGS"].count("latency_hiding_scheduler") == 1
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=134217728" in env["XLA_FLAGS"]
    assert env["NCCL_BUFFSIZE"] == "1024" and "NCCL_BUFFSIZE" not in changed
    latency = {}
    assert apply_collective_preset("latency", latency) == latency and latency["NCCL_PROTO"] == "LL,LL128"
    assert apply_collective_preset("latency", latency) == {}  # idempotent
    with pytest.raises(ValueError, match="unknown collective preset 'fast'; choose one of"):
        apply_collective_preset("fast", {})


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(tp=4, dp=2)  # 8 simulated devices


def test_all_reduce_over_each_mesh_axis(mesh):
    x = np.random.default_rng(0).normal(size=(8 * 3, 5)).astype(np.float32)
    blocks = jax.device_put(x, NamedSharding(mesh, P("model")))
    for op, ref in [("sum", np.sum), ("mean", np.mean), ("max", np.max), ("min", np.min)]:
        out = collectives.all_reduce(blocks, mesh, "model", op)
        np.testing.assert_allclose(out, ref(x.reshape(4, 6, 5), axis=0), rtol=1e-6, atol=1e-6)
        assert out.sharding.is_fully_replicated
    by_data = collectives.all_reduce(jax.device_put(x, NamedSharding(mesh, P("data"))), mesh, "data")
    np.testing.assert_allclose(by_data, x.reshape(2, 12, 5).sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match="mesh axis 'tensor' is not one of"):
        collectives.all_reduce(blocks, mesh, "tensor")


def test_all_gather_and_reduce_scatter(mesh):
    x = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    comm = NCCLCommunicator(mesh, "model")
    gathered = comm.all_gather(jax.device_put(x, NamedSharding(mesh, P(None, "model"))), dim=1)
    np.testing.assert_array_equal(gathered, x)
    assert gathered.sharding.is_fully_replicated
    partials = np.random.default_rng(1).normal(size=(4 * 2, 8)).astype(np.float32)  # one (2, 8) block per device
    scattered = comm.reduce_scatter(jax.device_put(partials, NamedSharding(mesh, P("model"))), dim=1)
    np.testing.assert_allclose(scattered, partials.reshape(4, 2, 8).sum(0), rtol=1e-6)
    assert scattered.sharding.spec == P(None, "model")
    assert [s.data.shape for s in scattered.addressable_shards][:4] == [(2, 2)] * 4  # each device holds its slice
    np.testing.assert_allclose(comm.all_reduce(jax.device_put(partials, NamedSharding(mesh, P("model")))),
                               partials.reshape(4, 2, 8).sum(0), rtol=1e-6)
