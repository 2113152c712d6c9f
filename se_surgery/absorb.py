"""The one fold rule: absorb a frozen affine map of a conv's input slice into the conv, where that is exact.

If a conv consumer's input channels ``c`` change as ``x_old = a * x_new + b``, then with ``W'[:, c] = W[:, c] * a``
the consumer computes ``W x_old - sum(W[:, c] * b)`` (summed over the kernel), so the shift is absorbed by adding
that sum to its bias, or by subtracting it from the running mean of a BatchNorm right after it. This is exact where
the consumer sees no zero padding; at a zero-padded border the padded zeros would have needed the shift too
(docs/method.md, section 4). It is exact only where the consumer is a plain conv of its ``weight`` that serves
this branch alone: a conv called on other branches too, a grouped conv, a wrapper (peft LoRA), a parametrization
(``weight_norm``, ``spectral_norm``) or hooks would compute something else with the changed weight.

The same step serves both directions: ``preserve_function`` (the consumer absorbs ``x = sigma * e + mu`` so the
equalized model computes what the original did) and ``fold`` for deployment (``e = x / sigma - mu / sigma``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .install import foreign_hooks
from .site import Consumer
from .state import FoldReason

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def refusal(model: nn.Module, consumer: Consumer | None) -> FoldReason | None:
    """Why ``consumer`` cannot absorb an affine map of its input slice exactly, or None when it can."""
    if consumer is None:
        return FoldReason.NO_CONSUMER
    if consumer.shared:
        return FoldReason.SHARED_CONSUMER
    if consumer.grouped:
        return FoldReason.NOT_PLAIN_CONSUMER
    path = consumer.weight.rsplit(".", 1)[0]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return FoldReason.NOT_PLAIN_CONSUMER  # replaced by a wrapper that keeps its weight elsewhere
    plain = type(module).forward in {cls.forward for cls in _PLAIN_CONVS} and isinstance(module, _PLAIN_CONVS)
    if not plain or module.groups != 1 or parametrize.is_parametrized(module) or \
            not isinstance(module._parameters.get("weight"), nn.Parameter) or \
            foreign_hooks(module) or "forward" in module.__dict__:
        return FoldReason.NOT_PLAIN_CONSUMER
    return None


def shift_absorbable(consumer: Consumer | None) -> bool:
    """Whether a shift of this consumer's input can be absorbed without new state_dict keys."""
    return consumer is not None and (consumer.bias is not None or consumer.batchnorm_mean is not None)


def absorbed(weight: np.ndarray, channels: slice, scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray,
                                                                                             np.ndarray]:
    """The arithmetic of the rule, shared by the PyTorch and the ONNX fold: for a conv weight ``(out, in, *k)``
    whose input ``channels`` now see ``x_new`` where they saw ``scale * x_new + shift`` (per channel), the new
    weight and the offset its bias must add (per output channel), in float64."""
    w = np.array(weight, dtype=np.float64)
    view = (1, -1) + (1,) * (w.ndim - 2)
    offset = (w[:, channels] * np.asarray(shift, np.float64).reshape(view)).sum(axis=tuple(range(1, w.ndim)))
    w[:, channels] = w[:, channels] * np.asarray(scale, np.float64).reshape(view)
    return w, offset


def absorb_input_affine(model: nn.Module, consumer: Consumer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``consumer`` accept ``x_new`` where it used to see ``x_old = scale * x_new + shift`` on its slice.
    Call only where :func:`refusal` gives None."""
    weight = model.get_parameter(consumer.weight)
    channels = slice(*consumer.channels)
    count = channels.stop - channels.start
    scale = scale.detach().double().cpu().reshape(-1).expand(count).numpy()
    shift = shift.detach().double().cpu().reshape(-1).expand(count).numpy()
    new, offset = absorbed(weight.detach().double().cpu().numpy(), channels, scale, shift)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(new).to(weight.dtype))
        if consumer.bias is not None:
            bias = model.get_parameter(consumer.bias)
            bias.add_(torch.from_numpy(offset).to(bias))
        elif consumer.batchnorm_mean is not None:
            running_mean = model.get_buffer(consumer.batchnorm_mean)
            running_mean.sub_(torch.from_numpy(offset).to(running_mean))
