"""Thin Prefect tasks over the distilq library: retries, logging and artifacts only."""

import logging

from distilq.runtime import set_prefect_defaults

set_prefect_defaults()  # before any task module imports prefect
# The library's progress notes (auto's fallback steps) belong in the run logs.
logging.getLogger("distilq").setLevel(logging.INFO)
