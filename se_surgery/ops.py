"""Every spelling of a resize and of a fusion, for every reader: the graph pass reads aten ops (``find.py``), the
runtime meets the torch functions the user's code calls (``runtime.py``), the ONNX fold reads ONNX op types
(``onnx_graph.py``), the report names them (``report.py``). One table per idea (:data:`FUSIONS`, the resize maps, the
ops a branch passes through), so the readers cannot disagree on what a fusion is: a new spelling is one entry here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .torch_internals import RESIZE_FUNCTIONS

aten = torch.ops.aten

INTERPOLATING = ("linear", "bilinear", "bicubic", "trilinear")

# Graph side: interpolating resizes and the mode each stands for (nearest and area keep the variance: not here).
RESIZE_OPS = {
    aten.upsample_linear1d.vec: "linear", aten.upsample_linear1d.default: "linear",
    aten.upsample_bilinear2d.vec: "bilinear", aten.upsample_bilinear2d.default: "bilinear",
    aten._upsample_bilinear2d_aa.vec: "bilinear", aten._upsample_bilinear2d_aa.default: "bilinear",
    aten.upsample_bicubic2d.vec: "bicubic", aten.upsample_bicubic2d.default: "bicubic",
    aten._upsample_bicubic2d_aa.vec: "bicubic", aten._upsample_bicubic2d_aa.default: "bicubic",
    aten.upsample_trilinear3d.vec: "trilinear", aten.upsample_trilinear3d.default: "trilinear",
}
# Runtime side: the resize functions user code calls, as a TorchFunctionMode meets them.
# (aten ops called directly, torch.ops.aten.upsample_bilinear2d(...), reach a TorchFunctionMode as themselves)
DIRECT_RESIZE = {**RESIZE_FUNCTIONS, **RESIZE_OPS, **{op.overloadpacket: mode for op, mode in RESIZE_OPS.items()}}
RESIZE_FUNCS = frozenset({F.interpolate, *DIRECT_RESIZE})


@dataclass(frozen=True)
class Fusion:
    """One kind of multi-level fusion, in every spelling se_surgery meets: the aten ops of the graph pass, the torch
    functions, methods and operators the runtime intercepts, and the ONNX op types of the ONNX fold."""

    kind: str                 # Site.fusion
    noun: str                 # for sentences
    aten: tuple = ()
    funcs: tuple = ()
    onnx: tuple = ()
    listed: bool = False      # its branches are the tensors of argument 0 (else arguments 0 and 1)


_T = torch.Tensor  # (the operators: torch 2.14 reports ``a + b`` as ``Tensor.add``; listed for versions that don't)
FUSIONS = (
    Fusion("cat", "concatenation", (aten.cat.default, aten.concat.default, aten.concatenate.default),
           (torch.cat, torch.concat, torch.concatenate), ("Concat",), listed=True),
    Fusion("stack", "stack", (aten.stack.default,), (torch.stack,), listed=True),  # ONNX: Unsqueeze + Concat
    Fusion("add", "addition", (aten.add.Tensor, aten.add_.Tensor),
           (torch.add, _T.add, _T.add_, _T.__add__, _T.__iadd__), ("Add", "Sum")),
    Fusion("sub", "subtraction", (aten.sub.Tensor, aten.sub_.Tensor, aten.subtract.Tensor, aten.subtract_.Tensor),
           (torch.sub, torch.subtract, _T.sub, _T.sub_, _T.subtract, _T.subtract_, _T.__sub__, _T.__isub__),
           ("Sub",)),
)
# The spellings that change their first operand in place.
INPLACE_FUNCS = frozenset({_T.add_, _T.__iadd__, _T.sub_, _T.subtract_, _T.__isub__})
# The table, by spelling.
FUSION_OPS = {op: f for f in FUSIONS for op in f.aten}
FUSION_FUNCS = {fn: f for f in FUSIONS for fn in f.funcs}
ONNX_FUSIONS = {op: f for f in FUSIONS for op in f.onnx}
NOUNS = {f.kind: f.noun for f in FUSIONS}


def branch_inputs(fusion: Fusion, args: tuple, kwargs: dict) -> list:
    """The branches a fusion call fuses, from its arguments (a graph node's or a runtime call's)."""
    if fusion.listed:
        return list(kwargs["tensors"] if "tensors" in kwargs else args[0])
    return list(args[:2])


# The ops a branch passes through on the way to a fusion, graph side. Linear in the branch (argument 0 of the
# parametrized ones: conv/linear in their input); a product is linear only where its other operand is a constant
# or a weight (find.py checks that); anything else (activations, normalization) ends the branch.
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
         aten.conv3d.padding}
PARAMETRIZED = CONVS | {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
                        aten.linear.default}
PRODUCTS = {aten.mul.Tensor, aten.div.Tensor, aten.matmul.default, aten.bmm.default, aten.mm.default}
LINEAR = PARAMETRIZED | PRODUCTS | set(RESIZE_OPS) | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
    aten.contiguous.default, aten.clone.default, aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.squeeze.dims, aten.expand.default, aten.expand_as.default, aten.slice.Tensor,
    aten.select.int, aten.dropout.default, aten.feature_dropout.default, aten.dropout_.default,
    aten.feature_dropout_.default, aten.alias.default, aten._to_copy.default, aten.to.dtype, aten.type_as.default,
    aten.pad.default, aten.constant_pad_nd.default, aten.replication_pad1d.default, aten.replication_pad2d.default,
    aten.replication_pad3d.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
    aten.reflection_pad3d.default, aten.avg_pool1d.default, aten.avg_pool2d.default,
    aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default, aten.neg.default, aten.mul.Scalar, aten.div.Scalar,
    aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.im2col.default, aten.col2im.default,
}
# Squashing ops: their output is a gate (bounded, multiplies a feature), not a feature. A product of a branch with a
# gate scales with the branch (an attention block's ``x * sigmoid(...)``); a product whose branch is itself a gate
# (``f * up(sigmoid(a))``) ends it.
GATES = {aten.sigmoid.default, aten.tanh.default, aten.hardsigmoid.default, aten._softmax.default,
         aten.softmax.int, aten.sigmoid_.default, aten.tanh_.default, aten.hardsigmoid_.default}
# ... of which these keep every channel where it is (an affine map of the branch commutes with them)
CHANNEL_KEEPING = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.dropout.default,
                   aten.feature_dropout.default, aten.dropout_.default, aten.feature_dropout_.default}
# ONNX side: the ops a branch passes through on the way to a fusion.
ONNX_LINEAR = ("Conv", "Gemm", "MatMul", "Reshape", "Transpose", "Identity", "Unsqueeze", "Squeeze", "Flatten",
               "Cast", "Resize", "Mul", "Div", "Pad")


def resize_mode(func, args, kwargs) -> str | None:
    """The interpolating mode of a resize call, or None (nearest, area, not a resize)."""
    if func is F.interpolate:
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        return mode if mode in INTERPOLATING else None
    return DIRECT_RESIZE.get(func)


def align_corners(func, args, kwargs) -> bool:
    if func is F.interpolate:
        value = kwargs.get("align_corners", args[4] if len(args) > 4 else None)
        return bool(value) if value is not None else False
    return bool(kwargs.get("align_corners", args[2] if len(args) > 2 else False))
