"""The checks every backend makes on ids before a step, so all of them fail the same clear way."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from llamac.errors import InputError


def as_token_ids(ids: Sequence[int]) -> np.ndarray:
    """ids as int64 [1, n], after checking that they are integers (1.5 would become 1 without a word)."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise InputError(f"token ids must be a flat sequence of integers ({e})") from None
    if arr.dtype == object and all(isinstance(i, int) for i in arr.ravel()):     # Python ints beyond int64
        raise InputError(f"token id {max(arr.ravel(), key=abs)} is outside any vocabulary")
    if arr.size and arr.dtype.kind not in "iub":
        vals = arr.ravel().tolist()
        bad = next((v for v in vals if not isinstance(v, int) and not (isinstance(v, float) and v.is_integer())),
                   vals[0])
        raise InputError(f"token ids must be integers, got {bad!r}")
    return arr.astype(np.int64).reshape(1, -1)


def check_ids(ids: Sequence[int], n_past: int, max_seq_len: int, vocab_size: int) -> np.ndarray:
    """ids as int64 [1, n], after checking they are non-empty, fit the context and lie in the vocabulary."""
    ids = as_token_ids(ids)
    n = ids.shape[1]
    if n == 0:
        raise InputError("empty prompt")
    if n_past + n > max_seq_len:
        raise InputError(f"{n_past + n} tokens exceed the context of {max_seq_len}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InputError(f"token id outside the vocabulary (0..{vocab_size - 1})")
    return ids
