"""Runtime: how the equalizers act inside the user's own eager model, and how a call is recognised as a site.

A site's resize usually sits in the middle of some module's forward (``F.interpolate`` in a decoder head), where no
module hook reaches, and rewriting the forward would lose the user's class. So each *owner* module gets a forward
pre-hook that enters a ``TorchFunctionMode`` for the duration of its forward, and a post-hook that leaves it. The
mode recognises a call by what it is (:class:`~se_surgery.site.CallKey`): the owner's call number, the op kind,
the source line in the owner's forward that made it, and which of that line's calls it is (a loop makes several).
Input size, graph breaks, ``no_grad`` regions and extra calls elsewhere do not change that identity. What cannot be
matched raises :class:`~se_surgery.SiteMismatchError` naming the cause: an equalizer never acts on another tensor.

The mode dispatches only the owner's own calls: an owner's sites are calls its own code makes (the graph names the
innermost module as the owner), so the modules it calls (convs, norms, blocks) get hooks that take the mode off the
stack for their call. An owner that is an ``nn.Upsample`` needs no mode at all: its call is the site, and its hooks
equalize its input or output directly. An upsampling's equalizer acts on the resize's input in eager runs, the same
map at 1/factor^d of the work (:attr:`~se_surgery.equalizer.ScaleEqualizer.before_resize`). So the run-time cost is
that arithmetic plus a few Python calls per owner and callee call.

What one call needs (which call of an owner this is, the active modes) lives with the thread that makes it, never
on the model, so any number of threads can run one model. The hooks hold no reference to the model's state: they
find it through the model forward running on their thread (the model's own pre-hook announces it), so a copied
owner put back into the model (peft ``modules_to_save``, a deep-copied submodule) uses the model's equalizers.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn
from torch._guards import TracingContext
from torch.overrides import TorchFunctionMode

from .equalizer import ScaleEqualizer
from .errors import SiteMismatchError, UsageError
from .ops import FUSION_FUNCS, INPLACE_FUNCS, RESIZE_FUNCS, align_corners, branch_inputs, resize_mode
from .site import Site, is_caller, source_key
from .state import EqualizerRegistry, OwnerSites, fx_error, registry


class _Forward:
    """One forward of an equalized model on one thread: its registry, how often each owner was called, and the
    module that answered to each owner's path."""

    __slots__ = ("reg", "calls", "modules")

    def __init__(self, reg: EqualizerRegistry) -> None:
        self.reg = reg
        self.calls: dict[str, int] = defaultdict(int)
        self.modules: dict[str, nn.Module] = {}


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.forwards: list[_Forward] = []          # equalized models whose forward runs here, innermost last
        self.frames: list = []                      # the module-call frame of each (None: traced), to find stale ones
        self.entered: dict[int, list[_Entered]] = {}  # id(hooked module) -> its running calls (recursion: a stack)
        self.handling = 0                           # >0 while one of our modes handles a call: others pass it on
        self.bypass = 0                             # >0: equalizers pass their input through (capturing)


_local = _PerThread()
# Owner module -> the registry of the model it was last called in (or attached to): for calls from outside a model
# forward, such as gradient checkpointing's recomputation during backward. Kept here, not on the user's modules.
_homes: weakref.WeakKeyDictionary[nn.Module, EqualizerRegistry] = weakref.WeakKeyDictionary()


