"""One process of a health-check group, started by tests/test_distributed.py with the
launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...):

    python tests/health_worker.py stop|kill DEADLINE_S

Both processes join the group and run a health check (True). Then process 1 stops
itself (SIGSTOP) or dies (SIGKILL), and process 0 checks again with a DEADLINE_S
deadline, prints what it saw as one JSON line and calls attempt_recovery(), which exits
with the launcher's restart code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import init_distributed, setup_host_devices  # noqa: E402

setup_host_devices(1)
mode, deadline = sys.argv[1], float(sys.argv[2])
orchestrator = init_distributed()
healthy = orchestrator.check_health(timeout_s=60)
rank = orchestrator.get_rank()
print(json.dumps({"event": "first_check", "ok": healthy, "rank": rank, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "nccl": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}), flush=True)
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)
    time.sleep(600)  # a stopped process resumes here only if someone sends SIGCONT
t0 = time.monotonic()
ok = orchestrator.check_health(timeout_s=deadline)
print(json.dumps({"event": "second_check", "ok": ok, "elapsed_s": time.monotonic() - t0,
                  "stats": orchestrator.get_performance_stats()}), flush=True)
orchestrator.attempt_recovery(timeout_s=deadline)
print(json.dumps({"event": "recovered"}), flush=True)  # not reached: the group cannot heal itself
