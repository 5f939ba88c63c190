"""One rule for cutting an error to a line (first_line); run_status is tested in test_tracking.py."""

from __future__ import annotations

import pytest

from optiflow.errors import first_line


@pytest.mark.parametrize("error, expected", [
    (ValueError("first\nsecond"), "first"),
    (ValueError(""), "ValueError"),
    (ValueError("\n\n  \nlate line"), "late line"),
    (RuntimeError("x" * 1000), "x" * 300),
    (FileNotFoundError(2, "No such file or directory", "/missing"), "No such file or directory: /missing"),
    ("plain text\nmore", "plain text"),
    ("", ""),
])
def test_first_line(error, expected):
    assert first_line(error) == expected
