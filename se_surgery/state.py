"""The saved state: what an equalized model carries (``model.scale_equalizers``), the records of what
``preserve_function`` and ``fold`` did, and the recipe codec that lets ``restore`` rebuild the model.

Everything here is data: no hooks, no modes (``install.py``, ``dispatch.py``), no graph pass (``find.py``). Records
are enums, stored as their values in checkpoints; ``report.describe`` renders them as sentences. The recipe is
untrusted input when it comes back from a file: :func:`decode` checks every field before anything is built from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from .errors import CaptureError, UsageError
from .site import CallKey, Site, module_key
from .torch_internals import EXTRA_STATE_SUFFIX, is_fx_tracing


class FoldReason(StrEnum):
    """Why ``fold`` (or ``preserve_function``) could not absorb everything into a consumer."""

    NONE = ""
    NO_CONSUMER = "no_consumer"
    ZERO_PADDED = "zero_padded"
    NO_BIAS = "no_bias"
    SHARED_CONSUMER = "shared_consumer"
    NOT_PLAIN_CONSUMER = "not_plain_consumer"


class Compensation(StrEnum):
    """What ``preserve_function`` did at a site. Where it could not absorb the statistics, the value is the
    :class:`FoldReason` that stopped it (the same rule stops ``fold``): :meth:`refused` and :attr:`reason` convert."""

    NONE = ""                                              # not asked for
    EXACT = "exact"                                        # the consumer absorbed scale and shift
    SCALE_ONLY = "scale_only"                              # no bias or BatchNorm to take the shift
    ZERO_PADDED = FoldReason.ZERO_PADDED.value             # exact but at the borders: the consumer is zero-padded
    NO_CONSUMER = FoldReason.NO_CONSUMER.value             # an addition (no weights) before any conv
    SHARED_CONSUMER = FoldReason.SHARED_CONSUMER.value     # the consumer's weight also serves other inputs
    NOT_PLAIN_CONSUMER = FoldReason.NOT_PLAIN_CONSUMER.value  # grouped, wrapped (LoRA), parametrized or hooked

    @classmethod
    def refused(cls, reason: FoldReason) -> Compensation:
        return cls(reason.value)

    @property
    def reason(self) -> FoldReason:
        """The refusal this record stands for (``FoldReason.NONE`` where the consumer absorbed something)."""
        return FoldReason(self.value) if self.value in set(FoldReason) else FoldReason.NONE


class FoldAction(StrEnum):
    """What ``fold`` did at a site."""

    NONE = ""                 # not folded
    FOLDED = "folded"         # scale and shift went into the consumer; the equalizer is gone
    SCALE_FOLDED = "scale_folded"  # scale went into the consumer; the shift stays (before the resize if a resize)
    MOVED = "moved"           # the whole equalizer acts on the resize's input instead (exact, cheaper)
    KEPT = "kept"             # left as it is


@dataclass
class FoldStep:
    """What folding did at one site: the action, why not more, and the consumer (module path) involved."""

    site: str
    action: FoldAction
    reason: FoldReason = FoldReason.NONE
    consumer: str = ""


@dataclass
class OwnerSites:
    """The sites one owner module's forward holds, by run-time identity (:class:`~se_surgery.site.CallKey`)."""

    path: str
    calls: int                                     # how many times the (eval-mode) graph calls the module
    train_calls: int | None = None                 # the training-mode graph's count, where it differs
    sites: dict[CallKey, dict[int, str]] = field(default_factory=dict)   # call -> {fusion input: equalizer name}
    line_calls: dict[tuple[int, str, str], int] = field(default_factory=dict)  # (call, op, source) -> count
    bound: bool = False                            # its forward runs bound to the site finder (se_surgery.bound)

    @property
    def ops(self) -> frozenset[str]:
        return frozenset(key.op for key in self.sites)

    @property
    def shared(self) -> bool:
        return self.calls > 1

    def add(self, site: Site, name: str) -> None:
        key = site.call_key
        self.sites.setdefault(key, {})[site.arg] = name
        self.line_calls[(key.call, key.op, key.source)] = site.line_calls


