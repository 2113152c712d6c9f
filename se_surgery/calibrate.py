"""Calibrate: measure each equalizer's input statistics on data, in the equalized model.

Each batch gives its mean and sum of squared deviations (two passes in the feature map's own dtype: no float64 copy
of it), merged in float64 with Chan et al.'s pairwise formula, so the result equals a one-pass mean/std over
everything seen up to float32 rounding. Sites are calibrated level by level: a site fed by another site's output (FPN
top-down paths) is measured after that one is frozen, so every equalizer's output has mean 0 and std 1 on the
calibration data; a model takes one pass over the data per level. Under ``torch.distributed`` the partial
statistics of all ranks are gathered (on the process group's device) and merged in rank order, so every rank ends
with the statistics of all data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .dispatch import bypassed
from .equalizer import ScaleEqualizer
from .errors import CalibrationError, SeSurgeryError, UsageError, warn
from .inputs import batch_inputs, model_device, to_device
from .install import equalizers, reattach
from .modes import (
    copy_model,
    frozen_norms,
    norm_mode,
    outside_inference_mode,
    resolve_norm,
    running_norms,
    untrained_norms,
    unwrap,
)
from .state import registry

InputFn = Callable[[Any], Any]
# A branch whose std is below this fraction of its RMS carries only rounding noise: equalizing would amplify it.
DEAD_RELATIVE_STD = 1e-4
# A branch this quiet in absolute terms is most likely dead in an untrained model: a warning names it.
TINY_STD = 1e-6


class RunningMoments:
    """Count, mean and sum of squared deviations in float64, merged pairwise (numerically stable)."""

    def __init__(self, dims: tuple[int, ...] | None = None) -> None:
        self.dims = dims  # reduce over these dims; None = all (scalar statistics)
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Merge one batch: its mean, then the sum of squared deviations from it (two passes in the input's dtype,
        which is exact enough and about as cheap as an activation; ``torch.var_mean`` is ~15x slower on CPU)."""
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):  # their sums of squares overflow or lose the digits
            x = x.float()
        dims = self.dims if self.dims is not None else tuple(range(x.dim()))
        n = math.prod(x.shape[d] for d in dims)
        mean = x.mean(dim=dims, keepdim=True)
        if self._scratch is None or self._scratch.shape != x.shape or self._scratch.dtype != x.dtype \
                or self._scratch.device != x.device:
            self._scratch = torch.empty_like(x)  # reused across batches: a fresh large buffer costs page faults
        centered = torch.sub(x, mean, out=self._scratch)
        m2 = centered.mul_(centered).sum(dim=dims)
        self.merge(n, mean.reshape(m2.shape).to(torch.float64), m2.to(torch.float64))

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
        device = collective_device()
        size = self.mean.numel() if self.mean is not None else 0
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([size], device=device))
        width = int(max(s.item() for s in sizes))
        mine = torch.zeros(1 + 2 * width, dtype=torch.float64, device=device)
        if self.mean is not None:
            mine[0] = self.count
            mine[1:1 + width] = self.mean.reshape(-1).to(device)
            mine[1 + width:] = self.m2.reshape(-1).to(device)
        parts = [torch.zeros_like(mine) for _ in sizes]
        dist.all_gather(parts, mine)
        shape = self.mean.shape if self.mean is not None else (() if width == 1 else (width,))
        home = self.mean.device if self.mean is not None else torch.device("cpu")
        self.count, self.mean, self.m2 = 0, None, None
        for part in parts:
            self.merge(int(part[0].item()), part[1:1 + width].reshape(shape).to(home),
                       part[1 + width:].reshape(shape).to(home))

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count).sqrt()


