"""Pick the next token from a logits vector.

The order follows Hugging Face's generate(): repetition penalty on the raw logits, then temperature, then the
filters top-k, top-p and min-p on the tempered distribution, then one draw from what is left (renormalised).
temperature 0 means greedy (argmax after the penalty), whatever the filters say. Draws come from a
numpy Generator, so the same seed and the same logits give the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from llamac.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0: off; keep the k most likely tokens
    top_p: float = 1.0            # 1: off; keep the smallest set of most likely tokens whose mass reaches top_p
    min_p: float = 0.0            # 0: off; keep tokens with probability >= min_p * max probability
    repetition_penalty: float = 1.0   # 1: off; >1 discourages tokens seen in the last repetition_window tokens
    repetition_window: int = 64   # how many recent tokens the penalty looks at (0: all given)
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            _check_type(name, getattr(self, name), (int, float, np.integer, np.floating), "a number")
        for name in ("top_k", "repetition_window"):
            _check_type(name, getattr(self, name), (int, np.integer), "a whole number")
        if self.seed is not None:
            _check_type("seed", self.seed, (int, np.integer), "a whole number")
            if self.seed < 0:
                raise InputError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.temperature < math.inf:      # written so that NaN fails too
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.repetition_window < 0:
            raise InputError(f"repetition_window must be >= 0, got {self.repetition_window}")


def _check_type(name: str, value: object, types: tuple, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, types):     # "0.5" or 2.5 as top_k failed deep inside
        raise InputError(f"{name} must be {what}, got {value!r}")


def apply_repetition_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty, once per distinct recent token: positive logits are divided, negative multiplied."""
    out = np.array(logits, dtype=np.float32)  # a copy: the caller's logits stay untouched
    if penalty == 1.0 or len(recent) == 0:
        return out
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[ids < out.size]       # ids past the logits given (a prompt may use ids the sampler is not offered)
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


_SLACK = 1e-6


def _largest(p: np.ndarray, m: int) -> np.ndarray:
    """Ids of the m most likely tokens, most likely first (argpartition first: a full sort of 128k is slow)."""
    if m >= p.size:
        return np.argsort(-p, kind="stable")
    idx = np.argpartition(p, p.size - m)[p.size - m:]
    return idx[np.lexsort((idx, -p[idx]))]  # by probability, ties to the lower id


def _candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids, weights) a draw chooses from, weights not yet renormalised; ids None: the whole vocabulary.

    softmax(logits / T), then top-k, then top-p (its mass measured within what top-k kept), then min-p (relative
    to the most likely token). Expects temperature > 0 and logits already penalised.
    """
    z = np.asarray(logits, dtype=np.float32).reshape(-1) / np.float32(params.temperature)
    p = np.exp(z - z.max())  # float32: 128k exps in float64 cost several times more
    p /= p.sum(dtype=np.float64)
    ids = None
    if params.top_k and params.top_k < p.size:
        ids = _largest(p, params.top_k)
    if params.top_p < 1.0:
        if ids is None:
            # The kept set nearly always sits in the top 1024: widen the search only while it does not.
            m = 1024
            ids = _largest(p, m)
            while m < p.size and p[ids].sum(dtype=np.float64) < params.top_p:
                m *= 8
                ids = _largest(p, m)
            total = 1.0
        else:
            total = p[ids].sum(dtype=np.float64)
        mass = np.cumsum(p[ids], dtype=np.float64) / total
        # The smallest prefix whose mass reaches top_p: up to and including the first index where it does.
        # The slack (float32 precision) lets a set that reaches top_p exactly, on paper, count as reaching it.
        ids = ids[:int(np.searchsorted(mass, params.top_p - _SLACK)) + 1]
    if params.min_p > 0.0:
        floor = params.min_p * p.max() * (1.0 - _SLACK)
        ids = np.flatnonzero(p >= floor) if ids is None else ids[p[ids] >= floor]
    return ids, (p if ids is None else p[ids])


def _penalised(logits: np.ndarray, params: SamplingParams, recent: Sequence[int]) -> np.ndarray:
    window = recent[-params.repetition_window:] if params.repetition_window else recent
    return apply_repetition_penalty(np.asarray(logits).reshape(-1), window, params.repetition_penalty)


def distribution(logits: np.ndarray, params: SamplingParams, recent: Sequence[int] = ()) -> np.ndarray:
    """The distribution Sampler.sample draws from, as a dense float64 [vocab] vector (zeros where filtered out)."""
    z = _penalised(logits, params, recent)
    out = np.zeros(z.size)
    if params.temperature == 0.0:
        out[int(np.argmax(z))] = 1.0
        return out
    ids, w = _candidates(z, params)
    out[slice(None) if ids is None else ids] = w
    return out / out.sum()


class Sampler:
    """Stateless apart from its random generator: call sample(logits, recent_tokens) once per step."""

    def __init__(self, params: SamplingParams | None = None, **overrides: object) -> None:
        """Sampler(SamplingParams(...)) or Sampler(temperature=0.8, top_p=0.9, seed=0)."""
        base = params or SamplingParams()
        self.params = replace(base, **overrides) if overrides else base
        self.rng = np.random.default_rng(self.params.seed)

    def sample(self, logits: np.ndarray, recent: Sequence[int] = ()) -> int:
        """Next token id. `recent`: the tokens so far (prompt and generated); the last window is penalised."""
        z = _penalised(logits, self.params, recent)
        if self.params.temperature == 0.0:
            return int(np.argmax(z))
        ids, w = _candidates(z, self.params)
        # Inverse-CDF draw: one uniform number per token keeps runs reproducible for a given seed.
        cdf = np.cumsum(w, dtype=np.float64)
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), w.size - 1)
        return i if ids is None else int(ids[i])

    __call__ = sample
