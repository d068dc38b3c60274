"""`llamac perplexity`: per-token perplexity of a text under an artifact, in non-overlapping context windows.

Tokens are fed one at a time through decode(), so it measures exactly what generation computes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llamac.errors import InputError


def perplexity(art: Path, text_file: Path, window: int | None = None, max_tokens: int | None = None,
               progress: bool = True) -> dict:
    from llamac.runtime import load

    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{text_file}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{text_file}: cannot read it as UTF-8 text ({e})") from None
    model = load(art)
    ids = model.tokenizer.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    if window and window > model.max_seq_len:
        raise InputError(f"--window {window} exceeds the artifact's context of {model.max_seq_len}")
    window = window or model.max_seq_len
    bos = model.config.bos_token_id
    sess = model.session()
    nll, count = 0.0, 0
    bar = tqdm(total=len(ids), desc="perplexity", unit="tok", disable=not progress)
    for start in range(0, len(ids), window - 1):
        chunk = ids[start:start + window - 1]
        sess.reset()
        logits = sess.prefill([bos] if bos is not None else chunk[:1])
        targets = chunk if bos is not None else chunk[1:]
        for i, tok in enumerate(targets):
            z = logits.astype(np.float64)
            m = z.max()
            nll += m + math.log(np.exp(z - m).sum()) - z[tok]
            count += 1
            if i + 1 < len(targets):
                logits = sess.decode(tok)
        bar.update(len(chunk))
    bar.close()
    if count == 0:
        raise InputError(f"{text_file}: no tokens to score")
    return {"artifact": str(art), "tokens": count, "window": window, "perplexity": math.exp(nll / count)}