class EqualizerRegistry(nn.ModuleDict):
    """``model.scale_equalizers``: every equalizer of one model by name, and the tables its hooks read.

    The only attribute se_surgery adds to a model. Its buffers are the equalizers' (``scale_equalizers.<site>.
    {mean,std,calibrated}`` in the state_dict); the recipe and the records ride along as
    ``scale_equalizers._extra_state``. Nothing per call is kept here (that lives with the calling thread, see
    ``dispatch.py``), so one model can serve many threads."""

    __jit_unused_properties__ = ["folds"]  # an emptied registry scripts with the folded model (TorchScript)

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[str, OwnerSites] = {}
        self.input_form: tuple[str, object] | None = None   # how calibration batches map to the model's inputs
        self.output_change: float | None = None      # what preserve_function moved the output by
        self.folded_away: list[FoldStep] = []        # fold's record of the sites it removed (the others': eq.fold)
        self.recipe: dict = {}                       # how equalize was called: what restore needs
        self.scale: str | None = None                # how the statistics were calibrated: "unit" or "restore",
        self.norm: str | None = None                 # and with "batch" or "running" norm statistics (None: never)
        self.frozen_norms: frozenset[str] = frozenset()  # under "batch": the norm layers kept on running statistics
        self.spreads: dict[str, list[float]] = {}    # fusion -> its branches' std spread [before, after] equalizing

    @property
    def folds(self) -> list[FoldStep]:
        """What se_surgery.fold did, per site, in site order (read from the one record of each)."""
        order = {site: i for i, site in enumerate(self.recipe.get("sites", []))}
        steps = [eq.fold for eq in self.values() if eq.fold is not None] + self.folded_away
        return sorted(steps, key=lambda s: order.get(s.site, len(order)))

    def get_extra_state(self) -> torch.Tensor:
        state = dict(self.recipe, version=VERSION, output_change=self.output_change, scale=self.scale, norm=self.norm,
                     frozen_norms=sorted(self.frozen_norms), spreads=self.spreads,
                     folds=[{"site": s.site, "action": str(s.action), "reason": str(s.reason),
                             "consumer": s.consumer} for s in self.folds],
                     equalizers={name: {"compensation": str(eq.compensation)} for name, eq in self.items()})
        return encode(state)

    def set_extra_state(self, value: Any) -> None:
        state = decode(value)
        per = state.pop("equalizers")
        gone = {s["site"] for s in state["folds"] if s["action"] == FoldAction.FOLDED}
        saved = {module_key(site) for site in state["sites"] if site not in gone} | set(per)
        unknown, lacking = sorted(saved - set(self.keys())), sorted(set(self.keys()) - saved)
        if unknown or lacking:
            raise UsageError(f"the se_surgery recipe in this state_dict was saved from equalizers at other sites "
                             f"({'it names ' + str(unknown[:3]) if unknown else 'it lacks ' + str(lacking[:3])}): its "
                             f"statistics belong to another model. Restore it into the architecture it was saved from "
                             f"(se_surgery.restore); nothing was loaded.")
        self.output_change = state.pop("output_change")
        self.scale, self.norm, self.spreads = state.pop("scale"), state.pop("norm"), state.pop("spreads")
        self.frozen_norms = frozenset(state.pop("frozen_norms"))
        self.folded_away = []
        for s in state.pop("folds"):
            step = FoldStep(s["site"], FoldAction(s["action"]), FoldReason(s["reason"]), s["consumer"])
            name = module_key(step.site)
            if name in self:
                self[name].fold = step
            else:
                self.folded_away.append(step)
        self.recipe = state
        for name, fields_ in per.items():  # only the declared field, already type-checked
            self[name].compensation = Compensation(fields_["compensation"])

    def named_children(self):
        # torch.fx's tracer lists every module's children before it traces; it calls the root's forward without
        # its hooks, so equalizers owned by the root would be dropped silently. Refuse instead.
        if len(self) and is_fx_tracing():
            raise fx_error()
        return super().named_children()

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before scripting; the equalizers' hooks and modes are
        # Python that TorchScript cannot compile.
        if len(self):
            raise CaptureError(f"torch.jit.script cannot carry se_surgery's {len(self)} equalizer(s): they act through "
                               f"Python hooks and a TorchFunctionMode. se_surgery.fold the model first (scripts once "
                               f"every equalizer folds away), or use torch.jit.trace, torch.export or "
                               f"se_surgery.export_onnx.")
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not len(self):  # a registry emptied by fold adds no key: the state_dict is the plain model's
            destination.pop(prefix + _EXTRA, None)

    def check_shapes(self, state_dict, prefix: str) -> None:
        """A :class:`~se_surgery.UsageError` where ``state_dict`` holds statistics of another shape than the
        equalizers' (saved with the other ``per_channel``); ``prefix``: the registry's key prefix in it."""
        for name, eq in self.items():
            for buffer in ("mean", "std"):
                given = state_dict.get(f"{prefix}{name}.{buffer}")
                if isinstance(given, torch.Tensor) and given.shape != getattr(eq, buffer).shape:
                    raise UsageError(f"this state_dict's statistics for {name} have shape {tuple(given.shape)}, the "
                                     f"model's equalizer {tuple(getattr(eq, buffer).shape)}: it was saved with "
                                     f"per_channel={given.dim() == 1}, this model equalized with "
                                     f"per_channel={eq.per_channel}. Load it with se_surgery.restore into the model "
                                     f"as its library builds it; nothing was loaded.")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        ours = [k for k in state_dict if k.startswith(prefix) and k != prefix + _EXTRA]
        if ours and prefix + _EXTRA not in state_dict:
            raise UsageError(f"this state_dict holds equalizer statistics ({ours[0]}, ...) without their se_surgery "
                             f"recipe ({prefix + _EXTRA}): a loader dropped it (smp's from_pretrained drops it as a "
                             f"size mismatch), so nothing says they belong to these sites. Load with "
                             f"se_surgery.restore(ModelClass, path), or the whole state_dict; nothing was loaded.")
        self.check_shapes(state_dict, prefix)  # before anything is set: the recipe and statistics stay as they were
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        if not len(self) and prefix + _EXTRA in missing_keys:
            missing_keys.remove(prefix + _EXTRA)


