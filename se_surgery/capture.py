"""Capture: a torch.export graph of the model, used only to *analyse* it.

torch.export(strict=False) captures models that torch.fx.symbolic_trace cannot (shape checks, list inputs), but the
exported module is fixed to the traced signature and ignores .train()/.eval(). So se_surgery never runs the
exported graph: it reads it to find sites, then edits the user's own eager module (see dispatch.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CaptureError
from .inputs import ExampleInputs, split_inputs
from .modes import eval_mode, running_norms


def capture(model: nn.Module, example_inputs: ExampleInputs, training: bool = False) -> torch.export.ExportedProgram:
    """Export ``model`` in eval mode (the graph deployment sees; ``training``: in training mode) without changing
    its mode or weights."""
    args, kwargs = split_inputs(example_inputs)
    try:
        with eval_mode(model):
            if training:  # (norm layers stay in eval mode: their training path updates statistics and calls no
                model.train()  # module; BatchNorm(momentum=None) would make it data-dependent for torch.export)
                for _, layer in running_norms(model):
                    layer.eval()
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # torch.export raises many types; all mean the same thing to the user
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} with the given example_inputs "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check that the model "
            f"runs on example_inputs as given (a tuple of positional inputs or a dict of keyword inputs)."
        ) from error
