"""The baseline a user would write: transformers pipeline over a Parquet file, FP32.

Usage: python bench/pipeline_script.py MODEL_DIR INPUT.parquet OUTPUT.parquet BATCH_SIZE
"""

import sys

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import pipeline

model_dir, source, target, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
classify = pipeline("text-classification", model=model_dir, device=-1)
texts = pq.read_table(source).column("text").to_pylist()
results = classify(texts, batch_size=batch_size, truncation=True)
pq.write_table(
    pa.table({"label": [r["label"] for r in results], "score": [r["score"] for r in results]}),
    target,
)
