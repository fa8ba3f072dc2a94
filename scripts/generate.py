#!/usr/bin/env python
"""Generate text with a tensor-parallel model.

    python scripts/generate.py                                   # the built-in demo model
    python scripts/generate.py --model DIR --prompt "Hello" --max-new-tokens 64 --tp 4 --json
    python scripts/generate.py --model DIR --prompt "Once" --temperature 0.8 --top-p 0.95 --stop "\n" --stream
    python scripts/generate.py --model DIR --prompt "A user, as JSON:" --json-schema @user.schema.json

DIR is a Hugging Face model directory (safetensors) or a checkpoint written by
scripts/convert_hf.py (decoder-only or T5). Greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import add_mesh_args, setup_host_devices  # noqa: E402

setup_host_devices()

DEFAULT_PROMPTS = ["The weather in the mountains", "Distributed computing is"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or converted checkpoint (default: the demo model)")
    ap.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    add_mesh_args(ap)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (transformers' rule: prompt too)")
    ap.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], 0 = off (OpenAI's)")
    ap.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], 0 = off (OpenAI's)")
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh seed per run")
    ap.add_argument("--logprobs", type=int, default=None, metavar="K",
                    help="with --json: each token's log-probability and the K most likely tokens' (0-20)")
    ap.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                    help="with --json: the same for every prompt token (given those before it) and its rank "
                         "in the vocabulary (prompt_ranks; decoder-only models)")
    ap.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS", type=token_bias,
                    help="add BIAS (in [-100, 100]) to token ID's logit before sampling (repeatable; OpenAI's logit_bias)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text is cut before it")
    ap.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS ids")
    ap.add_argument("--min-tokens", type=int, default=0, metavar="N",
                    help="no EOS, stop id or stop string ends a prompt's output before N tokens")
    held = ap.add_argument_group("structured output (one of these): the output is held to it and ends once complete")
    held.add_argument("--json-schema", metavar="SCHEMA", help="a JSON schema: its JSON text, or @FILE")
    held.add_argument("--json-object", action="store_true", help="any JSON object")
    held.add_argument("--regex", help="a regular expression the whole output matches")
    held.add_argument("--choice", action="append", help="one of these strings exactly (repeatable)")
    held.add_argument("--grammar", metavar="LARK", help="a Lark (or GBNF) grammar: its text, or @FILE")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="prompt + new tokens per sequence; sizes the cache (default: model context, at most 2048)")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt at a time)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for flag in ("logprobs", "prompt_logprobs"):
        if getattr(args, flag) is not None and not args.json:
            ap.error(f"--{flag.replace('_', '-')} needs --json (the log-probabilities are part of the JSON output)")
    return args


def token_bias(text: str) -> tuple[int, float]:
    """``ID=BIAS`` → (id, bias), for --logit-bias."""
    tok, sep, bias = text.partition("=")
    try:
        return int(tok), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (a token id and a number), got {text!r}") from None


def structured_output(args: argparse.Namespace):
    """The StructuredOutput the flags ask for (``@FILE`` read), or None."""
    from ryzen_jax.engine.structured import StructuredOutput

    def text(value: str | None) -> str | None:
        if value is not None and value.startswith("@"):
            with open(value[1:]) as f:
                return f.read()
        return value

    given = {"json": text(args.json_schema), "json_object": args.json_object, "regex": args.regex,
             "choice": args.choice, "grammar": text(args.grammar)}
    given = {k: v for k, v in given.items() if v not in (None, False)}
    return StructuredOutput(**given) if given else None


def check_before_loading(model_dir: str, prompts: list[str], args: argparse.Namespace,
                         grammar: str | None = None) -> None:
    """Refuse prompts the model cannot take from its config and tokenizer alone, before
    minutes of loading weights: no tokenizer, prompt + new tokens past the cache, or a
    structured output's grammar that does not compile."""
    from ryzen_jax.api import load_tokenizer
    from ryzen_jax.config import ModelConfig
    from ryzen_jax.engine.generate import check_length, resolve_max_seq_len
    from ryzen_jax.engine.structured import Grammars

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    cfg = ModelConfig.from_pretrained(model_dir)
    if cfg.is_encoder:
        raise ValueError(f"{model_dir} holds a {cfg.model_type} encoder, which does not generate text: "
                         "use scripts/encode.py for embeddings")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json): this script takes "
                         "text prompts; the Python API (rj.generate) takes token ids")
    limit = resolve_max_seq_len(cfg, args.max_seq_len)
    for prompt in prompts:
        check_length(cfg, limit, len(tokenizer(prompt)["input_ids"]), args.max_new_tokens)
    if grammar is not None:
        Grammars(tokenizer, cfg.vocab_size, cfg.eos_token_ids).check(grammar)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    import ryzen_jax as rj
    from ryzen_jax.runtime import is_main_process, progress_printer, setup_logging

    setup_logging()  # load_model turns on the persistent compilation cache
    say = progress_printer(args.json)
    try:
        sampling = rj.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                     presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                                     seed=args.seed, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
                                     logit_bias=args.logit_bias, min_tokens=args.min_tokens)
        structured = structured_output(args)
        grammar = structured.compile() if structured is not None else None
    except (ValueError, OSError) as e:  # SamplingError, StructuredOutputError, an @FILE that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_dir = args.model
    if model_dir is None:
        from ryzen_jax.demo import ensure_demo_model

        model_dir = ensure_demo_model()
        say(f"no --model given: using the demo model at {model_dir} "
            "(Llama architecture, RANDOM weights: the text is gibberish; pass --model DIR for a real one)")
    if jax.default_backend() == "cpu":
        say(f"no accelerator found: {len(jax.devices())} simulated CPU devices"
            + ("; tp defaults to 1 on them (they share this machine's cores), --tp N runs the tensor-parallel path"
               if args.tp is None and jax.process_count() == 1 else ""))
    main_process = is_main_process()
    show = print if main_process and not args.json else (lambda *a, **k: None)
    prompts = args.prompt or DEFAULT_PROMPTS
    options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                   stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos, structured=structured)
    try:
        check_before_loading(model_dir, prompts, args, grammar)
        lm = rj.load_model(model_dir, tp=args.tp, dp=args.dp, dtype=args.dtype, max_seq_len=args.max_seq_len)
        say(lm.summary())
        # Check every request and compile its shapes before the clock starts.
        ids = [rj.api.encode(lm, p) for p in prompts]
        batches = [[i] for i in ids] if args.stream else [ids]
        for batch in batches:
            lm.generator.check(rj.api.requests(lm, batch, **options))
        compile_s = sum(lm.generator.warmup([len(b)], [max(map(len, b))], max(map(len, b)) + args.max_new_tokens)
                        for b in batches)
        if args.stream:
            outs, results = [], []
            for prompt, p_ids in zip(prompts, ids):
                show(f"\n>>> {prompt}")
                res = rj.GenerationResult(completions=[])
                for deltas in lm.generator.run(rj.api.requests(lm, [p_ids], **options), steps_per_dispatch=1,
                                               stats=res):
                    for d in deltas:
                        show(d.text, end="", flush=True)
                show()
                outs += res.completions
                results.append(res)
        else:
            outs, res = rj.generate(lm, ids, **options, return_result=True)
            results = [res]
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    decode_s = sum(r.decode_s for r in results)
    compile_s += sum(r.compile_s for r in results)  # what warm-up leaves (the prompt-scoring prefill)
    timings = {"load_s": round(lm.load_s, 3), "compile_s": round(compile_s, 3),
               "time_to_first_token_s": round(results[0].ttft_s, 4),
               "decode_tokens_per_s": round(sum(r.decode_tokens for r in results) / decode_s, 1) if decode_s else 0.0}
    if args.json:
        outputs = [dict(dataclasses.asdict(o), prompt=p) for o, p in zip(outs, prompts)]
        print(json.dumps({"model": model_dir, "model_type": lm.config.model_type, "tp": lm.tp.tp_size,
                          "dp": lm.tp.dp_size, "dtype": str(lm.generator.dtype), "outputs": outputs,
                          "timings": timings}))
    else:
        if not args.stream:
            for p, o in zip(prompts, outs):
                print(f"\n>>> {p}\n{o.text}")
        print("\n" + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
