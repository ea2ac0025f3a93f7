"""Numbers as gptnano reports them: the median of measurements, counts and rates with an SI
prefix (``9.05k`` tok/s, ``15T`` FLOPs, read the same way in budgets), and markdown tables of
them. Used by every layer (the device race, training progress, compare, plot, the
benchmarks), so they live once, at the bottom: no torch, no Lightning.
"""

import math
from collections.abc import Iterable, Iterator

PREFIXES = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}  # SI prefix -> its factor


def median(values: Iterable[float]) -> float:
    """The middle of ``values`` once sorted; of an even count the upper of the two middle
    ones, so that a median is always a value that was measured (a step, a logged rate)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the median of no values")
    return ordered[len(ordered) // 2]


def quantity(x: float | None) -> str:
    """``950``, ``23.1k``, ``4.2M``, ``1.23G``, ``15T``: a count or rate to three figures
    with an SI prefix ("" for a value that is missing or not finite)."""
    if x is None or not math.isfinite(x):
        return ""
    for unit, scale in reversed(PREFIXES.items()):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.3g}{unit}" if v < 1000 else f"{v:.0f}{unit}"
    return f"{x:.3g}" if x != int(x) else f"{int(x)}"


def markdown_table(rows: Iterable[dict], columns: list[str]) -> Iterator[str]:
    """The lines of a markdown table: ``columns`` as its header, then a line per row, its
    cells under those columns ("" where a row has none). Lazy, so that rows which take time
    to compute (the probes of a dry run) can be printed as each comes."""
    yield "| " + " | ".join(columns) + " |"
    yield "|" + "---|" * len(columns)
    for row in rows:
        yield "| " + " | ".join(str(row.get(c, "")) for c in columns) + " |"
