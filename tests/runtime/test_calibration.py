"""The normalized entropy and the calibration of evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tidal.runtime.trainer import calibration, normalized_entropy, shown_figure


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_predicting_the_positive_rate_everywhere_has_normalized_entropy_and_calibration_1():
    labels = np.array([1, 0, 0, 0, 0, 1, 0, 0], dtype=np.float32)  # a positive rate of 1/4
    logits = np.full(8, _logit(0.25))
    assert normalized_entropy(labels, logits) == pytest.approx(1.0, rel=1e-12)
    assert calibration(labels, logits) == pytest.approx(1.0, rel=1e-12)


def test_better_predictions_lower_the_normalized_entropy_and_over_prediction_raises_the_calibration():
    labels = np.array([1, 0, 0, 0], dtype=np.float32)
    sure = np.array([8.0, -8.0, -8.0, -8.0])
    assert normalized_entropy(labels, sure) < 0.001 and calibration(labels, sure) == pytest.approx(1.0, abs=0.002)
    assert normalized_entropy(labels, -sure) > 10  # confidently wrong: far worse than the rate
    assert calibration(labels, np.zeros(4)) == pytest.approx(2.0)  # predicts 1/2 for a rate of 1/4
    extreme = np.array([1e4, -1e4, -1e4, -1e4])  # no overflow on the way
    assert calibration(labels, extreme) == pytest.approx(1.0) and normalized_entropy(labels, extreme) == 0.0


def test_one_class_has_no_normalized_entropy_and_no_positives_no_calibration():
    assert normalized_entropy(np.ones(3, np.float32), np.zeros(3)) is None
    assert normalized_entropy(np.zeros(3, np.float32), np.zeros(3)) is None
    assert calibration(np.zeros(3, np.float32), np.zeros(3)) is None
    assert calibration(np.ones(2, np.float32), np.zeros(2)) == pytest.approx(0.5)


def test_a_diverged_models_loss_prints_in_a_few_significant_digits():
    assert shown_figure(0.46871) == "0.4687"
    assert shown_figure(123456.7) == "123456.7000"
    assert shown_figure(3.2e31) == "3.2e+31"
    assert shown_figure(float("inf")) == "inf"
