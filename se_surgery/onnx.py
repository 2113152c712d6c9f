"""ONNX: export an equalized model with its equalizers folded away, and fold equalizers in any ONNX graph.

An equalizer appears in ONNX as ``Resize -> Sub/Add(c) -> Div/Mul(k)`` (in either order, scalar or per-channel
constants). Each one is folded by the cheapest exact form (docs/method.md, section 4):

1. its branch meets an unpadded ``Conv`` (directly or through a ``Concat`` on channels): scale and shift go into
   that Conv's weights and bias: no node left;
2. a zero-padded ``Conv``: the scale goes into its weights, and the shift moves in front of the ``Resize``
   (resizing commutes with adding a constant), one ``Add`` on the low-resolution map;
3. anything else (an ``Add`` fusion): the whole affine map moves in front of the ``Resize``, a ``Mul`` and an
   ``Add`` on the low-resolution map (1/factor^d of the cost, d spatial dims).

Every result is checked with onnxruntime against the unfolded graph (and, from :func:`export_onnx`, against
PyTorch) before it is written; a fold that cannot be confirmed is not written, and no input file is overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .dispatch import check_attached
from .errors import OnnxError
from .inputs import ExampleInputs, split_inputs
from .install import equalizers
from .integrations.zoo import export_hint
from .modes import eval_mode, unwrap
from .torch_internals import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path, tree_leaves

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
    inputs: dict[str, list] = field(default_factory=dict)   # the graph's input dims (names: dynamic)
    notes: list[str] = field(default_factory=list)

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
        lines += [f"input {name}: {dims}" for name, dims in self.inputs.items()]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def fold_onnx(source: str | os.PathLike, destination: str | os.PathLike, *, check_sizes: tuple[int, ...] = (128, 160),
              tolerance: float = 1e-5) -> FoldReport:
    """Fold the scale equalizers of an ONNX file into a new, self-contained file, checked by onnxruntime.

    Args:
        source: an ONNX file, e.g. written by ``torch.onnx.export(model, args, "model.onnx")``; external data is
            read from beside it, all of it at once: no input file is read, changed or written afterwards.
        destination: the file to write: weights inline below 2 GB, else in ``<destination>.data`` beside it. It
            loads from any working directory and can be moved with its ``.data`` file. Never one of the input's
            files.
        check_sizes: symbolic spatial dims are set to each of these for the check (a symbolic batch to 1).
        tolerance: the folded graph must match the original within this max abs error, relative to the output's
            max abs, or nothing is written.

    Returns:
        A :class:`FoldReport`. Equalizers are found by pattern: a Resize, then constant Sub/Add and Div/Mul, meeting
        a Concat or Add. A graph with nothing to fold is written unchanged, and the report says so.
    """
    from .onnx_check import random_feeds, relative_error, session
    from .onnx_graph import fold_graph
    from .onnx_io import load, write

    original, inputs = load(source)
    model = ir_copy(original)
    report = FoldReport(nodes_before=len(list(original.graph)), path=os.fspath(destination))
    report.folds = fold_graph(model)
    report.nodes_after = len(list(model.graph))
    if report.folds:
        feeds = random_feeds(model, check_sizes, seed=0)
        before, after = session(original), session(model)
        report.max_abs_error = max(relative_error(after.run(None, f), before.run(None, f)) for f in feeds)
        report.checked_shapes = [tuple(next(iter(f.values())).shape) for f in feeds]
        if not report.max_abs_error <= tolerance:
            raise OnnxError(f"onnxruntime does not confirm the fold (error {report.max_abs_error:.3g} > "
                            f"{tolerance:g}); nothing was written.")
    write(model, destination, inputs)
    return report


def ir_copy(model):
    """An independent copy of an in-memory onnx-ir model."""
    import onnx_ir as ir

    return ir.from_proto(ir.to_proto(model))


def export_onnx(model: nn.Module, example_inputs: ExampleInputs, path: str | os.PathLike, *,
                dynamic_spatial: bool | None = None, dynamic_batch: bool = True,
                check_inputs: list[ExampleInputs] | None = None, tolerance: float = 1e-5,
                export_tolerance: float = 1e-3, fold: bool = True,
                output_names: list[str] | None = None) -> FoldReport:
    """Export an equalized model to ONNX with its equalizers folded, checked by onnxruntime.

    Args:
        model: an equalized, calibrated model (one without equalizers is exported as it is).
        example_inputs: a tuple, dict or tensor; a batch of one is fine (the export runs on it repeated to two, so
            the batch stays dynamic).
        path: the file to write (self-contained, see :func:`fold_onnx`).
        dynamic_spatial: dynamic height/width (and depth for 3-D, length for 1-D inputs). ``None`` (default):
            static where the model pools adaptively to fixed bins (PSP-style pyramids bake the size into the
            graph), else dynamic, falling back once to static (with a note in the report) where the dynamic graph
            fails its check at another size.
        dynamic_batch: a dynamic batch dimension.
        check_inputs: more inputs to check on.
        tolerance: the folded graph must match the unfolded one within this (the fold is exact up to rounding).
        export_tolerance: the unfolded graph must match PyTorch within this (the exporter's and onnxruntime's
            float arithmetic).
        fold: fold the equalizers (False: export them as they are).
        output_names: the graph's output names. ``None``: named after the model's outputs, as PyTorch code reads
            them: a dict's keys (torchvision's ``out``), a transformers output's fields (``logits``), ``output`` for
            a single tensor, ``output_0``, ``output_1``, ... for a tuple.

    Checked on ``example_inputs``, on a random input at batch 3 with every spatial dim 32 larger (what is
    dynamic), and on ``check_inputs``; errors are max abs differences relative to the output's max abs. Every
    failure is an :class:`OnnxError` that says why; nothing is written then.
    """
    model = unwrap(model)
    check_attached(model)
    args, kwargs = split_inputs(example_inputs)
    job = _Export(args, kwargs, os.fspath(path), dynamic_batch, tuple(check_inputs or ()), tolerance,
                  export_tolerance, fold, tuple(output_names) if output_names is not None else None)
    notes = []
    pooled = [name for name, m in model.named_modules() if isinstance(m, _ADAPTIVE) and
              any(size not in (1, None) for size in _tuple(m.output_size))]
    if dynamic_spatial and pooled:
        raise OnnxError(f"dynamic_spatial=True: {type(model).__name__}'s {', '.join(pooled[:4])}"
                        f"{' ...' if len(pooled) > 4 else ''} pool(s) adaptively to fixed bins, which bakes the "
                        f"example's height/width into the exported graph, so no graph of it runs at other sizes. "
                        f"Export once per deployment size (example_inputs at that size, dynamic_spatial=False or "
                        f"None); {os.fspath(path)} was not written.")
    if dynamic_spatial is None:
        if pooled:
            notes.append(f"height/width are static: {', '.join(pooled[:4])}{' ...' if len(pooled) > 4 else ''} "
                         f"pool(s) adaptively to fixed bins, which bakes the example's size into the graph")
            dynamic_spatial = False
        else:
            try:
                return _export(model, job, True, notes)
            except _OtherSize as error:
                notes.append(f"height/width are static: the dynamic export failed "
                             f"{'to export' if isinstance(error, _NoDynamicExport) else 'its check at another size'} "
                             f"({str(error).split('. ')[0]})")
                dynamic_spatial = False
    return _export(model, job, dynamic_spatial, notes)


class _OtherSize(OnnxError):
    """The dynamic graph (or the model itself) failed at a size other than the example's."""


