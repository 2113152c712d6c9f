"""An owner's ``forward`` bound to the runtime's site finder: the class's own ``forward`` function run with a copy of
its globals in which ``F.interpolate`` (reached as ``F.interpolate``, ``nn.functional.interpolate``,
``torch.nn.functional.interpolate``, an imported ``interpolate`` under any alias, or the deprecated ``F.upsample*``)
is a function the runtime gives; the other names its code reads are copied again from their modules at each call.
(Copies, not a mapping that reads through: torch.compile, which runs such a function after a graph break, reads and
writes a frame's globals as a plain dict.) The owner's other calls then run at full speed: no ``TorchFunctionMode`` sees
them (docs/performance.md measures what the mode costs).

Only where that reaches every site call: :func:`binds` checks the forward's code (every site a resize from the
class's own ``forward``; no helper method, ``super()``, Python function of its own module or direct ATen resize
on the way; no ``interpolate`` captured in a default or closure). Anything it cannot see is caught when the
equalizers are verified on the example, which then falls back to the mode.
"""

from __future__ import annotations

import dis
import inspect
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .state import OwnerSites

# Names whose call reaches a resize without F.interpolate: the ATen functions (``F.upsample*``, deprecated wrappers
# of F.interpolate, are bound as well).
_OTHER_RESIZES = {"ops", "_nn", "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
                  "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"}
_WRAPPERS = ("upsample", "upsample_bilinear", "upsample_nearest")
# (class forward, interpolate) -> (the bound function, the names to refresh per call), made once per owner class
_BOUND: dict[tuple[Callable, Callable], tuple[Callable, tuple]] = {}


def binds(module: nn.Module, owner: OwnerSites) -> bool:
    """Whether the owner's calls can run bound (see the module's docstring)."""
    function = type(module).forward
    if not isinstance(function, types.FunctionType) or not owner.sites:
        return False
    if any(key.op != "resize" or key.source.rpartition("+")[0] != function.__qualname__ for key in owner.sites):
        return False
    names = _names(function.__code__)
    if "super" in names or names & _OTHER_RESIZES:
        return False
    for name in names:
        value = function.__globals__.get(name)
        if isinstance(value, types.FunctionType) and value is not F.interpolate and \
                not value.__module__.startswith("torch"):
            return False  # a function of the model's own code: it may resize with its own globals
        attribute = inspect.getattr_static(type(module), name, None)
        if isinstance(attribute, (types.FunctionType, staticmethod, classmethod, property)) and \
                inspect.getattr_static(nn.Module, name, None) is not attribute:
            return False  # a helper method of the class
    captured = [*(function.__defaults__ or ()), *(function.__kwdefaults__ or {}).values(),
                *(cell.cell_contents for cell in function.__closure__ or ())]
    return not any(value is F.interpolate or value is F for value in captured)


def bound(function: Callable, interpolate: Callable) -> Callable:
    """``function`` with ``interpolate`` for ``F.interpolate`` in its globals (made once per function; the names its
    code reads are refreshed from their modules at each call, so a global set or a torch function patched after the
    first call is seen as the plain class sees it)."""
    found = _BOUND.get((function, interpolate))
    if found is None:
        wrappers = {name: _with(getattr(F, name), {id(F.interpolate): interpolate}) for name in _WRAPPERS}
        functional = _module_like(F, interpolate=interpolate, **wrappers)
        torch_nn = _module_like(nn, functional=functional)
        torch_like = _module_like(torch, nn=torch_nn)
        made = _with(function, {id(F): functional, id(nn): torch_nn, id(torch): torch_like,
                                id(F.interpolate): interpolate,
                                **{id(getattr(F, name)): wrappers[name] for name in _WRAPPERS}})
        read = _names(function.__code__)
        ours = {k for k, v in made.__globals__.items() if v is not function.__globals__.get(k)}
        found = _BOUND[(function, interpolate)] = made, tuple(  # (the names the code reads that the source holds)
            (copy, source, tuple(sorted(names - replaced))) for copy, source, names, replaced in (
                (made.__globals__, function.__globals__, _names(function.__code__, globals_only=True), ours),
                (vars(functional), vars(F), read & vars(F).keys(), {"interpolate", *_WRAPPERS}),
                (vars(torch_nn), vars(nn), read & vars(nn).keys(), {"functional"}),
                (vars(torch_like), vars(torch), read & vars(torch).keys(), {"nn"})))
    made, refresh = found
    for copy, source, names in refresh:
        for name in names:
            value = source.get(name, _ABSENT)
            if value is _ABSENT:
                copy.pop(name, None)
            else:
                copy[name] = value
    return made


_ABSENT = object()


def _names(code: types.CodeType, globals_only: bool = False) -> set[str]:
    """The global and attribute names a function's code reads (only those it reads or writes as globals, with
    ``globals_only``), its nested functions' included."""
    names, codes = set(), [code]
    while codes:
        code = codes.pop()
        if globals_only:
            names.update(i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_OPS)
        else:
            names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


_GLOBAL_OPS = {"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"}


def _with(function: types.FunctionType, replaced: dict[int, object]) -> types.FunctionType:
    """``function`` with a copy of its globals in which each value whose id is a key of ``replaced`` is replaced."""
    names = {k: replaced.get(id(v), v) for k, v in function.__globals__.items()}
    made = types.FunctionType(function.__code__, names, function.__name__, function.__defaults__,
                              function.__closure__)
    made.__kwdefaults__ = function.__kwdefaults__
    made.__qualname__ = function.__qualname__
    return made


def _module_like(module: types.ModuleType, **replaced) -> types.ModuleType:
    """A module object with ``module``'s names (its lazy ``__getattr__`` too) and ``replaced`` instead."""
    made = types.ModuleType(module.__name__, module.__doc__)
    made.__dict__.update(vars(module))
    made.__dict__.update(replaced)
    return made
