"""The gate: validation data, FP32-vs-INT8 comparison and metrics, their statistics, the
decision, and the attestation of a version on a platform."""
