"""Process start-up for the command-line tools: simulated CPU devices and logging.

``setup_host_devices`` must run before jax initialises its backends (the first
``jax.devices()`` or computation): XLA reads its flags once.
On a machine with no accelerator it gives the CPU ``n`` simulated devices so the
tensor-parallel path is exercised everywhere; on GPU machines the flag is inert.
"""

from __future__ import annotations

import logging
import os
import sys

CPU_DEVICES = 4


def cache_root() -> str:
    """Where ryzen_jax keeps generated artefacts: $RYZEN_JAX_CACHE or ~/.cache/ryzen_jax."""
    return os.environ.get("RYZEN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ryzen_jax")


def setup_host_devices(n: int = CPU_DEVICES) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines carry the JAX process index so multi-process output says who wrote it."""
    import jax

    rank = jax.process_index()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
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
