"""The examples: the paper's variance measurement agrees with the analytic prediction."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bv = _load("bilinear_variance")


def test_prediction_matches_the_published_and_interior_values():
    # METHOD.md: as published (128x128, align_corners=False) 0.394 / 0.434 / 0.444; interior 0.391 / 0.431 / 0.441.
    assert [round(bv.predicted_ratio(128, f, False), 3) for f in bv.FACTORS] == [0.394, 0.434, 0.444]
    assert [round(bv.interior_ratio(f), 3) for f in bv.FACTORS] == [0.391, 0.431, 0.441]
    assert bv.predicted_ratio(4096, 8, False) == pytest.approx(bv.interior_ratio(8), rel=1e-3)  # borders vanish


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("factor", bv.FACTORS)
def test_measured_variance_ratio_agrees_with_the_prediction(factor, align_corners):
    # 16 maps of 128x128 (2.6e5 i.i.d. pixels): the ratio's sampling error is about 0.3%; tolerance 1.5%.
    predicted = bv.predicted_ratio(128, factor, align_corners)
    for seed, variance in enumerate((0.01, 0.3, 0.99)):
        measured = bv.measured_ratio(variance, factor, align_corners, seed=seed)
        assert measured == pytest.approx(predicted, rel=0.015), (variance, measured, predicted)
        assert measured < 0.45  # less than half the variance survives


@pytest.mark.parametrize("factor", bv.FACTORS)
def test_nearest_keeps_the_variance(factor):
    assert bv.measured_ratio(0.5, factor, None) == pytest.approx(1.0, abs=1e-12)
