"""Test set-up: 8 simulated CPU devices (set before jax is imported) and tiny random
Hugging Face models, built and saved locally, as the oracle."""

from __future__ import annotations

import os
import shutil
import tempfile

# XLA's backend (LLVM) at -O0: the tiny test models run in microseconds and compiling them
# is most of the suite's time (-O0 cuts the suite by a fifth); the HLO passes and fusion
# are -O2's, the numbers agree with it to float32 rounding (no fast-math either way), and
# every parity test holds at both; subprocesses keep it (mp_helpers.user_env). XLA:CPU's
# older elemental emitters, not its MLIR fusion emitters, compile the same fusions in about
# half the time (a tiny Llama's warm-up: 9-10 s of backend compile, against 16-18 s)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the run, in a temporary directory (~/.cache is left
# alone): made by the first process to import this file, inherited by the xdist workers and
# every script a test starts, so a program the suite has compiled once (the same tiny model
# on the same mesh, in another file or another process) is read back instead of compiled
# again; a size limit turns on JAX's file lock, so the processes never read a half-written
# entry. Removed at the end by the process that made it.
_OWN_COMPILE_CACHE = None
if "RYZEN_JAX_COMPILE_CACHE" not in os.environ:
    _OWN_COMPILE_CACHE = os.environ["RYZEN_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="ryzen_jax-test-xla-")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
# the CPU kernels build once for the session, whatever $RYZEN_JAX_CACHE a test's subprocess gets
os.environ.setdefault("RYZEN_JAX_KERNEL_DIR", os.path.join(
    os.environ.get("RYZEN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ryzen_jax"), "kernels"))

import jax  # noqa: E402
import pytest  # noqa: E402

from ryzen_jax.runtime import enable_compilation_cache  # noqa: E402
from tests import hf_models  # noqa: E402

enable_compilation_cache()  # this process's own programs too, not only those rj.load_model compiles


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Build (once per session) and return the directory of a named tiny HF model."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = hf_models.build(name, str(tmp_path_factory.mktemp(name)))
        return built[name]

    return get


def pytest_report_header(config):
    return f"jax {jax.__version__}, {len(jax.devices())} {jax.default_backend()} devices"


def pytest_unconfigure(config):
    if _OWN_COMPILE_CACHE:  # None in the xdist workers, which inherit the directory
        shutil.rmtree(_OWN_COMPILE_CACHE, ignore_errors=True)
