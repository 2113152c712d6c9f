"""equalize(): capture, find, insert, verify, calibrate, and optionally keep the pretrained function."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .calibrate import _by_level, _reiterable, calibrate_level
from .capture import ExampleInputs, capture, split_inputs
from .equalizer import ScaleEqualizer, attach, equalizers
from .find import find_sites
from .fold import absorb_input_affine, shift_absorbable


class SiteMismatchError(RuntimeError):
    """A site found in the graph was not met at run time as expected."""


def equalize(
    model: nn.Module,
    example_inputs: ExampleInputs,
    calibration_data: Iterable | None = None,
    *,
    per_channel: bool = False,
    branches: str = "upsampled",
    preserve_function: bool = False,
    inplace: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Insert a ScaleEqualizer after every bilinear upsampling that feeds a fusion, and calibrate them.

    Returns a model of the same class and call signature (a copy unless ``inplace=True``). See README.md for
    every option. Without ``calibration_data`` the equalizers stay uncalibrated and the model refuses to run until
    :func:`se_surgery.calibrate` is called.
    """
    if preserve_function and calibration_data is None:
        raise ValueError("preserve_function=True needs calibration_data: the compensation uses the statistics.")
    args, kwargs = split_inputs(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    state = getattr(target, "_se_state", None)
    if state is not None:
        state.bypass = True
    try:
        sites = find_sites(capture(target, example_inputs), branches=branches)
    finally:
        if state is not None:
            state.bypass = False
    if not sites:
        warnings.warn(f"se_surgery: no bilinear upsampling feeds a fusion in {type(model).__name__}; "
                      f"the model is returned unchanged.", stacklevel=2)
        return target
    added = attach(target, sites, per_channel=per_channel)
    if not added:
        warnings.warn(f"se_surgery: {type(model).__name__} is already equalized at all {len(sites)} sites; "
                      f"nothing added.", stacklevel=2)
        return target
    target._se_input_form = ("kwargs", tuple(kwargs)) if kwargs else ("args", len(args))
    _verify(target, added, args, kwargs)
    if calibration_data is None:
        return target
    reference = _outputs(target, args, kwargs, bypass=True) if preserve_function else None
    data = calibration_data
    for level, level_eqs in _by_level(added):
        data = _reiterable(data)
        calibrate_level(target, level_eqs, data, max_batches=max_batches, progress=progress,
                        desc=f"calibrating level {level}")
        if preserve_function:
            for eq in level_eqs:
                _compensate(target, eq)
    if preserve_function:
        _report_change(target, reference, args, kwargs)
    return target


def _verify(model: nn.Module, added: list[ScaleEqualizer], args, kwargs) -> None:
    """Run the example once and check that every new equalizer saw exactly the tensor the graph promised."""
    seen: dict[int, list[tuple[int, ...]]] = {id(eq): [] for eq in added}
    for eq in added:
        eq.observer = lambda x, eq=eq: seen[id(eq)].append(tuple(x.shape))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for eq in added:
            eq.observer = None
        model.train(was_training)
    for eq in added:
        if seen[id(eq)] != [eq.site.shape]:
            raise SiteMismatchError(
                f"site {eq.site.name} ({eq.site.source}) expected one {eq.site.kind} of shape {eq.site.shape} at "
                f"run time but saw {seen[id(eq)] or 'none'}. The module's forward calls differ between "
                f"torch.export and eager execution; please report this with the model's class."
            )


def _outputs(model: nn.Module, args, kwargs, bypass: bool = False) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    model._se_state.bypass = bypass
    try:
        with torch.no_grad():
            return [t.detach().clone() for t in tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    finally:
        model._se_state.bypass = False
        model.train(was_training)


def _compensate(model: nn.Module, eq: ScaleEqualizer) -> None:
    """Let the site's consumer absorb ``x = sigma * e + mu`` so the model computes what it did before."""
    consumer = eq.site.consumer
    if consumer is None:
        eq.compensation = f"not possible: the branch reaches a {eq.site.fusion} before any conv"
        return
    shift = eq.mean if shift_absorbable(consumer) else torch.zeros_like(eq.mean)
    absorb_input_affine(model, consumer, eq.std, shift)
    where = consumer.weight.rsplit(".", 1)[0]
    if not shift_absorbable(consumer):
        eq.compensation = f"scale only: {where} has no bias or BatchNorm to take the shift"
    elif consumer.zero_padded:
        eq.compensation = f"inexact at borders: {where} is zero-padded"
    else:
        eq.compensation = f"exact, in {where}" + (" (BatchNorm running_mean)" if consumer.bias is None else "")


def _report_change(model: nn.Module, reference: list[torch.Tensor], args, kwargs) -> None:
    after = _outputs(model, args, kwargs)
    change = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(after, reference))
    model._se_output_change = change
    inexact = [eq.site.name for eq in equalizers(model) if eq.compensation and not eq.compensation.startswith("exact")]
    if inexact:
        warnings.warn(f"se_surgery: preserve_function could not keep the function exactly at {len(inexact)} "
                      f"site(s) ({', '.join(inexact)}); the output moved by {change:.3g} (max abs difference "
                      f"relative to the output's max abs) on example_inputs. se_surgery.describe(model) gives the "
                      f"reason per site.", stacklevel=3)
