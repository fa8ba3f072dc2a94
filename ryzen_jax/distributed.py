"""Multi-process (multi-host) set-up: the guide's ``MultiGPUOrchestrator`` on top of
``jax.distributed``.

JAX is multi-controller: every process runs the same program on its own devices and
XLA moves the data (NCCL between GPUs, gloo between CPU processes). This module forms
the process group and watches it:

* **Where the group comes from**, first match wins: explicit arguments
  (``MultiGPUOrchestrator(rank=, world_size=).initialize(master_addr, master_port)``);
  torchrun-style variables ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``
  (+ ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), set by ``scripts/launch.py``, torchrun, or
  the Kubernetes manifests in ``configs/deploy``; SLURM (inside ``srun``) and Open MPI
  (``mpirun``), which ``jax.distributed`` detects itself; otherwise one process. JAX's
  coordinator listens on ``MASTER_PORT``, or on ``JAX_COORDINATOR_PORT`` where set, or
  on ``MASTER_PORT + 1`` under torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE``:
  torchrun's own store holds ``MASTER_PORT`` then).
* **Which local devices** a process takes: ``local_device_ids``, else
  ``JAX_LOCAL_DEVICE_IDS``, else ``LOCAL_RANK·K
  ... +K-1`` with ``RYZEN_JAX_DEVICES_PER_PROC=K`` (the launcher's
  ``--devices-per-proc``), else one device per process when several share a host
  (``LOCAL_WORLD_SIZE > 1``, torchrun's convention), else all of them.
* **Bounded start-up**: a process that cannot reach the coordinator, or a group that
  does not fully form, fails with a message naming the address and the fix within
  ``initialization_timeout`` seconds (JAX alone aborts the process with a gRPC status).
* **Health**: ``check_health`` runs a one-number all-reduce over every device of the
  group with a deadline. See its docstring for what a False means.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ryzen_jax.api import choose_tp
from ryzen_jax.collectives import apply_collective_preset
from ryzen_jax.config import ModelConfig
from ryzen_jax.launcher import (ENV_DEVICES_PER_PROC, ENV_HEARTBEAT_TIMEOUT, ENV_INIT_TIMEOUT, ENV_LAUNCHED,
                                RESTART_EXIT_CODE)
from ryzen_jax.sharding import TensorParallelConfig

log = logging.getLogger(__name__)

ENV_PRESET = "RYZEN_JAX_COLLECTIVE_PRESET"
DEFAULT_PORT = 29500


class CoordinatorUnreachableError(RuntimeError):
    """The process group could not form: the coordinator did not answer in time."""


@dataclass(frozen=True)
class ClusterSpec:
    """How this process joins its group. ``None`` fields are left to JAX's own detection."""

    source: str  # "explicit" | "torchrun" | "slurm" | "openmpi" | "single"
    coordinator_address: str | None = None  # host:port
    num_processes: int | None = 1
    process_id: int | None = 0
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multi_process(self) -> bool:
        return self.num_processes is None or self.num_processes > 1


def _int(environ: Mapping[str, str], key: str) -> int | None:
    value = environ.get(key)
    return int(value) if value not in (None, "") else None


