"""ryzen_jax: tensor-parallel LLM inference in JAX.

A Hugging Face checkpoint is converted once into a sharded Orbax checkpoint (or read
straight from its safetensors), laid over a ``(data, model)`` device mesh with heads
and MLP columns split across devices, and run as one SPMD program.
"""

import importlib.metadata

from ryzen_jax.api import LoadedModel, embed, generate, load_model, stream
from ryzen_jax.checkpoint.convert import convert_hf
from ryzen_jax.checkpoint.loader import DistributedCheckpointLoader
from ryzen_jax.config import ModelConfig
from ryzen_jax.engine.generate import Generator
from ryzen_jax.engine.request import Completion, GenerationResult, Request, StreamDelta
from ryzen_jax.engine.sampling import SamplingError, SamplingParams
from ryzen_jax.engine.structured import StructuredOutput, StructuredOutputError
from ryzen_jax.layers import ColumnParallelLinear, RowParallelLinear
from ryzen_jax.sharding import LOGICAL_RULES, TensorParallelConfig, create_tensor_parallel_config, make_mesh

try:
    __version__ = importlib.metadata.version("ryzen_jax")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LoadedModel", "embed", "generate", "load_model", "stream", "Completion", "GenerationResult", "Generator", "Request",
    "StreamDelta", "SamplingError", "convert_hf", "DistributedCheckpointLoader", "ModelConfig",
    "SamplingParams", "StructuredOutput", "StructuredOutputError", "ColumnParallelLinear", "RowParallelLinear", "LOGICAL_RULES", "TensorParallelConfig",
    "create_tensor_parallel_config", "make_mesh",
]
