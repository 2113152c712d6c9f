"""Reports: what se_surgery did to a model (``describe``) and the scales the fused branches arrive at
(``scale_report``), measured on data, with the gradients that the paper's argument is about."""

from __future__ import annotations

import copy
import csv
import io
import os
import statistics
import textwrap
import warnings
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, fields
from itertools import repeat
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .balance import WIDER
from .calibrate import RunningMoments, check_batches, check_data, choose_norm, input_batches, replayable, run_batch
from .dispatch import check_attached, replaced_owners
from .equalize import equalize
from .errors import CalibrationError, UsageError
from .files import atomic_write
from .inputs import ExampleInputs, model_device
from .install import equalizers
from .integrations.zoo import main_logits
from .modes import frozen_norms, norm_mode, outside_inference_mode, unwrap
from .ops import NOUNS
from .state import Compensation, FoldAction, FoldReason, FoldStep, registry
from .where import Where, choice_text, choose, resolve

_REASONS = {
    FoldReason.NO_CONSUMER: "the branch meets an addition before any conv",
    FoldReason.ZERO_PADDED: "{consumer} is zero-padded",
    FoldReason.NO_BIAS: "{consumer} has no bias or BatchNorm to take the shift",
    FoldReason.SHARED_CONSUMER: "{consumer} also serves other branches",
    FoldReason.NOT_PLAIN_CONSUMER: "{consumer} is not a plain conv of its weight (grouped, a wrapper such as peft "
                                   "LoRA, a parametrization or hooks)",
}


def reason_sentence(reason: FoldReason, consumer: str, fusion: str = "") -> str:
    """A refusal reason as a sentence (``describe``, warnings)."""
    text = _REASONS.get(reason, "")
    if reason == FoldReason.NO_CONSUMER and fusion in NOUNS:
        text = f"the branch meets {'an' if NOUNS[fusion][0] in 'aeiou' else 'a'} {NOUNS[fusion]} before any conv"
    return text.format(consumer=consumer or "its consumer")


def _compensation(eq) -> str:
    consumer = eq.site.consumer.weight.rsplit(".", 1)[0] if eq.site.consumer is not None else ""
    c = eq.compensation
    if c == Compensation.NONE:
        return "-"
    if c == Compensation.EXACT:
        bn = eq.site.consumer is not None and eq.site.consumer.bias is None
        return f"exact, in {consumer}" + (" (BatchNorm running_mean)" if bn else "")
    if c == Compensation.ZERO_PADDED:
        return f"inexact at borders: {consumer} is zero-padded"
    if c == Compensation.SCALE_ONLY:
        return f"scale only: {consumer} has no bias or BatchNorm to take the shift"
    return "not possible: " + reason_sentence(c.reason, consumer, eq.site.fusion)


def _fold_step(step: FoldStep, fusion: str = "") -> str:
    why = reason_sentence(step.reason, step.consumer, fusion)
    if step.action == FoldAction.FOLDED:
        return f"folded into {step.consumer}"
    if step.action == FoldAction.SCALE_FOLDED:
        return f"scale folded into {step.consumer}; the shift stays ({why})"
    if step.action == FoldAction.MOVED:
        return f"moved before the resize ({why})"
    return f"kept ({why})"


