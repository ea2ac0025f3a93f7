"""Numbers as gptnano reports them: the median of measurements. Used by every layer (the
device race, compare, plot, the benchmarks), so it lives once, at the bottom: no torch,
no Lightning.
"""

from collections.abc import Iterable


def median(values: Iterable[float]) -> float:
    """The middle of ``values`` once sorted; of an even count the upper of the two middle
    ones, so that a median is always a value that was measured (a step, a logged rate)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the median of no values")
    return ordered[len(ordered) // 2]
