"""Where to equalize: the user's choice among the sites the graph pass finds.

A choice is a :class:`Where` (or a preset name, or a callable on :class:`~se_surgery.Site`). Its criteria combine
with "and": the fusion's kind, the fusion's place in the graph, module-path patterns to include or exclude, exact
site names, a rule on the site, and a rule on the branch scales measured on data (``measured``). :func:`choose`
applies the static criteria and says, per site left alone, why; :func:`choose_measured` applies the measured rule
to the scales ``balance.branch_scales`` measured. Every choice is recorded (:meth:`Where.record`) in the recipe.

The fusion's place (``Site.place``): ``"chained"`` where the fusion's output reaches another fusion that takes an
equalized branch (a top-down path: FPN/UPerNet's ``lateral + up(top)``, a pyramid pooling whose output is upsampled
again), ``"final"`` where it reaches none (the final merge of the levels: UPerHead's and PSP's concatenations, FPN's
sum, DeepLabV3+'s concatenation of the skip with the upsampled ASPP output).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import UsageError
from .site import Site

FUSION_KINDS = ("cat", "stack", "add", "sub")
PLACES = ("final", "chained")
Pattern = str | re.Pattern


@dataclass(frozen=True)
class FusionScales:
    """The branches one fusion receives, measured on the calibration data before any equalizer acts (in the norm
    mode calibration uses): what a measured rule decides on."""

    fusion: str                      # ``owner.callN_fusionK``
    kind: str                        # "cat", "stack", "add" or "sub"
    place: str                       # "final" or "chained"
    upsampled: dict[str, float]      # site name -> the std its upsampled branch arrives at
    others: dict[str, float]         # the fusion's other inputs (``owner.callN_fusionK_inputJ``) -> std

    @property
    def before(self) -> float:
        """Largest branch std over the smallest, as the fusion receives them."""
        stds = [*self.upsampled.values(), *self.others.values()]
        return max(stds) / min(stds)

    @property
    def after(self) -> float:
        """The same, predicted with every upsampled branch equalized to std 1 (the paper's unit scale)."""
        stds = [1.0] * len(self.upsampled) + list(self.others.values())
        return max(stds) / min(stds)


def narrows(scales: FusionScales) -> bool:
    """The default measured rule: equalize a fusion's upsampled branches where that brings its branches closer
    together (the spread after, at unit scale, is below the spread before), as the paper's premise expects."""
    return scales.after < scales.before


@dataclass(frozen=True)
class Where:
    """Which of the sites the graph pass finds get an equalizer. Every criterion given must hold.

    Args:
        fusions: fusion kinds to equalize (``"cat"``, ``"stack"``, ``"add"``, ``"sub"``); ``None``: every kind.
        place: ``"final"`` (only fusions whose output reaches no other equalized fusion: the final merge of the
            levels) or ``"chained"`` (only the others: top-down paths); ``None``: both.
        include: patterns; a site is kept only if one matches its name (``decoder.psp.call0_resize2``), its owner
            module's path (``decoder.psp``), the fusion it joins (``decoder.call0_fusion4``) or that fusion's owner
            (``decoder``). A string is a glob (``fnmatch``: ``decoder.fpn_*``), a compiled
            ``re.Pattern`` or a string starting ``re:`` a regular expression (``fullmatch``).
        exclude: patterns as for ``include``; a site that one matches is left alone.
        names: exactly these sites (their names, as ``describe`` lists them).
        rule: a function of a :class:`~se_surgery.Site` that says whether to equalize it.
        measured: a function of a :class:`FusionScales` that says whether to equalize that fusion's upsampled
            branches, measured on the calibration data (:func:`narrows` for ``where="measured"``).
        preset: the preset this choice was made from (for records; set by :meth:`preset_of`).

    Every pattern and name must match at least one site of the model: a typo is an error naming the sites there are.
    """

    fusions: tuple[str, ...] | None = None
    place: str | None = None
    include: tuple[Pattern, ...] = ()
    exclude: tuple[Pattern, ...] = ()
    names: tuple[str, ...] | None = None
    rule: Callable[[Site], bool] | None = None
    measured: Callable[[FusionScales], bool] | None = None
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "names", "fusions"):
            value = getattr(self, name)
            if isinstance(value, (str, re.Pattern)):  # a single pattern or name: a one-element tuple
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.fusions is not None and (not self.fusions or set(self.fusions) - set(FUSION_KINDS)):
            raise UsageError(f"Where(fusions={self.fusions!r}): give one or more of {', '.join(FUSION_KINDS)}.")
        if self.place not in (None, *PLACES):
            raise UsageError(f"Where(place={self.place!r}): give 'final' (the final merge of the levels), 'chained' "
                             f"(fusions whose output reaches another equalized fusion) or None.")
        for pattern in (*self.include, *self.exclude, *(self.names or ())):
            if not isinstance(pattern, (str, re.Pattern)):
                raise UsageError(f"Where: a pattern or name must be a str or re.Pattern, got {pattern!r}.")
            _regex(pattern)  # a bad regular expression fails here, before any work
        for name in ("rule", "measured"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise UsageError(f"Where({name}=...) must be a function, got {type(getattr(self, name)).__name__}.")

    def record(self) -> dict:
        """The choice as JSON data for the recipe (functions by their qualified name: a record, not a rebuild)."""
        return {"preset": self.preset, "fusions": list(self.fusions) if self.fusions is not None else None,
                "place": self.place, "include": [_text(p) for p in self.include],
                "exclude": [_text(p) for p in self.exclude], "names": list(self.names) if self.names else None,
                "rule": _function_name(self.rule), "measured": _function_name(self.measured)}

    def __str__(self) -> str:
        return choice_text(self.record())


def choice_text(record: dict) -> str:
    """A recorded choice (:meth:`Where.record`) as the argument that made it, for messages and ``describe``."""
    if record["preset"] is not None:
        return f"where={record['preset']!r}"
    return "Where(" + ", ".join(f"{k}={v!r}" for k, v in record.items() if v not in (None, [])) + ")"


def _paper(site: Site) -> bool:
    return not (site.place == "chained" and site.fusion in ("add", "sub"))


PRESETS: dict[str, Where] = {
    "every": Where(),
    "paper": Where(rule=_paper),
    "final": Where(place="final"),
    "cat": Where(fusions=("cat", "stack")),
    "add": Where(fusions=("add", "sub")),
    "measured": Where(measured=narrows),
}
PRESET_HELP = {
    "every": "every interpolating upsampling that feeds a fusion (the paper's text read literally)",
    "paper": "every site but the chained additions (top-down paths): UPerHead's final and PPM concatenations, PSP, "
             "ASPP, FPN's final sum; what the paper's factors point at",
    "final": "only the final merge of the levels (fusions whose output reaches no other equalized fusion)",
    "cat": "only concatenations (and stacks)",
    "add": "only additions (and subtractions)",
    "measured": "the fusions where equalizing brings the branches closer together, measured on the calibration "
                "data (needs calibration_data)",
}


def resolve(where: str | Where | Callable[[Site], bool] | None) -> Where:
    """``where`` as a :class:`Where`: a preset name, a ``Where``, or a function of a site."""
    if where is None:
        where = "every"
    if isinstance(where, Where):
        return where
    if isinstance(where, str):
        if where not in PRESETS:
            raise UsageError(f"where={where!r} is not a preset ({', '.join(PRESETS)}); for module-path patterns use "
                             f"se_surgery.Where(include=[...]) or Where(exclude=[...]).")
        found = PRESETS[where]
        return Where(**{k: getattr(found, k) for k in ("fusions", "place", "rule", "measured")}, preset=where)
    if callable(where) and not isinstance(where, type):
        return Where(rule=where)
    raise UsageError(f"where must be a preset name ({', '.join(PRESETS)}), a se_surgery.Where or a function of a "
                     f"Site, got {type(where).__name__}.")


def _regex(pattern: Pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as error:
            raise UsageError(f"Where: {pattern!r} is not a regular expression ({error}).") from None
    return re.compile(fnmatch.translate(pattern))


def _text(pattern: Pattern) -> str:
    return "re:" + pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def _function_name(function: Callable | None) -> str | None:
    if function is None:
        return None
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def _matches(pattern: Pattern, site: Site) -> bool:
    regex = _regex(pattern)
    fusion_owner = site.joins.rpartition(".")[0]
    return any(regex.fullmatch(text) for text in (site.name, site.owner or "model", site.joins, fusion_owner) if text)


def choose(sites: list[Site], where: Where) -> tuple[list[Site], dict[str, str]]:
    """The sites ``where`` keeps (in order), and for each one left alone, why. Patterns and names that match no
    site are a :class:`~se_surgery.UsageError` naming the sites there are."""
    unmatched = [p for p in (*where.include, *where.exclude) if not any(_matches(p, s) for s in sites)]
    unknown = [n for n in (where.names or ()) if n not in {s.name for s in sites}]
    if unmatched or unknown:
        shown = ", ".join(s.name for s in sites[:40]) + (", ..." if len(sites) > 40 else "")
        what = (f"pattern(s) {', '.join(repr(_text(p)) for p in unmatched)} match" if unmatched
                else f"name(s) {', '.join(map(repr, unknown))} name")
        raise UsageError(f"{where}: {what} no site of this model. Its sites (name = owner module path + call): "
                         f"{shown or 'none'}. Patterns match a site's name, its owner's path, the fusion it joins "
                         f"(owner.callN_fusionK) or that fusion's owner; a glob's * spans dots; 're:' starts a "
                         f"regular expression.")
    kept, left = [], {}
    for site in sites:
        why = _left_because(site, where)
        if why is None:
            kept.append(site)
        else:
            left[site.name] = why
    return kept, left


def _left_because(site: Site, where: Where) -> str | None:
    if where.names is not None and site.name not in where.names:
        return "not among the names given"
    if where.fusions is not None and site.fusion not in where.fusions:
        return f"its fusion is a {site.fusion} (kinds chosen: {', '.join(where.fusions)})"
    if where.place is not None and site.place != where.place:
        return f"its fusion is {site.place} (place chosen: {where.place})"
    if where.include and not any(_matches(p, site) for p in where.include):
        return "matches no include pattern"
    hit = next((p for p in where.exclude if _matches(p, site)), None)
    if hit is not None:
        return f"excluded by {_text(hit)!r}"
    if where.rule is not None and not where.rule(site):
        if where.rule is _paper:
            return "a chained addition (a top-down path; where='paper' leaves those alone)"
        return f"the rule {_function_name(where.rule)} said no"
    return None


def choose_measured(sites: list[Site], where: Where, scales: Iterable[FusionScales]
                    ) -> tuple[list[Site], dict[str, str]]:
    """The sites whose fusion ``where.measured`` accepts, and why each other one is left alone (its spreads)."""
    decided = {s.fusion: (where.measured(s), s) for s in scales}
    kept, left = [], {}
    for site in sites:
        accept, found = decided.get(site.joins, (True, None))
        if accept:
            kept.append(site)
        else:
            left[site.name] = (f"measured: {site.joins}'s branches spread {found.before:.3g}x, "
                               f"{found.after:.3g}x if equalized ({_function_name(where.measured)})")
    return kept, left
