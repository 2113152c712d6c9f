"""Dispatch: how the equalizers act inside the user's own eager model, call by call, and how a call is recognised as
a site. The installation (which hooks sit where, the registry) is ``install.py``; this module only runs them.

A site's resize usually sits in the middle of some module's forward (``F.interpolate`` in a decoder head), where no
module hook reaches, and rewriting the forward would lose the user's class. So each *owner* module gets an instance
``forward`` (:class:`OwnerForward`) whose call, one function read top to bottom, enters a ``TorchFunctionMode``
(:class:`_OwnerMode`), runs the class's forward, and leaves the mode however the call ends. torch.compile guards on
an instance's ``forward``, so compiled code of a plain module of the class is never reused for an owner (no torch
setting needed).
The mode recognises a call by what it is (:class:`~se_surgery.site.CallKey`): the owner's call number, the op kind,
the source line in the owner's forward that made it, and which of that line's calls it is (a loop makes several);
and that it is the owner's own call: the first module call above it is the one whose forward entered the mode (known
by its frame, not by the name of the forward's first parameter). Input size, graph breaks, ``no_grad`` regions and
extra calls elsewhere do not change that identity. What cannot be matched raises
:class:`~se_surgery.SiteMismatchError` naming the cause: an equalizer never acts on another tensor.

The mode dispatches only the owner's own calls, so the modules it calls (convs, norms, blocks) get hooks that take
the mode off the stack for their call (:func:`_enter_callee`). In eager runs an owner whose sites are all resizes its
class's ``forward`` makes through ``F.interpolate`` runs without a mode: that ``forward`` bound to
:func:`_interpolate` (:mod:`se_surgery.bound`), which asks the same record (an :class:`_OwnerMode` not entered).
An owner that is an ``nn.Upsample`` needs no mode: its call is the site, and its ``OwnerForward`` equalizes its
input or output directly. An upsampling's equalizer acts on the resize's input in eager runs, the same map at
1/factor^d of the work (:attr:`~se_surgery.equalizer.ScaleEqualizer.before_resize`).

Invariants, checked where they can break:

- A thread's record (``_local``) holds, per running forward of an equalized model, its :class:`_Forward` and the
  module-call frame it runs in, innermost last; the owners whose call runs; and per running callee call, the mode
  it paused. Once the outermost forward returns, all are empty and no owner mode is on the torch function stack
  (:func:`_leave_model` checks). A forward interrupted by a ``BaseException`` (Ctrl-C), for which torch skips the
  cleaning hooks, leaves records whose frames are gone: the next forward drops them (:func:`_drop_stale`).
- The torch function stack holds an owner's mode exactly while that owner's own code runs: entered by its
  ``OwnerForward``, taken off while a module it calls runs, put back after, left when its forward returns or raises.

What one call needs lives with the thread that makes it, never on the model, so any number of threads can run one
model. The hooks hold no reference to the model's state: they find it through the model forward running on their
thread (the model's own pre-hook announces it), so a copied owner put back into the model (peft
``modules_to_save``, a deep-copied submodule) uses the model's equalizers.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections import defaultdict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode

from .bound import bound
from .equalizer import ScaleEqualizer
from .errors import SiteMismatchError
from .ops import FUSION_FUNCS, INPLACE_FUNCS, RESIZE_FUNCS, align_corners, branch_inputs, resize_mode
from .site import Site, is_caller, source_key
from .state import EqualizerRegistry, OwnerSites, fx_error, registry
from .torch_internals import (
    CALL_IMPL,
    RESUME_PREFIX,
    assume_constant_result,
    function_mode_at,
    function_modes,
    function_stack_depth,
    is_fx_tracing,
    pop_function_mode,
    push_function_mode,
    traced_frames,
)


class _Forward:
    """One forward of an equalized model on one thread: its registry, how often each owner was called, and the
    module that answered to each owner's path."""

    __slots__ = ("reg", "calls", "modules")

    def __init__(self, reg: EqualizerRegistry) -> None:
        self.reg = reg
        self.calls: dict[str, int] = defaultdict(int)
        self.modules: dict[str, nn.Module] = {}

    def count(self, path: str, module: nn.Module) -> int:
        """This call's number among the owner's calls in the forward (0 first)."""
        call = self.calls[path]
        self.calls[path] = call + 1
        self.modules[path] = module
        return call


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.forwards: list[_Forward | None] = []  # equalized models whose forward runs here, innermost last
        self.frames: list = []                      # the module-call frame of each (None: traced), to find stale ones
        self.owners: list[nn.Module] = []           # owners whose OwnerForward runs here, innermost last
        self.bound: list[_OwnerMode] = []           # the record of each running bound owner call, innermost last
        self.paused: dict[int, list] = {}           # id(hooked callee) -> the mode each of its running calls paused
        self.handling = 0                           # >0 while one of our modes handles a call: others pass it on
        self.bypass = 0                             # >0: equalizers pass their input through (capturing)


