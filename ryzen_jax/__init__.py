"""ryzen_jax: tensor-parallel LLM inference in JAX.

A Hugging Face checkpoint is converted once into a sharded Orbax checkpoint (or read
straight from its safetensors), laid over a ``(data, model)`` device mesh with heads
and MLP columns split across devices, and run as one SPMD program.
"""

from ryzen_jax.api import LoadedModel, generate, load_model
from ryzen_jax.checkpoint.convert import convert_hf
from ryzen_jax.checkpoint.loader import DistributedCheckpointLoader
from ryzen_jax.config import ModelConfig
from ryzen_jax.engine.sampling import SamplingParams
from ryzen_jax.layers import ColumnParallelLinear, RowParallelLinear
from ryzen_jax.sharding import LOGICAL_RULES, TensorParallelConfig, create_tensor_parallel_config, make_mesh

__all__ = [
    "LoadedModel", "generate", "load_model", "convert_hf", "DistributedCheckpointLoader", "ModelConfig",
    "SamplingParams", "ColumnParallelLinear", "RowParallelLinear", "LOGICAL_RULES", "TensorParallelConfig",
    "create_tensor_parallel_config", "make_mesh",
]
