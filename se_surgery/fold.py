"""Fold: absorb a frozen affine map of a consumer's input into the consumer's weights.

If a conv/linear consumer's input channels ``c`` change as ``x_old = a * x_new + b``, then with
``W'[:, c] = W[:, c] * a`` the consumer computes ``W x_old - sum(W[:, c] * b)`` (summed over the kernel), so the
shift is absorbed by adding that sum to its bias, or by subtracting it from the running mean of a BatchNorm right
after it. This is exact where the consumer sees no zero padding; at a zero-padded border the padded zeros would
have needed the shift too (METHOD.md section 4).

The same step serves both directions: ``preserve_function`` (the consumer absorbs ``x = sigma * e + mu`` so the
equalized model computes what the original did) and folding for deployment (``e = x / sigma - mu / sigma``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .equalizer import equalizers, remove_equalizer
from .find import Consumer


def absorb_input_affine(model: nn.Module, consumer: Consumer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``consumer`` accept ``x_new`` where it used to see ``x_old = scale * x_new + shift`` on its slice."""
    weight = model.get_parameter(consumer.weight)
    start, stop = consumer.channels
    with torch.no_grad():
        w = weight[:, start:stop].to(torch.float64)
        scale = scale.to(torch.float64, copy=True).reshape(-1)
        shift = shift.to(torch.float64, copy=True).reshape(-1)
        view = (1, -1) + (1,) * (w.dim() - 2)
        offset = (w * shift.view(view)).sum(dim=tuple(range(1, w.dim())))  # per output channel
        weight[:, start:stop] = (w * scale.view(view)).to(weight.dtype)
        if consumer.bias is not None:
            bias = model.get_parameter(consumer.bias)
            bias.add_(offset.to(bias.dtype))
        elif consumer.batchnorm_mean is not None:
            running_mean = model.get_buffer(consumer.batchnorm_mean)
            running_mean.sub_(offset.to(running_mean.dtype))


def shift_absorbable(consumer: Consumer | None) -> bool:
    """Whether a shift of this consumer's input can be absorbed without new state_dict keys."""
    return consumer is not None and (consumer.bias is not None or consumer.batchnorm_mean is not None)


@dataclass
class FoldStep:
    """What folding did at one site."""

    site: str
    action: str   # "folded", "scale folded, shift kept" or "kept"
    detail: str


def fold(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[FoldStep]]:
    """Fold frozen equalizers into their consumers for deployment; returns the model and what was done per site.

    Exact: the scale always folds into the consumer's weights; the shift folds into its bias (or the running mean
    of the BatchNorm after it) where the consumer has no zero padding. Elsewhere the equalizer (or its shift) is
    kept, so the outputs stay the same. Not for training: folding changes the gradient scales, which are the point.
    """
    target = model if inplace else copy.deepcopy(model)
    eqs = list(equalizers(target))
    if not eqs:
        raise ValueError(f"{type(model).__name__} has no scale equalizers to fold.")
    steps = []
    for eq in eqs:
        if not eq.is_calibrated:
            raise ValueError(f"site {eq.site.name} is not calibrated; calibrate before folding.")
        consumer = eq.site.consumer
        if consumer is None:
            steps.append(FoldStep(eq.site.name, "kept", f"the branch reaches a {eq.site.fusion} before any conv"))
            continue
        where = consumer.weight.rsplit(".", 1)[0]
        full = shift_absorbable(consumer) and not consumer.zero_padded
        std, mean = eq.std.double(), eq.mean.double()
        absorb_input_affine(target, consumer, 1 / std, -mean / std if full else torch.zeros_like(mean))
        if full:
            remove_equalizer(target, eq)
            steps.append(FoldStep(eq.site.name, "folded", f"into {where}"))
        else:
            eq.std.fill_(1.0)
            why = "is zero-padded" if consumer.zero_padded else "has no bias or BatchNorm"
            steps.append(FoldStep(eq.site.name, "scale folded, shift kept", f"{where} {why}"))
    return target, steps
