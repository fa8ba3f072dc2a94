#!/usr/bin/env python
"""Convert a Hugging Face model directory (safetensors) into a sharded ryzen_jax Orbax checkpoint.

    python scripts/convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ryzen_jax.runtime import setup_host_devices  # noqa: E402

# Conversion is one process's job (it reads each tensor once and writes files; no
# collectives): under scripts/launch.py or srun, process 0 converts, the others exit.
setup_host_devices(1, distributed=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", help="Hugging Face model directory with config.json and *.safetensors")
    ap.add_argument("out_dir", help="where to write the converted checkpoint (must not exist)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="cast the stored weights (default: keep the checkpoint's dtype)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)

    from ryzen_jax.checkpoint.convert import convert_hf
    from ryzen_jax.runtime import is_main_process, setup_logging

    setup_logging()
    if not is_main_process():
        print("conversion runs on process 0 only: nothing to do here", file=sys.stderr)
        return 0
    try:
        out = convert_hf(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
