"""The examples: the paper's variance measurement agrees with the exact prediction, for every kernel; each
calibration mode measures the scales of its own norm mode (docs/calibration.md)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


uv = _load("upsampling_variance")


def test_prediction_matches_the_published_and_interior_values():
    # docs/method.md: as published (128x128, align_corners=False) 0.394 / 0.434 / 0.444; interior 0.391 / 0.431 / 0.441.
    assert [round(uv.predicted_ratio("bilinear", 128, f, False), 3) for f in uv.FACTORS] == [0.394, 0.434, 0.444]
    assert [round(uv.interior_ratio("bilinear", f), 3) for f in uv.FACTORS] == [0.391, 0.431, 0.441]
    assert uv.predicted_ratio("bilinear", 4096, 8, False) == pytest.approx(uv.interior_ratio("bilinear", 8),
                                                                          rel=1e-3)  # borders vanish
    # every kernel keeps less the more axes it interpolates; bicubic's negative lobes keep more than bilinear
    x2 = {m: uv.interior_ratio(m, 2) for m in uv.KERNELS}
    assert x2["trilinear"] < x2["bilinear"] < x2["linear"] < 1 and x2["bilinear"] < x2["bicubic"] < 1


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("factor", uv.FACTORS)
@pytest.mark.parametrize("mode", sorted(uv.KERNELS))
def test_measured_variance_ratio_agrees_with_the_prediction(mode, factor, align_corners):
    # about 2.6e5 i.i.d. input pixels: the ratio's sampling error is about 0.3%; tolerance 1.5%.
    predicted = uv.predicted_ratio(mode, uv.KERNELS[mode][1], factor, align_corners)
    for seed, variance in enumerate((0.01, 0.99)):
        measured = uv.measured_ratio(mode, variance, factor, align_corners, seed=seed)
        assert measured == pytest.approx(predicted, rel=0.015), (variance, measured, predicted)
        assert measured < 0.8


@pytest.mark.parametrize("mode", sorted(uv.KERNELS))
def test_nearest_keeps_the_variance(mode):
    assert uv.measured_ratio(mode, 0.5, 2, None) == pytest.approx(1.0, abs=1e-12)


def test_calibration_modes_each_mode_measures_the_scales_of_its_own_mode(monkeypatch):
    # docs/calibration.md's table: calibrated with batch statistics, every equalizer leaves at std 1 (held-out
    # batches) in training mode; calibrated with running statistics, in eval mode; PSPNet's warmed-up running
    # statistics are far from its batches, so the other mode is off there.
    monkeypatch.syspath_prepend(str(EXAMPLES))  # (calibration_modes builds its models with examples/evidence.py)
    off = {}
    for label, norm, trained, evaluated in _load("calibration_modes").measure():
        own, other = (trained, evaluated) if norm == "batch" else (evaluated, trained)
        assert own == pytest.approx([1.0] * len(own), abs=0.05), (label, norm)
        off[label, norm] = max(abs(s - 1) for s in other)
    assert min(off["smp PSPNet, evidence setup", norm] for norm in ("batch", "running")) > 0.2, off
