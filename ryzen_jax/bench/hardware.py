"""The machine's two floors, measured in the same run as the model: memory bandwidth
(bytes a decode step must move ÷ this = the fastest possible step) and the matmul
FLOP rate (FLOPs ÷ this = the compute floor).

Each figure is the best of a few repetitions: a capability, not an average. On CPU
the bandwidth is the highest of a NumPy copy and XLA's own streaming reads (a sum and
a matrix-vector product, the decode step's pattern) and our CPU kernel's
matrix-vector read (``ryzen_jax.kernels``), over arrays far larger than the caches;
on an accelerator, XLA's reads and copies on one device.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ryzen_jax import kernels


@dataclasses.dataclass
class Hardware:
    """What the run was measured on, and its floors."""

    backend: str
    device_kind: str
    devices: int  # in the whole run, every process's
    processes: int  # JAX processes in the run (1 unless under a launcher, srun or mpirun)
    cpu_count: int
    cpu_model: str
    bandwidth_gbps: float  # the best of the methods below: the floor's denominator
    bandwidth_by_method: dict[str, float]
    matmul_gflops: float
    matmul_n: int
    shared_memory: bool  # devices share one memory system (CPU): the floor counts every device's bytes
    load_average: tuple[float, float, float] | None  # other work on the machine while it ran


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: compile, first touch of the pages
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(megabytes: int = 256, repeats: int = 5, device: jax.Device | None = None) -> dict[str, float]:
    """Streaming bandwidth in GB/s (10^9 bytes/s) by method: a copy counts its read and
    its write, a reduction or a matrix-vector product its read. ``device``: default this
    process's first."""
    device = device or jax.local_devices()[0]
    n = megabytes * 2**20 // 4
    out: dict[str, float] = {}
    if device.platform == "cpu":
        a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
        b = np.empty_like(a)
        b.fill(0)  # touch every page before timing
        out["numpy_copy"] = 2 * a.nbytes / _best_time(lambda: np.copyto(b, a), repeats) / 1e9
        del b
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32), device)
    total = jax.jit(jnp.sum)
    out["xla_sum"] = x.nbytes / _best_time(lambda: total(x), repeats) / 1e9
    w = x.reshape(-1, 1024)
    v = jax.device_put(jnp.ones((1, w.shape[0]), jnp.float32), device)
    gemv = jax.jit(lambda v, w: v @ w)
    out["xla_gemv"] = w.nbytes / _best_time(lambda: gemv(v, w), repeats) / 1e9
    if device.platform == "cpu" and kernels.register():
        # our decode kernel's own read of a weight (one row of x): it streams faster
        # than the methods above, so without it a decode step could beat its "floor"
        stream, row = jax.jit(kernels.skinny_matmul), jnp.ones((1, w.shape[1]), jnp.float32)
        out["ryzen_jax_gemv"] = w.nbytes / _best_time(lambda: stream(row, w), repeats) / 1e9
        # and of a bfloat16 weight of the same bytes, which its AVX512_BF16 loop reads faster still
        w16, row16 = jnp.ones((w.shape[0], 2 * w.shape[1]), jnp.bfloat16), jnp.ones((1, 2 * w.shape[1]), jnp.bfloat16)
        out["ryzen_jax_gemv_bf16"] = w16.nbytes / _best_time(lambda: stream(row16, w16), repeats) / 1e9
        del w16
    if device.platform != "cpu":
        scale = jax.jit(lambda x: x * 2)
        out["xla_copy"] = 2 * x.nbytes / _best_time(lambda: scale(x), repeats) / 1e9
    return out


def measure_matmul(n: int = 1024, dtype: str = "float32", repeats: int = 5, device: jax.Device | None = None) -> float:
    """GFLOP/s of an n×n by n×n matrix product on one device, at the precision the
    models ask for (``kernels.dot_precision``: float32 in float32, not TensorFloat-32).
    ``device``: default this process's first."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=kernels.dot_precision(a, b)))
    return 2 * n**3 / _best_time(lambda: mm(a, a), repeats) / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(dtype: str = "float32", *, megabytes: int = 256, repeats: int = 5) -> Hardware:
    """Describe the machine and measure its bandwidth and matmul floors on this process's
    first device (in a run of several processes each measures its own host; the report
    is process 0's)."""
    dev = jax.local_devices()[0]
    bw = measure_bandwidth(megabytes, repeats, dev)
    n = 1024 if dev.platform == "cpu" else 8192  # an accelerator's peak needs far larger products
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return Hardware(backend=jax.default_backend(), device_kind=dev.device_kind, devices=len(jax.devices()),
                    processes=jax.process_count(), cpu_count=os.cpu_count() or 1, cpu_model=_cpu_model(), bandwidth_gbps=max(bw.values()),
                    bandwidth_by_method=bw, matmul_gflops=measure_matmul(n, dtype, repeats, dev), matmul_n=n,
                    shared_memory=dev.platform == "cpu", load_average=load)
