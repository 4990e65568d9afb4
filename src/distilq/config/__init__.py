"""Typed, validated configuration shared by the library, the tasks and the CLI: what every
part shares (shared.py) and the parameters of each flow (quantize.py, score.py)."""
