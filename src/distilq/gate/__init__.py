"""The gate: validation data and its draw, FP32-vs-INT8 comparison, its statistics, the
decision, and the attestation of a version on a platform."""