@torch._dynamo.assume_constant_result
def traced_source_key() -> str | None:
    """:func:`~se_surgery.site.source_key` of the innermost ``forward`` on the way to the torch function being
    handled while torch.compile traces, from the frames it is tracing (a constant of the traced code); None where
    no frames are traced (eagerly, and in torch.export's non-strict mode): the runtime reads the same from the
    Python frames then (:func:`_forward_frame`)."""
    frames = TracingContext.extract_stack()
    if not len(frames):
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
    frame (with its decorators' wrappers between them), or that runs a pre-hook. An owner's forward is recognised by
    this frame, the one its pre-hook ran in, whatever its first parameter is called and without reading its locals;
    a ``super().forward(x)`` or ``self.block.forward(x)`` inside it belongs to the same call."""
    while frame is not None and frame.f_code is not _CALL_IMPL:
        frame = frame.f_back
    return frame


_CALL_IMPL = nn.Module._call_impl.__code__


def _forward(name: str, filename: str) -> bool:
    """A user's ``forward`` frame, or the rest of one that torch.compile resumes after a graph break."""
    return (name == "forward" or name.startswith("torch_dynamo_resume_in_forward")) and is_caller(filename)


def equalizers(model: nn.Module) -> list[ScaleEqualizer]:
    """The model's equalizers, in the order the graph pass found them.

    Args:
        model: a model returned by :func:`se_surgery.equalize` (any other model gives ``[]``).
    """
    found = registry(model)
    return list(found.values()) if found is not None else []


class bypassed:
    """Inside the block, equalizers on this thread pass their input through (to capture an equalized model)."""

    def __enter__(self) -> None:
        _local.bypass += 1

    def __exit__(self, *exc) -> None:
        _local.bypass -= 1


class _OwnerMode(TorchFunctionMode):
    """Active during one call of an owner's forward: recognises the site calls and routes them through the
    equalizers; records which it met."""

    def __init__(self, forward: _Forward, owner: OwnerSites, call: int, caller) -> None:
        super().__init__()
        self.forward, self.reg, self.owner, self.call = forward, forward.reg, owner, call
        self.caller = caller  # the frame of nn.Module's call machinery that runs this owner call (eager; else None)
        self.funcs = _FUNCS[owner.ops]  # the torch functions that can be this owner's sites, and their op kind
        self.seen: dict[tuple[str, str], int] = defaultdict(int)
        self.met: list[str] = []
        self.checkpointed = False  # a resize ran inside torch.utils.checkpoint from a line without sites
        self.made = 0              # torch calls the owner's own code made (0 and its input returned: a no-op call)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.made += 1
        op = self.funcs.get(func)
        kwargs = kwargs or {}
        # (handling: a call made while one of our modes handles another: its own ops, a nested owner's)
        if op is None or _local.handling or op == "resize" and resize_mode(func, args, kwargs) is None:
            return func(*args, **kwargs)
        _local.handling += 1
        try:
            return self._handle(op, func, args, kwargs)
        finally:
            _local.handling -= 1

    def _handle(self, op: str, func, args, kwargs):
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
            _check_resize(equalizer.site, resize_mode(func, args, kwargs), align_corners(func, args, kwargs), x)
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


# ----------------------------------------------------------------------------------------------------------------
# Hooks. They hold only names (so they pickle, deep-copy and survive being copied with a submodule).


def _enter_model(module: nn.Module, _args) -> None:
    frame = None if torch.compiler.is_dynamo_compiling() else _module_call(sys._getframe(1))
    if frame is not None and (_local.forwards or _local.entered):
        _drop_stale(frame)
    _local.frames.append(frame)
    reg = registry(module)
    top = _local.forwards[-1] if _local.forwards else None
    if reg is not None and top is not None and top.reg is reg:  # the model calls itself (recursion): one forward
        _local.forwards.append(top)
    else:
        _local.forwards.append(_Forward(reg) if reg is not None else None)


def _leave_model(module: nn.Module, _args, out) -> None:
    if _local.frames:
        _local.frames.pop()
    forward = _local.forwards.pop() if _local.forwards else None
    if forward is None or out is None or _local.bypass or (_local.forwards and _local.forwards[-1] is forward):
        return  # not equalized, raised (that error is the one to see), captured, or inside a recursion
    if any(path not in forward.calls for path in forward.reg.owners) or _moved(module, forward):
        check_attached(module)  # an owner not called (replaced?), or a module answering to another's path


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
    forward leaves its record, its entered calls and its mode on the torch function stack. A record whose module
    call frame is no longer on this thread's stack is such a leftover; when none is left running, neither is
    anything it entered, and the owner modes it left on the stack go too. ``frame``: the new call's frame."""
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
        if any(e.mode is not None and id(e.mode.caller) in live for es in _local.entered.values() for e in es):
            return  # an owner running on its own (called outside a model forward) that calls a model: not stale
        _local.entered.clear()
        _local.handling = 0
        while torch._C._len_torch_function_stack() and isinstance(
                torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1), _OwnerMode):
            torch._C._pop_torch_function_stack()


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
    return any(isinstance(h, functools.partial) and h.func is _enter_owner and h.args == (path,)
               for h in module._forward_pre_hooks.values())


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


