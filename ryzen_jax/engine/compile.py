"""How our programs are compiled: the XLA options they ask for on each platform, and
compiling with them where the XLA in use knows them."""

from __future__ import annotations

import logging
from typing import Any

import jax

log = logging.getLogger(__name__)


#: XLA:CPU options for our programs. Region-based copy insertion proves that a decode
#: step's in-place cache writes need no defensive copies, where the default analysis
#: copied every layer's cache on every step (a fifth of a batch-1 step on the benchmark's
#: small shape). YNNPACK for matrix products only: reductions as XLA's own loops, which
#: for a decode step's many small ones (norms, softmax) saved 4-7% of a batch-8 step.
CPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def compiler_options(mesh) -> dict[str, Any]:
    """XLA options for our programs on ``mesh``'s platform (see ``CPU_COMPILER_OPTIONS``)."""
    return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else {}


def compile_lowered(lowered, options: dict[str, Any]):
    """``lowered.compile`` with ``options``; an XLA that does not know one of them (they
    are tuning, not semantics) compiles without them, once warned."""
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        if "option" not in str(e):
            raise
        log.warning("this XLA refused compiler options %s (%s); compiling without them", sorted(options), e)
        options.clear()
        return lowered.compile()
