"""The serving loop: one thread owns the devices and turns queued requests into plans.

HTTP handlers (on the asyncio loop) ``submit`` requests and read their deltas from
an asyncio queue; they never touch the devices. The scheduler thread, each step,
admits waiting requests into free slots, cancels what clients abandoned, runs the
decode steps and hands every delta back to its request's queue. The queue in front
of the slots is bounded (``QueueFull`` → HTTP 429): beyond the free slots, at most
``max_queue`` requests wait.

Across processes the leader (process 0) publishes each plan through the
``jax.distributed`` key-value store and every follower applies the same plan
(``follow``), so all processes run the same programs in the same order. A watchdog
fails in-flight requests with an explicit error when a step stops returning (a dead
or stuck process), instead of letting clients hang.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any

import numpy as np

from ryzen_jax.engine.batcher import Admission, Plan, SlotBatcher
from ryzen_jax.engine.generate import DECODE_CHUNK
from ryzen_jax.engine.request import Request
from ryzen_jax.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound."""


class EngineFailed(RuntimeError):
    """The device group stopped answering; the request cannot complete."""


@dataclasses.dataclass
class Handle:
    """A submitted request as its HTTP handler sees it."""

    id: str
    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # StreamDelta, then None at the end, or an Exception
    created: float = dataclasses.field(default_factory=time.perf_counter)
    slot: int | None = None
    cancelled: bool = False
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0

    def push(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Channel:
    """Messages from the leader to the followers, in order, through the coordination
    service's key-value store (the same service jax.distributed already runs)."""

    def __init__(self, prefix: str):
        from jax._src import distributed  # the public API exposes no key-value store

        self.client = distributed.global_state.client
        self.prefix, self.n = prefix, 0

    def send(self, text: str | None) -> None:
        """Send the next message (None: shut down)."""
        self.client.key_value_set(f"{self.prefix}{self.n}", "" if text is None else text)
        if self.n >= 2:  # followers have read it: keep the store small
            try:
                self.client.key_value_delete(f"{self.prefix}{self.n - 2}")
            except Exception:  # noqa: BLE001 — deletion is housekeeping only
                pass
        self.n += 1

    def take(self, poll_s: float = 60.0) -> str | None:
        """The next message, waiting as long as the leader is idle (an idle server sends
        nothing); a dead leader ends the wait with the coordination service's error."""
        while True:
            try:
                text = self.client.blocking_key_value_get(f"{self.prefix}{self.n}", int(poll_s * 1000))
                break
            except Exception as e:  # noqa: BLE001 — the client raises its own status type
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self.n += 1
        return text or None


class PlanChannel(Channel):
    """The scheduler's plans, from the leader to the followers."""

    def __init__(self):
        super().__init__("ryzen_jax/plan/")

    def publish(self, plan: Plan | None) -> None:
        """Send the next plan (None: shut down)."""
        self.send(None if plan is None else plan.to_json())

    def receive(self, poll_s: float = 60.0) -> Plan | None:
        text = self.take(poll_s)
        return Plan.from_json(text) if text is not None else None


class Scheduler:
    """Continuous batching over a SlotBatcher, fed from a bounded queue."""

    def __init__(self, batcher: SlotBatcher, *, max_queue: int = 64, steps_per_dispatch: int = 1,
                 channel: PlanChannel | None = None, step_timeout_s: float = 60.0,
                 metrics: ServerMetrics | None = None, seed: int | None = None):
        if not 1 <= steps_per_dispatch <= DECODE_CHUNK or max_queue < 0:
            raise ValueError(f"steps_per_dispatch must be in [1, {DECODE_CHUNK}] and max_queue >= 0, got "
                             f"{steps_per_dispatch} and {max_queue}")
        self.batcher = batcher
        self.max_queue = max_queue
        self.steps = steps_per_dispatch
        self.channel = channel
        self.step_timeout_s = step_timeout_s
        self.metrics = metrics or ServerMetrics()
        self.waiting: collections.deque[Handle] = collections.deque()
        self.active: dict[int, Handle] = {}
        self.failed: str | None = None  # why the device group is considered dead
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self._probes: list[tuple[threading.Event, list]] = []
        self._step_started: float | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ryzen-jax-scheduler", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="ryzen-jax-watchdog", daemon=True)

    # -- called from HTTP handlers ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue a (checked) request; raises QueueFull or EngineFailed at once."""
        return self.submit_all([request], loop)[0]

    def submit_all(self, requests: list[Request], loop: asyncio.AbstractEventLoop) -> list[Handle]:
        """Queue every request (the choices of one HTTP request) or none: QueueFull when
        they do not all fit, EngineFailed when the group has failed."""
        with self._lock:
            if self.failed:
                raise EngineFailed(self.failed)
            free = self.batcher.slots - len(self.active)  # the next step admits that many at once
            if len(self.waiting) + len(requests) > self.max_queue + max(0, free):
                raise QueueFull(f"{len(self.active)} requests running and {len(self.waiting)} waiting "
                                f"(--max-queue {self.max_queue})" + (f"; {len(requests)} choices do not fit"
                                                                     if len(requests) > 1 else "") + "; retry later")
            handles = [Handle(f"{next(self._ids)}", r, loop, asyncio.Queue()) for r in requests]
            self.waiting.extend(handles)
            self.metrics.queue_depth.set(len(self.waiting))
            self._lock.notify()
        return handles

    def cancel(self, handle: Handle) -> None:
        """The client went away: free the slot at the next step (or drop it from the queue)."""
        with self._lock:
            if handle.cancelled:
                return
            handle.cancelled = True
            if handle in self.waiting:
                self.waiting.remove(handle)
                self.metrics.finish("cancelled")
            self._lock.notify()

    def health(self, timeout_s: float = 5.0) -> bool:
        """Ask the scheduler thread to run the probe over every device; False if it has
        not answered within ``timeout_s`` (or the group has already failed)."""
        if self.failed or not self._thread.is_alive():
            return False
        done, answer = threading.Event(), []
        with self._lock:
            self._probes.append((done, answer))
            self._lock.notify()
        return done.wait(timeout_s) and bool(answer and answer[0])

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # -- the scheduler thread -----------------------------------------------------------
    def _plan(self) -> tuple[Plan, dict[int, Handle], list] | None:
        """The next plan, the handles it admits (by slot) and the health probes it
        answers; None to stop. Waits while there is nothing to do."""
        with self._lock:
            while not (self._stop or self.waiting or self.active or self._probes):
                self._lock.wait(timeout=1.0)
            if self._stop:
                return None
            cancel = tuple(slot for slot, h in self.active.items() if h.cancelled)
            for slot in cancel:
                self.active.pop(slot).push(None)
                self.metrics.finish("cancelled")
            free = [s for s in range(self.batcher.slots) if s not in self.active]
            admitted: dict[int, Handle] = {}
            admit = []
            while free and self.waiting:
                h = self.waiting.popleft()
                h.slot = free.pop(0)
                seed = h.request.sampling.seed
                admit.append(Admission(h.slot, h.request, int(self._seeds.integers(2**32)) if seed is None else seed))
                admitted[h.slot] = h
                self.active[h.slot] = h
                self.metrics.prompt_tokens.inc(len(h.request.prompt_ids))
            probes, self._probes = self._probes, []
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.busy_slots.set(len(self.active))
            return Plan(admit=tuple(admit), cancel=cancel, steps=self.steps, probe=bool(probes)), admitted, probes

    def _run(self) -> None:
        try:
            while True:
                planned = self._plan()
                if self.channel is not None:
                    self.channel.publish(planned[0] if planned else None)
                if planned is None:
                    return
                plan, admitted, probes = planned
                self._step_started = time.perf_counter()
                out = self.batcher.apply(plan)
                self._step_started = None
                for done, answer in probes:
                    answer.append(bool(out.healthy))
                    done.set()
                self._deliver(out, admitted)
        except Exception as e:  # noqa: BLE001 — any failure here ends every request explicitly
            log.exception("the serving loop failed")
            self._fail(f"the device loop failed: {e}")

    def _deliver(self, out, admitted: dict[int, Handle]) -> None:
        now = time.perf_counter()
        with self._lock:
            for delta in out.deltas:
                h = self.active.get(delta.index)
                if h is None:
                    continue
                if h.first_token is None:
                    h.first_token = now
                    self.metrics.ttft.observe(now - h.created)
                elif h.last_token is not None:
                    self.metrics.itl.observe((now - h.last_token) / max(1, len(delta.token_ids)))
                h.last_token = now
                h.generated += len(delta.token_ids)
                self.metrics.generation_tokens.inc(len(delta.token_ids))
                if not h.cancelled:
                    h.push(delta)
            for slot in out.finished:
                h = self.active.pop(slot, None)
                if h is None:
                    continue
                if h.cancelled:  # the client left during the step that finished it
                    h.push(None)
                    self.metrics.finish("cancelled")
                    continue
                h.push(None)
                self.metrics.finish("ok")
                self.metrics.e2e.observe(now - h.created)
            self.metrics.busy_slots.set(len(self.active))

    def _fail(self, why: str) -> None:
        with self._lock:
            self.failed = self.failed or why
            for h in list(self.active.values()) + list(self.waiting):
                h.push(EngineFailed(self.failed))
                self.metrics.finish("error")
            self.active.clear()
            self.waiting.clear()
            for done, answer in self._probes:
                answer.append(False)
                done.set()
            self._probes = []

    def _watch(self) -> None:
        """Fail in-flight requests when a step hangs (a dead or stopped process)."""
        while not self._stop and not self.failed:
            started = self._step_started
            if started is not None and time.perf_counter() - started > self.step_timeout_s:
                self._fail(f"a decode step has not returned in {self.step_timeout_s:.0f}s: "
                           "a process of the device group is dead or stuck; restart the group")
                return
            time.sleep(min(1.0, self.step_timeout_s / 4))


def follow(batcher: SlotBatcher, channel: PlanChannel) -> None:
    """A follower process: apply the leader's plans until it says stop."""
    while True:
        plan = channel.receive()
        if plan is None:
            return
        batcher.apply(plan)

