"""Piped tables and the live area's geometry: pure rendering, no model."""

from __future__ import annotations

import io

from rich.console import Console
from rich.text import Text

from kvchat.ui.status import ReflowingLiveRender
from kvchat.ui.tables import TableData, print_table, tsv_lines


def test_piped_table_is_tab_separated_without_padding_or_wrapping() -> None:
    table = TableData(("NAME", "PATH"), title="models")
    table.add_row("a", "/very/long/" + "x" * 300 + ".gguf")
    table.add_row("two\nlines", "tab\there")
    assert tsv_lines(table) == ["NAME\tPATH", "a\t/very/long/" + "x" * 300 + ".gguf", "two lines\ttab here"]
    out = io.StringIO()
    print_table(table, out, Console(file=out, width=40))
    assert out.getvalue().splitlines() == ["# models", *tsv_lines(table)]


def test_on_a_terminal_long_cells_fold_instead_of_being_cut() -> None:
    out = io.StringIO()
    table = TableData(("NAME", "PATH"))
    table.add_row("a", "p" * 100)
    print_table(table, out, Console(file=out, width=40, force_terminal=True, no_color=True))
    assert out.getvalue().count("p") == 100


def test_live_area_erases_the_rows_its_lines_take_after_the_terminal_narrows() -> None:
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    render = ReflowingLiveRender(console, Text("x" * 100 + "\n" + "y" * 10))
    console.print(render)
    assert render.rows_now() == 2
    console.width = 50  # a reflowing terminal now shows the 100-cell line on 2 rows
    assert render.rows_now() == 3
    assert str(render.position_cursor().segment.text).count("\x1b[1A") == 2  # up 2 rows to the top
    console.width = 200  # wider: lines never unwrap beyond one row each
    assert render.rows_now() == 2
