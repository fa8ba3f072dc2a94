"""A local launcher: N processes of one command as a JAX process group, restarted
together when any of them fails.

    python scripts/launch.py --nproc 2 --devices-per-proc 2 --max-restarts 2 -- python scripts/generate.py

Each process gets the torchrun-style variables ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (which
``ryzen_jax.runtime.setup_host_devices`` turns into ``jax.distributed.initialize``),
plus ``RYZEN_JAX_*`` variables below. Every output line is prefixed ``[rank i]``.

Failure detection (why a group restart and not a process restart: JAX cannot re-form a
process group inside a running process, and the survivors of a dead peer are stuck in
its collectives, so the only recovery is to start every process again):

* **exit** — a process that exits with a non-zero code (a crash, SIGKILL, the OOM
  killer, or ``MultiGPUOrchestrator.attempt_recovery``'s ``RESTART_EXIT_CODE``) is
  seen within one poll interval (0.1 s).
* **heartbeat** — processes that use ``ryzen_jax.runtime`` run a daemon thread that
  touches ``$RYZEN_JAX_HEARTBEAT_FILE`` every ``heartbeat_timeout / 5`` seconds. A
  file older than ``--heartbeat-timeout`` means the process is stopped (SIGSTOP,
  a debugger) or frozen holding the GIL. Watching starts at the first beat, so a
  command that never writes one is watched for its exit only. A process blocked in a
  collective whose peer died still beats: the dead peer is what gets detected.

On a failure the launcher stops every process of the group (SIGKILL: JAX treats
SIGTERM as a preemption notice and keeps running), and starts the whole group again on a fresh port, up to
``max_restarts`` times; then it exits non-zero naming the failed rank and its exit code.
This module does not import jax: the launcher itself stays light.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO

ENV_LAUNCHED = "RYZEN_JAX_LAUNCHED"  # "1" in processes started by the launcher
ENV_RESTART_COUNT = "RYZEN_JAX_RESTART_COUNT"  # 0 on the first attempt, then 1, 2, ...
ENV_DEVICES_PER_PROC = "RYZEN_JAX_DEVICES_PER_PROC"  # devices each process takes (fake CPU devices, or GPU ids)
ENV_HEARTBEAT_FILE = "RYZEN_JAX_HEARTBEAT_FILE"
ENV_HEARTBEAT_INTERVAL = "RYZEN_JAX_HEARTBEAT_INTERVAL"
ENV_HEARTBEAT_TIMEOUT = "RYZEN_JAX_HEARTBEAT_TIMEOUT"  # also JAX's coordination-service heartbeat
ENV_INIT_TIMEOUT = "RYZEN_JAX_INIT_TIMEOUT"

#: Exit code a process uses to ask its launcher for a group restart (EX_TEMPFAIL: "try again").
RESTART_EXIT_CODE = 75

_DEVICE_COUNT_FLAG = re.compile(r"\s*--xla_force_host_platform_device_count=\S*")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, n: int) -> str:
    """``xla_flags`` with its simulated-CPU-device count set to ``n`` (replacing any earlier one)."""
    return f"{_DEVICE_COUNT_FLAG.sub('', xla_flags)} --xla_force_host_platform_device_count={n}".strip()


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What to start and how to watch it. ``heartbeat_timeout_s=0`` disables heartbeats."""

    nproc: int
    command: tuple[str, ...]
    devices_per_proc: int | None = None
    max_restarts: int = 0
    port: int | None = None  # first attempt's coordinator port (then port + attempt); None: a free port each time
    master_addr: str = "127.0.0.1"
    heartbeat_timeout_s: float = 60.0
    init_timeout_s: float = 120.0
    poll_s: float = 0.1

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if not self.command:
            raise ValueError("no command to launch: put it after '--', e.g. launch.py --nproc 2 -- python app.py")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.devices_per_proc is not None and self.devices_per_proc < 1:
            raise ValueError(f"--devices-per-proc must be >= 1, got {self.devices_per_proc}")


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a group attempt was stopped: which rank, how, and when it was seen (unix time)."""

    attempt: int
    rank: int
    returncode: int | None  # None: the process was alive but stopped answering
    reason: str  # "exit" | "heartbeat"
    detected_at: float
    silent_s: float = 0.0  # heartbeat failures: seconds since the last beat

    def describe(self) -> str:
        if self.reason == "heartbeat":
            return f"rank {self.rank} stopped answering (no heartbeat for {self.silent_s:.1f}s)"
        rc = self.returncode
        if rc == RESTART_EXIT_CODE:
            return f"rank {self.rank} asked for a group restart (exit code {rc})"
        if rc is not None and rc < 0:
            return f"rank {self.rank} was killed by {_signal_name(-rc)} (exit code {rc})"
        return f"rank {self.rank} exited with code {rc}"

    @property
    def exit_status(self) -> int:
        """The launcher's own exit status for this failure (shell convention: 128 + signal)."""
        if self.returncode is None:
            return 1
        return self.returncode if self.returncode > 0 else 128 - self.returncode


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # real-time signals have no name
        return f"signal {signum}"


