"""Hugging Face names → ryzen_jax parameter paths, as lazy views.

For every parameter of our model (a dotted path such as ``layers.3.attn.wq.kernel``)
a family's table gives the HF tensor name and a transform (transpose, split the fused
head dimension) that numpy applies as a *view*: nothing is copied or read until a
slice is materialised. The result is the tp = 1 layout; ``fit_slice`` then adapts it
to a mesh (vocabulary padding, KV-head replication) one device slice at a time.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

from ryzen_jax.checkpoint.safetensors_io import CheckpointFormatError, SafetensorsReader
from ryzen_jax.config import ModelConfig

Transform = Callable[[np.ndarray], np.ndarray]
#: (HF tensor name, transform); a tuple of names reads the first one the checkpoint has
Source = tuple[str | tuple[str, ...], Transform]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _t(w: np.ndarray) -> np.ndarray:
    return w.T


def llama_sources(cfg: ModelConfig) -> dict[str, Source]:
    """Llama / Mistral / Qwen2: q/k/v (out, in) → (heads, head_dim, embed); o → (embed, heads, head_dim).
    Our kernels keep PyTorch's (out, in) orientation, so this only names the head axes.
    ``*ForCausalLM`` files prefix ``model.``; a bare ``*Model`` (an embedding model's)
    does not, and has no ``lm_head`` (it loads for embeddings only)."""
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def heads_out(n: int) -> Transform:
        return lambda w: w.reshape(n, d, e)

    def heads_bias(n: int) -> Transform:
        return lambda b: b.reshape(n, d)

    def named(rest: str) -> tuple[str, str]:
        return f"model.{rest}", rest

    out: dict[str, Source] = {
        "embed.embedding": (named("embed_tokens.weight"), _same),
        "norm.scale": (named("norm.weight"), _same),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", _same)
    for i in range(cfg.num_layers):
        ours = f"layers.{i}."
        out[ours + "attn_norm.scale"] = (named(ours + "input_layernorm.weight"), _same)
        out[ours + "mlp_norm.scale"] = (named(ours + "post_attention_layernorm.weight"), _same)
        for name, proj, n in (("wq", "q_proj", h), ("wk", "k_proj", kv), ("wv", "v_proj", kv)):
            out[ours + f"attn.{name}.kernel"] = (named(ours + f"self_attn.{proj}.weight"), heads_out(n))
            if cfg.attention_bias:
                out[ours + f"attn.{name}.bias"] = (named(ours + f"self_attn.{proj}.bias"), heads_bias(n))
        out[ours + "attn.wo.kernel"] = (named(ours + "self_attn.o_proj.weight"), lambda w: w.reshape(e, h, d))
        if cfg.o_bias:
            out[ours + "attn.wo.bias"] = (named(ours + "self_attn.o_proj.bias"), _same)
        for name, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            out[ours + f"mlp.{name}.kernel"] = (named(ours + f"mlp.{proj}.weight"), _same)
            if cfg.mlp_bias:
                out[ours + f"mlp.{name}.bias"] = (named(ours + f"mlp.{proj}.bias"), _same)
    return out


def t5_sources(cfg: ModelConfig) -> dict[str, Source]:
    """T5 (``T5ForConditionalGeneration``): one shared embedding; per stack, block 0's
    self-attention holds the relative-position bias table every layer uses. Decoder
    blocks are [self-attention, cross-attention (EncDecAttention), feed-forward],
    encoder blocks lack the cross-attention. Feed-forward: ``wi`` (ReLU) or ``wi_0``
    (gate) and ``wi_1`` (up), then ``wo``."""
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    gated = cfg.hidden_act.startswith("gated-")

    def q_k_v(w: np.ndarray) -> np.ndarray:
        return w.reshape(h, d, e)

    def o(w: np.ndarray) -> np.ndarray:
        return w.reshape(e, h, d)

    # the shared table; files whose writer dropped it as a tie keep one of its aliases
    shared = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    out: dict[str, Source] = {"shared.embedding": (shared, _same)}
    if not cfg.tie_word_embeddings:
        # transformers 5 may write an unscaled T5 without lm_head.weight: it then reuses shared.weight
        out["lm_head"] = (("lm_head.weight", *shared), _same)
    stacks = (("encoder", cfg.num_layers, ()), ("decoder", cfg.num_decoder_layers, (("cross", "EncDecAttention"),)))
    for stack, layers, cross in stacks:
        out[f"{stack}.rel_bias"] = (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", _same)
        out[f"{stack}.norm.scale"] = (f"{stack}.final_layer_norm.weight", _same)
        for i in range(layers):
            ours, hf = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            sublayers = (("attn", "SelfAttention"), *cross)
            for j, (name, hf_name) in enumerate(sublayers):
                out[ours + f"{name}_norm.scale"] = (hf + f"{j}.layer_norm.weight", _same)
                for w in ("q", "k", "v"):
                    out[ours + f"{name}.w{w}.kernel"] = (hf + f"{j}.{hf_name}.{w}.weight", q_k_v)
                out[ours + f"{name}.wo.kernel"] = (hf + f"{j}.{hf_name}.o.weight", o)
            ff = hf + f"{len(sublayers)}."
            out[ours + "mlp_norm.scale"] = (ff + "layer_norm.weight", _same)
            mlp = (("gate", "wi_0"), ("up", "wi_1")) if gated else (("up", "wi"),)
            for name, hf_name in (*mlp, ("down", "wo")):
                out[ours + f"mlp.{name}.kernel"] = (ff + f"DenseReluDense.{hf_name}.weight", _same)
    return out


def _layer_norm(ours: str, hf: Callable[[str], tuple[str, ...]], theirs: str) -> dict[str, Source]:
    """A LayerNorm's scale and bias (HF ``weight``, ``bias``)."""
    return {f"{ours}.scale": (hf(f"{theirs}.weight"), _same), f"{ours}.bias": (hf(f"{theirs}.bias"), _same)}


def gpt2_sources(cfg: ModelConfig) -> dict[str, Source]:
    """GPT-2. Its Conv1D weights are (in, out), so each is transposed to our (out, in).
    The fused ``c_attn`` (E, 3E) is [q | k | v] along the columns; each third becomes its
    own (heads, head_dim, embed) kernel, so tp splits whole heads of q, k and v rather than columns of the fused
    matrix. ``GPT2LMHeadModel`` files prefix ``transformer.``; bare ``GPT2Model`` ones do not."""
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def hf(name: str) -> tuple[str, ...]:
        return f"transformer.{name}", name

    def third(k: int) -> Transform:
        return lambda w: w[:, k * e:(k + 1) * e].T.reshape(h, d, e)

    def third_bias(k: int) -> Transform:
        return lambda b: b[k * e:(k + 1) * e].reshape(h, d)

    out: dict[str, Source] = {
        "embed.embedding": (hf("wte.weight"), _same),
        "pos_embed": (hf("wpe.weight"), _same),
        **_layer_norm("norm", hf, "ln_f"),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", _same)
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"h.{i}."
        out.update(_layer_norm(ours + "attn_norm", hf, theirs + "ln_1"))
        out.update(_layer_norm(ours + "mlp_norm", hf, theirs + "ln_2"))
        for k, name in enumerate(("wq", "wk", "wv")):
            out[ours + f"attn.{name}.kernel"] = (hf(theirs + "attn.c_attn.weight"), third(k))
            out[ours + f"attn.{name}.bias"] = (hf(theirs + "attn.c_attn.bias"), third_bias(k))
        out[ours + "attn.wo.kernel"] = (hf(theirs + "attn.c_proj.weight"), lambda w: w.T.reshape(e, h, d))
        out[ours + "attn.wo.bias"] = (hf(theirs + "attn.c_proj.bias"), _same)
        for name, proj in (("up", "c_fc"), ("down", "c_proj")):
            out[ours + f"mlp.{name}.kernel"] = (hf(theirs + f"mlp.{proj}.weight"), _t)
            out[ours + f"mlp.{name}.bias"] = (hf(theirs + f"mlp.{proj}.bias"), _same)
    return out


def bert_sources(cfg: ModelConfig) -> dict[str, Source]:
    """BERT encoder: nn.Linear weights kept (out, in), q/k/v split per head. The
    pooler is not read. ``BertModel`` files have no prefix; task models (``BertForMaskedLM``
    ...) prefix ``bert.``."""
    e, h, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def hf(name: str) -> tuple[str, ...]:
        return name, f"bert.{name}"

    out: dict[str, Source] = {
        "embed.embedding": (hf("embeddings.word_embeddings.weight"), _same),
        "pos_embed": (hf("embeddings.position_embeddings.weight"), _same),
        "type_embed": (hf("embeddings.token_type_embeddings.weight"), _same),
        **_layer_norm("embed_norm", hf, "embeddings.LayerNorm"),
    }
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for name, proj in (("wq", "query"), ("wk", "key"), ("wv", "value")):
            out[ours + f"attn.{name}.kernel"] = (hf(theirs + f"attention.self.{proj}.weight"),
                                                 lambda w: w.reshape(h, d, e))
            out[ours + f"attn.{name}.bias"] = (hf(theirs + f"attention.self.{proj}.bias"), lambda b: b.reshape(h, d))
        out[ours + "attn.wo.kernel"] = (hf(theirs + "attention.output.dense.weight"), lambda w: w.reshape(e, h, d))
        out[ours + "attn.wo.bias"] = (hf(theirs + "attention.output.dense.bias"), _same)
        out.update(_layer_norm(ours + "attn_norm", hf, theirs + "attention.output.LayerNorm"))
        for name, dense in (("up", "intermediate.dense"), ("down", "output.dense")):
            out[ours + f"mlp.{name}.kernel"] = (hf(theirs + f"{dense}.weight"), _same)
            out[ours + f"mlp.{name}.bias"] = (hf(theirs + f"{dense}.bias"), _same)
        out.update(_layer_norm(ours + "mlp_norm", hf, theirs + "output.LayerNorm"))
    return out


FAMILIES: Mapping[str, Callable[[ModelConfig], dict[str, Source]]] = {
    "llama": llama_sources,
    "mistral": llama_sources,
    "qwen2": llama_sources,
    "t5": t5_sources,
    "gpt2": gpt2_sources,
    "bert": bert_sources,
}


def hf_views(cfg: ModelConfig, reader: SafetensorsReader) -> dict[str, np.ndarray]:
    """Every parameter of the tp = 1 layout as a lazy view into the memory-mapped files."""
    table = FAMILIES[cfg.model_type](cfg)
    names = {path: next((n for n in ((hf,) if isinstance(hf, str) else hf) if n in reader), None)
             for path, (hf, _) in table.items()}
    missing = [table[path][0] for path, name in names.items() if name is None]
    if missing:
        hint = ("; it is a base model without an LM head (an embedding model's): load it with "
                "rj.load_model(..., task='embed') (scripts/encode.py, scripts/serve.py --task embed)"
                if missing == ["lm_head.weight"] else "")
        raise KeyError(f"the checkpoint lacks {len(missing)} tensor(s) that {cfg.model_type} needs, e.g. "
                       f"{missing[:3]}{hint}")
    views = {}
    for path, (_, fn) in table.items():
        stored = reader.get(names[path])
        if stored.dtype.kind != "f" and stored.dtype != ml_dtypes.bfloat16:
            raise CheckpointFormatError(f"tensor {names[path]!r} is stored as {stored.dtype}, not as floating point: a "
                                        "quantized checkpoint? ryzen_jax reads float16 / bfloat16 / float32 weights")
        try:
            views[path] = fn(stored)
        except ValueError as e:
            raise CheckpointFormatError(f"tensor {names[path]!r} of shape {tuple(stored.shape)} does not fit "
                                        f"{cfg.model_type}'s config ({e})") from None
    return views


def fit_slice(stored: np.ndarray, index: Sequence[slice], target_shape: Sequence[int],
              axes: Sequence[str | None]) -> np.ndarray:
    """``target[index]`` for a target that is ``stored`` adapted to the mesh, reading only
    what that slice needs. Two adaptations exist: a ``vocab`` axis is zero-padded at the
    end (to a multiple of tp) and a ``kv_heads`` axis is repeated head by head
    (replicating KV heads when there are fewer than tp)."""
    basic, repeats, pads = [], {}, {}
    for dim, (sl, t, s, name) in enumerate(zip(index, target_shape, stored.shape, axes)):
        start, stop, _ = sl.indices(t)
        if t == s:
            basic.append(slice(start, stop))
        elif name == "kv_heads" and t % s == 0:
            src = np.arange(start, stop) // (t // s)
            basic.append(slice(int(src[0]), int(src[-1]) + 1))
            repeats[dim] = src - src[0]
        elif name == "vocab" and t > s:
            basic.append(slice(min(start, s), min(stop, s)))
            pads[dim] = (stop - start) - (min(stop, s) - min(start, s))
        else:
            raise ValueError(f"cannot fit stored shape {stored.shape} to {tuple(target_shape)} on axis {name!r}")
    out = np.asarray(stored[tuple(basic)])
    for dim, idx in repeats.items():
        out = np.take(out, idx, axis=dim)
    for dim, n in pads.items():
        widths = [(0, 0)] * out.ndim
        widths[dim] = (0, n)
        out = np.pad(out, widths)
    return out