def collective_device() -> torch.device:
    """Where the default process group's collectives run: the current CUDA device for NCCL, else the CPU."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _AllSeen(Exception):
    """Raised by the last watched equalizer to see a batch (of a calibration level, or of a measuring pass): the
    rest of that forward (the decoder below, the head, the final upsampling) cannot change what the pass measures,
    so the forward stops there. An ``Exception``, so that torch's cleaning hooks and se_surgery's run as for any
    error; code of the model that catches it only makes the forward run whole."""


class _Pass:
    """The equalizers one measuring pass watches and which of them have seen the current batch: the last one to see
    it ends that forward (:class:`_AllSeen`)."""

    def __init__(self, eqs: list[ScaleEqualizer]) -> None:
        self.count, self.seen = len(eqs), set()

    def saw(self, eq: ScaleEqualizer) -> None:
        self.seen.add(id(eq))
        if len(self.seen) == self.count:
            raise _AllSeen  # (run_batch lets it through; run() ends the forward here)

    def run(self, model: nn.Module, args: tuple, kwargs: dict, norm: str, index: int) -> None:
        """One batch's forward, until every watched equalizer has seen it."""
        self.seen.clear()
        try:
            run_batch(model, args, kwargs, norm, index)
        except _AllSeen:
            pass


class _Observer:
    """Watches one equalizer's input (and, for ``scale="restore"``, its resize's input) during calibration; names
    the site when the data is bad."""

    def __init__(self, equalizer: ScaleEqualizer, scale: str) -> None:
        self.equalizer = equalizer
        self.moments = RunningMoments()
        self.source = RunningMoments() if scale == "restore" else None
        self.batch = 0
        self.pass_: _Pass | None = None          # the calibration pass it is part of
        self.bad_batch: int | None = None

    def __call__(self, x: torch.Tensor, source: torch.Tensor | None) -> None:
        watched = [(self.moments, x)] + ([(self.source, source)] if self.source is not None else [])
        for moments, tensor in watched:
            if self.equalizer.per_channel:
                moments.dims = tuple(d for d in range(tensor.dim()) if d != 1)
            moments.update(tensor)
            if self.bad_batch is None and not bool(torch.isfinite(moments.mean).all() &
                                                   torch.isfinite(moments.m2).all()):
                self.bad_batch = self.batch  # NaN/Inf in the input reach the moments; no extra pass over x
        if self.pass_ is not None:
            self.pass_.saw(self.equalizer)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equalizer's ``(mean, std)``: the input's (``scale="unit"``), or for ``"restore"`` the affine map
        ``x -> mu + (x - mu) * sigma_source / sigma`` written as ``(x - mean) / std``."""
        mean, std = _frozen_statistics(self.equalizer, self.moments)
        if self.source is None:
            return mean, std
        _, source_std = _frozen_statistics(self.equalizer, self.source)
        std = std / source_std
        return mean * (1 - std), std

    def target(self) -> torch.Tensor:
        """The std the equalizer's output has on the calibration data: 1, or the source's for ``"restore"``."""
        if self.source is None:
            return torch.ones_like(self.moments.mean)
        return _frozen_statistics(self.equalizer, self.source)[1].to(torch.float64)


SCALES = ("unit", "restore")


def check_scale(scale: str, eqs: list[ScaleEqualizer]) -> None:
    """A :class:`~se_surgery.UsageError` for an unknown ``scale`` or ``"restore"`` where a site has no resize."""
    if scale not in SCALES:
        raise UsageError(f"scale={scale!r}: use one of {SCALES}.")
    fused = [eq.name for eq in eqs if eq.site.kind != "upsample"]
    if scale == "restore" and fused:
        raise UsageError(f"scale='restore' gives an upsampled branch back its scale before the resize, but "
                         f"{', '.join(fused[:3])} equalize fusion inputs that no resize made (branches='all'). "
                         f"Use scale='unit' with branches='all', or equalize with branches='upsampled'.")


def check_batches(max_batches: Any) -> None:
    """A :class:`~se_surgery.UsageError` for a ``max_batches`` that is not None or a positive int."""
    if max_batches is not None and (type(max_batches) is not int or max_batches < 1):
        raise UsageError(f"max_batches={max_batches!r}: give a whole number of batches, 1 or more, or None for all.")


def replayable(data: Iterable) -> Iterable:
    """``data`` as every pass reads it from its start: lists, tuples and DataLoaders over map-style datasets as they
    are; anything else (iterators, streams, readers whose ``__iter__`` drains them) read once, lazily, its batches
    kept and replayed by later passes."""
    if isinstance(data, (list, tuple, Replay)) or isinstance(data, torch.utils.data.DataLoader) and \
            not isinstance(data.dataset, torch.utils.data.IterableDataset):
        return data
    return Replay(data)


def check_data(data: Any) -> None:
    """A :class:`~se_surgery.UsageError` for calibration data that cannot be batches at all."""
    if data is None or isinstance(data, (torch.Tensor, str, bytes, Mapping)) or \
            not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise UsageError(f"calibration data must be an iterable of batches (a DataLoader, a list of tensors or of "
                         f"(image, label) pairs), got {type(data).__name__}; for one batch, pass [batch].")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        raise CalibrationError(f"calibration data is a {type(data).__name__}, which yields single samples: wrap it "
                               f"in a DataLoader(dataset, batch_size=...) to give batches.")


def _length(data: Iterable) -> int | None:
    """How many batches ``data`` holds, where it says (a DataLoader over a stream without ``__len__`` does not)."""
    try:
        return len(data) if hasattr(data, "__len__") else None
    except TypeError:
        return None


def input_batches(model: nn.Module, data: Iterable, *, max_batches: int | None, progress: bool, desc: str,
                input_fn: InputFn | None = None) -> Iterator[tuple[int, tuple, dict]]:
    """``(index, args, kwargs)`` per batch of ``data`` (at most ``max_batches``, read lazily), on the model's
    device, with a progress bar."""
    form, device = registry(model).input_form, model_device(model)
    total = _length(data)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    batches = itertools.islice(data, max_batches)
    for index, batch in enumerate(tqdm(batches, desc=desc, total=total, disable=not progress, leave=False)):
        if input_fn is not None:
            try:
                batch = input_fn(batch)
            except Exception as error:
                raise CalibrationError(f"input_fn raised on calibration batch {index}: {type(error).__name__}: "
                                       f"{error}. It gets one batch as the data yields it and returns the model's "
                                       f"inputs (a tensor, a tuple or a dict).") from error
        inputs = batch_inputs(batch, form, index)
        args, kwargs = to_device(inputs, device)
        yield index, args, kwargs


def calibrate_level(model: nn.Module, targets: list[ScaleEqualizer], data: Iterable, *,
                    max_batches: int | None = None, progress: bool = True, desc: str = "calibrating",
                    input_fn: InputFn | None = None, scale: str = "unit",
                    norm: str = "running") -> dict[str, torch.Tensor]:
    """One pass over ``data`` with the norm layers as ``norm`` says ("batch" or "running"): measure the inputs of
    ``targets`` (acting as identity meanwhile), then freeze them. Returns each one's output std on the data."""
    observers = [_Observer(eq, scale) for eq in targets]
    level = _Pass(targets)
    for eq, obs in zip(targets, observers):
        eq.observer = obs
        obs.pass_ = level
    # Sites further downstream, not calibrated yet, pass their input through meanwhile.
    waiting = [eq for eq in equalizers(model) if not eq.is_calibrated and eq.observer is None]
    for eq in waiting:
        eq.observer = _ignore
    seen = 0
    try:
        with norm_mode(model, norm, registry(model).frozen_norms), torch.no_grad():
            for index, args, kwargs in input_batches(model, data, max_batches=max_batches, progress=progress,
                                                   desc=desc, input_fn=input_fn):
                for obs in observers:
                    obs.batch = index
                level.run(model, args, kwargs, norm, index)
                seen += 1
    finally:
        for eq in targets + waiting:
            eq.observer = None

    if dist.is_available() and dist.is_initialized():
        count = torch.tensor([seen], device=collective_device())
        dist.all_reduce(count)
        seen = int(count.item())
    if seen == 0:
        raise CalibrationError("calibration_data yielded no batches: pass a non-empty iterable of input batches.")
    for eq, obs in zip(targets, observers):
        if obs.bad_batch is not None:
            raise CalibrationError(
                f"site {eq.name}: NaN or Inf in its input on calibration batch {obs.bad_batch}. Check the "
                f"calibration data and the layers before this site ({eq.site.where}).")
        obs.moments.all_reduce()
        if obs.source is not None:
            obs.source.all_reduce()
        if obs.moments.mean is None:
            raise CalibrationError(
                f"site {eq.name} was never reached during calibration: the model took another path on the "
                f"calibration data than on example_inputs.")
        eq.set_statistics(*obs.statistics())
    return {eq.name: obs.target() for eq, obs in zip(targets, observers)}


