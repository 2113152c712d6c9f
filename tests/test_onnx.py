"""ONNX export and the ONNX fold: export works with its defaults, names its dims and quantizes; the fold infers
what it needs instead of assuming, and inserts nothing shaped by the example."""

import numpy as np
import onnx
import pytest
import torch
from decoders import FixedSize, RootOwner, Trilinear

import se_surgery as se

pytestmark = pytest.mark.slow



def _calibrated(model, shape, kwargs=False):
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=g) for _ in range(2)]
    example = {"pixel_values": data[0]} if kwargs else (data[0],)
    return se.equalize(model.eval(), example, data, progress=False), example


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
