"""scripts/generate.py end to end, as a user runs it, checked against Hugging Face."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
import transformers

from ryzen_jax.demo import DEMO_NAME, save_tokenizer, train_tokenizer, write_demo_hf_checkpoint
from tests import hf_models, mp_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_env(**extra: str) -> dict:
    """The environment a user's shell has: without the test session's 8 simulated
    devices, with the persistent compilation cache on."""
    env = {k: v for k, v in mp_helpers.user_env().items() if k != "RYZEN_JAX_COMPILE_CACHE"}
    return {**env, **extra}


def run_generate(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "scripts/generate.py", "--json", *args], cwd=ROOT, capture_output=True,
                          text=True, env=user_env(**(env or {})), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def hf_greedy(model_dir: str, prompt_ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf_models.greedy(model, prompt_ids, n)


def test_generate_on_a_converted_checkpoint_matches_hf(tmp_path):
    """Convert with scripts/convert_hf.py, then generate a batch of text prompts at tp=2."""
    hf_dir = tmp_path / "hf"
    cfg = transformers.LlamaConfig(**{**hf_models.BASE, "vocab_size": 512})
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    save_tokenizer(train_tokenizer(), str(hf_dir))
    conv = subprocess.run([sys.executable, "scripts/convert_hf.py", str(hf_dir), str(tmp_path / "conv")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]

    prompts = ["The weather is", "Distributed computing across many machines"]
    out, _ = run_generate("--model", str(tmp_path / "conv"), "--tp", "2", "--max-new-tokens", "12", "--logprobs", "2",
                          "--prompt-logprobs", "1",
                          *[a for p in prompts for a in ("--prompt", p)], env={"RYZEN_JAX_CACHE": str(tmp_path / "c")})
    assert os.listdir(tmp_path / "c" / "xla")  # the persistent compilation cache was written
    assert out["tp"] == 2 and len(out["outputs"]) == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for o in out["outputs"]:
        assert o["generated_ids"][: len(o["generated_ids"])] == hf_greedy(str(hf_dir), o["prompt_ids"], 12)[: len(o["generated_ids"])]
        assert len(o["generated_ids"]) == 12 or o["generated_ids"][-1] in (cfg.eos_token_id,)
        with torch.no_grad():  # --logprobs 2: the tokens' log-probabilities under HF's logits, and the 2 best
            logp = torch.log_softmax(hf(torch.tensor([o["prompt_ids"] + o["generated_ids"]])).logits[0], -1)
        logp = logp[len(o["prompt_ids"]) - 1:-1]
        n = len(o["generated_ids"])
        assert max(abs(a - float(b)) for a, b in zip(o["logprobs"], logp[range(n), o["generated_ids"]])) < 1e-4
        assert [[t for t, _ in top] for top in o["top_logprobs"]] == logp.topk(2).indices.tolist()
        with torch.no_grad():  # --prompt-logprobs 1: each prompt token's given those before it, and the best there
            logp = torch.log_softmax(hf(torch.tensor([o["prompt_ids"]])).logits[0, :-1], -1)
        n = len(o["prompt_ids"])
        assert o["prompt_logprobs"][0] is None and o["prompt_top_logprobs"][0] is None
        assert max(abs(a - float(b)) for a, b in zip(o["prompt_logprobs"][1:], logp[range(n - 1), o["prompt_ids"][1:]])) < 1e-4
        assert [[t for t, _ in top] for top in o["prompt_top_logprobs"][1:]] == logp.topk(1).indices.tolist()
        assert o["prompt_ranks"][0] is None  # each prompt token's rank: the tokens at least as likely
        for j, (t, rank) in enumerate(zip(o["prompt_ids"][1:], o["prompt_ranks"][1:])):
            assert int((logp[j] > logp[j, t] + 1e-4).sum()) + 1 <= rank <= int((logp[j] >= logp[j, t] - 1e-4).sum())
    for key in ("load_s", "compile_s", "time_to_first_token_s", "decode_tokens_per_s"):
        assert out["timings"][key] >= 0


def test_default_demo_model_on_four_cpu_devices(tmp_path):
    """No --model: the demo checkpoint is built on first use. On CPU in one process tp
    defaults to 1 (the 4 simulated devices share the cores) and --tp 4 splits it; both
    give HF's greedy tokens for the same seeded weights."""
    env = {"RYZEN_JAX_CACHE": str(tmp_path / "cache")}
    out, err = run_generate("--max-new-tokens", "8", env=env)
    assert "RANDOM weights" in err and "4 simulated CPU devices; tp defaults to 1" in err
    assert out["tp"] == 1 and out["dtype"] == "float32"
    split, err = run_generate("--max-new-tokens", "8", "--tp", "4", env=env)
    assert split["tp"] == 4 and "tp defaults to 1" not in err
    hf_dir = write_demo_hf_checkpoint(str(tmp_path / "demo_hf"))
    for o, s in zip(out["outputs"], split["outputs"]):
        assert o["generated_ids"] == hf_greedy(hf_dir, o["prompt_ids"], len(o["generated_ids"]))
        assert s["generated_ids"] == hf_greedy(hf_dir, s["prompt_ids"], len(s["generated_ids"]))
        assert isinstance(o["text"], str)
    assert os.path.isfile(tmp_path / "cache" / DEMO_NAME / "ryzen_jax.json")
    held, _ = run_generate("--max-new-tokens", "24", "--regex", r"[a-z]{2,6}@[a-z]{2,4}\.org", env=env)
    for o in held["outputs"]:  # each output the whole of a match, ended there
        assert o["finish_reason"] == "stop" and re.fullmatch(r"[a-z]{2,6}@[a-z]{2,4}\.org", o["text"]), o