_local = _PerThread()
# Owner module -> the registry of the model it was last called in (or attached to): for calls from outside a model
# forward, such as gradient checkpointing's recomputation during backward. Kept here, not on the user's modules.
_homes: weakref.WeakKeyDictionary[nn.Module, EqualizerRegistry] = weakref.WeakKeyDictionary()


class bypassed:
    """Inside the block, equalizers on this thread pass their input through (to capture an equalized model)."""

    def __enter__(self) -> None:
        _local.bypass += 1

    def __exit__(self, *exc) -> None:
        _local.bypass -= 1


# ----------------------------------------------------------------------------------------------------------------
# One forward, in the order it runs: the model's pre-hook, each owner's call (its mode handling the owner's own torch
# calls; the modules it calls pausing the mode), the model's hook. Hooks and instance forwards hold only names and
# the module (so they pickle, deep-copy and survive being copied with a submodule).


def _enter_model(module: nn.Module, _args) -> None:
    frame = None if torch.compiler.is_dynamo_compiling() else _module_call(sys._getframe(1))
    if frame is not None and (_local.forwards or _local.paused):
        _drop_stale(frame)
    _local.frames.append(frame)
    reg = registry(module)
    top = _local.forwards[-1] if _local.forwards else None
    if reg is not None and top is not None and top.reg is reg:  # the model calls itself (recursion): one forward
        _local.forwards.append(top)
    else:
        _local.forwards.append(_Forward(reg) if reg is not None else None)


class OwnerForward:
    """An owner module's ``forward`` while it holds sites (set on the instance, as ``module.forward``): the owner's
    call as one unit, read top to bottom in :meth:`__call__`. torch.compile guards on an instance's ``forward``, so
    code compiled for a plain module of the class is not reused for an owner, nor the reverse, in any order, with
    torch's default settings. It holds names and the module, so it deep-copies and pickles with the module (a copy
    is the copy's)."""

    def __init__(self, path: str, module: nn.Module, inner=None) -> None:
        self.path, self.module, self.inner = path, module, inner  # inner: the instance's own forward before ours

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self.inner if self.inner is not None else
                                 functools.partial(type(self.module).forward, self.module))

    @property
    def __name__(self) -> str:
        return "forward"

    @property
    def __code__(self):  # (torch.export names its fake mode after the root's forward code)
        function = self.inner if self.inner is not None else type(self.module).forward
        return getattr(function, "__code__", None) or getattr(getattr(function, "__func__", None), "__code__", None)

    def _run(self, args, kwargs):
        """The owner's own forward: the instance's previous one, or its class's."""
        return self.inner(*args, **kwargs) if self.inner is not None else type(self.module).forward(self.module, *args,
                                                                                                   **kwargs)

    def __call__(self, *args, **kwargs):
        """One call of the owner: find the model forward it belongs to and number the call; run it plain (no sites
        left, or a training call beyond the eval graph's), as an ``nn.Upsample`` site, or in the owner's mode; then
        check that the mode met every site of this call. Invariants: the caller owner's mode is off the torch function
        stack while this call runs (it is not the caller's own code) and back after; this owner's mode is on the
        stack exactly while its forward runs; both hold however the call ends (Ctrl-C too)."""
        module, path = self.module, self.path
        forward = _forward_of(module, path)
        owner = forward.reg.owners.get(path)
        call = forward.count(path, module) if owner is not None else 0
        paused = _pause()
        _local.owners.append(module)
        try:
            if owner is None or owner.calls <= call < _limit(owner, module):  # folded away; an extra training call
                return self._run(args, kwargs)
            if call < owner.calls and _module_resize(module, args):  # an nn.Upsample: its call is its site
                return _upsample(forward.reg, owner, call, module, args, kwargs, self._run)
            # (a call beyond the graph's runs in a mode with no sites, checked below: the graph does not count a call
            # that makes no tensor operation, such as a recursion's base case returning its input)
            caller = None if torch.compiler.is_dynamo_compiling() else _module_call(sys._getframe(1))  # (no frames)
            mode = _OwnerMode(forward, owner, call, caller)
            if owner.bound and caller is not None and call < owner.calls and self.inner is None and \
                    not torch.compiler.is_compiling():
                _local.bound.append(mode)  # (its forward's F.interpolate asks this record: no mode on the stack)
                try:
                    out = bound(type(module).forward, _interpolate)(module, *args, **kwargs)
                finally:
                    _local.bound.pop()
            else:
                mode.funcs = _FUNCS[owner.ops]
                mode.__enter__()
                try:
                    out = self._run(args, kwargs)
                finally:
                    mode.__exit__(None, None, None)
        finally:
            _local.owners.pop()
            if paused is not None:
                push_function_mode(paused)
        if call >= owner.calls and not mode.made and any(out is a for a in args):
            # beyond the graph's calls, no tensor operation, its input returned (a recursion's base case): the graph
            # cannot show such a call, so it is none of the sites' calls
            forward.calls[path] -= 1
            return out
        _check_calls(path, module, mode)
        _check_met(path, module, mode)
        return out


