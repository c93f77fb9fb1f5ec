"""The one table printer of the benchmarks: rows of dicts, columns that name a key (or compute a cell)
and a format spec; ``None`` cells print as ``-``. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Column:
    """One column: ``header``; ``value``, a row key or a function of the row; ``spec``, a format spec
    (``".2f"``, ``","``...); ``align``, ``">"`` (numbers) or ``"<"`` (names)."""

    header: str
    value: str | Callable[[Mapping[str, Any]], Any]
    spec: str = ""
    align: str = ">"

    def cell(self, row: Mapping[str, Any]) -> str:
        """The formatted cell of ``row`` (``-`` for a missing key or ``None``)."""
        value = self.value(row) if callable(self.value) else row.get(self.value)
        return "-" if value is None else format(value, self.spec)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], title: str | None = None) -> str:
    """A fixed-width text table: optional title, header, a rule of dashes, one line per row; each
    column as wide as its widest cell or header, columns two spaces apart."""
    cells = [[column.cell(row) for column in columns] for row in rows]
    widths = [max([len(c.header), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(values, columns, widths)).rstrip()

    header = line([c.header for c in columns])
    lines = ([title] if title else []) + [header, "-" * len(header)] + [line(values) for values in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], title: str | None = None) -> None:
    """Print ``format_table(rows, columns, title)``, flushed."""
    print(format_table(rows, columns, title), flush=True)
