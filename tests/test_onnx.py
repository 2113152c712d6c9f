"""ONNX: export_onnx on every zoo model (exact folds at the documented cost, one-size graphs detected, errors that
say why), with its defaults (dims named, int8 quantization), the ONNX fold inferring what it needs, and fold_onnx
on files as the exporters write them (external data, the TorchScript exporter, float16)."""

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from decoders import FixedSize, RootOwner, Trilinear
from torch import nn
from zoo import BUILDERS, SITES, build, equalized, inputs

import se_surgery as se

pytestmark = pytest.mark.slow

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
EQUALIZED = sorted(n for n in BUILDERS if SITES[n])
# torch.onnx.export bakes these to the traced size (adaptive pooling to fixed bins; fixed position embeddings),
# before and without se_surgery: export_onnx detects it (test below), so they are exported with static H/W.
STATIC_SPATIAL = {"smp_PSPNet", "smp_UPerNet", "hf_upernet_convnext", "hf_dpt"}
# torch.onnx.export fails on transformers' Swin backbone, with or without equalizers.
NO_ONNX = {"hf_upernet_swin"}  # see test_export_errors_are_onnx_errors_that_say_why


def _nodes(path):
    return len(onnx.load(path).graph.node)


@pytest.mark.parametrize("name", sorted(set(EQUALIZED) - NO_ONNX))
def test_export_onnx_folds_exactly_and_costs_at_most_the_documented_minimum(name, tmp_path):
    eq = equalized(name)
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
    eq = equalized("smp_PSPNet")
    with pytest.raises(se.OnnxError, match=r"dynamic_spatial=True: PSPNet's decoder\.psp\.blocks\.\d.*pool\(s\) "
                                           r"adaptively.*Export once per deployment size"):
        se.export_onnx(eq, (torch.randn(2, 3, 128, 128),), tmp_path / "x.onnx", dynamic_spatial=True)
    assert not (tmp_path / "x.onnx").exists()
    # the default decides by itself, and says why
    report = se.export_onnx(eq, (torch.randn(2, 3, 128, 128),), tmp_path / "x.onnx")
    assert any("static" in note and "adaptively" in note for note in report.notes)


def test_export_errors_are_onnx_errors_that_say_why(tmp_path):
    # transformers' Swin backbone exports, but with sizes of the example baked in: onnxruntime fails at another
    # size, and the error says so (not a raw onnxruntime exception).
    eq = equalized("hf_upernet_swin")
    example = {"pixel_values": torch.randn(2, 3, 128, 128)}
    with pytest.raises(se.OnnxError, match=r"decode_head.psp_modules.1.0.* pool\(s\) adaptively"):
        se.export_onnx(eq, example, tmp_path / "x.onnx", dynamic_spatial=True)  # named before any export
    for module in eq.modules():  # pools to one bin: no layer pins the size but the Swin backbone's own reshapes
        if isinstance(module, nn.AdaptiveAvgPool2d):
            module.output_size = 1
    with pytest.raises(se.OnnxError, match=r"onnxruntime cannot run .* baked a size .*dynamic_spatial=False"):
        se.export_onnx(eq, example, tmp_path / "x.onnx", dynamic_spatial=True)
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
    eq = equalized("smp_DeepLabV3Plus", per_channel=True)
    report = se.export_onnx(eq, (torch.randn(2, 3, 128, 128),), tmp_path / "m.onnx")
    assert len(report.folds) == 2 and report.max_abs_error <= 1e-5

# ---------------------------------------------------------------------------------------------------------------
# Defaults and the ONNX fold


