"""What the framework callbacks share: equalize in place, then calibrate unless restored statistics exist."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..calibrate import calibrate
from ..equalize import equalize
from ..install import equalizers


def equalize_in_place(model: nn.Module, example_inputs: Any, **options) -> None:
    """Equalize ``model`` itself (same object, so optimizers and references stay valid), without calibration."""
    if not equalizers(model):
        equalize(model, example_inputs, None, inplace=True, **options)


def calibrate_if_needed(model: nn.Module, loader: Iterable, max_batches: int | None, input_fn) -> bool:
    """Calibrate the equalizers that have no statistics yet (a restored checkpoint's keep theirs)."""
    if not equalizers(model) or all(eq.is_calibrated for eq in equalizers(model)):
        return False
    calibrate(model, loader, max_batches=max_batches, progress=False, input_fn=input_fn)
    return True
