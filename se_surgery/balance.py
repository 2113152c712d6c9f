"""The paper's premise, measured: what equalizing does to the spread of the scales each fusion receives.

After calibration, every input branch of every fusion that takes an equalized branch is measured on the calibration
data, with the norm layers as they were calibrated: before (an equalizer's input; a branch without one as it
enters) and after (an equalizer's output). The paper expects upsampled branches to arrive smaller than the others,
so that equalizing brings the branches together; on smooth pretrained maps they can arrive larger, and then the
paper's placement drives them further apart. :func:`spreads` gives the spread (largest std / smallest) before and
after per fusion (over every rank's data under ``torch.distributed``), and :func:`warn_wider` says once per model
where the placement widened it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .calibrate import InputFn, RunningMoments, third_of, watch_pass
from .errors import CalibrationError, warn
from .find import find_sites
from .install import attach, equalizers
from .modes import copy_model
from .site import Site
from .state import registry
from .where import FusionScales

# How many calibration batches the measurement reads at most (after calibration: and a third of them, see third_of).
PREMISE_BATCHES = 4
# A fusion whose spread grows by more than this factor counts as driven further apart.
WIDER = 1.1


@dataclass(frozen=True)
class Spread:
    """The branches one fusion receives, before and after the model's equalizers."""

    fusion: str                # ``owner.callN_fusionK``
    before: float              # largest std / smallest std of its input branches without the equalizers
    after: float               # the same with them
    upsampled: float           # the upsampled branches' mean std before equalizing
    others: float | None       # the other branches' mean std (None: every branch is upsampled)

    @property
    def wider(self) -> bool:
        return self.after > self.before * WIDER


def _measure(model: nn.Module, program: torch.export.ExportedProgram, fusions: set[str], data: Iterable, *,
             form: tuple, norm: str, batches: int, input_fn: InputFn | None, frozen: frozenset[str] | None = None
             ) -> tuple[list[Site], dict[str, tuple[RunningMoments, RunningMoments]]]:
    """Every input branch of ``fusions``, measured on a copy of ``model`` over at most ``batches`` batches: (the
    branches' sites, per site name the moments of the equalizer's input and output). A branch without an equalizer
    of the model gets an identity one, a measuring point."""
    probe = copy_model(model)
    own = {eq.site.name for eq in equalizers(probe)}
    extra = [s for s in find_sites(program, branches="all") if s.joins in fusions and s.name not in own]
    for eq in attach(probe, extra):
        eq.set_statistics(torch.zeros_like(eq.mean), torch.ones_like(eq.std))  # measuring points: identity
    registry(probe).input_form = form
    if frozen is not None:
        registry(probe).frozen_norms = frozen
    seen = {eq.site.name: (RunningMoments(), RunningMoments()) for eq in equalizers(probe)}

    def watch(eq, inputs, out):
        before, after = seen[eq.site.name]
        before.update(inputs[0])
        after.update(out)

    watch_pass(probe, equalizers(probe), watch, data, norm, batches, input_fn)
    for pair in seen.values():  # under torch.distributed: every rank's data, so all ranks record the same
        for moments in pair:
            moments.all_reduce()
    branches = [eq.site for eq in equalizers(probe) if eq.site.joins in fusions]
    unmet = [s.name for s in branches if seen[s.name][0].mean is None]
    if unmet:
        raise CalibrationError(f"site {unmet[0]} was never reached on the calibration data: the model took another "
                               f"path than on example_inputs. Equalize at the size and with the inputs you "
                               f"calibrate with.")
    return branches, seen


