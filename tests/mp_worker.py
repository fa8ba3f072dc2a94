"""One process of a multi-process run on CPU (gloo), started by scripts/launch.py:

    python scripts/launch.py --nproc 2 --devices-per-proc 2 -- python tests/mp_worker.py MODEL_DIR TP DP [--die-rank R]

It joins the group the way every script does (``setup_host_devices``), loads MODEL_DIR
onto a mesh spanning every process's devices, generates greedily for two fixed prompts
and prints one JSON line: the tokens, the checkpoint bytes this process read, and wall
times. ``--die-rank R``: on the launcher's first attempt, process R SIGKILLs itself
after the first token (printing the time first), to test the launcher's group restart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

started_at = time.time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import enable_compilation_cache, setup_host_devices  # noqa: E402

setup_host_devices()
joined_at = time.time()

import jax  # noqa: E402

import ryzen_jax as rj  # noqa: E402
from ryzen_jax.launcher import ENV_RESTART_COUNT  # noqa: E402
from tests.mp_helpers import PROMPTS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("tp", type=int)
ap.add_argument("dp", type=int)
ap.add_argument("--die-rank", type=int, default=None)
ap.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache directory")
args = ap.parse_args()
attempt = int(os.environ.get(ENV_RESTART_COUNT, "0"))
if args.compile_cache:
    enable_compilation_cache(args.compile_cache)

lm = rj.load_model(args.model_dir, tp=args.tp, dp=args.dp, progress=False)
loaded_at = time.time()
lm.generator.generate(PROMPTS, 1, stop_ids=[])  # the group's first token (prefill, compile included)
first_token_at = time.time()
if attempt == 0 and args.die_rank == jax.process_index():
    print(json.dumps({"event": "dying", "t": time.time()}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
out = lm.generator.generate(PROMPTS, 16, stop_ids=[])
total = sum(leaf.nbytes for leaf in jax.tree.leaves(lm.generator.state))
print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()), "attempt": attempt,
                  "tokens": out.generated_ids, "bytes_read": lm.bytes_read, "param_bytes": total,
                  "started_at": started_at, "joined_at": joined_at, "loaded_at": loaded_at,
                  "first_token_at": first_token_at, "load_s": lm.load_s, "ttft_s": out.ttft_s,
                  "decode_tokens_per_s": out.decode_tokens_per_s}), flush=True)
