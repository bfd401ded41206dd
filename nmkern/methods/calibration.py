"""Calibration inputs for one-shot pruning (:func:`nmkern.prune_oneshot`) from plain text.

:func:`text_windows` tokenizes a text once with the model's own tokenizer and draws random
windows of ``seq_len`` tokens from it, as the SparseGPT / Wanda reference code draws its
calibration set from C4: each window is one batch ``{"input_ids": (1, seq_len)}`` that a
``transformers`` model takes as ``model(**batch)``. No special tokens are added: the windows
start mid-text anyway, so a BOS token in front of the first one alone would make it unlike the
others. :func:`model_text_windows` also checks the windows against the model (position limit,
vocabulary size) so that a mismatch is named before any pruning starts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_OP = "text_windows"


def _positive(op: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def text_windows(tokenizer, text: str, seq_len: int, nsamples: int, seed: int = 0) -> list[dict]:
    """``nsamples`` windows of ``seq_len`` consecutive tokens of ``text``: ``{"input_ids": LongTensor (1, seq_len)}``.

    ``tokenizer``: a ``transformers`` tokenizer (``tokenizer(text, add_special_tokens=False)``), the
    model's own. Window starts are uniform in ``[0, tokens - seq_len]`` from a ``torch.Generator``
    seeded with ``seed`` (the same text and seed give the same windows). The text must hold at
    least ``seq_len + 1`` tokens, so that there are two distinct windows to draw from; windows may
    overlap (a short text gives correlated batches: give a few times ``seq_len * nsamples`` tokens).
    """
    _positive(_OP, "seq_len", seq_len)
    _positive(_OP, "nsamples", nsamples)
    _positive(_OP, "seed", seed, minimum=0)
    if not isinstance(text, str):
        raise TypeError(f"{_OP}: text must be a str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"{_OP}: the text is {ids.numel()} tokens long; windows of seq_len={seq_len} tokens need at "
                         f"least {seq_len + 1}: give a longer text (ideally a few times seq_len * nsamples = "
                         f"{seq_len * nsamples} tokens) or a smaller seq_len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (nsamples,), generator=gen)
    return [{"input_ids": ids[s:s + seq_len].clone().unsqueeze(0)} for s in starts.tolist()]


def model_text_windows(model: nn.Module, tokenizer, text: str, seq_len: int, nsamples: int,
                       seed: int = 0) -> list[dict]:
    """:func:`text_windows`, refused (ValueError) where ``model`` could not take them: ``seq_len`` over its
    ``config.max_position_embeddings`` (learned positions have no row beyond it: BERT's 512), or token ids
    its input embedding has no row for (the tokenizer is not the model's)."""
    op = "model_text_windows"
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and isinstance(seq_len, int) and seq_len > limit:
        raise ValueError(f"{op}: seq_len={seq_len} is over the model's {limit} positions "
                         f"(config.max_position_embeddings); give seq_len <= {limit}")
    windows = text_windows(tokenizer, text, seq_len, nsamples, seed)
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    rows = getattr(emb, "num_embeddings", None)
    top = max(int(w["input_ids"].max()) for w in windows)
    if isinstance(rows, int) and top >= rows:
        raise ValueError(f"{op}: the tokenizer gives token id {top}, but the model's input embedding has {rows} "
                         "rows; calibrate with the tokenizer saved with this model")
    return windows


__all__ = ["model_text_windows", "text_windows"]