def _interpolate(input, *args, **kwargs):
    """``F.interpolate`` as a bound owner forward (:mod:`se_surgery.bound`) calls it: recognised and equalized by the
    record of the owner call on top of this thread's stack, as its mode would."""
    mode = _local.bound[-1] if _local.bound else None
    if mode is None or _local.handling:
        return F.interpolate(input, *args, **kwargs)
    args = (input, *args)
    interpolating = resize_mode(F.interpolate, args, kwargs)
    if interpolating is None:
        return F.interpolate(*args, **kwargs)
    _local.handling += 1
    try:
        return mode._handle("resize", F.interpolate, args, kwargs, interpolating)
    finally:
        _local.handling -= 1


def _forward_of(module: nn.Module, path: str) -> _Forward:
    """The model forward this owner call belongs to: the innermost running on this thread, or, for a call from
    outside any (gradient checkpointing's recomputation), a new one of the model the owner last ran in."""
    if is_fx_tracing():
        raise fx_error()
    forward = _local.forwards[-1] if _local.forwards else None
    if forward is not None:
        if not torch.compiler.is_compiling() and _homes.get(module) is not forward.reg:
            _homes[module] = forward.reg
        return forward
    reg = _homes.get(module)
    if reg is None:
        raise SiteMismatchError(
            f"{path or 'the model'} ({type(module).__name__}) holds equalizer sites but was called outside the "
            f"forward of the equalized model that holds them, so its equalizers cannot be found. Call the whole "
            f"model, or se_surgery.fold it first.")
    if path in reg.owners and reg.owners[path].shared:
        raise SiteMismatchError(
            f"{path} ({type(module).__name__}) is called {reg.owners[path].calls} times per forward, and this call "
            f"comes from outside the model's forward (gradient checkpointing's recomputation, or user code): its "
            f"equalizers cannot tell which of its calls this is. Checkpoint a module that is called once, or call "
            f"the whole model.")
    return _Forward(reg)


def _limit(owner: OwnerSites, module: nn.Module) -> int:
    """How many calls of the owner one forward may make in the module's mode."""
    return owner.calls if not module.training or owner.train_calls is None else owner.train_calls


def _pause():
    """Take the owner mode on top of this thread's mode stack off it for the duration of a module call made inside
    the owner's forward (returned, to put back after). An owner's sites are calls its own code makes, never a
    callee's (the graph names the innermost module as the owner), so nothing inside a callee needs the mode's
    dispatch. Not while compiling (torch.compile traces the mode; compiled code pays no dispatch), nor under another
    mode (the user's)."""
    depth = function_stack_depth()
    if not depth or torch.compiler.is_compiling() or not isinstance(function_mode_at(depth - 1), _OwnerMode):
        return None
    return pop_function_mode()


def _module_resize(module: nn.Module, args) -> bool:
    """An ``nn.Upsample`` (or a subclass keeping its forward): its call is its site, no mode needed."""
    return type(module).forward is _UPSAMPLE_FORWARD and len(args) == 1 and isinstance(args[0], torch.Tensor) and \
        not torch.compiler.is_compiling()


_UPSAMPLE_FORWARD = nn.Upsample.forward


