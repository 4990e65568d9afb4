"""What every report table shares: sizes, percentages and Markdown tables."""

from __future__ import annotations

import re

MIB = 2**20


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


NUMBER = re.compile(r"^[-+]?[\d.,]+( ?(%|x|MiB|s))?$|^n/a$|^$")


def markdown_table(rows: list[list[str]]) -> str:
    """A Markdown table, header first; columns of numbers are right-aligned."""
    body = rows[1:]
    numeric = [bool(body) and all(NUMBER.match(r[i]) for r in body) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("|" + "".join("---:|" if n else "---|" for n in numeric))
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
