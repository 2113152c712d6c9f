"""Every spelling of a resize and of a fusion, for both halves of se_surgery: the graph pass reads aten ops
(``find.py``), the runtime meets the torch functions the user's code calls (``runtime.py``). One list per idea, so
the two halves cannot disagree on what a fusion is."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
# Graph side: fusions. List fusions take their tensors as argument 0, the others as arguments 0 and 1.
LIST_FUSION_OPS = {aten.cat.default: "cat", aten.concat.default: "cat", aten.concatenate.default: "cat",
                   aten.stack.default: "stack"}
ADDITIVE_OPS = {aten.add.Tensor: "add", aten.add_.Tensor: "add", aten.sub.Tensor: "sub", aten.sub_.Tensor: "sub",
                aten.subtract.Tensor: "sub", aten.subtract_.Tensor: "sub"}
FUSION_OPS = {**LIST_FUSION_OPS, **ADDITIVE_OPS}

# Runtime side: the functions user code calls, as a TorchFunctionMode meets them.
DIRECT_RESIZE = {torch._C._nn.upsample_linear1d: "linear", torch._C._nn.upsample_bilinear2d: "bilinear",
                 torch._C._nn.upsample_bicubic2d: "bicubic", torch._C._nn.upsample_trilinear3d: "trilinear",
                 torch._C._nn._upsample_bilinear2d_aa: "bilinear", torch._C._nn._upsample_bicubic2d_aa: "bicubic"}
RESIZE_FUNCS = frozenset({F.interpolate, *DIRECT_RESIZE})
LIST_FUSION_FUNCS = frozenset({torch.cat, torch.concat, torch.concatenate, torch.stack})
ADDITIVE_FUNCS = frozenset({torch.add, torch.sub, torch.subtract, torch.Tensor.add, torch.Tensor.add_,
                            torch.Tensor.sub, torch.Tensor.sub_, torch.Tensor.subtract, torch.Tensor.subtract_,
                            torch.Tensor.__add__, torch.Tensor.__iadd__,
                            torch.Tensor.__sub__, torch.Tensor.__isub__})
FUSION_FUNCS = LIST_FUSION_FUNCS | ADDITIVE_FUNCS


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