@dataclasses.dataclass
class LaunchResult:
    returncode: int
    attempts: int
    failures: list[Failure]


def child_env(cfg: LaunchConfig, rank: int, port: int, attempt: int, heartbeat_file: str | None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``rank`` in attempt ``attempt`` (torchrun names + ours)."""
    env = dict(os.environ if base is None else base)
    env.update(MASTER_ADDR=cfg.master_addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cfg.nproc),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(cfg.nproc), PYTHONUNBUFFERED="1")
    env[ENV_LAUNCHED] = "1"
    env[ENV_RESTART_COUNT] = str(attempt)
    env[ENV_INIT_TIMEOUT] = str(cfg.init_timeout_s)
    if cfg.devices_per_proc is not None:
        env[ENV_DEVICES_PER_PROC] = str(cfg.devices_per_proc)
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), cfg.devices_per_proc)
    if heartbeat_file is not None:
        env[ENV_HEARTBEAT_FILE] = heartbeat_file
        env[ENV_HEARTBEAT_INTERVAL] = str(cfg.heartbeat_timeout_s / 5)
        env[ENV_HEARTBEAT_TIMEOUT] = str(cfg.heartbeat_timeout_s)
    return env


def start_heartbeat() -> threading.Thread | None:
    """In a launched process: touch ``$RYZEN_JAX_HEARTBEAT_FILE`` periodically from a
    daemon thread (it dies with the process and never blocks its exit). No-op outside the launcher."""
    path = os.environ.get(ENV_HEARTBEAT_FILE)
    if not path:
        return None
    interval = float(os.environ.get(ENV_HEARTBEAT_INTERVAL, "5"))

    def beat() -> None:
        while True:
            try:
                with open(path, "a"):
                    os.utime(path)
            except OSError:  # the launcher removed its directory: it is going away
                return
            time.sleep(interval)

    thread = threading.Thread(target=beat, name="ryzen_jax-heartbeat", daemon=True)
    thread.start()
    return thread


class _Output:
    """Copies a child's lines to our stdout/stderr, each prefixed with its rank."""

    def __init__(self, stdout: IO[str], stderr: IO[str]):
        self.streams = {"stdout": stdout, "stderr": stderr}
        self.lock = threading.Lock()

    def pump(self, rank: int, pipe: IO[bytes], which: str) -> threading.Thread:
        def run() -> None:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.write(which, f"[rank {rank}] {line}")
            pipe.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def write(self, which: str, line: str) -> None:
        """Write one line; a closed reader (``launch.py ... | head``) drops it instead of
        stopping the copy, so the child never blocks on a full pipe."""
        with self.lock:
            stream = self.streams[which]
            if stream is None:
                return
            try:
                stream.write(line + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError):  # reader gone, or the stream closed
                self.streams[which] = None


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # each child leads its own process group: its children go too
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL every child's process group (what a rank started goes too, even when the
    rank itself has already exited), and reap them.

    Not SIGTERM: JAX takes SIGTERM as a preemption notice and keeps running, and a
    process blocked in a collective with a lost peer has nothing left to save."""
    for p in procs:
        _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


#: run before the rank's command, in the child: be killed when the launcher dies, however
#: it dies (SIGKILL, out of memory, a closed terminal), instead of living on with its
#: devices (Linux PR_SET_PDEATHSIG, kept across exec); then become the command. A small
#: exec wrapper rather than Popen's preexec_fn, which forks a threaded parent.
_DIE_WITH_PARENT = ("import ctypes, os, sys\n"
                    "ctypes.CDLL(None).prctl(1, 9)\n"  # PR_SET_PDEATHSIG, SIGKILL
                    "os.getppid() == int(sys.argv[1]) or sys.exit(1)\n"  # the launcher died meanwhile
                    "os.execvp(sys.argv[2], sys.argv[2:])")


def _child_command(command: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def _run_group(cfg: LaunchConfig, attempt: int, port: int, workdir: str, out: _Output) -> Failure | None:
    """Start one attempt of the group and watch it until it succeeds or one rank fails."""
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    beats = [os.path.join(workdir, f"attempt{attempt}.rank{r}") if cfg.heartbeat_timeout_s > 0 else None
             for r in range(cfg.nproc)]
    try:
        for rank in range(cfg.nproc):
            p = subprocess.Popen(_child_command(cfg.command), env=child_env(cfg, rank, port, attempt, beats[rank]),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            procs.append(p)
            pumps += [out.pump(rank, p.stdout, "stdout"), out.pump(rank, p.stderr, "stderr")]
        while True:
            codes = [p.poll() for p in procs]
            now = time.time()
            failed = [(rank, rc) for rank, rc in enumerate(codes) if rc is not None and rc != 0]
            if failed:  # several at once: a killed rank is the cause, the others its peers noticing
                rank, rc = min(failed, key=lambda f: (f[1] >= 0, f[0]))
                return Failure(attempt, rank, rc, "exit", now)
            if all(rc == 0 for rc in codes):
                return None
            for rank, (rc, beat) in enumerate(zip(codes, beats)):
                if rc is None and beat is not None and os.path.exists(beat):
                    silent = now - os.stat(beat).st_mtime
                    if silent > cfg.heartbeat_timeout_s:
                        return Failure(attempt, rank, None, "heartbeat", now, silent)
            time.sleep(cfg.poll_s)
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)


def launch(cfg: LaunchConfig, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> LaunchResult:
    """Run the group to completion, restarting it on failures (see the module docstring)."""
    if shutil.which(cfg.command[0]) is None:
        raise ValueError(f"command {cfg.command[0]!r} not found (not an executable file, nor on PATH)")
    out = _Output(stdout or sys.stdout, stderr or sys.stderr)
    say = lambda msg: out.write("stderr", f"[launch] {msg}")  # noqa: E731
    failures: list[Failure] = []
    workdir = tempfile.mkdtemp(prefix="ryzen_jax_launch_")
    try:
        for attempt in range(cfg.max_restarts + 1):
            port = cfg.port + attempt if cfg.port else free_port(cfg.master_addr)
            say(f"attempt {attempt + 1}/{cfg.max_restarts + 1}: {cfg.nproc} processes, coordinator "
                f"{cfg.master_addr}:{port}" + (f", {cfg.devices_per_proc} devices each" if cfg.devices_per_proc else ""))
            failure = _run_group(cfg, attempt, port, workdir, out)
            if failure is None:
                say(f"all {cfg.nproc} processes finished")
                return LaunchResult(0, attempt + 1, failures)
            failures.append(failure)
            say(f"{failure.describe()}; stopped the group in {time.time() - failure.detected_at:.2f}s "
                f"(detected at unix time {failure.detected_at:.3f})")
            if attempt < cfg.max_restarts:
                say(f"restarting the whole group on a fresh port (restart {attempt + 1} of {cfg.max_restarts})")
        last = failures[-1]
        say(f"giving up after {cfg.max_restarts} restart(s): {last.describe()}")
        return LaunchResult(last.exit_status, cfg.max_restarts + 1, failures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Stopped(KeyboardInterrupt):
    """The launcher got a termination signal (its number kept for the exit status)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupt(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``scripts/launch.py`` command line."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s --nproc N [options] -- COMMAND [ARGS ...]")
    ap.add_argument("--nproc", type=int, required=True, help="processes to start on this host")
    ap.add_argument("--devices-per-proc", type=int, default=None,
                    help="devices each process takes: K simulated CPU devices, or GPUs LOCAL_RANK*K ... +K-1")
    ap.add_argument("--max-restarts", type=int, default=0, help="group restarts before giving up (default 0)")
    ap.add_argument("--port", type=int, default=None, help="coordinator port of the first attempt (default: a free one)")
    ap.add_argument("--master-addr", default="127.0.0.1", help="coordinator address (default 127.0.0.1: loopback only)")
    ap.add_argument("--heartbeat-timeout", type=float, default=60.0,
                    help="seconds without a heartbeat before a process counts as stuck (0: off; default 60)")
    ap.add_argument("--init-timeout", type=float, default=120.0,
                    help="seconds each process waits for the whole group to join the coordinator (default 120)")
    args = ap.parse_args(argv)
    try:
        cfg = LaunchConfig(nproc=args.nproc, command=tuple(command), devices_per_proc=args.devices_per_proc,
                           max_restarts=args.max_restarts, port=args.port, master_addr=args.master_addr,
                           heartbeat_timeout_s=args.heartbeat_timeout, init_timeout_s=args.init_timeout)
    except ValueError as e:
        ap.error(str(e))
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):  # run the clean-up in launch()'s finally blocks
        signal.signal(sig, _raise_interrupt)
    try:
        return launch(cfg).returncode
    except ValueError as e:
        print(f"[launch] error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, _Stopped) else signal.SIGINT
        try:
            print(f"[launch] {_signal_name(signum)}: stopped every process", file=sys.stderr)
        except OSError:
            pass
        return 128 + signum
