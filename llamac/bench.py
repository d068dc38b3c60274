"""`llamac bench`: llama-bench's method (pp = prompt of P tokens, tg = N generated tokens), warm-up, repeated,
best and median, with the load average recorded (2-thread runs collapse when another process holds a core)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from llamac.errors import InputError


def bench(art: Path, prompt_tokens: int = 512, gen_tokens: int = 128, repetitions: int = 5,
          threads: int | None = None) -> dict:
    from llamac.runtime import load

    model = load(art, threads=threads)
    if prompt_tokens + gen_tokens > model.max_seq_len:
        raise InputError(f"-p {prompt_tokens} + -n {gen_tokens} exceed the artifact's context of {model.max_seq_len}")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=prompt_tokens).tolist()
    load_before = os.getloadavg()[0]
    sess = model.session()

    def one_run() -> tuple[float, float]:
        sess.reset()
        t0 = time.perf_counter()
        logits = sess.prefill(ids)
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = sess.decode(int(np.argmax(logits)))
        t2 = time.perf_counter()
        return prompt_tokens / (t1 - t0), gen_tokens / (t2 - t1)

    sess.reset()
    sess.prefill(ids[:16])  # warm-up: first calls pay for page faults and lazy initialisation
    sess.decode(1)
    runs = [one_run() for _ in range(repetitions)]
    pp, tg = [r[0] for r in runs], [r[1] for r in runs]
    used = getattr(getattr(model, "backend", None), "threads", None) or threads or os.cpu_count()
    return {"artifact": str(art), "threads": used, "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens, "repetitions": repetitions,
            "prefill_tok_s": round(max(pp), 2), "prefill_tok_s_median": round(statistics.median(pp), 2),
            "decode_tok_s": round(max(tg), 2), "decode_tok_s_median": round(statistics.median(tg), 2),
            "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)}
