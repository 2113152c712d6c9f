"""The model's inputs: the forms example inputs take, the default example a model declares, which items of a
batch are the model's inputs, and the device they go to. One rule each, read by every caller."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, UsageError
from .integrations.zoo import declared_inputs
from .torch_internals import CONV_BASE, tree_map

ExampleInputs = tuple[Any, ...] | Mapping[str, Any] | torch.Tensor
InputForm = tuple[str, Any]  # ("args", count) or ("kwargs", names): how a model was equalized


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
    conv = next((m for m in model.modules() if isinstance(m, CONV_BASE)), None)
    declared, name = declared_inputs(model)
    channels = declared or (conv.in_channels if conv is not None else None)
    if channels is None:
        raise UsageError(f"{type(model).__name__} has no convolution to tell its input channels from: pass "
                         f"example_inputs (a tensor, a tuple or a dict of the model's inputs).")
    dims = len(conv.kernel_size) if conv is not None else 2
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.randn(1, channels, *[DEFAULT_SIZE[dims]] * dims, dtype=ref.dtype if ref is not None else None,
                    generator=torch.Generator().manual_seed(0)).to(ref.device if ref is not None else "cpu")
    # (its own generator: the user's seeded random stream is not touched)
    return {name: x} if name else (x,)


def batch_inputs(batch: Any, form: InputForm, index: int) -> tuple[tuple, dict]:
    """The model's inputs in one calibration batch, by the rule the README documents.

    A model equalized with keyword inputs (``{"pixel_values": x}``) takes those keys from a dict batch (other keys,
    e.g. ``labels``, are ignored), or the first item of a tuple/list batch for a single keyword. A model equalized
    with N positional inputs takes a tensor batch as its one input, or the first N items of a tuple/list batch (so
    ``(image, label)`` pairs give the image).
    """
    kind, spec = form
    items = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch) if isinstance(batch, (tuple, list)) \
        else None
    if kind == "kwargs":
        if isinstance(batch, Mapping):
            missing = [k for k in spec if k not in batch]
            if missing:
                raise CalibrationError(f"calibration batch {index} lacks the keyword input(s) {missing} the model "
                                       f"was equalized with (it has {sorted(batch)}); pass input_fn= to pick them.")
            return (), {k: batch[k] for k in spec}
        if items and len(spec) == 1:
            return (), {spec[0]: items[0]}
    elif items is not None and len(items) >= spec:
        return items[:spec], {}
    raise CalibrationError(
        f"calibration batch {index} is a {type(batch).__name__}"
        + (f" of {len(items)} items" if items is not None else "")
        + f", but the model was equalized with {spec if kind == 'args' else list(spec)} "
        + ("positional input(s)" if kind == "args" else "keyword input(s)")
        + ": yield tensors, (input, label) tuples or dicts with those keys, or pass input_fn= to turn a batch into "
          "the model's inputs.")


def example_from_batch(batch: Any) -> ExampleInputs:
    """A first training batch's model inputs where no form is known yet (the framework callbacks): a tensor, the
    first item of an ``(image, label)`` pair, or ``pixel_values`` of a dict (transformers batches)."""
    form: InputForm = ("kwargs", ("pixel_values",)) if isinstance(batch, Mapping) else ("args", 1)
    args, kwargs = batch_inputs(batch, form, 0)
    return kwargs or args


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def to_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` (tensors in any nesting of tuples, lists and dicts) on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)