def _local_devices_from_env(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    given = environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if given:  # the user's own choice wins
        return tuple(int(i) for i in given.split(","))
    local_rank = _int(environ, "LOCAL_RANK")
    per_proc = _int(environ, ENV_DEVICES_PER_PROC)
    if local_rank is None:
        return None
    if per_proc is not None:
        return tuple(range(local_rank * per_proc, (local_rank + 1) * per_proc))
    if (_int(environ, "LOCAL_WORLD_SIZE") or 1) > 1:
        return (local_rank,)
    return None


def detect_cluster(environ: Mapping[str, str] | None = None) -> ClusterSpec:
    """The group this process belongs to, from its environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        if world > 1 and not env.get("MASTER_ADDR"):
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are set but MASTER_ADDR is not: set MASTER_ADDR "
                             "(and MASTER_PORT) to the address of the rank-0 host")
        port = int(env.get("MASTER_PORT", DEFAULT_PORT))
        if env.get("JAX_COORDINATOR_PORT"):
            port = int(env["JAX_COORDINATOR_PORT"])
        elif env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            port += 1  # torchrun's own agent listens on MASTER_PORT: JAX's coordinator takes the next one
        address = f"{env.get('MASTER_ADDR', '127.0.0.1')}:{port}"
        return ClusterSpec("torchrun", address, world, rank, _local_devices_from_env(env))
    if "SLURM_STEP_NODELIST" in env and "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        # jax.distributed finds the coordinator (first node of the step; port from
        # JAX_COORDINATOR_PORT or the job id) and, unless JAX_LOCAL_DEVICE_IDS says
        # otherwise, gives each task the GPU numbered by its SLURM_LOCALID.
        return ClusterSpec("slurm", None, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), None)
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        return ClusterSpec("openmpi", None, int(env["OMPI_COMM_WORLD_SIZE"]), int(env["OMPI_COMM_WORLD_RANK"]), None)
    return ClusterSpec("single")


def plan_mesh(cfg: ModelConfig, *, tp: int | None = None, dp: int | None = None,
              n_devices: int | None = None) -> TensorParallelConfig:
    """The (dp × tp) layout for ``cfg`` over the group's devices, logged.

    ``tp`` defaults to the largest split of the model's heads, KV heads and MLP that the
    devices allow (``api.choose_tp``), ``dp`` to the devices left over (``n // tp``).
    Devices are ordered by process, so a tp group stays inside one host when tp ≤ the
    devices per host: the two all-reduces per layer then never cross the network.
    """
    n = n_devices if n_devices is not None else len(jax.devices())
    tp_given = tp is not None
    if tp is None:
        tp = choose_tp(cfg, max(1, n // (dp or 1)))
    if dp is None:
        dp = max(1, n // tp)
    plan = TensorParallelConfig(tp_size=tp, dp_size=dp)
    plan.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
    why = "as asked" if tp_given else (f"the largest split of heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, "
                                       f"mlp={cfg.intermediate_size} over {n} devices")
    log.info("mesh: data=%d x model=%d on %d of %d devices (%d processes): tp=%d is %s", dp, tp, dp * tp, n,
             jax.process_count(), tp, why)
    return plan


def _wait_for_port(host: str, port: int, deadline: float) -> bool:
    """True once something accepts TCP connections on host:port, False at the deadline."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


class MultiGPUOrchestrator:
    """The guide's orchestrator, JAX-style: forms the process group, then offers a
    barrier, health checks with deadlines, recovery by group restart, and stats.

    ``backend``: "nccl" (GPUs; what XLA uses between GPUs anyway), "gloo" or "mpi" (CPU
    collectives between processes), or None (gloo on CPU, NCCL on GPU). ``device``
    ("cuda:N") pins this process to GPU N, like ``local_device_ids=[N]``.
    ``collective_preset``: see ``ryzen_jax.collectives.COLLECTIVE_PRESETS``; default
    ``$RYZEN_JAX_COLLECTIVE_PRESET`` or "default".
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None, backend: str | None = None,
                 device: str | None = None, enable_monitoring: bool = True, *,
                 local_device_ids: Sequence[int] | None = None, initialization_timeout: float | None = None,
                 heartbeat_timeout: float | None = None, collective_preset: str | None = None):
        if backend not in (None, "nccl", "gloo", "mpi"):
            raise ValueError(f"backend must be 'nccl', 'gloo', 'mpi' or None, got {backend!r}")
        if device is not None and local_device_ids is None:
            local_device_ids = [int(device.rsplit(":", 1)[1])] if ":" in device else None
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.enable_monitoring = enable_monitoring
        self.local_device_ids = tuple(local_device_ids) if local_device_ids is not None else None
        self.initialization_timeout = float(initialization_timeout or os.environ.get(ENV_INIT_TIMEOUT, "300"))
        self.heartbeat_timeout = float(heartbeat_timeout or os.environ.get(ENV_HEARTBEAT_TIMEOUT, "30"))
        self.collective_preset = collective_preset or os.environ.get(ENV_PRESET, "default")
        self.spec: ClusterSpec | None = None
        self._started = time.monotonic()
        self._failures = 0
        self._health_ms: list[float] = []
        self._stuck: threading.Thread | None = None  # a health check that never returned
        self._health_program: tuple[Any, jax.Array] | None = None
        self._barriers = 0

    # -- forming the group -------------------------------------------------------------

    def _resolve(self, master_addr: str | None, master_port: int | None) -> ClusterSpec:
        if self.world_size is not None or master_addr is not None:
            env = detect_cluster()
            known = env.source != "single"  # a launcher's environment fills in what was not given
            world = self.world_size if self.world_size is not None else (env.num_processes if known else None)
            rank = self.rank if self.rank is not None else (env.process_id if known else None)
            if world == 1 and rank is None:
                rank = 0
            if world is None or rank is None:
                raise ValueError("explicit set-up needs rank and world_size (or RANK and WORLD_SIZE in the environment)")
            host = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = master_port or int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
            return ClusterSpec("explicit", f"{host}:{port}", world, rank, self.local_device_ids)
        spec = detect_cluster()
        if self.local_device_ids is not None:
            spec = ClusterSpec(spec.source, spec.coordinator_address, spec.num_processes, spec.process_id,
                               self.local_device_ids)
        return spec

    def initialize(self, master_addr: str | None = None, master_port: int | None = None) -> None:
        """Join the process group (before any JAX computation). A single process does nothing.

        Raises CoordinatorUnreachableError when the coordinator at ``master_addr:master_port``
        does not answer within ``initialization_timeout``; exits the process (status 1, with
        the same kind of message) when the coordinator answers but the whole group does not
        join in time, since JAX cannot abandon a half-made connection.
        """
        if self.spec is not None:
            return
        spec = self._resolve(master_addr, master_port)
        if not spec.multi_process:
            self.spec = spec
            log.info("one process: no process group to form")
            return
        timeout = self.initialization_timeout
        deadline = time.monotonic() + timeout
        where = spec.coordinator_address or f"the {spec.source} coordinator"
        fix = ("Fix: start process 0 first or together with the others, check that every process has the same "
               "MASTER_ADDR/MASTER_PORT (coordinator address) and WORLD_SIZE and a distinct RANK, that the port is "
               "open between the hosts, or raise initialization_timeout "
               f"(${ENV_INIT_TIMEOUT}, launch.py --init-timeout).")
        if spec.coordinator_address and spec.process_id != 0:
            host, port = spec.coordinator_address.rsplit(":", 1)
            if not _wait_for_port(host, int(port), deadline):
                raise CoordinatorUnreachableError(
                    f"process {spec.process_id} of {spec.num_processes} could not reach the JAX coordinator at "
                    f"{spec.coordinator_address} within {timeout:g}s: nothing accepts connections there. {fix}")
        if self.collective_preset:
            apply_collective_preset(self.collective_preset)
        if self.backend in (None, "gloo", "mpi"):
            jax.config.update("jax_cpu_collectives_implementation", self.backend or "gloo")
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._formation_timed_out,
                                   args=(spec, where, timeout, fix))
        watchdog.daemon = True
        watchdog.start()
        try:
            jax.distributed.initialize(
                spec.coordinator_address, spec.num_processes, spec.process_id,
                list(spec.local_device_ids) if spec.local_device_ids is not None else None,
                # Our own parameters are complete: stop JAX from auto-detecting (and overriding) them.
                cluster_detection_method="deactivate" if spec.coordinator_address else None,
                # JAX aborts the process at its own timeout: ours (the watchdog) must come first.
                initialization_timeout=int(timeout) + 30,
                heartbeat_timeout_seconds=max(1, int(self.heartbeat_timeout)),
                coordinator_bind_address=self._bind_address(spec),
            )
        except ValueError as e:  # JAX's cluster detection found no coordinator address, count or id
            raise ValueError(f"cannot form the {spec.source} process group: {str(e).rstrip('.')}. Fix: set MASTER_ADDR, MASTER_PORT, "
                             "RANK and WORLD_SIZE for every process") from e
        finally:
            watchdog.cancel()
        self.spec = spec
        self._started = time.monotonic()
        log.info("process %d of %d joined the group at %s (%s) in %.1fs", spec.process_id, spec.num_processes, where,
                 spec.source, timeout - (deadline - time.monotonic()))

    @staticmethod
    def _bind_address(spec: ClusterSpec) -> str | None:
        """Loopback coordinators listen on loopback only; others on every interface (JAX's default)."""
        if spec.coordinator_address is None:
            return None
        host, port = spec.coordinator_address.rsplit(":", 1)
        return f"{host}:{port}" if host in ("127.0.0.1", "localhost") else None

    @staticmethod
    def _formation_timed_out(spec: ClusterSpec, where: str, timeout: float, fix: str) -> None:
        print(f"error: process {spec.process_id}: not all {spec.num_processes} processes joined the coordinator at "
              f"{where} within {timeout:g}s. {fix}",
              file=sys.stderr, flush=True)
        os._exit(1)

    # -- the guide's accessors -----------------------------------------------------------

    def _multi(self) -> bool:
        return self.spec is not None and self.spec.multi_process

    def get_rank(self) -> int:
        return jax.process_index() if self._multi() else 0

    def get_world_size(self) -> int:
        """The number of processes in the group (``jax.device_count()`` counts devices)."""
        return jax.process_count() if self._multi() else 1

    def get_device(self) -> jax.Device:
        """This process's first device (``jax.local_devices()`` lists all of them)."""
        return jax.local_devices()[0]

    def is_master(self) -> bool:
        return self.get_rank() == 0

    def barrier(self, name: str = "barrier", timeout_s: float = 300.0) -> None:
        """Wait until every process reaches a barrier of this name (the coordination
        service's, no device work). Raises on timeout, naming the barrier."""
        if not self._multi():
            return
        from jax._src import distributed as jax_distributed  # the client: the public API has no barrier with a timeout

        self._barriers += 1
        barrier_id = f"ryzen_jax/{name}/{self._barriers}"
        t0 = time.perf_counter()
        try:
            jax_distributed.global_state.client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
        except Exception as e:  # the client raises its own status type
            self._failures += 1
            raise TimeoutError(f"barrier {barrier_id!r}: not every process arrived within {timeout_s:g}s ({e}); "
                               "a process is gone or stuck: restart the group") from e
        log.debug("barrier %s: %.1f ms", barrier_id, (time.perf_counter() - t0) * 1e3)

    # -- health ----------------------------------------------------------------------------

    def _health_inputs(self) -> tuple[Any, jax.Array]:
        if self._health_program is None:
            devices = jax.devices()
            mesh = Mesh(np.asarray(devices), ("all",))
            ones = np.ones(len(devices), np.float32)
            x = jax.make_array_from_callback(ones.shape, NamedSharding(mesh, P("all")), lambda idx: ones[idx])
            program = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P())).lower(x).compile()
            self._health_program = (program, x)  # compiled here so the timings measure the collective
        return self._health_program

    def check_health(self, timeout_s: float = 10.0) -> bool:
        """True when a one-number all-reduce over every device of the group completes
        within ``timeout_s`` with the right sum; False otherwise. Never hangs.

        It is a collective: every process must call it at the same point of the
        program (like any JAX computation), from the thread that runs the model. The
        all-reduce runs in a daemon thread that the caller waits for with a deadline.
        After a False that thread may stay blocked in the collective forever (it does not
        keep the process from exiting), every later collective would block too, and the
        orderly ``jax.distributed`` shutdown would wait for the lost peer: the group is
        broken. Call ``attempt_recovery()``, which restarts the group through the launcher.
        """
        if self._stuck is not None and self._stuck.is_alive():
            self._failures += 1
            return False
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                program, x = self._health_inputs()
                t0 = time.perf_counter()
                result["sum"] = float(program(x))
                result["ms"] = (time.perf_counter() - t0) * 1e3
            except Exception as e:  # a lost peer can also surface as an error
                result["error"] = e

        worker = threading.Thread(target=run, name="ryzen_jax-health", daemon=True)
        worker.start()
        worker.join(timeout_s)
        expected = float(jax.device_count())
        if worker.is_alive() or result.get("sum") != expected:
            self._failures += 1
            if worker.is_alive():
                self._stuck = worker
                log.error("health check: the all-reduce over %d devices did not finish within %.1fs: a process is "
                          "gone or stuck", int(expected), timeout_s)
            else:
                log.error("health check failed: %s", result.get("error", f"sum {result.get('sum')} != {expected}"))
            return False
        if self.enable_monitoring:
            self._health_ms.append(result["ms"])
        return True

    def attempt_recovery(self, timeout_s: float = 10.0) -> bool:
        """Recover the group, the only way JAX allows: by restarting every process.

        Returns True at once if the group is healthy after all. Otherwise it does not
        return: it flushes the logs and exits with ``RESTART_EXIT_CODE`` (75), which
        ``scripts/launch.py`` answers by stopping the rest of the group and starting it
        again (on Kubernetes a JobSet's failurePolicy does the same; under SLURM, resubmit
        or ``srun --kill-on-bad-exit``). A process group cannot be re-formed inside a
        running JAX process, and the survivors of a lost peer are blocked in its collectives.
        """
        if self.check_health(timeout_s):
            log.info("attempt_recovery: the group is healthy, nothing to do")
            return True
        launched = os.environ.get(ENV_LAUNCHED) == "1"
        log.error("attempt_recovery: the group is broken; exiting with code %d so that %s restarts the whole group",
                  RESTART_EXIT_CODE, "the launcher" if launched else "your supervisor")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(RESTART_EXIT_CODE)  # no atexit: JAX's orderly shutdown would wait for the lost peer

    def cleanup(self) -> None:
        """Leave the group in order (every process should call it). Skipped after a failed
        health check: the orderly shutdown would wait for the lost peer."""
        if not self._multi():
            return
        if self._stuck is not None and self._stuck.is_alive():
            log.warning("cleanup: skipped the orderly shutdown: the group is broken (a health check never returned)")
            return
        jax.distributed.shutdown()
        self.spec = None

    def get_performance_stats(self) -> dict[str, Any]:
        """Uptime, failure count and the health all-reduce's timings (ms and, as the guide
        reads them, seconds under ``communication_time``)."""
        ms = self._health_ms
        mean = sum(ms) / len(ms) if ms else None
        return {
            "rank": self.get_rank(),
            "world_size": self.get_world_size(),
            "devices": jax.device_count(),
            "uptime_seconds": time.monotonic() - self._started,
            "failure_count": self._failures,
            "collective_ms": {"count": len(ms), "last": ms[-1] if ms else None, "mean": mean},
            "communication_time": {"count": len(ms), "last": ms[-1] / 1e3 if ms else None,
                                   "mean": mean / 1e3 if ms else None},
        }
