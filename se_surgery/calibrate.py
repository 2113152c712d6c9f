"""Calibrate: measure each equalizer's input statistics on data, in the equalized model.

Statistics accumulate in float64 with Chan et al.'s pairwise merge (count, mean, sum of squared deviations), so
they equal a one-pass float64 mean/std over everything seen. Sites are calibrated level by level: a site fed by
another site's output (FPN top-down paths) is measured after that one is frozen, so every equalizer's output has
mean 0 and std 1 on the calibration data. Under ``torch.distributed`` the partial statistics of all ranks are
gathered and merged in rank order, so every rank ends with the statistics of all data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .equalizer import ScaleEqualizer, equalizers


class CalibrationError(ValueError):
    """Calibration data that cannot give statistics (empty, non-finite, wrong form, a dead branch)."""


class RunningMoments:
    """Count, mean and sum of squared deviations in float64, merged pairwise (numerically stable)."""

    def __init__(self, dims: tuple[int, ...] | None = None) -> None:
        self.dims = dims  # reduce over these dims; None = all (scalar statistics)
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = self.dims if self.dims is not None else tuple(range(x.dim()))
        n = math.prod(x.shape[d] for d in dims)
        mean = x.mean(dim=dims)
        m2 = ((x - mean.view(_keep(x, dims))) ** 2).sum(dim=dims)
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def all_reduce(self) -> None:
        """Merge the partial moments of every rank, in rank order, so all ranks agree bit for bit."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        size = self.mean.numel() if self.mean is not None else 0
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([size]))
        width = int(max(s.item() for s in sizes))
        mine = torch.zeros(1 + 2 * width, dtype=torch.float64)
        if self.mean is not None:
            mine[0] = self.count
            mine[1:1 + width] = self.mean.reshape(-1).cpu()
            mine[1 + width:] = self.m2.reshape(-1).cpu()
        parts = [torch.zeros_like(mine) for _ in sizes]
        dist.all_gather(parts, mine)
        shape = self.mean.shape if self.mean is not None else (() if width == 1 else (width,))
        device = self.mean.device if self.mean is not None else torch.device("cpu")
        self.count, self.mean, self.m2 = 0, None, None
        for part in parts:
            self.merge(int(part[0].item()), part[1:1 + width].reshape(shape).to(device),
                       part[1 + width:].reshape(shape).to(device))

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count).sqrt()


def _keep(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if d in dims else s for d, s in enumerate(x.shape))


class _Observer:
    """Watches one equalizer's input during calibration; names the site when the data is bad."""

    def __init__(self, equalizer: ScaleEqualizer) -> None:
        self.equalizer = equalizer
        self.moments = RunningMoments()
        self.batch = 0

    def __call__(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"site {self.equalizer.site.name}: NaN or Inf in its input on calibration batch {self.batch}. "
                f"Check the calibration data and the layers before this site ({self.equalizer.site.source})."
            )
        if self.equalizer.per_channel:
            self.moments.dims = tuple(d for d in range(x.dim()) if d != 1)
        self.moments.update(x)


def _as_call(batch: Any, form: tuple[str, Any], index: int) -> tuple[tuple, dict]:
    """Turn one calibration batch into (args, kwargs) of the form the model was captured with."""
    kind, spec = form
    if kind == "kwargs":
        if not isinstance(batch, Mapping):
            raise CalibrationError(
                f"calibration batch {index} is a {type(batch).__name__}, but the model was equalized with keyword "
                f"inputs {sorted(spec)}: yield dicts with those keys."
            )
        missing = [k for k in spec if k not in batch]
        if missing:
            raise CalibrationError(f"calibration batch {index} lacks the keyword input(s) {missing}.")
        return (), {k: batch[k] for k in spec}
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or len(batch) != spec:
        got = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) \
            else f"a {type(batch).__name__}"
        raise CalibrationError(
            f"calibration batch {index} is {got}, but the model was equalized with {spec} positional input(s): "
            f"yield a tensor or a tuple of {spec} (e.g. `(x for x, _ in loader)` to drop labels)."
        )
    return tuple(batch), {}


def _ignore(_x: torch.Tensor) -> None:
    pass


