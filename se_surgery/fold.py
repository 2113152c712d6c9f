"""Fold: absorb frozen equalizers into the model's weights for deployment (the rule is in ``absorb.py``)."""

from __future__ import annotations

import torch
from torch import nn

from .absorb import absorb_input_affine, refusal, shift_absorbable
from .dispatch import check_attached
from .errors import NotCalibratedError, warn
from .install import detach, equalizers
from .modes import copy_model, unwrap
from .state import FoldAction, FoldReason, FoldStep, registry


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
        ``model.scale_equalizers.folds`` (a list of :class:`~se_surgery.state.FoldStep`). A model without
        equalizers comes back unchanged, with a warning. A consumer that is not a plain conv serving this branch
        alone (shared by several branches, grouped, wrapped by peft LoRA, parametrized, hooked) is not folded
        into: that equalizer stays, moved before its resize (exact), and the step says why.
    """
    model = unwrap(model)
    check_attached(model)
    target = model if inplace else copy_model(model)
    eqs = equalizers(target)
    if not eqs:
        warn(f"se_surgery: {type(model).__name__} has no scale equalizers to fold; returned unchanged.")
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
        reason = refusal(target, consumer)
        where = consumer.weight.rsplit(".", 1)[0] if consumer is not None else ""
        if reason is not None:
            eq.fold = FoldStep(site.name, FoldAction.MOVED if movable else FoldAction.KEPT, reason, where)
            continue
        full = shift_absorbable(consumer) and not consumer.zero_padded
        absorb_input_affine(target, consumer, 1 / std, -mean / std if full else torch.zeros_like(mean))
        if full:
            detach(target, eq, keep_registry=True)
            reg.folded_away.append(FoldStep(site.name, FoldAction.FOLDED, FoldReason.NONE, where))
            continue
        eq.std.fill_(1.0)
        eq.fold = FoldStep(site.name, FoldAction.SCALE_FOLDED,
                           FoldReason.ZERO_PADDED if consumer.zero_padded else FoldReason.NO_BIAS, where)
    kept = [eq for eq in equalizers(target) if eq.fold is not None]
    if kept:
        shown = "; ".join(f"{eq.name}: {eq.fold.action.value.replace('_', ' ')} "
                          f"({eq.fold.reason.value.replace('_', ' ')})" for eq in kept[:4])
        warn(f"se_surgery: fold left {len(kept)} of {len(eqs)} equalizer(s) of {type(model).__name__} in the runtime "
             f"({shown}{'; ...' if len(kept) > 4 else ''}): exact, at the cost of an affine map each (before its "
             f"resize where it is one). se_surgery.describe(model) lists every site; se_surgery.export_onnx folds "
             f"the same way into the graph.")
    return target
