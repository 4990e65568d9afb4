"""What the commands return and print: exit codes, JSON on stdout, the agreement line."""

from __future__ import annotations

import json
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def agreement_line(figures, confidence: float | None) -> str:
    """`agreement 0.9952 (lower bound 0.9924 at 95%, n=2729)`; just the point when the
    version was gated before bounds."""
    line = f"agreement {figures.agreement:.4f}"
    if figures.agreement_lower_bound is None:
        return line
    return (
        f"{line} (lower bound {figures.agreement_lower_bound:.4f} at {confidence:.0%}, "
        f"n={figures.n_examples})"
    )
