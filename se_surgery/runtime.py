"""Runtime: how the equalizers act inside the user's own eager model, and how a call is recognised as a site.

A site's resize usually sits in the middle of some module's forward (``F.interpolate`` in a decoder head), where no
module hook reaches, and rewriting the forward would lose the user's class. So each *owner* module gets a forward
pre-hook that enters a ``TorchFunctionMode`` for the duration of its forward, and a post-hook that leaves it. The
mode recognises a call by what it is (:class:`~se_surgery.site.CallKey`): the owner's call number, the op kind,
the source line in the owner's forward that made it, and which of that line's calls it is (a loop makes several).
Input size, graph breaks, ``no_grad`` regions, checkpoint recomputation and extra calls elsewhere do not change
that identity. A call from a site's line that the graph did not have, one that does not look like the site
(mode, align_corners, channels), or a site that was not met by the end of its owner's forward raises
:class:`~se_surgery.SiteMismatchError`: an equalizer never acts on another tensor.

All state lives in one declared object, ``model.scale_equalizers`` (an :class:`EqualizerRegistry`): the
equalizers by name, the owners' site tables and the hooks' handles.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch._guards import TracingContext
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .checkpoint import decode, encode
from .equalizer import ScaleEqualizer
from .errors import SiteMismatchError, UsageError
from .site import CallKey, Site, is_caller

INTERPOLATING = {"linear", "bilinear", "bicubic", "trilinear"}
_DIRECT_MODE = {torch._C._nn.upsample_linear1d: "linear", torch._C._nn.upsample_bilinear2d: "bilinear",
                torch._C._nn.upsample_bicubic2d: "bicubic", torch._C._nn.upsample_trilinear3d: "trilinear",
                torch._C._nn._upsample_bilinear2d_aa: "bilinear", torch._C._nn._upsample_bicubic2d_aa: "bicubic"}
_RESIZE_FUNCS = {F.interpolate, *_DIRECT_MODE}
_LIST_FUSIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_FUSION_FUNCS = _LIST_FUSIONS | {torch.add, torch.sub, torch.subtract, torch.Tensor.add, torch.Tensor.add_,
                                 torch.Tensor.sub, torch.Tensor.sub_, torch.Tensor.__add__, torch.Tensor.__iadd__,
                                 torch.Tensor.__sub__, torch.Tensor.__isub__}


@torch._dynamo.assume_constant_result
def call_source() -> str:
    """``/path/file.py:line`` in the innermost ``forward`` on the way to the torch function being handled (a helper
    such as ``self.decode(x)`` counts as its ``forward``'s line, as torch.export's stack traces record it).

    Eagerly, from the Python frames; while torch.compile traces, from the frames it is tracing (a constant of the
    traced code). torch's own wrappers and se_surgery are skipped, as in the graph pass's stack traces. Code
    without a source file gives ``""``: its sites are told apart by their order alone (``equalize`` warns)."""
    frames = TracingContext.extract_stack()
    if len(frames):
        found = next(((f.filename, f.lineno) for f in reversed(frames) if _forward(f.name, f.filename)), ("<>", 0))
    else:
        frame = sys._getframe(1)
        while frame is not None and not _forward(frame.f_code.co_name, frame.f_code.co_filename):
            frame = frame.f_back
        found = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("<>", 0)
    # Code without a file (python -c, exec) has no stack trace in the graph either: one bucket, "".
    return "" if found[0].startswith("<") else f"{found[0]}:{found[1]}"


def _forward(name: str, filename: str) -> bool:
    """A user's ``forward`` frame, or the rest of one that torch.compile resumes after a graph break."""
    return (name == "forward" or name.startswith("torch_dynamo_resume_in_forward")) and is_caller(filename)


