"""The audit export's CSV cannot smuggle a formula into an operator's spreadsheet."""

from __future__ import annotations

import csv
import io

from services.gateway.audit.service import _csv_line


def test_a_cell_that_a_spreadsheet_would_run_is_quoted_as_text() -> None:
    line = _csv_line((1, '=HYPERLINK("http://127.0.0.1")', "+1", "-2", "@x", "light on"))
    (row,) = csv.reader(io.StringIO(line.decode()))
    assert row == ["1", '\'=HYPERLINK("http://127.0.0.1")', "'+1", "'-2", "'@x", "light on"]
