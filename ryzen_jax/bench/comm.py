"""Communication of the compiled decode step, read from XLA's optimized HLO, next to
the Megatron floor: two all-reduces per layer (after attention, after the MLP) of the
hidden states, batch × hidden × bytes each.

Every collective of the decode program sits in its ``while`` loop body (one decode
step), so the collectives the text lists are the ones each step runs.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.-]+ = (\([^)]*\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\(")
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_DIMENSION = re.compile(r"\bdimensions=\{(\d+)\}")
#: HLO element type -> NumPy dtype name, for the types collectives carry here
HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32", "u32": "uint32",
              "f64": "float64", "s8": "int8", "u8": "uint8", "s16": "int16", "u16": "uint16", "s64": "int64",
              "u64": "uint64", "pred": "bool"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of an HLO module: its kind, its result shape as HLO prints it, the
    dimension an all-gather or reduce-scatter works along, and whether it is the start
    of an asynchronous pair (whose all-gather result is an (operand, result) tuple)."""

    kind: str
    shape: str
    dimension: int | None
    start: bool

    def results(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HLO element type, dimensions) of each array the collective produces."""
        arrays = [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(self.shape)]
        return arrays[-1:] if self.start and self.kind in ("all-gather", "reduce-scatter") else arrays


def collective_ops(hlo: str) -> list[Collective]:
    """Every collective in an optimized HLO module, in program order."""
    out = []
    for line in hlo.splitlines():
        m = COLLECTIVE.match(line)
        if m:
            dim = _DIMENSION.search(line)
            out.append(Collective(m.group(2), m.group(1), int(dim.group(1)) if dim else None, bool(m.group(3))))
    return out


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(kind, result shape) of every collective in an optimized HLO module."""
    return [(c.kind, c.shape) for c in collective_ops(hlo)]


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape such as ``f32[8,1,512]{2,1,0}`` (tuples: the sum)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _BYTES:
            raise ValueError(f"unknown HLO element type {dtype!r} in {shape!r}")
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def shape_elements(shape: str) -> int:
    """Elements of an HLO result shape (tuples: the sum)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape))


@dataclasses.dataclass
class CommReport:
    """Collectives of one decode step (one device's view), against the Megatron floor.

    Bytes are the result sizes of the collectives (the payload each device ends with),
    not what a particular all-reduce algorithm sends over the wire.
    """

    tp: int
    batch: int
    count: dict[str, int]  # kind -> collectives per step
    bytes: dict[str, int]  # kind -> payload bytes per step
    total_count: int
    total_bytes: int
    megatron_count: int  # 2 × layers (0 at tp = 1)
    megatron_bytes: int  # 2 × layers × batch × hidden × bytes
    extra: list[str]  # every collective beyond the Megatron all-reduces, with its shape

    @property
    def bytes_over_floor(self) -> float:
        return self.total_bytes / self.megatron_bytes if self.megatron_bytes else float("nan")


def megatron_floor(layers: int, batch: int, hidden: int, dtype_bytes: int) -> tuple[int, int]:
    """(count, bytes) of the all-reduces a Megatron-split decode step cannot avoid."""
    return 2 * layers, 2 * layers * batch * hidden * dtype_bytes


def decode_comm(hlo: str, *, tp: int, batch: int, layers: int, hidden: int, dtype_bytes: int) -> CommReport:
    """The CommReport of a compiled decode program's HLO text (one data-parallel
    replica: ``batch`` is the rows each device holds)."""
    found = collectives(hlo)
    count: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for kind, shape in found:
        count[kind] = count.get(kind, 0) + 1
        nbytes[kind] = nbytes.get(kind, 0) + shape_bytes(shape)
    floor_count, floor_bytes = megatron_floor(layers, batch, hidden, dtype_bytes) if tp > 1 else (0, 0)
    # the Megatron all-reduces carry one step's hidden states, batch × hidden elements (in
    # whatever type XLA sums them), and are the last such: the embedding lookup's, of the
    # same size, comes before the first layer
    of_hidden = [i for i, (kind, shape) in enumerate(found)
                 if kind == "all-reduce" and shape_elements(shape) == batch * hidden]
    megatron = set(of_hidden[len(of_hidden) - floor_count:]) if floor_count else set()
    extra = [f"{kind} {shape.split('{')[0]}" for i, (kind, shape) in enumerate(found) if i not in megatron]
    return CommReport(tp=tp, batch=batch, count=count, bytes=nbytes, total_count=len(found),
                      total_bytes=sum(nbytes.values()), megatron_count=floor_count, megatron_bytes=floor_bytes,
                      extra=extra)
