"""ONNX graph rewriting with onnx-ir: find equalizers (``Resize`` then constant affine ops) and fold them.

Imported only when an ONNX function is used, so ``import se_surgery`` needs torch alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from .absorb import absorbed
from .ops import ONNX_FUSIONS, ONNX_LINEAR
from .torch_internals import ONNX_STACK_TRACE

_AFFINE = {"Sub", "Add", "Mul", "Div"}


@dataclass
class Fold:
    """One equalizer found in a graph and what was done with it."""

    resize: str
    site: str
    form: str          # "into Conv <name>", "scale into Conv <name>; shift before Resize (...)", "scale and shift
                       # before Resize (...)": what was done, for the report
    nodes_left: int    # nodes this equalizer still costs (on the low-resolution side)


# ----------------------------------------------------------------------------------------------------------------
# Pattern: Resize -> affine ops with constant operands


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy().astype(np.float64)


def _only_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _affine_after(resize: ir.Node, node: ir.Node) -> tuple[list[ir.Node], np.ndarray, np.ndarray] | None:
    """The chain of constant Sub/Add/Mul/Div from ``node`` (a user of the Resize), as ``y = a * x + b``."""
    a, b = np.ones(()), np.zeros(())
    value, chain = resize.outputs[0], []
    while node is not None and len(chain) < 4 and node.op_type in _AFFINE and len(node.inputs) == 2:
        first, second = node.inputs
        if first is value and _const(second) is not None:
            c = _const(second)
        elif second is value and node.op_type in ("Add", "Mul") and _const(first) is not None:
            c = _const(first)
        else:
            break
        if node.op_type == "Sub":
            b = b - c
        elif node.op_type == "Add":
            b = b + c
        elif node.op_type == "Mul":
            a, b = a * c, b * c
        else:
            a, b = a / c, b / c
        chain.append(node)
        value = node.outputs[0]
        node = _only_consumer(value)
    return (chain, a, b) if chain else None


def _per_channel(x: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A scalar, or a constant shaped (C, 1, ...) / (1, C, 1, ...) against a rank-``rank`` tensor, as a length-C
    vector (None if it broadcasts otherwise)."""
    if x.size == 1:
        return np.full(channels, float(x.reshape(())))
    want = (channels,) + (1,) * (rank - 2)
    if x.ndim >= len(want) and x.shape[x.ndim - len(want):] == want and all(d == 1 for d in x.shape[:-len(want)]):
        return x.reshape(-1)
    return None


