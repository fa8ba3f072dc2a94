#!/usr/bin/env bash
# One GPU run of the engine, prepared so that a short loan of a GPU machine is enough:
# what the machine is, the demo model end to end, then the benchmark on the "1B" shape
# (bfloat16, batch 1 and 8, prompt 128, 128 new tokens) against Hugging Face
# transformers on the same GPU. Every step has its own time limit, so a stuck one
# leaves the others' results; everything goes to OUT (default ./gpu-check).
#
#   bash scripts/gpu_check.sh [OUT]
#
# It uses the machine's own Python with JAX (CUDA), Flax, Orbax, transformers and
# PyTorch already installed (ryzen_jax itself from this checkout, via PYTHONPATH), and
# installs nothing. Budget: about 8 minutes on an H100/H200, most of it the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RYZEN_JAX_CACHE="${RYZEN_JAX_CACHE:-/tmp/ryzen_jax_cache}"
PY="${PYTHON:-python3}"
SHAPE="${SHAPE:-1B}"  # SHAPE=tiny tries the script out on a CPU

step() {  # step NAME SECONDS COMMAND...: run it, log it, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    tail -n 40 "$OUT/$name.log"
}

step machine 60 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    $PY -c 'import jax, flax, orbax.checkpoint, transformers, torch; print(\"jax\", jax.__version__, jax.devices());
print(\"flax\", flax.__version__, \"transformers\", transformers.__version__, \"torch\", torch.__version__, torch.cuda.is_available())'"
step demo 180 "$PY" scripts/generate.py --max-new-tokens 32 --ignore-eos --json
step bench 420 "$PY" scripts/benchmark.py --model-size "$SHAPE" --batch-size 1 8 --prompt-len 128 --new-tokens 128 \
    --tp 1 --repeats 3 --json "$OUT/bench-$SHAPE.json" --plots "$OUT"
echo "results in $OUT: summary.txt, *.log, bench-SHAPE.json, *.png"