_EXTRA = EXTRA_STATE_SUFFIX
RECIPE_KEY = "scale_equalizers." + _EXTRA


def fx_error() -> CaptureError:
    return CaptureError("torch.fx symbolic tracing (symbolic_trace, create_feature_extractor) cannot carry "
                        "se_surgery's equalizers: it calls forward methods without their hooks and would return the "
                        "model without them. Trace the plain model and equalize afterwards, or se_surgery.fold the "
                        "equalized model first.")


def registry(model: nn.Module) -> EqualizerRegistry | None:
    """The model's registry, or None when it has no equalizers."""
    found = getattr(model, "scale_equalizers", None)
    return found if isinstance(found, EqualizerRegistry) else None


# ----------------------------------------------------------------------------------------------------------------
# The recipe codec. A recipe read from a file is untrusted: bounded in size, parsed, then checked field by field.

VERSION = 4
MAX_BYTES = 4 << 20          # a real recipe is a few kB per hundred sites
MAX_INPUTS, MAX_RANK, MAX_DIM, MAX_ELEMENTS = 64, 8, 1 << 20, 1 << 26
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool")

# version-1 recipes (written before the records became enums) stored sentences; their first words give the record.
_V1_COMPENSATION = {"exact": Compensation.EXACT, "scale only": Compensation.SCALE_ONLY,
                    "inexact at borders": Compensation.ZERO_PADDED, "not possible": Compensation.NO_CONSUMER}
_V1_ACTION = {"folded": FoldAction.FOLDED, "scale folded": FoldAction.SCALE_FOLDED,
              "moved before the resize": FoldAction.MOVED, "kept": FoldAction.KEPT}


def encode(recipe: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(recipe, sort_keys=True).encode()), dtype=torch.uint8).clone()


