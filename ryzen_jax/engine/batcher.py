"""Continuous batching: a fixed set of decode slots that requests join and leave.

The device holds one cache and one decode state for ``slots`` rows. A new request
is prefilled alone (the engine's prefill program at batch 1) and its row is copied
into a free slot while the other slots keep their place; one decode program steps
every slot at once; a finished or cancelled request frees its slot immediately.

Every change is described by a :class:`Plan` (admit these requests into these
slots, cancel those, then run k decode steps). ``SlotBatcher.apply`` carries a plan
out. In a multi-process group the leader decides each plan and every process
applies the same plan, so all of them run the same programs in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import time
import jax
import jax.numpy as jnp
import numpy as np

from ryzen_jax import cache as kv
from ryzen_jax.engine.generate import Generator
from ryzen_jax.engine.request import Request, StreamDelta, _Row
from ryzen_jax.engine.sampling import Picked, SamplingArrays, SamplingParams


@dataclasses.dataclass(frozen=True)
class Admission:
    slot: int
    request: Request
    seed: int  # resolved by the leader, so every process samples alike


@dataclasses.dataclass(frozen=True)
class Plan:
    """One scheduler step: admissions, cancellations, then ``steps`` decode steps."""

    admit: tuple[Admission, ...] = ()
    cancel: tuple[int, ...] = ()
    steps: int = 1
    probe: bool = False  # run the health probe (a reduction over every device of the mesh)


    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        def request(r: dict) -> Request:  # JSON made the tuples lists and the settings a dict
            return Request(**{**r, "sampling": SamplingParams(**r["sampling"]),
                              "stop_token_ids": tuple(r["stop_token_ids"]), "stop": tuple(r["stop"])})

        admit = tuple(Admission(a["slot"], request(a["request"]), a["seed"]) for a in raw["admit"])
        return cls(admit=admit, cancel=tuple(raw["cancel"]), steps=raw["steps"], probe=raw["probe"])


@dataclasses.dataclass
class StepOutput:
    deltas: list[StreamDelta]  # StreamDelta.index is the slot
    finished: list[int]  # slots freed in this step
    ttft_s: dict[int, float]  # slot -> prefill time of a request admitted in this step
    healthy: bool | None = None  # the probe's answer, when the plan asked for it


class SlotBatcher:
    """Device-side slots over a Generator's programs (``slots`` rows of cache)."""

    def __init__(self, generator: Generator, slots: int):
        self.gen = generator
        self.slots = generator.batch_size(slots)
        self.rows: list[_Row | None] = [None] * self.slots
        self.bound = [0] * self.slots  # per slot: every cache position it has written is below this
        self.one = generator.batch_size(1)  # prefill rows (dp of them: a request plus padding)
        decode = generator.decode_program(self.slots)
        _, cache_sh, d_sh, s_sh, _ = decode.input_shardings[0]
        self._shardings = (cache_sh, d_sh, s_sh)

        def insert(big, small, slot):
            """Copy row 0 of every leaf of ``small`` into row ``slot`` of ``big``."""
            return jax.tree.map(lambda b, s: kv.put_row(b, s, slot), big, small)

        self._insert = jax.jit(insert, donate_argnums=(0,), out_shardings=self._shardings)
        self.cache, self.d, self.s = self._empty()
        self.masked = False  # the slots' settings hold some grammar's bitmask (structured outputs)
        # one value per device, summed over the whole mesh: answers only if every device (and process) does
        mesh = generator.tp.mesh
        self._probe_in = jax.device_put(np.ones(mesh.devices.size, np.float32),
                                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names)))
        self._probe = jax.jit(jnp.sum)

    def _empty(self):
        """All slots free: zeros everywhere, every row marked done."""
        shapes = self.gen.decode_inputs(self.slots)

        idle = SamplingArrays.from_params([SamplingParams()] * self.slots, [0] * self.slots, self.gen.cfg.vocab_size)

        def make():  # free slots: greedy, no penalty, no log-probabilities (no branch taken for them)
            cache, d, _ = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            return cache, dataclasses.replace(d, done=jnp.ones_like(d.done)), jax.tree.map(jnp.asarray, idle)

        return jax.jit(make, out_shardings=self._shardings)()

    # -- programs ---------------------------------------------------------------------
    def warmup(self) -> float:
        """Compile everything a server needs: prefill for every prompt bucket, the
        insert and the decode step. Returns the seconds spent."""
        t = self.gen.warmup(batch_sizes=(1,))
        t0 = time.perf_counter()
        self._insert_program(self.gen.prompt_buckets()[0])
        self.probe()
        return t + self.gen.warmup(batch_sizes=(self.slots,), prompt_buckets=[16]) + time.perf_counter() - t0

    def _insert_program(self, length: int):
        prefill = self.gen.prefill_program(self.one, length)
        _, small_d, small_cache = prefill.out_info
        small_s = self.gen._abstract_prefill_inputs(self.one, length)[3]
        big = (self.cache, self.d, self.s)
        return self.gen._get(f"insert-{self.slots}", self._insert, big, (small_cache, small_d, small_s),
                             jax.ShapeDtypeStruct((), jnp.int32))

    # -- steps ------------------------------------------------------------------------
    def probe(self) -> bool:
        """The health probe: True once every device has contributed to a reduction."""
        return float(self.gen._get("probe", self._probe, self._probe_in)(self._probe_in)) == self._probe_in.size

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def apply(self, plan: Plan) -> StepOutput:
        """Carry out one plan — cancellations (freeing slots), admissions, decode
        steps — and return the new tokens and text per slot."""
        out = StepOutput([], [], {})
        if plan.probe:
            out.healthy = self.probe()
        cancel = [i for i in plan.cancel if self.rows[i] is not None]
        for i in cancel:  # not reported as finished: whoever cancelled knows
            self.rows[i] = None
        ended = [i for i, r in enumerate(self.rows) if r is not None and r.stop_device]  # by a stop string
        if cancel or ended:
            self.d = self.gen.stop_rows(self.d, cancel + ended)
            for i in ended:
                self.rows[i] = None
        for a in plan.admit:
            if self.rows[a.slot] is not None:
                raise RuntimeError(f"slot {a.slot} is busy")
            self.gen.check([a.request])
            t0 = time.perf_counter()
            request = dataclasses.replace(a.request, sampling=dataclasses.replace(a.request.sampling, seed=a.seed))
            padded = [request] + [dataclasses.replace(request, max_new_tokens=1)] * (self.one - 1)
            length = self.gen.prompt_bucket(len(request.prompt_ids))
            row = self.gen.new_row(request)
            args = self.gen.prefill_inputs(padded, length, self.gen.allowed([row], self.one))
            first, d, cache, *prompt = self.gen.prefill_program(self.one, length, self.gen.scores_prompt([request]))(
                *args)
            insert = self._insert_program(length)
            self.cache, self.d, self.s = insert((self.cache, self.d, self.s), (cache, d, args[3]), jnp.int32(a.slot))
            first = self.gen.fetch_picked(first, [row])
            if prompt:
                self.gen.record_prompt([row], prompt[0])
            out.ttft_s[a.slot] = time.perf_counter() - t0
            self.rows[a.slot] = row
            self.masked |= row.matcher is not None  # its first mask is in its slot's settings now
            self.bound[a.slot] = 1 if self.gen.encoder_decoder else len(request.prompt_ids)
            self._collect(self._one_row(a.slot, first), out)
        if plan.steps and any(r is not None for r in self.rows):
            live = [i for i, r in enumerate(self.rows) if r is not None]
            # a constrained row's next mask follows its last token: one step, its mask placed
            constrained = any(self.rows[i].matcher is not None for i in live)
            steps = 1 if constrained else plan.steps
            if constrained or self.masked:
                self.s = self.gen.constrain(self.s, self.rows, self.slots)
                self.masked = constrained
            for i in live:
                self.bound[i] += steps
            decode = self.gen.decode_program(self.slots, self.gen.attend_for(max(self.bound[i] for i in live)))
            picked, self.d, self.cache = decode(self.gen.state, self.cache, self.d, self.s, jnp.int32(steps))
            self._collect(self.gen.fetch_picked(picked, self.rows, steps), out)
        return out

    def _one_row(self, slot: int, first: Picked) -> Picked:
        """A prefill's picks for the request in ``slot`` (its row 0) as a step of every slot."""
        def widen(x):
            wide = np.full((self.slots,) + x.shape[1:], -1, x.dtype)
            wide[slot] = x[0]
            return wide

        return jax.tree.map(widen, first)

    def _collect(self, picked: Picked, out: StepOutput) -> None:
        for delta in self.gen.take(self.rows, picked):
            out.deltas.append(delta)
            if delta.finish_reason is not None:
                out.finished.append(delta.index)
                # a row ended by a stop string keeps its slot until the device row is stopped (next apply)
                if not self.rows[delta.index].stop_device:
                    self.rows[delta.index] = None