def _calibrated(model, shape, kwargs=False):
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=g) for _ in range(2)]
    example = {"pixel_values": data[0]} if kwargs else (data[0],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (random weights, untrained running statistics: what the export tests need)
        return se.equalize(model.eval(), example, data, progress=False, norm="running"), example


def test_upernet_exports_with_the_defaults_and_says_which_dims_are_static(tmp_path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    eq, example = _calibrated(smp.UPerNet("resnet18", encoder_weights=None, classes=3, decoder_channels=32),
                              (1, 3, 128, 128))
    report = se.export_onnx(eq, example, tmp_path / "upernet.onnx")
    assert any("static" in note and "decoder" in note for note in report.notes), report.notes
    assert report.inputs["x"][0] == "batch" and report.inputs["x"][2:] == [128, 128]
    assert len(report.folds) == 9


def test_a_model_that_cannot_run_at_another_size_falls_back_once_or_says_so(tmp_path):
    eq, example = _calibrated(FixedSize(), (2, 3, 32, 32))
    report = se.export_onnx(eq, example, tmp_path / "fixed.onnx")
    assert any("failed its check at another size" in n for n in report.notes)
    with pytest.raises(se.OnnxError, match="FixedSize itself cannot run"):
        se.export_onnx(eq, example, tmp_path / "other.onnx", dynamic_spatial=True)
    assert not (tmp_path / "other.onnx").exists()


def test_segformer_export_names_its_dims_and_quantizes_to_int8(tmp_path):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], decoder_hidden_size=32))
    eq, example = _calibrated(model, (2, 3, 64, 64), kwargs=True)
    report = se.export_onnx(eq, example, tmp_path / "segformer.onnx")
    assert report.inputs["pixel_values"] == ["batch", 3, "height", "width"]
    graph = onnx.load(tmp_path / "segformer.onnx").graph
    dims = {d.dim_param for v in [*graph.input, *graph.output, *graph.value_info]
            for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert dims and not any(d.startswith("s") and d[1:].isdigit() for d in dims), dims
    quant_pre_process(str(tmp_path / "segformer.onnx"), str(tmp_path / "pre.onnx"))
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 64, 64, generator=g).numpy() for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixel_values": x} for x in images])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "int8.onnx"), Reader())
    fp, q = (ort.InferenceSession(str(tmp_path / name)) for name in ("segformer.onnx", "int8.onnx"))
    agree = [np.mean(fp.run(None, {"pixel_values": x})[0].argmax(1) == q.run(None, {"pixel_values": x})[0].argmax(1))
             for x in images]
    assert np.mean(agree) >= 0.8, agree



def test_a_graph_without_intermediate_shapes_folds_exactly(tmp_path):
    eq, (x,) = _calibrated(RootOwner(), (2, 3, 32, 32))  # the upsampled branch first in the concat
    torch.onnx.export(eq, (x,), str(tmp_path / "eq.onnx"), dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO,
                                       3: torch.export.Dim.AUTO},))
    model = onnx.load(tmp_path / "eq.onnx")
    del model.graph.value_info[:]
    onnx.save(model, tmp_path / "bare.onnx")
    report = se.fold_onnx(tmp_path / "bare.onnx", tmp_path / "folded.onnx")
    assert len(report.folds) == 1 and report.max_abs_error <= 1e-5
    assert report.folds[0].form.startswith("into Conv")


def test_3d_ops_moved_before_the_resize_keep_dynamic_shapes(tmp_path):
    eq, (x,) = _calibrated(Trilinear(), (1, 1, 16, 16, 16))
    assert len(se.equalizers(eq)) == 2
    report = se.export_onnx(eq, (x,), tmp_path / "tri.onnx")
    assert (3, 1, 48, 48, 48) in report.checked_shapes and report.max_abs_error <= 1e-5

# ---------------------------------------------------------------------------------------------------------------
# ONNX files as the exporters write them