def branch_scales(model: nn.Module, program: torch.export.ExportedProgram, sites: list[Site], data: Iterable, *,
                  form: tuple, norm: str, frozen: frozenset[str], max_batches: int | None,
                  input_fn: InputFn | None) -> list[FusionScales]:
    """What the fusions of ``sites`` receive before any equalizer acts, measured on a copy of ``model`` with an
    identity equalizer at every input of those fusions (for a measured choice of sites: :mod:`se_surgery.where`).
    ``form``: how a batch maps to the model's inputs (the registry's ``input_form``); ``frozen``: the norm layers
    that keep their running statistics under ``norm="batch"``."""
    fusions = {s.joins: s for s in sites}
    branches, seen = _measure(model, program, set(fusions), data, form=form, norm=norm, input_fn=input_fn,
                              batches=PREMISE_BATCHES if max_batches is None else min(PREMISE_BATCHES, max_batches),
                              frozen=frozen)
    found = []
    for fusion, site in fusions.items():
        at = [s for s in branches if s.joins == fusion]
        found.append(FusionScales(fusion, site.fusion, site.place,
                                  {s.name: float(seen[s.name][0].std) for s in at if s.kind == "upsample"},
                                  {s.name: float(seen[s.name][0].std) for s in at if s.kind != "upsample"}))
    return found


def spreads(model: nn.Module, program: torch.export.ExportedProgram, data: Iterable, *, norm: str,
            max_batches: int | None, input_fn: InputFn | None) -> list[Spread]:
    """Measure, on a copy of the calibrated ``model`` (``program`` is its graph), every fusion that takes one of
    its equalized branches; see the module's docstring."""
    joins = list(dict.fromkeys(eq.site.joins for eq in equalizers(model)))
    branches, seen = _measure(model, program, set(joins), data, form=registry(model).input_form, norm=norm,
                              batches=third_of(data, max_batches, PREMISE_BATCHES), input_fn=input_fn)
    found = []
    for fusion in joins:
        at = [s for s in branches if s.joins == fusion]
        before = {s.name: float(seen[s.name][0].std) for s in at}
        after = {s.name: float(seen[s.name][1].std) for s in at}
        if len(at) < 2 or min(before.values()) <= 0 or min(after.values()) <= 0:
            continue
        ups = [before[s.name] for s in at if s.kind == "upsample"]
        others = [before[s.name] for s in at if s.kind != "upsample"]
        found.append(Spread(fusion, max(before.values()) / min(before.values()),
                            max(after.values()) / min(after.values()), sum(ups) / len(ups),
                            sum(others) / len(others) if others else None))
    return found


def warn_wider(model: nn.Module, found: list[Spread], branches: str) -> None:
    """One warning naming the fusions whose branches the equalizers left further apart, with what was measured,
    and pointing at the choice of sites (it names no cause: docs/evidence measures which placements train well)."""
    wider = [s for s in found if s.wider]
    if not wider:
        return
    shown = "; ".join(f"{s.fusion}: spread {s.before:.3g}x -> {s.after:.3g}x" +
                      (f", upsampled branches arrive at std {s.upsampled:.3g}, the others at {s.others:.3g}"
                       if s.others is not None else "") for s in wider[:4])
    if branches == "all":
        fix = "Every input of these fusions is equalized, yet their spread grew: check the calibration data"
    else:
        names = ", ".join(repr(s.fusion) for s in wider[:4])
        fix = ("Choose where to equalize: where='measured' leaves such fusions alone, se_surgery.Where(exclude=["
               f"{names}]) names them, branches='all' equalizes every input of a fusion, or leave the model "
               "unequalized; docs/evidence has what each placement measured in training, so validate against the "
               "unequalized model")
    warn(f"se_surgery: in {len(wider)} of {len(found)} fusion(s) of {type(model).__name__} the equalizers leave the "
         f"branches further apart than before ({shown}{'; ...' if len(wider) > 4 else ''}). {fix}; "
         f"se_surgery.scale_report shows every branch.")


def record(model: nn.Module, found: list[Spread]) -> None:
    """Keep the spreads on the model (``describe`` shows them; saved with its recipe)."""
    registry(model).spreads = {s.fusion: [s.before, s.after] for s in found}