def _upsample(reg: EqualizerRegistry, owner: OwnerSites, call: int, module: nn.Module, args, kwargs, run):
    """An ``nn.Upsample`` owner's call: equalize its input (or output). Its pre-hooks, if any, ran before and saw
    the raw input."""
    targets = next((t for key, t in owner.sites.items() if key.call == call), None)
    if targets is None or _local.bypass:
        return run(args, kwargs)
    (name,) = targets.values()
    equalizer, x = reg[name], args[0]
    _check_resize(equalizer.site, module.mode, bool(module.align_corners), x)
    if equalizer.before_resize:
        return run((_apply(equalizer, x),), kwargs)
    return _apply(equalizer, run(args, kwargs), x)


def _apply(equalizer: ScaleEqualizer, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    _local.handling += 1  # (an owner mode above a user's mode must not take the equalizer's own ops for sites)
    try:
        return equalizer(x, source)
    finally:
        _local.handling -= 1


class _OwnerMode(TorchFunctionMode):
    """Active during one call of an owner's forward: recognises the site calls and routes them through the
    equalizers; records which it met."""

    def __init__(self, forward: _Forward, owner: OwnerSites, call: int, caller) -> None:
        super().__init__()
        self.forward, self.reg, self.owner, self.call = forward, forward.reg, owner, call
        self.caller = caller  # the frame of nn.Module's call machinery that runs this owner call (eager; else None)
        self.funcs: dict = {}  # the torch functions that can be this owner's sites and their op kind (set on entering)
        self.seen: dict[tuple[str, str], int] = defaultdict(int)
        self.met: list[str] = []
        self.checkpointed = False  # a resize ran inside torch.utils.checkpoint from a line without sites
        self.made = 0              # torch calls the owner's own code made (0 and its input returned: a no-op call)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        op = self.funcs.get(func)
        kwargs = kwargs or {}
        interpolating = resize_mode(func, args, kwargs) if op == "resize" else None
        # (handling: a call made while one of our modes handles another: its own ops, a nested owner's)
        if op is None or _local.handling or op == "resize" and interpolating is None:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):  # (reading a shape makes no tensor: a base case that only looks at
                self.made += 1                 # its input is still a call without operations)
            return out
        self.made += 1
        _local.handling += 1
        try:
            return self._handle(op, func, args, kwargs, interpolating)
        finally:
            _local.handling -= 1

    def _handle(self, op: str, func, args, kwargs, interpolating: str | None):
        frame = None
        source = traced_source_key() if torch.compiler.is_compiling() else None
        if source is None:  # eager (or non-strict export): from the Python frames
            frame = _forward_frame()
            source = source_key(frame.f_code.co_filename, frame.f_lineno) if frame is not None else ""
        expected = self.owner.line_calls.get((self.call, op, source))
        if expected is None:  # a line without sites
            self.checkpointed = self.checkpointed or (op == "resize" and _in_checkpoint())
            return func(*args, **kwargs)
        if frame is not None and _module_call(sys._getframe(1)) is not self.caller:
            # made inside another module's call: a plain copy of the owner or a teacher run from a hook, or a hook of
            # a module the owner calls (a resize in a visualisation hook): not the owner's own code
            return func(*args, **kwargs)
        occurrence = self.seen[(op, source)]
        self.seen[(op, source)] = occurrence + 1
        targets = self.owner.sites.get((self.call, op, source, occurrence))  # (a CallKey)
        if occurrence >= expected:
            name = next(iter(next(v for k, v in self.owner.sites.items() if k.source == source).values()))
            raise SiteMismatchError(
                f"site {self.reg[name].name}: its line ({source}) made {occurrence + 1} {op} calls in this forward "
                f"of {self.owner.path or 'the model'}, but the graph found {expected} at the example size: the "
                f"forward takes another path at this input size (a loop running more often), so se_surgery cannot "
                f"tell which call is the site. Equalize at the size you run at.")
        if targets is None:
            return func(*args, **kwargs)
        self.met.extend(targets.values())
        if op == "resize":
            (name,) = targets.values()
            equalizer = self.reg[name]
            x = args[0] if args else kwargs.pop("input")
            _check_resize(equalizer.site, interpolating, align_corners(func, args, kwargs), x)
            if _local.bypass:
                return func(x, *args[1:], **kwargs)
            if equalizer.before_resize:
                return func(equalizer(x), *args[1:], **kwargs)
            return equalizer(func(x, *args[1:], **kwargs), x)
        return self._fusion(func, args, kwargs, targets)

    def _fusion(self, func, args, kwargs, targets: dict[int, str]):
        fusion = FUSION_FUNCS[func]
        inputs = branch_inputs(fusion, args, kwargs) if fusion.listed else list(args)
        kwargs.pop("tensors", None)
        for arg, name in targets.items():
            site = self.reg[name].site
            if arg >= len(inputs) or not isinstance(inputs[arg], torch.Tensor) or \
                    inputs[arg].shape[1:2] != torch.Size(site.shape[1:2]):
                raise SiteMismatchError(
                    f"site {site.name} ({site.where}): expected input {arg} of a {site.fusion} with {site.shape[1]} "
                    f"channels, met {_describe_inputs(inputs)}: the forward takes another path at this input size "
                    f"than at the example size. Equalize at the size you run at.")
            if not _local.bypass:
                inputs[arg] = self.reg[name](inputs[arg])
        if fusion.listed:
            return func(inputs, *args[1:], **kwargs)  # (args is empty where the list came as tensors=)
        out = func(*inputs, **kwargs)
        if func in INPLACE_FUNCS and inputs[0] is not args[0]:
            return args[0].copy_(out)  # it changed an equalized copy of the tensor it changes in place: write it back
        return out