def reattach(model: nn.Module) -> list[ScaleEqualizer]:
    """Hook the replacing modules of :func:`replaced_owners` and mark their equalizers uncalibrated (the new module
    has other statistics); returns those equalizers. An owner whose path is gone is a UsageError."""
    reg = registry(model)
    renewed = []
    for path in replaced_owners(model):
        module = _submodule(model, path)
        if module is None:
            raise UsageError(f"{path} held equalizer sites of {type(model).__name__} but the model has no such module "
                             f"any more: se_surgery.equalize the plain model again.")
        sources = {key.source.rpartition("+")[0] for key in reg.owners[path].sites} - {""}
        own = {getattr(vars(c)["forward"], "__qualname__", "") for c in type(module).__mro__ if "forward" in vars(c)}
        if sources - own:
            raise UsageError(f"{path or 'the model'} is now a {type(module).__name__}, but its equalizer sites were "
                             f"found in {', '.join(sorted(sources))}: the new module makes other calls. Equalize the "
                             f"model with the new module afresh (se_surgery.equalize on a model without equalizers), "
                             f"or put back a module of the class the sites were found in.")
        _remove_hooks(module)
        _hook_owner(module, path, reg)
        _sync_callees(model)
        for targets in reg.owners[path].sites.values():
            for name in targets.values():
                reg[name].reset()
                renewed.append(reg[name])
    return renewed


class _Entered(NamedTuple):
    """One running call of a hooked module on this thread: the owner mode it entered (or the module resize whose
    output it equalizes) and the owner mode it paused."""

    mode: _OwnerMode | None
    resize: tuple[ScaleEqualizer, torch.Tensor] | None
    paused: _OwnerMode | None


def _pause() -> _OwnerMode | None:
    """Take the owner mode on top of this thread's mode stack off it for the duration of a module call made inside
    the owner's forward. An owner's sites are calls its own code makes, never a callee's (the graph names the
    innermost module as the owner), so nothing inside a callee needs the mode's dispatch. Not while compiling
    (torch.compile traces the mode; compiled code pays no dispatch), nor under another mode (the user's)."""
    depth = torch._C._len_torch_function_stack()
    if not depth or torch.compiler.is_compiling():
        return None
    top = torch._C._get_function_stack_at(depth - 1)
    if not isinstance(top, _OwnerMode):
        return None
    torch._C._pop_torch_function_stack()
    return top


def _push(module: nn.Module, entered: _Entered) -> None:
    _local.entered.setdefault(id(module), []).append(entered)


def _pop(module: nn.Module) -> _Entered | None:
    stack = _local.entered.get(id(module))
    if not stack:
        return None
    entered = stack.pop()
    if not stack:
        del _local.entered[id(module)]
    return entered


def _enter_callee(module: nn.Module, _args) -> None:
    """Pre-hook of the modules an owner's forward calls: pause the owner's mode. Outside any equalized model's
    forward, first check that the call does not come from an owner's forward called directly."""
    if not _local.forwards and not torch.compiler.is_compiling():
        _check_direct_forward()
    _push(module, _Entered(None, None, _pause()))


def _check_direct_forward() -> None:
    """A :class:`~se_surgery.SiteMismatchError` where the forward calling this module is an owner's ``forward``
    called directly (``model.forward(x)``, which runs no module hooks): its equalizers would not act."""
    frame = _forward_frame()
    if frame is None:
        return
    owners = [m for m in list(_homes.keys()) if any(vars(c).get("forward") is not None and
                                                  getattr(vars(c)["forward"], "__code__", None) is frame.f_code
                                                  for c in type(m).__mro__)]
    if owners and not any(id(m) in _local.entered for m in owners):
        raise SiteMismatchError(
            f"{type(owners[0]).__name__}.forward was called directly (module.forward(x)), which runs no module "
            f"hooks, so the scale equalizers of its sites would not act. Call the module itself (module(x)), as "
            f"training and serving frameworks do.")


def _leave_callee(module: nn.Module, _args, _out) -> None:
    entered = _pop(module)
    if entered is not None:
        _resume(entered)


def _resume(entered: _Entered) -> None:
    """Put back the owner mode this call paused."""
    if entered.paused is not None:
        torch._C._push_on_torch_function_stack(entered.paused)