class _NoDynamicExport(_OtherSize):
    """torch.onnx.export could not export the model with dynamic height/width."""


_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


@dataclass(frozen=True)
class _Export:
    """What export_onnx was asked, once: the same for the dynamic try and the static fallback."""

    args: tuple
    kwargs: dict
    path: str
    dynamic_batch: bool
    check_inputs: tuple
    tolerance: float
    export_tolerance: float
    fold: bool
    output_names: tuple[str, ...] | None


def _export(model: nn.Module, job: _Export, dynamic_spatial: bool, notes: list[str]) -> FoldReport:
    from .onnx_check import relative_error, session
    from .onnx_graph import fold_graph, name_dims
    from .onnx_io import write

    path, args, kwargs = job.path, job.args, job.kwargs
    with eval_mode(model), torch.no_grad():
        names = list(job.output_names) if job.output_names is not None else _output_names(model(*args, **kwargs))
        unfolded = _torch_export(model, args, kwargs, dynamic_spatial, job.dynamic_batch, names)  # in memory
        name_dims(unfolded)
        folded = ir_copy(unfolded)
        report = FoldReport(folds=fold_graph(folded, [eq.site for eq in equalizers(model)]) if job.fold else [],
                            nodes_before=len(list(unfolded.graph)), nodes_after=len(list(folded.graph)),
                            path=path, export_error=0.0,
                            inputs={v.name: [d if isinstance(d, int) else str(d) for d in v.shape]
                                    for v in unfolded.graph.inputs}, notes=list(notes))
        first = unfolded.graph.inputs[0].shape
        batch = 3 if job.dynamic_batch and not isinstance(first[0], int) else None
        if job.dynamic_batch and batch is None:
            report.notes.append(f"the batch stays fixed at {first[0]}: torch.onnx.export specialised it (the model's "
                                f"graph bakes the batch size in, e.g. in a reshape)")
        checks = [("example_inputs", args, kwargs)]
        if batch or dynamic_spatial:
            checks.append((f"a random input at batch {batch or 'as given'}"
                           + (", 32 px larger" if dynamic_spatial else ""),
                           *split_inputs(_other_input(args, kwargs, batch, 32 if dynamic_spatial else 0))))
        checks += [(f"check_inputs[{i}]", *split_inputs(c)) for i, c in enumerate(job.check_inputs)]
        before, after = session(unfolded), session(folded)
        for label, c_args, c_kwargs in checks:
            try:
                outputs = model(*c_args, **c_kwargs)
            except Exception as error:  # the model's own error at another size
                tensors = [t for t in (*c_args, *c_kwargs.values()) if isinstance(t, torch.Tensor)]
                kind = _OtherSize if label.startswith("a random input") else OnnxError
                raise kind(f"{type(model).__name__} itself cannot run on {label} {tuple(tensors[0].shape)} "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). "
                           f"Export with dynamic_spatial=False and/or dynamic_batch=False; {path} was not "
                           f"written.") from error
            expected = [t.detach().cpu().numpy() for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
            tensors = [t for t in (*c_args, *c_kwargs.values()) if isinstance(t, torch.Tensor)]
            if not all(np.isfinite(e).all() for e in expected if np.issubdtype(e.dtype, np.floating)):
                raise OnnxError(f"{type(model).__name__} itself gives NaN or Inf on {label} "
                                f"{tuple(tensors[0].shape)} in eval mode, so no export can be checked against it. "
                                f"Check the model in eval mode first (se_surgery.describe shows how the equalizers "
                                f"were calibrated; norm layers with untrained running statistics give such "
                                f"outputs); {path} was not written.")
            feed = {v.name: t.detach().cpu().numpy() for v, t in zip(unfolded.graph.inputs, tensors)}
            shape = tuple(tensors[0].shape)
            baked = label != "example_inputs" and not label.startswith("check_inputs")
            reference = _run(before, feed, f"the unfolded export on {label} {shape}", path, baked)
            exported = relative_error(reference[:len(expected)], expected)
            if not exported <= job.export_tolerance:
                kind = _OtherSize if baked else OnnxError
                raise kind(f"torch.onnx.export's graph (before folding) differs from PyTorch by {exported:.3g} on "
                           f"{label} {shape}. {_hint(baked)}{path} was not written.")
            error = relative_error(_run(after, feed, f"the folded graph on {label} {shape}", path, baked), reference)
            if not error <= job.tolerance:
                raise OnnxError(f"the folded graph differs from the unfolded one by {error:.3g} on {label} "
                                f"{shape}; {path} was not written.")
            report.max_abs_error = max(report.max_abs_error, error)
            report.export_error = max(report.export_error, exported)
            report.checked_shapes.append(shape)
        write(folded, path, [])
    return report


def _hint(baked: bool) -> str:
    if not baked:
        return "The model does not export correctly with this torch.onnx.export. "
    return ("torch.onnx.export baked a size of the example into the graph (sizes computed from the input shape, "
            "adaptive pooling to fixed bins, position embeddings, a reshape that fixes the batch), without se_surgery "
            "too: export with dynamic_spatial=False (CLI: --static) and/or dynamic_batch=False. ")


def _run(session, feed: dict, what: str, path, baked: bool) -> list[np.ndarray]:
    try:
        return session.run(None, feed)
    except Exception as error:  # onnxruntime raises its own exception types
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if what.startswith("the folded graph"):  # the unfolded graph ran on the same feed: the fold is at fault
            raise OnnxError(f"onnxruntime cannot run {what} ({first[:300]}), while the unfolded export runs: "
                            f"se_surgery's fold broke the graph at the op named there. Export with fold=False and "
                            f"please report this with the model; {path} was not written.") from error
        raise (_OtherSize if baked else OnnxError)(f"onnxruntime cannot run {what} ({first[:300]}). "
                                                   f"{_hint(baked)}{path} was not written.") from error


def _output_names(outputs: Any) -> list[str]:
    """The names of a model's output tensors as PyTorch code reads them (see :func:`export_onnx`)."""
    names = []
    for path, leaf in tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(k.key) if isinstance(k, MappingKey) else k.name if isinstance(k, GetAttrKey) else
                 str(k.idx) if isinstance(k, SequenceKey) else str(k) for k in path]
        name = ".".join(parts) or "output"
        names.append(f"output_{name}" if name[0].isdigit() else name)
    return names


