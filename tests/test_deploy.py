"""Deployment: fold in PyTorch, export to ONNX with the equalizers folded, fold graphs from elsewhere."""

import logging
import os
import warnings

import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import BUILDERS, SITES, batches, build, call, inputs

import se_surgery as se

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
EQUALIZED = sorted(n for n in BUILDERS if SITES[n])
# torch.onnx.export bakes these to the traced size (adaptive pooling to fixed bins; fixed position embeddings),
# before and without se_surgery: export_onnx detects it (test below), so they are exported with static H/W.
STATIC_SPATIAL = {"smp_PSPNet", "smp_UPerNet", "hf_upernet_convnext", "hf_dpt"}
# torch.onnx.export fails on transformers' Swin backbone, with or without equalizers.
NO_ONNX = {"hf_upernet_swin"}  # see test_export_errors_are_onnx_errors_that_say_why


def _equalized(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return se.equalize(build(name), inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False,
                           **kw)


@pytest.mark.parametrize("name", EQUALIZED)
def test_fold_in_pytorch_is_exact(name):
    eq = _equalized(name)
    folded = se.fold(eq)
    steps = folded.scale_equalizers.folds
    assert len(steps) == SITES[name] and se.equalizers(eq)  # the equalized model itself is kept
    for size in (128, 160):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref, out = call(eq, name, x), call(folded, name, x)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    left = {e.site.name for e in se.equalizers(folded)}
    assert left == {s.site for s in steps if s.action != "folded"}
    # What could not fold into a conv now acts on the low-resolution side of its resize, as in ONNX.
    assert all(e.before_resize for e in se.equalizers(folded) if e.site.kind == "upsample")
    if not left:  # everything folded: the original model's state_dict keys, nothing else
        assert folded.state_dict().keys() == build(name).state_dict().keys()


def _nodes(path):
    return len(onnx.load(path).graph.node)


@pytest.mark.parametrize("name", sorted(set(EQUALIZED) - NO_ONNX))
def test_export_onnx_folds_exactly_and_costs_at_most_the_documented_minimum(name, tmp_path):
    eq = _equalized(name)
    example = inputs(name, torch.randn(2, 3, 128, 128))
    dynamic = name not in STATIC_SPATIAL
    report = se.export_onnx(eq, example, tmp_path / "folded.onnx", dynamic_spatial=dynamic)
    assert len(report.folds) == SITES[name]
    assert report.max_abs_error <= 1e-5 and report.export_error <= 1e-3
    # the example, and a random input at batch 3 (32 px larger where height/width are dynamic)
    assert [s[0] for s in report.checked_shapes] == [2, 3]
    assert report.checked_shapes[1][2:] == ((160, 160) if dynamic else (128, 128))
    # every fold named after its PyTorch site, from the graph's structure (module path and source line)
    assert sorted(f.site for f in report.folds) == sorted(e.name for e in se.equalizers(eq))
    # Against the export of the original, un-equalized model: no more nodes, except the documented minimum
    # (1 low-resolution Add per zero-padded consumer, Mul + Add per addition fusion).
    original = tmp_path / "original.onnx"
    shapes = {0: torch.export.Dim.AUTO, **({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} if dynamic else {})}
    kw = {"kwargs": example, "dynamic_shapes": {"pixel_values": shapes}} if isinstance(example, dict) else \
        {"dynamic_shapes": (shapes,)}
    torch.onnx.export(build(name), () if isinstance(example, dict) else example, dynamo=True, verbose=False,
                      **kw).save(str(original))
    minimum = sum(f.nodes_left for f in report.folds)
    assert report.nodes_after <= _nodes(original) + minimum
    if minimum == 0:
        assert report.nodes_after <= _nodes(original)
    # No dead weights: every initializer is used (the replaced conv weights and equalizer constants are gone), and
    # the file is no larger than the original export plus the few new constants.
    folded = onnx.load(report.path)
    used = {i for n in folded.graph.node for i in n.input}
    assert all(init.name in used for init in folded.graph.initializer)
    assert os.path.getsize(report.path) <= os.path.getsize(original) * 1.01 + 4096
    # Dynamic batch (and height/width) kept in the folded file.
    dims = folded.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and (bool(dims[2].dim_param) == dynamic) and (bool(dims[3].dim_param) == dynamic)
    assert "folded" in str(report) and "nodes:" in str(report)


def test_export_detects_graphs_that_torch_onnx_bakes_to_one_size(tmp_path):
    eq = _equalized("smp_PSPNet")
    with pytest.raises(se.OnnxError, match="dynamic_spatial=False"):
        se.export_onnx(eq, (torch.randn(2, 3, 128, 128),), tmp_path / "x.onnx", dynamic_spatial=True)
    assert not (tmp_path / "x.onnx").exists()
    # the default decides by itself, and says why
    report = se.export_onnx(eq, (torch.randn(2, 3, 128, 128),), tmp_path / "x.onnx")
    assert any("static" in note and "adaptively" in note for note in report.notes)


def test_export_errors_are_onnx_errors_that_say_why(tmp_path):
    # transformers' Swin backbone exports, but with sizes of the example baked in: onnxruntime fails at another
    # size, and the error says so (not a raw onnxruntime exception).
    eq = _equalized("hf_upernet_swin")
    with pytest.raises(se.OnnxError, match=r"onnxruntime cannot run .* baked a size .*dynamic_spatial=False"):
        se.export_onnx(eq, {"pixel_values": torch.randn(2, 3, 128, 128)}, tmp_path / "x.onnx", dynamic_spatial=True)
    assert not (tmp_path / "x.onnx").exists()


class _Elsewhere(nn.Module):
    """Equalization written by hand, as another tool would: (x - m) * k per channel, an Add fusion too."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, padding=1)
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(8, 2, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        self.register_buffer("m", torch.tensor([0.1, -0.2, 0.3, 0.0]).view(4, 1, 1))
        self.register_buffer("k", torch.tensor([2.0, 0.5, 1.5, 3.0]).view(4, 1, 1))

    def forward(self, x):
        fine, coarse = torch.relu(self.fine(x)), self.coarse(x)
        up = (F.interpolate(coarse, scale_factor=2, mode="bilinear") - self.m) * self.k
        up2 = (F.interpolate(coarse, scale_factor=2, mode="bilinear") - 0.5) / 4.0
        return self.fuse(torch.cat([fine, up], 1)) + self.head(fine + up2)


def test_fold_onnx_on_a_graph_from_elsewhere(tmp_path):
    source = tmp_path / "elsewhere.onnx"
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(_Elsewhere().eval(), (x,), dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO,
                                       3: torch.export.Dim.AUTO},)).save(str(source))
    before = source.read_bytes()
    report = se.fold_onnx(source, tmp_path / "folded.onnx", check_sizes=(32, 48))
    # The exporter merges the two identical resizes, so neither branch's ops can move in front of the shared
    # Resize (they would change the other branch): both stay after it, the scale of the Concat branch folded.
    forms = sorted(f.form for f in report.folds)
    assert len(forms) == 2, str(report)
    assert forms[0].startswith("scale and shift") and forms[0].endswith("(the branch meets an Add)")
    assert forms[1].startswith("scale into Conv") and forms[1].endswith("(Conv is zero-padded)")
    assert all("after Resize (shared with another branch)" in f for f in forms)
    assert sorted(f.nodes_left for f in report.folds) == [1, 2]
    assert report.max_abs_error <= 1e-5 and report.checked_shapes == [(1, 3, 32, 32), (1, 3, 48, 48)]
    assert source.read_bytes() == before
    with pytest.raises(se.OnnxError, match="refusing to write .*one of the input's files"):
        se.fold_onnx(source, source)
    # Nothing to fold: written unchanged, and the report says so.
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Conv2d(3, 2, 1), (x,), dynamo=True, verbose=False).save(str(plain))
    nothing = se.fold_onnx(plain, tmp_path / "same.onnx")
    assert not nothing.folds and "unchanged" in str(nothing)
    assert len(ir.load(str(tmp_path / "same.onnx")).graph) == len(ir.load(str(plain)).graph)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(se.OnnxError, match="not a readable ONNX model"):
        se.fold_onnx(broken, tmp_path / "out.onnx")


def test_per_channel_equalizers_fold_in_onnx(tmp_path):
    eq = _equalized("smp_DeepLabV3Plus", per_channel=True)
    report = se.export_onnx(eq, (torch.randn(2, 3, 128, 128),), tmp_path / "m.onnx")
    assert len(report.folds) == 2 and report.max_abs_error <= 1e-5
