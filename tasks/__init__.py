"""Thin Prefect tasks over the distilq library: retries, logging and artifacts only."""

from distilq.runtime import set_prefect_defaults

set_prefect_defaults()  # before any task module imports prefect
