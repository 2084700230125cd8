"""The two 'do the maps point at the subject' measurements (jedi_train/eval/attention.py): their arithmetic on
known inputs, and one small run each on a tiny (untrained) pipeline. The figures are in the README."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.pipelines import load

from jedi_train.eval import attention as measure

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return load(pipe_dir)


def test_pixel_densities_spread_token_mass_over_its_pixels():
    heat = torch.zeros(2, 2)
    heat[0, 0] = 0.6  # all mass on the top-left token: 8x8 pixels of a 16 px reference
    mask = np.zeros((16, 16))
    mask[:8, :8] = 1  # the subject is exactly that token
    subject, background = measure.pixel_densities(heat, mask)
    assert subject == pytest.approx(0.6 / 64) and background == pytest.approx(0.0)
    mask[:, :] = 0
    mask[8:, 8:] = 1  # the subject is elsewhere: the mass is background
    subject, background = measure.pixel_densities(heat, mask)
    assert subject == pytest.approx(0.0) and background == pytest.approx(0.6 / 192)


def test_subject_vs_background_on_a_tiny_pipeline(pipe):
    r = measure.subject_vs_background(pipe, subjects=3, samples=1, steps=2)
    rows = np.array(r["per_subject"])
    assert rows.shape == (3, 2) and (rows > 0).all()
    assert r["ratio"] == pytest.approx(rows[:, 0].mean() / rows[:, 1].mean())
    lo, hi = r["ratio_ci"]
    assert lo <= r["ratio"] <= hi


def test_true_vs_distractor_bookkeeping(pipe, monkeypatch):
    """With attention that always favours the first reference, the true one wins exactly when it was put first."""
    monkeypatch.setattr(measure, "reference_shares_for_image", lambda *a, **k: torch.tensor([0.3, 0.1]))
    r = measure.true_vs_distractor(pipe, subjects=6, steps=2)
    first = [not bool(np.random.default_rng([0, i, 33]).integers(2)) for i in range(6)]
    assert r["true_wins"] == pytest.approx(np.mean(first)) and 0 < r["true_wins"] < 1
    assert r["true_share"] + r["distractor_share"] == pytest.approx(0.4)


def test_true_vs_distractor_on_a_tiny_pipeline(pipe):
    r = measure.true_vs_distractor(pipe, subjects=2, steps=3)
    rows = np.array(r["per_subject"])
    assert rows.shape == (2, 2) and (rows > 0).all() and (rows.sum(1) < 1).all()  # the target keeps some for itself
    assert r["true_wins_ci"][0] <= r["true_wins"] <= r["true_wins_ci"][1]
