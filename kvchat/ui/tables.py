"""Tables for stdout: aligned on a terminal, tab-separated when piped.

On a terminal a table is drawn by rich and long cells fold onto more lines
rather than being cut. Piped (`kvchat list | cat`, `> file`), every row is one
line of tab-separated cells, nothing truncated or padded, so that `cut -f`,
`awk -F'\\t'` and `sort` work; a cell's own line breaks and tabs become spaces.
Every command that prints a table also has `--json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class TableData:
    """Columns and rows of plain strings; `right` names the right-aligned columns."""

    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    title: str | None = None
    right: frozenset[str] = frozenset()
    bold_rows: frozenset[int] = frozenset()

    def add_row(self, *cells: str, bold: bool = False) -> None:
        if bold:
            self.bold_rows = self.bold_rows | {len(self.rows)}
        self.rows.append(cells)


def _flat(cell: str) -> str:
    return " ".join(cell.replace("\t", " ").split("\n"))


def tsv_lines(table: TableData) -> list[str]:
    """The piped form: a header line and one line per row, cells joined by tabs."""
    lines = ["\t".join(_flat(c) for c in table.columns)]
    lines += ["\t".join(_flat(c) for c in row) for row in table.rows]
    return lines


def print_table(table: TableData, stdout: TextIO, console: Console, *, boxed: bool = False) -> None:
    """Print `table` on `console` when stdout is a terminal, as TSV lines otherwise."""
    if not console.is_terminal:
        if table.title:
            stdout.write(f"# {_flat(table.title)}\n")
        stdout.write("".join(line + "\n" for line in tsv_lines(table)))
        stdout.flush()
        return
    from rich import box
    from rich.table import Table

    rich_table = Table(
        title=table.title, title_justify="left", box=box.SIMPLE_HEAD if boxed else None, pad_edge=False
    )
    for name in table.columns:
        rich_table.add_column(name, justify="right" if name in table.right else "left", overflow="fold")
    for i, row in enumerate(table.rows):
        rich_table.add_row(*row, style="bold" if i in table.bold_rows else None)
    console.print(rich_table)