def _enter_owner(path: str, module: nn.Module, args):
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        raise fx_error()
    forward = _local.forwards[-1] if _local.forwards else None
    if forward is None:  # called on its own: gradient checkpointing's recomputation, or user code
        reg = _homes.get(module)
        if reg is None:
            raise SiteMismatchError(
                f"{path or 'the model'} ({type(module).__name__}) holds equalizer sites but was called outside the "
                f"forward of the equalized model that holds them, so its equalizers cannot be found. Call the "
                f"whole model, or se_surgery.fold it first.")
        forward = _Forward(reg)
        if path in reg.owners and reg.owners[path].shared:
            raise SiteMismatchError(
                f"{path} ({type(module).__name__}) is called {reg.owners[path].calls} times per forward, and this "
                f"call comes from outside the model's forward (gradient checkpointing's recomputation, or user "
                f"code): its equalizers cannot tell which of its calls this is. Checkpoint a module that is called "
                f"once, or call the whole model.")
    elif not torch.compiler.is_compiling() and _homes.get(module) is not forward.reg:
        _homes[module] = forward.reg
    owner = forward.reg.owners.get(path)
    if owner is None:  # the registry no longer lists it (folded away): act as the plain module
        return _enter_callee(module, args)
    call = forward.calls[path]
    forward.calls[path] = call + 1
    forward.modules[path] = module
    if owner.calls <= call < _limit(owner, module):  # extra training calls: plain
        return _enter_callee(module, args)
    if call < owner.calls and _module_resize(module, args):
        return _enter_resize(forward.reg, owner, call, module, args)
    # (a call beyond the graph's runs in a mode with no sites, and is checked when it returns: the graph does not
    # count a call that makes no tensor operation, such as a recursion's base case returning its input)
    caller = None if torch.compiler.is_dynamo_compiling() else _module_call(sys._getframe(1))  # (no frames)
    mode = _OwnerMode(forward, owner, call, caller)
    _push(module, _Entered(mode, None, _pause()))
    mode.__enter__()
    return None


def _limit(owner: OwnerSites, module: nn.Module) -> int:
    """How many calls of the owner one forward may make in the module's mode."""
    return owner.calls if not module.training or owner.train_calls is None else owner.train_calls


def _check_calls(path: str, module: nn.Module, mode: _OwnerMode) -> None:
    limit = _limit(mode.owner, module)
    if mode.call >= limit:
        raise SiteMismatchError(
            f"{path or 'the model'} ({type(module).__name__}) was called {mode.call + 1} times in this "
            f"{'training' if module.training else 'eval'} forward, but the "
            f"{'training' if module.training and mode.owner.train_calls is not None else 'eval-mode'} graph has "
            f"{limit}: its equalizers cannot tell which call is which (a path only taken in this mode or at this "
            f"size, or a shared module in gradient checkpointing). Equalize the model as you run it.")


def _module_resize(module: nn.Module, args) -> bool:
    """An ``nn.Upsample`` (or a subclass keeping its forward): its call is its site, no mode needed."""
    return type(module).forward is _UPSAMPLE_FORWARD and len(args) == 1 and isinstance(args[0], torch.Tensor) and \
        not torch.compiler.is_compiling()


_UPSAMPLE_FORWARD = nn.Upsample.forward


def _enter_resize(reg: EqualizerRegistry, owner: OwnerSites, call: int, module: nn.Module, args):
    targets = next((t for key, t in owner.sites.items() if key.call == call), None)
    if targets is None or _local.bypass:
        return _enter_callee(module, args)
    (name,) = targets.values()
    equalizer, x = reg[name], args[0]
    _check_resize(equalizer.site, module.mode, bool(module.align_corners), x)
    before = equalizer.before_resize and len(module._forward_pre_hooks) == 1  # (another pre-hook sees the raw input)
    paused = _pause()
    if not before or paused is not None:  # (else nothing for the post-hook to do: an nn.Upsample calls no module)
        _push(module, _Entered(None, None if before else (equalizer, x), paused))
    return (_apply(equalizer, x),) if before else None


