"""Prefect flows of distilq: they only wire the tasks in `tasks`."""

from distilq.runtime import set_prefect_defaults

set_prefect_defaults()  # before any flow module imports prefect
