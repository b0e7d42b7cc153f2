"""How far a probe's figures can be trusted: the 95% interval of a test top-1 over the test images, the
standard error of a held-out choice, and a warning whenever a chosen value sits on the edge of its grid
(the best value may lie outside it: widen the grid)."""
from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(top1: float, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval (percent) of an accuracy ``top1`` (percent) measured on ``n`` images."""
    if n <= 0:
        return [math.nan, math.nan]
    p = top1 / 100.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)]


def standard_error(top1: float, n: int) -> float:
    """Binomial standard error (percentage points) of an accuracy measured on ``n`` images."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(p * (1 - p) / n) if n > 0 else math.nan


def edge_warnings(selected: dict, grids: dict[str, Sequence], limits: dict[str, tuple] | None = None) -> list[str]:
    """One line per numeric grid (name -> values) whose chosen value is its smallest or largest entry.
    A grid of one value is not a choice and gets no warning, nor does an end that is a hard limit
    (``limits``: name -> (lowest, highest) possible, None where open), e.g. k = 1 neighbour, or the last
    epoch of a schedule: nothing lies beyond it to try."""
    out = []
    for name, values in grids.items():
        values = sorted({float(v) for v in values})
        if len(values) < 2 or name not in selected:
            continue
        chosen = float(selected[name])
        if chosen in (limits or {}).get(name, ()):
            continue
        if chosen in (values[0], values[-1]):
            side = "lowest" if chosen == values[0] else "highest"
            shown = f"{values}" if len(values) <= 8 else f"[{values[0]:g} .. {values[-1]:g}] ({len(values)} values)"
            out.append(f"{name}={selected[name]} is the {side} value of its grid {shown}: the best may lie outside it, widen the grid")
    return out
