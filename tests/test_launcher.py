"""scripts/launch.py: per-rank output, group restarts on a failed or stopped process, the
exit status naming the failed rank; then real JAX groups under it: a SIGKILLed worker
is replaced by a restarted group that produces 1 process × 4 devices' tokens, and
scripts/generate.py runs under it unchanged."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import pytest
import torch
import transformers

import ryzen_jax as rj
from ryzen_jax import launcher
from ryzen_jax.demo import save_tokenizer, train_tokenizer
from tests import hf_models
from tests.mp_helpers import PROMPTS, ROOT, launch, own_slice_bytes, rank_json, run_worker

# A child that fails (exit 3) as rank 1 on the first attempt only, and says hello on stdout and stderr.
FLAKY = ("import os, sys; r = os.environ['RANK']; print('hello from', r, os.environ['MASTER_PORT']); "
         "print('to stderr', file=sys.stderr); "
         "sys.exit(3 if r == '1' and os.environ['RYZEN_JAX_RESTART_COUNT'] == '0' else 0)")


def run_launch(cfg: launcher.LaunchConfig) -> tuple[launcher.LaunchResult, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return launcher.launch(cfg, out, err), out.getvalue(), err.getvalue()


def test_child_environment():
    cfg = launcher.LaunchConfig(nproc=2, command=("x",), devices_per_proc=3)
    env = launcher.child_env(cfg, 1, 1234, 2, "/tmp/beat", base={"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=3"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == \
        ("127.0.0.1", "1234", "1", "2", "1")
    assert env[launcher.ENV_RESTART_COUNT] == "2" and env[launcher.ENV_HEARTBEAT_FILE] == "/tmp/beat"


def test_a_failed_process_restarts_the_whole_group_on_a_fresh_port():
    res, out, err = run_launch(launcher.LaunchConfig(nproc=2, command=(sys.executable, "-c", FLAKY), max_restarts=1))
    assert res.returncode == 0 and res.attempts == 2
    assert [(f.rank, f.returncode, f.reason) for f in res.failures] == [(1, 3, "exit")]
    ports = {line.split()[-1] for line in out.splitlines() if "hello from" in line}
    assert len(ports) == 2  # each attempt had its own coordinator port
    assert "[rank 0] hello from 0" in out and "[rank 1] to stderr" in err
    assert "rank 1 exited with code 3" in err and "restarting the whole group" in err


def test_gives_up_after_max_restarts_naming_the_rank_and_its_exit_code():
    """The command line: every attempt fails, the launcher exits with the rank's status."""
    child = "import os, sys; sys.exit(7 if os.environ['RANK'] == '1' else 0)"
    run = subprocess.run([sys.executable, "scripts/launch.py", "--nproc", "2", "--max-restarts", "1", "--",
                          sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 7
    assert run.stderr.count("attempt ") == 2
    assert "giving up after 1 restart(s): rank 1 exited with code 7" in run.stderr


def test_a_stopped_process_is_caught_by_its_heartbeat():
    """Rank 1 beats once, then freezes (SIGSTOP): after the heartbeat timeout the launcher
    stops the group (SIGKILL works on a stopped process) instead of waiting forever."""
    child = ("import os, signal, time\n"
             "for _ in range(1200):\n"
             "    open(os.environ['RYZEN_JAX_HEARTBEAT_FILE'], 'a').close(); os.utime(os.environ['RYZEN_JAX_HEARTBEAT_FILE'])\n"
             "    os.environ['RANK'] == '1' and os.kill(os.getpid(), signal.SIGSTOP)\n"
             "    time.sleep(0.1)\n")
    t0 = time.monotonic()
    res, _, err = run_launch(launcher.LaunchConfig(nproc=2, command=(sys.executable, "-c", child),
                                                   heartbeat_timeout_s=1.0))
    assert time.monotonic() - t0 < 30  # nowhere near the children's 120 s of beating
    assert res.returncode == 1 and [(f.rank, f.reason) for f in res.failures] == [(1, "heartbeat")]
    assert "rank 1 stopped answering (no heartbeat for" in err


def test_heartbeat_thread_touches_the_file(tmp_path, monkeypatch):
    beat = tmp_path / "beat"
    monkeypatch.setenv(launcher.ENV_HEARTBEAT_FILE, str(beat))
    monkeypatch.setenv(launcher.ENV_HEARTBEAT_INTERVAL, "0.05")
    thread = launcher.start_heartbeat()
    time.sleep(0.3)
    assert thread.daemon and beat.exists() and time.time() - beat.stat().st_mtime < 1


def _alive(pattern: str) -> list[str]:
    run = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return run.stdout.split()


def test_nothing_a_rank_started_outlives_the_group():
    """A rank's own children go with it — after a failure, a restart or a clean finish —
    and the process killed by a signal is named even when its peer fails at once too."""
    marker = f"sleep 3{time.monotonic_ns() % 1000:03d}"  # a command line no one else runs
    child = f"{marker} & if [ $RANK = 1 ]; then kill -9 $$; else exit 0; fi"
    res, _, err = run_launch(launcher.LaunchConfig(nproc=2, command=("bash", "-c", child), max_restarts=1))
    assert res.returncode == 137 and [f.rank for f in res.failures] == [1, 1]
    assert "rank 1 was killed by SIGKILL" in err
    assert _alive(marker) == []
    res, _, _ = run_launch(launcher.LaunchConfig(nproc=2, command=("bash", "-c", f"{marker} & exit 0")))
    assert res.returncode == 0 and _alive(marker) == []


def test_a_hangup_or_a_closed_pipe_ends_the_group():
    """SIGHUP (a closed terminal) stops every process, exit status 128 + 1; a reader
    that goes away (| head) does not leave the children blocked on their output."""
    marker = f"sleep 4{time.monotonic_ns() % 1000:03d}"
    proc = subprocess.Popen([sys.executable, "scripts/launch.py", "--nproc", "2", "--", "bash", "-c",
                             f"echo up; {marker}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "up" in proc.stdout.readline()
    proc.send_signal(__import__("signal").SIGHUP)
    assert proc.wait(timeout=30) == 129
    time.sleep(0.5)
    assert _alive(marker) == []
    chatty = "import sys\nfor i in range(200000): print(i)"
    run = subprocess.run(f"{sys.executable} scripts/launch.py --nproc 1 -- {sys.executable} -c '{chatty}' | head -1",
                         shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "[rank 0] 0"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no command to launch"):
        launcher.LaunchConfig(nproc=2, command=())
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        launcher.LaunchConfig(nproc=0, command=("x",))
    run = subprocess.run([sys.executable, "scripts/launch.py", "--nproc", "2", "--", "no-such-program-here"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "'no-such-program-here' not found" in run.stderr, run.stderr


# -- real JAX process groups --------------------------------------------------------------


@pytest.fixture(scope="module")
def one_by_four(hf_model_dir):
    """1 process × 4 devices (this one, on 4 of its 8), as tests/mp_worker.py generates:
    the tokens the 2 × 2 group must reproduce."""
    lm = rj.load_model(hf_model_dir("llama_gqa"), tp=4, progress=False)
    assert lm.tp.mesh.devices.size == 4
    return lm.generator.generate(PROMPTS, 16, stop_ids=[]).generated_ids


@pytest.fixture(scope="module")
def killed_once(hf_model_dir, tmp_path_factory):
    """2 processes × 2 devices, tp = 4; on the first attempt rank 1 SIGKILLs itself after
    the first token. With the persistent compilation cache on, as scripts run."""
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    return run_worker(hf_model_dir("llama_gqa"), 4, 1, 2, 2, "--die-rank", "1", "--compile-cache", cache,
                      max_restarts=1)


def test_two_by_two_after_a_restart_matches_one_by_four(killed_once, one_by_four, hf_model_dir):
    results, _ = killed_once
    assert all(r["devices"] == 4 for r in results)
    for r in results:
        assert r["tokens"] == one_by_four
        assert r["bytes_read"] == own_slice_bytes(hf_model_dir("llama_gqa"), tp=4, nproc=2)
    print(f"\n2x2 rank 0: load {results[0]['load_s']:.2f}s, ttft {results[0]['ttft_s'] * 1e3:.1f} ms, "
          f"decode {results[0]['decode_tokens_per_s']:.1f} tok/s")


def test_a_sigkilled_worker_is_replaced_by_a_restarted_group(killed_once):
    results, run = killed_once
    dying = [r for r in rank_json(run.stdout) if r.get("event") == "dying"]
    assert [d["rank"] for d in dying] == [1]
    assert "rank 1 was killed by SIGKILL (exit code -9)" in run.stderr
    assert all(r["attempt"] == 1 for r in results)  # the results come from the restarted group
    detected = float(re.search(r"detected at unix time ([\d.]+)", run.stderr).group(1))
    died = dying[0]["t"]
    first_token = max(r["first_token_at"] for r in results)
    assert died < detected < first_token
    since = {k: max(r[f"{k}_at"] for r in results) - died for k in ("started", "joined", "loaded", "first_token")}
    print(f"\ndeath -> detection {detected - died:.3f}s; restarted group, seconds after the death: " +
          ", ".join(f"{k} {v:.1f}" for k, v in since.items()))


@pytest.fixture(scope="module")
def tokenized_model(tmp_path_factory):
    """A tiny Llama with a tokenizer: scripts/generate.py takes text prompts."""
    out = tmp_path_factory.mktemp("tok_llama")
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**hf_models.BASE, "vocab_size": 512})).save_pretrained(out)
    save_tokenizer(train_tokenizer(), str(out))
    return str(out)


def test_generate_script_runs_under_the_launcher(tokenized_model, tmp_path):
    """scripts/generate.py, unchanged, as 2 processes × 2 devices (tp = 4 across them):
    process 0 prints Hugging Face's tokens."""
    prompt = "The weather in the mountains"
    run = launch(2, 2, "scripts/generate.py", "--model", tokenized_model, "--json", "--max-new-tokens", "8",
                 "--prompt", prompt, env={"RYZEN_JAX_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    main = [o for o in rank_json(run.stdout) if o["rank"] == 0]
    assert len(main) == 1 and main[0]["tp"] == 4
    out = main[0]["outputs"][0]
    expected = hf_models.greedy(hf_models.load(tokenized_model), out["prompt_ids"], 8)
    assert out["generated_ids"] == expected[: len(out["generated_ids"])]  # the CLI stops at EOS


def test_a_mesh_that_leaves_a_process_out_is_refused_by_that_process(tokenized_model, tmp_path):
    """tp = 2 of 2 processes × 2 devices takes process 0's two: process 1, which could take
    no part in its programs, says so and names the fix, and the launcher stops the group."""
    run = launch(2, 2, "scripts/generate.py", "--model", tokenized_model, "--tp", "2", "--max-new-tokens", "2",
                 env={"RYZEN_JAX_CACHE": str(tmp_path / "cache")})
    assert run.returncode != 0
    assert ("[rank 1] error: tp=2 × dp=1 takes the first 2 of 4 devices, none of them process 1's: in a run of 2 "
            "processes the mesh must hold devices of every process; raise tp × dp to 4") in run.stderr
