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

from .calibrate import InputFn, RunningMoments, watch_pass
from .errors import warn
from .find import find_sites
from .install import attach, equalizers
from .modes import copy_model
from .state import registry

# How many calibration batches the measurement reads.
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


def spreads(model: nn.Module, program: torch.export.ExportedProgram, data: Iterable, *, norm: str,
            max_batches: int | None, input_fn: InputFn | None) -> list[Spread]:
    """Measure, on a copy of the calibrated ``model`` (``program`` is its graph), every fusion that takes one of
    its equalized branches; see the module's docstring."""
    probe = copy_model(model)
    own = {eq.site.name: eq for eq in equalizers(probe)}
    fusions = {eq.site.joins for eq in own.values()}
    extra = [s for s in find_sites(program, branches="all") if s.joins in fusions and s.name not in own]
    for eq in attach(probe, extra):
        eq.set_statistics(torch.zeros_like(eq.mean), torch.ones_like(eq.std))  # measuring points: identity
    seen = {eq.site.name: (RunningMoments(), RunningMoments()) for eq in equalizers(probe)}

    def watch(eq, inputs, out):
        before, after = seen[eq.site.name]
        before.update(inputs[0])
        after.update(out)

    watch_pass(probe, equalizers(probe), watch, data, norm,
               PREMISE_BATCHES if max_batches is None else min(PREMISE_BATCHES, max_batches), input_fn)
    for pair in seen.values():  # under torch.distributed: every rank's data, so all ranks record the same
        for moments in pair:
            moments.all_reduce()
    found = []
    for fusion in dict.fromkeys(eq.site.joins for eq in own.values()):
        branches = [eq.site for eq in equalizers(probe) if eq.site.joins == fusion
                    and seen[eq.site.name][0].mean is not None]
        before = {s.name: float(seen[s.name][0].std) for s in branches}
        after = {s.name: float(seen[s.name][1].std) for s in branches}
        if len(branches) < 2 or min(before.values()) <= 0 or min(after.values()) <= 0:
            continue
        ups = [before[s.name] for s in branches if s.kind == "upsample"]
        others = [before[s.name] for s in branches if s.kind != "upsample"]
        found.append(Spread(fusion, max(before.values()) / min(before.values()),
                            max(after.values()) / min(after.values()), sum(ups) / len(ups),
                            sum(others) / len(others) if others else None))
    return found


def warn_wider(model: nn.Module, found: list[Spread], branches: str, scale: str) -> None:
    """One warning naming the fusions whose branches the equalizers left further apart, why, and what balances
    them."""
    wider = [s for s in found if s.wider]
    if not wider:
        return
    shown = "; ".join(f"{s.fusion}: spread {s.before:.3g}x -> {s.after:.3g}x" +
                      (f", upsampled branches arrive at std {s.upsampled:.3g}, the others at {s.others:.3g}"
                       if s.others is not None else "") for s in wider[:4])
    larger = any(s.others is not None and s.upsampled > s.others for s in wider)
    if larger:
        why = ("The upsampled branches arrive larger than the others here, not smaller as the paper's premise has "
               "it (smooth maps lose little variance to upsampling). ")
    elif scale == "unit":
        why = ("The equalized branches leave at std 1 (the paper's unit scale), away from the scale of the branches "
               "that were not upsampled. ")
    else:
        why = ""
    if branches == "all":
        fix = "The inputs differ in a way equalizing cannot undo; check the data"
    else:
        fix = ("Use branches='all', which equalizes every input of these fusions and balances them by construction"
               + ("; scale='restore' gives each upsampled branch its scale before the resize" if not larger else "")
               + "; or leave the model unequalized: balanced scales are not assured to train better "
                 "(docs/evidence), so validate against it")
    warn(f"se_surgery: in {len(wider)} of {len(found)} fusion(s) of {type(model).__name__} the equalizers leave the "
         f"branches further apart than before ({shown}{'; ...' if len(wider) > 4 else ''}). {why}"
         f"{fix}; se_surgery.scale_report shows every branch.")


def record(model: nn.Module, found: list[Spread]) -> None:
    """Keep the spreads on the model (``describe`` shows them; saved with its recipe)."""
    registry(model).spreads = {s.fusion: [s.before, s.after] for s in found}
