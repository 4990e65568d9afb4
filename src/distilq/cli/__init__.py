"""The `distilq` command line, beside the library: it maps flags to configs, runs the Prefect
flows on a temporary local API, and owns the process it runs in. The library never imports it."""
