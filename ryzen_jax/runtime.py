"""Process start-up for the command-line tools: simulated CPU devices, the process
group, logging.

``setup_host_devices`` must run before jax initialises its backends (the first
``jax.devices()`` or computation): XLA reads its flags once.
On a machine with no accelerator it gives the CPU ``n`` simulated devices so the
tensor-parallel path is exercised everywhere; on GPU machines the flag is inert.
Under ``scripts/launch.py``, torchrun, ``srun`` or ``mpirun`` it also joins the
process group (``init_distributed``), so every script runs there unchanged; scripts
print results only where ``is_main_process()``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ryzen_jax.distributed import MultiGPUOrchestrator

CPU_DEVICES = 4

_HEARTBEAT = None  # the launcher heartbeat thread, once started
_ORCHESTRATOR = None  # this process's MultiGPUOrchestrator, once the group is formed


def cache_root() -> str:
    """Where ryzen_jax keeps generated artefacts: $RYZEN_JAX_CACHE or ~/.cache/ryzen_jax."""
    return os.environ.get("RYZEN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ryzen_jax")


def setup_host_devices(n: int = CPU_DEVICES, *, distributed: bool = True) -> None:
    """Give the CPU ``n`` simulated devices (unless XLA_FLAGS, e.g. the launcher's
    ``--devices-per-proc``, already says how many), then, with ``distributed``, join
    the process group if this process is one of several (``init_distributed``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    from ryzen_jax.launcher import start_heartbeat

    global _HEARTBEAT
    if _HEARTBEAT is None:
        _HEARTBEAT = start_heartbeat()  # no-op outside scripts/launch.py
    if distributed:
        init_distributed()


def init_distributed() -> MultiGPUOrchestrator | None:
    """Join the process group described by the environment (launcher/torchrun variables,
    SLURM, Open MPI) and return the ``MultiGPUOrchestrator``; None for a lone process.
    Idempotent; must run before the first JAX computation."""
    global _ORCHESTRATOR
    from ryzen_jax.distributed import MultiGPUOrchestrator, detect_cluster

    if _ORCHESTRATOR is None and detect_cluster().multi_process:
        orchestrator = MultiGPUOrchestrator()
        orchestrator.initialize()
        _ORCHESTRATOR = orchestrator
    return _ORCHESTRATOR


def process_index() -> int:
    """This process's rank: JAX's once the group is formed, else the launcher's/cluster's."""
    import jax

    if jax.distributed.is_initialized():
        return jax.process_index()
    from ryzen_jax.distributed import detect_cluster

    return detect_cluster().process_id or 0


def is_main_process() -> bool:
    """True in process 0 (and in a lone process): the one that prints results."""
    return process_index() == 0


def wait_for_all(name: str, timeout_s: float = 300.0) -> None:
    """Wait until every process of the group reaches this point (a no-op in one process):
    the orchestrator's barrier, with its timeout, when this process formed the group
    through ``init_distributed``; else a device-level sync (no timeout)."""
    import jax

    if jax.process_count() == 1:
        return
    if _ORCHESTRATOR is not None:
        _ORCHESTRATOR.barrier(name, timeout_s)
    else:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def add_mesh_args(ap) -> None:
    """The mesh and precision flags every model-running CLI takes: --tp, --dp, --dtype
    (vLLM's spellings too: --tensor-parallel-size, --data-parallel-size)."""
    ap.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=None,
                    help="tensor-parallel size (default: all devices the model allows; 1 on CPU in one process, "
                         "whose simulated devices share its cores)")
    ap.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1, help="data-parallel size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on GPU, float32 on CPU")


def progress_printer(json_mode: bool):
    """``print`` for a CLI's progress lines: on stderr when stdout carries JSON, and on
    process 0 only (the others stay quiet, their logs are rank-tagged)."""
    if not is_main_process():
        return lambda *a, **k: None
    return (lambda *a, **k: print(*a, **k, file=sys.stderr)) if json_mode else print


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines carry the process rank so multi-process output says who wrote it
    (under scripts/launch.py the launcher prefixes every line with it already)."""
    from ryzen_jax.launcher import ENV_LAUNCHED

    tag = "" if os.environ.get(ENV_LAUNCHED) == "1" else f"[rank {process_index()}] "
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"{tag}%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache so a second start skips compiling.

    Default directory: ``$RYZEN_JAX_CACHE/xla`` (``~/.cache/ryzen_jax/xla``);
    ``RYZEN_JAX_COMPILE_CACHE=off`` disables it. Returns the directory in use.
    """
    import jax

    setting = directory or os.environ.get("RYZEN_JAX_COMPILE_CACHE")
    if setting == "off":
        return None
    path = setting or os.path.join(cache_root(), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
