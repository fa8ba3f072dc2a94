"""Summaries of timing samples: the percentiles every report uses."""

from __future__ import annotations

from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and P50/P90/P99 of timings given in seconds, in milliseconds (NaN when empty)."""
    x = np.asarray(seconds, np.float64) * 1e3
    if x.size == 0:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in PERCENTILES}, "n": 0}
    return {"mean": float(x.mean()), **{f"p{q}": float(np.percentile(x, q)) for q in PERCENTILES}, "n": int(x.size)}


def median(values: Sequence[float]) -> float:
    """The median (NaN when empty): the figure reported for repeated runs."""
    return float(np.median(values)) if len(values) else float("nan")