# The torch functions a mode for an owner with sites of these op kinds handles, and the kind of each (a plain dict:
# torch.compile traces the lookup).
_FUNCS = {frozenset(ops): {**({f: "resize" for f in RESIZE_FUNCS} if "resize" in ops else {}),
                           **({f: "fusion" for f in FUSION_FUNCS} if "fusion" in ops else {})}
          for ops in (("resize",), ("fusion",), ("resize", "fusion"))}


def _describe_inputs(inputs) -> str:
    return ", ".join(f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)


def _check_resize(site: Site, mode: str | None, corners: bool | None, x: torch.Tensor) -> None:
    want = (site.mode, bool(site.align_corners), len(site.shape), site.shape[1])
    got = (mode, corners, x.dim(), x.shape[1] if x.dim() > 1 else None)
    if got != want:
        raise SiteMismatchError(
            f"site {site.name} ({site.where}): expected a {want[0]} resize (align_corners={want[1]}) of a "
            f"{want[2]}-D map with {want[3]} channels, met a {got[0]} resize (align_corners={got[1]}) of a "
            f"{got[2]}-D map with {got[3]} channels: the forward takes another path at this input size than at "
            f"the example size. Equalize at the size you run at.")


@assume_constant_result
def traced_source_key() -> str | None:
    """:func:`~se_surgery.site.source_key` of the innermost ``forward`` on the way to the torch function being
    handled while torch.compile traces, from the frames it is tracing (a constant of the traced code); None where
    no frames are traced (eagerly, and in torch.export's non-strict mode): the runtime reads the same from the
    Python frames then (:func:`_forward_frame`)."""
    frames = traced_frames()
    if not frames:
        return None
    found = next(((f.filename, f.lineno) for f in reversed(frames) if _forward(f.name, f.filename)), None)
    return source_key(*found) if found is not None else ""


