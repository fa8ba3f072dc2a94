"""One process of a multi-process run on CPU (gloo), started by tests/test_multiprocess.py.

    python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR TP DP DEVICES_PER_PROCESS

Loads MODEL_DIR onto a mesh spanning every process's devices, generates greedily for
a fixed prompt and prints one JSON line: the tokens, and the checkpoint bytes this
process read.
"""

from __future__ import annotations

import json
import os
import sys

pid, nproc, port, model_dir, tp, dp, ndev = sys.argv[1:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", int(nproc), int(pid), initialization_timeout=60)

import ryzen_jax as rj  # noqa: E402

PROMPT = [1, 17, 42, 99, 3, 243, 128, 64, 5, 77, 31]

lm = rj.load_model(model_dir, tp=int(tp), dp=int(dp), progress=False)
total = sum(leaf.nbytes for leaf in jax.tree.leaves(lm.generator.state))
out = lm.generator.generate([PROMPT, PROMPT[:5]], 16, stop_ids=[])
print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()), "tokens": out.generated_ids,
                  "bytes_read": lm.bytes_read, "param_bytes": total}), flush=True)
jax.distributed.shutdown()
