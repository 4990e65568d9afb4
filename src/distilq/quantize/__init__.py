"""Making a model INT8: the recipes, the INT8 layers and their file, `auto`'s search, and the
FP32 checkpoint it starts from."""
