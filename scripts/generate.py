#!/usr/bin/env python
"""Generate text with a tensor-parallel model.

    python scripts/generate.py                                   # the built-in demo model
    python scripts/generate.py --model DIR --prompt "Hello" --max-new-tokens 64 --tp 4 --json

DIR is a Hugging Face model directory (safetensors) or a checkpoint written by
scripts/convert_hf.py. Greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import setup_host_devices  # noqa: E402

setup_host_devices()

DEFAULT_PROMPTS = ["The weather in the mountains", "Distributed computing is"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or converted checkpoint (default: the demo model)")
    ap.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: all devices the model allows)")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    import ryzen_jax as rj
    from ryzen_jax.runtime import enable_compilation_cache, setup_logging

    setup_logging()
    enable_compilation_cache()
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        sampling = rj.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_dir = args.model
    if model_dir is None:
        from ryzen_jax.demo import ensure_demo_model

        model_dir = ensure_demo_model()
        say(f"no --model given: using the demo model at {model_dir} "
            "(Llama architecture, RANDOM weights: the text is gibberish; pass --model DIR for a real one)")
    if jax.default_backend() == "cpu":
        say(f"no accelerator found: running on {len(jax.devices())} simulated CPU devices")
    try:
        lm = rj.load_model(model_dir, tp=args.tp, dp=args.dp, dtype=args.dtype)
        say(f"loaded {lm.config.model_type} in {lm.load_s:.1f}s on mesh data={lm.tp.dp_size} x model={lm.tp.tp_size} "
            f"({jax.default_backend()}, {lm.generator.dtype})")
        prompts = args.prompt or DEFAULT_PROMPTS
        outs, res = rj.generate(lm, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, return_result=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:
        return 0
    timings = {"load_s": round(lm.load_s, 3), "compile_s": round(res.compile_s, 3),
               "time_to_first_token_s": round(res.ttft_s, 4),
               "decode_tokens_per_s": round(res.decode_tokens_per_s, 1)}
    if args.json:
        print(json.dumps({"model": model_dir, "tp": lm.tp.tp_size, "dp": lm.tp.dp_size,
                          "dtype": str(lm.generator.dtype), "outputs": [dict(o, prompt=p) for o, p in zip(outs, prompts)],
                          "timings": timings}))
    else:
        for p, o in zip(prompts, outs):
            print(f"\n>>> {p}\n{o['text']}")
        print("\n" + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
