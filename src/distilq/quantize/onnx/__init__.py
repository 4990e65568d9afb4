"""The ONNX Runtime engine (the `onnxruntime` extra): export, graph rewrites, sessions."""
