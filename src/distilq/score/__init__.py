"""Scoring Parquet data: the inputs and their shards, inference, one shard scored, the output
directory and its manifest, and the `Classifier` that users load."""
