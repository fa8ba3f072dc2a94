#!/usr/bin/env python
"""Embed texts with a tensor-parallel encoder-only model (BERT) or a decoder-only
embedding model (Llama / Qwen2 / Mistral / GPT-2 architecture, last-token pooling).

    python scripts/encode.py --model DIR --text "Hello world" --text "Bonjour" [--pooling mean|cls]
                             [--normalize] [--tp 4] [--dtype float32] --json

DIR is a Hugging Face directory (safetensors and a tokenizer) or a checkpoint written
by scripts/convert_hf.py. Prints one vector per text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import add_mesh_args, setup_host_devices  # noqa: E402

setup_host_devices()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or converted checkpoint")
    ap.add_argument("--text", action="append", required=True, help="text to embed; repeat for a batch")
    ap.add_argument("--pooling", choices=["mean", "cls", "last"], default=None,
                    help="mean of the real tokens' last hidden states, the first token's or the last's (default: "
                         "what a sentence-transformers modules.json asks for, else mean for an encoder, last for a "
                         "decoder)")
    ap.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="scale each vector to unit length (default: as modules.json asks, else only a decoder's)")
    ap.add_argument("--truncate", action="store_true",
                    help="cut a text longer than the model's positions to fit (default: refuse it)")
    add_mesh_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import ryzen_jax as rj
    from ryzen_jax.runtime import is_main_process, progress_printer, setup_logging

    setup_logging()  # load_model turns on the persistent compilation cache
    say = progress_printer(args.json)
    try:
        lm = rj.load_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype, progress=False, task="embed")
        say(lm.summary())
        vectors = rj.embed(lm, args.text, pooling=args.pooling, normalize=args.normalize, truncate=args.truncate)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_main_process():
        return 0
    if args.json:
        print(json.dumps({"model": args.model, "model_type": lm.config.model_type, "tp": lm.tp.tp_size,
                          "dp": lm.tp.dp_size, "dtype": str(lm.encoder.dtype), "pooling": args.pooling or lm.encoder.pooling,
                          "normalize": lm.encoder.normalize if args.normalize is None else args.normalize, "texts": args.text, "embeddings": vectors.tolist(),
                          "timings": {"load_s": round(lm.load_s, 3), "compile_s": round(lm.encoder.compile_s, 3)}}))
    else:
        for text, v in zip(args.text, vectors):
            print(f"{text!r}: [{', '.join(f'{x:.4f}' for x in v[:8])}{', ...' if len(v) > 8 else ''}] (dim {len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
