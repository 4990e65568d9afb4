"""Inference shared by scoring, the `Classifier` and the gate: which values can be scored,
their token lengths, batches under a batching policy, and class probabilities."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from distilq.config.shared import BatchingPolicy


@dataclass
class Predictions:
    """Class probabilities in input order, and how long the batches took."""

    probs: np.ndarray  # [n, n_classes] float32
    seconds: float
    n_batches: int

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


NO_TOKENS = "text has no tokens but special ones (only control, invisible or unknown characters)"


def text_error(value) -> str | None:
    """Why a value is not a text to score, or None when it is one."""
    if value is None:
        return "text is null"
    if not isinstance(value, str):
        return f"text is {type(value).__name__}, not a string"
    if not value.strip():
        return "text is empty" if not value else "text is only whitespace"
    return None


# A text is cut to `max_length` x this many characters before it is tokenized: a 20 MB text
# costs what 32 KiB cost, not gigabytes of tokenizer memory. Words are 4-6 characters a token
# in prose (a word past 100 characters is one unknown token), so the cut keeps far more than
# `max_length` tokens and the model sees exactly what it would have.
CHARS_PER_TOKEN_BOUND = 64


def cut_text(text: str, max_length: int) -> tuple[str, bool]:
    """The head of `text` that can reach the model (cut at whitespace, so no word is split),
    and whether anything was cut."""
    limit = max_length * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    parts = head.rsplit(None, 1)
    return (parts[0] if len(parts) == 2 else head), True


def _encode(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text's cut head (special tokens included, no truncation) and its
    length; a cut text counts as longer than `max_length` even when its head is not."""
    cut = [cut_text(t, max_length) for t in texts]
    heads = [c for c, _ in cut]
    ids = tokenizer(heads, truncation=False, verbose=False)["input_ids"] if heads else []
    lengths = [
        max(len(i), max_length + 1) if was_cut else len(i)
        for i, (_, was_cut) in zip(ids, cut, strict=True)
    ]
    return ids, lengths


def screen_texts(tokenizer, values: list, max_length: int) -> tuple[list[str | None], list[int]]:
    """Why each value cannot be scored (None where it can), and the token lengths of those
    that can. A text the tokenizer reduces to special tokens alone (a NUL, zero-width
    spaces) would get a confident label from nothing: it cannot be scored either."""
    errors = [text_error(v) for v in values]
    valid = [i for i, e in enumerate(errors) if e is None]
    encoded, counts = _encode(tokenizer, [values[i] for i in valid], max_length)
    special = set(tokenizer.all_special_ids)
    lengths = []
    for i, ids, n in zip(valid, encoded, counts, strict=True):
        if all(t in special for t in ids):
            errors[i] = NO_TOKENS
        else:
            lengths.append(n)
    return errors, lengths


def token_lengths(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Token counts with special tokens and without truncation (of each text's cut head,
    see `cut_text`)."""
    return _encode(tokenizer, texts, max_length)[1]


def batch_order(lengths: list[int], policy: BatchingPolicy) -> list[list[int]]:
    """Row indices grouped into batches: sorted by token length when the policy says so."""
    if policy.sort_by_length:
        capped = [min(n, policy.max_length) for n in lengths]
        order = sorted(range(len(lengths)), key=lambda i: (capped[i], i))
    else:
        order = list(range(len(lengths)))
    return [order[i : i + policy.batch_size] for i in range(0, len(order), policy.batch_size)]


def predict(
    model,
    tokenizer,
    texts: list[str],
    policy: BatchingPolicy,
    progress: str | None = None,
    lengths: list[int] | None = None,
) -> Predictions:
    """Class probabilities for `texts`, batched by `policy`, deterministically.

    `lengths` (from `token_lengths`) saves tokenizing twice when the caller has them. A
    text longer than the model's positions is cut to them (`BatchingPolicy.capped`).
    """
    import torch  # here: loading and splitting validation data needs no torch

    policy = policy.capped(getattr(model.config, "max_position_embeddings", None))
    batches = batch_order(lengths or token_lengths(tokenizer, texts, policy.max_length), policy)
    n_classes = model.config.num_labels
    probs = np.zeros((len(texts), n_classes), dtype=np.float32)
    bar = _progress_total(len(texts), progress)
    start = time.perf_counter()
    # A model that gives probabilities itself from numpy arrays (an ONNX Runtime session)
    # runs clear of torch: a torch op between its runs woke torch's threads, which then
    # competed with the session's (full-size INT8: 770 rows/s alone, 470 so interleaved).
    own = getattr(model, "probabilities", None)
    with torch.inference_mode():
        for idx in batches:
            enc = tokenizer(
                [cut_text(texts[i], policy.max_length)[0] for i in idx],
                padding=True,
                truncation=True,
                max_length=policy.max_length,
                return_tensors="np" if own else "pt",
            )
            if own:
                probs[idx] = own(enc)
            else:
                probs[idx] = torch.softmax(model(**enc).logits.float(), dim=-1).numpy()
            bar.update(len(idx))
    bar.close()
    return Predictions(probs, time.perf_counter() - start, len(batches))


def _progress_total(total: int, desc: str | None):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="rows", file=sys.stderr, disable=desc is None, leave=False
    )


def progress_bar(items: list, desc: str, unit: str):
    """`items`, with a progress bar on stderr (long phases; logs get their own lines)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)
