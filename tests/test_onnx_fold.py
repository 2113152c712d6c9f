"""Issue 13: the ONNX fold infers what it needs instead of assuming, and inserts nothing shaped by the example."""

import onnx
import pytest
import torch
from decoders import RootOwner, Trilinear

import se_surgery as se

pytestmark = pytest.mark.slow


def _eq(model, shape):
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=g) for _ in range(3)]
    return se.equalize(model.eval(), (data[0],), data, progress=False), data[0]


def test_a_graph_without_intermediate_shapes_folds_exactly(tmp_path):
    eq, x = _eq(RootOwner(), (2, 3, 32, 32))  # the upsampled branch first in the concat
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
    eq, x = _eq(Trilinear(), (1, 1, 16, 16, 16))
    assert len(se.equalizers(eq)) == 2
    report = se.export_onnx(eq, (x,), tmp_path / "tri.onnx")
    assert (3, 1, 48, 48, 48) in report.checked_shapes and report.max_abs_error <= 1e-5
