"""
The method's input checks, apart from the method (zip2zip.py imports them): each turns an input
it cannot use into one error line that names the argument and what was expected, before any
long work. A training loader's batches are valid by construction and skip them.
"""

import numpy as np
import torch


def check_codec(vocab_size, max_codebook_size, max_subtokens):
    if vocab_size < 1 or max_codebook_size < 0 or max_subtokens < 1:
        raise ValueError(f"need vocab_size >= 1, max_codebook_size >= 0, max_subtokens >= 1; "
                         f"got {vocab_size}, {max_codebook_size}, {max_subtokens}")


def check_base_ids(ids, vocab_size, offset=0):
    # two fast passes (min, max); the walk that finds the position runs only on a failure
    if len(ids) and not (0 <= min(ids) and max(ids) < vocab_size):
        i = next(i for i, t in enumerate(ids) if not 0 <= t < vocab_size)
        raise ValueError(f"base id {ids[i]} at position {offset + i} is outside the base vocabulary "
                         f"0..{vocab_size - 1}")


def as_ids(ids, what="ids"):
    """ids as a list of Python ints. Ids are integers: floats, bools, None or a 2-D array are a
    TypeError that says so (a float id would otherwise pass through the decoder unnoticed)."""
    if getattr(ids, "ndim", 1) != 1:
        raise TypeError(f"{what} must be one-dimensional, got an array of {ids.ndim} dimensions")
    if not isinstance(ids, list):
        if not hasattr(ids, "__iter__"):
            raise TypeError(f"{what} must be a sequence of integers, got {type(ids).__name__}")
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    types = set(map(type, ids))
    if types - {int}:                                  # rare: numpy ints, or something wrong
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"{what} must be integers, got {t!r} ({type(t).__name__}) at position {i}")
        ids = [int(t) for t in ids]
    return ids


def base_ids(ids, vocab_size, offset=0):
    """ids as a list of Python ints in 0..vocab_size-1, or the TypeError or ValueError that says
    what is wrong. An integer array (a window of a .bin memmap, in the training loader) needs no
    walk over its values: its dtype says they are integers, and numpy checks their range."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
        if ids.size and not (0 <= ids.min() and ids.max() < vocab_size):
            check_base_ids(ids, vocab_size, offset)    # finds the position and raises
        return ids.tolist()
    ids = as_ids(ids)
    check_base_ids(ids, vocab_size, offset)
    return ids


def check_config(c):
    """ValueError naming the first GPTConfig field that cannot work."""
    if c.block_size < 2:
        raise ValueError(f"block_size={c.block_size}: must be >= 2 (a full context keeps its last "
                         f"block_size // 2 codes, and generation needs at least one)")
    positive = ("vocab_size", "n_layer", "n_head", "n_embd", "max_subtokens", "hyper_n_layer", "hyper_n_head")
    bad = [f"{k}={getattr(c, k)}" for k in positive if getattr(c, k) < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be >= 1")
    if c.n_embd % c.n_head:
        raise ValueError(f"n_embd={c.n_embd} is not a multiple of n_head={c.n_head}")
    if c.hyper_encoder not in ("transformer", "mlp", "mean"):
        raise ValueError(f"hyper_encoder={c.hyper_encoder!r}: expected transformer, mlp or mean")
    if c.max_codebook_size < 0 or not 0 <= c.dropout < 1:
        raise ValueError(f"need max_codebook_size >= 0 and 0 <= dropout < 1, got {c.max_codebook_size}, "
                         f"{c.dropout}")
    if c.hyper_n_embd % c.hyper_n_head:   # (0, the width derived from n_embd, is a multiple)
        raise ValueError(f"hyper_n_embd={c.hyper_n_embd} is not a multiple of hyper_n_head={c.hyper_n_head}")


def check_targets(logits, targets, hyper, vocab_size):
    """ValueError naming the first target the model cannot emit at its position: not a valid next
    code there (DESIGN.md 2), or with canonical=True not canonical (DESIGN.md 2.1)."""
    W = logits.size(-1)
    score = logits.gather(-1, targets.clamp(0, W - 1)[..., None])[..., 0]
    ok = (targets == -1) | ((targets >= 0) & (targets < W) & (score > float("-inf")))
    if not ok.all():
        b, t = (~ok).nonzero()[0].tolist()
        n = hyper.n_installed[b, t].item() if hyper is not None else 0
        has = hyper is not None and hyper.pending_index[b, t].item() >= 0
        code = targets[b, t].item()
        why = "it is not canonical: its first base token extends the encoder's match (DESIGN.md 2.1)" \
            if 0 <= code < vocab_size + n + has else \
            f"base ids < {vocab_size}, {n} installed hypertokens{', and the pending id' if has else ''}"
        raise ValueError(f"target {code} at row {b}, position {t} is not a valid next code there ({why})")


def prompt_rows(idx, temperature, top_k, max_new_tokens):
    """The prompts of generate as lists of codes; ValueError for a setting it cannot use."""
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be >= 0 and finite (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, or None for every code; got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    rows = idx.tolist() if torch.is_tensor(idx) else [as_ids(r, "prompt") for r in idx]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs at least one prompt and no empty prompt "
                         "(start from <|endoftext|> for an unconditional sample)")
    return rows