def _forward_frame():
    """The innermost user ``forward`` frame on this thread's stack (eager only): a helper such as
    ``self.decode(x)`` counts as its ``forward``'s line, as torch.export records it. torch's own wrappers and
    se_surgery are skipped, as in the graph pass's stack traces."""
    frame = sys._getframe(2)
    while frame is not None and not _forward(frame.f_code.co_name, frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _module_call(frame):
    """The innermost frame of ``nn.Module``'s call machinery at or above ``frame``: the call that runs a forward
    frame (with its decorators' wrappers between them). An owner's forward is recognised by this frame, the one its
    :class:`OwnerForward` ran in, whatever its first parameter is called and without reading its locals; a
    ``super().forward(x)`` or ``self.block.forward(x)`` inside it belongs to the same call."""
    while frame is not None and frame.f_code is not CALL_IMPL:
        frame = frame.f_back
    return frame


def _forward(name: str, filename: str) -> bool:
    """A user's ``forward`` frame, or the rest of one that torch.compile resumes after a graph break."""
    return (name == "forward" or name.startswith(_RESUMED)) and is_caller(filename)


_RESUMED = RESUME_PREFIX + "forward"


def _check_calls(path: str, module: nn.Module, mode: _OwnerMode) -> None:
    limit = _limit(mode.owner, module)
    if mode.call >= limit:
        raise SiteMismatchError(
            f"{path or 'the model'} ({type(module).__name__}) was called {mode.call + 1} times in this "
            f"{'training' if module.training else 'eval'} forward, but the "
            f"{'training' if module.training and mode.owner.train_calls is not None else 'eval-mode'} graph has "
            f"{limit}: its equalizers cannot tell which call is which (a path only taken in this mode or at this "
            f"size, or a shared module in gradient checkpointing). Equalize the model as you run it.")


def _check_met(path: str, module: nn.Module, mode: _OwnerMode) -> None:
    for key, targets in mode.owner.sites.items():
        if key.call != mode.call:
            continue
        for name in targets.values():
            if name not in mode.met:
                site = mode.reg[name].site
                seen = {s: n for (op, s), n in mode.seen.items() if op == key.op}
                raise SiteMismatchError(
                    f"site {site.name} ({site.where}, {key.op} #{key.occurrence} from that line) was not met in "
                    f"this forward of {path or 'the model'}; calls seen from the site lines: {seen or 'none'}. "
                    + ("Its call ran inside torch.utils.checkpoint of a method (checkpoint(self.body, x) in "
                       "forward): the recomputation in backward runs outside any module call, where no equalizer "
                       "can act, so it would give other gradients. Checkpoint a submodule instead (as transformers "
                       "and timm do), or se_surgery.fold the model first." if mode.checkpointed else
                       "The model's source cannot be read here, so no call can be placed: install it with its .py "
                       "files. " if not _readable(module) else
                       "The forward takes another path at this input size than at the example size; equalize at the "
                       "size you run at. (A call the forward hands to another thread, a pool inside the forward, is "
                       "not seen either: make it on the thread that calls the model.)"))


def _in_checkpoint() -> bool:
    """Whether the running call comes through torch.utils.checkpoint (eager frames)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def _readable(module: nn.Module) -> bool:
    import inspect

    try:
        return bool(inspect.getsource(type(module).forward))
    except (OSError, TypeError):
        return False
# ----------------------------------------------------------------------------------------------------------------
# The modules an owner's forward calls: their hook pair pauses the owner's mode for their call.


def _enter_callee(module: nn.Module, _args) -> None:
    """Pre-hook of the modules an owner's forward calls: pause the owner's mode. Outside any equalized model's
    forward, first check that the call does not come from an owner's forward called directly."""
    if not _local.forwards and not torch.compiler.is_compiling():
        _check_direct_forward()
    _local.paused.setdefault(id(module), []).append(_pause())


def _check_direct_forward() -> None:
    """A :class:`~se_surgery.SiteMismatchError` where the forward calling this module is an owner's class
    ``forward`` called on the owner unbound (``Cls.forward(owner, x)``, which skips the owner's instance forward):
    its equalizers would not act. (Only outside any equalized model's forward: its first argument is read then.)"""
    frame = _forward_frame()
    if frame is None or not frame.f_code.co_varnames:
        return
    owner = frame.f_locals.get(frame.f_code.co_varnames[0])
    if isinstance(owner, nn.Module) and owner_forward(owner) is not None and not any(o is owner for o in _local.owners):
        raise SiteMismatchError(
            f"{type(owner).__name__}.forward was called on an equalized owner without its instance forward "
            f"({type(owner).__name__}.forward(module, x)), so the scale equalizers of its sites would not act. Call "
            f"the module itself (module(x)) or module.forward(x), as training and serving frameworks do.")


def _leave_callee(module: nn.Module, _args, _out) -> None:
    """Put back the owner mode this call paused."""
    stack = _local.paused.get(id(module))
    if not stack:
        return
    paused = stack.pop()
    if not stack:
        del _local.paused[id(module)]
    if paused is not None:
        push_function_mode(paused)


def _leave_model(module: nn.Module, _args, out) -> None:
    if _local.frames:
        _local.frames.pop()
    forward = _local.forwards.pop() if _local.forwards else None
    if out is not None and not _local.forwards and not torch.compiler.is_compiling():
        _check_clean()
    if forward is None or out is None or _local.bypass or (_local.forwards and _local.forwards[-1] is forward):
        return  # not equalized, raised (that error is the one to see), captured, or inside a recursion
    if any(path not in forward.calls for path in forward.reg.owners) or _moved(module, forward):
        check_attached(module)  # an owner not called (replaced?), or a module answering to another's path


def _check_clean() -> None:
    """The invariant after the outermost forward on a thread: no callee call is left paused and no owner mode is on the
    torch function stack (a leftover would dispatch the user's later calls as if inside an owner)."""
    if _local.paused or function_stack_depth() and any(isinstance(m, _OwnerMode) for m in function_modes()):
        _local.paused.clear()
        _pop_owner_modes()
        raise SiteMismatchError(
            "se_surgery: a forward left owner calls unfinished on this thread (a hook that returned without its "
            "pair, or a module called across threads); the state was reset. Please report this with the model.")


def _moved(model: nn.Module, forward: _Forward) -> bool:
    """Whether a module that ran as an owner no longer sits at that owner's path (two owners swapped, an owner
    moved): its equalizers were measured at another place. A copy of it inside a wrapper at the path (peft
    ``modules_to_save``) is at its place."""
    if torch.compiler.is_compiling():
        return False
    for path, module in forward.modules.items():
        found = _submodule(model, path)
        if found is not module and (found is None or not any(m is module for m in found.modules())):
            return True
    return False


def _drop_stale(frame) -> None:
    """Forget what forwards interrupted by a ``BaseException`` left on this thread. torch runs the always-call
    hooks that clean up for an ``Exception`` only, so a ``KeyboardInterrupt`` (Ctrl-C) or ``SystemExit`` inside a
    forward leaves its record, its callees' paused modes and its mode on the torch function stack. A record whose module
    call frame is no longer on this thread's stack is such a leftover; when none is left running, neither is
    any callee call it paused, and the owner modes it left on the stack go too. ``frame``: the new call's frame."""
    live, f = set(), frame
    while f is not None:
        live.add(id(f))
        f = f.f_back
    running = [i for i, f in enumerate(_local.frames) if f is None or id(f) in live]
    if running and running[-1] != len(_local.frames) - 1:  # (stale records sit above the running ones)
        del _local.frames[running[-1] + 1:], _local.forwards[running[-1] + 1:]
    elif not running:
        _local.frames.clear()
        _local.forwards.clear()
        if _local.owners:
            return  # an owner running on its own (called outside a model forward) that calls a model: not stale
        _local.paused.clear()
        _local.handling = 0
        _pop_owner_modes()


def _pop_owner_modes() -> None:
    """Take the owner modes off the top of this thread's torch function stack."""
    while function_stack_depth() and isinstance(function_mode_at(function_stack_depth() - 1), _OwnerMode):
        pop_function_mode()


# ----------------------------------------------------------------------------------------------------------------
# What installation asks: which owners carry their instance forward.


def owner_forward(module: nn.Module, path: str | None = None) -> OwnerForward | None:
    """The module's :class:`OwnerForward` (for ``path``, if given), or None."""
    found = module.__dict__.get("forward")
    return found if isinstance(found, OwnerForward) and (path is None or found.path == path) else None


def replaced_owners(model: nn.Module) -> list[str]:
    """Paths of owners whose module no longer carries the equalizer hooks: replaced (``model.decoder = ...``) or
    gone, so their equalizers would not act. A wrapper around a hooked copy (peft ``modules_to_save``) is not."""
    reg = registry(model)
    found = []
    for path in reg.owners if reg is not None else ():
        module = _submodule(model, path)
        if module is None or not any(_hooked(m, path) for m in module.modules()):
            found.append(path)
    return found


def _hooked(module: nn.Module, path: str) -> bool:
    return owner_forward(module, path) is not None


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def check_attached(model: nn.Module) -> None:
    """A :class:`~se_surgery.SiteMismatchError` where an owner module was replaced: its equalizers do not act."""
    replaced = replaced_owners(model)
    if not replaced:
        return
    reg = registry(model)
    names = [name for path in replaced for targets in reg.owners[path].sites.values() for name in targets.values()]
    raise SiteMismatchError(
        f"{', '.join(p or 'the model' for p in replaced)} of {type(model).__name__} is not the module its equalizers "
        f"were attached to (it was replaced, e.g. model.decoder = ...), so {len(names)} equalizer(s) ({names[0]}"
        f"{', ...' if len(names) > 1 else ''}) would not act. Call se_surgery.calibrate(model, data) to equalize the "
        f"new module (its equalizers are attached to it and measured again), or se_surgery.equalize the plain model.")
