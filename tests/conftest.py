"""Test set-up: 8 simulated CPU devices (set before jax is imported) and tiny random
Hugging Face models, built and saved locally, as the oracle."""

from __future__ import annotations

import os

# XLA's backend (LLVM) at -O0: the tiny test models run in microseconds and compiling them
# is most of the suite's time (-O0 cuts the suite by a fifth); the HLO passes and fusion
# are -O2's, the numbers agree with it to float32 rounding (no fast-math either way), and
# every parity test holds at both; subprocesses keep it (mp_helpers.user_env)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RYZEN_JAX_COMPILE_CACHE", "off")  # tests compile from scratch and leave ~/.cache alone
# the CPU kernels build once for the session, whatever $RYZEN_JAX_CACHE a test's subprocess gets
os.environ.setdefault("RYZEN_JAX_KERNEL_DIR", os.path.join(
    os.environ.get("RYZEN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ryzen_jax"), "kernels"))

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


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
