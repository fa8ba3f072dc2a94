"""The Python API: load a model onto a mesh, generate for a batch, stream a request.

    import ryzen_jax as rj
    lm = rj.load_model("path/to/model", tp=4)
    for c in rj.generate(lm, ["Hello", "Bonjour"], max_new_tokens=32):
        print(c.text, c.finish_reason)
    for delta in rj.stream(lm, "Once upon a time", max_new_tokens=64, stop=["\n\n"]):
        print(delta.text, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ryzen_jax import kernels
from ryzen_jax.checkpoint.loader import DistributedCheckpointLoader
from ryzen_jax.config import ModelConfig
from ryzen_jax.engine.embed import Encoder, model_pooling
from ryzen_jax.engine.generate import Generator, resolve_max_seq_len
from ryzen_jax.engine.request import Completion, GenerationResult, Request, StreamDelta
from ryzen_jax.engine.sampling import SamplingParams
from ryzen_jax.engine.structured import StructuredOutput
from ryzen_jax.runtime import enable_compilation_cache
from ryzen_jax.sharding import ShardingError, TensorParallelConfig, check_holds_this_process

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """A model on its mesh, with its tokenizer and what runs it: the generator of a
    generative model, or the encoder of an encoder-only one (BERT) or of a decoder-only
    one loaded for embeddings."""

    config: ModelConfig
    tp: TensorParallelConfig
    generator: Generator | None
    tokenizer: Any
    load_s: float
    path: str
    bytes_read: int  # checkpoint bytes this process read (its own slices only)
    encoder: Encoder | None = None

    def summary(self) -> str:
        """One line for a CLI: what was loaded, how fast, on which mesh and dtype."""
        runner = self.generator if self.generator is not None else self.encoder
        return (f"loaded {self.config.model_type} in {self.load_s:.1f}s on mesh data={self.tp.dp_size} x "
                f"model={self.tp.tp_size} ({jax.default_backend()}, {runner.dtype})")


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on CPU: there float32 is what matches Hugging
    Face's float32 to 1e-4, and XLA:CPU's bfloat16 prefill is slower (bfloat16 halves
    the weights' memory and, on our CPU kernels, decodes faster: README, Benchmarks)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def choose_tp(cfg: ModelConfig, n_devices: int) -> int:
    """The largest tp ≤ n_devices that splits the model's heads and MLP evenly."""
    for tp in range(n_devices, 0, -1):
        try:
            TensorParallelConfig(tp_size=tp).validate(
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
        except ShardingError:
            continue
        return tp
    return 1


def default_tp(cfg: ModelConfig, n_devices: int) -> int:
    """tp when the caller names none. On CPU in a single process, 1: its simulated
    devices share the process's cores, so a split only adds collectives and gives up our
    CPU decode kernels (the small benchmark shape: tp=4 at 0.71x tp=1's tokens/s; the demo
    model about 6x slower). Otherwise the largest split the devices allow (``choose_tp``)."""
    if jax.default_backend() == "cpu" and jax.process_count() == 1:
        return 1
    return choose_tp(cfg, n_devices)


def load_tokenizer(path: str):
    """The model directory's Hugging Face tokenizer (None when it has none)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


TASKS = ("auto", "generate", "embed")


def load_model(path: str, *, tp: int | None = None, dp: int = 1, dtype: str | None = None,
               max_seq_len: int | None = None, warmup: bool = False, progress: bool = True,
               devices: Sequence[jax.Device] | None = None, task: str = "auto") -> LoadedModel:
    """Load an HF directory or a converted checkpoint onto a (dp × tp) mesh.

    ``tp`` defaults to the largest split of the visible devices that the model allows,
    except on CPU in one process, where it is 1 (``default_tp``); ``dtype`` to bfloat16
    on accelerators and float32 on CPU. ``max_seq_len`` bounds prompt + generated tokens
    (default: the model's context, at most 2048) and fixes the cache size. ``warmup``
    compiles every prompt-length bucket at batch 1 now, so no single request compiles
    later. JAX's persistent compilation cache is turned on
    (``$RYZEN_JAX_CACHE/xla``; ``RYZEN_JAX_COMPILE_CACHE=DIR|off``) unless the caller
    already configured one, so a second start skips compiling. ``devices``: the mesh's
    devices, in order (default: every visible one, which in a run of several processes
    spans them all; this process's own, ``jax.local_devices()``, gives it a model of its
    own that no other process takes part in). ``task`` (vLLM's): "generate" (text),
    "embed" (vectors: ``rj.embed``; a decoder-only model pools its last token and
    normalizes unless its sentence-transformers ``modules.json`` says otherwise, as
    vLLM does, and ``max_seq_len`` bounds its inputs), or "auto": embed for an
    encoder-only model (BERT), else generate.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if jax.config.jax_compilation_cache_dir is None:  # on by default, as in the CLIs
        enable_compilation_cache()
    tokenizer = load_tokenizer(path)  # before the clock: load_s measures the weights
    t0 = time.perf_counter()
    loader = DistributedCheckpointLoader(path, progress=progress)
    cfg = loader.config
    embed = task == "embed" or (task == "auto" and cfg.is_encoder)
    if cfg.is_encoder and not embed:
        raise ValueError(f"{path} holds a {cfg.model_type} encoder, which does not generate text: load it with "
                         "task='embed' (or 'auto')")
    if embed and cfg.is_encoder_decoder:
        raise ValueError(f"task='embed' takes an encoder-only or decoder-only model; {path} holds a "
                         f"{cfg.model_type} encoder-decoder")
    if embed and not cfg.is_encoder and not cfg.tie_word_embeddings:
        # embeddings never reach the LM head: leave it unread (an embedding checkpoint often has none)
        cfg = loader.config = dataclasses.replace(cfg, tie_word_embeddings=True)
    n = len(jax.devices() if devices is None else devices)
    if tp is None:
        tp = default_tp(cfg, max(1, n // dp))
    tp_cfg = TensorParallelConfig(tp_size=tp, dp_size=dp, devices=None if devices is None else tuple(devices))
    # An unsplittable model or too few devices fails here, before the loader reads a weight.
    tp_cfg.validate(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
    check_holds_this_process(tp_cfg.mesh, n)
    resolve_max_seq_len(cfg, max_seq_len)
    dtype = jnp.dtype(dtype or default_dtype())
    mesh_devices = tp_cfg.mesh.devices.size
    if dtype == jnp.bfloat16 and kernels.widens_bfloat16(jax.default_backend(), mesh_devices):
        fix = ("load it with tp=1 and dp=1, where our CPU kernels read bfloat16 as it lies, or in float32"
               if mesh_devices > 1 else "our CPU kernels are unavailable (the warning above says why); float32 avoids it")
        log.warning("bfloat16 on %d CPU device(s): XLA:CPU's dot widens every weight to float32 and the decode loop "
                    "holds those copies (about twice the weights' bytes more memory, and several times slower than "
                    "our kernels on one device); %s", mesh_devices, fix)
    model = loader.load(tp_cfg, dtype)
    encoder = None
    if embed:  # pooled as a sentence-transformers directory asks (else vLLM's default); no generation
        pooling, normalize = model_pooling(path, ("mean", False) if cfg.is_encoder else ("last", True))
        encoder = Encoder(model, tp_cfg, pooling=pooling, normalize=normalize,
                          max_len=None if cfg.is_encoder else resolve_max_seq_len(cfg, max_seq_len))
    generator = None if encoder else Generator(model, tp_cfg, tokenizer=tokenizer, max_seq_len=max_seq_len)
    if warmup and generator is not None:
        generator.warmup()
    return LoadedModel(config=cfg, tp=tp_cfg, generator=generator, tokenizer=tokenizer,
                       load_s=time.perf_counter() - t0, path=path, bytes_read=loader.bytes_read, encoder=encoder)


def encode(lm: LoadedModel, text: str) -> list[int]:
    """Token ids of ``text`` with the model's tokenizer (special tokens as the tokenizer adds them)."""
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer: pass token ids instead of text")
    return list(lm.tokenizer(text)["input_ids"])


def _generator(lm: LoadedModel) -> Generator:
    if lm.generator is None:
        kind = "encoder" if lm.config.is_encoder else "model, with task='embed'"
        raise ValueError(f"{lm.path} was loaded for embeddings (a {lm.config.model_type} {kind}), which does not "
                         "generate text: use rj.embed, or load it with task='generate'")
    return lm.generator


def requests(lm: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), stop: Sequence[str] = (),
             stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
             include_stop_str: bool = False,
             structured: StructuredOutput | Sequence[StructuredOutput | None] | None = None) -> list[Request]:
    """The engine Requests for prompts (strings are tokenized), as ``generate`` builds them."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        raise TypeError("prompts must be a list of strings or of token-id lists; wrap a single prompt in a list")
    specs = list(structured) if isinstance(structured, (list, tuple)) else [structured] * len(prompts)
    if len(specs) != len(prompts):
        raise ValueError(f"got {len(specs)} structured outputs for {len(prompts)} prompts")
    if not all(s is None or isinstance(s, StructuredOutput) for s in specs):
        raise TypeError("structured takes a StructuredOutput (or one per prompt, None for none), e.g. "
                        "rj.StructuredOutput(json=schema)")
    ids = [encode(lm, p) if isinstance(p, str) else list(p) for p in prompts]
    grammars = {id(s): s.compile() for s in specs if s is not None}  # each spec compiled once
    return [dataclasses.replace(r, grammar=grammars[id(s)] if s is not None else None)
            for r, s in zip(_generator(lm).requests(ids, max_new_tokens, sampling, stop_token_ids=stop_token_ids or (),
                                                    stop=stop, ignore_eos=ignore_eos,
                                                    include_stop_str=include_stop_str), specs)]


def generate(lm: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), stop: Sequence[str] = (),
             stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
             include_stop_str: bool = False,
             structured: StructuredOutput | Sequence[StructuredOutput | None] | None = None,
             return_result: bool = False) -> list[Completion] | tuple[list[Completion], GenerationResult]:
    """Generate for a batch of prompts (strings, or token-id lists), each with its own
    SamplingParams if a list is given. Stops at the model's EOS ids, at
    ``stop_token_ids`` (in addition to EOS; ``ignore_eos`` drops EOS) and at ``stop``
    strings (text cut before, or after with ``include_stop_str``). ``structured``
    holds every output to a JSON schema, regex, choice list or grammar
    (``rj.StructuredOutput``; or a list, one per prompt, None for a free one); such an
    output ends once it is complete.

    Returns one Completion per prompt (``prompt_ids``, ``generated_ids``, ``text``,
    ``finish_reason``); with ``return_result`` also the GenerationResult (timings).
    """
    result: GenerationResult = GenerationResult(completions=[])
    batch = requests(lm, prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                     stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, include_stop_str=include_stop_str,
                     structured=structured)
    for _ in _generator(lm).run(batch, stats=result):
        pass
    return (result.completions, result) if return_result else result.completions


def stream(lm: LoadedModel, prompt: str | Sequence[int], *, max_new_tokens: int = 32,
           sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
           stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
           include_stop_str: bool = False, structured: StructuredOutput | None = None) -> Iterator[StreamDelta]:
    """Stream one request: yields a StreamDelta (new token ids and text) per generated
    token. The text deltas never split a character and join to the final text."""
    one = requests(lm, [prompt], max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                   stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, include_stop_str=include_stop_str,
                   structured=structured)
    for deltas in _generator(lm).run(one, steps_per_dispatch=1):
        yield from deltas


def embed(lm: LoadedModel, texts: Sequence[str] | Sequence[Sequence[int]], *, pooling: str | None = None,
          normalize: bool | None = None, truncate: bool = False) -> np.ndarray:
    """One embedding per text (strings, tokenized with the model's tokenizer, or
    token-id lists) from a model loaded for embeddings (an encoder-only one, or any with
    ``task="embed"``): (N, hidden) float32. ``pooling="mean"`` averages the last hidden
    states of the real tokens, ``"cls"`` takes the first token's, ``"last"`` the last
    real token's; ``normalize`` scales each to unit length. Left as None, both are what a
    sentence-transformers directory's ``modules.json`` asks for, else the model's
    default (an encoder's: mean, not normalized; a decoder's: last, normalized). A
    text longer than the model's
    positions is refused, naming it; ``truncate`` cuts it to fit instead (the tokenizer's
    truncation, which keeps the closing special token, as sentence-transformers does)."""
    if lm.encoder is None:
        raise ValueError(f"{lm.path} was loaded to generate text: load it with rj.load_model(..., task='embed') "
                         "for embeddings")
    if isinstance(texts, str) or (len(texts) and isinstance(texts[0], int)):
        raise TypeError("texts must be a list of strings or of token-id lists; wrap a single text in a list")
    limit = lm.encoder.max_len

    def ids_of(text) -> list[int]:
        if not isinstance(text, str):
            return list(text)[:limit] if truncate else list(text)
        if not truncate or lm.tokenizer is None:
            return encode(lm, text)
        return list(lm.tokenizer(text, truncation=True, max_length=limit)["input_ids"])

    return lm.encoder.embed([ids_of(t) for t in texts], pooling=pooling, normalize=normalize)
