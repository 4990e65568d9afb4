"""The INT8 layer kinds, one module each (a `LayerKind`: quantize, save, load, run).

`LINEAR_KINDS` is keyed by a recipe's `activations` and by the `activations` a file records
for a Linear layer (absent: per tensor, the first format's only kind).
"""

from distilq.quantize.kernels.base import FORMAT, LayerKind
from distilq.quantize.kernels.embedding import EmbeddingKind
from distilq.quantize.kernels.per_token import FORMAT_PER_TOKEN, TokenLinearKind
from distilq.quantize.kernels.tensor_linear import TensorLinearKind

LINEAR_KINDS: dict[str, LayerKind] = {
    "per-tensor": TensorLinearKind(),
    "per-token": TokenLinearKind(),
}
EMBEDDING = EmbeddingKind()
FORMATS = (FORMAT, FORMAT_PER_TOKEN)


def kind_of(module) -> LayerKind | None:
    """The kind of an INT8 module; None for a float one."""
    for kind in (*LINEAR_KINDS.values(), EMBEDDING):
        if type(module) is kind.module:
            return kind
    return None


def linear_kind(entry: dict) -> LayerKind:
    """The kind of a Linear layer as its file records it."""
    return LINEAR_KINDS[entry.get("activations", "per-tensor")]
