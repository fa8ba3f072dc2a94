#!/usr/bin/env python
"""Start N local processes of a command as one JAX process group; restart the whole
group when any process fails (exit or lost heartbeat), up to --max-restarts times.

    python scripts/launch.py --nproc 2 --devices-per-proc 2 --max-restarts 2 -- \
        python scripts/generate.py --model DIR --json

See ryzen_jax/launcher.py for the variables each process gets and how failures are detected.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Loaded by path, not as ``ryzen_jax.launcher``: importing the package would import jax
# and the model code (seconds) into a process that only watches others.
_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ryzen_jax", "launcher.py")
_spec = importlib.util.spec_from_file_location("ryzen_jax_launcher", _PATH)
launcher = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)

if __name__ == "__main__":
    sys.exit(launcher.main())
