"""distilq: validated INT8 sentiment classifiers, and batch scoring of Parquet datasets on CPU."""

__version__ = "0.2.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # `load` pulls in torch and transformers; importing distilq alone stays cheap.
    if name == "load":
        from distilq.score.classifier import load

        return load
    raise AttributeError(f"module 'distilq' has no attribute {name!r}")
