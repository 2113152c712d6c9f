"""What the framework callbacks share: example inputs from a first batch, and equalize-then-calibrate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..calibrate import calibrate
from ..equalize import equalize
from ..errors import UsageError
from ..runtime import equalizers


def example_from_batch(batch: Any, who: str) -> Any:
    """The model's inputs in a first training batch: the tensor, the first item of an (image, label) pair, or
    ``pixel_values`` of a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    if isinstance(batch, Mapping) and isinstance(batch.get("pixel_values"), torch.Tensor):
        return {"pixel_values": batch["pixel_values"]}
    raise UsageError(f"{who}: cannot tell the model's inputs in a training batch of type {type(batch).__name__}; "
                     f"pass example_inputs= (and input_fn= for calibration).")


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