def _apply(equalizer: ScaleEqualizer, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    _local.handling += 1  # (an owner mode above a user's mode must not take the equalizer's own ops for sites)
    try:
        return equalizer(x, source)
    finally:
        _local.handling -= 1


def _leave_owner(path: str, module: nn.Module, args, out):
    entered = _pop(module)
    if entered is None:
        return None
    try:
        if entered.mode is not None:
            mode = entered.mode
            mode.__exit__(None, None, None)
            if out is None:  # the forward raised (always_call): that error is the one to see
                return None
            if mode.call >= mode.owner.calls and not mode.made and any(out is a for a in args):
                # beyond the graph's calls, no tensor operation, its input returned (a recursion's base case): the
                # graph cannot show such a call, so it is none of the sites' calls
                mode.forward.calls[path] -= 1
                return None
            _check_calls(path, module, mode)
            _check_met(path, module, mode)
        elif entered.resize is not None and out is not None:
            equalizer, x = entered.resize
            return _apply(equalizer, out, x)
        return None
    finally:
        _resume(entered)


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


def _ours(hook, kinds=("owner", "callee", "model")) -> bool:
    return "owner" in kinds and isinstance(hook, functools.partial) and hook.func in (_enter_owner, _leave_owner) \
        or "callee" in kinds and hook in (_enter_callee, _leave_callee) \
        or "model" in kinds and hook in (_enter_model, _leave_model)


def foreign_hooks(module: nn.Module) -> bool:
    """Whether the module has forward hooks other than se_surgery's."""
    return any(not _ours(h) for hooks in (module._forward_pre_hooks, module._forward_hooks) for h in hooks.values())


def _has_hooks(module: nn.Module, kinds: tuple[str, ...]) -> bool:
    return any(_ours(h, kinds) for h in module._forward_pre_hooks.values())


def _remove_hooks(module: nn.Module, kinds: tuple[str, ...] = ("owner", "callee", "model")) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if _ours(h, kinds)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def _callees(module: nn.Module):
    """The modules an owner's forward can call: its children, through containers that have no forward of their
    own (``ModuleList``, ``ModuleDict``); never the equalizers."""
    for child in module.children():
        if isinstance(child, EqualizerRegistry):
            continue
        if type(child).forward is nn.Module.forward:
            yield from _callees(child)
        else:
            yield child


def _sync_callees(model: nn.Module) -> None:
    """Give the modules the owners call (and only those) the hooks that pause an owner's mode during their call
    (:func:`_pause`); an owner pauses its caller's mode itself."""
    owners = [m for m in model.modules() if _has_hooks(m, ("owner",))]
    wanted = {id(c) for o in owners for c in _callees(o) if not _has_hooks(c, ("owner",))}
    for module in model.modules():
        hooked = _has_hooks(module, ("callee",))
        if hooked and id(module) not in wanted:
            _remove_hooks(module, ("callee",))
        elif not hooked and id(module) in wanted:
            module.register_forward_pre_hook(_enter_callee)
            module.register_forward_hook(_leave_callee, always_call=True)


def attach(model: nn.Module, sites: list[Site], per_channel: bool = False,
           train_calls: dict[str, int] | None = None) -> list[ScaleEqualizer]:
    """Give every site an equalizer in ``model.scale_equalizers`` and hook its owner; returns the new equalizers
    (sites already equalized are skipped). ``train_calls``: owners the training-mode graph calls more often."""
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UsageError(f"se_surgery cannot add equalizers to a bare {type(model).__name__}: wrap it in an "
                         f"nn.Module whose forward calls it.")
    reg = registry(model)
    if reg is None:
        reg = EqualizerRegistry()
        model.scale_equalizers = reg
        model.register_forward_pre_hook(_enter_model, prepend=True)
        model.register_forward_hook(_leave_model, always_call=True)
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    added = []
    for site in sites:
        name = site.module_name
        if name in reg:
            continue
        owner = reg.owners.get(site.owner)
        if owner is None:
            owner = reg.owners[site.owner] = OwnerSites(site.owner, site.owner_calls,
                                                        (train_calls or {}).get(site.owner))
            _hook_owner(model.get_submodule(site.owner), site.owner, reg)
        equalizer = ScaleEqualizer(site.shape[1] if len(site.shape) > 1 else 1, per_channel, site,
                                   dtype=ref.dtype if ref is not None else None,
                                   device=ref.device if ref is not None else None)
        reg[name] = equalizer
        owner.add(site, name)
        added.append(equalizer)
    _sync_callees(model)
    return added


def _guard_compiled_code() -> None:
    """torch.compile does not guard on submodules' hooks by default (``skip_nnmodule_hook_guards``), so code it
    compiled for a plain model of the same classes (a baseline compiled earlier in the process, or this model before
    ``equalize(inplace=True)``) would run the equalized model without its equalizers. Turn those guards on and drop
    the code compiled without them, once per process (again only if something turns them off)."""
    if torch._dynamo.config.skip_nnmodule_hook_guards:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch.compiler.reset()


def _hook_owner(module: nn.Module, path: str, reg: EqualizerRegistry) -> None:
    _guard_compiled_code()
    _homes[module] = reg
    module.register_forward_pre_hook(functools.partial(_enter_owner, path))
    # first of the forward hooks: the user's see the equalized output, as if the forward had made it
    module.register_forward_hook(functools.partial(_leave_owner, path), always_call=True, prepend=True)


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
        del reg.owners[site.owner]
        for module in model.modules():  # the owner and any copy of it (hooks name the path, not the module)
            if module is not model:
                hooks = [h for h in module._forward_pre_hooks.values() if _ours(h, ("owner",))]
                if hooks and all(h.args[0] == site.owner for h in hooks):
                    _remove_hooks(module)
    if not len(reg):
        _remove_hooks(model)
        if not keep_registry:
            del model.scale_equalizers
    _sync_callees(model)
