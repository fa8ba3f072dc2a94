"""Model configuration: one frozen dataclass built from a Hugging Face ``config.json``.

The HF file is read as plain JSON (not through transformers' config classes) so that
old and new spellings both work: ``rope_theta``/``rope_scaling`` (transformers 4.x
files, i.e. nearly every checkpoint on disk) and ``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from ryzen_jax.activations import UnknownActivationError, activation



class ConfigError(ValueError):
    """A config.json that ryzen_jax cannot run, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is "default", "linear" or "llama3"."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about a decoder-only checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (qwen2: always)
    o_bias: bool = False  # bias on the output projection (llama attention_bias=True)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # which layers the window applies to (None: every layer)
    # GPT-2 / BERT: LayerNorm (with bias) instead of RMSNorm
    layer_norm_eps: float = 1e-5
    scale_attn_weights: bool = True  # GPT-2: attention scores scaled by head_dim**-0.5 ...
    scale_attn_by_inverse_layer_idx: bool = False  # ... and by 1 / (layer index + 1)
    type_vocab_size: int = 0  # BERT token-type (segment) embeddings
    is_encoder: bool = False  # encoder-only (BERT): hidden states out, no LM head, no generation
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # encoder–decoder (T5): num_layers counts the encoder's layers
    is_encoder_decoder: bool = False
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    decoder_start_token_id: int | None = None  # the decoder's first input token
    # sampling defaults from generation_config.json, as (name, value) pairs: what the
    # server applies to a request that leaves them out (vLLM's --generation-config auto)
    generation_defaults: tuple[tuple[str, float], ...] = ()

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one key/value head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def window_of(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (None: it attends to everything)."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], generation: Mapping[str, Any] | None = None) -> "ModelConfig":
        """Build from the parsed ``config.json`` (and ``generation_config.json``, if any).

        The family's parser (``FAMILY_PARSERS[model_type]``) maps its own field names;
        token ids and the activation check are common to every family.
        """
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type'; supported: " + ", ".join(SUPPORTED_MODEL_TYPES))
        if model_type not in FAMILY_PARSERS:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; ryzen_jax runs: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        quant = raw.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, Mapping) else "unknown"
            raise ConfigError(f"config.json has a quantization_config (quant_method {method!r}): quantized weights "
                              "are not supported; use the model's float16 / bfloat16 / float32 checkpoint")
        fields = FAMILY_PARSERS[model_type](_Fields(raw, model_type))

        generation = generation or {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        bos = generation.get("bos_token_id", raw.get("bos_token_id"))
        pad = generation.get("pad_token_id", raw.get("pad_token_id"))
        if fields.get("is_encoder_decoder"):
            start = next((s for s in (generation.get("decoder_start_token_id"), raw.get("decoder_start_token_id"), pad)
                          if s is not None), None)
            if start is None:
                raise ConfigError(f"config.json ({model_type}) has neither 'decoder_start_token_id' nor "
                                  "'pad_token_id': set decoder_start_token_id (T5 uses the pad id, 0)")
            fields["decoder_start_token_id"] = int(start)
        cfg = cls(model_type=model_type, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                  pad_token_id=None if pad is None else int(pad), generation_defaults=_generation_defaults(generation),
                  **fields)
        try:
            activation(cfg.hidden_act)
        except UnknownActivationError as e:
            raise ConfigError(f"config.json ({model_type}): {e}") from None
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        """Read ``config.json`` (+ ``generation_config.json``) from an HF or converted model directory."""
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{model_dir} has no config.json: point --model at a Hugging Face model directory")
        with open(path) as f:
            raw = json.load(f)
        gen_path = os.path.join(model_dir, "generation_config.json")
        generation = None
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                generation = json.load(f)
        return cls.from_dict(raw, generation)


class _Fields:
    """config.json fields with errors that name the model type and the missing key."""

    def __init__(self, raw: Mapping[str, Any], model_type: str):
        self.raw, self.model_type = raw, model_type

    def need(self, key: str) -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise ConfigError(f"config.json ({self.model_type}) is missing the required field {key!r}")
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key)
        return default if value is None else value


