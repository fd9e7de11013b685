"""Dawid–Skene annotator reliability (app/crowd/reliability.py) on votes with a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from app.crowd.reliability import Vote, estimate


def simulate(n_items: int, skills: dict[str, tuple[float, float]], prevalence: float = 0.4,
             seed: int = 0) -> tuple[list[Vote], np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random(n_items) < prevalence
    votes = []
    for name, (sensitivity, specificity) in skills.items():
        for i, there in enumerate(truth):
            present = rng.random() < sensitivity if there else rng.random() > specificity
            votes.append(Vote(i, name, bool(present)))
    return votes, truth


def test_recovers_each_annotators_sensitivity_and_specificity() -> None:
    skills = {"a": (0.95, 0.97), "b": (0.9, 0.95), "c": (0.92, 0.96), "d": (0.93, 0.94), "careless": (0.6, 0.7)}
    votes, truth = simulate(2000, skills)
    result = estimate(votes)
    for name, (sensitivity, specificity) in skills.items():
        got = result.annotators[name]
        assert got.votes == 2000
        assert got.sensitivity == pytest.approx(sensitivity, abs=0.04), name
        assert got.specificity == pytest.approx(specificity, abs=0.04), name
    posterior = np.array([result.posterior[i] for i in range(2000)])
    majority = np.array([sum(v.present for v in votes if v.item == i) for i in range(2000)]) >= 3
    assert ((posterior > 0.5) == truth).mean() >= (majority == truth).mean()
    assert ((posterior > 0.5) == truth).mean() > 0.98


def test_few_votes_stay_near_an_average_voter() -> None:
    result = estimate([Vote(0, "new", True), Vote(0, "x", True), Vote(1, "x", False)])
    assert 0.3 < result.annotators["new"].sensitivity < 1.0
    assert estimate([]).annotators == {}


def test_presence_votes_count_silence() -> None:
    from app.crowd.reliability import presence_votes

    votes = presence_votes({(1, 4): ["a", "b"]}, [((1, 4), "a", "liver"), ((1, 5), "c", "liver"),
                                                  ((1, 4), "a", "heart")], ["liver", "spleen"])
    assert [(v.item, v.annotator, v.present) for v in votes] == [
        ((1, 4, "liver"), "a", True), ((1, 4, "spleen"), "a", False),
        ((1, 4, "liver"), "b", False), ((1, 4, "spleen"), "b", False),
        ((1, 5, "liver"), "c", True), ((1, 5, "spleen"), "c", False)]  # drawing is seeing; unknown labels ignored
