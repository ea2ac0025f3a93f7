"""The numbers every layer reports alike (gptnano/numbers.py)."""

import pytest

from gptnano.numbers import median


def test_a_median_is_always_a_measured_value():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4, 1, 3, 2]) == 3  # an even count: the upper of the two middle values, not their mean
    assert median(x for x in (5.0,)) == 5.0
    with pytest.raises(ValueError):
        median([])
