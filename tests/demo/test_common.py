"""Shared demo helpers: the report bolds the better of trained and untrained, column by column."""
from __future__ import annotations

import math

import pytest

from mmm.demo.common import bold_better, table_row


def test_the_better_row_is_bold_whichever_it_is() -> None:
    rows = bold_better({"untrained": [0.40, 2.0], "trained": [0.55, 1.5]}, higher_is_better=[True, False])
    assert table_row(rows["trained"]) == "| **trained** | **0.550** | **1.500** |"
    assert table_row(rows["untrained"]) == "| untrained | 0.400 | 2.000 |"
    # the initialisation wins: it is bolded, not the trained row
    rows = bold_better({"untrained": [0.60, 1.0], "trained": [0.55, 1.5]}, higher_is_better=[True, False])
    assert rows["untrained"] == ["**untrained**", "**0.600**", "**1.000**"]
    assert rows["trained"] == ["trained", "0.550", "1.500"]


def test_mixed_rows_bold_cells_only_and_ties_bold_nothing() -> None:
    rows = bold_better({"a": [0.5, 3.0], "b": [0.4, 2.0]}, higher_is_better=[True, False])
    assert rows == {"a": ["a", "**0.500**", "3.000"], "b": ["b", "0.400", "**2.000**"]}
    # values that print the same are a tie; a tie in one column does not stop a win in another
    rows = bold_better({"a": [0.1234, 5.0], "b": [0.1231, 4.0]}, higher_is_better=[True, False])
    assert rows == {"a": ["a", "0.123", "5.000"], "b": ["**b**", "0.123", "**4.000**"]}
    rows = bold_better({"a": [0.5], "b": [0.5]}, higher_is_better=[True])
    assert rows == {"a": ["a", "0.500"], "b": ["b", "0.500"]}


def test_missing_values_formats_and_shape_errors() -> None:
    rows = bold_better({"a": [None, 10.0], "b": [math.nan, 12.0]}, higher_is_better=[True, False],
                       fmt=["{:.3f}", "{:.1f}"])
    assert rows == {"a": ["**a**", "–", "**10.0**"], "b": ["b", "–", "12.0"]}
    with pytest.raises(ValueError, match="one per column"):
        bold_better({"a": [1.0, 2.0], "b": [1.0]}, higher_is_better=[True, True])