def _device(model: nn.Module) -> torch.device:
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def model_calls(model: nn.Module, data: Iterable, *, max_batches: int | None, progress: bool,
                desc: str) -> Iterator[tuple[int, tuple, dict]]:
    """``(index, args, kwargs)`` per batch of ``data``, in the form the equalized model was captured with and on
    its device, with a progress bar; at most ``max_batches``."""
    form, device = model._se_input_form, _device(model)
    total = len(data) if hasattr(data, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    for index, batch in enumerate(tqdm(data, desc=desc, total=total, disable=not progress, leave=False)):
        if max_batches is not None and index >= max_batches:
            break
        args, kwargs = _as_call(batch, form, index)
        args, kwargs = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, (args, kwargs))
        yield index, args, kwargs


def calibrate_level(model: nn.Module, targets: list[ScaleEqualizer], data: Iterable, *,
                    max_batches: int | None = None, progress: bool = True, desc: str = "calibrating") -> None:
    """One pass over ``data``: measure the inputs of ``targets`` (acting as identity meanwhile), then freeze them."""
    observers = [_Observer(eq) for eq in targets]
    for eq, obs in zip(targets, observers):
        eq.observer = obs
    # Sites further downstream, not calibrated yet, pass their input through meanwhile.
    waiting = [eq for eq in equalizers(model) if not eq.is_calibrated and eq.observer is None]
    for eq in waiting:
        eq.observer = _ignore
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, args, kwargs in model_calls(model, data, max_batches=max_batches, progress=progress,
                                                   desc=desc):
                for obs in observers:
                    obs.batch = index
                model(*args, **kwargs)
                seen += 1
    finally:
        for eq in targets + waiting:
            eq.observer = None
        model.train(was_training)

    if dist.is_available() and dist.is_initialized():
        count = torch.tensor([seen])
        dist.all_reduce(count)
        seen = int(count.item())
    if seen == 0:
        raise CalibrationError("calibration_data yielded no batches: pass a non-empty iterable of input batches.")
    for eq, obs in zip(targets, observers):
        obs.moments.all_reduce()
        if obs.moments.mean is None:
            raise CalibrationError(
                f"site {eq.site.name} was never reached during calibration: the model took another path on the "
                f"calibration data than on example_inputs."
            )
        std = obs.moments.std
        if eq.per_channel and (std > 0).any() and (std == 0).any():
            # Constant channels (dead ReLUs) are common; (x - mean) maps them to 0 whatever the std.
            warnings.warn(f"se_surgery: site {eq.site.name}: {int((std == 0).sum())} of {std.numel()} channels are "
                          f"constant on the calibration data; their std is set to 1.", stacklevel=3)
            std = torch.where(std == 0, torch.ones_like(std), std)
        if (std == 0).any():
            raise CalibrationError(
                f"site {eq.site.name} has zero variance on the calibration data (a dead branch: its input is "
                f"constant). Calibrate on real, varied data, or check the layers before it ({eq.site.source})."
            )
        eq.set_statistics(obs.moments.mean.to(eq.mean.dtype), std.to(eq.std.dtype))


def calibrate(model: nn.Module, data: Iterable, *, max_batches: int | None = None,
              progress: bool = True) -> nn.Module:
    """(Re)measure every equalizer of an equalized model on ``data``, level by level; returns the model.

    ``data`` yields batches of the form given to :func:`se_surgery.equalize` as ``example_inputs`` (a tensor, a
    tuple of positional inputs, or a dict of keyword inputs). Runs under ``torch.no_grad()`` in eval mode on the
    model's device, and restores the model's mode.
    """
    eqs = list(equalizers(model))
    if not eqs or not hasattr(model, "_se_input_form"):
        raise ValueError(f"{type(model).__name__} has no scale equalizers: call se_surgery.equalize first.")
    for level, targets in _by_level(eqs):
        data = _reiterable(data)
        calibrate_level(model, targets, data, max_batches=max_batches, progress=progress,
                        desc=f"calibrating level {level}")
    return model


def _by_level(eqs: list[ScaleEqualizer]) -> list[tuple[int, list[ScaleEqualizer]]]:
    levels = sorted({eq.site.level for eq in eqs})
    return [(lv, [eq for eq in eqs if eq.site.level == lv]) for lv in levels]


def _reiterable(data: Iterable) -> Iterable:
    """A one-shot iterator is kept in memory so that chained sites can be calibrated in several passes."""
    if isinstance(data, Iterator):
        return list(data)
    return data