def _llama(f: _Fields) -> dict[str, Any]:
    """Llama, Mistral, Qwen2."""
    hidden = int(f.need("hidden_size"))
    heads = int(f.need("num_attention_heads"))
    kv_heads = int(f.get("num_key_value_heads", heads))
    head_dim = int(f.get("head_dim", hidden // heads))
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")

    # transformers 4.x files: rope_theta + rope_scaling; transformers 5: rope_parameters.
    params = dict(f.get("rope_parameters", {}))
    rope = dict(f.get("rope_scaling", params))
    theta = float(f.get("rope_theta", params.get("rope_theta", 10000.0)))

    is_qwen2 = f.model_type == "qwen2"
    layers = int(f.need("num_hidden_layers"))
    # Llama has no sliding window (transformers ignores the key there); Mistral windows
    # every layer; Qwen2 only with use_sliding_window, and then the layers its
    # layer_types name (transformers 5) or those from max_window_layers on (4.x)
    sliding = f.get("sliding_window") if f.model_type in ("mistral", "qwen2") else None
    sliding_layers = None
    if is_qwen2:
        if not f.get("use_sliding_window", False):
            sliding = None
        elif f.get("layer_types") is not None:
            sliding_layers = tuple(t == "sliding_attention" for t in f.get("layer_types"))
        else:
            first = int(f.get("max_window_layers", 28))
            sliding_layers = tuple(i >= first for i in range(layers))
        if sliding_layers is not None and len(sliding_layers) != layers:
            raise ConfigError(f"qwen2 config: layer_types has {len(sliding_layers)} entries for {layers} layers")
    return dict(
        vocab_size=int(f.need("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(f.need("intermediate_size")),
        rms_norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(rope),
        max_position_embeddings=int(f.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", False)),
        attention_bias=True if is_qwen2 else bool(f.get("attention_bias", False)),
        o_bias=False if is_qwen2 else bool(f.get("attention_bias", False)),
        mlp_bias=bool(f.get("mlp_bias", False)),
        hidden_act=str(f.get("hidden_act", "silu")),
        sliding_window=int(sliding) if sliding else None,
        sliding_layers=sliding_layers if sliding else None,
    )


def _t5(f: _Fields) -> dict[str, Any]:
    """T5 (original: feed_forward_proj "relu"; v1.1 / flan-t5: "gated-gelu").

    A tied T5 reads its LM head from the shared embedding *and* scales the decoder
    output by d_model**-0.5. transformers 4 files say so with ``tie_word_embeddings``
    (default true); transformers 5 files always write ``tie_word_embeddings: true``
    and keep the distinction in ``scale_decoder_outputs``. Untied: a separate lm_head,
    no scaling. ``tie_word_embeddings`` here means the tied, scaled form.
    """
    proj = str(f.get("feed_forward_proj", "relu"))
    try:
        activation(proj)
    except UnknownActivationError as e:
        raise ConfigError(f"config.json (t5): unsupported feed_forward_proj {proj!r}: {e}") from None
    heads = int(f.need("num_heads"))
    layers = int(f.need("num_layers"))
    return dict(
        vocab_size=int(f.need("vocab_size")),
        hidden_size=int(f.need("d_model")),
        num_layers=layers,
        num_decoder_layers=int(f.get("num_decoder_layers", layers)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=int(f.need("d_kv")),  # need not be d_model / num_heads
        intermediate_size=int(f.need("d_ff")),
        rms_norm_eps=float(f.get("layer_norm_epsilon", 1e-6)),
        max_position_embeddings=int(f.get("n_positions", 512)),  # relative positions: no hard limit
        tie_word_embeddings=bool(f.get("scale_decoder_outputs", f.get("tie_word_embeddings", True))),
        hidden_act=proj,
        is_encoder_decoder=True,
        relative_attention_num_buckets=int(f.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(f.get("relative_attention_max_distance", 128)),
    )


def _biased_mha(f: _Fields, hidden_key: str, layers_key: str, heads_key: str) -> dict[str, Any]:
    """The fields GPT-2 and BERT share: multi-head attention (head size hidden / heads)
    with a bias on every projection and MLP layer, under each family's key names."""
    hidden, heads = int(f.need(hidden_key)), int(f.need(heads_key))
    if hidden % heads:
        raise ConfigError(f"config.json ({f.model_type}): hidden size {hidden} is not divisible by "
                          f"{heads_key}={heads}; the checkpoint is inconsistent")
    return dict(vocab_size=int(f.need("vocab_size")), hidden_size=hidden, num_layers=int(f.need(layers_key)),
                num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, attention_bias=True, o_bias=True,
                mlp_bias=True)


def _refuse(f: _Fields, key: str, supported: Any, why: str) -> None:
    """ConfigError when ``key`` is set to anything but its ``supported`` value."""
    value = f.get(key, supported)
    if value != supported:
        raise ConfigError(f"config.json ({f.model_type}): {key}={value!r} is not supported ({why}); "
                          f"ryzen_jax runs {key}={supported!r} only")


def _gpt2(f: _Fields) -> dict[str, Any]:
    """GPT-2: learned positions, pre-LayerNorm, biased projections, tanh-GELU MLP."""
    fields = _biased_mha(f, "n_embd", "n_layer", "n_head")
    _refuse(f, "add_cross_attention", False, "GPT-2 as the decoder of an encoder-decoder model")
    # reorder_and_upcast_attn only upcasts the scores to float32, which attention() always does.
    return dict(
        fields,
        intermediate_size=int(f.get("n_inner", 4 * fields["hidden_size"])),
        layer_norm_eps=float(f.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(f.get("n_positions", 1024)),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", True)),
        hidden_act=str(f.get("activation_function", "gelu_new")),
        scale_attn_weights=bool(f.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(f.get("scale_attn_by_inverse_layer_idx", False)),
    )


def _bert(f: _Fields) -> dict[str, Any]:
    """BERT encoder: absolute learned positions, token types, post-LayerNorm, GELU MLP."""
    fields = _biased_mha(f, "hidden_size", "num_hidden_layers", "num_attention_heads")
    _refuse(f, "position_embedding_type", "absolute", "relative position embeddings")
    _refuse(f, "is_decoder", False, "BERT used as a causal decoder")
    _refuse(f, "add_cross_attention", False, "BERT as the decoder of an encoder-decoder model")
    return dict(
        fields,
        intermediate_size=int(f.need("intermediate_size")),
        layer_norm_eps=float(f.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=int(f.get("max_position_embeddings", 512)),
        type_vocab_size=int(f.get("type_vocab_size", 2)),
        hidden_act=str(f.get("hidden_act", "gelu")),
        is_encoder=True,
    )


#: model_type -> parser of that family's config.json fields into ModelConfig fields
FAMILY_PARSERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "gpt2": _gpt2,
    "bert": _bert,
    "t5": _t5,
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_PARSERS)


#: generation_config.json keys that set sampling, and transformers' own default for each
#: (a value equal to it says nothing: it is left out, as vLLM leaves it out)
GENERATION_KEYS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0,
                   "max_new_tokens": None}


def _generation_defaults(generation: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    out = []
    for key, hf_default in GENERATION_KEYS.items():
        value = generation.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != hf_default:
            out.append((key, value))
    return tuple(out)


def _rope_scaling(rope: Mapping[str, Any]) -> RopeScaling:
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")
    if rope_type == "default":
        return RopeScaling()
    if "factor" not in rope:
        raise ConfigError(f"rope_scaling of type {rope_type!r} is missing the required field 'factor'")
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    kwargs = {k: v for k, v in rope.items() if k in fields and k != "rope_type"}
    return RopeScaling(rope_type=rope_type, **kwargs)
