"""The embedded default demo model: a tiny Llama checkpoint built locally, on demand.

``scripts/generate.py`` uses it when no ``--model`` is given, so that a fresh checkout
can run the whole path (HF directory -> config -> tokenizer -> safetensors -> sharded
parameters -> generation) with no download, no model hub and no network.

The directory written here is an ordinary Hugging Face Llama checkpoint: ``config.json``,
``generation_config.json``, ``model.safetensors`` (float32, HF tensor names and PyTorch
``(out_features, in_features)`` layout) and a tokenizer that ``AutoTokenizer`` loads.

The weights are seeded random numbers, not a trained model: the generated text is
gibberish. The tokenizer, by contrast, is real: a byte-level BPE trained on the short
corpus below, so any text (multi-byte UTF-8 included) round-trips. Everything is
deterministic for a given seed, and PyTorch is not needed (nor imported here).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Iterator

import ml_dtypes
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from ryzen_jax.checkpoint.safetensors_io import write_safetensors

VOCAB_SIZE = 512
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 688
NUM_LAYERS = 4
NUM_HEADS = 8
NUM_KV_HEADS = 4
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 1024
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1


@dataclasses.dataclass(frozen=True)
class LlamaDims:
    """The sizes of a Llama-architecture checkpoint: the demo's by default; the
    benchmark (``ryzen_jax.bench.shapes``) writes others with the same helpers."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = HIDDEN_SIZE
    intermediate_size: int = INTERMEDIATE_SIZE
    num_layers: int = NUM_LAYERS
    num_heads: int = NUM_HEADS
    num_kv_heads: int = NUM_KV_HEADS
    max_positions: int = MAX_POSITIONS

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


DEMO_DIMS = LlamaDims()

# Training text for the tokenizer (original prose). Its only job is to give BPE enough
# English to learn a few hundred merges; the model itself never sees it.
CORPUS = """\
The morning started grey and still over the harbour. By nine the wind had turned to the
west, and the low clouds began to break apart into long bright strips. People walking to
work kept their coats buttoned, because a clear sky in early spring usually means a cold
afternoon. The forecast promised rain by evening, and for once the forecast was right.

A weather forecast is itself a small piece of distributed computing. Thousands of stations
measure temperature, pressure and humidity every few minutes, and each one sends its
readings to a central service. That service does not trust any single number. It compares
neighbours, throws away values that disagree with everything around them, and fills the
gaps with estimates. Only then does the real work begin: a large simulation that divides
the atmosphere into a grid of cells and steps the whole grid forward in time.

No single machine is fast enough to run that simulation alone, so the grid is split into
pieces, and each piece is given to a different computer. Every computer advances its own
cells, then talks to its neighbours to exchange the values along the shared borders. If
one of them is slow, all of them wait. The art of the job is to keep the pieces the same
size, to keep the messages short, and to overlap talking with computing whenever possible.

Language models are served in much the same way. The weights of a large model do not fit
on one device, so each layer is cut into slices, and every device holds one slice of every
layer. When a new token arrives, each device multiplies its slice, the partial results are
summed across the group, and the next layer starts. The network between the devices
matters as much as the arithmetic inside them: a fast chip that waits for its neighbours
is only as fast as the slowest link in the chain.

By late afternoon the rain had arrived, first as a few heavy drops on the windows and then
as a steady curtain that hid the hills across the water. The streets emptied. In the
office, someone restarted a long training run that had stopped overnight, checked that the
loss was falling again, and went home. The machines kept working through the storm, quiet
and patient, passing numbers back and forth until the sky cleared the next morning.

Good systems are built from simple rules that everyone follows. Write the data before you
announce it. Never rename a file until it is complete. Measure before you optimise, and
measure again afterwards. Keep a copy of anything you cannot rebuild, and make sure that
everything you can rebuild really can be rebuilt, from nothing, on a machine that has never
seen it before. That last rule is why this small model exists at all.
"""


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE trained on ``CORPUS``; ``<s>``/``</s>`` are ids 0/1 and ``<s>`` is prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.token_to_id(BOS) != BOS_ID or tok.token_to_id(EOS) != EOS_ID:
        raise RuntimeError("tokenizer training did not place <s>/</s> at ids 0/1")
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, more than {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str) -> None:
    """Wrap in ``PreTrainedTokenizerFast`` and write the HF tokenizer files."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    fast.save_pretrained(out_dir)


def save_configs(out_dir: str, dims: LlamaDims = DEMO_DIMS, dtype: str = "float32") -> None:
    """Write ``config.json`` and ``generation_config.json`` through transformers."""
    from transformers import GenerationConfig, LlamaConfig

    LlamaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        max_position_embeddings=dims.max_positions,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype=dtype,
    ).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID).save_pretrained(out_dir)


def weight_shapes(dims: LlamaDims = DEMO_DIMS) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names -> shapes, in a fixed order (the order random numbers are drawn)."""
    e, f, v = dims.hidden_size, dims.intermediate_size, dims.vocab_size
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, e)}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q, e)
        shapes[p + "self_attn.k_proj.weight"] = (kv, e)
        shapes[p + "self_attn.v_proj.weight"] = (kv, e)
        shapes[p + "self_attn.o_proj.weight"] = (e, q)
        shapes[p + "mlp.gate_proj.weight"] = (f, e)
        shapes[p + "mlp.up_proj.weight"] = (f, e)
        shapes[p + "mlp.down_proj.weight"] = (e, f)
        shapes[p + "input_layernorm.weight"] = (e,)
        shapes[p + "post_attention_layernorm.weight"] = (e,)
    shapes["model.norm.weight"] = (e,)
    shapes["lm_head.weight"] = (v, e)
    return shapes


