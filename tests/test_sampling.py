"""Sampling against hand-computed distributions."""
from __future__ import annotations

import numpy as np
import pytest

from llamac.errors import InputError
from llamac.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, distribution

# Five tokens with probabilities 0.5, 0.2, 0.15, 0.1, 0.05 at temperature 1, shuffled so order != id.
PROBS = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
LOGITS = np.log(PROBS).astype(np.float32) + 3.0  # a shift changes nothing


def kept(**kw) -> dict[int, float]:
    d = distribution(LOGITS, SamplingParams(temperature=kw.pop("temperature", 1.0), **kw))
    return {i: round(float(p), 6) for i, p in enumerate(d) if p > 0}


def renorm(ids: list[int]) -> dict[int, float]:
    return {i: round(float(PROBS[i] / PROBS[ids].sum()), 6) for i in ids}


def test_temperature_zero_is_argmax_whatever_the_filters():
    rng = np.random.default_rng(0)
    for seed in range(5):
        logits = rng.normal(size=1000).astype(np.float32)
        s = Sampler(temperature=0.0, top_k=50, top_p=0.5, min_p=0.2, seed=seed)
        assert s.sample(logits) == int(np.argmax(logits))


def test_top_k_1_is_argmax_at_any_temperature():
    logits = np.random.default_rng(1).normal(size=32000).astype(np.float32)
    s = Sampler(temperature=5.0, top_k=1, seed=0)
    assert all(s.sample(logits) == int(np.argmax(logits)) for _ in range(50))


def test_temperature_scales_the_softmax():
    for t in (0.5, 1.0, 2.0):
        want = PROBS ** (1 / t) / (PROBS ** (1 / t)).sum()
        np.testing.assert_allclose(distribution(LOGITS, SamplingParams(temperature=t)), want, rtol=1e-5)


def test_top_k_keeps_the_k_most_likely_renormalised():
    assert kept(top_k=2) == renorm([1, 3])
    assert kept(top_k=3) == renorm([1, 3, 4])
    assert kept(top_k=5) == kept(top_k=0) == renorm([0, 1, 2, 3, 4])


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(top_p=0.4) == renorm([1])          # 0.5 alone reaches 0.4
    assert kept(top_p=0.5) == renorm([1])          # ... and exactly 0.5
    assert kept(top_p=0.7) == renorm([1, 3])       # 0.5 + 0.2 = 0.7 reaches it exactly
    assert kept(top_p=0.71) == renorm([1, 3, 4])   # needs the 0.15 too
    assert kept(top_p=0.96) == renorm([0, 1, 2, 3, 4])


def test_top_p_is_measured_within_top_k():
    # top-k 3 leaves 0.5, 0.2, 0.15 -> 0.588, 0.235, 0.176; their running mass 0.588, 0.824 reaches 0.8 at two.
    assert kept(top_k=3, top_p=0.8) == renorm([1, 3])


def test_min_p_is_relative_to_the_most_likely_token():
    assert kept(min_p=0.3) == renorm([1, 3, 4])  # keeps p >= 0.3 * 0.5 = 0.15
    assert kept(min_p=0.5) == renorm([1])
    assert kept(min_p=0.1) == renorm([0, 1, 2, 3, 4])


def test_top_p_over_a_flat_large_vocabulary_matches_a_full_sort():
    # 20k nearly equal tokens: the kept set is far beyond the first 1024 candidates the sampler looks at.
    logits = np.random.default_rng(2).normal(scale=0.01, size=128256).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), 0.2)) + 1
    want = np.zeros_like(p)
    want[order[:n]] = p[order[:n]] / p[order[:n]].sum()
    got = distribution(logits, SamplingParams(temperature=1.0, top_p=0.2))
    assert abs(np.count_nonzero(got) - n) <= 1  # float32 softmax may move the cut by one token
    np.testing.assert_allclose(got[order[:n - 1]], want[order[:n - 1]], rtol=1e-3)


def test_repetition_penalty_by_hand():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 0, 1, 0], 2.0)  # each distinct token once
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    assert logits[0] == 2.0  # the caller's array is untouched
    # Only the last `repetition_window` tokens count: token 3 (seen long ago) keeps its logit and wins greedily.
    s = Sampler(temperature=0.0, repetition_penalty=10.0, repetition_window=4)
    assert s.sample(logits, [3] + [0] * 4) == 3
    assert s.sample(logits, [0, 0, 0, 3]) == 2  # 3 -> 0.3 and 0 -> 0.2: the untouched 0.5 wins
    d = distribution(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), recent=[3])
    want = np.exp([2.0, -1.0, 0.5, 1.5])
    np.testing.assert_allclose(d, want / want.sum(), rtol=1e-5)


def test_sample_frequencies_match_the_renormalised_distribution():
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=123)
    want = distribution(LOGITS, params)
    s = Sampler(params)
    n = 20000
    counts = np.bincount([s.sample(LOGITS) for _ in range(n)], minlength=PROBS.size)
    assert counts[want == 0].sum() == 0  # filtered tokens never come up
    sigma = np.sqrt(n * want * (1 - want))
    assert np.all(np.abs(counts - n * want) <= 5 * sigma + 1), (counts / n, want)


def test_same_seed_same_tokens():
    logits = np.random.default_rng(3).normal(size=5000).astype(np.float32)
    params = dict(temperature=1.0, top_k=100, top_p=0.95, min_p=0.01)
    seq = [[s.sample(logits) for _ in range(30)] for s in (Sampler(seed=k, **params) for k in (7, 7, 8))]
    assert seq[0] == seq[1]
    assert seq[0] != seq[2]


def test_bad_parameters_are_refused():
    nan, inf = float("nan"), float("inf")
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                dict(repetition_penalty=0.0), dict(repetition_window=-1), dict(temperature=nan), dict(temperature=inf),
                dict(repetition_penalty=nan), dict(repetition_penalty=inf), dict(top_p=nan), dict(min_p=nan)):
        with pytest.raises(InputError):
            SamplingParams(**bad)


def test_the_penalty_ignores_ids_past_the_logits():
    """A prompt may hold ids the sampler is not offered (a vocabulary padded past the tokenizer's)."""
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    assert Sampler(repetition_penalty=2.0).sample(logits, [1, 7]) == 2