def describe(model: nn.Module) -> str:
    """One row per equalizer: where, factor, align_corners, fusion, level, mean, std, what ``preserve_function``
    and ``fold`` did, and the source line.

    Args:
        model: any model (one without equalizers gets a one-line answer).
    """
    model = unwrap(model)
    rows = []
    reg = registry(model)
    steps = {step.site: step for step in (reg.folds if reg is not None else [])}
    fusions = {eq.site.name: eq.site.fusion for eq in equalizers(model)}
    for eq in equalizers(model):
        site = eq.site
        factor = f"x{site.factor:.3g}" if site.factor else "-"
        if not eq.is_calibrated:
            mean = std = "uncalibrated"
        else:
            mean = f"{eq.mean.mean().item():.4g}" + ("*" if eq.per_channel else "")
            std = f"{eq.std.mean().item():.4g}" + ("*" if eq.per_channel else "")
            if eq.folded == FoldAction.SCALE_FOLDED:
                std = f"(in {steps[site.name].consumer})" if site.name in steps else std
        fold_text = _fold_step(steps[site.name], site.fusion) if site.name in steps and eq.folded else "-"
        rows.append([site.name, site.mode or site.kind, factor,
                     str(site.align_corners) if site.kind == "upsample" else "-", site.fusion, str(site.level), mean,
                     std, _compensation(eq), fold_text, site.where])
    folded = [f"  {step.site}: {_fold_step(step, fusions.get(step.site, ''))}" for step in steps.values()]
    if not rows:
        text = f"{type(model).__name__}: no scale equalizers."
        return "\n".join([text, "folded by se_surgery.fold:", *folded]) if folded else text
    header = ["site", "kind", "factor", "align_corners", "fusion", "level", "mean", "std", "preserve", "fold",
              "source"]
    foot = f"{len(rows)} equalizer(s) in {type(model).__name__}"
    if any(eq.per_channel for eq in equalizers(model)):
        foot += "; * = mean over channels"
    if reg.output_change is not None:
        foot += f"; preserve_function moved the output by {reg.output_change:.3g} (relative)"
    if reg.norm is not None:
        foot += (f"\ncalibrated to the {reg.scale} scale with {_NORMS[reg.norm]}")
        if reg.frozen_norms and reg.norm == "batch":
            shown = sorted(reg.frozen_norms)
            foot += (f", but {len(shown)} frozen norm layer(s) on their running statistics, as training runs them "
                     f"({', '.join(shown[:4])}{', ...' if len(shown) > 4 else ''})")
    if reg.spreads:
        wider = [f for f, (before, after) in reg.spreads.items() if after > before * WIDER]
        foot += ("\nbranch std spread per fusion (largest / smallest, before -> after equalizing, measured on the "
                 "calibration data): " + ", ".join(f"{f} {b:.3g}x -> {a:.3g}x" for f, (b, a) in reg.spreads.items()))
        if wider:
            foot += (f"\nFURTHER APART after equalizing: {', '.join(wider)} (where='measured' leaves such fusions "
                     f"alone; branches='all' balances them)")
    if reg.recipe.get("left"):
        choices = "; then ".join(choice_text(c) for c in reg.recipe.get("where", []))
        foot += (f"\nleft alone by the choice of sites ({choices}):\n" +
                 "\n".join(f"  {name}: {why}" for name, why in reg.recipe["left"].items()))
    replaced = replaced_owners(model)
    if replaced:
        foot += (f"\nNOT ACTING: {', '.join(replaced)} was replaced after equalizing; the forward refuses to run "
                 f"until se_surgery.calibrate(model, data) equalizes the new module")
    return "\n".join([_table(header, rows), foot] + (["folded by se_surgery.fold:", *folded] if folded else []))


_NORMS = {"batch": "batch statistics in the norm layers (norm='batch', as training sees them)",
          "running": "the norm layers' running statistics (norm='running', as eval mode sees them)"}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows])


@dataclass(frozen=True)
class BranchScale:
    """One input branch of one fusion, as measured by :func:`scale_report`."""

    fusion: str                 # the fusion op, ``owner.callN_fusionK``
    branch: str                 # the site name of this branch (its resize, or its input slot of the fusion)
    factor: float | None        # upsampling factor; None for a branch that is not upsampled by interpolation
    align_corners: bool | None
    equalized: bool             # passes through a calibrated ScaleEqualizer of the model
    mean: float                 # of the branch as it enters the fusion, over the batches
    std: float
    second_moment: float        # E[x^2] = mean^2 + std^2
    grad_rms: float | None      # RMS gradient of the consumer's weight slice for this branch (None: no consumer)
    consumer: str | None        # state_dict key of the conv weight this branch feeds (through the concatenation)
    channels: tuple[int, int] | None  # that weight's input channels [start, stop) fed by this branch
    left: str = ""              # why the choice of sites (``where``) leaves this upsampled branch alone, if it does


