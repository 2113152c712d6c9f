"""The exceptions se_surgery raises. Every one derives from :class:`SeSurgeryError`, so ``except
se_surgery.SeSurgeryError`` catches all of them; each also derives from the builtin a caller would expect."""

from __future__ import annotations

import os
import sys
import warnings


class SeSurgeryError(Exception):
    """Base class of every error se_surgery raises."""


class UsageError(SeSurgeryError, ValueError):
    """A call that cannot work on this model as it is (no equalizers, not calibrated, folded, bad option)."""


class CaptureError(SeSurgeryError, RuntimeError):
    """The model could not be captured as a graph."""


class SiteMismatchError(SeSurgeryError, RuntimeError):
    """A site found in the graph was not met at run time as the graph promised."""


class CalibrationError(SeSurgeryError, ValueError):
    """Calibration data that cannot give statistics (empty, non-finite, wrong form, a dead branch)."""


class OnnxError(SeSurgeryError, RuntimeError):
    """A model that does not export, a graph that cannot be read, or a fold that onnxruntime did not confirm."""


class NotCalibratedError(SeSurgeryError, RuntimeError):
    """An equalizer ran (or was folded) before its statistics were measured."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointed at the first frame outside se_surgery: the user's line that called it, however
    deep inside the package the warning arises."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
