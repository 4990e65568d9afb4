"""Prefect's face of the distilq pipelines: `PrefectRunner` runs each pipeline step as a
task (retries, run logs), maps shards over a Prefect task runner, and adds artifacts and
events. Importing this package changes nothing in the process."""
