"""se_surgery: scale equalization for multi-level feature fusion (Kim & Kim, TMLR 2024), for any PyTorch model."""

from .calibrate import CalibrationError, calibrate
from .capture import CaptureError
from .equalizer import ScaleEqualizer, equalizers
from .find import Consumer, Site, find_sites
from .insert import SiteMismatchError, equalize
from .report import describe

__all__ = [
    "CalibrationError", "CaptureError", "Consumer", "ScaleEqualizer", "Site", "SiteMismatchError", "calibrate",
    "describe", "equalize", "equalizers", "find_sites",
]
__version__ = "0.1.0"
