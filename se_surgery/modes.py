"""Handling the user's model: running it in eval mode, or with its norm layers normalising as in training, for a
while (giving it back in the modes and with the running statistics the caller had), and copying it."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from .errors import UsageError
from .torch_internals import RUNNING_NORM_BASES, compiled_original

# How norm layers with running statistics normalise while se_surgery measures: "batch" (with each batch's own
# statistics, as in training), "running" (with their running statistics, as in eval mode), "auto" (as the model's
# own ``.training`` flag says at the call: a model built for training is in training mode, one made ready for
# deployment in eval mode).
NORMS = ("auto", "batch", "running")
_RUNNING = RUNNING_NORM_BASES


def running_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers that keep running statistics (BatchNorm 1-3-D, SyncBatchNorm, InstanceNorm with
    ``track_running_stats``): the layers whose output differs between training and eval mode."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _RUNNING) and m.track_running_stats and m.running_mean is not None]


def untrained_norms(model: nn.Module, running: set[int] | None = None) -> list[str]:
    """Names of the norm layers whose running statistics are still their initial values (mean 0, variance 1, no
    batch tracked): in eval mode they do not normalise at all. ``running``: ids of the layers the forward runs
    (layers it never runs, such as an encoder's unused last stage, do not count); None: all."""
    return [name or type(m).__name__ for name, m in running_norms(model)
            if (running is None or id(m) in running)
            and (m.num_batches_tracked is None or int(m.num_batches_tracked) == 0)
            and not bool(m.running_mean.any()) and bool((m.running_var == 1).all())]


def resolve_norm(model: nn.Module, norm: str, training: bool | None = None) -> str:
    """``norm`` as "batch" or "running" ("auto" follows ``model.training``, or ``training`` where given)."""
    if norm not in NORMS:
        raise UsageError(f"norm={norm!r}: use one of {NORMS}.")
    training = model.training if training is None else training
    return ("batch" if training else "running") if norm == "auto" else norm


def frozen_norms(model: nn.Module, norm: str) -> frozenset[str]:
    """The norm layers that keep their running statistics while the others take batch statistics: with
    ``norm="auto"`` on a model in training mode, those the user put in eval mode (frozen, as mmsegmentation's
    ``norm_eval`` and most fine-tuning recipes do), which is how training will run them; else none."""
    if norm != "auto" or not model.training:
        return frozenset()
    return frozenset(name for name, m in running_norms(model) if not m.training)


@contextlib.contextmanager
def norm_mode(model: nn.Module, norm: str, frozen: frozenset[str] = frozenset()) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout, no drop-path) inside the block; with ``norm="batch"``, its norm layers
    with running statistics (but the ``frozen`` ones, by name) normalise with each batch's statistics as in training,
    and their running statistics and ``num_batches_tracked`` are put back bit for bit afterwards. Every
    ``training`` flag is restored."""
    with eval_mode(model):
        layers = [m for name, m in running_norms(model) if name not in frozen] if norm == "batch" else []
        saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                 for m in layers]
        for m in layers:
            m.train()
        try:
            yield model
        finally:
            with torch.no_grad():
                for m, buffers in zip(layers, saved):
                    for now, before in zip([b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                                            if b is not None], buffers):
                        now.copy_(before)


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


F = TypeVar("F", bound=Callable)


def outside_inference_mode(function: F) -> F:
    """Run ``function`` with ``torch.inference_mode`` off: equalizers made or calibrated under it would hold
    inference tensors, which a later training step cannot save for backward."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with torch.inference_mode(False):
            return function(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers users train and serve with: ``DistributedDataParallel`` and ``DataParallel``
    (``.module``), ``torch.compile`` (its original module). se_surgery's functions act on it; the wrapper sees the
    change (it holds the same module)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compiled_original(model) is not None:
            model = compiled_original(model)
        else:
            return model