def run_batch(model: nn.Module, args: tuple, kwargs: dict, norm: str, index: int | None = None) -> Any:
    """One forward of calibration batch ``index``; a batch the model cannot take is a :class:`CalibrationError`
    that names the batch, what it held and what to do."""
    try:
        return model(*args, **kwargs)
    except (SeSurgeryError, _AllSeen):
        raise
    except Exception as error:
        if norm == "batch" and "Expected more than 1 value per channel" in str(error):
            raise CalibrationError(
                f"norm='batch' measures with the norm layers normalising each batch with its own statistics, as in "
                f"training, and a BatchNorm here meets one value per channel ({error}): calibrate on batches of at "
                f"least 2 samples, as training uses, or pass norm='running' (the running statistics, as in eval "
                f"mode).") from error
        shown = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor)
                          else type(t).__name__ for t in [*args, *kwargs.values()])
        raise CalibrationError(
            f"calibration batch {'?' if index is None else index} did not run through {type(model).__name__} "
            f"(its inputs: {shown}): {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}. "
            f"The calibration data must give what the model takes in training: floating-point images with the "
            f"model's channels, the input first in (input, label) pairs; pass input_fn=... where batches are "
            f"laid out otherwise.") from error


def _frozen_statistics(eq: ScaleEqualizer, moments: RunningMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics to freeze; a branch with no variation beyond rounding (a dead branch) is an error."""
    mean, std = moments.mean, moments.std
    dead = std <= DEAD_RELATIVE_STD * (mean * mean + std * std).sqrt()
    if eq.per_channel and dead.any() and not dead.all():
        # Constant channels (dead ReLUs) are common; (x - mean) maps them to 0 whatever the std.
        warn(f"se_surgery: site {eq.name}: {int(dead.sum())} of {std.numel()} channels are constant on "
             f"the calibration data; their std is set to 1.")
        std = torch.where(dead, torch.ones_like(std), std)
    elif dead.any():
        raise CalibrationError(
            f"site {eq.name} has {'zero' if bool((std == 0).all()) else 'no real'} variance on the calibration data "
            f"(std {std.max().item():.3g} against a magnitude of {(mean * mean + std * std).sqrt().max().item():.3g}: "
            f"a dead branch, its input is constant up to rounding). Dividing by that std would amplify rounding "
            f"noise. Calibrate on real, varied data, or check the layers before it ({eq.site.where}).")
    if bool((std < TINY_STD).any()):
        warn(f"se_surgery: site {eq.name}: its input has std {std.min().item():.3g} (mean "
             f"{mean.abs().max().item():.3g}), far below what features usually carry; the equalizer "
             f"multiplies it by {1 / std.min().item():.3g}, which also amplifies rounding noise. Calibrate "
             f"with trained weights and real data, or check the layers before it ({eq.site.where}).")
    return mean.to(eq.mean.dtype), std.to(eq.std.dtype)


def _ignore(_x: torch.Tensor, _source: torch.Tensor | None) -> None:
    pass


@outside_inference_mode
def calibrate(model: nn.Module, data: Iterable, *, max_batches: int | None = None, progress: bool = True,
              input_fn: InputFn | None = None, scale: str | None = None, norm: str | None = None) -> nn.Module:
    """(Re)measure every equalizer of an equalized model on ``data``, level by level; returns the model.

    Args:
        model: a model returned by :func:`se_surgery.equalize`.
        data: an iterable of batches: a ``DataLoader`` or any iterable of tensors, ``(input, label)`` tuples or dicts
            (:func:`se_surgery.inputs.batch_inputs` says which items are the model's inputs). Read once per level of
            chained sites; a one-shot iterator is read once and its batches replayed for the later levels.
        max_batches: use at most this many batches (per level); the rest of ``data`` is never read.
        progress: show tqdm progress bars.
        input_fn: turns one batch into the model's inputs (a tensor, a tuple or a dict) where the rule does not fit.
        scale: ``"unit"`` (the paper's): every equalized branch leaves with mean 0 and std 1. ``"restore"``: each
            upsampled branch keeps its mean and gets back the std its map had before the upsampling (``x -> mu +
            (x - mu) * sigma_before / sigma``), so it enters the fusion on the scale of the branches that were not
            upsampled instead of above them. Only for ``branches="upsampled"`` models. ``None``: the scale the
            model was calibrated with (``"unit"`` if never).
        norm: how the norm layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with
            ``track_running_stats``) normalise while measuring: ``"batch"`` (each batch's own statistics, as
            training sees them), ``"running"`` (their running statistics, as eval mode does) or ``"auto"`` (as the
            model's ``.training`` flag says now). ``None``: the mode the model was calibrated with (``"auto"`` if
            never). Running statistics are left bit for bit as they were; dropout and drop-path are off.

    Measures on a copy of the model (one more model in memory), so that threads serving the model meanwhile run it
    as it was and their inputs stay out of the statistics; the new statistics go in at the end, within microseconds
    (a forward at that instant may see some of them). Runs under
    ``torch.no_grad()`` on the model's device, and restores the model's modes. Afterwards each
    equalizer's output is checked on (up to :data:`CHECK_BATCHES`, and half, of) the data in the other norm mode, with a
    warning where it is far from its target there.
    """
    model = unwrap(model)
    eqs = equalizers(model)
    if not eqs:
        raise UsageError(f"{type(model).__name__} has no scale equalizers: call se_surgery.equalize first.")
    check_data(data)
    check_batches(max_batches)
    reattach(model)  # a replaced owner module gets its equalizers back, to be measured again below
    folded = [eq.name for eq in eqs if eq.folded]
    if folded:
        raise UsageError(f"{', '.join(folded)} were folded into the model's weights by se_surgery.fold; "
                         f"recalibrating them would change what the folded model computes. Calibrate the equalized "
                         f"model before folding, then fold again.")
    reg = registry(model)
    scale = scale if scale is not None else reg.scale or "unit"
    # Measured on a copy: threads that serve the model meanwhile run it as it was, and their inputs stay out of the
    # statistics; the new statistics go in at the end.
    probe = copy_model(model)
    run_levels(probe, equalizers(probe), data, max_batches=max_batches, progress=progress, input_fn=input_fn,
               scale=scale, norm=norm if norm is not None else reg.norm or "auto",
               frozen=reg.frozen_norms if norm is None and reg.norm is not None else None)
    measured = registry(probe)
    for eq, new in zip(eqs, equalizers(probe)):
        eq.set_statistics(new.mean, new.std)
    reg.scale, reg.norm, reg.frozen_norms, reg.spreads = measured.scale, measured.norm, measured.frozen_norms, {}
    return model


def choose_norm(model: nn.Module, norm: str, data: Iterable, input_fn: InputFn | None = None,
                training: bool | None = None) -> str:
    """``norm`` resolved to "batch" or "running" (``"auto"``: as ``training``, else ``model.training``, says).
    Running statistics that are still their initial values describe no data: where the forward runs such layers,
    ``"auto"`` switches to "batch" with a warning naming them; an explicit ``"running"`` is kept, with a warning
    that says what it measures."""
    chosen = resolve_norm(model, norm, training)
    fresh = _untrained_run(model, data, input_fn) if chosen == "running" else []
    if not fresh:
        return chosen
    shown = f"{', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''} ({len(fresh)} layer(s))"
    if norm == "running":
        warn(f"se_surgery: norm='running' measures with the norm layers' running statistics, but {shown} still "
             f"hold their initial values (mean 0, variance 1, no batch seen): in eval mode they do not normalise, so "
             f"the statistics are neither those of training nor of a trained model, and training-mode runs will meet "
             f"other scales. Pass norm='batch' (as training sees them), or update the running statistics first "
             f"(training-mode forwards).")
        return chosen
    warn(f"se_surgery: {type(model).__name__} is in eval mode, but {shown} hold their initial running statistics, "
         f"which describe no data; measuring with batch statistics instead (norm='batch', as training sees them). "
         f"Pass norm='batch' to say so, or train or update the norm layers before calibrating in eval mode.")
    return "batch"


def _untrained_run(model: nn.Module, data: Iterable, input_fn: InputFn | None) -> list[str]:
    """The norm layers with initial running statistics that the forward runs (one probing forward, only where
    there are any such layers at all)."""
    return untrained_norms(model, ran_norms(model, data, input_fn)) if untrained_norms(model) else []


def ran_norms(model: nn.Module, data: Iterable, input_fn: InputFn | None) -> set[int]:
    """Ids of the norm layers with running statistics that a forward on the first batch of ``data`` runs (the
    equalizers pass their input through meanwhile)."""
    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _a: ran.add(id(m))) for _, m in running_norms(model)]
    try:
        with norm_mode(model, "running"), torch.no_grad(), bypassed():
            for index, args, kwargs in input_batches(model, data, max_batches=1, progress=False, desc="probing",
                                                   input_fn=input_fn):
                run_batch(model, args, kwargs, "running", index)
    finally:
        for hook in hooks:
            hook.remove()
    return ran


# How many batches the check in the other norm mode reads at most (it warns, it measures nothing that is kept).
CHECK_BATCHES = 4


def third_of(data: Iterable, max_batches: int | None, cap: int) -> int:
    """How many batches a measurement after calibration reads: at most ``cap``, and a third of the batches
    calibration read (at least one), so that the example forward, the other-mode check and the spread measurement
    together cost about one pass over the calibration data, whatever its length."""
    read = len(data.kept) if isinstance(data, Replay) else _length(data)
    if max_batches is not None:
        read = max_batches if read is None else min(read, max_batches)
    return max(1, min(cap, read // 3)) if read else max(1, cap // 3)


# An equalizer whose output std, in the other norm mode, is outside this range of its target gets a warning.
TARGET_RANGE = (0.5, 2.0)


def run_levels(model: nn.Module, eqs: list[ScaleEqualizer], data: Iterable, *, max_batches: int | None,
               progress: bool, input_fn: InputFn | None, scale: str = "unit", norm: str = "auto",
               frozen: frozenset[str] | None = None, after_level: Callable | None = None) -> None:
    """Calibrate ``eqs`` level by level, one pass over ``data`` per level, with the norm layers as ``norm`` says
    (``frozen``: the layers that keep their running statistics under batch statistics; None: as
    :func:`~se_surgery.modes.frozen_norms` finds them now); record the scale and the norm mode on the model; check
    the outputs in the other norm mode."""
    check_scale(scale, eqs)
    data = replayable(data)
    registry(model).frozen_norms = frozen_norms(model, norm) if frozen is None else frozen
    chosen = choose_norm(model, norm, data, input_fn)
    switched = chosen != resolve_norm(model, norm)  # "auto" met untrained running statistics: no eval mode to check
    norm = chosen
    levels = sorted({eq.site.level for eq in eqs})
    targets: dict[str, torch.Tensor] = {}
    for level in levels:
        at_level = [eq for eq in eqs if eq.site.level == level]
        targets.update(calibrate_level(model, at_level, data, max_batches=max_batches, progress=progress,
                                       desc=f"calibrating level {level}", input_fn=input_fn, scale=scale,
                                       norm=norm))
        if after_level is not None:
            after_level(at_level)
    reg = registry(model)
    reg.scale, reg.norm, reg.spreads = scale, norm, {}  # (the spreads of other statistics are gone)
    if not switched:
        _check_other_mode(model, eqs, targets, data, norm, max_batches, input_fn)


def watch_pass(model: nn.Module, eqs: list[ScaleEqualizer], hook: Callable, data: Iterable, norm: str,
               max_batches: int, input_fn: InputFn | None) -> None:
    """One pass over at most ``max_batches`` of ``data`` with ``hook`` as a forward hook on every one of ``eqs``
    (they act after their resize meanwhile), the norm layers as ``norm`` says, under ``torch.no_grad()``; each
    forward ends once every one of ``eqs`` has seen its batch."""
    watched = _Pass(eqs)

    def watch(eq, inputs, out) -> None:
        hook(eq, inputs, out)
        watched.saw(eq)

    hooks = [eq.register_forward_hook(watch) for eq in eqs]
    try:
        with norm_mode(model, norm, registry(model).frozen_norms), torch.no_grad():
            for index, args, kwargs in input_batches(model, data, max_batches=max_batches, progress=False,
                                                   desc="measuring", input_fn=input_fn):
                watched.run(model, args, kwargs, norm, index)
    finally:
        for handle in hooks:
            handle.remove()


def _check_other_mode(model: nn.Module, eqs: list[ScaleEqualizer], targets: dict[str, torch.Tensor],
                      data: Iterable, norm: str, max_batches: int | None, input_fn: InputFn | None) -> None:
    """Warn where an equalizer's output, in the norm mode it was not calibrated in, is far from its target.

    Skipped where that mode is eval mode and norm layers hold their initial running statistics (a model built
    for training: its eval mode has no scales yet), where the model has no norm layer with running statistics
    (both modes are one), and where batch statistics cannot be taken (batches of one)."""
    other = "running" if norm == "batch" else "batch"
    if not running_norms(model):
        return
    found = {eq.name: RunningMoments(tuple(d for d in range(len(eq.site.shape)) if d != 1) if eq.per_channel
                                     else None) for eq in eqs}
    ran: set[int] = set()  # (eval mode: the norm layers this pass runs, to tell whether it has scales at all)
    probes = [m.register_forward_pre_hook(lambda m, _a: ran.add(id(m))) for _, m in running_norms(model)] \
        if other == "running" and untrained_norms(model) else []
    try:
        watch_pass(model, eqs, lambda e, _i, out: found[e.name].update(out), data, other,
                   third_of(data, max_batches, CHECK_BATCHES), input_fn)
    except CalibrationError:
        return  # batches of one: no batch statistics to check against
    finally:
        for probe in probes:
            probe.remove()
    if probes and untrained_norms(model, ran):
        return  # layers before the equalizers hold their initial statistics: eval mode has no scales to check
    off = []
    for eq in eqs:
        moments = found[eq.name]
        if moments.mean is None:
            continue
        ratio = moments.std / targets[eq.name].to(moments.std)
        worst = ratio[(ratio.log().abs()).argmax()] if ratio.dim() else ratio
        if not bool(torch.isfinite(worst)) or not TARGET_RANGE[0] <= float(worst) <= TARGET_RANGE[1]:
            off.append(f"{eq.name} {float(worst):.3g}x")
    if off:
        calibrated, other_text = _NORM_TEXT[norm], _NORM_TEXT[other]
        warn(f"se_surgery: calibrated {calibrated}; {other_text}, {len(off)} of {len(eqs)} equalizer(s) leave at "
             f"another std than their target on the calibration data ({', '.join(off[:4])}"
             f"{', ...' if len(off) > 4 else ''}). The norm layers' running statistics do not describe this data. "
             f"Calibrate in the mode you will run the model in: se_surgery.calibrate(model, data, "
             f"norm={other!r}) for {'eval and deployment' if other == 'running' else 'training'}, or update the "
             f"running statistics on this data first.")


_NORM_TEXT = {"batch": "with batch statistics (as training sees them)",
              "running": "with the norm layers' running statistics (as eval mode sees them)"}


class Replay:
    """An iterable read once, lazily; the batches read are kept and replayed by later passes."""

    def __init__(self, source: Iterable) -> None:
        self.source, self.kept, self.reader = source, [], None

    def __iter__(self) -> Iterator:
        yield from self.kept
        if self.reader is None:
            self.reader = iter(self.source)
        for batch in self.reader:
            self.kept.append(batch)
            yield batch
