"""The records the graph pass produces and everything downstream reads: where an equalizer goes (``Site``) and the
conv that can absorb it (``Consumer``)."""

from __future__ import annotations

import ast
import functools
import linecache
import os
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Consumer:
    """The first conv/linear a site's branch meets: where its scale (and maybe shift) can be absorbed."""

    weight: str                 # state_dict key of the consumer's weight
    bias: str | None            # state_dict key of its bias, if any
    batchnorm_mean: str | None  # running_mean of a BatchNorm right after it (absorbs a shift when there is no bias)
    channels: tuple[int, int]   # the slice of the consumer's input channels this branch feeds
    zero_padded: bool           # zero padding makes the shift inexact at the borders
    path: str                   # the ops between the site and the consumer, for messages
    shared: bool = False        # its weight serves other calls too (one conv module applied to several branches)
    grouped: bool = False       # a grouped conv: its weight slices are not per input channel, nothing is absorbed


class CallKey(NamedTuple):
    """What a call *is*, as the run time sees it: which call of its owner module, which op kind ("resize" or
    "fusion"), the source line it comes from, and which of the calls from that line (a loop makes several)."""

    call: int
    op: str
    source: str
    occurrence: int


def module_key(site_name: str) -> str:
    """A site's key in ``model.scale_equalizers`` (ModuleDict keys cannot hold dots), from its name."""
    return site_name.replace(".", "_")


@dataclass(frozen=True)
class Site:
    """One place that gets a ScaleEqualizer, as found in the graph."""

    owner: str                  # path of the innermost module whose forward makes the call ("" = the model)
    call: int                   # which call of that module in one forward (shared modules are called twice)
    owner_calls: int            # how many times the graph calls that module in one forward
    index: int                  # the resize (kind "upsample") or fusion op (kind "branch") number in that call
    kind: str                   # "upsample" (the paper's placement) or "branch" (another input of the fusion)
    arg: int                    # for "branch": which input of the fusion op
    fusion: str                 # "cat", "stack", "add" or "sub"
    shape: tuple[int, ...]      # the equalized tensor's shape on the example inputs
    in_size: tuple[int, ...] | None  # for "upsample": the spatial size before the resize
    mode: str | None            # for "upsample": "linear", "bilinear", "bicubic" or "trilinear"
    align_corners: bool | None
    level: int                  # 0 unless other sites lie upstream; calibration goes level by level
    consumer: Consumer | None
    source: str                 # the call's line in the owner's forward, as ``source_key`` gives it
    occurrence: int             # which of the owner's calls (of this op kind) from that source line
    line_calls: int             # how many such calls the graph makes from that line in one call of the owner
    upstream: frozenset[str] = field(default_factory=frozenset)
    joins: str = ""             # the fusion this branch enters first, as ``owner.callN_fusionK`` (for reports)
    weights: frozenset[str] = field(default_factory=frozenset)  # state_dict keys the equalized tensor depends on
    place: str = "final"        # that fusion's place: "chained" where its output reaches another fusion that takes
                                # an equalized branch (a top-down path), "final" where it reaches none

    @property
    def key(self) -> str:
        """Which of its owner module's calls this is, e.g. ``call0_resize2`` (a name, stable across sizes)."""
        if self.kind == "upsample":
            return f"call{self.call}_resize{self.index}"
        return f"call{self.call}_fusion{self.index}_input{self.arg}"

    @property
    def name(self) -> str:
        """Owner path and key, e.g. ``decoder.psp.call0_resize2``; ``model`` when the model's own forward calls."""
        return f"{self.owner or 'model'}.{self.key}"

    @property
    def module_name(self) -> str:
        """The equalizer's key in ``model.scale_equalizers`` (ModuleDict keys cannot hold dots)."""
        return module_key(self.name)

    @property
    def call_key(self) -> CallKey:
        """The run-time identity of the call this site equalizes (see :class:`CallKey`)."""
        return CallKey(self.call, "resize" if self.kind == "upsample" else "fusion", self.source, self.occurrence)

    @property
    def where(self) -> str:
        """The source line for messages: ``Class.forward+3`` (three lines into that function)."""
        return self.source or "no source line"

    @property
    def factor(self) -> float | None:
        if self.in_size is None:
            return None
        return self.shape[-1] / self.in_size[-1]


def _library_files() -> frozenset[str]:
    from .torch_internals import torch_wrapper_files

    return frozenset(os.path.normcase(os.path.abspath(f)) for f in torch_wrapper_files())


_PACKAGE = os.path.normcase(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY: frozenset[str] | None = None


def source_key_in_trace(stack_trace: str) -> str:
    """The :func:`source_key` of the innermost user ``forward`` frame in a formatted stack trace (torch.export's
    ``stack_trace`` node meta, torch.onnx's ``pkg.torch.onnx.stack_trace``); ``""`` when there is none. A helper
    method's calls count as the line in ``forward`` that calls it: torch.export may record ``forward`` frames only."""
    for line in reversed([t.strip() for t in stack_trace.splitlines() if t.strip().startswith("File ")]):
        try:  # 'File "/x/y.py", line 12, in forward'
            path, lineno = line.split('"')[1], int(line.split("line ")[1].split(",")[0])
        except (IndexError, ValueError):
            continue
        if line.endswith(" in forward") and is_caller(path):
            return source_key(path, lineno)
    return ""


def own_forwards(module: object) -> set[str]:
    """Qualified names of the ``forward`` functions a module's own calls run: its class's and its base classes'
    (reached through ``super().forward``); a site's source function must be one of them."""
    return {getattr(vars(c)["forward"], "__qualname__", "") for c in type(module).__mro__ if "forward" in vars(c)}


@functools.lru_cache(maxsize=8192)
def source_key(filename: str, lineno: int) -> str:
    """A call's source line as ``Qualified.function+offset`` (the line's offset from the function's first line),
    so that the key survives moving the code to another path or machine: no file path is in it.

    The source comes from ``linecache`` (files, notebooks' cells, anything registered there). Where there is none,
    ``file:line`` with the file's base name (``<stdin>:8``); code from ``python -c`` or ``exec`` (``<string>``)
    gives ``""``: torch.export records no frames for it either, so its sites are told apart by order alone."""
    if filename == "<string>":
        return ""
    spans = _functions(filename)
    inner = min((s for s in spans if s[0] <= lineno <= s[1]), key=lambda s: s[1] - s[0], default=None)
    if inner is None:
        return f"{os.path.basename(filename)}:{lineno}"
    return f"{inner[2]}+{lineno - inner[0]}"


@functools.lru_cache(maxsize=512)
def _functions(filename: str) -> tuple[tuple[int, int, str], ...]:
    """(first line, last line, qualified name) of every function in a source file, as Python numbers them
    (``co_firstlineno`` is the first decorator's line)."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError, RecursionError):
        return ()
    spans = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    spans.append((first, child.end_lineno or child.lineno, name))
                    visit(child, name + ".<locals>.")
                else:
                    visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return tuple(spans)


@functools.lru_cache(maxsize=4096)
def is_caller(filename: str) -> bool:
    """Whether a frame of this file can be the caller that a site's source line names: not torch's function
    wrappers (``F.interpolate``, ``__torch_function__`` dispatch, ``Tensor`` operators) nor se_surgery itself."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = _library_files()
    path = os.path.normcase(os.path.abspath(filename))
    return path not in _LIBRARY and os.path.dirname(path) != _PACKAGE