def _torch_export(model: nn.Module, args: tuple, kwargs: dict, dynamic_spatial: bool, dynamic_batch: bool,
                  output_names: list[str]):
    """torch.onnx.export's graph, as the onnx-ir model it builds in memory, its outputs named ``output_names``."""
    def dims(value: Any):
        if not isinstance(value, torch.Tensor):
            return None
        auto = torch.export.Dim.AUTO
        return {**({0: auto} if dynamic_batch else {}),
                **({d: auto for d in range(2, value.dim())} if dynamic_spatial else {})}

    def two(value: Any):  # a batch of one is specialised by torch.export: export on it repeated
        if dynamic_batch and isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
            return value.expand(2, *value.shape[1:]).contiguous()
        return value

    shapes = {k: dims(v) for k, v in kwargs.items()} if kwargs else tuple(dims(a) for a in args)
    try:
        program = torch.onnx.export(model, tuple(two(a) for a in args), kwargs={k: two(v) for k, v in kwargs.items()}
                                    or None, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                    output_names=output_names)
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        extra = export_hint(model)
        kind = _NoDynamicExport if dynamic_spatial else OnnxError
        raise kind(f"torch.onnx.export could not export {type(model).__name__} ({first[:300]}). This happens "
                   f"without se_surgery too; try dynamic_spatial=False, or export the original model and fold with "
                   f"se_surgery.fold first.{extra}") from error
    return program.model


def _other_input(args: tuple, kwargs: dict, batch: int | None, grow: int) -> ExampleInputs:
    """Random inputs like the example's, at ``batch`` (None: the same) with every spatial dim ``grow`` larger."""
    def other(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 3:
            shape = (batch or t.shape[0], t.shape[1], *[s + grow for s in t.shape[2:]])
            return torch.randn(shape, dtype=t.dtype, device=t.device)
        return t
    return {k: other(v) for k, v in kwargs.items()} if kwargs else tuple(other(a) for a in args)
