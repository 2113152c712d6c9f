"""Save and restore: checkpoints as PyTorch, safetensors, transformers and smp write them, restored in a new
process; se-surgery 0.1 files; partly folded models; errors that name the checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from zoo import build, call, equalized

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


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_restore_a_plain_pytorch_checkpoint_in_a_new_process(tmp_path, form):
    name = "smp_UPerNet"
    eq = equalized(name, preserve_function=True).eval()
    path = tmp_path / f"ck.{form}"
    torch.save(eq.state_dict(), path) if form == "pt" else save_file(eq.state_dict(), str(path))
    x, out, described = _restore_elsewhere(tmp_path, name, path)
    with torch.no_grad():
        assert torch.equal(out, call(eq, name, x))  # bit for bit
    assert "9 equalizer(s)" in described and "zero-padded" in described  # what preserve_function did, too


def test_restore_a_transformers_save_pretrained_folder(tmp_path):
    name = "hf_segformer"
    eq = equalized(name).eval()
    eq.save_pretrained(tmp_path / "saved")
    x, out, _ = _restore_elsewhere(tmp_path, name, tmp_path / "saved", how="hf",
                                   cls="SegformerForSemanticSegmentation")
    with torch.no_grad():
        assert torch.equal(out, call(eq, name, x))


def test_restore_an_smp_save_pretrained_folder(tmp_path):
    name = "smp_DeepLabV3Plus"
    eq = equalized(name).eval()
    eq.save_pretrained(str(tmp_path / "saved"))
    x, out, _ = _restore_elsewhere(tmp_path, name, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(out, call(eq, name, x))


def test_restore_a_file_from_se_surgery_0_1(tmp_path):
    eq = equalized("smp_PSPNet").eval()
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
    eq = equalized("smp_FPN")
    with pytest.raises(se.UsageError, match="same architecture"):
        se.restore(build("smp_PSPNet"), eq.state_dict())
    with pytest.raises(se.UsageError, match=r"nothing\.pt: no such file"):
        se.restore(build("smp_FPN"), tmp_path / "nothing.pt")


def test_a_partly_folded_model_restores_too(tmp_path):
    name = "smp_UPerNet"  # zero-padded fusion conv and top-down additions: equalizers stay, before the resize
    folded = se.fold(equalized(name))
    assert len(se.equalizers(folded)) == 9 and all(e.before_resize for e in se.equalizers(folded))
    torch.save(folded.state_dict(), tmp_path / "folded.pt")
    x, out, _ = _restore_elsewhere(tmp_path, name, tmp_path / "folded.pt")
    with torch.no_grad():
        assert torch.equal(out, call(folded, name, x))


def test_a_per_channel_state_dict_into_a_scalar_model_is_refused_and_changes_nothing():
    from decoders import Small

    data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    scalar = se.equalize(Small(), (data[0],), data, progress=False)
    channels = se.equalize(Small(), (data[0],), data, progress=False, per_channel=True)
    own = {k: v.clone() for k, v in scalar.state_dict().items()}
    with pytest.raises(se.UsageError, match=r"per_channel=True, this model equalized with per_channel=False.*"
                                            r"nothing was loaded"):
        scalar.load_state_dict(channels.state_dict())
    assert all(torch.equal(v, scalar.state_dict()[k]) for k, v in own.items())  # no weight of it was loaded
    scalar.load_state_dict(own)  # its recipe is intact: its own state_dict loads
    assert scalar.scale_equalizers.recipe["per_channel"] is False


@pytest.mark.parametrize("bad", [42, None, ["a.pt"]])
def test_restore_from_something_that_is_no_checkpoint_says_what_a_checkpoint_is(bad):
    from decoders import Small

    with pytest.raises(se.UsageError, match="a checkpoint is a state_dict"):
        se.restore(Small(), bad)
