#!/usr/bin/env python
"""Benchmark the engine: offline against the machine's floors and Hugging Face
transformers on the same weights, or a running server under load.

    python scripts/benchmark.py                                        # "small" shape, batch 1 and 8
    python scripts/benchmark.py --model-size small --batch-size 1 8 --prompt-len 128 --new-tokens 128 \\
        --tp 1 --json bench.json --plots bench-plots
    python scripts/benchmark.py --mode serving --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 4 --max-concurrency 8 --json serving.json --plots serving-plots

Offline, random-weight checkpoints of the chosen shape are written once under
$RYZEN_JAX_CACHE/bench; --model DIR measures a checkpoint of one's own instead, against
transformers on the same safetensors:

    python scripts/benchmark.py --model path/to/Qwen2-0.5B --batch-size 1 8 --prompt-len 256

Progress goes to stderr; the table to stdout at the end. Under scripts/launch.py (or
srun, mpirun) offline mode runs the model split over every process's devices; process 0
alone runs the tp = 1 baseline and the peer and writes the results:

    python scripts/launch.py --nproc 2 --devices-per-proc 2 -- python scripts/benchmark.py --model-size tiny
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import setup_host_devices  # noqa: E402

setup_host_devices()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ryzen_jax.bench.shapes import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["offline", "serving"], default="offline")
    ap.add_argument("--json", metavar="OUT", help="write every result (samples included) to this JSON file")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots into this directory")
    off = ap.add_argument_group("offline")
    off.add_argument("--model-size", default="small", choices=list(PRESETS), help="shape preset (default: small)")
    off.add_argument("--model", metavar="DIR", default=None,
                     help="a model directory to benchmark instead of a preset's random weights (Hugging Face or "
                          "converted; Llama, Mistral, Qwen2, GPT-2): its config.json is the shape")
    off.add_argument("--batch-size", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    off.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    off.add_argument("--new-tokens", type=int, default=128, help="generated tokens per request (default: 128)")
    off.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: all the model allows)")
    off.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="default: bfloat16 on GPU, float32 on CPU")
    off.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default: 3)")
    off.add_argument("--no-peer", action="store_true", help="skip Hugging Face transformers")
    off.add_argument("--no-speedup", action="store_true", help="skip the tp=1 run behind the speedup")
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--cache-dir", default=None, help="where checkpoints are written (default: $RYZEN_JAX_CACHE/bench)")
    off.add_argument("--probe-mb", type=int, default=256, help="array size of the bandwidth measurement (default: 256)")
    for flag, name in (("--layers", "num_layers"), ("--hidden", "hidden_size"), ("--heads", "num_attention_heads"),
                       ("--kv-heads", "num_key_value_heads"), ("--intermediate", "intermediate_size"),
                       ("--vocab", "vocab_size")):
        off.add_argument(flag, dest=name, type=int, default=None, help=f"override the preset's {name}")
    srv = ap.add_argument_group("serving")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    srv.add_argument("--served-model", default=None, help="model name to request (default: the server's first)")
    srv.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    srv.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf)")
    srv.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    srv.add_argument("--dataset", metavar="FILE", default=None,
                     help='prompts from a file instead of random words: JSONL of {"prompt": ..., "max_tokens": N} '
                          "lines (vLLM's custom format; max_tokens optional) or a ShareGPT JSON")
    srv.add_argument("--input-words", type=int, default=32, help="random words per prompt")
    srv.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    srv.add_argument("--burstiness", type=float, default=1.0,
                     help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier, > 1 more even (default: 1)")
    srv.add_argument("--goodput", nargs="+", metavar="METRIC:MS", default=[],
                     help="service-level objectives, e.g. ttft:500 tpot:50 (metrics: ttft, tpot, e2el); reports the "
                          "rate of requests that met them all")
    srv.add_argument("--api-key", default=os.environ.get("RYZEN_JAX_API_KEY"),
                     help="bearer token (default: $RYZEN_JAX_API_KEY)")
    return ap.parse_args(argv)


def offline(args: argparse.Namespace):
    from ryzen_jax.api import default_dtype
    from ryzen_jax.bench import BenchmarkConfig, DistributedInferenceBenchmark
    from ryzen_jax.bench.report import offline_plots, offline_table

    shape = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                           "intermediate_size", "vocab_size")}
    cfg = BenchmarkConfig(model_size=args.model_size, model=args.model, batch_size=tuple(args.batch_size),
                          seq_len=args.prompt_len, new_tokens=args.new_tokens, world_size=args.tp,
                          dtype=args.dtype or default_dtype(), repeats=args.repeats, peer=not args.no_peer,
                          speedup=not args.no_speedup, seed=args.seed, cache_dir=args.cache_dir,
                          probe_megabytes=args.probe_mb, **shape)
    results = DistributedInferenceBenchmark(cfg).run_comprehensive_benchmark()
    return results, offline_table(results), offline_plots


def slo_pairs(items: list[str]) -> tuple[tuple[str, float], ...]:
    """``["ttft:500", "tpot:50"]`` -> (("ttft", 500.0), ("tpot", 50.0))."""
    from ryzen_jax.bench.serving import ServingConfigError

    pairs = []
    for item in items:
        metric, _, ms = item.partition(":")
        try:
            pairs.append((metric, float(ms)))
        except ValueError:
            raise ServingConfigError(f"--goodput {item!r}: expected METRIC:MS, e.g. ttft:500") from None
    return tuple(pairs)


def serving(args: argparse.Namespace):
    from ryzen_jax.bench import serving as srv
    from ryzen_jax.bench.report import serving_plots, serving_table

    cfg = srv.ServingConfig(base_url=args.base_url, model=args.served_model, num_prompts=args.num_prompts,
                            request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                            input_words=args.input_words, max_tokens=args.max_tokens, seed=args.seed,
                            api_key=args.api_key, burstiness=args.burstiness, goodput=slo_pairs(args.goodput),
                            dataset=args.dataset)
    import logging

    results = srv.run(cfg, progress=logging.getLogger("ryzen_jax.bench").info)
    return results, serving_table(results), serving_plots


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ryzen_jax.bench import BenchmarkConfigError, ShapeError
    from ryzen_jax.bench.report import write_json
    from ryzen_jax.bench.serving import ServingConfigError
    from ryzen_jax.runtime import is_main_process, setup_logging

    setup_logging()
    import jax

    if args.mode == "serving" and jax.process_count() > 1:
        print("error: serving mode is a client of a running server: run it as one process, not under a launcher",
              file=sys.stderr)
        return 2
    try:
        results, table, plots = (offline if args.mode == "offline" else serving)(args)
    except (BenchmarkConfigError, ShapeError, ServingConfigError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_main_process():  # under a launcher: process 0 writes the results
        return 0
    if args.json:
        command = ["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]
        print(f"results written to {write_json(results, args.json, argv=command)}", file=sys.stderr)
    if args.plots:
        print(f"plots: {', '.join(plots(results, args.plots))}", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
