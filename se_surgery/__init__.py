"""se_surgery: scale equalization for multi-level feature fusion (Kim & Kim, TMLR 2024), for any PyTorch model."""

from .calibrate import calibrate
from .checkpoint import restore
from .equalize import equalize
from .equalizer import ScaleEqualizer
from .errors import (
    CalibrationError,
    CaptureError,
    NotCalibratedError,
    OnnxError,
    SeSurgeryError,
    SiteMismatchError,
    UsageError,
)
from .find import find_sites
from .fold import fold
from .install import equalizers
from .onnx import FoldReport, export_onnx, fold_onnx
from .report import BranchScale, ScaleReport, describe, scale_report
from .site import Consumer, Site
from .state import Compensation, FoldAction, FoldReason, FoldStep
from .where import FusionScales, Where, narrows

__all__ = [
    "BranchScale", "CalibrationError", "CaptureError", "Compensation", "Consumer", "FoldAction", "FoldReason",
    "FoldReport", "FoldStep", "FusionScales", "NotCalibratedError",
    "OnnxError", "ScaleEqualizer", "ScaleReport", "SeSurgeryError", "Site", "SiteMismatchError", "UsageError", "Where",
    "calibrate", "describe", "equalize", "equalizers", "export_onnx", "find_sites", "fold", "fold_onnx",
    "narrows", "restore", "scale_report",
]
__version__ = "0.3.0"
