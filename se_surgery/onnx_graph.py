"""ONNX graph rewriting with onnx-ir: find equalizers (``Resize`` then constant affine ops) and fold them.

Imported only when an ONNX function is used, so ``import se_surgery`` needs torch alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from .errors import OnnxError
from .files import atomic_write

METADATA_KEY = "se_surgery.equalizers"
_AFFINE = {"Sub", "Add", "Mul", "Div"}


@dataclass
class Fold:
    """One equalizer found in a graph and what was done with it."""

    resize: str
    site: str
    form: str          # "into Conv <name>", "scale into Conv <name>, shift before Resize", "before Resize"
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


def _per_channel(x: np.ndarray, channels: int) -> np.ndarray | None:
    """A scalar or a (C,1,1)/(1,C,1,1) constant as a length-C vector (None if it broadcasts otherwise)."""
    if x.size == 1:
        return np.full(channels, float(x.reshape(())))
    squeezed = x.reshape(-1)
    if squeezed.size == channels and x.ndim >= 3 and x.shape[-1] == x.shape[-2] == 1:
        return squeezed
    return None


def _channels(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    return shape[1]


def _conv_consumer(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The Conv that receives ``value`` directly or through a channel Concat, and the channel offset there."""
    node, fed, offset = _only_consumer(value), value, 0
    if node is not None and node.op_type == "Concat":
        if node.attributes["axis"].value not in (1, -3):
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


def _set_initializer(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    """Give ``node`` a new constant input (a fresh initializer, so a weight shared with other nodes is kept)."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array.astype(np.float32), name=name))
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
    shared = bool(set(resize.outputs[0].uses()) - set(branch))
    channels = len(shift)
    shape = (1, channels, 1, 1) if channels > 1 else ()
    value = resize.outputs[0] if shared else resize.inputs[0]
    added = []
    for op, array, tag in (("Mul", scale, "scale"), ("Add", shift, "shift")):
        if array is None:
            continue
        constant = np.asarray(array if channels > 1 else array[:1].reshape(()), dtype=np.float32).reshape(shape)
        name = _unique(graph, f"{resize.name}_se_{tag}")
        init = ir.Value(name=name, shape=ir.Shape(constant.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(constant, name=name))
        graph.register_initializer(init)
        node = ir.Node("", op, [value, init], name=f"{name}_{op.lower()}")
        node.outputs[0].name = f"{name}_out"
        node.outputs[0].type, node.outputs[0].shape = value.type, value.shape
        added.append(node)
        value = node.outputs[0]
    if shared:
        graph.insert_after(resize, added)
        for use in branch:
            use.node.replace_input_with(use.idx, value)
        return len(added), "after Resize (shared with another branch)"
    graph.insert_before(resize, added)
    resize.replace_input_with(0, value)
    return len(added), "before Resize"


def _fold_one(graph: ir.Graph, resize: ir.Node, chain: list[ir.Node], a: np.ndarray, b: np.ndarray,
              site: str) -> Fold | None:
    out = chain[-1].outputs[0]
    channels = _channels(resize.outputs[0]) or max(a.size, b.size)
    scale, shift = _per_channel(a, channels), _per_channel(b, channels)
    if scale is None or shift is None or np.any(scale == 0):
        return None
    mode = resize.attributes.get("mode")
    commutes = (mode.value if mode is not None else "nearest") in ("linear", "nearest", "cubic") and \
        (resize.attributes.get("coordinate_transformation_mode") is None or
         resize.attributes["coordinate_transformation_mode"].value != "tf_crop_and_resize")
    target = _conv_consumer(out)
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
    sl = slice(offset, offset + channels)
    view = (1, -1) + (1,) * (weight.ndim - 2)
    padded = _padded(conv)
    # The Conv now sees x where it saw a * x + b: weights scale by a; the shift (b, or b / a before the Resize).
    if not padded:
        bias = bias + (weight[:, sl] * shift.reshape(view)).sum(axis=tuple(range(1, weight.ndim)))
    weight[:, sl] = weight[:, sl] * scale.reshape(view)
    _set_initializer(graph, conv, 1, weight, _unique(graph, f"{conv.name}_se_weight"))
    _set_initializer(graph, conv, 2, bias, _unique(graph, f"{conv.name}_se_bias"))
    if not padded:
        return Fold(resize.name, site, f"into Conv {conv.name}", 0)
    left, where = _insert_affine(graph, resize, None, shift / scale, branch)
    return Fold(resize.name, site, f"scale into Conv {conv.name}; shift {where} (Conv is zero-padded)", left)


def fold_graph(model: ir.Model) -> list[Fold]:
    """Fold every equalizer of an in-memory onnx-ir model (no check; see fold_onnx)."""
    graph = model.graph
    sites = json.loads(model.metadata_props.get(METADATA_KEY, "{}"))  # constant name -> site, from export_onnx
    folds = []
    starts = [(n, use.node) for n in graph if n.op_type == "Resize" for use in n.outputs[0].uses()]
    for resize, first in starts:
        match = _affine_after(resize, first)
        if match is None:
            continue
        chain, a, b = match
        names = {v.name for node in chain for v in node.inputs}
        site = next((sites[n] for n in names if n in sites), "")
        if not site and not _reaches_fusion(chain[-1].outputs[0]):
            continue  # an affine map after a resize that meets no fusion is not an equalizer
        done = _fold_one(graph, resize, chain, a, b, site)
        if done is not None:
            folds.append(done)
    if folds:  # the replaced weights and the equalizers' constants are now unused: drop them from the file
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return folds


def _reaches_fusion(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` flows into a Concat or Add (directly, or through a Conv/Gemm/MatMul and shape ops)."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type in ("Concat", "Add", "Sum"):
                    return True
                if node.op_type in ("Conv", "Gemm", "MatMul", "Reshape", "Transpose", "Identity"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


# ----------------------------------------------------------------------------------------------------------------
# Files, checks


def load(path: str | os.PathLike) -> ir.Model:
    try:
        return ir.load(os.fspath(path))
    except FileNotFoundError:
        raise
    except Exception as error:
        raise OnnxError(f"{path} is not a readable ONNX model ({type(error).__name__}: {error}).") from error


def write(model: ir.Model, destination: str | os.PathLike, sources: list[str]) -> None:
    """Save and check beside the destination, then rename: never a half-written file, never over an input."""
    import onnx

    def save(tmp: str) -> None:
        ir.save(model, tmp)
        onnx.checker.check_model(tmp, full_check=True)

    try:
        atomic_write(destination, save, sources)
    except ValueError as error:
        raise OnnxError(str(error)) from error


def session(model: ir.Model):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def random_feeds(model: ir.Model, sizes: tuple[int, ...], seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs for checks: symbolic batch -> 1, other symbolic dims -> each of ``sizes``."""
    rng = np.random.default_rng(seed)
    feeds = []
    for size in sizes:
        feed = {}
        for value in model.graph.inputs:
            dims = [d if isinstance(d, int) else (1 if i == 0 else size) for i, d in enumerate(value.shape)]
            feed[value.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