#: the dtypes a random checkpoint may be written in
CHECKPOINT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def random_weights(seed: int, dims: LlamaDims = DEMO_DIMS,
                   dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Seeded weights, one tensor at a time, in ``weight_shapes`` order: embedding
    ~ N(0, 1), linear ~ N(0, 1/fan_in), norms = 1; drawn in float32 and, for bfloat16,
    rounded to nearest, so both dtypes hold the same model."""
    rng = np.random.default_rng(seed)
    for name, shape in weight_shapes(dims).items():
        if len(shape) == 1:
            w = np.ones(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1.0 if name == "model.embed_tokens.weight" else 1.0 / np.sqrt(shape[1]))
        yield name, w.astype(CHECKPOINT_DTYPES[dtype], copy=False)


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def write_demo_hf_checkpoint(out_dir: str, *, seed: int = 0) -> str:
    """Write a small Llama-architecture Hugging Face model directory with seeded random weights and a locally trained tokenizer; return out_dir."""
    return write_hf_checkpoint(out_dir, DEMO_DIMS, seed=seed, tokenizer=True)


def write_hf_checkpoint(out_dir: str, dims: LlamaDims, *, seed: int = 0, tokenizer: bool = False,
                        dtype: str = "float32", progress: bool = False) -> str:
    """Write a Llama-architecture Hugging Face model directory of size ``dims`` with
    seeded random weights in ``dtype`` (float32 or bfloat16; and, with ``tokenizer``,
    the locally trained tokenizer), atomically and one tensor at a time (``progress``:
    a bar of them on stderr); an existing complete directory is kept. Returns out_dir."""
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r}: expected one of {sorted(CHECKPOINT_DTYPES)}")
    if _is_complete(out_dir):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".demo-tmp-")
    try:
        if tokenizer:
            save_tokenizer(train_tokenizer(), tmp)
        save_configs(tmp, dims, dtype)
        specs = {name: (CHECKPOINT_DTYPES[dtype], shape) for name, shape in weight_shapes(dims).items()}
        tensors = tqdm(random_weights(seed, dims, dtype), total=len(specs), desc=f"writing {dtype} weights",
                       unit="tensor", disable=not progress, leave=False)
        write_safetensors(os.path.join(tmp, "model.safetensors"), specs, tensors, metadata={"format": "pt"})
        _make_readable(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _make_readable(path: str) -> None:
    """``mkdtemp`` makes a private (0700) directory; the result is an ordinary, world-readable one."""
    os.chmod(path, 0o755)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o644)


def _publish(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` (an empty ``out_dir`` is replaced)."""
    try:
        os.replace(tmp, out_dir)
    except OSError as err:
        if _is_complete(out_dir):  # another process finished first: keep its copy
            return
        raise RuntimeError(
            f"cannot write the demo model to {out_dir!r}: it exists, is not empty and has no config.json"
        ) from err


DEMO_NAME = "demo-llama-v3"  # bump with the checkpoint format


def ensure_demo_model(root: str | None = None) -> str:
    """The converted demo checkpoint, built on first use through the same HF → Orbax
    path a user's checkpoint takes, then reused."""
    from ryzen_jax.checkpoint import orbax_io
    from ryzen_jax.checkpoint.convert import convert_hf
    from ryzen_jax.runtime import cache_root

    root = root or cache_root()
    out = os.path.join(root, DEMO_NAME)
    if orbax_io.is_converted(out):
        return out
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".demo-hf-") as tmp:
        hf_dir = write_demo_hf_checkpoint(os.path.join(tmp, "hf"))
        try:
            convert_hf(hf_dir, out, progress=False)
        except (FileExistsError, OSError):
            if not orbax_io.is_converted(out):  # another process did not finish it either
                raise
    return out