def _channels(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    return shape[1]


def _conv_consumer(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The Conv that receives ``value`` directly or through a channel Concat, and the channel offset there."""
    node, fed, offset = _only_consumer(value), value, 0
    if node is not None and node.op_type in ONNX_FUSIONS and ONNX_FUSIONS[node.op_type].kind == "cat":
        rank = len(value.shape) if value.shape is not None else 4
        if node.attributes["axis"].value not in (1, 1 - rank):
            return None
        for other in node.inputs:
            if other is value:
                break
            count = _channels(other)
            if count is None:
                return None
            offset += count
        fed = node.outputs[0]
        node = _only_consumer(fed)
    if node is None or node.op_type != "Conv" or node.inputs[0] is not fed:
        return None
    group = node.attributes.get("group")
    if (group.value if group is not None else 1) != 1 or _const(node.inputs[1]) is None:
        return None
    return node, offset


def _padded(conv: ir.Node) -> bool:
    auto = conv.attributes.get("auto_pad")
    if auto is not None and auto.value in ("SAME_UPPER", "SAME_LOWER"):
        return True
    pads = conv.attributes.get("pads")
    return pads is not None and any(p != 0 for p in pads.value)


def _constant(array: np.ndarray, name: str, dtype: ir.DataType) -> ir.Value:
    """An initializer value of ``dtype`` (the graph's: a float16 graph keeps float16 constants)."""
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                    const_value=ir.tensor(np.asarray(array).astype(dtype.numpy()), name=name))


def _dtype(value: ir.Value) -> ir.DataType:
    return value.dtype if value.dtype is not None else ir.DataType.FLOAT


def _set_initializer(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    """Give ``node`` a new constant input (a fresh initializer, so a weight shared with other nodes is kept)."""
    value = _constant(array, name, _dtype(node.inputs[1]))
    graph.register_initializer(value)
    if index < len(node.inputs):
        node.replace_input_with(index, value)
    else:
        node.resize_inputs(index + 1)
        node.replace_input_with(index, value)


def _unique(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _insert_affine(graph: ir.Graph, resize: ir.Node, scale: np.ndarray | None, shift: np.ndarray,
                   branch: list) -> tuple[int, str]:
    """Insert ``x * scale + shift`` where it is cheapest and exact: on the Resize's input (linear resizing commutes
    with affine maps), or, when the Resize also feeds other branches, after it on this branch (``branch``: its uses).
    """
    shared = resize.op_type != "Resize" or bool(set(resize.outputs[0].uses()) - set(branch))
    pinned = not shared and _pinned(resize.inputs[0], resize.outputs[0])
    shared = shared or pinned
    channels = len(shift)
    value = resize.outputs[0] if shared else resize.inputs[0]
    rank = len(value.shape) if value.shape is not None else 4
    shape = (1, channels) + (1,) * (rank - 2) if channels > 1 else ()
    added = []
    for op, array, tag in (("Mul", scale, "scale"), ("Add", shift, "shift")):
        if array is None:
            continue
        constant = np.asarray(array if channels > 1 else array[:1].reshape(())).reshape(shape)
        name = _unique(graph, f"{resize.name}_se_{tag}")
        init = _constant(constant, name, _dtype(value))
        graph.register_initializer(init)
        node = ir.Node("", op, [value, init], name=f"{name}_{op.lower()}")
        node.outputs[0].name = f"{name}_out"
        node.outputs[0].type = value.type  # no shape: one taken from the example would pin dynamic dims
        added.append(node)
        value = node.outputs[0]
    if shared:
        graph.insert_after(resize, added)
        for use in branch:
            use.node.replace_input_with(use.idx, value)
        return len(added), ("after Resize (the graph fixes its input's size at the export size)" if pinned else
                            "after Resize (shared with another branch)" if resize.op_type == "Resize" else
                            f"after {resize.op_type} (the exporter decomposed the resize)")
    graph.insert_before(resize, added)
    resize.replace_input_with(0, value)
    return len(added), "before Resize"


def _pinned(value: ir.Value, resized: ir.Value) -> bool:
    """Whether ``value``'s shape gives fixed spatial sizes where the resize's output has dynamic ones: torch.onnx
    records a deep level's size at the export size (1 x 1 x 1) even where it changes with the input, which
    onnxruntime tolerates at a Resize but not at an elementwise op it plans buffers for (two such values of equal
    recorded shape share a buffer): the affine map goes after the Resize there."""
    if value.shape is None or resized.shape is None:
        return False
    return any(isinstance(d, int) for d in list(value.shape)[2:]) and \
        not all(isinstance(d, int) for d in list(resized.shape)[2:])


def _fold_one(graph: ir.Graph, resize: ir.Node, chain: list[ir.Node], a: np.ndarray, b: np.ndarray,
              site: str) -> Fold | None:
    out = chain[-1].outputs[0]
    target = _conv_consumer(out)
    channels = _channels(resize.outputs[0]) or _channels(resize.inputs[0])
    if channels is None and max(a.size, b.size) > 1:
        channels = max(a.size, b.size)  # per-channel statistics give the count
    if channels is None and target is not None and target[0].inputs[0] is out:
        channels = _const(target[0].inputs[1]).shape[1]  # the conv reads this branch alone: its weight tells
    if channels is None:
        return None  # unknown channel count: leave this site alone rather than guess
    shapes = [v.shape for v in (resize.outputs[0], resize.inputs[0]) if v.shape is not None]
    rank = len(shapes[0]) if shapes else 4
    scale, shift = _per_channel(a, channels, rank), _per_channel(b, channels, rank)
    if scale is None or shift is None or np.any(scale == 0):
        return None
    mode = resize.attributes.get("mode")
    commutes = resize.op_type == "Resize" and (mode.value if mode is not None else "nearest") in (
        "linear", "nearest", "cubic") and (resize.attributes.get("coordinate_transformation_mode") is None or
                                           resize.attributes["coordinate_transformation_mode"].value
                                           != "tf_crop_and_resize")
    if target is None and not commutes:
        return None
    # Drop the affine chain: its consumers now read the Resize output.
    branch = list(out.uses())
    ir.convenience.replace_all_uses_with(out, resize.outputs[0])
    for node in reversed(chain):
        graph.remove(node, safe=True)
    if target is None:
        left, where = _insert_affine(graph, resize, scale, shift, branch)
        return Fold(resize.name, site, f"scale and shift {where} (the branch meets an Add)", left)
    conv, offset = target
    weight = _const(conv.inputs[1])
    bias = _const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else \
        np.zeros(weight.shape[0])
    padded = _padded(conv)
    # The Conv now sees x where it saw a * x + b (absorb.py's rule): weights scale by a; the shift goes into the
    # bias, or (zero-padded Conv) stays as b / a before the Resize.
    weight, absorbed_shift = absorbed(weight, slice(offset, offset + channels), scale,
                                      shift if not padded else np.zeros_like(shift))
    bias = bias + absorbed_shift
    _set_initializer(graph, conv, 1, weight, _unique(graph, f"{conv.name}_se_weight"))
    _set_initializer(graph, conv, 2, bias, _unique(graph, f"{conv.name}_se_bias"))
    if not padded:
        return Fold(resize.name, site, f"into Conv {conv.name}", 0)
    left, where = _insert_affine(graph, resize, None, shift / scale, branch)
    return Fold(resize.name, site, f"scale into Conv {conv.name}; shift {where} (Conv is zero-padded)", left)


def fold_graph(model: ir.Model, sites: list | None = None) -> list[Fold]:
    """Fold every equalizer of an in-memory onnx-ir model (no check; see fold_onnx). ``sites``: the PyTorch sites
    of the exported model, to name each fold (matched by module path and source line, as the exporter records)."""
    try:  # channel counts come from the shapes; a graph written without value_info has none yet
        onnx_ir.passes.common.ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - inference is best effort: unknown counts leave sites alone
        pass
    graph = model.graph
    folds = []
    starts = [(n, use.node) for n in graph if n.op_type == "Resize" for use in n.outputs[0].uses()]
    labels = _labels([n for n in graph if n.op_type == "Resize"], sites)
    known = {site.name for site in sites or []}
    # An exporter may decompose a resize (1-D linear becomes gathers and arithmetic): the equalizer's own ops,
    # recorded in the module scope of ``scale_equalizers.<site>``, show where it starts.
    scoped = {site.module_name: site.name for site in sites or []}
    for node in graph:
        name = scoped.get(_origin(node)[0].removeprefix("scale_equalizers."))
        producer = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if name and producer is not None and _origin(producer)[0] != _origin(node)[0] and \
                producer.op_type != "Resize":
            starts.append((producer, node))
            labels[producer] = name
    for resize, first in starts:
        match = _affine_after(resize, first)
        if match is None:
            continue
        chain, a, b = match
        if labels[resize] not in known and not _reaches_fusion(chain[-1].outputs[0]):
            continue  # an affine map after a resize that meets no fusion is not an equalizer
        done = _fold_one(graph, resize, chain, a, b, labels[resize])
        if done is not None:
            folds.append(done)
    if folds:  # the replaced weights and the equalizers' constants are now unused: drop them from the file
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return folds


def _origin(node: ir.Node) -> tuple[str, str]:
    """(module path, ``/path/file.py:line``) of the PyTorch call an exported node came from (torch.onnx's
    metadata; empty where the exporter left none)."""
    from .site import source_key_in_trace

    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]  # full paths, outermost first, then the op
    path = parts[-2] if len(parts) >= 2 else ""
    return path, source_key_in_trace(node.metadata_props.get(ONNX_STACK_TRACE, ""))


def _labels(resizes: list[ir.Node], sites: list | None) -> dict[ir.Node, str]:
    """A name per Resize from the graph's structure: the PyTorch site it is (module path, source line, order among
    that line's resizes), else where it came from, else the node's name."""
    origins = {node: _origin(node) for node in resizes}
    order: dict[tuple[str, str], list[ir.Node]] = {}
    for node in resizes:
        order.setdefault(origins[node], []).append(node)
    labels = {}
    for node in resizes:
        path, source = origins[node]
        candidates = [s for s in sites or [] if s.kind == "upsample" and s.owner == path and s.source == source]
        same_line = order[(path, source)]
        if len(candidates) == 1 and len(same_line) == 1:
            labels[node] = candidates[0].name
        elif candidates and len(same_line) == candidates[0].line_calls:
            rank = same_line.index(node)
            labels[node] = next((s.name for s in candidates if s.occurrence == rank), f"Resize {node.name}")
        elif candidates:
            labels[node] = "one of " + ", ".join(s.name for s in candidates)
        elif source:
            labels[node] = f"Resize {node.name} ({path or 'model'}, {os.path.basename(source)})"
        else:
            labels[node] = f"Resize {node.name}"
    return labels


def _reaches_fusion(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` flows into a fusion (directly, or through the linear ops of ``ops.ONNX_LINEAR``)."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type in ONNX_FUSIONS:
                    return True
                if node.op_type in ONNX_LINEAR:
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


# ----------------------------------------------------------------------------------------------------------------
# Files, checks


_DIM_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def name_dims(model: ir.Model) -> None:
    """Name the graph's dynamic input dims as people read them (``batch``, ``height``, ``width``; ``depth``,
    ``length``) instead of the exporter's ``s77``, in every shape of the graph (onnxruntime's symbolic shape
    inference, the first step of int8 quantization, needs the names to agree)."""
    rename: dict[str, str] = {}
    for value in model.graph.inputs:
        if value.shape is None or len(value.shape) < 3:
            continue
        names = ("batch", None, *_DIM_NAMES.get(len(value.shape) - 2, ()))
        for dim, name in zip(value.shape, names):
            if name is not None and not isinstance(dim, int) and dim.value is not None:
                rename.setdefault(dim.value, name if name not in rename.values() else f"{name}_{len(rename)}")
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(rename, key=len, reverse=True)) + r")\b")
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in ir.traversal.RecursiveGraphIterator(
        model.graph) for v in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        dims = [d if isinstance(d, int) or d.value is None else ir.SymbolicDim(pattern.sub(
            lambda m: rename[m.group(1)], d.value)) for d in value.shape]
        value.shape = ir.Shape(dims)