@dataclass
class ScaleReport:
    """Per-branch scales of every fusion that takes a bilinearly upsampled input. ``str()`` gives the table."""

    model: str
    rows: list[BranchScale]
    batches: int
    loss: str
    norm: str = "running"       # how the norm layers normalised: "batch" (as in training) or "running" (eval)

    _HEADER = ["fusion", "branch", "factor", "align_corners", "equalized", "mean", "std", "E[x^2]", "grad RMS",
               "consumer"]

    def _cells(self) -> list[list[str]]:
        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g}"

        return [[r.fusion, r.branch, f"x{r.factor:.3g}" if r.factor else "-",
                 "-" if r.align_corners is None else str(r.align_corners),
                 "yes" if r.equalized else "left alone" if r.left else "no",
                 num(r.mean), num(r.std), num(r.second_moment), num(r.grad_rms),
                 f"{r.consumer}[{r.channels[0]}:{r.channels[1]}]" if r.consumer else "-"] for r in self.rows]

    def __str__(self) -> str:
        if not self.rows:
            return f"{self.model}: no fusion takes a bilinearly upsampled branch."
        return (_table(self._HEADER, self._cells()) +
                f"\n{self.model}: {len(self.rows)} branches of {len({r.fusion for r in self.rows})} fusion(s), "
                f"{self.batches} batch(es); grad RMS of {self.loss}")

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEADER) + " |", "|" + "---|" * len(self._HEADER)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._cells()]
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The records as CSV (full precision); written atomically to ``path`` if given."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([f.name for f in fields(BranchScale)])
        writer.writerows([_csv_cell(v) for v in astuple(r)] for r in self.rows)
        text = buffer.getvalue()
        if path is not None:
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return text

    def plot(self, path: str | os.PathLike, before: ScaleReport | None = None, note: str | None = None) -> Path:
        """The branches of each fusion side by side, grouped by fusion: the std each arrives at, and its fusion
        weight slice's gradient RMS relative to the largest of that fusion (what equalizing balances), with the
        spread (max/min) written per fusion; with ``before`` (a report of the original model), before/after
        pairs. The title says what the measurements show (whether the upsampled branches arrive smaller or larger,
        and the spreads before and after); ``note`` is a caption under it, e.g. what the weights and data were.
        Written atomically (any matplotlib format)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        reports = [("before", before), ("after", self)] if before is not None else [("as given", self)]
        fusions = list(dict.fromkeys(r.fusion for _, rep in reports for r in rep.rows))
        groups = [[n for n in dict.fromkeys(r.branch for _, rep in reports for r in rep.rows if r.fusion == f)]
                  for f in fusions]
        rows = {(label, r.branch): r for label, rep in reports for r in rep.rows}
        positions, x = [], 0.0
        for group in groups:
            positions.append([x + i for i in range(len(group))])
            x += len(group) + 1.0
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.6 * x + 2), 7.5), sharex=True)
        width = 0.8 / len(reports)
        colors = {"before": "tab:gray", "after": "tab:blue", "as given": "tab:blue"}
        for k, (label, _) in enumerate(reports):
            shift = (k - (len(reports) - 1) / 2) * width
            for f, group, xs in zip(fusions, groups, positions):
                found = [rows.get((label, n)) for n in group]
                grads = [r.grad_rms for r in found if r is not None and r.grad_rms]
                top.bar([p + shift for p in xs], [r.std if r else float("nan") for r in found], width,
                        color=colors[label], label=label if f == fusions[0] else None)
                if grads:
                    bottom.bar([p + shift for p in xs], [r.grad_rms / max(grads) if r and r.grad_rms else
                                                         float("nan") for r in found], width, color=colors[label])
        for f, group, xs in zip(fusions, groups, positions):
            owner, _, number = f.rpartition(".call")
            top.text(sum(xs) / len(xs), 1.02, f"{owner or 'model'}\nfusion {number.split('fusion')[-1]}",
                     transform=top.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
            spreads = []
            for label, _ in reports:
                grads = [rows[(label, n)].grad_rms for n in group if (label, n) in rows and rows[(label, n)].grad_rms]
                spreads.append(f"{max(grads) / min(grads):.2g}x" if len(grads) > 1 else None)
            if all(s is None for s in spreads):
                text = "addition:\nno weight slice\nper branch"
            else:
                text = "gradient spread\n" + " -> ".join(s or "-" for s in spreads)
            bottom.text(sum(xs) / len(xs), 0.97, text, transform=bottom.get_xaxis_transform(), ha="center",
                        va="top", fontsize=7)
        ticks = [p for xs in positions for p in xs]
        names = [_what(next(r for (_, b), r in rows.items() if b == n)) for group in groups for n in group]
        bottom.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
        top.set_ylabel("std entering the fusion")
        bottom.set_ylabel("fusion weight-slice gradient RMS\n(relative to the fusion's largest)")
        bottom.set_ylim(0, 1.35)
        for ax in (top, bottom):
            ax.grid(axis="y", alpha=0.3)
        top.legend(loc="upper right", fontsize=8)
        width = fig.get_size_inches()[0]
        title = _title(self.model, before or self, self if before is not None else None)
        if note:
            title += f"\n({note})"
        fig.suptitle("\n".join(textwrap.fill(line, int(width * 14)) for line in title.split("\n")), fontsize=9)
        fig.tight_layout()
        suffix = Path(path).suffix.lstrip(".") or "png"
        try:
            return atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120))
        finally:
            plt.close(fig)


def _class_dim(logits: torch.Tensor, target: torch.Tensor | None, given: int | None) -> int:
    """Which dimension of the logits holds the classes (see :func:`scale_report`'s ``class_dim``)."""
    if given is not None:
        return given % logits.dim()
    if target is not None:
        fits = [d for d in range(1, logits.dim()) if logits.shape[:d] + logits.shape[d + 1:] == target.shape]
        if len(fits) == 1:
            return fits[0]
        if fits:
            raise UsageError(f"scale_report: logits of shape {tuple(logits.shape)} fit targets of shape "
                             f"{tuple(target.shape)} with the classes in dimension {fits[0]} or {fits[1]}: pass "
                             f"class_dim.")
    if logits.dim() >= 3 and logits.shape[1] > logits.shape[-1]:
        raise UsageError(f"scale_report: the main output has shape {tuple(logits.shape)}; its dimension 1 is larger "
                         f"than its last, as in a channel-last output (N, H, W, C), so the gradient column would "
                         f"treat image rows as classes. Pass class_dim (e.g. class_dim=-1).")
    return 1  # (N, C, ...), also at another resolution than the targets (resized to them below)


def _title(model: str, first: ScaleReport, after: ScaleReport | None) -> str:
    """What the reports show, in a sentence or two: whether the upsampled branches arrive smaller or larger than
    the others (in ``first``), and the median spreads over the fusions before and after equalizing."""
    def spreads(report: ScaleReport, field: str) -> list[float]:
        found = []
        for fusion in dict.fromkeys(r.fusion for r in report.rows):
            values = [getattr(r, field) for r in report.rows if r.fusion == fusion and getattr(r, field)]
            if len(values) > 1:
                found.append(max(values) / min(values))
        return found

    smaller = larger = 0
    for fusion in dict.fromkeys(r.fusion for r in first.rows):
        rows = [r for r in first.rows if r.fusion == fusion]
        ups, others = [r.std for r in rows if r.factor], [r.std for r in rows if not r.factor]
        if ups and others:
            smaller += sum(ups) / len(ups) < sum(others) / len(others)
            larger += sum(ups) / len(ups) > sum(others) / len(others)
    text = f"{model}: the branches each fusion receives."
    if smaller or larger:
        text += (f" Upsampled branches arrive smaller than the others in {smaller}, larger in {larger} of "
                 f"{smaller + larger} fusion(s)" + (" (before equalizing)." if after is not None else "."))
    if after is not None:
        for field, what in (("std", "std"), ("grad_rms", "gradient")):
            a, b = spreads(first, field), spreads(after, field)
            if a and b:
                text += (f" Median {what} spread {statistics.median(a):.2g}x before, {statistics.median(b):.2g}x "
                         f"after equalizing.")
    return text


def _what(row: BranchScale) -> str:
    """A tick label that says what the branch is."""
    return f"upsampled x{row.factor:.3g}" if row.factor else "not upsampled"


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else value


@outside_inference_mode
def scale_report(model: nn.Module, example_inputs: ExampleInputs, data: Iterable, *,
                 targets: Iterable[torch.Tensor] | None = None, max_batches: int | None = 4,
                 progress: bool = True, input_fn: Callable[[Any], Any] | None = None,
                 norm: str | None = None, class_dim: int | None = None,
                 where: str | Where | Callable[[Any], bool] | None = None) -> ScaleReport:
    """Measure every branch of every fusion that takes an upsampled input, on ``data``.

    Works on an original model (the problem) and on an equalized one (the fix); the model itself is not changed.
    Runs on a deep copy with dropout off, its norm layers as ``norm`` says, so the numbers are deterministic.

    Args:
        model: any model ``equalize`` accepts, equalized or not.
        example_inputs: as for :func:`se_surgery.equalize`.
        data: batches, by the rule of :func:`se_surgery.calibrate`.
        targets: label maps, one per batch (255 = ignore); without them, the model's own argmax.
        max_batches: measure on at most this many batches.
        progress: show a tqdm progress bar.
        input_fn: turns one batch into the model's inputs where the rule does not fit.
        norm: how BatchNorm-like layers normalise: ``"batch"`` (as training sees them), ``"running"`` (as eval
            mode does) or ``"auto"`` (as ``model.training`` says); ``None``: the mode an equalized model was
            calibrated with, else ``"auto"``. As in :func:`se_surgery.calibrate`.
        class_dim: the dimension of the main logits that holds the classes. ``None``: with ``targets``, the one
            dimension whose removal leaves the targets' shape; without, dimension 1 (``(N, C, H, W)``), refused
            where dimension 1 is larger than the last one (a channel-last output such as ``(N, H, W, C)``: name it).
        where: a choice of sites as :func:`se_surgery.equalize` takes it (not ``"measured"``: this report is that
            measurement); the upsampled branches it leaves alone are marked ``left alone``. ``None``: those the
            model's own choice left alone, if it is equalized.

    Returns:
        A :class:`ScaleReport`: per branch, the mean, std and second moment as it enters the fusion, and the RMS
        gradient of the consumer conv's weight slice for that branch, of the cross-entropy of the main logits.
    """
    model = unwrap(model)
    check_attached(model)
    check_data(data)
    check_batches(max_batches)
    data = replayable(data)  # (read by the norm probe, then measured)
    reg = registry(model)
    requested = norm if norm is not None else reg is not None and reg.norm or "auto"
    frozen = (reg.frozen_norms if norm is None and reg is not None and reg.norm else frozen_norms(model, requested))
    probe = copy.deepcopy(model).eval()  # (equalize captures it in eval mode; measured below in the norm mode)
    own = {eq.site.name for eq in equalizers(probe) if eq.is_calibrated}
    choice = resolve(where) if where is not None else None
    if choice is not None and choice.measured is not None:
        raise UsageError(f"scale_report(where={choice}): the measured choice reads the branch scales this report "
                         f"measures; call scale_report without it, or with a choice by kind, place or pattern.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        equalize(probe, example_inputs, None, branches="all", inplace=True, progress=False)
    eqs = list(equalizers(probe))
    if not eqs:
        return ScaleReport(type(model).__name__, [], 0, "-")
    left = dict(reg.recipe.get("left", {})) if reg is not None else {}
    if choice is not None:
        left = choose([eq.site for eq in eqs if eq.site.kind == "upsample"], choice)[1]
    for eq in eqs:
        if eq.site.name not in own:  # measuring points: identity
            eq.set_statistics(torch.zeros_like(eq.mean), torch.ones_like(eq.std))
    norm = choose_norm(probe, requested, data, input_fn, training=model.training)
    moments = {eq.site.name: RunningMoments() for eq in eqs}

    def watch(eq, _inputs, out):
        if not torch.isfinite(out).all():
            raise CalibrationError(f"site {eq.site.name}: NaN or Inf entering the fusion; check the data.")
        moments[eq.site.name].update(out)

    for eq in eqs:
        eq.register_forward_hook(watch)
    weights = {eq.site.consumer.weight for eq in eqs if eq.site.consumer is not None}
    for name, param in probe.named_parameters():
        param.requires_grad_(name in weights)
        param.grad = None

    device, seen = model_device(probe), 0
    labels = iter(targets) if targets is not None else repeat(None)
    for index, args, kwargs in input_batches(probe, data, max_batches=max_batches, progress=progress,
                                           desc="measuring scales", input_fn=input_fn):
        with torch.set_grad_enabled(bool(weights)), norm_mode(probe, norm, frozen):
            logits = main_logits(run_batch(probe, args, kwargs, norm, index))
            if weights:
                target = next(labels, None)
                target = None if target is None else target.to(device).long()
                logits = logits.movedim(_class_dim(logits, target, class_dim), 1)
                target = logits.argmax(1) if target is None else target
                if logits.shape[-2:] != target.shape[-2:]:
                    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
                F.cross_entropy(logits, target, ignore_index=255).backward()
        seen += 1
    if seen == 0:
        raise CalibrationError("scale_report: data yielded no batches.")

    rows = []
    order = {name: i for i, name in enumerate(dict.fromkeys(eq.site.joins for eq in eqs))}
    for eq in sorted(eqs, key=lambda e: (order[e.site.joins], e.site.consumer.channels[0] if e.site.consumer
                                         else e.site.arg)):
        site, m = eq.site, moments[eq.site.name]
        if m.mean is None:
            raise CalibrationError(f"site {site.name} was never reached on the data: the model took another path "
                                   f"than on example_inputs.")
        mean, std = float(m.mean), float(m.std)
        grad, consumer = None, site.consumer
        if consumer is not None and not consumer.grouped:
            start, stop = consumer.channels
            g = probe.get_parameter(consumer.weight).grad
            grad = None if g is None else float((g[:, start:stop] / seen).pow(2).mean().sqrt())
        rows.append(BranchScale(site.joins, site.name, site.factor, site.align_corners, site.name in own, mean, std,
                                mean**2 + std**2, grad, consumer and consumer.weight, consumer and consumer.channels,
                                left.get(site.name, "")))
    loss = "cross-entropy vs " + ("the given targets" if targets is not None else "the model's own argmax")
    return ScaleReport(type(model).__name__, rows, seen, loss, norm)

