"""Handling the user's model: running it in eval mode for a while (giving it back in the mode the caller had), and
copying it."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn

from .errors import UsageError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards every submodule's ``training`` flag is as it was."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags.items():
            module.training = training


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, or a :class:`~se_surgery.UsageError` that says what to do where the model cannot be copied."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as error:
        raise UsageError(
            f"{type(model).__name__} cannot be deep-copied ({str(error).splitlines()[0][:120]}); the old "
            f"torch.nn.utils.weight_norm makes such models. Pass inplace=True to work on the model itself, or use "
            f"torch.nn.utils.parametrizations.weight_norm.") from error
