#!/usr/bin/env bash
# One GPU run of the engine, prepared so that a short loan of a GPU machine is enough:
# what the machine is; float32 parity with Hugging Face at tp 1 on the GPU (Llama GQA,
# Mistral's window, GPT-2, T5: logits within 1e-4, the same greedy tokens); the
# benchmark on the "1B" shape (bfloat16, batch 1 and 8, prompt 128, 128 new tokens)
# against Hugging Face transformers on the same GPU; the demo model end to end. Every
# step has its own time limit (585 s in all, inside one 600 s device call), so a stuck
# one leaves the others' results; everything goes to OUT (default ./gpu-check).
#
#   bash scripts/gpu_check.sh [OUT]
#
# It uses the machine's own Python with JAX (CUDA), Flax, Orbax, transformers and
# PyTorch already installed (ryzen_jax itself from this checkout, via PYTHONPATH), and
# installs nothing. Budget: about 6 minutes on an H100/H200, most of it the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RYZEN_JAX_CACHE="${RYZEN_JAX_CACHE:-/tmp/ryzen_jax_cache}"
PY="${PYTHON:-python3}"
SHAPE="${SHAPE:-1B}"  # SHAPE=tiny PLATFORM=cpu tries the script out on a CPU
PLATFORM="${PLATFORM:-cuda}"  # where the parity tests run

step() {  # step NAME SECONDS COMMAND...: run it, log it, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    tail -n 40 "$OUT/$name.log"
}

step machine 45 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    $PY -c 'import jax, flax, orbax.checkpoint, transformers, torch; print(\"jax\", jax.__version__, jax.devices());
print(\"flax\", flax.__version__, \"transformers\", transformers.__version__, \"torch\", torch.__version__, torch.cuda.is_available())'"
step parity 150 env JAX_PLATFORMS="$PLATFORM" "$PY" -m pytest -q -s -x -p no:cacheprovider \
    "tests/test_parity.py::test_logits_and_greedy_match_hf[llama_gqa-tp1-dp1]" \
    "tests/test_parity.py::test_logits_and_greedy_match_hf[mistral-tp1-dp1]" \
    "tests/test_gpt2.py::test_logits_and_greedy_match_hf[1]" \
    "tests/test_t5.py::test_logits_and_greedy_match_hf[t5_relu-tp1]"
step bench 300 "$PY" scripts/benchmark.py --model-size "$SHAPE" --batch-size 1 8 --prompt-len 128 --new-tokens 128 \
    --tp 1 --repeats 3 --json "$OUT/bench-$SHAPE.json" --plots "$OUT"
step demo 90 "$PY" scripts/generate.py --max-new-tokens 32 --ignore-eos --json
echo "results in $OUT (8 files, what a device call brings back): machine, parity, bench and demo .log, bench-$SHAPE.json, 3 plots"
