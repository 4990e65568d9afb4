"""Making a model INT8: the INT8 layers (one kind per module in kernels/, where a new engine
goes too) and their file, `auto`'s search, and the FP32 checkpoint it starts from. The
recipes themselves are in `distilq.recipes`."""
