"""The checks every backend makes on ids before a step, so all of them fail the same clear way."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from llamac.errors import InputError


def check_ids(ids: Sequence[int], n_past: int, max_seq_len: int, vocab_size: int) -> np.ndarray:
    """ids as int64 [1, n], after checking they are non-empty, fit the context and lie in the vocabulary."""
    arr = np.asarray(ids)
    if arr.dtype == object and all(isinstance(i, int) for i in arr.ravel()):     # Python ints beyond int64
        raise InputError(f"token id outside the vocabulary (0..{vocab_size - 1})")
    if arr.size and arr.dtype.kind not in "iub":     # 1.5 would become 1 without a word
        raise InputError(f"token ids must be integers, got {arr.ravel()[0]!r} ({arr.dtype})")
    ids = arr.astype(np.int64).reshape(1, -1)
    n = ids.shape[1]
    if n == 0:
        raise InputError("empty prompt")
    if n_past + n > max_seq_len:
        raise InputError(f"{n_past + n} tokens exceed the context of {max_seq_len}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InputError(f"token id outside the vocabulary (0..{vocab_size - 1})")
    return ids
