"""Scoring Parquet data: the inputs cut into shards, one shard scored, the output directory
and its manifest, the FP32 audit of a run, and the `Classifier` that users load."""
