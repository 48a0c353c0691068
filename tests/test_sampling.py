"""Sampling draws tokens with the frequencies its parameters define.

The expected distributions are computed here from the definitions (numpy, not our code): softmax of
logits / temperature; then, in this order, each on the distribution the ones before it left
(renormalised): top-k keeps the k best, min-p drops tokens under min_p x the best one's probability,
top-p keeps the smallest best-first set whose mass reaches p. Many seeded draws, then each token's
frequency must be within 5 standard errors of its probability, and a token the parameters exclude is
never drawn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh.router.sampling import RequestSampler, SamplingParams

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 6000


def expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    if top_k:
        p[order[top_k:]] = 0
        p /= p.sum()
    if min_p:
        p[p < min_p * p.max()] = 0
        p /= p.sum()
    if top_p < 1:
        mass_before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        p[order[mass_before >= top_p]] = 0
        p /= p.sum()
    return p


CASES = {
    "temperature 1": dict(),
    "temperature 0.5": dict(temperature=0.5),
    "temperature 2": dict(temperature=2.0),
    "top_k 3": dict(top_k=3),
    "top_p 0.7": dict(top_p=0.7),
    "min_p 0.25": dict(min_p=0.25),
    "all at once": dict(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_frequencies_follow_the_parameters(name):
    params = CASES[name]
    sampler = RequestSampler(SamplingParams(seed=1234, **params), [0], len(LOGITS))
    logits = torch.tensor(LOGITS, dtype=torch.float32)
    counts = np.bincount([sampler.sample(logits)[0] for _ in range(DRAWS)], minlength=len(LOGITS))
    want = expected(**params)
    freq = counts / DRAWS
    assert (counts[want == 0] == 0).all(), (counts, want)
    tolerance = 5 * np.sqrt(want * (1 - want) / DRAWS) + 1e-9
    assert (np.abs(freq - want) <= tolerance).all(), (freq.round(3), want.round(3))
    assert (want > 0).sum() >= 2  # every case leaves a real choice


def test_the_same_seed_draws_the_same_tokens_and_another_does_not():
    logits = torch.tensor(LOGITS, dtype=torch.float32)

    def draws(seed):
        sampler = RequestSampler(SamplingParams(seed=seed), [0], len(LOGITS))
        return [sampler.sample(logits)[0] for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