def decode(value: Any, where: str = "the checkpoint") -> dict:
    """The recipe in ``value`` (the uint8 tensor :func:`encode` made), checked against the schema; every problem
    is a :class:`~se_surgery.UsageError` naming ``where`` and the field."""
    def bad(what: str) -> UsageError:
        return UsageError(f"{where}: its se_surgery recipe ({RECIPE_KEY}) {what}; it was not written by "
                          f"se_surgery or was damaged. Nothing was loaded from it.")

    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise bad(f"is a {type(value).__name__} ({getattr(value, 'dtype', '')}), not a 1-D uint8 tensor")
    if value.numel() > MAX_BYTES:
        raise bad(f"holds {value.numel()} bytes, more than the {MAX_BYTES} se_surgery ever writes")
    try:
        state = json.loads(bytes(value.cpu().numpy().tobytes()).decode("utf-8"))
    except UnicodeDecodeError as error:
        raise bad(f"is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (ValueError, RecursionError) as error:
        raise bad(f"is not valid JSON ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise bad(f"is a JSON {type(state).__name__}, not an object")
    return _validated(state, bad)


def _names(value: Any, limit: int = 100_000) -> bool:
    return isinstance(value, list) and len(value) <= limit and \
        all(isinstance(v, str) and len(v) < 1000 for v in value)


def _shape(value: Any) -> bool:
    return isinstance(value, list) and 0 < len(value) <= MAX_RANK and \
        all(type(d) is int and 0 < d <= MAX_DIM for d in value) and torch.Size(value).numel() <= MAX_ELEMENTS


# The recipe's schema: field -> (check, what the field must be). Every field a recipe may hold is here.
_FIELDS: dict[str, tuple[Any, str]] = {
    "version": (lambda v: type(v) is int and 1 <= v <= VERSION, f"a version from 1 to {VERSION}"),
    "input_kind": (lambda v: v in ("args", "kwargs"), "'args' or 'kwargs'"),
    "input_names": (_names, "a list of names"),
    "shapes": (lambda v: isinstance(v, list) and 0 < len(v) <= MAX_INPUTS and all(map(_shape, v)),
               f"a list of 1 to {MAX_INPUTS} shapes of rank 1-{MAX_RANK}, sizes 1-{MAX_DIM} and at most "
               f"{MAX_ELEMENTS} elements"),
    "dtypes": (lambda v: isinstance(v, list) and all(d in DTYPES for d in v), f"a list of {DTYPES}"),
    "per_channel": (lambda v: type(v) is bool, "true or false"),
    "branches": (lambda v: v in ("upsampled", "all"), "'upsampled' or 'all'"),
    "sites": (lambda v: _names(v) and len(set(v)) == len(v), "a list of distinct site names"),
    "output_change": (lambda v: v is None or type(v) in (int, float), "a number or null"),
    "folds": (lambda v: isinstance(v, list), "a list of fold steps"),
    "equalizers": (lambda v: isinstance(v, dict), "an object of per-equalizer records"),
    "scale": (lambda v: v in (None, "unit", "restore"), "'unit', 'restore' or null"),
    "norm": (lambda v: v in (None, "batch", "running"), "'batch', 'running' or null"),
    "frozen_norms": (_names, "a list of norm layer names"),
    "where": (lambda v: isinstance(v, list) and len(v) <= 1000 and all(map(_choice, v)),
              "a list of site choices (preset, fusions, place, include, exclude, names, rule, measured)"),
    "left": (lambda v: isinstance(v, dict) and len(v) <= 100_000 and all(
        isinstance(k, str) and len(k) < 1000 and isinstance(why, str) and len(why) < 1000 for k, why in v.items()),
             "an object of site names to why each was left alone"),
    "spreads": (lambda v: isinstance(v, dict) and len(v) <= 100_000 and all(
        isinstance(k, str) and len(k) < 1000 and isinstance(p, list) and len(p) == 2 and
        all(type(x) in (int, float) and x > 0 for x in p) for k, p in v.items()),
                "an object of fusion names to [before, after] spreads"),
}
_OPTIONAL = {"output_change": None, "folds": [], "equalizers": {}, "scale": None, "norm": None, "spreads": {},
             "where": [], "left": {}, "frozen_norms": []}
# One choice of sites (``Where.record``): every field, each a short string, a list of them, or null.
_CHOICE = {"preset": False, "fusions": True, "place": False, "include": True, "exclude": True, "names": True,
           "rule": False, "measured": False}


def _choice(value: Any) -> bool:
    def text(v: Any) -> bool:
        return isinstance(v, str) and len(v) < 1000

    return isinstance(value, dict) and set(value) == set(_CHOICE) and all(
        value[k] is None or (_names(value[k]) if listed else text(value[k])) for k, listed in _CHOICE.items())
# A fold step's fields and a per-equalizer record's fields, with their types (an enum: one of its values).
_STEP = {"site": str, "action": FoldAction, "reason": FoldReason, "consumer": str}
_RECORD = {"compensation": Compensation}
# before version 3 a record also held what fold did (now only in the fold steps, where it is derived from)
_RECORD_V2 = {**_RECORD, "folded": FoldAction, "before_resize": bool}


def _typed(fields: Any, schema: dict) -> bool:
    def fits(value: Any, kind: type) -> bool:
        return isinstance(value, str) and value in set(kind) if issubclass(kind, StrEnum) else type(value) is kind

    return isinstance(fields, dict) and set(fields) == set(schema) and all(fits(fields[k], t)
                                                                         for k, t in schema.items())


def _validated(state: dict, bad) -> dict:
    """The recipe checked against :data:`_FIELDS`, then across fields; version-1 records translated."""
    missing = sorted(set(_FIELDS) - set(_OPTIONAL) - set(state))
    unknown = sorted(set(state) - set(_FIELDS))
    if missing or unknown:
        raise bad(f"lacks {missing}" if missing else f"has fields no se_surgery version writes: {unknown[:5]}")
    state = {**_OPTIONAL, **state}
    for name, (ok, what) in _FIELDS.items():
        if not ok(state[name]):
            raise bad(f"field {name!r} is not {what}" + (f" ({str(state[name])[:80]})" if name == "shapes" else ""))
    sites, version = state["sites"], state["version"]
    if len(state["dtypes"]) != len(state["shapes"]):
        raise bad("field 'dtypes' does not give one dtype per shape")
    if state["input_kind"] == "kwargs" and len(state["input_names"]) != len(state["shapes"]):
        raise bad("field 'input_names' does not give one name per shape")

    if len(state["folds"]) > len(sites):
        raise bad("field 'folds' holds more than one step per site")
    folds = []
    for step in state["folds"]:
        if not isinstance(step, dict) or step.get("site") not in sites:
            raise bad(f"field 'folds' holds {str(step)[:80]}, not a step at one of its sites")
        if version == 1:
            action = next((a for text, a in _V1_ACTION.items() if str(step.get("action", "")).startswith(text)),
                          None)
            step = {"site": step["site"], "action": action, "reason": "", "consumer": ""}
        if not _typed(step, _STEP):
            raise bad(f"field 'folds' holds {str(step)[:80]}, not a fold step")
        folds.append(step)

    per, module_names = state["equalizers"], {module_key(s) for s in sites}
    if len(per) > len(sites):
        raise bad("field 'equalizers' holds more than one entry per site")
    records = {}
    for name, fields_ in per.items():
        if name not in module_names or not isinstance(fields_, dict):
            raise bad(f"field 'equalizers' has an entry {name[:80]!r} that is not one of its sites")
        if version == 1:
            text = fields_.get("compensation", "")
            fields_ = {"compensation": next((c for t, c in _V1_COMPENSATION.items() if str(text).startswith(t)),
                                            Compensation.NONE),
                       "folded": FoldAction.SCALE_FOLDED if str(fields_.get("folded", "")).startswith("scale into")
                       else FoldAction.MOVED if fields_.get("folded") else FoldAction.NONE,
                       "before_resize": fields_.get("before_resize", False)}
        if not _typed(fields_, _RECORD if version == VERSION else _RECORD_V2):
            raise bad(f"field 'equalizers' has an entry for {name!r} with other fields or values than "
                      f"{', '.join(_RECORD if version == VERSION else _RECORD_V2)}")
        records[name] = {"compensation": fields_["compensation"]}
    return {**state, "folds": folds, "equalizers": records, "version": VERSION}
