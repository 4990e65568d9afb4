"""Prefect flows of distilq: each runs one `distilq.pipelines` function with the Prefect
runner. Importing them changes nothing in the process."""
