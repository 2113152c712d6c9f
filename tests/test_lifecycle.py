"""The lifecycle: equalize, save, restore (in a new process), fold, the first call, and calibration data as users
have it."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from zoo import batches, build, call, inputs

import se_surgery as se

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier
TESTS = Path(__file__).parent
RESTORE = """
import sys, torch
sys.path.insert(0, {tests!r})
from zoo import BUILDERS, call
import se_surgery as se
name, source, x_path, out_path, how = sys.argv[1:6]
torch.manual_seed(123)  # other random weights than the saved model's: everything must come from the checkpoint
if how == "hf":
    import transformers
    model = getattr(transformers, {cls!r}).from_pretrained(source)
else:
    model = BUILDERS[name]()
se.restore(model, source)
model.eval()
with torch.no_grad():
    torch.save(call(model, name, torch.load(x_path)), out_path)
print(se.describe(model))
"""


def _restore_elsewhere(tmp_path, name, source, how="build", cls=""):
    """Restore ``source`` into a freshly built model in a new Python process; its output on a saved input."""
    script = tmp_path / "restore.py"
    script.write_text(RESTORE.format(tests=str(TESTS), cls=cls))
    x = torch.randn(2, 3, 128, 128)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, str(script), name, str(source), str(tmp_path / "x.pt"),
                           str(tmp_path / "out.pt"), how], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return x, torch.load(tmp_path / "out.pt"), done.stdout


def _equalized(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return se.equalize(build(name), inputs(name, torch.randn(2, 3, 128, 128)), batches(name), progress=False,
                           **kw)


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_restore_a_plain_pytorch_checkpoint_in_a_new_process(tmp_path, form):
    name = "smp_UPerNet"
    eq = _equalized(name, preserve_function=True).eval()
    path = tmp_path / f"ck.{form}"
    torch.save(eq.state_dict(), path) if form == "pt" else save_file(eq.state_dict(), str(path))
    x, out, described = _restore_elsewhere(tmp_path, name, path)
    with torch.no_grad():
        assert torch.equal(out, call(eq, name, x))  # bit for bit
    assert "9 equalizer(s)" in described and "zero-padded" in described  # what preserve_function did, too


def test_restore_a_transformers_save_pretrained_folder(tmp_path):
    name = "hf_segformer"
    eq = _equalized(name).eval()
    eq.save_pretrained(tmp_path / "saved")
    x, out, _ = _restore_elsewhere(tmp_path, name, tmp_path / "saved", how="hf",
                                   cls="SegformerForSemanticSegmentation")
    with torch.no_grad():
        assert torch.equal(out, call(eq, name, x))


def test_restore_an_smp_save_pretrained_folder(tmp_path):
    name = "smp_DeepLabV3Plus"
    eq = _equalized(name).eval()
    eq.save_pretrained(str(tmp_path / "saved"))
    x, out, _ = _restore_elsewhere(tmp_path, name, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(out, call(eq, name, x))


def test_restore_a_file_from_se_surgery_0_1(tmp_path):
    eq = _equalized("smp_PSPNet").eval()
    state = {k: v for k, v in eq.state_dict().items() if not k.endswith("_extra_state")}
    meta = {"model": "smp:PSPNet?encoder_name=resnet18&classes=5", "size": 128, "per_channel": False,
            "branches": "upsampled", "sites": [e.name for e in se.equalizers(eq)], "version": "0.1.0"}
    torch.save({"state_dict": state, "se_surgery": meta}, tmp_path / "old.pt")
    restored = se.restore(build("smp_PSPNet", seed=3), tmp_path / "old.pt").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(restored(x), eq(x))


def test_restore_errors_name_the_checkpoint(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(build("smp_FPN").state_dict(), plain)
    with pytest.raises(se.UsageError, match=r"plain\.pt holds no se_surgery equalizers"):
        se.restore(build("smp_FPN"), plain)
    eq = _equalized("smp_FPN")
    with pytest.raises(se.UsageError, match="same architecture"):
        se.restore(build("smp_PSPNet"), eq.state_dict())
    with pytest.raises(se.UsageError, match=r"nothing\.pt: no such file"):
        se.restore(build("smp_FPN"), tmp_path / "nothing.pt")


def test_fold_returns_the_model_and_a_fully_folded_one_loads_into_the_plain_class():
    eq = _equalized("smp_PSPNet")
    folded = se.fold(eq)
    assert isinstance(folded, type(eq)) and not se.equalizers(folded)
    assert [s.action for s in folded.scale_equalizers.folds] == ["folded"] * 4
    assert "folded by se_surgery.fold" in se.describe(folded)
    plain = build("smp_PSPNet")
    plain.load_state_dict(folded.state_dict())  # strict: no key beyond the plain model's
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), eq(x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="no scale equalizers to fold"):
        same = se.fold(plain)
    assert isinstance(same, type(plain))


def test_a_partly_folded_model_restores_too(tmp_path):
    name = "smp_UPerNet"  # zero-padded fusion conv and top-down additions: equalizers stay, before the resize
    folded = se.fold(_equalized(name))
    assert len(se.equalizers(folded)) == 9 and all(e.before_resize for e in se.equalizers(folded))
    torch.save(folded.state_dict(), tmp_path / "folded.pt")
    x, out, _ = _restore_elsewhere(tmp_path, name, tmp_path / "folded.pt")
    with torch.no_grad():
        assert torch.equal(out, call(folded, name, x))


@pytest.mark.parametrize("name", ["smp_UPerNet", "hf_segformer", "tv_deeplabv3"])
def test_equalize_with_nothing_else(name):
    model = build(name)
    with pytest.warns(UserWarning, match=r"no example_inputs given.*\(1, 3, 512, 512\)"):
        eq = se.equalize(model)
    assert len(se.equalizers(eq)) > 0 and not any(e.is_calibrated for e in se.equalizers(eq))
    images = torch.randn(4, 3, 128, 128)
    labels = torch.randint(0, 5, (4, 128, 128))
    if name.startswith("hf_"):  # transformers batches: dicts with labels
        loader = [{"pixel_values": images[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    else:  # what segmentation code has: a DataLoader of (image, label) pairs
        loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    se.calibrate(eq, loader, progress=False)
    assert all(e.is_calibrated for e in se.equalizers(eq))


def test_calibration_data_errors_say_what_to_do():
    eq = se.equalize(build("smp_FPN"), (torch.randn(2, 3, 128, 128),), progress=False)
    dataset = TensorDataset(torch.randn(4, 3, 128, 128))
    with pytest.raises(se.CalibrationError, match=r"TensorDataset.*DataLoader\(dataset, batch_size"):
        se.calibrate(eq, dataset, progress=False)
    with pytest.raises(se.CalibrationError, match="input_fn"):
        se.calibrate(eq, [{"image": torch.randn(2, 3, 128, 128)}], progress=False)
    # input_fn handles any other form.
    se.calibrate(eq, [{"image": torch.randn(2, 3, 128, 128)}], input_fn=lambda b: b["image"], progress=False)
    assert all(e.is_calibrated for e in se.equalizers(eq))


# ---------------------------------------------------------------------------------------------------------------
# ONNX files as the exporters write them


def _ort(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_cli_folds_a_file_torch_onnx_export_wrote_with_external_data(tmp_path):
    eq = _equalized("smp_DeepLabV3").eval()  # equalizers exported as ops, the way another tool's file would be
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
    from test_deploy import _Elsewhere

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
    eq = _equalized(name).eval()
    report = se.export_onnx(eq, {"pixel_values": torch.randn(1, 3, 128, 128)}, tmp_path / "seg.onnx")
    assert [s[0] for s in report.checked_shapes] == [1, 3] and not report.notes
    assert isinstance(report.inputs["pixel_values"][0], str)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        expected = eq(pixel_values=x).logits.numpy()
    assert abs(_ort(report.path, x) - expected).max() <= 1e-3 * abs(expected).max()
