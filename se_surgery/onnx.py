"""ONNX: export an equalized model with its equalizers folded away, and fold equalizers in any ONNX graph.

An equalizer appears in ONNX as ``Resize -> Sub/Add(c) -> Div/Mul(k)`` (in either order, scalar or per-channel
constants). Each one is folded by the cheapest exact form (METHOD.md section 4):

1. its branch meets an unpadded ``Conv`` (directly or through a ``Concat`` on channels): scale and shift go into
   that Conv's weights and bias: no node left;
2. a zero-padded ``Conv``: the scale goes into its weights, and the shift moves in front of the ``Resize``
   (resizing commutes with adding a constant), one ``Add`` on the low-resolution map;
3. anything else (an ``Add`` fusion): the whole affine map moves in front of the ``Resize``, a ``Mul`` and an
   ``Add`` on the low-resolution map (1/factor^2 of the cost).

Every result is checked with onnxruntime against the unfolded graph (and, from :func:`export_onnx`, against
PyTorch) before it is written; a fold that cannot be confirmed is not written, and no input file is overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .capture import ExampleInputs, split_inputs
from .errors import OnnxError
from .modes import eval_mode
from .runtime import equalizers

if TYPE_CHECKING:
    from .onnx_graph import Fold


@dataclass
class FoldReport:
    """What fold_onnx / export_onnx did, and how well onnxruntime agrees."""

    folds: list[Fold] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    max_abs_error: float = 0.0       # folded vs unfolded graph (onnxruntime), relative to the output's max abs
    export_error: float | None = None  # unfolded graph (onnxruntime) vs PyTorch, from export_onnx
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)
    path: str = ""

    def __str__(self) -> str:
        if not self.folds:
            return f"{self.path}: no scale equalizer found; the graph is unchanged ({self.nodes_after} nodes)."
        lines = [f"{len(self.folds)} equalizer(s) folded into {self.path}:"]
        lines += [f"  {f.site or f.resize}: {f.form} ({f.nodes_left} node(s) left)" for f in self.folds]
        lines.append(f"nodes: {self.nodes_before} -> {self.nodes_after}")
        lines.append(f"folded vs unfolded (onnxruntime): max abs error {self.max_abs_error:.3g} relative to the "
                     f"output's max abs, on inputs {self.checked_shapes}")
        if self.export_error is not None:
            lines.append(f"unfolded ONNX vs PyTorch: {self.export_error:.3g} (relative)")
        return "\n".join(lines)


def _relative_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12)) for g, e in zip(got, expected))


def fold_onnx(source: str | os.PathLike, destination: str | os.PathLike, *, check_sizes: tuple[int, ...] = (128, 160),
              tolerance: float = 1e-5) -> FoldReport:
    """Fold the scale equalizers of an ONNX file into ``destination``, checked by onnxruntime.

    Works on graphs exported by ``torch.onnx.export`` (and others) with the equalizers present, found by pattern
    (Resize, then constant Sub/Add and Div/Mul, meeting a Concat or Add) and by the metadata se_surgery writes.
    The folded graph must match the original under onnxruntime on random inputs (symbolic spatial dims set to
    each of ``check_sizes``) within ``tolerance`` (max abs error relative to the output's max abs), or nothing is
    written. A graph with nothing to fold is written unchanged, and the report says so.
    """
    from . import onnx_graph as g

    original = g.load(source)
    model = g.load(source)
    report = FoldReport(nodes_before=len(list(original.graph)), path=os.fspath(destination))
    report.folds = g.fold_graph(model)
    report.nodes_after = len(list(model.graph))
    if report.folds:
        feeds = g.random_feeds(model, check_sizes, seed=0)
        before, after = g.session(original), g.session(model)
        report.max_abs_error = max(_relative_error(after.run(None, f), before.run(None, f)) for f in feeds)
        report.checked_shapes = [tuple(next(iter(f.values())).shape) for f in feeds]
        if not report.max_abs_error <= tolerance:
            raise OnnxError(f"onnxruntime does not confirm the fold (error {report.max_abs_error:.3g} > "
                                f"{tolerance:g}); nothing was written.")
    g.write(model, destination, [os.fspath(source)])
    return report


def export_onnx(model: nn.Module, example_inputs: ExampleInputs, path: str | os.PathLike, *,
                dynamic_spatial: bool = True, check_inputs: list[ExampleInputs] | None = None,
                tolerance: float = 1e-5, export_tolerance: float = 1e-3, fold: bool = True) -> FoldReport:
    """Export an equalized model to ONNX with its equalizers folded; dynamic batch, height and width by default.

    Checked with onnxruntime on ``example_inputs``, on a random input 32 px larger (when ``dynamic_spatial``)
    and on ``check_inputs``: the folded graph must match the unfolded one within ``tolerance`` (the fold is exact
    up to float32 rounding) and the unfolded one must match PyTorch within ``export_tolerance`` (what the exporter
    and onnxruntime's kernels give); errors are max abs differences relative to the output's max abs. Nothing is
    written otherwise.
    """
    import onnx_ir as ir

    from . import onnx_graph as g

    args, kwargs = split_inputs(example_inputs)
    with eval_mode(model):
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "unfolded.onnx"
            _torch_export(model, args, kwargs, raw, dynamic_spatial)
            unfolded = g.load(raw)
            unfolded.metadata_props[g.METADATA_KEY] = json.dumps(
                {f"scale_equalizers.{eq.site.module_name}.{part}": eq.site.name
                 for eq in equalizers(model) for part in ("mean", "std")})
            folded = ir.from_proto(ir.to_proto(unfolded))
            report = FoldReport(folds=g.fold_graph(folded) if fold else [], nodes_before=len(list(unfolded.graph)),
                                nodes_after=len(list(folded.graph)), path=os.fspath(path), export_error=0.0)
            checks = [example_inputs] + ([_other_size(args, kwargs)] if dynamic_spatial else [])
            before, after = g.session(unfolded), g.session(folded)
            for inputs in checks + list(check_inputs or []):
                c_args, c_kwargs = split_inputs(inputs)
                with torch.no_grad():
                    expected = [t.detach().cpu().numpy() for t in tree_leaves(model(*c_args, **c_kwargs))
                                if isinstance(t, torch.Tensor)]
                tensors = [t for t in (*c_args, *c_kwargs.values()) if isinstance(t, torch.Tensor)]
                feed = {v.name: t.detach().cpu().numpy() for v, t in zip(unfolded.graph.inputs, tensors)}
                shape = tuple(tensors[0].shape)
                reference = before.run(None, feed)
                exported = _relative_error(reference[:len(expected)], expected)
                if not exported <= export_tolerance:
                    raise OnnxError(
                        f"torch.onnx.export's graph (before folding) differs from PyTorch by {exported:.3g} on input "
                        f"{shape}: the model does not export correctly"
                        + (" with dynamic height/width (e.g. adaptive pooling to fixed bins, fixed position "
                           "embeddings); use dynamic_spatial=False" if report.checked_shapes else "")
                        + f". {path} was not written.")
                error = _relative_error(after.run(None, feed), reference)
                if not error <= tolerance:
                    raise OnnxError(f"the folded graph differs from the unfolded one by {error:.3g} on input "
                                        f"{shape}; {path} was not written.")
                report.max_abs_error = max(report.max_abs_error, error)
                report.export_error = max(report.export_error, exported)
                report.checked_shapes.append(shape)
            g.write(folded, path, [])
    return report


def _torch_export(model: nn.Module, args: tuple, kwargs: dict, path: Path, dynamic_spatial: bool) -> None:
    def dims(value: Any):
        if isinstance(value, torch.Tensor):
            auto = torch.export.Dim.AUTO
            return {0: auto, **({2: auto, 3: auto} if value.dim() == 4 and dynamic_spatial else {})}
        return None

    shapes = {k: dims(v) for k, v in kwargs.items()} if kwargs else tuple(dims(a) for a in args)
    try:
        program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=shapes,
                                    verbose=False)
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OnnxError(f"torch.onnx.export could not export {type(model).__name__} ({first}). This happens "
                        f"without se_surgery too; try dynamic_spatial=False, or export the original model and "
                        f"fold with se_surgery.fold first.") from error
    program.save(os.fspath(path))


def _other_size(args: tuple, kwargs: dict) -> ExampleInputs:
    """The example inputs with height and width 32 larger (random values), to check the dynamic shapes."""
    def grow(t):
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            return torch.randn(*t.shape[:2], t.shape[2] + 32, t.shape[3] + 32, dtype=t.dtype, device=t.device)
        return t
    return {k: grow(v) for k, v in kwargs.items()} if kwargs else tuple(grow(a) for a in args)
