"""The numbers every layer reports alike (gptnano/numbers.py)."""

import pytest

from gptnano.numbers import markdown_table, median, quantity


def test_a_median_is_always_a_measured_value():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4, 1, 3, 2]) == 3  # an even count: the upper of the two middle values, not their mean
    assert median(x for x in (5.0,)) == 5.0
    with pytest.raises(ValueError):
        median([])


def test_quantities_have_three_figures_and_an_si_prefix():
    assert [quantity(x) for x in (950, 23140, 4.2e6, 1234567890)] == ["950", "23.1k", "4.2M", "1.23G"]
    assert [quantity(x) for x in (806_000, 9050, 1.5e13, 12.5, 0)] == ["806k", "9.05k", "15T", "12.5", "0"]
    assert quantity(None) == quantity(float("nan")) == ""  # a missing number is an empty cell


def test_a_markdown_table_has_a_line_per_row_under_its_columns():
    rows = [{"run": "gpt", "tok/s": 9050}, {"run": "rnn"}]
    assert list(markdown_table(rows, ["run", "tok/s"])) == [
        "| run | tok/s |", "|---|---|", "| gpt | 9050 |", "| rnn |  |"]  # a missing cell is empty
