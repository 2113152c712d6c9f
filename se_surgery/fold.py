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
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NotCalibratedError
from .runtime import detach, equalizers, registry
from .site import Consumer


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
    action: str   # "folded", "scale folded, shift moved before the resize", "moved before the resize" or "kept"
    detail: str


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold frozen equalizers into the model for deployment, as ``torch.fx``'s ``fuse`` folds BatchNorm.

    Exact, by the cheapest form (the ONNX fold does the same): the scale goes into the consumer conv's weights; the
    shift into its bias (or the running mean of the BatchNorm after a bias-free conv) where the consumer has no zero
    padding. What cannot fold (the shift at a zero-padded conv; scale and shift at an addition) stays as an
    equalizer that acts on the low-resolution input of its resize, where it costs 1/factor^d as much. Not for
    training: folding changes the gradient scales, which are the point.

    Args:
        model: an equalized, calibrated model.
        inplace: fold into ``model`` itself instead of a deep copy.

    Returns:
        The folded model. What was done per site is in ``se_surgery.describe(model)`` and
        ``model.scale_equalizers.folds`` (a list of :class:`FoldStep`). A model without equalizers comes back
        unchanged, with a warning.
    """
    target = model if inplace else copy.deepcopy(model)
    eqs = equalizers(target)
    if not eqs:
        warnings.warn(f"se_surgery: {type(model).__name__} has no scale equalizers to fold; returned unchanged.",
                      stacklevel=2)
        return target
    uncalibrated = [eq.name for eq in eqs if not eq.is_calibrated]
    if uncalibrated:
        raise NotCalibratedError(f"{', '.join(uncalibrated)} not calibrated; call se_surgery.calibrate before "
                                 f"folding.")
    reg = registry(target)
    for eq in eqs:
        if eq.folded:
            continue
        consumer, site = eq.site.consumer, eq.site
        movable = site.kind == "upsample"
        std, mean = eq.std.double(), eq.mean.double()
        if consumer is None:
            if movable:
                eq.before_resize = True
                eq.folded = f"the branch meets a {site.fusion} before any conv: moved before the resize"
                reg.folds.append(FoldStep(site.name, "moved before the resize", eq.folded))
            else:
                reg.folds.append(FoldStep(site.name, "kept", f"the branch meets a {site.fusion} before any conv"))
            continue
        where = consumer.weight.rsplit(".", 1)[0]
        full = shift_absorbable(consumer) and not consumer.zero_padded
        absorb_input_affine(target, consumer, 1 / std, -mean / std if full else torch.zeros_like(mean))
        if full:
            detach(target, eq, keep_registry=True)
            reg.folds.append(FoldStep(site.name, "folded", f"into {where}"))
            continue
        eq.std.fill_(1.0)
        why = "is zero-padded" if consumer.zero_padded else "has no bias or BatchNorm"
        eq.before_resize = movable
        eq.folded = f"scale into {where}; shift {'moved before the resize' if movable else 'kept'} ({where} {why})"
        reg.folds.append(FoldStep(site.name, "scale folded, shift " + ("moved before the resize" if movable
                                                                        else "kept"), f"{where} {why}"))
    return target
