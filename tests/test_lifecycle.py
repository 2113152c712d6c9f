"""Issue 9: equalize, save, restore (in a new process), fold, the first call, and calibration data as users have it."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from zoo import BUILDERS, batches, build, call, inputs

import se_surgery as se

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


def test_zoo_builders_are_all_restorable():
    # every zoo model's recipe is complete: tensor inputs only, shapes and dtypes recorded
    for name in ["smp_FPN", "hf_dpt"]:
        eq = _equalized(name)
        state = eq.state_dict()
        fresh = BUILDERS[name]()
        se.restore(fresh, state)
        assert [e.name for e in se.equalizers(fresh)] == [e.name for e in se.equalizers(eq)]
