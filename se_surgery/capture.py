"""Capture: a torch.export graph of the model, used only to *analyse* it.

torch.export(strict=False) captures models that torch.fx.symbolic_trace cannot (shape checks, list inputs), but the
exported module is fixed to the traced signature and ignores .train()/.eval(). So se_surgery never runs the
exported graph: it reads it to find sites, then edits the user's own eager module (see runtime.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import CaptureError, UsageError
from .modes import eval_mode

ExampleInputs = tuple[Any, ...] | Mapping[str, Any] | torch.Tensor


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional args and keyword args from a tuple, a dict (``pixel_values=`` models) or a bare tensor."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise UsageError(
        f"example_inputs must be a tuple of positional inputs, a dict of keyword inputs or a tensor, "
        f"got {type(example_inputs).__name__}"
    )


DEFAULT_SIZE = {1: 4096, 2: 512, 3: 64}   # per spatial dims: a training-like size, a multiple of 32


def default_example(model: nn.Module) -> ExampleInputs:
    """An example input built from what the model declares: its first convolution's channels and dimensions (or
    a transformers config's ``num_channels`` and main input name), batch 1, at :data:`DEFAULT_SIZE`."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None) or (conv.in_channels if conv is not None else None)
    if channels is None:
        raise UsageError(f"{type(model).__name__} has no convolution to tell its input channels from: pass "
                         f"example_inputs (a tensor, a tuple or a dict of the model's inputs).")
    dims = len(conv.kernel_size) if conv is not None else 2
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.randn(1, channels, *[DEFAULT_SIZE[dims]] * dims, dtype=ref.dtype if ref is not None else None,
                    device=ref.device if ref is not None else None)
    name = getattr(model, "main_input_name", None) if config is not None else None
    return {name: x} if name else (x,)


def capture(model: nn.Module, example_inputs: ExampleInputs, training: bool = False) -> torch.export.ExportedProgram:
    """Export ``model`` in eval mode (the graph deployment sees; ``training``: in training mode) without changing
    its mode or weights."""
    args, kwargs = split_inputs(example_inputs)
    try:
        with eval_mode(model):
            if training:
                model.train()
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # torch.export raises many types; all mean the same thing to the user
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} with the given example_inputs "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check that the model "
            f"runs on example_inputs as given (a tuple of positional inputs or a dict of keyword inputs)."
        ) from error
