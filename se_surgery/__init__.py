"""se_surgery: scale equalization for multi-level feature fusion (Kim & Kim, TMLR 2024), for any PyTorch model."""

from .calibrate import CalibrationError, calibrate
from .capture import CaptureError
from .equalizer import ScaleEqualizer, equalizers
from .find import Consumer, Site, find_sites
from .fold import FoldStep, fold
from .insert import SiteMismatchError, equalize
from .onnx import FoldReport, OnnxError, export_onnx, fold_onnx
from .report import BranchScale, ScaleReport, describe, scale_report

__all__ = [
    "BranchScale", "CalibrationError", "CaptureError", "Consumer", "FoldReport", "FoldStep", "OnnxError",
    "ScaleEqualizer", "ScaleReport", "Site", "SiteMismatchError", "calibrate", "describe", "equalize", "equalizers",
    "export_onnx", "find_sites", "fold", "fold_onnx", "scale_report",
]
__version__ = "0.1.0"