def _ort(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_cli_folds_a_file_torch_onnx_export_wrote_with_external_data(tmp_path):
    eq = equalized("smp_DeepLabV3").eval()  # equalizers exported as ops, the way another tool's file would be
    x = torch.randn(1, 3, 128, 128)
    auto = torch.export.Dim.AUTO
    torch.onnx.export(eq, (x,), str(tmp_path / "plain.onnx"), dynamo=True, verbose=False,
                      dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    assert (tmp_path / "plain.onnx.data").exists()  # as the exporter writes it
    inputs = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    cli = [sys.executable, "-m", "se_surgery.cli"]
    done = subprocess.run(cli + ["fold", "plain.onnx", "-o", "sub/folded.onnx"], cwd=tmp_path, capture_output=True,
                          text=True)  # a fresh process, a relative path into a new subfolder
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 equalizer(s) folded" in done.stdout and "model.call0_resize0" not in done.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == inputs  # inputs untouched
    # Self-contained: moved alone into another folder, loaded from another working directory, after the
    # exporter's data file is overwritten by another checkpoint, it still computes what the equalized model does.
    moved = tmp_path / "elsewhere" / "deploy.onnx"
    moved.parent.mkdir()
    (tmp_path / "sub" / "folded.onnx").rename(moved)
    assert not list((tmp_path / "sub").iterdir())
    (tmp_path / "plain.onnx.data").write_bytes(b"\0" * len(inputs["plain.onnx.data"]))
    with torch.no_grad():
        expected = eq(x).numpy()
    got = _ort(moved, x)
    assert abs(got - expected).max() <= 1e-4 * abs(expected).max()
    # Output paths that are the input's files are refused, and nothing is changed.
    for bad in ("plain.onnx", "plain.onnx.data", str(tmp_path / "plain.onnx.data")):
        done = subprocess.run(cli + ["fold", "plain.onnx", "-o", bad], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 1 and "one of the input's files" in done.stderr, done.stderr[-500:]
    assert (tmp_path / "plain.onnx").read_bytes() == inputs["plain.onnx"]


def test_fold_a_torchscript_export_and_a_float16_graph(tmp_path):
    import onnx

    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(_Elsewhere().eval(), (x,), str(tmp_path / "ts.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    report = se.fold_onnx(tmp_path / "ts.onnx", tmp_path / "ts_folded.onnx", check_sizes=(32, 48))
    assert len(report.folds) == 2 and report.max_abs_error <= 1e-5
    torch.onnx.export(_Elsewhere().eval().half(), (x.half(),), str(tmp_path / "half.onnx"), dynamo=True,
                      verbose=False)
    report = se.fold_onnx(tmp_path / "half.onnx", tmp_path / "half_folded.onnx", tolerance=2e-3)
    assert len(report.folds) == 2
    kinds = {i.data_type for i in onnx.load(str(tmp_path / "half_folded.onnx")).graph.initializer
             if i.name.endswith(("se_weight", "se_bias", "se_scale", "se_shift"))}
    assert kinds == {onnx.TensorProto.FLOAT16}  # the constants se_surgery wrote keep the graph's dtype


def test_export_from_a_batch_of_one_stays_dynamic(tmp_path):
    name = "hf_segformer"  # its reshapes specialise the batch when exported on a batch of one
    eq = equalized(name).eval()
    report = se.export_onnx(eq, {"pixel_values": torch.randn(1, 3, 128, 128)}, tmp_path / "seg.onnx")
    assert [s[0] for s in report.checked_shapes] == [1, 3] and not report.notes
    assert isinstance(report.inputs["pixel_values"][0], str)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        expected = eq(pixel_values=x).logits.numpy()
    assert abs(_ort(report.path, x) - expected).max() <= 1e-3 * abs(expected).max()


@pytest.mark.slow
def test_a_3d_fold_whose_deep_levels_the_export_pins_runs_at_another_size(tmp_path):
    from decoders import Deep3D

    torch.manual_seed(10071)
    model = Deep3D()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    eq = se.equalize(model, (x,), [torch.randn(2, 1, 16, 16, 16) * 2 + 0.3 for _ in range(3)], progress=False)
    report = se.export_onnx(eq, (x,), tmp_path / "deep.onnx")  # its checks run (3, 1, 48, 48, 48) in onnxruntime
    assert any("fixes its input's size" in f.form for f in report.folds), report.folds


@pytest.mark.slow
def test_onnx_outputs_are_named_as_the_model_returns_them(tmp_path):
    from decoders import RootOwner

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = RootOwner()

        def forward(self, x):
            y = self.body(x)
            return {"out": y, "aux": y * 2}

    x = torch.randn(2, 3, 32, 32)
    for model, names, given in [(RootOwner(), ["output"], None), (Dict(), ["out", "aux"], None),
                                (RootOwner(), ["mask"], ["mask"])]:
        eq = se.equalize(model.eval(), (x,), [x, torch.randn(2, 3, 32, 32)], progress=False)
        se.export_onnx(eq, (x,), tmp_path / "m.onnx", output_names=given)
        assert [o.name for o in onnx.load(tmp_path / "m.onnx").graph.output] == names


@pytest.mark.slow
def test_export_says_when_the_model_itself_gives_nan(tmp_path):
    from decoders import RootOwner

    x = torch.randn(2, 3, 32, 32)
    eq = se.equalize(RootOwner().eval(), (x,), [x, torch.randn(2, 3, 32, 32)], progress=False)
    with torch.no_grad():
        eq.fuse.bias[0] = float("nan")  # as an equalizer fed by untrained running statistics makes it
    with pytest.raises(se.OnnxError, match="itself gives NaN or Inf on example_inputs .* in eval mode"):
        se.export_onnx(eq, (x,), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
