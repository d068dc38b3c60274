"""`llamac bench`: llama-bench's method, warm-up, repeated, best and median, with the load average recorded (2-thread
runs collapse when another process holds a core). pp = one prefill of P tokens from an empty cache; tg = N
single-token decodes from an empty cache, each fed the argmax of the last logits (llama-bench's tg does not follow
the prompt either, so its figures and these compare, and P and N each only have to fit the context)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from llamac.errors import InputError


def one_run(sess, ids: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prefill tok/s of ids from an empty cache, decode tok/s of gen_tokens single-token steps from an empty cache)."""
    sess.reset()
    t0 = time.perf_counter()
    sess.prefill(ids)
    t1 = time.perf_counter()
    sess.reset()
    token = ids[0]
    t2 = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(np.argmax(sess.decode(token)))
    t3 = time.perf_counter()
    return len(ids) / (t1 - t0), gen_tokens / (t3 - t2)


def warm_up(sess, ids: list[int]) -> None:
    sess.reset()
    sess.prefill(ids[:16])  # the first calls pay for page faults and lazy initialisation
    sess.decode(1)


def bench(art: Path, prompt_tokens: int = 512, gen_tokens: int = 128, repetitions: int = 5,
          threads: int | None = None) -> dict:
    from llamac.runtime import load

    model = load(art, threads=threads)
    for flag, n in (("-p", prompt_tokens), ("-n", gen_tokens)):
        if n > model.max_seq_len:
            raise InputError(f"{flag} {n} exceeds the artifact's context of {model.max_seq_len} tokens")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=prompt_tokens).tolist()
    load_before = os.getloadavg()[0]
    sess = model.session()
    warm_up(sess, ids)
    runs = [one_run(sess, ids, gen_tokens) for _ in range(repetitions)]
    pp, tg = [r[0] for r in runs], [r[1] for r in runs]
    used = getattr(getattr(model, "backend", None), "threads", None) or threads or os.cpu_count()
    return {"artifact": str(art), "threads": used, "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens, "repetitions": repetitions,
            "prefill_tok_s": round(max(pp), 2), "prefill_tok_s_median": round(statistics.median(pp), 2),
            "decode_tok_s": round(max(tg), 2), "decode_tok_s_median": round(statistics.median(tg), 2),
            "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)}