@dataclass
class OwnerSites:
    """The sites one owner module's forward holds, by run-time identity, and its hooks."""

    path: str
    shared: bool                                   # the graph calls the module more than once per forward
    calls: int                                     # how many times
    sites: dict[CallKey, dict[int, str]] = field(default_factory=dict)   # call -> {fusion input: equalizer name}
    line_calls: dict[tuple[int, str, str], int] = field(default_factory=dict)  # (call, op, source) -> count
    handles: list[RemovableHandle] = field(default_factory=list)
    active: list = field(default_factory=list, repr=False)   # its modes while its forward runs (a stack)

    @property
    def ops(self) -> set[str]:
        return {key.op for key in self.sites}

    def add(self, site: Site, name: str) -> None:
        self.sites.setdefault(site.call_key, {})[site.arg] = name
        key = site.call_key
        self.line_calls[(key.call, key.op, key.source)] = site.line_calls


class EqualizerRegistry(nn.ModuleDict):
    """``model.scale_equalizers``: every equalizer of one model by name, and the state their hooks share.

    The only attribute se_surgery adds to a model. Its buffers are the equalizers' (``scale_equalizers.<site>.
    {mean,std,calibrated}`` in the state_dict); the rest is plain Python state that pickles and deep-copies with
    the model (the hooks hold it through ``functools.partial``)."""

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[str, OwnerSites] = {}
        self.handles: list[RemovableHandle] = []     # the model's own hooks
        self.input_form: tuple[str, object] | None = None   # how calibration batches map to the model's inputs
        self.output_change: float | None = None      # what preserve_function moved the output by
        self.folds: list = []                        # what se_surgery.fold did (FoldStep records)
        self.calls: dict[str, int] = {}              # shared owners: calls so far in this forward
        self.busy = False                            # inside an equalizer: its own ops are not calls of the owner
        self.bypass = False                          # equalizers pass through (capturing an equalized model)
        self.recipe: dict = {}                       # how equalize was called (checkpoint.py: what restore needs)

    # The recipe rides in the state_dict as ``scale_equalizers._extra_state`` (a uint8 tensor of JSON, so that
    # safetensors files keep it), with what preserve_function and fold did per site. A registry emptied by fold
    # adds no key, so a fully folded model's state_dict is the plain model's.
    def get_extra_state(self) -> torch.Tensor:
        state = dict(self.recipe, output_change=self.output_change,
                     folds=[dataclasses.asdict(step) for step in self.folds],
                     equalizers={name: {"compensation": eq.compensation, "folded": eq.folded,
                                        "before_resize": eq.before_resize} for name, eq in self.items()})
        return encode(state)

    def set_extra_state(self, value) -> None:
        from .fold import FoldStep

        state = decode(value)
        per = state.pop("equalizers", {})
        self.output_change = state.pop("output_change", None)
        self.folds = [FoldStep(**step) for step in state.pop("folds", [])]
        self.recipe = state
        for name, eq in self.items():
            for attr, value in per.get(name, {}).items():
                setattr(eq, attr, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not len(self):
            destination.pop(prefix + _EXTRA, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        if not len(self) and prefix + _EXTRA in missing_keys:
            missing_keys.remove(prefix + _EXTRA)


_EXTRA = torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


def registry(model: nn.Module) -> EqualizerRegistry | None:
    """The model's registry, or None when it has no equalizers."""
    found = getattr(model, "scale_equalizers", None)
    return found if isinstance(found, EqualizerRegistry) else None


def equalizers(model: nn.Module) -> list[ScaleEqualizer]:
    """The model's equalizers, in the order the graph pass found them.

    Args:
        model: a model returned by :func:`se_surgery.equalize` (any other model gives ``[]``).
    """
    found = registry(model)
    return list(found.values()) if found is not None else []


def _resize_mode(func, args, kwargs) -> str | None:
    if func is F.interpolate:
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        return mode if mode in INTERPOLATING else None
    return _DIRECT_MODE.get(func)


def _align_corners(func, args, kwargs) -> bool | None:
    if func is F.interpolate:
        value = kwargs.get("align_corners", args[4] if len(args) > 4 else None)
        return bool(value) if value is not None else False
    return bool(kwargs.get("align_corners", args[2] if len(args) > 2 else False))


class _OwnerMode(TorchFunctionMode):
    """Active during one call of an owner's forward: recognises the site calls and routes them through the
    equalizers; records which it met."""

    def __init__(self, reg: EqualizerRegistry, owner: OwnerSites, call: int) -> None:
        super().__init__()
        self.reg, self.owner, self.call = reg, owner, call
        self.ops = owner.ops
        self.seen: dict[tuple[str, str], int] = defaultdict(int)
        self.met: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.reg.busy:
            return func(*args, **kwargs)
        if func in _RESIZE_FUNCS:
            op = "resize" if _resize_mode(func, args, kwargs) is not None else None
        else:
            op = "fusion" if func in _FUSION_FUNCS else None
        if op is None or op not in self.ops:
            return func(*args, **kwargs)
        source = call_source()
        expected = self.owner.line_calls.get((self.call, op, source))
        if expected is None:  # a line without sites
            return func(*args, **kwargs)
        occurrence = self.seen[(op, source)]
        self.seen[(op, source)] = occurrence + 1
        key = CallKey(self.call, op, source, occurrence)
        targets = self.owner.sites.get(key)
        if occurrence >= expected:
            name = next(iter(next(v for k, v in self.owner.sites.items() if k.source == source).values()))
            raise SiteMismatchError(
                f"site {self.reg[name].name}: its line {self.reg[name].site.where} made {occurrence + 1} {op} calls "
                f"in this forward of {self.owner.path or 'the model'}, but the graph found {expected}; se_surgery "
                f"cannot tell which is the site. Equalize at an input size where the forward takes the same path.")
        if targets is None:
            return func(*args, **kwargs)
        self.met.extend(targets.values())
        if op == "resize":
            (name,) = targets.values()
            equalizer = self.reg[name]
            x = args[0] if args else kwargs.pop("input")
            _check_resize(equalizer.site, _resize_mode(func, args, kwargs), _align_corners(func, args, kwargs), x)
            if self.reg.bypass:
                return func(x, *args[1:], **kwargs)
            if equalizer.before_resize:
                return func(self._apply(equalizer, x), *args[1:], **kwargs)
            return self._apply(equalizer, func(x, *args[1:], **kwargs))
        return self._fusion(func, args, kwargs, targets)

    def _apply(self, equalizer: ScaleEqualizer, x: torch.Tensor) -> torch.Tensor:
        self.reg.busy = True
        try:
            return equalizer(x)
        finally:
            self.reg.busy = False

    def _fusion(self, func, args, kwargs, targets: dict[int, str]):
        listed = func in _LIST_FUSIONS
        inputs = list(kwargs.pop("tensors") if listed and "tensors" in kwargs else args[0] if listed else args)
        for arg, name in targets.items():
            site = self.reg[name].site
            if arg >= len(inputs) or not isinstance(inputs[arg], torch.Tensor) or \
                    inputs[arg].shape[1:2] != torch.Size(site.shape[1:2]):
                raise SiteMismatchError(f"site {site.name} ({site.where}): expected input {arg} of a {site.fusion} "
                                        f"with {site.shape[1]} channels, met {_describe_inputs(inputs)}.")
            if not self.reg.bypass:
                inputs[arg] = self._apply(self.reg[name], inputs[arg])
        if listed:
            return func(inputs, *args[1:], **kwargs)
        return func(*inputs, **kwargs)


def _describe_inputs(inputs) -> str:
    return ", ".join(f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)


def _check_resize(site: Site, mode: str | None, align_corners: bool | None, x: torch.Tensor) -> None:
    want = (site.mode, bool(site.align_corners), len(site.shape), site.shape[1])
    got = (mode, align_corners, x.dim(), x.shape[1] if x.dim() > 1 else None)
    if got != want:
        raise SiteMismatchError(
            f"site {site.name} ({site.where}): expected a {want[0]} resize (align_corners={want[1]}) of a "
            f"{want[2]}-D map with {want[3]} channels, met a {got[0]} resize (align_corners={got[1]}) of a "
            f"{got[2]}-D map with {got[3]} channels. The forward took another path than at the example size; "
            f"equalize at the size you run at.")


def _enter_model(reg: EqualizerRegistry, _module, _args) -> None:
    reg.calls.clear()


def _enter_owner(reg: EqualizerRegistry, path: str, _module, _args) -> None:
    owner = reg.owners[path]
    call = 0
    if owner.shared:
        call = reg.calls.get(path, 0)
        reg.calls[path] = call + 1
        if call >= owner.calls:
            raise SiteMismatchError(
                f"{path} was called {call + 1} times in one forward, but the graph has {owner.calls} calls: its "
                f"equalizers cannot tell which call is which (a shared module in gradient checkpointing, or called "
                f"outside the model's forward).")
    mode = _OwnerMode(reg, owner, call)
    owner.active.append(mode)
    mode.__enter__()


def _leave_owner(reg: EqualizerRegistry, path: str, _module, _args, out) -> None:
    owner = reg.owners[path]
    mode = owner.active.pop()
    mode.__exit__(None, None, None)
    if out is None:
        return  # the forward raised (always_call): that error is the one to see
    for key, targets in owner.sites.items():
        if key.call != mode.call:
            continue
        for name in targets.values():
            if name not in mode.met:
                site = reg[name].site
                seen = {s: n for (op, s), n in mode.seen.items() if op == key.op}
                raise SiteMismatchError(
                    f"site {site.name} ({site.where}, {key.op} #{key.occurrence} from that line) was not met in "
                    f"this forward of {path or 'the model'}; calls seen from the site lines: {seen or 'none'}. The "
                    f"forward took another path than at the example size; equalize at the size you run at.")


def attach(model: nn.Module, sites: list[Site], per_channel: bool = False) -> list[ScaleEqualizer]:
    """Give every site an equalizer in ``model.scale_equalizers`` and hook its owner; returns the new equalizers
    (sites already equalized are skipped)."""
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UsageError(f"se_surgery cannot add equalizers to a bare {type(model).__name__}: wrap it in an "
                         f"nn.Module whose forward calls it.")
    reg = registry(model)
    if reg is None:
        reg = EqualizerRegistry()
        model.scale_equalizers = reg
        reg.handles.append(model.register_forward_pre_hook(functools.partial(_enter_model, reg)))
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    added = []
    for site in sites:
        name = site.module_name
        if name in reg:
            continue
        owner = reg.owners.get(site.owner)
        if owner is None:
            module = model.get_submodule(site.owner)
            owner = reg.owners[site.owner] = OwnerSites(site.owner, site.owner_calls > 1, site.owner_calls)
            owner.handles = [module.register_forward_pre_hook(functools.partial(_enter_owner, reg, site.owner)),
                             module.register_forward_hook(functools.partial(_leave_owner, reg, site.owner),
                                                          always_call=True)]
        equalizer = ScaleEqualizer(site.shape[1] if len(site.shape) > 1 else 1, per_channel, site,
                                   dtype=ref.dtype if ref is not None else None,
                                   device=ref.device if ref is not None else None)
        reg[name] = equalizer
        owner.add(site, name)
        added.append(equalizer)
    return added


def detach(model: nn.Module, equalizer: ScaleEqualizer, keep_registry: bool = False) -> None:
    """Take one equalizer out; when none is left, the hooks go too and, unless ``keep_registry`` (an empty one
    keeps fold's record and adds no state_dict key), the registry."""
    reg = registry(model)
    site = equalizer.site
    owner = reg.owners[site.owner]
    targets = owner.sites[site.call_key]
    del targets[site.arg]
    if not targets:
        del owner.sites[site.call_key]
    del reg[site.module_name]
    if not owner.sites:
        for handle in owner.handles:
            handle.remove()
        del reg.owners[site.owner]
    if not len(reg):
        for handle in reg.handles:
            handle.remove()
        if not keep_registry:
            del model.scale_equalizers
