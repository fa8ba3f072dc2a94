#!/usr/bin/env python
"""Serve a model over the OpenAI API (completions, chat completions, streaming; embeddings
for an encoder-only model such as BERT).

    python scripts/serve.py --model DIR [--tp N] [--dp N] [--host 127.0.0.1] [--port 8000]
                            [--max-batch N] [--max-queue N] [--api-key KEY]
    python scripts/launch.py --nproc 2 -- python scripts/serve.py --model DIR     # across processes

Binds 127.0.0.1 unless --host says otherwise. With --api-key (or $RYZEN_JAX_API_KEY),
requests to /v1/* need 'Authorization: Bearer KEY'.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import add_mesh_args, setup_host_devices  # noqa: E402
from ryzen_jax.serve.tools import PARSERS  # noqa: E402

setup_host_devices()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model dir or converted checkpoint (with a tokenizer)")
    ap.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: dir name)")
    add_mesh_args(ap)
    ap.add_argument("--max-seq-len", "--max-model-len", dest="max_seq_len", type=int, default=None,
                    help="prompt + generated tokens per request")
    ap.add_argument("--task", choices=("auto", "generate", "embed"), default="auto",
                    help="embed: /v1/embeddings from a decoder-only model too (last-token pooling, as vLLM's); "
                         "auto: embed for an encoder-only model (BERT), else generate")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=8,
                    help="decode slots (requests generating at once)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a busy slot to free before 429")
    ap.add_argument("--api-key", default=os.environ.get("RYZEN_JAX_API_KEY"))
    ap.add_argument("--steps-per-dispatch", type=int, default=1, help="decode steps between scheduling decisions (1-32)")
    ap.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                    help="auto: requests that leave out temperature, top_p, top_k, min_p, repetition_penalty or "
                         "max_tokens get the model's generation_config.json values; none: the OpenAI API's defaults")
    ap.add_argument("--step-timeout", type=float, default=60.0,
                    help="seconds a decode step may take before the group is declared dead")
    ap.add_argument("--enable-auto-tool-choice", action="store_true",
                    help="let the model call tools in its own syntax (tool_choice 'auto'); needs --tool-call-parser")
    ap.add_argument("--tool-call-parser", choices=tuple(PARSERS), default=None,
                    help="the model's tool-call syntax: hermes (Qwen2, Hermes), llama3_json (Llama 3.1/3.2), "
                         "mistral (Mistral v0.3, Nemo, Small), pythonic (Llama 3.2/4 Python-style calls)")
    args = ap.parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        ap.error(f"--enable-auto-tool-choice needs --tool-call-parser ({' | '.join(PARSERS)}): the syntax the "
                 "model writes its calls in")
    from ryzen_jax.serve import check_limits

    try:  # before anything loads
        check_limits(args.max_batch, args.max_queue, args.steps_per_dispatch)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ryzen_jax as rj
    from ryzen_jax.runtime import setup_logging
    from ryzen_jax.serve import EmbeddingServer, Server

    setup_logging()  # load_model turns on the persistent compilation cache
    try:
        lm = rj.load_model(args.model, tp=args.tp, dp=args.dp, dtype=args.dtype, max_seq_len=args.max_seq_len,
                           task=args.task)
        if lm.encoder is not None:  # BERT, or --task embed: POST /v1/embeddings
            server = EmbeddingServer(lm, max_queue=args.max_queue, api_key=args.api_key,
                                     model_name=args.served_model_name, step_timeout_s=args.step_timeout)
        else:
            server = Server(lm, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                            model_name=args.served_model_name, steps_per_dispatch=args.steps_per_dispatch,
                            step_timeout_s=args.step_timeout, generation_config=args.generation_config,
                            tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import logging

    if server.leader:
        logging.getLogger("ryzen_jax").info("serving %s on http://%s:%d (mesh data=%d x model=%d, pid %d)",
                                            server.model_name, args.host, args.port, lm.tp.dp_size, lm.tp.tp_size,
                                            os.getpid())
    server.run(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
