"""Benchmarks: our engine against the machine's floors and against Hugging Face
transformers, offline (``DistributedInferenceBenchmark``) and against a running
server (``serving``). ``scripts/benchmark.py`` is the command line.

One module per job: ``shapes`` (presets, random-weight checkpoints), ``config``
(``BenchmarkConfig``), ``hardware`` (bandwidth, matmul rate), ``offline`` (our engine),
``peer`` (transformers), ``comm`` (collectives of the compiled step), ``suite`` (the
whole offline run), ``serving`` (load generator), ``report`` (JSON, table, plots).
"""

from ryzen_jax.bench.config import BenchmarkConfig, BenchmarkConfigError
from ryzen_jax.bench.shapes import PRESETS, ShapeError
from ryzen_jax.bench.suite import BenchmarkResults, DistributedInferenceBenchmark

__all__ = ["BenchmarkConfig", "BenchmarkConfigError", "BenchmarkResults", "DistributedInferenceBenchmark", "PRESETS",
           "ShapeError"]
